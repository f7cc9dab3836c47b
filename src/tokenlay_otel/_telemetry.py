"""One call's state, and the telemetry lifecycle of an LLM call: start the span, end
it exactly once.

Every ``request`` through ``_wrappers`` is one :class:`Call` (an :class:`LLMCall` when
traced): it holds where the request went, the HTTP response it got back, and reads the
proxy's metadata from that response itself when it ends. Shared by sync and async
calls and by every response shape; ``_streams`` ends the call when a stream finishes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from . import _attributes as A
from ._coexist import shared_call, their_share
from ._config import Settings
from ._content import input_messages, output_messages
from ._metrics import CallMeasurements, MetricRecorder, SharedMetrics
from ._pricing import CostSource, PriceBook, load_price_overrides
from ._safety import guard, internal_error
from ._version import __version__
from ._wire import TokenlayResponseMetadata, parse_response_headers

__all__ = ["Call", "LLMCall", "Telemetry"]

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What a wrapper needs to record calls: the process's one is held by ``_state``."""

    tracer: Tracer
    metrics: MetricRecorder
    prices: PriceBook
    settings: Settings

    @classmethod
    def create(
        cls,
        *,
        settings: Settings,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        shared: SharedMetrics | None = None,
    ) -> Telemetry:
        """Build the tracer, instruments and price book; ``shared``: what the process's
        recorders share (see ``_state``), or nothing shared when not given.

        Raises:
            ValueError: the prices file (``TOKENLAY_PRICES_FILE``) is malformed.
        """
        overrides = load_price_overrides(settings.prices_file) if settings.prices_file else {}
        # get_tracer/get_meter return proxies that follow providers installed later on.
        tracer = trace.get_tracer(
            "tokenlay_otel", __version__, tracer_provider, schema_url=_SCHEMA_URL
        )
        recorder = MetricRecorder.create(
            meter_provider,
            metadata_fields=settings.metric_fields,
            value_limit=settings.metric_value_limit,
            shared=shared,
        )
        return cls(tracer=tracer, metrics=recorder, prices=PriceBook(overrides), settings=settings)


class Call:
    """One ``request``: where it was sent and what came back.

    A call that is not traced (not an LLM endpoint, or its span could not start) is a
    plain ``Call``: nothing to end, its proxy metadata still kept beside its result.
    """

    __slots__ = (
        "_meta",
        "_meta_read",
        "bypassed",
        "fallback",
        "hide_usage",
        "http_response",
        "proxy",
        "span",
        "streaming",
    )

    def __init__(self) -> None:
        self.span: Span | None = None
        #: The HTTP response, from openai's ``_process_response`` (or the error's).
        self.http_response: Any = None
        #: Whether the request asked for a usage chunk the caller did not: hidden again.
        self.hide_usage = False
        self.streaming = False
        #: The Tokenlay base URL the call was sent to, when routed.
        self.proxy: str | None = None
        #: The caller's own (args, kwargs), when fail-open may send the call direct.
        self.fallback: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        #: Sent straight to the provider after the proxy could not be reached.
        self.bypassed = False
        self._meta: TokenlayResponseMetadata | None = None
        self._meta_read = False

    @property
    def ended(self) -> bool:
        """Whether there is nothing left to end (a plain call never has anything)."""
        return True

    def proxy_metadata(self) -> TokenlayResponseMetadata | None:
        """What the proxy said in the response's ``x-tokenlay-*`` headers; read once."""
        if not self._meta_read:
            self._meta_read = True
            headers = getattr(self.http_response, "headers", None)
            self._meta = None if headers is None else parse_response_headers(headers)
        return self._meta

    def detach(self) -> None:
        """Leave the span's context (the request is sent); nothing for a plain call."""

    def fail(self, exc: BaseException) -> None:
        """The request raised; nothing to record for a plain call."""

    def end(
        self,
        *,
        response: Any = None,
        response_attrs: Mapping[str, Any] | None = None,
        usage: A.Usage | None = None,
        output: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The answer is whole; nothing to record for a plain call."""


class LLMCall(Call):
    """One LLM operation: its span, attribution and what the proxy said.

    When another openai instrumentation traces the same call (see ``_coexist``), its
    span is the call's one LLM span: ours is not started, our attributes go on theirs,
    and the ``gen_ai.client.*`` histograms it records are left to it.
    """

    __slots__ = (
        "_context",
        "_context_token",
        "_ended",
        "_owned",
        "_recorded_elsewhere",
        "_start",
        "body",
        "endpoint",
        "first_chunk_at",
        "metadata",
        "provider",
        "provider_base",
        "request_model",
        "routed",
        "telemetry",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        endpoint: A.Endpoint,
        *,
        body: Mapping[str, Any],
        metadata: Mapping[str, str],
        provider_base: str,
        routed: bool,
    ) -> None:
        super().__init__()
        self.telemetry = telemetry
        self.endpoint = endpoint
        self.body = body
        self.metadata = metadata
        self.routed = routed
        self.provider = A.provider_attributes(provider_base)
        self.provider_base = provider_base
        model = body.get("model")
        self.request_model: str | None = model if isinstance(model, str) else None
        self.first_chunk_at: float | None = None
        self._context: otel_context.Context | None = None
        self._context_token: object = None
        self._ended = False
        #: Whether ``span`` is ours to end (not another instrumentation's).
        self._owned = True
        self._recorded_elsewhere: frozenset[str] = frozenset()
        self._start = 0.0

    @property
    def ended(self) -> bool:
        return self._ended or self.span is None

    def start(self) -> None:
        """Start the span and make it current for the HTTP request."""
        attrs = A.request_attributes(self.body, self.endpoint)
        attrs.update(self.provider)
        attrs.update(A.metadata_attributes(self.metadata))
        attrs[A.ROUTED] = self.routed
        if self.telemetry.settings.capture_content:
            content = input_messages(self.body)
            if content:
                attrs[A.INPUT_MESSAGES] = content
        shared = shared_call(self.endpoint, self.body)
        if shared is not None:
            self._recorded_elsewhere = shared.recorded
            if shared.span is not None:
                self._share(shared.span, attrs)
                return
        model = self.request_model
        name = f"{self.endpoint.operation} {model}" if model else self.endpoint.operation
        self._start = time.perf_counter()
        self.span = self.telemetry.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
        # Kept for the metric records too: they carry it so exemplars link to the span.
        self._context = trace.set_span_in_context(self.span)
        self._context_token = otel_context.attach(self._context)

    def _share(self, span: Span, attrs: dict[str, Any]) -> None:
        """Record this call on another instrumentation's span, already current."""
        self._start = time.perf_counter()
        self.span = span
        self._owned = False
        span.set_attributes(their_share(span, attrs))
        self._context = trace.set_span_in_context(span)

    def trace_headers(self) -> dict[str, str]:
        """``traceparent``/``baggage`` of the span, for the proxy to join the trace."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    def detach(self) -> None:
        """Leave the span's context: the request is sent, the caller's code goes on."""
        if self._context_token is not None:
            otel_context.detach(self._context_token)  # type: ignore[arg-type]  # a Token
            self._context_token = None

    def proxy_metadata(self) -> TokenlayResponseMetadata | None:
        """What the proxy said, read once; on another instrumentation's span at once."""
        if self._meta_read:
            return self._meta
        meta = super().proxy_metadata()
        span = self.span
        if meta is not None and not self._owned and span is not None and span.is_recording():
            # Their span may end before ours would (a stream they finish first): what
            # the proxy said goes on it as soon as it is known.
            with guard("recording the proxy's answer"):
                span.set_attributes(A.tokenlay_response_attributes(meta))
        return meta

    def mark_first_chunk(self) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()

    def fail(self, exc: BaseException) -> None:
        """The request raised: record the error (and a block's proxy headers) and end."""
        with guard("recording an error"):
            # An API error carries its response (a block's carries the proxy's headers).
            self.http_response = getattr(exc, "response", None)
            self._meta_read = False
            self.end(error=exc)

    def end(
        self,
        *,
        response: Any = None,
        response_attrs: Mapping[str, Any] | None = None,
        usage: A.Usage | None = None,
        output: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End the span and record the call's metrics (with what the proxy said in the
        response's headers), once; later calls do nothing."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        if span is None:
            return
        try:
            try:
                meta = self.proxy_metadata()
            except Exception:  # the headers are the upstream's: record the rest anyway
                internal_error("reading the proxy's answer")
                meta = None
            attrs: dict[str, Any] = {}
            if response is not None:
                fields = A.fields_of(response, A.RESPONSE_FIELDS)  # read once, for both
                attrs.update(A.response_attributes(fields))
                usage = usage or A.usage_of(fields.get("usage"))
                if output is None and self.telemetry.settings.capture_content:
                    output = output_messages(response)
            if response_attrs:
                attrs.update(response_attrs)
            self._finish(span, attrs, usage, meta, output, error)
        finally:
            if self._owned:
                span.end()

    def _finish(
        self,
        span: Span,
        attrs: dict[str, Any],
        usage: A.Usage | None,
        meta: TokenlayResponseMetadata | None,
        output: str | None,
        error: BaseException | None,
    ) -> None:
        duration = time.perf_counter() - self._start
        if usage is not None:
            attrs.update(A.usage_attributes(usage))
        if output:
            attrs[A.OUTPUT_MESSAGES] = output
        ttfc = None if self.first_chunk_at is None else self.first_chunk_at - self._start
        if ttfc is not None:
            attrs[A.TIME_TO_FIRST_CHUNK] = ttfc
        response_model = attrs.get(A.RESPONSE_MODEL)
        used_model = (meta.model if meta else None) or response_model
        shifted = A.model_shifted(self.request_model, used_model)
        if shifted is not None:
            attrs[A.MODEL_SHIFTED] = shifted
        cost, source = self._cost(usage, meta, used_model)
        if cost is not None:
            attrs[A.COST] = cost
        attrs[A.COST_SOURCE] = source
        if meta is not None:
            attrs.update(A.tokenlay_response_attributes(meta))
        if self.bypassed:
            attrs[A.ROUTED] = False
            attrs[A.BYPASSED] = True
        error_type = A.error_type(error) if error is not None else None
        if error_type is not None:
            attrs[A.ERROR_TYPE] = error_type
        if span.is_recording():
            for warning in (meta.warnings if meta else None) or ():
                span.add_event(A.WARNING_EVENT, {A.WARNING_MESSAGE: warning})
            if error is not None:
                # The exception's message is left out on purpose: provider error texts
                # can quote request data.
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.set_attributes(attrs if self._owned else their_share(span, attrs))
        self.telemetry.metrics.record(
            CallMeasurements(
                operation=self.endpoint.operation,
                provider=self.provider[A.PROVIDER],
                request_model=self.request_model,
                response_model=used_model if isinstance(used_model, str) else None,
                error_type=error_type,
                metadata=self.metadata,
                duration_s=duration,
                input_tokens=usage.input_tokens if usage else None,
                output_tokens=usage.output_tokens if usage else None,
                cached_input_tokens=usage.cached_input_tokens if usage else None,
                time_to_first_chunk_s=ttfc,
                cost=cost,
                cost_source=source,
                rule_action=meta.rule_action if meta else None,
                routed=self.routed and not self.bypassed,
                model_shifted=bool(shifted),
                bypassed=self.bypassed,
                recorded_elsewhere=self._recorded_elsewhere,
            ),
            self._context,
        )

    def _cost(
        self,
        usage: A.Usage | None,
        meta: TokenlayResponseMetadata | None,
        used_model: Any,
    ) -> tuple[float | None, CostSource]:
        """The proxy's billed cost wins; else local prices; else unknown (never 0)."""
        if meta is not None and meta.cost is not None:
            return meta.cost, "proxy"
        if usage is not None and usage.cost is not None:
            return usage.cost, "proxy"
        models = (used_model if isinstance(used_model, str) else None, self.request_model)
        local = self.telemetry.prices.cost(usage, models, self.provider_base)
        if local is not None:
            return local, "local"
        return None, "unknown"
