"""``tokenlay-otel proxy``'s flags: the parser, and what the parsed values configure."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .server import ServerLimits

__all__ = [
    "ENV_ALLOW_PROVIDERS",
    "ENV_PROXY_KEYS",
    "add_arguments",
    "gateway_options",
    "load_keys",
    "server_limits",
]

#: Comma-separated Tokenlay keys the proxy accepts (or use --keys-file).
ENV_PROXY_KEYS = "TOKENLAY_PROXY_KEYS"
#: Comma-separated provider patterns the proxy may forward to (or use --allow-provider).
ENV_ALLOW_PROVIDERS = "TOKENLAY_PROXY_ALLOW_PROVIDERS"

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


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
        "stay exact across them; one that dies is replaced, its concurrency slots free "
        "within --lease-seconds, its calls' reservations kept; one that cannot start stops "
        "the proxy; 0 or 'auto': one per core (default: %(default)s)",
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
