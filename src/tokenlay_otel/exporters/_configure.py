"""``configure()``: OpenTelemetry SDK setup in one call, exporters chosen by name.

Exporter names are resolved through OpenTelemetry's own entry-point groups, the same
names ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER`` take, so any exporter a user
installs works without this package knowing it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tokenlay_otel._config import Settings
from tokenlay_otel._instrumentor import TokenlayInstrumentor

__all__ = ["Configured", "configure"]

_log = logging.getLogger("tokenlay_otel")

TRACES_GROUP = "opentelemetry_traces_exporter"
METRICS_GROUP = "opentelemetry_metrics_exporter"
# Attribute sets per instrument: user x org x model x token type quickly passes the
# SDK's default of 2000, after which points collapse into an overflow series.
CARDINALITY_LIMIT = 20_000


@dataclass(frozen=True)
class Configured:
    """What :func:`configure` set up (or found already set up)."""

    tracer_provider: trace.TracerProvider
    meter_provider: metrics.MeterProvider
    #: False when the app already had SDK providers, which were left as they were.
    created_tracer_provider: bool
    created_meter_provider: bool

    def shutdown(self) -> None:
        """Flush and stop the providers this call created."""
        if self.created_tracer_provider and isinstance(self.tracer_provider, TracerProvider):
            self.tracer_provider.shutdown()
        if self.created_meter_provider and isinstance(self.meter_provider, MeterProvider):
            self.meter_provider.shutdown()


def _names(value: str | Sequence[str] | None, env: str, default: str) -> list[str]:
    if value is None:
        value = os.environ.get(env) or default
    items = value.split(",") if isinstance(value, str) else list(value)
    return [n.strip() for n in items if n.strip() and n.strip().lower() != "none"]


#: The package that provides each well-known exporter name, for the error when it is
#: missing ("otlp" comes with tokenlay-otel).
_PACKAGES = {
    "prometheus": "pip install 'tokenlay-otel[prometheus]' (opentelemetry-exporter-prometheus)",
    "otlp_proto_grpc": "pip install opentelemetry-exporter-otlp-proto-grpc",
    "otlp_proto_http": "pip install opentelemetry-exporter-otlp-proto-http",
    "zipkin_json": "pip install opentelemetry-exporter-zipkin-json",
    "zipkin_proto": "pip install opentelemetry-exporter-zipkin-proto-http",
}


def _missing_exporter_message(group: str, name: str, installed: Sequence[str]) -> str:
    """What to tell a caller who asked for an exporter that is not installed."""
    fix = _PACKAGES.get(name, "install the package that provides it")
    return (
        f"unknown exporter {name!r} for {group}: {fix}; or pick one of those installed: "
        f"{', '.join(sorted(installed))}"
    )


def _load(group: str, name: str) -> Any:
    found = entry_points(group=group, name=name)
    if not found:
        installed = {e.name for e in entry_points(group=group)}
        raise ValueError(_missing_exporter_message(group, name, sorted(installed)))
    return next(iter(found)).load()


def _reader(name: str, exporter: Any, interval_ms: int | None) -> MetricReader:
    """A pull reader as is (Prometheus's starts its HTTP server here), a push exporter
    behind a periodic reader."""
    if isinstance(exporter, type) and issubclass(exporter, MetricReader):
        try:
            return exporter()
        except OSError as exc:  # e.g. the Prometheus port is taken
            raise OSError(f"metrics exporter {name!r} could not start: {exc}") from exc
    return PeriodicExportingMetricReader(exporter(), export_interval_millis=interval_ms)


def configure(
    service_name: str | None = None,
    *,
    traces: str | Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    metric_export_interval_ms: int | None = None,
    settings: Settings | None = None,
) -> Configured:
    """Set up tracing and metrics with named exporters, then instrument ``openai``.

    Args:
        service_name: ``service.name`` (default: ``OTEL_SERVICE_NAME``).
        traces: exporter name(s), e.g. ``"otlp"``, ``"console"``, ``"tokenlay_ledger"``
            (default: ``OTEL_TRACES_EXPORTER``, else ``otlp``; ``"none"`` for no traces).
        metrics: exporter name(s), e.g. ``"otlp"``, ``"prometheus"``, ``"console"``
            (default: ``OTEL_METRICS_EXPORTER``, else ``otlp``).
        resource_attributes: extra resource attributes.
        metric_export_interval_ms: push interval for push exporters (default: the
            SDK's, ``OTEL_METRIC_EXPORT_INTERVAL``).
        settings: Tokenlay settings (default: read from the environment).

    Returns:
        The providers in use. If the app already installed SDK providers, they are
        left alone (a log line says so) and only instrumentation is added; if openai
        is already instrumented (a second call), that is left as is too.

    Raises:
        ValueError: an exporter name is not installed (the message names the package
            to install, and lists the exporters that are), or a Tokenlay setting is
            invalid.
        OSError: a metrics exporter could not start, e.g. Prometheus's port is taken
            (``OTEL_EXPORTER_PROMETHEUS_HOST``/``_PORT``, default ``localhost:9464``).
    """
    settings = settings or Settings.from_env()
    trace_names = _names(traces, "OTEL_TRACES_EXPORTER", "otlp")
    metric_names = _names(metrics, "OTEL_METRICS_EXPORTER", "otlp")
    # Resolve every name first: a typo fails before anything is installed.
    span_exporters = [_load(TRACES_GROUP, n) for n in trace_names]
    metric_exporters = [_load(METRICS_GROUP, n) for n in metric_names]

    attributes: dict[str, Any] = dict(resource_attributes or {})
    if service_name:
        attributes[SERVICE_NAME] = service_name
    resource = Resource.create(attributes)

    meter_provider = _metrics_api().get_meter_provider()
    created_meter = not isinstance(meter_provider, MeterProvider)
    if created_meter:
        # Readers first: one that cannot start (a port taken) fails before anything
        # global is installed.
        readers = [
            _reader(name, exporter, metric_export_interval_ms)
            for name, exporter in zip(metric_names, metric_exporters, strict=True)
        ]
        meter_provider = MeterProvider(
            resource=resource,
            metric_readers=readers,
            views=[
                View(meter_name="tokenlay_otel", aggregation_cardinality_limit=CARDINALITY_LIMIT)
            ],
        )
        _metrics_api().set_meter_provider(meter_provider)
    else:
        _log.info("tokenlay_otel.configure: a meter provider is already set up; left as is")

    tracer_provider = trace.get_tracer_provider()
    created_tracer = not isinstance(tracer_provider, TracerProvider)
    if created_tracer:
        tracer_provider = TracerProvider(resource=resource)
        for exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter()))
        trace.set_tracer_provider(tracer_provider)
    else:
        _log.info("tokenlay_otel.configure: a tracer provider is already set up; left as is")

    instrumentor = TokenlayInstrumentor()  # one per process (BaseInstrumentor is a singleton)
    if instrumentor.is_instrumented_by_opentelemetry:
        # A second configure(), or instrument() called before: instrumenting again would
        # only make OpenTelemetry warn "already instrumented".
        _log.info("tokenlay_otel.configure: openai is already instrumented; left as is")
    else:
        instrumentor.instrument(
            tracer_provider=tracer_provider, meter_provider=meter_provider, settings=settings
        )
    return Configured(tracer_provider, meter_provider, created_tracer, created_meter)


def _metrics_api() -> Any:
    # The `metrics` argument shadows the module inside configure().
    from opentelemetry import metrics as api

    return api
