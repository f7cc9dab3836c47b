"""Run the proxy for real on 127.0.0.1: in a thread (uvicorn) or as a process (the CLI)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from tokenlay_otel.proxy import ProxyConfig
from tokenlay_otel.proxy.local import free_port, local_proxy

PROXY_KEY = "tl-proxy-key-123"
#: Run every proxy process of the tests with this many workers where the test does not
#: say (``TOKENLAY_TEST_PROXY_WORKERS=2``): the trust checks, across workers.
ENV_TEST_WORKERS = "TOKENLAY_TEST_PROXY_WORKERS"


def with_test_workers(
    args: tuple[str, ...], environ: dict[str, str] | None = None
) -> tuple[str, ...]:
    """``args``, plus ``--workers N`` when ``TOKENLAY_TEST_PROXY_WORKERS`` asks for it and
    ``args`` do not choose."""
    workers = (os.environ if environ is None else environ).get(ENV_TEST_WORKERS, "").strip()
    if not workers or any(a == "--workers" or a.startswith("--workers=") for a in args):
        return args
    return (*args, "--workers", workers)


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def proxy_in_thread(config: ProxyConfig) -> Iterator[str]:
    named = ("keys", "rules", "store", "mock_upstream")
    options = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in named}
    with local_proxy(
        rules=config.rules,
        keys=tuple(config.keys),
        mock_upstream=config.mock_upstream,
        store=config.store,
        **options,
    ) as url:
        yield url


@contextmanager
def proxy_process(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    with proxy_subprocess(*args, env=env) as (url, _):
        yield url


@contextmanager
def proxy_subprocess(
    *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``tokenlay-otel proxy`` in its own process; (its URL, the process). With
    ``TOKENLAY_TEST_PROXY_WORKERS`` set, the process is the parent of that many workers
    (unless ``args`` choose)."""
    port = free_port()
    args = with_test_workers(args)
    command = [sys.executable, "-m", "tokenlay_otel.cli", "proxy", "--port", str(port), *args]
    proc = subprocess.Popen(
        command,
        env={**os.environ, "TOKENLAY_PROXY_KEYS": PROXY_KEY, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health")
    except OSError:
        proc.kill()
        raise RuntimeError(f"proxy did not start: {proc.communicate()[1]}") from None
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``; none elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_proxy(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the proxy process and its workers, if it has any: no shutdown and no
    settlement anywhere. (Killing the parent alone stops its workers gently.)"""
    import signal

    proc.send_signal(signal.SIGSTOP)  # forks no replacement while its workers die
    for worker in children_of(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
    proc.kill()
    proc.wait()


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def statuses_of_calls(clients: list[Any], count: int, *, threads: int = 16) -> list[int]:
    """``count`` chat calls spread over ``clients`` at once: 200 or 429 for each."""
    import openai

    def call(i: int) -> int:
        try:
            clients[i % len(clients)].chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
            )
            return 200
        except openai.RateLimitError:
            return 429

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(call, range(count)))
