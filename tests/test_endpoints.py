from __future__ import annotations

import asyncio

import openai
import pydantic
import pytest

from tokenlay_otel import get_tokenlay_metadata
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(server: FakeOpenAIServer, instrument) -> openai.OpenAI:
    server.response_headers["x-tokenlay-rule-action"] = "allow"
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    return openai.OpenAI(api_key=PROVIDER_KEY, base_url="https://api.mistral.ai/v1", max_retries=0)


def test_embeddings(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    client.embeddings.create(model="mistral-embed", input=["a", "b"])
    span = telemetry.only_span()
    assert span.name == "embeddings mistral-embed"
    assert span.attributes["gen_ai.operation.name"] == "embeddings"
    assert span.attributes["gen_ai.provider.name"] == "mistral_ai"
    assert span.attributes["gen_ai.usage.input_tokens"] == 10
    assert "gen_ai.usage.output_tokens" not in span.attributes


def test_legacy_completions(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hello", max_tokens=5)
    attrs = telemetry.only_span().attributes
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.max_tokens"] == 5
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (3, 1)


def test_responses_create(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    reply = client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=30)
    assert reply.output_text == "Hello from the fake server."
    assert get_tokenlay_metadata(reply).rule_action == "allow"
    span = telemetry.only_span()
    assert span.name == "chat gpt-4o-mini"
    attrs = span.attributes
    assert attrs["openai.api.type"] == "responses"
    assert attrs["gen_ai.request.max_tokens"] == 30
    assert attrs["gen_ai.response.id"] == "resp_fake_1"
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (9, 6)
    assert attrs["tokenlay.rule.action"] == "allow"


def test_responses_stream_and_helper(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    events = list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    with client.responses.stream(model="gpt-4o-mini", input="hi") as s:
        for _ in s:
            pass
        final = s.get_final_response()
    assert final.output_text == "Hello from the fake server."
    spans = telemetry.spans()
    assert len(spans) == 2
    for span in spans:
        assert span.attributes["gen_ai.usage.output_tokens"] == 6
        assert span.attributes["gen_ai.response.id"] == "resp_fake_1"
        assert "gen_ai.response.time_to_first_chunk" in span.attributes


class Answer(pydantic.BaseModel):
    text: str


def test_parse_helpers(
    client: openai.OpenAI, server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    server.stream_words = ['{"text": "ok"}']
    from tokenlay_otel.testing import Reply, chat_completion

    server.reply(Reply(body=chat_completion("gpt-4o-mini", '{"text": "ok"}')))
    parsed = client.chat.completions.parse(
        model="gpt-4o-mini", messages=MESSAGES, response_format=Answer
    )
    assert parsed.choices[0].message.parsed == Answer(text="ok")
    assert telemetry.only_span().attributes["gen_ai.usage.input_tokens"] == 12


def test_with_raw_response(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert raw.headers["x-tokenlay-rule-action"] == "allow"
    assert len(telemetry.spans()) == 1  # the body was already read: the span is done
    assert raw.parse().usage.total_tokens == 19
    assert get_tokenlay_metadata(raw).rule_action == "allow"
    raw_stream = client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, stream=True
    )
    chunks = list(raw_stream.parse())
    assert all(c.choices for c in chunks)
    spans = telemetry.spans()
    assert len(spans) == 2
    assert spans[0].attributes["gen_ai.usage.input_tokens"] == 12
    assert spans[1].attributes["gen_ai.usage.output_tokens"] == 5


def test_a_raw_response_body_is_read_once(
    client: openai.OpenAI, telemetry: SpanCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # We read the body for the span and openai read it again for parse(): now the span
    # is recorded from openai's parse(), whose model the caller's parse() gets back.
    import json

    reads = []
    loads = json.loads

    def counting_loads(text: str | bytes, **kwargs: object) -> object:
        value = loads(text, **kwargs)
        if isinstance(value, dict) and value.get("object") == "chat.completion":
            reads.append(value)
        return value

    monkeypatch.setattr(json, "loads", counting_loads)
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert raw.parse().usage.total_tokens == 19
    assert raw.parse() is raw.parse()
    assert len(reads) == 1
    assert telemetry.only_span().attributes["gen_ai.usage.output_tokens"] == 7


def test_a_dropped_raw_stream_still_records_what_the_proxy_said(
    client: openai.OpenAI, telemetry: SpanCapture
) -> None:
    import gc

    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, stream=True
    )
    raw.http_response.close()
    del raw  # never parsed nor closed: the span ends when it is collected
    gc.collect()
    assert telemetry.only_span().attributes["tokenlay.rule.action"] == "allow"


def test_with_streaming_response(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    with client.chat.completions.with_streaming_response.create(model="m", messages=MESSAGES) as r:
        assert r.parse().choices[0].message.content
    with client.chat.completions.with_streaming_response.create(
        model="m", messages=MESSAGES, stream=True
    ) as r:
        texts = [c.choices[0].delta.content for c in r.parse() if c.choices]
    assert texts[0] == "Hello"
    with client.embeddings.with_streaming_response.create(model="e", input="x") as r:
        r.read()
    spans = telemetry.spans()
    assert len(spans) == 3
    assert spans[0].attributes["gen_ai.usage.output_tokens"] == 7
    assert spans[1].attributes["gen_ai.usage.output_tokens"] == 5
    assert spans[2].attributes["tokenlay.rule.action"] == "allow"


def test_async_endpoints(server: FakeOpenAIServer, instrument, telemetry: SpanCapture) -> None:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)

    async def main() -> None:
        client = openai.AsyncOpenAI(api_key=PROVIDER_KEY, max_retries=0)
        await client.embeddings.create(model="e", input="x")
        await client.responses.create(model="gpt-4o-mini", input="hi")
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        raw.parse()
        async with client.chat.completions.with_streaming_response.create(
            model="m", messages=MESSAGES
        ) as r:
            await r.parse()
        async with client.chat.completions.with_streaming_response.create(
            model="m", messages=MESSAGES, stream=True
        ) as r:
            async for _ in await r.parse():
                pass
        async with client.responses.stream(model="gpt-4o-mini", input="hi") as s:
            async for _ in s:
                pass

    asyncio.run(main())
    spans = telemetry.spans()
    assert [s.attributes["gen_ai.operation.name"] for s in spans] == [
        "embeddings",
        "chat",
        "chat",
        "chat",
        "chat",
        "chat",
    ]
    assert all("gen_ai.usage.input_tokens" in s.attributes for s in spans)
    assert all(s.attributes["tokenlay.routed"] is True for s in spans)
