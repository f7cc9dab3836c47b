"""Per-call overhead of tokenlay-otel, measured in one process with no network.

    python benchmarks/overhead.py [--calls 2000] [--rounds 7]

The openai client talks to an in-process mock transport (a canned completion, or a
20-chunk SSE stream). Rounds alternate uninstrumented and instrumented runs
(instrument()/uninstrument()) so machine drift hits both; each scenario reports the
median per-call time over rounds, the overhead and the ratio. The *floor* is what the
OpenTelemetry SDK alone costs to record the telemetry we emit for one call: one span
with the same attributes plus the same metric records, no openai involved. When
``opentelemetry-instrumentation-openai-v2`` is installed it is measured as a reference.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import openai
import openai._base_client as base_client
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from tokenlay_otel import TokenlayInstrumentor, metadata
from tokenlay_otel._config import Settings
from tokenlay_otel.testing import chat_completion

httpx: Any = getattr(base_client, "httpx2", None) or base_client.httpx
MESSAGES = [{"role": "user", "content": "hi"}]
BODY = json.dumps(chat_completion("gpt-4o-mini")).encode()


def _sse(chunks: int) -> bytes:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    events = []
    for i in range(chunks):
        choice = {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
        events.append({**base, "choices": [choice]})
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    usage = {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks}
    events.append({**base, "choices": [], "usage": usage})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


class _NullExporter(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _handler(stream_body: bytes) -> Callable[[Any], Any]:
    def handle(request: Any) -> Any:
        if b'"stream":true' in request.content or b'"stream": true' in request.content:
            return httpx.Response(
                200, content=stream_body, headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(200, content=BODY, headers={"content-type": "application/json"})

    return handle


def clients(chunks: int) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    handler = _handler(_sse(chunks))

    async def ahandler(request: Any) -> Any:
        return handler(request)

    sync = openai.OpenAI(
        api_key="sk-bench",
        base_url="https://api.openai.com/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    aio = openai.AsyncOpenAI(
        api_key="sk-bench",
        base_url="https://api.openai.com/v1",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(ahandler)),
    )
    return sync, aio


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for i in range(calls):
        with metadata(user=f"user-{i % 100}", org="org-1"):
            fn()
    return (time.perf_counter() - start) / calls * 1e6


def per_call_us_async(fn: Callable[[], Any], calls: int) -> float:
    async def run() -> float:
        start = time.perf_counter()
        for i in range(calls):
            with metadata(user=f"user-{i % 100}", org="org-1"):
                await fn()
        return (time.perf_counter() - start) / calls * 1e6

    gc.collect()
    return asyncio.run(run())


def scenarios(chunks: int) -> dict[str, tuple[Callable[[], Any], bool]]:
    sync, aio = clients(chunks)

    def chat() -> Any:
        return sync.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    def stream() -> Any:
        for _ in sync.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
            pass

    async def achat() -> Any:
        return await aio.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    async def astream() -> Any:
        s = await aio.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        async for _ in s:
            pass

    return {
        "sync chat": (chat, False),
        f"sync stream ({chunks} chunks)": (stream, False),
        "async chat": (achat, True),
        f"async stream ({chunks} chunks)": (astream, True),
    }


def floor_us(calls: int, providers: tuple[TracerProvider, MeterProvider]) -> dict[str, float]:
    """The SDK's own cost for our telemetry: one span, its attributes, the metric records."""
    tracer = providers[0].get_tracer("floor")
    meter = providers[1].get_meter("floor")
    duration = meter.create_histogram("floor.duration", unit="s")
    tokens = meter.create_histogram("floor.tokens", unit="{token}")
    cost = meter.create_counter("floor.cost", unit="USD")
    requests = meter.create_counter("floor.requests")
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "server.address": "api.openai.com",
        "server.port": 443,
        "tokenlay.routed": False,
        "tokenlay.user": "user-1",
        "tokenlay.org": "org-1",
    }
    end_attrs = {
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 7,
        "tokenlay.cost.usd": 0.000006,
        "tokenlay.cost.source": "local",
    }
    metric_attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "tokenlay.user": "user-1",
        "tokenlay.org": "org-1",
    }

    def span_only() -> None:
        span = tracer.start_span("chat gpt-4o-mini", attributes=attrs)
        span.set_attributes(end_attrs)
        span.end()

    def metrics_only() -> None:
        duration.record(0.1, metric_attrs)
        tokens.record(12, {**metric_attrs, "gen_ai.token.type": "input"})
        tokens.record(7, {**metric_attrs, "gen_ai.token.type": "output"})
        cost.add(0.000006, metric_attrs)
        requests.add(1, metric_attrs)

    def timed(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1e6

    span = statistics.median(timed(span_only) for _ in range(5))
    records = statistics.median(timed(metrics_only) for _ in range(5))
    return {"span": span, "metrics": records, "total": span + records}


def official() -> Any:
    try:
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
    except ImportError:
        return None
    return OpenAIInstrumentor()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(_NullExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentors: dict[str, tuple[Any, dict[str, Any]]] = {
        "tokenlay": (TokenlayInstrumentor(), {"settings": Settings()}),
    }
    reference = official()
    if reference is not None:
        instrumentors["official openai-v2"] = (reference, {})
    results: dict[str, dict[str, list[float]]] = {}
    for name, (fn, is_async) in scenarios(args.chunks).items():
        run = per_call_us_async if is_async else per_call_us
        run(fn, 200)  # warm-up: imports, caches, connection setup
        rows = results.setdefault(name, {"baseline": []})
        for _ in range(args.rounds):
            rows["baseline"].append(run(fn, args.calls))
            for label, (instrumentor, extra) in instrumentors.items():
                instrumentor.instrument(
                    tracer_provider=tracer_provider, meter_provider=meter_provider, **extra
                )
                rows.setdefault(label, []).append(run(fn, args.calls))
                instrumentor.uninstrument()
    return {
        "results": {
            name: {label: statistics.median(v) for label, v in rows.items()}
            for name, rows in results.items()
        },
        "floor": floor_us(args.calls, (tracer_provider, meter_provider)),
    }


def startup_ms() -> dict[str, float]:
    code = (
        "import time, openai\n"
        "t = time.perf_counter(); import tokenlay_otel; t1 = time.perf_counter()\n"
        "from tokenlay_otel import TokenlayInstrumentor\n"
        "from tokenlay_otel._config import Settings\n"
        "t2 = time.perf_counter(); TokenlayInstrumentor().instrument(settings=Settings()); "
        "t3 = time.perf_counter()\n"
        "print((t1 - t) * 1000, (t3 - t2) * 1000)"
    )
    runs = [
        [float(x) for x in subprocess.check_output([sys.executable, "-c", code]).split()]
        for _ in range(5)
    ]
    return {
        "import tokenlay_otel (after openai)": statistics.median(r[0] for r in runs),
        "instrument()": statistics.median(r[1] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    data = measure(args)
    data["startup_ms"] = startup_ms()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    floor = data["floor"]
    print(f"openai {openai.__version__}, {args.rounds} rounds x {args.calls} calls, median us/call")
    print(
        f"floor (SDK only): span {floor['span']:.1f} + metrics {floor['metrics']:.1f}"
        f" = {floor['total']:.1f} us\n"
    )
    print(f"{'scenario':<28} {'instrumentation':<20} {'us/call':>9} {'overhead':>9} {'/floor':>7}")
    for name, rows in data["results"].items():
        base = rows["baseline"]
        print(f"{name:<28} {'none':<20} {base:>9.1f}")
        for label, value in rows.items():
            if label == "baseline":
                continue
            extra = value - base
            print(
                f"{'':<28} {label:<20} {value:>9.1f} {extra:>9.1f} {extra / floor['total']:>7.2f}"
            )
    print()
    for label, ms in data["startup_ms"].items():
        print(f"{label:<40} {ms:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
