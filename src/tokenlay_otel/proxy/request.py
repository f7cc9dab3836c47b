"""What the gateway checks in a request before anything is reserved: its method, path
segments and headers, its declared size and JSON body, and which metered endpoint it
reaches. Pure functions; a failed check raises :class:`_Refused` with the answer."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from tokenlay_otel._wire import PROVIDER_BASE_HEADER, PROVIDER_KEY_HEADER
from tokenlay_otel._wire import metered_endpoint as endpoint_of

__all__ = ["metered_endpoint"]

_METHODS = frozenset({"GET", "POST", "DELETE"})
# A path segment as providers use them (ids, "ft:model:org"); no dot segments.
_SEGMENT = re.compile(r"[A-Za-z0-9_.~:@!$'()*+,;=-]+")
# Headers that must come once, and what they may hold (visible ASCII, inner spaces).
_SINGLE = frozenset({b"authorization", PROVIDER_KEY_HEADER.encode(), PROVIDER_BASE_HEADER.encode()})
_FORWARDED = frozenset({b"openai-beta", b"openai-organization", b"openai-project"})
_VISIBLE = re.compile(rb"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
_MAX_MODEL = 256


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def metered_endpoint(method: str, base: str, suffix: str) -> str | None:
    """The metered endpoint a request reaches, told by the whole upstream path.

    The request path alone would not do: a base without ``/v1`` and a path with two
    reach ``/v1/chat/completions`` all the same.
    """
    return endpoint_of(method, urlsplit(base).path + suffix)


def _disguised(method: str, base: str, suffix: str) -> bool:
    """Whether a path that is not a metered endpoint reads as one once lower-cased and
    stripped of ``;params`` (the ways servers differ in reading a path)."""
    if method != "POST":
        return False
    path = "/".join(s.split(";", 1)[0] for s in (urlsplit(base).path + suffix).lower().split("/"))
    return metered_endpoint(method, "", path) is not None


def _forwarded(headers: dict[bytes, bytes], *, streamed: bool) -> dict[str, str]:
    out = {k.decode(): v.decode("latin-1") for k, v in headers.items() if k in _FORWARDED}
    declared = _declared(headers)
    # With transfer-encoding too, the server framed the body by its chunks: the length
    # the client announced is not what will be sent.
    if streamed and declared and b"transfer-encoding" not in headers:
        # The server framed the body by it, so it is exact; upstream then gets a sized
        # upload rather than a chunked one, which some providers refuse.
        out["content-length"] = str(declared)
    return out


def _declared(headers: dict[bytes, bytes]) -> int:
    """The body size the client announced (0 when it did not)."""
    declared = headers.get(b"content-length", b"")
    return int(declared) if declared.isdigit() and len(declared) < 19 else 0


def _check_header_values(raw: list[tuple[bytes, bytes]]) -> None:
    """Refuse what would be ambiguous or unsendable upstream, before anything is taken."""
    seen: set[bytes] = set()
    for name, value in raw:
        if name in _SINGLE:
            if name in seen:
                raise _Refused(400, f"the {name.decode()} header is sent twice")
            seen.add(name)
        if (name in _SINGLE or name in _FORWARDED) and not _VISIBLE.fullmatch(value):
            raise _Refused(400, f"the {name.decode()} header holds what HTTP cannot send on")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except RecursionError:
        raise _Refused(400, "the request body is nested too deeply") from None
    except ValueError:
        raise _Refused(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _Refused(400, "the request body must be a JSON object")
    return data
