"""`configure()`: tracing and metrics set up in one call, exporters chosen by name.

Names are OpenTelemetry's own (`OTEL_TRACES_EXPORTER`): here the console and the spend
ledger for traces, the console for metrics. Any installed exporter works by its name.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from tokenlay_otel import TokenlayOpenAI, configure, metadata
from tokenlay_otel.cli import main as tokenlay_cli
from tokenlay_otel.proxy.local import tokenlay_or_local


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tokenlay-example-") as folder:
        return run(Path(folder) / "ledger.db")


def run(ledger: Path) -> int:
    os.environ["TOKENLAY_LEDGER_PATH"] = str(ledger)
    done = configure(
        service_name="configure-example",
        traces=["console", "tokenlay_ledger"],
        metrics="console",
    )
    with tokenlay_or_local() as endpoint:
        client = TokenlayOpenAI(**endpoint)
        for user in ("ann", "ben"):
            with metadata(user=user, org="acme"):
                client.embeddings.create(model="text-embedding-3-small", input="hello")
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
    done.shutdown()  # flush spans, print the metrics once
    return tokenlay_cli(["spend", "--db", str(ledger), "--by", "user"])


if __name__ == "__main__":
    sys.exit(main())
