"""What a request carries: its attribution and, when routed, the proxy's headers.

Attribution comes from the client's default headers, the route, the scoped
``metadata()`` and the request's own headers, lowest precedence first; the caller's
``Omit()`` takes a field away for one call. Bad fields on the auto-instrumented path are
dropped with one WARNING each.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any, cast

from openai import NotGiven, Omit

from ._config import Route
from ._context import current_metadata
from ._safety import say_once
from ._wire import (
    HEADER_PREFIX,
    build_request_headers,
    normalize_field_name,
    sanitize_metadata,
    split_caller_headers,
)

__all__ = ["client_facts", "drop_bad", "metadata_for", "routed_headers", "take_omitted"]


def take_omitted(fields: dict[str, object]) -> tuple[dict[str, object], frozenset[str]]:
    """The fields with a value, and those the caller took away with ``Omit()`` (or
    ``NOT_GIVEN``), by canonical name."""
    names = set()
    for name, value in fields.items():
        if isinstance(value, Omit | NotGiven):
            with contextlib.suppress(ValueError):  # not a field name: nothing to take away
                names.add(normalize_field_name(name))
    if not names:
        return fields, frozenset()
    kept = {k: v for k, v in fields.items() if not isinstance(v, Omit | NotGiven)}
    return kept, frozenset(names)


def drop_bad(fields: Mapping[str, object]) -> dict[str, str]:
    """The valid fields; each problem with the others is one WARNING, said once."""
    valid, problems = sanitize_metadata(fields)
    for problem in problems:
        say_once(logging.WARNING, "dropped a metadata field: %s", problem)
    return valid


# id(client) -> (its base URL object, its default-headers dict, what we derive from them).
# The derived values depend only on those two objects, which the entry keeps alive, so a
# new client that reuses an id is told apart by them. Bounded: cleared when full.
_CLIENT_FACTS: dict[int, tuple[object, object, str, dict[str, str]]] = {}
_CLIENT_FACTS_LIMIT = 256


def built_headers(client: Any) -> Mapping[str, object]:
    """The headers an ``openai`` client was built with (``default_headers=``), as given.

    A shortcut into openai's internals (``_custom_headers``), kept for what it saves:
    the public ``default_headers`` builds a new dict with the auth and platform headers
    on each read, which also defeats the per-client cache below; read that way, a chat
    call costs 61 k instructions more (6 % of its overhead), a routed one 97 k (8 %)
    (benchmarks/instructions.py's scenarios, counted by callgrind). The test in
    tests/test_private_seams.py compares it with ``default_headers`` on each openai.
    """
    return getattr(client, "_custom_headers", None) or _NONE


def _built_url(client: Any) -> object:
    # The public property, though openai's _base_url was ~12 k instructions a call
    # cheaper: 1.2 % of the overhead is under the 2 % a private shortcut must save.
    return getattr(client, "base_url", None)


_NONE: Mapping[str, object] = {}


def client_facts(client: Any) -> tuple[str, dict[str, str]]:
    """A client's base URL as text and the valid ``x-tokenlay-*`` fields of its default
    headers; computed once per client (both are fixed when the client is built)."""
    url = _built_url(client)
    custom = built_headers(client)
    entry = _CLIENT_FACTS.get(id(client))
    if entry is not None and entry[0] is url and entry[1] is custom:
        return entry[2], entry[3]
    base = str(client.base_url).rstrip("/")
    fields, _ = split_caller_headers(custom, bare_fields=False)
    valid = drop_bad(fields) if fields else {}
    if len(_CLIENT_FACTS) >= _CLIENT_FACTS_LIMIT:
        _CLIENT_FACTS.clear()
    _CLIENT_FACTS[id(client)] = (url, custom, base, valid)
    return base, valid


def routed_headers(
    client: Any,
    route: Route,
    caller_rest: Mapping[str, object],
    metadata: Mapping[str, str],
    provider_base: str,
) -> dict[str, object]:
    provider_key = route.provider_key if route.provider_key is not None else client.api_key
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
    for name in built_headers(client):
        lowered = name.lower()
        if (lowered.startswith(HEADER_PREFIX) or lowered in lowered_ours) and (
            lowered_ours.get(lowered) != name
        ):
            headers[name] = Omit()
    for name, value in caller_rest.items():
        # The caller's own spelling of a header we set (authorization, the provider
        # key or base) is replaced by ours, never sent beside it.
        if not (isinstance(name, str) and _ours(name, lowered_ours)):
            headers[name] = value
    headers.update(ours)
    return headers


def _ours(name: str, lowered_ours: Mapping[str, str]) -> bool:
    lowered = name.lower()
    return lowered in lowered_ours or lowered.startswith(HEADER_PREFIX)


def metadata_for(
    client_fields: Mapping[str, str], route: Route | None, per_request: Mapping[str, str]
) -> Mapping[str, str]:
    """Attribution of a call, lowest precedence first (all inputs already valid)."""
    scoped = current_metadata()
    if route is None and not client_fields and not per_request and None not in scoped.values():
        return cast(Mapping[str, str], scoped)  # the common case: no None left; read-only
    metadata: dict[str, str] = {}
    if route is not None:
        metadata.update(route.metadata)
    metadata.update(client_fields)
    for field, value in scoped.items():
        if value is None:
            metadata.pop(field, None)
        else:
            metadata[field] = value
    metadata.update(per_request)
    return metadata
