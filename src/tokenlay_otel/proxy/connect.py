"""Provider connections that go only where the allow-list permits (the SSRF seam), and
the pool that keeps them.

The host is resolved here, once; the socket is opened to a checked address, never to
the name, so no second lookup can answer differently (DNS rebinding). TLS then uses
the name (SNI and the certificate check), as a client connecting by name would.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .h1 import Answer, Connection, ConnectTimedOut, Lost, NotSent, request_head
from .providers import AllowList, Resolver, ip_literal

__all__ = ["Opener", "PolicyRefusal", "UpstreamClient", "refused_by_policy"]

#: ``(protocol_factory, address, port, ssl_context, server_hostname) -> (transport,
#: protocol)``: opens a socket to one checked address (``loop.create_connection``).
Opener = Callable[
    [Callable[[], asyncio.Protocol], str, int, "ssl.SSLContext | None", "str | None"],
    Awaitable[tuple[asyncio.BaseTransport, asyncio.Protocol]],
]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_ORIGINS = 1024


class PolicyRefusal(NotSent):
    """The allow-list refused every address of a host, or the host itself."""


def refused_by_policy(exc: BaseException) -> str | None:
    """The reason if ``exc`` is an allow-list refusal, else None. (The client raises it
    itself: no other library's error wraps it any more.)"""
    return str(exc) if isinstance(exc, PolicyRefusal) else None


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def _create_connection(
    factory: Callable[[], asyncio.Protocol],
    address: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
    loop = asyncio.get_running_loop()
    return await loop.create_connection(
        factory, address, port, ssl=ssl_context, server_hostname=server_hostname
    )


def _ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:  # the bundle openai's own client trusts (httpx and httpx2 both use certifi)
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str  # no brackets
    port: int
    host_header: str


def _origin(text: str) -> _Origin:
    """``scheme://netloc`` as the proxy checked it (:meth:`AllowList.check_base`)."""
    scheme, sep, netloc = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise NotSent(f"the scheme of {text[:60]!r} is not http or https")
    if not netloc or "@" in netloc:
        raise NotSent("the provider address has no host, or has user information")
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
    else:
        host, _, port_text = netloc.partition(":")
        rest = ":" + port_text if port_text else ""
    port = _DEFAULT_PORTS[scheme]
    if rest:
        digits = rest.removeprefix(":")
        if not (digits.isdigit() and len(digits) <= 5 and 0 < int(digits) < 65536):
            raise NotSent(f"the provider address has port {digits[:8]!r}")
        port = int(digits)
    return _Origin(scheme, host.lower(), port, netloc)


class UpstreamClient:
    """HTTP/1.1 to the providers the allow-list permits, over kept-alive connections.

    Args:
        allow: the allow-list; hosts it does not name are refused here too.
        resolver: ``(host, port) -> [ip, ...]``; default the event loop's getaddrinfo.
        opener: opens a socket to one checked address (tests redirect it); default
            ``loop.create_connection``.
        verify: an ``ssl.SSLContext``, or whether to check certificates (certifi's
            bundle when installed, as openai's client).
        timeout: seconds for each step: connecting (lookup, TCP, TLS), waiting for a
            free connection, each write, and each wait for the answer's next bytes.
        max_connections: open connections at most (callers share them: a small cap
            lets a few slow readers hold everyone's turn). max_idle: kept open while
            unused, at most; ``idle_expiry``: seconds an unused one is trusted.
    """

    def __init__(
        self,
        allow: AllowList,
        *,
        resolver: Resolver | None = None,
        opener: Opener | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout: float = 600.0,
        max_connections: int = 1000,
        max_idle: int = 100,
        idle_expiry: float = 5.0,
    ) -> None:
        self._allow = allow
        self._resolver = resolver or _getaddrinfo
        self._opener = opener or _create_connection
        self._ssl = _ssl_context(verify)
        self.timeout = timeout
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, list[Connection]] = {}
        self._idle_count = 0
        self._open: set[Connection] = set()
        self._connecting = 0  # connections being opened: they count against the bound
        self._slot_waiters: deque[asyncio.Future[bool]] = deque()
        self._closed = False

    async def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> Answer:
        """Send a request; its answer once the status and headers came.

        A sized body goes out with the head in one write; a streamed one (an async
        iterator) goes chunked unless ``headers`` give its ``content-length``.

        Raises:
            NotSent: nothing reached the provider (no connection, refused, no free
                connection in time, a request HTTP cannot carry).
            Lost: the request went out; no whole head came back in time.
            Anything the body's iterator raises, after closing the connection.
        """
        origin, target = self._split(url)
        if body is None:
            framing = None
        elif isinstance(body, bytes):
            framing = f"content-length: {len(body)}"
        else:
            framing = None if "content-length" in headers else "transfer-encoding: chunked"
        head = request_head(method, target, origin.host_header, headers, framing)
        connection = await self._acquire(origin)
        answer = Answer(connection, self.timeout, self._release)
        connection.begin(answer)
        sent = False
        try:
            if body is None:
                connection.write(head)
            elif isinstance(body, bytes):
                connection.write(head + body)
                await connection.drain(self.timeout)
            else:
                await self._upload(connection, head, body, chunked=framing is not None)
            sent = True
            await answer.wait_head()
        except BaseException as exc:
            if isinstance(exc, Lost) and answer.status:
                # Answered before the provider took the whole request (an early 413),
                # then it closed or stopped reading: that answer is the one to relay,
                # as HTTP clients do; its connection still owes a body, so it closes.
                answer.to_close = True
                return answer
            if not sent:
                # A request cut short, even one already answered (an early refusal),
                # leaves the provider reading its body: the next request on this
                # connection would be read as the rest of it.
                connection.close()
            await answer.aclose()
            raise
        return answer

    async def _upload(
        self, connection: Connection, head: bytes, body: AsyncIterator[bytes], *, chunked: bool
    ) -> None:
        pending = head  # the head leaves with the first piece of the body, in one write
        async for chunk in body:
            if not chunk:
                continue
            piece = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
            connection.write(pending + piece)
            pending = b""
            await connection.drain(self.timeout)
        connection.write(pending + (b"0\r\n\r\n" if chunked else b""))
        await connection.drain(self.timeout)

    def _split(self, url: str) -> tuple[_Origin, str]:
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3) if scheme_end >= 0 else -1
        if path_start < 0:
            path_start = len(url)
        prefix = url[:path_start]
        origin = self._origins.get(prefix)
        if origin is None:
            origin = _origin(prefix)
            if len(self._origins) < _MAX_ORIGINS:
                self._origins[prefix] = origin
        return origin, url[path_start:] or "/"

    # --- the pool --------------------------------------------------------------------

    async def _acquire(self, origin: _Origin) -> Connection:
        loop = asyncio.get_running_loop()
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if not idle:
                del self._idle[origin]  # one entry per origin in use, not per origin ever
            if connection.usable and loop.time() - connection.idle_since < self._idle_expiry:
                return connection
            connection.close()
        if self._closed:
            raise NotSent("the proxy is shutting down")
        deadline = loop.time() + self.timeout
        while len(self._open) + self._connecting >= self._max_connections:
            if self._close_oldest_idle():
                continue
            waiter = loop.create_future()
            self._slot_waiters.append(waiter)
            timer = loop.call_later(max(0.0, deadline - loop.time()), _give_up, waiter)
            try:
                freed = await waiter
            finally:
                timer.cancel()
            if not freed:
                raise NotSent(f"no free provider connection within {self.timeout:g} s")
            idle = self._idle.get(origin)
            if idle:
                return await self._acquire(origin)
        self._connecting += 1
        try:
            return await self._connect(origin)
        except BaseException:
            self._wake_one()  # the slot it held is free again
            raise
        finally:
            self._connecting -= 1

    def _release(self, connection: Connection, keep: bool) -> None:
        if keep and not self._closed and self._idle_count < self._max_idle:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(connection.key, []).append(connection)
            self._idle_count += 1
        elif keep:
            connection.close()
        self._wake_one()

    def _lost(self, connection: Connection) -> None:
        self._open.discard(connection)
        if connection.idle_since:
            idle = self._idle.get(connection.key)
            if idle and connection in idle:
                idle.remove(connection)
                self._idle_count -= 1
                if not idle:
                    del self._idle[connection.key]
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return

    def _close_oldest_idle(self) -> bool:
        oldest: Connection | None = None
        for connections in self._idle.values():
            if connections and (oldest is None or connections[0].idle_since < oldest.idle_since):
                oldest = connections[0]
        if oldest is None:
            return False
        idle = self._idle[oldest.key]
        idle.remove(oldest)
        self._idle_count -= 1
        if not idle:
            del self._idle[oldest.key]
        self._open.discard(oldest)  # its connection_lost comes later; the slot is free now
        oldest.close()
        return True

    async def _connect(self, origin: _Origin) -> Connection:
        # One deadline for the lookup and every attempt, as a client means by "connect".
        try:
            async with asyncio.timeout(self.timeout):
                addresses = await self._allowed_addresses(origin.host, origin.port)
                connection = await self._open_first(origin, addresses)
        except TimeoutError as exc:
            raise ConnectTimedOut(f"connecting to {origin.host_header} timed out") from exc
        connection.key = origin
        self._open.add(connection)
        return connection

    async def _allowed_addresses(self, host: str, port: int) -> list[str]:
        literal = ip_literal(host)
        if literal is not None:
            resolved = [str(literal)]
        else:
            try:
                resolved = list(dict.fromkeys(await self._resolver(host, port)))
            except OSError as exc:
                raise NotSent(f"could not resolve {host}: {exc}") from exc
            if not resolved:
                raise NotSent(f"{host} resolved to no address")
        allowed = [a for a in resolved if self._allow.address_allowed(host, port, a)]
        if allowed:
            return allowed
        if not self._allow.names(host, port):
            raise PolicyRefusal(f"the host {host}:{port} is not on the proxy's allow-list")
        shown = ", ".join(resolved[:4]) + (", ..." if len(resolved) > 4 else "")
        raise PolicyRefusal(
            f"the provider host {host} resolves only to non-public addresses ({shown})"
        )

    async def _open_first(self, origin: _Origin, addresses: list[str]) -> Connection:
        tls = self._ssl if origin.scheme == "https" else None
        name = origin.host if tls is not None else None
        failure: Exception | None = None
        for address in addresses:
            try:
                _, protocol = await self._opener(
                    lambda: Connection(self._lost), address, origin.port, tls, name
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                failure = exc
                continue
            if not isinstance(protocol, Connection):
                raise TypeError("the opener must return the protocol it was given")
            return protocol
        raise NotSent(f"could not connect to {origin.host_header}: {failure}") from failure

    async def aclose(self) -> None:
        """Close every idle connection; those in use close when their answer ends."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        self._idle_count = 0
        for waiter in self._slot_waiters:
            _give_up(waiter)
        self._slot_waiters.clear()


def _give_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)
