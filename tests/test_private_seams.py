"""Each shortcut into another library's private internals against the public way.

The hot path reads a few private attributes where the public way costs a measured
share of a call's overhead (see each seam's comment). An upgrade of openai, httpx,
httpx2 or pydantic that changes them must fail here, not silently in production:
these run on every supported openai line (1.x with httpx, 3.x with httpx2).
"""

from __future__ import annotations

from typing import Any

import httpx
import httpx2
import openai
import pytest
from openai._models import construct_type
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_usage import CompletionUsage

from tokenlay_otel._attributes import fields_of
from tokenlay_otel._wire import parse_response_headers
from tokenlay_otel.testing import chat_completion

HEADER_SETS = [
    [],
    [("content-type", "application/json"), ("x-request-id", "r1")],
    [("X-Tokenlay-Rule-Action", "allow"), ("x-tokenlay-cost", "0.000123")],
    [("x-tokenlay-input-tokens", "12"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
     ("x-tokenlay-warnings", "near%20limit"), ("x-tokenlay-model", "gpt-4o-mini")],
    [("x-tokenlay-unknown", "v"), ("x-tokenlay-output-tokens", "not a number")],
    [("x-tokenlay-model", "modèle")],
]  # fmt: skip


@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
@pytest.mark.parametrize("pairs", HEADER_SETS)
def test_response_headers_read_as_httpx_keeps_them(module: Any, pairs: list) -> None:
    # _wire.response._tokenlay_headers searches httpx's (raw, lower-case, value) triples.
    headers = module.Headers([(k.encode(), v.encode()) for k, v in pairs])
    triples = getattr(headers, "_list", None)
    assert isinstance(triples, list)
    assert [(t[1], t[2]) for t in triples] == [(k.lower().encode(), v.encode()) for k, v in pairs]
    public = {k: v for k, v in headers.items()}  # a plain mapping takes the public path
    assert parse_response_headers(headers) == parse_response_headers(public)


def _models() -> list[object]:
    completion = construct_type(type_=ChatCompletion, value=chat_completion("m"))
    chunk = ChatCompletionChunk.model_validate(
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    )  # fmt: skip
    usage = CompletionUsage.model_validate(
        {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "cost": 0.5}
    )
    return [completion, chunk, chunk.choices[0], usage, completion.choices[0].message]


@pytest.mark.parametrize("model", _models(), ids=lambda m: type(m).__name__)
def test_model_fields_read_from_dict_are_its_attributes(model: Any) -> None:
    # _attributes.fields_of reads a pydantic model's __dict__ and __pydantic_extra__.
    names = (*type(model).model_fields, *(model.model_extra or {}), "no_such_field")
    found = fields_of(model, names)
    assert {name: found.get(name) for name in names} == {
        name: getattr(model, name, None) for name in names
    }


@pytest.mark.parametrize(
    "defaults",
    [None, {}, {"X-Tokenlay-User": "u1", "x-custom": "c"}, {"Authorization": "Bearer other"}],
)
@pytest.mark.parametrize("kind", [openai.OpenAI, openai.AsyncOpenAI, openai.AzureOpenAI])
def test_a_clients_built_headers_are_what_default_headers_carries(
    kind: Any, defaults: dict[str, str] | None
) -> None:
    # _outgoing.built_headers reads openai's _custom_headers.
    from tokenlay_otel._outgoing import built_headers

    extra = {"api_version": "2024-10-21", "azure_endpoint": "https://x.openai.azure.com"}
    client = kind(
        api_key="sk-test", default_headers=defaults, **(extra if kind is openai.AzureOpenAI else {})
    )
    public = client.default_headers
    built = built_headers(client)
    assert dict(built) == {k: public[k] for k in (defaults or {})}
    assert built is built_headers(client)  # one object per client: it keys a cache
    copied = client.with_options(default_headers={"x-tokenlay-org": "o1"})
    assert dict(built_headers(copied)) == {**(defaults or {}), "x-tokenlay-org": "o1"}
