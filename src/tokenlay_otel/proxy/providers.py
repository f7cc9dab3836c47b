"""Where the proxy may connect: the provider allow-list (pure).

The caller names the provider with ``x-tokenlay-provider-base``; :meth:`AllowList.check_base`
validates that text and matches it against the allow-list, and
:func:`~.connect.upstream_transport` makes sure the socket behind it goes only to an
address the list permits (:meth:`AllowList.address_allowed`).

Pattern syntax (``--allow-provider PATTERN``, repeatable)::

    [scheme://]host[:port][/path-prefix]

- ``scheme`` is ``https`` (the default) or ``http``; an ``http://`` pattern matches only
  ``http`` bases and an ``https://`` pattern only ``https`` bases.
- ``host`` is a host name, an IPv4 address or a bracketed IPv6 address. ``*.example.com``
  matches any subdomain of ``example.com`` but not ``example.com`` itself; ``*`` alone, or
  anywhere else, is refused.
- Without ``:port`` only the scheme's default port (443 or 80) matches.
- With ``/path-prefix`` the base's path must equal it or continue it after a ``/``.

Address rule: a resolved address is used only when it is globally routable (no loopback,
private, link-local such as 169.254.169.254, CGNAT, multicast, documentation or reserved
ranges, also when embedded in IPv6 as IPv4-mapped, 6to4 or NAT64). The one exception is a
pattern the operator gave explicitly for one exact host (no ``*``), such as
``http://10.0.0.5:8000`` or ``http://my-vllm.internal:8000``: it may reach any address.
The built-in :data:`DEFAULT_PROVIDERS` and wildcard patterns reach global addresses only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PROVIDERS",
    "AllowList",
    "ProviderError",
    "Resolver",
    "ip_literal",
]

Resolver = Callable[[str, int], Awaitable[list[str]]]

# Hosts from genai-prices' provider api_patterns plus the brief's list. Left out on
# purpose: hosts where anyone can deploy an app (*.modal.run, *.azure-api.net,
# *.amazonaws.com); an operator adds theirs with --allow-provider.
DEFAULT_PROVIDERS: tuple[str, ...] = (
    "https://api.openai.com",
    "https://*.openai.azure.com",
    "https://*.cognitiveservices.azure.com",
    "https://*.services.ai.azure.com",
    "https://api.anthropic.com",
    "https://api.mistral.ai",
    "https://codestral.mistral.ai",
    "https://api.groq.com",
    "https://api.together.xyz",
    "https://api.together.ai",
    "https://api.deepseek.com",
    "https://api.fireworks.ai",
    "https://openrouter.ai",
    "https://generativelanguage.googleapis.com",
    "https://aiplatform.googleapis.com",
    "https://api.x.ai",
    "https://api.perplexity.ai",
    "https://api.cohere.com",
    "https://api.cohere.ai",
    "https://api.cerebras.ai",
    "https://api.sambanova.ai",
    "https://api.deepinfra.com",
    "https://api.arcee.ai",
    "https://api.avian.io",
    "https://inference.baseten.co",
    "https://api.cloudflare.com/client/v4/accounts",
    "https://gateway.ai.cloudflare.com",
    "https://*.cloud.databricks.com",
    "https://*.azuredatabricks.net",
    "https://*.gcp.databricks.com",
    "https://api.doubleword.ai",
    "https://api.elevenlabs.io",
    "https://api.githubcopilot.com",
    "https://router.huggingface.co",
    "https://api.llama.com",
    "https://api.meta.ai",
    "https://api.minimax.io",
    "https://api.minimaxi.com",
    "https://api.moonshot.ai",
    "https://api.moonshot.cn",
    "https://api.novita.ai",
    "https://oai.endpoints.kepler.ai.cloud.ovh.net",
    "https://api.quicksilverpro.io",
    "https://api.typesafe.ai",
    "https://api.voyageai.com",
    "https://api.z.ai",
    "https://open.bigmodel.cn",
)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_LENGTH = 2048
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# WHATWG URL parsing reads a host whose last label is a number as an IPv4 address
# (2130706433, 0x7f.1, 127.1); refuse those unless they are plain dotted quads.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_BAD_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class ProviderError(ValueError):
    """A provider base the proxy refuses: ``status`` 400 (malformed) or 403 (not allowed)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class _Url:
    scheme: str
    host: str  # lower-case name, or an IP address in its canonical form (no brackets)
    port: int
    path: str  # "" or "/a/b", no trailing slash
    wildcard: bool = False

    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True)
class _Pattern:
    url: _Url
    explicit: bool

    def matches_host(self, host: str, port: int) -> bool:
        if port != self.url.port:
            return False
        if self.url.wildcard:
            return host.endswith("." + self.url.host) and ip_literal(host) is None
        return host == self.url.host

    def matches(self, url: _Url) -> bool:
        prefix = self.url.path
        return (
            url.scheme == self.url.scheme
            and self.matches_host(url.host, url.port)
            and (url.path == prefix or url.path.startswith(prefix + "/"))
        )


@dataclass(frozen=True)
class AllowList:
    """The provider patterns the proxy may forward to; build it with :meth:`build`."""

    patterns: tuple[_Pattern, ...]

    @classmethod
    def build(cls, extra: Sequence[str] = (), *, defaults: bool = True) -> AllowList:
        """The defaults (unless ``defaults=False``) plus the operator's ``extra`` patterns.

        Raises:
            ValueError: a pattern is malformed; the message names it and the problem.
        """
        chosen = DEFAULT_PROVIDERS if defaults else ()
        built = [_Pattern(_parse(text, pattern=True), explicit=False) for text in chosen]
        for text in extra:
            try:
                built.append(_Pattern(_parse(text, pattern=True), explicit=True))
            except ValueError as exc:
                raise ValueError(f"provider pattern {text!r} {exc}") from None
        return cls(tuple(built))

    def check_base(self, base: str) -> str:
        """Validate a caller's provider base URL.

        Returns:
            The normalized base: lower-case scheme and host, no default port, no
            trailing slash.

        Raises:
            ProviderError: 400 when the base is malformed, 403 when no pattern allows it.
        """
        try:
            url = _parse(base, pattern=False)
        except ValueError as exc:
            raise ProviderError(400, "invalid_provider_base", f"provider base {exc}") from None
        if not any(p.matches(url) for p in self.patterns):
            origin = f"{url.scheme}://{url.netloc()}"
            raise ProviderError(
                403,
                "provider_not_allowed",
                f"provider base host {url.netloc()} is not on the proxy's allow-list for "
                f"{url.scheme}; start the proxy with --allow-provider {origin} to allow it",
            )
        return f"{url.scheme}://{url.netloc()}{url.path}"

    def address_allowed(self, host: str, port: int, address: str) -> bool:
        """May a connection for ``host:port`` (a base that passed :meth:`check_base`) go
        to the resolved IP ``address``? False as well when no pattern names ``host:port``.
        """
        matching = self._matching(host, port)
        ip = ip_literal(address)
        if not matching or ip is None:
            return False
        return _is_public(ip) or any(p.explicit and not p.url.wildcard for p in matching)

    def names(self, host: str, port: int) -> bool:
        """Whether any pattern names this host and port."""
        return bool(self._matching(host, port))

    def _matching(self, host: str, port: int) -> list[_Pattern]:
        host = host.lower().removeprefix("[").removesuffix("]")
        literal = ip_literal(host)
        name = host if literal is None else str(literal)
        return [p for p in self.patterns if p.matches_host(name, port)]


def ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, or None when it is a name."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address can carry an IPv4 one that the network stack or a translator
        # delivers to: judge that one too.
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None
        embedded = (ip.ipv4_mapped, ip.sixtofour, nat64)
        return all(_is_public(v4) for v4 in embedded if v4 is not None)
    return True


def _parse(text: str, *, pattern: bool) -> _Url:
    """Parse a base URL (or a pattern); ValueError's message completes "provider base ..."."""
    _check_characters(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if not pattern:
            raise ValueError("must start with https:// or http://")
        scheme, rest = "https", text
    scheme = scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"has scheme {scheme!r}; only https and http are allowed")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        raise ValueError("has user info ('user:password@'); send credentials in headers")
    host, wildcard, port = _host_port(netloc, scheme, pattern=pattern)
    return _Url(scheme, host, port, _path(slash + path), wildcard)


def _check_characters(text: str) -> None:
    if len(text) > _MAX_LENGTH:
        raise ValueError(f"is longer than {_MAX_LENGTH} characters")
    if not text:
        raise ValueError("is empty")
    bad = next((c for c in text if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"contains {bad!r}; only printable ASCII without spaces is allowed")
    for char, problem in (("\\", "a backslash"), ("?", "a query"), ("#", "a fragment")):
        # Checked on the raw text: urlsplit drops an empty '?' or '#'.
        if char in text:
            raise ValueError(f"has {problem} ({char!r}); it must be a plain scheme://host/path")


def _host_port(netloc: str, scheme: str, *, pattern: bool) -> tuple[str, bool, int]:
    if netloc.startswith("["):
        raw_host, bracket, after = netloc[1:].partition("]")
        if not bracket:
            raise ValueError("has an unclosed '[' in the host")
        host, wildcard = _ipv6_host(raw_host), False
    else:
        raw_host, colon, port_text = netloc.partition(":")
        after = colon + port_text
        host, wildcard = _name_host(raw_host.lower(), pattern=pattern)
    if not after:
        return host, wildcard, _DEFAULT_PORTS[scheme]
    if not after.startswith(":"):
        raise ValueError(f"has {after!r} after the host")
    port_text = after[1:]
    # Bounded before int(): today's 99999 fails only deep inside the socket layer.
    if not (port_text.isdigit() and len(port_text) <= 5 and 1 <= int(port_text) <= 65535):
        raise ValueError(f"has port {port_text!r}; a port is a number from 1 to 65535")
    return host, wildcard, int(port_text)


def _ipv6_host(raw: str) -> str:
    # A zone id ("%eth0") names a local interface: never a provider.
    ip = None if "%" in raw else ip_literal(raw)
    if not isinstance(ip, ipaddress.IPv6Address):
        raise ValueError(f"has host [{raw}], which is not an IPv6 address")
    return str(ip)


def _name_host(host: str, *, pattern: bool) -> tuple[str, bool]:
    wildcard = pattern and host.startswith("*.")
    name = host[2:] if wildcard else host
    if host == "*":
        raise ValueError("is '*' alone; name the hosts, for example *.example.com")
    if "*" in name:
        where = "a pattern's first label ('*.')" if pattern else "a pattern, not a base"
        raise ValueError(f"has host {host!r}; '*' may only be {where}")
    if not name:
        raise ValueError("has no host")
    if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        if wildcard or not isinstance(ip_literal(name), ipaddress.IPv4Address):
            raise ValueError(f"has host {host!r}, which is not a dotted-quad IPv4 address")
        return str(ip_literal(name)), False
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"has host {host!r}, which is not a valid host name (no trailing dot)")
    return name, wildcard


def _path(raw: str) -> str:
    path = raw.rstrip("/")
    lowered = path.lower()
    for escape, char in (("%2e", "."), ("%2f", "/"), ("%5c", "\\")):
        if escape in lowered:
            raise ValueError(f"has {escape!r} in the path; encoded {char!r} is not allowed")
    if _BAD_ESCAPE.search(path):
        raise ValueError("has a '%' in the path that is not a %XX escape")
    if any(segment in ("", ".", "..") for segment in path.split("/")[1:]):
        raise ValueError("has an empty, '.' or '..' segment in the path")
    return path
