"""A loopback OpenAI-compatible HTTP server that records every request.

For tests and offline demos: it answers chat, legacy completions, embeddings and
Responses API calls (JSON and SSE streams, with usage), can add ``x-tokenlay-*``
response headers, and can be told to fail. Standard library only.

Example::

    with FakeOpenAIServer() as server:
        client = TokenlayOpenAI(tokenlay_base_url=server.url, ...)
        client.chat.completions.create(model="gpt-4o-mini", messages=[...])
        print(server.requests[-1].headers["x-tokenlay-user"])
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from ._fake_openai import (
    SSE_DONE,
    chat_chunks,
    chat_completion,
    chat_usage,
    completion,
    embeddings,
    response_body,
    response_events,
    sse_event,
)

__all__ = ["FakeOpenAIServer", "RecordedRequest", "Reply"]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived on the wire."""

    method: str
    path: str
    #: Header lines in arrival order, names as sent.
    raw_headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        """Headers by lower-cased name (the last value when a name repeats)."""
        return {name.lower(): value for name, value in self.raw_headers}

    def header_values(self, name: str) -> list[str]:
        """Every value sent under ``name`` (case-insensitive)."""
        return [v for n, v in self.raw_headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Reply:
    """A scripted answer for the next request."""

    status: int = 200
    body: Any = None
    #: Sent instead of the server-wide ``response_headers``.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Answer with these server-sent events instead of ``body``.
    events: list[dict[str, Any]] | None = None
    #: With ``events``: drop the connection after this many, without ending the stream.
    disconnect_after: int | None = None


class _Server(ThreadingHTTPServer):
    # Many concurrent clients connect at once in tests: the default backlog of 5 would
    # refuse some of them.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-stream is normal here


class FakeOpenAIServer:
    """Serve OpenAI-shaped answers on ``127.0.0.1`` and record every request.

    Args:
        response_headers: headers added to every answer (e.g. ``x-tokenlay-*``).
        stream_words: the words a streamed answer is made of.
    """

    def __init__(
        self,
        *,
        response_headers: Mapping[str, str] | None = None,
        stream_words: list[str] | None = None,
    ) -> None:
        self.requests: list[RecordedRequest] = []
        self.response_headers: dict[str, str] = dict(response_headers or {})
        self.stream_words = stream_words or ["Hello", " from", " the", " fake", " server."]
        self.stream_delay = 0.0
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def reply(self, reply: Reply) -> None:
        """Answer the next request with ``reply`` instead of the default."""
        with self._lock:
            self._replies.append(reply)

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _record(self, request: RecordedRequest) -> Reply | None:
        with self._lock:
            self.requests.append(request)
            return self._replies.popleft() if self._replies else None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

            def do_GET(self) -> None:
                self._serve(b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self._serve(self.rfile.read(length))

            def _serve(self, body: bytes) -> None:
                recorded = RecordedRequest(
                    method=self.command,
                    path=self.path,
                    raw_headers=tuple(self.headers.items()),
                    body=body,
                )
                scripted = server._record(recorded)
                if scripted is not None and scripted.events is not None:
                    self._send_sse(
                        scripted.events,
                        disconnect_after=scripted.disconnect_after,
                        headers=scripted.headers,
                    )
                    return
                if scripted is not None:
                    self._send_json(
                        scripted.status, scripted.body, scripted.headers, defaults=False
                    )
                    return
                try:
                    payload = json.loads(body) if body else {}
                except ValueError:
                    self._send_json(400, {"error": {"message": "invalid JSON"}}, {})
                    return
                self._default(payload)

            def _default(self, payload: dict[str, Any]) -> None:
                path = self.path.split("?")[0]
                model = str(payload.get("model") or "gpt-4o-mini")
                if path.endswith("/chat/completions"):
                    if payload.get("stream"):
                        opts = payload.get("stream_options") or {}
                        words = server.stream_words
                        usage = chat_usage(12, len(words)) if opts.get("include_usage") else None
                        self._send_sse(chat_chunks(model, words, usage=usage))
                    else:
                        self._send_json(200, chat_completion(model), {})
                elif path.endswith("/embeddings"):
                    inputs = payload.get("input")
                    count = len(inputs) if isinstance(inputs, list) else 1
                    reply = embeddings(model, [[0.1, 0.2, 0.3]] * count, 5 * count)
                    self._send_json(200, reply, {})
                elif path.endswith("/completions"):
                    self._send_json(200, completion(model), {})
                elif path.endswith("/responses"):
                    if payload.get("stream"):
                        final = response_body(model, "".join(server.stream_words))
                        events = response_events(final, server.stream_words)
                        self._send_sse(events, named=True)
                    else:
                        self._send_json(200, response_body(model), {})
                elif path.endswith("/models"):
                    self._send_json(200, {"object": "list", "data": []}, {})
                else:
                    self._send_json(404, {"error": {"message": f"no route {path}"}}, {})

            def _headers_out(self, extra: Mapping[str, str], *, defaults: bool = True) -> None:
                merged = {**server.response_headers, **extra} if defaults else extra
                for name, value in merged.items():
                    self.send_header(name, value)

            def _send_json(
                self, status: int, body: Any, headers: Mapping[str, str], *, defaults: bool = True
            ) -> None:
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self._headers_out(headers, defaults=defaults)
                self.end_headers()
                self.wfile.write(data)

            def _send_sse(
                self,
                events: Iterable[dict[str, Any]],
                *,
                named: bool = False,
                disconnect_after: int | None = None,
                headers: Mapping[str, str] | None = None,
            ) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self._headers_out(headers or {}, defaults=headers is None)
                self.end_headers()
                try:
                    for sent, event in enumerate(events):
                        if disconnect_after is not None and sent >= disconnect_after:
                            self.wfile.flush()
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        self._chunk(sse_event(event, named=named))
                        if server.stream_delay:
                            time.sleep(server.stream_delay)
                    if not named:
                        self._chunk(SSE_DONE)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: an abandoned stream

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler
