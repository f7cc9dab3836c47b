"""``tokenlay-otel proxy``: read the configuration and serve the gateway with uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["ENV_PROXY_KEYS", "add_arguments", "load_keys", "run"]

#: Comma-separated Tokenlay keys the proxy accepts (or use --keys-file).
ENV_PROXY_KEYS = "TOKENLAY_PROXY_KEYS"


def load_keys(keys_file: str | None, environ: dict[str, str] | None = None) -> frozenset[str]:
    """Keys from a file (one per line, ``#`` comments) or ``TOKENLAY_PROXY_KEYS``."""
    env = os.environ if environ is None else environ
    keys: set[str] = set()
    if keys_file:
        for line in Path(keys_file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    keys.update(k.strip() for k in env.get(ENV_PROXY_KEYS, "").split(",") if k.strip())
    if not keys:
        raise SystemExit(
            f"tokenlay-otel proxy: no Tokenlay keys configured; pass --keys-file FILE "
            f"or set {ENV_PROXY_KEYS}=key1,key2"
        )
    return frozenset(keys)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--rules", help="rules file (YAML or JSON); none: allow everything")
    parser.add_argument(
        "--keys-file", help=f"accepted Tokenlay keys, one per line (or ${ENV_PROXY_KEYS})"
    )
    parser.add_argument("--redis-url", help="share limits through Redis instead of SQLite")
    parser.add_argument("--db", default="tokenlay-proxy.db", help="SQLite usage file")
    parser.add_argument(
        "--mock-upstream",
        action="store_true",
        help="answer with a deterministic mock provider (offline)",
    )
    parser.add_argument("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit(
            "tokenlay-otel proxy needs the proxy extra: pip install 'tokenlay-otel[proxy]'"
        ) from None
    from .app import ProxyConfig, create_app
    from .rules import RulesError, load_rules
    from .store import open_store

    keys = load_keys(args.keys_file)
    try:
        rules = load_rules(args.rules) if args.rules else []
    except RulesError as exc:
        raise SystemExit(f"tokenlay-otel proxy: {exc}") from None
    if os.environ.get("OTEL_TRACES_EXPORTER") or os.environ.get("OTEL_METRICS_EXPORTER"):
        from tokenlay_otel.exporters import configure

        configure(service_name=os.environ.get("OTEL_SERVICE_NAME") or "tokenlay-proxy")
    store = open_store(redis_url=args.redis_url, sqlite_path=args.db)
    app = create_app(
        ProxyConfig(keys=keys, rules=rules, store=store, mock_upstream=args.mock_upstream)
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
