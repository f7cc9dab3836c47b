"""Serve an ASGI app with uvicorn, bounded: a header read timeout and a connection cap.

uvicorn alone keeps a connection open for as long as the client likes before its first
request (and while request headers trickle in), and accepts sockets until the process
runs out of file descriptors; ``limit_concurrency`` only answers 503 once a request has
arrived. So 300 idle sockets take down a proxy run with ``ulimit -n 256``, health
checks included. The guard here closes a connection that has not delivered a request's
complete headers within ``header_timeout_s`` (after it opens, or after its previous
response), and, when a new connection would exceed ``max_connections``, closes the
connection that has been idle longest to make room (or the new one, when every
connection has a request in progress).

Usage::

    config = uvicorn_config(app, host="0.0.0.0", port=8787, limits=ServerLimits())
    uvicorn.Server(config).run()

uvicorn's own behaviour is otherwise kept (keep-alive, pipelining, graceful shutdown),
but for a smaller listen backlog when the cap is small (see :func:`_backlog`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

if TYPE_CHECKING:
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol as _ProtocolBase
else:
    _ProtocolBase = object

__all__ = [
    "ConnectionGuard",
    "ServerLimits",
    "default_max_connections",
    "uvicorn_config",
    "uvicorn_server",
]

_log = logging.getLogger("tokenlay_otel.proxy")

#: ``max_connections`` where the platform has no open-files limit to derive it from.
_NO_RLIMIT_MAX_CONNECTIONS = 1024
#: An unlimited open-files limit is treated as this one.
_UNLIMITED_NOFILE = 65536
_MIN_CONNECTIONS = 16
_UVICORN_BACKLOG = 2048  # uvicorn.Config's default


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """How long and how many: the bounds of the HTTP server in front of the gateway.

    Args:
        header_timeout_s: a connection must deliver a request's complete headers within
            this many seconds after it opens, and after each response.
        max_connections: open client connections at most; ``None`` derives it from the
            open-files limit (:func:`default_max_connections`).
        keep_alive_s: uvicorn's keep-alive timeout for a silent connection.
        graceful_shutdown_s: on shutdown, how long requests in progress may finish.
    """

    header_timeout_s: float = 10.0
    max_connections: int | None = None
    keep_alive_s: float = 5.0
    graceful_shutdown_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ServerLimits.{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.graceful_shutdown_s) and self.graceful_shutdown_s >= 0):
            raise ValueError(
                f"ServerLimits.graceful_shutdown_s must be >= 0, got {self.graceful_shutdown_s!r}"
            )
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(
                f"ServerLimits.max_connections must be >= 1, got {self.max_connections!r}"
            )


def default_max_connections() -> int:
    """Half the soft open-files limit (at least 16): the rest is left for upstream and
    store connections, files and the listening socket."""
    try:
        import resource
    except ImportError:  # Windows: no RLIMIT_NOFILE
        return _NO_RLIMIT_MAX_CONNECTIONS
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = _UNLIMITED_NOFILE
    return max(_MIN_CONNECTIONS, soft // 2)


# --- The uvicorn seam (STYLE §15) -------------------------------------------------------
# uvicorn has no public hook for "a request's headers arrived" or "a response is done",
# nor a header-read timeout, and an ASGI middleware only runs once headers are complete.
# What this reads of uvicorn's HTTP protocols, H11Protocol and HttpToolsProtocol (the
# same names in both; tests/test_proxy_server.py checks them against what the app sees,
# on the installed version; it passed on 0.30.0 and 0.54, each with h11 and httptools):
#   - ``transport``: the connection's transport (closed here);
#   - ``cycle``: the current RequestResponseCycle, ``None`` until a request's headers
#     are complete, replaced by each new request; ``cycle.response_complete``;
#   - ``connections``: the server's set of HTTP connections, which a connection leaves
#     when it is upgraded to a WebSocket (its transport then belongs to another protocol);
#   - ``on_response_complete()``: called when a response has been sent.
# What it saves: without it, 300 silent sockets exhaust a process with ``ulimit -n 256``
# (``/health`` times out, "Too many open files"), and dribbled headers hold a socket
# forever.


def _current_cycle(conn: _GuardedConnection) -> object:
    return conn.cycle


def _request_in_progress(conn: _GuardedConnection) -> bool:
    cycle = conn.cycle
    return cycle is not None and not cycle.response_complete


def _handed_off(conn: _GuardedConnection) -> bool:
    """The connection was upgraded: uvicorn no longer serves HTTP on its transport."""
    return conn not in conn.connections


def _auto_http_protocol() -> type[asyncio.Protocol]:
    """The protocol class ``http="auto"`` picks (httptools when importable, else h11)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if not callable(getattr(AutoHTTPProtocol, "on_response_complete", None)):
        raise RuntimeError(
            f"uvicorn's {AutoHTTPProtocol.__name__} has no on_response_complete(); "
            "this uvicorn version is not supported by tokenlay_otel.proxy.server"
        )
    return AutoHTTPProtocol


# --- The guard ---------------------------------------------------------------------------


class ConnectionGuard:
    """The open connections of one server: idle ones (longest idle first) and those
    found busy; the header timeout they share. One per :func:`uvicorn_config` call."""

    def __init__(self, *, header_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        # Insertion-ordered: a connection moves to the end when a response completes,
        # so the first idle one is the one idle longest.
        self._idle: dict[_GuardedConnection, None] = {}
        # Met at the front of ``_idle`` with a request in progress; back to ``_idle``
        # when that response completes. Keeps finding an idle one amortised O(1).
        self._busy: set[_GuardedConnection] = set()

    @property
    def open_connections(self) -> int:
        """Connections admitted and not yet closed."""
        return len(self._idle) + len(self._busy)

    def admit(self, conn: _GuardedConnection) -> bool:
        """Register a new connection, evicting idle ones to stay within the cap;
        ``False``: every connection is busy, close the new one."""
        while self.open_connections >= self.max_connections:
            victim = self._pop_oldest_idle()
            if victim is None:
                return False
            _log.debug(
                "connection cap (%d) reached: closing the connection idle longest",
                self.max_connections,
            )
            victim.transport.close()
        self._idle[conn] = None
        return True

    def response_done(self, conn: _GuardedConnection) -> None:
        """The connection is idle again (if still registered): it goes last in line."""
        if conn in self._busy:
            self._busy.remove(conn)
        elif self._idle.pop(conn, False) is False:
            return  # not registered: refused, or closed by the guard
        self._idle[conn] = None

    def remove(self, conn: _GuardedConnection) -> None:
        self._idle.pop(conn, None)
        self._busy.discard(conn)

    def _pop_oldest_idle(self) -> _GuardedConnection | None:
        while self._idle:
            conn = next(iter(self._idle))
            del self._idle[conn]
            if _handed_off(conn):
                continue
            if _request_in_progress(conn):
                self._busy.add(conn)
                continue
            return conn
        return None


class _GuardedConnection(_ProtocolBase):
    """Mixed in before uvicorn's HTTP protocol class by :func:`_guarded_protocol`."""

    guard: ClassVar[ConnectionGuard]
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(  # type: ignore[override]  # narrowed like uvicorn's own
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            _log.debug(
                "connection cap (%d) reached and every connection is busy: "
                "closing the new connection",
                self.guard.max_connections,
            )
            transport.close()
            return
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.guard.response_done(self)
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self.guard.remove(self)
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = asyncio.get_running_loop().call_later(
            self.guard.header_timeout_s, self._header_deadline, _current_cycle(self)
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self, armed_cycle: object) -> None:
        self._header_timer = None
        if _handed_off(self):
            self.guard.remove(self)
            return
        if _current_cycle(self) is armed_cycle and not _request_in_progress(self):
            _log.debug(
                "no complete request headers within %ss: closing the connection",
                self.guard.header_timeout_s,
            )
            self.guard.remove(self)
            self.transport.close()


def _backlog(max_connections: int) -> int:
    """The listen backlog, which asyncio also uses as the number of sockets it accepts
    in one go, before any of them reaches the guard. With uvicorn's 2048, a burst of
    1,000 silent sockets against ``ulimit -n 256`` (cap 128) still ran out of file
    descriptors ("Too many open files", ``/health`` timed out); with a quarter of the
    cap, none did, and ``/health`` answered at once. Large caps keep 2048."""
    return min(_UVICORN_BACKLOG, max(_MIN_CONNECTIONS, max_connections // 4))


def _guarded_protocol(guard: ConnectionGuard) -> type[asyncio.Protocol]:
    base = _auto_http_protocol()
    namespace = {"guard": guard, "__module__": __name__}
    return cast(
        "type[asyncio.Protocol]",
        type(f"Guarded{base.__name__}", (_GuardedConnection, base), namespace),
    )


def uvicorn_config(
    app: Any, *, host: str, port: int, limits: ServerLimits, log_level: str = "warning"
) -> uvicorn.Config:
    """A uvicorn configuration that serves ``app`` behind a fresh :class:`ConnectionGuard`.

    The guard is ``config.http.guard``. ``limits.max_connections=None`` is derived from
    the open-files limit now: raise that limit before calling this.

    Returns:
        A ``uvicorn.Config``; run it with ``uvicorn.Server(config).run()``.
    """
    import uvicorn

    max_connections = limits.max_connections or default_max_connections()
    guard = ConnectionGuard(
        header_timeout_s=limits.header_timeout_s, max_connections=max_connections
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_guarded_protocol(guard),
        backlog=_backlog(max_connections),
        # Annotated int, used as a delay in seconds (loop.call_later, asyncio.wait_for).
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=limits.graceful_shutdown_s,  # type: ignore[arg-type]
    )


def uvicorn_server(
    app: Any, *, host: str, port: int, limits: ServerLimits, log_level: str = "warning"
) -> uvicorn.Server:
    """``uvicorn.Server`` for :func:`uvicorn_config` (same arguments)."""
    import uvicorn

    return uvicorn.Server(
        uvicorn_config(app, host=host, port=port, limits=limits, log_level=log_level)
    )
