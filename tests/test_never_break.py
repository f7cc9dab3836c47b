"""An internal failure in any of our hooks never changes what the caller sees."""

from __future__ import annotations

import logging

import openai
import pytest

from tokenlay_otel import _attributes, _outgoing, _streams, _telemetry, _wrappers, metadata
from tokenlay_otel._wire import request as wire_request
from tokenlay_otel.testing import FakeOpenAIServer, Reply

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

MESSAGES = [{"role": "user", "content": "hi"}]


def boom(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected tokenlay_otel bug")


HOOKS = [
    (_telemetry.A, "request_attributes"),  # span start
    (_telemetry.A, "response_attributes"),  # response extraction
    (_telemetry.A, "usage_of"),  # usage extraction, non-stream
    (_streams.A, "usage_of"),  # stream accounting
    (_telemetry, "parse_response_headers"),  # proxy header parsing
    (_outgoing, "build_request_headers"),  # routing header building
    (_wrappers, "split_caller_headers"),  # caller header split
    (_outgoing, "current_metadata"),  # attribution
    (_streams, "stream_output_messages"),
    (_telemetry.LLMCall, "trace_headers"),
    (_streams._StreamState, "on_end"),
    (_attributes, "model_shifted"),
    (wire_request, "encode_value"),
]


@pytest.fixture
def lenient(monkeypatch: pytest.MonkeyPatch) -> None:
    # Production mode: internal errors are logged, not raised.
    monkeypatch.setenv("TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS", "0")


def run_calls(client: openai.OpenAI) -> list[object]:
    with metadata(user="Zoë", org="o1"):
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    chunks = list(
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    )
    embedding = client.embeddings.create(model="e", input="x")
    return [
        reply.choices[0].message.content,
        reply.usage.total_tokens,
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        embedding.data[0].embedding,
    ]


@pytest.mark.parametrize(("owner", "name"), HOOKS, ids=[f"{o.__name__}.{n}" for o, n in HOOKS])
def test_a_failing_hook_leaves_the_result_unchanged(
    server: FakeOpenAIServer,
    instrument,
    telemetry: SpanCapture,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    lenient: None,
    owner: object,
    name: str,
) -> None:
    instrument(
        TOKENLAY_KEY=TOKENLAY_KEY,
        TOKENLAY_BASE_URL=server.url,
        OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true",
    )
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/direct", max_retries=0)
    expected = run_calls(client)

    monkeypatch.setattr(owner, name, boom)
    with caplog.at_level(logging.DEBUG, logger="tokenlay_otel"):
        assert run_calls(client) == expected
        with pytest.raises(openai.NotFoundError) as info:
            server.reply(Reply(status=404, body={"error": {"message": "nope"}}))
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 404
    logged = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert logged, "our failure must be logged"
    assert all("injected tokenlay_otel bug" in str(r.exc_info[1]) for r in logged)


def test_under_tests_internal_errors_are_raised(
    server: FakeOpenAIServer, instrument, monkeypatch: pytest.MonkeyPatch
) -> None:
    instrument()
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/v1", max_retries=0)
    monkeypatch.setattr(_telemetry.A, "response_attributes", boom)
    with pytest.raises(RuntimeError, match="injected"):
        client.chat.completions.create(model="m", messages=MESSAGES)
