"""Who is near their limit: each limit's use in its current window, read from the store.

Two observable gauges, ``tokenlay.proxy.limit.usage`` and
``tokenlay.proxy.limit.utilization`` (0-1), one point per limited key (a user, an org...)
of each limit of each rule. They are read from the store when metrics are collected,
so they show what every proxy sharing the store has counted, SQLite and Redis alike.

Cardinality is bounded: per limit, the ``top`` keys that used the most (default 100).
Rules with the same limit share its counter (what a user used today is one number);
each rule lists only the values it admitted in the window, so a pro user is not shown
against the free plan's limit.
Attributes: ``tokenlay.rule.id``, ``tokenlay.limit.type`` (requests, tokens, cost,
concurrent), ``tokenlay.limit.window``, ``tokenlay.limit.field`` (the metadata field the
limit is per) and ``tokenlay.limit.value`` (that field's value; ``*`` for calls without
it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from tokenlay_otel._conventions import LIMIT_FIELD, LIMIT_TYPE, LIMIT_VALUE, LIMIT_WINDOW, RULE_ID

from .limits import counter_key, rule_mark, shared_limits, window_bounds
from .rules import Limit, Rule
from .store import UsageStore

__all__ = ["DEFAULT_TOP", "LimitGauges", "LimitPoint", "limit_points"]

_log = logging.getLogger("tokenlay_otel.proxy")
DEFAULT_TOP = 100
#: Both gauges are observed in one collection: the store is read once for the two.
_FRESH_S = 1.0
_READ_TIMEOUT_S = 5.0
#: For a shared counter, this many times ``top`` candidates are read, then those the
#: rule admitted kept.
_SHARED_FETCH = 4


@dataclass(frozen=True, slots=True)
class LimitPoint:
    """One limited key's use of one limit in its current window."""

    rule_id: str
    limit: Limit
    field: str
    value: str
    used: float

    @property
    def utilization(self) -> float:
        return self.used / self.limit.max if self.limit.max > 0 else 0.0

    def attributes(self) -> dict[str, str]:
        return {
            RULE_ID: self.rule_id,
            LIMIT_TYPE: self.limit.type,
            LIMIT_WINDOW: self.limit.window,
            LIMIT_FIELD: self.field,
            LIMIT_VALUE: self.value,
        }


async def limit_points(
    rules: Sequence[Rule], store: UsageStore, *, top: int, now: float | None = None
) -> list[LimitPoint]:
    """Every limit's most used keys in the current window, as the store counts them."""
    now = time.time() if now is None else now
    shared = shared_limits(rules)
    readings: dict[tuple[str, str, bool, int], list[tuple[str, float]]] = {}
    points: list[LimitPoint] = []
    for rule in rules:
        for limit in rule.limits:
            field = limit.tracking_key or limit.per
            lease = limit.type == "concurrent"
            label = "now" if lease else window_bounds(limit.window, now)[0]
            # The key of any value, cut around where the value goes.
            key = counter_key(limit.type, limit.window, field, "\0", label)
            prefix, suffix = key.split("%00")
            is_shared = (limit.type, limit.window, field) in shared
            # A counter several rules share lists only the values this rule admitted.
            count = top * _SHARED_FETCH if is_shared else top
            # Rules sharing a counter read it once (on Redis, one SCAN of the keys).
            read = (prefix, suffix, lease, count)
            if read not in readings:
                readings[read] = await store.largest(prefix, suffix, lease=lease, count=count)
            found = readings[read]
            if is_shared and found:
                marks = await store.get_many([rule_mark(k, rule.id) for k, _ in found])
                found = [item for item, mark in zip(found, marks, strict=True) if mark > 0]
            for key_found, used in found[:top]:
                value = unquote(key_found[len(prefix) : len(key_found) - len(suffix)])
                points.append(LimitPoint(rule.id, limit, field, value, used))
    return points


class LimitGauges:
    """The two gauges, observed from the store on the gateway's event loop."""

    def __init__(
        self, meter: Meter, rules: Sequence[Rule], store: UsageStore, *, top: int = DEFAULT_TOP
    ) -> None:
        self.rules = [r for r in rules if r.limits]
        self.store = store
        self.top = top
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._read_at = 0.0
        self._points: list[LimitPoint] = []
        self._consumed: set[str] = set()
        meter.create_observable_gauge(
            "tokenlay.proxy.limit.usage",
            callbacks=[self._usage],
            description="Use of each limit in its current window, by limited key "
            "(requests, tokens, USD or calls at once, per tokenlay.limit.type)",
        )
        meter.create_observable_gauge(
            "tokenlay.proxy.limit.utilization",
            callbacks=[self._utilization],
            # No unit "1": Prometheus's OTLP ingestion would add "_ratio" to the name and
            # the Python exporter would not; one name on both paths keeps the dashboards'
            # and the alerts' queries right.
            description="Use of each limit in its current window over its maximum (0-1)",
        )

    def _usage(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(p.used, p.attributes()) for p in self._read("usage")]

    def _utilization(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(p.utilization, p.attributes()) for p in self._read("utilization")]

    def _read(self, gauge: str) -> list[LimitPoint]:
        """The points of this collection: the first gauge observed reads the store, the
        other takes the same reading (a gauge seen twice means a new collection)."""
        loop = self.loop
        if not self.rules or loop is None or not loop.is_running():
            return []
        with self._lock:
            fresh = time.monotonic() - self._read_at < _FRESH_S
            if fresh and gauge not in self._consumed:
                self._consumed.add(gauge)
                return self._points
            if _on_loop(loop):
                return []  # collected from the loop itself: it cannot wait on it
            future = asyncio.run_coroutine_threadsafe(
                limit_points(self.rules, self.store, top=self.top), loop
            )
            try:
                self._points = future.result(timeout=_READ_TIMEOUT_S)
            except Exception:
                future.cancel()
                _log.warning("could not read the limits' use from the store", exc_info=True)
                return []
            self._read_at = time.monotonic()
            self._consumed = {gauge}
            return self._points


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
