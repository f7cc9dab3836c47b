"""The proxy's processes: the listening socket, the forked workers that share it, and
the open-files limit they need."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable

__all__ = ["listen", "raise_open_files_limit", "worker_count"]

_log = logging.getLogger("tokenlay_otel.proxy")

#: Soft open-files limit to ask for when the hard limit is unlimited.
_UNLIMITED_NOFILE_TARGET = 65536


def raise_open_files_limit() -> int | None:
    """Lift the soft open-files limit to the hard one; the soft limit now (``None``
    where there is none). For the CLI: a library leaves the process's limits alone."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a valid soft one everywhere (macOS wants a number).
    target = _UNLIMITED_NOFILE_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        _log.debug("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def _address(sockets: list[socket.socket], host: str, port: int) -> str:
    """``http://host:port`` of the first listening socket (the real port for ``--port 0``)."""
    if sockets:
        bound = sockets[0].getsockname()
        if isinstance(bound, tuple):
            host, port = bound[0], bound[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one clear line (uvicorn
    would log a bare ``[Errno 98]`` and exit 3).

    Raises:
        SystemExit: the address cannot be listened on, saying which and why.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that
    # say they are TCP, and accepted sockets inherit the listener's protocol. Without
    # it an answer's body waits behind its headers for the client's delayed ACK
    # (about 40 ms a call, measured).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart past TIME_WAIT
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)  # uvicorn sets its own backlog when it serves it
    except OSError as exc:
        sock.close()
        hint = (
            "; another process listens there: pick another --port"
            if (exc.errno == errno.EADDRINUSE)
            else ""
        )
        raise SystemExit(
            f"tokenlay-otel proxy: cannot listen on {host}:{port} ({exc.strerror}){hint}"
        ) from None
    sock.set_inheritable(True)
    return sock


def _prefork(
    args: argparse.Namespace, workers: int, serve: Callable[[list[socket.socket], bool], int]
) -> int:
    """Bind the port here, fork ``workers`` processes that serve it, and stop them all
    on SIGINT/SIGTERM. The kernel spreads connections over them; the store they share
    keeps every limit exact (the same atomic steps as several proxies on one store)."""
    import signal

    # Bound once, before the fork: every worker accepts on the same socket.
    sock = listen(args.host, args.port)
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve until told to stop, never return into the parent
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = serve([sock], False)
            finally:
                os._exit(code)
        children.append(pid)
    address = _address([sock], args.host, args.port)
    print(f"tokenlay-otel proxy: {workers} workers (pids {', '.join(map(str, children))}) "
          f"on {address}", file=sys.stderr, flush=True)  # fmt: skip

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    worst = 0
    for child in children:
        _, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    sock.close()
    print(f"tokenlay-otel proxy: stopped ({address}, {workers} workers)", file=sys.stderr,
          flush=True)  # fmt: skip
    return worst


def worker_count(requested: int) -> int:
    """``--workers``: 0 means one per core this process may run on."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
