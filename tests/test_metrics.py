from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest

from tokenlay_otel import TokenlayInstrumentor, metadata
from tokenlay_otel._config import Settings
from tokenlay_otel._metrics import DURATION_BUCKETS, TOKEN_BUCKETS
from tokenlay_otel._pricing import load_price_overrides
from tokenlay_otel.testing import FakeOpenAIServer, Reply, chat_completion

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture

MESSAGES = [{"role": "user", "content": "hi"}]


def direct(server: FakeOpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=PROVIDER_KEY, base_url=server.url + "/v1", max_retries=0)


def points(telemetry: SpanCapture, name: str) -> list:
    return telemetry.metrics()[name][1]


def test_the_five_instruments_for_one_call(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    with metadata(user="u1", org="o1", plan="pro"):
        direct(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    data = telemetry.metrics()
    assert {name: unit for name, (unit, _) in data.items()} == {
        "gen_ai.client.operation.duration": "s",
        "gen_ai.client.token.usage": "{token}",
        "tokenlay.client.cost": "USD",
        "tokenlay.client.requests": "{request}",
    }  # tokenlay.client.cached_tokens only once a call had cached tokens
    common = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "127.0.0.1",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "tokenlay.user": "u1",
        "tokenlay.org": "o1",
    }
    (duration,) = data["gen_ai.client.operation.duration"][1]
    assert dict(duration.attributes) == common
    assert tuple(duration.explicit_bounds) == DURATION_BUCKETS
    assert duration.count == 1
    assert 0 < duration.sum < 5
    tokens = {p.attributes["gen_ai.token.type"]: p for p in data["gen_ai.client.token.usage"][1]}
    assert (tokens["input"].sum, tokens["output"].sum) == (12, 7)
    assert tuple(tokens["input"].explicit_bounds) == TOKEN_BUCKETS
    assert dict(tokens["output"].attributes) == {**common, "gen_ai.token.type": "output"}
    (cost,) = data["tokenlay.client.cost"][1]
    # gpt-4o-mini: $0.15 / 1M input, $0.60 / 1M output
    assert cost.value == pytest.approx(12 * 0.15e-6 + 7 * 0.60e-6)
    assert dict(cost.attributes) == {**common, "tokenlay.cost.source": "local"}
    (requests,) = data["tokenlay.client.requests"][1]
    assert requests.value == 1
    assert dict(requests.attributes) == {
        **common,
        "tokenlay.rule.action": "none",
        "tokenlay.cost.source": "local",
        "tokenlay.routed": False,
        "tokenlay.model_shifted": False,
        "tokenlay.proxy.bypassed": False,
    }
    assert "tokenlay.client.cached_tokens" not in data
    span = telemetry.only_span()
    assert span.attributes["tokenlay.cost.usd"] == pytest.approx(cost.value)
    assert span.attributes["tokenlay.cost.source"] == "local"
    # Exemplars tie the points to the LLM span's trace.
    assert duration.exemplars[0].trace_id == span.context.trace_id
    assert cost.exemplars[0].span_id == span.context.span_id


def test_stream_metrics_run_to_the_end_of_the_stream(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    import time

    instrument()
    server.stream_delay = 0.05
    s = direct(server).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = next(iter(s))
    assert first.choices
    time.sleep(0.1)
    list(s)
    data = telemetry.metrics()
    (duration,) = data["gen_ai.client.operation.duration"][1]
    (ttfc,) = data["gen_ai.client.operation.time_to_first_chunk"][1]
    assert duration.sum >= 0.25  # seven events 0.05 s apart, and our 0.1 s pause
    assert ttfc.sum < duration.sum - 0.1
    assert tuple(ttfc.explicit_bounds) == DURATION_BUCKETS
    tokens = {
        p.attributes["gen_ai.token.type"]: p.sum for p in data["gen_ai.client.token.usage"][1]
    }
    assert tokens == {"input": 12, "output": 5}


def test_errors_and_blocks_are_counted(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    server.reply(
        Reply(
            status=429,
            body={"error": {"message": "limit", "type": "tokenlay_limit"}},
            headers={"x-tokenlay-rule-action": "block", "x-tokenlay-rule-id": "free"},
        )
    )
    client = openai.OpenAI(api_key=PROVIDER_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError), metadata(user="u1"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    data = telemetry.metrics()
    (requests,) = data["tokenlay.client.requests"][1]
    assert requests.attributes["error.type"] == "429"
    assert requests.attributes["tokenlay.rule.action"] == "block"
    assert requests.attributes["tokenlay.cost.source"] == "unknown"
    assert requests.attributes["tokenlay.routed"] is True
    (duration,) = data["gen_ai.client.operation.duration"][1]
    assert duration.attributes["error.type"] == "429"
    assert "tokenlay.client.cost" not in data


def test_proxy_cost_wins(server: FakeOpenAIServer, instrument, telemetry: SpanCapture) -> None:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    server.response_headers["x-tokenlay-cost"] = "0.5"
    openai.OpenAI(api_key=PROVIDER_KEY, max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    (cost,) = points(telemetry, "tokenlay.client.cost")
    assert cost.value == 0.5
    assert cost.attributes["tokenlay.cost.source"] == "proxy"
    (requests,) = points(telemetry, "tokenlay.client.requests")
    assert requests.attributes["tokenlay.rule.action"] == "none"


def test_proxy_cost_from_the_final_usage_chunk(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=server.url)
    usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12, "cost": 0.25}
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    server.reply(
        Reply(
            events=[
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
                },
                {**base, "choices": [], "usage": usage},
            ]
        )
    )
    client = openai.OpenAI(api_key=PROVIDER_KEY, max_retries=0)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    (cost,) = points(telemetry, "tokenlay.client.cost")
    assert (cost.value, cost.attributes["tokenlay.cost.source"]) == (0.25, "proxy")


@pytest.mark.parametrize(
    ("model", "base", "usage", "expected"),
    [
        # gpt-4o: $2.50 in, $10 out per 1M
        ("gpt-4o", "https://api.openai.com/v1", (1000, 0, 500, 0), 1000 * 2.5e-6 + 500 * 10e-6),
        # gpt-4o-mini with 600 cached input tokens at $0.075 per 1M
        (
            "gpt-4o-mini",
            "https://api.openai.com/v1",
            (1000, 600, 200, 0),
            400 * 0.15e-6 + 600 * 0.075e-6 + 200 * 0.6e-6,
        ),
        # o3-mini: reasoning tokens are part of output tokens, billed as output ($4.40)
        ("o3-mini", "https://api.openai.com/v1", (100, 0, 900, 700), 100 * 1.1e-6 + 900 * 4.4e-6),
        (
            "mistral-small-latest",
            "https://api.mistral.ai/v1",
            (2000, 0, 100, 0),
            2000 * 0.15e-6 + 100 * 0.6e-6,
        ),
    ],
)
def test_local_costs_match_hand_computed_prices(
    model: str, base: str, usage: tuple[int, int, int, int], expected: float
) -> None:
    from tokenlay_otel._attributes import Usage
    from tokenlay_otel._pricing import PriceBook

    book = PriceBook()
    got = book.cost(Usage(usage[0], usage[2], usage[1], usage[3]), (model,), base)
    assert got == pytest.approx(expected, rel=1e-9)


def test_embeddings_cost(server: FakeOpenAIServer, instrument, telemetry: SpanCapture) -> None:
    instrument()
    direct(server).embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    (cost,) = points(telemetry, "tokenlay.client.cost")
    assert cost.value == pytest.approx(10 * 0.02e-6)  # $0.02 per 1M input tokens


def test_response_model_is_priced_before_the_request_model(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    server.reply(Reply(body=chat_completion("gpt-4o")))
    direct(server).chat.completions.create(model="my-alias", messages=MESSAGES)
    (cost,) = points(telemetry, "tokenlay.client.cost")
    assert cost.value == pytest.approx(12 * 2.5e-6 + 7 * 10e-6)


def test_unknown_model_has_no_cost_but_is_counted(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    direct(server).chat.completions.create(model="no-such-model-zz", messages=MESSAGES)
    data = telemetry.metrics()
    assert "tokenlay.client.cost" not in data
    (requests,) = data["tokenlay.client.requests"][1]
    assert requests.attributes["tokenlay.cost.source"] == "unknown"
    span = telemetry.only_span()
    assert "tokenlay.cost.usd" not in span.attributes
    assert span.attributes["tokenlay.cost.source"] == "unknown"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_price_overrides_win(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture, tmp_path: Path, suffix: str
) -> None:
    prices = {
        "gpt-4o-mini": {"input": 1.0, "output": 2.0},
        "house-model": {"input": 3, "output": 4, "cached": 1},
    }
    path = tmp_path / f"prices{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(prices))
    else:
        import yaml

        path.write_text(yaml.safe_dump(prices))
    instrument(TOKENLAY_PRICES_FILE=str(path))
    client = direct(server)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    client.chat.completions.create(model="house-model", messages=MESSAGES)
    costs = sorted(p.value for p in points(telemetry, "tokenlay.client.cost"))
    assert costs == pytest.approx(sorted([12 * 1e-6 + 7 * 2e-6, 12 * 3e-6 + 7 * 4e-6]))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"m": {"input": -1, "output": 1}}', r"model 'm': 'input' must be a number .* from 0"),
        ('{"m": {"input": NaN, "output": 1}}', r"model 'm': 'input' must be a number .* got nan"),
        ('{"m": {"input": 1e308, "output": 1}}', r"model 'm': 'input' must be a number"),
        ('{"m": {"input": 1' + "0" * 400 + ', "output": 1}}', r"'input' must be a number"),
        ('{"m": {"input": 1' + "0" * 5000 + ', "output": 1}}', r"digits"),
        ('{"m": {"input": 1}}', r"model 'm': 'input' and 'output' are required"),
        ('{"m": {"input": 1, "output": 1, "cache": 1}}', r"model 'm': unknown keys \['cache'\]"),
        ("[1, 2]", "expected a mapping"),
        ("{not json", "Expecting property name"),
    ],
)
def test_malformed_prices_file_is_one_error_line_and_tracing_goes_on(
    server: FakeOpenAIServer,
    telemetry: SpanCapture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    content: str,
    message: str,
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    monkeypatch.setenv("TOKENLAY_PRICES_FILE", str(path))
    with pytest.raises(ValueError, match=message) as info:
        load_price_overrides(str(path))  # what a drop-in setup step sees: a clear error
    assert str(path) in str(info.value)
    instrumentor = TokenlayInstrumentor()
    instrumentor.instrument(
        tracer_provider=telemetry.provider, meter_provider=telemetry.meter_provider
    )
    try:
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert re.search(message, errors[0].getMessage())
        assert str(path) in errors[0].getMessage()
        direct(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        instrumentor.uninstrument()
    span = telemetry.only_span()
    assert span.attributes["tokenlay.cost.source"] == "local"  # the built-in prices


def test_metric_attribute_fields_are_configurable(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument(TOKENLAY_METRIC_ATTRIBUTES="org,feature,tenant")
    with metadata(user="u1", org="o1", feature="f", tenant="t"):
        direct(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    (requests,) = points(telemetry, "tokenlay.client.requests")
    assert "tokenlay.user" not in requests.attributes
    assert requests.attributes["tokenlay.org"] == "o1"
    assert requests.attributes["tokenlay.feature"] == "f"
    assert requests.attributes["tokenlay.metadata.tenant"] == "t"


def test_cached_tokens_are_counted(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture
) -> None:
    instrument()
    body = chat_completion("gpt-4o-mini")
    body["usage"] = {
        "prompt_tokens": 1000,
        "completion_tokens": 10,
        "total_tokens": 1010,
        "prompt_tokens_details": {"cached_tokens": 600},
    }
    server.reply(Reply(body=body))
    direct(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    (cached,) = points(telemetry, "tokenlay.client.cached_tokens")
    assert cached.value == 600
    (cost,) = points(telemetry, "tokenlay.client.cost")
    assert cost.value == pytest.approx(400 * 0.15e-6 + 600 * 0.075e-6 + 10 * 0.6e-6)
    assert telemetry.only_span().attributes["gen_ai.usage.cache_read.input_tokens"] == 600


# tokenlay.client.requests is counted by us and observed by the SDK at collection.


def _requests(reader: object) -> dict[str, int]:
    data = reader.get_metrics_data()  # type: ignore[attr-defined]
    found: dict[str, int] = {}
    for resource_metrics in data.resource_metrics if data else []:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "tokenlay.client.requests":
                    assert metric.data.is_monotonic
                    for point in metric.data.data_points:
                        user = point.attributes.get("tokenlay.user", "overflow")
                        found[user] = point.value
    return found


def test_requests_keep_counting_across_uninstrument_and_instrument(
    server: FakeOpenAIServer, telemetry: SpanCapture
) -> None:
    instrumentor = TokenlayInstrumentor()
    for calls in (1, 2):
        instrumentor.instrument(
            tracer_provider=telemetry.provider,
            meter_provider=telemetry.meter_provider,
            settings=Settings.from_env(),
        )
        try:
            with metadata(user="u1"):
                for _ in range(calls):
                    direct(server).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        finally:
            instrumentor.uninstrument()
    # The SDK keeps the instrument (and callback) of the first instrument(); the
    # second must count into the same place rather than into one nobody reads.
    assert _requests(telemetry.reader) == {"u1": 3}


def test_requests_with_delta_temporality(server: FakeOpenAIServer) -> None:
    from opentelemetry.sdk.metrics import Counter, MeterProvider, ObservableCounter
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(preferred_temporality={Counter: delta, ObservableCounter: delta})
    capture = SpanCapture()
    meter_provider = MeterProvider(metric_readers=[reader])
    instrumentor = TokenlayInstrumentor()
    instrumentor.instrument(
        tracer_provider=capture.provider, meter_provider=meter_provider, settings=Settings()
    )
    try:
        client = direct(server)
        with metadata(user="u1"):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert _requests(reader) == {"u1": 1}
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert _requests(reader) == {"u1": 2}
    finally:
        instrumentor.uninstrument()
        meter_provider.shutdown()


def test_request_attribute_sets_past_the_limit_go_to_overflow(
    server: FakeOpenAIServer, instrument, telemetry: SpanCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenlay_otel import _metrics

    monkeypatch.setattr(_metrics, "_COUNTS_LIMIT", 2)
    instrument()
    client = direct(server)
    for user in ("u1", "u2", "u3", "u4", "u1", "u4"):
        with metadata(user=user):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert _requests(telemetry.reader) == {"u1": 2, "u2": 1, "overflow": 3}
    requests = points(telemetry, "tokenlay.client.requests")
    (overflow,) = [p for p in requests if "tokenlay.user" not in p.attributes]
    assert dict(overflow.attributes) == {"otel.metric.overflow": True}


def test_requests_through_a_proxy_meter_reach_the_sdk_set_later() -> None:
    # instrument() before the SDK is configured gets the API's proxy meter. Done twice
    # (uninstrument() between), each gets its own proxy instrument, and the SDK set
    # later keeps only the first one's callback: the second must still be counted.
    from opentelemetry.metrics._internal import _ProxyMeterProvider
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from tokenlay_otel._metrics import MetricRecorder, SharedMetrics

    proxy = _ProxyMeterProvider()
    shared = SharedMetrics()  # the process's, as _state holds it
    first, second = (
        MetricRecorder.create(proxy, metadata_fields=("user",), value_limit=10, shared=shared)
        for _ in "12"
    )
    reader = InMemoryMetricReader()
    proxy.on_set_meter_provider(MeterProvider(metric_readers=[reader]))
    first.record(_measurements("u1"), None)
    for user in ("u1", "u2"):
        second.record(_measurements(user), None)
    assert _requests(reader) == {"u1": 2, "u2": 1}


def _measurements(user: str):  # type: ignore[no-untyped-def]
    from tokenlay_otel._metrics import CallMeasurements

    return CallMeasurements(
        operation="chat", provider="openai", request_model="m", response_model="m",
        error_type=None, metadata={"user": user}, duration_s=0.1, input_tokens=1, output_tokens=1,
        cached_input_tokens=None, time_to_first_chunk_s=None, cost=None,
        cost_source="unknown", rule_action=None, routed=False,
    )  # fmt: skip


def _requests_point_after(sdk_first: bool) -> object:
    """One call counted in ``tokenlay.client.requests`` inside a sampled span, with
    the SDK set before the recorder is built or after (through the API's proxy)."""
    from opentelemetry import trace
    from opentelemetry.metrics._internal import _ProxyMeterProvider
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from tokenlay_otel._metrics import MetricRecorder

    reader = InMemoryMetricReader()
    sdk = MeterProvider(metric_readers=[reader])
    proxy = _ProxyMeterProvider()
    if sdk_first:
        proxy.on_set_meter_provider(sdk)
    recorder = MetricRecorder.create(proxy, metadata_fields=("user",), value_limit=10)
    if not sdk_first:
        proxy.on_set_meter_provider(sdk)
    span = TracerProvider().get_tracer("t").start_span("call")
    recorder.record(_measurements("u1"), trace.set_span_in_context(span))
    span.end()
    (point,) = points_of(reader, "tokenlay.client.requests")
    return point


def points_of(reader: object, name: str) -> list:
    data = reader.get_metrics_data()  # type: ignore[attr-defined]
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_the_requests_counter_does_not_depend_on_setup_order() -> None:
    # It was a synchronous counter (with exemplars) when the SDK came after us and an
    # observable one (without) when it came first.
    before, after = (_requests_point_after(sdk_first) for sdk_first in (True, False))
    assert (before.value, after.value) == (1, 1)
    assert dict(before.attributes) == dict(after.attributes)
    assert before.exemplars == after.exemplars == []
