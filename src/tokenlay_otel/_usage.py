"""Token usage as reported in any API shape, normalised and bounded; and the reading
of fields from a parsed openai model or a plain dict that it rests on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ._wire import MAX_REPORTED_COST_USD, MAX_REPORTED_TOKENS

__all__ = ["Usage", "fields_of", "number", "usage_of"]


def number(value: Any) -> float | int | None:
    kind = type(value)
    if kind is int or kind is float:  # the common case, without isinstance
        return value  # type: ignore[no-any-return]
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value  # a subclass, e.g. numpy.float64


# type -> whether it is a pydantic model; a process sees a few dozen types.
_MODEL_TYPES: dict[type, bool] = {}


def fields_of(obj: Any, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """The fields of a parsed openai model or a plain dict, as one mapping to read.

    A pydantic model keeps its fields in ``__dict__`` and unknown ones (``usage.cost``
    from a proxy) in ``__pydantic_extra__``; reading them there avoids ``getattr``,
    which costs an exception per missing field. Any other object gives ``keys`` read
    as attributes.

    The one seam onto pydantic's storage (tests/test_private_seams.py compares it with
    ``getattr``): measured with benchmarks/instructions.py, ``getattr`` instead costs
    207k instructions more per chat call and 336k per 20-chunk stream (16-25 % of our
    overhead).
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
    cost_value = number(fields.get("cost"))
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
