"""The telemetry names we spell ourselves agree with the semantic conventions package
wherever the installed version defines them."""

from __future__ import annotations

import pytest
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes, openai_attributes

from tokenlay_otel import _conventions as C

# Ours -> the package's constant (present in newer versions than our lower bound).
SPELLED = {
    "PROVIDER": (gen_ai_attributes, "GEN_AI_PROVIDER_NAME"),
    "CHOICE_COUNT": (gen_ai_attributes, "GEN_AI_REQUEST_CHOICE_COUNT"),
    "STREAM": (gen_ai_attributes, "GEN_AI_REQUEST_STREAM"),
    "CACHED_INPUT_TOKENS": (gen_ai_attributes, "GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS"),
    "REASONING_TOKENS": (gen_ai_attributes, "GEN_AI_USAGE_REASONING_OUTPUT_TOKENS"),
    "TIME_TO_FIRST_CHUNK": (gen_ai_attributes, "GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK"),
    "INPUT_MESSAGES": (gen_ai_attributes, "GEN_AI_INPUT_MESSAGES"),
    "OUTPUT_MESSAGES": (gen_ai_attributes, "GEN_AI_OUTPUT_MESSAGES"),
    "API_TYPE": (openai_attributes, "OPENAI_API_TYPE"),
    "REQUEST_SERVICE_TIER": (openai_attributes, "OPENAI_REQUEST_SERVICE_TIER"),
    "RESPONSE_SERVICE_TIER": (openai_attributes, "OPENAI_RESPONSE_SERVICE_TIER"),
    "SYSTEM_FINGERPRINT": (openai_attributes, "OPENAI_RESPONSE_SYSTEM_FINGERPRINT"),
}


@pytest.mark.parametrize("ours", sorted(SPELLED))
def test_names_we_spell_match_the_conventions_package(ours: str) -> None:
    module, theirs = SPELLED[ours]
    if not hasattr(module, theirs):
        pytest.skip(f"this opentelemetry-semantic-conventions has no {theirs}")
    assert getattr(C, ours) == getattr(module, theirs)


def test_every_name_is_exported_once() -> None:
    names = [getattr(C, name) for name in C.__all__ if name.isupper() and "BUCKETS" not in name]
    assert len(names) == len(set(names)), "two constants name the same attribute"
