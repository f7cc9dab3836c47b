"""``TokenlayInstrumentor``: patch ``openai`` so every client is routed and traced.

This module only builds the telemetry and wraps/unwraps; the work is in ``_wrappers``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

import openai
from openai._base_client import AsyncAPIClient, SyncAPIClient
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined]
    BaseInstrumentor,
)
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from ._config import Route, Settings
from ._pricing import warm_up
from ._safety import redact_openai_debug_logs
from ._telemetry import Telemetry
from ._wrappers import note_http_response, request_async, request_sync

__all__ = ["TokenlayInstrumentor"]

_MODULE = "openai._base_client"
_SUPPORTED = ("openai >= 1.40, < 4",)


def _route_for(instance: Any, route: Route | None) -> Route | None:
    # Azure clients put the deployment in the URL and use their own auth header; they
    # are traced but not re-addressed.
    if isinstance(instance, openai.AzureOpenAI | openai.AsyncAzureOpenAI):
        return None
    return route


def _tap_response(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    note_http_response(kwargs.get("response"))
    return wrapped(*args, **kwargs)


class TokenlayInstrumentor(BaseInstrumentor):  # type: ignore[misc]  # untyped base
    """Route ``openai`` clients through Tokenlay (when ``TOKENLAY_KEY`` is set) and emit
    GenAI spans for every call.

    ``instrument(tracer_provider=..., settings=...)``: both optional; settings are read
    from the environment once, here, when not given.
    """

    #: The telemetry of the active instrumentation; drop-in clients record with it too,
    #: so one process sends every span to the provider given to ``instrument()``.
    active_telemetry: ClassVar[Telemetry | None] = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _SUPPORTED

    def _instrument(self, **kwargs: Any) -> None:
        settings = kwargs.get("settings") or Settings.from_env()
        telemetry = Telemetry.create(
            settings=settings,
            tracer_provider=kwargs.get("tracer_provider"),
            meter_provider=kwargs.get("meter_provider"),
        )
        warm_up()
        route = settings.instrumented_route()
        redact_openai_debug_logs()
        TokenlayInstrumentor.active_telemetry = telemetry

        def sync_request(wrapped: Any, instance: Any, args: Any, kw: Any) -> Any:
            return request_sync(
                wrapped, instance, args, kw, route=_route_for(instance, route), telemetry=telemetry
            )

        async def async_request(wrapped: Any, instance: Any, args: Any, kw: Any) -> Any:
            return await request_async(
                wrapped, instance, args, kw, route=_route_for(instance, route), telemetry=telemetry
            )

        wrap_function_wrapper(_MODULE, "SyncAPIClient.request", sync_request)
        wrap_function_wrapper(_MODULE, "AsyncAPIClient.request", async_request)
        wrap_function_wrapper(_MODULE, "SyncAPIClient._process_response", _tap_response)
        wrap_function_wrapper(_MODULE, "AsyncAPIClient._process_response", _tap_response)

    def _uninstrument(self, **kwargs: Any) -> None:
        TokenlayInstrumentor.active_telemetry = None
        for cls in (SyncAPIClient, AsyncAPIClient):
            unwrap(cls, "request")
            unwrap(cls, "_process_response")
