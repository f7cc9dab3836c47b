from __future__ import annotations

import dataclasses
import json
import math
import string
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenlay_otel._urls import check_url_security
from tokenlay_otel._wire import (
    TokenlayResponseMetadata,
    build_request_headers,
    decode_value,
    encode_value,
    format_cost,
    is_header_text,
    metadata_from_request_headers,
    metadata_from_wire,
    metered_endpoint,
    normalize_field_name,
    parse_metadata_env,
    parse_response_headers,
    proxy_url,
    response_headers,
    sanitize_metadata,
    split_caller_headers,
    usage_option_given,
    usage_option_on,
    validate_metadata,
    with_usage_option,
)

field_names = st.from_regex(r"[a-z0-9_]{1,64}", fullmatch=True).filter(
    lambda n: n not in ("provider_key", "provider_base")
)
# Any text without control characters, including non-ASCII, '%' and edge spaces.
field_values = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=1024)


def test_build_request_headers_is_the_wire_format() -> None:
    headers = build_request_headers(
        tokenlay_key="tl",
        provider_key="pk",
        provider_base="https://api.mistral.ai/v1",
        metadata={"user": "user_abc123", "org": "org_456xyz", "feature_flag": "x"},
    )
    assert headers == {
        "Authorization": "Bearer tl",
        "x-tokenlay-provider-key": "pk",
        "x-tokenlay-provider-base": "https://api.mistral.ai/v1",
        "x-tokenlay-user": "user_abc123",
        "x-tokenlay-org": "org_456xyz",
        "x-tokenlay-feature-flag": "x",
    }


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("user", "user"), ("Org", "org"), ("feature-flag", "feature_flag"), ("a_b", "a_b")],
)
def test_field_names_are_canonicalised(name: str, canonical: str) -> None:
    assert normalize_field_name(name) == canonical


@pytest.mark.parametrize("name", ["", "a b", "user!", "x" * 65, "ünï", "provider-key"])
def test_bad_field_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r"field|reserved"):
        normalize_field_name(name)


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "nul\x00", "tab\there", "del\x7f"])
def test_control_characters_are_rejected_naming_the_field(value: str) -> None:
    with pytest.raises(ValueError, match=r"'user'.*control character"):
        validate_metadata({"user": value})


def test_overlong_values_are_rejected() -> None:
    validate_metadata({"user": "x" * 1024})
    with pytest.raises(ValueError, match="'user' is 1025 characters long"):
        validate_metadata({"user": "x" * 1025})


def test_non_string_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="'user' must be a string"):
        validate_metadata({"user": 42})


def test_sanitize_drops_only_bad_fields() -> None:
    valid, problems = sanitize_metadata({"user": "ok", "org": "bad\n", "no way": "x"})
    assert valid == {"user": "ok"}
    assert len(problems) == 2
    assert all("bad\n" not in p for p in problems)


def test_encoding_keeps_printable_ascii_byte_for_byte() -> None:
    assert encode_value("user_abc123 / plan:pro?") == "user_abc123 / plan:pro?"
    assert encode_value("Zoë") == "Zo%C3%AB"
    assert encode_value("100%") == "100%25"
    assert encode_value(" pad ") == "%20pad%20"
    assert decode_value("Zo%C3%AB") == "Zoë"


@given(st.dictionaries(field_names, field_values, max_size=8))
def test_any_valid_metadata_survives_the_round_trip(fields: dict[str, str]) -> None:
    headers = build_request_headers(
        tokenlay_key="tl", provider_key="pk", provider_base="https://p", metadata=fields
    )
    for name, value in headers.items():
        assert "\r" not in value
        assert "\n" not in value
        assert value.isascii()
        assert value == value.strip(" \t"), "HTTP would strip this"
        value.encode("latin-1")
        assert name.lower() == name or name == "Authorization"
    assert metadata_from_request_headers(headers.items()) == fields


@given(st.dictionaries(st.text(max_size=70), st.text(max_size=1100), max_size=6))
def test_validation_never_lets_a_header_breaker_through(fields: dict[str, str]) -> None:
    valid, _ = sanitize_metadata(fields)
    headers = build_request_headers(
        tokenlay_key="tl", provider_key="pk", provider_base="https://p", metadata=valid
    )
    assert all("\r" not in v and "\n" not in v and "\x00" not in v for v in headers.values())
    assert all(len(v) <= 3 * 1024 * 4 for v in headers.values())


@given(st.dictionaries(st.text(max_size=40), st.text(max_size=200), max_size=12))
def test_response_parser_never_raises(headers: dict[str, str]) -> None:
    parse_response_headers(headers)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "x-tokenlay-rule-id",
                "x-tokenlay-rule-action",
                "x-tokenlay-limit-exceeded",
                "x-tokenlay-cost",
                "x-tokenlay-tokens-used",
                "x-tokenlay-input-tokens",
                "x-tokenlay-output-tokens",
                "x-tokenlay-duration",
                "x-tokenlay-warnings",
                "x-tokenlay-model",
            ]
        ),
        st.text(max_size=60),
    )
)
def test_response_parser_never_raises_on_known_headers(headers: dict[str, str]) -> None:
    meta = parse_response_headers(headers)
    assert meta is None or isinstance(meta, TokenlayResponseMetadata)


def test_response_headers_are_parsed() -> None:
    meta = parse_response_headers(
        {
            "X-Tokenlay-Rule-Id": "free-tier",
            "x-tokenlay-rule-action": "WARN",
            "x-tokenlay-limit-exceeded": "true",
            "x-tokenlay-cost": "0.00123",
            "x-tokenlay-tokens-used": "19",
            "x-tokenlay-input-tokens": "12",
            "x-tokenlay-output-tokens": "7",
            "x-tokenlay-duration": "42",
            "x-tokenlay-warnings": '["80% of monthly budget"]',
            "x-tokenlay-model": "gpt-4o-mini",
            "content-type": "application/json",
        }
    )
    assert meta == TokenlayResponseMetadata(
        rule_id="free-tier",
        rule_action="warn",
        limit_exceeded=True,
        cost=0.00123,
        tokens_used=19,
        input_tokens=12,
        output_tokens=7,
        duration_ms=42,
        warnings=("80% of monthly budget",),
        model="gpt-4o-mini",
    )


def test_malformed_response_headers_are_ignored_one_by_one() -> None:
    meta = parse_response_headers(
        {
            "x-tokenlay-rule-action": "explode",
            "x-tokenlay-limit-exceeded": "maybe",
            "x-tokenlay-cost": "NaN",
            "x-tokenlay-tokens-used": "-3",
            "x-tokenlay-input-tokens": "1.5",
            "x-tokenlay-output-tokens": "abc",
            "x-tokenlay-duration": "inf",
            "x-tokenlay-warnings": "not json",
            "x-tokenlay-model": "   ",
            "x-tokenlay-rule-id": "r1",
        }
    )
    assert meta == TokenlayResponseMetadata(rule_id="r1")


def test_no_tokenlay_headers_means_none() -> None:
    assert parse_response_headers({"content-type": "application/json"}) is None


def test_warnings_must_be_a_list_of_strings() -> None:
    assert parse_response_headers({"x-tokenlay-warnings": '["a", 1]'}) == TokenlayResponseMetadata()
    assert parse_response_headers({"x-tokenlay-warnings": '"a"'}) == TokenlayResponseMetadata()


def test_split_caller_headers() -> None:
    fields, rest = split_caller_headers(
        {"user": "u", "X-Tokenlay-Plan": "pro", "X-Custom": "c", "x-tokenlay-provider-key": "k"},
        bare_fields=True,
    )
    assert fields == {"user": "u", "plan": "pro"}
    assert rest == {"X-Custom": "c", "x-tokenlay-provider-key": "k"}
    fields, rest = split_caller_headers({"user": "u"}, bare_fields=False)
    assert (fields, rest) == ({}, {"user": "u"})


def test_metadata_env() -> None:
    assert parse_metadata_env("user=u1, org=o1,,") == {"user": "u1", "org": "o1"}
    # Percent-encoding, as on the wire: a comma, '=', '%', spaces kept, UTF-8.
    assert parse_metadata_env("org=Acme%2C Inc., user=u1") == {"org": "Acme, Inc.", "user": "u1"}
    assert parse_metadata_env("feature=a=b,project=c%3Dd") == {"feature": "a=b", "project": "c=d"}
    assert parse_metadata_env("plan=100%25,user=50%off,org=%") == {
        "plan": "100%", "user": "50%off", "org": "%",
    }  # fmt: skip
    assert parse_metadata_env("user=%20pad%20,org=caf%C3%A9") == {"user": " pad ", "org": "café"}
    with pytest.raises(ValueError, match="TOKENLAY_METADATA: the value of 'user' is not percent"):
        parse_metadata_env("user=%FF")
    with pytest.raises(ValueError, match=r"TOKENLAY_METADATA: .*control"):
        parse_metadata_env("user=a%0Ab")
    assert parse_metadata_env("") == {}
    with pytest.raises(ValueError, match="TOKENLAY_METADATA: expected 'field=value'"):
        parse_metadata_env("user")
    with pytest.raises(ValueError, match="TOKENLAY_METADATA: invalid metadata field name"):
        parse_metadata_env("bad name=1")


@pytest.mark.parametrize(
    "url",
    [
        "https://api.tokenlay.com",
        "http://127.0.0.1:8080",
        "http://localhost:1",
        "http://[::1]:9/",
        "http://127.5.5.5",
    ],
)
def test_safe_urls(url: str) -> None:
    assert check_url_security(url, what="x") == url.rstrip("/")


@pytest.mark.parametrize(
    "url", ["http://api.tokenlay.com", "http://10.0.0.1", "ftp://x", "api.tokenlay.com"]
)
def test_unsafe_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="tokenlay_base_url"):
        check_url_security(url, what="tokenlay_base_url")


def test_proxy_url() -> None:
    assert proxy_url("https://t", "/chat/completions") == "https://t/v1/chat/completions"
    assert proxy_url("https://t/v1/", "chat/completions") == "https://t/v1/chat/completions"
    assert proxy_url("http://127.0.0.1:9/base", "embeddings") == (
        "http://127.0.0.1:9/base/v1/embeddings"
    )


def test_printable_ascii_is_all_safe() -> None:
    text = "".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c%")
    assert encode_value(text.strip()) == text.strip()


def test_response_numbers_are_bounded_at_their_limits() -> None:
    from tokenlay_otel._wire import MAX_REPORTED_COST_USD, MAX_REPORTED_TOKENS

    most = str(MAX_REPORTED_TOKENS)
    assert parse_response_headers(
        {
            "x-tokenlay-tokens-used": most,
            "x-tokenlay-input-tokens": f"{MAX_REPORTED_TOKENS:.1e}",  # a float that is whole
            "x-tokenlay-output-tokens": str(MAX_REPORTED_TOKENS + 1),
            "x-tokenlay-cost": repr(MAX_REPORTED_COST_USD),
            "x-tokenlay-duration": "9" * 12,
        }
    ) == TokenlayResponseMetadata(
        tokens_used=MAX_REPORTED_TOKENS,
        input_tokens=MAX_REPORTED_TOKENS,
        cost=MAX_REPORTED_COST_USD,
        duration_ms=10**12 - 1,
    )
    assert parse_response_headers(
        {
            "x-tokenlay-cost": repr(MAX_REPORTED_COST_USD * 1.000001),
            "x-tokenlay-duration": "9" * 13,
            "x-tokenlay-tokens-used": "0" * 31 + "7",  # 32 characters: still read
            "x-tokenlay-input-tokens": "0" * 32 + "7",  # 33: too long to read
        }
    ) == TokenlayResponseMetadata(tokens_used=7)


def test_response_texts_are_bounded_in_length() -> None:
    assert parse_response_headers(
        {"x-tokenlay-rule-id": "r" * 1024, "x-tokenlay-model": "m" * 1025}
    ) == TokenlayResponseMetadata(rule_id="r" * 1024)
    padded = " " * 40 + "true"
    assert (
        parse_response_headers(
            {"x-tokenlay-limit-exceeded": padded, "x-tokenlay-rule-action": padded}
        )
        == TokenlayResponseMetadata()
    )


def test_warnings_are_bounded_in_size_count_and_depth() -> None:
    def warnings(value: str) -> tuple[str, ...] | None:
        meta = parse_response_headers({"x-tokenlay-warnings": value})
        return None if meta is None else meta.warnings

    many = [f"w{i}" for i in range(40)]
    assert warnings(json.dumps(many)) == tuple(many[:32])
    assert warnings(json.dumps(["a" * 1025, "b", "c" * 1024])) == ("b", "c" * 1024)
    quoting = ["[50%] of budget {org}"] * 10  # brackets inside the texts: 21 in all
    assert warnings(json.dumps(quoting)) == tuple(quoting)
    assert warnings(json.dumps(["[" * 32])) is None  # 33 brackets
    assert warnings("[" * 5000 + "]" * 5000) is None
    assert warnings(json.dumps(["x" * 1000] * 9)) is None  # 9,036 characters
    assert warnings("[]") == ()


# --- the two sides together: what one builds, the other reads back unchanged ---------

_visible_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=64
).filter(is_header_text)
_warning = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="[{"), max_size=80
)
_tokens = st.integers(min_value=0, max_value=10**12)


@st.composite
def _response_metadata(draw: st.DrawFn) -> TokenlayResponseMetadata:
    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.none() | strategy)

    return TokenlayResponseMetadata(
        rule_id=maybe(_visible_text),
        rule_action=maybe(st.sampled_from(["allow", "warn", "block", "queue"])),
        limit_exceeded=maybe(st.booleans()),
        cost=maybe(st.floats(min_value=0, max_value=1e9)),
        tokens_used=maybe(_tokens),
        input_tokens=maybe(_tokens),
        output_tokens=maybe(_tokens),
        duration_ms=maybe(_tokens),
        warnings=maybe(st.lists(_warning, max_size=8).map(tuple)),
        model=maybe(_visible_text),
    )


@given(_response_metadata())
def test_response_headers_round_trip(meta: TokenlayResponseMetadata) -> None:
    headers = response_headers(meta)
    # As the proxy sends them (latin-1 bytes) and the SDK reads them (httpx headers).
    wire = httpx.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()])
    for received in (headers, wire):
        parsed = parse_response_headers(received)
        if not headers:
            assert parsed is None
            continue
        assert parsed is not None
        if meta.cost is None:
            assert parsed.cost is None
        else:  # written with 10 decimals
            assert parsed.cost is not None
            assert math.isclose(parsed.cost, meta.cost, rel_tol=1e-15, abs_tol=5.1e-11)
        assert dataclasses.replace(parsed, cost=meta.cost) == meta


def test_cost_is_written_in_fixed_point() -> None:
    assert format_cost(0.00042) == "0.00042"
    assert format_cost(3.0) == "3"
    assert format_cost(0.0) == "0"
    assert format_cost(1e-12) == "0"
    assert format_cost(123456789.5) == "123456789.5"


@given(st.dictionaries(field_names, field_values, max_size=8))
def test_request_headers_round_trip_through_the_proxys_reader(fields: dict[str, str]) -> None:
    headers = build_request_headers(
        tokenlay_key="tl", provider_key="pk", provider_base="https://p", metadata=fields
    )
    wire = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    # An empty value names nothing on the proxy's side.
    assert metadata_from_wire(wire) == {k: v for k, v in fields.items() if v}


@pytest.mark.parametrize(
    ("method", "path", "endpoint"),
    [
        ("POST", "/chat/completions", "chat/completions"),
        ("post", "https://api.openai.com/v1/completions/", "completions"),
        ("POST", "/openai/deployments/d/embeddings", "embeddings"),
        ("POST", "v1/responses", "responses"),
        ("POST", "/v1/xchat/completions", "completions"),
        ("GET", "/v1/chat/completions", None),
        ("POST", "/v1/models", None),
        ("POST", "/v1/chat/completions/extra", None),
    ],
)
def test_metered_endpoint_is_told_by_the_end_of_the_path(
    method: str, path: str, endpoint: str | None
) -> None:
    assert metered_endpoint(method, path) == endpoint


def test_usage_option_helpers_keep_the_callers_other_options() -> None:
    body = {"stream": True, "stream_options": {"include_obfuscation": False}}
    assert not usage_option_given(body)
    assert not usage_option_on(body)
    added = with_usage_option(body)
    assert added["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert body["stream_options"] == {"include_obfuscation": False}, "the caller's is copied"
    assert usage_option_on(added)
    off = {"stream_options": {"include_usage": False}}
    assert usage_option_given(off)
    assert not usage_option_on(off)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("free-tier", True), ("gpt-4o mini", True), (" x", False), ("x ", False),
     ("Zoë", False), ("東京", False), ("a\tb", False), ("", False), ("x" * 1025, False)],
)  # fmt: skip
def test_header_text_is_what_both_sides_read_alike(text: str, ok: bool) -> None:
    assert is_header_text(text) is ok
