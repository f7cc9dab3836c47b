from __future__ import annotations

import asyncio
import dataclasses
import gc

import openai
import pytest

from tokenlay_otel import (
    AsyncTokenlayOpenAI,
    TokenlayOpenAI,
    TokenlayResponseMetadata,
    get_tokenlay_metadata,
    metadata,
)
from tokenlay_otel.testing import FakeOpenAIServer, Reply

from .conftest import PROVIDER_KEY, TOKENLAY_KEY

MESSAGES = [{"role": "user", "content": "hi"}]
PROVIDER_BASE = "https://api.mistral.ai/v1"


def make_client(server: FakeOpenAIServer, **kwargs: object) -> TokenlayOpenAI:
    options: dict[str, object] = {
        "provider_api_key": PROVIDER_KEY,
        "provider_api_base": PROVIDER_BASE,
        "tokenlay_key": TOKENLAY_KEY,
        "tokenlay_base_url": server.url,
        "max_retries": 0,
    }
    options.update(kwargs)
    return TokenlayOpenAI(**options)


def tokenlay_headers(server: FakeOpenAIServer) -> dict[str, str]:
    return {k: v for k, v in server.requests[-1].headers.items() if k.startswith("x-tokenlay-")}


def test_request_goes_to_the_proxy_with_the_wire_headers(server: FakeOpenAIServer) -> None:
    client = make_client(server, metadata={"user": "user_abc123", "org": "org_456xyz"})
    reply = client.chat.completions.create(model="mistral-small", messages=MESSAGES)

    assert reply.choices[0].message.content == "Hello from the fake server."
    sent = server.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.header_values("authorization") == [f"Bearer {TOKENLAY_KEY}"]
    assert tokenlay_headers(server) == {
        "x-tokenlay-provider-key": PROVIDER_KEY,
        "x-tokenlay-provider-base": PROVIDER_BASE,
        "x-tokenlay-user": "user_abc123",
        "x-tokenlay-org": "org_456xyz",
    }
    # Exactly one line per header: nothing duplicated in another case.
    names = [n.lower() for n, _ in sent.raw_headers]
    assert len(names) == len(set(names))
    assert sent.json() == {"model": "mistral-small", "messages": MESSAGES}


@pytest.mark.slow
def test_every_endpoint_is_routed(server: FakeOpenAIServer) -> None:
    client = make_client(server)
    client.embeddings.create(model="text-embedding-3-small", input="x")
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hello")
    client.responses.create(model="gpt-4o-mini", input="hi")
    client.models.list()
    assert [r.path for r in server.requests] == [
        "/v1/embeddings",
        "/v1/completions",
        "/v1/responses",
        "/v1/models",
    ]
    assert all(r.headers["authorization"] == f"Bearer {TOKENLAY_KEY}" for r in server.requests)


def test_seed_readme_extra_headers_are_metadata(server: FakeOpenAIServer) -> None:
    seed = {
        "user": "user_abc123",
        "org": "org_456xyz",
        "plan": "pro",
        "project": "chatbot_xyz",
        "feature": "autocomplete",
        "X-Request-Source": "web",
    }
    client = make_client(server, extra_headers=seed)
    client.chat.completions.create(model="m", messages=MESSAGES)

    sent = server.requests[-1].headers
    for field in ("user", "org", "plan", "project", "feature"):
        assert sent[f"x-tokenlay-{field}"] == seed[field]
        assert field not in sent
    assert sent["x-request-source"] == "web"
    assert seed["user"] == "user_abc123"
    assert len(seed) == 6


def test_per_request_extra_headers_win_and_are_not_mutated(server: FakeOpenAIServer) -> None:
    client = make_client(server, metadata={"user": "client-user", "org": "o"})
    per_request = {"user": "u2", "x-tokenlay-feature": "f", "X-Other": "1"}
    with metadata(user="ctx-user", plan="ctx-plan"):
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            extra_headers=per_request,
        )
    assert tokenlay_headers(server) | {} == {
        "x-tokenlay-provider-key": PROVIDER_KEY,
        "x-tokenlay-provider-base": PROVIDER_BASE,
        "x-tokenlay-user": "u2",
        "x-tokenlay-org": "o",
        "x-tokenlay-plan": "ctx-plan",
        "x-tokenlay-feature": "f",
    }
    assert server.requests[-1].headers["x-other"] == "1"
    assert per_request == {"user": "u2", "x-tokenlay-feature": "f", "X-Other": "1"}


def test_precedence_env_client_outer_inner_request(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENLAY_METADATA", "user=env,org=env,plan=env,project=env,feature=env")
    client = make_client(server, metadata={"org": "client", "plan": "client", "project": "client"})
    with metadata(plan="outer", project="outer"), metadata(project="inner", feature=None):
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            extra_headers={"x-tokenlay-user": "request"},
        )
    got = tokenlay_headers(server)
    assert {
        k: got.get(f"x-tokenlay-{k}") for k in ("user", "org", "plan", "project", "feature")
    } == {
        "user": "request",
        "org": "client",
        "plan": "outer",
        "project": "inner",
        "feature": None,
    }


def test_environment_fallbacks(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER_API_KEY", PROVIDER_KEY)
    monkeypatch.setenv("PROVIDER_API_BASE", PROVIDER_BASE)
    monkeypatch.setenv("TOKENLAY_KEY", TOKENLAY_KEY)
    monkeypatch.setenv("TOKENLAY_BASE_URL", server.url)
    monkeypatch.setenv("TOKENLAY_METADATA", "user=u1,org=o1")
    client = TokenlayOpenAI(max_retries=0)
    client.chat.completions.create(model="m", messages=MESSAGES)
    assert server.requests[-1].headers["authorization"] == f"Bearer {TOKENLAY_KEY}"
    assert tokenlay_headers(server) == {
        "x-tokenlay-provider-key": PROVIDER_KEY,
        "x-tokenlay-provider-base": PROVIDER_BASE,
        "x-tokenlay-user": "u1",
        "x-tokenlay-org": "o1",
    }


def test_environment_metadata_with_a_comma(
    server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENLAY_METADATA", "org=Acme%2C Inc.,user=caf%C3%A9")
    make_client(server).chat.completions.create(model="m", messages=MESSAGES)
    sent = server.requests[-1].headers
    assert sent["x-tokenlay-org"] == "Acme, Inc."
    assert sent["x-tokenlay-user"] == "caf%C3%A9"  # non-ASCII goes percent-encoded


def test_default_provider_base_is_openai(server: FakeOpenAIServer) -> None:
    client = make_client(server, provider_api_base=None)
    client.models.list()
    assert tokenlay_headers(server)["x-tokenlay-provider-base"] == "https://api.openai.com/v1"


def test_non_ascii_metadata_is_percent_encoded_on_the_wire(server: FakeOpenAIServer) -> None:
    client = make_client(server)
    with metadata(user="Zoë Ångström", org="50% off"):
        client.models.list()
    raw = dict((n.lower(), v) for n, v in server.requests[-1].raw_headers)
    assert raw["x-tokenlay-user"] == "Zo%C3%AB%20%C3%85ngstr%C3%B6m".replace("%20", " ")
    assert raw["x-tokenlay-org"] == "50%25 off"


def test_with_options_and_copy_keep_the_tokenlay_settings(server: FakeOpenAIServer) -> None:
    client = make_client(server, metadata={"user": "u1"})
    for derived in (client.with_options(timeout=5), client.copy(max_retries=1)):
        assert isinstance(derived, TokenlayOpenAI)
        derived.models.list()
        assert server.requests[-1].headers["authorization"] == f"Bearer {TOKENLAY_KEY}"
        assert tokenlay_headers(server)["x-tokenlay-user"] == "u1"
        assert tokenlay_headers(server)["x-tokenlay-provider-key"] == PROVIDER_KEY
    client.with_options(api_key="sk-other").models.list()
    assert tokenlay_headers(server)["x-tokenlay-provider-key"] == "sk-other"


def test_api_key_and_base_url_are_accepted_as_provider_aliases(server: FakeOpenAIServer) -> None:
    client = TokenlayOpenAI(
        api_key=PROVIDER_KEY,
        base_url=PROVIDER_BASE,
        tokenlay_key=TOKENLAY_KEY,
        tokenlay_base_url=server.url,
    )
    client.models.list()
    assert tokenlay_headers(server)["x-tokenlay-provider-key"] == PROVIDER_KEY


def test_get_tokenlay_metadata_for_plain_raw_and_stream(server: FakeOpenAIServer) -> None:
    server.response_headers.update(
        {
            "x-tokenlay-rule-id": "pro-cap",
            "x-tokenlay-rule-action": "warn",
            "x-tokenlay-cost": "0.0021",
            "x-tokenlay-warnings": '["80% of monthly budget"]',
        }
    )
    expected = TokenlayResponseMetadata(
        rule_id="pro-cap", rule_action="warn", cost=0.0021, warnings=("80% of monthly budget",)
    )
    client = make_client(server)
    reply = client.chat.completions.create(model="m", messages=MESSAGES)
    assert get_tokenlay_metadata(reply) == expected

    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert get_tokenlay_metadata(raw) == expected
    assert raw.parse().choices[0].message.content

    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    chunks = list(stream)
    # The usage-only chunk the SDK asked for is hidden from the caller...
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        "Hello from the fake server."
    )
    assert server.requests[-1].json()["stream_options"] == {"include_usage": True}
    # ...and its token counts complete what the headers said.
    assert get_tokenlay_metadata(stream) == dataclasses.replace(
        expected, input_tokens=12, output_tokens=5, tokens_used=17
    )

    assert get_tokenlay_metadata(object()) is None


def test_metadata_is_forgotten_with_the_response(server: FakeOpenAIServer) -> None:
    from tokenlay_otel import _responses

    server.response_headers["x-tokenlay-rule-id"] = "r"
    client = make_client(server)
    before = len(_responses._remembered._by_id)
    reply = client.chat.completions.create(model="m", messages=MESSAGES)
    assert len(_responses._remembered._by_id) == before + 1
    del reply
    gc.collect()
    assert len(_responses._remembered._by_id) == before


def test_blocked_call_raises_the_usual_openai_error(server: FakeOpenAIServer) -> None:
    server.reply(
        Reply(
            status=429,
            body={
                "error": {
                    "message": "free tier: 10 requests per day",
                    "type": "tokenlay_limit",
                    "code": "limit_exceeded",
                }
            },
            headers={
                "x-tokenlay-rule-id": "free-daily",
                "x-tokenlay-rule-action": "block",
                "x-tokenlay-limit-exceeded": "true",
            },
        )
    )
    client = make_client(server)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 429
    assert info.value.code == "limit_exceeded"
    assert get_tokenlay_metadata(info.value) == TokenlayResponseMetadata(
        rule_id="free-daily", rule_action="block", limit_exceeded=True
    )


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("tokenlay_key", "tokenlay_key=... or set the TOKENLAY_KEY"),
        ("provider_api_key", "provider_api_key=... .*PROVIDER_API_KEY"),
    ],
)
def test_missing_keys_are_a_clear_error(
    server: FakeOpenAIServer, missing: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make_client(server, **{missing: None})
    assert PROVIDER_KEY not in str(info.value)
    assert TOKENLAY_KEY not in str(info.value)


@pytest.mark.parametrize(
    ("argument", "url"),
    [
        ("tokenlay_base_url", "http://tokenlay.example.com"),
        ("provider_api_base", "http://api.x.ai/v1"),
    ],
)
def test_plain_http_to_a_remote_host_is_refused(
    server: FakeOpenAIServer, argument: str, url: str
) -> None:
    with pytest.raises(ValueError, match=f"{argument} is plain http://.*clear text") as info:
        make_client(server, **{argument: url})
    assert PROVIDER_KEY not in str(info.value)
    assert TOKENLAY_KEY not in str(info.value)


def test_plain_http_from_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENLAY_BASE_URL", "http://proxy.internal:8080")
    with pytest.raises(ValueError, match="TOKENLAY_BASE_URL is plain http://"):
        TokenlayOpenAI(provider_api_key=PROVIDER_KEY, tokenlay_key=TOKENLAY_KEY)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metadata": {"user": "a\r\nInjected: 1"}},
        {"extra_headers": {"org": "o\n"}},
        {"metadata": {"bad name": "x"}},
        {"metadata": {"user": "x" * 2000}},
    ],
)
def test_bad_metadata_at_construction_is_rejected(
    server: FakeOpenAIServer, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError, match="metadata field"):
        make_client(server, **kwargs)


def test_bad_per_request_metadata_is_rejected_before_sending(server: FakeOpenAIServer) -> None:
    client = make_client(server)
    with pytest.raises(ValueError, match="'user' contains a control character"):
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            extra_headers={"user": "a\r\nx-evil: 1"},
        )
    assert server.requests == []


def test_keys_never_appear_in_reprs(server: FakeOpenAIServer) -> None:
    client = make_client(server, metadata={"user": "u"})
    texts = [repr(client), repr(client._tokenlay_route), repr(metadata(user="u"))]
    for text in texts:
        assert PROVIDER_KEY not in text
        assert TOKENLAY_KEY not in text


def test_async_client(server: FakeOpenAIServer) -> None:
    server.response_headers["x-tokenlay-rule-action"] = "allow"

    async def main() -> None:
        client = AsyncTokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            provider_api_base=PROVIDER_BASE,
            tokenlay_key=TOKENLAY_KEY,
            tokenlay_base_url=server.url,
            metadata={"org": "o1"},
        )
        async with metadata(user="async-user"):
            reply = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert get_tokenlay_metadata(reply) == TokenlayResponseMetadata(rule_action="allow")
        stream = await client.with_options(timeout=5).chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
        )
        chunks = [c async for c in stream]
        assert chunks

    asyncio.run(main())
    for request in server.requests:
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {TOKENLAY_KEY}"
        assert request.headers["x-tokenlay-org"] == "o1"
    assert server.requests[0].headers["x-tokenlay-user"] == "async-user"
    assert "x-tokenlay-user" not in server.requests[1].headers


def test_is_a_real_openai_client(server: FakeOpenAIServer) -> None:
    assert issubclass(TokenlayOpenAI, openai.OpenAI)
    assert issubclass(AsyncTokenlayOpenAI, openai.AsyncOpenAI)
