"""Write the provisioned Grafana dashboards (run after changing a query).

    python deploy/grafana/build_dashboards.py           # write them
    python deploy/grafana/build_dashboards.py --check   # exit 1 if the files differ

Every query names metrics and labels the SDK and the proxy really emit; the test suite
checks that against a live scrape, and that the JSON files are up to date with this
script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "grafana" / "dashboards"
PROM = {"type": "prometheus", "uid": "prometheus"}
F = (
    'tokenlay_org=~"$org", tokenlay_user=~"$user", '
    'gen_ai_request_model=~"$model", gen_ai_provider_name=~"$provider"'
)
RATE = "$__rate_interval"


def variable(
    name: str, label: str, metric: str = "tokenlay_client_requests_total"
) -> dict[str, Any]:
    return {
        "name": name,
        "label": label.replace("_", " "),
        "type": "query",
        "datasource": PROM,
        "query": {"query": f"label_values({metric}, {label})", "refId": f"var-{name}"},
        "definition": f"label_values({metric}, {label})",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


class Board:
    def __init__(self, uid: str, title: str, variables: list[dict[str, Any]]) -> None:
        self.uid, self.title, self.variables = uid, title, variables
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = 0

    def panel(
        self,
        title: str,
        queries: list[tuple[str, str]],
        *,
        kind: str = "timeseries",
        unit: str = "short",
        width: int = 12,
        exemplars: bool = False,
        instant: bool = False,
        description: str = "",
    ) -> None:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + 8
        targets = [
            {
                "datasource": PROM,
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "exemplar": exemplars,
                "instant": instant,
                "range": not instant,
            }
            for i, (expr, legend) in enumerate(queries)
        ]
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": kind,
                "title": title,
                "description": description,
                "datasource": PROM,
                "gridPos": {"h": 8, "w": width, "x": self._x, "y": self._y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"showLegend": True, "displayMode": "list"}},
                "targets": targets,
            }
        )
        self._x += width

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "tags": ["tokenlay", "llm"],
            "timezone": "browser",
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def llm_spend() -> Board:
    b = Board(
        "tokenlay-llm-spend",
        "LLM spend",
        [
            variable("org", "tokenlay_org"),
            variable("user", "tokenlay_user"),
            variable("model", "gen_ai_request_model"),
            variable("provider", "gen_ai_provider_name"),
        ],
    )
    cost = f"tokenlay_client_cost_USD_total{{{F}}}"
    requests = f"tokenlay_client_requests_total{{{F}}}"
    b.panel(
        "Spend by org ($/hour)",
        [(f"sum by (tokenlay_org) (rate({cost}[{RATE}])) * 3600", "{{tokenlay_org}}")],
        unit="currencyUSD",
    )
    b.panel(
        "Spend by user ($/hour)",
        [(f"sum by (tokenlay_user) (rate({cost}[{RATE}])) * 3600", "{{tokenlay_user}}")],
        unit="currencyUSD",
    )
    b.panel(
        "Spend by model ($/hour)",
        [
            (
                f"sum by (gen_ai_response_model) (rate({cost}[{RATE}])) * 3600",
                "{{gen_ai_response_model}}",
            )
        ],
        unit="currencyUSD",
    )
    b.panel(
        "Top 10 spenders (time range)",
        [
            (
                f"topk(10, sum by (tokenlay_org, tokenlay_user) (increase({cost}[$__range])))",
                "{{tokenlay_org}} / {{tokenlay_user}}",
            )
        ],
        kind="bargauge",
        unit="currencyUSD",
        instant=True,
    )
    b.panel(
        "Total spend (time range)",
        [(f"sum(increase({cost}[$__range]))", "spend")],
        kind="stat",
        unit="currencyUSD",
        width=6,
        instant=True,
    )
    b.panel(
        "Cost per request",
        [(f"sum(rate({cost}[{RATE}])) / sum(rate({requests}[{RATE}]))", "USD / request")],
        unit="currencyUSD",
        width=6,
    )
    b.panel(
        "Tokens in / out (per second)",
        [
            (
                f"sum by (gen_ai_token_type) (rate(gen_ai_client_token_usage_sum{{{F}}}[{RATE}]))",
                "{{gen_ai_token_type}}",
            ),
            (f"sum(rate(tokenlay_client_cached_tokens_total{{{F}}}[{RATE}]))", "cached input"),
        ],
    )
    b.panel(
        "Requests by proxy decision",
        [(f"sum by (tokenlay_rule_action) (rate({requests}[{RATE}]))", "{{tokenlay_rule_action}}")],
        unit="reqps",
    )
    b.panel(
        "Request rate and errors by error.type",
        [
            (f"sum(rate({requests}[{RATE}]))", "all requests"),
            (
                f'sum by (error_type) (rate(tokenlay_client_requests_total{{{F}, error_type!=""}}[{RATE}]))',
                "error {{error_type}}",
            ),
        ],
        unit="reqps",
    )
    for title, metric in (
        (
            "Latency p50 / p95 (click an exemplar for its trace)",
            "gen_ai_client_operation_duration_seconds",
        ),
        (
            "Time to first chunk p50 / p95 (streams)",
            "gen_ai_client_operation_time_to_first_chunk_seconds",
        ),
    ):
        b.panel(
            title,
            [
                (
                    f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{F}}}[{RATE}])))",
                    f"p{int(q * 100)}",
                )
                for q in (0.5, 0.95)
            ],
            unit="s",
            exemplars=True,
        )
    b.panel(
        "Downgrades: model shifted by the proxy",
        [
            (
                f'sum by (gen_ai_request_model, gen_ai_response_model) (rate(tokenlay_client_requests_total{{{F}, tokenlay_model_shifted="true"}}[{RATE}]))',
                "{{gen_ai_request_model}} -> {{gen_ai_response_model}}",
            )
        ],
        unit="reqps",
        width=8,
    )
    b.panel(
        "Unpriced calls (no known price)",
        [
            (
                f'sum by (gen_ai_request_model) (rate(tokenlay_client_requests_total{{{F}, tokenlay_cost_source="unknown", error_type=""}}[{RATE}]))',
                "{{gen_ai_request_model}}",
            )
        ],
        unit="reqps",
        width=8,
    )
    b.panel(
        "Proxy bypasses (fail-open)",
        [
            (
                f'sum(rate(tokenlay_client_requests_total{{{F}, tokenlay_proxy_bypassed="true"}}[{RATE}]))',
                "bypassed",
            )
        ],
        unit="reqps",
        width=8,
    )
    return b


def proxy() -> Board:
    b = Board("tokenlay-proxy", "Tokenlay proxy", [])
    b.panel(
        "Decisions by action",
        [
            (
                f"sum by (tokenlay_rule_action) (rate(tokenlay_proxy_decisions_total[{RATE}]))",
                "{{tokenlay_rule_action}}",
            )
        ],
        unit="reqps",
    )
    b.panel(
        "Decisions by rule (time range)",
        [
            (
                "sum by (tokenlay_rule_id, tokenlay_rule_action) "
                "(increase(tokenlay_proxy_decisions_total[$__range]))",
                "{{tokenlay_rule_id}} {{tokenlay_rule_action}}",
            )
        ],
        kind="bargauge",
        instant=True,
    )
    b.panel(
        "Closest to their limits (now)",
        [
            (
                "topk(10, max by (tokenlay_rule_id, tokenlay_limit_type, tokenlay_limit_window, "
                "tokenlay_limit_field, tokenlay_limit_value) "
                "(tokenlay_proxy_limit_utilization))",
                "{{tokenlay_limit_field}} {{tokenlay_limit_value}}: {{tokenlay_limit_type}} "
                "per {{tokenlay_limit_window}} ({{tokenlay_rule_id}})",
            )
        ],
        kind="bargauge",
        unit="percentunit",
        instant=True,
        description="Each limited user, org... by the share of its limit used in the "
        "current window; read from the proxy's store.",
    )
    b.panel(
        "Blocked and downgraded (limits hit)",
        [
            (
                "sum by (tokenlay_rule_id, tokenlay_rule_action) (rate("
                f'tokenlay_proxy_decisions_total{{tokenlay_limit_exceeded="true"}}[{RATE}]))',
                "{{tokenlay_rule_id}} {{tokenlay_rule_action}}",
            )
        ],
        unit="reqps",
        description="Calls past a limit, by what the rule did: block, allow (downgraded "
        "to a cheaper model), warn or queue.",
    )
    b.panel(
        "Calls settled, by how they ended and where their usage came from",
        [
            (
                "sum by (tokenlay_proxy_exit, tokenlay_usage_source) "
                f"(rate(tokenlay_proxy_settlements_total[{RATE}]))",
                "{{tokenlay_proxy_exit}} / {{tokenlay_usage_source}}",
            )
        ],
        unit="reqps",
    )
    b.panel(
        "Upstream latency p50 / p95",
        [
            (
                f"histogram_quantile({q}, sum by (le) "
                f"(rate(tokenlay_proxy_upstream_duration_seconds_bucket[{RATE}])))",
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.95)
        ],
        unit="s",
        exemplars=True,
    )
    b.panel(
        "Upstream responses by status",
        [
            (
                f"sum by (http_response_status_code) "
                f"(rate(tokenlay_proxy_upstream_duration_seconds_count[{RATE}]))",
                "{{http_response_status_code}}",
            )
        ],
        unit="reqps",
    )
    return b


def render() -> dict[str, str]:
    return {
        f"{board.uid.removeprefix('tokenlay-')}.json": json.dumps(board.json(), indent=2) + "\n"
        for board in (llm_spend(), proxy())
    }


def differences(folder: Path, rendered: dict[str, str]) -> list[str]:
    """One line per dashboard file in ``folder`` that is not what ``rendered`` holds."""
    lines = []
    for name, text in rendered.items():
        path = folder / name
        if not path.exists():
            lines.append(f"missing: {path}")
        elif path.read_text() != text:
            lines.append(f"out of date: {path}")
    for path in sorted(folder.glob("*.json")):
        if path.name not in rendered:
            lines.append(f"not built by this script: {path}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the provisioned Grafana dashboards from the queries in this script."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1, naming each file, when the dashboards differ from "
        "what this script builds",
    )
    parser.add_argument(
        "--out", type=Path, default=OUT, help="the dashboards folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    rendered = render()
    if args.check:
        stale = differences(args.out, rendered)
        for line in stale:
            print(line, file=sys.stderr)
        if stale:
            print(f"run: python {Path(__file__).name} to rebuild them", file=sys.stderr)
            return 1
        print(f"{len(rendered)} dashboards up to date in {args.out}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
