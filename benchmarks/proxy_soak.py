"""Soak the local proxy: many concurrent streaming clients, exact usage, flat memory.

    python benchmarks/proxy_soak.py --clients 200 --minutes 10

Starts the proxy (mock upstream, SQLite) as a separate process on 127.0.0.1 with a
per-user tokens limit too high to reach, so it counts every token it relays. Then
``--clients`` asyncio clients stream chat completions through the SDK in a loop for
``--minutes``. Every call's usage is read from its final chunk on the client side; at
the end the proxy's own per-user token counters must equal those sums exactly, no call
may have failed, and the proxy's RSS (sampled each 10 s) must stay flat. Loopback only;
bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from tokenlay_otel import AsyncTokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.proxy.local import free_port

KEY = "tl-soak-key"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def client_loop(
    client: AsyncTokenlayOpenAI, user: str, deadline: float, used: Counter[str], errors: list[str]
) -> int:
    calls = 0
    while time.monotonic() < deadline:
        try:
            with metadata(user=user, org="soak"):
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"{user} call {calls}"}],
                    stream=True,
                )
                async for _ in stream:
                    pass
            meta = get_tokenlay_metadata(stream)
            if meta is None or meta.tokens_used is None:
                errors.append("no usage on a finished stream")
            else:
                used[user] += meta.tokens_used
            calls += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return calls


async def soak(url: str, clients: int, seconds: float) -> tuple[int, Counter[str], list[str]]:
    client = AsyncTokenlayOpenAI(
        provider_api_key="sk-soak", tokenlay_key=KEY, tokenlay_base_url=url, max_retries=0
    )
    used: Counter[str] = Counter()
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    counts = await asyncio.gather(
        *(client_loop(client, f"user-{i}", deadline, used, errors) for i in range(clients))
    )
    await client.close()
    return sum(counts), used, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokenlay-soak-"))
    rules = work / "rules.json"
    limit = {"type": "tokens", "max": 10**12, "window": "day", "per": "user"}
    rules.write_text(json.dumps([{"id": "count", "if": {}, "then": {"limits": [limit]}}]))
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tokenlay_otel.cli", "proxy", "--port", str(port),
         "--mock-upstream", "--rules", str(rules), "--db", str(work / "usage.db")],
        env={**os.environ, "TOKENLAY_PROXY_KEYS": KEY},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    samples: list[int] = []

    async def sample_rss(stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append(rss_kib(proxy.pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=10)

    async def run() -> tuple[int, Counter[str], list[str]]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop))
        result = await soak(url, args.clients, args.minutes * 60)
        stop.set()
        await sampler
        return result

    started = time.monotonic()
    try:
        calls, used, errors = asyncio.run(run())
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    elapsed = time.monotonic() - started
    db = sqlite3.connect(work / "usage.db")
    counted = {
        key.split("user=")[1].split(":")[0]: value
        for key, value in db.execute("SELECT key, value FROM usage WHERE key LIKE 'tokens:%'")
    }
    exact = all(counted.get(user) == total for user, total in used.items())
    third = max(1, len(samples) // 3)
    early, late = samples[:third], samples[-third:]
    print(f"{calls} streamed calls by {args.clients} clients in {elapsed:.0f} s "
          f"({calls / elapsed:.1f} calls/s); errors: {len(errors)}")  # fmt: skip
    print(f"usage: client-side sum {sum(used.values())} tokens, proxy counted "
          f"{sum(counted.values()):.0f}; exact per user: {exact}")  # fmt: skip
    print(f"proxy RSS KiB: first third avg {sum(early) / len(early):.0f}, "
          f"last third avg {sum(late) / len(late):.0f}, max {max(samples)}")  # fmt: skip
    if errors:
        print("first errors:", errors[:5])
    return 0 if exact and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
