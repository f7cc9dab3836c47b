from __future__ import annotations

import asyncio
import copy
import gc
import logging
from collections import Counter

import openai
import pytest
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from tokenlay_otel import TokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.testing import FakeOpenAIServer, Reply

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture
from .inprocess import sync_client

MESSAGES = [{"role": "user", "content": "hi"}]
PROVIDER_BASE = "https://api.openai.com/v1"


@pytest.fixture
def routed(server: FakeOpenAIServer, instrument):
    return instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)


def plain_client(**kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(api_key=PROVIDER_KEY, base_url=PROVIDER_BASE, max_retries=0, **kwargs)


def test_existing_client_is_routed_with_the_span_trace_context(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    client = plain_client()  # created before instrument()
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url, TOKENLAY_METADATA="org=env")
    with metadata(user="u1", org="o1"):
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from the fake server."

    sent = server.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.header_values("authorization") == [f"Bearer {TOKENLAY_KEY}"]
    assert sent.headers["x-tokenlay-provider-key"] == PROVIDER_KEY
    assert sent.headers["x-tokenlay-provider-base"] == PROVIDER_BASE
    assert sent.headers["x-tokenlay-user"] == "u1"
    assert sent.headers["x-tokenlay-org"] == "o1"
    span = telemetry.only_span()
    trace_id = format(span.context.trace_id, "032x")
    span_id = format(span.context.span_id, "016x")
    version, sent_trace, sent_parent, flags = sent.headers["traceparent"].split("-")
    assert (version, sent_trace, sent_parent) == ("00", trace_id, span_id)
    assert int(flags, 16) & 1 == 1  # sampled
    # The caller's client is untouched.
    assert str(client.base_url) == PROVIDER_BASE + "/"
    assert client.api_key == PROVIDER_KEY


def test_span_for_a_chat_call(server: FakeOpenAIServer, routed, telemetry: SpanCapture) -> None:
    server.response_headers.update(
        {
            "x-tokenlay-rule-id": "pro-budget",
            "x-tokenlay-rule-action": "warn",
            "x-tokenlay-limit-exceeded": "false",
            "x-tokenlay-cost": "0.0042",
            "x-tokenlay-warnings": '["80% of monthly budget", "slow down"]',
        }
    )
    client = plain_client()
    with metadata(user="u1", org="o1", plan="pro", project="p", feature="f", tenant="t"):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=50,
            temperature=0.2,
            top_p=0.9,
            frequency_penalty=0.1,
            presence_penalty=0.3,
            stop=["END"],
            seed=7,
            n=2,
            service_tier="default",
        )
    span = telemetry.only_span()
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes) == {
        "gen_ai.operation.name": "chat",
        "openai.api.type": "chat_completions",
        "gen_ai.provider.name": "openai",
        "server.address": "api.openai.com",
        "server.port": 443,
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.frequency_penalty": 0.1,
        "gen_ai.request.presence_penalty": 0.3,
        "gen_ai.request.stop_sequences": ("END",),
        "gen_ai.request.seed": 7,
        "gen_ai.request.choice.count": 2,
        "openai.request.service_tier": "default",
        "tokenlay.routed": True,
        "tokenlay.user": "u1",
        "tokenlay.org": "o1",
        "tokenlay.plan": "pro",
        "tokenlay.project": "p",
        "tokenlay.feature": "f",
        "tokenlay.metadata.tenant": "t",
        "gen_ai.response.id": "chatcmpl-fake-1",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.response.finish_reasons": ("stop",),
        "openai.response.system_fingerprint": "fp_fake",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 7,
        "gen_ai.usage.cache_read.input_tokens": 0,
        "gen_ai.usage.reasoning.output_tokens": 0,
        "tokenlay.model_shifted": False,
        "tokenlay.cost.usd": 0.0042,
        "tokenlay.cost.source": "proxy",
        "tokenlay.rule.id": "pro-budget",
        "tokenlay.rule.action": "warn",
        "tokenlay.limit_exceeded": False,
    }
    assert [(e.name, dict(e.attributes)) for e in span.events] == [
        ("tokenlay.warning", {"tokenlay.warning.message": "80% of monthly budget"}),
        ("tokenlay.warning", {"tokenlay.warning.message": "slow down"}),
    ]


def test_model_shift_by_the_proxy(server: FakeOpenAIServer, routed, telemetry: SpanCapture) -> None:
    server.response_headers["x-tokenlay-model"] = "gpt-4o-mini"
    plain_client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    attrs = telemetry.only_span().attributes
    assert attrs["tokenlay.model_shifted"] is True
    assert attrs["gen_ai.request.model"] == "gpt-4o"


def test_dated_response_model_is_not_a_shift(
    server: FakeOpenAIServer, routed, telemetry: SpanCapture
) -> None:
    server.reply(Reply(body={**_chat_body(), "model": "gpt-4o-mini-2024-07-18"}))
    plain_client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert telemetry.only_span().attributes["tokenlay.model_shifted"] is False


def _chat_body() -> dict:
    from tokenlay_otel.testing import chat_completion

    return chat_completion("gpt-4o-mini")


def test_without_tokenlay_key_nothing_is_rerouted(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/v1", max_retries=0)
    extra = {"user": "u1", "X-Mine": "1"}
    with metadata(org="o1"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=extra)
    sent = server.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert not [h for h in sent.headers if h.startswith("x-tokenlay") or h == "traceparent"]
    assert sent.headers["user"] == "u1"  # the caller's own header, sent as they set it
    attrs = telemetry.only_span().attributes
    assert attrs["tokenlay.routed"] is False
    assert attrs["tokenlay.org"] == "o1"
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["gen_ai.provider.name"] == "127.0.0.1"


def test_route_false_turns_routing_off(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url, TOKENLAY_ROUTE="false")
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/direct", max_retries=0)
    client.embeddings.create(model="text-embedding-3-small", input="x")
    assert server.requests[-1].path == "/direct/embeddings"
    assert telemetry.only_span().attributes["tokenlay.routed"] is False


def test_uninstrument_restores_and_double_instrument_is_a_no_op(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrumentor = instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    instrumentor.instrument(tracer_provider=telemetry.provider)
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/direct", max_retries=0)
    client.models.list()
    client.chat.completions.create(model="m", messages=MESSAGES)
    assert len(telemetry.spans()) == 1  # models.list is not an LLM operation
    assert server.requests[-1].path == "/v1/chat/completions"
    instrumentor.uninstrument()
    client.chat.completions.create(model="m", messages=MESSAGES)
    assert server.requests[-1].path == "/direct/chat/completions"
    assert server.requests[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert len(telemetry.spans()) == 1


def test_caller_objects_are_never_mutated(server: FakeOpenAIServer, routed) -> None:
    client = plain_client(default_headers={"X-Tokenlay-Plan": "pro", "X-App": "a"})
    before = (str(client.base_url), client.api_key, dict(client._custom_headers))
    messages = [{"role": "user", "content": "hi"}]
    extra = {"user": "u1", "X-Mine": "1"}
    kwargs = {"model": "m", "messages": messages, "extra_headers": extra, "stream": True}
    snapshot = copy.deepcopy(kwargs)
    list(client.chat.completions.create(**kwargs))
    assert kwargs == snapshot
    assert (str(client.base_url), client.api_key, dict(client._custom_headers)) == before
    sent = server.requests[-1]
    assert sent.header_values("x-tokenlay-plan") == ["pro"]  # once, not twice
    assert sent.headers["x-tokenlay-user"] == "u1"
    assert "user" not in sent.headers


def test_errors_are_recorded_and_reraised_unchanged(
    server: FakeOpenAIServer, routed, telemetry: SpanCapture
) -> None:
    server.reply(Reply(status=404, body={"error": {"message": "no such model", "code": "nf"}}))
    client = plain_client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.status_code == 404
    span = telemetry.only_span()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "404"
    assert "gen_ai.usage.input_tokens" not in span.attributes


def test_connection_errors_are_recorded(instrument, telemetry: SpanCapture) -> None:
    instrument()
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url="http://127.0.0.1:9/v1", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert telemetry.only_span().attributes["error.type"] == "openai.APIConnectionError"


def test_a_blocked_call(server: FakeOpenAIServer, routed, telemetry: SpanCapture) -> None:
    server.reply(
        Reply(
            status=429,
            body={"error": {"message": "limit", "type": "tokenlay_limit", "code": "limit"}},
            headers={"x-tokenlay-rule-action": "block", "x-tokenlay-limit-exceeded": "true"},
        )
    )
    with pytest.raises(openai.RateLimitError) as info:
        plain_client().chat.completions.create(model="m", messages=MESSAGES)
    assert get_tokenlay_metadata(info.value).rule_action == "block"
    attrs = telemetry.only_span().attributes
    assert attrs["tokenlay.rule.action"] == "block"
    assert attrs["tokenlay.limit_exceeded"] is True
    assert attrs["error.type"] == "429"


def test_unsampled_calls_are_still_routed(server: FakeOpenAIServer, instrument) -> None:
    capture = SpanCapture(sampler=ALWAYS_OFF)
    instrument(capture.provider, TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    reply = plain_client().chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices
    assert capture.spans() == []
    flags = server.requests[-1].headers["traceparent"].split("-")[3]
    assert int(flags, 16) & 1 == 0  # not sampled, and the proxy is told so


@pytest.mark.parametrize("capture", ["true", "SPAN_ONLY", None])
def test_content_capture_is_opt_in(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture, capture: str | None
) -> None:
    env = {"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": capture} if capture else {}
    instrument(**env)
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/v1", max_retries=0)
    client.chat.completions.create(model="m", messages=MESSAGES)
    list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    for span in telemetry.spans():
        if capture:
            assert '"content": "hi"' in span.attributes["gen_ai.input.messages"]
            assert "Hello from the fake server." in span.attributes["gen_ai.output.messages"]
        else:
            assert not [k for k in span.attributes if k.endswith("messages")]


def test_drop_in_client_gives_the_same_span_once(
    server: FakeOpenAIServer, routed, telemetry: SpanCapture
) -> None:
    client = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY, tokenlay_key=TOKENLAY_KEY, tokenlay_base_url=server.url
    )
    with metadata(user="u1"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    span = telemetry.only_span()
    assert span.attributes["tokenlay.user"] == "u1"
    assert span.attributes["tokenlay.routed"] is True
    assert server.requests[-1].header_values("authorization") == [f"Bearer {TOKENLAY_KEY}"]


def test_bad_metadata_is_dropped_with_one_warning(
    server: FakeOpenAIServer, routed, telemetry: SpanCapture, caplog: pytest.LogCaptureFixture
) -> None:
    client = plain_client()
    with caplog.at_level(logging.WARNING, logger="tokenlay_otel"):
        for _ in range(3):
            client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"user": "u1", "org": "bad\x00org"}
            )
    assert server.requests[-1].headers["x-tokenlay-user"] == "u1"
    assert "x-tokenlay-org" not in server.requests[-1].headers
    warnings = [r for r in caplog.records if "dropped a metadata field" in r.getMessage()]
    assert len(warnings) == 1


def test_async_calls(server: FakeOpenAIServer, routed, telemetry: SpanCapture) -> None:
    async def main() -> None:
        client = openai.AsyncOpenAI(api_key=PROVIDER_KEY, base_url=PROVIDER_BASE, max_retries=0)

        async def one(i: int) -> None:
            with metadata(user=f"u{i}"):
                await client.chat.completions.create(model="m", messages=MESSAGES)

        await asyncio.gather(*(one(i) for i in range(20)))

    asyncio.run(main())
    spans = telemetry.spans()
    assert len(spans) == 20
    assert {s.attributes["tokenlay.user"] for s in spans} == {f"u{i}" for i in range(20)}
    for request in server.requests:
        parent = request.headers["traceparent"].split("-")[2]
        span = next(s for s in spans if format(s.context.span_id, "016x") == parent)
        assert request.headers["x-tokenlay-user"] == span.attributes["tokenlay.user"]


def _live_call_objects() -> Counter[str]:
    """Objects of ours and SDK spans alive now, by class (tracked by the collector)."""
    counted: dict[type, bool] = {}
    found: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        count = counted.get(kind)
        if count is None:
            module = str(vars(kind).get("__module__", ""))
            count = counted[kind] = module.startswith("tokenlay_otel") or issubclass(kind, SdkSpan)
        if count:
            found[kind.__qualname__] += 1
    return found


def test_gc_of_unused_spans_is_clean(instrument, telemetry: SpanCapture) -> None:
    """Calls whose results are dropped unused, a stream never read among them, leave
    nothing behind: every span ends, and each call's objects (ours and its SDK span)
    are freed by reference counting alone, with the collector off, so no call makes
    a cycle that would keep its span and response alive until a collection."""
    instrument()
    client = sync_client()

    def calls(n: int) -> None:
        for _ in range(n):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)

    calls(3)  # the first calls fill the per-process caches (endpoints, attribute sets)
    gc.collect()
    telemetry.exporter.clear()
    before = _live_call_objects()
    assert "TokenlayInstrumentor" in before  # the census sees our objects
    gc.disable()
    try:
        calls(20)
        left = _live_call_objects() - before
        ended = len(telemetry.spans())
    finally:
        gc.enable()
    assert ended == 40  # the 20 streams never read ended their spans too
    assert not left, f"alive after the calls, by class: {dict(left)}"
