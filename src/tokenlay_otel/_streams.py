"""Stream proxies that end the call's span exactly once (``_results`` hands them the
streams).

A stream ends when it is exhausted, fails, is closed (``close()``, ``with`` exit) or is
garbage collected after being abandoned (``break``, an exception in the caller's loop,
a dropped reference). The proxies keep the openai objects' public surface: anything
not defined here is forwarded to the wrapped object.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import openai
import wrapt

from . import _attributes as A
from ._content import stream_output_messages
from ._responses import remember
from ._safety import guard, internal_error
from ._telemetry import LLMCall
from ._wire import TokenlayResponseMetadata

__all__ = ["TracedAsyncStream", "TracedStream", "traced_stream"]

_CHUNK_FIELDS = ("type", "response", "id", "model", "system_fingerprint", "service_tier",
                 "choices", "usage")  # fmt: skip
_CHOICE_FIELDS = ("finish_reason", "index", "delta", "text")
_STREAM_END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class _StreamState:
    """What a stream has carried so far; the hooks every stream proxy calls."""

    __slots__ = (
        "__weakref__",
        "call",
        "delta_types",
        "final_response",
        "fingerprint",
        "hide_usage",
        "model",
        "reasons",
        "response_id",
        "service_tier",
        "texts",
        "usage",
    )

    def __init__(self, call: LLMCall, *, hide_usage: bool) -> None:
        self.call = call
        call.proxy_metadata()  # read now: another instrumentation's span may end first
        self.hide_usage = hide_usage
        self.usage: A.Usage | None = None
        self.final_response: Any = None
        self.response_id: str | None = None
        self.model: str | None = None
        self.fingerprint: str | None = None
        self.service_tier: str | None = None
        self.reasons: dict[int, str] = {}
        self.texts: dict[int, list[str]] | None = (
            {} if call.telemetry.settings.capture_content else None
        )
        #: (chunk type, choice type) of this stream's parsed chat chunks, once seen.
        self.delta_types: tuple[type[Any], type[Any]] | None = None

    def on_chunk(self, chunk: Any) -> bool:
        """Account for one chunk; ``True`` when it is our usage chunk, to hide."""
        types = self.delta_types
        # Most chunks carry a piece of text and nothing to record: told apart by plain
        # attribute reads on the parsed models, without the full reading.
        if (
            types is not None
            and type(chunk) is types[0]
            and chunk.usage is None
            and type(choices := chunk.choices) is list
        ):
            for choice in choices:
                if type(choice) is not types[1] or choice.finish_reason is not None:
                    break
            else:
                return False
        return self._read_chunk(chunk)

    def _read_chunk(self, chunk: Any) -> bool:
        call = self.call
        if call.first_chunk_at is None:
            call.mark_first_chunk()
        fields = A.fields_of(chunk, _CHUNK_FIELDS)
        event_type = fields.get("type")
        if isinstance(event_type, str):  # Responses API event
            if event_type in _STREAM_END_EVENTS:
                self.final_response = fields.get("response")
                # The answer is whole: end the call before this event goes up, where an
                # instrumentation above us may end its span on seeing it (see _coexist).
                self._end_call(None)
            return False
        if self.response_id is None or self.model is None:
            self._name_response(fields)
        choices = fields.get("choices")
        usage = fields.get("usage")
        if usage is not None:
            # The usage chunk comes last: its fingerprint and tier are the final ones.
            self.usage = A.usage_of(usage) or self.usage
            self._note_backend(fields)
            if self.hide_usage and not choices:
                return True
        if not choices or not isinstance(choices, list | tuple):
            return False
        texts = self.texts
        if texts is None and self.delta_types is None:
            self._learn_delta_types(chunk, choices[0])
        for choice in choices:
            found = A.fields_of(choice, _CHOICE_FIELDS)
            reason = found.get("finish_reason")
            if reason is None and texts is None:
                continue  # the common chunk: a delta, nothing to record
            index = found.get("index")
            index = index if type(index) is int else 0
            if isinstance(reason, str) and reason:
                self.reasons[index] = reason
                self._note_backend(fields)
            if texts is not None:
                delta = found.get("delta")
                text = A._get(delta, "content") if delta else found.get("text")
                if isinstance(text, str) and text:
                    texts.setdefault(index, []).append(text)
        return False

    def _name_response(self, fields: Mapping[str, Any]) -> None:
        """Take the response's id and model from the first chunk that names them, not
        from the first chunk: Azure opens a stream with a content-filter chunk whose
        id and model are empty. Once both are known this is no longer called."""
        if self.response_id is None:
            self.response_id = _text(fields.get("id"))
        if self.model is None:
            self.model = _text(fields.get("model"))
        self._note_backend(fields)

    def _note_backend(self, fields: Mapping[str, Any]) -> None:
        """The fingerprint and service tier a chunk names; a later one wins (the last
        chunks carry the final ones), an empty or absent one changes nothing."""
        self.fingerprint = _text(fields.get("system_fingerprint")) or self.fingerprint
        self.service_tier = _text(fields.get("service_tier")) or self.service_tier

    def _learn_delta_types(self, chunk: Any, choice: Any) -> None:
        """Remember the types of a parsed chat chunk and its choice, for the fast path
        of :meth:`on_chunk` (only openai's models: their fields are plain attributes)."""
        kind, choice_kind = type(chunk), type(choice)
        if (
            kind.__module__.startswith("openai.")
            and choice_kind.__module__.startswith("openai.")
            and "usage" in getattr(kind, "model_fields", ())
            and "finish_reason" in getattr(choice_kind, "model_fields", ())
        ):
            self.delta_types = (kind, choice_kind)

    def on_end(self, error: BaseException | None, result: object) -> None:
        """The stream is over (exhausted, failed, closed or abandoned)."""
        if not self.call.ended:
            self._end_call(error)
        elif self.final_response is None:
            return  # ended and remembered before (closed twice)
        final = self.final_response
        usage = self.usage if final is None else A.usage_of(getattr(final, "usage", None))
        remember(result, _with_usage(self.call.proxy_metadata(), usage))

    def _end_call(self, error: BaseException | None) -> None:
        if self.final_response is not None:
            self.call.end(response=self.final_response, error=error)
        else:
            attrs: dict[str, Any] = {}
            if isinstance(self.response_id, str):
                attrs[A.RESPONSE_ID] = self.response_id
            if isinstance(self.model, str):
                attrs[A.RESPONSE_MODEL] = self.model
            if self.reasons:
                attrs[A.FINISH_REASONS] = tuple(self.reasons[i] for i in sorted(self.reasons))
            if self.fingerprint:
                attrs[A.SYSTEM_FINGERPRINT] = self.fingerprint
            if self.service_tier:
                attrs[A.RESPONSE_SERVICE_TIER] = self.service_tier
            output = None
            if self.texts is not None and (self.texts or self.reasons):
                output = stream_output_messages(self.texts, self.reasons)
            self.call.end(response_attrs=attrs, usage=self.usage, output=output, error=error)


_text = A.short_text  # an empty string names nothing; a huge one is not believed


def _with_usage(
    meta: TokenlayResponseMetadata | None, usage: A.Usage | None
) -> TokenlayResponseMetadata | None:
    """The proxy's headers completed by what its final usage chunk said."""
    if usage is None:
        return meta
    base = meta or TokenlayResponseMetadata()
    total = None
    if usage.input_tokens is not None and usage.output_tokens is not None:
        total = usage.input_tokens + usage.output_tokens
    return dataclasses.replace(
        base,
        cost=base.cost if base.cost is not None else usage.cost,
        input_tokens=base.input_tokens if base.input_tokens is not None else usage.input_tokens,
        output_tokens=(
            base.output_tokens if base.output_tokens is not None else usage.output_tokens
        ),
        tokens_used=base.tokens_used if base.tokens_used is not None else total,
    )


def _chunk(state: _StreamState, chunk: Any) -> bool:
    try:
        return state.on_chunk(chunk)
    except Exception:
        internal_error("reading a stream chunk")
        return False


def _end(state: _StreamState, error: BaseException | None, result: object) -> None:
    try:
        state.on_end(error, result)
    except Exception:
        internal_error("ending a stream")


def _abandoned(state: _StreamState, stream: Any, sync: bool) -> None:
    # Runs at garbage collection of the proxy: end the span, release the connection.
    _end(state, None, None)
    if sync:
        with guard("closing an abandoned stream"):
            stream.close()


def _traced_chunks(chunks: Iterator[Any], state: _StreamState, proxy: object) -> Iterator[Any]:
    """The stream's chunks, accounted for; ends the call when they run out or fail.

    A generator rather than a ``__next__`` method: resuming it costs less per chunk
    than a Python-level call. It holds the proxy (which must not hold it back): a loop
    keeps the proxy alive, and a dropped loop lets it be collected and its span ended.
    """
    on_chunk = state.on_chunk
    try:
        for chunk in chunks:
            try:
                hide = on_chunk(chunk)
            except Exception:
                internal_error("reading a stream chunk")
                hide = False
            if not hide:
                yield chunk
    except GeneratorExit:  # the loop was left early; the proxy's finalizer ends the call
        raise
    except BaseException as exc:
        _end(state, exc, proxy)
        raise
    _end(state, None, proxy)


class TracedStream(wrapt.ObjectProxy):  # type: ignore[type-arg,misc]  # generic only in wrapt 2
    """``openai.Stream`` that records its chunks and ends the span."""

    def __init__(self, wrapped: Any, state: _StreamState) -> None:
        super().__init__(wrapped)
        self._self_state = state
        weakref.finalize(self, _abandoned, state, wrapped, True)

    def __iter__(self) -> Iterator[Any]:
        # openai's Stream.__iter__ reads one shared iterator, so a second loop (or a mix
        # with next()) continues where the first stopped, as without us.
        return _traced_chunks(iter(self.__wrapped__), self._self_state, self)

    def __next__(self) -> Any:
        state = self._self_state
        while True:
            try:
                chunk = self.__wrapped__.__next__()
            except StopIteration:
                _end(state, None, self)
                raise
            except BaseException as exc:
                _end(state, exc, self)
                raise
            if not _chunk(state, chunk):
                return chunk

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            _end(self._self_state, None, self)

    def __enter__(self) -> TracedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TracedAsyncStream(wrapt.ObjectProxy):  # type: ignore[type-arg,misc]
    """``openai.AsyncStream`` twin of :class:`TracedStream`."""

    def __init__(self, wrapped: Any, state: _StreamState) -> None:
        super().__init__(wrapped)
        self._self_state = state
        weakref.finalize(self, _abandoned, state, wrapped, False)

    def __aiter__(self) -> TracedAsyncStream:
        return self

    async def __anext__(self) -> Any:
        state = self._self_state
        while True:
            try:
                chunk = await self.__wrapped__.__anext__()
            except StopAsyncIteration:
                _end(state, None, self)
                raise
            except BaseException as exc:
                _end(state, exc, self)
                raise
            if not _chunk(state, chunk):
                return chunk

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            _end(self._self_state, None, self)

    async def __aenter__(self) -> TracedAsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def traced_stream(call: LLMCall, stream: Any, *, hide_usage: bool) -> Any:
    """``stream`` (an ``openai.Stream`` or ``AsyncStream``) behind a proxy that ends
    ``call`` with what the chunks said, hiding our usage chunk if ``hide_usage``."""
    state = _StreamState(call, hide_usage=hide_usage)
    if isinstance(stream, openai.AsyncStream):
        return TracedAsyncStream(stream, state)
    return TracedStream(stream, state)
