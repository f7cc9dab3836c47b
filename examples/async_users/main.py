"""Many concurrent users on one async client: each call carries its own attribution.

200 asyncio tasks, 50 users in 5 orgs; `metadata()` is per task, so no call is ever
attributed to another task's user. Prints the tokens and cost per org from the metrics.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tokenlay_otel import AsyncTokenlayOpenAI, TokenlayInstrumentor, metadata
from tokenlay_otel.proxy.local import tokenlay_or_local


async def run(client: AsyncTokenlayOpenAI) -> None:
    async def one(i: int) -> None:
        user, org = f"user-{i % 50}", f"org-{i % 5}"
        with metadata(user=user, org=org):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"question {i}"}]
            )

    await asyncio.gather(*(one(i) for i in range(200)))


def main() -> int:
    reader = InMemoryMetricReader()
    TokenlayInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    with tokenlay_or_local() as endpoint:
        asyncio.run(run(AsyncTokenlayOpenAI(**endpoint)))
    cost: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    org = str(point.attributes.get("tokenlay.org"))
                    if metric.name == "tokenlay.client.cost":
                        cost[org] += point.value
                    elif metric.name == "tokenlay.client.requests":
                        calls[org] += point.value
    for org in sorted(calls):
        print(f"{org}: {calls[org]} calls, ${cost[org]:.6f}")
    return 0 if sum(calls.values()) == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
