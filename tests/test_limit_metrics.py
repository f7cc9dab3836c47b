"""Limit metrics: each limited key's use of each limit, as the store counts it.

The real gateway (uvicorn on 127.0.0.1, mock upstream) takes traffic from several users
and orgs, on SQLite and on Redis; the metrics collected are compared with what the
store itself holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Any

import openai
import pytest

from tokenlay_otel import TokenlayOpenAI
from tokenlay_otel.proxy import parse_rules
from tokenlay_otel.proxy.limit_metrics import limit_points
from tokenlay_otel.proxy.local import local_proxy
from tokenlay_otel.proxy.store import Hold

from .conftest import PROVIDER_KEY, SpanCapture
from .proxy_harness import PROXY_KEY
from .proxy_store_view import StoreView, redis_url, store

pytestmark = pytest.mark.slow  # real stores read by the limit metrics

__all__ = ["redis_url", "store"]  # fixtures

RULES = parse_rules(
    [
        {
            "id": "budgets",
            "if": {},
            "then": {
                "limits": [
                    {"type": "tokens", "max": 100_000, "window": "day", "per": "user"},
                    {"type": "requests", "max": 1000, "window": "total", "per": "org"},
                    {"type": "cost", "max": 1.0, "window": "month", "per": "user"},
                    {"type": "concurrent", "max": 8, "per": "user"},
                ]
            },
        }
    ]
)
MESSAGES = [{"role": "user", "content": "hello"}]


def _points(capture: SpanCapture) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for name, (_, points) in capture.metrics().items():
        if name.startswith("tokenlay.proxy.limit."):
            out[name] = {tuple(str(p.attributes[k]) for k in _KEYS): float(p.value) for p in points}
    return out


_KEYS = ("tokenlay.rule.id", "tokenlay.limit.type", "tokenlay.limit.window",
         "tokenlay.limit.field", "tokenlay.limit.value")  # fmt: skip


def _traffic(url: str, calls: list[tuple[str | None, str]]) -> None:
    def one(who: tuple[str | None, str]) -> None:
        user, org = who
        meta = {"org": org} | ({"user": user} if user else {})
        client = TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key=PROXY_KEY,
                                tokenlay_base_url=url, metadata=meta, max_retries=0)  # fmt: skip
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, calls))


def test_limit_metrics_read_what_the_store_counts(store: StoreView) -> None:
    capture = SpanCapture()
    users = [("u1", "o1")] * 6 + [("u2", "o1")] * 3 + [("u3", "o2")] * 2 + [(None, "o2")]
    with local_proxy(rules=RULES, keys=(PROXY_KEY,), store=store.make(),
                     meter_provider=capture.meter_provider) as url:  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(1) as reader:
            # Collected while the traffic runs, too: reading never gets in its way.
            during = reader.submit(lambda: [_points(capture) for _ in range(5)])
            _traffic(url, users)
            during.result(timeout=60)
        got = _points(capture)
    counted = store.counters()

    usage, utilization = got["tokenlay.proxy.limit.usage"], got["tokenlay.proxy.limit.utilization"]
    assert set(usage) == set(utilization)
    expected = {}
    for key, value in counted.items():
        kind, window, rest = key.split(":", 2)
        field, _, rest = rest.partition("=")
        subject, _, label = rest.rpartition(":")
        if label != "estimated" and value > 0:
            who = subject.replace("%2A", "*")
            expected[("budgets", kind, window, field, who)] = value
    assert set(usage) == set(expected), (sorted(usage), sorted(expected))
    assert usage == pytest.approx(expected)
    # Every user, org and the calls without a user are there; tokens: the mock's 23 a call.
    assert usage[("budgets", "tokens", "day", "user", "u1")] == 6 * 23
    assert usage[("budgets", "tokens", "day", "user", "*")] == 23
    assert usage[("budgets", "requests", "total", "org", "o1")] == 9
    tokens = ("budgets", "tokens", "day", "user", "u1")
    assert utilization[tokens] == pytest.approx(6 * 23 / 100_000)
    cost = ("budgets", "cost", "month", "user", "u2")
    assert utilization[cost] == pytest.approx(usage[cost] / 1.0)


def test_the_most_used_keys_are_kept_when_there_are_too_many(store: StoreView) -> None:
    capture = SpanCapture()
    calls = [(f"user{n}", "o1") for n in range(6) for _ in range(n + 1)]  # user5 uses most
    with local_proxy(rules=RULES, keys=(PROXY_KEY,), store=store.make(), limit_metrics_top=3,
                     meter_provider=capture.meter_provider) as url:  # fmt: skip
        _traffic(url, calls)
        usage = _points(capture)["tokenlay.proxy.limit.usage"]
    tokens = {k[4]: v for k, v in usage.items() if k[1] == "tokens"}
    assert tokens == {"user5": 6 * 23, "user4": 5 * 23, "user3": 4 * 23}


def test_concurrency_is_the_live_leases(store: StoreView) -> None:
    async def run() -> list[Any]:
        backend = store.make()
        hold = Hold("concurrent:total:user=u%2F1:now", 1, 8, 120, lease=True)
        await backend.admit([hold], "call-1", 60)
        await backend.admit([hold], "call-2", 60)
        await backend.admit([Hold("concurrent:total:user=u2:now", 1, 8, 120, lease=True)],
                            "call-3", 0.001)  # fmt: skip
        await asyncio.sleep(0.05)  # call-3's lease has expired
        points = await limit_points(RULES, backend, top=10)
        await backend.close()
        return points

    points = asyncio.run(run())
    assert [(p.limit.type, p.value, p.used) for p in points] == [("concurrent", "u/1", 2.0)]
    assert points[0].utilization == pytest.approx(2 / 8)


def test_rules_that_share_a_limit_list_only_the_values_they_admitted(store: StoreView) -> None:
    """Free and pro users are counted in one requests-per-day counter (a user's day is
    one number), but each rule shows only its own users against its own maximum."""
    capture = SpanCapture()
    shared = parse_rules([
        {"id": "free", "priority": 2, "if": {"plan": "free"},
         "then": {"limits": [{"type": "requests", "max": 6, "window": "day", "per": "user"}]}},
        {"id": "pro", "priority": 1, "if": {"plan": "pro"},
         "then": {"limits": [{"type": "requests", "max": 40, "window": "day", "per": "user"}]}},
    ])  # fmt: skip

    def call(user: str, plan: str) -> None:
        client = TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key=PROXY_KEY,
                                tokenlay_base_url=url, max_retries=0,
                                metadata={"user": user, "plan": plan})  # fmt: skip
        with contextlib.suppress(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    with local_proxy(rules=shared, keys=(PROXY_KEY,), store=store.make(), limit_metrics_top=2,
                     meter_provider=capture.meter_provider) as url:  # fmt: skip
        work = [(f"pro{n}", "pro") for n in range(3) for _ in range(10 + n)]
        work += [(f"free{n}", "free") for n in range(2) for _ in range(3 + n)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda who: call(*who), work))
        utilization = _points(capture)["tokenlay.proxy.limit.utilization"]
    by_rule: dict[str, dict[str, float]] = {}
    for (rule, _, _, _, value), used in utilization.items():
        by_rule.setdefault(rule, {})[value] = used
    assert by_rule == {
        "free": {"free1": pytest.approx(4 / 6), "free0": pytest.approx(3 / 6)},
        "pro": {"pro2": pytest.approx(12 / 40), "pro1": pytest.approx(11 / 40)},
    }
