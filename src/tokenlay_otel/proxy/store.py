"""Usage counters and concurrency leases: SQLite (embedded default) or Redis (shared).

A call takes all its holds in one atomic step — a SQLite ``BEGIN IMMEDIATE``
transaction or one Redis Lua script — so several proxy processes on one file or one
Redis never admit more than a limit allows, and a call never holds half of what it
asked for. Settling (the real usage, the slots given back) is one step too.

Counters are sums (requests, tokens, USD) that expire with their window. Concurrency
slots are *leases*: one entry per call, with an expiry the proxy renews while the call
runs, so the slots of a proxy that dies are free again within one lease.

The backends are :class:`SQLiteStore` (``store_sqlite``) and :class:`RedisStore`
(``store_redis``), both importable from here.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LEASE_GRACE_S", "Hold", "RedisStore", "SQLiteStore", "UsageStore", "open_store"]

#: How long a key outlives what it counts (a window's end, a lease's expiry), so a call
#: settling just after still finds it.
LEASE_GRACE_S = 60


@dataclass(frozen=True, slots=True)
class Hold:
    """One counter a call takes when it is admitted.

    ``amount`` is added to a sum (a request, reserved tokens or USD); a ``lease`` hold
    is a concurrency slot instead, one live entry per call. A hold is refused when the
    counter is already at ``maximum`` or the amount would take it past.
    """

    key: str
    amount: float
    maximum: float
    ttl_s: int | None
    lease: bool = False

    def refuses(self, value: float) -> bool:
        return value >= self.maximum or value + self.amount > self.maximum


#: A settlement entry: add ``amount`` (may be negative) to ``key``, keeping ``ttl_s``.
Adjustment = tuple[str, float, int | None]


class UsageStore(abc.ABC):
    """Counters keyed by limit and window, and concurrency leases keyed by limit."""

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[float]:
        """Current values of sum counters (0 when absent or expired)."""

    @abc.abstractmethod
    async def admit(
        self, holds: Sequence[Hold], lease_id: str, lease_s: float, *, force: bool = False
    ) -> tuple[int, list[float]]:
        """Take every hold, or none; leases run ``lease_s`` by the store's own clock.

        Returns:
            ``(-1, values after)`` when taken; else ``(index of the first hold refused,
            values before)``. With ``force`` nothing is refused.
        """

    @abc.abstractmethod
    async def settle(
        self, adjustments: Sequence[Adjustment], leases: Sequence[str], lease_id: str
    ) -> None:
        """Add the adjustments (a counter never goes below 0) and end these leases."""

    @abc.abstractmethod
    async def largest(
        self, prefix: str, suffix: str, *, lease: bool, count: int
    ) -> list[tuple[str, float]]:
        """The ``count`` largest live counters (or lease keys, by live leases) whose key
        starts with ``prefix`` and ends with ``suffix``, largest first."""

    @abc.abstractmethod
    async def renew(self, leases: Sequence[tuple[str, str]], lease_s: float) -> None:
        """Give live ``(key, lease_id)`` leases another ``lease_s`` from now."""

    @abc.abstractmethod
    async def close(self) -> None: ...


# Each backend subclasses UsageStore from this module, so they are imported once it is
# defined; ``tokenlay_otel.proxy`` imports this module first, so the cycle is harmless.
from .store_redis import RedisStore  # noqa: E402
from .store_sqlite import SQLiteStore  # noqa: E402


def open_store(*, redis_url: str | None, sqlite_path: str | Path) -> UsageStore:
    """Redis when a URL is given, else the SQLite file."""
    if redis_url:
        return RedisStore(redis_url)
    return SQLiteStore(sqlite_path)
