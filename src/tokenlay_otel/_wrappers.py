"""The one choke point: every ``openai`` request passes through here.

``request_sync``/``request_async`` wrap the client's ``request`` method, which every
endpoint (chat, completions, embeddings, responses; raw, streaming, ``.parse``) goes
through. They differ only by ``await``; everything else is in :class:`_Call`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from openai import Omit

from ._config import Route
from ._context import current_metadata
from ._protocol import (
    HEADER_PREFIX,
    build_request_headers,
    parse_response_headers,
    proxy_url,
    sanitize_metadata,
    split_caller_headers,
    validate_metadata,
)
from ._responses import remember
from ._safety import guard, log

__all__ = ["note_http_response", "request_async", "request_sync"]

_ACTIVE: ContextVar[_Call | None] = ContextVar("tokenlay_call", default=None)
# Bad metadata on the auto-instrumented path is dropped with one warning per problem.
_warned: set[str] = set()


class _Call:
    """State of one LLM call, from ``request`` entry to its result."""

    __slots__ = ("http_response", "metadata", "routed")

    def __init__(self, metadata: Mapping[str, str], *, routed: bool) -> None:
        self.metadata = metadata
        self.routed = routed
        self.http_response: Any = None

    def finish(self, result: object) -> None:
        with guard("recording the response"):
            headers = getattr(self.http_response, "headers", None)
            if headers is not None:
                remember(result, parse_response_headers(headers))


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


def _client_header_fields(client: Any) -> dict[str, object]:
    """``x-tokenlay-*`` fields an ``openai`` client carries in its own default headers."""
    custom = getattr(client, "_custom_headers", None) or {}
    fields, _ = split_caller_headers(custom, bare_fields=False)
    return fields


def _routed_headers(
    client: Any,
    route: Route,
    caller_rest: Mapping[str, object],
    metadata: Mapping[str, str],
) -> dict[str, object]:
    provider_key = route.provider_key if route.provider_key is not None else client.api_key
    provider_base = route.provider_base or str(client.base_url).rstrip("/")
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
    headers.update(caller_rest)
    headers.update(ours)
    return headers


def _start(client: Any, route: Route | None, options: Any) -> tuple[Any, _Call]:
    """Route ``options`` (a copy) and compute the call's attribution.

    Raises ``ValueError`` only for bad per-request metadata on a strict (drop-in) route.
    """
    caller_headers = options.headers if isinstance(options.headers, Mapping) else {}
    caller_fields, caller_rest = split_caller_headers(caller_headers, bare_fields=route is not None)
    per_request = validate_metadata(caller_fields) if route and route.strict else None
    if per_request is None:
        per_request = _drop_bad(caller_fields)

    metadata: dict[str, str] = {}
    if route is not None:
        metadata.update(route.metadata)
    metadata.update(_drop_bad(_client_header_fields(client)))
    for field, value in current_metadata().items():
        if value is None:
            metadata.pop(field, None)
        else:
            metadata[field] = value
    metadata.update(per_request)

    url = options.url
    if route is None or not isinstance(url, str) or url.startswith(("http://", "https://")):
        return options, _Call(metadata, routed=False)
    routed = options.model_copy(
        update={
            "url": proxy_url(route.tokenlay_base_url, url),
            "headers": _routed_headers(client, route, caller_rest, metadata),
        }
    )
    return routed, _Call(metadata, routed=True)


def _begin(
    client: Any, route: Route | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], _Call | None]:
    options, in_kwargs = _bind(args, kwargs)
    if route is not None and route.strict:
        # Caller input on a drop-in client: a bad value is the caller's error to see.
        new_options, call = _start(client, route, options)
        return (*_rebind(args, kwargs, new_options, in_kwargs), call)
    with guard("routing the request"):
        new_options, call = _start(client, route, options)
        return (*_rebind(args, kwargs, new_options, in_kwargs), call)
    return args, kwargs, None


def request_sync(
    wrapped: Callable[..., Any],
    client: Any,
    route: Route | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run ``client.request`` through Tokenlay routing and telemetry."""
    if _ACTIVE.get() is not None:
        return wrapped(*args, **kwargs)
    args, kwargs, call = _begin(client, route, args, kwargs)
    if call is None:
        return wrapped(*args, **kwargs)
    token = _ACTIVE.set(call)
    try:
        result = wrapped(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    call.finish(result)
    return result


async def request_async(
    wrapped: Callable[..., Awaitable[Any]],
    client: Any,
    route: Route | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Async twin of :func:`request_sync`; differs only by ``await``."""
    if _ACTIVE.get() is not None:
        return await wrapped(*args, **kwargs)
    args, kwargs, call = _begin(client, route, args, kwargs)
    if call is None:
        return await wrapped(*args, **kwargs)
    token = _ACTIVE.set(call)
    try:
        result = await wrapped(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    call.finish(result)
    return result


def note_http_response(response: object) -> None:
    """Called from ``_process_response``: the HTTP response of the active call."""
    call = _ACTIVE.get()
    if call is not None:
        call.http_response = response
