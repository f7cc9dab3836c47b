"""Settings are loud and partial: a bad one is one ERROR line and the rest still works.

The client's transport records every request it sends (where, with which headers), so
each test sees where a call really went: the proxy, the provider, or nowhere.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import openai
import pytest

from tokenlay_otel import TokenlayInstrumentor, TokenlayOpenAI, metadata
from tokenlay_otel._config import Settings, parse_bool
from tokenlay_otel._routing import TokenlayRouteError
from tokenlay_otel.testing import chat_completion

from .conftest import PROVIDER_KEY, TOKENLAY_KEY, SpanCapture
from .inprocess import httpx

PROVIDER = "https://api.openai.com/v1"
PROXY = "https://proxy.example.com"
MESSAGES = [{"role": "user", "content": "hi"}]


class Wire:
    """A transport that answers every request and keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def __call__(self, request: Any) -> Any:
        self.sent.append(request)
        if request.url.path.endswith("chat/completions"):
            body = chat_completion("gpt-4o-mini")
        else:
            body = {"object": "list", "data": []}
        return httpx.Response(200, json=body)

    def client(self, base_url: str = PROVIDER, cls: type = openai.OpenAI, **kw: Any) -> Any:
        http = httpx.Client(transport=httpx.MockTransport(self))
        return cls(api_key=PROVIDER_KEY, base_url=base_url, http_client=http, max_retries=0, **kw)

    def hosts(self) -> list[str]:
        return [request.url.host for request in self.sent]


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def instrument_env(telemetry: SpanCapture, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Instrument as ``opentelemetry-instrument`` does: settings read by instrument()."""
    instrumentor = TokenlayInstrumentor()

    def run(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        instrumentor.instrument(
            tracer_provider=telemetry.provider, meter_provider=telemetry.meter_provider
        )

    yield run
    instrumentor.uninstrument()


def _lines(caplog: pytest.LogCaptureFixture, level: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == level and "tokenlay" in r.name]


# --- booleans -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), (" 1 ", True), ("yes", True), ("on", True),
     ("false", False), ("0", False), ("No", False), ("off", False), ("", None), (None, None)],
)  # fmt: skip
def test_booleans_read_the_usual_words(text: str | None, value: bool | None) -> None:
    for default in (True, False):
        assert parse_bool("X", text, default=default) is (default if value is None else value)


@pytest.mark.parametrize("text", ["disabled", "flase", "none", "never", "enable", "2", "y"])
def test_any_other_boolean_is_an_error_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=f"TOKENLAY_FAIL_OPEN .*got '{text}'"):
        parse_bool("TOKENLAY_FAIL_OPEN", text, default=False)
    settings, problems = Settings.read_env(
        {"TOKENLAY_FAIL_OPEN": text, "TOKENLAY_ROUTE": text, "TOKENLAY_REQUIRE_ROUTE": text}
    )
    # Never turns fail-open on, routing off, or the requirement off.
    assert (settings.fail_open, settings.route, settings.require_route) == (False, True, True)
    assert len(problems) == 3
    for name in ("TOKENLAY_FAIL_OPEN", "TOKENLAY_ROUTE", "TOKENLAY_REQUIRE_ROUTE"):
        assert any(p.startswith(name) for p in problems), problems


def test_an_unreadable_fail_open_does_not_send_calls_past_a_proxy_that_is_down(
    wire: Wire, instrument_env, caplog: pytest.LogCaptureFixture
) -> None:
    instrument_env(
        TOKENLAY_KEY=TOKENLAY_KEY,
        TOKENLAY_BASE_URL="http://127.0.0.1:9",
        TOKENLAY_FAIL_OPEN="disabled",
    )
    client = openai.OpenAI(
        api_key=PROVIDER_KEY, base_url="http://127.0.0.1:9/provider", max_retries=0
    )
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert any("TOKENLAY_FAIL_OPEN" in line for line in _lines(caplog, "ERROR"))
    assert not any("fail-open sends" in line for line in _lines(caplog, "WARNING"))


# --- configuration errors are partial ------------------------------------------------


def test_bad_metadata_is_one_error_and_calls_are_still_routed_and_traced(
    wire: Wire, instrument_env, telemetry: SpanCapture, caplog: pytest.LogCaptureFixture
) -> None:
    instrument_env(
        TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=PROXY, TOKENLAY_METADATA="user,org=o1"
    )
    errors = _lines(caplog, "ERROR")
    assert len(errors) == 1 and "TOKENLAY_METADATA" in errors[0] and "'user'" in errors[0]
    wire.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    (request,) = wire.sent
    assert request.url.host == "proxy.example.com"
    assert request.headers["x-tokenlay-org"] == "o1"  # the valid entry is kept
    assert telemetry.only_span().attributes["tokenlay.routed"] is True


def test_a_refused_base_url_is_one_error_and_calls_go_direct_traced(
    wire: Wire, instrument_env, telemetry: SpanCapture, caplog: pytest.LogCaptureFixture
) -> None:
    instrument_env(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL="http://10.1.2.3:8787")
    (error,) = _lines(caplog, "ERROR")
    assert "TOKENLAY_BASE_URL" in error and "TOKENLAY_ALLOW_HTTP_HOSTS=10.1.2.3" in error
    assert any(
        "not routed" in line and "TOKENLAY_BASE_URL" in line for line in _lines(caplog, "INFO")
    )
    wire.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert wire.hosts() == ["api.openai.com"]
    assert telemetry.only_span().attributes["tokenlay.routed"] is False


def test_a_malformed_prices_file_does_not_turn_routing_off(
    wire: Wire, instrument_env, telemetry: SpanCapture, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    path = tmp_path / "prices.json"
    path.write_text("{not json")
    instrument_env(
        TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=PROXY, TOKENLAY_PRICES_FILE=str(path)
    )
    (error,) = _lines(caplog, "ERROR")
    assert str(path) in error
    wire.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert wire.hosts() == ["proxy.example.com"]
    assert len(telemetry.spans()) == 1


def test_other_bad_settings_are_named_and_replaced_by_their_defaults() -> None:
    settings, problems = Settings.read_env(
        {
            "TOKENLAY_METRIC_USER_LIMIT": "lots",
            "TOKENLAY_METRIC_ATTRIBUTES": "org,bad name,feature",
            "TOKENLAY_ROUTE_ENDPOINTS": "images,../etc",
            "TOKENLAY_ALLOW_HTTP_HOSTS": "proxy,http://x:1/",
        }
    )
    assert settings.metric_value_limit == 1000
    assert settings.metric_fields == ("org", "feature")
    assert settings.route_endpoints == ("metered", "images")
    assert settings.allow_http_hosts == {"proxy"}
    named = sorted(p.split(" ")[0].rstrip(":") for p in problems)
    assert named == [
        "TOKENLAY_ALLOW_HTTP_HOSTS",
        "TOKENLAY_METRIC_ATTRIBUTES",
        "TOKENLAY_METRIC_USER_LIMIT",
        "TOKENLAY_ROUTE_ENDPOINTS",
    ]
    with pytest.raises(ValueError, match="TOKENLAY_METRIC_USER_LIMIT"):
        Settings.from_env({"TOKENLAY_METRIC_USER_LIMIT": "lots"})  # the strict reader


# --- where calls go, said once ---------------------------------------------------------


def test_instrument_says_where_calls_are_routed(
    instrument_env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    instrument_env(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=PROXY)
    (line,) = [m for m in _lines(caplog, "INFO") if "instrumented openai" in m]
    assert PROXY in line and "chat completions" in line and TOKENLAY_KEY not in line


def test_a_missing_key_is_said_at_info_and_at_warning_when_routing_was_meant(
    instrument_env, caplog: pytest.LogCaptureFixture
) -> None:
    instrument_env()
    assert any("TOKENLAY_KEY is not set" in m for m in _lines(caplog, "INFO"))
    TokenlayInstrumentor().uninstrument()
    caplog.clear()
    instrument_env(TOKENLAY_BASE_URL=PROXY, TOKENLAY_METADATA="org=o1")
    assert any("TOKENLAY_KEY is not set" in m for m in _lines(caplog, "WARNING"))


# --- TOKENLAY_REQUIRE_ROUTE -----------------------------------------------------------


def test_required_routing_refuses_metered_calls_it_cannot_route(
    wire: Wire, instrument_env, caplog: pytest.LogCaptureFixture
) -> None:
    instrument_env(TOKENLAY_REQUIRE_ROUTE="true")  # and no key
    assert any("TOKENLAY_KEY is not set" in m for m in _lines(caplog, "ERROR"))
    client = wire.client()
    with pytest.raises(TokenlayRouteError, match="TOKENLAY_KEY is not set") as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert isinstance(info.value, openai.OpenAIError)
    with pytest.raises(TokenlayRouteError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert wire.sent == []  # nothing left the process
    client.files.list()  # not a metered endpoint: goes to the provider as it would
    assert wire.hosts() == ["api.openai.com"]


def test_required_routing_refuses_azure_and_a_refused_provider_base(
    wire: Wire, instrument_env
) -> None:
    instrument_env(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=PROXY, TOKENLAY_REQUIRE_ROUTE="1")
    azure = openai.AzureOpenAI(
        api_key=PROVIDER_KEY,
        api_version="2024-10-21",
        azure_endpoint="https://x.openai.azure.com",
        http_client=httpx.Client(transport=httpx.MockTransport(wire)),
    )
    with pytest.raises(TokenlayRouteError, match="Azure"):
        azure.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    plain_http = wire.client("http://my-vllm.internal:8000/v1")
    with pytest.raises(TokenlayRouteError, match=r"TOKENLAY_ALLOW_HTTP_HOSTS=my-vllm\.internal"):
        plain_http.chat.completions.create(model="m", messages=MESSAGES)
    assert wire.sent == []
    wire.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert wire.hosts() == ["proxy.example.com"]


# --- one http:// rule -------------------------------------------------------------------


def test_one_http_rule_for_instrumented_and_drop_in_clients(
    wire: Wire, instrument_env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    instrument_env(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=PROXY)
    private = "http://my-llm.internal:8000/v1"
    # Refused for both kinds of client, with an error that says how to allow it.
    wire.client(private).chat.completions.create(model="m", messages=MESSAGES)
    assert wire.hosts() == ["my-llm.internal"]  # sent as the client would, not routed
    errors = [m for m in _lines(caplog, "ERROR") if "my-llm.internal" in m]
    assert len(errors) == 1 and "TOKENLAY_ALLOW_HTTP_HOSTS=my-llm.internal" in errors[0]
    with pytest.raises(ValueError, match=r"TOKENLAY_ALLOW_HTTP_HOSTS=my-llm\.internal"):
        TokenlayOpenAI(provider_api_key=PROVIDER_KEY, provider_api_base=private,
                       tokenlay_key=TOKENLAY_KEY, tokenlay_base_url=PROXY)  # fmt: skip

    # Named hosts are allowed, for the provider and for the proxy (a compose network).
    monkeypatch.setenv("TOKENLAY_ALLOW_HTTP_HOSTS", "my-llm.internal, Tokenlay-Proxy")
    TokenlayInstrumentor().uninstrument()
    instrument_env(TOKENLAY_BASE_URL="http://tokenlay-proxy:8787")
    wire.sent.clear()
    wire.client(private).chat.completions.create(model="m", messages=MESSAGES)
    (request,) = wire.sent
    assert request.url.host == "tokenlay-proxy"
    assert request.headers["x-tokenlay-provider-base"] == private
    client = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        provider_api_base=private,
        tokenlay_key=TOKENLAY_KEY,
        tokenlay_base_url="http://tokenlay-proxy:8787",
        http_client=httpx.Client(transport=httpx.MockTransport(wire)),
    )
    client.chat.completions.create(model="m", messages=MESSAGES)
    assert wire.sent[-1].url.host == "tokenlay-proxy"
    with pytest.raises(ValueError, match="base_url"):
        client.with_options(base_url="http://elsewhere.internal/v1")


# --- caller headers that collide with ours --------------------------------------------


@pytest.mark.parametrize(
    "name", ["authorization", "AUTHORIZATION", "Authorization", "X-Tokenlay-Provider-Key",
             "x-tokenlay-provider-base"],
)  # fmt: skip
def test_a_caller_header_that_collides_with_ours_is_replaced_not_doubled(
    wire: Wire, instrument_env, name: str
) -> None:
    instrument_env(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=PROXY)
    for client in (
        wire.client(),
        wire.client(default_headers={name: "from-defaults"}),
        TokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            tokenlay_key=TOKENLAY_KEY,
            tokenlay_base_url=PROXY,
            default_headers={name: "from-defaults"},
            http_client=httpx.Client(transport=httpx.MockTransport(wire)),
        ),
    ):
        wire.sent.clear()
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={name: "from-call"}
        )
        (request,) = wire.sent
        lowered = name.lower()
        values = [v for k, v in request.headers.multi_items() if k.lower() == lowered]
        assert len(values) == 1, values
        assert "from-" not in values[0]
        assert [k for k, _ in request.headers.multi_items()].count("authorization") == 1
        assert request.headers["authorization"] == f"Bearer {TOKENLAY_KEY}"


# --- the proxy cannot be reached --------------------------------------------------------


def test_a_proxy_that_is_down_is_named_in_a_warning_and_on_the_span(
    instrument_env, telemetry: SpanCapture, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = "http://127.0.0.1:9"  # the discard port: nothing listens
    instrument_env(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=proxy)
    client = openai.OpenAI(api_key=PROVIDER_KEY, max_retries=0)
    with pytest.raises(openai.APIConnectionError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert type(info.value) is openai.APIConnectionError  # openai's own, unchanged
    warnings = [m for m in _lines(caplog, "WARNING") if proxy in m]
    assert len(warnings) == 1 and "could not be reached" in warnings[0]
    span = telemetry.only_span()
    assert span.attributes["tokenlay.proxy.url"] == proxy
    assert span.attributes["error.type"] == "openai.APIConnectionError"


# --- one telemetry state per process ------------------------------------------------------


def test_drop_in_clients_share_one_user_cap(
    wire: Wire, instrument_env, telemetry: SpanCapture
) -> None:
    instrument_env(TOKENLAY_METRIC_USER_LIMIT="2")
    for user in ("u1", "u2", "u3"):
        client = TokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            tokenlay_key=TOKENLAY_KEY,
            tokenlay_base_url=PROXY,
            metadata={"user": user},
            http_client=httpx.Client(transport=httpx.MockTransport(wire)),
        )
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    (_, points) = telemetry.metrics()["tokenlay.client.requests"]
    users = sorted(p.attributes["tokenlay.user"] for p in points)
    assert users == ["_other", "u1", "u2"]


def test_drop_in_clients_without_instrument_share_one_state(
    wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenlay_otel import _state

    monkeypatch.setattr(_state, "_default", None)
    monkeypatch.setenv("TOKENLAY_METRIC_USER_LIMIT", "2")
    seen = []
    for user in ("u1", "u2", "u3"):
        TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key=TOKENLAY_KEY,
                       metadata={"user": user})  # fmt: skip
        seen.append(_state.current_telemetry())
    assert seen[0] is seen[1] is seen[2]
    assert json.dumps(seen[0].settings.metric_value_limit) == "2"


# --- what a hostile review found --------------------------------------------------------


def test_a_key_copied_with_a_newline_still_routes_and_a_bad_one_is_named(
    wire: Wire, instrument_env, caplog: pytest.LogCaptureFixture
) -> None:
    instrument_env(TOKENLAY_KEY=f"  {TOKENLAY_KEY}\n", TOKENLAY_BASE_URL=PROXY)
    wire.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert wire.sent[-1].headers["authorization"] == f"Bearer {TOKENLAY_KEY}"
    for bad in ("tlk_sécret", "tl key"):
        settings, problems = Settings.read_env({"TOKENLAY_KEY": bad})
        assert settings.instrumented_route() is None
        (problem,) = problems
        assert problem.startswith("TOKENLAY_KEY holds characters") and bad not in problem
    with pytest.raises(ValueError, match="tokenlay_key holds characters"):
        TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key="tl\nkey")


@pytest.mark.parametrize(
    ("base", "problem"),
    [("https://h:abc", "not a valid URL"), ("https://h:99999", "not a valid URL"),
     ("https://h/?a=b", "query or a fragment"), ("https://h/#x", "query or a fragment"),
     ("https://[::1", "not a valid URL")],
)  # fmt: skip
def test_a_base_url_that_cannot_take_paths_is_refused_by_name(base: str, problem: str) -> None:
    settings, problems = Settings.read_env(
        {"TOKENLAY_KEY": TOKENLAY_KEY, "TOKENLAY_BASE_URL": base}
    )
    assert settings.instrumented_route() is None
    (said,) = problems
    assert said.startswith("TOKENLAY_BASE_URL") and problem in said


def test_urls_are_shown_without_their_password(
    wire: Wire, instrument_env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    instrument_env(
        TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL="https://user:pw-SECRET@proxy.example.com"
    )
    wire.client("http://user:pw-SECRET@10.9.8.7/v1").chat.completions.create(
        model="m", messages=MESSAGES
    )
    with pytest.raises(ValueError, match="TOKENLAY_BASE_URL") as info:
        Settings.from_env({"TOKENLAY_KEY": "k", "TOKENLAY_BASE_URL": "ftp://u:pw-SECRET@h"})
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("tokenlay")]
    logged = " ".join(ours) + str(info.value)  # (httpx logs the URL it sends to as it is)
    assert "proxy.example.com" in logged and "10.9.8.7" in logged
    assert "pw-SECRET" not in logged


@pytest.mark.parametrize(
    "url",
    ["./chat/completions", "/x/../chat/completions", "/chat/completions/.",
     "/chat/completions#x", "http://127.0.0.1:9/v1/chat/completions"],
)  # fmt: skip
def test_required_routing_sees_the_path_httpx_will_send(
    wire: Wire, instrument_env, url: str
) -> None:
    instrument_env(TOKENLAY_REQUIRE_ROUTE="true")  # no key: every metered call is refused
    with pytest.raises(TokenlayRouteError):
        wire.client().post(url, cast_to=object, body={"model": "m", "messages": MESSAGES})
    assert wire.sent == []


def test_required_routing_refuses_an_absolute_url_it_would_not_route(
    wire: Wire, instrument_env
) -> None:
    instrument_env(TOKENLAY_KEY=TOKENLAY_KEY, TOKENLAY_BASE_URL=PROXY, TOKENLAY_REQUIRE_ROUTE="1")
    with pytest.raises(TokenlayRouteError, match="absolute URL"):
        wire.client().post("https://api.openai.com/v1/chat/completions", cast_to=object,
                           body={"model": "m", "messages": MESSAGES})  # fmt: skip
    assert wire.sent == []


def test_drop_in_clients_follow_required_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENLAY_REQUIRE_ROUTE", "true")
    with pytest.raises(ValueError, match="fail-open"):
        TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key=TOKENLAY_KEY, fail_open=True)
    monkeypatch.setenv("TOKENLAY_FAIL_OPEN", "true")
    with pytest.raises(ValueError, match="TOKENLAY_REQUIRE_ROUTE"):
        TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key=TOKENLAY_KEY)
    monkeypatch.delenv("TOKENLAY_FAIL_OPEN")
    client = TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key=TOKENLAY_KEY)
    assert client._tokenlay_route.required and not client._tokenlay_route.fail_open


@pytest.mark.parametrize("text", ["²", "٣", "1" * 29, "-5", "1e3"])
def test_a_user_limit_must_be_plain_digits_within_reason(text: str) -> None:
    settings, (problem,) = Settings.read_env({"TOKENLAY_METRIC_USER_LIMIT": text})
    assert settings.metric_value_limit == 1000 and "TOKENLAY_METRIC_USER_LIMIT" in problem


@pytest.mark.parametrize("entry", [".", "..", "-", "a" * 300, "x.", "http://h"])
def test_allowed_http_hosts_are_host_names(entry: str) -> None:
    settings, (problem,) = Settings.read_env({"TOKENLAY_ALLOW_HTTP_HOSTS": f"ok-host,{entry}"})
    assert settings.allow_http_hosts == {"ok-host"} and "TOKENLAY_ALLOW_HTTP_HOSTS" in problem


def test_instrument_never_raises_on_what_the_environment_holds(
    tmp_path, instrument_env, telemetry: SpanCapture, wire: Wire
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"m": {"input": 1' + "0" * 400 + ', "output": Infinity}}')
    instrument_env(TOKENLAY_METRIC_USER_LIMIT="²", TOKENLAY_PRICES_FILE=str(prices),
                   TOKENLAY_KEY="tlk_sécret", TOKENLAY_BASE_URL="https://h:abc")  # fmt: skip
    wire.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert wire.hosts() == ["api.openai.com"]  # traced, not routed
    assert len(telemetry.spans()) == 1


def test_the_user_cap_holds_across_instrument_cycles_and_drop_in_clients(
    wire: Wire, telemetry: SpanCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenlay_otel import _state

    monkeypatch.setattr(_state, "_default", None)
    monkeypatch.setenv("TOKENLAY_METRIC_USER_LIMIT", "2")
    users = iter(f"u{n}" for n in range(10))

    def call() -> None:
        with metadata(user=next(users)):
            wire.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    drop_in = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        tokenlay_key=TOKENLAY_KEY,
        http_client=httpx.Client(transport=httpx.MockTransport(wire)),
    )
    with metadata(user="u-first"):
        drop_in.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    for _ in range(3):
        instrumentor = TokenlayInstrumentor()
        instrumentor.instrument(tracer_provider=telemetry.provider,
                                meter_provider=telemetry.meter_provider)  # fmt: skip
        call()
        instrumentor.uninstrument()
    (_, points) = telemetry.metrics()["tokenlay.client.requests"]
    users_seen = {p.attributes["tokenlay.user"] for p in points}
    assert users_seen == {"u0", "_other"}  # u-first took the other place, on another provider


def test_omit_takes_a_metadata_field_away_for_one_call(
    wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    """openai's own way to drop a default header works on metadata too, quietly."""
    from openai import Omit

    client = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        tokenlay_key=TOKENLAY_KEY,
        tokenlay_base_url=PROXY,
        metadata={"user": "u1", "org": "o1"},
        http_client=httpx.Client(transport=httpx.MockTransport(wire)),
    )
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                   extra_headers={"x-tokenlay-user": Omit()})  # fmt: skip
    (request,) = wire.sent
    assert "x-tokenlay-user" not in request.headers
    assert request.headers["x-tokenlay-org"] == "o1"
    assert not _lines(caplog, "WARNING")


# --- the environment, read as plain data -----------------------------------------------


def test_an_empty_environment_is_the_defaults_without_a_word() -> None:
    settings, problems = Settings.read_env({})
    assert (settings, problems) == (Settings(), ())
    assert settings.instrumented_route() is None
    assert settings.why_not_routed() == "TOKENLAY_KEY is not set"


def test_every_variable_is_read_into_its_setting() -> None:
    settings, problems = Settings.read_env(
        {
            "TOKENLAY_KEY": f" {TOKENLAY_KEY}\n",
            "TOKENLAY_BASE_URL": "https://proxy.example.com/",
            "TOKENLAY_METADATA": "user=u1, org=acme,project=p",
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": " SPAN_ONLY ",
            "TOKENLAY_METRIC_ATTRIBUTES": "org, plan",
            "TOKENLAY_METRIC_USER_LIMIT": " 25 ",
            "TOKENLAY_PRICES_FILE": "/etc/prices.json",
            "TOKENLAY_ROUTE": "on",
            "TOKENLAY_FAIL_OPEN": "yes",
            "TOKENLAY_ROUTE_ENDPOINTS": "images, metered,images",
            "TOKENLAY_ALLOW_HTTP_HOSTS": "Proxy.Internal, [::1],",
        }
    )
    assert problems == ()
    assert settings.tokenlay_key == TOKENLAY_KEY
    assert settings.tokenlay_base_url.rstrip("/") == "https://proxy.example.com"
    assert dict(settings.metadata) == {"user": "u1", "org": "acme", "project": "p"}
    assert settings.capture_content is True
    assert settings.metric_fields == ("org", "plan")
    assert settings.metric_value_limit == 25
    assert settings.prices_file == "/etc/prices.json"
    assert (settings.route, settings.fail_open, settings.require_route) == (True, True, False)
    assert settings.route_endpoints == ("metered", "images")  # each scope once
    assert settings.allow_http_hosts == {"proxy.internal", "::1"}
    route = settings.instrumented_route()
    assert route is not None and settings.why_not_routed() is None
    assert (route.tokenlay_key, route.fail_open, route.required) == (TOKENLAY_KEY, True, False)
    assert route.tokenlay_base_url == settings.tokenlay_base_url
    assert route.metadata == settings.metadata
    assert TOKENLAY_KEY not in repr(settings) and TOKENLAY_KEY not in repr(route)


@pytest.mark.parametrize(
    ("value", "captured"),
    [("true", True), ("span_only", True), ("span_and_event", True), ("event_only", False),
     ("false", False), ("", False), ("NO_CONTENT", False)],
)  # fmt: skip
def test_content_is_captured_only_on_the_span_words(value: str, captured: bool) -> None:
    settings, _ = Settings.read_env({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": value})
    assert settings.capture_content is captured


def test_required_routing_turns_fail_open_off_and_says_so() -> None:
    settings, (problem,) = Settings.read_env(
        {"TOKENLAY_REQUIRE_ROUTE": "true", "TOKENLAY_FAIL_OPEN": "true"}
    )
    assert (settings.require_route, settings.fail_open) == (True, False)
    assert problem.startswith("TOKENLAY_FAIL_OPEN=true is ignored")


def test_routing_off_keeps_the_key_but_routes_nothing() -> None:
    settings, problems = Settings.read_env(
        {"TOKENLAY_KEY": TOKENLAY_KEY, "TOKENLAY_BASE_URL": PROXY, "TOKENLAY_ROUTE": "false"}
    )
    assert problems == ()
    assert settings.instrumented_route() is None
    assert settings.why_not_routed() == "TOKENLAY_ROUTE is false"


def test_without_routing_the_routing_variables_are_not_read() -> None:
    # Drop-in clients take their route from their arguments: a bad key or requirement
    # in the environment is none of their business.
    env = {"TOKENLAY_KEY": "tl key", "TOKENLAY_REQUIRE_ROUTE": "maybe", "TOKENLAY_ROUTE": "0"}
    settings, problems = Settings.read_env(env, routing=False)
    assert (settings.tokenlay_key, settings.require_route) == (None, False)
    assert problems == ()
    with pytest.raises(ValueError, match="TOKENLAY_KEY holds characters"):
        Settings.from_env(env)
    assert Settings.from_env(env, routing=False) == settings


def test_a_refused_base_url_is_why_calls_are_not_routed() -> None:
    settings, (problem,) = Settings.read_env(
        {"TOKENLAY_KEY": TOKENLAY_KEY, "TOKENLAY_BASE_URL": "http://10.1.2.3:8787"}
    )
    assert settings.route_refused == problem
    assert settings.why_not_routed() == problem
    assert settings.instrumented_route() is None
    allowed, problems = Settings.read_env(
        {
            "TOKENLAY_KEY": TOKENLAY_KEY,
            "TOKENLAY_BASE_URL": "http://10.1.2.3:8787",
            "TOKENLAY_ALLOW_HTTP_HOSTS": "10.1.2.3",
        }
    )
    assert problems == () and allowed.instrumented_route() is not None
