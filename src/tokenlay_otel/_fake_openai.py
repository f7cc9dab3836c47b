"""OpenAI-shaped answers, built in one place for every fake upstream.

:class:`tokenlay_otel.testing.FakeOpenAIServer`, the proxy's ``--mock-upstream`` and
the tests' in-process transport all answer with these bodies and SSE streams; each
chooses only its texts, ids and token counts. Pure builders: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CREATED",
    "DEFAULT_TEXT",
    "SSE_DONE",
    "chat_chunks",
    "chat_completion",
    "chat_usage",
    "completion",
    "embeddings",
    "response_body",
    "response_events",
    "sse",
    "sse_event",
]

#: The ``created`` time of a deterministic answer.
CREATED = 1_700_000_000
DEFAULT_TEXT = "Hello from the fake server."


def chat_usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """The ``usage`` of a chat or legacy completion (details included)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def chat_completion(
    model: str,
    text: str = DEFAULT_TEXT,
    *,
    usage: dict[str, Any] | None = None,
    id: str = "chatcmpl-fake-1",  # the field's name in the body
    created: int = CREATED,
    fingerprint: str = "fp_fake",
) -> dict[str, Any]:
    """A ``chat.completion`` body (usage 12 + 7 tokens unless given)."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": chat_usage(12, 7) if usage is None else usage,
    }


def chat_chunks(
    model: str,
    words: Sequence[str],
    *,
    usage: dict[str, Any] | None = None,
    id: str = "chatcmpl-fake-s",
    created: int = CREATED,
) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` events of a stream: one per word, the finish, and
    a usage chunk when ``usage`` is given (as with ``stream_options.include_usage``)."""
    base = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    chunks = []
    for i, word in enumerate(words):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
        chunks.append({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage is not None:
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


def completion(
    model: str,
    text: str = " world",
    *,
    usage: dict[str, Any] | None = None,
    id: str = "cmpl-fake-1",
    created: int = CREATED,
) -> dict[str, Any]:
    """A legacy ``text_completion`` body (usage 3 + 1 tokens unless given)."""
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        if usage is None
        else usage,
    }


def embeddings(
    model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int
) -> dict[str, Any]:
    """An embeddings list, one ``vectors`` item per input."""
    return {
        "object": "list",
        "model": model,
        "data": [
            {"object": "embedding", "index": i, "embedding": list(vector)}
            for i, vector in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def response_body(
    model: str,
    text: str = DEFAULT_TEXT,
    *,
    input_tokens: int = 9,
    output_tokens: int = 6,
    id: str = "resp_fake_1",
    message_id: str = "msg_fake_1",
    created: int = CREATED,
) -> dict[str, Any]:
    """A completed Responses API ``response`` body."""
    return {
        "id": id,
        "object": "response",
        "created_at": created,
        "status": "completed",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": message_id,
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def response_events(final: dict[str, Any], words: Sequence[str]) -> list[dict[str, Any]]:
    """The Responses API stream that ends in ``final`` (a :func:`response_body` whose
    text is ``words`` joined), numbered as the API numbers them."""
    text = "".join(words)
    started = {**final, "status": "in_progress", "output": [], "usage": None}
    item = {**final["output"][0], "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **where, "part": part},
    ]
    for word in words:
        events.append(
            {"type": "response.output_text.delta", **where, "delta": word, "logprobs": []}
        )
    events += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": final["output"][0]},
        {"type": "response.completed", "response": final},
    ]
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


def sse_event(event: dict[str, Any], *, named: bool = False) -> bytes:
    """One server-sent event; ``named`` adds the ``event:`` line (the Responses API)."""
    line = f"data: {json.dumps(event)}\n\n"
    return (f"event: {event['type']}\n" + line if named else line).encode()


#: What ends a chat or completions stream (a Responses stream ends with its last event).
SSE_DONE = b"data: [DONE]\n\n"


def sse(events: Iterable[dict[str, Any]], *, named: bool = False) -> bytes:
    """A whole stream: the events, then ``[DONE]`` unless they are named."""
    body = b"".join(sse_event(event, named=named) for event in events)
    return body if named else body + SSE_DONE
