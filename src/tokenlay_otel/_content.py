"""Prompts and completions as ``gen_ai.input.messages``/``gen_ai.output.messages`` JSON.

Only used when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` allows it. Pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._usage import _get

__all__ = ["input_messages", "output_messages", "stream_output_messages"]


def _items(value: Any) -> list[Any]:
    """A list field, or nothing: data from the wire may not have the expected shape."""
    return list(value) if isinstance(value, list | tuple) else []


def _text_parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    if isinstance(content, list):
        for item in content:
            text = _get(item, "text")
            if isinstance(text, str):
                parts.append({"type": "text", "content": text})
    return parts


def _tool_calls(message: Any) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for call in _items(_get(message, "tool_calls")):
        function = _get(call, "function")
        parts.append(
            {
                "type": "tool_call",
                "id": _get(call, "id"),
                "name": _get(function, "name"),
                "arguments": _get(function, "arguments"),
            }
        )
    return parts


def input_messages(body: Mapping[str, Any]) -> str | None:
    """The request's messages (chat), input (responses) or prompt (completions)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("messages"), list):
        for message in body["messages"]:
            parts = _text_parts(_get(message, "content")) + _tool_calls(message)
            messages.append({"role": _get(message, "role"), "parts": parts})
    elif "input" in body and "model" in body and not isinstance(body.get("dimensions"), int):
        value = body["input"]
        if isinstance(value, str):
            messages.append({"role": "user", "parts": _text_parts(value)})
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    messages.append({"role": "user", "parts": _text_parts(item)})
                else:
                    role = _get(item, "role") or "user"
                    messages.append({"role": role, "parts": _text_parts(_get(item, "content"))})
    elif isinstance(body.get("prompt"), str):
        messages.append({"role": "user", "parts": _text_parts(body["prompt"])})
    if isinstance(body.get("instructions"), str):
        messages.insert(0, {"role": "system", "parts": _text_parts(body["instructions"])})
    return json.dumps(messages, ensure_ascii=False, default=str) if messages else None


def output_messages(response: Any) -> str | None:
    """The response's choices (chat, completions) or output items (responses)."""
    messages: list[dict[str, Any]] = []
    for choice in _items(_get(response, "choices")):
        message = _get(choice, "message")
        if message is not None:
            parts = _text_parts(_get(message, "content")) + _tool_calls(message)
        else:
            parts = _text_parts(_get(choice, "text"))
        messages.append(
            {"role": "assistant", "parts": parts, "finish_reason": _get(choice, "finish_reason")}
        )
    for item in _items(_get(response, "output")):
        if _get(item, "type") == "message":
            messages.append({"role": "assistant", "parts": _text_parts(_get(item, "content"))})
        elif _get(item, "type") == "function_call":
            part = {
                "type": "tool_call",
                "id": _get(item, "call_id"),
                "name": _get(item, "name"),
                "arguments": _get(item, "arguments"),
            }
            messages.append({"role": "assistant", "parts": [part]})
    return json.dumps(messages, ensure_ascii=False, default=str) if messages else None


def stream_output_messages(texts: Mapping[int, list[str]], reasons: Mapping[int, str]) -> str:
    """Output messages from the text deltas a stream carried, per choice index."""
    messages = [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "".join(texts.get(i, []))}],
            "finish_reason": reasons.get(i),
        }
        for i in sorted(set(texts) | set(reasons))
    ]
    return json.dumps(messages, ensure_ascii=False)
