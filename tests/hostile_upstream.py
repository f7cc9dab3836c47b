"""An upstream on 127.0.0.1 that answers with exactly the bytes a test gives it.

For what a well-behaved server cannot send: a body shorter than its content-length, a
connection dropped mid-stream, numbers no provider would report.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def http_response(
    body: bytes,
    *,
    status: int = 200,
    content_type: str = "application/json",
    content_length: int | None = None,
) -> bytes:
    length = len(body) if content_length is None else content_length
    head = (
        f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
        f"content-length: {length}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def sse_response(
    events: list[Any], *, done: bool = True, end: bytes = b"\n\n", after: list[Any] = ()
) -> bytes:
    """An SSE answer: ``events``, ``[DONE]``, then ``after`` (what no server should send)."""

    def lines(items: list[Any]) -> bytes:
        return b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + end for e in items)

    body = lines(events) + (b"data: [DONE]" + end if done else b"") + lines(list(after))
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    return head + body  # no length: the body ends when the connection closes


def chat_body(usage: Any, text: str = "Hello from a hostile server.") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-h",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    ).encode()


class RawUpstream:
    """Answers each connection with the next scripted bytes (the last one repeats)."""

    def __init__(self) -> None:
        self.answers: list[bytes] = [http_response(chat_body({"prompt_tokens": 1}))]
        self.connections = 0
        #: The head of each request received (request line and headers).
        self.heads: list[bytes] = []
        #: When set, each answer waits until the event is set (an upstream that hangs).
        self.hold: threading.Event | None = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            threading.Thread(target=self._answer, args=(conn, answer), daemon=True).start()

    def _answer(self, conn: socket.socket, answer: bytes) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                self.heads.append(head)
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                        while len(body) < length:
                            body += conn.recv(65536)
                if self.hold is not None:
                    self.hold.wait(10)
                conn.sendall(answer)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self._sock.close()


@contextmanager
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    try:
        yield upstream
    finally:
        upstream.close()
