"""Zero-code: `opentelemetry-instrument` finds the `tokenlay` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tokenlay_otel import TokenlayInstrumentor
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, TOKENLAY_KEY

pytestmark = pytest.mark.slow  # opentelemetry-instrument in subprocesses

SCRIPT = textwrap.dedent(
    """
    import openai
    from tokenlay_otel import metadata

    client = openai.OpenAI(api_key={key!r}, base_url="https://api.openai.com/v1")
    with metadata(user="script-user", org="script-org"):
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{{"role": "user", "content": "hi"}}]
        )
    print("REPLY:", reply.choices[0].message.content)
    """
)


def test_entry_point_is_registered() -> None:
    (entry,) = [e for e in entry_points(group="opentelemetry_instrumentor") if e.name == "tokenlay"]
    assert entry.load() is TokenlayInstrumentor
    assert TokenlayInstrumentor().instrumentation_dependencies() == ("openai >= 1.40, < 4",)


def _run(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "opentelemetry-instrument"
    return subprocess.run(
        [str(command), "--traces_exporter", "console", "--metrics_exporter", "none",
         "--logs_exporter", "none", sys.executable, str(script)],
        # Ours alone: the other openai instrumentations the dev extra installs load under
        # the entry-point name openai (tests/test_coexistence.py runs beside them).
        env={**os.environ, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "openai", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip


def test_a_bad_setting_under_opentelemetry_instrument_is_loud_and_partial(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """A malformed TOKENLAY_METADATA used to fail instrument() and leave calls neither
    routed nor traced, with the app exiting 0."""
    script = tmp_path / "app.py"
    script.write_text(SCRIPT.format(key=PROVIDER_KEY))
    prices = tmp_path / "prices.json"
    prices.write_text("{not json")
    result = _run(
        script,
        TOKENLAY_KEY=TOKENLAY_KEY,
        TOKENLAY_BASE_URL=server.url,
        TOKENLAY_METADATA="user,plan=pro",
        TOKENLAY_PRICES_FILE=str(prices),
        TOKENLAY_FAIL_OPEN="disabled",
    )
    assert result.returncode == 0, result.stderr
    assert "Instrumenting of tokenlay failed" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "tokenlay_otel:" in line]
    assert len(errors) == 3, result.stderr  # one line per bad setting, on stderr by default
    for name in ("TOKENLAY_METADATA", str(prices), "TOKENLAY_FAIL_OPEN"):
        assert any(name in line for line in errors), (name, errors)
    (sent,) = server.requests  # routed...
    assert sent.headers["authorization"] == f"Bearer {TOKENLAY_KEY}"
    assert sent.headers["x-tokenlay-plan"] == "pro"
    text = result.stdout[result.stdout.index("{") :]
    span = json.loads(text[: text.rindex("}") + 1])  # ...and traced
    assert span["attributes"]["tokenlay.routed"] is True


def test_opentelemetry_instrument_routes_and_traces(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    script = tmp_path / "app.py"
    script.write_text(SCRIPT.format(key=PROVIDER_KEY))
    result = _run(
        script,
        TOKENLAY_KEY=TOKENLAY_KEY,
        TOKENLAY_BASE_URL=server.url,
        OTEL_SERVICE_NAME="auto-test",
    )
    assert result.returncode == 0, result.stderr
    assert "REPLY: Hello from the fake server." in result.stdout

    # The console exporter prints each span as a JSON document.
    text = result.stdout[result.stdout.index("{") :]
    span = json.loads(text[: text.rindex("}") + 1])
    assert span["name"] == "chat gpt-4o-mini"
    assert span["kind"] == "SpanKind.CLIENT"
    attrs = span["attributes"]
    assert attrs["tokenlay.user"] == "script-user"
    assert attrs["tokenlay.org"] == "script-org"
    assert attrs["tokenlay.routed"] is True
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert span["resource"]["attributes"]["service.name"] == "auto-test"
    assert PROVIDER_KEY not in result.stdout + result.stderr
    assert TOKENLAY_KEY not in result.stdout + result.stderr

    (sent,) = server.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {TOKENLAY_KEY}"
    assert sent.headers["x-tokenlay-provider-key"] == PROVIDER_KEY
    assert sent.headers["x-tokenlay-user"] == "script-user"
    trace_id = span["context"]["trace_id"].removeprefix("0x")
    span_id = span["context"]["span_id"].removeprefix("0x")
    assert sent.headers["traceparent"].split("-")[1:3] == [trace_id, span_id]
