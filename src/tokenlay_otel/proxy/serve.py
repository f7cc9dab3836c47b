"""``tokenlay-otel proxy``: read the configuration and serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import socket
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .server import ServerLimits

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "ENV_ALLOW_PROVIDERS",
    "ENV_PROXY_KEYS",
    "add_arguments",
    "describe_startup",
    "gateway_options",
    "load_keys",
    "raise_open_files_limit",
    "run",
    "server_limits",
]

_log = logging.getLogger("tokenlay_otel.proxy")

#: Comma-separated Tokenlay keys the proxy accepts (or use --keys-file).
ENV_PROXY_KEYS = "TOKENLAY_PROXY_KEYS"
#: Comma-separated provider patterns the proxy may forward to (or use --allow-provider).
ENV_ALLOW_PROVIDERS = "TOKENLAY_PROXY_ALLOW_PROVIDERS"

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: Soft open-files limit to ask for when the hard limit is unlimited.
_UNLIMITED_NOFILE_TARGET = 65536


def load_keys(keys_file: str | None, environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """Keys from a file or ``TOKENLAY_PROXY_KEYS`` (comma-separated).

    In the file: one key a line, stripped of surrounding whitespace; blank lines and
    lines starting with ``#`` (after optional whitespace) are skipped. A ``#`` elsewhere
    is part of the key.
    """
    env = os.environ if environ is None else environ
    keys: set[str] = set()
    if keys_file:
        for line in Path(keys_file).read_text(encoding="utf-8").splitlines():
            key = line.strip()
            if key and not key.startswith("#"):
                keys.add(key)
    keys.update(k.strip() for k in env.get(ENV_PROXY_KEYS, "").split(",") if k.strip())
    if not keys:
        raise SystemExit(
            f"tokenlay-otel proxy: no Tokenlay keys configured; pass --keys-file FILE "
            f"or set {ENV_PROXY_KEYS}=key1,key2"
        )
    return frozenset(keys)


def _number(kind: type[int] | type[float], *, allow_zero: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"must be finite and {'>=' if allow_zero else '>'} 0, got {text}"
            )
        return value

    return parse


_positive_int = _number(int, allow_zero=False)
_non_negative_int = _number(int, allow_zero=True)
_positive_float = _number(float, allow_zero=False)
_non_negative_float = _number(float, allow_zero=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``proxy`` command's flags; every help text names the default."""
    server = ServerLimits()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=8787, help="port to listen on (default: %(default)s)")
    add(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="processes serving the port, sharing the store (SQLite file or Redis) so limits "
        "stay exact across them; 0 or 'auto': one per core (default: %(default)s)",
    )
    add("--rules", help="rules file, YAML or JSON (default: none, allow everything)")
    add(
        "--keys-file",
        help="accepted Tokenlay keys, one a line, '#' starts a comment line "
        f"(default: none, read ${ENV_PROXY_KEYS})",
    )
    add(
        "--redis-url",
        help="share limits through Redis instead of SQLite (default: none, use --db)",
    )
    add("--db", default="tokenlay-proxy.db", help="SQLite usage file (default: %(default)s)")
    add(
        "--mock-upstream",
        action="store_true",
        help="answer with a deterministic mock provider, offline (default: off)",
    )
    add(
        "--log-level",
        default="warning",
        choices=_LOG_LEVELS,
        help="uvicorn log level (default: %(default)s)",
    )

    limits = parser.add_argument_group("server limits")
    limits.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=server.header_timeout_s,
        metavar="SECONDS",
        help="close a connection that has not sent complete request headers this long "
        "after it opened or after its last response (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections",
        type=_positive_int,
        default=server.max_connections,
        metavar="N",
        help="open client connections at most; the one idle longest is closed to admit "
        "a new one (default: half the open-files limit, at least 16)",
    )
    limits.add_argument(
        "--keep-alive",
        type=_positive_float,
        default=server.keep_alive_s,
        metavar="SECONDS",
        help="close a silent keep-alive connection after this (default: %(default)s)",
    )
    limits.add_argument(
        "--graceful-shutdown",
        type=_non_negative_float,
        default=server.graceful_shutdown_s,
        metavar="SECONDS",
        help="on shutdown, let requests in progress finish this long (default: %(default)s)",
    )

    gateway = parser.add_argument_group("gateway")
    gateway.add_argument(
        "--allow-provider",
        action="append",
        metavar="PATTERN",
        help="also forward to providers matching [scheme://]host[:port][/path-prefix], "
        "besides the public ones; repeat for more (default: "
        f"${ENV_ALLOW_PROVIDERS}, comma-separated, else none)",
    )
    gateway.add_argument(
        "--prices-file",
        metavar="FILE",
        help="prices for models genai-prices does not know, or overrides: JSON or YAML, "
        "{model: {input, output, cached}} in USD per 1M tokens (default: none)",
    )
    gateway.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=32 * 1024 * 1024,
        metavar="BYTES",
        help="largest body of a metered call, read whole (default: %(default)s)",
    )
    gateway.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="time to receive a metered call's body; the longest pause in an upload "
        "(default: %(default)s)",
    )
    gateway.add_argument(
        "--max-upload-bytes",
        type=_positive_int,
        default=512 * 1024 * 1024,
        metavar="BYTES",
        help="largest body of any other call (files, audio), streamed upstream "
        "(default: %(default)s)",
    )
    gateway.add_argument(
        "--upload-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="time such an upload may take in all (default: %(default)s)",
    )
    gateway.add_argument(
        "--upstream-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="time for an upstream call (default: %(default)s)",
    )
    gateway.add_argument(
        "--lease-seconds",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="a concurrency slot expires unless renewed within this (default: %(default)s)",
    )
    gateway.add_argument(
        "--drain-timeout",
        type=_non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="time to read an abandoned upstream stream for its usage (default: %(default)s)",
    )
    gateway.add_argument(
        "--max-drains",
        type=_non_negative_int,
        default=64,
        metavar="N",
        help="abandoned streams drained at once at most (default: %(default)s)",
    )
    gateway.add_argument(
        "--send-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="a client that takes longer to accept a piece of an answer is gone "
        "(default: %(default)s)",
    )
    gateway.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="after the graceful wait, time for calls in flight to settle (default: %(default)s)",
    )
    gateway.add_argument(
        "--limit-metrics-top",
        type=_positive_int,
        default=100,
        metavar="N",
        help="keys per limit on the limit usage metrics, the most used first "
        "(default: %(default)s)",
    )
    gateway.add_argument(
        "--default-output-tokens",
        type=_positive_int,
        default=256,
        metavar="N",
        help="output tokens reserved when a request sets no maximum (default: %(default)s)",
    )


def gateway_options(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The ``ProxyConfig`` keyword arguments the flags set (besides keys, rules, store).

    ``allow_providers`` comes from ``--allow-provider``, else from
    ``TOKENLAY_PROXY_ALLOW_PROVIDERS``; with neither it is left to ``ProxyConfig``.
    """
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {
        "mock_upstream": args.mock_upstream,
        "max_body_bytes": args.max_body_bytes,
        "body_timeout_s": args.body_timeout,
        "max_upload_bytes": args.max_upload_bytes,
        "upload_timeout_s": args.upload_timeout,
        "upstream_timeout_s": args.upstream_timeout,
        "lease_s": args.lease_seconds,
        "drain_timeout_s": args.drain_timeout,
        "max_drains": args.max_drains,
        "default_output_tokens": args.default_output_tokens,
        "send_timeout_s": args.send_timeout,
        "shutdown_timeout_s": args.shutdown_timeout,
        "limit_metrics_top": args.limit_metrics_top,
    }
    if args.prices_file:
        from tokenlay_otel._pricing import PriceBook, load_price_overrides

        options["prices"] = PriceBook(load_price_overrides(args.prices_file))
    if args.allow_provider:
        options["allow_providers"] = tuple(args.allow_provider)
    elif env.get(ENV_ALLOW_PROVIDERS, "").strip():
        patterns = env[ENV_ALLOW_PROVIDERS].split(",")
        options["allow_providers"] = tuple(p.strip() for p in patterns if p.strip())
    return options


def server_limits(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(
        header_timeout_s=args.header_timeout,
        max_connections=args.max_connections,
        keep_alive_s=args.keep_alive,
        graceful_shutdown_s=args.graceful_shutdown,
    )


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


def _store_name(args: argparse.Namespace) -> str:
    if not args.redis_url:
        return f"SQLite {Path(args.db).resolve()}"
    # The URL may carry a password: only its scheme, host, port and database are shown.
    url = urllib.parse.urlsplit(args.redis_url)
    try:
        port = f":{url.port}" if url.port else ""
    except ValueError:
        port = ""
    hidden = "***@" if url.username or url.password else ""
    return f"Redis {url.scheme}://{hidden}{url.hostname or ''}{port}{url.path}"


def _upstream_name(mock_upstream: bool, allowed: tuple[str, ...]) -> str:
    if mock_upstream:
        return "mock upstream (offline, no provider is called)"
    from .providers import DEFAULT_PROVIDERS

    extra = f" + {', '.join(allowed)}" if allowed else ""
    return f"upstream: the public providers over https ({len(DEFAULT_PROVIDERS)} patterns){extra}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_startup(
    args: argparse.Namespace, *, address: str, keys: int, rules: int, options: Mapping[str, Any]
) -> str:
    """The line the CLI prints once the proxy listens: where, which store, how many
    rules and keys, and where calls go (the mock, or the allow-list). Never a secret:
    keys are counted, a Redis URL loses its password."""
    rules_source = f" from {args.rules}" if args.rules else " (every call allowed)"
    return (
        f"tokenlay-otel proxy: listening on {address}; store {_store_name(args)}; "
        f"{_plural(rules, 'rule')}{rules_source}; {_plural(keys, 'key')}; "
        f"{_upstream_name(options['mock_upstream'], options.get('allow_providers', ()))}; "
        f"{_telemetry_name()}"
    )


def _telemetry_name() -> str:
    """Where the proxy's spans and metrics go (the CLI configures the exporters the
    OTEL_* variables name, see :func:`run`)."""
    traces = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    metrics = os.environ.get("OTEL_METRICS_EXPORTER", "").strip()
    if not (traces or metrics):
        return "telemetry off (set OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER)"
    where = f"traces: {traces or 'otlp'}, metrics: {metrics or 'otlp'}"
    if "prometheus" in metrics.split(","):
        host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "localhost"
        port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT") or "9464"
        where += f" (http://{host}:{port}/metrics)"
    return where


def _address(sockets: list[socket.socket], host: str, port: int) -> str:
    """``http://host:port`` of the first listening socket (the real port for ``--port 0``)."""
    if sockets:
        bound = sockets[0].getsockname()
        if isinstance(bound, tuple):
            host, port = bound[0], bound[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _announcing_server(
    config: uvicorn.Config, line: Callable[[str], str], *, announce: bool = True
) -> uvicorn.Server:
    """A uvicorn server that says on stderr when it listens (``line(address)``) and when
    it has stopped (after the calls in flight settled); quiet with ``announce=False``
    (a worker: the parent speaks for them all)."""
    import uvicorn

    class Server(uvicorn.Server):
        address = ""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and announce:
                listening = [s for server in self.servers for s in server.sockets]
                self.address = _address(listening, config.host, config.port)
                print(line(self.address), file=sys.stderr, flush=True)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            if announce:
                print(f"tokenlay-otel proxy: stopped ({self.address})", file=sys.stderr,
                      flush=True)  # fmt: skip

    return Server(config)


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


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if not 0 <= value <= 256:
        raise argparse.ArgumentTypeError(f"expected 0 (one per core) to 256, got {value}")
    return value


def worker_count(requested: int) -> int:
    """``--workers``: 0 means one per core this process may run on."""
    if requested:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401  # fail early, with the install hint
    except ImportError:
        raise SystemExit(
            "tokenlay-otel proxy needs the proxy extra: pip install 'tokenlay-otel[proxy]'"
        ) from None
    from .app import ProxyConfig, create_app
    from .rules import RulesError, load_rules
    from .server import uvicorn_config
    from .store import open_store

    keys = load_keys(args.keys_file)
    try:
        rules = load_rules(args.rules) if args.rules else []
    except RulesError as exc:
        raise SystemExit(f"tokenlay-otel proxy: {exc}") from None
    try:
        options = gateway_options(args)
    except (OSError, ValueError) as exc:  # an unreadable or malformed --prices-file
        raise SystemExit(f"tokenlay-otel proxy: {exc}") from None
    raise_open_files_limit()  # before max_connections is derived from it
    limits = server_limits(args)
    workers = worker_count(args.workers)

    def serve(sockets: list[socket.socket] | None, announce: bool) -> int:
        # Built here, in the process that serves: a store connection, the upstream
        # client and the telemetry exporters are not shared across a fork.
        if os.environ.get("OTEL_TRACES_EXPORTER") or os.environ.get("OTEL_METRICS_EXPORTER"):
            from tokenlay_otel.exporters import configure

            configure(service_name=os.environ.get("OTEL_SERVICE_NAME") or "tokenlay-proxy")
        store = open_store(redis_url=args.redis_url, sqlite_path=args.db)
        try:
            app = create_app(ProxyConfig(keys=keys, rules=rules, store=store, **options))
        except ValueError as exc:  # a malformed --allow-provider pattern, named in it
            raise SystemExit(f"tokenlay-otel proxy: {exc}") from None
        config = uvicorn_config(
            app, host=args.host, port=args.port, limits=limits, log_level=args.log_level
        )
        server = _announcing_server(
            config,
            lambda address: describe_startup(
                args, address=address, keys=len(keys), rules=len(rules), options=options
            ),
            announce=announce,
        )
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: uvicorn has shut down already
            server.run(sockets=sockets)
        return 0 if server.started else 3  # uvicorn's exit status for a failed startup

    if workers == 1:
        return serve([listen(args.host, args.port)], announce=True)
    return _prefork(args, workers, serve)
