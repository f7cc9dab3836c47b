from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tokenlay_otel.testing import FakeOpenAIServer

# Our own internal errors fail tests instead of being logged and swallowed.
os.environ["TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS"] = "1"

PROVIDER_KEY = "sk-provider-SECRET-0123456789"
TOKENLAY_KEY = "tl-SECRET-abcdef9876543210"

_OUR_ENV = (
    "PROVIDER_API_KEY",
    "PROVIDER_API_BASE",
    "TOKENLAY_KEY",
    "TOKENLAY_BASE_URL",
    "TOKENLAY_METADATA",
    "TOKENLAY_ROUTE",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _OUR_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv
