"""A proxy that cannot be reached: say so once a minute, and send the call direct when
fail-open allows it.

Only a failure to connect lets a call go to the provider. A proxy that took the request
and then timed out may have forwarded it: sending it again would bill it twice, once
past spend control. An HTTP answer from the proxy (a block, a 5xx) never does.
"""

from __future__ import annotations

import time
from typing import Any

from openai import APIConnectionError

from ._conventions import PROXY_URL
from ._safety import internal_error, log
from ._telemetry import Call
from ._urls import display_url

__all__ = ["bypass", "name_the_proxy"]

# httpx's (and httpx2's) errors for a connection that was never made.
_CONNECT_FAILURES = frozenset({"ConnectError", "ConnectTimeout"})
#: message -> when it was last logged. An outage fails every call: one line a minute
#: says it, thousands would bury it. Bounded: cleared when full.
_said: dict[str, float] = {}
_SAID_LIMIT = 256


def _cause(exc: BaseException) -> str:
    return type(exc.__cause__ or exc).__name__


def _never_reached(exc: BaseException) -> bool:
    """Whether openai's connection error means the request never left this process."""
    return isinstance(exc, APIConnectionError) and _cause(exc) in _CONNECT_FAILURES


def _say_once_a_minute(message: str) -> None:
    now = time.monotonic()
    if now - _said.get(message, -60.0) >= 60.0:
        if len(_said) > _SAID_LIMIT:
            _said.clear()
        _said[message] = now
        log.warning("tokenlay_otel: %s", message)


def bypass(call: Call, exc: BaseException) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call as the caller made it, if the proxy was never reached and fail-open is
    on (``call.fallback``); the call is then marked bypassed."""
    if call.fallback is None or not _never_reached(exc):
        return None
    _say_once_a_minute(
        f"the Tokenlay proxy at {display_url(call.proxy)} could not be reached "
        f"({_cause(exc)}); fail-open sends calls straight to the provider"
    )
    call.hide_usage = False  # the caller's options go as they were
    call.http_response = None
    call.bypassed = True
    return call.fallback


def name_the_proxy(call: Call, exc: BaseException) -> None:
    """A routed call failed to connect: openai says only "Connection error.", so name
    the proxy and what went wrong (in the log and on the span)."""
    if call.proxy is None or not isinstance(exc, APIConnectionError):
        return
    shown = display_url(call.proxy)
    what = "could not be reached" if _never_reached(exc) else "did not answer"
    _say_once_a_minute(
        f"the Tokenlay proxy at {shown} {what} ({_cause(exc)}); calls fail. "
        "Check TOKENLAY_BASE_URL and that the proxy is up"
    )
    if call.span is not None:
        try:
            call.span.set_attribute(PROXY_URL, shown)
        except Exception:
            internal_error("naming the proxy on the span")
