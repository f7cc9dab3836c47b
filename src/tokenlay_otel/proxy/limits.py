"""What the proxy does with one request: the matching rule, its limits, the decision.

Reserve, then settle. Before the call, every limit of the matching rule is checked and
taken in one atomic store step: a request, a concurrency lease, and an *estimate* of
the call's tokens and cost (see :mod:`.estimate`), so N concurrent calls never take a
limit past its value when they state their output cap. After the call, the estimate
is replaced by the real usage, or by the charge for what was relayed when upstream
gave none. A request is given back when the provider never answered or answered with
a server error, so a client's retry is not counted twice.
"""

from __future__ import annotations

import asyncio
import calendar
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from .rules import Limit, Rule, first_match, usage_paths
from .store import LEASE_GRACE_S, Adjustment, Hold, UsageStore

__all__ = [
    "ANONYMOUS",
    "Decision",
    "Enforcer",
    "Reservation",
    "bucket",
    "counter_key",
    "rule_mark",
    "shared_limits",
    "window_bounds",
]

WARN_AT = 0.8
#: A maximum no count reaches (finite: Redis's Lua reads no "inf").
_NO_MAXIMUM = 1e300
#: The bucket of calls that do not name the field a limit is per. No metadata value can
#: name it: values are percent-encoded in keys, and '*' always is.
ANONYMOUS = "*"


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


def bucket(value: Any) -> str:
    """A metadata value as it appears in a store key (``ANONYMOUS`` when absent)."""
    return ANONYMOUS if value is None else quote(str(value), safe="")


def counter_key(kind: str, window: str, field_name: str, value: Any, label: str) -> str:
    """The store key of one limit's counter: ``tokens:day:user=u1:20261202``.

    Rules with the same limit (type, window and field) share its counter: what a user
    used in a day is one number, whichever rule admitted each call.
    """
    return f"{kind}:{window}:{field_name}={bucket(value)}:{label}"


def rule_mark(key: str, rule_id: str) -> str:
    """The key that counts the calls one rule admitted on a shared counter: it tells
    the limit metrics whose limit a value is under."""
    return f"{key}:rule={bucket(rule_id)}"


def shared_limits(rules: Sequence[Rule]) -> frozenset[tuple[str, str, str]]:
    """The (type, window, field) of limits that more than one rule has."""
    seen: dict[tuple[str, str, str], set[str]] = {}
    for rule in rules:
        for limit in rule.limits:
            seen.setdefault(_shape(limit), set()).add(rule.id)
    return frozenset(shape for shape, ids in seen.items() if len(ids) > 1)


def _shape(limit: Limit) -> tuple[str, str, str]:
    return (limit.type, limit.window, limit.tracking_key or limit.per)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a call is expected to use at most (cost ``None``: the model has no price)."""

    tokens: int
    cost: float | None


@dataclass(frozen=True, slots=True)
class _Counter:
    limit: Limit
    key: str
    subject: str  # e.g. "user u1"
    resets_at: float | None
    ttl_s: int | None
    mark: str | None = None  # rule_mark() of a shared counter

    def hold(self, reservation: Reservation) -> Hold:
        kind = self.limit.type
        amount = 1.0
        if kind == "tokens":
            amount = float(reservation.tokens)
        elif kind == "cost":
            amount = reservation.cost or 0.0
        return Hold(self.key, amount, self.limit.max, self.ttl_s, lease=kind == "concurrent")


@dataclass
class Decision:
    """The outcome of the rules for one request, and what it holds until it settles."""

    rule: Rule | None = None
    action: str = "allow"  # the x-tokenlay-rule-action value
    model: str | None = None  # the model to send upstream
    limit_exceeded: bool = False
    warnings: list[str] = field(default_factory=list)
    http_status: int = 429
    error_code: str | None = None
    error_message: str | None = None
    retry_after_s: int | None = None
    lease_id: str = ""
    held: list[tuple[_Counter, Hold]] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def leases(self) -> list[str]:
        return [hold.key for _, hold in self.held if hold.lease]


class _Windows:
    """:func:`window_bounds`, computed again only when a window turns over."""

    def __init__(self) -> None:
        self._current: dict[str, tuple[str, float | None]] = {}

    def bounds(self, window: str, now: float) -> tuple[str, float | None]:
        found = self._current.get(window)
        if found is None or (found[1] is not None and now >= found[1]):
            found = self._current[window] = window_bounds(window, now)
        return found


def _counters(
    rule: Rule,
    context: Mapping[str, Any],
    now: float,
    lease_s: float,
    windows: _Windows,
    shared: frozenset[tuple[str, str, str]] = frozenset(),
) -> list[_Counter]:
    out = []
    for limit in rule.limits:
        field_name = limit.tracking_key or limit.per
        value = context.get(field_name)
        subject = f"{limit.per} {value}" if value is not None else f"calls without a {limit.per}"
        ttl: int | None
        if limit.type == "concurrent":
            label, resets, ttl = "now", None, int(lease_s) + LEASE_GRACE_S
        else:
            label, resets = windows.bounds(limit.window, now)
            ttl = None if resets is None else int(resets - now) + LEASE_GRACE_S
        key = counter_key(limit.type, limit.window, field_name, value, label)
        mark = rule_mark(key, rule.id) if _shape(limit) in shared else None
        out.append(_Counter(limit, key, subject, resets, ttl, mark))
    return out


def _warning(counter: _Counter, value: float) -> str:
    limit = counter.limit
    share = int(100 * value / limit.max)
    scope = "total" if limit.window == "total" else f"{limit.window}ly".replace("dayly", "daily")
    return f"{share}% of the {scope} {limit.type} limit ({limit.max:g}) used by {counter.subject}"


def _reason(counter: _Counter, hold: Hold, value: float) -> str:
    limit = counter.limit
    if limit.type == "concurrent":
        return f"concurrent limit ({limit.max:g} at once) reached for {counter.subject}"
    name = f"{limit.type} limit ({limit.max:g} per {limit.window})"
    if value >= limit.max or limit.type == "requests":
        return f"{name} reached for {counter.subject}"
    # Not reached yet, but this call's reservation does not fit in what is left.
    if limit.type == "tokens":
        return (
            f"{name} of {counter.subject} would be passed: {value:g} used, this call "
            f"reserves {hold.amount:g} (a lower max_tokens reserves less)"
        )
    return (
        f"{name} of {counter.subject} would be passed: ${value:.6g} used, this call "
        f"reserves ${hold.amount:.6g}"
    )


class Enforcer:
    """Evaluates rules against a store for each request; settles what calls held."""

    def __init__(self, rules: Sequence[Rule], store: UsageStore, *, lease_s: float = 60) -> None:
        self.rules = list(rules)
        self.store = store
        self.lease_s = lease_s
        self._usage_paths = usage_paths(self.rules)
        self._shared = shared_limits(self.rules)
        self._windows = _Windows()
        # Unique across the proxies sharing a store: a random prefix, then a count.
        prefix = os.urandom(8).hex()
        self._lease_ids = (f"{prefix}-{n}" for n in itertools.count())

    async def _usage_context(self, context: Mapping[str, Any], now: float) -> dict[str, float]:
        """``usage.<type>`` (today, this user) and ``usage.<type>_<window>`` if asked for."""
        if not self._usage_paths:
            return {}
        keys, paths = [], []
        for path in sorted(self._usage_paths):
            kind, _, window = path.removeprefix("usage.").partition("_")
            window = window or "day"
            label, _ = self._windows.bounds(window, now)
            keys.append(counter_key(kind, window, "user", context.get("user"), label))
            paths.append(path)
        values = await self.store.get_many(keys)
        return dict(zip(paths, values, strict=True))

    async def decide(
        self,
        context: dict[str, Any],
        model: str | None,
        estimate: Callable[[str | None], Reservation],
    ) -> Decision:
        """Match a rule and take its limits (nothing is taken when the call is blocked)."""
        now = time.time()
        context = {**context, **await self._usage_context(context, now), "model": model}
        rule = first_match(self.rules, context)
        if rule is None:
            return Decision(model=model)
        decision = Decision(
            rule=rule, action=rule.action, model=model or rule.model, lease_id=next(self._lease_ids)
        )
        if rule.action == "block":
            decision.http_status = 403
            decision.error_message = f"blocked by rule {rule.id!r}"
            return decision
        counters = _counters(rule, context, now, self.lease_s, self._windows, self._shared)
        reservation = estimate(decision.model)
        if reservation.cost is None and any(c.limit.type == "cost" for c in counters):
            # Unpriced, the call would count nothing against its cost limit.
            decision.action, decision.http_status = "block", 400
            decision.error_code = "unpriced_model"
            decision.error_message = (
                f"model {decision.model!r} has no price, so its cost limit cannot be "
                "enforced; give the proxy its price with --prices-file"
            )
            return decision
        refused = await self._take(decision, counters, reservation, force=False)
        if refused is not None:
            await self._on_exceeded(decision, rule, refused, context, estimate)
        return decision

    async def _take(
        self, decision: Decision, counters: list[_Counter], reservation: Reservation, *, force: bool
    ) -> tuple[_Counter, Hold, float] | None:
        """Take every counter's hold at once; the first one refused, if any, and its value."""
        holds = [c.hold(reservation) for c in counters]
        # Marks of shared counters ride in the same atomic step and never refuse.
        marks = [Hold(c.mark, 1.0, _NO_MAXIMUM, c.ttl_s) for c in counters if c.mark]
        index, values = await self.store.admit(
            holds + marks, decision.lease_id, self.lease_s, force=force
        )
        values = values[: len(holds)]
        if index >= 0:
            return counters[index], holds[index], values[index]
        decision.held = list(zip(counters, holds, strict=True))
        for counter, hold, value in zip(counters, holds, values, strict=True):
            used = value if counter.limit.type == "requests" else value - hold.amount
            if not hold.lease and used >= WARN_AT * counter.limit.max:
                decision.warnings.append(_warning(counter, used))
        return None

    async def _on_exceeded(
        self,
        decision: Decision,
        rule: Rule,
        refused: tuple[_Counter, Hold, float],
        context: dict[str, Any],
        estimate: Callable[[str | None], Reservation],
    ) -> None:
        policy = rule.on_limit_exceeded
        decision.limit_exceeded = True
        action = policy.action if policy else "block"
        counter, hold, value = refused
        reason = _reason(counter, hold, value)
        if action == "queue" and policy is not None:
            deadline = time.monotonic() + (policy.delay_seconds or 10)
            while time.monotonic() < deadline:
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                counters = _counters(
                    rule, context, time.time(), self.lease_s, self._windows, self._shared
                )
                decision.warnings.clear()
                again = await self._take(decision, counters, estimate(decision.model), force=False)
                if again is None:
                    decision.action = "queue"
                    decision.warnings.append(f"queued: {reason}")
                    return
            action = "block"
        downgrade_to = policy.downgrade_to if policy and action == "downgrade" else None
        if action == "warn" or downgrade_to:
            # The call goes ahead past the limit: it is still counted, and its slots
            # are still leases that settle.
            if downgrade_to:
                decision.action = "allow"
                decision.model = downgrade_to
                decision.warnings.append(f"{reason}: downgraded to {downgrade_to}")
            else:
                decision.action = "warn"
                decision.warnings.append(reason)
            counters = _counters(
                rule, context, time.time(), self.lease_s, self._windows, self._shared
            )
            await self._take(decision, counters, estimate(decision.model), force=True)
            return
        decision.action = "block"
        decision.http_status = (policy.http_status if policy else None) or 429
        decision.error_code = (policy.error_code if policy else None) or "limit_exceeded"
        decision.error_message = (policy.error_message if policy else None) or reason
        retry = policy.retry_after_seconds if policy else None
        if retry is None and counter.resets_at is not None:
            retry = max(1.0, counter.resets_at - time.time())
        decision.retry_after_s = None if retry is None else int(retry + 0.999)

    async def settle(
        self,
        decision: Decision,
        *,
        tokens: int | None,
        cost: float | None,
        estimated: bool = False,
        refund_request: bool = False,
    ) -> None:
        """Replace the reservation with what the call used; end its leases. Once per call.

        ``tokens=None``: what the call used is not known; the reservation is its charge.
        """
        adjustments: list[Adjustment] = []
        for counter, hold in decision.held:
            kind = counter.limit.type
            if kind == "requests":
                if refund_request:
                    adjustments.append((hold.key, -1.0, hold.ttl_s))
                continue
            if kind not in ("tokens", "cost") or tokens is None:
                continue
            used = float(tokens) if kind == "tokens" else (cost or 0.0)
            if used != hold.amount:
                adjustments.append((hold.key, used - hold.amount, hold.ttl_s))
            if estimated and used:
                # Kept beside the counter so an operator can tell estimates from usage.
                adjustments.append((f"{hold.key}:estimated", used, hold.ttl_s))
        leases = decision.leases
        decision.held = []
        await self.store.settle(adjustments, leases, decision.lease_id)

    async def renew(self, decisions: Sequence[Decision]) -> None:
        """Extend the leases of calls still running."""
        live = [(key, d.lease_id) for d in decisions for key in d.leases]
        await self.store.renew(live, self.lease_s)
