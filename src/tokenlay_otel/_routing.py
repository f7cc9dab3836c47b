"""Which requests go through the Tokenlay proxy: pure functions of method and path.

By default only what a Tokenlay proxy meters is routed (chat completions, completions,
embeddings, responses and the model list); every other endpoint (files, images, audio,
batches...) goes to the provider exactly as it would uninstrumented. A setting widens
the set with path prefixes, or to every endpoint.
"""

from __future__ import annotations

import functools
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from openai import OpenAIError

__all__ = [
    "DEFAULT_SCOPE",
    "METERED",
    "RouteScope",
    "TokenlayRouteError",
    "Unroutable",
    "describe_scope",
    "parse_scope",
    "routes",
]

#: (method, path under ``/v1``) of each metered endpoint.
METERED: frozenset[tuple[str, str]] = frozenset(
    {
        ("POST", "chat/completions"),
        ("POST", "completions"),
        ("POST", "embeddings"),
        ("POST", "responses"),
        ("GET", "models"),
    }
)
#: The scope's words: ``metered`` (the set above) and ``all``; anything else is a path
#: prefix such as ``images`` or ``audio/speech``.
_METERED_WORD = "metered"
_ALL_WORD = "all"
_PREFIX = re.compile(r"[a-z0-9_.-]+(/[a-z0-9_.-]+)*")


#: The words of a scope, normalised; a tuple so it hashes (the answers are cached).
RouteScope = tuple[str, ...]

DEFAULT_SCOPE: RouteScope = (_METERED_WORD,)


def parse_scope(text: str, *, source: str) -> RouteScope:
    """Parse ``images,audio/speech`` (or ``all``) into a scope.

    The metered endpoints are always in it: the setting widens the set, it never takes
    the calls that spend money away from the proxy.

    Raises:
        ValueError: naming ``source`` and the entry that is not a word or a path prefix.
    """
    words: list[str] = [_METERED_WORD]
    for entry in text.split(","):
        word = entry.strip().strip("/").lower()
        if not word:
            continue
        if word.startswith("v1/"):
            word = word[3:]
        dots = any(part in (".", "..") for part in word.split("/"))
        if word not in (_METERED_WORD, _ALL_WORD) and (dots or not _PREFIX.fullmatch(word)):
            raise ValueError(
                f"{source}: {entry.strip()!r} is not 'metered', 'all' or an API path prefix "
                "such as 'images' or 'audio/speech'"
            )
        if word not in words:
            words.append(word)
    return tuple(words)


def describe_scope(scope: RouteScope) -> str:
    """The scope in words, for the line ``instrument()`` logs."""
    parts = []
    for word in scope:
        if word == _METERED_WORD:
            parts.append("chat completions, completions, embeddings, responses, models")
        elif word == _ALL_WORD:
            parts.append("every endpoint")
        else:
            parts.append(f"{word}/*")
    return "; ".join(parts)


def _sent_path(url: str) -> str:
    """The path a request reaches, as httpx will send it, without ``/`` at its ends and
    without a leading ``v1/``: an absolute URL's path, without the query, fragment or
    ``;params``, dot segments resolved. Told apart only by the path httpx sends, a
    metered call cannot pass for another (``/x/../chat/completions``)."""
    parts = urlsplit(url)
    path = parts.path.split(";", 1)[0]
    if path:
        path = posixpath.normpath("/" + path)
    path = path.strip("/")
    while path.startswith("v1/") or path == "v1":
        path = path[3:]
    return path


@functools.lru_cache(maxsize=2048)
def routes(scope: RouteScope, method: str, url: str) -> bool:
    """Whether a request (openai's relative ``url``, e.g. ``/chat/completions``) is routed.

    Cached: a process calls a handful of paths (ids in paths make a few more).
    """
    path = _sent_path(url)
    for word in scope:
        if word == _ALL_WORD:
            return True
        if word == _METERED_WORD:
            if (method.upper(), path) in METERED:
                return True
        elif path == word or path.startswith(word + "/"):
            return True
    return False


class TokenlayRouteError(OpenAIError):
    """A call that must go through Tokenlay (``TOKENLAY_REQUIRE_ROUTE=true``) could not.

    An ``openai.OpenAIError``, so code that handles the client's errors handles it too;
    nothing was sent.
    """


@dataclass(frozen=True, slots=True)
class Unroutable:
    """Why calls that should be routed cannot be, when routing is required."""

    reason: str
    endpoints: RouteScope = DEFAULT_SCOPE

    def refuse(self, method: str, url: object) -> None:
        """Raise for a request in scope; let the others (files, images...) go."""
        if not isinstance(url, str) or routes(self.endpoints, method, url):
            raise TokenlayRouteError(
                f"{self.reason}; TOKENLAY_REQUIRE_ROUTE=true refuses to send this call "
                "past the Tokenlay proxy"
            )
