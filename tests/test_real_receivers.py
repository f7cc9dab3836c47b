"""Spans and metrics through the standard exporters to real receivers on loopback."""

from __future__ import annotations

import re
import urllib.request

import openai
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tokenlay_otel import TokenlayInstrumentor, metadata
from tokenlay_otel._config import Settings
from tokenlay_otel.proxy.local import free_port
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, TOKENLAY_KEY
from .otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.slow  # real OTLP and Prometheus receivers on loopback

MESSAGES = [{"role": "user", "content": "hi"}]


def attrs(proto_attributes) -> dict:  # type: ignore[no-untyped-def]
    out = {}
    for kv in proto_attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def test_otlp_grpc_receiver_gets_spans_and_metrics_with_exemplars(
    server: FakeOpenAIServer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TOKENLAY_KEY", TOKENLAY_KEY)
    monkeypatch.setenv("TOKENLAY_BASE_URL", server.url)
    server.response_headers["x-tokenlay-cost"] = "0.003"
    with OTLPReceiver() as receiver:
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=receiver.endpoint, insecure=True),
            export_interval_millis=60_000,
        )
        meter_provider = MeterProvider(metric_readers=[reader])
        instrumentor = TokenlayInstrumentor()
        instrumentor.instrument(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            settings=Settings.from_env(),
        )
        try:
            client = openai.OpenAI(api_key=PROVIDER_KEY, max_retries=0)
            with metadata(user="u-otlp", org="o-otlp"):
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            tracer_provider.force_flush()
            meter_provider.force_flush()
        finally:
            instrumentor.uninstrument()
            tracer_provider.shutdown()
            meter_provider.shutdown()

    (span,) = receiver.spans()
    assert span.name == "chat gpt-4o-mini"
    span_attrs = attrs(span.attributes)
    assert span_attrs["tokenlay.user"] == "u-otlp"
    assert span_attrs["tokenlay.cost.usd"] == 0.003
    metrics = receiver.metrics()
    cost_point = metrics["tokenlay.client.cost"].sum.data_points[0]
    assert cost_point.as_double == 0.003
    assert attrs(cost_point.attributes)["tokenlay.org"] == "o-otlp"
    assert metrics["tokenlay.client.cost"].unit == "USD"
    duration_point = metrics["gen_ai.client.operation.duration"].histogram.data_points[0]
    for point in (cost_point, duration_point):
        assert point.exemplars, "exemplars link the metric to the LLM span"
        assert point.exemplars[0].trace_id == span.trace_id
        assert point.exemplars[0].span_id == span.span_id
    assert list(duration_point.explicit_bounds)[:3] == [0.01, 0.02, 0.04]
    # Counted by us and observed at collection: it reaches the backend as a counter too.
    requests = metrics["tokenlay.client.requests"].sum
    assert requests.is_monotonic
    (request_point,) = requests.data_points
    assert request_point.as_int == 1
    request_attrs = attrs(request_point.attributes)
    assert (request_attrs["tokenlay.user"], request_attrs["tokenlay.rule.action"]) == (
        "u-otlp",
        "none",
    )


def test_prometheus_exporter_shows_cost_and_token_series(server: FakeOpenAIServer) -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    port = free_port()
    http_server, _thread = start_http_server(port, addr="127.0.0.1")
    reader = PrometheusMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = TokenlayInstrumentor()
    instrumentor.instrument(
        tracer_provider=TracerProvider(), meter_provider=meter_provider, settings=Settings()
    )
    try:
        client = openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/v1", max_retries=0)
        with metadata(user="u-prom", org="o-prom"):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        instrumentor.uninstrument()
        meter_provider.shutdown()
        http_server.shutdown()
    text = body.decode()
    cost = re.search(r"^tokenlay_client_cost_USD_total\{([^}]*)\} (\S+)$", text, re.M)
    assert cost, text
    assert 'tokenlay_user="u-prom"' in cost.group(1)
    assert 'tokenlay_org="o-prom"' in cost.group(1)
    assert float(cost.group(2)) > 0
    bucket = re.search(
        r'^gen_ai_client_token_usage_bucket\{([^}]*le="16(?:\.0)?"[^}]*)\} (\S+)$', text, re.M
    )
    assert bucket, text
    assert 'tokenlay_user="u-prom"' in bucket.group(1)
    assert "tokenlay_client_requests_total{" in text
