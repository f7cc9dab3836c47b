"""Arbitrary responses, chunks and headers never make an extractor raise."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from tokenlay_otel import _attributes as A
from tokenlay_otel._config import Settings
from tokenlay_otel._content import input_messages, output_messages, stream_output_messages
from tokenlay_otel._streams import _StreamState
from tokenlay_otel._telemetry import LLMCall, Telemetry
from tokenlay_otel._wire import parse_response_headers

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "model",
                    "choices",
                    "usage",
                    "finish_reason",
                    "index",
                    "delta",
                    "content",
                    "text",
                    "message",
                    "role",
                    "prompt_tokens",
                    "completion_tokens",
                    "input_tokens",
                    "output_tokens",
                    "cost",
                    "status",
                    "output",
                    "type",
                    "response",
                    "tool_calls",
                    "prompt_tokens_details",
                    "cached_tokens",
                    "service_tier",
                    "system_fingerprint",
                    "messages",
                    "input",
                    "prompt",
                    "instructions",
                    "stop",
                    "n",
                    "temperature",
                    "max_tokens",
                    "stream",
                    "stream_options",
                    "incomplete_details",
                    "reason",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=20,
)


def objects(value: Any) -> Any:
    """The same data as attribute objects, like parsed openai models."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: objects(v) for k, v in value.items()})
    if isinstance(value, list):
        return [objects(v) for v in value]
    return value


def call() -> LLMCall:
    telemetry = Telemetry.create(
        settings=Settings(capture_content=True), tracer_provider=TracerProvider()
    )
    endpoint = A.endpoint_for("POST", "/chat/completions")
    assert endpoint is not None
    return LLMCall(
        telemetry, endpoint, body={"model": "m"}, metadata={}, provider_base="https://x",
        routed=False,
    )  # fmt: skip


@pytest.mark.slow
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_response_extractors_never_raise(value: Any) -> None:
    for shape in (value, objects(value)):
        A.response_attributes(shape)
        A.usage_of(shape)
        output_messages(shape)
        if isinstance(value, dict):
            input_messages(value)
            A.request_attributes(value, A.endpoint_for("POST", "/responses"))  # type: ignore[arg-type]


@pytest.mark.slow
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, max_size=6))
def test_stream_accounting_never_raises(chunks: list[Any]) -> None:
    state = _StreamState(call(), hide_usage=True)
    for chunk in chunks:
        state.on_chunk(chunk)
        state.on_chunk(objects(chunk))
    stream_output_messages(state.texts or {}, state.reasons)


@given(st.text(max_size=60))
def test_provider_attributes_never_raise(url: str) -> None:
    A.provider_attributes(url)


@given(st.dictionaries(st.text(max_size=30), st.text(max_size=60), max_size=8))
def test_header_parser_never_raises(headers: dict[str, str]) -> None:
    parse_response_headers({f"x-tokenlay-{k}": v for k, v in headers.items()})
