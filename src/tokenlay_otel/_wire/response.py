"""The response side: the ``x-tokenlay-*`` headers the proxy answers with, built and
parsed from one table, and the bounds on what a report may claim."""

from __future__ import annotations

import json
import logging
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .fields import CONTROL, HEADER_PREFIX

__all__ = [
    "MAX_REPORTED_COST_USD",
    "MAX_REPORTED_TOKENS",
    "RuleAction",
    "TokenlayResponseMetadata",
    "encodable",
    "format_cost",
    "is_header_text",
    "parse_response_headers",
    "response_headers",
]

_log = logging.getLogger("tokenlay_otel")

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


# What a text header (rule id, model) holds: visible ASCII, spaces inside only. Header
# bytes are latin-1 to the server that sends them and UTF-8 to the client that reads
# them, so only ASCII means the same to both.
_HEADER_TEXT = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def is_header_text(value: str) -> bool:
    """Whether ``value`` can be a rule id or a model in a response header and be read
    back unchanged (the proxy refuses any other when it loads its rules)."""
    return len(value) <= _MAX_TEXT and _HEADER_TEXT.fullmatch(value) is not None


def format_cost(cost: float) -> str:
    """A cost in USD as the proxy writes it: fixed point, at most 10 decimals, no
    trailing zeros (``0.00042``, ``3``), never an exponent."""
    return f"{cost:.10f}".rstrip("0").rstrip(".") or "0"


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
    if not text or CONTROL.search(text):
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


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


def _warnings_text(value: tuple[str, ...]) -> str:
    return json.dumps(list(value))


#: Every response header: name, field of TokenlayResponseMetadata, how it is written,
#: how it is read, and the longest value read. The proxy writes them in this order.
_HEADERS: tuple[tuple[str, str, Callable[[Any], str], Callable[[str, str], Any], int], ...] = tuple(
    (HEADER_PREFIX + suffix, field, write, read, longest)
    for suffix, field, write, read, longest in (
        ("rule-action", "rule_action", str, _parse_action, _MAX_SHORT),
        ("rule-id", "rule_id", str, _parse_text, _MAX_TEXT),
        ("limit-exceeded", "limit_exceeded", _bool_text, _parse_bool, _MAX_SHORT),
        ("warnings", "warnings", _warnings_text, _parse_warnings, _MAX_WARNINGS_TEXT),
        ("model", "model", str, _parse_text, _MAX_TEXT),
        ("duration", "duration_ms", str, _parse_duration, _MAX_SHORT),
        ("cost", "cost", format_cost, _parse_cost, _MAX_SHORT),
        ("input-tokens", "input_tokens", str, _parse_int, _MAX_SHORT),
        ("output-tokens", "output_tokens", str, _parse_int, _MAX_SHORT),
        ("tokens-used", "tokens_used", str, _parse_int, _MAX_SHORT),
    )
)
#: Header name -> (field, parser, longest value read).
_FIELDS: dict[str, tuple[str, Callable[[str, str], Any], int]] = {
    name: (field, read, longest) for name, field, _, read, longest in _HEADERS
}
_WRITERS = tuple((name, operator.attrgetter(field), write) for name, field, write, _, _ in _HEADERS)


def response_headers(meta: TokenlayResponseMetadata) -> dict[str, str]:
    """The ``x-tokenlay-*`` headers that say ``meta`` (a field that is ``None`` is not
    sent); :func:`parse_response_headers` reads them back."""
    headers: dict[str, str] = {}
    for name, get, write in _WRITERS:
        value = get(meta)
        if value is not None:
            headers[name] = write(value)
    return headers


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

    The one seam onto httpx's ``_list`` (tests/test_private_seams.py compares it with
    the public ``items()`` on httpx and httpx2): measured with
    benchmarks/instructions.py, ``items()`` costs 63-69k instructions more a call
    (4.7-6.6 % of our overhead); any other shape of ``_list`` takes the public way.
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
