from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tokenlay_otel.testing import FakeOpenAIServer

# Our own internal errors fail tests instead of being logged and swallowed.
os.environ["TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS"] = "1"
# No time limit per generated example: the property tests check what code does, and a
# shared machine can take a second over an example that usually takes milliseconds.
settings.register_profile("tokenlay", deadline=None)
settings.load_profile("tokenlay")

PROVIDER_KEY = "sk-provider-SECRET-0123456789"
TOKENLAY_KEY = "tl-SECRET-abcdef9876543210"

_OUR_ENV = (
    "PROVIDER_API_KEY",
    "PROVIDER_API_BASE",
    "TOKENLAY_KEY",
    "TOKENLAY_BASE_URL",
    "TOKENLAY_METADATA",
    "TOKENLAY_ROUTE",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _OUR_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_secret_is_exported(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    """Across the whole suite: no key in any exported span, event, metric or log record."""
    import logging

    caplog.set_level(logging.DEBUG)  # openai's and ours, at their most talkative
    capture = request.getfixturevalue("telemetry") if "telemetry" in request.fixturenames else None
    yield
    # caplog.text/records only hold the current (teardown) phase: read every phase.
    records = [r for when in ("setup", "call") for r in caplog.get_records(when)]
    texts = [r.getMessage() for r in records] + [str(r.args) for r in records]
    if capture is not None:
        texts += [span.to_json() for span in capture.exporter.get_finished_spans()]
        data = capture.reader.get_metrics_data()
        if data is not None:
            texts.append(data.to_json())
    blob = "\n".join(texts)
    for secret in (PROVIDER_KEY, TOKENLAY_KEY):
        assert secret not in blob, (
            f"a key leaked into exported telemetry or logs: {request.node.name}"
        )


@pytest.fixture(autouse=True)
def _fresh_process_state() -> None:
    """Warnings said once a minute are said again, and user caps start empty, in each
    test."""
    from tokenlay_otel import _outage, _state

    _outage._said.clear()
    _state._SHARED_METRICS._caps.clear()  # each test is a process of its own for the caps


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


class SpanCapture:
    """An SDK tracer provider with an in-memory exporter, for one test."""

    def __init__(self, sampler: object = None, views: list | None = None) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], views=views or [])

    def metrics(self) -> dict:
        """Metric name -> (unit, data points), from one collection."""
        out = {}
        data = self.reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else []:
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    out[metric.name] = (metric.unit, list(metric.data.data_points))
        return out

    def spans(self) -> list:
        return list(self.exporter.get_finished_spans())

    def only_span(self):
        spans = self.spans()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]


@pytest.fixture
def telemetry() -> SpanCapture:
    return SpanCapture()


@pytest.fixture
def instrument(telemetry: SpanCapture, monkeypatch: pytest.MonkeyPatch):
    """Call instrument(**env) to instrument with that environment; undone after the test."""
    from tokenlay_otel import TokenlayInstrumentor
    from tokenlay_otel._config import Settings

    instrumentor = TokenlayInstrumentor()

    def run(provider: object = None, **env: str) -> TokenlayInstrumentor:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        instrumentor.instrument(
            tracer_provider=provider or telemetry.provider,
            meter_provider=telemetry.meter_provider,
            settings=Settings.from_env(),
        )
        return instrumentor

    yield run
    instrumentor.uninstrument()
