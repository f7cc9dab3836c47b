"""The one choke point: every ``openai`` request passes through here.

``request_sync``/``request_async`` wrap the client's ``request`` method, which every
endpoint (chat, completions, embeddings, responses; raw, streaming, ``.parse``) goes
through. They differ only by ``await``; everything else is in :class:`_Call`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, cast

from openai import APIConnectionError, NotGiven, Omit

from ._config import ENV_ALLOW_HTTP_HOSTS, Route
from ._context import current_metadata
from ._conventions import PROVIDER, PROXY_URL
from ._endpoints import Endpoint, endpoint_for
from ._responses import remember
from ._routing import TokenlayRouteError, Unroutable, routes
from ._safety import internal_error, log
from ._streams import wrap_result
from ._telemetry import LLMCall, Telemetry
from ._urls import check_url_security, display_url
from ._usage_option import api_version_of, usage_option_accepted
from ._wire import (
    HEADER_PREFIX,
    build_request_headers,
    normalize_field_name,
    parse_response_headers,
    proxy_url,
    sanitize_metadata,
    split_caller_headers,
    usage_option_given,
    validate_metadata,
    with_usage_option,
)

__all__ = ["note_http_response", "request_async", "request_sync"]

_ACTIVE: ContextVar[_Request | None] = ContextVar("tokenlay_request", default=None)
_ABSOLUTE = ("http://", "https://")
# Bad metadata on the auto-instrumented path is dropped with one warning per problem.
_warned: set[str] = set()


class _Request:
    """State of one ``request`` call, visible to the ``_process_response`` tap."""

    __slots__ = ("fallback", "hide_usage", "http_response", "llm", "proxy", "streaming")

    def __init__(self, llm: LLMCall | None, *, streaming: bool, hide_usage: bool) -> None:
        self.llm = llm
        self.streaming = streaming
        self.hide_usage = hide_usage
        self.http_response: Any = None
        #: The Tokenlay base URL the call was sent to, when routed.
        self.proxy: str | None = None
        #: The caller's own (args, kwargs), when fail-open may send the call direct.
        self.fallback: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def bypass(self, exc: BaseException) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The call as the caller made it, if the proxy was never reached and fail-open
        is on.

        Only a failure to connect qualifies. A proxy that took the request and then
        timed out may have forwarded it: sending it again would bill it twice, once
        past spend control. An HTTP answer from the proxy (a block, a 5xx) never does.
        """
        if self.fallback is None or not _never_reached(exc):
            return None
        _say_once_a_minute(
            f"the Tokenlay proxy at {display_url(self.proxy)} could not be reached "
            f"({_cause(exc)}); fail-open sends calls straight to the provider"
        )
        self.hide_usage = False  # the caller's options go as they were
        self.http_response = None
        if self.llm is not None:
            self.llm.bypassed = True
        return self.fallback

    def detach(self) -> None:
        if self.llm is not None:
            try:
                self.llm.detach()
            except Exception:
                internal_error("detaching the span context")

    def failed(self, exc: BaseException) -> None:
        if self.proxy is not None and isinstance(exc, APIConnectionError):
            # openai says only "Connection error.": name the proxy and what went wrong.
            shown = display_url(self.proxy)
            what = "could not be reached" if _never_reached(exc) else "did not answer"
            _say_once_a_minute(
                f"the Tokenlay proxy at {shown} {what} ({_cause(exc)}); calls fail. "
                "Check TOKENLAY_BASE_URL and that the proxy is up"
            )
            if self.llm is not None and self.llm.span is not None:
                try:
                    self.llm.span.set_attribute(PROXY_URL, shown)
                except Exception:
                    internal_error("naming the proxy on the span")
        if self.llm is not None:
            self.llm.fail(exc)

    def finished(self, result: Any) -> Any:
        try:
            if self.llm is None:
                headers = getattr(self.http_response, "headers", None)
                if headers is not None:
                    remember(result, parse_response_headers(headers))
                return result
            self.llm.http_response = self.http_response
            return wrap_result(
                self.llm, result, streaming=self.streaming, hide_usage=self.hide_usage
            )
        except Exception:
            internal_error("recording the response")
        if self.llm is not None:  # our failure: end the span, return the call's result as is
            self.llm.end()
        return result


def _omitted(fields: dict[str, object]) -> tuple[dict[str, object], frozenset[str]]:
    """The fields with a value, and those the caller took away with ``Omit()`` (or
    ``NOT_GIVEN``), by canonical name."""
    names = set()
    for name, value in fields.items():
        if isinstance(value, Omit | NotGiven):
            with contextlib.suppress(ValueError):  # not a field name: nothing to take away
                names.add(normalize_field_name(name))
    if not names:
        return fields, frozenset()
    kept = {k: v for k, v in fields.items() if not isinstance(v, Omit | NotGiven)}
    return kept, frozenset(names)


# httpx's (and httpx2's) errors for a connection that was never made.
_CONNECT_FAILURES = frozenset({"ConnectError", "ConnectTimeout"})
_said: dict[str, float] = {}


def _cause(exc: BaseException) -> str:
    return type(exc.__cause__ or exc).__name__


def _never_reached(exc: BaseException) -> bool:
    """Whether openai's connection error means the request never left this process."""
    return isinstance(exc, APIConnectionError) and _cause(exc) in _CONNECT_FAILURES


def _say_once_a_minute(message: str) -> None:
    # An outage fails every call: one line a minute says it, thousands would bury it.
    now = time.monotonic()
    if now - _said.get(message, -60.0) >= 60.0:
        if len(_said) > 256:
            _said.clear()
        _said[message] = now
        log.warning("tokenlay_otel: %s", message)


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """The ``options`` argument of ``request(cast_to, options, ...)`` and where it was."""
    if "options" in kwargs:
        return kwargs["options"], True
    return args[1], False


def _rebind(
    args: tuple[Any, ...], kwargs: dict[str, Any], options: Any, in_kwargs: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if in_kwargs:
        return args, {**kwargs, "options": options}
    return (args[0], options, *args[2:]), kwargs


def _drop_bad(fields: Mapping[str, object]) -> dict[str, str]:
    valid, problems = sanitize_metadata(fields)
    for problem in problems:
        if problem not in _warned:
            _warned.add(problem)
            log.warning("tokenlay_otel: dropped a metadata field: %s", problem)
    return valid


# id(client) -> (its base URL object, its default-headers dict, what we derive from them).
# The derived values depend only on those two objects, which the entry keeps alive, so a
# new client that reuses an id is told apart by them. Bounded: cleared when full.
_CLIENT_FACTS: dict[int, tuple[object, object, str, dict[str, str]]] = {}
_CLIENT_FACTS_LIMIT = 256


def _client_facts(client: Any) -> tuple[str, dict[str, str]]:
    """A client's base URL as text and the valid ``x-tokenlay-*`` fields of its default
    headers; computed once per client (both are fixed when the client is built)."""
    url = getattr(client, "_base_url", None)
    custom = getattr(client, "_custom_headers", None)
    entry = _CLIENT_FACTS.get(id(client))
    if entry is not None and entry[0] is url and entry[1] is custom:
        return entry[2], entry[3]
    base = str(client.base_url).rstrip("/")
    fields, _ = split_caller_headers(custom or {}, bare_fields=False)
    valid = _drop_bad(fields) if fields else {}
    if len(_CLIENT_FACTS) >= _CLIENT_FACTS_LIMIT:
        _CLIENT_FACTS.clear()
    _CLIENT_FACTS[id(client)] = (url, custom, base, valid)
    return base, valid


def _routed_headers(
    client: Any,
    route: Route,
    caller_rest: Mapping[str, object],
    metadata: Mapping[str, str],
    provider_base: str,
) -> dict[str, object]:
    provider_key = route.provider_key if route.provider_key is not None else client.api_key
    ours = build_request_headers(
        tokenlay_key=route.tokenlay_key,
        provider_key=provider_key,
        provider_base=provider_base,
        metadata=metadata,
    )
    lowered_ours = {name.lower(): name for name in ours}
    headers: dict[str, object] = {}
    # openai 1.x merges default and per-request headers case-sensitively: omit any other
    # spelling the client's defaults use, or both would be sent.
    for name in getattr(client, "_custom_headers", None) or {}:
        lowered = name.lower()
        if (lowered.startswith(HEADER_PREFIX) or lowered in lowered_ours) and (
            lowered_ours.get(lowered) != name
        ):
            headers[name] = Omit()
    for name, value in caller_rest.items():
        # The caller's own spelling of a header we set (authorization, the provider
        # key or base) is replaced by ours, never sent beside it.
        if not (isinstance(name, str) and _ours(name, lowered_ours)):
            headers[name] = value
    headers.update(ours)
    return headers


def _ours(name: str, lowered_ours: Mapping[str, str]) -> bool:
    lowered = name.lower()
    return lowered in lowered_ours or lowered.startswith(HEADER_PREFIX)


def _metadata_for(
    client_fields: Mapping[str, str], route: Route | None, per_request: Mapping[str, str]
) -> Mapping[str, str]:
    """Attribution of a call, lowest precedence first (all inputs already valid)."""
    scoped = current_metadata()
    if route is None and not client_fields and not per_request and None not in scoped.values():
        return cast(Mapping[str, str], scoped)  # the common case: no None left; read-only
    metadata: dict[str, str] = {}
    if route is not None:
        metadata.update(route.metadata)
    metadata.update(client_fields)
    for field, value in scoped.items():
        if value is None:
            metadata.pop(field, None)
        else:
            metadata[field] = value
    metadata.update(per_request)
    return metadata


def _wants_usage_chunk(
    endpoint: Endpoint | None,
    body: Mapping[str, Any],
    *,
    routed: bool,
    provider: str,
    client: Any,
    params: object,
) -> bool:
    if endpoint is None or not endpoint.stream_usage_option or body.get("stream") is not True:
        return False
    if usage_option_given(body):
        return False  # the caller decided
    if routed:
        return True  # the proxy accepts it
    # A direct call gets it only where the provider is known to accept it: an unknown
    # field is a 400 on other OpenAI-compatible servers and on older Azure api-versions.
    api_version = None
    if provider == "azure.ai.openai":
        try:
            api_version = api_version_of(getattr(client, "default_query", None), params)
        except Exception:  # an odd client: leave the call as it is
            internal_error("reading the api-version")
            return False
    return usage_option_accepted(provider, api_version)


def _start(
    client: Any,
    route: Route | None,
    telemetry: Telemetry | None,
    options: Any,
    per_request: Mapping[str, str],
    caller_rest: Mapping[str, object],
    omitted: frozenset[str],
) -> tuple[Any, _Request]:
    client_base, client_fields = _client_facts(client)
    url = options.url
    provider_base = (route.provider_base if route else None) or client_base
    routed = False
    if route is not None and isinstance(url, str) and routes(route.endpoints, options.method, url):
        refusal = _refusal(route, url, provider_base)
        if refusal is None:
            routed = True
        elif route.required:
            Unroutable(refusal, route.endpoints).refuse(options.method, url)
    else:
        route = None  # out of scope: sent as the caller made it, with nothing of ours
    metadata = _metadata_for(client_fields, route, per_request)
    if omitted:  # the caller's Omit() takes a field away for this call, as for a header
        metadata = {k: v for k, v in metadata.items() if k not in omitted}
    json_data = options.json_data
    body: Mapping[str, Any] = json_data if isinstance(json_data, Mapping) else {}
    endpoint = endpoint_for(options.method, url) if telemetry and isinstance(url, str) else None

    llm = _start_span(telemetry, endpoint, body, metadata, provider_base, routed=routed)
    provider = llm.provider[PROVIDER] if llm else ""
    hide_usage = _wants_usage_chunk(
        endpoint, body, routed=routed, provider=provider, client=client, params=options.params
    )
    request = _Request(llm, streaming=body.get("stream") is True, hide_usage=hide_usage)
    try:
        update: dict[str, Any] = {}
        if hide_usage:
            update["json_data"] = with_usage_option(body)
        if routed and route is not None:
            headers = _routed_headers(client, route, caller_rest, metadata, provider_base)
            if llm is not None:
                try:
                    headers.update(llm.trace_headers())
                except Exception:
                    internal_error("propagating the trace context")
            update["url"] = proxy_url(route.tokenlay_base_url, url)
            update["headers"] = headers
            request.proxy = route.tokenlay_base_url
        return (options.model_copy(update=update) if update else options), request
    except BaseException:
        request.detach()
        if llm is not None:
            llm.end()
        raise


def _refusal(route: Route, url: str, provider_base: str) -> str | None:
    """Why this call cannot be routed (logged once per reason), or ``None``."""
    reason: str | None
    if url.startswith(_ABSOLUTE):
        reason = "a request with an absolute URL is not routed through Tokenlay"
    elif route.provider_base is not None:
        return None  # a drop-in client: its provider base was checked when it was built
    else:
        reason = _provider_base_refusal(provider_base, route.allow_http_hosts)
        if reason is None:
            return None
    if reason not in _warned:
        _warned.add(reason)
        log.error("tokenlay_otel: %s; such calls go to the provider directly", reason)
    return reason


@functools.lru_cache(maxsize=64)
def _provider_base_refusal(base: str, allow_http_hosts: frozenset[str]) -> str | None:
    """The one ``http://`` rule, applied to an instrumented client's base URL."""
    try:
        check_url_security(
            base,
            what=f"the openai client's base URL {display_url(base)!r}",
            allow_http_hosts=allow_http_hosts,
            allow_variable=ENV_ALLOW_HTTP_HOSTS,
            bare=True,
        )
    except ValueError as exc:
        return str(exc)
    return None


def _start_span(
    telemetry: Telemetry | None,
    endpoint: Endpoint | None,
    body: Mapping[str, Any],
    metadata: Mapping[str, str],
    provider_base: str,
    *,
    routed: bool,
) -> LLMCall | None:
    """The call's span, started; ``None`` if not an LLM call or if telemetry failed
    (routing goes on without it: spend control matters more than a span)."""
    if telemetry is None or endpoint is None:
        return None
    llm = LLMCall(
        telemetry,
        endpoint,
        body=body,
        metadata=metadata,
        provider_base=provider_base,
        routed=routed,
    )
    try:
        llm.start()
        return llm
    except Exception:
        internal_error("starting the span")
    llm.detach()
    llm.end()
    return None


def _begin(
    client: Any,
    route: Route | None,
    telemetry: Telemetry | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    unroutable: Unroutable | None,
) -> tuple[tuple[Any, ...], dict[str, Any], _Request | None]:
    options, in_kwargs = _bind(args, kwargs)
    if unroutable is not None:
        unroutable.refuse(options.method, options.url)
    split: tuple[dict[str, object], dict[str, object]] | None = None
    try:
        caller_headers = options.headers if isinstance(options.headers, Mapping) else {}
        split = split_caller_headers(caller_headers, bare_fields=route is not None)
    except Exception:
        internal_error("reading the caller's headers")
    if split is not None:
        fields, rest = split
        fields, omitted = _omitted(fields)
        # Caller input on a drop-in client: a bad value is the caller's error to see,
        # raised before anything is sent. Elsewhere bad fields are dropped (logged).
        per_request = validate_metadata(fields) if route is not None and route.strict else None
        try:
            if per_request is None:
                per_request = _drop_bad(fields)
            new_options, request = _start(
                client, route, telemetry, options, per_request, rest, omitted
            )
            if route is not None and route.fail_open and new_options is not options:
                request.fallback = (args, kwargs)
            return (*_rebind(args, kwargs, new_options, in_kwargs), request)
        except TokenlayRouteError:
            raise
        except Exception:
            internal_error("routing the call")
    if route is not None:
        if route.required:
            Unroutable("the call could not be routed (an internal error, logged at debug)").refuse(
                options.method, None
            )
        log.warning("tokenlay_otel: could not route a call through Tokenlay; sent it unrouted")
    return args, kwargs, None  # our own failure: the call goes ahead as the caller made it


def request_sync(
    wrapped: Callable[..., Any],
    client: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    route: Route | None,
    telemetry: Telemetry | None,
    unroutable: Unroutable | None = None,
) -> Any:
    """Run ``client.request`` through Tokenlay routing and telemetry.

    ``unroutable``: routing is required and impossible for this client; calls in its
    scope raise :class:`TokenlayRouteError` before anything is sent.
    """
    if _ACTIVE.get() is not None:  # already handled by an outer layer (drop-in client)
        return wrapped(*args, **kwargs)
    args, kwargs, request = _begin(client, route, telemetry, args, kwargs, unroutable)
    if request is None:
        return wrapped(*args, **kwargs)
    token = _ACTIVE.set(request)
    try:
        try:
            result = wrapped(*args, **kwargs)
        except APIConnectionError as exc:
            direct = request.bypass(exc)
            if direct is None:
                raise
            result = wrapped(*direct[0], **direct[1])
    except BaseException as exc:
        request.failed(exc)
        raise
    finally:
        _ACTIVE.reset(token)
        request.detach()
    return request.finished(result)


async def request_async(
    wrapped: Callable[..., Awaitable[Any]],
    client: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    route: Route | None,
    telemetry: Telemetry | None,
    unroutable: Unroutable | None = None,
) -> Any:
    """Async twin of :func:`request_sync`; differs only by ``await``."""
    if _ACTIVE.get() is not None:
        return await wrapped(*args, **kwargs)
    args, kwargs, request = _begin(client, route, telemetry, args, kwargs, unroutable)
    if request is None:
        return await wrapped(*args, **kwargs)
    token = _ACTIVE.set(request)
    try:
        try:
            result = await wrapped(*args, **kwargs)
        except APIConnectionError as exc:
            direct = request.bypass(exc)
            if direct is None:
                raise
            result = await wrapped(*direct[0], **direct[1])
    except BaseException as exc:
        request.failed(exc)
        raise
    finally:
        _ACTIVE.reset(token)
        request.detach()
    return request.finished(result)


def note_http_response(response: object) -> None:
    """Called from ``_process_response``: the HTTP response of the active call."""
    request = _ACTIVE.get()
    if request is not None:
        request.http_response = response
