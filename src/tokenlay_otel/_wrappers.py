"""The one choke point: every ``openai`` request passes through here.

``request_sync``/``request_async`` wrap the client's ``request`` method, which every
endpoint (chat, completions, embeddings, responses; raw, streaming, ``.parse``) goes
through. They differ only by ``await``; each request is one ``_telemetry.Call``,
which the ``_process_response`` tap hands its HTTP response through ``_ACTIVE``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from openai import APIConnectionError

from ._config import ENV_ALLOW_HTTP_HOSTS, Route
from ._conventions import PROVIDER
from ._endpoints import Endpoint, endpoint_for
from ._outage import bypass, name_the_proxy
from ._outgoing import client_facts, drop_bad, metadata_for, routed_headers, take_omitted
from ._responses import remember
from ._results import wrap_result
from ._routing import TokenlayRouteError, Unroutable, routes
from ._safety import internal_error, log, say_once
from ._telemetry import Call, LLMCall, Telemetry
from ._urls import check_url_security, display_url
from ._usage_option import api_version_of, usage_option_accepted
from ._wire import (
    proxy_url,
    split_caller_headers,
    usage_option_given,
    validate_metadata,
    with_usage_option,
)

__all__ = ["note_http_response", "request_async", "request_sync"]

_ACTIVE: ContextVar[Call | None] = ContextVar("tokenlay_request", default=None)
_ABSOLUTE = ("http://", "https://")


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
) -> tuple[Any, Call]:
    client_base, client_fields = client_facts(client)
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
    metadata = metadata_for(client_fields, route, per_request)
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
            update["json_data"] = with_usage_option(body)
        if routed and route is not None:
            headers = routed_headers(client, route, caller_rest, metadata, provider_base)
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
    say_once(logging.ERROR, "%s; such calls go to the provider directly", reason)
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
        fields, omitted = take_omitted(fields)
        # Caller input on a drop-in client: a bad value is the caller's error to see,
        # raised before anything is sent. Elsewhere bad fields are dropped (logged).
        per_request = validate_metadata(fields) if route is not None and route.strict else None
        try:
            if per_request is None:
                per_request = drop_bad(fields)
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
