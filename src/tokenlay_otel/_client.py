"""Drop-in clients: ``openai.OpenAI``/``AsyncOpenAI`` that route through Tokenlay.

The client itself is configured for the provider (``api_key``/``base_url`` are the
provider's), and every request is re-addressed to the Tokenlay proxy in the one choke
point of ``_wrappers`` — the same code path the instrumentor uses for plain clients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import openai

from ._config import ENV_ALLOW_HTTP_HOSTS, Route, client_route
from ._safety import redact_openai_debug_logs
from ._state import current_telemetry
from ._urls import check_url_security
from ._wire import split_caller_headers, validate_metadata
from ._wrappers import note_http_response, request_async, request_sync

__all__ = ["AsyncTokenlayOpenAI", "TokenlayOpenAI"]

_ROUTE_KWARG = "_tokenlay_route"


def _resolve(
    *,
    provider_api_key: str | None,
    provider_api_base: str | None,
    tokenlay_key: str | None,
    tokenlay_base_url: str | None,
    metadata: Mapping[str, str] | None,
    extra_headers: Mapping[str, str] | None,
    fail_open: bool | None,
    kwargs: dict[str, Any],
) -> tuple[Route, dict[str, Any]]:
    """The client's route and the keyword arguments for ``openai``'s constructor."""
    # openai's own argument names mean the provider here, so copy()/with_options(),
    # which pass them back, keep working.
    api_key = kwargs.pop("api_key", None)
    base_url = kwargs.pop("base_url", None)
    route: Route | None = kwargs.pop(_ROUTE_KWARG, None)
    header_fields, plain_headers = split_caller_headers(extra_headers or {}, bare_fields=True)
    if route is None:
        fields = {**validate_metadata(metadata or {}), **validate_metadata(header_fields)}
        route = client_route(
            provider_api_key=provider_api_key or (api_key if isinstance(api_key, str) else None),
            provider_api_base=provider_api_base or (str(base_url) if base_url else None),
            tokenlay_key=tokenlay_key,
            tokenlay_base_url=tokenlay_base_url,
            metadata=fields,
            fail_open=fail_open,
        )
    else:
        # copy(api_key=..., base_url=...) overrides the provider side only.
        changes: dict[str, Any] = {}
        if isinstance(api_key, str) and api_key != route.provider_key:
            changes["provider_key"] = api_key
        if base_url and str(base_url).rstrip("/") != route.provider_base:
            changes["provider_base"] = check_url_security(
                str(base_url),
                what="base_url",
                allow_http_hosts=route.allow_http_hosts,
                allow_variable=ENV_ALLOW_HTTP_HOSTS,
            )
        route = dataclasses.replace(route, **changes) if changes else route
    defaults = dict(kwargs.pop("default_headers", None) or {})
    defaults.update({k: str(v) for k, v in plain_headers.items()})
    kwargs.update(
        api_key=route.provider_key,
        base_url=route.provider_base,
        default_headers=defaults or None,
    )
    return route, kwargs


class _TokenlayClient:
    """Construction and ``copy()`` shared by the sync and async clients."""

    _tokenlay_route: Route

    def __init__(
        self,
        *,
        provider_api_key: str | None = None,
        provider_api_base: str | None = None,
        tokenlay_key: str | None = None,
        tokenlay_base_url: str | None = None,
        metadata: Mapping[str, str] | None = None,
        extra_headers: Mapping[str, str] | None = None,
        fail_open: bool | None = None,
        **kwargs: Any,
    ) -> None:
        route, openai_kwargs = _resolve(
            provider_api_key=provider_api_key,
            provider_api_base=provider_api_base,
            tokenlay_key=tokenlay_key,
            tokenlay_base_url=tokenlay_base_url,
            metadata=metadata,
            extra_headers=extra_headers,
            fail_open=fail_open,
            kwargs=kwargs,
        )
        cast(Any, super()).__init__(**openai_kwargs)
        self._tokenlay_route = route
        redact_openai_debug_logs()
        current_telemetry()  # the process's one state: built by the first client, or instrument()

    def copy(self, **kwargs: Any) -> Any:
        """Like ``openai``'s ``copy()``/``with_options()``, keeping the Tokenlay settings."""
        extra = {**kwargs.pop("_extra_kwargs", {}), _ROUTE_KWARG: self._tokenlay_route}
        return cast(Any, super()).copy(_extra_kwargs=extra, **kwargs)

    with_options = copy


class TokenlayOpenAI(_TokenlayClient, openai.OpenAI):  # type: ignore[misc]  # copy() signature
    """``openai.OpenAI`` whose calls go through the Tokenlay proxy, with attribution.

    Args:
        provider_api_key: the provider's key (env ``PROVIDER_API_KEY``); ``api_key`` is
            accepted as an alias.
        provider_api_base: the provider's base URL (env ``PROVIDER_API_BASE``, default
            ``https://api.openai.com/v1``); ``base_url`` is accepted as an alias.
        tokenlay_key: the Tokenlay key (env ``TOKENLAY_KEY``).
        tokenlay_base_url: the proxy (env ``TOKENLAY_BASE_URL``, default
            ``https://api.tokenlay.com``).
        metadata: client-wide attribution, e.g. ``{"user": "u1", "org": "o1"}``.
        extra_headers: seed-compatible: ``user``/``org``/``plan``/``project``/``feature``
            and ``x-tokenlay-*`` keys are metadata; other headers are sent as given.
        fail_open: when the proxy cannot be reached, call the provider directly (env
            ``TOKENLAY_FAIL_OPEN``, default off).
        **kwargs: anything ``openai.OpenAI`` accepts (timeout, max_retries, http_client...).

    Raises:
        ValueError: a key is missing, a URL would send keys in clear text, or a
            metadata field is invalid; the message says what to fix.
    """

    def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]  # pass-through
        return request_sync(
            super().request,
            self,
            args,
            kwargs,
            route=self._tokenlay_route,
            telemetry=current_telemetry(),
        )

    def _process_response(self, **kwargs: Any) -> Any:  # type: ignore[override]  # pass-through
        note_http_response(kwargs.get("response"))
        return super()._process_response(**kwargs)


class AsyncTokenlayOpenAI(_TokenlayClient, openai.AsyncOpenAI):  # type: ignore[misc]
    """``openai.AsyncOpenAI`` whose calls go through the Tokenlay proxy.

    Takes the same arguments as :class:`TokenlayOpenAI`.
    """

    async def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return await request_async(
            super().request,
            self,
            args,
            kwargs,
            route=self._tokenlay_route,
            telemetry=current_telemetry(),
        )

    async def _process_response(self, **kwargs: Any) -> Any:  # type: ignore[override]
        note_http_response(kwargs.get("response"))
        return await super()._process_response(**kwargs)
