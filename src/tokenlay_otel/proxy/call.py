"""One admitted call, from its reservation to its settlement, exactly once.

The exits, written down first (STYLE §14), and what each is charged:

=====================  ===========================================================
exit                   charge
=====================  ===========================================================
done                   the usage upstream reported (validated)
client_gone            read on to upstream's usage, bounded in time and in number
                       of drains; if none came, the estimate below
upstream_cut           the estimate: input from the request, output from the text
                       relayed (a cut JSON body: the reserved output)
shutdown               as upstream_cut, once the drains are stopped
upstream_error         nothing (providers do not bill errors); a server error or a
                       429 also gives the request back, so a retry is not counted twice
upstream_unreachable   nothing; the request is given back
upload_stopped         nothing; the request is given back (a streamed upload the
                       client abandoned, paused too long or made too large)
error (our own bug)    as upstream_cut when upstream was asked, else nothing
=====================  ===========================================================

A call runs in a task of the gateway's, not in the server's request task, so neither
a disconnect nor the server's shutdown can cancel it; it ends by its own deadline (a
drain's, or the gateway's at shutdown). Settling is one task, started once and awaited
behind a shield. A stream settles before its last event is sent, so a caller who reads
to the end never meets its own finished call still holding a slot.

Longer than most modules (~620 lines) on purpose: it is one call's lifecycle, and
each exit in the table above is set next to the charge it settles on, in one class
sharing the call's state; split, an exit and its charge would live in two files. The
pure helpers at the end are too few to move for the length's sake.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from tokenlay_otel._conventions import (
    COST,
    HTTP_STATUS_CODE,
    INPUT_TOKENS,
    LIMIT_EXCEEDED,
    OUTPUT_TOKENS,
    PROXY_EXIT,
    PROXY_MODEL,
    REQUEST_MODEL,
    RULE_ACTION,
    RULE_ID,
    USAGE_SOURCE,
    metadata_attribute,
)
from tokenlay_otel._usage import Usage
from tokenlay_otel._version import __version__
from tokenlay_otel._wire import STANDARD_FIELDS

from .connect import refused_by_policy
from .estimate import input_tokens, output_cap, text_tokens
from .h1 import ConnectTimedOut, NotSent, TimedOut, UpstreamAnswer, UpstreamError
from .http import (
    ASGIReceive,
    ASGISend,
    Incoming,
    Responder,
    decision_headers,
    usage_headers,
    valid_cost,
)
from .limits import Decision, Reservation
from .upstream import StreamTap, body_usage, with_stream_usage

if TYPE_CHECKING:
    from tokenlay_otel._pricing import PriceBook

    from .app import Gateway

__all__ = ["Call", "UploadStopped"]

_log = logging.getLogger("tokenlay_otel.proxy")
#: A JSON answer larger than this is not read whole (the call is charged its estimate).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_ERROR_BYTES = 1024 * 1024
# What is read and dropped after a stream's last event, at most, so that its
# connection can serve again (the client has its whole answer by then).
_REST_TIMEOUT_S = 0.25
_REST_MAX_BYTES = 64 * 1024
# The provider's headers a caller may act on (its retry advice, its request id).
_UPSTREAM_HEADERS = ("retry-after", "x-request-id", "x-ratelimit-", "openai-processing-ms")
# What the proxy's client adds to each request (the upstream client decodes these
# encodings); the caller's own headers are not forwarded.
_CLIENT_HEADERS = {
    "accept": "*/*",
    "accept-encoding": "gzip, deflate",
    "connection": "keep-alive",
    "user-agent": f"tokenlay-otel-proxy/{__version__}",
}


class Call(Responder):
    """One request the gateway runs; see the module docstring for its exits."""

    def __init__(
        self,
        gateway: Gateway,
        incoming: Incoming,
        span: Span,
        receive: ASGIReceive,
        send: ASGISend,
        started: float,
    ) -> None:
        self.gw = gateway
        self.incoming = incoming
        self.span = span
        self.receive = receive
        self.send = send
        self.send_timeout_s = gateway.config.send_timeout_s
        self.started = started
        self.decision: Decision | None = None
        self.exit = "error"
        self.gone = False
        self.response_started = False
        self.finished = False
        self.stopping = False
        data = incoming.data or {}
        model = data.get("model")
        self.requested = model if isinstance(model, str) else None
        self.model = self.requested
        metered = incoming.endpoint is not None
        default = gateway.config.default_output_tokens
        self.output_cap = output_cap(data, incoming.endpoint, default) if metered else 0
        # What is known of the usage when the call settles.
        self.asked = False  # the request went upstream
        self.refund = False  # give the request back
        self.usage: Usage | None = None
        self.text_bytes = 0
        self.tap: StreamTap | None = None
        self.charged_cost: float | None = None
        self._span_ended = False
        self._deadline: asyncio.Timeout | None = None
        self._draining = False
        self._settlement: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    @functools.cached_property
    def input_estimate(self) -> int:
        # Read only when a rule takes tokens or cost, or a call is charged an estimate:
        # it walks the whole prompt.
        data = self.incoming.data
        return input_tokens(data) if data is not None and self.incoming.endpoint else 0

    def price(self, usage: Usage, model: str | None) -> float | None:
        fallback = (self.model, self.requested)
        return _price(self.gw.config.prices, self.incoming.provider_base, fallback, usage, model)

    def _estimate(self, model: str | None) -> Reservation:
        tokens = self.input_estimate + self.output_cap
        if not tokens:
            return Reservation(0, 0.0)
        return Reservation(tokens, self.price(Usage(self.input_estimate, self.output_cap), model))

    # --- the lifecycle ----------------------------------------------------------------

    async def run(self) -> None:
        self.gw.calls.add(self)
        # A whole JSON answer is read to the end whatever the client does (its usage is
        # the provider's bill); streams and pass-through answers stop or drain when the
        # client leaves, so only they need to hear of it.
        data = self.incoming.data
        streamed = data is None or data.get("stream") is True
        # A streamed upload is read from the same channel: watch once it is all sent.
        if streamed and self.incoming.body is not None:
            self._watch_client()
        try:
            await self._run()
        except Exception:
            _log.exception("the proxy failed on a call")
            self.span.set_status(Status(StatusCode.ERROR, "internal error"))
            if not self.response_started:
                if self.decision is not None and not self.decision.blocked:
                    await self._settle()
                await self._send_error(500, "the proxy failed on this call", "proxy_error")
        finally:
            if self._watcher is not None:
                # Dropped, not only cancelled: the task's CancelledError holds its frame,
                # which holds this call, a cycle per call for the collector to find.
                self._watcher.cancel()
                self._watcher = None
            if self._draining:
                self.gw.drains -= 1
            try:
                if self.decision is not None and not self.decision.blocked:
                    await self._settle()
            finally:
                self.gw.calls.discard(self)
                self._last_piece()

    async def _run(self) -> None:
        decide = asyncio.ensure_future(
            self.gw.enforcer.decide(dict(self.incoming.metadata), self.requested, self._estimate)
        )
        try:
            # What the store admitted must be known to be settled, even at shutdown.
            decision = await asyncio.shield(decide)
        except asyncio.CancelledError:
            self.decision, self.exit, self.refund = await decide, "shutdown", True
            raise
        self.decision = decision
        self.model = decision.model or self.requested
        self._record_decision(decision)
        headers = decision_headers(decision, self.requested)
        if decision.blocked:
            self.exit = "blocked"
            await self._blocked(decision, headers)
            return
        if self.gone:
            self.exit, self.refund = "client_gone", True
            return
        try:
            async with asyncio.timeout(None) as self._deadline:
                if self.stopping:
                    self._reschedule(0)
                await self._forward(decision, headers)
        except TimeoutError:
            if self._settlement is None:  # one settled (a stream draining) keeps its exit
                self.exit = "shutdown" if self.stopping else "client_gone"
            if not self.asked:
                self.refund = True
            if not self.response_started and not self.gone:
                await self._settle()
                message = "the proxy is shutting down; try again"
                await self._send_error(503, message, "proxy_shutting_down", {"retry-after": "1"})
        finally:
            self._deadline = None

    def _watch_client(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Notice the client leaving (the ASGI server says so through ``receive``)."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self._client_gone()
                return

    def _client_gone(self) -> None:
        # The call keeps its slot while it drains: upstream is still at work for it, and
        # a caller who hangs up and calls again must not run more calls than its limit.
        self.gone = True
        if self._settlement is not None or self._deadline is None:
            return
        config, now = self.gw.config, asyncio.get_running_loop().time()
        metered = self.incoming.endpoint is not None
        free = self.gw.drains < config.max_drains
        if metered and free and not self.stopping and not self._draining:
            # Read on for the usage the provider bills, for a while.
            self.gw.drains += 1
            self._draining = True
            self._reschedule(now + config.drain_timeout_s)
        else:
            self._reschedule(now)

    def _last_piece(self) -> None:
        # The span ends before the answer's last bytes go out, as the settlement does:
        # a caller who has read its answer finds both done.
        if not self._span_ended:
            self._span_ended = True
            self.span.end()

    def _send_stalled(self) -> None:
        # Nothing to drain past a client that takes nothing: end the call where it is.
        self.gone = True
        self._reschedule(0)

    def stop(self) -> None:
        """Shutdown: end the call where it is; it settles on what it has read."""
        self.stopping = True
        self._reschedule(0)

    def _reschedule(self, when: float) -> None:
        if self._deadline is not None and not self._deadline.expired():
            with contextlib.suppress(RuntimeError):  # already expiring
                self._deadline.reschedule(when)

    # --- upstream --------------------------------------------------------------------

    async def _upload(self) -> AsyncIterator[bytes]:
        """A pass-through body, streamed upstream as the client sends it (bounded).

        An upload that does not end (stopped, cut, cancelled at shutdown) never reached
        the provider whole: the call is then settled as not asked, its request given
        back."""
        try:
            async for chunk in self._upload_chunks():
                yield chunk
        except BaseException:
            self.asked, self.refund = False, True
            raise

    async def _upload_chunks(self) -> AsyncIterator[bytes]:
        config, size = self.gw.config, 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.upload_timeout_s
        while True:
            try:
                # A pause is bounded, and so is the whole: a byte a second never ends.
                async with asyncio.timeout_at(min(deadline, loop.time() + config.body_timeout_s)):
                    message = await self.receive()
            except TimeoutError:
                late = loop.time() >= deadline
                reason = f"took over {config.upload_timeout_s:g} s" if late else "paused too long"
                raise UploadStopped(408, f"the request body {reason}") from None
            if message["type"] == "http.disconnect":
                self.gone = True
                raise UploadStopped(499, "the client left during its upload")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > config.max_upload_bytes:
                limit = config.max_upload_bytes
                raise UploadStopped(413, f"the request body is larger than {limit} bytes")
            if chunk:
                yield chunk
            if not message.get("more_body"):
                return

    async def _forward(self, decision: Decision, headers: dict[str, str]) -> None:
        incoming = self.incoming
        content: bytes | AsyncIterator[bytes] | None = incoming.body
        if content is None:
            content = self._upload()
        injected = False
        if incoming.data is not None:
            data = incoming.data
            if decision.model and decision.model != self.requested:
                data = {**data, "model": decision.model}
            data, injected = with_stream_usage(incoming.endpoint, data)
            if data is not incoming.data:
                content = json.dumps(data).encode()
        out = {
            **_CLIENT_HEADERS,
            "authorization": f"Bearer {incoming.provider_key or 'mock'}",
            **incoming.forwarded,
        }
        if incoming.method != "GET":
            out["content-type"] = incoming.content_type or "application/json"
        upstream_span = self.gw.tracer.start_span(
            f"upstream {incoming.method} {incoming.suffix}",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
        )
        with trace.use_span(upstream_span, end_on_exit=False):
            propagate.inject(out)
        url = incoming.base + incoming.suffix + (f"?{incoming.query}" if incoming.query else "")
        self.asked = True
        sent = time.perf_counter()
        try:
            upstream = await self.gw.upstream.send(
                incoming.method, url, out, content if incoming.method != "GET" else None
            )
        except (UpstreamError, UploadStopped) as exc:
            upstream_span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            upstream_span.end()
            if isinstance(exc, UploadStopped):
                await self._upload_stopped(exc, headers)
            else:
                await self._unreachable(exc, headers)
            return
        except BaseException:  # cancelled (shutdown), or our bug: the span still ends
            upstream_span.end()
            raise
        self._watch_client()  # the body is all sent: the channel is free to watch
        upstream_span.set_attribute(HTTP_STATUS_CODE, upstream.status)
        upstream_span.end()
        status = upstream.status
        self.gw.upstream_duration.record(time.perf_counter() - sent, {HTTP_STATUS_CODE: status})
        try:
            await self._respond(upstream, headers, injected)
        finally:
            await upstream.aclose()

    async def _upload_stopped(self, stop: UploadStopped, headers: dict[str, str]) -> None:
        self.exit = "upload_stopped"  # _upload has given the request back
        await self._settle()
        _log.info("an upload stopped: %s", stop.message)
        if not self.gone:
            code = "body_too_large" if stop.status == 413 else None
            await self._send_error(
                stop.status, stop.message, code, headers, kind="invalid_request_error"
            )

    async def _unreachable(self, exc: UpstreamError, headers: dict[str, str]) -> None:
        host = self.incoming.base.split("/")[2]
        reason = refused_by_policy(exc)
        if reason or isinstance(exc, NotSent):
            self.asked, self.refund = False, True
            self.exit = "provider_refused" if reason else "upstream_unreachable"
        else:  # sent, and lost on the way back: the provider may have done the work
            self.exit = "upstream_cut"
        await self._settle()
        if reason:
            _log.warning("provider %s refused by the allow-list: %s", host, reason)
            await self._send_error(403, reason, "provider_not_allowed", headers)
            return
        _log.warning("upstream %s unreachable: %s", host, exc)
        message = f"the provider at {host} could not be reached ({_kind(exc)})"
        await self._send_error(502, message, "upstream_unreachable", headers)

    async def _respond(
        self, upstream: UpstreamAnswer, headers: dict[str, str], injected: bool
    ) -> None:
        status = upstream.status
        content_type = upstream.header("content-type") or ""
        headers.update((k, v) for k, v in upstream.headers if k.startswith(_UPSTREAM_HEADERS))
        if status >= 400:
            self.exit, self.refund = "upstream_error", status >= 500 or status == 429
            payload = await self._read_whole(upstream, MAX_ERROR_BYTES)
            await self._settle()
            await self._send_whole(status, payload or b"", content_type, headers)
            return
        endpoint = self.incoming.endpoint
        if "text/event-stream" in content_type or endpoint is None:
            if endpoint is not None:
                # Not self.price: a tap holding the call would make a cycle per stream.
                price = functools.partial(
                    _price,
                    self.gw.config.prices,
                    self.incoming.provider_base,
                    (self.model, self.requested),
                )
                self.tap = StreamTap(price, drop_usage_chunk=injected, endpoint=endpoint)
            await self._relay(upstream, status, content_type, headers)
            return
        payload = await self._read_whole(upstream)
        if payload is None:
            self.exit = "upstream_cut"
            await self._settle()
            await self._send_error(502, "the provider's answer was cut", "upstream_cut", headers)
            return
        usage, model, self.text_bytes = body_usage(_json_or_none(payload), self.incoming.endpoint)
        self.usage, self.model = usage, model or self.model
        self.exit = "done"
        await self._settle()
        if usage is not None:
            headers.update(usage_headers(usage, self.charged_cost, self.started))
        await self._send_whole(status, payload, content_type, headers)

    async def _read_whole(
        self, upstream: UpstreamAnswer, limit: int = MAX_RESPONSE_BYTES
    ) -> bytes | None:
        """The answer's body, or ``None`` when it was cut or too large."""
        chunks, size = [], 0
        try:
            async for chunk in upstream.chunks():
                size += len(chunk)
                if size > limit:
                    _log.warning("an upstream answer passed %d bytes", limit)
                    return None
                chunks.append(chunk)
        except UpstreamError as exc:
            _log.info("the upstream answer was cut: %s", exc)
            return None
        return b"".join(chunks)

    async def _relay(
        self, upstream: UpstreamAnswer, status: int, content_type: str, headers: dict[str, str]
    ) -> None:
        tap = self.tap
        await self._start(status, content_type, headers)
        chunks = upstream.chunks()
        try:
            async for chunk in chunks:
                for data, final in tap.feed(chunk) if tap is not None else ((chunk, False),):
                    if final:  # its last piece: nothing after it is relayed, or metered
                        self.exit = "client_gone" if self.gone else "done"
                        await self._settle()
                        await self._body(data, more=False)
                        await _drop_rest(chunks)
                        return
                    await self._body(data)
        except UpstreamError as exc:
            self.exit = "upstream_cut"
            _log.info("the upstream stream was cut: %s", exc)
        else:
            self.exit = "client_gone" if self.gone else "done"
        rest = tap.flush() if tap is not None else b""
        await self._settle()
        await self._body(rest, more=False)

    # --- settlement ------------------------------------------------------------------

    async def _settle(self) -> None:
        if self._settlement is None:
            self._settlement = asyncio.ensure_future(self._do_settle())
        await asyncio.shield(self._settlement)

    def _charge(self) -> tuple[int | None, float | None, str, int]:
        """(tokens, cost, where they come from: upstream/estimated/none, input tokens)."""
        usage, text, model = self.usage, self.text_bytes, self.model
        if self.tap is not None:
            usage, text, model = self.tap.usage, self.tap.text_bytes, self.tap.model or model
        if usage is not None:
            tokens = (usage.input_tokens or 0) + (usage.output_tokens or 0)
            return tokens, self.price(usage, model), "upstream", usage.input_tokens or 0
        if self.incoming.endpoint is None or not self.asked or self.exit == "upstream_error":
            return 0, 0.0, "none", 0
        # A stream is charged the text it sent. An answer without usage (cut, never read
        # whole, or not done yet: a background response) is charged all it may write,
        # the provider bills it either way.
        output = text_tokens(text)
        if self.tap is None:
            output = max(output, self.output_cap)
        cost = self.price(Usage(self.input_estimate, output), model)
        return self.input_estimate + output, cost, "estimated", self.input_estimate

    async def _do_settle(self) -> None:
        exit_ = self.exit
        try:
            tokens, cost, source, input_tokens = self._charge()
        except Exception:
            _log.error("could not work out a call's charge; its reservation stands", exc_info=True)
            tokens, cost, source, input_tokens = None, None, "reserved", 0
        self.charged_cost = cost
        decision = self.decision
        try:
            if decision is not None:
                await self.gw.enforcer.settle(
                    decision,
                    tokens=tokens,
                    cost=cost,
                    estimated=source == "estimated",
                    refund_request=self.refund,
                )
        except Exception:
            # The leases still expire, and the reservation stays counted: a lost
            # settlement over-counts, never under-counts.
            _log.error("could not settle a call in the store", exc_info=True)
        span = self.span
        span.set_attribute(PROXY_EXIT, exit_)
        span.set_attribute(USAGE_SOURCE, source)
        if tokens is not None and source in ("upstream", "estimated"):
            span.set_attribute(INPUT_TOKENS, input_tokens)
            span.set_attribute(OUTPUT_TOKENS, tokens - input_tokens)
            if cost is not None:
                span.set_attribute(COST, cost)
        self.gw.settlements.add(1, {PROXY_EXIT: exit_, USAGE_SOURCE: source})
        if source == "estimated":
            _log.warning(
                "no usage from upstream for a %s call (%s): charged an estimate of %d tokens",
                self.incoming.endpoint,
                exit_,
                tokens,
            )

    # --- telemetry and responses -----------------------------------------------------

    def _record_decision(self, decision: Decision) -> None:
        span = self.span
        for name in STANDARD_FIELDS:
            if name in self.incoming.metadata:
                span.set_attribute(metadata_attribute(name), self.incoming.metadata[name])
        attrs: dict[str, str | bool] = {RULE_ACTION: decision.action}
        if decision.rule is not None:
            attrs[RULE_ID] = decision.rule.id
            # With the action, it tells a downgrade (allow past a limit) from an allow.
            attrs[LIMIT_EXCEEDED] = decision.limit_exceeded
        span.set_attributes(attrs)
        if self.requested:
            span.set_attribute(REQUEST_MODEL, self.requested)
        if decision.model and decision.model != self.requested:
            span.set_attribute(PROXY_MODEL, decision.model)
        self.gw.decisions.add(1, attrs)

    async def _blocked(self, decision: Decision, headers: dict[str, str]) -> None:
        extra = {**headers, "x-should-retry": "false"}
        if decision.retry_after_s is not None:
            extra["retry-after"] = str(decision.retry_after_s)
        message = decision.error_message or "blocked"
        await self._send_error(
            decision.http_status, message, decision.error_code, extra, kind="tokenlay_limit"
        )


class UploadStopped(Exception):
    """A streamed upload ended before its last byte: what to answer, if anyone listens."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


async def _drop_rest(chunks: AsyncIterator[bytes]) -> None:
    """Read what upstream sends after a stream's last event (its chunked body's end,
    mostly) and drop it, bounded in time and size: a body read to its end lets the
    connection go back to the pool, where closing it half-read would cost the next
    stream a new connection (~2 ms to its first chunk, measured)."""
    size = 0
    with contextlib.suppress(UpstreamError, TimeoutError):
        async with asyncio.timeout(_REST_TIMEOUT_S):
            async for chunk in chunks:
                size += len(chunk)
                if size > _REST_MAX_BYTES:
                    return


def _price(
    prices: PriceBook,
    base: str | None,
    fallback: tuple[str | None, str | None],
    usage: Usage,
    model: str | None,
) -> float | None:
    """A call's cost: ``model`` priced first, then the model the call ran on, then the
    one it asked for."""
    return valid_cost(prices.cost(usage, (model, *fallback), base))


def _kind(exc: UpstreamError) -> str:
    """What went wrong, in the words HTTP client libraries use."""
    if isinstance(exc, NotSent):
        return "ConnectTimeout" if isinstance(exc, ConnectTimedOut) else "ConnectError"
    return "ReadTimeout" if isinstance(exc, TimedOut) else "ReadError"


def _json_or_none(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None
