"""Settings, read once from arguments and environment variables.

Explicit arguments beat environment variables. Keys are kept out of every ``repr``.

Longer than most modules (~410 lines) on purpose: each variable's name, its
documentation and its parser sit together here, and both readers (``Settings`` for
``instrument()``, ``client_route`` for the drop-in clients) use the same ones; split,
a variable's rules would live in two files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ._routing import DEFAULT_SCOPE, RouteScope, parse_scope
from ._urls import check_url_security
from ._wire import normalize_field_name, parse_metadata_env

__all__ = [
    "DEFAULT_PROVIDER_API_BASE",
    "DEFAULT_TOKENLAY_BASE_URL",
    "ENV_ALLOW_HTTP_HOSTS",
    "ENV_CAPTURE_CONTENT",
    "ENV_FAIL_OPEN",
    "ENV_METRIC_ATTRIBUTES",
    "ENV_METRIC_USER_LIMIT",
    "ENV_PRICES_FILE",
    "ENV_PROVIDER_API_BASE",
    "ENV_PROVIDER_API_KEY",
    "ENV_REQUIRE_ROUTE",
    "ENV_ROUTE_ENDPOINTS",
    "ENV_TOKENLAY_BASE_URL",
    "ENV_TOKENLAY_KEY",
    "ENV_TOKENLAY_METADATA",
    "ENV_TOKENLAY_ROUTE",
    "Route",
    "Settings",
    "client_route",
    "parse_bool",
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
#: ``true``: a call that should go through Tokenlay but cannot (no key, a refused URL,
#: an Azure client...) fails with ``TokenlayRouteError`` instead of going direct.
ENV_REQUIRE_ROUTE = "TOKENLAY_REQUIRE_ROUTE"
#: What is routed: ``metered`` (default: chat, completions, embeddings, responses, the
#: model list), ``all``, or API path prefixes (``images,audio/speech``), comma-separated.
ENV_ROUTE_ENDPOINTS = "TOKENLAY_ROUTE_ENDPOINTS"
#: Host names plain ``http://`` may reach besides loopback (a compose network's proxy,
#: a private model server), comma-separated.
ENV_ALLOW_HTTP_HOSTS = "TOKENLAY_ALLOW_HTTP_HOSTS"

DEFAULT_TOKENLAY_BASE_URL = "https://api.tokenlay.com"
DEFAULT_PROVIDER_API_BASE = "https://api.openai.com/v1"

_EMPTY: Mapping[str, str] = MappingProxyType({})
#: Distinct values per metric attribute field: past this, a cap protects nothing.
_MAX_CAP = 1_000_000
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
# A host name (labels of letters, digits, '-' and '_', not at a label's ends) or an IPv6
# literal (it has a colon).
_HOST = re.compile(
    r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*"
    r"|[0-9a-f.]*:[0-9a-f:.]*"
)
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


def _frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


def parse_bool(variable: str, value: str | None, *, default: bool) -> bool:
    """A boolean setting: ``true/false/1/0/yes/no/on/off`` (any case); unset or empty
    is ``default``.

    Raises:
        ValueError: anything else, naming the variable and the accepted words.
    """
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(
        f"{variable} must be one of true/false, 1/0, yes/no, on/off; got {value.strip()!r}"
    )


def _key(variable: str, value: str | None) -> str | None:
    """A key as it will travel in a header: surrounding whitespace (a secret file's
    newline) dropped; ``None`` when empty.

    Raises:
        ValueError: it holds what a header cannot carry; the message never shows it.
    """
    key = (value or "").strip()
    if key and not _VISIBLE_ASCII.fullmatch(key):
        raise ValueError(
            f"{variable} holds characters an HTTP header cannot carry (spaces, control "
            "or non-ASCII characters); check how the key was copied"
        )
    return key or None


def _http_hosts(text: str, problems: list[str]) -> frozenset[str]:
    hosts = set()
    for entry in text.split(","):
        host = entry.strip().lower().removeprefix("[").removesuffix("]")
        if not host:
            continue
        if _HOST.fullmatch(host):
            hosts.add(host)
        else:
            problems.append(
                f"{ENV_ALLOW_HTTP_HOSTS}: {entry.strip()!r} is not a host name; list bare "
                "names such as tokenlay-proxy,my-vllm.internal (no scheme, port or path)"
            )
    return frozenset(hosts)


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
    #: Which requests are routed; the others go to the provider as they are.
    endpoints: RouteScope = DEFAULT_SCOPE
    #: Plain-http hosts allowed for the provider base besides loopback.
    allow_http_hosts: frozenset[str] = frozenset()
    #: A call in scope that cannot be routed fails instead of going direct.
    required: bool = False


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
    require_route: bool = False
    route_endpoints: RouteScope = DEFAULT_SCOPE
    allow_http_hosts: frozenset[str] = frozenset()
    #: Why calls cannot be routed although a key is set (a refused base URL).
    route_refused: str | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, routing: bool = True
    ) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``), strictly.

        Raises:
            ValueError: a variable holds a value that cannot be used; the message names
                every such variable and what to fix.
        """
        settings, problems = cls.read_env(environ, routing=routing)
        if problems:
            raise ValueError("; ".join(problems))
        return settings

    @classmethod
    def read_env(
        cls, environ: Mapping[str, str] | None = None, *, routing: bool = True
    ) -> tuple[Settings, tuple[str, ...]]:
        """Read settings from ``environ``, keeping what is valid.

        A bad value never turns a safety setting off: an unreadable ``TOKENLAY_ROUTE``
        or ``TOKENLAY_REQUIRE_ROUTE`` counts as ``true``, an unreadable
        ``TOKENLAY_FAIL_OPEN`` as ``false``; a bad entry of a list is left out.

        Args:
            environ: the variables to read.
            routing: read (and check) the routing variables; drop-in clients, which
                take their route from their own arguments, pass ``False``.

        Returns:
            The settings, and one message per variable that could not be used, naming
            it and saying what to fix (never a key).
        """
        env = os.environ if environ is None else environ
        problems: list[str] = []

        def flag(variable: str, default: bool, unreadable: bool) -> bool:
            try:
                return parse_bool(variable, env.get(variable), default=default)
            except ValueError as exc:
                problems.append(f"{exc}; using {str(unreadable).lower()}")
                return unreadable

        key, refused = None, None
        if routing:
            try:
                key = _key(ENV_TOKENLAY_KEY, env.get(ENV_TOKENLAY_KEY))
            except ValueError as exc:
                refused = f"{exc}; calls are not routed"
                problems.append(refused)
        base = env.get(ENV_TOKENLAY_BASE_URL) or DEFAULT_TOKENLAY_BASE_URL
        allow_http = _http_hosts(env.get(ENV_ALLOW_HTTP_HOSTS, ""), problems)
        if key:
            try:
                base = check_url_security(
                    base,
                    what=ENV_TOKENLAY_BASE_URL,
                    allow_http_hosts=allow_http,
                    allow_variable=ENV_ALLOW_HTTP_HOSTS,
                    bare=True,
                )
            except ValueError as exc:
                refused = str(exc)
                problems.append(refused)
        capture = env.get(ENV_CAPTURE_CONTENT, "").strip().lower()
        metric_fields: tuple[str, ...] = ("user", "org")
        fields_text = env.get(ENV_METRIC_ATTRIBUTES)
        if fields_text is not None:
            metric_fields = tuple(
                _each(fields_text, normalize_field_name, ENV_METRIC_ATTRIBUTES, problems)
            )
        limit_text = env.get(ENV_METRIC_USER_LIMIT, "").strip() or "1000"
        if not (limit_text.isascii() and limit_text.isdigit() and int(limit_text) <= _MAX_CAP):
            problems.append(
                f"{ENV_METRIC_USER_LIMIT} must be a whole number up to {_MAX_CAP}, "
                f"got {limit_text[:40]!r}; using 1000"
            )
            limit_text = "1000"
        metadata: dict[str, str] = {}
        for entry in env.get(ENV_TOKENLAY_METADATA, "").split(","):
            try:
                metadata.update(parse_metadata_env(entry, source=ENV_TOKENLAY_METADATA))
            except ValueError as exc:
                problems.append(f"{exc} (this entry is left out)")
        scope = DEFAULT_SCOPE
        for entry in env.get(ENV_ROUTE_ENDPOINTS, "").split(","):
            try:
                scope = (*scope, *parse_scope(entry, source=ENV_ROUTE_ENDPOINTS)[1:])
            except ValueError as exc:
                problems.append(f"{exc} (this entry is left out)")
        require = flag(ENV_REQUIRE_ROUTE, False, True) if routing else False
        fail_open = flag(ENV_FAIL_OPEN, False, False)
        if require and fail_open:
            problems.append(
                f"{ENV_FAIL_OPEN}=true is ignored: {ENV_REQUIRE_ROUTE}=true forbids sending "
                "a call past the proxy"
            )
            fail_open = False
        settings = cls(
            tokenlay_key=key,
            tokenlay_base_url=base,
            route=flag(ENV_TOKENLAY_ROUTE, True, True),
            metadata=_frozen(metadata),
            capture_content=capture in ("true", "span_only", "span_and_event"),
            metric_fields=metric_fields,
            metric_value_limit=int(limit_text),
            prices_file=env.get(ENV_PRICES_FILE) or None,
            fail_open=fail_open,
            require_route=require,
            route_endpoints=tuple(dict.fromkeys(scope)),
            allow_http_hosts=allow_http,
            route_refused=refused,
        )
        return settings, tuple(problems)

    def instrumented_route(self) -> Route | None:
        """The route for instrumented ``openai`` clients, or ``None`` when not routing."""
        if not (self.route and self.tokenlay_key) or self.route_refused:
            return None
        return Route(
            tokenlay_key=self.tokenlay_key,
            tokenlay_base_url=self.tokenlay_base_url,
            metadata=self.metadata,
            fail_open=self.fail_open,
            endpoints=self.route_endpoints,
            allow_http_hosts=self.allow_http_hosts,
            required=self.require_route,
        )

    def why_not_routed(self) -> str | None:
        """Why instrumented clients are not routed, or ``None`` when they are."""
        if not self.route:
            return f"{ENV_TOKENLAY_ROUTE} is false"
        if self.route_refused:
            return self.route_refused
        if not self.tokenlay_key:
            return f"{ENV_TOKENLAY_KEY} is not set"
        return None


def _each(text: str, parse: Callable[[str], str], variable: str, problems: list[str]) -> list[str]:
    out = []
    for entry in text.split(","):
        if entry.strip():
            try:
                out.append(parse(entry.strip()))
            except ValueError as exc:
                problems.append(f"{variable}: {exc} (this entry is left out)")
    return out


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
        ValueError: a key is missing, a URL is unsafe or a setting unreadable; the
            message names the argument and the environment variable to set, never a key.
    """
    env = os.environ if environ is None else environ
    tl_key = _key("tokenlay_key" if tokenlay_key else ENV_TOKENLAY_KEY,
                  tokenlay_key or env.get(ENV_TOKENLAY_KEY))  # fmt: skip
    if not tl_key:
        raise ValueError(
            f"no Tokenlay key: pass tokenlay_key=... or set the {ENV_TOKENLAY_KEY} "
            "environment variable"
        )
    provider_key = _key("provider_api_key" if provider_api_key else ENV_PROVIDER_API_KEY,
                        provider_api_key or env.get(ENV_PROVIDER_API_KEY))  # fmt: skip
    if not provider_key:
        raise ValueError(
            "no provider API key: pass provider_api_key=... (or api_key=...) or set the "
            f"{ENV_PROVIDER_API_KEY} environment variable"
        )
    problems: list[str] = []
    allow_http = _http_hosts(env.get(ENV_ALLOW_HTTP_HOSTS, ""), problems)
    if problems:
        raise ValueError(problems[0])
    tl_base = check_url_security(
        tokenlay_base_url or env.get(ENV_TOKENLAY_BASE_URL) or DEFAULT_TOKENLAY_BASE_URL,
        what="tokenlay_base_url" if tokenlay_base_url else ENV_TOKENLAY_BASE_URL,
        allow_http_hosts=allow_http,
        allow_variable=ENV_ALLOW_HTTP_HOSTS,
        bare=True,
    )
    provider_base = check_url_security(
        provider_api_base or env.get(ENV_PROVIDER_API_BASE) or DEFAULT_PROVIDER_API_BASE,
        what="provider_api_base" if provider_api_base else ENV_PROVIDER_API_BASE,
        allow_http_hosts=allow_http,
        allow_variable=ENV_ALLOW_HTTP_HOSTS,
        bare=True,
    )
    defaults = parse_metadata_env(env.get(ENV_TOKENLAY_METADATA, ""), source=ENV_TOKENLAY_METADATA)
    scope = parse_scope(env.get(ENV_ROUTE_ENDPOINTS, ""), source=ENV_ROUTE_ENDPOINTS)
    required = parse_bool(ENV_REQUIRE_ROUTE, env.get(ENV_REQUIRE_ROUTE), default=False)
    if fail_open is None:
        fail_open = parse_bool(ENV_FAIL_OPEN, env.get(ENV_FAIL_OPEN), default=False)
    if required and fail_open:
        raise ValueError(
            f"fail-open ({ENV_FAIL_OPEN} or fail_open=True) cannot be used with "
            f"{ENV_REQUIRE_ROUTE}=true, which forbids sending a call past the proxy"
        )
    return Route(
        tokenlay_key=tl_key,
        tokenlay_base_url=tl_base,
        provider_key=provider_key,
        provider_base=provider_base,
        metadata=_frozen({**defaults, **metadata}),
        strict=True,
        fail_open=fail_open,
        endpoints=scope,
        allow_http_hosts=allow_http,
        required=required,
    )
