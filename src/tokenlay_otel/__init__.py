"""tokenlay-otel: route ``openai`` calls through Tokenlay and trace them with OpenTelemetry.

Usage::

    from tokenlay_otel import TokenlayOpenAI, metadata, get_tokenlay_metadata

    client = TokenlayOpenAI(
        provider_api_key=os.environ["PROVIDER_API_KEY"],
        tokenlay_key=os.environ["TOKENLAY_KEY"],
        metadata={"user": "user_abc123", "org": "org_456xyz"},
    )
    with metadata(feature="autocomplete"):
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[...])
    print(get_tokenlay_metadata(reply))      # rule, action, cost, warnings...

Configuration (arguments win over environment variables):

==============================  ====================================================
``PROVIDER_API_KEY``            provider key for the drop-in clients
``PROVIDER_API_BASE``           provider base URL (default https://api.openai.com/v1)
``TOKENLAY_KEY``                Tokenlay key
``TOKENLAY_BASE_URL``           Tokenlay proxy (default https://api.tokenlay.com)
``TOKENLAY_METADATA``           default attribution, ``user=u1,org=o1``
``TOKENLAY_ROUTE``              ``false`` stops routing instrumented clients
``TOKENLAY_ROUTE_ENDPOINTS``    more to route than the metered endpoints (``images``, ``all``)
``TOKENLAY_REQUIRE_ROUTE``      ``true``: a call that cannot be routed raises
``TOKENLAY_ALLOW_HTTP_HOSTS``   hosts plain ``http://`` may reach besides loopback
==============================  ====================================================

Attribution precedence, highest first: per-request ``extra_headers``, the innermost
``metadata()``, outer ``metadata()`` scopes, the client's ``metadata``/``extra_headers``,
``TOKENLAY_METADATA``.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._client import AsyncTokenlayOpenAI, TokenlayOpenAI
from ._context import metadata
from ._instrumentor import TokenlayInstrumentor
from ._responses import get_tokenlay_metadata
from ._routing import TokenlayRouteError
from ._version import __version__
from ._wire import TokenlayResponseMetadata

if _TYPE_CHECKING:
    from .exporters import configure

__all__ = [
    "AsyncTokenlayOpenAI",
    "TokenlayInstrumentor",
    "TokenlayOpenAI",
    "TokenlayResponseMetadata",
    "TokenlayRouteError",
    "__version__",
    "configure",
    "get_tokenlay_metadata",
    "metadata",
]


def __getattr__(name: str) -> _Any:
    # configure() pulls in the OpenTelemetry SDK's exporters machinery (~30 ms of
    # imports): load it when first used, not on `import tokenlay_otel`.
    if name == "configure":
        from .exporters import configure

        return configure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
