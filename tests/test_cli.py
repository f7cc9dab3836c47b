"""The ``tokenlay-otel`` command as a user meets it: help, version, what the proxy says."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import tokenlay_otel
from tokenlay_otel.cli import build_parser
from tokenlay_otel.proxy.providers import DEFAULT_PROVIDERS
from tokenlay_otel.proxy.serve import describe_startup

pytestmark = pytest.mark.slow  # each test runs the command in a subprocess

RULES = Path(__file__).parent.parent / "examples" / "demo" / "rules.yaml"


def command(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenlay_otel.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "1000", **(env or {})},  # one line per flag
    )


def test_version() -> None:
    result = command("--version")
    assert result.returncode == 0
    assert result.stdout == f"tokenlay-otel {tokenlay_otel.__version__}\n"


def test_top_level_help_is_plain_text() -> None:
    result = command("--help")
    assert result.returncode == 0
    assert "spend" in result.stdout
    assert "proxy" in result.stdout
    assert "--version" in result.stdout
    # reST markup from a docstring: ``literal``, :role:`target`, `interpreted`.
    assert not re.search(r"``|:\w+:`|`\w", result.stdout), result.stdout


def test_spend_help_shows_every_flag_with_its_help_and_default() -> None:
    help_text = " ".join(command("spend", "--help").stdout.split())
    spend = build_parser()._subparsers._group_actions[0].choices["spend"]  # type: ignore[union-attr]
    flags = [a for a in spend._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} == {"by", "since", "db", "format"}
    for action in flags:
        assert action.help is not None, action.dest
        expanded = " ".join((action.help % {"default": action.default}).split())
        assert "(default: " in expanded, action.dest
        assert expanded in help_text, action.dest


def test_the_proxy_says_when_it_listens_and_when_it_stopped(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenlay_otel.cli", "proxy", "--port", "0", "--mock-upstream",
         "--rules", str(RULES), "--db", str(db)],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
             "TOKENLAY_PROXY_KEYS": "k1,k2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        started = proc.stderr.readline()
        # --port 0: the line names the port the system gave, which really answers.
        match = re.search(r"listening on (http://127\.0\.0\.1:(\d+));", started)
        assert match, started
        assert match.group(2) != "0"
        with urllib.request.urlopen(match.group(1) + "/health", timeout=5) as answer:
            assert answer.status == 200
        assert f"store SQLite {db}" in started
        assert f"3 rules from {RULES}" in started
        assert "2 keys" in started
        assert "mock upstream" in started
        assert started.rstrip().endswith("telemetry off (set OTEL_TRACES_EXPORTER / "
                                         "OTEL_METRICS_EXPORTER)")  # fmt: skip
        assert "k1" not in started
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    # uvicorn re-raises SIGTERM once it has shut down: the status says the signal.
    assert proc.returncode == -signal.SIGTERM
    assert rest.splitlines()[-1] == f"tokenlay-otel proxy: stopped ({match.group(1)})"


def _startup_line(*argv: str, keys: int = 1, rules: int = 0) -> str:
    from tokenlay_otel.proxy.serve import gateway_options

    args: argparse.Namespace = build_parser().parse_args(["proxy", *argv])
    options = gateway_options(args, environ={})
    return describe_startup(
        args, address="http://127.0.0.1:8787", keys=keys, rules=rules, options=options
    )


def test_startup_line_names_the_allow_list_and_hides_a_redis_password() -> None:
    line = _startup_line(
        "--redis-url", "redis://user:s3cret@redis.internal:6390/2?password=s3cret",
        "--allow-provider", "http://10.0.0.5:8000", "--allow-provider", "https://llm.corp",
    )  # fmt: skip
    assert "s3cret" not in line
    assert "user" not in line
    assert "store Redis redis://***@redis.internal:6390/2;" in line
    assert "0 rules (every call allowed); 1 key;" in line
    assert (
        f"upstream: the public providers over https ({len(DEFAULT_PROVIDERS)} patterns) + "
        "http://10.0.0.5:8000, https://llm.corp; "
    ) in line


@pytest.mark.parametrize("url", ["redis://localhost", "redis://:pw@localhost:6379"])
def test_startup_line_for_plain_redis_urls(url: str) -> None:
    line = _startup_line("--redis-url", url)
    assert "pw" not in line
    assert "store Redis redis://" in line


def test_the_start_line_says_where_telemetry_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenlay_otel.proxy.serve import _telemetry_name

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "9999")
    assert _telemetry_name() == "traces: otlp, metrics: prometheus (http://localhost:9999/metrics)"
