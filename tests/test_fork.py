"""A process that forks while one of our locks is held: the child's calls must not hang.

Each test holds a lock from a second thread while the process forks, as a worker thread
recording a call would, then makes the child do what an LLM call does with that lock.
Without fresh locks in the child, it waits forever; the parent kills it after a few
seconds and the test fails.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tokenlay_otel import _responses
from tokenlay_otel._attributes import endpoint_for
from tokenlay_otel._config import Settings
from tokenlay_otel._metrics import CallMeasurements, MetricRecorder, RequestCounts, ValueCap
from tokenlay_otel._pricing import PriceBook
from tokenlay_otel._telemetry import LLMCall, Telemetry
from tokenlay_otel._wire import TokenlayResponseMetadata
from tokenlay_otel.exporters.ledger import LedgerSpanExporter

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()"),
    pytest.mark.slow,  # forked child processes
]


@contextmanager
def held_by_another_thread(lock: Any) -> Iterator[None]:
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(5)
    try:
        yield
    finally:
        release.set()
        thread.join(5)


def exit_code_in_child(work: Callable[[], None], timeout: float = 5.0) -> int | None:
    """Fork; run ``work`` in the child. Its exit code (0: done), or ``None`` if it hung."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.fixture(autouse=True)
def _no_fork_warning() -> Iterator[None]:
    # Python 3.12+ warns about fork() with threads running; that is the point here.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_user_cap_in_a_forked_child() -> None:
    cap = ValueCap(10)
    with held_by_another_thread(cap._lock):
        code = exit_code_in_child(lambda: None if cap("new-user") == "new-user" else os._exit(3))
    assert code == 0


def test_request_counts_in_a_forked_child() -> None:
    counts = RequestCounts()
    recorder = MetricRecorder.create(None, metadata_fields=("user",), value_limit=10)
    sets = recorder._attribute_sets  # a real attribute set, as a call builds it
    measured = CallMeasurements(
        operation="chat", provider="openai", request_model="m", response_model="m",
        error_type=None, metadata={"user": "u"}, duration_s=0.1, input_tokens=1,
        output_tokens=1, cached_input_tokens=None, time_to_first_chunk_s=None, cost=None,
        cost_source="unknown", rule_action=None, routed=False,
    )  # fmt: skip
    counts.add(sets(measured))

    def child() -> None:
        counts.add(sets(measured))
        (observed,) = counts.observe(None)  # type: ignore[arg-type]
        if observed.value != 2:  # the parent's count carried over, plus the child's
            os._exit(3)

    with held_by_another_thread(counts._lock):
        code = exit_code_in_child(child)
    assert code == 0


def test_price_cache_in_a_forked_child() -> None:
    book = PriceBook()
    with held_by_another_thread(book._lock):
        code = exit_code_in_child(lambda: book.rates("gpt-4o-mini", None) and None)
    assert code == 0


def test_response_metadata_in_a_forked_child() -> None:
    class Result:
        pass

    def child() -> None:
        result = Result()
        _responses.remember(result, TokenlayResponseMetadata(rule_id="r"))
        found = _responses.get_tokenlay_metadata(result)
        if found is None or found.rule_id != "r":
            os._exit(3)

    with held_by_another_thread(_responses._remembered._lock):
        code = exit_code_in_child(child)
    assert code == 0


def test_ledger_opens_its_own_connection_in_a_forked_child(tmp_path: Path) -> None:
    exporter = LedgerSpanExporter(tmp_path / "ledger.db")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry.create(settings=Settings(), tracer_provider=provider)

    def one_call(user: str) -> None:
        endpoint = endpoint_for("post", "/chat/completions")
        assert endpoint is not None
        call = LLMCall(
            telemetry, endpoint, body={"model": "gpt-4o-mini"}, metadata={"user": user},
            provider_base="https://api.openai.com/v1", routed=False,
        )  # fmt: skip
        call.start()
        call.detach()
        call.end(response={"id": f"r-{user}", "model": "gpt-4o-mini"})

    one_call("parent")  # the parent's connection is open from here on
    parent_connection = exporter._connection
    assert parent_connection is not None

    def child() -> None:
        one_call("child")
        if exporter._connection is None or exporter._connection is parent_connection:
            os._exit(3)

    with held_by_another_thread(exporter._lock):
        code = exit_code_in_child(child)
    assert code == 0
    one_call("parent-again")  # and the parent's connection still works
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        users = sorted(row[0] for row in db.execute("SELECT user FROM llm_calls"))
    assert users == ["child", "parent", "parent-again"]
