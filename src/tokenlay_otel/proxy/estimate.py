"""What a call may use before it is made, and what to charge when upstream never says.

Pure. The proxy reserves an estimate against tokens and cost limits before it forwards
a call, then settles to the real usage. When upstream gives no valid usage (a stream
cut before its usage chunk, a truncated body, a hostile answer), the call is charged
the estimate — never a silent 0.

Token counts from text are deliberately high (one token per 3 UTF-8 bytes; English
averages about 4 characters a token), so a reservation rarely falls short.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tokenlay_otel._usage import Usage

__all__ = [
    "MAX_CALL_TOKENS",
    "input_tokens",
    "output_cap",
    "text_bytes",
    "text_tokens",
    "valid_usage",
]

#: More tokens than any model takes or gives in one call; a larger count is not usage.
MAX_CALL_TOKENS = 100_000_000
#: What an image part of a prompt is reserved at (a 1024x1024 image in high detail).
IMAGE_TOKENS = 765
_PER_MESSAGE = 4
_PER_REQUEST = 3
_MAX_DEPTH = 32
# The request fields whose text the model reads.
_PROMPT_FIELDS = ("messages", "input", "prompt", "instructions", "tools", "functions", "system")


def text_tokens(n_bytes: int) -> int:
    """Tokens reserved for ``n_bytes`` of UTF-8 text."""
    return math.ceil(n_bytes / 3)


def text_bytes(value: Any, depth: int = 0) -> tuple[int, int]:
    """(UTF-8 bytes of the strings in ``value``, image parts), bounded in depth."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")), 0
    if depth > _MAX_DEPTH:
        return 0, 0
    if isinstance(value, Mapping):
        if value.get("type") in ("image_url", "input_image", "image"):
            return 0, 1  # its URL or base64 data is not prompt text
        items = value.values()
    elif isinstance(value, list):
        items = value  # type: ignore[assignment]
    else:
        return 0, 0
    total, images = 0, 0
    for item in items:
        b, i = text_bytes(item, depth + 1)
        total, images = total + b, images + i
    return total, images


def input_tokens(body: Mapping[str, Any]) -> int:
    """An upper estimate of the prompt's tokens."""
    total, images, messages = 0, 0, 0
    for name in _PROMPT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, list) and name in ("messages", "input"):
            messages += len(value)
        b, i = text_bytes(value)
        total, images = total + b, images + i
    return text_tokens(total) + images * IMAGE_TOKENS + messages * _PER_MESSAGE + _PER_REQUEST


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_CALL_TOKENS:
        return value
    return None


def output_cap(body: Mapping[str, Any], endpoint: str | None, default: int) -> int:
    """The most output the call may produce: its own cap, else ``default``, per choice."""
    if endpoint == "embeddings":
        return 0
    cap = None
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        cap = _positive_int(body.get(name))
        if cap is not None:
            break
    choices = _positive_int(body.get("n")) or 1
    return min((cap if cap is not None else default) * choices, MAX_CALL_TOKENS)


def _count(value: int | None) -> bool:
    return value is None or 0 <= value <= MAX_CALL_TOKENS


def valid_usage(usage: Usage | None, endpoint: str | None) -> Usage | None:
    """``usage`` when its counts are believable, else ``None`` (to be estimated).

    Upstream's numbers are evidence, not truth: a negative, huge or missing count would
    credit or zero a user's limits. Every metered endpoint reports its input; all but
    embeddings report their output.
    """
    if usage is None or usage.input_tokens is None:
        return None
    if usage.output_tokens is None and endpoint != "embeddings":
        return None
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.reasoning_tokens,
    )
    if not all(_count(c) for c in counts):
        return None
    return usage
