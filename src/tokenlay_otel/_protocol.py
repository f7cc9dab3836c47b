"""Tokenlay wire protocol v1: metadata validation, request headers, response headers.

Pure functions only: nothing here touches a span, a client or the network, so every
rule of the protocol can be tested with plain data.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import operator
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "HEADER_PREFIX",
    "MAX_REPORTED_COST_USD",
    "MAX_REPORTED_TOKENS",
    "PROVIDER_BASE_HEADER",
    "PROVIDER_KEY_HEADER",
    "STANDARD_FIELDS",
    "RuleAction",
    "TokenlayResponseMetadata",
    "build_request_headers",
    "check_url_security",
    "decode_value",
    "decode_wire_value",
    "display_url",
    "encodable",
    "encode_value",
    "field_header",
    "metadata_from_request_headers",
    "metadata_from_wire",
    "normalize_field_name",
    "parse_metadata_env",
    "parse_response_headers",
    "proxy_url",
    "sanitize_metadata",
    "split_caller_headers",
    "validate_metadata",
]

_log = logging.getLogger("tokenlay_otel")

HEADER_PREFIX = "x-tokenlay-"
PROVIDER_KEY_HEADER = "x-tokenlay-provider-key"
PROVIDER_BASE_HEADER = "x-tokenlay-provider-base"
STANDARD_FIELDS = ("user", "org", "plan", "project", "feature")
MAX_VALUE_LENGTH = 1024

# Field names the protocol keeps for itself; a metadata field with one of these names
# would be read by the proxy as a credential or a provider URL.
_RESERVED_FIELDS = frozenset({"provider_key", "provider_base"})
_FIELD_NAME = re.compile(r"[a-z0-9_-]{1,64}")
# C0 controls and DEL: CR/LF would split headers, NUL truncates them in some servers.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Printable ASCII goes on the wire as is (byte-compatible with the JS SDK); '%' is
# encoded too so that decoding is unambiguous.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def normalize_field_name(name: str) -> str:
    """Return the canonical form of a metadata field name (lower case, ``_`` not ``-``).

    Raises:
        ValueError: the name is not 1-64 of ``[a-z0-9_-]`` or is reserved.
    """
    if not isinstance(name, str):
        raise ValueError(f"metadata field names must be strings, got {type(name).__name__}")
    lowered = name.lower()
    if not _FIELD_NAME.fullmatch(lowered):
        raise ValueError(
            f"invalid metadata field name {name!r}: use 1-64 characters from a-z, 0-9, '_' and '-'"
        )
    canonical = lowered.replace("-", "_")
    if canonical in _RESERVED_FIELDS:
        raise ValueError(f"{name!r} is reserved by the Tokenlay protocol and cannot be metadata")
    return canonical


def _check_value(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"metadata field {field!r} must be a string, got {type(value).__name__}")
    if _CONTROL.search(value):
        raise ValueError(
            f"metadata field {field!r} contains a control character (CR, LF, NUL, tab...); "
            "remove it before sending"
        )
    if len(value) > MAX_VALUE_LENGTH:
        raise ValueError(
            f"metadata field {field!r} is {len(value)} characters long; "
            f"the maximum is {MAX_VALUE_LENGTH}"
        )
    return value


def validate_metadata(fields: Mapping[str, object]) -> dict[str, str]:
    """Validate caller-given metadata and return it with canonical field names.

    Raises:
        ValueError: naming the field whose name or value is not allowed.
    """
    out: dict[str, str] = {}
    for name, value in fields.items():
        canonical = normalize_field_name(name)
        out[canonical] = _check_value(canonical, value)
    return out


def sanitize_metadata(fields: Mapping[str, object]) -> tuple[dict[str, str], list[str]]:
    """Like :func:`validate_metadata` but drops bad fields instead of raising.

    Returns:
        The valid fields, and one message per dropped field (no values in them).
    """
    out: dict[str, str] = {}
    problems: list[str] = []
    for name, value in fields.items():
        try:
            canonical = normalize_field_name(name)
            out[canonical] = _check_value(canonical, value)
        except ValueError as exc:
            problems.append(str(exc))
    return out, problems


def field_header(field: str) -> str:
    """The request header that carries the canonical metadata ``field``."""
    return HEADER_PREFIX + field.replace("_", "-")


def encode_value(value: str) -> str:
    """Percent-encode what cannot travel in a header as is (non-ASCII, '%', edge spaces)."""
    if value.isascii() and "%" not in value and value.strip(" ") == value:
        return value
    encoded = quote(value, safe=_SAFE)
    # HTTP strips surrounding whitespace from header values; keep it by encoding it.
    stripped = encoded.lstrip(" ")
    encoded = "%20" * (len(encoded) - len(stripped)) + stripped
    stripped = encoded.rstrip(" ")
    return stripped + "%20" * (len(encoded) - len(stripped))


def decode_value(value: str) -> str:
    """Inverse of :func:`encode_value` (what a proxy does with a metadata header)."""
    return unquote(value, errors="replace") if "%" in value else value


def decode_wire_value(raw: bytes) -> str:
    """A metadata header's bytes as the proxy reads them: one rule for every path.

    The bytes are UTF-8 (a client that sends raw non-ASCII and one that percent-encodes
    it, as the SDK does, name the same value), then percent-decoded as UTF-8. Values are
    case-sensitive; HTTP drops surrounding whitespace, so edge spaces exist only when
    percent-encoded.

    Raises:
        ValueError: the value is not UTF-8, holds a control character once decoded, or
            is longer than the protocol allows.
    """
    try:
        text = raw.decode("utf-8")
        value = unquote(text, errors="strict") if "%" in text else text
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 (send non-ASCII text percent-encoded)") from None
    if _CONTROL.search(value):
        raise ValueError("holds a control character")
    if len(value) > MAX_VALUE_LENGTH:
        raise ValueError(f"is longer than {MAX_VALUE_LENGTH} characters")
    return value


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
    README's bare keys (``user``, ``org``, ``plan``, ``project``, ``feature``).

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


def parse_metadata_env(text: str, *, source: str = "TOKENLAY_METADATA") -> dict[str, str]:
    """Parse ``user=u1,org=o1`` into validated metadata.

    Values are percent-decoded as UTF-8, as the wire's are: ``org=Acme%2C Inc.`` holds
    a comma, ``%25`` is a ``%`` and ``%20`` keeps a space that stripping would remove.
    A ``%`` not followed by two hex digits stays as it is.

    Raises:
        ValueError: naming ``source`` and the bad entry.
    """
    raw: dict[str, str] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        name, sep, value = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(
                f"{source}: expected 'field=value' pairs separated by ',', got {entry!r} "
                "(a value with a comma writes it %2C)"
            )
        value = value.strip()
        if "%" in value:
            try:
                value = unquote(value, errors="strict")
            except UnicodeDecodeError:
                raise ValueError(
                    f"{source}: the value of {name.strip()!r} is not percent-encoded UTF-8"
                ) from None
        raw[name.strip()] = value
    try:
        return validate_metadata(raw)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_url(url: str | None) -> str:
    """A URL as it may be logged or put in an error: without any user or password."""
    try:
        parts = urlsplit(url or "")
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<a malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_url_security(
    url: str,
    *,
    what: str,
    allow_http_hosts: Collection[str] = (),
    allow_variable: str = "",
    bare: bool = False,
) -> str:
    """Refuse URLs over which keys would travel in clear text or that are not HTTP.

    Args:
        url: the URL to check.
        what: how to name it in the error (the argument or env var that set it).
        allow_http_hosts: host names (lower case) plain ``http://`` may reach besides
            loopback, e.g. a proxy inside a compose network or a private model server.
        allow_variable: the setting that lists them, named in the error.
        bare: refuse a query or a fragment too (a base URL that paths are added to).

    Returns:
        The URL without trailing slashes.

    Raises:
        ValueError: not http(s), a bad port, or plain http to a host that is neither
            loopback nor allowed; the message says how to allow it, and shows the URL
            without any password in it.
    """
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise ValueError(f"{what} is not a valid URL ({exc}): {shown!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL, got {shown!r}")
    if bare and ("?" in url or "#" in url):  # an empty query or fragment counts too
        raise ValueError(f"{what} must not have a query or a fragment: {shown!r}")
    host = parts.hostname.lower()
    if scheme == "http" and not _is_loopback(host) and host not in allow_http_hosts:
        how = f", or name the host in {allow_variable}={host}" if allow_variable else ""
        raise ValueError(
            f"{what} is plain http:// to {host!r}; keys would travel in clear text. "
            "Use https://, http:// to a loopback address (127.0.0.1, ::1, localhost)"
            f"{how} if the network to it is trusted"
        )
    return url.rstrip("/")


def proxy_url(tokenlay_base_url: str, path: str) -> str:
    """``{tokenlay_base_url}/v1/<path>``, tolerating a base that already ends in ``/v1``."""
    base = tokenlay_base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/{path.lstrip('/')}"


RuleAction = Literal["allow", "warn", "block", "queue"]
_RULE_ACTIONS: tuple[RuleAction, ...] = ("allow", "warn", "block", "queue")


@dataclass(frozen=True, slots=True)
class TokenlayResponseMetadata:
    """What the Tokenlay proxy said about one call; each field ``None`` when not sent."""

    rule_id: str | None = None
    rule_action: RuleAction | None = None
    limit_exceeded: bool | None = None
    cost: float | None = None
    tokens_used: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    duration_ms: int | None = None
    warnings: tuple[str, ...] | None = None
    model: str | None = None


#: The most tokens one call is believed to use, and the most it is believed to cost.
#: A count or cost the proxy or a provider reports beyond these (or negative, or not
#: finite) is ignored, not clamped: it is no evidence of anything. They sit far above
#: any real call (a large context window is 10**6-10**7 tokens) and far below what
#: breaks a sum: int64 (SQLite, OTLP) and float64 stay exact over millions of calls.
MAX_REPORTED_TOKENS = 10**12
MAX_REPORTED_COST_USD = 1e9
# The proxy's processing time: any sane bound does; this one (31 years) keeps an int64.
_MAX_DURATION_MS = 10**12
# Header value sizes, in characters; a longer value is ignored before it is read.
_MAX_SHORT = 32  # numbers, booleans, actions
_MAX_TEXT = 1024  # rule id, model
_MAX_WARNINGS_TEXT = 8192
# What a warnings header may hold: items, characters per item, and brackets (a flat
# array of strings has one, plus any its texts quote). The bracket bound keeps the
# JSON parser, which recurses per level, far from the recursion limit.
_MAX_WARNINGS = 32
_MAX_WARNING = 1024
_MAX_BRACKETS = 32


def _ignore(header: str) -> None:
    _log.debug("ignoring malformed %s response header", header)


def _parse_int(header: str, value: str, most: int = MAX_REPORTED_TOKENS) -> int | None:
    """A whole number from 0 to ``most`` (a token count by default), else ``None``."""
    # Callers bound the length first, so int() and float() see at most _MAX_SHORT
    # characters (Python refuses int() of a 4,300-digit string with ValueError).
    if value.isdecimal():  # what the proxy sends
        number = int(value)
        if number <= most:
            return number
        _ignore(header)
        return None
    try:
        parsed = float(value.strip())
    except ValueError:
        _ignore(header)
        return None
    # NaN fails every comparison; the range check comes before int(), which refuses inf.
    if not 0 <= parsed <= most or parsed != int(parsed):
        _ignore(header)
        return None
    return int(parsed)


def _parse_duration(header: str, value: str) -> int | None:
    return _parse_int(header, value, _MAX_DURATION_MS)


def _parse_cost(header: str, value: str) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        _ignore(header)
        return None
    if not 0 <= number <= MAX_REPORTED_COST_USD:  # NaN fails it too
        _ignore(header)
        return None
    return number


def _parse_bool(header: str, value: str) -> bool | None:
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    _ignore(header)
    return None


def _parse_warnings(header: str, value: str) -> tuple[str, ...] | None:
    if value.count("[") + value.count("{") > _MAX_BRACKETS:
        _ignore(header)
        return None
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):  # recursion: a caller already deep in its stack
        _ignore(header)
        return None
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        _ignore(header)
        return None
    kept = tuple(
        item for item in data[:_MAX_WARNINGS] if len(item) <= _MAX_WARNING and encodable(item)
    )
    if len(kept) != len(data):
        _log.debug("ignoring %d of the warnings in %s", len(data) - len(kept), header)
    return kept


def encodable(text: str) -> bool:
    """Whether ``text`` can be exported: JSON's ``\\ud800`` decodes to a lone surrogate,
    which UTF-8 (and so OTLP) cannot carry."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _parse_text(header: str, value: str) -> str | None:
    text = value.strip()
    if not text or _CONTROL.search(text):
        _ignore(header)
        return None
    return text


def _parse_action(header: str, value: str) -> RuleAction | None:
    lowered = value.strip().lower()
    for action in _RULE_ACTIONS:
        if lowered == action:
            return action
    _ignore(header)
    return None


#: Header name -> (field of TokenlayResponseMetadata, parser, longest value read).
_FIELDS: dict[str, tuple[str, Callable[[str, str], Any], int]] = {
    HEADER_PREFIX + suffix: (field, parse, longest)
    for suffix, field, parse, longest in (
        ("rule-id", "rule_id", _parse_text, _MAX_TEXT),
        ("rule-action", "rule_action", _parse_action, _MAX_SHORT),
        ("limit-exceeded", "limit_exceeded", _parse_bool, _MAX_SHORT),
        ("cost", "cost", _parse_cost, _MAX_SHORT),
        ("tokens-used", "tokens_used", _parse_int, _MAX_SHORT),
        ("input-tokens", "input_tokens", _parse_int, _MAX_SHORT),
        ("output-tokens", "output_tokens", _parse_int, _MAX_SHORT),
        ("duration", "duration_ms", _parse_duration, _MAX_SHORT),
        ("warnings", "warnings", _parse_warnings, _MAX_WARNINGS_TEXT),
        ("model", "model", _parse_text, _MAX_TEXT),
    )
}
_RAW_PREFIX = HEADER_PREFIX.encode()
_LINE_PREFIX = b"\n" + _RAW_PREFIX
_RAW_NAMES = tuple((name, name.encode()) for name in _FIELDS)


def _tokenlay_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The ``x-tokenlay-*`` headers by lower-case name (with httpx, only the ones we
    read); ``None`` when there is none at all.

    Every response passes through here and most carry none of ours, so httpx headers
    are searched as bytes, in the (raw, lower-case, value) triples httpx and httpx2
    keep, and only our few are decoded (their public ``raw`` is rebuilt in Python on
    each read, which costs twice as much). Any other mapping is read item by item.
    """
    triples = getattr(headers, "_list", None)
    if type(triples) is list and (not triples or _is_triple(triples[0])):
        names = b"\n".join(map(_second, triples))
        if not names.startswith(_RAW_PREFIX) and _LINE_PREFIX not in names:
            return None
        # Looked up by name in a dict built in C, rather than a Python loop over
        # every header: a response carries two or three times more of others'.
        by_name = dict(zip(map(_second, triples), map(_third, triples), strict=True))
        return {
            name: raw.decode("utf-8", "replace")
            for name, raw_name in _RAW_NAMES
            if (raw := by_name.get(raw_name)) is not None
        }
    values: dict[str, str] = {}
    for name, value in headers.items():
        if isinstance(name, str) and isinstance(value, str):
            lowered = name.lower()
            if lowered.startswith(HEADER_PREFIX):
                values[lowered] = value
    return values or None


_second = operator.itemgetter(1)
_third = operator.itemgetter(2)


def _is_triple(item: object) -> bool:
    return type(item) is tuple and len(item) == 3 and type(item[1]) is type(item[2]) is bytes


def parse_response_headers(headers: Mapping[str, str]) -> TokenlayResponseMetadata | None:
    """Parse the proxy's ``x-tokenlay-*`` response headers; never raises.

    Args:
        headers: any mapping of header names to values (case of names is ignored).

    Returns:
        The parsed metadata, or ``None`` when no Tokenlay header is present.
    """
    try:
        values = _tokenlay_headers(headers)
    except Exception:  # a foreign mapping may fail while iterating; treat as no headers
        _log.debug("could not read response headers", exc_info=True)
        return None
    if values is None:
        return None
    fields: dict[str, Any] = {}
    for header, value in values.items():
        known = _FIELDS.get(header)
        if known is not None:
            field, parse, longest = known
            # Each header on its own: a bad one leaves the others as they are.
            if len(value) <= longest:
                fields[field] = parse(header, value)
            else:
                _ignore(header)
    return TokenlayResponseMetadata(**fields)
