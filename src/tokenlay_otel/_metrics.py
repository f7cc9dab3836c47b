"""Metric instruments, their bucket boundaries, and the cardinality guard.

Names, units and buckets follow the GenAI semantic conventions; the two ``tokenlay.*``
counters carry spend and proxy decisions.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from opentelemetry.context import Context

from ._attributes import metadata_attribute
from ._version import __version__

__all__ = [
    "DURATION_BUCKETS",
    "TOKEN_BUCKETS",
    "CallMeasurements",
    "MetricRecorder",
    "ValueCap",
]

DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

OTHER = "_other"


class ValueCap:
    """Lets through the first ``limit`` distinct values, then answers ``_other``."""

    __slots__ = ("_limit", "_lock", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return value if value in self._seen else OTHER


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~2 us more to build
class CallMeasurements:
    """What one finished call measured, for the metric instruments."""

    attributes: Mapping[str, Any]  # operation, provider, models, error.type
    metadata: Mapping[str, str]
    duration_s: float
    input_tokens: int | None
    output_tokens: int | None
    cached_input_tokens: int | None
    time_to_first_chunk_s: float | None
    cost: float | None
    cost_source: str
    rule_action: str | None
    routed: bool
    model_shifted: bool = False
    bypassed: bool = False


class MetricRecorder:
    """The five instruments and the rules for their attributes."""

    def __init__(
        self,
        meter: metrics.Meter,
        *,
        metadata_fields: Sequence[str],
        value_limit: int,
    ) -> None:
        self._fields = tuple(
            (f, metadata_attribute(f), ValueCap(value_limit)) for f in metadata_fields
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.time_to_first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk of a streamed response",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.cost = meter.create_counter(
            "tokenlay.client.cost", unit="USD", description="Cost of LLM calls in US dollars"
        )
        self.cached_tokens = meter.create_counter(
            "tokenlay.client.cached_tokens",
            unit="{token}",
            description="Input tokens served from the provider's prompt cache",
        )
        self.requests = meter.create_counter(
            "tokenlay.client.requests",
            unit="{request}",
            description="LLM calls, by proxy decision and cost source",
        )

    @classmethod
    def create(
        cls,
        meter_provider: metrics.MeterProvider | None,
        *,
        metadata_fields: Sequence[str],
        value_limit: int,
    ) -> MetricRecorder:
        meter = metrics.get_meter("tokenlay_otel", __version__, meter_provider)
        return cls(meter, metadata_fields=metadata_fields, value_limit=value_limit)

    def record(self, m: CallMeasurements, context: Context | None) -> None:
        attrs = dict(m.attributes)
        for field, name, cap in self._fields:
            value = m.metadata.get(field)
            if value is not None:
                attrs[name] = cap(value)
        # Recorded in the LLM span's context: the SDK's trace-based exemplars then link
        # the points to the span (and the SDK takes its fastest path with a context).
        self.duration.record(m.duration_s, attrs, context=context)
        if m.input_tokens is not None:
            self.tokens.record(m.input_tokens, {**attrs, "gen_ai.token.type": "input"}, context)
        if m.output_tokens is not None:
            self.tokens.record(m.output_tokens, {**attrs, "gen_ai.token.type": "output"}, context)
        if m.cached_input_tokens:
            self.cached_tokens.add(m.cached_input_tokens, attrs, context=context)
        if m.time_to_first_chunk_s is not None:
            self.time_to_first_chunk.record(m.time_to_first_chunk_s, attrs, context=context)
        request_attrs = {
            **attrs,
            "tokenlay.rule.action": m.rule_action or "none",
            "tokenlay.cost.source": m.cost_source,
            "tokenlay.routed": m.routed,
            "tokenlay.model_shifted": m.model_shifted,
            "tokenlay.proxy.bypassed": m.bypassed,
        }
        self.requests.add(1, request_attrs, context=context)
        if m.cost is not None:
            self.cost.add(m.cost, {**attrs, "tokenlay.cost.source": m.cost_source}, context)
