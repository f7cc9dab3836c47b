"""What a traced call returns: a parsed model ends the call at once, a stream or a raw
response is handed back behind a proxy that ends it when it is read or closed (or
garbage collected). The proxies keep the openai objects' public surface: anything not
defined here is forwarded to the wrapped object.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import openai
import wrapt

from ._responses import remember
from ._safety import guard
from ._streams import traced_stream
from ._telemetry import LLMCall

__all__ = ["TracedAsyncRawResponse", "TracedRawResponse", "wrap_result"]


def _wrap_parsed(call: LLMCall, parsed: Any, hide_usage: bool) -> Any:
    if isinstance(parsed, openai.Stream | openai.AsyncStream):
        return traced_stream(call, parsed, hide_usage=hide_usage)
    call.end(response=parsed)
    remember(parsed, call.proxy_metadata())
    return parsed


class _RawResponse(wrapt.ObjectProxy):  # type: ignore[type-arg,misc]
    """A raw response whose body is read later: the span ends at ``parse()``/``close()``."""

    def __init__(self, wrapped: Any, call: LLMCall, hide_usage: bool) -> None:
        super().__init__(wrapped)
        self._self_call = call
        self._self_hide = hide_usage
        self._self_parsed: dict[int, Any] = {}
        weakref.finalize(self, call.end)

    def _self_wrap(self, parsed: Any) -> Any:
        # parse() caches its result, so return the same proxy for the same object.
        key = id(parsed)
        if key not in self._self_parsed:
            wrapped = parsed
            with guard("wrapping a parsed raw response"):
                wrapped = _wrap_parsed(self._self_call, parsed, self._self_hide)
            self._self_parsed[key] = wrapped
        return self._self_parsed[key]


class TracedRawResponse(_RawResponse):
    def parse(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_wrap(self.__wrapped__.parse(*args, **kwargs))

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_call.end()

    def __enter__(self) -> TracedRawResponse:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TracedAsyncRawResponse(_RawResponse):
    async def parse(self, *args: Any, **kwargs: Any) -> Any:
        return self._self_wrap(await self.__wrapped__.parse(*args, **kwargs))

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            self._self_call.end()


def _legacy_response_class() -> type | None:
    try:
        from openai._legacy_response import LegacyAPIResponse
    except ImportError:  # pragma: no cover - present in every supported openai
        return None
    return LegacyAPIResponse


_LEGACY = _legacy_response_class()


def _parsed_once(raw: Any) -> Any:
    """The body of a read raw response, parsed by its public ``parse()``: openai keeps
    the model, so the caller's own ``parse()`` gets the same object without reading
    the JSON again. When openai refuses it (a ``post_parser`` or strict validation
    raising), the caller's ``parse()`` raises it where it belongs; the call is then
    recorded from the JSON, read by us."""
    try:
        return raw.parse()
    except Exception:
        return json.loads(raw.http_response.content)


def wrap_result(call: LLMCall, result: Any) -> Any:
    """Finish ``call`` now, or hand the result to a proxy that finishes it later."""
    hide_usage = call.hide_usage
    if isinstance(result, openai.Stream | openai.AsyncStream):
        return _wrap_parsed(call, result, hide_usage)
    if _LEGACY is not None and isinstance(result, _LEGACY):
        if call.streaming:
            return TracedRawResponse(result, call, hide_usage)
        # with_raw_response has already read the body: record it now.
        call.end(response=_parsed_once(result))
        remember(result, call.proxy_metadata())
        return result
    if isinstance(result, openai.AsyncAPIResponse):
        return TracedAsyncRawResponse(result, call, hide_usage)
    if isinstance(result, openai.APIResponse):
        return TracedRawResponse(result, call, hide_usage)
    return _wrap_parsed(call, result, hide_usage)
