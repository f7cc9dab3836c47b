"""The one choke point: every ``openai`` request passes through here.

``request_sync``/``request_async`` wrap the client's ``request`` method, which every
endpoint (chat, completions, embeddings, responses; raw, streaming, ``.parse``) goes
through. They differ only by ``await``; each request is one ``_telemetry.Call``,
which the ``_process_response`` tap hands its HTTP response through ``_ACTIVE``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, cast

from openai import APIConnectionError, NotGiven, Omit

from ._attributes import PROVIDER, Endpoint, endpoint_for
from ._config import ENV_ALLOW_HTTP_HOSTS, Route
from ._context import current_metadata
from ._outage import bypass, name_the_proxy
from ._protocol import (
    HEADER_PREFIX,
    build_request_headers,
    check_url_security,
    display_url,
    normalize_field_name,
    proxy_url,
    sanitize_metadata,
    split_caller_headers,
    validate_metadata,
)
from ._responses import remember
from ._routing import TokenlayRouteError, Unroutable, routes
from ._safety import internal_error, log
from ._streams import wrap_result
from ._telemetry import Call, LLMCall, Telemetry
from ._usage_option import api_version_of, usage_option_accepted

__all__ = ["note_http_response", "request_async", "request_sync"]

_ACTIVE: ContextVar[Call | None] = ContextVar("tokenlay_request", default=None)
_ABSOLUTE = ("http://", "https://")
# Bad metadata on the auto-instrumented path is dropped with one warning per problem.
_warned: set[str] = set()


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
    options = body.get("stream_options")
    if isinstance(options, Mapping) and "include_usage" in options:
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
) -> tuple[Any, Call]:
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
    call = llm if llm is not None else Call()
    call.streaming = body.get("stream") is True
    call.hide_usage = hide_usage
    try:
        update: dict[str, Any] = {}
        if hide_usage:
            stream_options = body.get("stream_options")
            stream_options = dict(stream_options) if isinstance(stream_options, Mapping) else {}
            update["json_data"] = {
                **body,
                "stream_options": {**stream_options, "include_usage": True},
            }
        if routed and route is not None:
            headers = _routed_headers(client, route, caller_rest, metadata, provider_base)
            if llm is not None:
                try:
                    headers.update(llm.trace_headers())
                except Exception:
                    internal_error("propagating the trace context")
            update["url"] = proxy_url(route.tokenlay_base_url, url)
            update["headers"] = headers
            call.proxy = route.tokenlay_base_url
        return (options.model_copy(update=update) if update else options), call
    except BaseException:
        _detach(call)
        call.end()
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
) -> tuple[tuple[Any, ...], dict[str, Any], Call | None]:
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
            new_options, call = _start(
                client, route, telemetry, options, per_request, rest, omitted
            )
            if route is not None and route.fail_open and new_options is not options:
                call.fallback = (args, kwargs)
            return (*_rebind(args, kwargs, new_options, in_kwargs), call)
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
    args, kwargs, call = _begin(client, route, telemetry, args, kwargs, unroutable)
    if call is None:
        return wrapped(*args, **kwargs)
    token = _ACTIVE.set(call)
    try:
        try:
            result = wrapped(*args, **kwargs)
        except APIConnectionError as exc:
            direct = bypass(call, exc)
            if direct is None:
                raise
            result = wrapped(*direct[0], **direct[1])
    except BaseException as exc:
        _failed(call, exc)
        raise
    finally:
        _ACTIVE.reset(token)
        _detach(call)
    return _finished(call, result)


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
    args, kwargs, call = _begin(client, route, telemetry, args, kwargs, unroutable)
    if call is None:
        return await wrapped(*args, **kwargs)
    token = _ACTIVE.set(call)
    try:
        try:
            result = await wrapped(*args, **kwargs)
        except APIConnectionError as exc:
            direct = bypass(call, exc)
            if direct is None:
                raise
            result = await wrapped(*direct[0], **direct[1])
    except BaseException as exc:
        _failed(call, exc)
        raise
    finally:
        _ACTIVE.reset(token)
        _detach(call)
    return _finished(call, result)


def note_http_response(response: object) -> None:
    """Called from ``_process_response``: the HTTP response of the active call."""
    call = _ACTIVE.get()
    if call is not None:
        call.http_response = response


def _detach(call: Call) -> None:
    try:
        call.detach()
    except Exception:
        internal_error("detaching the span context")


def _failed(call: Call, exc: BaseException) -> None:
    name_the_proxy(call, exc)
    call.fail(exc)


def _finished(call: Call, result: Any) -> Any:
    """The call's result as the caller gets it: a traced call ends now, or when the
    stream or raw response it returned is done."""
    try:
        if isinstance(call, LLMCall) and not call.ended:
            return wrap_result(call, result)
        remember(result, call.proxy_metadata())  # not traced: the proxy's answer is kept
        return result
    except Exception:
        internal_error("recording the response")
    call.end()  # our failure: end the span, return the call's result as is
    return result
