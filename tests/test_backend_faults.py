"""The telemetry backend down, slow or failing: LLM calls are unaffected and memory stays
bounded, because exporting happens on the SDK's own background threads."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tokenlay_otel import TokenlayInstrumentor, metadata
from tokenlay_otel._config import Settings

from .inprocess import sync_client
from .proxy_harness import free_port

pytestmark = pytest.mark.slow  # exporters against a backend down, slow or failing, for seconds


class _Misbehaving(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def Export(self, request: Any, context: Any) -> Any:  # gRPC method name
        if self.mode == "slow":
            time.sleep(2)
        context.abort(grpc.StatusCode.INTERNAL, "backend failure")


@contextmanager
def backend(mode: str) -> Iterator[str]:
    if mode == "down":
        yield f"http://127.0.0.1:{free_port()}"
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _Misbehaving(mode)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("mode", ["down", "slow", "errors"])
def test_calls_are_unaffected_and_memory_bounded(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)  # the exporters' retry logs are not the subject here
    with backend(mode) as endpoint:
        tracer_provider = TracerProvider(shutdown_on_exit=False)
        processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=1),
            max_queue_size=256,
            max_export_batch_size=64,
            schedule_delay_millis=50,
        )
        tracer_provider.add_span_processor(processor)
        meter_provider = MeterProvider(
            metric_readers=[
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=endpoint, insecure=True, timeout=1),
                    export_interval_millis=100,
                )
            ],
            shutdown_on_exit=False,
        )
        instrumentor = TokenlayInstrumentor()
        instrumentor.instrument(
            tracer_provider=tracer_provider, meter_provider=meter_provider, settings=Settings()
        )
        client = sync_client()
        slowest = 0.0

        def calls(n: int) -> int:
            nonlocal slowest
            objects = 0
            for i in range(n):
                started = time.perf_counter()
                with metadata(user=f"u{i % 10}", org="o"):
                    reply = client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"u{i % 10}"}]
                    )
                slowest = max(slowest, time.perf_counter() - started)
                assert reply.choices[0].message.content == "Hello from the fake server."
            gc.collect()
            objects = len(gc.get_objects())
            return objects

        try:
            calls(300)  # warm-up, and fills the bounded span queue
            first = calls(1000)
            second = calls(1000)
        finally:
            instrumentor.uninstrument()
            processor.shutdown()
            meter_provider.shutdown(timeout_millis=3000)
    print(f"backend {mode}: slowest call {slowest * 1000:.1f} ms, objects {first} -> {second}")
    # No call waited for the backend (the slow one takes 2 s per export).
    assert slowest < 1.0, slowest
    # Spans beyond the queue's 256 are dropped, not piled up. The queue itself holds 0 to
    # 256 spans (~10 GC-tracked objects each) at either snapshot, depending on where the
    # exporter's retries are, so the count may move by ~2,600 between rounds; spans
    # piling up would add ~10 objects per call, 10,000 per round.
    assert second - first < 4_000, (first, second)
