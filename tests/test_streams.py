from __future__ import annotations

import asyncio
import gc
import logging

import openai
import pytest

from tokenlay_otel import get_tokenlay_metadata
from tokenlay_otel.testing import FakeOpenAIServer, Reply

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

MESSAGES = [{"role": "user", "content": "hi"}]
WORDS = ["Hello", " from", " the", " fake", " server."]


@pytest.fixture
def client(server: FakeOpenAIServer, instrument) -> openai.OpenAI:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    return openai.OpenAI(api_key=PROVIDER_KEY, base_url="https://api.openai.com/v1", max_retries=0)


@pytest.fixture(autouse=True)
def _no_double_end(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="opentelemetry.sdk.trace"):
        yield
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]


def stream(client: openai.OpenAI, **kwargs: object):
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, **kwargs
    )


def test_exhausted_stream(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    s = stream(client)
    assert telemetry.spans() == []  # still open while the caller reads
    chunks = list(s)
    assert [c.choices[0].delta.content for c in chunks[:-1]] == WORDS
    assert all(c.choices for c in chunks)  # our usage chunk is hidden
    span = telemetry.only_span()
    attrs = span.attributes
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.usage.input_tokens"] == 12
    assert attrs["gen_ai.usage.output_tokens"] == 5
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.response.id"] == "chatcmpl-fake-s"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini"
    duration = (span.end_time - span.start_time) / 1e9
    assert 0 < attrs["gen_ai.response.time_to_first_chunk"] < duration
    meta = get_tokenlay_metadata(s)
    assert (meta.input_tokens, meta.output_tokens, meta.tokens_used) == (12, 5, 17)


def test_caller_asked_for_usage_sees_the_usage_chunk(
    client: openai.OpenAI, server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    chunks = list(stream(client, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == 17
    assert telemetry.only_span().attributes["gen_ai.usage.output_tokens"] == 5


def test_caller_declined_usage_is_respected(
    client: openai.OpenAI, server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    list(stream(client, stream_options={"include_usage": False}))
    assert server.requests[-1].json()["stream_options"] == {"include_usage": False}
    assert "gen_ai.usage.input_tokens" not in telemetry.only_span().attributes


def test_close_early(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    s = stream(client)
    next(iter(s))
    s.close()
    s.close()
    span = telemetry.only_span()
    assert span.status.is_ok
    assert "gen_ai.response.time_to_first_chunk" in span.attributes


def test_with_block_and_break(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    with stream(client) as s:
        for _ in s:
            break
    assert len(telemetry.spans()) == 1


def test_exception_in_the_callers_loop(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    with pytest.raises(KeyError), stream(client) as s:
        for _ in s:
            raise KeyError("caller bug")
    assert len(telemetry.spans()) == 1


@pytest.mark.slow
def test_break_and_drop_the_reference(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    s = stream(client)
    for _ in s:
        break
    assert telemetry.spans() == []
    del s
    gc.collect()
    assert len(telemetry.spans()) == 1


def test_never_iterated_and_dropped(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    stream(client)
    gc.collect()
    assert len(telemetry.spans()) == 1


def test_stream_surface_is_kept(client: openai.OpenAI) -> None:
    s = stream(client)
    assert isinstance(s, openai.Stream)
    assert s.response.status_code == 200
    assert s.response.headers["content-type"] == "text/event-stream"
    s.close()


def test_chat_stream_helper(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    with client.chat.completions.stream(model="gpt-4o-mini", messages=MESSAGES) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.choices[0].message.content == "".join(WORDS)
    assert telemetry.only_span().attributes["gen_ai.usage.output_tokens"] == 5


def test_legacy_completions_stream(client: openai.OpenAI, telemetry: SpanCapture) -> None:
    list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", stream=True))
    span = telemetry.only_span()
    assert span.name == "text_completion gpt-3.5-turbo-instruct"


def test_async_stream_paths(server: FakeOpenAIServer, instrument, telemetry: SpanCapture) -> None:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)

    async def main() -> None:
        client = openai.AsyncOpenAI(api_key=PROVIDER_KEY, max_retries=0)
        s = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = [c async for c in s]
        assert all(c.choices for c in chunks)
        s2 = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async with s2:
            async for _ in s2:
                break
        s3 = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        await s3.close()

    asyncio.run(main())
    spans = telemetry.spans()
    assert len(spans) == 3
    assert spans[0].attributes["gen_ai.usage.output_tokens"] == 5


@pytest.mark.slow
def test_many_abandoned_streams_end_exactly_once(
    client: openai.OpenAI, telemetry: SpanCapture
) -> None:
    for i in range(60):
        s = stream(client)
        it = iter(s)
        for _ in range(i % 4):
            next(it)
        if i % 3 == 0:
            s.close()
        del s, it
    gc.collect()
    assert len(telemetry.spans()) == 60


def _chunk(delta: dict, index: int = 0, finish: str | None = None, **extra: object) -> dict:  # type: ignore[type-arg]
    return {
        "id": "chatcmpl-rec",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def test_tool_call_stream(
    client: openai.OpenAI, server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    call = {"index": 0, "id": "call_1", "type": "function"}
    server.reply(
        Reply(
            events=[
                _chunk(
                    {
                        "role": "assistant",
                        "tool_calls": [{**call, "function": {"name": "f", "arguments": ""}}],
                    }
                ),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}),
                _chunk({}, finish="tool_calls"),
                {
                    **_chunk({}),
                    "choices": [],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
                },
            ]
        )
    )
    chunks = list(stream(client, tools=[{"type": "function", "function": {"name": "f"}}]))
    assert len(chunks) == 3
    attrs = telemetry.only_span().attributes
    assert attrs["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (30, 9)
    assert attrs["tokenlay.model_shifted"] is False


def test_multiple_choices_stream(
    client: openai.OpenAI, server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    server.reply(
        Reply(
            events=[
                _chunk({"role": "assistant", "content": "a"}, 0),
                _chunk({"role": "assistant", "content": "b"}, 1),
                _chunk({}, 1, finish="length"),
                _chunk({}, 0, finish="stop"),
            ]
        )
    )
    list(stream(client, n=2))
    attrs = telemetry.only_span().attributes
    assert attrs["gen_ai.response.finish_reasons"] == ("stop", "length")
    assert attrs["gen_ai.request.choice.count"] == 2


def _cut_after_two_chunks(server: FakeOpenAIServer) -> None:
    server.reply(
        Reply(
            events=[_chunk({"role": "assistant", "content": "a"}) for _ in range(5)],
            disconnect_after=2,
        )
    )


def _assert_cut(telemetry: SpanCapture, received: list, error: BaseException) -> None:
    assert len(received) == 2
    span = telemetry.only_span()
    assert span.status.status_code.name == "ERROR"
    # httpx or httpx2, by openai version
    expected = type(error).__module__.split(".")[0] + "." + type(error).__qualname__
    assert span.attributes["error.type"] == expected


def test_stream_cut_by_the_server(
    client: openai.OpenAI, server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    _cut_after_two_chunks(server)
    received = []
    with pytest.raises(Exception) as info:  # noqa: PT011  # httpx or httpx2, by openai version
        for chunk in stream(client):
            received.append(chunk)
    _assert_cut(telemetry, received, info.value)


# The async stream proxy: the exits the sync tests above cover must end its span
# exactly once too.


@pytest.fixture
def aclient(server: FakeOpenAIServer, instrument) -> openai.AsyncOpenAI:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    return openai.AsyncOpenAI(
        api_key=PROVIDER_KEY, base_url="https://api.openai.com/v1", max_retries=0
    )


async def astream(client: openai.AsyncOpenAI):  # type: ignore[no-untyped-def]
    return await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)


def test_async_anext_then_loop_sees_each_chunk_once(
    aclient: openai.AsyncOpenAI, telemetry: SpanCapture
) -> None:
    async def main() -> list[str]:
        s = await astream(aclient)
        first = await s.__anext__()
        rest = [c async for c in s]
        assert [c async for c in s] == []  # a second loop continues where it stopped
        return [c.choices[0].delta.content or "" for c in (first, *rest)]

    texts = asyncio.run(main())
    assert "".join(texts) == "".join(WORDS)
    span = telemetry.only_span()
    assert span.attributes["gen_ai.usage.output_tokens"] == 5


def test_async_exception_in_the_callers_loop(
    aclient: openai.AsyncOpenAI, telemetry: SpanCapture
) -> None:
    async def main() -> None:
        s = await astream(aclient)
        with pytest.raises(KeyError, match="caller bug"):
            async for _ in s:
                raise KeyError("caller bug")
        assert telemetry.spans() == []  # the caller still holds the stream
        del s
        gc.collect()
        span = telemetry.only_span()
        assert span.status.is_ok  # the caller's bug is not the LLM call's error

    asyncio.run(main())
    assert len(telemetry.spans()) == 1


@pytest.mark.slow
def test_async_break_and_drop_the_reference(
    aclient: openai.AsyncOpenAI, telemetry: SpanCapture
) -> None:
    async def main() -> None:
        s = await astream(aclient)
        async for _ in s:
            break
        assert telemetry.spans() == []
        del s
        gc.collect()
        await asyncio.sleep(0)  # the loop closes the abandoned generator
        gc.collect()
        assert len(telemetry.spans()) == 1

    asyncio.run(main())
    assert len(telemetry.spans()) == 1


def test_async_stream_cut_by_the_server(
    aclient: openai.AsyncOpenAI, server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    _cut_after_two_chunks(server)
    received = []

    async def main() -> None:
        async for chunk in await astream(aclient):
            received.append(chunk)

    with pytest.raises(Exception) as info:  # noqa: PT011  # httpx or httpx2, by openai version
        asyncio.run(main())
    _assert_cut(telemetry, received, info.value)
