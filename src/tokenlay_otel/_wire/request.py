"""The request side: the headers a routed call carries and how the proxy reads them,
the proxy's URL, which endpoints are metered, and the streaming usage option."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .fields import (
    HEADER_PREFIX,
    PROVIDER_BASE_HEADER,
    PROVIDER_KEY_HEADER,
    STANDARD_FIELDS,
    decode_value,
    decode_wire_value,
    encode_value,
    normalize_field_name,
)

__all__ = [
    "METERED_ENDPOINTS",
    "USAGE_OPTION_ENDPOINTS",
    "build_request_headers",
    "field_header",
    "metadata_from_request_headers",
    "metadata_from_wire",
    "metered_endpoint",
    "proxy_url",
    "split_caller_headers",
    "usage_option_given",
    "usage_option_on",
    "with_usage_option",
]

#: The endpoints the proxy meters (paths under ``/v1``), in the order they are matched:
#: ``chat/completions`` before ``completions``, which it ends with.
METERED_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")
#: The endpoints whose streams report usage only when asked, with
#: ``stream_options.include_usage``.
USAGE_OPTION_ENDPOINTS = frozenset({"chat/completions", "completions"})
_SLASHED = tuple((endpoint, "/" + endpoint) for endpoint in METERED_ENDPOINTS)


def field_header(field: str) -> str:
    """The request header that carries the canonical metadata ``field``."""
    return HEADER_PREFIX + field.replace("_", "-")


def build_request_headers(
    *,
    tokenlay_key: str,
    provider_key: str | None,
    provider_base: str,
    metadata: Mapping[str, str],
) -> dict[str, str]:
    """Headers of a request routed through Tokenlay (DESIGN §3), metadata already valid."""
    headers = {"Authorization": f"Bearer {tokenlay_key}"}
    if provider_key:
        headers[PROVIDER_KEY_HEADER] = provider_key
    headers[PROVIDER_BASE_HEADER] = provider_base
    for field, value in metadata.items():
        headers[field_header(field)] = encode_value(value)
    return headers


def split_caller_headers(
    headers: Mapping[str, object], *, bare_fields: bool
) -> tuple[dict[str, object], dict[str, object]]:
    """Split per-request headers into metadata fields and the caller's other headers.

    ``x-tokenlay-<field>`` headers are metadata; with ``bare_fields`` so are the seed
    README's bare keys (the :data:`STANDARD_FIELDS`).

    Returns:
        (metadata by field name as given, remaining headers), neither validated.
    """
    fields: dict[str, object] = {}
    rest: dict[str, object] = {}
    for name, value in headers.items():
        lowered = name.lower() if isinstance(name, str) else ""
        if lowered.startswith(HEADER_PREFIX) and lowered not in (
            PROVIDER_KEY_HEADER,
            PROVIDER_BASE_HEADER,
        ):
            fields[lowered[len(HEADER_PREFIX) :]] = value
        elif bare_fields and lowered in STANDARD_FIELDS:
            fields[lowered] = value
        else:
            rest[name] = value
    return fields, rest


def metadata_from_wire(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Metadata from raw request headers (lower-case names), as the proxy reads it.

    A header sent twice is refused, even with an empty value.

    Raises:
        ValueError: naming the header that is sent twice or whose value is not valid.
    """
    out: dict[str, str] = {}
    seen: set[str] = set()
    prefix = HEADER_PREFIX.encode()
    for name, raw in headers:
        if not name.startswith(prefix):
            continue
        lowered = name.decode("latin-1")
        if lowered in (PROVIDER_KEY_HEADER, PROVIDER_BASE_HEADER):
            continue
        try:
            field = normalize_field_name(lowered[len(HEADER_PREFIX) :])
        except ValueError:
            continue
        if field in seen:
            raise ValueError(f"{lowered} is sent twice")
        seen.add(field)
        try:
            value = decode_wire_value(raw)
        except ValueError as exc:
            raise ValueError(f"{lowered} {exc}") from None
        if value:  # an empty value names nothing: the call is as if it were not sent
            out[field] = value
    return out


def metadata_from_request_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Read metadata back from request headers, as the proxy does (decoded, canonical)."""
    out: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if not lowered.startswith(HEADER_PREFIX) or lowered in (
            PROVIDER_KEY_HEADER,
            PROVIDER_BASE_HEADER,
        ):
            continue
        try:
            field = normalize_field_name(lowered[len(HEADER_PREFIX) :])
        except ValueError:
            continue
        out[field] = decode_value(value)
    return out


def proxy_url(tokenlay_base_url: str, path: str) -> str:
    """``{tokenlay_base_url}/v1/<path>``, tolerating a base that already ends in ``/v1``."""
    base = tokenlay_base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/{path.lstrip('/')}"


def metered_endpoint(method: str, path: str) -> str | None:
    """The metered endpoint (one of :data:`METERED_ENDPOINTS`) a request reaches, told
    by the end of its path (no query); ``None`` for anything else.

    The end, not the whole: a base URL may hold any prefix (``/v1``, ``/openai/v1``,
    an Azure deployment path).
    """
    if method.upper() != "POST":
        return None
    tail = "/" + path.strip("/")
    for endpoint, slashed in _SLASHED:
        if tail.endswith(slashed):
            return endpoint
    return None


def usage_option_given(body: Mapping[str, Any]) -> bool:
    """Whether the body sets ``stream_options.include_usage`` at all (to anything)."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and "include_usage" in options


def usage_option_on(body: Mapping[str, Any]) -> bool:
    """Whether the body asks for a stream's usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def with_usage_option(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` that asks for a stream's usage chunk, keeping the caller's
    other ``stream_options``."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, Mapping) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}
