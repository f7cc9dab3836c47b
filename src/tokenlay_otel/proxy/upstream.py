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

from tokenlay_otel._attributes import Usage, usage_of

from .estimate import text_bytes, valid_usage

__all__ = ["MAX_EVENT_BYTES", "StreamTap", "body_usage", "with_stream_usage"]

_LINE_END = re.compile(r"\r\n|\r|\n")
_USAGE_OPTION_PATHS = ("/chat/completions", "/completions")
_FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
#: An SSE event larger than this is relayed without being read (its usage is lost).
MAX_EVENT_BYTES = 1 << 20


def with_stream_usage(path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Ask upstream for a usage chunk when the caller did not; (body, injected)."""
    if body.get("stream") is not True or not path.endswith(_USAGE_OPTION_PATHS):
        return body, False
    options = body.get("stream_options")
    if isinstance(options, dict) and "include_usage" in options:
        return body, False
    options = dict(options) if isinstance(options, dict) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}, True


def body_usage(data: Any) -> tuple[Usage | None, str | None, int]:
    """Validated usage, response model, and UTF-8 bytes of output text of a JSON body."""
    if not isinstance(data, dict):
        return None, None, 0
    model = data.get("model") if isinstance(data.get("model"), str) else None
    output = data.get("choices", data.get("output"))
    return valid_usage(usage_of(data.get("usage"))), model, text_bytes(output)[0]


def _event_text(event: dict[str, Any]) -> int:
    kind = event.get("type")
    if isinstance(kind, str):  # the Responses API: text arrives in "*.delta" events
        delta = event.get("delta")
        return len(delta.encode("utf-8", "surrogatepass")) if isinstance(delta, str) else 0
    return text_bytes(event.get("choices"))[0]


@dataclass
class StreamTap:
    """Reads SSE bytes on their way to the caller; ``price`` puts the cost in the chunk."""

    price: Callable[[Usage, str | None], float | None]
    drop_usage_chunk: bool
    usage: Usage | None = None
    model: str | None = None
    cost: float | None = None
    text_bytes: int = 0
    _buffer: bytes = field(default=b"", repr=False)
    _blind: bool = False  # an event went past the size bound: relay the rest unread

    def _event(self, raw: bytes) -> tuple[bytes | None, bool]:
        """(what to send, whether it ends the stream)."""
        text = raw.decode("utf-8", errors="replace")
        # SSE lines end only at CR, LF or CRLF (str.splitlines would also split inside a
        # JSON string at U+2028, U+0085...).
        lines = _LINE_END.split(text)
        data_lines = [line[5:].strip() for line in lines if line.startswith("data:")]
        if not data_lines:
            return raw, False
        if data_lines[0] == "[DONE]":
            return raw, True
        try:
            event = json.loads("\n".join(data_lines))
        except (ValueError, RecursionError):
            return raw, False
        if not isinstance(event, dict):
            return raw, False
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        self.text_bytes += _event_text(event)
        if event.get("type") in _FINAL_TYPES:
            response = event.get("response")
            self._note(*body_usage(response)[:2])
            return raw, True
        if not isinstance(event.get("usage"), dict):
            return raw, False
        self._note(valid_usage(usage_of(event["usage"])), self.model)
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
        if usage is None:
            return
        self.usage = usage
        self.cost = self.price(usage, self.model)

    def feed(self, chunk: bytes) -> list[tuple[bytes, bool]]:
        """The events completed by ``chunk``: (bytes to send, ends the stream)."""
        if self._blind:
            return [(chunk, False)]
        buffer = self._buffer + chunk
        out: list[tuple[bytes, bool]] = []
        while True:
            # An SSE event ends at a blank line (\n\n, or \r\n\r\n).
            ends = [i for i in (buffer.find(b"\n\n"), buffer.find(b"\r\n\r\n")) if i >= 0]
            if not ends:
                break
            end = min(ends)
            size = 4 if buffer[end : end + 4] == b"\r\n\r\n" else 2
            raw, buffer = buffer[: end + size], buffer[end + size :]
            sent, final = self._event(raw)
            if sent is not None:
                out.append((sent, final))
        if len(buffer) > MAX_EVENT_BYTES:
            out.append((buffer, False))
            self._blind, buffer = True, b""
        self._buffer = buffer
        return out

    def flush(self) -> bytes:
        """What is left of an unfinished last event."""
        rest, self._buffer = self._buffer, b""
        return rest
