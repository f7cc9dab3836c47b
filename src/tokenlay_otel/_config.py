"""Settings, read once from arguments and environment variables.

Explicit arguments beat environment variables. Keys are kept out of every ``repr``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ._protocol import check_url_security, normalize_field_name, parse_metadata_env

__all__ = [
    "DEFAULT_PROVIDER_API_BASE",
    "DEFAULT_TOKENLAY_BASE_URL",
    "ENV_CAPTURE_CONTENT",
    "ENV_FAIL_OPEN",
    "ENV_METRIC_ATTRIBUTES",
    "ENV_METRIC_USER_LIMIT",
    "ENV_PRICES_FILE",
    "ENV_PROVIDER_API_BASE",
    "ENV_PROVIDER_API_KEY",
    "ENV_TOKENLAY_BASE_URL",
    "ENV_TOKENLAY_KEY",
    "ENV_TOKENLAY_METADATA",
    "ENV_TOKENLAY_ROUTE",
    "Route",
    "Settings",
    "client_route",
]

#: Provider API key (OpenAI, Mistral, ...) used by the drop-in clients.
ENV_PROVIDER_API_KEY = "PROVIDER_API_KEY"
#: Provider base URL, default ``https://api.openai.com/v1``.
ENV_PROVIDER_API_BASE = "PROVIDER_API_BASE"
#: Tokenlay key; with it set, instrumented ``openai`` clients are routed through Tokenlay.
ENV_TOKENLAY_KEY = "TOKENLAY_KEY"
#: Tokenlay proxy base URL, default ``https://api.tokenlay.com``.
ENV_TOKENLAY_BASE_URL = "TOKENLAY_BASE_URL"
#: Default attribution for every call, ``user=u1,org=o1``.
ENV_TOKENLAY_METADATA = "TOKENLAY_METADATA"
#: ``false`` turns routing off for instrumented clients (telemetry stays on).
ENV_TOKENLAY_ROUTE = "TOKENLAY_ROUTE"
#: OpenTelemetry's switch for recording prompts and completions (default off).
ENV_CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: Metadata fields that become metric attributes, default ``user,org``.
ENV_METRIC_ATTRIBUTES = "TOKENLAY_METRIC_ATTRIBUTES"
#: Distinct values per metric attribute field per process before ``_other``; 1000.
ENV_METRIC_USER_LIMIT = "TOKENLAY_METRIC_USER_LIMIT"
#: JSON or YAML file of price overrides/additions (USD per 1M tokens).
ENV_PRICES_FILE = "TOKENLAY_PRICES_FILE"
#: ``true``: when the proxy cannot be reached (connection error, timeout), send the call
#: straight to the provider and mark it ``tokenlay.proxy.bypassed``. Default off.
ENV_FAIL_OPEN = "TOKENLAY_FAIL_OPEN"

DEFAULT_TOKENLAY_BASE_URL = "https://api.tokenlay.com"
DEFAULT_PROVIDER_API_BASE = "https://api.openai.com/v1"

_EMPTY: Mapping[str, str] = MappingProxyType({})


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class Route:
    """Where one client's calls go and what they carry.

    ``provider_key``/``provider_base`` are ``None`` for instrumented ``openai`` clients:
    they are then read from the client at call time.
    """

    tokenlay_key: str = field(repr=False)
    tokenlay_base_url: str
    provider_key: str | None = field(default=None, repr=False)
    provider_base: str | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    #: Raise on bad per-request metadata (drop-in clients) instead of dropping it.
    strict: bool = False
    #: Go straight to the provider when the proxy cannot be reached.
    fail_open: bool = False


def _truthy(value: str | None, *, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class Settings:
    """Process-wide settings of the instrumentor, read once by ``instrument()``."""

    tokenlay_key: str | None = field(default=None, repr=False)
    tokenlay_base_url: str = DEFAULT_TOKENLAY_BASE_URL
    route: bool = True
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    capture_content: bool = False
    metric_fields: tuple[str, ...] = ("user", "org")
    metric_value_limit: int = 1000
    prices_file: str | None = None
    fail_open: bool = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, routing: bool = True
    ) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``).

        Args:
            environ: the variables to read.
            routing: read (and check) the routing variables; drop-in clients, which
                take their route from their own arguments, pass ``False``.

        Raises:
            ValueError: a variable holds a value that cannot be used, naming it.
        """
        env = os.environ if environ is None else environ
        key = (env.get(ENV_TOKENLAY_KEY) or None) if routing else None
        base = env.get(ENV_TOKENLAY_BASE_URL) or DEFAULT_TOKENLAY_BASE_URL
        if key:
            base = check_url_security(base, what=ENV_TOKENLAY_BASE_URL)
        capture = env.get(ENV_CAPTURE_CONTENT, "").strip().lower()
        fields_text = env.get(ENV_METRIC_ATTRIBUTES)
        metric_fields: tuple[str, ...] = ("user", "org")
        if fields_text is not None:
            try:
                metric_fields = tuple(
                    normalize_field_name(f.strip()) for f in fields_text.split(",") if f.strip()
                )
            except ValueError as exc:
                raise ValueError(f"{ENV_METRIC_ATTRIBUTES}: {exc}") from None
        limit_text = env.get(ENV_METRIC_USER_LIMIT, "").strip() or "1000"
        if not limit_text.isdigit():
            raise ValueError(f"{ENV_METRIC_USER_LIMIT} must be a whole number, got {limit_text!r}")
        return cls(
            tokenlay_key=key,
            tokenlay_base_url=base,
            route=_truthy(env.get(ENV_TOKENLAY_ROUTE), default=True),
            metadata=_frozen(
                parse_metadata_env(env.get(ENV_TOKENLAY_METADATA, ""), source=ENV_TOKENLAY_METADATA)
            ),
            capture_content=capture in ("true", "span_only", "span_and_event"),
            metric_fields=metric_fields,
            metric_value_limit=int(limit_text),
            prices_file=env.get(ENV_PRICES_FILE) or None,
            fail_open=_truthy(env.get(ENV_FAIL_OPEN), default=False),
        )

    def instrumented_route(self) -> Route | None:
        """The route for instrumented ``openai`` clients, or ``None`` when not routing."""
        if not (self.route and self.tokenlay_key):
            return None
        return Route(
            tokenlay_key=self.tokenlay_key,
            tokenlay_base_url=self.tokenlay_base_url,
            metadata=self.metadata,
            fail_open=self.fail_open,
        )


def client_route(
    *,
    provider_api_key: str | None,
    provider_api_base: str | None,
    tokenlay_key: str | None,
    tokenlay_base_url: str | None,
    metadata: Mapping[str, str],
    fail_open: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> Route:
    """Resolve a drop-in client's route from its arguments, then the environment.

    ``metadata`` is the client's own, already validated; ``TOKENLAY_METADATA`` is
    merged beneath it.

    Raises:
        ValueError: a key is missing or a URL is unsafe; the message names the
            argument and the environment variable to set, never a key.
    """
    env = os.environ if environ is None else environ
    tl_key = tokenlay_key or env.get(ENV_TOKENLAY_KEY)
    if not tl_key:
        raise ValueError(
            f"no Tokenlay key: pass tokenlay_key=... or set the {ENV_TOKENLAY_KEY} "
            "environment variable"
        )
    provider_key = provider_api_key or env.get(ENV_PROVIDER_API_KEY)
    if not provider_key:
        raise ValueError(
            "no provider API key: pass provider_api_key=... (or api_key=...) or set the "
            f"{ENV_PROVIDER_API_KEY} environment variable"
        )
    tl_base = check_url_security(
        tokenlay_base_url or env.get(ENV_TOKENLAY_BASE_URL) or DEFAULT_TOKENLAY_BASE_URL,
        what="tokenlay_base_url" if tokenlay_base_url else ENV_TOKENLAY_BASE_URL,
    )
    provider_base = check_url_security(
        provider_api_base or env.get(ENV_PROVIDER_API_BASE) or DEFAULT_PROVIDER_API_BASE,
        what="provider_api_base" if provider_api_base else ENV_PROVIDER_API_BASE,
    )
    defaults = parse_metadata_env(env.get(ENV_TOKENLAY_METADATA, ""), source=ENV_TOKENLAY_METADATA)
    return Route(
        tokenlay_key=tl_key,
        tokenlay_base_url=tl_base,
        provider_key=provider_key,
        provider_base=provider_base,
        metadata=_frozen({**defaults, **metadata}),
        strict=True,
        fail_open=(
            _truthy(env.get(ENV_FAIL_OPEN), default=False) if fail_open is None else fail_open
        ),
    )
