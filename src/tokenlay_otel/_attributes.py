"""Request and response data -> span attributes (OpenTelemetry GenAI conventions).

Pure: functions take plain values (request JSON, parsed responses, headers) and return
dicts; they never see a span. The names come from :mod:`._conventions`, endpoints from
:mod:`._endpoints`, usage from :mod:`._usage`; the call recorders read them all here as
``A.<name>``, so this module hands them on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._conventions import (
    API_TYPE,
    BYPASSED,
    CACHED_INPUT_TOKENS,
    CHOICE_COUNT,
    COST,
    COST_SOURCE,
    ERROR_TYPE,
    FINISH_REASONS,
    FREQUENCY_PENALTY,
    INPUT_MESSAGES,
    INPUT_TOKENS,
    LIMIT_EXCEEDED,
    MAX_TOKENS,
    MODEL_SHIFTED,
    OPERATION,
    OUTPUT_MESSAGES,
    OUTPUT_TOKENS,
    PRESENCE_PENALTY,
    PROVIDER,
    PROXY_URL,
    REASONING_TOKENS,
    REQUEST_MODEL,
    REQUEST_SERVICE_TIER,
    RESPONSE_ID,
    RESPONSE_MODEL,
    RESPONSE_SERVICE_TIER,
    ROUTED,
    RULE_ACTION,
    RULE_ID,
    SEED,
    STOP_SEQUENCES,
    STREAM,
    SYSTEM_FINGERPRINT,
    TEMPERATURE,
    TIME_TO_FIRST_CHUNK,
    TOP_P,
    WARNING_EVENT,
    WARNING_MESSAGE,
    metadata_attribute,
)
from ._endpoints import Endpoint, endpoint_for, provider_attributes
from ._usage import Usage, _get, fields_of, number, usage_of
from ._wire import TokenlayResponseMetadata, encodable

__all__ = [
    "BYPASSED",
    "COST",
    "COST_SOURCE",
    "ERROR_TYPE",
    "FINISH_REASONS",
    "INPUT_MESSAGES",
    "MAX_TEXT",
    "MODEL_SHIFTED",
    "OPERATION",
    "OUTPUT_MESSAGES",
    "PROVIDER",
    "PROXY_URL",
    "REQUEST_MODEL",
    "RESPONSE_FIELDS",
    "RESPONSE_ID",
    "RESPONSE_MODEL",
    "RESPONSE_SERVICE_TIER",
    "ROUTED",
    "RULE_ACTION",
    "SYSTEM_FINGERPRINT",
    "TIME_TO_FIRST_CHUNK",
    "WARNING_EVENT",
    "WARNING_MESSAGE",
    "Endpoint",
    "Usage",
    "_get",
    "endpoint_for",
    "error_type",
    "fields_of",
    "metadata_attribute",
    "metadata_attributes",
    "model_shifted",
    "provider_attributes",
    "request_attributes",
    "response_attributes",
    "short_text",
    "tokenlay_response_attributes",
    "usage_attributes",
    "usage_of",
]


# Request body key -> attribute, for plain numeric parameters.
_REQUEST_NUMBERS = {
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "frequency_penalty": FREQUENCY_PENALTY,
    "presence_penalty": PRESENCE_PENALTY,
    "seed": SEED,
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
            if number(value) is not None:
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
        value = number(others.get(key))
        if value is not None:
            attrs[MAX_TOKENS] = value
            break
    n = number(others.get("n"))
    if n is not None and n != 1:
        attrs[CHOICE_COUNT] = n
    stop = others.get("stop")
    if isinstance(stop, str):
        attrs[STOP_SEQUENCES] = (stop,)
    elif isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop):
        attrs[STOP_SEQUENCES] = tuple(stop)
    if others.get("stream") is True:
        attrs[STREAM] = True
    tier = others.get("service_tier")
    if isinstance(tier, str) and tier != "auto":
        attrs[REQUEST_SERVICE_TIER] = tier


def metadata_attributes(metadata: Mapping[str, str]) -> dict[str, str]:
    return {metadata_attribute(k): v for k, v in metadata.items()}


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
