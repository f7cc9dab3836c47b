"""``tokenlay-otel proxy``: read the configuration and serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .heap import settle as settle_heap

# The flags and the process side live in their own modules; their names stay importable
# from here, where the CLI and the tests have always found them.
from .options import (
    ENV_ALLOW_PROVIDERS,
    ENV_PROXY_KEYS,
    add_arguments,
    gateway_options,
    load_keys,
    server_limits,
)
from .workers import _address, _prefork, raise_open_files_limit
from .workers import listen as listen
from .workers import worker_count as worker_count

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


def _announcing_server(
    config: uvicorn.Config,
    line: Callable[[str], str],
    *,
    announce: bool = True,
    on_started: Callable[[], None] = lambda: None,
) -> uvicorn.Server:
    """A uvicorn server that says on stderr when it listens (``line(address)``) and when
    it has stopped (after the calls in flight settled); quiet with ``announce=False``
    (a worker: the parent speaks for them all). ``on_started`` runs once it serves (a
    worker tells its parent so)."""
    import uvicorn

    class Server(uvicorn.Server):
        address = ""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                # Before the first call: a full collection walking the start-up heap
                # stalled every call in flight for 53-80 ms (see heap.py).
                settle_heap()
                on_started()
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

    def serve(sockets: list[socket.socket], announce: bool, on_started: Callable[[], None]) -> int:
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
            on_started=on_started,
        )
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: uvicorn has shut down already
            server.run(sockets=sockets)
        return 0 if server.started else 3  # uvicorn's exit status for a failed startup

    if workers == 1:
        return serve([listen(args.host, args.port)], True, lambda: None)
    return _prefork(args, workers, serve)
