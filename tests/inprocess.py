"""openai clients wired to an in-process transport: many calls, no sockets."""

from __future__ import annotations

import json
from typing import Any

import openai
import openai._base_client as base_client

from tokenlay_otel._fake_openai import chat_chunks, chat_completion, sse

from .conftest import PROVIDER_KEY

# openai 1.x sends with httpx, 3.x with httpx2: use whichever this openai uses.
httpx: Any = getattr(base_client, "httpx2", None) or base_client.httpx


def _reply(request: Any) -> Any:
    body = json.loads(request.content)
    user = body["messages"][0]["content"]
    # Usage that depends on the caller, so sums can be checked per user.
    prompt, completion = 10 + len(user), 3 + len(user) % 7
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}  # fmt: skip
    if body.get("stream"):
        chunks = chat_chunks("gpt-4o-mini", ("a", "b", "c"), usage=usage, id="c", created=1)
        return httpx.Response(200, content=sse(chunks),
                              headers={"content-type": "text/event-stream"})  # fmt: skip
    reply = chat_completion("gpt-4o-mini", usage=usage)
    return httpx.Response(200, content=json.dumps(reply).encode(),
                          headers={"content-type": "application/json"})  # fmt: skip


def sync_client() -> openai.OpenAI:
    return openai.OpenAI(
        api_key=PROVIDER_KEY,
        base_url="https://api.openai.com/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(_reply)),
    )


def async_client() -> openai.AsyncOpenAI:
    async def handler(request: Any) -> Any:
        return _reply(request)

    return openai.AsyncOpenAI(
        api_key=PROVIDER_KEY,
        base_url="https://api.openai.com/v1",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
