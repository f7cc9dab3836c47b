"""Attribution context: ``metadata()`` as a context manager and a decorator.

Backed by a ``ContextVar``, so each thread and each asyncio task sees its own
metadata, and child tasks inherit their parent's at creation.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar, cast

from ._wire import normalize_field_name, validate_metadata

__all__ = ["current_metadata", "metadata"]

_F = TypeVar("_F", bound=Callable[..., Any])
# A value of None marks a field a scope removed, so that it also hides the client's
# and TOKENLAY_METADATA's value for that field.
_Fields = Mapping[str, str | None]
_EMPTY: _Fields = MappingProxyType({})
_CURRENT: ContextVar[_Fields] = ContextVar("tokenlay_metadata", default=_EMPTY)


def current_metadata() -> _Fields:
    """The fields the active ``metadata()`` scopes set (``None``: removed), read-only."""
    return _CURRENT.get()


class metadata:  # lower case: used like a function: `with metadata(user=...)`
    """Attribute the LLM calls made inside a block or function to a user, org, ...

    Scopes nest and the innermost value of a field wins; ``None`` removes a field
    (set by an outer scope, the client or ``TOKENLAY_METADATA``) for the block.
    Per-request ``extra_headers`` still win over it.

    Example::

        with metadata(user="u1", org="o1", feature="autocomplete"):
            client.chat.completions.create(...)

        @metadata(feature="summary")
        async def summarize(text: str) -> str: ...

    Raises:
        ValueError: a field name or value is not allowed (control characters,
            longer than 1024 characters, a name outside ``[a-z0-9_-]{1,64}``).
    """

    __slots__ = ("_remove", "_set", "_tokens")

    def __init__(self, **fields: str | None) -> None:
        self._set = MappingProxyType(
            validate_metadata({k: v for k, v in fields.items() if v is not None})
        )
        self._remove = frozenset(normalize_field_name(k) for k, v in fields.items() if v is None)
        # Tokens keyed by the id of the mapping each entry installed: a scope object may
        # be entered from several threads or tasks at once, and on exit the current
        # value tells which of its entries this context is leaving.
        self._tokens: dict[int, tuple[_Fields, Token[_Fields]]] = {}

    def __repr__(self) -> str:
        return f"metadata({dict(self._set)!r}, removes={sorted(self._remove)!r})"

    def _merged(self) -> _Fields:
        merged: dict[str, str | None] = dict(_CURRENT.get())
        merged.update(self._set)
        merged.update(dict.fromkeys(self._remove))
        return MappingProxyType(merged)

    def __enter__(self) -> metadata:
        value = self._merged()
        self._tokens[id(value)] = (value, _CURRENT.set(value))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._tokens.pop(id(_CURRENT.get()), None)
        if entry is not None:
            _CURRENT.reset(entry[1])

    async def __aenter__(self) -> metadata:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: _F) -> _F:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                "metadata() cannot decorate a generator function: its body runs outside "
                "the call; use `with metadata(...)` inside it instead"
            )
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                token = _CURRENT.set(self._merged())
                try:
                    return await func(*args, **kwargs)
                finally:
                    _CURRENT.reset(token)

            return cast(_F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            token = _CURRENT.set(self._merged())
            try:
                return func(*args, **kwargs)
            finally:
                _CURRENT.reset(token)

        return cast(_F, wrapper)
