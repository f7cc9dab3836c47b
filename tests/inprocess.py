"""openai clients wired to an in-process transport: many calls, no sockets."""

from __future__ import annotations

import json
from typing import Any

import openai
import openai._base_client as base_client

from tokenlay_otel.testing import chat_completion

from .conftest import PROVIDER_KEY

# openai 1.x sends with httpx, 3.x with httpx2: use whichever this openai uses.
httpx: Any = getattr(base_client, "httpx2", None) or base_client.httpx


def _reply(request: Any) -> Any:
    body = json.loads(request.content)
    user = body["messages"][0]["content"]
    # Usage that depends on the caller, so sums can be checked per user.
    prompt, completion = 10 + len(user), 3 + len(user) % 7
    if body.get("stream"):
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
        events = [
            {**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
            for w in ("a", "b", "c")
        ]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}  # fmt: skip
        events.append({**base, "choices": [], "usage": usage})
        data = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
        return httpx.Response(200, content=data + b"data: [DONE]\n\n",
                              headers={"content-type": "text/event-stream"})  # fmt: skip
    reply = chat_completion("gpt-4o-mini")
    reply["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}  # fmt: skip
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
