"""Upstream sockets that go only where the allow-list permits (the SSRF seam).

The host is resolved here, once; the socket is opened to a checked address, never to
the name, so no second lookup can answer differently (DNS rebinding).
"""

from __future__ import annotations

import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore2
import httpx2

from .providers import AllowList, Resolver, ip_literal

__all__ = ["ReadableStream", "refused_by_policy", "upstream_transport"]


class _PolicyRefusal(httpcore2.ConnectError):
    """The allow-list refused every address; httpx2 surfaces it as ``httpx2.ConnectError``."""


def refused_by_policy(exc: BaseException) -> str | None:
    """The reason if ``exc`` (or its ``__cause__``/``__context__`` chain) is an allow-list
    refusal by :func:`upstream_transport`, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _PolicyRefusal):
            return str(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


#: The largest request head held back to go out with its body.
_MAX_HELD = 64 * 1024


class ReadableStream(httpcore2.AsyncNetworkStream):
    """A network stream that tells ``is_readable`` with one ``poll`` on a socket found once.

    httpcore2's pool asks every idle connection ``is_readable`` (did the server hang
    up?) each time it hands out or takes back a connection; the AnyIO stream answers by
    building its attribute table anew to find the socket, then a new poll object. That
    was 12% of the proxy's CPU under load with 16 connections (py-spy); this answers
    the same question for a few microseconds.

    It also sends a request's head with the first piece of its body, in one write:
    httpcore2 writes them apart (and an empty one after a sized body), each a system
    call and a wake-up of the provider's side. A head waits here only until the next
    write or read on the connection, so nothing is ever held past the request.
    """

    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        self._head = b""  # a request's head, not sent yet
        self._fresh = True  # no write since the last read: the next one is a head
        self._poll: Any = None
        sock = inner.get_extra_info("socket")
        if sock is not None and hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._head:
            head, self._head = self._head, b""
            await self._inner.write(head, timeout)
        self._fresh = True
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._fresh and buffer.endswith(b"\r\n\r\n") and len(buffer) <= _MAX_HELD:
            self._fresh, self._head = False, buffer
            return
        self._fresh = False
        if self._head:
            buffer, self._head = self._head + buffer, b""
        if buffer:
            await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        self._poll = None
        self._head = b""
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        return ReadableStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._poll is not None:
            return bool(self._poll.poll(0))
        return self._inner.get_extra_info(info)


class _CheckedBackend(httpcore2.AsyncNetworkBackend):
    """Resolves each host itself and hands the inner backend an allowed IP, never the
    name, so no second lookup can answer differently (DNS rebinding). httpcore2 does
    TLS afterwards with ``server_hostname`` = the origin's name (connection.py,
    ``_connect``), so SNI and the certificate check still use the name."""

    def __init__(
        self, allow: AllowList, resolver: Resolver, inner: httpcore2.AsyncNetworkBackend
    ) -> None:
        self._allow = allow
        self._resolver = resolver
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        # One deadline for the lookup and every attempt, as httpcore2 means by "connect".
        try:
            with anyio.fail_after(timeout):
                addresses = await self._allowed_addresses(host, port)
                return await self._connect_first(addresses, port, local_address, socket_options)
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc

    async def _allowed_addresses(self, host: str, port: int) -> list[str]:
        literal = ip_literal(host.removeprefix("[").removesuffix("]"))
        if literal is not None:
            resolved = [str(literal)]
        else:
            try:
                resolved = list(dict.fromkeys(await self._resolver(host, port)))
            except OSError as exc:
                raise httpcore2.ConnectError(f"could not resolve {host}: {exc}") from exc
            if not resolved:
                raise httpcore2.ConnectError(f"{host} resolved to no address")
        allowed = [a for a in resolved if self._allow.address_allowed(host, port, a)]
        if allowed:
            return allowed
        if not self._allow.names(host, port):
            raise _PolicyRefusal(f"the host {host}:{port} is not on the proxy's allow-list")
        shown = ", ".join(resolved[:4]) + (", ..." if len(resolved) > 4 else "")
        raise _PolicyRefusal(
            f"the provider host {host} resolves only to non-public addresses ({shown})"
        )

    async def _connect_first(
        self,
        addresses: list[str],
        port: int,
        local_address: str | None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None,
    ) -> httpcore2.AsyncNetworkStream:
        options = list(socket_options or ())
        for address in addresses[:-1]:
            try:
                return ReadableStream(
                    await self._inner.connect_tcp(
                        address, port, local_address=local_address, socket_options=options
                    )
                )
            except httpcore2.ConnectError:
                continue
        return ReadableStream(
            await self._inner.connect_tcp(
                addresses[-1], port, local_address=local_address, socket_options=options
            )
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise _PolicyRefusal("unix sockets are never provider connections")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def upstream_transport(
    allow: AllowList,
    *,
    resolver: Resolver | None = None,
    network_backend: httpcore2.AsyncNetworkBackend | None = None,
    verify: ssl.SSLContext | bool = True,
    limits: httpx2.Limits | None = None,
    http2: bool = False,
    retries: int = 0,
) -> httpx2.AsyncBaseTransport:
    """An ``httpx2`` transport whose every connection goes to an address ``allow`` permits.

    Args:
        allow: the allow-list; hosts it does not name are refused here too.
        resolver: ``(host, port) -> [ip, ...]``; default ``anyio.getaddrinfo``.
        network_backend: opens the sockets to the checked IPs; default httpcore2's.
        verify: as ``httpx2.AsyncHTTPTransport``'s (an ``ssl.SSLContext`` or bool).
        limits: connection limits; default 1,000 connections, 100 kept alive.
        http2: allow HTTP/2. retries: connect retries.

    Returns:
        The transport. Pass it as ``httpx2.AsyncClient(transport=...)``: a client with an
        explicit transport ignores ``HTTP(S)_PROXY``, which would bypass the check.
    """
    # Callers share the pool: a small one lets a few slow readers hold everyone's turn.
    limits = limits or httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
    ssl_context = httpx2.create_ssl_context(verify=verify, trust_env=False)
    transport = httpx2.AsyncHTTPTransport(
        verify=ssl_context, trust_env=False, http2=http2, limits=limits, retries=retries
    )
    backend = _CheckedBackend(
        allow, resolver or _getaddrinfo, network_backend or httpcore2.AnyIOBackend()
    )
    if not hasattr(httpcore2.AsyncConnectionPool, "_assign_requests_to_connections"):
        raise RuntimeError("httpcore2's pool has no _assign_requests_to_connections; update _Pool")
    pool = _Pool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http2=http2,
        retries=retries,
        network_backend=backend,
    )
    return _with_pool(transport, pool)


class _Pool(httpcore2.AsyncConnectionPool):
    """httpcore2's pool, which never hands out a connection holding unread bytes, and
    takes no cancellation shield per request for no connection.

    An upstream that sends anything after the end of an answer, in the same read, has
    those bytes kept by h11 as the start of the connection's next answer: the next
    call on that connection, anyone's, would be answered with them (and its own answer
    left on the wire for the call after). So an idle connection whose parser holds
    bytes is closed before requests are given connections. httpcore2 has no public
    hook for it; :func:`upstream_transport` fails loudly if the method is renamed.

    The pool calls ``_close_connections`` twice per request, nearly always with none
    to close; its AnyIO shield was ~3% of the proxy's CPU under load (py-spy). If
    httpcore2 renames the method, this is a no-op and the pool works as before."""

    def _assign_requests_to_connections(self) -> list[httpcore2.AsyncConnectionInterface]:
        tainted = [c for c in self._connections if c.is_idle() and _holds_unread(c)]
        for connection in tainted:
            self._connections.remove(connection)
        return [*tainted, *super()._assign_requests_to_connections()]

    async def _close_connections(self, closing: list[httpcore2.AsyncConnectionInterface]) -> None:
        if closing:
            await super()._close_connections(closing)


def _holds_unread(connection: httpcore2.AsyncConnectionInterface) -> bool:
    """Whether an HTTP/1.1 connection's parser holds bytes past its last answer."""
    state = getattr(getattr(connection, "_connection", None), "_h11_state", None)
    trailing = getattr(state, "trailing_data", None)
    return bool(trailing and trailing[0])


def _with_pool(
    transport: httpx2.AsyncHTTPTransport, pool: httpcore2.AsyncConnectionPool
) -> httpx2.AsyncHTTPTransport:
    # httpx2's transport takes no network_backend. Swapping its private pool keeps its
    # request building and its exception mapping for requests and streamed bodies
    # (~60 lines and a 14-entry map we would otherwise copy). If httpx2 renames the
    # attribute, fail loudly: a silent no-op would leave connections unchecked.
    if not isinstance(getattr(transport, "_pool", None), httpcore2.AsyncConnectionPool):
        raise RuntimeError("httpx2.AsyncHTTPTransport has no _pool to replace; update _with_pool")
    transport._pool = pool
    return transport
