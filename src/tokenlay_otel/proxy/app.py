"""The Tokenlay-compatible gateway as an ASGI app: read and check a request, then hand it
to a :class:`~.call.Call` that runs where the server's cancellation cannot reach it.

Everything read from the caller is bounded (body size, body time, JSON depth, header
values) and checked before anything is reserved; from the first reservation on, the
call belongs to the gateway, which settles it on every exit and waits for it at
shutdown.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind

from tokenlay_otel._conventions import (
    DURATION_BUCKETS,
    HTTP_REQUEST_METHOD,
    HTTP_STATUS_CODE,
    PROXY_EXIT,
    URL_PATH,
)
from tokenlay_otel._pricing import PriceBook
from tokenlay_otel._wire import PROVIDER_BASE_HEADER, PROVIDER_KEY_HEADER, metadata_from_wire

from .call import Call
from .connect import UpstreamClient
from .h1 import Upstream
from .http import ASGIReceive, ASGISend, Incoming, error_body, send_json
from .limit_metrics import DEFAULT_TOP, LimitGauges
from .limits import Enforcer
from .mock import MockUpstream
from .providers import AllowList, ProviderError
from .request import (
    _MAX_MODEL,
    _METHODS,
    _SEGMENT,
    _check_header_values,
    _declared,
    _disguised,
    _forwarded,
    _json_object,
    _Refused,
)
from .request import metered_endpoint as metered_endpoint  # its home before request.py
from .rules import Rule
from .store import UsageStore

__all__ = ["ProxyConfig", "create_app"]

_log = logging.getLogger("tokenlay_otel.proxy")
_BASES_KEPT = 1024


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
    #: Provider bases allowed besides the public providers (``--allow-provider``).
    allow_providers: tuple[str, ...] = ()
    #: The largest body of a metered call (read whole: its JSON is checked and metered).
    max_body_bytes: int = 32 * 1024 * 1024
    #: Time to receive a metered call's body; for a streamed upload, the longest pause.
    body_timeout_s: float = 30.0
    #: The largest body of any other call (a file, audio...), streamed upstream as it comes.
    max_upload_bytes: int = 512 * 1024 * 1024
    #: The time such an upload may take in all.
    upload_timeout_s: float = 600.0
    #: A concurrency slot's lease; renewed every third of it while the call runs.
    lease_s: float = 60.0
    #: How long, and how many at once, streams the client left are read on for usage.
    drain_timeout_s: float = 30.0
    max_drains: int = 64
    #: Output tokens reserved for a call that states no max_tokens.
    default_output_tokens: int = 256
    #: How long a client may take to accept one piece of an answer before it counts as gone.
    send_timeout_s: float = 30.0
    #: How long shutdown waits for calls in flight before settling them as they are.
    shutdown_timeout_s: float = 10.0
    #: Keys per limit on the limit metrics (the most used first).
    limit_metrics_top: int = DEFAULT_TOP


class ClientGone(Exception):
    """The client went away before its request was read."""


class Gateway:
    """Owns the store, the upstream client, the telemetry and every call in flight."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.enforcer = Enforcer(config.rules, config.store, lease_s=config.lease_s)
        self.allow = AllowList.build(config.allow_providers)
        self._bases: dict[str, str] = {}  # provider bases allowed: as sent -> normalized
        self.tracer = trace.get_tracer(
            "tokenlay_otel.proxy", tracer_provider=config.tracer_provider
        )
        meter = metrics.get_meter("tokenlay_otel.proxy", meter_provider=config.meter_provider)
        self.decisions = meter.create_counter(
            "tokenlay.proxy.decisions", unit="{request}", description="Rule decisions by action"
        )
        self.settlements = meter.create_counter(
            "tokenlay.proxy.settlements",
            unit="{request}",
            description="Admitted calls settled, by how they ended and where their usage came from",
        )
        self.limit_gauges = LimitGauges(
            meter, config.rules, config.store, top=config.limit_metrics_top
        )
        self.upstream_duration = meter.create_histogram(
            "tokenlay.proxy.upstream.duration",
            unit="s",
            description="Time to the upstream's response headers",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        # No cookie jar, no redirects, no auth of its own: one caller's provider
        # cookies (a load balancer's session) must never go out with anyone else's call.
        self.upstream: Upstream = (
            MockUpstream()
            if config.mock_upstream
            else UpstreamClient(self.allow, timeout=config.upstream_timeout_s)
        )
        self.calls: set[Call] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.drains = 0
        self.closing = False
        self._heartbeat: asyncio.Task[None] | None = None

    # --- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path.startswith("/v1/"):
            await self._serve(scope, receive, send)
        elif path == "/health" and method in ("GET", "HEAD"):
            store = type(self.config.store).__name__
            # The process answering: with --workers N, which worker took the call.
            await send_json(send, 200, {"status": "ok", "store": store, "pid": os.getpid()})
        else:
            await send_json(send, 404, error_body(f"no route {path}", "invalid_request_error"))

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.limit_gauges.loop = asyncio.get_running_loop()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- calls -----------------------------------------------------------------------

    async def _serve(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        started = time.perf_counter()
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in headers.items()
            if k in (b"traceparent", b"tracestate", b"baggage")
        }
        span = self.tracer.start_span(
            f"{scope['method']} {scope['path']}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={HTTP_REQUEST_METHOD: scope["method"], URL_PATH: scope["path"]},
        )
        try:
            incoming = await self._read(scope, headers, receive)
        except ClientGone:
            _log.debug("the client left before its request was read")
            span.set_attribute(PROXY_EXIT, "client_gone")
            span.end()
            return
        except _Refused as refusal:
            body = error_body(refusal.message, "invalid_request_error", refusal.code)
            await send_json(send, refusal.status, body)
            span.set_attribute(HTTP_STATUS_CODE, refusal.status)
            span.end()
            return
        if self._heartbeat is None:  # on the first call: a lifespan may not be served at all
            self._heartbeat = asyncio.get_running_loop().create_task(self._renew_leases())
            self.limit_gauges.loop = asyncio.get_running_loop()
        call = Call(self, incoming, span, receive, send, started)
        # The call settles whatever happens to this request's task: the shield keeps the
        # server's cancellation out.
        task = self.spawn(call.run())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # The server gives up on the request (its graceful shutdown ran out): end
            # the call now, so that it answers and settles while the response is open.
            call.stop()
            await asyncio.wait({task}, timeout=self.config.shutdown_timeout_s)

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` in a task of the gateway's, which shutdown waits for."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _read(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], receive: ASGIReceive
    ) -> Incoming:
        """The request, checked: auth, path, provider, metadata, body. Reserves nothing."""
        method, path = scope["method"], scope["path"]
        if not self.authorized(headers.get(b"authorization", b"")):
            raise _Refused(401, "invalid Tokenlay key", "invalid_api_key")
        _check_header_values(scope["headers"])
        if method not in _METHODS:
            raise _Refused(405, f"method {method} is not supported")
        suffix = path.removeprefix("/v1")
        segments = suffix.split("/")[1:]
        if not all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
            raise _Refused(400, f"the path {path!r} is not a provider API path")
        provider_key = headers.get(PROVIDER_KEY_HEADER.encode(), b"").decode("latin-1")
        base = "http://mock-upstream/v1"
        if not self.config.mock_upstream:
            raw_base = headers.get(PROVIDER_BASE_HEADER.encode(), b"").decode("latin-1")
            if not provider_key or not raw_base:
                raise _Refused(
                    400,
                    f"the {PROVIDER_KEY_HEADER} and {PROVIDER_BASE_HEADER} headers are required",
                )
            base = self._bases.get(raw_base, "")
            if not base:
                try:
                    base = self.allow.check_base(raw_base)
                except ProviderError as exc:
                    raise _Refused(exc.status, str(exc), exc.code) from None
                # The answer depends on the string and the fixed allow-list alone;
                # parsing it anew was ~2% of the CPU per call. Bounded by a reset.
                if len(self._bases) >= _BASES_KEPT:
                    self._bases.clear()
                self._bases[raw_base] = base
        try:
            metadata = metadata_from_wire(scope["headers"])
        except ValueError as exc:
            raise _Refused(400, f"metadata header {exc}", "invalid_metadata") from None
        endpoint = metered_endpoint(method, base, suffix)
        if endpoint is None and _disguised(method, base, suffix):
            # Upstreams that drop ';params' or ignore case would serve it unmetered.
            raise _Refused(
                400,
                f"the path {path!r} names a metered endpoint in another spelling; "
                "send it as it is documented (e.g. /v1/chat/completions)",
            )
        body: bytes | None = None  # a pass-through POST body is streamed by the call
        if endpoint is not None or method != "POST":
            body = await self._body(receive, headers)
        elif _declared(headers) > self.config.max_upload_bytes:
            limit = self.config.max_upload_bytes
            raise _Refused(413, f"the request body is larger than {limit} bytes", "body_too_large")
        data: dict[str, Any] | None = None
        if endpoint is not None:
            data = _json_object(body or b"")
            model = data.get("model")
            if isinstance(model, str) and len(model) > _MAX_MODEL:
                raise _Refused(400, f"the model name is longer than {_MAX_MODEL} characters")
        query = scope.get("query_string", b"").decode("latin-1")
        return Incoming(
            method=method,
            suffix=suffix,
            query=query,
            endpoint=endpoint,
            body=body,
            data=data,
            metadata=metadata,
            provider_key=provider_key,
            provider_base=None if self.config.mock_upstream else base,
            base=base,
            content_type=headers.get(b"content-type", b"").decode("latin-1"),
            forwarded=_forwarded(headers, streamed=body is None),
        )

    async def _body(self, receive: ASGIReceive, headers: dict[bytes, bytes]) -> bytes:
        limit = self.config.max_body_bytes
        if _declared(headers) > limit:
            raise _Refused(413, f"the request body is larger than {limit} bytes", "body_too_large")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _Refused(
                            413, f"the request body is larger than {limit} bytes", "body_too_large"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body"):
                        return b"".join(chunks)
        except TimeoutError:
            raise _Refused(
                408, f"the request body did not arrive within {self.config.body_timeout_s:g} s"
            ) from None

    def authorized(self, header: bytes) -> bool:
        token = header[7:] if header[:7].lower() == b"bearer " else b""
        # Compare against every key so timing does not tell which one nearly matched.
        found = False
        for key in self.config.keys:
            found |= hmac.compare_digest(token, key.encode("utf-8"))
        return found and bool(token)

    # --- leases and shutdown ---------------------------------------------------------

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            live = [c.decision for c in self.calls if c.decision is not None]
            try:
                await self.enforcer.renew([d for d in live if d.leases])
            except Exception:
                _log.warning("could not renew concurrency leases", exc_info=True)

    async def shutdown(self) -> None:
        """Stop draining, give calls in flight a moment, settle them all, close."""
        self.closing = True
        for call in list(self.calls):
            call.stop()
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=self.config.shutdown_timeout_s)
            for task in pending:
                task.cancel()  # a call's own finally still settles it
            if pending:
                await asyncio.wait(pending, timeout=self.config.shutdown_timeout_s)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.upstream.aclose()
        await self.config.store.close()


def create_app(config: ProxyConfig) -> Gateway:
    """The gateway as an ASGI app (``uvicorn`` serves it in ``tokenlay-otel proxy``)."""
    return Gateway(config)
