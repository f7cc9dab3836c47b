"""The proxy's HTTP server bounds (header timeout, connection cap) and its CLI."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tokenlay_otel.cli import build_parser
from tokenlay_otel.proxy import server as server_module
from tokenlay_otel.proxy.local import free_port
from tokenlay_otel.proxy.serve import (
    ENV_ALLOW_PROVIDERS,
    ENV_PROXY_KEYS,
    gateway_options,
    load_keys,
    server_limits,
)
from tokenlay_otel.proxy.server import ConnectionGuard, ServerLimits, uvicorn_config

pytestmark = pytest.mark.slow  # the proxy's server on real sockets, with real timeouts

HEADER_TIMEOUT = 0.3
WAIT = 5.0  # upper bound for anything expected to happen "soon"


class App:
    """A trivial ASGI app: /health, /slow?s=SECONDS, /inspect (what the guard sees)."""

    def __init__(self) -> None:
        self.guard: ConnectionGuard | None = None
        self.in_progress = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.in_progress += 1
        try:
            body = b"ok"
            if scope["path"] == "/slow":
                await asyncio.sleep(float(scope["query_string"].decode().partition("=")[2]))
                body = b"slow"
            elif scope["path"] == "/inspect":
                body = json.dumps(self._inspect(scope)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            self.in_progress -= 1

    def _inspect(self, scope: dict[str, Any]) -> dict[str, Any]:
        assert self.guard is not None
        conns = [*self.guard._idle, *self.guard._busy]
        return {
            "open": self.guard.open_connections,
            "in_progress": [
                list(c.transport.get_extra_info("peername"))
                for c in conns
                if server_module._request_in_progress(c)
            ],
            "idle": sum(not server_module._request_in_progress(c) for c in conns),
            "me": list(scope["client"]),
            "internals": all(
                hasattr(c, "cycle") and hasattr(c, "transport") and c in c.connections
                for c in conns
            ),
        }


@contextmanager
def serving(limits: ServerLimits) -> Iterator[tuple[int, App, ConnectionGuard]]:
    app = App()
    port = free_port()
    config = uvicorn_config(app, host="127.0.0.1", port=port, limits=limits)
    guard = config.http.guard  # type: ignore[union-attr]
    app.guard = guard
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield port, app, guard
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Wait up to ``timeout`` for the server to close ``sock`` (EOF or reset)."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def request(sock: socket.socket, path: str) -> bytes:
    """Send a keep-alive GET and read one response body (content-length framed)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before the response"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk
        body += chunk
    return body


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def guarded() -> Iterator[tuple[int, App, ConnectionGuard]]:
    with serving(ServerLimits(header_timeout_s=HEADER_TIMEOUT, keep_alive_s=30)) as served:
        yield served


# --- header timeout -----------------------------------------------------------------------


def test_silent_connection_is_closed_after_the_header_timeout(guarded: Any) -> None:
    port, _, _ = guarded
    with connect(port) as sock:
        opened = time.monotonic()
        assert closed_by_peer(sock, WAIT)
        assert time.monotonic() - opened >= HEADER_TIMEOUT * 0.8


def test_headers_dribbled_byte_by_byte_are_cut(guarded: Any) -> None:
    port, _, _ = guarded
    with connect(port) as sock:
        opened = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        deadline = opened + WAIT
        closed = False
        while not closed and time.monotonic() < deadline:
            closed = closed_by_peer(sock, 0.1)
            if not closed:
                try:
                    sock.sendall(b"a")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
        assert closed
        assert time.monotonic() - opened >= HEADER_TIMEOUT * 0.8


def test_idle_keep_alive_connection_is_closed_after_its_response(guarded: Any) -> None:
    port, _, _ = guarded
    with connect(port) as sock:
        assert request(sock, "/health") == b"ok"
        answered = time.monotonic()
        assert closed_by_peer(sock, WAIT)  # keep_alive_s is 30: this is the header timer
        assert time.monotonic() - answered >= HEADER_TIMEOUT * 0.8


def test_slow_app_is_not_cut_and_keep_alive_still_works(guarded: Any) -> None:
    port, _, _ = guarded
    with connect(port) as sock:
        assert request(sock, "/health") == b"ok"
        # Longer than the header timeout, counted from connect and from the last response.
        assert request(sock, f"/slow?s={HEADER_TIMEOUT * 3}") == b"slow"
        assert request(sock, "/health") == b"ok"


# --- connection cap -----------------------------------------------------------------------


def test_idle_flood_cannot_lock_out_a_real_client() -> None:
    with (
        serving(ServerLimits(header_timeout_s=30, max_connections=8)) as (port, _, guard),
        ExitStack() as stack,
    ):
        socks = [stack.enter_context(connect(port)) for _ in range(50)]
        closed: set[socket.socket] = set()
        deadline = time.monotonic() + WAIT
        while len(closed) < 42 and time.monotonic() < deadline:
            assert guard.open_connections <= 8
            ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.05)
            closed.update(s for s in ready if closed_by_peer(s, 0))
        assert len(closed) == 42
        assert guard.open_connections == 8
        assert set(socks[-8:]).isdisjoint(closed)  # the oldest idle ones went first

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=WAIT) as resp:
            assert resp.read() == b"ok"
        assert guard.open_connections <= 8


def test_new_connection_is_refused_when_every_connection_is_busy() -> None:
    with serving(ServerLimits(header_timeout_s=30, max_connections=2)) as (port, app, guard):
        results: list[bytes] = []

        def slow() -> None:
            with connect(port) as sock:
                results.append(request(sock, "/slow?s=1"))

        workers = [threading.Thread(target=slow) for _ in range(2)]
        for worker in workers:
            worker.start()
        wait_for(lambda: app.in_progress == 2, "two requests in progress")
        with connect(port) as sock:
            assert closed_by_peer(sock, WAIT)
        for worker in workers:
            worker.join(timeout=WAIT)
        assert results == [b"slow", b"slow"]
        assert guard.open_connections <= 2


# --- the uvicorn seam ---------------------------------------------------------------------


def test_guard_wraps_the_protocol_uvicorn_auto_picks() -> None:
    auto = uvicorn.Config(App(), http="auto", log_level="warning")
    auto.load()
    config = uvicorn_config(App(), host="127.0.0.1", port=0, limits=ServerLimits())
    assert isinstance(config.http, type)
    assert config.http.__mro__[2] is auto.http_protocol_class
    assert callable(auto.http_protocol_class.on_response_complete)  # type: ignore[attr-defined]


def test_seam_agrees_with_what_the_app_sees(guarded: Any) -> None:
    port, _, _ = guarded
    with connect(port) as partial, connect(port) as answered, connect(port) as asking:
        partial.sendall(b"GET /health HTTP/1.1\r\nHost:")  # headers not complete yet
        assert request(answered, "/health") == b"ok"

        def three_open() -> bool:
            seen.update(json.loads(request(asking, "/inspect")))
            return bool(seen["open"] == 3)

        seen: dict[str, Any] = {}
        wait_for(three_open, "three connections at the server")
        assert seen["internals"]
        assert seen["in_progress"] == [seen["me"]]  # only the one asking, by its address
        assert seen["idle"] == 2


def test_each_config_has_its_own_guard() -> None:
    one = uvicorn_config(App(), host="127.0.0.1", port=0, limits=ServerLimits(max_connections=3))
    two = uvicorn_config(App(), host="127.0.0.1", port=0, limits=ServerLimits())
    assert one.http is not two.http
    assert one.http.guard.max_connections == 3  # type: ignore[union-attr]
    assert two.http.guard is not one.http.guard  # type: ignore[union-attr]
    assert one.backlog == 16  # a quarter of a small cap, at least 16


@pytest.mark.parametrize(("cap", "backlog"), [(8, 16), (128, 32), (4000, 1000), (10**6, 2048)])
def test_backlog_is_a_quarter_of_the_cap(cap: int, backlog: int) -> None:
    assert server_module._backlog(cap) == backlog


@pytest.mark.parametrize(
    "bad",
    [
        {"header_timeout_s": 0},
        {"header_timeout_s": float("inf")},
        {"keep_alive_s": -1},
        {"graceful_shutdown_s": float("nan")},
        {"max_connections": 0},
    ],
)
def test_server_limits_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="ServerLimits"):
        ServerLimits(**bad)


_RLIMIT_SCRIPT = """
import resource, sys
from tokenlay_otel.proxy.server import default_max_connections
from tokenlay_otel.proxy.serve import raise_open_files_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard))
low = default_max_connections()
raised = raise_open_files_limit()
print(low, raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0], raised >= min(hard, 4096))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no RLIMIT_NOFILE")
@pytest.mark.parametrize(("soft", "derived"), [(100, "50"), (20, "16")])
def test_max_connections_follow_the_open_files_limit(soft: int, derived: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _RLIMIT_SCRIPT, str(soft)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert out == [derived, "True", "True"]


# --- CLI ----------------------------------------------------------------------------------


def test_keys_file_keeps_hash_inside_a_key(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(
        "# a comment\n   # an indented comment\n\n   \ntl-abc#def\n  tl-spaced  \ntl-plain\n",
        encoding="utf-8",
    )
    assert load_keys(str(keys_file), environ={}) == {"tl-abc#def", "tl-spaced", "tl-plain"}
    assert load_keys(None, environ={ENV_PROXY_KEYS: " a#1 , b,,"}) == {"a#1", "b"}
    with pytest.raises(SystemExit, match="no Tokenlay keys"):
        load_keys(None, environ={})


def _proxy_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["proxy", *argv])


def test_flags_become_proxy_config_and_server_limits() -> None:
    args = _proxy_args(
        "--allow-provider",
        "https://api.openai.com",
        "--allow-provider",
        "*.example.com",
        "--max-body-bytes",
        "1024",
        "--body-timeout",
        "2.5",
        "--max-upload-bytes",
        "4096",
        "--upload-timeout",
        "60",
        "--upstream-timeout",
        "9",
        "--lease-seconds",
        "7",
        "--drain-timeout",
        "0",
        "--max-drains",
        "3",
        "--default-output-tokens",
        "100",
        "--send-timeout",
        "5",
        "--shutdown-timeout",
        "1",
        "--limit-metrics-top",
        "7",
        "--header-timeout",
        "1.5",
        "--max-connections",
        "99",
        "--keep-alive",
        "2",
        "--graceful-shutdown",
        "4",
    )
    env = {ENV_ALLOW_PROVIDERS: "ignored.example"}  # the flag wins
    assert gateway_options(args, environ=env) == {
        "mock_upstream": False,
        "allow_providers": ("https://api.openai.com", "*.example.com"),
        "max_body_bytes": 1024,
        "body_timeout_s": 2.5,
        "max_upload_bytes": 4096,
        "upload_timeout_s": 60.0,
        "upstream_timeout_s": 9.0,
        "lease_s": 7.0,
        "drain_timeout_s": 0.0,
        "max_drains": 3,
        "default_output_tokens": 100,
        "send_timeout_s": 5.0,
        "shutdown_timeout_s": 1.0,
        "limit_metrics_top": 7,
    }
    assert server_limits(args) == ServerLimits(
        header_timeout_s=1.5, max_connections=99, keep_alive_s=2, graceful_shutdown_s=4
    )


def test_allow_providers_from_the_environment() -> None:
    args = _proxy_args()
    env = {ENV_ALLOW_PROVIDERS: " https://a.example , b.example ,"}
    assert gateway_options(args, environ=env)["allow_providers"] == (
        "https://a.example",
        "b.example",
    )
    assert "allow_providers" not in gateway_options(args, environ={})  # ProxyConfig's default
    assert server_limits(args) == ServerLimits()


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--header-timeout", "0"], "--header-timeout: must be finite and > 0, got 0"),
        (["--header-timeout", "nan"], "--header-timeout: must be finite and > 0, got nan"),
        (["--max-connections", "-1"], "--max-connections: must be finite and > 0, got -1"),
        (["--max-body-bytes", "1.5"], "--max-body-bytes: not an integer: '1.5'"),
        (["--drain-timeout", "-1"], "--drain-timeout: must be finite and >= 0, got -1"),
        (["--log-level", "loud"], "--log-level: invalid choice"),
    ],
)
def test_bad_values_are_refused(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _proxy_args(*argv)
    assert f"error: argument {error}" in capsys.readouterr().err


def test_cli_defaults_match_proxy_config() -> None:
    from tokenlay_otel.proxy.app import ProxyConfig

    defaults = {f.name: f.default for f in dataclasses.fields(ProxyConfig)}
    options = gateway_options(_proxy_args(), environ={})
    assert options == {name: defaults[name] for name in options}
    # Every setting of the gateway has a flag, but those only code can give.
    code_only = {"keys", "rules", "store", "tracer_provider", "meter_provider"}
    assert set(defaults) - set(options) == code_only | {"allow_providers", "prices"}


def test_help_shows_every_flag_with_its_default() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "tokenlay_otel.cli", "proxy", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "1000"},  # one line per flag
    ).stdout
    proxy = build_parser()._subparsers._group_actions[0].choices["proxy"]  # type: ignore[union-attr]
    flags = [a for a in proxy._actions if a.option_strings and a.dest != "help"]
    assert len(flags) == 27
    text = " ".join(help_text.split())
    for action in flags:
        assert action.help is not None
        expanded = " ".join((action.help % {"default": action.default}).split())
        assert "(default: " in expanded, action.dest
        assert action.option_strings[0] in text
        assert expanded in text, action.dest
    assert "(default: 33554432)" in help_text
    assert "(default: half the open-files limit, at least 16)" in help_text
