"""Metric instruments, their bucket boundaries, and the cardinality guard.

Names, units and buckets follow the GenAI semantic conventions; the two ``tokenlay.*``
counters carry spend and proxy decisions.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from opentelemetry import metrics
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation

from ._conventions import (
    BYPASSED,
    COST_SOURCE,
    DURATION_BUCKETS,
    ERROR_TYPE,
    MODEL_SHIFTED,
    OPERATION,
    PROVIDER,
    REQUEST_MODEL,
    RESPONSE_MODEL,
    ROUTED,
    RULE_ACTION,
    TOKEN_BUCKETS,
    TOKEN_TYPE,
    metadata_attribute,
)
from ._fork import renew_after_fork
from ._version import __version__

__all__ = [
    "DURATION_BUCKETS",
    "DURATION_METRIC",
    "FIRST_CHUNK_METRIC",
    "REQUESTS",
    "TOKEN_BUCKETS",
    "USAGE_METRIC",
    "CallMeasurements",
    "MetricRecorder",
    "RequestCounts",
    "SharedMetrics",
    "ValueCap",
]

#: The GenAI convention histograms; another openai instrumentation records them too.
DURATION_METRIC = "gen_ai.client.operation.duration"
USAGE_METRIC = "gen_ai.client.token.usage"
FIRST_CHUNK_METRIC = "gen_ai.client.operation.time_to_first_chunk"

OTHER = "_other"
REQUESTS = "tokenlay.client.requests"
_REQUESTS_UNIT = "{request}"
_REQUESTS_DESCRIPTION = "LLM calls, by proxy decision and cost source"


class ValueCap:
    """Lets through the first ``limit`` distinct values, then answers ``_other``."""

    __slots__ = ("__weakref__", "_limit", "_lock", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        renew_after_fork(self)

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return value if value in self._seen else OTHER


#: Distinct response models per process on metrics before ``_other``.
_MODEL_LIMIT = 256


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
    #: The ``gen_ai.client.*`` histograms another instrumentation records for this call
    #: (see ``_coexist``): left out here so no call is counted twice.
    recorded_elsewhere: frozenset[str] = frozenset()


class _AttributeSets(NamedTuple):
    """The attribute dicts of one kind of call, one per instrument; never mutated."""

    common: dict[str, Any]
    input_tokens: dict[str, Any]
    output_tokens: dict[str, Any]
    requests: dict[str, Any]
    requests_key: frozenset[tuple[str, Any]]
    cost: dict[str, Any]


#: Distinct kinds of call whose attribute dicts are kept; cleared when full (a miss
#: only costs building the dicts again).
_SETS_LIMIT = 2048

#: Attribute sets ``RequestCounts`` keeps apart, as the SDK's default cardinality limit
#: does for a synchronous counter; later sets are counted in the overflow point.
_COUNTS_LIMIT = 2000
_OVERFLOW_KEY = frozenset({("otel.metric.overflow", True)})


class RequestCounts:
    """``tokenlay.client.requests`` counted here and handed to the SDK at collection.

    A synchronous counter costs a full SDK record per call (SDK 1.45 cleans and
    hashes its 11 attribute values in Python): 155 k instructions more per call,
    16 % of a chat call's overhead and 10 % of a 20-chunk stream's (callgrind, the
    scenarios of benchmarks/instructions.py); this costs a locked dict increment. The
    exported points are the same monotonic sums per attribute set, whatever the setup
    order; what is given up is exemplars on this one counter, which no panel reads
    (cost and duration keep theirs)."""

    __slots__ = ("__weakref__", "_counts", "_lock")

    def __init__(self) -> None:
        # Keyed by the attribute set's items: the attributes are the key, read back at
        # collection (rare) rather than kept twice.
        self._counts: dict[frozenset[tuple[str, Any]], int] = {}
        self._lock = threading.Lock()
        renew_after_fork(self)  # the counts stay, as the SDK's own aggregations do

    def add(self, sets: _AttributeSets) -> None:
        key = sets.requests_key
        with self._lock:
            count = self._counts.get(key)
            if count is None and len(self._counts) >= _COUNTS_LIMIT:
                key = _OVERFLOW_KEY
                count = self._counts.get(key)
            self._counts[key] = (count or 0) + 1

    def observe(self, options: CallbackOptions) -> list[Observation]:
        with self._lock:
            counts = list(self._counts.items())
        return [Observation(count, dict(key)) for key, count in counts]


class SharedMetrics:
    """What every recorder of a process shares; ``_state`` holds the process's one.

    One cap per metadata field: every telemetry built in the process (each
    ``instrument()``, the drop-in clients' default) counts the same distinct values,
    or three clients would put three times the users on the metrics.

    One ``RequestCounts`` per meter provider: a provider hands back the instrument it
    already has (with its first callback) when ours is created again, after
    ``uninstrument()`` or through an API proxy meter resolved later; every recorder on
    it must then count into the one the callback reads. Recorders that follow the
    global provider share one, whether the SDK was set before or after them.
    """

    __slots__ = ("__weakref__", "_caps", "_counts", "_global_counts", "_lock")

    def __init__(self) -> None:
        self._caps: dict[tuple[str, int], ValueCap] = {}
        self._counts: weakref.WeakKeyDictionary[object, RequestCounts] = weakref.WeakKeyDictionary()
        self._global_counts = RequestCounts()
        self._lock = threading.Lock()
        renew_after_fork(self)

    def cap(self, field: str, limit: int) -> ValueCap:
        """The process's one cap for ``field``."""
        with self._lock:
            cap = self._caps.get((field, limit))
            if cap is None:
                cap = self._caps[(field, limit)] = ValueCap(limit)
            return cap

    def request_counts(self, provider: metrics.MeterProvider | None) -> RequestCounts:
        """The one tally of calls recorded through ``provider`` (``None``: the global)."""
        if provider is None or provider is metrics.get_meter_provider():
            return self._global_counts
        with self._lock:
            counts = self._counts.get(provider)
            if counts is None:
                counts = self._counts[provider] = RequestCounts()
            return counts


class MetricRecorder:
    """The five instruments and the rules for their attributes."""

    def __init__(
        self,
        meter: metrics.Meter,
        *,
        metadata_fields: Sequence[str],
        value_limit: int,
        shared: SharedMetrics,
        request_counts: RequestCounts,
    ) -> None:
        self._fields = tuple(
            (f, metadata_attribute(f), shared.cap(f, value_limit)) for f in metadata_fields
        )
        # Named by the answer, not the caller: capped like a user, so an upstream that
        # names a new model on each call cannot flood the metrics (or this cache).
        self._model_cap = shared.cap(RESPONSE_MODEL, _MODEL_LIMIT)
        self._sets: dict[tuple[object, ...], _AttributeSets] = {}
        self.duration = meter.create_histogram(
            DURATION_METRIC,
            unit="s",
            description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            USAGE_METRIC,
            unit="{token}",
            description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.time_to_first_chunk = meter.create_histogram(
            FIRST_CHUNK_METRIC,
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
        # Observable whatever the setup order: counted here, read at collection.
        meter.create_observable_counter(
            REQUESTS,
            [request_counts.observe],
            unit=_REQUESTS_UNIT,
            description=_REQUESTS_DESCRIPTION,
        )
        self._count_request = request_counts.add

    @classmethod
    def create(
        cls,
        meter_provider: metrics.MeterProvider | None,
        *,
        metadata_fields: Sequence[str],
        value_limit: int,
        shared: SharedMetrics | None = None,
    ) -> MetricRecorder:
        """The instruments on ``meter_provider`` (``None``: the global one); ``shared``
        is the process's (``_state``), or a new one for a recorder of its own."""
        shared = shared or SharedMetrics()
        meter = metrics.get_meter("tokenlay_otel", __version__, meter_provider)
        return cls(
            meter,
            metadata_fields=metadata_fields,
            value_limit=value_limit,
            shared=shared,
            request_counts=shared.request_counts(meter_provider),
        )

    def record(self, m: CallMeasurements, context: Context | None) -> None:
        sets = self._attribute_sets(m)
        elsewhere = m.recorded_elsewhere
        # Recorded in the LLM span's context: the SDK's trace-based exemplars then link
        # the points to the span (and the SDK takes its fastest path with a context).
        if DURATION_METRIC not in elsewhere:
            self.duration.record(m.duration_s, sets.common, context=context)
        if USAGE_METRIC not in elsewhere:
            if m.input_tokens is not None:
                self.tokens.record(m.input_tokens, sets.input_tokens, context=context)
            if m.output_tokens is not None:
                self.tokens.record(m.output_tokens, sets.output_tokens, context=context)
        if m.cached_input_tokens:
            self.cached_tokens.add(m.cached_input_tokens, sets.common, context=context)
        if m.time_to_first_chunk_s is not None and FIRST_CHUNK_METRIC not in elsewhere:
            self.time_to_first_chunk.record(m.time_to_first_chunk_s, sets.common, context=context)
        self._count_request(sets)
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
        model = None if m.response_model is None else self._model_cap(m.response_model)
        key = (
            m.operation, m.provider, m.request_model, model, m.error_type,
            m.rule_action, m.cost_source, m.routed, m.model_shifted, m.bypassed, capped,
        )  # fmt: skip
        sets = self._sets.get(key)
        if sets is None:
            sets = self._build_sets(m, capped, model)
            if len(self._sets) >= _SETS_LIMIT:
                self._sets.clear()
            self._sets[key] = sets
        return sets

    def _build_sets(
        self, m: CallMeasurements, capped: tuple[str | None, ...], model: str | None
    ) -> _AttributeSets:
        common: dict[str, Any] = {OPERATION: m.operation, PROVIDER: m.provider}
        if m.request_model:
            common[REQUEST_MODEL] = m.request_model
        if model is not None:
            common[RESPONSE_MODEL] = model
        if m.error_type is not None:
            common[ERROR_TYPE] = m.error_type
        for (_, name, _), value in zip(self._fields, capped, strict=True):
            if value is not None:
                common[name] = value
        requests = {
            **common,
            RULE_ACTION: m.rule_action or "none",
            COST_SOURCE: m.cost_source,
            ROUTED: m.routed,
            MODEL_SHIFTED: m.model_shifted,
            BYPASSED: m.bypassed,
        }
        return _AttributeSets(
            common=common,
            input_tokens={**common, TOKEN_TYPE: "input"},
            output_tokens={**common, TOKEN_TYPE: "output"},
            requests=requests,
            requests_key=frozenset(requests.items()),
            cost={**common, COST_SOURCE: m.cost_source},
        )
