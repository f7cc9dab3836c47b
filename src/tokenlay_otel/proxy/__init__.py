"""A self-hostable Tokenlay-compatible proxy (``pip install tokenlay-otel[proxy]``).

``tokenlay-otel proxy --rules rules.yaml --keys-file keys.txt [--redis-url URL]
[--mock-upstream]`` serves OpenAI-compatible endpoints, enforces Tokenlay rules and
per-user limits, and answers with the ``x-tokenlay-*`` headers.

The gateway itself (``create_app``, ``ProxyConfig``) needs the ``proxy`` extra and is
imported on first use, so the rest of the CLI works without it.
"""

from typing import Any

from .rules import Rule, RulesError, load_rules, parse_rules
from .store import RedisStore, SQLiteStore, UsageStore, open_store

__all__ = [
    "ProxyConfig",
    "RedisStore",
    "Rule",
    "RulesError",
    "SQLiteStore",
    "UsageStore",
    "create_app",
    "load_rules",
    "open_store",
    "parse_rules",
]


def __getattr__(name: str) -> Any:
    if name in ("ProxyConfig", "create_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
