"""Which Tokenlay response metadata belongs to which returned object.

Parsed ``openai`` models do not keep the HTTP response, so the metadata is kept
beside them, keyed by identity, for as long as the object lives. The object itself
is never modified.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from ._fork import renew_after_fork
from ._wire import TokenlayResponseMetadata, parse_response_headers

__all__ = ["get_tokenlay_metadata", "remember"]

_log = logging.getLogger("tokenlay_otel")


class _Remembered:
    """Metadata by object identity, each entry dropped when its object is collected."""

    __slots__ = ("__weakref__", "_by_id", "_lock")

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[Any], TokenlayResponseMetadata]] = {}
        self._lock = threading.Lock()
        renew_after_fork(self)

    def forget(self, ref: weakref.ref[Any], key: int) -> None:
        with self._lock:
            entry = self._by_id.get(key)
            if entry is not None and entry[0] is ref:
                del self._by_id[key]

    def add(self, obj: object, meta: TokenlayResponseMetadata) -> None:
        key = id(obj)
        try:
            ref = weakref.ref(obj, lambda r: self.forget(r, key))
        except TypeError:  # not weak-referenceable (e.g. None, a str): nothing to attach to
            return
        with self._lock:
            self._by_id[key] = (ref, meta)

    def lookup(self, obj: object) -> TokenlayResponseMetadata | None:
        with self._lock:
            entry = self._by_id.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return None


_remembered = _Remembered()


def remember(obj: object, meta: TokenlayResponseMetadata | None) -> None:
    """Associate ``meta`` with ``obj`` until ``obj`` is garbage collected."""
    if meta is not None:
        _remembered.add(obj, meta)


def _headers_of(obj: object) -> Any:
    # APIStatusError and Stream expose `.response`, raw responses `.http_response`,
    # and an httpx/httpx2 Response has `.headers` itself.
    for attr in ("http_response", "response"):
        inner = getattr(obj, attr, None)
        headers = getattr(inner, "headers", None)
        if headers is not None:
            return headers
    return getattr(obj, "headers", None)


def get_tokenlay_metadata(obj: object) -> TokenlayResponseMetadata | None:
    """What the Tokenlay proxy reported for a call.

    Args:
        obj: a response returned through a routed client (parsed, raw, or a stream),
            or the ``openai.APIStatusError`` a blocked call raised.

    Returns:
        The parsed ``x-tokenlay-*`` headers (for a finished stream, with the cost and
        token counts of its final usage chunk), or ``None`` when the proxy sent none.
        Never raises: what cannot be read counts as not sent.
    """
    found = _remembered.lookup(obj)
    if found is not None:
        return found
    try:
        headers = _headers_of(obj)
        return None if headers is None else parse_response_headers(headers)
    except Exception:  # any object may come in, with attributes that raise when read
        _log.debug("could not read the response headers of a %s", type(obj).__name__)
        return None
