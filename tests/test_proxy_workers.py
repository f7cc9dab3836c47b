"""``tokenlay-otel proxy --workers N``: several processes on one port, one shared store,
limits exact across them; SIGTERM stops them all."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tokenlay_otel import TokenlayOpenAI
from tokenlay_otel.cli import build_parser
from tokenlay_otel.proxy.serve import worker_count

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
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):  # the kernel hands connections to whichever worker is free
            seen |= set(pool.map(one, range(40)))
            if len(seen) > 1:
                break
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
