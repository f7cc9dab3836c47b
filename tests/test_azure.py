"""Azure OpenAI called directly (not routed), through openai's own ``AzureOpenAI``.

The "Azure" here is a loopback server reached as ``myres.openai.azure.com`` through an
HTTP proxy setting on the client (so the SDK sees Azure's host name). It answers as
Azure does: old api-versions reject ``stream_options`` with a 400, and a stream opens
with a ``prompt_filter_results`` chunk whose ``id`` and ``model`` are empty.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import openai
import pytest

from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

MESSAGES = [{"role": "user", "content": "hi"}]
HOST = "myres.openai.azure.com"
DEPLOYMENT = "chat-prod"  # a deployment name: no price is known for it
MODEL = "gpt-4o-mini-2024-07-18"  # what Azure names in its answers
WORDS = ["Hello", " from", " Azure."]
# Versions this server treats as predating stream_options (the real service answers
# these with the 400 below).
OLD_VERSIONS = frozenset({"2023-05-15", "2024-02-01", "2024-06-01", "2024-08-01-preview"})
UNRECOGNIZED = "Unrecognized request argument supplied: stream_options"
_FILTER = {"hate": {"filtered": False, "severity": "safe"}}


class Recorded:
    def __init__(self, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        self.path = path
        self.query = query
        self.body = body


class AzureLikeServer:
    """Answers chat and completions the way Azure OpenAI does, and records each request
    (path, query, JSON body)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> AzureLikeServer:
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def answer(self, recorded: Recorded) -> tuple[int, str, bytes]:
        body, version = recorded.body, recorded.query.get("api-version", [""])[0]
        if "stream_options" in body and version in OLD_VERSIONS:
            error = {"code": None, "message": UNRECOGNIZED, "param": None, "type": None}
            return 400, "application/json", json.dumps({"error": error}).encode()
        chat = recorded.path.endswith("/chat/completions")
        if not body.get("stream"):
            return 200, "application/json", json.dumps(_whole(chat)).encode()
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in _chunks(chat, usage))
        return 200, "text/event-stream", events + b"data: [DONE]\n\n"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                url = urlsplit(self.path)  # absolute: we are the client's proxy
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                recorded = Recorded(url.path, parse_qs(url.query), body)
                assert url.hostname == HOST
                server.requests.append(recorded)
                status, kind, data = server.answer(recorded)
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _usage(completion: int) -> dict[str, Any]:
    return {"prompt_tokens": 9, "completion_tokens": completion, "total_tokens": 9 + completion}


def _whole(chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "".join(WORDS)}
    else:
        choice["text"] = "".join(WORDS)
    return {
        "id": "chatcmpl-azure-1" if chat else "cmpl-azure-1",
        "object": "chat.completion" if chat else "text_completion",
        "created": 1_730_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_azure",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER}],
        "choices": [{**choice, "content_filter_results": _FILTER}],
        "usage": _usage(len(WORDS)),
    }


def _chunks(chat: bool, include_usage: bool) -> Iterator[dict[str, Any]]:
    # Azure's first chunk reports the prompt filter, and names nothing.
    yield {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER}],
    }
    base = {
        "id": "chatcmpl-azure-s" if chat else "cmpl-azure-s",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 1_730_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_azure",
    }
    for i, word in enumerate([*WORDS, None]):
        choice: dict[str, Any] = {"index": 0, "finish_reason": None if word else "stop"}
        if chat:
            choice["delta"] = {"content": word, **({"role": "assistant"} if i == 0 else {})}
        else:
            choice["text"] = word or ""
        yield {**base, "choices": [{**choice, "content_filter_results": _FILTER}]}
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(len(WORDS))}


@pytest.fixture
def azure() -> Iterator[AzureLikeServer]:
    with AzureLikeServer() as server:
        yield server


def azure_client(server: AzureLikeServer, api_version: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=f"http://{HOST}",
        api_version=api_version,
        api_key=PROVIDER_KEY,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(proxy=server.proxy),
    )


def stream_chat(client: openai.AzureOpenAI, **kwargs: Any) -> list[Any]:
    return list(
        client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True, **kwargs)
    )


def assert_named_and_priced(telemetry: SpanCapture, *, response_id: str) -> None:
    attrs = telemetry.only_span().attributes
    assert attrs["gen_ai.provider.name"] == "azure.ai.openai"
    assert attrs["server.address"] == HOST
    assert attrs["gen_ai.request.model"] == DEPLOYMENT
    assert attrs["gen_ai.response.model"] == MODEL
    assert attrs["gen_ai.response.id"] == response_id
    assert attrs["openai.response.system_fingerprint"] == "fp_azure"
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (9, 3)
    assert attrs["tokenlay.cost.source"] == "local"
    # gpt-4o-mini: $0.15 / 1M input, $0.60 / 1M output
    assert attrs["tokenlay.cost.usd"] == pytest.approx(9 * 0.15e-6 + 3 * 0.60e-6)
    data = telemetry.metrics()
    (cost,) = data["tokenlay.client.cost"][1]
    assert cost.value == pytest.approx(attrs["tokenlay.cost.usd"])
    (requests,) = data["tokenlay.client.requests"][1]
    (duration,) = data["gen_ai.client.operation.duration"][1]
    for point in (cost, requests, duration):
        assert point.attributes["gen_ai.response.model"] == MODEL
        assert point.attributes["gen_ai.provider.name"] == "azure.ai.openai"
    assert requests.attributes["tokenlay.cost.source"] == "local"
    tokens = {
        p.attributes["gen_ai.token.type"]: p.sum for p in data["gen_ai.client.token.usage"][1]
    }
    assert tokens == {"input": 9, "output": 3}


@pytest.mark.parametrize("api_version", ["2024-10-21", "2024-09-01-preview"])
def test_stream_on_a_version_that_takes_usage_is_named_and_priced(
    azure: AzureLikeServer, instrument, telemetry: SpanCapture, api_version: str
) -> None:
    instrument()
    chunks = stream_chat(azure_client(azure, api_version))

    (sent,) = azure.requests
    assert sent.path == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    assert sent.query["api-version"] == [api_version]
    assert sent.body["stream_options"] == {"include_usage": True}
    # The caller sees Azure's chunks as they came, without the usage chunk we asked for.
    assert chunks[0].choices == [] and chunks[0].id == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks[1:]) == "".join(WORDS)
    assert all(c.usage is None for c in chunks)
    assert_named_and_priced(telemetry, response_id="chatcmpl-azure-s")


@pytest.mark.parametrize("api_version", ["2024-06-01", "2024-08-01-preview"])
def test_stream_on_an_older_version_is_sent_as_the_caller_made_it(
    azure: AzureLikeServer, instrument, telemetry: SpanCapture, api_version: str
) -> None:
    instrument()
    chunks = stream_chat(azure_client(azure, api_version))  # no BadRequestError

    (sent,) = azure.requests
    assert "stream_options" not in sent.body
    assert "".join(c.choices[0].delta.content or "" for c in chunks[1:]) == "".join(WORDS)
    attrs = telemetry.only_span().attributes
    assert attrs["gen_ai.response.model"] == MODEL
    assert attrs["gen_ai.response.id"] == "chatcmpl-azure-s"
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert "gen_ai.usage.input_tokens" not in attrs  # Azure sent none
    (requests,) = telemetry.metrics()["tokenlay.client.requests"][1]
    assert requests.attributes["gen_ai.response.model"] == MODEL
    assert "error.type" not in requests.attributes


def test_the_caller_asking_for_usage_on_an_old_version_gets_azures_answer(
    azure: AzureLikeServer, instrument, telemetry: SpanCapture
) -> None:
    # Our part is to change nothing: the caller's own option meets Azure's own 400.
    instrument()
    with pytest.raises(openai.BadRequestError, match=UNRECOGNIZED):
        stream_chat(azure_client(azure, "2024-06-01"), stream_options={"include_usage": True})
    assert azure.requests[0].body["stream_options"] == {"include_usage": True}
    assert telemetry.only_span().attributes["error.type"] == "400"


@pytest.mark.parametrize(
    ("client_version", "request_version", "added"),
    [("2024-06-01", "2024-10-21", True), ("2024-10-21", "2024-06-01", False)],
)
def test_a_per_request_api_version_decides(
    azure: AzureLikeServer, instrument, client_version: str, request_version: str, added: bool
) -> None:
    instrument()
    client = azure_client(azure, client_version)
    stream_chat(client, extra_query={"api-version": request_version})

    (sent,) = azure.requests
    assert sent.query["api-version"] == [request_version]
    assert ("stream_options" in sent.body) is added


def test_completions_stream_is_named_and_priced(
    azure: AzureLikeServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    client = azure_client(azure, "2024-10-21")
    chunks = list(client.completions.create(model=DEPLOYMENT, prompt="hi", stream=True))

    (sent,) = azure.requests
    assert sent.path == f"/openai/deployments/{DEPLOYMENT}/completions"
    assert sent.body["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].text for c in chunks[1:]) == "".join(WORDS)
    assert_named_and_priced(telemetry, response_id="cmpl-azure-s")


def test_async_stream_is_named_and_priced(
    azure: AzureLikeServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()

    async def main() -> list[Any]:
        async with openai.AsyncAzureOpenAI(
            azure_endpoint=f"http://{HOST}",
            api_version="2024-10-21",
            api_key=PROVIDER_KEY,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(proxy=azure.proxy),
        ) as client:
            s = await client.chat.completions.create(
                model=DEPLOYMENT, messages=MESSAGES, stream=True
            )
            return [chunk async for chunk in s]

    chunks = asyncio.run(main())
    assert all(c.usage is None for c in chunks)
    assert azure.requests[0].body["stream_options"] == {"include_usage": True}
    assert_named_and_priced(telemetry, response_id="chatcmpl-azure-s")


def test_unstreamed_call_is_named_and_priced_as_before(
    azure: AzureLikeServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    reply = azure_client(azure, "2024-06-01").chat.completions.create(
        model=DEPLOYMENT, messages=MESSAGES
    )
    assert reply.model == MODEL
    assert "stream_options" not in azure.requests[0].body
    assert_named_and_priced(telemetry, response_id="chatcmpl-azure-1")


def test_other_openai_compatible_server_gets_nothing_added(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/v1", max_retries=0)
    chunks = list(
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    )
    assert len(chunks) == 6  # five words and the finish chunk, no usage chunk
    sent = server.requests[-1].json()
    assert sent == {"messages": MESSAGES, "model": "gpt-4o-mini", "stream": True}
    assert telemetry.only_span().attributes["gen_ai.response.model"] == "gpt-4o-mini"


def test_routed_azure_stream_still_asks_the_proxy_for_usage(
    server: FakeOpenAIServer, instrument
) -> None:
    # The proxy accepts the option whatever the api-version; routed calls are unchanged.
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    client = openai.OpenAI(
        api_key=PROVIDER_KEY,
        base_url=f"https://{HOST}/openai/deployments/{DEPLOYMENT}",
        default_query={"api-version": "2024-06-01"},
        max_retries=0,
    )
    chunks = list(client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks)  # the proxy's usage chunk is hidden
    assert server.requests[-1].json()["stream_options"] == {"include_usage": True}
