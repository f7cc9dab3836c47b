from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tokenlay_otel import metadata
from tokenlay_otel.cli import main as cli
from tokenlay_otel.cli import parse_since
from tokenlay_otel.exporters import LedgerSpanExporter
from tokenlay_otel.testing import FakeOpenAIServer, Reply

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

MESSAGES = [{"role": "user", "content": "hi"}]


def run_python(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_configure_with_console_exporters(server: FakeOpenAIServer) -> None:
    result = run_python(
        """
        import sys, openai
        from tokenlay_otel import configure, metadata
        done = configure(service_name="demo-svc", traces="console", metrics="console")
        client = openai.OpenAI(api_key="sk-x", base_url=sys.argv[1] + "/v1")
        with metadata(user="u1", org="o1"):
            client.chat.completions.create(model="gpt-4o-mini", messages=[])
        done.shutdown()
        """,
        {},
        server.url,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '"name": "chat gpt-4o-mini"' in out
    assert '"service.name": "demo-svc"' in out
    for metric in (
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "tokenlay.client.cost",
        "tokenlay.client.requests",
    ):
        assert f'"name": "{metric}"' in out
    assert '"tokenlay.user": "u1"' in out


@pytest.mark.slow
def test_configure_leaves_existing_providers_alone() -> None:
    result = run_python(
        """
        import logging
        logging.basicConfig(level=logging.INFO)
        from opentelemetry import trace, metrics
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.metrics import MeterProvider
        mine, meters = TracerProvider(), MeterProvider()
        trace.set_tracer_provider(mine)
        metrics.set_meter_provider(meters)
        from tokenlay_otel import configure
        done = configure(traces="console", metrics="console")
        assert done.tracer_provider is mine and not done.created_tracer_provider
        assert done.meter_provider is meters and not done.created_meter_provider
        print("OK")
        """,
        {},
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "tracer provider is already set up; left as is" in result.stderr
    assert "meter provider is already set up; left as is" in result.stderr


@pytest.mark.slow
def test_configure_twice_is_quiet_and_traces_each_call_once(server: FakeOpenAIServer) -> None:
    result = run_python(
        """
        import logging, sys, openai
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from tokenlay_otel import configure
        first = configure(traces="console", metrics="none")
        again = configure(traces="console", metrics="none")
        assert again.tracer_provider is first.tracer_provider
        assert not again.created_tracer_provider
        client = openai.OpenAI(api_key="sk-x", base_url=sys.argv[1] + "/v1")
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
        first.shutdown()
        """,
        {},
        server.url,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert "already instrumented; left as is" in result.stderr
    assert result.stdout.count('"name": "chat gpt-4o-mini"') == 1


def test_configure_rejects_unknown_exporters_listing_the_installed() -> None:
    from tokenlay_otel import configure

    with pytest.raises(ValueError, match=r"unknown exporter 'zipkinish'.*installed: .*console"):
        configure(traces="zipkinish", metrics="none")
    with pytest.raises(ValueError, match=r"installed: .*prometheus"):
        configure(traces="none", metrics="nope")


@pytest.mark.slow
def test_configure_prometheus_serves_metrics_over_http(server: FakeOpenAIServer) -> None:
    import urllib.request

    from tokenlay_otel.proxy.local import free_port

    port = free_port()
    app = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys, openai
            from tokenlay_otel import configure, metadata
            configure(service_name="prom-app", traces="none", metrics="prometheus")
            client = openai.OpenAI(api_key="sk-x", base_url=sys.argv[1] + "/v1")
            with metadata(user="u1", org="o1"):
                client.chat.completions.create(model="gpt-4o-mini", messages=[])
            print("called", flush=True)
            sys.stdin.read()  # serve /metrics until the test is done
            """), server.url],
        env={**os.environ, "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
             "OTEL_EXPORTER_PROMETHEUS_PORT": str(port)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert app.stdout is not None
        assert app.stdout.readline() == "called\n", app.communicate(timeout=30)[1]
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            scraped = answer.read().decode()
    finally:
        app.communicate(input="", timeout=30)
    assert app.returncode == 0
    samples = {
        line.split("{")[0]: line for line in scraped.splitlines() if not line.startswith("#")
    }
    for name in (
        "tokenlay_client_requests_total",
        "tokenlay_client_cost_USD_total",
        "gen_ai_client_token_usage_count",
        "gen_ai_client_operation_duration_seconds_count",
    ):
        assert name in samples, name
    requests = samples["tokenlay_client_requests_total"]
    assert 'tokenlay_user="u1"' in requests and 'tokenlay_org="o1"' in requests
    assert requests.endswith(" 1.0")


@pytest.mark.slow
def test_configure_names_the_package_of_a_missing_exporter(tmp_path: Path) -> None:
    """Without opentelemetry-exporter-prometheus installed, the error says what to install.

    The package is hidden for real: the child sees the site-packages folder without
    that distribution (no site module; a folder of links to everything else).
    """
    import site

    site_packages = next(
        p for p in map(Path, site.getsitepackages()) if (p / "opentelemetry").is_dir()
    )
    visible = tmp_path / "site-packages"
    visible.mkdir()
    for entry in site_packages.iterdir():
        if not entry.name.lower().startswith("opentelemetry_exporter_prometheus"):
            (visible / entry.name).symlink_to(entry)
    src = Path(__file__).parent.parent / "src"
    result = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(
            """
            from importlib.metadata import entry_points
            assert not entry_points(group="opentelemetry_metrics_exporter", name="prometheus")
            from tokenlay_otel import configure
            try:
                configure(traces="none", metrics="prometheus")
            except ValueError as exc:
                print(exc)
            """)],
        env={**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{visible}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pip install 'tokenlay-otel[prometheus]'" in result.stdout
    assert "opentelemetry-exporter-prometheus" in result.stdout
    assert "installed: " in result.stdout and "console" in result.stdout


@pytest.mark.slow
def test_configure_says_which_exporter_could_not_listen() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_python(
            """
            from opentelemetry import trace
            from tokenlay_otel import configure
            try:
                configure(traces="console", metrics="prometheus")
            except OSError as exc:
                print(exc)
            # Nothing global was installed before the failure.
            print(type(trace.get_tracer_provider()).__name__)
            """,
            {"OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
             "OTEL_EXPORTER_PROMETHEUS_PORT": str(taken.getsockname()[1])},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("metrics exporter 'prometheus' could not start:")
    assert lines[1] == "ProxyTracerProvider"


@pytest.mark.slow
def test_configure_reads_the_standard_env_vars(server: FakeOpenAIServer, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    result = run_python(
        """
        import sys, openai
        from tokenlay_otel import configure
        done = configure()
        openai.OpenAI(api_key="sk-x", base_url=sys.argv[1] + "/v1").embeddings.create(
            model="text-embedding-3-small", input="x")
        done.shutdown()
        """,
        {
            "OTEL_TRACES_EXPORTER": "tokenlay_ledger",
            "OTEL_METRICS_EXPORTER": "none",
            "TOKENLAY_LEDGER_PATH": str(ledger),
            "OTEL_SERVICE_NAME": "env-svc",
        },
        server.url,
    )
    assert result.returncode == 0, result.stderr
    report = io.StringIO()
    cli(["spend", "--db", str(ledger), "--by", "model", "--format", "json"], out=report)
    data = json.loads(report.getvalue())
    assert data["rows"][0]["key"] == "text-embedding-3-small"
    assert data["rows"][0]["input_tokens"] == 5


def ledger_calls(server: FakeOpenAIServer, instrument, telemetry: SpanCapture, path: Path) -> None:
    telemetry.provider.add_span_processor(SimpleSpanProcessor(LedgerSpanExporter(path)))
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    client = openai.OpenAI(api_key=PROVIDER_KEY, max_retries=0)
    for user, org, model in [
        ("alice", "acme", "gpt-4o-mini"),
        ("alice", "acme", "gpt-4o"),
        ("bob", "acme", "gpt-4o-mini"),
        ("carol", "globex", "gpt-4o"),
        ("dave", "globex", "unknown-model-x"),
    ]:
        with metadata(user=user, org=org, feature="chat", tenant="t1"):
            client.chat.completions.create(model=model, messages=MESSAGES)
    server.reply(
        Reply(
            status=429,
            body={"error": {"message": "limit"}},
            headers={"x-tokenlay-rule-action": "block"},
        )
    )
    with pytest.raises(openai.RateLimitError), metadata(user="erin", org="globex"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_ledger_rows_and_spend_report_match_the_cost_metric(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.db"
    ledger_calls(server, instrument, telemetry, path)
    import sqlite3

    rows = (
        sqlite3.connect(path)
        .execute(
            "SELECT user, org, feature, metadata, request_model, input_tokens, output_tokens,"
            " cost_source, rule_action, error_type, routed FROM llm_calls ORDER BY time_unix_nano"
        )
        .fetchall()
    )
    assert len(rows) == 6
    assert rows[0] == (
        "alice",
        "acme",
        "chat",
        '{"tenant": "t1"}',
        "gpt-4o-mini",
        12,
        7,
        "local",
        None,
        None,
        1,
    )
    assert rows[4][7] == "unknown"
    assert rows[5][8:10] == ("block", "429")

    out = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "org", "--since", "1h", "--format", "json"], out=out)
    report = json.loads(out.getvalue())
    by_org = {row["key"]: row for row in report["rows"]}
    assert by_org["acme"]["requests"] == 3
    assert by_org["globex"]["requests"] == 3
    assert by_org["globex"]["errors"] == 1
    assert by_org["globex"]["unpriced"] == 1
    costs = telemetry.metrics()["tokenlay.client.cost"][1]
    metric_total = sum(p.value for p in costs)
    assert report["total"]["cost_usd"] == pytest.approx(metric_total)
    for org in ("acme", "globex"):
        org_metric = sum(p.value for p in costs if p.attributes["tokenlay.org"] == org)
        assert by_org[org]["cost_usd"] == pytest.approx(org_metric)


def test_spend_table_and_csv(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.db"
    ledger_calls(server, instrument, telemetry, path)
    table = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "user"], out=table)
    lines = table.getvalue().splitlines()
    assert lines[0].split()[:3] == ["user", "requests", "errors"]
    assert lines[2].split()[0] == "alice"  # the biggest spender first
    assert lines[-1].split()[:2] == ["TOTAL", "6"]
    out = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "model", "--format", "csv"], out=out)
    *parsed, total = csv.DictReader(io.StringIO(out.getvalue()))
    assert {row["model"] for row in parsed} == {"gpt-4o", "gpt-4o-mini", "unknown-model-x"}
    assert total["model"] == "TOTAL"
    assert total["requests"] == "6"


def test_the_same_span_is_stored_once(tmp_path: Path, telemetry: SpanCapture) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tokenlay_otel")
    with tracer.start_as_current_span("chat m", attributes={"gen_ai.operation.name": "chat"}):
        pass
    with tracer.start_as_current_span("other"):
        pass
    ledger = LedgerSpanExporter(tmp_path / "l.db")
    spans = exporter.get_finished_spans()
    ledger.export(spans)
    ledger.export(spans)
    import sqlite3

    assert sqlite3.connect(tmp_path / "l.db").execute(
        "SELECT COUNT(*) FROM llm_calls"
    ).fetchone() == (1,)


@pytest.mark.slow
def test_several_processes_share_one_ledger(server: FakeOpenAIServer, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    code = """
        import sys, openai
        from tokenlay_otel import configure, metadata
        done = configure(traces="tokenlay_ledger", metrics="none")
        client = openai.OpenAI(api_key="sk-x", base_url=sys.argv[1] + "/v1")
        for i in range(40):
            with metadata(user=sys.argv[2], org="o"):
                client.chat.completions.create(model="gpt-4o-mini", messages=[])
        done.shutdown()
    """
    env = {**os.environ, "TOKENLAY_LEDGER_PATH": str(path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), server.url, f"p{i}"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    out = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "user", "--format", "json"], out=out)
    report = json.loads(out.getvalue())
    assert {row["key"]: row["requests"] for row in report["rows"]} == {
        f"p{i}": 40 for i in range(4)
    }


@pytest.mark.slow
def test_opentelemetry_instrument_with_the_ledger(server: FakeOpenAIServer, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, openai
            from tokenlay_otel import metadata
            client = openai.OpenAI(api_key="sk-x", base_url=sys.argv[1] + "/v1")
            with metadata(user="zero-code", org="z"):
                client.chat.completions.create(model="gpt-4o", messages=[])
            """
        )
    )
    ledger = tmp_path / "ledger.db"
    command = Path(sys.executable).parent / "opentelemetry-instrument"
    result = subprocess.run(
        [
            str(command),
            "--traces_exporter",
            "console,tokenlay_ledger",
            "--metrics_exporter",
            "none",
            "--logs_exporter",
            "none",
            sys.executable,
            str(script),
            server.url,
        ],
        env={**os.environ, "TOKENLAY_LEDGER_PATH": str(ledger)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = io.StringIO()
    cli(["spend", "--db", str(ledger), "--by", "user", "--format", "json"], out=out)
    (row,) = json.loads(out.getvalue())["rows"]
    assert row["key"] == "zero-code"
    assert row["cost_usd"] == pytest.approx(12 * 2.5e-6 + 7 * 10e-6)


@pytest.mark.slow
def test_spend_on_a_missing_ledger_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no-such-folder" / "ledger.db"
    assert cli(["spend", "--db", str(path)], out=io.StringIO()) == 1
    assert f"no spend ledger at {path}" in capsys.readouterr().err
    assert not path.parent.exists()  # nothing created on the way

    result = subprocess.run(
        [sys.executable, "-m", "tokenlay_otel.cli", "spend", "--db", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert str(path) in result.stderr
    assert not path.parent.exists()


def test_spend_on_a_file_that_is_not_a_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, but long enough to be read as a header " * 4)
    for path in (other, text):
        before = path.read_bytes()
        assert cli(["spend", "--db", str(path)], out=io.StringIO()) == 1
        assert f"{path} is not a spend ledger" in capsys.readouterr().err
        assert path.read_bytes() == before  # no table added to someone else's file


def test_spend_shows_small_costs_and_no_float_noise(tmp_path: Path) -> None:
    from .test_hostile_answers import write_ledger

    path = tmp_path / "ledger.db"
    write_ledger(
        path,
        [
            ("tiny", 1, 0, 4e-7),  # one token of a cheap model
            ("tinier", 1, 0, 2.5e-8),
            ("tenths", 1, 1, 0.1),
            ("tenths", 1, 1, 0.2),  # 0.1 + 0.2 is 0.30000000000000004 in floats
            ("unpriced", 1, 1, None),
        ],
    )

    def spend(*args: str) -> str:
        out = io.StringIO()
        assert cli(["spend", "--db", str(path), "--by", "user", "--since", "all", *args], out) == 0
        return out.getvalue()

    # The table: one number of decimals, three significant digits of the smallest cost.
    table = {line.split()[0]: line.split() for line in spend().splitlines()}
    cost = table["user"].index("cost_usd")
    assert {name: table[name][cost] for name in ("tiny", "tinier", "tenths", "unpriced")} == {
        "tiny": "0.0000004000",
        "tinier": "0.0000000250",
        "tenths": "0.3000000000",
        "unpriced": "0.0000000000",
    }
    assert table["TOTAL"][cost] == "0.3000004250"

    report = json.loads(spend("--format", "json"))
    by_user = {row["key"]: row["cost_usd"] for row in report["rows"]}
    assert by_user == {"tenths": 0.3, "tiny": 4e-7, "tinier": 2.5e-8, "unpriced": 0.0}
    assert report["total"]["cost_usd"] == 0.300000425

    rows = list(csv.reader(io.StringIO(spend("--format", "csv"))))
    column = rows[0].index("cost_usd")
    assert rows[1][0] == "tenths"
    assert rows[1][column] == "0.3"
    assert rows[-1][:2] == ["TOTAL", "5"]  # the TOTAL row, as in the table
    assert rows[-1][column] == "0.300000425"
    assert rows[-1][rows[0].index("unpriced")] == "1"


def test_spend_table_with_a_cost_too_small_for_decimals(tmp_path: Path) -> None:
    from .test_hostile_answers import write_ledger

    path = tmp_path / "ledger.db"
    write_ledger(path, [("dust", 1, 0, 3e-18), ("free", 1, 0, 0.0)])
    out = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "user", "--since", "all"], out=out)
    table = {line.split()[0]: line.split()[-2] for line in out.getvalue().splitlines()}
    assert table["dust"] == "3e-18"
    assert table["free"] == "0." + "0" * 15


def test_since_parsing() -> None:
    assert parse_since("all") == 0
    assert parse_since("2h", now=10_000) == int((10_000 - 7200) * 1e9)
    with pytest.raises(Exception, match="invalid --since"):
        parse_since("yesterday")
