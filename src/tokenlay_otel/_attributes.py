"""Request and response data -> span attributes (OpenTelemetry GenAI conventions).

Pure: functions take plain values (request JSON, parsed responses, headers) and return
dicts; they never see a span.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from ._wire import (
    MAX_REPORTED_COST_USD,
    MAX_REPORTED_TOKENS,
    STANDARD_FIELDS,
    USAGE_OPTION_ENDPOINTS,
    TokenlayResponseMetadata,
    encodable,
    metered_endpoint,
)

__all__ = [
    "Endpoint",
    "Usage",
    "endpoint_for",
    "error_type",
    "metadata_attribute",
    "metadata_attributes",
    "provider_attributes",
    "request_attributes",
    "response_attributes",
    "tokenlay_response_attributes",
    "usage_attributes",
    "usage_of",
]

# Attribute names (GenAI semantic conventions, released v1.37+ names).
OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
RESPONSE_ID = "gen_ai.response.id"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
CACHED_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
API_TYPE = "openai.api.type"
REQUEST_SERVICE_TIER = "openai.request.service_tier"
RESPONSE_SERVICE_TIER = "openai.response.service_tier"
SYSTEM_FINGERPRINT = "openai.response.system_fingerprint"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
ROUTED = "tokenlay.routed"
BYPASSED = "tokenlay.proxy.bypassed"
#: The Tokenlay base URL a call failed to reach (set on connection errors only).
PROXY_URL = "tokenlay.proxy.url"
RULE_ID = "tokenlay.rule.id"
RULE_ACTION = "tokenlay.rule.action"
LIMIT_EXCEEDED = "tokenlay.limit_exceeded"
MODEL_SHIFTED = "tokenlay.model_shifted"
COST = "tokenlay.cost.usd"
COST_SOURCE = "tokenlay.cost.source"
WARNING_EVENT = "tokenlay.warning"
WARNING_MESSAGE = "tokenlay.warning.message"


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


def _number(value: Any) -> float | int | None:
    kind = type(value)
    if kind is int or kind is float:  # the common case, without isinstance
        return value  # type: ignore[no-any-return]
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value  # a subclass, e.g. numpy.float64


# Request body key -> attribute, for plain numeric parameters.
_REQUEST_NUMBERS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}
# The first of these the body has is the token cap (newest spelling first).
_MAX_TOKENS_KEYS = ("max_completion_tokens", "max_output_tokens", "max_tokens")
_OTHER_REQUEST_KEYS = frozenset((*_MAX_TOKENS_KEYS, "model", "n", "stop", "stream", "service_tier"))


def request_attributes(body: Mapping[str, Any], endpoint: Endpoint) -> dict[str, Any]:
    """Attributes known from the request body, before the call is made."""
    attrs: dict[str, Any] = {OPERATION: endpoint.operation}
    if endpoint.api_type:
        attrs[API_TYPE] = endpoint.api_type
    # One pass over the (short) body rather than a lookup per known parameter.
    others: dict[str, Any] | None = None
    for key, value in body.items():
        name = _REQUEST_NUMBERS.get(key)
        if name is not None:
            if _number(value) is not None:
                attrs[name] = value
        elif key in _OTHER_REQUEST_KEYS:
            if others is None:
                others = {}
            others[key] = value
    if others is not None:
        _other_request_attributes(others, attrs)
    return attrs


def _other_request_attributes(others: dict[str, Any], attrs: dict[str, Any]) -> None:
    model = others.get("model")
    if isinstance(model, str):
        attrs[REQUEST_MODEL] = model
    if len(others) == 1 and model is not None:
        return  # the common case: no other parameter given
    for key in _MAX_TOKENS_KEYS:
        value = _number(others.get(key))
        if value is not None:
            attrs["gen_ai.request.max_tokens"] = value
            break
    n = _number(others.get("n"))
    if n is not None and n != 1:
        attrs["gen_ai.request.choice.count"] = n
    stop = others.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = tuple(stop)
    if others.get("stream") is True:
        attrs["gen_ai.request.stream"] = True
    tier = others.get("service_tier")
    if isinstance(tier, str) and tier != "auto":
        attrs[REQUEST_SERVICE_TIER] = tier


@functools.lru_cache(maxsize=1024)
def metadata_attribute(field: str) -> str:
    """``tokenlay.user`` ... for standard fields, ``tokenlay.metadata.<name>`` otherwise."""
    return f"tokenlay.{field}" if field in STANDARD_FIELDS else f"tokenlay.metadata.{field}"


def metadata_attributes(metadata: Mapping[str, str]) -> dict[str, str]:
    return {metadata_attribute(k): v for k, v in metadata.items()}


# type -> whether it is a pydantic model; a process sees a few dozen types.
_MODEL_TYPES: dict[type, bool] = {}


def fields_of(obj: Any, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """The fields of a parsed openai model or a plain dict, as one mapping to read.

    A pydantic model keeps its fields in ``__dict__`` and unknown ones (``usage.cost``
    from a proxy) in ``__pydantic_extra__``; reading them there avoids ``getattr``,
    which costs an exception per missing field. Any other object gives ``keys`` read
    as attributes.
    """
    kind = type(obj)
    if kind is dict:
        return obj  # type: ignore[no-any-return]
    model = _MODEL_TYPES.get(kind)
    if model is None:
        model = hasattr(kind, "__pydantic_fields__") and not issubclass(kind, Mapping)
        if len(_MODEL_TYPES) < 1024:
            _MODEL_TYPES[kind] = model
    if model:
        extra = obj.__pydantic_extra__
        return {**extra, **obj.__dict__} if extra else obj.__dict__  # type: ignore[no-any-return]
    if isinstance(obj, Mapping):
        return obj
    return {key: getattr(obj, key, None) for key in keys}


def _get(obj: Any, key: str) -> Any:
    """One field of a parsed openai model or of a plain dict (raw JSON, stream events)."""
    return None if obj is None else fields_of(obj, (key,)).get(key)


class Usage(NamedTuple):
    """Token counts of one call, whichever API shape they came in."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    #: ``usage.cost`` (USD) when a proxy reported it in the body (OpenRouter convention).
    cost: float | None = None


def _int(value: Any) -> int | None:
    """A token count as reported: an int from 0 to MAX_REPORTED_TOKENS, else ``None``."""
    # The common case (an int) first, without isinstance.
    if type(value) is not int and (
        value is None or isinstance(value, bool) or not isinstance(value, int)
    ):
        return None
    return value if 0 <= value <= MAX_REPORTED_TOKENS else None


_USAGE_FIELDS = (
    "input_tokens",
    "prompt_tokens",
    "output_tokens",
    "completion_tokens",
    "input_tokens_details",
    "prompt_tokens_details",
    "output_tokens_details",
    "completion_tokens_details",
    "cost",
)


def usage_of(usage: Any) -> Usage | None:
    """Normalise chat/completions (``prompt_tokens``) and responses (``input_tokens``).

    Each count and the cost is taken on its own: one that is negative, not finite, a
    bool or past ``MAX_REPORTED_TOKENS``/``MAX_REPORTED_COST_USD`` is left out.
    """
    if usage is None:
        return None
    fields = fields_of(usage, _USAGE_FIELDS)
    input_tokens = _int(fields.get("input_tokens"))
    if input_tokens is None:
        input_tokens = _int(fields.get("prompt_tokens"))
    output_tokens = _int(fields.get("output_tokens"))
    if output_tokens is None:
        output_tokens = _int(fields.get("completion_tokens"))
    in_details = fields.get("input_tokens_details") or fields.get("prompt_tokens_details")
    out_details = fields.get("output_tokens_details") or fields.get("completion_tokens_details")
    cost_value = _number(fields.get("cost"))
    return Usage(
        input_tokens,
        output_tokens,
        _int(_get(in_details, "cached_tokens")) if in_details else None,
        _int(_get(out_details, "reasoning_tokens")) if out_details else None,
        # NaN fails the range check; it is checked before float(), which refuses a huge int.
        float(cost_value)
        if cost_value is not None and 0 <= cost_value <= MAX_REPORTED_COST_USD
        else None,
    )


def _present(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {name: value for name, value in pairs if value is not None}


def usage_attributes(usage: Usage) -> dict[str, Any]:
    return _present(
        (
            (INPUT_TOKENS, usage.input_tokens),
            (OUTPUT_TOKENS, usage.output_tokens),
            (CACHED_INPUT_TOKENS, usage.cached_input_tokens),
            (REASONING_TOKENS, usage.reasoning_tokens),
        )
    )


def _finish_reasons(response: Mapping[str, Any]) -> tuple[str, ...] | None:
    choices = response.get("choices")
    if isinstance(choices, list):
        reasons = [_get(c, "finish_reason") for c in choices[:_MAX_REASONS]]
        found = tuple(r for r in map(short_text, reasons) if r is not None)
        return found or None
    status = response.get("status")
    if not isinstance(status, str):
        return None
    # Responses API: a status, not per-choice reasons.
    if status == "incomplete":
        reason = _get(response.get("incomplete_details"), "reason")
        return (reason if isinstance(reason, str) else "incomplete",)
    if status == "completed":
        output = response.get("output")
        if isinstance(output, list) and any(_get(o, "type") == "function_call" for o in output):
            return ("tool_calls",)
        return ("stop",)
    return (status,)


RESPONSE_FIELDS = (
    "id",
    "model",
    "choices",
    "status",
    "incomplete_details",
    "output",
    "service_tier",
    "system_fingerprint",
    "usage",
)


#: The longest id, model, fingerprint or finish reason an answer may put on a span.
MAX_TEXT = 256
#: Finish reasons kept from one answer (one per choice).
_MAX_REASONS = 16


def short_text(value: object) -> str | None:
    """``value`` if it is a non-empty string an answer may fairly hold: at most
    :data:`MAX_TEXT` characters, and encodable (a lone surrogate is not)."""
    if type(value) is not str or not value or len(value) > MAX_TEXT or not encodable(value):
        return None
    return value


def response_attributes(response: Any) -> dict[str, Any]:
    """Attributes of a complete response (parsed model, the raw JSON dict, or its
    ``fields_of(response, RESPONSE_FIELDS)``). Text an answer could make huge or
    unencodable is left out."""
    fields = fields_of(response, RESPONSE_FIELDS)
    attrs: dict[str, Any] = {}
    response_id = short_text(fields.get("id"))
    if response_id is not None:
        attrs[RESPONSE_ID] = response_id
    model = short_text(fields.get("model"))
    if model is not None:
        attrs[RESPONSE_MODEL] = model
    reasons = _finish_reasons(fields)
    if reasons:
        attrs[FINISH_REASONS] = reasons
    tier = short_text(fields.get("service_tier"))
    if tier is not None:
        attrs[RESPONSE_SERVICE_TIER] = tier
    fingerprint = short_text(fields.get("system_fingerprint"))
    if fingerprint is not None:
        attrs[SYSTEM_FINGERPRINT] = fingerprint
    return attrs


_DATED = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4}|\d{8})$")


def model_shifted(requested: str | None, used: str | None) -> bool | None:
    """Whether the model used differs from the one asked for (a dated version does not)."""
    if not requested or not used:
        return None
    if used == requested:
        return False
    suffix = used[len(requested) :] if used.startswith(requested) else ""
    return not (suffix and _DATED.fullmatch(suffix))


def tokenlay_response_attributes(meta: TokenlayResponseMetadata) -> dict[str, Any]:
    """Span attributes from the proxy's ``x-tokenlay-*`` response headers."""
    return _present(
        (
            (RULE_ID, meta.rule_id),
            (RULE_ACTION, meta.rule_action),
            (LIMIT_EXCEEDED, meta.limit_exceeded),
        )
    )


def error_type(exc: BaseException) -> str:
    """``error.type``: the HTTP status for API errors, else the exception's class name."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return str(status)
    cls = type(exc)
    top = cls.__module__.split(".", 1)[0]
    if top == "builtins":
        return cls.__qualname__
    return f"{top}.{cls.__qualname__}"
