from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import openai
import pytest

from tokenlay_otel import TokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.proxy import ProxyConfig, SQLiteStore, parse_rules
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, SpanCapture
from .proxy_harness import PROXY_KEY, proxy_in_thread

pytestmark = pytest.mark.slow  # a local proxy on loopback with real upstreams

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]

RULES = {
    "rules": [
        {
            "id": "free-daily",
            "priority": 10,
            "if": {"plan": "free"},
            "then": {
                "limits": [{"type": "requests", "max": 3, "window": "day", "per": "user"}],
                "on_limit_exceeded": {
                    "action": "block",
                    "error_message": "Free plan: 3 requests a day",
                    "error_code": "free_limit",
                },
            },
        },
        {
            "id": "pro-spend",
            "priority": 5,
            "if": {"plan": "pro"},
            "then": {
                "limits": [{"type": "cost", "max": 0.001, "window": "month", "per": "user"}],
                "on_limit_exceeded": {"action": "downgrade", "downgrade_to": "gpt-4o-mini"},
            },
        },
        {
            "id": "team-tokens",
            "if": {"plan": "team"},
            "then": {"limits": [{"type": "tokens", "max": 200, "window": "day", "per": "org"}]},
        },
        {
            "id": "banned",
            "priority": 100,
            "if": {"user": {"startsWith": "banned-"}},
            "then": {"action": "block"},
        },
        {"id": "default-model", "if": {"feature": "summary"}, "then": {"model": "gpt-4o-mini"}},
    ]
}


@pytest.fixture
def proxy(tmp_path: Path, telemetry: SpanCapture):  # type: ignore[no-untyped-def]
    config = ProxyConfig(
        keys=frozenset({PROXY_KEY}),
        rules=parse_rules(RULES),
        store=SQLiteStore(tmp_path / "usage.db"),
        mock_upstream=True,
        tracer_provider=telemetry.provider,
        meter_provider=telemetry.meter_provider,
    )
    with proxy_in_thread(config) as url:
        yield url


def client(proxy: str, **kwargs: object) -> TokenlayOpenAI:
    return TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        tokenlay_key=PROXY_KEY,
        tokenlay_base_url=proxy,
        max_retries=0,
        **kwargs,
    )


def test_free_user_is_blocked_after_n_requests(proxy: str) -> None:
    c = client(proxy, metadata={"plan": "free"})
    with metadata(user="free-1"):
        for i in range(3):
            reply = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            meta = get_tokenlay_metadata(reply)
            assert meta.rule_id == "free-daily"
            assert meta.rule_action == "allow"
            assert meta.input_tokens and meta.output_tokens
            assert meta.cost and meta.cost > 0
            if i == 2:
                assert meta.warnings and "100% of the daily requests limit" in meta.warnings[0]
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err = info.value
    assert err.status_code == 429
    assert err.code == "free_limit"
    assert "Free plan: 3 requests a day" in err.message
    assert err.response.headers["x-should-retry"] == "false"
    assert 0 < int(err.response.headers["retry-after"]) <= 86400
    meta = get_tokenlay_metadata(err)
    assert (meta.rule_action, meta.limit_exceeded) == ("block", True)
    # Another user has their own budget.
    with metadata(user="free-2"):
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_pro_user_is_downgraded_after_the_spend_cap(proxy: str) -> None:
    c = client(proxy, metadata={"plan": "pro", "user": "pro-1"})
    seen = []
    for _ in range(8):
        # max_tokens bounds what each call reserves against the spend cap.
        reply = c.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=16)
        meta = get_tokenlay_metadata(reply)
        seen.append((reply.model, meta.model, meta.limit_exceeded))
    assert seen[0] == ("gpt-4o", None, False)
    assert seen[-1] == ("gpt-4o-mini", "gpt-4o-mini", True)
    meta = get_tokenlay_metadata(reply)
    assert any("downgraded to gpt-4o-mini" in w for w in meta.warnings)


def test_tokens_limit_per_org_with_warning(proxy: str) -> None:
    c = client(proxy, metadata={"plan": "team", "org": "org-t"})
    statuses = []
    for i in range(12):
        with metadata(user=f"member-{i}"):
            try:
                reply = c.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=16
                )
                statuses.append(("ok", get_tokenlay_metadata(reply).warnings))
            except openai.RateLimitError:
                statuses.append(("blocked", None))
    kinds = [s for s, _ in statuses]
    assert "blocked" in kinds and kinds[0] == "ok"
    assert kinds == sorted(kinds, key=lambda k: k == "blocked")  # once blocked, stays blocked
    warned = [w for s, w in statuses if s == "ok" and w]
    assert warned and "daily tokens limit (200)" in warned[-1][0]


def test_explicit_block_and_model_fill(proxy: str) -> None:
    c = client(proxy)
    with pytest.raises(openai.PermissionDeniedError), metadata(user="banned-9"):
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    raw = c.with_options(max_retries=0).post(
        "/chat/completions",
        body={"messages": MESSAGES},
        cast_to=object,
        options={"headers": {"x-tokenlay-feature": "summary"}},
    )
    assert raw["model"] == "gpt-4o-mini"


def test_streaming_through_the_proxy_counts_usage_and_cost(
    proxy: str, telemetry: SpanCapture
) -> None:
    from tokenlay_otel import TokenlayInstrumentor
    from tokenlay_otel._config import Settings

    instrumentor = TokenlayInstrumentor()
    instrumentor.instrument(
        tracer_provider=telemetry.provider,
        meter_provider=telemetry.meter_provider,
        settings=Settings(),
    )
    try:
        c = client(proxy, metadata={"user": "streamer", "plan": "free"})
        stream = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        chunks = list(stream)
    finally:
        instrumentor.uninstrument()
    assert all(ch.choices for ch in chunks)  # the usage chunk stays hidden
    meta = get_tokenlay_metadata(stream)
    assert meta.rule_id == "free-daily"
    assert meta.input_tokens and meta.output_tokens and meta.cost
    spans = {s.name: s for s in telemetry.spans()}
    llm = spans["chat gpt-4o-mini"]
    assert llm.attributes["tokenlay.cost.source"] == "proxy"
    assert llm.attributes["tokenlay.cost.usd"] == pytest.approx(meta.cost)
    server = spans["POST /v1/chat/completions"]
    # One trace: app -> proxy -> upstream.
    assert server.context.trace_id == llm.context.trace_id
    assert server.parent.span_id == llm.context.span_id
    upstream = spans["upstream POST /chat/completions"]
    assert upstream.parent.span_id == server.context.span_id
    assert server.attributes["tokenlay.user"] == "streamer"


def test_a_plain_stream_without_include_usage_gets_no_extra_chunk(proxy: str) -> None:
    import httpx2

    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {"authorization": f"Bearer {PROXY_KEY}", "x-tokenlay-user": "curl"}
    with httpx2.stream("POST", proxy + "/v1/chat/completions", json=body, headers=headers) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in e for e in events)


def test_wrong_key_is_401(proxy: str) -> None:
    c = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY, tokenlay_key="wrong", tokenlay_base_url=proxy, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"


def test_malformed_request_is_400(proxy: str) -> None:
    import httpx2

    r = httpx2.post(
        proxy + "/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {PROXY_KEY}"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_real_upstream_and_its_errors_pass_through(tmp_path: Path) -> None:
    from tokenlay_otel.testing import Reply

    with FakeOpenAIServer() as upstream:
        config = ProxyConfig(
            keys=frozenset({PROXY_KEY}),
            rules=[],
            store=SQLiteStore(tmp_path / "u.db"),
            allow_providers=(upstream.url,),
        )
        with proxy_in_thread(config) as url:
            c = TokenlayOpenAI(
                provider_api_key=PROVIDER_KEY,
                provider_api_base=upstream.url + "/v1",
                tokenlay_key=PROXY_KEY,
                tokenlay_base_url=url,
                max_retries=0,
            )
            reply = c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert reply.choices[0].message.content == "Hello from the fake server."
            sent = upstream.requests[-1]
            assert sent.path == "/v1/chat/completions"
            assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
            assert not [h for h in sent.headers if h.startswith("x-tokenlay")]
            assert get_tokenlay_metadata(reply).cost == pytest.approx(12 * 2.5e-6 + 7 * 10e-6)
            upstream.reply(Reply(status=418, body={"error": {"message": "teapot"}}))
            with pytest.raises(openai.APIStatusError) as info:
                c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert info.value.status_code == 418
            assert "teapot" in info.value.message  # message format differs by openai version
        # Upstream gone: a clear 502.
    with proxy_in_thread(ProxyConfig(keys=frozenset({PROXY_KEY}), rules=[],
                                     store=SQLiteStore(tmp_path / "u2.db"),
                                     allow_providers=("http://127.0.0.1:9",))) as url:  # fmt: skip
        c = TokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            provider_api_base="http://127.0.0.1:9/v1",
            tokenlay_key=PROXY_KEY,
            tokenlay_base_url=url,
            max_retries=0,
        )
        with pytest.raises(openai.APIStatusError) as info:
            c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert info.value.status_code == 502
        assert "could not be reached" in info.value.message


def test_sqlite_counts_survive_a_restart(tmp_path: Path, telemetry: SpanCapture) -> None:
    def config() -> ProxyConfig:
        return ProxyConfig(
            keys=frozenset({PROXY_KEY}),
            rules=parse_rules(RULES),
            store=SQLiteStore(tmp_path / "usage.db"),
            mock_upstream=True,
        )

    with proxy_in_thread(config()) as url:
        c = client(url, metadata={"plan": "free", "user": "restart-u"})
        for _ in range(2):
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with proxy_in_thread(config()) as url:
        c = client(url, metadata={"plan": "free", "user": "restart-u"})
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_concurrent_requests_never_over_admit(proxy: str) -> None:
    async def main() -> list[int]:
        from tokenlay_otel import AsyncTokenlayOpenAI

        c = AsyncTokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            tokenlay_key=PROXY_KEY,
            tokenlay_base_url=proxy,
            max_retries=0,
            metadata={"plan": "free", "user": "burst"},
        )

        async def one() -> int:
            try:
                await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                return 200
            except openai.RateLimitError:
                return 429

        return await asyncio.gather(*(one() for _ in range(20)))

    statuses = asyncio.run(main())
    assert statuses.count(200) == 3
    assert statuses.count(429) == 17


def test_rules_file_errors_name_the_rule_and_field(tmp_path: Path) -> None:
    from tokenlay_otel.proxy import RulesError, load_rules

    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "id": "r1",
                        "if": {},
                        "then": {"limits": [{"type": "bytes", "max": 1, "per": "user"}]},
                    }
                ]
            }
        )
    )
    with pytest.raises(
        RulesError, match=r"rules.json: rule 'r1'.then.limits\[0\].type: must be one of"
    ):
        load_rules(path)


def test_proxy_metrics_count_decisions(proxy: str, telemetry: SpanCapture) -> None:
    c = client(proxy, metadata={"plan": "free", "user": "metered"})
    for _ in range(4):
        with contextlib.suppress(openai.RateLimitError):
            c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    data = telemetry.metrics()
    decisions = {
        p.attributes["tokenlay.rule.action"]: p.value
        for p in data["tokenlay.proxy.decisions"][1]
        if p.attributes.get("tokenlay.rule.id") == "free-daily"
    }
    assert decisions == {"allow": 3, "block": 1}
    (upstream,) = data["tokenlay.proxy.upstream.duration"][1]
    assert upstream.count == 3


def test_streams_are_relayed_without_buffering(tmp_path: Path) -> None:
    import time

    with FakeOpenAIServer() as upstream:
        upstream.stream_delay = 0.2
        config = ProxyConfig(
            keys=frozenset({PROXY_KEY}),
            rules=[],
            store=SQLiteStore(tmp_path / "u.db"),
            allow_providers=(upstream.url,),
        )
        with proxy_in_thread(config) as url:
            c = TokenlayOpenAI(
                provider_api_key=PROVIDER_KEY,
                provider_api_base=upstream.url + "/v1",
                tokenlay_key=PROXY_KEY,
                tokenlay_base_url=url,
                max_retries=0,
            )
            started = time.perf_counter()
            stream = c.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
            first = next(iter(stream))
            first_at = time.perf_counter() - started
            rest = list(stream)
            total = time.perf_counter() - started
    assert first.choices[0].delta.content == "Hello"
    assert rest
    # Upstream spends 0.2 s between events: the first one must not wait for the others.
    assert first_at < 0.15
    assert total > 1.0


@pytest.mark.parametrize(
    ("then", "field"),
    [
        ({"action": "allow"}, "id"),
        ({"model": "gpt-4o-mini", "action": "allow"}, None),
        ({"model": "mödel", "action": "allow"}, "then.model"),
        (
            {"action": "allow", "limits": [{"type": "requests", "max": 1, "per": "user"}],
             "on_limit_exceeded": {"action": "downgrade", "downgrade_to": "小模型"}},
            "then.on_limit_exceeded.downgrade_to",
        ),
    ],
)  # fmt: skip
def test_rule_ids_and_models_the_headers_cannot_carry_are_refused_at_load(
    then: dict[str, object], field: str | None
) -> None:
    # A rule id outside latin-1 made every call it matched a 500; one inside it reached
    # the SDK garbled (latin-1 bytes read as UTF-8).
    from tokenlay_otel.proxy import RulesError

    rule_id = "東京" if field == "id" else "r1"
    rules = {"rules": [{"id": rule_id, "if": {}, "then": then}]}
    if field is None:
        parse_rules(rules)
        return
    with pytest.raises(RulesError, match=rf"\.{field}: must be printable ASCII"):
        parse_rules(rules)
