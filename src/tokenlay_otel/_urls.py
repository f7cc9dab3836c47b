"""URLs that keys travel to: refused when they would go in clear text, and shown
without the password they may hold."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from urllib.parse import urlsplit

__all__ = ["check_url_security", "display_url"]


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def display_url(url: str | None) -> str:
    """A URL as it may be logged or put in an error: without any user or password."""
    try:
        parts = urlsplit(url or "")
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<a malformed URL>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_url_security(
    url: str,
    *,
    what: str,
    allow_http_hosts: Collection[str] = (),
    allow_variable: str = "",
    bare: bool = False,
) -> str:
    """Refuse URLs over which keys would travel in clear text or that are not HTTP.

    Args:
        url: the URL to check.
        what: how to name it in the error (the argument or env var that set it).
        allow_http_hosts: host names (lower case) plain ``http://`` may reach besides
            loopback, e.g. a proxy inside a compose network or a private model server.
        allow_variable: the setting that lists them, named in the error.
        bare: refuse a query or a fragment too (a base URL that paths are added to).

    Returns:
        The URL without trailing slashes.

    Raises:
        ValueError: not http(s), a bad port, or plain http to a host that is neither
            loopback nor allowed; the message says how to allow it, and shows the URL
            without any password in it.
    """
    shown = display_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise ValueError(f"{what} is not a valid URL ({exc}): {shown!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL, got {shown!r}")
    if bare and ("?" in url or "#" in url):  # an empty query or fragment counts too
        raise ValueError(f"{what} must not have a query or a fragment: {shown!r}")
    host = parts.hostname.lower()
    if scheme == "http" and not _is_loopback(host) and host not in allow_http_hosts:
        how = f", or name the host in {allow_variable}={host}" if allow_variable else ""
        raise ValueError(
            f"{what} is plain http:// to {host!r}; keys would travel in clear text. "
            "Use https://, http:// to a loopback address (127.0.0.1, ::1, localhost)"
            f"{how} if the network to it is trusted"
        )
    return url.rstrip("/")
