"""Read what the proxy wrote in its store, from the test's own thread, and start Redis once."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tokenlay_otel.proxy import RedisStore, SQLiteStore, UsageStore

from .proxy_harness import redis_server


@dataclass
class StoreView:
    """A store kind for a test: makes stores on one backing file or Redis, and reads it."""

    kind: str
    path: Path
    redis_url: str | None = None

    def make(self) -> UsageStore:
        if self.redis_url:
            return RedisStore(self.redis_url)
        return SQLiteStore(self.path)

    def counters(self) -> dict[str, float]:
        """Every live sum counter, by key."""
        now = time.time()
        if self.redis_url:
            import redis

            r = redis.Redis.from_url(self.redis_url)
            out = {
                k.decode().removeprefix("tokenlay:"): float(r.get(k) or 0)
                for k in r.scan_iter("tokenlay:*")
                if r.type(k) == b"string"
            }
            r.close()
            return out
        rows = self._sqlite(
            "SELECT key, value FROM usage WHERE expires_at IS NULL OR expires_at > ?", now
        )
        return {k: float(v) for k, v in rows}

    def leases(self) -> int:
        """Live concurrency leases, all keys together."""
        now = time.time()
        if self.redis_url:
            import redis

            r = redis.Redis.from_url(self.redis_url)
            total = sum(
                int(r.zcount(k, f"({now}", "+inf"))
                for k in r.scan_iter("tokenlay:*")
                if r.type(k) == b"zset"
            )
            r.close()
            return total
        rows = self._sqlite("SELECT COUNT(*) FROM leases WHERE expires_at > ?", now)
        return int(rows[0][0]) if rows else 0

    def _sqlite(self, query: str, now: float) -> list[Any]:
        if not self.path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.path)) as db:
            try:
                return db.execute(query, (now,)).fetchall()
            except sqlite3.OperationalError:  # the proxy has not made its tables yet
                return []

    def tokens(self, field: str = "user", value: str = "u1") -> float:
        """The tokens counted for one bucket (every window), estimates included."""
        return sum(
            v
            for k, v in self.counters().items()
            if k.startswith("tokens:") and f":{field}={value}:" in k and not k.endswith("estimated")
        )

    def estimated(self) -> float:
        return sum(v for k, v in self.counters().items() if k.endswith(":estimated"))


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes (a deadline, not an assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreView:
    if request.param == "sqlite":
        return StoreView("sqlite", tmp_path / "usage.db")
    url = request.getfixturevalue("redis_url")
    import redis

    r = redis.Redis.from_url(url)
    r.flushdb()
    r.close()
    return StoreView("redis", tmp_path / "unused.db", url)
