"""The proxy's pure parts and its stores, without a server: estimates, usage checks,
the stream tap, and admit/settle/renew on SQLite and Redis."""

from __future__ import annotations

import ast
import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import tokenlay_otel.proxy
from tokenlay_otel._usage import Usage
from tokenlay_otel.proxy.app import metered_endpoint
from tokenlay_otel.proxy.estimate import input_tokens, output_cap, text_tokens, valid_usage
from tokenlay_otel.proxy.limits import bucket, counter_key
from tokenlay_otel.proxy.store import Hold, SQLiteStore
from tokenlay_otel.proxy.upstream import StreamTap, with_stream_usage

from .proxy_store_view import StoreView, redis_url, store

__all__ = ["redis_url", "store"]  # fixtures


def test_the_input_estimate_is_at_least_what_a_tokenizer_counts() -> None:
    # ~4 characters a token in English: 3 bytes a token stays above it.
    text = "The quick brown fox jumps over the lazy dog. " * 20  # 900 chars, ~200 tokens
    body = {"messages": [{"role": "user", "content": text}]}
    assert input_tokens(body) >= 200
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10**6}}
    with_image = {"messages": [{"role": "user", "content": [image]}]}
    assert 765 <= input_tokens(with_image) < 800  # an image part, not a megabyte of text
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    assert input_tokens({"input": deep}) < 10  # bounded in depth, no RecursionError


@pytest.mark.parametrize(
    ("body", "endpoint", "expected"),
    [
        ({"max_tokens": 10}, "chat/completions", 10),
        ({"max_completion_tokens": 20, "max_tokens": 10}, "chat/completions", 20),
        ({"max_output_tokens": 30}, "responses", 30),
        ({"max_tokens": 10, "n": 3}, "chat/completions", 30),
        ({}, "chat/completions", 256),
        ({"max_tokens": -5}, "chat/completions", 256),
        ({"max_tokens": True}, "chat/completions", 256),
        ({"max_tokens": 10**12}, "chat/completions", 256),
        ({"max_tokens": 10}, "embeddings", 0),
    ],
)
def test_the_output_cap(body: dict[str, Any], endpoint: str, expected: int) -> None:
    assert output_cap(body, endpoint, 256) == expected


@pytest.mark.parametrize(
    ("usage", "endpoint", "believed"),
    [
        (Usage(12, 7), "chat/completions", True),
        (Usage(12, None), "embeddings", True),
        (Usage(12, None), "chat/completions", False),
        (Usage(None, 7), "chat/completions", False),
        (Usage(-1, 7), "chat/completions", False),
        (Usage(12, 2**63), "chat/completions", False),
        (Usage(12, 7, cached_input_tokens=-3), "chat/completions", False),
        (None, "chat/completions", False),
    ],
)
def test_usage_is_evidence_not_truth(usage: Usage | None, endpoint: str, believed: bool) -> None:
    assert (valid_usage(usage, endpoint) is not None) is believed


@pytest.mark.parametrize(
    ("method", "base", "suffix", "endpoint"),
    [
        ("POST", "https://api.openai.com/v1", "/chat/completions", "chat/completions"),
        ("POST", "https://api.openai.com", "/v1/chat/completions", "chat/completions"),
        ("POST", "https://x.openai.azure.com/openai/deployments/d", "/chat/completions",
         "chat/completions"),
        ("POST", "https://api.openai.com/v1", "/completions", "completions"),
        ("POST", "https://api.openai.com/v1", "/responses/", "responses"),
        ("GET", "https://api.openai.com/v1", "/responses", None),
        ("POST", "https://api.openai.com/v1", "/images/generations", None),
    ],
)  # fmt: skip
def test_the_metered_endpoint_is_told_by_the_whole_path(
    method: str, base: str, suffix: str, endpoint: str | None
) -> None:
    assert metered_endpoint(method, base, suffix) == endpoint


def test_the_usage_option_is_always_asked_for() -> None:
    body = {"stream": True, "stream_options": {"include_usage": False}}
    asked, hidden = with_stream_usage("chat/completions", body)
    assert asked["stream_options"] == {"include_usage": True} and hidden
    assert body["stream_options"] == {"include_usage": False}  # the caller's, untouched
    mine = {"stream": True, "stream_options": {"include_usage": True}}
    assert with_stream_usage("chat/completions", mine) == (mine, False)
    assert with_stream_usage("responses", {"stream": True}) == ({"stream": True}, False)


def _events(*events: Any, end: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + end for e in events)


def test_the_tap_splits_events_however_the_bytes_arrive() -> None:
    chunk = {"model": "m", "choices": [{"index": 0, "delta": {"content": "héllo"}}]}
    usage = {"model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    stream = _events(chunk, usage) + b"data: [DONE]\n\n"
    for size in (1, 7, len(stream)):
        tap = StreamTap(lambda u, m: 0.5, drop_usage_chunk=True)
        out = [tap.feed(stream[i : i + size]) for i in range(0, len(stream), size)]
        sent = [piece for pieces in out for piece in pieces]
        assert [final for _, final in sent] == [False, True]  # the usage chunk dropped
        assert b"".join(data for data, _ in sent) == _events(chunk) + b"data: [DONE]\n\n"
        assert tap.usage == Usage(3, 2, None, None, None) and tap.cost == 0.5
        assert tap.text_bytes == len("héllo".encode())


def test_an_event_past_the_size_bound_is_relayed_unread() -> None:
    tap = StreamTap(lambda u, m: None, drop_usage_chunk=False)
    huge = b"data: " + b"x" * (2 << 20)
    assert tap.feed(huge) == [(huge, False)]
    assert tap.feed(b"more\n\n") == [(b"more\n\n", False)]


def test_keys_cannot_be_named_by_a_value() -> None:
    assert bucket(None) == "*"
    assert bucket("*") == "%2A"
    assert counter_key("tokens", "day", "user", "a:b=c", "20261202") == (
        "tokens:day:user=a%3Ab%3Dc:20261202"
    )
    assert text_tokens(3) == 1 and text_tokens(4) == 2


# --- the stores -------------------------------------------------------------------------------


def test_admit_takes_every_hold_or_none(store: StoreView) -> None:
    async def main() -> None:
        s = store.make()
        try:
            tokens = Hold("tokens:k", 60, 100, 3600)
            slot = Hold("concurrent:k", 1, 1, None, lease=True)
            assert await s.admit([tokens, slot], "a", 60) == (-1, [60.0, 1.0])
            # The slot is taken: nothing is taken, not even the tokens that would fit.
            assert await s.admit([Hold("tokens:k", 10, 100, 3600), slot], "b", 60) == (
                1,
                [60.0, 1.0],
            )
            assert await s.admit([tokens], "c", 60) == (0, [60.0])  # 60 + 60 > 100
            assert await s.get_many(["tokens:k"]) == [60.0]
            # Settling: the real usage (a credit past 0 is clamped), the lease ended.
            await s.settle([("tokens:k", -500, 3600)], ["concurrent:k"], "a")
            assert await s.get_many(["tokens:k"]) == [0.0]
            assert store.leases() == 0
            assert await s.admit([Hold("tokens:k", 100, 100, 3600)], "d", 60) == (-1, [100.0])
            assert await s.admit([Hold("tokens:k", 0, 100, 3600)], "e", 60) == (0, [100.0])
        finally:
            await s.close()

    asyncio.run(main())


def test_concurrent_admits_take_exactly_the_limit(store: StoreView) -> None:
    """Many admits at once (SQLite writes them in shared transactions): exactly the
    limit is taken, and every caller hears its own answer."""

    async def main() -> None:
        s = store.make()
        try:
            hold = Hold("requests:burst", 1, 20, 3600)
            answers = await asyncio.gather(*(s.admit([hold], f"l{i}", 60) for i in range(60)))
            taken = [values for index, values in answers if index == -1]
            assert len(taken) == 20
            assert sorted(values[0] for values in taken) == [float(n) for n in range(1, 21)]
            assert await s.get_many(["requests:burst"]) == [20.0]
        finally:
            await s.close()

    asyncio.run(main())


def test_a_failing_write_leaves_the_writes_beside_it(tmp_path: Path) -> None:
    """SQLite writes queued together share a transaction: one that fails takes nothing
    with it, and nothing of the others away."""

    async def main() -> None:
        s = SQLiteStore(tmp_path / "usage.db")
        try:
            good = [s.admit([Hold(f"requests:w{i}", 1, 10, 3600)], f"g{i}", 60) for i in range(5)]
            # Its first adjustment is written, then an amount that is not a number
            # fails: the write must come undone whole.
            adjustments = [("requests:w1", 5.0, 3600), ("requests:w0", "x", 3600)]
            bad = s.settle(adjustments, [], "b")  # type: ignore[arg-type]
            answers = await asyncio.gather(*good, bad, return_exceptions=True)
            assert answers[:5] == [(-1, [1.0])] * 5
            assert isinstance(answers[5], Exception)
            keys = [f"requests:w{i}" for i in range(5)]
            assert await s.get_many(keys) == [1.0] * 5
        finally:
            await s.close()

    asyncio.run(main())


def test_a_locked_database_never_holds_the_loop(tmp_path: Path) -> None:
    """Writes are tried on the loop without waiting for a lock: while another process
    holds the write lock, they wait on the store's thread instead, the loop runs on,
    and each is written once when the lock is let go."""

    async def main() -> None:
        s = SQLiteStore(tmp_path / "usage.db")
        other = sqlite3.connect(tmp_path / "usage.db", isolation_level=None)
        try:
            await s.admit([Hold("requests:l", 1, 100, 3600)], "warm", 60)
            other.execute("BEGIN IMMEDIATE")  # as another worker's write would
            loop = asyncio.get_running_loop()
            writes = [
                asyncio.ensure_future(s.admit([Hold("requests:l", 1, 100, 3600)], f"l{i}", 60))
                for i in range(3)
            ]
            ticks = []
            for _ in range(10):
                before = loop.time()
                await asyncio.sleep(0.03)
                ticks.append(loop.time() - before)
            assert max(ticks) < 0.25  # nothing sat on the loop behind the lock
            assert not any(w.done() for w in writes)
            other.execute("COMMIT")
            answers = await asyncio.wait_for(asyncio.gather(*writes), 10)
            assert sorted(values[0] for _, values in answers) == [2.0, 3.0, 4.0]
            assert await s.get_many(["requests:l"]) == [4.0]
        finally:
            other.close()
            await s.close()

    asyncio.run(main())


def test_a_write_failing_on_the_loop_is_undone_whole(tmp_path: Path) -> None:
    """A write done on the loop's connection that fails half-way leaves nothing."""

    async def main() -> None:
        s = SQLiteStore(tmp_path / "usage.db")
        try:
            await s.admit([Hold("requests:w0", 1, 10, 3600)], "a", 60)
            await s.admit([Hold("requests:w1", 1, 10, 3600)], "b", 60)
            adjustments = [("requests:w1", 5.0, 3600), ("requests:w0", "x", 3600)]
            with pytest.raises(TypeError):  # float + str, half-way through the write
                await s.settle(adjustments, [], "c")  # type: ignore[arg-type]
            assert await s.get_many(["requests:w0", "requests:w1"]) == [1.0, 1.0]
            await s.admit([Hold("requests:w1", 1, 10, 3600)], "d", 60)
            assert await s.get_many(["requests:w1"]) == [2.0]
        finally:
            await s.close()

    asyncio.run(main())


@pytest.mark.slow
def test_leases_expire_unless_renewed(store: StoreView) -> None:
    async def main() -> None:
        s = store.make()
        try:
            slot = Hold("concurrent:r", 1, 2, None, lease=True)
            assert (await s.admit([slot], "kept", 0.5))[0] == -1
            assert (await s.admit([slot], "lost", 0.5))[0] == -1
            assert (await s.admit([slot], "third", 0.5))[0] == 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                await s.renew([("concurrent:r", "kept")], 0.5)
                await asyncio.sleep(0.1)
            assert store.leases() == 1  # "lost" expired, "kept" lives on
            assert (await s.admit([slot], "fourth", 0.5))[0] == -1
        finally:
            await s.close()

    asyncio.run(main())


#: What the proxy may import from the SDK: the wire contract, the names and buckets of
#: its telemetry, usage and prices, the fake answers of --mock-upstream, and the public
#: exporters; never the testing helpers or the SDK's call machinery.
_PROXY_MAY_IMPORT = frozenset(
    {
        "tokenlay_otel._wire",
        "tokenlay_otel._conventions",
        "tokenlay_otel._usage",
        "tokenlay_otel._pricing",
        "tokenlay_otel._fake_openai",
        "tokenlay_otel._version",  # the proxy's user-agent upstream
        "tokenlay_otel.exporters",
    }
)


def _sdk_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 2:  # from .. import x
            base = "tokenlay_otel" + (f".{node.module}" if node.module else "")
            found.update([base] if node.module else (f"{base}.{a.name}" for a in node.names))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] == "tokenlay_otel"}


def test_the_proxy_imports_only_the_contract_and_public_sdk_pieces() -> None:
    proxy = Path(tokenlay_otel.proxy.__file__).parent
    imported = {(path.name, name) for path in proxy.glob("*.py") for name in _sdk_imports(path)}
    assert ("mock.py", "tokenlay_otel._fake_openai") in imported, "the check reads imports"
    outside = {
        (module, name)
        for module, name in imported
        if not name.startswith("tokenlay_otel.proxy") and name not in _PROXY_MAY_IMPORT
    }
    assert outside == set()


def test_workers_dying_fast_wait_longer_to_be_replaced() -> None:
    from tokenlay_otel.proxy.workers import restart_delay

    now = 1000.0
    assert restart_delay([], now, 2) == 0
    assert restart_delay([now - 1, now], now, 2) == 0  # one death each: at once
    assert restart_delay([now - 2, now - 1, now], now, 2) == 0.25
    assert restart_delay([now - 3, now - 2, now - 1, now], now, 2) == 0.5
    assert restart_delay([now - i * 0.1 for i in range(50)], now, 2) == 5.0  # capped
    assert restart_delay([now - 30, now - 20, now - 11, now], now, 2) == 0  # long ago


def test_a_worker_exit_in_words() -> None:
    import os
    import signal

    from tokenlay_otel.proxy.workers import describe_exit

    pid = os.fork()
    if pid == 0:
        os._exit(3)
    assert describe_exit(os.waitpid(pid, 0)[1]) == "exited with status 3"
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    os.kill(pid, signal.SIGKILL)
    assert describe_exit(os.waitpid(pid, 0)[1]) == "was killed by SIGKILL"


def test_the_store_thread_waits_for_a_lock_by_polling_and_only_for_locks() -> None:
    from tokenlay_otel.proxy.store_sqlite import _patiently

    attempts: list[int] = []

    def locked_twice() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "written"

    assert _patiently(locked_twice) == "written" and len(attempts) == 3

    def broken() -> str:
        attempts.append(1)
        raise sqlite3.OperationalError("no such table: usage")

    attempts.clear()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _patiently(broken)
    assert len(attempts) == 1
