"""The Tokenlay-compatible gateway (ASGI, Starlette): auth, rules, forwarding, headers."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenlay_otel._attributes import Usage
from tokenlay_otel._pricing import PriceBook
from tokenlay_otel._protocol import (
    PROVIDER_BASE_HEADER,
    PROVIDER_KEY_HEADER,
    metadata_from_request_headers,
)

from .limits import Decision, Enforcer
from .mock import mock_transport
from .rules import Rule
from .store import UsageStore
from .upstream import StreamTap, body_usage, with_stream_usage

__all__ = ["ProxyConfig", "create_app"]

_log = logging.getLogger("tokenlay_otel.proxy")
_FORWARDED = ("openai-beta", "openai-organization", "openai-project")
_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")


@dataclass
class ProxyConfig:
    """Everything the gateway needs; built by the CLI or by tests."""

    keys: frozenset[str]
    rules: Sequence[Rule]
    store: UsageStore
    mock_upstream: bool = False
    prices: PriceBook = field(default_factory=PriceBook)
    tracer_provider: trace.TracerProvider | None = None
    meter_provider: metrics.MeterProvider | None = None
    upstream_timeout_s: float = 600.0


def _error(
    status: int, message: str, kind: str, code: str | None = None, **headers: str
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _decision_headers(decision: Decision, requested_model: str | None) -> dict[str, str]:
    headers = {"x-tokenlay-rule-action": decision.action}
    if decision.rule is not None:
        headers["x-tokenlay-rule-id"] = decision.rule.id
        headers["x-tokenlay-limit-exceeded"] = "true" if decision.limit_exceeded else "false"
    if decision.warnings:
        headers["x-tokenlay-warnings"] = json.dumps(decision.warnings)
    if decision.model and decision.model != requested_model:
        headers["x-tokenlay-model"] = decision.model
    return headers


def _usage_headers(usage: Usage | None, cost: float | None, started: float) -> dict[str, str]:
    headers = {"x-tokenlay-duration": str(int((time.perf_counter() - started) * 1000))}
    if cost is not None:
        headers["x-tokenlay-cost"] = f"{cost:.10f}".rstrip("0").rstrip(".") or "0"
    if usage is not None:
        if usage.input_tokens is not None:
            headers["x-tokenlay-input-tokens"] = str(usage.input_tokens)
        if usage.output_tokens is not None:
            headers["x-tokenlay-output-tokens"] = str(usage.output_tokens)
        headers["x-tokenlay-tokens-used"] = str(
            (usage.input_tokens or 0) + (usage.output_tokens or 0)
        )
    return headers


class Gateway:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.enforcer = Enforcer(config.rules, config.store)
        self.tracer = trace.get_tracer(
            "tokenlay_otel.proxy", tracer_provider=config.tracer_provider
        )
        meter = metrics.get_meter("tokenlay_otel.proxy", meter_provider=config.meter_provider)
        self.decisions = meter.create_counter(
            "tokenlay.proxy.decisions", unit="{request}", description="Rule decisions by action"
        )
        self.upstream_duration = meter.create_histogram(
            "tokenlay.proxy.upstream.duration",
            unit="s",
            description="Time to the upstream's response headers",
            explicit_bucket_boundaries_advisory=(
                0.01,
                0.02,
                0.04,
                0.08,
                0.16,
                0.32,
                0.64,
                1.28,
                2.56,
                5.12,
                10.24,
                20.48,
                40.96,
                81.92,
            ),
        )
        transport = mock_transport() if config.mock_upstream else None
        self.client = httpx2.AsyncClient(
            transport=transport, timeout=config.upstream_timeout_s, follow_redirects=False
        )

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        # Compare against every key so timing does not tell which one nearly matched.
        found = False
        for key in self.config.keys:
            found |= hmac.compare_digest(token.encode(), key.encode())
        return found and bool(token)

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        parent = propagate.extract(dict(request.headers))
        path = request.url.path
        span = self.tracer.start_span(
            f"{request.method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": path},
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            response = await self._handle(request, span, started)
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        finally:
            otel_context.detach(token)
        span.set_attribute("http.response.status_code", response.status_code)
        if not isinstance(response, StreamingResponse):
            span.end()
        return response

    async def _handle(self, request: Request, span: Any, started: float) -> Response:
        if not self.authorized(request):
            return _error(401, "invalid Tokenlay key", "invalid_request_error", "invalid_api_key")
        provider_key = request.headers.get(PROVIDER_KEY_HEADER, "")
        provider_base = request.headers.get(PROVIDER_BASE_HEADER, "").rstrip("/")
        valid_base = urlsplit(provider_base).scheme in ("http", "https")
        if not self.config.mock_upstream and not (provider_key and valid_base):
            return _error(
                400,
                f"the {PROVIDER_KEY_HEADER} and {PROVIDER_BASE_HEADER} headers are required",
                "invalid_request_error",
            )
        body: dict[str, Any] = {}
        if request.method == "POST":
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                return _error(400, "the request body is not valid JSON", "invalid_request_error")
            if not isinstance(body, dict):
                return _error(
                    400, "the request body must be a JSON object", "invalid_request_error"
                )
        metadata = metadata_from_request_headers(request.headers.items())
        for name in ("user", "org", "plan", "project", "feature"):
            if name in metadata:
                span.set_attribute(f"tokenlay.{name}", metadata[name])
        requested = body.get("model") if isinstance(body.get("model"), str) else None
        is_llm = request.method == "POST" and path_endpoint(request.url.path) is not None
        decision = await self.enforcer.decide(dict(metadata), requested) if is_llm else Decision()
        self._record_decision(span, decision, requested)
        headers = _decision_headers(decision, requested)
        if decision.blocked:
            extra = {**headers, "x-should-retry": "false"}
            if decision.retry_after_s is not None:
                extra["retry-after"] = str(decision.retry_after_s)
            return _error(
                decision.http_status,
                decision.error_message or "blocked",
                "tokenlay_limit",
                decision.error_code,
                **extra,
            )
        if decision.model and decision.model != requested:
            body = {**body, "model": decision.model}
        return await self._forward(
            request, body, decision, headers, provider_key, provider_base, span, started
        )

    def _record_decision(self, span: Any, decision: Decision, requested: str | None) -> None:
        attrs = {"tokenlay.rule.action": decision.action}
        if decision.rule is not None:
            attrs["tokenlay.rule.id"] = decision.rule.id
            span.set_attribute("tokenlay.limit_exceeded", decision.limit_exceeded)
        span.set_attributes(attrs)
        if requested:
            span.set_attribute("gen_ai.request.model", requested)
        if decision.model and decision.model != requested:
            span.set_attribute("tokenlay.model", decision.model)
        self.decisions.add(1, attrs)

    async def _forward(
        self, request: Request, body: dict[str, Any], decision: Decision, headers: dict[str, str],
        provider_key: str, provider_base: str, span: Any, started: float,
    ) -> Response:  # fmt: skip
        suffix = request.url.path.removeprefix("/v1")
        base = provider_base or "http://mock-upstream/v1"
        body, injected = with_stream_usage(suffix, body)
        out_headers = {"authorization": f"Bearer {provider_key or 'mock'}"}
        out_headers.update({k: v for k, v in request.headers.items() if k in _FORWARDED})
        upstream_span = self.tracer.start_span(
            f"upstream {request.method} {suffix}", kind=SpanKind.CLIENT
        )
        with trace.use_span(upstream_span, end_on_exit=False):
            propagate.inject(out_headers)
        content = json.dumps(body).encode() if request.method == "POST" else None
        if content is not None:
            out_headers["content-type"] = "application/json"
        upstream_request = self.client.build_request(
            request.method,
            base + suffix,
            headers=out_headers,
            content=content,
            params=dict(request.query_params),
        )
        sent = time.perf_counter()
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx2.HTTPError as exc:
            upstream_span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            upstream_span.end()
            await self.enforcer.release(decision, failed=True)
            _log.warning("upstream %s unreachable: %s", urlsplit(base).hostname, type(exc).__name__)
            return _error(
                502,
                f"the provider at {urlsplit(base).hostname} could not be reached "
                f"({type(exc).__name__})",
                "upstream_error",
                "upstream_unreachable",
                **headers,
            )
        elapsed = time.perf_counter() - sent
        upstream_span.set_attribute("http.response.status_code", upstream.status_code)
        upstream_span.end()
        self.upstream_duration.record(elapsed, {"http.response.status_code": upstream.status_code})
        if upstream.status_code >= 400:
            payload = await upstream.aread()
            await upstream.aclose()
            await self.enforcer.release(decision, failed=True)
            return Response(
                payload,
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type"),
                headers=headers,
            )
        requested = body.get("model") if isinstance(body.get("model"), str) else None

        def price(usage: Usage, model: str | None) -> float | None:
            return self.config.prices.cost(usage, (model, requested), provider_base or None)

        if "text/event-stream" in upstream.headers.get("content-type", ""):
            tap = StreamTap(price=price, drop_usage_chunk=injected)
            return StreamingResponse(
                self._relay(tap, upstream, decision, span),
                status_code=upstream.status_code,
                media_type="text/event-stream",
                headers=headers,
            )
        payload = await upstream.aread()
        await upstream.aclose()
        usage, model = body_usage(_json_or_none(payload))
        cost = price(usage, model) if usage is not None else None
        await self._settle(decision, usage, cost, span)
        headers.update(_usage_headers(usage, cost, started))
        return Response(
            payload,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type"),
            headers=headers,
        )

    async def _relay(
        self, tap: StreamTap, upstream: httpx2.Response, decision: Decision, span: Any
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in tap.relay(upstream.aiter_raw()):
                yield chunk
        finally:
            # Also when the client goes away mid-stream: count what was used, free the
            # in-flight slot, end the span.
            try:
                await upstream.aclose()
                await self._settle(decision, tap.usage, tap.cost, span)
            except BaseException:
                _log.warning("could not settle a stream's usage", exc_info=True)
            finally:
                span.end()

    async def _settle(
        self, decision: Decision, usage: Usage | None, cost: float | None, span: Any
    ) -> None:
        tokens = None if usage is None else (usage.input_tokens or 0) + (usage.output_tokens or 0)
        await self.enforcer.settle(decision, tokens=tokens, cost=cost)
        await self.enforcer.release(decision, failed=False)
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens or 0)
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens or 0)
        if cost is not None:
            span.set_attribute("tokenlay.cost.usd", cost)


def _json_or_none(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def path_endpoint(path: str) -> str | None:
    tail = path.removeprefix("/v1/").rstrip("/")
    return tail if tail in _ENDPOINTS else None


def create_app(config: ProxyConfig) -> Starlette:
    """The gateway as an ASGI app (``uvicorn`` serves it in ``tokenlay-otel proxy``)."""
    gateway = Gateway(config)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "store": type(config.store).__name__})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await gateway.client.aclose()
        await config.store.close()

    routes = [Route("/health", health, methods=["GET"])]
    routes += [Route(f"/v1/{e}", gateway.handle, methods=["POST"]) for e in _ENDPOINTS]
    routes.append(Route("/v1/models", gateway.handle, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app
