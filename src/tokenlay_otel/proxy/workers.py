"""The proxy's processes: the listening socket, the forked workers that share it, and
the open-files limit they need."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence

__all__ = ["describe_exit", "listen", "raise_open_files_limit", "restart_delay", "worker_count"]

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


#: A worker's exit status when it could not start serving (uvicorn's, for a failed startup).
_CANNOT_START = 3
#: Workers dying faster than this many a window (besides one each) slow their replacement.
_DEATHS_WINDOW_S = 10.0
#: The longest wait before a worker is replaced.
_MAX_RESTART_DELAY_S = 5.0
#: Linux ``prctl`` option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1

_Serve = Callable[[list[socket.socket], bool, Callable[[], None]], int]


def restart_delay(deaths: Sequence[float], now: float, workers: int) -> float:
    """How long to wait before replacing a worker, given when workers died (``deaths``):
    none while at most ``workers`` died in the last ``_DEATHS_WINDOW_S`` seconds, then
    doubling from 0.25 s for each death past that, up to ``_MAX_RESTART_DELAY_S``. A
    worker that crashes at once then costs a fork every few seconds, not a busy loop."""
    excess = sum(1 for t in deaths if now - t < _DEATHS_WINDOW_S) - workers
    if excess <= 0:
        return 0.0
    return float(min(_MAX_RESTART_DELAY_S, 0.25 * 2 ** min(excess - 1, 16)))


def describe_exit(status: int) -> str:
    """``status`` from ``waitpid``, in words: "exited with status 1", "was killed by SIGKILL"."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


def _die_with_parent(parent: int) -> None:
    """In a worker: have the kernel SIGTERM it when the parent dies (Linux), so that a
    parent killed with SIGKILL leaves no worker serving the port on its own. SIGTERM,
    not SIGKILL: the worker settles the calls in flight as on any stop."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            _log.warning("could not ask to stop with the parent: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):  # no libc with prctl
        return
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(0)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class _Supervisor:
    """The parent of the workers: forks them, replaces one that dies while the proxy is
    not stopping, gives up when one cannot even start, and stops them all on
    SIGINT/SIGTERM."""

    def __init__(self, sock: socket.socket, workers: int, serve: _Serve) -> None:
        self.sock, self.workers, self.serve = sock, workers, serve
        self.pid = os.getpid()
        self.children: set[int] = set()
        self.started: set[int] = set()  # workers that said they serve
        self.deaths: deque[float] = deque(maxlen=4 * workers + 16)
        self.replace_at: list[float] = []  # when to fork the replacements still owed
        self.stopping = False
        self.worst = 0
        # Workers write their pid here once they serve (atomic: a line < PIPE_BUF).
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._ready_buffer = b""

    def stop(self, signum: int = signal.SIGTERM, frame: object = None) -> None:
        self.stopping = True
        for child in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    def fork(self) -> int:
        # Blocked across the fork: the parent's handler must not run in a new worker
        # (it would stop its siblings), and a stop must not miss a worker just forked.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._work()  # never returns
            self.children.add(pid)
            if self.stopping:
                os.kill(pid, signal.SIGTERM)
            return pid
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _work(self) -> None:
        """A worker: serve until told to stop, never return into the parent's code."""
        code = 1
        try:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            os.close(self._ready_r)
            _die_with_parent(self.pid)
            code = self.serve([self.sock], False, self._say_ready)
        except SystemExit as exc:  # a setup refusal: its line, as one worker would say it
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _say_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._ready_w, f"{os.getpid()}\n".encode())

    def _read_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._ready_r, 4096):
                self._ready_buffer += chunk
        *lines, self._ready_buffer = self._ready_buffer.split(b"\n")
        self.started.update(int(line) for line in lines if line)

    def run(self) -> int:
        try:
            while self.children or (self.replace_at and not self.stopping):
                self._replace_due()
                pid, status = self._wait()
                if pid:
                    failure = self._exited(pid, status)
                    if failure is not None:
                        return failure
            return self.worst
        finally:
            os.close(self._ready_r)
            os.close(self._ready_w)

    def _replace_due(self) -> None:
        now = time.monotonic()
        while self.replace_at and self.replace_at[0] <= now and not self.stopping:
            self.replace_at.pop(0)
            self.fork()

    def _wait(self) -> tuple[int, int]:
        """The next worker to exit, or ``(0, 0)`` once a replacement is due (or on stop)."""
        if not self.replace_at or self.stopping:
            # Blocks until a worker exits; a stop signal runs its handler and waits on.
            return os.waitpid(-1, 0)
        while not self.stopping and self.replace_at and self.replace_at[0] > time.monotonic():
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # none left: only the replacements are awaited
                pid = status = 0
            if pid:
                return pid, status
            time.sleep(0.05)
        return 0, 0

    def _exited(self, pid: int, status: int) -> int | None:
        """Account for a worker gone; the proxy's exit status when it must give up."""
        if pid not in self.children:
            return None
        self.children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            self.worst = max(self.worst, code)
            return None
        self._read_ready()
        if pid not in self.started and code > 0:
            # A worker that cannot start would fail the same way each time it is forked.
            # (One killed by a signal while starting, the OOM killer's, is replaced.)
            print(f"tokenlay-otel proxy: worker {pid} {describe_exit(status)} before it "
                  "could serve; stopping", file=sys.stderr, flush=True)  # fmt: skip
            self.stop()
            while self.children:
                self._exited(*os.waitpid(-1, 0))
            return code if code > 0 else _CANNOT_START
        self.started.discard(pid)
        now = time.monotonic()
        self.deaths.append(now)
        delay = restart_delay(self.deaths, now, self.workers)
        if delay:
            self.replace_at.append(now + delay)
            then = f"replacing it in {delay:g} s (workers are dying fast)"
        else:
            then = f"replaced by worker {self.fork()}"
        print(f"tokenlay-otel proxy: worker {pid} {describe_exit(status)}; {then}",
              file=sys.stderr, flush=True)  # fmt: skip
        return None


def _prefork(args: argparse.Namespace, workers: int, serve: _Serve) -> int:
    """Bind the port here, fork ``workers`` processes that serve it, keep that many
    running, and stop them all on SIGINT/SIGTERM. The kernel spreads connections over
    them; the store they share keeps every limit exact (the same atomic steps as several
    proxies on one store)."""
    # Bound once, before the fork: every worker accepts on the same socket.
    sock = listen(args.host, args.port)
    supervisor = _Supervisor(sock, workers, serve)
    signal.signal(signal.SIGINT, supervisor.stop)
    signal.signal(signal.SIGTERM, supervisor.stop)
    for _ in range(workers):
        supervisor.fork()
    address = _address([sock], args.host, args.port)
    pids = ", ".join(map(str, sorted(supervisor.children)))
    print(f"tokenlay-otel proxy: {workers} workers (pids {pids}) on {address}",
          file=sys.stderr, flush=True)  # fmt: skip
    status = supervisor.run()
    sock.close()
    print(f"tokenlay-otel proxy: stopped ({address}, {workers} workers)", file=sys.stderr,
          flush=True)  # fmt: skip
    return status


def worker_count(requested: int) -> int:
    """``--workers``: 0 means one per core this process may run on."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
