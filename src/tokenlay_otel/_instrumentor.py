"""``TokenlayInstrumentor``: patch ``openai`` so every client is routed and traced.

This module only builds the telemetry and wraps/unwraps; the work is in ``_wrappers``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from typing import Any

import openai
from openai._base_client import AsyncAPIClient, SyncAPIClient
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from ._config import (
    ENV_REQUIRE_ROUTE,
    ENV_TOKENLAY_BASE_URL,
    ENV_TOKENLAY_METADATA,
    Settings,
)
from ._pricing import warm_up
from ._routing import Unroutable, describe_scope
from ._safety import log, redact_openai_debug_logs
from ._state import build_telemetry, install_telemetry, uninstall_telemetry
from ._urls import display_url
from ._wrappers import note_http_response, request_async, request_sync

__all__ = ["TokenlayInstrumentor"]

_MODULE = "openai._base_client"
_SUPPORTED = ("openai >= 1.40, < 4",)


_AZURE = (openai.AzureOpenAI, openai.AsyncAzureOpenAI)


def _tap_response(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    note_http_response(kwargs.get("response"))
    return wrapped(*args, **kwargs)


def _announce(settings: Settings, problems: tuple[str, ...]) -> Unroutable | None:
    """Log each setting that cannot be used and where calls go; say what refuses them."""
    for problem in problems:
        log.error("tokenlay_otel: %s", problem)
    why_not = settings.why_not_routed()
    if why_not is None:
        log.info(
            "tokenlay_otel: instrumented openai; routing %s through %s, other endpoints go "
            "to the provider directly%s",
            describe_scope(settings.route_endpoints),
            display_url(settings.tokenlay_base_url),
            " (fail-open)" if settings.fail_open else "",
        )
        return None
    if settings.require_route:
        log.error(
            "tokenlay_otel: instrumented openai, but calls cannot be routed through Tokenlay "
            "(%s); %s=true makes them fail",
            why_not,
            ENV_REQUIRE_ROUTE,
        )
        return Unroutable(why_not, settings.route_endpoints)
    # A key forgotten in production turns spend control off: say so louder when the
    # rest of the Tokenlay setup says routing was meant.
    meant = settings.tokenlay_key is None and settings.route and _routing_configured()
    log.log(
        logging.WARNING if meant else logging.INFO,
        "tokenlay_otel: instrumented openai (tracing only); calls are not routed through "
        "Tokenlay: %s",
        why_not,
    )
    return None


def _routing_configured() -> bool:
    return any(os.environ.get(name) for name in (ENV_TOKENLAY_BASE_URL, ENV_TOKENLAY_METADATA))


class TokenlayInstrumentor(BaseInstrumentor):  # type: ignore[misc]  # untyped base
    """Route ``openai`` clients through Tokenlay (when ``TOKENLAY_KEY`` is set) and emit
    GenAI spans for every call.

    ``instrument(tracer_provider=..., settings=...)``: both optional; settings are read
    from the environment once, here, when not given. A setting that cannot be used is
    one ERROR log line naming it; the rest is installed (tracing always, routing when
    its settings are valid).
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _SUPPORTED

    def _instrument(self, **kwargs: Any) -> None:
        settings: Settings | None = kwargs.get("settings")
        problems: tuple[str, ...] = ()
        if settings is None:
            try:
                settings, problems = Settings.read_env()
            except Exception:  # a bug of ours: trace with the defaults rather than not at all
                log.error("tokenlay_otel: could not read the settings; using the defaults",
                          exc_info=True)  # fmt: skip
                settings = Settings(tokenlay_key=None)
        telemetry = build_telemetry(
            settings, kwargs.get("tracer_provider"), kwargs.get("meter_provider")
        )
        warm_up()
        route = settings.instrumented_route()
        unroutable = _announce(settings, problems)
        azure = None
        if settings.require_route and route is not None:
            azure = Unroutable(
                "Azure OpenAI clients are not routed through Tokenlay", settings.route_endpoints
            )
        redact_openai_debug_logs()
        install_telemetry(telemetry)

        # Azure clients put the deployment in the URL and use their own auth header:
        # traced, not re-addressed (and refused when routing is required).
        plain = {"route": route, "telemetry": telemetry, "unroutable": unroutable}
        azure_kw = {"route": None, "telemetry": telemetry, "unroutable": azure or unroutable}

        def target(instance: Any) -> dict[str, Any]:
            return azure_kw if isinstance(instance, _AZURE) else plain

        def sync_request(wrapped: Any, instance: Any, args: Any, kw: Any) -> Any:
            return request_sync(wrapped, instance, args, kw, **target(instance))

        async def async_request(wrapped: Any, instance: Any, args: Any, kw: Any) -> Any:
            return await request_async(wrapped, instance, args, kw, **target(instance))

        wrap_function_wrapper(_MODULE, "SyncAPIClient.request", sync_request)
        wrap_function_wrapper(_MODULE, "AsyncAPIClient.request", async_request)
        wrap_function_wrapper(_MODULE, "SyncAPIClient._process_response", _tap_response)
        wrap_function_wrapper(_MODULE, "AsyncAPIClient._process_response", _tap_response)

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstall_telemetry()
        for cls in (SyncAPIClient, AsyncAPIClient):
            unwrap(cls, "request")
            unwrap(cls, "_process_response")
