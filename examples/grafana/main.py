"""Send attributed traffic to the deploy/grafana stack (or any OTLP endpoint).

Uses `configure()` with OTLP exporters (OTEL_EXPORTER_OTLP_ENDPOINT, default
http://localhost:4317) and the local proxy with the demo rules, so blocks, downgrades
and warnings show up in the dashboards. `--calls N` sets how many calls to make.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import openai

from tokenlay_otel import TokenlayOpenAI, configure, metadata
from tokenlay_otel.proxy.local import tokenlay_or_local

USERS = [
    ("acme", "alice", "pro"),
    ("acme", "bob", "free"),
    ("globex", "carol", "team"),
    ("globex", "dan", "team"),
    ("initech", "erin", "enterprise"),
]
MODELS = ["gpt-4o", "gpt-4o-mini", "o3-mini"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args(argv)
    done = configure(
        service_name="grafana-example",
        traces="otlp",
        metrics="otlp",
        metric_export_interval_ms=5000,
    )
    rules = Path(__file__).parent.parent / "demo" / "rules.yaml"
    rng = random.Random(7)
    outcomes: dict[str, int] = {}
    with tokenlay_or_local(rules=rules) as endpoint:
        client = TokenlayOpenAI(max_retries=0, **endpoint)
        for i in range(args.calls):
            org, user, plan = rng.choice(USERS)
            with metadata(org=org, user=user, plan=plan, feature=rng.choice(["chat", "search"])):
                try:
                    kwargs = {
                        "model": rng.choice(MODELS),
                        "messages": [{"role": "user", "content": f"q{i}"}],
                    }
                    if i % 4 == 0:
                        list(client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
                    else:
                        client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except openai.APIStatusError as err:
                    outcomes[str(err.status_code)] = outcomes.get(str(err.status_code), 0) + 1
    done.shutdown()
    print(f"sent {args.calls} calls: {outcomes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
