"""Evaluate every dashboard query in a real Prometheus (Debian's package) that scrapes
the SDK's and the proxy's metrics while traffic runs: each panel must return data."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import start_http_server

from tokenlay_otel import TokenlayInstrumentor, TokenlayOpenAI, metadata
from tokenlay_otel._config import Settings
from tokenlay_otel.proxy.local import DEFAULT_LOCAL_KEY, local_proxy

from .proxy_harness import free_port, wait_http
from .test_dashboards import DASHBOARDS, ROOT, STACK

pytestmark = pytest.mark.slow  # a real Prometheus scraping for seconds

# Panels that show something only when it happens; the traffic below never bypasses
# the proxy (fail-open is off), so that panel stays empty by design.
EMPTY_BY_DESIGN = {"Proxy bypasses (fail-open)"}
SCRAPE_S = 1


def traffic(client: TokenlayOpenAI, stop: threading.Event) -> None:
    plans = [("bob", "free", "gpt-4o"), ("alice", "pro", "gpt-4o"), ("carol", "team", "gpt-4o"),
             ("erin", "x", "no-price-model"), ("sam", "x", "gpt-4o-mini")]  # fmt: skip
    i = 0
    while not stop.is_set():
        user, plan, model = plans[i % len(plans)]
        with (
            metadata(user=user, org=f"org-{plan}", plan=plan),
            contextlib.suppress(openai.RateLimitError),
        ):
            messages = [{"role": "user", "content": f"q{i % 3}"}]
            if user == "sam":
                list(client.chat.completions.create(model=model, messages=messages, stream=True))
            else:
                client.chat.completions.create(model=model, messages=messages)
        i += 1
        time.sleep(0.02)


def _alert_expr(name: str) -> str:
    groups = yaml.safe_load((STACK / "alerts.yaml").read_text())["groups"]
    return next(r["expr"] for g in groups for r in g["rules"] if r.get("alert") == name)


def query(port: int, expr: str) -> list[object]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def test_every_panel_returns_data(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's prometheus package is not installed (.ci/run installs it)")
    metrics_port, prom_port = free_port(), free_port()
    http_server, _ = start_http_server(metrics_port, addr="127.0.0.1")
    meters = MeterProvider(metric_readers=[PrometheusMetricReader()])
    instrumentor = TokenlayInstrumentor()
    instrumentor.instrument(tracer_provider=TracerProvider(), meter_provider=meters,
                            settings=Settings())  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: {SCRAPE_S}s, evaluation_interval: {SCRAPE_S}s}}\n"
        f"rule_files: ['{STACK / 'alerts.yaml'}']\n"
        "scrape_configs:\n"
        f"  - job_name: sdk\n    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stop = threading.Event()
    try:
        wait_http(f"http://127.0.0.1:{prom_port}/-/ready", timeout=30)
        rules = ROOT / "examples" / "demo" / "rules.yaml"
        with local_proxy(rules=rules, meter_provider=meters) as url:
            client = TokenlayOpenAI(provider_api_key="sk-x", tokenlay_key=DEFAULT_LOCAL_KEY,
                                    tokenlay_base_url=url, max_retries=0)  # fmt: skip
            worker = threading.Thread(target=traffic, args=(client, stop), daemon=True)
            worker.start()
            time.sleep(12 * SCRAPE_S)
            results = {}
            for path in DASHBOARDS:
                for panel in json.loads(path.read_text())["panels"]:
                    for target in panel["targets"]:
                        expr = (
                            target["expr"]
                            .replace("$__rate_interval", "5s")
                            .replace("$__range", "30s")
                        )
                        for var in ("$org", "$user", "$model", "$provider"):
                            expr = expr.replace(var, ".*")
                        results[(path.name, panel["title"], target["refId"])] = query(
                            prom_port, expr
                        )
            rules = json.loads(
                urllib.request.urlopen(
                    f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=10
                ).read()
            )["data"]["groups"]
            at_limit = query(prom_port, _alert_expr("TokenlayLimitReached"))
            stop.set()
            worker.join(timeout=10)
    finally:
        stop.set()
        prometheus.terminate()
        prometheus.wait(timeout=10)
        instrumentor.uninstrument()
        meters.shutdown()
        http_server.shutdown()
    # The alert rules load and evaluate on the real series; bob (3 free requests a
    # day, called again and again) is at his limit.
    evaluated = [r for group in rules for r in group["rules"]]
    assert len(evaluated) == 9
    assert all(r["health"] == "ok" for r in evaluated), [r.get("lastError") for r in evaluated]
    assert {(s["metric"]["tokenlay_limit_value"], s["metric"]["tokenlay_limit_type"])  # type: ignore[index]
            for s in at_limit} >= {("bob", "requests")}  # fmt: skip
    empty = sorted(key for key, data in results.items() if not data)
    assert [key for key in empty if key[1] not in EMPTY_BY_DESIGN] == []
    assert len(results) >= 20
