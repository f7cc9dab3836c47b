"""``--mock-upstream``: a deterministic OpenAI-compatible upstream inside the proxy.

It answers through the same interface as the real upstream client
(:class:`~.h1.Upstream`), so the proxy's forwarding code runs unchanged;
answers carry realistic token counts (about four characters a token) and stream with
a usage chunk when asked, so demos and tests need no keys and no network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from tokenlay_otel._fake_openai import (
    SSE_DONE,
    chat_chunks,
    chat_completion,
    chat_usage,
    completion,
    embeddings,
    response_body,
    sse_event,
)

__all__ = ["MockUpstream"]

_REPLIES = (
    "Sure — here is a short answer to your question.",
    "Happy to help. The key point is to keep it simple.",
    "Here is what I found: it depends on your usage pattern.",
)


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    if isinstance(body.get("messages"), list):
        return sum(4 + _tokens(_text_of(m.get("content"))) for m in body["messages"]) + 3
    value = body.get("input", body.get("prompt", ""))
    if isinstance(value, list):
        return sum(_tokens(_text_of(v) if not isinstance(v, str) else v) for v in value)
    return _tokens(str(value))


def _reply(body: dict[str, Any]) -> str:
    seed = json.dumps(
        body.get("messages") or body.get("input") or body.get("prompt"), sort_keys=True
    )
    return _REPLIES[int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(_REPLIES)]


def _chat(body: dict[str, Any], model: str, cached: int = 0) -> dict[str, Any]:
    text = _reply(body)
    usage = chat_usage(_prompt_tokens(body), _tokens(text), cached)
    return chat_completion(
        model,
        text,
        usage=usage,
        id="chatcmpl-mock",
        created=int(time.time()),
        fingerprint="fp_mock",
    )


async def _chat_stream(body: dict[str, Any], model: str) -> AsyncIterator[bytes]:
    words = [w + " " for w in _reply(body).split(" ")]
    words[-1] = words[-1].rstrip()
    usage = None
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = chat_usage(_prompt_tokens(body), _tokens("".join(words)))
    chunks = chat_chunks(model, words, usage=usage, id="chatcmpl-mock", created=int(time.time()))
    for i, chunk in enumerate(chunks):
        yield sse_event(chunk)
        if i < len(words):  # paced like a model writing, word by word
            await asyncio.sleep(0.005)
    yield SSE_DONE


def _responses(body: dict[str, Any], model: str) -> dict[str, Any]:
    text = _reply(body)
    return response_body(
        model,
        text,
        input_tokens=_prompt_tokens(body),
        output_tokens=_tokens(text),
        id="resp_mock",
        message_id="msg_mock",
        created=int(time.time()),
    )


def _embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) else 1
    vectors = [[0.01 * (i + 1)] * 8 for i in range(count)]
    return embeddings(model, vectors, _prompt_tokens(body))


def _json(status: int, data: Any) -> MockAnswer:
    return MockAnswer(status, "application/json", json.dumps(data).encode())


def _cached_tokens(seen: set[str], body: dict[str, Any]) -> int:
    """Like a provider's prompt cache: a prompt seen before has half its tokens cached."""
    key = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()
    if key in seen:
        return _prompt_tokens(body) // 2
    if len(seen) < 10_000:
        seen.add(key)
    return 0


def _handle(method: str, path: str, content: bytes, seen: set[str]) -> MockAnswer:
    path = path.split("?", 1)[0].rstrip("/")
    if method == "GET" and path.endswith("/models"):
        return _json(200, {"object": "list", "data": [{"id": "mock-model", "object": "model"}]})
    try:
        body = json.loads(content or b"{}")
    except ValueError:
        return _json(
            400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}}
        )
    model = str(body.get("model") or "gpt-4o-mini")
    if path.endswith("/chat/completions"):
        if body.get("stream"):
            return MockAnswer(200, "text/event-stream", _chat_stream(body, model))
        return _json(200, _chat(body, model, _cached_tokens(seen, body)))
    if path.endswith("/responses"):
        return _json(200, _responses(body, model))
    if path.endswith("/embeddings"):
        return _json(200, _embeddings(body, model))
    if path.endswith("/completions"):
        as_chat = {"messages": [{"content": body.get("prompt", "")}]}
        text = _reply(as_chat)
        prompt, output = _prompt_tokens(as_chat), _tokens(text)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
        }
        reply = completion(model, text, usage=usage, id="cmpl-mock", created=int(time.time()))
        return _json(200, reply)
    return _json(
        404, {"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}}
    )


class MockAnswer:
    """A canned answer, read as the real client's :class:`~.h1.Answer` is."""

    def __init__(self, status: int, content_type: str, body: bytes | AsyncIterator[bytes]) -> None:
        self.status = status
        self.headers = [("content-type", content_type)]
        self._body = body

    def header(self, name: str) -> str | None:
        return dict(self.headers).get(name)

    async def chunks(self) -> AsyncIterator[bytes]:
        if isinstance(self._body, bytes):
            yield self._body
            return
        async for chunk in self._body:
            yield chunk

    async def aclose(self) -> None:
        if not isinstance(self._body, bytes):
            await self._body.aclose()  # type: ignore[attr-defined]  # an async generator


class MockUpstream:
    """The mock upstream as the proxy's upstream client."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    async def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> MockAnswer:
        if body is not None and not isinstance(body, bytes):
            body = b"".join([chunk async for chunk in body])
        path = "/" + url.split("://", 1)[-1].partition("/")[2]
        return _handle(method, path, body or b"", self._seen)

    async def aclose(self) -> None:
        pass
