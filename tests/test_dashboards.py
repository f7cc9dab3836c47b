"""The Grafana stack's files are consistent, and every dashboard query names metrics and
labels that the SDK and the proxy really emit (checked on a live Prometheus scrape)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import promql_parser
import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from tokenlay_otel import TokenlayInstrumentor, TokenlayOpenAI, metadata
from tokenlay_otel._config import Settings
from tokenlay_otel.proxy.local import DEFAULT_LOCAL_KEY, free_port, local_proxy

ROOT = Path(__file__).parent.parent
STACK = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((STACK / "grafana" / "dashboards").glob("*.json"))
VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


@pytest.fixture(scope="module")
def scraped() -> dict[str, set[str]]:
    """Sample name -> label names, from a scrape after a realistic mix of calls."""
    port = free_port()
    http_server, _ = start_http_server(port, addr="127.0.0.1")
    reader = PrometheusMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    instrumentor = TokenlayInstrumentor()
    instrumentor.instrument(tracer_provider=TracerProvider(), meter_provider=meters,
                            settings=Settings())  # fmt: skip
    rules = ROOT / "examples" / "demo" / "rules.yaml"
    try:
        with local_proxy(rules=rules, meter_provider=meters) as url:
            client = TokenlayOpenAI(provider_api_key="sk-x", tokenlay_key=DEFAULT_LOCAL_KEY,
                                    tokenlay_base_url=url, max_retries=0)  # fmt: skip
            calls = [("bob", "free", "gpt-4o")] * 4 + [("alice", "pro", "gpt-4o")] * 4
            calls += [("carol", "team", "gpt-4o")] * 8 + [("erin", "x", "no-price-model")]
            for user, plan, model in calls:
                with (
                    metadata(user=user, org=f"org-{plan}", plan=plan),
                    contextlib.suppress(openai.RateLimitError),
                ):
                    client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "hi"}]
                    )
            with metadata(user="sam", org="org-stream"):
                stream = client.chat.completions.create(
                    model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "s"}]
                )
                list(stream)
            # While the proxy runs: its limit gauges are read from its store at scrape.
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        instrumentor.uninstrument()
        meters.shutdown()
        http_server.shutdown()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def queries(path: Path) -> list[tuple[str, str]]:
    board = json.loads(path.read_text())
    out = [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]
    assert out, f"{path.name} has no queries"
    return out


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\w+", ".*", expr)


def selections(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(metric, labels it is filtered on) per selector, and labels grouped or matched on."""
    selectors: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append((node.name, {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            grouping.update(matching.labels if matching is not None else ())
        return True

    promql_parser.walk(promql_parser.parse(substitute(expr)), visit)
    return selectors, grouping


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_every_query_names_real_metrics_and_labels(
    path: Path, scraped: dict[str, set[str]]
) -> None:
    for title, expr in queries(path):
        selectors, grouping = selections(expr)
        assert selectors, f"{title}: no metric in {expr}"
        labels_in_scope: set[str] = set()
        for metric, labels in selectors:
            assert metric in scraped, f"{title}: {metric} is not emitted ({sorted(scraped)[:8]}...)"
            missing = labels - scraped[metric]
            assert not missing, f"{title}: {metric} has no label(s) {missing}"
            labels_in_scope |= scraped[metric]
        assert grouping <= labels_in_scope, f"{title}: grouping on {grouping - labels_in_scope}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_template_variables_name_real_labels(path: Path, scraped: dict[str, set[str]]) -> None:
    board = json.loads(path.read_text())
    for variable in board["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        metric, label = match.groups()
        assert label in scraped[metric], f"${variable['name']}: {metric} has no {label}"


def test_the_queries_cover_what_the_issue_asks_for() -> None:
    spend = " ".join(expr for _, expr in queries(STACK / "grafana/dashboards/llm-spend.json"))
    for needle in ("by (tokenlay_org)", "by (tokenlay_user)", "by (gen_ai_response_model)",
                   "topk(10", "tokenlay_client_cached_tokens_total", "gen_ai_token_type",
                   "error_type", "time_to_first_chunk", "tokenlay_rule_action",
                   'tokenlay_model_shifted="true"', 'tokenlay_cost_source="unknown"',
                   'tokenlay_proxy_bypassed="true"'):  # fmt: skip
        assert needle in spend, needle
    board = json.loads((STACK / "grafana/dashboards/llm-spend.json").read_text())
    assert {v["name"] for v in board["templating"]["list"]} == {"org", "user", "model", "provider"}
    latency = [p for p in board["panels"] if p["title"].startswith("Latency")]
    assert latency and all(t["exemplar"] for t in latency[0]["targets"])


def build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(STACK / "build_dashboards.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_dashboards_are_up_to_date_with_their_generator() -> None:
    result = build("--check")
    assert result.returncode == 0, result.stderr
    assert f"{len(DASHBOARDS)} dashboards up to date" in result.stdout


@pytest.mark.slow
def test_check_names_each_file_that_differs(tmp_path: Path) -> None:
    for path in DASHBOARDS:
        shutil.copy(path, tmp_path / path.name)
    assert build("--check", "--out", str(tmp_path)).returncode == 0
    edited, removed = tmp_path / DASHBOARDS[0].name, tmp_path / DASHBOARDS[1].name
    edited.write_text(edited.read_text().replace("p95", "p96"))
    removed.unlink()
    (tmp_path / "stray.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    result = build("--check", "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[:3] == [
        f"out of date: {edited}",
        f"missing: {removed}",
        f"not built by this script: {tmp_path / 'stray.json'}",
    ]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # wrote nothing

    assert build("--out", str(tmp_path)).returncode == 0  # rebuilds; the stray file stays
    assert build("--check", "--out", str(tmp_path)).stderr.splitlines() == [
        f"not built by this script: {tmp_path / 'stray.json'}",
        "run: python build_dashboards.py to rebuild them",
    ]


@pytest.mark.slow
def test_help_writes_nothing() -> None:
    before = {p: p.stat().st_mtime_ns for p in DASHBOARDS}
    result = build("--help")
    assert result.returncode == 0
    assert "--check" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in DASHBOARDS} == before


def test_compose_and_provisioning_files_are_consistent() -> None:
    compose = yaml.safe_load((STACK / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"otel-collector", "prometheus", "tempo", "grafana", "tokenlay-proxy"} <= set(services)
    for name, service in services.items():
        if "image" in service:
            assert re.search(r":v?\d", service["image"]), f"{name}: pin the image version"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (STACK / source).exists(), f"{name}: {source} does not exist"
        if "build" in service:
            context = STACK / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).exists()
    prometheus = services["prometheus"]["command"]
    assert "--web.enable-otlp-receiver" in prometheus
    assert "--enable-feature=exemplar-storage" in prometheus

    collector = yaml.safe_load((STACK / "otel-collector.yaml").read_text())
    pipelines = collector["service"]["pipelines"]
    for pipeline in pipelines.values():
        assert set(pipeline["receivers"]) <= set(collector["receivers"])
        assert set(pipeline["exporters"]) <= set(collector["exporters"])
    assert (
        "prometheus:9090/api/v1/otlp" in collector["exporters"]["otlphttp/prometheus"]["endpoint"]
    )
    yaml.safe_load((STACK / "prometheus.yaml").read_text())
    yaml.safe_load((STACK / "tempo.yaml").read_text())

    sources = yaml.safe_load(
        (STACK / "grafana/provisioning/datasources/datasources.yaml").read_text()
    )["datasources"]
    uids = {s["uid"] for s in sources}
    prom = next(s for s in sources if s["type"] == "prometheus")
    links = prom["jsonData"]["exemplarTraceIdDestinations"]
    assert links == [{"name": "trace_id", "datasourceUid": "tempo"}]
    assert "tempo" in uids
    providers = yaml.safe_load(
        (STACK / "grafana/provisioning/dashboards/dashboards.yaml").read_text()
    )["providers"]
    mount = next(v for v in services["grafana"]["volumes"] if "dashboards:" in v).split(":")[1]
    assert providers[0]["options"]["path"] == mount
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] in uids


ALERTS = STACK / "alerts.yaml"
ALERT_TESTS = STACK / "alerts_test.yaml"
# Labels Prometheus adds at ingestion, not the exporter.
PROMETHEUS_LABELS = {"job", "instance"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (.ci/run does)")
    return subprocess.run(
        [binary, *args], cwd=STACK, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
def test_alert_rules_are_valid_and_fire_on_the_series_of_their_unit_tests() -> None:
    checked = _promtool("check", "rules", ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", ALERT_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def _rules() -> list[dict[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_name_real_metrics_and_labels(scraped: dict[str, set[str]]) -> None:
    rules = _rules()
    recorded = {r["record"] for r in rules if "record" in r}
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert alerts == {
        "TokenlayLimitNearlyReached",
        "TokenlayLimitReached",
        "TokenlayBlockSurge",
        "TokenlayUpstreamErrors",
        "TokenlayOrgCostBurn",
        "TokenlayProxyBypassed",
    }
    for rule in rules:
        name = rule.get("alert") or rule["record"]
        selectors, grouping = selections(rule["expr"])
        in_scope = set(PROMETHEUS_LABELS)
        for metric, labels in selectors:
            if metric in recorded:
                continue
            assert metric in scraped, f"{name}: {metric} is not emitted"
            assert labels <= scraped[metric] | PROMETHEUS_LABELS, f"{name}: {labels}"
            in_scope |= scraped[metric]
        assert grouping <= in_scope, f"{name}: grouping on {grouping - in_scope}"


def test_alert_unit_tests_use_series_shaped_like_the_real_ones(
    scraped: dict[str, set[str]],
) -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    series = [s["series"] for test in tests for s in test["input_series"]]
    assert len(series) >= 10
    for text in series:
        (selector,), _ = selections(text)
        metric, labels = selector
        assert metric in scraped, f"{metric} is not emitted"
        assert labels <= scraped[metric] | PROMETHEUS_LABELS, f"{metric}: {labels}"


def test_the_compose_prometheus_loads_the_alert_rules() -> None:
    compose = yaml.safe_load((STACK / "docker-compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    config = yaml.safe_load((STACK / "prometheus.yaml").read_text())
    assert config["rule_files"] == [mounts["./alerts.yaml"]]


def test_the_stack_readme_routes_apps_through_the_compose_proxy() -> None:
    """The settings deploy/grafana/README.md gives an app, host and container, route to
    the compose proxy; the container's need TOKENLAY_ALLOW_HTTP_HOSTS to."""
    text = (STACK / "README.md").read_text()
    host_env = dict(
        re.findall(r"(\w+)=(\S+)", re.search(r"```bash\nexport TOKENLAY_BASE_URL.*?```",
                                             text, re.S).group())  # type: ignore[union-attr]
    )  # fmt: skip
    snippet = re.search(r"```yaml\n(  my-app:.*?)```", text, re.S)
    assert snippet
    service = yaml.safe_load(snippet.group(1))["my-app"]
    compose = yaml.safe_load((STACK / "docker-compose.yaml").read_text())
    proxy = compose["services"]["tokenlay-proxy"]
    assert set(service["depends_on"]) <= set(compose["services"])
    assert f"{compose['name']}_default" in text  # the network another project joins
    for env, url in ((host_env, "http://localhost:8787"),
                     (service["environment"], "http://tokenlay-proxy:8787")):  # fmt: skip
        assert env["TOKENLAY_KEY"] in proxy["environment"]["TOKENLAY_PROXY_KEYS"].split(",")
        assert env["TOKENLAY_BASE_URL"].endswith(":8787") and "--port=8787" in proxy["command"]
        settings, problems = Settings.read_env(env)
        assert problems == ()
        route = settings.instrumented_route()
        assert route is not None and route.tokenlay_base_url == url

    without = {k: v for k, v in service["environment"].items() if k != "TOKENLAY_ALLOW_HTTP_HOSTS"}
    settings, problems = Settings.read_env(without)
    assert settings.instrumented_route() is None
    assert "TOKENLAY_ALLOW_HTTP_HOSTS=tokenlay-proxy" in problems[0]
