"""Usage counters: SQLite (embedded default) or Redis (shared by several proxies).

Every operation that enforces a limit is atomic in the store itself — a SQLite
``BEGIN IMMEDIATE`` transaction or a Redis Lua script — so several proxy processes on
one file or one Redis never admit more than a limit allows.
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["RedisStore", "SQLiteStore", "UsageStore", "open_store"]


class UsageStore(abc.ABC):
    """Counters keyed by limit and window; values are floats (tokens, USD, requests)."""

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[float]: ...

    @abc.abstractmethod
    async def reserve(self, key: str, maximum: float, ttl_s: int | None) -> tuple[bool, float]:
        """Add 1 if that keeps the counter <= ``maximum``; (done, value after)."""

    @abc.abstractmethod
    async def add(self, key: str, amount: float, ttl_s: int | None) -> float: ...

    @abc.abstractmethod
    async def once(self, key: str, ttl_s: int) -> bool:
        """True the first time ``key`` is seen within ``ttl_s`` (retry de-duplication)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT PRIMARY KEY,
    value REAL NOT NULL,
    expires_at REAL
);
"""


class SQLiteStore(UsageStore):
    """One SQLite file; survives restarts; safe for several processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One thread owns the connection: calls are serialised and never block the loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenlay-sqlite")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @staticmethod
    def _current(db: sqlite3.Connection, key: str, now: float) -> float:
        row = db.execute("SELECT value, expires_at FROM usage WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= now):
            return 0.0
        return float(row[0])

    def _write(self, db: sqlite3.Connection, key: str, value: float, ttl_s: int | None) -> None:
        expires = None if ttl_s is None else time.time() + ttl_s
        db.execute(
            "INSERT INTO usage (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at",
            (key, value, expires),
        )

    def _get_many(self, keys: Sequence[str]) -> list[float]:
        db, now = self._conn(), time.time()
        return [self._current(db, key, now) for key in keys]

    def _reserve(self, key: str, maximum: float, ttl_s: int | None) -> tuple[bool, float]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            value = self._current(db, key, time.time())
            if value + 1 > maximum:
                db.execute("COMMIT")
                return False, value
            self._write(db, key, value + 1, ttl_s)
            db.execute("COMMIT")
            return True, value + 1
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _add(self, key: str, amount: float, ttl_s: int | None) -> float:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            value = self._current(db, key, time.time()) + amount
            self._write(db, key, value, ttl_s)
            db.execute("COMMIT")
            return value
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _once(self, key: str, ttl_s: int) -> bool:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            seen = self._current(db, key, time.time()) > 0
            if not seen:
                self._write(db, key, 1, ttl_s)
            db.execute("COMMIT")
            return not seen
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def get_many(self, keys: Sequence[str]) -> list[float]:
        result: list[float] = await self._run(self._get_many, keys)
        return result

    async def reserve(self, key: str, maximum: float, ttl_s: int | None) -> tuple[bool, float]:
        result: tuple[bool, float] = await self._run(self._reserve, key, maximum, ttl_s)
        return result

    async def add(self, key: str, amount: float, ttl_s: int | None) -> float:
        result: float = await self._run(self._add, key, amount, ttl_s)
        return result

    async def once(self, key: str, ttl_s: int) -> bool:
        result: bool = await self._run(self._once, key, ttl_s)
        return result

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._executor.shutdown(wait=True)


_RESERVE = """
local value = tonumber(redis.call('GET', KEYS[1]) or '0')
if value + 1 > tonumber(ARGV[1]) then
  return {0, tostring(value)}
end
value = redis.call('INCRBYFLOAT', KEYS[1], 1)
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return {1, tostring(value)}
"""

_ADD = """
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return tostring(value)
"""


class RedisStore(UsageStore):
    """Counters in Redis, updated by Lua scripts: shared, exact limits across proxies."""

    def __init__(self, url: str, *, prefix: str = "tokenlay:") -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.from_url(url)
        self._prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._add = self._redis.register_script(_ADD)

    async def get_many(self, keys: Sequence[str]) -> list[float]:
        if not keys:
            return []
        values = await self._redis.mget([self._prefix + k for k in keys])
        return [float(v) if v is not None else 0.0 for v in values]

    async def reserve(self, key: str, maximum: float, ttl_s: int | None) -> tuple[bool, float]:
        done, value = await self._reserve(keys=[self._prefix + key], args=[maximum, ttl_s or 0])
        return bool(done), float(value)

    async def add(self, key: str, amount: float, ttl_s: int | None) -> float:
        value = await self._add(keys=[self._prefix + key], args=[amount, ttl_s or 0])
        return float(value)

    async def once(self, key: str, ttl_s: int) -> bool:
        return bool(await self._redis.set(self._prefix + key, 1, nx=True, ex=ttl_s))

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(*, redis_url: str | None, sqlite_path: str | Path) -> UsageStore:
    """Redis when a URL is given, else the SQLite file."""
    if redis_url:
        return RedisStore(redis_url)
    return SQLiteStore(sqlite_path)
