"""``tokenlay-otel proxy --workers N``: several processes on one port, one shared store,
limits exact across them; SIGTERM stops them all."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tokenlay_otel import TokenlayOpenAI
from tokenlay_otel.cli import build_parser
from tokenlay_otel.proxy.serve import worker_count
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY
from .proxy_harness import PROXY_KEY, proxy_subprocess, statuses_of_calls
from .proxy_store_view import StoreView, redis_url, store, wait_for

pytestmark = pytest.mark.slow  # proxy processes with several workers

__all__ = ["redis_url", "store"]  # fixtures

LIMIT = 25


def _rules(tmp_path: Path) -> str:
    path = tmp_path / "rules.json"
    limits = [{"type": "requests", "max": LIMIT, "window": "total", "per": "org"}]
    path.write_text(json.dumps([{"id": "shared", "if": {}, "then": {"limits": limits}}]))
    return str(path)


def _store_args(view: StoreView) -> tuple[str, ...]:
    return ("--redis-url", view.redis_url) if view.redis_url else ("--db", str(view.path))


def _pids(url: str) -> set[int]:
    def one(_: int) -> int:
        with urllib.request.urlopen(url + "/health", timeout=10) as answer:
            return int(json.loads(answer.read())["pid"])

    seen: set[int] = set()
    deadline = time.monotonic() + 10  # a worker may still be starting on a busy machine
    with ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline:  # the kernel hands connections to any free worker
            seen |= set(pool.map(one, range(40)))
            if len(seen) > 1:
                break
            time.sleep(0.1)
    return seen


def test_two_workers_share_one_limit_exactly(store: StoreView, tmp_path: Path) -> None:
    args = ("--mock-upstream", "--rules", _rules(tmp_path), "--workers", "2", *_store_args(store))
    with proxy_subprocess(*args) as (url, proc):
        workers = _pids(url)
        assert len(workers) == 2 and proc.pid not in workers
        client = TokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            tokenlay_key=PROXY_KEY,
            tokenlay_base_url=url,
            max_retries=0,
            metadata={"org": "acme"},
        )

        statuses = statuses_of_calls([client], LIMIT * 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
    assert statuses.count(200) == LIMIT, statuses
    assert statuses.count(429) == 2 * LIMIT
    assert "2 workers" in stderr and "stopped" in stderr
    # No worker outlives the parent: each is gone (reaped by it) within a deadline.
    assert wait_for(lambda: not any(_alive(pid) for pid in workers)), workers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_flag() -> None:
    parser = build_parser()
    assert parser.parse_args(["proxy", "--workers", "auto"]).workers == 0
    assert parser.parse_args(["proxy"]).workers == 1
    for bad in ("-1", "x", "1000"):
        with pytest.raises(SystemExit):
            parser.parse_args(["proxy", "--workers", bad])
    assert worker_count(3) == 3
    assert worker_count(0) == len(os.sched_getaffinity(0))


def test_a_port_in_use_is_one_clear_line() -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            result = subprocess.run(
                [sys.executable, "-m", "tokenlay_otel.cli", "proxy", "--mock-upstream",
                 "--port", str(port), "--workers", workers],
                env={**os.environ, "TOKENLAY_PROXY_KEYS": PROXY_KEY},
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert result.returncode != 0
            assert result.stderr.strip() == (
                f"tokenlay-otel proxy: cannot listen on 127.0.0.1:{port} (Address already in "
                "use); another process listens there: pick another --port"
            )


def test_accepted_connections_send_without_waiting_for_acks() -> None:
    """An answer goes out as headers then body; with Nagle on, the body waits for the
    client's delayed ACK of the headers (about 40 ms a call)."""
    import asyncio
    import socket

    from tokenlay_otel.proxy.serve import listen

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listen("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


# --- supervision: workers that die, a parent that dies -------------------------------------

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
STREAM_USAGE = 12 + 5  # what FakeOpenAIServer reports for a stream of its five words


class _Pinned:
    """One keep-alive connection to the proxy and the pid of the worker that took it:
    every request sent on it is served by that worker."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=15)
        self.conn.request("GET", "/health")
        self.pid = int(json.loads(self.conn.getresponse().read())["pid"])

    def stream(self, upstream: str, user: str) -> http.client.HTTPResponse:
        """A chat stream for ``user``, answered (status and headers read)."""
        body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
        self.conn.request("POST", "/v1/chat/completions", body, headers=_headers(upstream, user))
        return self.conn.getresponse()

    def close(self) -> None:
        self.conn.close()


def _headers(upstream: str, user: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {PROXY_KEY}",
        "content-type": "application/json",
        "x-tokenlay-provider-key": PROVIDER_KEY,
        "x-tokenlay-provider-base": upstream + "/v1",
        "x-tokenlay-user": user,
    }


def _pin_per_worker(url: str, each: int, workers: int = 2) -> list[_Pinned]:
    """Connections, ``each`` to every one of ``workers`` workers (the kernel picks who
    accepts; the ones past ``each`` are closed), in the order they were opened."""
    kept: list[_Pinned] = []
    counts: dict[int, int] = {}
    deadline = time.monotonic() + 15  # a worker may still be starting on a busy machine
    while time.monotonic() < deadline:
        if len(counts) == workers and all(n >= each for n in counts.values()):
            return kept
        pinned = _Pinned(url)
        if counts.get(pinned.pid, 0) < each:
            counts[pinned.pid] = counts.get(pinned.pid, 0) + 1
            kept.append(pinned)
        else:
            pinned.close()
            time.sleep(0.01)
    raise AssertionError(f"connections did not reach {workers} workers: {counts}")


def _rules_file(tmp_path: Path, *limits: dict[str, object]) -> str:
    path = tmp_path / "limits.json"
    path.write_text(json.dumps([{"id": "r", "if": {}, "then": {"limits": list(limits)}}]))
    return str(path)


def _requests(view: StoreView) -> float:
    """Requests counted, every key together."""
    return sum(v for k, v in view.counters().items() if k.startswith("requests:"))


def _gone(pid: int) -> bool:
    """Exited (a zombie no one reaps counts: it serves nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_worker_killed_mid_stream_is_replaced_and_its_calls_stay_counted(
    store: StoreView, tmp_path: Path
) -> None:
    """SIGKILL one of two workers while streams run through it: the parent forks a new
    one, the streams the other worker serves settle exactly, the killed one's slots come
    back when their leases run out, its admitted calls stay counted (reservations kept:
    an over-count, never an under-count), and the requests limit stays exact."""
    limit = 12
    rules = _rules_file(
        tmp_path,
        {"type": "requests", "max": limit, "window": "total", "per": "org"},
        {"type": "concurrent", "max": 4, "per": "org"},
        {"type": "tokens", "max": 10**6, "window": "total", "per": "user"},
    )
    with FakeOpenAIServer() as upstream:
        upstream.stream_delay = 0.4  # about 2 s a stream: still running at the kill
        args = ("--rules", rules, "--allow-provider", upstream.url, "--workers", "2",
                "--lease-seconds", "1", *_store_args(store))  # fmt: skip
        with proxy_subprocess(*args) as (url, proc):
            pinned = _pin_per_worker(url, 2)
            victim = pinned[0].pid
            survivor = next(p.pid for p in pinned if p.pid != victim)
            streams = [(p, p.stream(upstream.url, "v" if p.pid == victim else "s")) for p in pinned]
            assert [r.status for _, r in streams] == [200] * 4
            assert wait_for(lambda: store.leases() == 4)
            os.kill(victim, signal.SIGKILL)
            texts = {"v": [], "s": []}  # type: dict[str, list[bytes]]
            for p, response in streams:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    texts["v" if p.pid == victim else "s"].append(response.read())
                p.close()
            # The survivor's streams were read to their end; the victim's were cut.
            assert all(t.endswith(b"data: [DONE]\n\n") for t in texts["s"]) and texts["s"]
            assert not texts["v"]

            # A new worker answers in the victim's place.
            assert wait_for(lambda: len(_pids(url) - {survivor}) == 1, timeout=15)
            replacement = (_pids(url) - {survivor}).pop()
            assert replacement != victim and _gone(victim)
            # The victim's slots come back within a lease (1 s) of its death.
            assert wait_for(lambda: store.leases() == 0, timeout=10)
            assert store.tokens(value="s") == 2 * STREAM_USAGE
            assert store.tokens(value="v") > 2 * STREAM_USAGE  # their reservations, kept
            assert _requests(store) == 4

            client = TokenlayOpenAI(
                provider_api_key=PROVIDER_KEY,
                provider_api_base=upstream.url + "/v1",
                tokenlay_key=PROXY_KEY,
                tokenlay_base_url=url,
                max_retries=0,
                metadata={"user": "late"},
            )
            statuses = statuses_of_calls([client], 2 * limit)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            stderr = proc.stderr.read() if proc.stderr else ""
    assert statuses.count(200) == limit - 4, statuses
    assert f"worker {victim} was killed by SIGKILL; replaced by worker {replacement}" in stderr


def test_workers_dying_fast_are_replaced_more_slowly(tmp_path: Path) -> None:
    args = ("--mock-upstream", "--workers", "2", "--db", str(tmp_path / "u.db"))
    with proxy_subprocess(*args) as (url, proc):
        for _ in range(4):
            pids = _pids(url)
            os.kill(min(pids), signal.SIGKILL)
            assert wait_for(lambda p=pids: len(_pids(url) - p) == 1, timeout=15)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
    assert stderr.count("was killed by SIGKILL") == 4, stderr
    assert "replacing it in 0.25 s (workers are dying fast)" in stderr, stderr


def test_a_worker_that_cannot_start_stops_the_proxy_with_its_reason() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "tokenlay_otel.cli", "proxy", "--mock-upstream", "--port", "0",
         "--workers", "2", "--allow-provider", "http://bad host"],
        env={**os.environ, "TOKENLAY_PROXY_KEYS": PROXY_KEY},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "provider pattern 'http://bad host' contains ' '" in result.stderr
    assert "before it could serve; stopping" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    args = ("--mock-upstream", "--workers", "2", "--db", str(tmp_path / "u.db"))
    with proxy_subprocess(*args) as (url, proc):
        workers = _pids(url)
        assert len(workers) == 2
        proc.kill()
        proc.wait(timeout=10)
        try:
            assert wait_for(lambda: all(_gone(pid) for pid in workers), timeout=15), workers
            assert _refuses(url)
        finally:  # no orphan outlives a failure
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# --- money across workers: a stream left early, a client gone --------------------------------


def test_a_break_out_of_a_stream_is_settled_once_across_workers(
    store: StoreView, tmp_path: Path
) -> None:
    calls = 6
    rules = _rules_file(
        tmp_path,
        {"type": "requests", "max": calls, "window": "total", "per": "user"},
        {"type": "tokens", "max": 10**6, "window": "total", "per": "user"},
    )
    with FakeOpenAIServer() as upstream:
        upstream.stream_delay = 0.05
        args = ("--rules", rules, "--allow-provider", upstream.url, "--workers", "2",
                *_store_args(store))  # fmt: skip
        with proxy_subprocess(*args) as (url, _):
            client = TokenlayOpenAI(
                provider_api_key=PROVIDER_KEY,
                provider_api_base=upstream.url + "/v1",
                tokenlay_key=PROXY_KEY,
                tokenlay_base_url=url,
                max_retries=0,
                metadata={"user": "u1"},
            )
            for _ in range(calls):
                stream = client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, stream=True
                )
                for _chunk in stream:
                    break
                stream.close()  # what a `break` leads to once the stream is dropped
            # Each is read on for its usage and settled once, whichever worker took it.
            assert wait_for(lambda: store.leases() == 0 and store.tokens() == calls * STREAM_USAGE)
            assert _requests(store) == calls
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert store.tokens() == calls * STREAM_USAGE and store.estimated() == 0


def test_clients_gone_mid_stream_are_each_settled_once_across_workers(
    store: StoreView, tmp_path: Path
) -> None:
    rules = _rules_file(
        tmp_path,
        {"type": "concurrent", "max": 8, "per": "user"},
        {"type": "requests", "max": 100, "window": "total", "per": "user"},
        {"type": "tokens", "max": 10**6, "window": "total", "per": "user"},
    )
    with FakeOpenAIServer() as upstream:
        upstream.stream_delay = 0.2
        args = ("--rules", rules, "--allow-provider", upstream.url, "--workers", "2",
                *_store_args(store))  # fmt: skip
        with proxy_subprocess(*args) as (url, _):
            pinned = _pin_per_worker(url, 3)
            responses = [p.stream(upstream.url, "u1") for p in pinned]
            for p, response in zip(pinned, responses, strict=True):
                assert response.status == 200
                assert response.readline().startswith(b"data: ")  # the first chunk
                p.conn.sock.shutdown(socket.SHUT_RDWR)  # gone, mid-stream
                p.close()
            assert wait_for(lambda: store.leases() == 0 and store.tokens() == 6 * STREAM_USAGE)
            assert _requests(store) == 6
    assert store.tokens() == 6 * STREAM_USAGE and store.estimated() == 0


def test_two_workers_share_one_concurrency_limit_exactly(store: StoreView, tmp_path: Path) -> None:
    """Three slots, six slow streams, three on each worker: exactly three admitted (a
    limit kept per worker would admit all six)."""
    rules = _rules_file(tmp_path, {"type": "concurrent", "max": 3, "per": "user"})
    with FakeOpenAIServer() as upstream:
        upstream.stream_delay = 0.5
        args = ("--rules", rules, "--allow-provider", upstream.url, "--workers", "2",
                *_store_args(store))  # fmt: skip
        with proxy_subprocess(*args) as (url, _):
            pinned = _pin_per_worker(url, 3)
            responses = [p.stream(upstream.url, "u1") for p in pinned]
            statuses = [r.status for r in responses]
            for p in pinned:
                p.close()
            assert wait_for(lambda: store.leases() == 0)
    assert sorted(statuses) == [200] * 3 + [429] * 3, statuses
