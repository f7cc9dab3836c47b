"""Beside another openai instrumentation: one LLM span per call, no metric counted twice.

The other instrumentations are the real packages (see the ``dev`` extra). Each test
instruments ours and one of theirs, in both orders, makes calls through the Tokenlay
route to a loopback server, and reads the spans and every metric point from all scopes.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pytest
import wrapt
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from tokenlay_otel import TokenlayInstrumentor, get_tokenlay_metadata, metadata
from tokenlay_otel._coexist import OTHERS, _instrumenting
from tokenlay_otel._config import Settings
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

pytestmark = pytest.mark.slow  # every other openai instrumentation, each call under each order

MESSAGES = [{"role": "user", "content": "hi"}]
HEADERS = {
    "x-tokenlay-rule-id": "rule-7",
    "x-tokenlay-rule-action": "warn",
    "x-tokenlay-warnings": '["80% of the budget"]',
}

#: name -> (module, class, why it may be missing)
INSTRUMENTATIONS = {
    "genai-openai": (
        "opentelemetry.instrumentation.genai.openai",
        "OpenAIInstrumentor",
        "opentelemetry-instrumentation-genai-openai is in the dev extra",
    ),
    "openai-v2": (
        "opentelemetry.instrumentation.openai_v2",
        "OpenAIInstrumentor",
        # 2.4b0 imports opentelemetry.util.genai.instruments, which util-genai 1.2 removed
        # (genai-openai >= 1.2 needs util-genai >= 1.2); 2.3b0 calls wrapt 1's keywords.
        "opentelemetry-instrumentation-openai-v2 needs opentelemetry-util-genai < 1.2 "
        "(so genai-openai <= 1.1b0) and is not in the dev extra",
    ),
    "openllmetry": (
        "opentelemetry.instrumentation.openai",
        "OpenAIInstrumentor",
        "opentelemetry-instrumentation-openai (OpenLLMetry) is in the dev extra",
    ),
}


def other_instrumentor(name: str) -> Any:
    module, cls, why = INSTRUMENTATIONS[name]
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as exc:
        pytest.skip(f"{name} not importable here ({exc}): {why}")


def _undo_leftover_patches() -> list[str]:
    """Restore openai methods another instrumentation left wrapped; their names.

    OpenLLMetry 0.62 unwraps with dotted paths that ``unwrap`` cannot resolve
    ("openai.resources.chat.completions", "Completions.create"), so its uninstrument()
    leaves every wrapper in place; a later instrument() would then wrap twice.
    """
    left = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("openai.resources.") or module is None:
            continue
        for cls in vars(module).values():
            if not isinstance(cls, type) or cls.__module__ != name:
                continue
            for attr, value in list(vars(cls).items()):
                if isinstance(value, wrapt.FunctionWrapper):
                    while isinstance(value, wrapt.FunctionWrapper):
                        value = value.__wrapped__
                    setattr(cls, attr, value)
                    left.append(f"{cls.__qualname__}.{attr}")
    return left


def _ours_unpatched() -> bool:
    from openai._base_client import AsyncAPIClient, SyncAPIClient

    return not any(
        isinstance(vars(cls)[name], wrapt.FunctionWrapper)
        for cls in (SyncAPIClient, AsyncAPIClient)
        for name in ("request", "_process_response")
    )


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(response_headers=HEADERS) as srv:
        yield srv


class Pair:
    """Ours and another instrumentation, on one pair of in-memory providers."""

    def __init__(self, name: str, capture: SpanCapture) -> None:
        self.name = name
        self.capture = capture

    def llm_spans(self) -> list[Any]:
        return [s for s in self.capture.spans() if "gen_ai.operation.name" in s.attributes]

    def only_llm_span(self) -> Any:
        spans = self.llm_spans()
        assert len(spans) == 1, [(s.name, s.instrumentation_scope.name) for s in spans]
        return spans[0]

    def points(self) -> dict[str, list[Any]]:
        """Metric name -> its data points, from every instrumentation scope."""
        out: dict[str, list[Any]] = {}
        data = self.capture.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out

    def counts(self) -> Counter[str]:
        """How many values each ``gen_ai.client.*`` histogram got, all scopes summed;
        token usage split by type."""
        counts: Counter[str] = Counter()
        for name, points in self.points().items():
            if not name.startswith("gen_ai.client.") or not hasattr(points[0], "count"):
                continue
            for point in points:
                kind = point.attributes.get("gen_ai.token.type")
                counts[f"{name}:{kind}" if kind else name] += point.count
        return counts


@contextmanager
def instrumented(
    name: str, order: str, capture: SpanCapture, server: FakeOpenAIServer
) -> Iterator[Pair]:
    """Ours (routing through ``server``) and ``name``, instrumented in ``order``."""
    theirs = other_instrumentor(name)
    ours = TokenlayInstrumentor()
    providers = {"tracer_provider": capture.provider, "meter_provider": capture.meter_provider}
    settings = Settings.from_env({"TOKENLAY_KEY": TOKENLAY_KEY, "TOKENLAY_BASE_URL": server.url})
    steps = [
        lambda: ours.instrument(settings=settings, **providers),
        lambda: theirs.instrument(**providers),
    ]
    if order == "theirs first":
        steps.reverse()
    try:
        for step in steps:
            step()
        yield Pair(name, capture)
    finally:
        theirs.uninstrument()
        ours.uninstrument()
        # Theirs patch openai for the whole process: nothing may be left behind.
        left = _undo_leftover_patches()
    assert _ours_unpatched()
    assert not left or name == "openllmetry", left


@pytest.fixture(
    params=[(n, o) for n in INSTRUMENTATIONS for o in ("ours first", "theirs first")],
    ids=lambda p: f"{p[0]}-{p[1].replace(' ', '-')}",
)
def pair(
    request: pytest.FixtureRequest, telemetry: SpanCapture, server: FakeOpenAIServer
) -> Iterator[Pair]:
    name, order = request.param
    with instrumented(name, order, telemetry, server) as both:
        yield both


@pytest.fixture
def client() -> openai.OpenAI:
    return openai.OpenAI(api_key=PROVIDER_KEY, base_url="https://api.openai.com/v1", max_retries=0)


@pytest.fixture
def aclient() -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=PROVIDER_KEY, base_url="https://api.openai.com/v1", max_retries=0
    )


def chat(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def chat_stream(client: openai.OpenAI) -> None:
    # We ask for the usage chunk and hide it: only we see the usage.
    for _ in client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
        pass


def chat_stream_with_usage(client: openai.OpenAI) -> None:
    # The caller asked for the usage chunk: everyone above us sees it too.
    for _ in client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ):
        pass


def embeddings(client: openai.OpenAI) -> None:
    client.embeddings.create(model="text-embedding-3-small", input="hi")


def achat(client: openai.AsyncOpenAI) -> None:
    async def run() -> None:
        async with client:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    asyncio.run(run())


def achat_stream(client: openai.AsyncOpenAI) -> None:
    async def run() -> None:
        async with client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            async for _ in stream:
                pass

    asyncio.run(run())


#: call, whether it streams, whether it has output tokens, the path it takes
CALLS: dict[str, tuple[Callable[[Any], None], bool, bool, str]] = {
    "chat": (chat, False, True, "/v1/chat/completions"),
    "chat-stream": (chat_stream, True, True, "/v1/chat/completions"),
    "chat-stream-usage": (chat_stream_with_usage, True, True, "/v1/chat/completions"),
    "embeddings": (embeddings, False, False, "/v1/embeddings"),
    "async-chat": (achat, False, True, "/v1/chat/completions"),
    "async-chat-stream": (achat_stream, True, True, "/v1/chat/completions"),
}


def assert_ours_on(span: Any) -> None:
    attrs = span.attributes
    assert attrs["tokenlay.user"] == "u1"
    assert attrs["tokenlay.org"] == "o1"
    assert attrs["tokenlay.routed"] is True
    assert attrs["tokenlay.rule.id"] == "rule-7"
    assert attrs["tokenlay.rule.action"] == "warn"


def assert_once(pair: Pair, *, streaming: bool, output_tokens: bool) -> None:
    """Every gen_ai.client.* histogram got one value for the call, whoever recorded it;
    the tokenlay.* counters are ours and counted the call once."""
    counts = pair.counts()
    assert counts["gen_ai.client.operation.duration"] == 1, counts
    assert counts["gen_ai.client.token.usage:input"] == 1, counts
    assert counts["gen_ai.client.token.usage:output"] == (1 if output_tokens else 0), counts
    ttfc = counts["gen_ai.client.operation.time_to_first_chunk"]
    assert ttfc == (1 if streaming else 0), counts
    points = pair.points()
    (requests,) = points["tokenlay.client.requests"]
    assert requests.value == 1
    assert requests.attributes["tokenlay.user"] == "u1"
    assert requests.attributes["tokenlay.rule.action"] == "warn"
    (cost,) = points["tokenlay.client.cost"]
    assert cost.attributes["tokenlay.org"] == "o1"
    assert cost.value > 0


@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_one_span_per_call_and_each_metric_once(
    pair: Pair,
    call: str,
    client: openai.OpenAI,
    aclient: openai.AsyncOpenAI,
    server: FakeOpenAIServer,
) -> None:
    run, streaming, output_tokens, path = CALLS[call]
    with metadata(user="u1", org="o1"):
        run(aclient if call.startswith("async") else client)

    span = pair.only_llm_span()
    # Theirs survives, with our attribution, cost and the proxy's answer on it.
    assert span.instrumentation_scope.name != "tokenlay_otel"
    assert_ours_on(span)
    assert span.attributes["tokenlay.cost.source"] == "local"
    assert span.attributes["tokenlay.cost.usd"] == pair.points()["tokenlay.client.cost"][0].value
    assert span.attributes["gen_ai.usage.input_tokens"] > 0
    assert [e.name for e in span.events if e.name.startswith("tokenlay")] == ["tokenlay.warning"]
    assert_once(pair, streaming=streaming, output_tokens=output_tokens)

    # Routing is unchanged, and the proxy joins the trace at the surviving span.
    (sent,) = server.requests
    assert sent.path == path
    assert sent.headers["authorization"] == f"Bearer {TOKENLAY_KEY}"
    assert sent.headers["x-tokenlay-user"] == "u1"
    assert sent.headers["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"


def test_drop_in_client(pair: Pair, server: FakeOpenAIServer) -> None:
    from tokenlay_otel import TokenlayOpenAI

    client = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        tokenlay_key=TOKENLAY_KEY,
        tokenlay_base_url=server.url,
        metadata={"user": "u1", "org": "o1"},
        max_retries=0,
    )
    chat_stream(client)
    span = pair.only_llm_span()
    assert span.instrumentation_scope.name != "tokenlay_otel"
    assert_ours_on(span)
    assert_once(pair, streaming=True, output_tokens=True)
    (sent,) = server.requests
    assert sent.headers["x-tokenlay-provider-key"] == PROVIDER_KEY


def test_a_call_they_do_not_trace_keeps_our_span(
    pair: Pair, client: openai.OpenAI, server: FakeOpenAIServer
) -> None:
    """Legacy completions: only OpenLLMetry traces them, and records no metric for them."""
    with metadata(user="u1", org="o1"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    span = pair.only_llm_span()
    expected = "opentelemetry.instrumentation.openai.v1" if pair.name == "openllmetry" else None
    assert span.instrumentation_scope.name == (expected or "tokenlay_otel")
    assert_ours_on(span)
    assert span.attributes["tokenlay.cost.source"] == "local"
    assert_once(pair, streaming=False, output_tokens=True)


def test_responses_api(pair: Pair, client: openai.OpenAI) -> None:
    with metadata(user="u1", org="o1"):
        client.responses.create(model="gpt-4o-mini", input="hi")
        for _ in client.responses.create(model="gpt-4o-mini", input="hi", stream=True):
            pass
    spans = pair.llm_spans()
    ours = [s for s in spans if "tokenlay.routed" in s.attributes]
    assert len(ours) == 2
    for span in ours:
        assert_ours_on(span)
        assert span.attributes["tokenlay.cost.source"] == "local"
    if pair.name == "openllmetry":
        # OpenLLMetry starts its Responses span after the call has returned, beside ours
        # rather than around it: there is nothing to share. It records no metric for it.
        # (How many it makes depends on response ids it keeps process-wide.)
        assert {s.instrumentation_scope.name for s in spans if s not in ours} == {
            "opentelemetry.instrumentation.openai.v1"
        }
    else:
        assert spans == ours
    counts = pair.counts()
    assert counts["gen_ai.client.operation.duration"] == 2, counts
    assert counts["gen_ai.client.token.usage:input"] == 2, counts
    assert counts["gen_ai.client.token.usage:output"] == 2, counts
    assert counts["gen_ai.client.operation.time_to_first_chunk"] == 1, counts
    (requests,) = pair.points()["tokenlay.client.requests"]
    assert requests.value == 2


def test_an_error_is_one_span_and_one_duration(
    pair: Pair, client: openai.OpenAI, server: FakeOpenAIServer
) -> None:
    from tokenlay_otel.testing import Reply

    server.reply(
        Reply(
            status=429,
            body={"error": {"message": "over budget", "type": "tokenlay_limit", "code": "x"}},
            headers={"x-tokenlay-rule-id": "rule-7", "x-tokenlay-rule-action": "block"},
        )
    )
    with metadata(user="u1", org="o1"), pytest.raises(openai.RateLimitError):
        chat(client)
    span = pair.only_llm_span()
    assert span.attributes["tokenlay.user"] == "u1"
    assert span.attributes["tokenlay.rule.action"] == "block"
    assert span.status.status_code.name == "ERROR"
    counts = pair.counts()
    assert counts["gen_ai.client.operation.duration"] == 1, counts
    (requests,) = pair.points()["tokenlay.client.requests"]
    assert (requests.value, requests.attributes["tokenlay.rule.action"]) == (1, "block")


def _leave_early(client: openai.OpenAI) -> None:
    with client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as s:
        for _ in s:
            break


def test_their_span_may_end_first(pair: Pair, client: openai.OpenAI) -> None:
    """A stream left early: some end their span before ours ends (on their ``with``
    exit, or at garbage collection). What was known by then is on it; the rest of ours
    is dropped quietly, and our counters still count the call once."""
    with metadata(user="u1", org="o1"):
        _leave_early(client)
    gc.collect()
    span = pair.only_llm_span()
    assert_ours_on(span)
    (requests,) = pair.points()["tokenlay.client.requests"]
    assert requests.value == 1
    assert pair.counts()["gen_ai.client.operation.duration"] == 1


@pytest.mark.parametrize("name", INSTRUMENTATIONS)
def test_unsampled_calls_count_once(
    name: str, server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    """Not sampled: no span to share, but both still record metrics."""
    capture = SpanCapture(sampler=ALWAYS_OFF)
    with instrumented(name, "theirs first", capture, server) as pair:
        with metadata(user="u1", org="o1"):
            chat(client)
            chat_stream(client)
        assert capture.spans() == []
        counts = pair.counts()
        assert counts["gen_ai.client.operation.duration"] == 2, counts
        assert counts["gen_ai.client.token.usage:input"] == 2, counts
        assert counts["gen_ai.client.operation.time_to_first_chunk"] == 1, counts
        (requests,) = pair.points()["tokenlay.client.requests"]
        assert requests.value == 2


@pytest.mark.parametrize("name", INSTRUMENTATIONS)
def test_ours_again_once_theirs_is_gone(
    name: str, telemetry: SpanCapture, server: FakeOpenAIServer, instrument: Any
) -> None:
    with instrumented(name, "ours first", telemetry, server):
        pass
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url="https://api.openai.com/v1")
    with metadata(user="u1", org="o1"):
        chat(client)
    (span,) = telemetry.spans()
    assert span.instrumentation_scope.name == "tokenlay_otel"
    assert_ours_on(span)


@pytest.mark.parametrize("other", OTHERS, ids=lambda o: o.module)
def test_instrumenting_reads_what_the_public_way_says(other: Any, instrument: Any) -> None:
    """The seam reads ``BaseInstrumentor._instance``; the public way is to call the
    class (which re-runs ``__init__``). Both must agree, before and after."""
    module = pytest.importorskip(other.module, reason="the instrumentation is not installed")
    cls = getattr(module, other.instrumentor)
    assert _instrumenting(other) is cls().is_instrumented_by_opentelemetry is False
    cls().instrument()
    try:
        assert _instrumenting(other) is cls().is_instrumented_by_opentelemetry is True
    finally:
        cls().uninstrument()
        _undo_leftover_patches()
    assert _instrumenting(other) is cls().is_instrumented_by_opentelemetry is False


def test_the_ledger_keeps_a_shared_call(
    pair: Pair, telemetry: SpanCapture, client: openai.OpenAI, tmp_path: Any
) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from tokenlay_otel.exporters.ledger import LedgerSpanExporter, connect

    path = tmp_path / "ledger.db"
    telemetry.provider.add_span_processor(SimpleSpanProcessor(LedgerSpanExporter(path)))
    with metadata(user="u1", org="o1"):
        chat(client)
    span = pair.only_llm_span()
    rows = connect(path).execute("SELECT user, org, cost_usd, routed FROM llm_calls").fetchall()
    assert rows == [("u1", "o1", span.attributes["tokenlay.cost.usd"], 1)]


def test_a_responses_stream_ends_at_its_terminal_event(
    server: FakeOpenAIServer, instrument: Any, telemetry: SpanCapture, client: openai.OpenAI
) -> None:
    """Ours alone: the call ends before the terminal event goes up (an instrumentation
    above may end its span on it); the stream still answers get_tokenlay_metadata."""
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    stream = client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    seen = []
    for event in stream:
        if event.type == "response.completed":
            seen = telemetry.spans()
    (span,) = seen
    assert span.attributes["gen_ai.usage.output_tokens"] == 6
    assert span.attributes["tokenlay.cost.source"] == "local"
    meta = get_tokenlay_metadata(stream)
    assert (meta.rule_id, meta.input_tokens, meta.output_tokens) == ("rule-7", 9, 6)
    assert telemetry.spans() == seen
