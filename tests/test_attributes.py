"""The attribute builders as plain data: request JSON, usage, answers -> attributes.

No server, no SDK: each builder takes plain values and returns a dict, checked here
against the GenAI semantic conventions' names and values.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types import CompletionUsage

from tokenlay_otel._attributes import (
    Usage,
    endpoint_for,
    error_type,
    metadata_attribute,
    metadata_attributes,
    model_shifted,
    provider_attributes,
    request_attributes,
    response_attributes,
    tokenlay_response_attributes,
    usage_attributes,
    usage_of,
)
from tokenlay_otel._wire import TokenlayResponseMetadata

from .inprocess import httpx

CHAT = endpoint_for("POST", "/chat/completions")

# --- endpoints and providers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/chat/completions", ("chat", "chat_completions", True)),
        ("post", "https://proxy/v1/chat/completions/?x=1", ("chat", "chat_completions", True)),
        ("POST", "/responses", ("chat", "responses", False)),
        ("POST", "/completions", ("text_completion", None, True)),
        ("POST", "/v1/embeddings", ("embeddings", None, False)),
    ],
)
def test_llm_endpoints_are_told_by_their_path(
    method: str, path: str, expected: tuple[str, str | None, bool]
) -> None:
    endpoint = endpoint_for(method, path)
    assert endpoint is not None
    assert (endpoint.operation, endpoint.api_type, endpoint.stream_usage_option) == expected


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/chat/completions"), ("GET", "/models"), ("POST", "/files"),
     ("POST", "/images/generations"), ("DELETE", "/responses")],
)  # fmt: skip
def test_other_calls_are_not_llm_operations(method: str, path: str) -> None:
    assert endpoint_for(method, path) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.openai.com/v1",
         {"gen_ai.provider.name": "openai", "server.address": "api.openai.com",
          "server.port": 443}),
        ("https://my-res.openai.azure.com/openai",
         {"gen_ai.provider.name": "azure.ai.openai", "server.address": "my-res.openai.azure.com",
          "server.port": 443}),
        ("https://API.Mistral.AI:8443/v1",
         {"gen_ai.provider.name": "mistral_ai", "server.address": "api.mistral.ai",
          "server.port": 8443}),
        ("http://localhost:8000/v1",
         {"gen_ai.provider.name": "localhost", "server.address": "localhost",
          "server.port": 8000}),
        ("http://vllm.internal/v1",
         {"gen_ai.provider.name": "vllm.internal", "server.address": "vllm.internal",
          "server.port": 80}),
        ("https://h:99999/v1",  # a port urlsplit refuses: the scheme's
         {"gen_ai.provider.name": "h", "server.address": "h", "server.port": 443}),
        ("not a url", {"gen_ai.provider.name": "unknown"}),
        # A look-alike host is not the provider.
        ("https://api.openai.com.evil.example/v1",
         {"gen_ai.provider.name": "api.openai.com.evil.example",
          "server.address": "api.openai.com.evil.example", "server.port": 443}),
    ],
)  # fmt: skip
def test_provider_attributes_of_a_base_url(url: str, expected: dict[str, Any]) -> None:
    attrs = provider_attributes(url)
    assert dict(attrs) == expected
    with pytest.raises(TypeError):  # cached and shared: read-only
        attrs["server.port"] = 1  # type: ignore[index]


# --- the request ------------------------------------------------------------------------


def test_a_plain_chat_request_is_its_operation_and_model() -> None:
    assert CHAT is not None
    attrs = request_attributes({"model": "gpt-4o-mini", "messages": []}, CHAT)
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "openai.api.type": "chat_completions",
        "gen_ai.request.model": "gpt-4o-mini",
    }


def test_request_parameters_become_their_attributes() -> None:
    assert CHAT is not None
    body = {
        "model": "gpt-4o",
        "temperature": 0.2,
        "top_p": 1,
        "frequency_penalty": -0.5,
        "presence_penalty": 0.0,
        "seed": 7,
        "max_tokens": 50,
        "max_completion_tokens": 100,  # the newest spelling wins
        "n": 3,
        "stop": ["\n", "END"],
        "stream": True,
        "service_tier": "flex",
        "user": "not-an-attribute",
    }
    assert request_attributes(body, CHAT) == {
        "gen_ai.operation.name": "chat",
        "openai.api.type": "chat_completions",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 1,
        "gen_ai.request.frequency_penalty": -0.5,
        "gen_ai.request.presence_penalty": 0.0,
        "gen_ai.request.seed": 7,
        "gen_ai.request.max_tokens": 100,
        "gen_ai.request.choice.count": 3,
        "gen_ai.request.stop_sequences": ("\n", "END"),
        "gen_ai.request.stream": True,
        "openai.request.service_tier": "flex",
    }


def test_request_values_of_the_wrong_type_or_the_default_are_left_out() -> None:
    endpoint = endpoint_for("POST", "/embeddings")
    assert endpoint is not None
    body = {
        "model": ["gpt-4o"],
        "temperature": True,  # a bool is not a number here
        "top_p": "0.5",
        "seed": None,
        "max_output_tokens": "many",
        "n": 1,  # the default
        "stop": ["a", 3],
        "stream": "yes",
        "service_tier": "auto",  # the default
    }
    assert request_attributes(body, endpoint) == {"gen_ai.operation.name": "embeddings"}


def test_one_stop_string_is_a_sequence_of_one() -> None:
    assert CHAT is not None
    attrs = request_attributes({"model": "m", "stop": "END"}, CHAT)
    assert attrs["gen_ai.request.stop_sequences"] == ("END",)


def test_metadata_fields_have_their_own_names() -> None:
    assert metadata_attribute("user") == "tokenlay.user"
    assert metadata_attribute("feature") == "tokenlay.feature"
    assert metadata_attribute("team") == "tokenlay.metadata.team"
    assert metadata_attributes({"org": "acme", "region": "eu"}) == {
        "tokenlay.org": "acme",
        "tokenlay.metadata.region": "eu",
    }


# --- usage ------------------------------------------------------------------------------


def test_chat_usage_with_its_details() -> None:
    usage = {
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 20},
    }
    expected = Usage(120, 30, 100, 20)
    assert usage_of(usage) == expected
    assert usage_of(CompletionUsage.model_validate(usage)) == expected  # as openai parses it
    assert usage_attributes(expected) == {
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.usage.cache_read.input_tokens": 100,
        "gen_ai.usage.reasoning.output_tokens": 20,
    }


def test_responses_usage_and_a_proxys_cost() -> None:
    usage = {
        "input_tokens": 9,
        "output_tokens": 4,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 2},
        "cost": 0.0015,
    }
    assert usage_of(usage) == Usage(9, 4, 0, 2, 0.0015)


def test_the_responses_names_win_over_the_chat_names() -> None:
    usage = {"input_tokens": 5, "prompt_tokens": 50, "output_tokens": 6, "completion_tokens": 60}
    assert usage_of(usage) == Usage(5, 6)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": -1, "completion_tokens": 3}, Usage(None, 3)),
        ({"prompt_tokens": True, "completion_tokens": 3.0}, Usage(None, None)),
        ({"input_tokens": 10**13, "prompt_tokens": 8}, Usage(8, None)),  # the other name
        ({"prompt_tokens": 1, "cost": float("nan")}, Usage(1)),
        ({"prompt_tokens": 1, "cost": -0.5}, Usage(1)),
        ({"prompt_tokens": 1, "cost": 10**400}, Usage(1)),
        ({"prompt_tokens_details": {"cached_tokens": "9"}}, Usage()),
    ],
)
def test_each_count_out_of_bounds_is_left_out_alone(usage: Any, expected: Usage) -> None:
    assert usage_of(usage) == expected


def test_no_usage_is_none_and_no_counts_are_no_attributes() -> None:
    assert usage_of(None) is None
    assert usage_attributes(Usage()) == {}


# --- the answer -------------------------------------------------------------------------


def test_a_chat_answer() -> None:
    answer = {
        "id": "chatcmpl-1",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}, {}],
        "service_tier": "default",
        "system_fingerprint": "fp_1",
    }
    assert response_attributes(answer) == {
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.response.finish_reasons": ("stop", "length"),
        "openai.response.service_tier": "default",
        "openai.response.system_fingerprint": "fp_1",
    }


@pytest.mark.parametrize(
    ("answer", "reasons"),
    [
        ({"status": "completed", "output": [{"type": "message"}]}, ("stop",)),
        ({"status": "completed", "output": [{"type": "message"}, {"type": "function_call"}]},
         ("tool_calls",)),
        ({"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}},
         ("max_output_tokens",)),
        ({"status": "incomplete", "incomplete_details": None}, ("incomplete",)),
        ({"status": "failed"}, ("failed",)),
        ({"status": 3}, None),
        ({"choices": []}, None),
    ],
)  # fmt: skip
def test_a_responses_answer_gives_its_status_as_the_finish_reason(
    answer: dict[str, Any], reasons: tuple[str, ...] | None
) -> None:
    assert response_attributes(answer).get("gen_ai.response.finish_reasons") == reasons


def test_values_of_the_wrong_type_in_an_answer_are_left_out() -> None:
    answer = {"id": 5, "model": "", "choices": [{"finish_reason": None}], "service_tier": {}}
    assert response_attributes(answer) == {}


@pytest.mark.parametrize(
    ("requested", "used", "shifted"),
    [
        ("gpt-4o", "gpt-4o", False),
        ("gpt-4o", "gpt-4o-2024-08-06", False),  # a dated version is the same model
        ("gpt-4o-mini", "gpt-4o-mini-20240718", False),
        ("o3", "o3-0416", False),
        ("gpt-4o", "gpt-4o-mini", True),
        ("gpt-4o", "gpt-4o-2024-08-06-x", True),
        ("gpt-4o", "claude-sonnet-4-5", True),
        (None, "gpt-4o", None),
        ("gpt-4o", "", None),
    ],
)
def test_a_model_shift_is_another_model_not_another_date(
    requested: str | None, used: str | None, shifted: bool | None
) -> None:
    assert model_shifted(requested, used) is shifted


def test_what_the_proxy_said_becomes_rule_attributes() -> None:
    said = TokenlayResponseMetadata(
        rule_id="free-daily", rule_action="block", limit_exceeded=True, cost=0.5
    )
    assert tokenlay_response_attributes(said) == {
        "tokenlay.rule.id": "free-daily",
        "tokenlay.rule.action": "block",
        "tokenlay.limit_exceeded": True,
    }
    assert tokenlay_response_attributes(TokenlayResponseMetadata()) == {}


class _LocalError(Exception):
    pass


def test_error_type_is_the_status_or_the_class() -> None:
    request = httpx.Request("POST", "https://api.openai.com/v1/chat/completions")
    limited = openai.RateLimitError(
        "slow down", response=httpx.Response(429, request=request), body=None
    )
    assert error_type(limited) == "429"
    assert error_type(ValueError("x")) == "ValueError"
    assert error_type(openai.APIConnectionError(request=request)) == "openai.APIConnectionError"
    assert error_type(_LocalError()) == "tests._LocalError"
    flagged = _LocalError()
    flagged.status_code = True  # type: ignore[attr-defined]  # not a status
    assert error_type(flagged) == "tests._LocalError"
