"""Every example runs, offline, against the local proxy's mock upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.slow  # each example runs in a subprocess against a local proxy

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """The example's output; it must succeed and leave its temporary folder empty."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENLAY_", "OTEL_"))}
    clean.pop("TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS", None)
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / name / "main.py"), *args],
            env={**clean, "TOKENLAY_OTEL_RAISE_INTERNAL_ERRORS": "1", "TMPDIR": scratch,
                 **(env or {})},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
        assert os.listdir(scratch) == [], f"{name} left temporary files behind"
    return result.stdout


def test_every_example_has_a_main_and_a_readme() -> None:
    folders = [p for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    assert len(folders) >= 9
    for folder in folders:
        assert (folder / "main.py").exists(), folder
        assert (folder / "README.md").exists(), folder


def test_demo() -> None:
    out = run("demo")
    assert "BLOCKED 429 by free-daily-requests" in out
    assert "proxy switched model to gpt-4o-mini" in out
    assert "warning: 82% of the daily tokens limit (200) used by org globex" in out
    assert "spend by org" in out
    assert "spend by user" in out
    total = [line for line in out.splitlines() if line.startswith("TOTAL")]
    assert len(total) == 2
    assert total[0].split()[1] == "18"  # 18 calls in the ledger


def test_demo_keeps_the_ledger_it_is_given(tmp_path: Path) -> None:
    ledger = tmp_path / "spend.db"
    out = run("demo", "--ledger", str(ledger))
    (hint,) = [line.removeprefix("Try: ") for line in out.splitlines() if line.startswith("Try: ")]
    assert f"spend --db {ledger} --by model --format json" in hint
    assert ledger.is_file()
    # The command it suggests runs as printed, from anywhere (the venv's, by its path).
    tried = subprocess.run(hint.split(), capture_output=True, text=True, timeout=60, cwd="/")
    assert tried.returncode == 0, tried.stderr
    assert json.loads(tried.stdout)


def test_quickstart() -> None:
    out = run("quickstart")
    assert "reply:" in out
    assert "rule_action='allow'" in out


def test_zero_code() -> None:
    out = run("zero_code")
    assert "alice@acme:" in out
    assert '"tokenlay.user": "carol"' in out
    assert '"tokenlay.routed": true' in out


@pytest.mark.parametrize(("name", "expect"), [
    ("fastapi_app", "'attribution': {'user': 'carol', 'org': 'globex', 'feature': 'ask'}"),
    ("flask_app", "'attribution': {'org': 'hooli', 'user': 'frank'}"),
    ("async_users", "org-4: 40 calls"),
    ("configure_exporters", '"name": "tokenlay.client.cost"'),
])  # fmt: skip
def test_example(name: str, expect: str) -> None:
    assert expect in run(name)


def test_streaming_explains_the_stream_it_leaves() -> None:
    out = run("streaming")
    assert "2. a stream left on purpose after its first chunk ('Sure ')" in out
    spans = {line.split("(")[1].split(")")[0]: line for line in out.splitlines()
             if line.startswith("span ")}  # fmt: skip
    assert spans["read to the end"].endswith("(source: proxy)")
    assert "tokens=13/12 cost=$" in spans["read to the end"]
    assert spans["left after one chunk"].endswith("tokens=-/- cost=- (source: unknown)")


def test_grafana_example_exports_over_otlp() -> None:
    with OTLPReceiver() as receiver:
        out = run("grafana", "--calls", "20",
                  env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                       "OTEL_EXPORTER_OTLP_INSECURE": "true"})  # fmt: skip
    assert "sent 20 calls" in out
    spans = receiver.spans()
    assert len([s for s in spans if s.name.startswith("chat ")]) == 20
    assert "tokenlay.client.cost" in receiver.metrics()
