"""What the gateway says over HTTP: the request it read, its error bodies and headers.

Pure builders, apart from :func:`send_json`, the one ASGI helper for a whole answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from opentelemetry.trace import Span

from tokenlay_otel._conventions import HTTP_STATUS_CODE
from tokenlay_otel._usage import Usage
from tokenlay_otel._wire import RuleAction, TokenlayResponseMetadata, response_headers

from .limits import Decision

__all__ = [
    "ASGIReceive",
    "ASGISend",
    "Incoming",
    "Responder",
    "decision_headers",
    "error_body",
    "send_json",
    "usage_headers",
    "valid_cost",
]

ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request the gateway has read and checked."""

    method: str
    suffix: str  # the path after /v1
    query: str
    endpoint: str | None  # a metered endpoint (chat/completions, ...) or None
    body: bytes | None  # None: a pass-through POST whose body is streamed upstream
    data: dict[str, Any] | None  # the JSON body of a metered endpoint
    metadata: dict[str, str]
    provider_key: str
    provider_base: str | None  # None with the mock upstream
    base: str
    content_type: str
    forwarded: dict[str, str]


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def decision_headers(decision: Decision, requested_model: str | None) -> dict[str, str]:
    ruled = decision.rule is not None
    return response_headers(
        TokenlayResponseMetadata(
            rule_action=cast(RuleAction, decision.action),
            rule_id=decision.rule.id if decision.rule is not None else None,
            limit_exceeded=decision.limit_exceeded if ruled else None,
            warnings=tuple(decision.warnings) if decision.warnings else None,
            model=decision.model if decision.model and decision.model != requested_model else None,
        )
    )


def usage_headers(usage: Usage, cost: float | None, started: float) -> dict[str, str]:
    return response_headers(
        TokenlayResponseMetadata(
            duration_ms=int((time.perf_counter() - started) * 1000),
            cost=cost,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            tokens_used=(usage.input_tokens or 0) + (usage.output_tokens or 0),
        )
    )


def valid_cost(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) and value >= 0 else None


async def send_json(
    send: ASGISend, status: int, body: Any, headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    raw += [(k.encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Responder:
    """Sends one answer over ASGI, once the client is gone not at all."""

    span: Span
    send: ASGISend
    send_timeout_s: float
    gone: bool
    response_started: bool
    finished: bool

    def _client_gone(self) -> None:
        self.gone = True

    def _send_stalled(self) -> None:
        self.gone = True

    def _last_piece(self) -> None:
        """Called just before an answer's last piece is sent."""

    async def _send_error(
        self,
        status: int,
        message: str,
        code: str | None,
        headers: dict[str, str] | None = None,
        *,
        kind: str = "upstream_error",
    ) -> None:
        payload = json.dumps(error_body(message, kind, code)).encode()
        await self._send_whole(status, payload, "application/json", headers or {})

    async def _send_whole(
        self, status: int, payload: bytes, content_type: str, headers: dict[str, str]
    ) -> None:
        headers = {**headers, "content-length": str(len(payload))}
        await self._start(status, content_type, headers)
        await self._body(payload, more=False)

    async def _start(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        self.span.set_attribute(HTTP_STATUS_CODE, status)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        if content_type:
            raw.append((b"content-type", content_type.encode("latin-1")))
        self.response_started = True
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def _body(self, data: bytes, *, more: bool = True) -> None:
        if not more:
            self.finished = True
            self._last_piece()
        if data or not more:
            await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def _send(self, message: dict[str, Any]) -> None:
        if self.gone:
            return
        # A client that stops reading would hold the call, its slot and its upstream
        # connection for as long as it liked. (A timer handle, not asyncio.timeout:
        # 3.3 against 8.3 µs, on every piece of every answer.)
        stalled = asyncio.get_running_loop().call_later(self.send_timeout_s, self._send_stalled)
        try:
            await self.send(message)
        except (OSError, RuntimeError):
            # OSError: servers that raise on a closed connection (ASGI 2.4); RuntimeError:
            # a response the server already ended (its graceful shutdown gave up on it).
            if not self.gone:
                self._client_gone()
        finally:
            stalled.cancel()
