"""PURE: may ``stream_options.include_usage`` be added to a call that goes straight to
its provider?

Adding a field the server does not know turns a working call into a 400, so the option
is added only where it is known to be accepted: OpenAI's own API, and Azure OpenAI from
the api-versions that document it (GA ``2024-10-21`` and later, previews from
``2024-09-01-preview``). Anything else, an unknown or malformed version included, is
left as the caller sent it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from datetime import date

__all__ = ["API_VERSION_PARAM", "api_version_of", "usage_option_accepted"]

#: The query parameter that names an Azure OpenAI api-version.
API_VERSION_PARAM = "api-version"

# Azure's dated api-versions: ``YYYY-MM-DD`` (GA) or ``YYYY-MM-DD-preview``.
_DATED = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})(-preview)?")
# The first versions whose chat and completions requests accept ``stream_options``.
_FIRST_GA = "2024-10-21"
_FIRST_PREVIEW = "2024-09-01"


@functools.lru_cache(maxsize=64)
def _azure_accepts(api_version: str) -> bool:
    dated = _DATED.fullmatch(api_version)
    if dated is None:
        return False
    day, preview = dated.groups()
    try:
        date.fromisoformat(day)
    except ValueError:
        return False  # shaped like a date but not one: not a version Azure publishes
    return day >= (_FIRST_PREVIEW if preview else _FIRST_GA)  # ISO dates sort as text


def usage_option_accepted(provider: str, api_version: str | None) -> bool:
    """Whether a direct call to ``provider`` (a ``gen_ai.provider.name``) at
    ``api_version`` (Azure's ``api-version`` query parameter, if any) accepts
    ``stream_options.include_usage``."""
    if provider == "openai":
        return True
    if provider == "azure.ai.openai" and api_version is not None:
        return _azure_accepts(api_version)
    return False


def api_version_of(default_query: object, params: object) -> str | None:
    """The ``api-version`` a request is sent with: the request's own query parameters
    (``extra_query``) over the client's default query, as openai merges them; ``None``
    when neither names one as text (an ``Omit`` value removes the default)."""
    for query in (params, default_query):
        if isinstance(query, Mapping) and API_VERSION_PARAM in query:
            value = query[API_VERSION_PARAM]
            return value if isinstance(value, str) else None
    return None
