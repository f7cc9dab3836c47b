"""A hostile caller against the real gateway: where it may connect, what it may send,
which bucket it lands in. Each test names the finding it reproduces."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import openai
import pytest

from tokenlay_otel.proxy import parse_rules
from tokenlay_otel.proxy.local import local_proxy
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, SpanCapture
from .hostile_upstream import chat_body, raw_upstream
from .proxy_harness import PROXY_KEY
from .proxy_store_view import StoreView, redis_url, store, wait_for

pytestmark = pytest.mark.slow  # real proxies under floods and hostile clients

__all__ = ["redis_url", "store"]  # fixtures

MESSAGES = [{"role": "user", "content": "Hello"}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}


@contextmanager
def gateway(view: StoreView, limits: Any = (), **config: Any) -> Iterator[str]:
    with local_proxy(rules=limits, keys=(PROXY_KEY,), store=view.make(), **config) as url:
        yield url


def requests_per_user(maximum: int, window: str) -> Any:
    limit = {"type": "requests", "max": maximum, "window": window, "per": "user"}
    return parse_rules([{"id": "per-user", "if": {}, "then": {"limits": [limit]}}])


def auth(base: str | None = None, **extra: str) -> dict[str, str]:
    out = {"authorization": f"Bearer {PROXY_KEY}", "x-tokenlay-provider-key": PROVIDER_KEY}
    if base is not None:
        out["x-tokenlay-provider-base"] = base
    return {**out, **extra}


# --- finding 5: SSRF ------------------------------------------------------------------------


def test_the_caller_cannot_point_the_proxy_at_a_loopback_service(store: StoreView) -> None:
    with FakeOpenAIServer() as secret, gateway(store, mock_upstream=False) as proxy:
        for base in (secret.url, secret.url + "/v1", proxy, "http://localhost:1/v1"):
            r = httpx2.post(proxy + "/v1/chat/completions", json=CHAT, headers=auth(base))
            assert r.status_code == 403, base
            assert r.json()["error"]["code"] == "provider_not_allowed"
            assert "--allow-provider" in r.json()["error"]["message"]
        r = httpx2.get(proxy + "/v1/models", headers=auth(secret.url))
        assert r.status_code == 403
        assert secret.requests == []
        assert store.counters() == {} and store.leases() == 0


@pytest.mark.parametrize(
    ("base", "problem"),
    [
        ("https://api.openai.com/v1?", "query"),
        ("https://api.openai.com/v1?x=1", "query"),
        ("https://api.openai.com/v1#", "fragment"),
        ("https://user:pw@api.openai.com/v1", "user"),
        ("https://api.openai.com:99999/v1", "port"),
        ("ftp://api.openai.com/v1", "scheme"),
        ("https://api.openai.com/v1/../secret", ".."),
    ],
)
def test_a_base_that_could_reach_another_path_or_host_is_a_400(
    store: StoreView, base: str, problem: str
) -> None:
    with gateway(store, mock_upstream=False) as proxy:
        r = httpx2.post(proxy + "/v1/chat/completions", json=CHAT, headers=auth(base))
    assert r.status_code == 400
    assert problem in r.json()["error"]["message"]


def test_an_allowed_provider_is_reached_and_others_are_not(store: StoreView) -> None:
    with (
        FakeOpenAIServer() as allowed,
        FakeOpenAIServer() as other,
        gateway(store, mock_upstream=False, allow_providers=(allowed.url,)) as proxy,
    ):
        base = allowed.url + "/v1"
        ok = httpx2.post(proxy + "/v1/chat/completions", json=CHAT, headers=auth(base))
        assert ok.status_code == 200
        assert allowed.requests[-1].headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        no = httpx2.post(proxy + "/v1/chat/completions", json=CHAT, headers=auth(other.url))
        assert no.status_code == 403
        # A path that climbs out of /v1 is refused before anything is sent.
        r = httpx2.post(proxy + "/v1/chat/%2e%2e/%2e%2e/secret", json=CHAT, headers=auth(base))
        assert r.status_code == 400
        assert [q.path for q in allowed.requests] == ["/v1/chat/completions"]
        assert other.requests == []


def test_a_cookie_one_caller_got_is_never_sent_for_another(store: StoreView) -> None:
    """A provider's Set-Cookie (e.g. a load balancer's session) belongs to the caller
    it answered: the proxy keeps no cookie jar, so no later call, another user's or
    the same, goes upstream with it."""
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    with (
        raw_upstream() as upstream,
        gateway(store, mock_upstream=False, allow_providers=(upstream.url,)) as proxy,
    ):
        body = chat_body(usage)
        first = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"set-cookie: session=alice-secret; Path=/\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        upstream.answers = [first, first]
        base = upstream.url + "/v1"
        for user in ("alice", "bob"):
            r = httpx2.post(
                proxy + "/v1/chat/completions",
                json=CHAT,
                headers=auth(base, **{"x-tokenlay-user": user}),
            )
            assert r.status_code == 200
    assert len(upstream.heads) == 2
    assert all(b"cookie" not in head.lower() for head in upstream.heads)


def test_get_requests_pass_auth_and_rules(store: StoreView) -> None:
    limits = requests_per_user(5, "total")
    with gateway(store, limits) as proxy:
        r = httpx2.get(proxy + "/v1/models", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        statuses = [
            httpx2.get(proxy + "/v1/models", headers=auth(**{"x-tokenlay-user": "g"})).status_code
            for _ in range(12)
        ]
    assert statuses == [200] * 5 + [429] * 7


# --- finding 8: bodies ----------------------------------------------------------------------


def test_bodies_are_bounded_and_bad_json_of_any_shape_is_a_400(store: StoreView) -> None:
    with gateway(store, max_body_bytes=1024 * 1024) as proxy:
        post = proxy + "/v1/chat/completions"
        big = b'{"model": "m", "x": "' + b"a" * (2 * 1024 * 1024) + b'"}'
        r = httpx2.post(post, content=big, headers=auth())
        assert r.status_code == 413
        # Without a content-length (chunked), the bound holds while reading.
        r = httpx2.post(post, content=iter([big[:600_000], big[600_000:]]), headers=auth())
        assert r.status_code == 413
        for body in (
            b"[" * 100_000 + b"]" * 100_000,
            b"{not json",
            b"[1, 2]",
            b'"text"',
            b"\xff\xfe",
            b'{"a": ' * 5000 + b"1" + b"}" * 5000,
        ):
            r = httpx2.post(post, content=body, headers=auth())
            assert r.status_code == 400, body[:20]
            assert r.json()["error"]["type"] == "invalid_request_error"
        assert store.counters() == {} and store.leases() == 0


def test_a_slow_body_is_a_408_and_a_client_leaving_mid_body_is_no_traceback(
    store: StoreView, caplog: pytest.LogCaptureFixture, telemetry: SpanCapture
) -> None:
    with gateway(store, body_timeout_s=0.3, tracer_provider=telemetry.provider) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_KEY}"
            "\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(head + b'{"model"')
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408")
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(head + b'{"model"')

        def gone() -> int:
            return sum(
                (span.attributes or {}).get("tokenlay.proxy.exit") == "client_gone"
                for span in telemetry.spans()
            )

        assert wait_for(lambda: gone() == 5)
    noisy = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(("tokenlay_otel", "uvicorn"))
    ]
    assert noisy == []


# --- finding 9: buckets ---------------------------------------------------------------------


def test_anonymous_calls_get_a_bucket_no_value_can_name(store: StoreView) -> None:
    limits = requests_per_user(2, "total")
    with gateway(store, limits) as proxy:
        post = proxy + "/v1/chat/completions"
        anonymous = [httpx2.post(post, json=CHAT, headers=auth()).status_code for _ in range(3)]
        named = [
            httpx2.post(post, json=CHAT, headers=auth(**{"x-tokenlay-user": name})).status_code
            for name in ("None", "*", "%2A", "None")
        ]
    assert anonymous == [200, 200, 429]
    # "None" and "*" are users of their own ("%2A" is "*" percent-encoded, so "*" again).
    assert named == [200, 200, 200, 200]
    keys = {k.split(":")[2]: v for k, v in store.counters().items()}
    assert keys == {"user=*": 2.0, "user=None": 2.0, "user=%2A": 2.0}


def test_a_utf8_value_names_one_user_however_it_is_sent(store: StoreView) -> None:
    limits = requests_per_user(10, "total")
    with gateway(store, limits) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        body = json.dumps(CHAT).encode()
        for value in ("alicé".encode(), b"alic%C3%A9"):
            request = (
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                + PROXY_KEY.encode()
                + b"\r\nx-tokenlay-user: "
                + value
                + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + b"content-length: %d\r\n\r\n" % len(body)
                + body
            )
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(request)
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        r = httpx2.post(
            proxy + "/v1/chat/completions",
            json=CHAT,
            headers={**auth(), "x-tokenlay-user": "bad%FFvalue"},
        )
        assert r.status_code == 400
        assert "x-tokenlay-user" in r.json()["error"]["message"]
    assert {k: v for k, v in store.counters().items() if "alic" in k} == {
        next(k for k in store.counters() if "alic" in k): 2.0
    }


# --- finding 10: a proxy killed mid-stream ---------------------------------------------------


def test_a_killed_proxy_frees_its_slots_within_one_lease(tmp_path: Any) -> None:
    from .proxy_harness import kill_proxy, proxy_subprocess

    rules_file = tmp_path / "rules.json"
    rules_file.write_text(
        json.dumps(
            [
                {
                    "id": "one",
                    "if": {},
                    "then": {"limits": [{"type": "concurrent", "max": 1, "per": "user"}]},
                }
            ]
        )
    )
    db = tmp_path / "usage.db"
    view = StoreView("sqlite", db)
    common = ("--mock-upstream", "--rules", str(rules_file), "--db", str(db))
    with proxy_subprocess(*common, "--lease-seconds", "1") as (first, process):
        with httpx2.stream(
            "POST",
            first + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=auth(**{"x-tokenlay-user": "k"}),
        ) as response:
            assert response.status_code == 200
            assert view.leases() == 1
            kill_proxy(process)  # SIGKILL (its workers too): no shutdown, no settlement
            with pytest.raises(httpx2.HTTPError):
                response.read()
        killed = time.monotonic()
        assert wait_for(lambda: view.leases() == 0, timeout=5)
        assert time.monotonic() - killed < 3
    with proxy_subprocess(*common, "--lease-seconds", "1") as (second, _):
        r = httpx2.post(
            second + "/v1/chat/completions", json=CHAT, headers=auth(**{"x-tokenlay-user": "k"})
        )
        assert r.status_code == 200


def test_refused_requests_take_nothing(store: StoreView) -> None:
    limits = parse_rules(
        [
            {
                "id": "all",
                "if": {},
                "then": {
                    "limits": [
                        {"type": "concurrent", "max": 1, "per": "user"},
                        {"type": "requests", "max": 100, "window": "hour", "per": "user"},
                    ]
                },
            }
        ]
    )
    with gateway(store, limits) as proxy:
        client = openai.OpenAI(base_url=proxy + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        post = proxy + "/v1/chat/completions"
        refused = [
            # the same metadata header twice: which user would it be?
            [(b"x-tokenlay-user", b"u1"), (b"x-tokenlay-user", b"u2")],
            [(b"x-tokenlay-provider-key", "clé".encode())],  # not sendable upstream
            [(b"authorization", f"Bearer {PROXY_KEY}".encode())],  # a second authorization
        ]
        for extra in refused:
            raw = [(b"authorization", f"Bearer {PROXY_KEY}".encode()), *extra]
            r = httpx2.post(post, json=CHAT, headers=raw)
            assert r.status_code == 400, extra
        r = httpx2.post(post, json={**CHAT, "model": "m" * 300}, headers=auth())
        assert r.status_code == 400
    assert store.counters() == {} and store.leases() == 0


# --- finding 7: connections -----------------------------------------------------------------


def test_an_idle_flood_does_not_lock_out_health_or_calls(store: StoreView) -> None:
    from tokenlay_otel.proxy.server import ServerLimits

    limits = ServerLimits(max_connections=16, header_timeout_s=5)
    with gateway(store, server_limits=limits) as proxy:
        port = int(proxy.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
        try:
            assert httpx2.get(proxy + "/health", timeout=5).status_code == 200
            r = httpx2.post(proxy + "/v1/chat/completions", json=CHAT, headers=auth(), timeout=5)
            assert r.status_code == 200
            # The oldest idle sockets were closed to make room.
            closed = 0
            for s in idle:
                s.settimeout(0.05)
                try:
                    closed += s.recv(1) == b""
                except OSError:
                    closed += 1
            assert closed >= 100 - 16
        finally:
            for s in idle:
                s.close()


def test_sigterm_settles_the_streams_in_flight(tmp_path: Any) -> None:
    import signal
    import threading

    from .proxy_harness import proxy_subprocess

    rules_file = tmp_path / "rules.json"
    limits = [
        {"type": "concurrent", "max": 5, "per": "user"},
        {"type": "tokens", "max": 10**6, "window": "total", "per": "user"},
    ]
    rules_file.write_text(json.dumps([{"id": "r", "if": {}, "then": {"limits": limits}}]))
    db = tmp_path / "usage.db"
    view = StoreView("sqlite", db)
    with FakeOpenAIServer() as upstream:
        upstream.stream_delay = 0.5
        args = (
            "--rules",
            str(rules_file),
            "--db",
            str(db),
            "--allow-provider",
            upstream.url,
            "--graceful-shutdown",
            "0.3",
            "--shutdown-timeout",
            "1",
        )
        with proxy_subprocess(*args) as (url, process):
            seen: list[bytes] = []

            def stream() -> None:
                with (
                    contextlib.suppress(httpx2.HTTPError),
                    httpx2.stream(
                        "POST",
                        url + "/v1/chat/completions",
                        json={**CHAT, "stream": True},
                        headers=auth(upstream.url + "/v1", **{"x-tokenlay-user": "t"}),
                        timeout=10,
                    ) as r,
                ):
                    seen.extend(r.iter_raw())

            callers = [threading.Thread(target=stream) for _ in range(3)]
            for caller in callers:
                caller.start()
            assert wait_for(lambda: view.leases() == 3)
            process.send_signal(signal.SIGTERM)
            # uvicorn re-raises the signal once it has shut down.
            assert process.wait(timeout=15) in (0, -signal.SIGTERM)
            for caller in callers:
                caller.join(10)
            errors = process.stderr.read() if process.stderr else ""
    assert view.leases() == 0
    # Each charged at least its input estimate (10) and the first word it was sent (2).
    assert view.tokens(value="t") >= 3 * 12
    assert view.estimated() == view.tokens(value="t")
    assert "Traceback" not in errors


class _KeepAliveUpstream:
    """A keep-alive upstream whose first answer is followed, in the same write, by a
    complete forged answer; every later request gets an honest one."""

    def __init__(self, first: bytes, honest: bytes) -> None:
        self.first, self.honest = first, honest
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn:
            try:
                while True:
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    if not line:
                        return
                    reader.read(length)
                    answer, self.first = self.first or self.honest, b""
                    conn.sendall(answer)
            except OSError:
                return

    def close(self) -> None:
        self._sock.close()


def _json_answer(text: str) -> bytes:
    body = chat_body({"prompt_tokens": 3, "completion_tokens": 2}, text)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


def _sse_answer(text: str) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]
    data = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_bytes_after_an_answer_never_answer_another_call(store: StoreView, stream: bool) -> None:
    """Bytes an upstream sends past the end of one answer (a forged second answer, in
    the same write) are never taken as the next call's answer: the connection holding
    them is not reused, and the next caller gets the answer to their own request."""
    make = _sse_answer if stream else _json_answer
    upstream = _KeepAliveUpstream(make("alice's") + make("FORGED"), make("bob's"))
    try:
        with gateway(store, mock_upstream=False, allow_providers=(upstream.url,)) as proxy:
            texts = []
            for user in ("alice", "bob"):
                with httpx2.stream(
                    "POST",
                    proxy + "/v1/chat/completions",
                    json={**CHAT, "stream": stream},
                    headers=auth(upstream.url + "/v1", **{"x-tokenlay-user": user}),
                    timeout=10,
                ) as r:
                    assert r.status_code == 200
                    texts.append(r.read())
                time.sleep(0.3)  # the first connection is idle in the pool by now
    finally:
        upstream.close()
    assert b"alice's" in texts[0]
    assert b"bob's" in texts[1]
    assert b"FORGED" not in texts[1]
    assert upstream.connections == 2


class _EarlyAnswerUpstream:
    """A keep-alive upstream that refuses an upload (``/files``) as soon as its head
    comes, before its body, as servers may (a 401, a 413); then reads the body its
    length announced. Every other request gets an honest answer."""

    def __init__(self, honest: bytes) -> None:
        self.honest = honest
        self.heads: list[bytes] = []
        #: What each upload's connection read as its body.
        self.upload_bodies: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        reader = conn.makefile("rb")
        with conn:
            try:
                while True:
                    head, length = b"", 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        head += line
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    if not line:
                        return
                    self.heads.append(head)
                    if b"/files" in head.split(b"\r\n")[0]:
                        refusal = b'{"error": "no"}'
                        conn.sendall(b"HTTP/1.1 401 X\r\ncontent-length: %d\r\n\r\n" % len(refusal))
                        conn.sendall(refusal)
                        self.upload_bodies.append(reader.read(length))
                    else:
                        reader.read(length)
                        conn.sendall(self.honest)
            except OSError:
                return

    def close(self) -> None:
        self._sock.close()


def test_an_upload_cut_after_an_early_answer_never_carries_the_next_call(
    store: StoreView,
) -> None:
    """An upload the client stops after the provider already answered it (an early
    refusal) was half sent: its connection must not serve the next call, whose request
    (its provider key with it) would otherwise be read as the rest of that upload's
    body, a body the first caller chose and the provider may keep (a file)."""
    upstream = _EarlyAnswerUpstream(_json_answer("bob's"))
    try:
        with gateway(
            store, mock_upstream=False, allow_providers=(upstream.url,), upstream_timeout_s=3
        ) as proxy:
            port = int(proxy.rsplit(":", 1)[1])
            head = (
                f"POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY_KEY}\r\n"
                f"x-tokenlay-provider-key: {PROVIDER_KEY}\r\n"
                f"x-tokenlay-provider-base: {upstream.url}/v1\r\n"
                "content-type: application/octet-stream\r\ncontent-length: 2000\r\n\r\n"
            ).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(head + b"alice's file: ")
                assert wait_for(lambda: len(upstream.heads) == 1)
                time.sleep(0.3)  # the early answer has reached the proxy
            time.sleep(0.3)  # the upload is stopped; its connection was given back
            r = httpx2.post(
                proxy + "/v1/chat/completions",
                json=CHAT,
                headers=auth(upstream.url + "/v1", **{"x-tokenlay-user": "bob"}),
                timeout=10,
            )
    finally:
        upstream.close()
    assert r.status_code == 200
    assert b"bob's" in r.content
    assert not any(b"authorization" in body.lower() for body in upstream.upload_bodies)


def test_an_answers_trailers_are_never_the_next_calls_headers(store: StoreView) -> None:
    """Trailers after a chunked answer's last chunk belong to that answer: they were
    kept and read as the head of the next answer on the connection, someone else's
    (its rate-limit advice, even its content-encoding, which failed their call)."""
    body = chat_body({"prompt_tokens": 3, "completion_tokens": 2}, "alice's")
    first = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
        b"\r\n%x\r\n%s\r\n0\r\nx-ratelimit-remaining-requests: 0\r\ncontent-encoding: gzip\r\n\r\n"
    ) % (len(body), body)
    upstream = _KeepAliveUpstream(first, _json_answer("bob's"))
    try:
        with gateway(store, mock_upstream=False, allow_providers=(upstream.url,)) as proxy:
            answers = [
                httpx2.post(
                    proxy + "/v1/chat/completions",
                    json=CHAT,
                    headers=auth(upstream.url + "/v1", **{"x-tokenlay-user": user}),
                    timeout=10,
                )
                for user in ("alice", "bob")
            ]
    finally:
        upstream.close()
    assert [r.status_code for r in answers] == [200, 200]
    assert b"bob's" in answers[1].content
    assert "x-ratelimit-remaining-requests" not in answers[1].headers


def test_a_refusal_before_the_body_then_a_close_is_relayed_not_charged(
    store: StoreView,
) -> None:
    """A provider may refuse a large request from its head alone (a 413) and close
    without reading the body. That answer is the one to relay, as an error the provider
    does not bill: it was taken for an answer lost mid-way (a 502, charged an estimate
    of a request the provider never ran)."""
    refusal = b'{"error": {"message": "too large"}}'
    answer = b"HTTP/1.1 413 X\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
        len(refusal),
        refusal,
    )
    heads: list[bytes] = []

    def refuse(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            heads.append(data.partition(b"\r\n\r\n")[0])
            conn.sendall(answer)
            time.sleep(0.3)  # the answer is read, then the unread body resets the close

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    url = f"http://127.0.0.1:{server.getsockname()[1]}"

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=refuse, args=(server.accept()[0],), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    tokens = parse_rules(
        [
            {
                "id": "t",
                "if": {},
                "then": {
                    "limits": [{"type": "tokens", "max": 10**9, "per": "user", "window": "total"}]
                },
            }
        ]
    )
    big = {**CHAT, "messages": [{"role": "user", "content": "word " * 4_000_000}]}
    try:
        with gateway(store, tokens, mock_upstream=False, allow_providers=(url,)) as proxy:
            r = httpx2.post(
                proxy + "/v1/chat/completions",
                json=big,
                headers=auth(url + "/v1", **{"x-tokenlay-user": "alice"}),
                timeout=30,
            )
    finally:
        server.close()
    assert len(heads) == 1
    assert r.status_code == 413
    assert store.tokens(value="alice") == 0


@pytest.mark.parametrize("status", [b"012", b"600"])
def test_a_status_http_does_not_have_is_a_502_not_a_dropped_answer(
    store: StoreView, status: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """llhttp takes any three digits for a status: one outside 100-599 went on to the
    caller's server, which has no status line for it and dropped the answer (a
    KeyError, an empty reply), after the call was settled as done."""
    body = chat_body({"prompt_tokens": 3, "completion_tokens": 2})
    with raw_upstream() as upstream:
        upstream.answers = [
            b"HTTP/1.1 %s X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body)
        ]
        with gateway(store, mock_upstream=False, allow_providers=(upstream.url,)) as proxy:
            r = httpx2.post(
                proxy + "/v1/chat/completions",
                json=CHAT,
                headers=auth(upstream.url + "/v1"),
                timeout=10,
            )
    assert r.status_code == 502
    assert "Traceback" not in caplog.text
