"""Throughput and added latency of the local Tokenlay proxy, on loopback.

    python benchmarks/proxy_load.py [--seconds 10] [--concurrency 16]

The same mock upstream (``--mock-upstream``) answers in two set-ups, one after the
other, each a separate process on 127.0.0.1:

* **direct**: a bare ASGI server around the mock upstream: what the upstream and one
  HTTP hop cost by themselves;
* **proxy**: ``tokenlay-otel proxy --mock-upstream`` with a per-user requests and tokens
  limit (so every call reserves in the store and records its usage), with SQLite and
  then with Redis (a ``redis-server`` started here when the binary is installed).

A load process (this one) keeps 1, then 16 requests in flight (``--concurrency``) for ``--seconds``,
spread over 1,000 users, for plain and for streaming chat completions. Added latency is
the proxy's percentile minus the direct set-up's; for streams, both time to first chunk
and total time are reported (the mock spaces stream events 5 ms apart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from tokenlay_otel._wire import build_request_headers, proxy_url
from tokenlay_otel.proxy.local import free_port

KEY = "tl-load-key"
USERS = 1000
MESSAGES = [{"role": "user", "content": "Say something short about load testing."}]


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(400):
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url}: not ready after 20 s")


@contextlib.contextmanager
def started(command: list[str], health: str, env: dict[str, str] | None = None) -> Iterator[None]:
    process = subprocess.Popen(command, env={**os.environ, **(env or {})})
    try:
        wait_ready(health, process)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


# --- the direct set-up: the mock upstream behind a bare ASGI server -----------------


def direct_app() -> Any:
    from tokenlay_otel.proxy.mock import MockUpstream

    upstream = MockUpstream()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        answer = await upstream.send(scope["method"], f"http://upstream{scope['path']}", {}, body)
        headers = [(k.encode(), v.encode()) for k, v in answer.headers]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        async for chunk in answer.chunks():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def serve_direct(port: int) -> None:
    import uvicorn

    uvicorn.run(direct_app(), host="127.0.0.1", port=port, log_level="warning")


# --- load ------------------------------------------------------------------------------


@dataclass
class Result:
    totals: list[float] = field(default_factory=list)  # seconds per call
    first_chunks: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    def percentile(self, values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else 0.0


async def drive(
    url: str, headers_for: Any, stream: bool, seconds: float, concurrency: int
) -> Result:
    result = Result()
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + seconds
        body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES}
        if stream:
            body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        payload = json.dumps(body).encode()

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < deadline:
                headers = {"content-type": "application/json", **headers_for(f"user-{i % USERS}")}
                i += concurrency
                start = time.perf_counter()
                try:
                    async with client.stream("POST", url, content=payload, headers=headers) as r:
                        first = None
                        async for _ in r.aiter_raw():
                            if first is None:
                                first = time.perf_counter() - start
                        if r.status_code != 200:
                            result.errors += 1
                            continue
                except httpx2.HTTPError:
                    result.errors += 1
                    continue
                result.totals.append(time.perf_counter() - start)
                if stream and first is not None:
                    result.first_chunks.append(first)

        started_at = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        result.elapsed = time.perf_counter() - started_at
    return result


def measure(url: str, headers_for: Any, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for concurrency in args.concurrency:
        for stream in (False, True):
            asyncio.run(drive(url, headers_for, stream, 1.0, concurrency))  # warm-up
            r = asyncio.run(drive(url, headers_for, stream, args.seconds, concurrency))
            row = {
                "requests_per_s": len(r.totals) / r.elapsed,
                "p50_ms": r.percentile(r.totals, 50),
                "p99_ms": r.percentile(r.totals, 99),
                "errors": float(r.errors),
            }
            if stream:
                row["ttfc_p50_ms"] = r.percentile(r.first_chunks, 50)
                row["ttfc_p99_ms"] = r.percentile(r.first_chunks, 99)
            out[f"{'stream' if stream else 'plain'} x{concurrency}"] = row
    return out


def proxy_headers(user: str) -> dict[str, str]:
    return build_request_headers(
        tokenlay_key=KEY,
        provider_key="sk-load",
        provider_base="https://api.openai.com/v1",
        metadata={"user": user, "org": "load"},
    )


def rules_file(work: Path) -> Path:
    limits = [
        {"type": "requests", "max": 10**9, "window": "day", "per": "user"},
        {"type": "tokens", "max": 10**12, "window": "day", "per": "user"},
    ]
    path = work / "rules.json"
    path.write_text(json.dumps([{"id": "count", "if": {}, "then": {"limits": limits}}]))
    return path


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed: the Redis rows are skipped", file=sys.stderr)
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 16],
        help="requests in flight, comma-separated (default 1,16)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--serve-direct", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_direct:
        serve_direct(args.serve_direct)
        return 0
    work = Path(tempfile.mkdtemp(prefix="tokenlay-load-"))
    results: dict[str, dict[str, dict[str, float]]] = {}

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with started([sys.executable, __file__, "--serve-direct", str(port)], base + "/health"):
        results["direct"] = measure(base + "/v1/chat/completions", lambda user: {}, args)

    rules = rules_file(work)
    with redis_server(work) as redis_url:
        stores = [("proxy, SQLite", ["--db", str(work / "usage.db")])]
        if redis_url:
            stores.append(("proxy, Redis", ["--redis-url", redis_url]))
        for label, store in stores:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = [
                sys.executable, "-m", "tokenlay_otel.cli", "proxy", "--port", str(port),
                "--mock-upstream", "--rules", str(rules), *store,
            ]  # fmt: skip
            with started(command, base + "/health", {"TOKENLAY_PROXY_KEYS": KEY}):
                url = proxy_url(base, "/chat/completions")
                results[label] = measure(url, proxy_headers, args)

    print(f"loopback, {args.seconds:.0f} s per row; xN: N requests in flight")
    print(
        f"{'set-up':<16} {'call':<11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'added p50':>10} {'added p99':>10} {'ttfc p50':>9} {'errors':>7}"
    )
    for label, rows in results.items():
        for kind, row in rows.items():
            direct = results["direct"][kind]
            added = (
                ("", "")
                if label == "direct"
                else (
                    f"{row['p50_ms'] - direct['p50_ms']:.2f}",
                    f"{row['p99_ms'] - direct['p99_ms']:.2f}",
                )
            )
            ttfc = f"{row['ttfc_p50_ms']:.2f}" if "ttfc_p50_ms" in row else ""
            print(
                f"{label:<16} {kind:<11} {row['requests_per_s']:>8.0f} {row['p50_ms']:>8.2f}"
                f" {row['p99_ms']:>8.2f} {added[0]:>10} {added[1]:>10} {ttfc:>9}"
                f" {row['errors']:>7.0f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    failed = sum(row["errors"] for rows in results.values() for row in rows.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
