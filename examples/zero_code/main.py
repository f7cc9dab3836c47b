"""Run app.py under `opentelemetry-instrument`, against the local proxy (offline).

Equivalent to:
    TOKENLAY_KEY=... TOKENLAY_BASE_URL=... opentelemetry-instrument \\
        --traces_exporter console --metrics_exporter none python app.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tokenlay_otel.proxy.local import DEFAULT_LOCAL_KEY, local_proxy


def main() -> int:
    here = Path(__file__).parent
    command = Path(sys.executable).parent / "opentelemetry-instrument"
    with local_proxy() as url:
        env = {
            **os.environ,
            "TOKENLAY_KEY": DEFAULT_LOCAL_KEY,
            "TOKENLAY_BASE_URL": url,
            "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "sk-local-mock"),
            "OTEL_SERVICE_NAME": "zero-code-example",
        }
        return subprocess.call(
            [str(command), "--traces_exporter", "console", "--metrics_exporter", "none",
             "--logs_exporter", "none", sys.executable, str(here / "app.py")],
            env=env,
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
