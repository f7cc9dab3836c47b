"""Which OpenAI operation a request is, told by its path, and which provider a base URL
names (``gen_ai.provider.name``, ``server.*``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ._conventions import PROVIDER, SERVER_ADDRESS, SERVER_PORT
from ._wire import USAGE_OPTION_ENDPOINTS, metered_endpoint

__all__ = ["Endpoint", "endpoint_for", "provider_attributes"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One family of OpenAI API calls, told by the request path."""

    operation: str
    api_type: str | None
    #: Whether the endpoint accepts ``stream_options.include_usage``.
    stream_usage_option: bool


_BY_PATH = {
    path: Endpoint(operation, api_type, path in USAGE_OPTION_ENDPOINTS)
    for path, operation, api_type in (
        ("chat/completions", "chat", "chat_completions"),
        ("responses", "chat", "responses"),
        ("completions", "text_completion", None),
        ("embeddings", "embeddings", None),
    )
}


@functools.lru_cache(maxsize=1024)
def endpoint_for(method: str, path: str) -> Endpoint | None:
    """The endpoint of a request, or ``None`` for calls that are not LLM operations.

    Cached: a process calls a handful of paths, on every request."""
    metered = metered_endpoint(method, path.split("?", 1)[0])
    return None if metered is None else _BY_PATH[metered]


# Host suffix -> well-known gen_ai.provider.name value.
_PROVIDERS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    (".openai.azure.com", "azure.ai.openai"),
    (".cognitiveservices.azure.com", "azure.ai.openai"),
    (".services.ai.azure.com", "azure.ai.inference"),
    ("api.mistral.ai", "mistral_ai"),
    ("api.anthropic.com", "anthropic"),
    ("api.groq.com", "groq"),
    ("api.deepseek.com", "deepseek"),
    ("api.x.ai", "x_ai"),
    ("api.cohere.com", "cohere"),
    ("api.cohere.ai", "cohere"),
    ("api.perplexity.ai", "perplexity"),
    ("generativelanguage.googleapis.com", "gcp.gemini"),
    ("aiplatform.googleapis.com", "gcp.vertex_ai"),
    (".amazonaws.com", "aws.bedrock"),
    (".ml.cloud.ibm.com", "ibm.watsonx.ai"),
)


@functools.lru_cache(maxsize=256)
def provider_attributes(base_url: str) -> Mapping[str, Any]:
    """``gen_ai.provider.name``, ``server.address`` and ``server.port`` of a provider URL.

    Cached per URL (a process talks to a handful of providers); the result is read-only.
    """
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    name = host or "unknown"
    for suffix, provider in _PROVIDERS:
        bare = suffix.lstrip(".")
        if host == bare or host.endswith("." + bare):
            name = provider
            break
    attrs: dict[str, Any] = {PROVIDER: name}
    if host:
        attrs[SERVER_ADDRESS] = host
        try:
            port = parts.port
        except ValueError:
            port = None
        attrs[SERVER_PORT] = port or (443 if parts.scheme == "https" else 80)
    return MappingProxyType(attrs)
