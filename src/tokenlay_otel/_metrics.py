"""Metric instruments, their bucket boundaries, and the cardinality guard.

Names, units and buckets follow the GenAI semantic conventions; the two ``tokenlay.*``
counters carry spend and proxy decisions.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from opentelemetry import metrics
from opentelemetry.context import Context

from ._attributes import (
    BYPASSED,
    COST_SOURCE,
    ERROR_TYPE,
    MODEL_SHIFTED,
    OPERATION,
    PROVIDER,
    REQUEST_MODEL,
    RESPONSE_MODEL,
    ROUTED,
    RULE_ACTION,
    metadata_attribute,
)
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
USAGE_TYPE = "gen_ai.token.type"  # input or output, on token.usage points


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

    operation: str
    provider: str
    request_model: str | None
    response_model: str | None
    error_type: str | None
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


class _AttributeSets(NamedTuple):
    """The attribute dicts of one kind of call, one per instrument; never mutated."""

    common: dict[str, Any]
    input_tokens: dict[str, Any]
    output_tokens: dict[str, Any]
    requests: dict[str, Any]
    cost: dict[str, Any]


#: Distinct kinds of call whose attribute dicts are kept; cleared when full (a miss
#: only costs building the dicts again).
_SETS_LIMIT = 2048


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
        self._sets: dict[tuple[object, ...], _AttributeSets] = {}
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
        sets = self._attribute_sets(m)
        # Recorded in the LLM span's context: the SDK's trace-based exemplars then link
        # the points to the span (and the SDK takes its fastest path with a context).
        self.duration.record(m.duration_s, sets.common, context=context)
        if m.input_tokens is not None:
            self.tokens.record(m.input_tokens, sets.input_tokens, context=context)
        if m.output_tokens is not None:
            self.tokens.record(m.output_tokens, sets.output_tokens, context=context)
        if m.cached_input_tokens:
            self.cached_tokens.add(m.cached_input_tokens, sets.common, context=context)
        if m.time_to_first_chunk_s is not None:
            self.time_to_first_chunk.record(m.time_to_first_chunk_s, sets.common, context=context)
        self.requests.add(1, sets.requests, context=context)
        if m.cost is not None:
            self.cost.add(m.cost, sets.cost, context=context)

    def _attribute_sets(self, m: CallMeasurements) -> _AttributeSets:
        """The call's attribute dicts, built once per kind of call: a process makes
        calls of a few models for a bounded set of (capped) users and orgs."""
        metadata = m.metadata
        capped = tuple([
            None if (value := metadata.get(field)) is None else cap(value)
            for field, _, cap in self._fields
        ])  # fmt: skip
        key = (
            m.operation, m.provider, m.request_model, m.response_model, m.error_type,
            m.rule_action, m.cost_source, m.routed, m.model_shifted, m.bypassed, capped,
        )  # fmt: skip
        sets = self._sets.get(key)
        if sets is None:
            sets = self._build_sets(m, capped)
            if len(self._sets) >= _SETS_LIMIT:
                self._sets.clear()
            self._sets[key] = sets
        return sets

    def _build_sets(self, m: CallMeasurements, capped: tuple[str | None, ...]) -> _AttributeSets:
        common: dict[str, Any] = {OPERATION: m.operation, PROVIDER: m.provider}
        if m.request_model:
            common[REQUEST_MODEL] = m.request_model
        if m.response_model is not None:
            common[RESPONSE_MODEL] = m.response_model
        if m.error_type is not None:
            common[ERROR_TYPE] = m.error_type
        for (_, name, _), value in zip(self._fields, capped, strict=True):
            if value is not None:
                common[name] = value
        return _AttributeSets(
            common=common,
            input_tokens={**common, USAGE_TYPE: "input"},
            output_tokens={**common, USAGE_TYPE: "output"},
            requests={
                **common,
                RULE_ACTION: m.rule_action or "none",
                COST_SOURCE: m.cost_source,
                ROUTED: m.routed,
                MODEL_SHIFTED: m.model_shifted,
                BYPASSED: m.bypassed,
            },
            cost={**common, COST_SOURCE: m.cost_source},
        )
