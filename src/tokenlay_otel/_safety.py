"""The one guard between our telemetry code and the caller's LLM call.

Our own failures are logged at debug level and swallowed, so they never change what
the caller sees. Setting ``TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS=1`` (our test suite does)
re-raises them instead, so a bug fails a test rather than hiding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ENV_RAISE_INTERNAL", "guard", "internal_error", "log"]

log = logging.getLogger("tokenlay_otel")

ENV_RAISE_INTERNAL = "TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS"


def internal_error(what: str) -> None:
    """Report the exception being handled as ours: log it, or re-raise it under tests.

    Call it from an ``except`` block; hot paths use it instead of :func:`guard`.
    """
    # Read on the failure path only: the happy path pays nothing for it.
    if os.environ.get(ENV_RAISE_INTERNAL) == "1":
        raise  # re-raises the exception the caller is handling
    log.debug(
        "tokenlay_otel internal error in %s (the LLM call is unaffected)", what, exc_info=True
    )


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Run a block of our own code; an exception in it is logged, not raised."""
    try:
        yield
    except Exception:
        internal_error(what)
