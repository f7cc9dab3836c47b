"""What routing covers: every endpoint of the installed openai works as uninstrumented.

Every resource method of the client is enumerated from the client itself (nothing here
lists them), called with placeholder arguments against a loopback server that answers
whatever it is asked with an echo of the request, and its outcome compared across three
runs: uninstrumented; instrumented with routing on (the metered endpoints go through a
real local proxy, the rest straight to the provider); and routed wholesale
(``TOKENLAY_ROUTE_ENDPOINTS=all``: every call through the proxy).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import inspect
import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from openai._resource import SyncAPIResource

from tokenlay_otel import TokenlayInstrumentor, TokenlayOpenAI
from tokenlay_otel._config import Settings
from tokenlay_otel._routing import METERED
from tokenlay_otel.proxy.local import DEFAULT_LOCAL_KEY, local_proxy

from .conftest import PROVIDER_KEY, SpanCapture

pytestmark = pytest.mark.slow  # a local proxy and raw sockets, uploads cut by real timeouts

# Statuses that end openai's polling helpers (files wait for "processed", runs and
# vector-store files for "completed").
_STATUS = {"files": "processed"}


class EchoProvider:
    """An OpenAI-compatible server that answers every request with an echo of it.

    The echo names the method, path, query and a digest of the body (multipart
    boundaries, random per call, taken out), so two runs of the same call get the same
    answer whichever way they went. It records which requests came through the proxy
    (the proxy does not forward openai's ``x-stainless-*`` headers).
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stall per answer

            def _answer(self) -> None:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = self._chunks()
                else:
                    length = int(self.headers.get("content-length") or 0)
                    body = self.rfile.read(length) if length else b""
                content_type = self.headers.get("content-type", "")
                boundary = re.search(r"boundary=([^;]+)", content_type)
                if boundary:
                    body = body.replace(boundary.group(1).encode(), b"BOUNDARY")
                path, _, query = self.path.partition("?")
                via_proxy = "x-stainless-lang" not in {k.lower() for k in self.headers}
                echo.seen.append((self.command, path, via_proxy))
                top = path.removeprefix("/v1/").split("/")[0]
                answer = {
                    "id": "echo-1",
                    "object": "list",
                    "status": _STATUS.get(top, "completed"),
                    "data": [],
                    "has_more": False,
                    "echo": {
                        "method": self.command,
                        "path": path,
                        "query": query,
                        "type": content_type.split(";")[0],
                        "body": hashlib.sha256(body).hexdigest(),
                    },
                }
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _chunks(self) -> bytes:
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def provider() -> Iterator[EchoProvider]:
    echo = EchoProvider()
    yield echo
    echo.close()


def _resources(obj: object, prefix: str = "") -> Iterator[tuple[str, SyncAPIResource]]:
    """Every resource reachable from a client, by its dotted path (``beta.threads``)."""
    for name in dir(type(obj)):
        if name.startswith("_") or name in ("with_raw_response", "with_streaming_response"):
            continue
        attribute = inspect.getattr_static(type(obj), name)
        if not isinstance(attribute, property | type(inspect)) and not callable(
            getattr(attribute, "__get__", None)
        ):
            continue
        try:
            value = getattr(obj, name)
        except Exception:
            continue
        if isinstance(value, SyncAPIResource):
            yield f"{prefix}{name}", value
            yield from _resources(value, f"{prefix}{name}.")


def methods(client: openai.OpenAI) -> list[tuple[str, Callable[..., Any]]]:
    """Every public method of every resource of ``client``."""
    found = []
    for path, resource in _resources(client):
        for name in dir(resource):
            if name.startswith("_") or name in ("with_raw_response", "with_streaming_response"):
                continue
            method = getattr(resource, name)
            if inspect.ismethod(method) and not isinstance(method, SyncAPIResource):
                found.append((f"{path}.{name}", method))
    return sorted(found, key=lambda item: item[0])


def _placeholder(name: str, annotation: str) -> object:
    """A value openai accepts for a required parameter, told by its name and type."""
    if name == "model":
        return "gpt-4o-mini"
    if name == "messages":
        return [{"role": "user", "content": "hi"}]
    if "FileTypes" in annotation or "FileContent" in annotation:
        single = ("a.txt", b"hello", "text/plain")
        return (
            [single] if re.search(r"(Iterable|List|Sequence\w*)\[FileTypes", annotation) else single
        )
    literal = re.search(r"Literal\[\s*['\"]([^'\"]+)", annotation)
    if literal:
        return literal.group(1)
    if re.fullmatch(r"(Optional\[)?int\]?|float", annotation):
        return 1
    if annotation == "bool":
        return False
    if re.match(r"(Iterable|List|Sequence|SequenceNotStr)\[", annotation):
        return ["x1"]
    if re.match(r"(Dict|Mapping|object|Metadata)", annotation):
        return {}
    if name.endswith("_ms") or name in ("bytes", "size", "n", "seconds"):
        return 1
    return "x1"


def _arguments(method: Callable[..., Any]) -> dict[str, object]:
    arguments: dict[str, object] = {}
    for parameter in inspect.signature(method).parameters.values():
        if parameter.default is not inspect.Parameter.empty or parameter.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        annotation = parameter.annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        arguments[parameter.name] = _placeholder(parameter.name, str(text))
    if "poll_interval_ms" in inspect.signature(method).parameters:
        arguments["poll_interval_ms"] = 1
    return arguments


def _normal(result: object) -> object:
    """What a result says, in a form two runs can be compared by."""
    if isinstance(result, openai.BaseModel):
        return result.model_dump(mode="json", warnings=False)
    if isinstance(result, list | tuple):
        return [_normal(item) for item in result]
    if isinstance(result, str | int | float | bool | dict | type(None)):
        return result
    content = getattr(result, "content", None)
    if isinstance(content, bytes):
        return content
    return type(result).__qualname__  # a helper object (a stream manager...): no HTTP made


def outcome(method: Callable[..., Any]) -> tuple[object, ...]:
    try:
        arguments = _arguments(method)
    except (TypeError, ValueError):
        return ("no signature",)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(method, **arguments)
        try:
            result = future.result(timeout=20)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"{method} did not return within 20 s")
        except Exception as exc:  # the caller's own outcome: compared as it is
            return ("raised", type(exc).__name__, str(exc))
    return ("returned", _normal(result))


def _client(provider: EchoProvider) -> openai.OpenAI:
    keys: dict[str, str] = {"api_key": PROVIDER_KEY}
    if "admin_api_key" in inspect.signature(openai.OpenAI).parameters:
        keys["admin_api_key"] = PROVIDER_KEY  # the admin endpoints (openai 3.x) want one
    return openai.OpenAI(**keys, base_url=provider.url + "/v1", max_retries=0)


def _outcomes(client: openai.OpenAI) -> dict[str, tuple[object, ...]]:
    return {name: outcome(method) for name, method in methods(client)}


def _metered(method: str, path: str) -> bool:
    return (method, path.removeprefix("/v1/")) in METERED


def test_every_endpoint_returns_what_it_returns_uninstrumented(
    provider: EchoProvider, monkeypatch: pytest.MonkeyPatch, telemetry: SpanCapture
) -> None:
    found = methods(_client(provider))
    assert len(found) > 100, [name for name, _ in found]  # the whole client, not a sample
    for resource in ("files.create", "images.generate", "audio.speech.create", "batches.list"):
        assert resource in {name for name, _ in found}

    expected = _outcomes(_client(provider))
    assert provider.seen and not any(via for _, _, via in provider.seen)

    with local_proxy(mock_upstream=False, allow_providers=(provider.url,)) as proxy:
        monkeypatch.setenv("TOKENLAY_KEY", DEFAULT_LOCAL_KEY)
        monkeypatch.setenv("TOKENLAY_BASE_URL", proxy)
        for scope in ("", "all"):
            monkeypatch.setenv("TOKENLAY_ROUTE_ENDPOINTS", scope)
            provider.seen.clear()
            instrumentor = TokenlayInstrumentor()
            instrumentor.instrument(
                tracer_provider=telemetry.provider,
                meter_provider=telemetry.meter_provider,
                settings=Settings.from_env(),
            )
            try:
                got = _outcomes(_client(provider))
            finally:
                instrumentor.uninstrument()
            different = [n for n in expected if got[n] != expected[n]]
            assert not different, f"scope {scope or 'default'!r}: " + "; ".join(
                f"{n}: {expected[n]} became {got[n]}" for n in different[:5]
            )
            if scope == "all":
                assert all(via for _, _, via in provider.seen), provider.seen
            else:
                routed = {(m, p) for m, p, via in provider.seen if via}
                direct = {(m, p) for m, p, via in provider.seen if not via}
                assert routed and all(_metered(m, p) for m, p in routed), routed
                assert direct and not any(_metered(m, p) for m, p in direct), direct


def test_drop_in_client_sends_unmetered_endpoints_to_the_provider(provider: EchoProvider) -> None:
    with local_proxy(mock_upstream=False, allow_providers=(provider.url,)) as proxy:
        client = TokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            provider_api_base=provider.url + "/v1",
            tokenlay_key=DEFAULT_LOCAL_KEY,
            tokenlay_base_url=proxy,
            metadata={"user": "u1"},
            max_retries=0,
        )
        provider.seen.clear()
        image = client.images.generate(prompt="a cat")
        client.files.list()
        client.moderations.create(input="hi")
        client.models.list()
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert image.model_dump()["echo"]["path"] == "/v1/images/generations"
    assert [(m, p, via) for m, p, via in provider.seen] == [
        ("POST", "/v1/images/generations", False),
        ("GET", "/v1/files", False),
        ("POST", "/v1/moderations", False),
        ("GET", "/v1/models", True),
        ("POST", "/v1/chat/completions", True),
    ]


def _wholesale(provider: EchoProvider, proxy: str) -> TokenlayOpenAI:
    return TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        provider_api_base=provider.url + "/v1",
        tokenlay_key=DEFAULT_LOCAL_KEY,
        tokenlay_base_url=proxy,
        max_retries=0,
    )


def test_a_routed_upload_is_streamed_through_the_proxy_not_buffered(
    provider: EchoProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENLAY_ROUTE_ENDPOINTS", "all")
    content = bytes(range(256)) * (12 * 1024)  # 3 MiB, over the metered-body cap below
    limits = {"max_body_bytes": 1024 * 1024, "max_upload_bytes": 4 * 1024 * 1024}
    with local_proxy(mock_upstream=False, allow_providers=(provider.url,), **limits) as proxy:
        client = _wholesale(provider, proxy)
        provider.seen.clear()
        uploaded = client.files.create(file=("big.bin", content), purpose="batch")
        assert provider.seen == [("POST", "/v1/files", True)]
        # The provider got every byte, sized (it reads by content-length, not chunks).
        direct = _client(provider).files.create(file=("big.bin", content), purpose="batch")
        assert uploaded.model_dump()["echo"] == direct.model_dump()["echo"]

        with pytest.raises(openai.APIStatusError) as info:
            client.files.create(file=("huge.bin", content * 2), purpose="batch")
        assert info.value.status_code == 413
        assert provider.seen[-1] == ("POST", "/v1/files", False)  # the direct one above


def test_a_client_that_leaves_mid_upload_ends_the_call_as_upload_stopped(
    provider: EchoProvider, telemetry: SpanCapture
) -> None:
    import socket
    import time

    config = {"tracer_provider": telemetry.provider, "meter_provider": telemetry.meter_provider}
    with local_proxy(mock_upstream=False, allow_providers=(provider.url,), **config) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        head = (
            "POST /v1/files HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {DEFAULT_LOCAL_KEY}\r\n"
            f"x-tokenlay-provider-key: {PROVIDER_KEY}\r\n"
            f"x-tokenlay-provider-base: {provider.url}/v1\r\n"
            "content-type: application/octet-stream\r\ncontent-length: 1000000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head.encode() + b"x" * 100_000)
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        exits: list[object] = []
        while time.monotonic() < deadline and "upload_stopped" not in exits:
            time.sleep(0.05)
            exits = [s.attributes.get("tokenlay.proxy.exit") for s in telemetry.spans()]
    assert [e for e in exits if e is not None] == ["upload_stopped"]  # the server span
    (_, points) = telemetry.metrics()["tokenlay.proxy.settlements"]
    assert [p.attributes["tokenlay.proxy.exit"] for p in points] == ["upload_stopped"]


def _raw(proxy: str, provider: EchoProvider, request_line: str, extra: str, body: bytes,
         *, pause_s: float = 0.0) -> bytes:  # fmt: skip
    """Send one request by hand and read the whole answer."""
    import socket
    import time

    port = int(proxy.rsplit(":", 1)[1])
    head = (
        f"{request_line}\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
        f"authorization: Bearer {DEFAULT_LOCAL_KEY}\r\n"
        f"x-tokenlay-provider-key: {PROVIDER_KEY}\r\n"
        f"x-tokenlay-provider-base: {provider.url}/v1\r\n{extra}\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode())
        try:
            for piece in [body[i : i + 1] for i in range(len(body))] if pause_s else [body]:
                sock.sendall(piece)
                time.sleep(pause_s)
        except OSError:  # the proxy answered and closed before the body was all sent
            pass
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions;x", "/v1/chat/completions%3B", "/v1/Chat/Completions",
             "/v1/CHAT/completions;a=b"],
)  # fmt: skip
def test_a_metered_endpoint_in_another_spelling_is_refused(
    provider: EchoProvider, path: str
) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    with local_proxy(mock_upstream=False, allow_providers=(provider.url,)) as proxy:
        provider.seen.clear()
        answer = _raw(proxy, provider, f"POST {path} HTTP/1.1",
                      f"content-type: application/json\r\ncontent-length: {len(body)}\r\n",
                      body.encode())  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"another spelling" in answer
    assert provider.seen == []


def test_an_upload_with_both_a_length_and_chunks_is_framed_by_its_chunks(
    provider: EchoProvider,
) -> None:
    chunked = b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"
    with local_proxy(mock_upstream=False, allow_providers=(provider.url,)) as proxy:
        answer = _raw(proxy, provider, "POST /v1/files HTTP/1.1",
                      "content-type: application/octet-stream\r\ncontent-length: 3\r\n"
                      "transfer-encoding: chunked\r\n", chunked)  # fmt: skip
    # Either refused as ambiguous by the server, or sent on whole: never a 500.
    status = answer.split(b" ", 2)[1]
    assert status in (b"200", b"400"), answer[:300]
    if status == b"200":  # the provider got the six bytes of the chunks
        assert hashlib.sha256(b"abcdef").hexdigest().encode() in answer


def test_an_upload_that_takes_too_long_in_all_is_cut(
    provider: EchoProvider, telemetry: SpanCapture
) -> None:
    limits = {"body_timeout_s": 1.0, "upload_timeout_s": 1.5}
    with local_proxy(mock_upstream=False, allow_providers=(provider.url,),
                     tracer_provider=telemetry.provider, **limits) as proxy:  # fmt: skip
        answer = _raw(proxy, provider, "POST /v1/files HTTP/1.1",
                      "content-type: application/octet-stream\r\ncontent-length: 40\r\n",
                      b"x" * 40, pause_s=0.3)  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"took over 1.5 s" in answer and b"invalid_request_error" in answer


def test_shutdown_mid_upload_gives_the_request_back_and_ends_every_span(
    provider: EchoProvider, telemetry: SpanCapture, tmp_path: Path
) -> None:
    import socket
    import time

    from tokenlay_otel.proxy import SQLiteStore, parse_rules

    rules = parse_rules([{"id": "r", "if": {}, "then": {"limits": [
        {"type": "requests", "max": 10, "window": "total", "per": "user"}]}}])  # fmt: skip
    config = {"tracer_provider": telemetry.provider, "meter_provider": telemetry.meter_provider,
              "shutdown_timeout_s": 0.5}  # fmt: skip
    store = SQLiteStore(tmp_path / "usage.db")
    from tokenlay_otel.proxy.server import ServerLimits

    limits = ServerLimits(graceful_shutdown_s=1)  # then the gateway's shutdown ends the call
    with local_proxy(mock_upstream=False, allow_providers=(provider.url,), rules=rules,
                     store=store, server_limits=limits, **config) as proxy:  # fmt: skip
        port = int(proxy.rsplit(":", 1)[1])
        head = (
            "POST /v1/files HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {DEFAULT_LOCAL_KEY}\r\n"
            f"x-tokenlay-provider-key: {PROVIDER_KEY}\r\n"
            f"x-tokenlay-provider-base: {provider.url}/v1\r\nx-tokenlay-user: u1\r\n"
            "content-type: application/octet-stream\r\ncontent-length: 1000000\r\n\r\n"
        )
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head.encode() + b"x" * 1000)  # ...and the rest never comes
        time.sleep(0.5)
    sock.close()
    exits = [s.attributes.get("tokenlay.proxy.exit") for s in telemetry.spans()]
    assert [e for e in exits if e is not None] == ["shutdown"]
    upstream = [s for s in telemetry.spans() if s.name.startswith("upstream ")]
    assert len(upstream) == 1 and upstream[0].end_time is not None
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as db:
        counted = db.execute("SELECT key, value FROM usage").fetchall()
    assert [v for k, v in counted if k.startswith("requests:")] == [0.0]  # given back
