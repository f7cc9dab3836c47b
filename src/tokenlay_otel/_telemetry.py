"""The telemetry lifecycle of one LLM call: start the span, end it exactly once.

Shared by sync and async calls and by every response shape; ``_streams`` calls back
into :meth:`LLMCall.end` when a stream finishes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from . import _attributes as A
from ._config import Settings
from ._content import input_messages, output_messages
from ._protocol import TokenlayResponseMetadata, parse_response_headers
from ._safety import guard
from ._version import __version__

__all__ = ["LLMCall", "Telemetry"]

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What a wrapper needs to record calls: built once per instrumentor or client."""

    tracer: Tracer
    settings: Settings

    @classmethod
    def create(
        cls, *, settings: Settings, tracer_provider: trace.TracerProvider | None = None
    ) -> Telemetry:
        # get_tracer returns a proxy that follows a provider installed later on.
        tracer = trace.get_tracer(
            "tokenlay_otel", __version__, tracer_provider, schema_url=_SCHEMA_URL
        )
        return cls(tracer=tracer, settings=settings)


class LLMCall:
    """One LLM operation: its span, attribution and what the proxy said."""

    __slots__ = (
        "_context_token",
        "_ended",
        "_start",
        "body",
        "endpoint",
        "first_chunk_at",
        "http_response",
        "metadata",
        "provider",
        "routed",
        "span",
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
        self.telemetry = telemetry
        self.endpoint = endpoint
        self.body = body
        self.metadata = metadata
        self.routed = routed
        self.provider = A.provider_attributes(provider_base)
        self.span: Span | None = None
        self.http_response: Any = None
        self.first_chunk_at: float | None = None
        self._context_token: object = None
        self._ended = False
        self._start = 0.0

    @property
    def ended(self) -> bool:
        return self._ended or self.span is None

    @property
    def request_model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

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
        model = self.request_model
        name = f"{self.endpoint.operation} {model}" if model else self.endpoint.operation
        self._start = time.perf_counter()
        self.span = self.telemetry.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attrs)
        self._context_token = otel_context.attach(trace.set_span_in_context(self.span))

    def trace_headers(self) -> dict[str, str]:
        """``traceparent``/``baggage`` of the span, for the proxy to join the trace."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    def detach(self) -> None:
        if self._context_token is not None:
            otel_context.detach(self._context_token)  # type: ignore[arg-type]  # a Token
            self._context_token = None

    def proxy_metadata(self) -> TokenlayResponseMetadata | None:
        headers = getattr(self.http_response, "headers", None)
        return None if headers is None else parse_response_headers(headers)

    def mark_first_chunk(self) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()

    def fail(self, exc: BaseException) -> None:
        """The request raised: record the error (and a block's proxy headers) and end."""
        with guard("recording an error"):
            response = getattr(exc, "response", None)
            headers = getattr(response, "headers", None)
            meta = parse_response_headers(headers) if headers is not None else None
            self.end(meta=meta, error=exc)

    def end(
        self,
        *,
        response: Any = None,
        response_attrs: Mapping[str, Any] | None = None,
        usage: A.Usage | None = None,
        meta: TokenlayResponseMetadata | None = None,
        output: str | None = None,
        error: BaseException | None = None,
    ) -> None:
        """End the span once; later calls do nothing."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        if span is None:
            return
        try:
            if span.is_recording():
                self._record(span, response, response_attrs, usage, meta, output, error)
        finally:
            span.end()

    def _record(
        self,
        span: Span,
        response: Any,
        response_attrs: Mapping[str, Any] | None,
        usage: A.Usage | None,
        meta: TokenlayResponseMetadata | None,
        output: str | None,
        error: BaseException | None,
    ) -> None:
        attrs: dict[str, Any] = {}
        if response is not None:
            attrs.update(A.response_attributes(response))
            usage = usage or A.usage_of(A._get(response, "usage"))
            if output is None and self.telemetry.settings.capture_content:
                output = output_messages(response)
        if response_attrs:
            attrs.update(response_attrs)
        if usage is not None:
            attrs.update(A.usage_attributes(usage))
        if output:
            attrs[A.OUTPUT_MESSAGES] = output
        if self.first_chunk_at is not None:
            attrs[A.TIME_TO_FIRST_CHUNK] = self.first_chunk_at - self._start
        used_model = (meta.model if meta else None) or attrs.get(A.RESPONSE_MODEL)
        shifted = A.model_shifted(self.request_model, used_model)
        if shifted is not None:
            attrs[A.MODEL_SHIFTED] = shifted
        cost = meta.cost if meta and meta.cost is not None else (usage.cost if usage else None)
        if cost is not None:
            attrs[A.COST] = cost
            attrs[A.COST_SOURCE] = "proxy"
        elif error is None:
            attrs[A.COST_SOURCE] = "unknown"
        if meta is not None:
            attrs.update(A.tokenlay_response_attributes(meta))
            for warning in meta.warnings or ():
                span.add_event(A.WARNING_EVENT, {A.WARNING_MESSAGE: warning})
        if error is not None:
            attrs[A.ERROR_TYPE] = A.error_type(error)
            # The exception's message is left out on purpose: provider error texts can
            # quote request data.
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.set_attributes(attrs)
