"""The metadata a call carries: the standard fields, and what a field name and a value
may be on the wire (validation, percent-encoding, decoding)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import quote, unquote

__all__ = [
    "HEADER_PREFIX",
    "MAX_VALUE_LENGTH",
    "PROVIDER_BASE_HEADER",
    "PROVIDER_KEY_HEADER",
    "STANDARD_FIELDS",
    "decode_value",
    "decode_wire_value",
    "encode_value",
    "normalize_field_name",
    "parse_metadata_env",
    "sanitize_metadata",
    "validate_metadata",
]

HEADER_PREFIX = "x-tokenlay-"
PROVIDER_KEY_HEADER = "x-tokenlay-provider-key"
PROVIDER_BASE_HEADER = "x-tokenlay-provider-base"
#: The fields every Tokenlay deployment knows (the ledger's columns, the proxy's span
#: attributes, the seed README's bare per-request keys); any other is free metadata.
STANDARD_FIELDS = ("user", "org", "plan", "project", "feature")
MAX_VALUE_LENGTH = 1024

# Field names the protocol keeps for itself; a metadata field with one of these names
# would be read by the proxy as a credential or a provider URL.
_RESERVED_FIELDS = frozenset({"provider_key", "provider_base"})
_FIELD_NAME = re.compile(r"[a-z0-9_-]{1,64}")
# C0 controls and DEL: CR/LF would split headers, NUL truncates them in some servers.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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
    if CONTROL.search(value):
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
    if CONTROL.search(value):
        raise ValueError("holds a control character")
    if len(value) > MAX_VALUE_LENGTH:
        raise ValueError(f"is longer than {MAX_VALUE_LENGTH} characters")
    return value


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
