"""What the per-call shortcuts must not change: caches follow the client, streams
behave as openai's, the guard keeps its rules, headers parse as before."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import openai
import pytest

from tokenlay_otel import metadata
from tokenlay_otel._safety import ENV_RAISE_INTERNAL, guard
from tokenlay_otel._wire import parse_response_headers

from .conftest import SpanCapture
from .inprocess import httpx, sync_client

MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_changed_base_url_and_new_clients_are_seen(instrument, telemetry: SpanCapture) -> None:
    instrument()
    client = sync_client()
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    client.base_url = "https://api.mistral.ai/v1"  # type: ignore[assignment]
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    other = sync_client().with_options(default_headers={"x-tokenlay-feature": "search"})
    other.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    first, second, third = telemetry.spans()
    assert first.attributes["server.address"] == "api.openai.com"
    assert second.attributes["server.address"] == "api.mistral.ai"
    assert second.attributes["gen_ai.provider.name"] == "mistral_ai"
    assert "tokenlay.metadata.feature" not in first.attributes
    assert third.attributes["tokenlay.feature"] == "search"


def test_scoped_metadata_that_removes_a_field(instrument, telemetry: SpanCapture) -> None:
    instrument()
    client = sync_client().with_options(default_headers={"x-tokenlay-org": "from-client"})
    with metadata(user="u1", org=None):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with metadata(user="u2"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    first, second = telemetry.spans()
    assert first.attributes["tokenlay.user"] == "u1"
    assert "tokenlay.org" not in first.attributes
    assert second.attributes["tokenlay.org"] == "from-client"


def _stream(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)


def test_next_then_a_loop_continue_one_stream(instrument, telemetry: SpanCapture) -> None:
    instrument()
    client = sync_client()
    stream = _stream(client)
    first = next(stream)
    rest = list(stream)
    # The in-process server sends a, b, c, a finish chunk, then the usage chunk we asked
    # for (hidden from the caller).
    assert [c.choices[0].delta.content for c in [first, *rest]] == ["a", "b", "c", None]
    span = telemetry.spans()[0]
    assert span.attributes["gen_ai.usage.output_tokens"] == 3 + len("hi") % 7
    assert span.attributes["gen_ai.response.finish_reasons"] == ("stop",)


def test_a_loop_left_early_ends_the_span_when_dropped(instrument, telemetry: SpanCapture) -> None:
    instrument()
    stream = _stream(sync_client())
    for _ in stream:
        break
    assert telemetry.spans() == []  # the caller still holds the stream
    del stream
    (span,) = telemetry.spans()  # no gc.collect(): reference counting ends it
    assert span.attributes["gen_ai.operation.name"] == "chat"


def test_a_second_loop_after_the_end_yields_nothing(instrument, telemetry: SpanCapture) -> None:
    instrument()
    stream = _stream(sync_client())
    assert len(list(stream)) == 4
    assert list(stream) == []
    assert len(telemetry.spans()) == 1


def test_guard_keeps_its_rules(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.setenv(ENV_RAISE_INTERNAL, "0")
    with caplog.at_level(logging.DEBUG, logger="tokenlay_otel"), guard("testing"):
        raise ValueError("ours")
    assert "internal error in testing" in caplog.text
    with pytest.raises(KeyboardInterrupt), guard("testing"):
        raise KeyboardInterrupt
    monkeypatch.setenv(ENV_RAISE_INTERNAL, "1")
    with pytest.raises(ValueError, match="ours"), guard("testing"):
        raise ValueError("ours")


def test_raw_header_scan_matches_the_mapping_path() -> None:
    pairs = {
        "Content-Type": "application/json",
        "X-Tokenlay-Cost": "0.25",
        "x-tokenlay-rule-action": "WARN",
        "X-TOKENLAY-WARNINGS": '["80% of org budget"]',
        "x-tokenlay-model": "gpt-4o-mini",
        "x-request-id": "req_1",
    }
    from_httpx = parse_response_headers(httpx.Headers(pairs))
    assert from_httpx is not None
    assert from_httpx == parse_response_headers(dict(pairs))
    assert from_httpx.cost == 0.25
    assert from_httpx.rule_action == "warn"
    assert from_httpx.warnings == ("80% of org budget",)
    assert parse_response_headers(httpx.Headers({"content-type": "x"})) is None


class _Float(float):  # what numpy.float64 is to Python
    pass


def test_numeric_subclasses_still_count() -> None:
    from tokenlay_otel._attributes import endpoint_for, request_attributes, usage_of

    endpoint = endpoint_for("POST", "/chat/completions")
    assert endpoint is not None
    attrs = request_attributes({"model": "m", "temperature": _Float(0.5), "top_p": True}, endpoint)
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert "gen_ai.request.top_p" not in attrs  # a bool is not a number here
    usage = usage_of({"prompt_tokens": 3, "completion_tokens": True})
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (3, None)


class _TextRaw(dict[str, str]):  # a mapping whose `raw` is not httpx's bytes pairs
    raw: ClassVar[list[tuple[str, str]]] = [("x-tokenlay-cost", "1")]


def test_a_foreign_raw_attribute_falls_back_to_items() -> None:
    meta = parse_response_headers(_TextRaw({"x-tokenlay-cost": "0.5"}))
    assert meta is not None
    assert meta.cost == 0.5


def test_attribute_sets_stay_right_past_their_cache(
    instrument, telemetry: SpanCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenlay_otel import _metrics

    monkeypatch.setattr(_metrics, "_SETS_LIMIT", 3)  # cleared every third kind of call
    instrument()
    client = sync_client()
    for _ in range(2):
        for user in ("u1", "u2", "u3", "u4"):
            for model in ("gpt-4o-mini", "gpt-4o"):
                with metadata(user=user, org=f"org-{user}"):
                    client.chat.completions.create(model=model, messages=MESSAGES)
    requests = telemetry.metrics()["tokenlay.client.requests"][1]
    seen = {
        (p.attributes["tokenlay.user"], p.attributes["tokenlay.org"],
         p.attributes["gen_ai.request.model"]): p.value
        for p in requests
    }  # fmt: skip
    assert seen == {
        (user, f"org-{user}", model): 2
        for user in ("u1", "u2", "u3", "u4")
        for model in ("gpt-4o-mini", "gpt-4o")
    }
    tokens = telemetry.metrics()["gen_ai.client.token.usage"][1]
    inputs = [p for p in tokens if p.attributes["gen_ai.token.type"] == "input"]
    assert len(inputs) == 8
    assert all(p.sum == 2 * (10 + len("hi")) and p.count == 2 for p in inputs)


def test_httpx_headers_with_our_prefix_inside_another_name() -> None:
    headers = httpx.Headers({"x-forwarded-x-tokenlay-cost": "9", "X-Tokenlay-Cost": "0.5"})
    meta = parse_response_headers(headers)
    assert meta is not None
    assert meta.cost == 0.5
    assert parse_response_headers(httpx.Headers({"x-forwarded-x-tokenlay-cost": "9"})) is None


def test_proxy_headers_read_the_same_from_httpx_and_from_a_dict() -> None:
    sent = {
        "Content-Type": "application/json",
        "X-Tokenlay-Input-Tokens": " 12 ",
        "x-tokenlay-output-tokens": "7.0",
        "x-tokenlay-tokens-used": "\u0661\u0669",  # Arabic-Indic 19: int() reads it
        "x-tokenlay-duration": "-3",
        "x-tokenlay-rule-action": "Allow",
        "x-tokenlay-some-future-field": "1",
    }
    from_httpx = parse_response_headers(httpx.Headers([(k, v.encode()) for k, v in sent.items()]))
    assert from_httpx == parse_response_headers(sent)
    assert from_httpx is not None
    assert (from_httpx.input_tokens, from_httpx.output_tokens) == (12, 7)
    assert (from_httpx.tokens_used, from_httpx.duration_ms) == (19, None)
    assert from_httpx.rule_action == "allow"
    # A header of ours we do not know yet still says the proxy answered.
    only_unknown = {"x-tokenlay-some-future-field": "1"}
    assert parse_response_headers(httpx.Headers(only_unknown)) == parse_response_headers(
        only_unknown
    )
    assert parse_response_headers(only_unknown) is not None
