"""Run the proxy in this process, on a free loopback port: for tests, demos, examples."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .rules import Rule, load_rules
from .server import ServerLimits, uvicorn_server
from .store import SQLiteStore, UsageStore

__all__ = ["DEFAULT_LOCAL_KEY", "free_port", "local_proxy", "tokenlay_or_local"]

DEFAULT_LOCAL_KEY = "tl-local-key"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_proxy(
    *,
    rules: Sequence[Rule] | str | Path = (),
    keys: Sequence[str] = (DEFAULT_LOCAL_KEY,),
    mock_upstream: bool = True,
    store: UsageStore | None = None,
    server_limits: ServerLimits | None = None,
    **config: Any,
) -> Iterator[str]:
    """Serve the gateway on ``127.0.0.1`` in a background thread; yields its URL.

    Args:
        rules: rules, or the path of a rules file.
        keys: accepted Tokenlay keys (default: ``tl-local-key``).
        mock_upstream: answer with the deterministic mock provider (default).
        store: usage store (default: SQLite in a temporary folder, removed on exit).
        server_limits: header timeout, connection cap... (default: ``ServerLimits()``).
        **config: other :class:`ProxyConfig` fields (tracer_provider, meter_provider...).
    """
    from .app import ProxyConfig, create_app

    loaded = load_rules(rules) if isinstance(rules, str | Path) else list(rules)
    with contextlib.ExitStack() as cleanup:
        if store is None:
            folder = tempfile.mkdtemp(prefix="tokenlay-proxy-")
            # Last out: after the server stopped and closed the store.
            cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
            store = SQLiteStore(Path(folder) / "usage.db")
        app = create_app(
            ProxyConfig(
                keys=frozenset(keys),
                rules=loaded,
                store=store,
                mock_upstream=mock_upstream,
                **config,
            )
        )
        limits = server_limits if server_limits is not None else ServerLimits()
        with _serving(app, limits) as url:
            yield url


@contextmanager
def _serving(app: Any, limits: ServerLimits) -> Iterator[str]:
    """Serve ``app`` in a thread until the block ends; yields its URL once it answers."""
    port = free_port()
    server = uvicorn_server(app, host="127.0.0.1", port=port, limits=limits)
    thread = threading.Thread(target=server.run, name="tokenlay-local-proxy", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()  # noqa: S310  # loopback
            break
        except OSError:
            if time.monotonic() > deadline or not thread.is_alive():
                server.should_exit = True
                raise RuntimeError("the local Tokenlay proxy did not start") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def tokenlay_or_local(**proxy_options: Any) -> Iterator[dict[str, str]]:
    """Client arguments for the real Tokenlay when ``TOKENLAY_KEY`` is set, else for a
    local proxy with the mock upstream (started here, stopped on exit).

    Yields:
        Keyword arguments for ``TokenlayOpenAI``: empty (the environment variables
        apply) or ``tokenlay_base_url``/``tokenlay_key``/``provider_api_key``.
    """
    import os

    if os.environ.get("TOKENLAY_KEY"):
        yield {}
        return
    with local_proxy(**proxy_options) as url:
        yield {
            "tokenlay_base_url": url,
            "tokenlay_key": DEFAULT_LOCAL_KEY,
            "provider_api_key": os.environ.get("PROVIDER_API_KEY") or "sk-local-mock",
        }
