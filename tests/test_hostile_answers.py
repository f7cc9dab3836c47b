"""What the SDK reads from the proxy or a provider is bounded.

A hostile header or number (5,000 digits, JSON nested 5,000 deep, a cost of 1e309, a
token count past int64) is ignored on its own: never the call, the other headers, the
span, the metrics, a ledger batch or the ``spend`` report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenlay_otel import TokenlayResponseMetadata, get_tokenlay_metadata
from tokenlay_otel import _attributes as A
from tokenlay_otel._wire import MAX_REPORTED_COST_USD, MAX_REPORTED_TOKENS
from tokenlay_otel.cli import main as cli
from tokenlay_otel.exporters import LedgerSpanExporter
from tokenlay_otel.exporters.ledger import COLUMNS, connect

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture
from .hostile_upstream import RawUpstream, chat_body, raw_upstream
from .inprocess import httpx

MESSAGES = [{"role": "user", "content": "hi"}]
GPT_4O_MINI_OUTPUT = 0.6e-6  # USD per output token
DEEP = "[" * 5000 + "]" * 5000

#: What a well-behaved proxy says; each test spoils one header of it.
GOOD_HEADERS = {
    "x-tokenlay-rule-id": "r1",
    "x-tokenlay-rule-action": "warn",
    "x-tokenlay-limit-exceeded": "false",
    "x-tokenlay-cost": "0.25",
    "x-tokenlay-tokens-used": "19",
    "x-tokenlay-input-tokens": "12",
    "x-tokenlay-output-tokens": "7",
    "x-tokenlay-duration": "42",
    "x-tokenlay-warnings": '["80% of monthly budget"]',
    "x-tokenlay-model": "gpt-4o-mini",
}
GOOD = TokenlayResponseMetadata(
    rule_id="r1",
    rule_action="warn",
    limit_exceeded=False,
    cost=0.25,
    tokens_used=19,
    input_tokens=12,
    output_tokens=7,
    duration_ms=42,
    warnings=("80% of monthly budget",),
    model="gpt-4o-mini",
)
# header -> a hostile value, and the field it would have filled.
HOSTILE_HEADERS = {
    "5000 digits": ("x-tokenlay-tokens-used", "9" * 5000, "tokens_used"),
    "past int64": ("x-tokenlay-output-tokens", "9" * 20, "output_tokens"),
    "past the token bound": (
        "x-tokenlay-input-tokens",
        str(MAX_REPORTED_TOKENS + 1),
        "input_tokens",
    ),
    "float past int": ("x-tokenlay-duration", "1e300", "duration_ms"),
    "cost 1e309": ("x-tokenlay-cost", "1e309", "cost"),
    "cost past the bound": ("x-tokenlay-cost", "1e12", "cost"),
    "negative cost": ("x-tokenlay-cost", "-0.5", "cost"),
    "warnings 5000 deep": ("x-tokenlay-warnings", DEEP, "warnings"),
    "warnings nested 40 deep": ("x-tokenlay-warnings", "[" * 40 + "]" * 40, "warnings"),
    "warnings of numbers": ("x-tokenlay-warnings", "[1, 2]", "warnings"),
    "model of 5000 chars": ("x-tokenlay-model", "m" * 5000, "model"),
}


def answer(status: int, headers: dict[str, str], body: bytes, kind: str) -> bytes:
    """An HTTP/1.1 answer with exactly these headers (no server would send them)."""
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\nconnection: close\r\n"
    if kind == "application/json":
        head += f"content-length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (head + "\r\n").encode() + body


def with_raw_numbers(data: bytes, numbers: dict[str, str]) -> bytes:
    """JSON with some values replaced by number literals json.dumps cannot write."""
    for placeholder, literal in numbers.items():
        data = data.replace(json.dumps(placeholder).encode(), literal.encode())
    return data


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    with raw_upstream() as found:
        yield found


@pytest.fixture
def client(upstream: RawUpstream, instrument: Any) -> openai.OpenAI:
    """A plain openai client, instrumented and routed to ``upstream`` as its proxy."""
    instrument(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=upstream.url)
    return openai.OpenAI(api_key=PROVIDER_KEY, max_retries=0)


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_a_hostile_header_is_ignored_alone_on_a_success(
    case: str, upstream: RawUpstream, client: openai.OpenAI, telemetry: SpanCapture
) -> None:
    header, value, field = HOSTILE_HEADERS[case]
    body = chat_body({"prompt_tokens": 12, "completion_tokens": 7})
    upstream.answers = [answer(200, {**GOOD_HEADERS, header: value}, body, "application/json")]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == "Hello from a hostile server."
    assert get_tokenlay_metadata(reply) == dataclasses.replace(GOOD, **{field: None})
    span = telemetry.only_span()
    assert span.attributes["tokenlay.rule.id"] == "r1"
    assert span.attributes["tokenlay.rule.action"] == "warn"
    warnings = [e.attributes["tokenlay.warning.message"] for e in span.events]
    assert warnings == ([] if field == "warnings" else ["80% of monthly budget"])
    if field == "cost":  # the proxy's cost is gone: priced locally, from the body
        assert span.attributes["tokenlay.cost.source"] == "local"
        assert math.isfinite(span.attributes["tokenlay.cost.usd"])
    else:
        assert span.attributes["tokenlay.cost.usd"] == 0.25


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_a_hostile_header_is_ignored_alone_on_a_block(
    case: str, upstream: RawUpstream, client: openai.OpenAI, telemetry: SpanCapture
) -> None:
    header, value, field = HOSTILE_HEADERS[case]
    headers = {**GOOD_HEADERS, "x-tokenlay-rule-action": "block", header: value}
    error = {"error": {"message": "limit", "type": "tokenlay_limit", "code": "limit"}}
    upstream.answers = [answer(429, headers, json.dumps(error).encode(), "application/json")]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    expected = dataclasses.replace(GOOD, rule_action="block", **{field: None})
    assert get_tokenlay_metadata(info.value) == expected
    span = telemetry.only_span()
    assert span.attributes["error.type"] == "429"
    assert span.attributes["tokenlay.rule.id"] == "r1"


def hostile_usage_answers() -> dict[str, bytes]:
    """The same hostile usage in a JSON body and in a stream's usage chunk."""
    usage = {
        "prompt_tokens": 2**64,
        "completion_tokens": 5,
        "total_tokens": 2**64 + 5,
        "prompt_tokens_details": {"cached_tokens": -3},
        "completion_tokens_details": {"reasoning_tokens": MAX_REPORTED_TOKENS + 1},
        "cost": "<cost>",
    }
    numbers = {"<cost>": "1e309"}
    body = with_raw_numbers(chat_body(usage), numbers)
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": usage},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    stream = with_raw_numbers(stream + b"data: [DONE]\n\n", numbers)
    rule = {"x-tokenlay-rule-action": "allow"}
    return {
        "body": answer(200, rule, body, "application/json"),
        "stream": answer(200, rule, stream, "text/event-stream"),
    }


def strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("shape", ["body", "stream"])
def test_hostile_usage_numbers_are_ignored_one_by_one(
    shape: str,
    upstream: RawUpstream,
    client: openai.OpenAI,
    telemetry: SpanCapture,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.db"
    telemetry.provider.add_span_processor(SimpleSpanProcessor(LedgerSpanExporter(ledger)))
    upstream.answers = [hostile_usage_answers()[shape]]
    if shape == "stream":
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        assert [c.choices[0].delta.content for c in stream] == ["Hi", None]
        reply: Any = stream
    else:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert reply.usage.completion_tokens == 5  # the caller's object is as it came

    attrs = telemetry.only_span().attributes
    usage = {k: v for k, v in attrs.items() if k.startswith("gen_ai.usage.")}
    assert usage == {"gen_ai.usage.output_tokens": 5}
    # The body's cost is gone; what is left is priced locally, and finite.
    assert attrs["tokenlay.cost.source"] == "local"
    assert attrs["tokenlay.cost.usd"] == pytest.approx(5 * GPT_4O_MINI_OUTPUT)
    points = telemetry.metrics()["gen_ai.client.token.usage"][1]
    assert {p.attributes["gen_ai.token.type"]: p.sum for p in points} == {"output": 5}
    (cost,) = telemetry.metrics()["tokenlay.client.cost"][1]
    assert cost.value == pytest.approx(5 * GPT_4O_MINI_OUTPUT)
    if shape == "stream":
        meta = get_tokenlay_metadata(reply)
        assert meta == TokenlayResponseMetadata(rule_action="allow", output_tokens=5)

    db = sqlite3.connect(ledger)
    assert db.execute(
        "SELECT input_tokens, output_tokens, cached_input_tokens, cost_usd FROM llm_calls"
    ).fetchall() == [(None, 5, None, pytest.approx(5 * GPT_4O_MINI_OUTPUT))]
    out = io.StringIO()
    cli(["spend", "--db", str(ledger), "--by", "model", "--format", "json"], out=out)
    report = strict_json(out.getvalue())
    assert report["total"]["output_tokens"] == 5
    assert report["total"]["cost_usd"] == pytest.approx(5 * GPT_4O_MINI_OUTPUT)


def ledger_spans(count: int, spoiled: dict[int, dict[str, Any]]) -> list[Any]:
    """``count`` finished LLM spans of ours; span ``i`` gets ``spoiled[i]`` on top."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tokenlay_otel")
    for i in range(count):
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o-mini",
            "tokenlay.user": f"u{i}",
            "gen_ai.usage.input_tokens": 10,
            "gen_ai.usage.output_tokens": 2,
            "tokenlay.cost.usd": 0.5,
            **spoiled.get(i, {}),
        }
        with tracer.start_as_current_span("chat gpt-4o-mini", attributes=attrs):
            pass
    return list(exporter.get_finished_spans())


# span index -> attributes no ledger column can hold, and the column each empties.
SPOILED: dict[int, tuple[dict[str, Any], str]] = {
    3: ({"gen_ai.usage.input_tokens": 2**63}, "input_tokens"),
    7: ({"gen_ai.usage.output_tokens": 2**70}, "output_tokens"),
    11: ({"tokenlay.cost.usd": float("inf")}, "cost_usd"),
    13: ({"tokenlay.cost.usd": float("nan")}, "cost_usd"),
    17: ({"tokenlay.cost.usd": -1.0}, "cost_usd"),
    19: ({"gen_ai.usage.cache_read.input_tokens": -3}, "cached_input_tokens"),
    23: ({"gen_ai.usage.input_tokens": MAX_REPORTED_TOKENS + 1}, "input_tokens"),
    29: ({"tokenlay.user": "a\ud800b"}, "user"),  # a lone surrogate: not UTF-8
    31: ({"tokenlay.org": ("a", "b")}, "org"),  # a sequence: SQLite takes none
}


def test_the_ledger_writes_every_row_and_leaves_out_only_bad_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spans = ledger_spans(41, {i: attrs for i, (attrs, _) in SPOILED.items()})
    exporter = LedgerSpanExporter(tmp_path / "ledger.db")
    with caplog.at_level(logging.DEBUG, logger="tokenlay_otel"):
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export(ledger_spans(2, {0: SPOILED[3][0]})) is SpanExportResult.SUCCESS
    exporter.shutdown()
    db = sqlite3.connect(tmp_path / "ledger.db")
    db.row_factory = sqlite3.Row
    rows = {row["span_id"]: row for row in db.execute("SELECT * FROM llm_calls")}
    assert len(rows) == 43
    for i, span in enumerate(spans):
        row = rows[format(span.context.span_id, "016x")]
        emptied = SPOILED[i][1] if i in SPOILED else None
        expected = {
            "user": f"u{i}",
            "org": None,
            "input_tokens": 10,
            "output_tokens": 2,
            "cached_input_tokens": None,
            "cost_usd": 0.5,
        }
        if emptied is not None:
            expected[emptied] = None
        assert {column: row[column] for column in expected} == expected, i
    warned = [r for r in caplog.records if "ledger left out" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING, logging.DEBUG]  # once, then quiet
    assert "cost_usd" in warned[0].getMessage() and "a\ud800b" not in warned[0].getMessage()


def legacy_ledger(path: Path) -> None:
    """A ledger with rows no version of the SDK should write, beside good ones."""
    write_ledger(
        path,
        [
            ("good", 10, 2, 0.5),
            ("good", 20, 4, 0.25),
            ("huge", 2**62, 2**62, float("inf")),  # two of them overflow an int64 SUM
            ("huge", 2**62, 2**62, float("-inf")),
            ("odd", -5, "many", float("nan")),
        ],
    )


def write_ledger(path: Path, rows: list[tuple[str, Any, Any, Any]]) -> None:
    """A ledger of ``(user, input_tokens, output_tokens, cost_usd)`` rows, as given."""
    db = connect(path)
    placeholders = ", ".join("?" for _ in COLUMNS)
    for n, (user, input_tokens, output_tokens, cost) in enumerate(rows):
        values = dict.fromkeys(COLUMNS)
        values.update(
            time_unix_nano=n + 1,
            trace_id=f"{n:032x}",
            span_id=f"{n:016x}",
            user=user,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost,
            routed=1,
        )
        db.execute(
            f"INSERT INTO llm_calls VALUES ({placeholders})",
            [values[c] for c in COLUMNS],
        )
    db.commit()
    db.close()


def test_spend_leaves_out_values_it_cannot_believe(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    legacy_ledger(path)
    out = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "user", "--since", "all", "--format", "json"], out=out)
    report = strict_json(out.getvalue())
    by_user = {row["key"]: row for row in report["rows"]}
    assert by_user["good"] == {
        "key": "good",
        "requests": 2,
        "errors": 0,
        "input_tokens": 30,
        "output_tokens": 6,
        "cached_input_tokens": 0,
        "cost_usd": 0.75,
        "unpriced": 0,
    }
    for user in ("huge", "odd"):
        row = by_user[user]
        assert (row["input_tokens"], row["output_tokens"], row["cost_usd"]) == (0, 0, 0.0)
        assert row["unpriced"] == row["requests"]
    assert report["total"]["cost_usd"] == 0.75

    out = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "user", "--since", "all", "--format", "csv"], out=out)
    parsed = {row["user"]: row for row in csv.DictReader(io.StringIO(out.getvalue()))}
    assert parsed["huge"]["cost_usd"] == "0.0" and parsed["good"]["input_tokens"] == "30"
    table = io.StringIO()
    cli(["spend", "--db", str(path), "--by", "user", "--since", "all"], out=table)
    assert table.getvalue().splitlines()[-1].split()[:2] == ["TOTAL", "5"]


# Header values an attacker would try, beside arbitrary text.
hostile_values = st.one_of(
    st.text(max_size=80),
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.integers(min_value=1, max_value=6000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n),
    st.sampled_from(["1e309", "-1e309", "nan", "inf", "-0", "1e18", "0x10", "١٢", " 7 "]),
    st.lists(st.text(max_size=20), max_size=60).map(json.dumps),
    st.integers(min_value=0, max_value=3000).map(lambda n: json.dumps(["w" * n, "x"])),
)
header_names = st.sampled_from([*GOOD_HEADERS, "x-tokenlay-other", "content-type"])


class Raising:
    """An object whose every attribute read fails."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(name)


def holders(headers: dict[str, str]) -> list[Any]:
    """The same headers as every kind of object get_tokenlay_metadata may be given."""

    class Holder:
        def __init__(self, **attrs: Any) -> None:
            self.__dict__.update(attrs)

    wire = httpx.Headers({k: v.encode("utf-8", "replace") for k, v in headers.items()})
    return [
        Holder(headers=headers),
        Holder(headers=wire),
        Holder(response=Holder(headers=wire)),
        Holder(http_response=Holder(headers=headers)),
        Holder(response=Raising()),
        Holder(headers=Raising()),
        Holder(headers=list(headers.items())),
        Holder(headers={1: object(), **headers}),
        Raising(),
    ]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(header_names, hostile_values, max_size=6))
def test_get_tokenlay_metadata_never_raises_and_keeps_numbers_in_bounds(
    headers: dict[str, str],
) -> None:
    for holder in holders(headers):
        meta = get_tokenlay_metadata(holder)
        if meta is None:
            continue
        for count in (meta.tokens_used, meta.input_tokens, meta.output_tokens):
            assert count is None or 0 <= count <= MAX_REPORTED_TOKENS
        assert meta.duration_ms is None or 0 <= meta.duration_ms < 2**63
        assert meta.cost is None or 0 <= meta.cost <= MAX_REPORTED_COST_USD
        assert meta.warnings is None or len(meta.warnings) <= 32
        for text in (meta.rule_id, meta.model, *(meta.warnings or ())):
            assert text is None or len(text) <= 1024


usage_numbers = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**80),
    st.floats(),
    st.text(max_size=5),
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            name: usage_numbers
            for name in (
                "prompt_tokens",
                "completion_tokens",
                "input_tokens",
                "output_tokens",
                "cost",
            )
        }
        | {
            "prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": usage_numbers}),
            "output_tokens_details": st.fixed_dictionaries({"reasoning_tokens": usage_numbers}),
        },
    )
)
def test_usage_numbers_are_in_bounds_whatever_the_body_says(usage: dict[str, Any]) -> None:
    found = A.usage_of(usage)
    assert found is not None
    for count in found[:4]:
        assert count is None or (type(count) is int and 0 <= count <= MAX_REPORTED_TOKENS)
    assert found.cost is None or (
        type(found.cost) is float and 0 <= found.cost <= MAX_REPORTED_COST_USD
    )
    # A number in bounds is kept as it came.
    first = usage.get("prompt_tokens")
    if type(first) is int and 0 <= first <= MAX_REPORTED_TOKENS and "input_tokens" not in usage:
        assert found.input_tokens == first


def test_text_an_answer_could_make_huge_or_unexportable_is_left_out() -> None:
    """A 1 MB model, id and fingerprint, 50,000 choices, a lone surrogate: none of it
    reaches a span."""
    from tokenlay_otel._attributes import MAX_TEXT, response_attributes
    from tokenlay_otel._wire import parse_response_headers

    huge = "m" * 1_000_000
    body = {"id": huge, "model": huge, "system_fingerprint": huge,
            "choices": [{"finish_reason": "stop"}] * 50_000}  # fmt: skip
    attrs = response_attributes(body)
    assert attrs == {"gen_ai.response.finish_reasons": ("stop",) * 16}
    assert response_attributes({"model": "\ud800x", "id": "i" * MAX_TEXT}) == {
        "gen_ai.response.id": "i" * MAX_TEXT
    }
    parsed = parse_response_headers({"x-tokenlay-warnings": '["ok", "\\ud800 bad"]'})
    assert parsed is not None and parsed.warnings == ("ok",)


@pytest.mark.slow
def test_models_named_by_answers_are_capped_on_metrics(instrument, telemetry: SpanCapture) -> None:
    from tests.inprocess import httpx
    from tokenlay_otel.testing import chat_completion

    count = iter(range(10_000))

    def answer(request: Any) -> Any:
        return httpx.Response(200, json=chat_completion(f"model-{next(count)}"))

    instrument()
    http_client = httpx.Client(transport=httpx.MockTransport(answer))
    client = openai.OpenAI(api_key="sk-x", http_client=http_client)
    for _ in range(300):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    (_, points) = telemetry.metrics()["tokenlay.client.requests"]
    models = {p.attributes["gen_ai.response.model"] for p in points}
    assert len(models) == 257 and "_other" in models  # 256 models, then the rest as one
