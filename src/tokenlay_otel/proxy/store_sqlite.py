"""The embedded store: one SQLite file, safe for several processes on one host.

A call's holds are taken in one ``BEGIN IMMEDIATE`` transaction; writes go through one
thread (or, when it is free, a connection on the event loop), see :class:`SQLiteStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .store import Adjustment, Hold, UsageStore

__all__ = ["SQLiteStore"]

T = TypeVar("T")
_log = logging.getLogger("tokenlay_otel.proxy")

#: A write waiting for the SQLite thread: the function, its arguments, who waits.
_Queued = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
#: A write done: who waits, its result, or the exception it raised.
_Outcome = tuple["asyncio.Future[Any]", Any, Exception | None]


#: Commits on the loop's connection between two checkpoints (SQLite's own default is
#: 1,000 WAL pages; a call's write is a few pages).
_CHECKPOINT_EVERY = 256
_BUSY_TIMEOUT_S = 30.0
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code of theirs)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(exc) or "busy" in str(exc)
    return code & 0xFF in _BUSY_CODES


#: The store thread's waits for a lock another connection holds: from this, doubling to
#: ``_MAX_POLL_S``. SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25... ms and
#: checks only between sleeps: with two workers on one file, a write that met the other
#: worker's lock slept far past its release (strace: 1.0 s of 4 s asleep in it under
#: load; p99 at 16 in flight 41 ms, up to 205 ms, against 9 ms for one worker).
_FIRST_POLL_S = 0.0001
_MAX_POLL_S = 0.002


def _patiently(action: Callable[[], T]) -> T:
    """``action()`` again while the database is busy, polling (see ``_FIRST_POLL_S``),
    for as long as SQLite's busy timeout would have waited."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    delay = _FIRST_POLL_S
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, _MAX_POLL_S)


def _resolve(outcomes: list[_Outcome]) -> None:
    """On the loop: hand each waiting write its result (a cancelled waiter is gone)."""
    for future, result, exc in outcomes:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key TEXT PRIMARY KEY,
    value REAL NOT NULL,
    expires_at REAL
);
CREATE TABLE IF NOT EXISTS leases (
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key, id)
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
        # Writes queued while the thread is busy go in its next transaction, together.
        self._queue: list[_Queued] = []
        self._lock = threading.Lock()
        self._draining = False
        # A second connection, used on the event loop's thread, that never waits for a
        # lock (busy timeout 0) and never checkpoints (that may sync the disk).
        self._fast: sqlite3.Connection | None = None
        self._fast_off = False
        self._fast_commits = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # Workers starting together on a new file race to switch it to WAL and to
            # create the tables; SQLite answers one of them "database is locked" at once
            # when their locks would deadlock (its busy handler does not wait then). The
            # setup is idempotent, so it is tried again, for as long as a lock may wait.
            self._db = _patiently(self._open)
        return self._db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._set_up(db)
            # The thread waits for locks itself (_patiently), not in SQLite's busy
            # handler; set after the set-up, which may wait in it.
            db.execute("PRAGMA busy_timeout=0")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _set_up(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # With WAL, NORMAL syncs at checkpoints, not at every commit: a commit is
        # durable against a crash of the proxy (the OS has it), and only a power
        # loss or an OS crash may take back the last commits, counting less than
        # was used in those moments. FULL costs an fsync per admit and per settle
        # (measured: ~18 ms added per call, 100 calls/s at most on this disk).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        db.executescript(_SCHEMA)

    def _fast_conn(self) -> sqlite3.Connection | None:
        if self._fast is None and not self._fast_off and self._db is not None:
            try:
                # check_same_thread off: a store may be driven by a loop in another
                # thread than the one that opened it (one loop at a time, though).
                db = sqlite3.connect(
                    str(self.path), timeout=0, isolation_level=None, check_same_thread=False
                )
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=0")
            except sqlite3.Error:
                _log.debug("no SQLite connection on the loop; writes go to its thread")
                self._fast_off = True
                return None
            self._fast = db
        return self._fast

    def _try_on_loop(self, fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[bool, T | None]:
        """``(True, result)`` when the write was done here, on the loop's thread, without
        waiting; ``(False, None)`` when the database is locked (by this process's thread
        or by another process): nothing was written, the caller queues it instead."""
        db = self._fast_conn()
        if db is None:
            return False, None
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _busy(exc):
                return False, None
            raise
        try:
            result = fn(db, time.time(), *args)
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                return False, None  # rolled back: the thread does it, once
            raise
        self._fast_commits += 1
        if self._fast_commits % _CHECKPOINT_EVERY == 0:
            # This connection never checkpoints; the thread does, without blocking here.
            self._executor.submit(self._checkpoint)
        return True, result

    def _checkpoint(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(db, now, *args)`` in a write transaction, shared with the other
        writes queued meanwhile: one thread hop and one commit for all of them (the hop
        per write was a tenth of the proxy's CPU under load, py-spy). Each write is
        its own savepoint, so one that fails leaves the others standing.

        When the thread is idle, the write is first tried right here on the loop with a
        second connection that does not wait for locks: most writes then need no hop
        at all, and a locked database (another process's write, or this thread's) sends
        the write to the thread as before, so the loop never waits on a lock."""
        if not self._draining:
            done, result = self._try_on_loop(fn, args)
            if done:
                return result  # type: ignore[return-value]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queue.append((fn, args, future))
            start, self._draining = not self._draining, True
        if start:
            self._executor.submit(self._drain, loop)
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._draining = False
                    return
            outcomes = self._write_batch(batch)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, outcomes)

    def _write_batch(self, batch: list[_Queued]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        try:
            db = self._conn()
            _patiently(lambda: db.execute("BEGIN IMMEDIATE"))
            try:
                now = time.time()
                for fn, args, future in batch:
                    db.execute("SAVEPOINT write")
                    try:
                        outcomes.append((future, fn(db, now, *args), None))
                    except Exception as exc:
                        db.execute("ROLLBACK TO write")
                        outcomes.append((future, None, exc))
                    db.execute("RELEASE write")
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT leaves the transaction open; SQLite may also have
                # rolled back by itself already. Either way the connection must come
                # out clean.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except Exception as exc:  # nothing of the batch was written
            return [(future, None, exc) for _, _, future in batch]
        return outcomes

    @staticmethod
    def _current(db: sqlite3.Connection, key: str, now: float) -> float:
        row = db.execute("SELECT value, expires_at FROM usage WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= now):
            return 0.0
        return float(row[0])

    @staticmethod
    def _leases(db: sqlite3.Connection, key: str, now: float) -> int:
        db.execute("DELETE FROM leases WHERE key = ? AND expires_at <= ?", (key, now))
        row = db.execute("SELECT COUNT(*) FROM leases WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    @staticmethod
    def _write(
        db: sqlite3.Connection, key: str, value: float, ttl_s: int | None, now: float
    ) -> None:
        expires = None if ttl_s is None else now + ttl_s
        db.execute(
            "INSERT INTO usage (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at",
            (key, value, expires),
        )

    def _admit(
        self,
        db: sqlite3.Connection,
        now: float,
        holds: Sequence[Hold],
        lease_id: str,
        lease_s: float,
        force: bool,
    ) -> tuple[int, list[float]]:
        values = [
            float(self._leases(db, h.key, now)) if h.lease else self._current(db, h.key, now)
            for h in holds
        ]
        if not force:
            for index, (hold, value) in enumerate(zip(holds, values, strict=True)):
                if hold.refuses(value):
                    return index, values
        for hold, value in zip(holds, values, strict=True):
            if hold.lease:
                db.execute(
                    "INSERT OR REPLACE INTO leases (key, id, expires_at) VALUES (?, ?, ?)",
                    (hold.key, lease_id, now + lease_s),
                )
            else:
                self._write(db, hold.key, value + hold.amount, hold.ttl_s, now)
        return -1, [v + h.amount for h, v in zip(holds, values, strict=True)]

    def _settle(
        self,
        db: sqlite3.Connection,
        now: float,
        adjustments: Sequence[Adjustment],
        leases: Sequence[str],
        lease_id: str,
    ) -> None:
        for key, amount, ttl_s in adjustments:
            self._write(db, key, max(0.0, self._current(db, key, now) + amount), ttl_s, now)
        db.executemany(
            "DELETE FROM leases WHERE key = ? AND id = ?", [(key, lease_id) for key in leases]
        )

    def _renew(
        self, db: sqlite3.Connection, now: float, leases: Sequence[tuple[str, str]], lease_s: float
    ) -> None:
        db.executemany(
            "UPDATE leases SET expires_at = ? WHERE key = ? AND id = ?",
            [(now + lease_s, key, lease_id) for key, lease_id in leases],
        )

    def _largest(
        self, prefix: str, suffix: str, lease: bool, count: int
    ) -> list[tuple[str, float]]:
        db, now = self._conn(), time.time()
        # A range on the primary key: the index finds the prefix, not a scan of all keys.
        bounds = (prefix, prefix + "\U0010ffff", len(suffix), suffix)
        if lease:
            rows = db.execute(
                "SELECT key, COUNT(*) AS n FROM leases WHERE key >= ? AND key < ? "
                "AND substr(key, -?) = ? AND expires_at > ? GROUP BY key "
                "ORDER BY n DESC, key LIMIT ?",
                (*bounds, now, count),
            ).fetchall()
        else:
            rows = db.execute(
                "SELECT key, value FROM usage WHERE key >= ? AND key < ? "
                "AND substr(key, -?) = ? AND (expires_at IS NULL OR expires_at > ?) "
                "AND value > 0 "
                "ORDER BY value DESC, key LIMIT ?",
                (*bounds, now, count),
            ).fetchall()
        return [(str(key), float(value)) for key, value in rows]

    async def largest(
        self, prefix: str, suffix: str, *, lease: bool, count: int
    ) -> list[tuple[str, float]]:
        def read() -> list[tuple[str, float]]:
            return _patiently(lambda: self._largest(prefix, suffix, lease, count))

        result: list[tuple[str, float]] = await self._run(read)
        return result

    def _get_many(self, keys: Sequence[str]) -> list[float]:
        db, now = self._conn(), time.time()
        return _patiently(lambda: [self._current(db, key, now) for key in keys])

    async def get_many(self, keys: Sequence[str]) -> list[float]:
        result: list[float] = await self._run(self._get_many, keys)
        return result

    async def admit(
        self, holds: Sequence[Hold], lease_id: str, lease_s: float, *, force: bool = False
    ) -> tuple[int, list[float]]:
        return await self._transaction(self._admit, holds, lease_id, lease_s, force)

    async def settle(
        self, adjustments: Sequence[Adjustment], leases: Sequence[str], lease_id: str
    ) -> None:
        if adjustments or leases:
            await self._transaction(self._settle, adjustments, leases, lease_id)

    async def renew(self, leases: Sequence[tuple[str, str]], lease_s: float) -> None:
        if leases:
            await self._transaction(self._renew, leases, lease_s)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._executor.shutdown(wait=True)
        if self._fast is not None:
            self._fast.close()
            self._fast = None
