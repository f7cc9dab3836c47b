"""Faults around an LLM call: the caller sees what they would have seen without us,
telemetry records what happened, and fail-open only ever bypasses an unreachable proxy."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import openai
import pytest

from tokenlay_otel import TokenlayOpenAI, get_tokenlay_metadata
from tokenlay_otel.testing import FakeOpenAIServer, Reply

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

pytestmark = pytest.mark.slow  # real connect and read timeouts against sockets on loopback

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def silent_proxy() -> Iterator[str]:
    """Accepts connections and never answers: a proxy that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def routed(server: FakeOpenAIServer, proxy: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/v1", max_retries=0, **kwargs)  # type: ignore[arg-type]


def requests_point(telemetry: SpanCapture) -> dict:  # type: ignore[type-arg]
    (point,) = telemetry.metrics()["tokenlay.client.requests"][1]
    return dict(point.attributes)


@pytest.fixture
def full_backlog() -> Iterator[str]:
    """A listener that accepts nothing and whose queue is full: connecting times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    waiting = []
    for _ in range(8):  # fill the accept queue; later connection attempts hang
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        waiting.append(s)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    for s in waiting:
        s.close()
    listener.close()


@pytest.mark.parametrize("fault", ["refused", "connect_timeout"])
def test_fail_open_bypasses_a_proxy_it_never_reached(
    fault: str, server: FakeOpenAIServer, full_backlog: str, instrument, telemetry: SpanCapture
) -> None:
    proxy = closed_port() if fault == "refused" else full_backlog
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=proxy, TOKENLAY_FAIL_OPEN="true")
    reply = routed(server, proxy, timeout=0.5).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert reply.choices[0].message.content == "Hello from the fake server."
    (sent,) = server.requests  # straight to the provider, as the caller configured it
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert not [h for h in sent.headers if h.startswith("x-tokenlay") or h == "traceparent"]
    span = telemetry.only_span()
    assert span.attributes["tokenlay.proxy.bypassed"] is True
    assert span.attributes["tokenlay.routed"] is False
    assert span.status.is_ok
    assert requests_point(telemetry)["tokenlay.proxy.bypassed"] is True


@pytest.mark.parametrize(
    ("fault", "error", "error_type"),
    [
        ("refused", openai.APIConnectionError, "openai.APIConnectionError"),
        ("timeout", openai.APITimeoutError, "openai.APITimeoutError"),
    ],
)
def test_without_fail_open_the_caller_gets_the_openai_error(
    fault: str,
    error: type[Exception],
    error_type: str,
    server: FakeOpenAIServer,
    silent_proxy: str,
    instrument,
    telemetry: SpanCapture,
) -> None:
    proxy = closed_port() if fault == "refused" else silent_proxy
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=proxy)
    with pytest.raises(error):
        routed(server, proxy, timeout=0.5).chat.completions.create(model="m", messages=MESSAGES)
    assert server.requests == []
    span = telemetry.only_span()
    assert span.attributes["error.type"] == error_type
    assert requests_point(telemetry)["tokenlay.proxy.bypassed"] is False


def test_fail_open_does_not_resend_a_call_the_proxy_took_and_did_not_answer(
    server: FakeOpenAIServer,
    silent_proxy: str,
    instrument,
    telemetry: SpanCapture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The proxy may have forwarded it: sent again, it would be billed twice, once past
    spend control."""
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=silent_proxy, TOKENLAY_FAIL_OPEN="1")
    client = routed(server, silent_proxy, timeout=0.5)
    for _ in range(3):
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="m", messages=MESSAGES)
    assert server.requests == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    said = [w for w in warnings if silent_proxy in w]
    assert len(said) == 1, said  # once a minute, not once a call
    assert "did not answer (ReadTimeout)" in said[0]
    assert all(not s.attributes.get("tokenlay.proxy.bypassed") for s in telemetry.spans())


def test_an_http_answer_is_never_bypassed(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    with FakeOpenAIServer() as proxy:
        proxy.reply(Reply(status=503, body={"error": {"message": "proxy overloaded"}}))
        instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=proxy.url, TOKENLAY_FAIL_OPEN="1")
        with pytest.raises(openai.InternalServerError):
            routed(server, proxy.url).chat.completions.create(model="m", messages=MESSAGES)
    assert server.requests == []
    assert telemetry.only_span().attributes["error.type"] == "503"


def test_drop_in_client_fail_open(server: FakeOpenAIServer, telemetry: SpanCapture) -> None:
    client = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        provider_api_base=server.url + "/v1",
        tokenlay_key=TOKENLAY_KEY,
        tokenlay_base_url=closed_port(),
        fail_open=True,
        max_retries=0,
    )
    reply = client.chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices
    assert server.requests[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    strict = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        provider_api_base=server.url + "/v1",
        tokenlay_key=TOKENLAY_KEY,
        tokenlay_base_url=closed_port(),
        max_retries=0,
    )
    with pytest.raises(openai.APIConnectionError):
        strict.chat.completions.create(model="m", messages=MESSAGES)


def test_fail_open_stream(server: FakeOpenAIServer, instrument, telemetry: SpanCapture) -> None:
    proxy = closed_port()
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=proxy, TOKENLAY_FAIL_OPEN="true")
    chunks = list(
        routed(server, proxy).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    )
    assert chunks
    assert "stream_options" not in server.requests[-1].json()  # the caller's request, as is
    assert telemetry.only_span().attributes["tokenlay.proxy.bypassed"] is True


def test_5xx_from_the_provider(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    server.reply(Reply(status=500, body={"error": {"message": "boom"}}))
    with pytest.raises(openai.InternalServerError):
        routed(server, "").chat.completions.create(model="m", messages=MESSAGES)
    assert telemetry.only_span().attributes["error.type"] == "500"


def test_malformed_proxy_headers_are_ignored(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    server.response_headers.update(
        {
            "x-tokenlay-cost": "lots",
            "x-tokenlay-rule-action": "explode",
            "x-tokenlay-warnings": "{not json",
            "x-tokenlay-limit-exceeded": "perhaps",
            "x-tokenlay-input-tokens": "-1",
        }
    )
    reply = routed(server, server.url).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert reply.choices[0].message.content
    assert get_tokenlay_metadata(reply) is not None
    attrs = telemetry.only_span().attributes
    assert not [k for k in attrs if k.startswith("tokenlay.rule") or k == "tokenlay.limit_exceeded"]
    assert attrs["tokenlay.cost.source"] == "local"  # a bad header cost is no cost
    assert telemetry.only_span().events == ()


def test_a_200_with_a_non_json_body(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    server.reply(Reply(status=200, body=b"<html>gateway page</html>"))
    client = routed(server, "")
    outcome: object
    try:
        outcome = client.chat.completions.create(model="m", messages=MESSAGES)
    except Exception as exc:  # openai raises the JSON decoder's error here
        outcome = exc
    uninstrumented = None
    from tokenlay_otel import TokenlayInstrumentor

    TokenlayInstrumentor().uninstrument()
    server.reply(Reply(status=200, body=b"<html>gateway page</html>"))
    try:
        uninstrumented = client.chat.completions.create(model="m", messages=MESSAGES)
    except Exception as exc:
        uninstrumented = exc
    # Exactly what the caller would have seen without us.
    assert type(outcome) is type(uninstrumented)
    assert str(outcome) == str(uninstrumented)
    (span,) = telemetry.spans()
    if isinstance(outcome, Exception):
        assert span.attributes["error.type"] == "json.JSONDecodeError"
