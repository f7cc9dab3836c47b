"""A served proxy process freezes its start-up heap: full garbage collections walk only
what calls create, not the openai SDK and the price table (see ``proxy/heap.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tokenlay_otel.proxy.local import free_port

from .proxy_harness import PROXY_KEY, wait_http

# The proxy's own CLI in a process that, on SIGUSR1, writes what the collector sees.
# The handler is set before the CLI starts, so forked workers have it too.
_PROBE = """
import gc, json, os, signal, sys

def report(signum, frame):
    walked = gc.get_objects()
    state = {
        "frozen": gc.get_freeze_count(),
        "walked": len(walked),
        "prices_loaded": "genai_prices" in sys.modules,
        "price_objects_walked": sum(
            str(getattr(type(o), "__module__", "")).startswith("genai_prices")
            for o in walked
        ),
    }
    path = os.path.join(os.environ["PROBE_DIR"], f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as out:
        json.dump(state, out)
    os.replace(path + ".tmp", path)

signal.signal(signal.SIGUSR1, report)
from tokenlay_otel.cli import main
sys.exit(main(["proxy", *sys.argv[1:]]))
"""


def _worker_pids(url: str, expected: int) -> set[int]:
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    while len(seen) < expected and time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/health", timeout=10) as answer:
            seen.add(int(json.loads(answer.read())["pid"]))
    return seen


def _report(url: str, probe_dir: Path, pid: int) -> dict[str, object]:
    path = probe_dir / f"{pid}.json"
    deadline = time.monotonic() + 20
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {pid} wrote no report")
        # A Python signal handler runs when the main thread next runs Python code;
        # an idle event loop waits in C, a call wakes it.
        with urllib.request.urlopen(url + "/health", timeout=10) as answer:
            answer.read()
        time.sleep(0.05)
    state: dict[str, object] = json.loads(path.read_text())
    return state


@pytest.mark.parametrize(
    "workers", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["one", "two-workers"]
)
def test_served_process_freezes_its_start_up_heap(tmp_path: Path, workers: int) -> None:
    port = free_port()
    command = [sys.executable, "-c", _PROBE, "--mock-upstream", "--port", str(port)]
    command += ["--db", str(tmp_path / "limits.db"), "--workers", str(workers)]
    env = {**os.environ, "TOKENLAY_PROXY_KEYS": PROXY_KEY, "PROBE_DIR": str(tmp_path)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health")
        pids = _worker_pids(url, workers)
        assert len(pids) == workers
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
            state = _report(url, tmp_path, pid)
            # The price table is loaded before the first call, then frozen with the
            # rest of the start-up heap: a full collection no longer walks it.
            assert state["prices_loaded"] is True
            assert state["price_objects_walked"] == 0
            frozen, walked = state["frozen"], state["walked"]
            assert isinstance(frozen, int) and isinstance(walked, int)
            assert frozen > 10 * walked, state
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_a_call_leaves_no_cyclic_garbage(tmp_path: Path) -> None:
    """A call, plain or streamed, is freed by reference counting alone: cyclic garbage
    per call is what full collections have to find (a cancelled watcher task kept each
    call in a cycle: ~50 objects a call)."""
    import gc

    from tokenlay_otel._wire import build_request_headers
    from tokenlay_otel.proxy.local import local_proxy
    from tokenlay_otel.proxy.store import SQLiteStore

    store = SQLiteStore(tmp_path / "s.db")
    with local_proxy(rules=(), keys=(PROXY_KEY,), mock_upstream=True, store=store) as url:
        headers = {
            **build_request_headers(
                tokenlay_key=PROXY_KEY,
                provider_key="sk-test",
                provider_base="https://api.openai.com/v1",
                metadata={"user": "u"},
            ),
            "content-type": "application/json",
        }
        messages = [{"role": "user", "content": "hi"}]

        def call(stream: bool) -> bytes:
            body = {"model": "gpt-4o-mini", "messages": messages, "stream": stream}
            request = urllib.request.Request(
                url + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                return bytes(answer.read())

        for n in range(20):  # warm: lazy imports and first-call caches
            call(n % 2 == 1)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept for the check
        try:
            for n in range(60):
                assert call(n % 2 == 1)
            gc.collect()
            # Only the proxy's objects: the rest of the test process (other tests'
            # telemetry set-ups and fake servers) has garbage of its own.
            ours = sorted(
                {
                    type(o).__qualname__
                    for o in gc.garbage
                    if _module(o).startswith("tokenlay_otel.proxy")
                }
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert ours == [], f"a call left cyclic garbage: {ours}"


def _module(obj: object) -> str:
    return str(getattr(type(obj), "__module__", ""))
