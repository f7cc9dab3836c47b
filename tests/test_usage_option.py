"""When a direct (unrouted) stream may get ``stream_options.include_usage`` added."""

from __future__ import annotations

import pytest
from openai import NOT_GIVEN, Omit

from tokenlay_otel._attributes import PROVIDER, provider_attributes
from tokenlay_otel._usage_option import api_version_of, usage_option_accepted


@pytest.mark.parametrize(
    ("base_url", "accepted"),
    [
        ("https://api.openai.com/v1", True),
        ("https://us.api.openai.com/v1", True),  # OpenAI's data-residency host
        ("http://127.0.0.1:8000/v1", False),
        ("http://localhost:11434/v1", False),  # e.g. Ollama
        ("https://api.mistral.ai/v1", False),
        ("https://api.groq.com/openai/v1", False),
        ("https://openrouter.ai/api/v1", False),
        ("https://myres.services.ai.azure.com/models", False),  # Azure AI Inference
        ("https://api.openai.com.example.net/v1", False),  # a look-alike host
    ],
)
def test_only_openais_own_api_without_a_version(base_url: str, accepted: bool) -> None:
    provider = provider_attributes(base_url)[PROVIDER]
    assert usage_option_accepted(provider, None) is accepted


@pytest.mark.parametrize(
    ("api_version", "accepted"),
    [
        ("2024-10-21", True),  # the first GA that documents stream_options
        ("2025-04-01", True),  # a later GA
        ("2024-09-01-preview", True),
        ("2025-04-01-preview", True),
        ("2024-06-01", False),  # GA before it: 400 Unrecognized request argument
        ("2024-02-01", False),
        ("2023-05-15", False),
        ("2024-10-01-preview", True),
        ("2024-08-01-preview", False),
        ("2024-05-01-preview", False),
        (None, False),  # no api-version: not known to accept it
        ("", False),
        ("latest", False),
        ("preview", False),
        ("v1", False),
        ("2024-10-21-alpha", False),
        ("2024-10-21 ", False),
        ("2024-13-01", False),  # not a date
        ("2024-02-30-preview", False),
        ("10/21/2024", False),
    ],
)
def test_azure_by_api_version(api_version: str | None, accepted: bool) -> None:
    for base_url in (
        "https://myres.openai.azure.com/openai",
        "https://myres.cognitiveservices.azure.com/openai",
    ):
        provider = provider_attributes(base_url)[PROVIDER]
        assert usage_option_accepted(provider, api_version) is accepted


def test_the_version_does_not_make_another_provider_accept_it() -> None:
    assert usage_option_accepted("mistral_ai", "2024-10-21") is False
    assert usage_option_accepted("127.0.0.1", "2024-10-21") is False
    assert usage_option_accepted("", "2024-10-21") is False


@pytest.mark.parametrize(
    ("default_query", "params", "expected"),
    [
        ({"api-version": "2024-10-21"}, {}, "2024-10-21"),
        ({"api-version": "2024-06-01"}, {"api-version": "2024-10-21"}, "2024-10-21"),
        ({"api-version": "2024-10-21"}, {"api-version": "2024-06-01"}, "2024-06-01"),
        ({}, {"api-version": "2024-09-01-preview"}, "2024-09-01-preview"),
        ({"api-version": "2024-10-21"}, {"api-version": Omit()}, None),  # removed
        ({"api-version": "2024-10-21"}, NOT_GIVEN, "2024-10-21"),
        ({"api-version": 20241021}, {}, None),
        ({"other": "x"}, {"other": "y"}, None),
        (None, None, None),
        ({}, {}, None),
    ],
)
def test_api_version_of_a_request(default_query: object, params: object, expected: object) -> None:
    assert api_version_of(default_query, params) == expected
