from __future__ import annotations

import json

import openai
import openai._base_client as base_client
import pytest
from opentelemetry.sdk.metrics.view import View

from tokenlay_otel import metadata
from tokenlay_otel.testing import chat_completion

from .conftest import PROVIDER_KEY, SpanCapture

pytestmark = pytest.mark.slow  # 5,000 users

# openai 1.x sends with httpx, 3.x with httpx2: use whichever this openai uses.
httpx = getattr(base_client, "httpx2", None) or base_client.httpx


def in_process_client() -> openai.OpenAI:
    body = json.dumps(chat_completion("gpt-4o-mini")).encode()

    def handler(request: object) -> object:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    http_client = httpx.Client(transport=httpx.MockTransport(handler))
    return openai.OpenAI(
        api_key=PROVIDER_KEY, base_url="https://api.openai.com/v1", http_client=http_client
    )


def test_5000_users_are_capped_on_metrics_but_not_on_spans(
    instrument, telemetry: SpanCapture
) -> None:
    # The SDK's own limit (2000 attribute sets per instrument by default) is raised, as
    # configure() does, so that what is measured here is our cap alone.
    view = View(meter_name="tokenlay_otel", aggregation_cardinality_limit=20_000)
    wide = SpanCapture(views=[view])
    telemetry.meter_provider, telemetry.reader = wide.meter_provider, wide.reader
    instrument(TOKENLAY_METRIC_USER_LIMIT="1000")
    client = in_process_client()
    for i in range(5000):
        with metadata(user=f"user-{i}", org=f"org-{i % 3}"):
            client.chat.completions.create(model="gpt-4o-mini", messages=[])
    for name, (_, data_points) in telemetry.metrics().items():
        users = {p.attributes["tokenlay.user"] for p in data_points}
        assert len(users) <= 1001, name
        assert "_other" in users
        assert {f"user-{i}" for i in range(1000)} <= users
        assert {p.attributes["tokenlay.org"] for p in data_points} == {"org-0", "org-1", "org-2"}
    requests = telemetry.metrics()["tokenlay.client.requests"][1]
    assert sum(p.value for p in requests) == 5000
    other = [p.value for p in requests if p.attributes["tokenlay.user"] == "_other"]
    assert sum(other) == 4000
    spans = telemetry.spans()
    assert len(spans) == 5000
    assert {s.attributes["tokenlay.user"] for s in spans} == {f"user-{i}" for i in range(5000)}
