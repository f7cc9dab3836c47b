"""What the proxy does with one request: the matching rule, its limits, the decision.

Requests and concurrent limits are *reserved* atomically before the call (so N are
admitted, never N+1); tokens and cost are checked before and added after, from the
real usage. A reservation is given back when the upstream call fails, so a client's
retry is not counted twice.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .rules import Limit, Rule, first_match, usage_paths
from .store import UsageStore

__all__ = ["Decision", "Enforcer", "window_bounds"]

WARN_AT = 0.8
_CONCURRENT_TTL = 3600  # a crashed proxy's in-flight count fades out


def window_bounds(window: str, now: float) -> tuple[str, float | None]:
    """A label for the window that contains ``now`` and when it resets (epoch s)."""
    t = datetime.fromtimestamp(now, UTC)
    if window == "minute":
        start = t.replace(second=0, microsecond=0)
        return start.strftime("%Y%m%d%H%M"), start.timestamp() + 60
    if window == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return start.strftime("%Y%m%d%H"), start.timestamp() + 3600
    if window == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y%m%d"), start.timestamp() + 86400
    if window == "month":
        days = calendar.monthrange(t.year, t.month)[1]
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y%m"), start.timestamp() + days * 86400
    if window == "year":
        start = t.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y"), start.replace(year=t.year + 1).timestamp()
    return "total", None


@dataclass(frozen=True, slots=True)
class _Counter:
    limit: Limit
    key: str
    subject: str  # e.g. "user u1"
    resets_at: float | None
    ttl_s: int | None


@dataclass
class Decision:
    """The outcome of the rules for one request."""

    rule: Rule | None = None
    action: str = "allow"  # the x-tokenlay-rule-action value
    model: str | None = None  # the model to send upstream
    downgraded_from: str | None = None
    limit_exceeded: bool = False
    warnings: list[str] = field(default_factory=list)
    http_status: int = 429
    error_code: str | None = None
    error_message: str | None = None
    retry_after_s: int | None = None
    reserved: list[str] = field(default_factory=list)  # requests counters taken
    concurrent: list[str] = field(default_factory=list)  # in-flight counters taken
    usage_counters: list[_Counter] = field(default_factory=list)  # tokens/cost to add to

    @property
    def blocked(self) -> bool:
        return self.action == "block"


def _counters(rule: Rule, context: Mapping[str, Any], now: float) -> list[_Counter]:
    out = []
    for limit in rule.limits:
        field_name = limit.tracking_key or limit.per
        value = context.get(field_name)
        subject = f"{limit.per} {value}" if value is not None else f"all {limit.per}"
        ttl: int | None
        if limit.type == "concurrent":
            label, resets, ttl = "now", None, _CONCURRENT_TTL
        else:
            label, resets = window_bounds(limit.window, now)
            ttl = None if resets is None else int(resets - now) + 60
        key = f"{limit.type}:{limit.window}:{field_name}={value}:{label}"
        out.append(_Counter(limit, key, subject, resets, ttl))
    return out


def _warning(counter: _Counter, value: float) -> str:
    limit = counter.limit
    share = int(100 * value / limit.max)
    scope = "total" if limit.window == "total" else f"{limit.window}ly".replace("dayly", "daily")
    return f"{share}% of the {scope} {limit.type} limit ({limit.max:g}) used by {counter.subject}"


class Enforcer:
    """Evaluates rules against a store for each request."""

    def __init__(self, rules: Sequence[Rule], store: UsageStore) -> None:
        self.rules = list(rules)
        self.store = store
        self._usage_paths = usage_paths(self.rules)

    async def _usage_context(self, context: Mapping[str, Any], now: float) -> dict[str, float]:
        """``usage.<type>`` (today, this user) and ``usage.<type>_<window>`` if asked for."""
        if not self._usage_paths:
            return {}
        keys, paths = [], []
        for path in sorted(self._usage_paths):
            kind, _, window = path.removeprefix("usage.").partition("_")
            window = window or "day"
            label, _ = window_bounds(window, now)
            keys.append(f"{kind}:{window}:user={context.get('user')}:{label}")
            paths.append(path)
        values = await self.store.get_many(keys)
        return dict(zip(paths, values, strict=True))

    async def decide(self, context: dict[str, Any], model: str | None) -> Decision:
        now = time.time()
        context = {**context, **await self._usage_context(context, now), "model": model}
        rule = first_match(self.rules, context)
        if rule is None:
            return Decision(model=model)
        decision = Decision(rule=rule, action=rule.action, model=model or rule.model)
        if rule.action == "block":
            decision.http_status = 403
            decision.error_message = f"blocked by rule {rule.id!r}"
            return decision
        counters = _counters(rule, context, now)
        exceeded = await self._check(decision, counters)
        if exceeded is not None:
            await self._on_exceeded(decision, rule, exceeded, context)
        if not decision.blocked:
            decision.usage_counters = [c for c in counters if c.limit.type in ("tokens", "cost")]
        return decision

    async def _check(self, decision: Decision, counters: list[_Counter]) -> _Counter | None:
        """Check read-only limits, then reserve the countable ones; the first exceeded."""
        readonly = [c for c in counters if c.limit.type in ("tokens", "cost")]
        for counter, value in zip(
            readonly, await self.store.get_many([c.key for c in readonly]), strict=True
        ):
            if value >= counter.limit.max:
                return counter
            if value >= WARN_AT * counter.limit.max:
                decision.warnings.append(_warning(counter, value))
        for counter in counters:
            if counter.limit.type not in ("requests", "concurrent"):
                continue
            done, value = await self.store.reserve(counter.key, counter.limit.max, counter.ttl_s)
            if not done:
                await self.release(decision, failed=True)
                return counter
            (
                decision.concurrent if counter.limit.type == "concurrent" else decision.reserved
            ).append(counter.key)
            if counter.limit.type == "requests" and value >= WARN_AT * counter.limit.max:
                decision.warnings.append(_warning(counter, value))
        return None

    async def _on_exceeded(
        self, decision: Decision, rule: Rule, counter: _Counter, context: dict[str, Any]
    ) -> None:
        policy = rule.on_limit_exceeded
        decision.limit_exceeded = True
        action = policy.action if policy else "block"
        limit = counter.limit
        reason = (
            f"{limit.type} limit ({limit.max:g} per {limit.window}) reached for {counter.subject}"
        )
        if action == "queue" and policy is not None:
            deadline = time.monotonic() + (policy.delay_seconds or 10)
            while time.monotonic() < deadline:
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                decision.warnings.clear()
                again = await self._check(decision, _counters(rule, context, time.time()))
                if again is None:
                    decision.action = "queue"
                    decision.warnings.append(f"queued: {reason}")
                    return
            action = "block"
        if action == "downgrade" and policy is not None and policy.downgrade_to:
            decision.downgraded_from = decision.model
            decision.model = policy.downgrade_to
            decision.action = "allow"
            decision.warnings.append(f"{reason}: downgraded to {policy.downgrade_to}")
            return
        if action == "warn":
            decision.action = "warn"
            decision.warnings.append(reason)
            return
        decision.action = "block"
        decision.http_status = (policy.http_status if policy else None) or 429
        decision.error_code = (policy.error_code if policy else None) or "limit_exceeded"
        decision.error_message = (policy.error_message if policy else None) or reason
        retry = policy.retry_after_seconds if policy else None
        if retry is None and counter.resets_at is not None:
            retry = max(1.0, counter.resets_at - time.time())
        decision.retry_after_s = None if retry is None else int(retry + 0.999)

    async def release(self, decision: Decision, *, failed: bool) -> None:
        """Give back in-flight counters; with ``failed`` also the request reservations."""
        for key in decision.concurrent:
            await self.store.add(key, -1, _CONCURRENT_TTL)
        decision.concurrent = []
        if failed:
            for key in decision.reserved:
                await self.store.add(key, -1, None)
            decision.reserved = []

    async def settle(self, decision: Decision, *, tokens: int | None, cost: float | None) -> None:
        """Count the call's real usage against its tokens/cost limits."""
        for counter in decision.usage_counters:
            amount = tokens if counter.limit.type == "tokens" else cost
            if amount:
                await self.store.add(counter.key, float(amount), counter.ttl_s)
