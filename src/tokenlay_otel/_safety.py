"""The one guard between our telemetry code and the caller's LLM call.

Our own failures are logged at debug level and swallowed, so they never change what
the caller sees. Setting ``TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS=1`` (our test suite does)
re-raises them instead, so a bug fails a test rather than hiding.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

from ._wire.fields import PROVIDER_KEY_HEADER

__all__ = [
    "ENV_RAISE_INTERNAL",
    "guard",
    "internal_error",
    "log",
    "redact_openai_debug_logs",
    "say_once",
]

log = logging.getLogger("tokenlay_otel")

ENV_RAISE_INTERNAL = "TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS"

#: Lines already said by :func:`say_once`: a bad setting or field repeats on every
#: call, and one line says it. Bounded: past the limit, lines are said again.
_said: set[str] = set()
_SAID_LIMIT = 1024


def say_once(level: int, message: str, detail: str) -> None:
    """Log ``message % detail`` at ``level`` the first time only."""
    line = message % detail
    if line in _said:
        return
    if len(_said) >= _SAID_LIMIT:
        _said.clear()
    _said.add(line)
    log.log(level, "tokenlay_otel: %s", line)


def _keep_quiet(what: str, exc_info: Any) -> bool:
    """Log our own failure and answer ``True``, or ``False`` under the test switch
    (the caller then lets the exception propagate)."""
    # Read on the failure path only: the happy path pays nothing for it.
    if os.environ.get(ENV_RAISE_INTERNAL) == "1":
        return False
    log.debug(
        "tokenlay_otel internal error in %s (the LLM call is unaffected)", what, exc_info=exc_info
    )
    return True


def internal_error(what: str) -> None:
    """Report the exception being handled as ours: log it, or re-raise it under tests.

    Call it from an ``except`` block; hot paths use it instead of :func:`guard`.
    """
    if not _keep_quiet(what, True):
        raise  # re-raises the exception the caller is handling


class guard:  # lower case: used like a function, `with guard("..."):`
    """Run a block of our own code; an exception in it is logged, not raised.

    For the paths a call rarely takes (errors, abandoned streams); per-call paths use
    ``try``/``except Exception: internal_error(...)``, which costs nothing until it
    catches, where this costs three Python calls.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is None or not issubclass(exc_type, Exception):
            return False  # no error, or KeyboardInterrupt and friends: not ours to keep
        return _keep_quiet(self.what, (exc_type, exc, tb))


_SECRET_HEADERS = frozenset({PROVIDER_KEY_HEADER, "authorization"})


class _RedactTokenlayHeaders(logging.Filter):
    """openai 1.x logs each request's options (with headers) at debug level and redacts
    only its own auth headers; the provider key we add would show. Redact it too."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict) and isinstance(args.get("headers"), dict):
            headers = dict(args["headers"])
            for name in headers:
                if str(name).lower() in _SECRET_HEADERS:
                    headers[name] = "<redacted>"
            record.args = {**args, "headers": headers}
        return True


_redactor = _RedactTokenlayHeaders()


def redact_openai_debug_logs() -> None:
    """Install the redaction on openai's request logger (once)."""
    logger = logging.getLogger("openai._base_client")
    if _redactor not in logger.filters:
        logger.addFilter(_redactor)
