"""Forwarding to the provider, and reading usage out of what passes through.

Streams are relayed event by event as they arrive (no buffering beyond one SSE event,
itself bounded); each event is parsed to note usage and the text sent (what a call is
charged when upstream never reports usage), to add ``usage.cost`` to the usage event,
or to drop that event when the proxy asked for it on the caller's behalf. The event
that ends a stream is marked, so the call settles before the caller sees the end.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenlay_otel._usage import Usage, usage_of
from tokenlay_otel._wire import USAGE_OPTION_ENDPOINTS, usage_option_on, with_usage_option

from .estimate import text_bytes, valid_usage

__all__ = ["MAX_EVENT_BYTES", "StreamTap", "body_usage", "with_stream_usage"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DELTA_TEXT = ("content", "refusal", "reasoning_content", "reasoning")
# Where an SSE event ends: a blank line, whichever line ending the server uses.
_EVENT_ENDS = (b"\r\n\r\n", b"\n\n", b"\r\r")
#: An SSE event larger than this is relayed without being read (its usage is lost).
MAX_EVENT_BYTES = 1 << 20


def with_stream_usage(endpoint: str | None, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Always ask upstream for a stream's usage chunk; (body, whether the caller did not).

    A caller who turns the usage chunk off must not turn the metering off with it.
    """
    if body.get("stream") is not True or endpoint not in USAGE_OPTION_ENDPOINTS:
        return body, False
    if usage_option_on(body):
        return body, False
    return with_usage_option(body), True


def body_usage(data: Any, endpoint: str | None) -> tuple[Usage | None, str | None, int]:
    """Validated usage, response model, and UTF-8 bytes of output text of a JSON body."""
    if not isinstance(data, dict):
        return None, None, 0
    model = data.get("model") if isinstance(data.get("model"), str) else None
    output = data.get("choices", data.get("output"))
    usage = valid_usage(usage_of(data.get("usage")), endpoint)
    return usage, model, text_bytes(output)[0]


def _utf8(value: Any) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _event_text(event: dict[str, Any]) -> int:
    """UTF-8 bytes of the text an event carries (what it is charged on when no usage
    comes). Read field by field: a generic walk cost three times as much per event."""
    if isinstance(event.get("type"), str):  # the Responses API: text in "*.delta" events
        return _utf8(event.get("delta"))
    choices = event.get("choices")
    if not isinstance(choices, list):
        return 0
    total = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        total += _utf8(choice.get("text"))  # completions
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for name in _DELTA_TEXT:
                total += _utf8(delta.get(name))
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                total += text_bytes(calls)[0]
    return total


@dataclass
class StreamTap:
    """Reads SSE bytes on their way to the caller; ``price`` puts the cost in the chunk."""

    price: Callable[[Usage, str | None], float | None]
    drop_usage_chunk: bool
    endpoint: str = "chat/completions"
    usage: Usage | None = None
    model: str | None = None
    cost: float | None = None
    text_bytes: int = 0
    _buffer: bytes = field(default=b"", repr=False)
    _blind: bool = False  # an event went past the size bound: relay the rest unread
    ended: bool = False  # the stream's last event went by; nothing after it is relayed

    def _event(self, raw: bytes) -> tuple[bytes | None, bool]:
        """(what to send, whether it ends the stream)."""
        text = raw.decode("utf-8", errors="replace")
        # SSE lines end only at CR, LF or CRLF (str.splitlines would also split inside a
        # JSON string at U+2028, U+0085...).
        lines = _LINE_END.split(text) if "\r" in text else text.split("\n")
        data_lines = [line[5:].strip() for line in lines if line.startswith("data:")]
        if not data_lines:
            return raw, False
        if data_lines[0] == "[DONE]":
            return raw, self.endpoint != "responses"
        try:
            event = json.loads("\n".join(data_lines))
        except (ValueError, RecursionError):
            return raw, False
        if not isinstance(event, dict):
            return raw, False
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        self.text_bytes += _event_text(event)
        if self.endpoint == "responses" and event.get("type") in _FINAL_TYPES:
            self._note(*body_usage(event.get("response"), self.endpoint)[:2])
            return raw, True
        if not isinstance(event.get("usage"), dict):
            return raw, False
        self._note(valid_usage(usage_of(event["usage"]), self.endpoint), self.model)
        if event.get("choices"):
            return raw, False
        if self.drop_usage_chunk:
            return None, False
        if self.cost is not None:
            event["usage"] = {**event["usage"], "cost": self.cost}
            return f"data: {json.dumps(event)}\n\n".encode(), False
        return raw, False

    def _note(self, usage: Usage | None, model: str | None) -> None:
        self.model = model or self.model
        if usage is None or (self.usage is not None and _total(self.usage) > _total(usage)):
            return  # a later, smaller report does not take back what was billed
        self.usage = usage
        self.cost = self.price(usage, self.model)

    def feed(self, chunk: bytes) -> list[tuple[bytes, bool]]:
        """The events completed by ``chunk``: (bytes to send, ends the stream)."""
        if self.ended:
            return []
        if self._blind:
            return [(chunk, False)]
        buffer = self._buffer + chunk
        out: list[tuple[bytes, bool]] = []
        while not self.ended:
            if b"\r" not in buffer:  # the usual case: one search, not three
                end, size = buffer.find(b"\n\n"), 2
                if end < 0:
                    break
            else:
                found = [(i, len(e)) for e in _EVENT_ENDS if (i := buffer.find(e)) >= 0]
                if not found:
                    break
                end, size = min(found)
            raw, buffer = buffer[: end + size], buffer[end + size :]
            sent, final = self._event(raw)
            self.ended = final
            if sent is not None:
                out.append((sent, final))
        if len(buffer) > MAX_EVENT_BYTES:
            out.append((buffer, False))
            self._blind, buffer = True, b""
        self._buffer = buffer
        return out

    def flush(self) -> bytes:
        """What is left of an unfinished last event."""
        rest, self._buffer = (b"" if self.ended else self._buffer), b""
        return rest


def _total(usage: Usage) -> int:
    return (usage.input_tokens or 0) + (usage.output_tokens or 0)
