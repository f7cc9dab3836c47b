"""The Tokenlay proxy beside LiteLLM's proxy and Portkey's gateway, on loopback.

    python benchmarks/gateways.py [--rounds 5] [--seconds 3] [--only NAME] [--json FILE]
        [--litellm PATH] [--portkey DIR]

Every gateway forwards to one mock OpenAI upstream (a raw asyncio HTTP/1.1 server in
its own process: a fixed chat completion, or a fixed SSE stream of seven events
``--gap-ms`` apart ending with a usage chunk; keep-alive). The mock served directly is
the baseline: "added" is a gateway's figure minus the mock's in the same round.

Gateways (all started once, then measured in interleaved rounds, each round in a
rotated order, so a noisy minute on this shared machine hits every row alike):

* ``tokenlay-allow``: ``tokenlay-otel proxy`` with no rules (every call allowed);
* ``tokenlay-sqlite`` / ``tokenlay-redis``: a per-user requests limit and a per-user
  tokens limit (set far above what a run sends, 50 users), SQLite file or Redis (a
  ``redis-server`` started here on a free loopback port, no persistence);
* ``tokenlay-sqlite-2w`` / ``tokenlay-redis-2w``: the same with ``--workers 2``;
* ``litellm``: LiteLLM's proxy, 1 worker, with per-user rpm/tpm limits (see
  :func:`litellm_config`), when installed::

      python -m venv /tmp/gw-venv
      /tmp/gw-venv/bin/pip install -r benchmarks/requirements-gateways.txt
      # then --litellm /tmp/gw-venv/bin/litellm (or LITELLM_BIN)

* ``portkey``: Portkey's gateway on Node (it enforces nothing), when installed::

      mkdir -p /tmp/portkey && cd /tmp/portkey && npm install @portkey-ai/gateway@1.15.2
      # then --portkey /tmp/portkey (or PORTKEY_DIR)

Per round and gateway, three phases of ``--seconds`` each:

1. 1 in flight, plain chat completions: p50 and p99 latency (a raw-socket keep-alive
   client in this process, blocking reads: it is idle while it waits);
2. 1 in flight, streamed: time to the first body bytes and to the end of the stream;
3. 16 in flight, plain: ``wrk`` (one thread, 16 connections, a Lua script cycling
   through prepared requests): req/s and p99, and the gateway's CPU time (its process
   and all its descendants, from /proc) over the phase divided by the requests. wrk's
   own CPU per request is reported too. Without wrk (``apt-get install wrk``) an asyncio
   client in this process does it, at a much higher CPU cost that competes with the
   gateway on a small machine.

Any non-2xx answer or connection error fails the gateway's row loudly (it is not
averaged away); the exit status is 1 when it is a tokenlay set-up (any gateway with
``--strict``). Needs Linux (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import functools
import json
import math
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from proxy_load import redis_server, rules_file  # this directory is on sys.path

from tokenlay_otel._wire import build_request_headers
from tokenlay_otel.proxy.local import free_port

USERS = 50
CONCURRENCY = 16
TOKENLAY_KEY = "tl-bench-key"
PROVIDER_KEY = "sk-bench"
LITELLM_MASTER_KEY = "sk-litellm-bench"
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something short about gateways."}]

# The targets, for the tokenlay rows with limits on.
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 3.0
TARGET_FIRST_CHUNK_MS = 1.0
TARGET_VS_PORTKEY = 1.5
TARGET_VS_LITELLM = 5.0
TARGET_CPU_MS = 1.0
TARGET_RSS_MB = 100.0


# --- the mock upstream -------------------------------------------------------------

_USAGE = {"prompt_tokens": 14, "completion_tokens": 6, "total_tokens": 20}
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the mock upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
    },
    separators=(",", ":"),
).encode()


def _chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _sse_events() -> list[bytes]:
    payloads: list[Any] = [
        _chunk({"role": "assistant", "content": ""}, None),
        _chunk({"content": "Hello"}, None),
        _chunk({"content": " from the"}, None),
        _chunk({"content": " mock upstream."}, None),
        _chunk({}, "stop"),
        {**_chunk({}, None), "choices": [], "usage": _USAGE},
    ]
    events = [b"data: " + json.dumps(p, separators=(",", ":")).encode() + b"\n\n" for p in payloads]
    return [*events, b"data: [DONE]\n\n"]


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_PLAIN_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_COMPLETION), _COMPLETION)
)
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_STREAM_PIECES = [_http_chunk(e) for e in _sse_events()]
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:\s*close", re.IGNORECASE)


class MockUpstream(asyncio.Protocol):
    """One connection: parse requests as they come (keep-alive), answer each with the
    canned completion or the canned stream. Requests are small, so parsing is a few
    regex searches over the buffer; a stream holds later requests until it has ended."""

    def __init__(self, gap_s: float) -> None:
        self.gap_s = gap_s
        self.buffer = b""
        self.streaming = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both can write.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.serve()

    def serve(self) -> None:
        while not self.streaming and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[: end + 2]
            body_start = end + 4
            length = _CONTENT_LENGTH.search(head)
            if length:
                body_end = body_start + int(length.group(1))
                if len(self.buffer) < body_end:
                    return
            elif _CHUNKED.search(head):
                # JSON bodies hold no raw CR LF, so the last chunk is easy to spot.
                last = self.buffer.find(b"0\r\n\r\n", body_start)
                if last < 0:
                    return
                body_end = last + 5
            else:
                body_end = body_start
            body = self.buffer[body_start:body_end]
            self.buffer = self.buffer[body_end:]
            closing = bool(_CLOSE.search(head))
            if b"/chat/completions " not in head[: head.find(b"\r\n")]:
                self.transport.write(_NOT_FOUND)
            elif _STREAM_FLAG.search(body):
                self.stream(closing)
                return
            else:
                self.transport.write(_PLAIN_RESPONSE)
            if closing:
                self.transport.close()
                return

    def stream(self, closing: bool) -> None:
        assert self.transport is not None
        self.streaming = True
        self.transport.write(_STREAM_HEAD + _STREAM_PIECES[0])
        loop = asyncio.get_running_loop()

        def send(index: int) -> None:
            if self.transport is None:
                return
            if index < len(_STREAM_PIECES):
                self.transport.write(_STREAM_PIECES[index])
                loop.call_later(self.gap_s, send, index + 1)
                return
            self.transport.write(b"0\r\n\r\n")
            self.streaming = False
            if closing:
                self.transport.close()
            else:
                self.serve()

        loop.call_later(self.gap_s, send, 1)


def serve_mock(port: int, gap_ms: float) -> None:
    with contextlib.suppress(ImportError):
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: MockUpstream(gap_ms / 1000), "127.0.0.1", port, backlog=1024
        )
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# --- reading answers -----------------------------------------------------------------


class BadAnswer(Exception):
    """A non-2xx status or a broken answer: the gateway's row fails."""


class Reader:
    """Incremental HTTP/1.1 response reader: feed bytes, learn when the body began and
    whether the answer is complete (content-length, chunked, or ended by close)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.status = 0
        self.head_done = False
        self.length: int | None = None
        self.chunked = False
        self.body_seen = False  # any body bytes yet (the stream's first chunk)
        self.done = False
        self.close = False
        self.leftover = b""

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[: end + 2]
            self.buffer = self.buffer[end + 4 :]
            self.head_done = True
            self.status = int(head[9:12])
            length = _CONTENT_LENGTH.search(head)
            self.length = int(length.group(1)) if length else None
            self.chunked = bool(_CHUNKED.search(head))
            self.close = bool(_CLOSE.search(head)) or (self.length is None and not self.chunked)
        if self.buffer:
            self.body_seen = True
        if self.length is not None:
            if len(self.buffer) >= self.length:
                self.leftover = self.buffer[self.length :]
                self.done = True
        elif self.chunked:
            self._chunks()

    def _chunks(self) -> None:
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self.buffer[:line_end].split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return
                self.leftover = self.buffer[trailer_end + 4 :]
                self.done = True
                return
            if len(self.buffer) < line_end + 2 + size + 2:
                return
            self.buffer = self.buffer[line_end + 2 + size + 2 :]

    def eof(self) -> None:
        if self.head_done and self.length is None and not self.chunked:
            self.done = True
            return
        raise BadAnswer("the connection closed mid-answer")


# --- 1 in flight: a blocking raw-socket client -----------------------------------------


@dataclass
class Samples:
    totals: list[float] = field(default_factory=list)  # ms
    firsts: list[float] = field(default_factory=list)  # ms, first body bytes


def one_in_flight(port: int, requests: list[bytes], seconds: float, warmup: int = 20) -> Samples:
    """Send the requests in turn on one keep-alive connection (a new one when the
    gateway closes it) for ``seconds`` after ``warmup`` untimed calls."""
    samples = Samples()
    sock: socket.socket | None = None
    deadline = 0.0
    i = 0
    try:
        while True:
            if i == warmup:
                deadline = time.perf_counter() + seconds
            elif i > warmup and time.perf_counter() >= deadline:
                return samples
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = Reader()
            start = time.perf_counter()
            sock.sendall(requests[i % len(requests)])
            first = 0.0
            while not reader.done:
                data = sock.recv(65536)
                now = time.perf_counter()
                if not data:
                    reader.eof()
                    break
                reader.feed(data)
                if not first and reader.body_seen:
                    first = now
            end = time.perf_counter()
            if not 200 <= reader.status < 300:
                raise BadAnswer(f"status {reader.status}: {reader.buffer[:300]!r}")
            if i >= warmup:
                samples.totals.append((end - start) * 1000)
                samples.firsts.append(((first or end) - start) * 1000)
            if reader.close:
                sock.close()
                sock = None
            i += 1
    except OSError as exc:
        raise BadAnswer(f"connection error: {exc}") from None
    finally:
        if sock is not None:
            sock.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# --- 16 in flight ----------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    p99_ms: float
    generator_cpu_s: float


_WRK_SCRIPT = """
local requests = {%s}
local n = #requests
local i = 0
request = function()
  i = i %% n + 1
  return requests[i]
end
done = function(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    "WRK-RESULT %%d %%d %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_string(data: bytes) -> str:
    # A quoted string with every byte outside printable ASCII as \ddd: Lua's long
    # brackets would turn CR LF into LF.
    out = []
    for byte in data:
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def wrk_load(wrk: str, port: int, requests: list[bytes], seconds: float, work: Path) -> Load:
    script = work / f"wrk-{port}.lua"
    script.write_text(_WRK_SCRIPT % ",\n".join(_lua_string(r) for r in requests))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [
        wrk,
        "-t1",
        f"-c{CONCURRENCY}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"WRK-RESULT ([\d ]+)", done.stdout)
    if done.returncode != 0 or match is None:
        raise BadAnswer(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    count, micros, p99, *errors = (int(n) for n in match.group(1).split())
    if any(errors):
        names = ("connect", "read", "write", "status >= 400", "timeout")
        raise BadAnswer(
            "wrk saw errors: "
            + ", ".join(f"{n} {k}" for k, n in zip(names, errors, strict=True) if n)
        )
    if count == 0:
        raise BadAnswer("wrk got no answer at all")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Load(count, micros / 1e6, p99 / 1000, cpu)


def python_load(port: int, requests: list[bytes], seconds: float) -> Load:
    """16 connections in flight from asyncio in this process (without wrk)."""
    latencies: list[float] = []

    class Client(asyncio.Protocol):
        def __init__(self, index: int, finished: asyncio.Future[None], deadline: float) -> None:
            self.index, self.finished, self.deadline = index, finished, deadline
            self.reader = Reader()
            self.start = 0.0
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.send()

        def send(self) -> None:
            assert self.transport is not None
            self.reader = Reader()
            self.start = time.perf_counter()
            self.transport.write(requests[self.index % len(requests)])
            self.index += CONCURRENCY

        def data_received(self, data: bytes) -> None:
            self.reader.feed(data)
            if not self.reader.done:
                return
            now = time.perf_counter()
            if not 200 <= self.reader.status < 300 or self.reader.close:
                self.fail(BadAnswer(f"status {self.reader.status} or connection: close"))
                return
            latencies.append((now - self.start) * 1000)
            if now >= self.deadline:
                assert self.transport is not None
                self.transport.close()
                if not self.finished.done():
                    self.finished.set_result(None)
            else:
                self.send()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.finished.done():
                self.fail(BadAnswer(f"connection lost: {exc}"))

        def fail(self, exc: Exception) -> None:
            if not self.finished.done():
                self.finished.set_exception(exc)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = started + seconds
        finished: list[asyncio.Future[None]] = [loop.create_future() for _ in range(CONCURRENCY)]
        for n in range(CONCURRENCY):
            await loop.create_connection(
                functools.partial(Client, n, finished[n], deadline), "127.0.0.1", port
            )
        await asyncio.gather(*finished)
        return time.perf_counter() - started

    before = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = asyncio.run(run())
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Load(len(latencies), elapsed, percentile(latencies, 99), cpu)


# --- the gateway's processes -------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{entry}/stat").read_text()
                out[int(entry)] = text[text.rindex(")") + 2 :].split()
    return out


def tree(root: int) -> dict[int, list[str]]:
    """The stat fields of ``root`` and all its descendants."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid]
            todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    """User + system CPU of the tree, with the children it has reaped."""
    total = sum(sum(int(f[i]) for i in (11, 12, 13, 14)) for f in tree(root).values())
    return total / _TICK


def rss_mb(root: int) -> dict[int, float]:
    """Resident memory of every process in the tree, MB."""
    return {pid: int(f[21]) * _PAGE / 1e6 for pid, f in tree(root).items()}


# --- the gateways ------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    label: str
    port: int
    process: subprocess.Popen[bytes]
    plain: list[bytes]  # one raw request per user
    stream: list[bytes]
    limits: bool = False  # the targets apply
    workers: int = 1


def raw_request(port: int, path: str, headers: dict[str, str], body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        "content-type: application/json",
        f"content-length: {len(payload)}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def chat_body(stream: bool, user: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if user is not None:
        body["user"] = user
    return body


def requests_for(
    port: int, path: str, headers_for: Callable[[str], dict[str, str]], user_in_body: bool
) -> tuple[list[bytes], list[bytes]]:
    users = [f"user-{n}" for n in range(USERS)]
    return tuple(  # type: ignore[return-value]
        [
            raw_request(port, path, headers_for(u), chat_body(s, u if user_in_body else None))
            for u in users
        ]
        for s in (False, True)
    )


def wait_listening(port: int, process: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{name}: exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise SystemExit(f"{name}: not listening on {port} after {timeout:.0f} s")


@contextlib.contextmanager
def running(
    name: str,
    command: list[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    log: Path,
    timeout: float = 60,
    cwd: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        wait_listening(port, process, name, timeout)
    except SystemExit:
        _stop(process)
        print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
        raise
    try:
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_tokenlay(
    stack: contextlib.ExitStack,
    name: str,
    label: str,
    mock: int,
    work: Path,
    *,
    rules: Path | None,
    store: list[str],
    workers: int = 1,
) -> Gateway:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tokenlay_otel.cli",
        "proxy",
        "--port",
        str(port),
        "--allow-provider",
        f"http://127.0.0.1:{mock}",
        "--workers",
        str(workers),
        *store,
        *(["--rules", str(rules)] if rules else []),
    ]
    env = {
        "TOKENLAY_PROXY_KEYS": TOKENLAY_KEY,
        "OTEL_TRACES_EXPORTER": "",
        "OTEL_METRICS_EXPORTER": "",
    }
    process = stack.enter_context(running(name, command, port, env=env, log=work / f"{name}.log"))

    def headers(user: str) -> dict[str, str]:
        return build_request_headers(
            tokenlay_key=TOKENLAY_KEY,
            provider_key=PROVIDER_KEY,
            provider_base=f"http://127.0.0.1:{mock}/v1",
            metadata={"user": user},
        )

    plain, stream = requests_for(port, "/v1/chat/completions", headers, user_in_body=False)
    return Gateway(name, label, port, process, plain, stream, rules is not None, workers)


def start_mock(stack: contextlib.ExitStack, work: Path, gap_ms: float) -> Gateway:
    port = free_port()
    command = [sys.executable, __file__, "--serve-mock", str(port), "--gap-ms", str(gap_ms)]
    process = stack.enter_context(running("mock", command, port, log=work / "mock.log"))
    headers = {"authorization": f"Bearer {PROVIDER_KEY}"}
    plain, stream = requests_for(port, "/v1/chat/completions", lambda u: headers, False)
    return Gateway(
        "mock", "mock upstream, served directly (baseline)", port, process, plain, stream
    )


_LITELLM_AUTH = """\
# Written by benchmarks/gateways.py: LiteLLM's per-user rpm/tpm limits without a
# database. The custom auth names the user from a header and gives it the limits; the
# proxy's rate limiter then counts requests and tokens per user_id in memory.
from litellm.proxy._types import UserAPIKeyAuth


async def user_api_key_auth(request, api_key):
    return UserAPIKeyAuth(
        api_key=api_key,
        user_id=request.headers.get("x-user") or "anonymous",
        user_rpm_limit={rpm},
        user_tpm_limit={tpm},
    )
"""


def litellm_config(work: Path, mock: int) -> Path:
    """LiteLLM's config: one model on the mock, per-user rpm and tpm through a custom
    auth (LiteLLM's own per-user and per-end-user budgets live in its database).
    Checked by hand with low limits: the 4th call of a user over rpm 3 gets a 429, and
    the 3rd over tpm 30 (20 tokens a call)."""
    (work / "bench_litellm_auth.py").write_text(_LITELLM_AUTH.format(rpm=10**9, tpm=10**12))
    config = work / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": f"http://127.0.0.1:{mock}/v1",
                            "api_key": PROVIDER_KEY,
                        },
                    }
                ],
                "general_settings": {"custom_auth": "bench_litellm_auth.user_api_key_auth"},
                "litellm_settings": {"telemetry": False},
            }
        )
    )
    return config


def start_litellm(stack: contextlib.ExitStack, binary: str, mock: int, work: Path) -> Gateway:
    port = free_port()
    config = litellm_config(work, mock)
    command = [
        binary,
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {
        "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch from the internet at start
        "LITELLM_LOG": "WARNING",  # no access log line per request, as our proxy
        "PYTHONPATH": "",
    }
    process = stack.enter_context(
        running(
            "litellm", command, port, env=env, log=work / "litellm.log", timeout=180, cwd=str(work)
        )
    )

    def headers(user: str) -> dict[str, str]:
        return {"authorization": f"Bearer {LITELLM_MASTER_KEY}", "x-user": user}

    plain, stream = requests_for(port, "/v1/chat/completions", headers, user_in_body=False)
    version = _pip_version(binary, "litellm")
    return Gateway(
        "litellm",
        f"LiteLLM {version} proxy (1 worker, per-user rpm/tpm)",
        port,
        process,
        plain,
        stream,
    )


def _pip_version(binary: str, package: str) -> str:
    python = Path(binary).with_name("python")
    done = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "?"


def start_portkey(stack: contextlib.ExitStack, where: str, mock: int, work: Path) -> Gateway:
    root = Path(where)
    package = root / "node_modules" / "@portkey-ai" / "gateway"
    if not package.is_dir():
        package = root
    node = shutil.which("node")
    if node is None:
        raise SystemExit("portkey: node is not installed")
    port = free_port()
    command = [node, "build/start-server.js", f"--port={port}", "--headless"]
    process = stack.enter_context(
        running("portkey", command, port, log=work / "portkey.log", cwd=str(package))
    )

    def headers(user: str) -> dict[str, str]:
        return {
            "authorization": f"Bearer {PROVIDER_KEY}",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"http://127.0.0.1:{mock}/v1",
            "x-portkey-metadata": json.dumps({"_user": user}),
        }

    plain, stream = requests_for(port, "/v1/chat/completions", headers, user_in_body=False)
    version = json.loads((package / "package.json").read_text()).get("version", "?")
    return Gateway(
        "portkey", f"Portkey gateway {version} (Node, no limits)", port, process, plain, stream
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3, help="per phase (default 3)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="measure only these gateways (repeat, or comma-separated; shell "
        "patterns such as 'tokenlay-*'; the mock is always measured)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when any gateway fails, not only a tokenlay set-up",
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=2.0,
        help="the mock's pause between stream events (default 2)",
    )
    parser.add_argument(
        "--litellm",
        default=os.environ.get("LITELLM_BIN"),
        help="the litellm executable (default $LITELLM_BIN)",
    )
    parser.add_argument(
        "--portkey",
        default=os.environ.get("PORTKEY_DIR"),
        help="the npm directory holding @portkey-ai/gateway (default $PORTKEY_DIR)",
    )
    parser.add_argument("--serve-mock", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_mock:
        serve_mock(args.serve_mock, args.gap_ms)
        return 0
    only = {n.strip() for text in args.only for n in text.split(",") if n.strip()}
    work = Path(tempfile.mkdtemp(prefix="tokenlay-gateways-"))
    with contextlib.ExitStack() as stack:
        gateways = start_all(stack, args, work, only)
        results = measure(gateways, args, work)
    return report(gateways, results, args)


def start_all(
    stack: contextlib.ExitStack, args: argparse.Namespace, work: Path, only: set[str]
) -> list[Gateway]:
    def wanted(name: str) -> bool:
        return not only or any(fnmatch.fnmatchcase(name, pattern) for pattern in only)

    mock = start_mock(stack, work, args.gap_ms)
    gateways = [mock]
    rules = rules_file(work)  # per-user requests and tokens, far above a run
    need_redis = any(wanted(n) for n in ("tokenlay-redis", "tokenlay-redis-2w"))
    redis_url = stack.enter_context(redis_server(work)) if need_redis else None
    setups: list[tuple[str, str, Path | None, list[str], int]] = [
        ("tokenlay-allow", "tokenlay proxy, allow rule", None, ["--db", str(work / "a.db")], 1),
        (
            "tokenlay-sqlite",
            "tokenlay proxy, per-user limits, SQLite",
            rules,
            ["--db", str(work / "s.db")],
            1,
        ),
        (
            "tokenlay-sqlite-2w",
            "tokenlay proxy, per-user limits, SQLite, 2 workers",
            rules,
            ["--db", str(work / "s2.db")],
            2,
        ),
    ]
    if redis_url:
        setups += [
            (
                "tokenlay-redis",
                "tokenlay proxy, per-user limits, Redis",
                rules,
                ["--redis-url", redis_url],
                1,
            ),
            (
                "tokenlay-redis-2w",
                "tokenlay proxy, per-user limits, Redis, 2 workers",
                rules,
                ["--redis-url", redis_url.replace("/0", "/1")],
                2,
            ),
        ]
    for name, label, rule_file, store, workers in setups:
        if wanted(name):
            gateways.append(
                start_tokenlay(
                    stack,
                    name,
                    label,
                    mock.port,
                    work,
                    rules=rule_file,
                    store=store,
                    workers=workers,
                )
            )
    if wanted("litellm"):
        binary = args.litellm or shutil.which("litellm")
        if binary and Path(binary).exists():
            gateways.append(start_litellm(stack, binary, mock.port, work))
        else:
            print(
                "skip litellm: not found; python -m venv /tmp/gw-venv && /tmp/gw-venv/bin/pip "
                "install -r benchmarks/requirements-gateways.txt, then --litellm "
                "/tmp/gw-venv/bin/litellm"
            )
    if wanted("portkey"):
        where = args.portkey
        if where and (Path(where) / "node_modules" / "@portkey-ai" / "gateway").is_dir():
            gateways.append(start_portkey(stack, where, mock.port, work))
        else:
            print(
                "skip portkey: not found; mkdir -p /tmp/portkey && cd /tmp/portkey && npm "
                "install @portkey-ai/gateway@1.15.2, then --portkey /tmp/portkey"
            )
    return gateways


@dataclass
class Round:
    p50: float
    p99: float
    first: float | None  # stream, median time to first body bytes (None: streams fail)
    stream_total: float | None
    rps: float
    p99_16: float
    cpu_ms: float  # gateway CPU per request, 16 in flight
    generator_cpu_ms: float
    rss: dict[int, float]


def measure_once(
    gateway: Gateway, args: argparse.Namespace, work: Path, wrk: str | None, streams: bool
) -> Round:
    """One round of one gateway; ``streams=False`` skips the stream phase (it failed)."""
    plain = one_in_flight(gateway.port, gateway.plain, args.seconds)
    stream = one_in_flight(gateway.port, gateway.stream, args.seconds) if streams else None
    cpu_before = cpu_seconds(gateway.process.pid)
    if wrk:
        load = wrk_load(wrk, gateway.port, gateway.plain, args.seconds, work)
    else:
        load = python_load(gateway.port, gateway.plain, args.seconds)
    cpu = cpu_seconds(gateway.process.pid) - cpu_before
    return Round(
        p50=percentile(plain.totals, 50),
        p99=percentile(plain.totals, 99),
        first=percentile(stream.firsts, 50) if stream else None,
        stream_total=percentile(stream.totals, 50) if stream else None,
        rps=load.requests / load.seconds,
        p99_16=load.p99_ms,
        cpu_ms=cpu * 1000 / load.requests,
        generator_cpu_ms=load.generator_cpu_s * 1000 / load.requests,
        rss=rss_mb(gateway.process.pid),
    )


def measure(gateways: list[Gateway], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        print(
            "wrk is not installed (apt-get install wrk): 16 in flight comes from asyncio "
            "in this process, which takes CPU from the gateway"
        )
    rounds: dict[str, list[Round]] = {g.name: [] for g in gateways}
    failed: dict[str, str] = {}
    # A gateway whose streams fail keeps its other numbers: the stream cells say FAILED.
    stream_failed: dict[str, str] = {}
    print(f"warming up {len(gateways)} set-ups...", flush=True)
    for gateway in gateways:
        try:
            warm_stream(gateway, stream_failed)
            if wrk:
                wrk_load(wrk, gateway.port, gateway.plain, 1, work)
            else:
                python_load(gateway.port, gateway.plain, 1)
        except BadAnswer as exc:
            failed[gateway.name] = str(exc)
            print(f"FAIL {gateway.name} (warm-up): {exc}", flush=True)
    for r in range(args.rounds):
        order = gateways[r % len(gateways) :] + gateways[: r % len(gateways)]
        for gateway in order:
            if gateway.name in failed:
                continue
            try:
                one = measure_once(
                    gateway, args, work, wrk, streams=gateway.name not in stream_failed
                )
            except BadAnswer as exc:
                failed[gateway.name] = f"round {r + 1}: {exc}"
                print(f"FAIL {gateway.name} round {r + 1}: {exc}", flush=True)
                continue
            rounds[gateway.name].append(one)
            print(
                f"round {r + 1}/{args.rounds} {gateway.name:<20} p50 {one.p50:6.2f} ms  "
                f"req/s {one.rps:7.0f}  cpu/req {one.cpu_ms:5.2f} ms",
                flush=True,
            )
    return {"rounds": rounds, "failed": failed, "stream_failed": stream_failed, "wrk": wrk}


def warm_stream(gateway: Gateway, stream_failed: dict[str, str]) -> None:
    try:
        one_in_flight(gateway.port, gateway.stream, 0.3)
    except BadAnswer as exc:
        stream_failed[gateway.name] = str(exc)
        print(f"FAIL {gateway.name} streams (warm-up): {exc}", flush=True)


# --- the report ----------------------------------------------------------------------------


@dataclass
class Stat:
    median: float
    low: float
    high: float

    def show(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}..{self.high:.{digits}f})"


def stat(values: list[float]) -> Stat:
    return Stat(statistics.median(values), min(values), max(values))


def _added(pairs: list[tuple[Round, Round]], name: str) -> Stat | None:
    values = [(getattr(g, name), getattr(b, name)) for g, b in pairs]
    if any(g is None or b is None for g, b in values):
        return None
    return stat([g - b for g, b in values])


def _cell(value: Stat | None) -> str:
    return "**FAILED** (below)" if value is None else f"{value.show()} ms"


def summarize(gateway: Gateway, rounds: list[Round], base: list[Round]) -> dict[str, Any]:
    """Medians and per-round ranges; "added" pairs each round with the mock's round."""
    pairs = list(zip(rounds, base, strict=False))
    last_rss = rounds[-1].rss
    per_process = sorted(last_rss.values(), reverse=True)
    # With several workers the parent (lightest) only forks and waits: per worker is
    # the heaviest processes, one per worker.
    per_worker = per_process[: gateway.workers]
    return {
        "label": gateway.label,
        "added_p50_ms": stat([g.p50 - b.p50 for g, b in pairs]),
        "added_p99_ms": stat([g.p99 - b.p99 for g, b in pairs]),
        "p50_ms": stat([g.p50 for g in rounds]),
        "rps_16": stat([g.rps for g in rounds]),
        "p99_16_ms": stat([g.p99_16 for g in rounds]),
        "cpu_ms": stat([g.cpu_ms for g in rounds]),
        "generator_cpu_ms": stat([g.generator_cpu_ms for g in rounds]),
        "first_added_ms": _added(pairs, "first"),
        "stream_total_added_ms": _added(pairs, "stream_total"),
        "rss_mb": stat([sum(g.rss.values()) for g in rounds]),
        "rss_per_process_mb": [round(v, 1) for v in per_process],
        "rss_max_worker_mb": max(per_worker) if per_worker else 0.0,
        "workers": gateway.workers,
    }


def report(gateways: list[Gateway], results: dict[str, Any], args: argparse.Namespace) -> int:
    rounds: dict[str, list[Round]] = results["rounds"]
    failed: dict[str, str] = results["failed"]
    if "mock" in failed:
        print(f"FAIL: the mock upstream itself: {failed['mock']}")
        return 1
    base = rounds["mock"]
    summary = {
        g.name: summarize(g, rounds[g.name], base)
        for g in gateways
        if g.name not in failed and rounds[g.name]
    }
    print()
    print(
        f"{args.rounds} interleaved rounds, {args.seconds:g} s per phase; median (min..max "
        f"over rounds); added = minus the mock served directly in the same round; "
        f"16 in flight from {'wrk' if results['wrk'] else 'asyncio in this process'}; "
        f"Python {platform.python_version()}, {os.cpu_count()} cores"
    )
    print()
    print(
        "| gateway | added p50, 1 in flight | added p99 | req/s, 16 in flight | p99, 16 in "
        "flight | CPU per request | stream: first chunk added | stream: total added | RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for gateway in gateways:
        if gateway.name in failed:
            print(f"| {gateway.label} | **FAILED**: {failed[gateway.name]} |||||||")
            continue
        s = summary[gateway.name]
        rss = f"{s['rss_mb'].median:.0f} MB"
        if gateway.workers > 1:
            rss += f" ({' + '.join(f'{v:.0f}' for v in s['rss_per_process_mb'])})"
        if gateway.name == "mock":
            print(
                f"| {gateway.label} | p50 {s['p50_ms'].show()} ms | | {s['rps_16'].show(0)} | "
                f"{s['p99_16_ms'].show()} ms | {s['cpu_ms'].show()} ms | | | {rss} |"
            )
            continue
        print(
            f"| {gateway.label} | {s['added_p50_ms'].show()} ms | {s['added_p99_ms'].show()} ms "
            f"| {s['rps_16'].show(0)} | {s['p99_16_ms'].show()} ms | {s['cpu_ms'].show()} ms | "
            f"{_cell(s['first_added_ms'])} | {_cell(s['stream_total_added_ms'])} | "
            f"{rss} |"
        )
    generator = [s["generator_cpu_ms"].median for s in summary.values()]
    if generator:
        print(
            f"\nload generator CPU per request, 16 in flight: {min(generator):.3f}.."
            f"{max(generator):.3f} ms (median per gateway)"
        )
    print_scaling(summary)
    verdicts = print_targets(gateways, summary)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "summary": summary,
                    "failed": failed,
                    "targets": verdicts,
                    "stream_failed": results["stream_failed"],
                    "rounds": {k: [r.__dict__ for r in v] for k, v in rounds.items()},
                    "settings": {
                        "rounds": args.rounds,
                        "seconds": args.seconds,
                        "gap_ms": args.gap_ms,
                        "users": USERS,
                        "concurrency": CONCURRENCY,
                        "wrk": results["wrk"],
                    },
                },
                indent=2,
                default=lambda o: o.__dict__,
            )
        )
    for name, why in results["stream_failed"].items():
        print(f"\nFAILED streams through {name}: {why}")
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (see above)")
    # Any error through a tokenlay set-up fails the run. Another gateway's failures are
    # printed above and fail it only with --strict: Portkey's streams answer 500 here
    # (its own code appends to a fetch response's immutable headers), which says nothing
    # about ours and must not hide our result.
    broken = set(failed) | set(results["stream_failed"])
    ours = {name for name in broken if name.startswith("tokenlay") or name == "mock"}
    return 1 if ours or (args.strict and broken) else 0


def print_scaling(summary: dict[str, Any]) -> None:
    for store in ("sqlite", "redis"):
        one, two = summary.get(f"tokenlay-{store}"), summary.get(f"tokenlay-{store}-2w")
        if one and two:
            print(
                f"scaling 1 -> 2 workers, {store}: {one['rps_16'].median:.0f} -> "
                f"{two['rps_16'].median:.0f} req/s "
                f"(x{two['rps_16'].median / one['rps_16'].median:.2f})"
            )


def print_targets(gateways: list[Gateway], summary: dict[str, Any]) -> dict[str, Any]:
    portkey = summary.get("portkey", {}).get("rps_16")
    litellm = summary.get("litellm", {}).get("rps_16")
    verdicts: dict[str, Any] = {}
    print("\ntargets (issue 18), for the rows with limits on:")
    for gateway in gateways:
        s = summary.get(gateway.name)
        if not gateway.limits or s is None:
            continue
        checks = [
            ("added p50", s["added_p50_ms"].median, TARGET_ADDED_P50_MS, "ms"),
            ("added p99", s["added_p99_ms"].median, TARGET_ADDED_P99_MS, "ms"),
            (
                "stream first chunk added",
                s["first_added_ms"].median if s["first_added_ms"] else math.inf,
                TARGET_FIRST_CHUNK_MS,
                "ms",
            ),
            ("CPU per request", s["cpu_ms"].median, TARGET_CPU_MS, "ms"),
            ("RSS per worker", s["rss_max_worker_mb"], TARGET_RSS_MB, "MB"),
        ]
        lines = [
            (name, value <= limit, f"{value:.2f} {unit} <= {limit:g} {unit}")
            for name, value, limit, unit in checks
        ]
        rps = s["rps_16"].median
        for other, factor, name in (
            (portkey, TARGET_VS_PORTKEY, "Portkey"),
            (litellm, TARGET_VS_LITELLM, "LiteLLM"),
        ):
            if other is None:
                lines.append((f"req/s vs {name}", None, f"{name} not measured"))
            else:
                ratio = rps / other.median
                lines.append((f"req/s vs {name}", ratio >= factor, f"x{ratio:.2f} >= x{factor:g}"))
        print(f"  {gateway.label}")
        for name, ok, text in lines:
            mark = "n/a " if ok is None else ("pass" if ok else "FAIL")
            print(f"    {mark}  {name}: {text}")
        verdicts[gateway.name] = {name: {"pass": ok, "detail": text} for name, ok, text in lines}
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
