"""Attribution and counts stay exact under concurrency; abandoned streams do not leak."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
import tracemalloc
from collections import Counter

import pytest

from tokenlay_otel import metadata

from .conftest import SpanCapture
from .inprocess import async_client, sync_client

pytestmark = pytest.mark.slow  # thousands of calls in threads and tasks, and a leak check

#: Abandoned streams per measured round.
ROUND = 2_000


def expected_usage(user: str) -> tuple[int, int]:
    return 10 + len(user), 3 + len(user) % 7


def check(telemetry: SpanCapture, calls: Counter[str]) -> None:
    spans = telemetry.spans()
    assert len(spans) == sum(calls.values())
    for span in spans:
        user = span.attributes["tokenlay.user"]
        assert span.attributes["tokenlay.org"] == f"org-of-{user}"
        assert span.attributes["gen_ai.usage.input_tokens"] == expected_usage(user)[0]
        assert span.attributes["gen_ai.usage.output_tokens"] == expected_usage(user)[1]
    tokens: Counter[tuple[str, str]] = Counter()
    for point in telemetry.metrics()["gen_ai.client.token.usage"][1]:
        attrs = point.attributes
        assert attrs["tokenlay.org"] == f"org-of-{attrs['tokenlay.user']}"
        tokens[(attrs["tokenlay.user"], attrs["gen_ai.token.type"])] += point.sum
    for user, n in calls.items():
        prompt, completion = expected_usage(user)
        assert tokens[(user, "input")] == n * prompt, user
        assert tokens[(user, "output")] == n * completion, user
    requests = telemetry.metrics()["tokenlay.client.requests"][1]
    assert sum(p.value for p in requests) == sum(calls.values())


def test_1000_concurrent_async_calls(instrument, telemetry: SpanCapture) -> None:
    instrument()
    client = async_client()
    calls: Counter[str] = Counter()

    async def one(i: int) -> None:
        user = f"user-{i % 97}"
        calls[user] += 1
        with metadata(user=user, org=f"org-of-{user}"):
            await asyncio.sleep(random.random() / 100)
            if i % 3 == 0:
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": user}], stream=True
                )
                async for _ in stream:
                    await asyncio.sleep(0)
            else:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": user}]
                )

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(1000)))

    asyncio.run(main())
    check(telemetry, calls)


def test_16_threads_200_calls_each(instrument, telemetry: SpanCapture) -> None:
    instrument()
    client = sync_client()
    calls: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(200):
            user = f"t{t}-u{i % 13}"
            with lock:
                calls[user] += 1
            with metadata(user=user, org=f"org-of-{user}"):
                messages = [{"role": "user", "content": user}]
                if i % 4 == 0:
                    for _ in client.chat.completions.create(
                        model="gpt-4o-mini", messages=messages, stream=True
                    ):
                        pass
                else:
                    client.chat.completions.create(model="gpt-4o-mini", messages=messages)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    check(telemetry, calls)


def test_abandoned_streams_do_not_leak(
    instrument, telemetry: SpanCapture, caplog: pytest.LogCaptureFixture
) -> None:
    # The suite keeps every DEBUG record for its secret scan; that is not our memory.
    caplog.set_level(logging.WARNING)
    instrument()
    client = sync_client()
    rng = random.Random(3)

    def batch(n: int) -> None:
        for _ in range(n):
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "u"}], stream=True
            )
            how = rng.randrange(4)
            it = iter(stream)
            for _ in range(rng.randrange(5)):
                next(it, None)
            if how == 0:
                stream.close()
            elif how == 1:
                try:
                    with stream:
                        next(it, None)
                        raise RuntimeError("caller bug")
                except RuntimeError:
                    pass
            # how 2, 3: break out and drop the reference
            del stream, it

    def run_and_measure(n: int) -> tuple[int, int]:
        batch(n)
        gc.collect()
        ended = len(telemetry.spans())
        telemetry.exporter.clear()
        gc.collect()
        assert ended == n  # every abandoned stream's span ended, exactly once each
        return len(gc.get_objects()), tracemalloc.get_traced_memory()[0]

    # Two rounds after a warm-up that fills the caches: a leak shows as growth from the
    # first round to the second, in live objects and in bytes allocated by Python
    # (tracemalloc: also what the collector does not track, such as a held buffer).
    run_and_measure(500)
    tracemalloc.start()
    try:
        objects_1, bytes_1 = run_and_measure(ROUND)
        objects_2, bytes_2 = run_and_measure(ROUND)
    finally:
        tracemalloc.stop()
    print(f"abandoned streams: objects {objects_1} -> {objects_2}, bytes {bytes_1} -> {bytes_2}")
    assert objects_2 - objects_1 < ROUND // 5  # a leak would be >= ROUND
    assert bytes_2 - bytes_1 < ROUND * 100  # a leaked stream holds kilobytes
