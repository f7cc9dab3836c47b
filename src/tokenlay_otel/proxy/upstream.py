"""Forwarding to the provider, and reading usage out of what passes through.

Streams are relayed event by event as they arrive (no buffering beyond one SSE event);
only the final usage event is parsed, to count usage, add ``usage.cost`` to it, or drop
it when the proxy asked for it on the caller's behalf.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from tokenlay_otel._attributes import Usage, usage_of

__all__ = ["StreamTap", "body_usage", "with_stream_usage"]

_USAGE_OPTION_PATHS = ("/chat/completions", "/completions")


def with_stream_usage(path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Ask upstream for a usage chunk when the caller did not; (body, injected)."""
    if body.get("stream") is not True or not path.endswith(_USAGE_OPTION_PATHS):
        return body, False
    options = body.get("stream_options")
    if isinstance(options, dict) and "include_usage" in options:
        return body, False
    options = dict(options) if isinstance(options, dict) else {}
    return {**body, "stream_options": {**options, "include_usage": True}}, True


def body_usage(data: Any) -> tuple[Usage | None, str | None]:
    """Usage and response model of a JSON response body."""
    if not isinstance(data, dict):
        return None, None
    model = data.get("model") if isinstance(data.get("model"), str) else None
    return usage_of(data.get("usage")), model


@dataclass
class StreamTap:
    """Relays SSE bytes, noting usage; calls ``price`` to put the cost into the chunk."""

    price: Callable[[Usage, str | None], float | None]
    drop_usage_chunk: bool
    usage: Usage | None = None
    model: str | None = None
    cost: float | None = None

    def _event(self, raw: bytes) -> bytes | None:
        text = raw.decode("utf-8", errors="replace")
        data_lines = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        if not data_lines or data_lines[0] == "[DONE]":
            return raw
        try:
            event = json.loads("\n".join(data_lines))
        except ValueError:
            return raw
        if not isinstance(event, dict):
            return raw
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        if event.get("type") in ("response.completed", "response.incomplete"):
            response = event.get("response") or {}
            self.usage, self.model = body_usage(response)
            if self.usage is not None:
                self.cost = self.price(self.usage, self.model)
            return raw
        if event.get("usage") and not event.get("choices"):
            self.usage = usage_of(event["usage"])
            if self.usage is None:
                return raw
            self.cost = self.price(self.usage, self.model)
            if self.drop_usage_chunk:
                return None
            if self.cost is not None:
                event["usage"] = {**event["usage"], "cost": self.cost}
            return f"data: {json.dumps(event)}\n\n".encode()
        return raw

    async def relay(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        buffer = b""
        async for chunk in chunks:
            buffer += chunk
            while True:
                # An SSE event ends at a blank line (\n\n, or \r\n\r\n).
                ends = [i for i in (buffer.find(b"\n\n"), buffer.find(b"\r\n\r\n")) if i >= 0]
                if not ends:
                    break
                end = min(ends)
                size = 4 if buffer[end : end + 4] == b"\r\n\r\n" else 2
                raw, buffer = buffer[: end + size], buffer[end + size :]
                out = self._event(raw)
                if out is not None:
                    yield out
        if buffer:
            yield buffer
