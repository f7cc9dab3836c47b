"""Every admitted call settles exactly once, on every exit, on SQLite and on Redis.

Each test runs the real gateway (uvicorn on 127.0.0.1) in front of a real upstream on
127.0.0.1, and reads what the proxy wrote in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import openai
import pytest

from tokenlay_otel import TokenlayOpenAI
from tokenlay_otel.proxy import parse_rules
from tokenlay_otel.proxy.local import local_proxy
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, SpanCapture
from .hostile_upstream import chat_body, http_response, raw_upstream, sse_response
from .proxy_harness import PROXY_KEY
from .proxy_store_view import StoreView, redis_url, store, wait_for

pytestmark = pytest.mark.slow  # real proxies and stores, hundreds of streams settled

__all__ = ["redis_url", "store"]  # fixtures

MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]
STREAM_USAGE = 12 + 5  # what FakeOpenAIServer reports for a stream of its five words
BODY_USAGE = 12 + 7


def rules(*limits: dict[str, Any]) -> list[Any]:
    return parse_rules([{"id": "limits", "if": {}, "then": {"limits": list(limits)}}])


ONE_AT_A_TIME = rules(
    {"type": "concurrent", "max": 1, "per": "user"},
    {"type": "tokens", "max": 100_000, "window": "total", "per": "user"},
)


@contextmanager
def gateway(view: StoreView, upstream_url: str, limits: list[Any], **config: Any) -> Iterator[str]:
    with local_proxy(
        rules=limits,
        keys=(PROXY_KEY,),
        mock_upstream=False,
        store=view.make(),
        allow_providers=(upstream_url,),
        **config,
    ) as url:
        yield url


def headers(upstream_url: str, user: str | None = "u1") -> dict[str, str]:
    out = {
        "authorization": f"Bearer {PROXY_KEY}",
        "x-tokenlay-provider-key": PROVIDER_KEY,
        "x-tokenlay-provider-base": upstream_url + "/v1",
    }
    if user is not None:
        out["x-tokenlay-user"] = user
    return out


def read_raw_stream(proxy: str, upstream_url: str) -> bytes:
    """A stream read to its end by a bare HTTP client, as relayed."""
    with httpx2.stream(
        "POST",
        proxy + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        headers=headers(upstream_url),
    ) as r:
        return r.read()


def plain_client(proxy: str, upstream_url: str, user: str = "u1") -> openai.OpenAI:
    """The stock openai client, pointed at the proxy by hand."""
    extra = {k: v for k, v in headers(upstream_url, user).items() if k != "authorization"}
    return openai.OpenAI(
        base_url=proxy + "/v1", api_key=PROXY_KEY, default_headers=extra, max_retries=0
    )


def sdk_client(proxy: str, upstream_url: str, user: str = "u1") -> TokenlayOpenAI:
    return TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY,
        provider_api_base=upstream_url + "/v1",
        tokenlay_key=PROXY_KEY,
        tokenlay_base_url=proxy,
        metadata={"user": user},
        max_retries=0,
    )


# --- finding 1: streams read to the end ---------------------------------------------------


@pytest.mark.parametrize("make_client", [plain_client, sdk_client])
def test_streams_read_to_the_end_free_their_slot_and_count_every_token(
    store: StoreView, make_client: Any
) -> None:
    with FakeOpenAIServer() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        client = make_client(proxy, upstream.url)
        for _ in range(6):
            # The next call starts the moment the last one is read: its slot must be free.
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == "Hello from the fake server."
        assert store.leases() == 0
        assert store.tokens() == 6 * STREAM_USAGE
        assert store.estimated() == 0


# --- finding 2: streams left early ----------------------------------------------------------


@pytest.mark.parametrize("how", ["break", "close", "context"])
def test_a_stream_left_early_is_read_on_for_its_usage_and_frees_its_slot(
    store: StoreView, how: str
) -> None:
    with FakeOpenAIServer() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        upstream.stream_delay = 0.05
        client = sdk_client(proxy, upstream.url)
        for trial in range(4):
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            if how == "context":
                with stream:
                    next(iter(stream))
            else:
                next(iter(stream))
                stream.close()  # what `break` leads to once the stream is dropped
            # The caller may call again at once: the slot goes back when it leaves...
            assert wait_for(lambda: store.leases() == 0, timeout=5)
            # ...and the proxy reads on to the usage the provider bills.
            assert wait_for(lambda t=trial: store.tokens() == (t + 1) * STREAM_USAGE)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert reply.choices
    assert store.estimated() == 0


def test_with_no_drain_left_a_stream_cut_early_is_charged_an_estimate(
    store: StoreView, telemetry: SpanCapture
) -> None:
    with (
        FakeOpenAIServer() as upstream,
        gateway(
            store,
            upstream.url,
            ONE_AT_A_TIME,
            max_drains=0,
            meter_provider=telemetry.meter_provider,
        ) as proxy,
    ):
        upstream.stream_delay = 0.05
        client = sdk_client(proxy, upstream.url)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
        assert wait_for(lambda: store.leases() == 0 and store.tokens() > 0)
    # Input from the request (an upper estimate), output from the text sent: never 0.
    charged = store.tokens()
    assert 12 < charged < 12 + 5 + 40
    assert store.estimated() == charged
    settled = telemetry.metrics()["tokenlay.proxy.settlements"][1]
    sources = {
        (p.attributes["tokenlay.proxy.exit"], p.attributes["tokenlay.usage.source"])
        for p in settled
    }
    assert ("client_gone", "estimated") in sources


def test_a_client_gone_as_soon_as_the_call_is_forwarded_is_settled(store: StoreView) -> None:
    with FakeOpenAIServer() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        upstream.stream_delay = 0.1

        async def leave_once_forwarded() -> None:
            async with httpx2.AsyncClient() as client:
                body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
                call = asyncio.ensure_future(
                    client.post(
                        proxy + "/v1/chat/completions", json=body, headers=headers(upstream.url)
                    )
                )
                while not upstream.requests:
                    await asyncio.sleep(0.001)
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call

        asyncio.run(leave_once_forwarded())
        assert wait_for(lambda: store.leases() == 0)
        assert wait_for(lambda: store.tokens() == STREAM_USAGE)


# --- finding 3: failures that are not HTTP errors --------------------------------------------


def test_a_truncated_answer_is_a_502_that_frees_the_slot(store: StoreView) -> None:
    with raw_upstream() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        body = chat_body({"prompt_tokens": 12, "completion_tokens": 7})
        upstream.answers = [http_response(body[:40], content_length=len(body))]
        client = sdk_client(proxy, upstream.url)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
        assert info.value.status_code == 502
        assert "cut" in info.value.message
        assert store.leases() == 0
        # The provider did the work; its answer was lost: the reservation is charged.
        assert store.estimated() == store.tokens() > 20


def test_a_stream_cut_by_upstream_is_settled_on_what_was_sent(store: StoreView) -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": "x" * 30}, "finish_reason": None}],
    }
    with raw_upstream() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        upstream.answers = [sse_response([chunk, chunk], done=False)[:-10]]
        client = sdk_client(proxy, upstream.url)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        with contextlib.suppress(openai.APIError, httpx2.HTTPError, json.JSONDecodeError):
            list(stream)  # how the client takes a cut stream is openai's business
        assert wait_for(lambda: store.leases() == 0 and store.tokens() > 0)
    # The request's estimate (29 bytes of text: 10 tokens, 4 for the message, 3 for the
    # call) and the 30 characters relayed (10 tokens at 3 bytes a token).
    assert store.tokens() == store.estimated() == 17 + 10


def test_a_base_with_a_bad_port_is_a_400_and_takes_nothing(store: StoreView) -> None:
    with gateway(store, "http://127.0.0.1:9", ONE_AT_A_TIME) as proxy:
        r = httpx2.post(
            proxy + "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES},
            headers={**headers("http://127.0.0.1:99999")},
        )
    assert r.status_code == 400
    assert "port" in r.json()["error"]["message"]
    assert store.counters() == {} and store.leases() == 0


def test_an_unreachable_provider_gives_everything_back(store: StoreView) -> None:
    limits = rules(
        {"type": "concurrent", "max": 1, "per": "user"},
        {"type": "requests", "max": 10, "window": "total", "per": "user"},
    )
    with gateway(store, "http://127.0.0.1:9", limits) as proxy:
        client = sdk_client(proxy, "http://127.0.0.1:9")
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert info.value.status_code == 502
    assert store.leases() == 0
    assert [v for k, v in store.counters().items() if k.startswith("requests:")] == [0.0]


# --- finding 4: hostile usage ---------------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1_000_000, "completion_tokens": 7},
        {"prompt_tokens": 12, "completion_tokens": -5},
        {"prompt_tokens": 2**63, "completion_tokens": 7},
        {"prompt_tokens": 12.5, "completion_tokens": 7},
        {"prompt_tokens": "12", "completion_tokens": 7},
        {"completion_tokens": 7},
        None,
    ],
)
def test_unbelievable_usage_is_never_credited(store: StoreView, usage: Any) -> None:
    limits = rules({"type": "tokens", "max": 100, "window": "total", "per": "user"})
    with raw_upstream() as upstream, gateway(store, upstream.url, limits) as proxy:
        good = http_response(chat_body({"prompt_tokens": 12, "completion_tokens": 7}))
        upstream.answers = [http_response(chat_body(usage)), good]
        client = sdk_client(proxy, upstream.url)
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=10)
        charged = store.tokens()
        assert charged > 0, "an estimate, never a credit or a silent 0"
        assert store.estimated() == charged
        admitted = 1
        for _ in range(30):
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
                )
                admitted += 1
            except openai.RateLimitError:
                break
    assert store.tokens() == charged + (admitted - 1) * BODY_USAGE <= 100


def test_unbelievable_usage_in_a_stream_is_never_credited(store: StoreView) -> None:
    limits = rules({"type": "tokens", "max": 1000, "window": "total", "per": "user"})
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": -1_000_000, "completion_tokens": 3}},
    ]
    with raw_upstream() as upstream, gateway(store, upstream.url, limits) as proxy:
        upstream.answers = [sse_response(events)]
        client = sdk_client(proxy, upstream.url)
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
        assert wait_for(lambda: store.tokens() > 0)
    assert store.estimated() == store.tokens() > 0


# --- finding 6: tokens under concurrency ----------------------------------------------------


@pytest.mark.parametrize("proxies", [1, 2])
def test_concurrent_calls_never_take_a_tokens_limit_past_its_value(
    store: StoreView, proxies: int
) -> None:
    limits = rules({"type": "tokens", "max": 100, "window": "total", "per": "user"})
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(FakeOpenAIServer())
        urls = [stack.enter_context(gateway(store, upstream.url, limits)) for _ in range(proxies)]

        async def main() -> list[int]:
            clients = [
                openai.AsyncOpenAI(
                    base_url=url + "/v1",
                    api_key=PROXY_KEY,
                    default_headers={
                        k: v for k, v in headers(upstream.url).items() if k != "authorization"
                    },
                    max_retries=0,
                )
                for url in urls
            ]

            async def one(i: int) -> int:
                try:
                    await clients[i % proxies].chat.completions.create(
                        model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
                    )
                    return 200
                except openai.RateLimitError:
                    return 429

            try:
                return await asyncio.gather(*(one(i) for i in range(50)))
            finally:
                for client in clients:
                    await client.close()

        statuses = asyncio.run(main())
    admitted = statuses.count(200)
    assert admitted >= 1 and statuses.count(429) == 50 - admitted
    assert store.tokens() == admitted * BODY_USAGE <= 100
    assert store.leases() == 0


# --- the mixed test -------------------------------------------------------------------------


def test_200_streams_for_20_users_settle_exactly_whatever_the_clients_do(
    store: StoreView, telemetry: SpanCapture
) -> None:
    import random

    limits = rules(
        {"type": "concurrent", "max": 3, "per": "user"},
        {"type": "tokens", "max": 40 * STREAM_USAGE, "window": "total", "per": "user"},
    )
    chooser = random.Random(15)
    with (
        FakeOpenAIServer() as upstream,
        gateway(
            store, upstream.url, limits, max_drains=1000, meter_provider=telemetry.meter_provider
        ) as proxy,
    ):
        upstream.stream_delay = 0.01

        async def one(client: httpx2.AsyncClient, user: str, how: str) -> None:
            body = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": user}],  # so upstream knows who
                "stream": True,
                "max_tokens": 10,
            }

            async def run() -> None:
                async with client.stream(
                    "POST",
                    proxy + "/v1/chat/completions",
                    json=body,
                    headers=headers(upstream.url, user),
                ) as r:
                    if r.status_code != 200 or how == "close":
                        return
                    events = 0
                    async for _ in r.aiter_raw():
                        events += 1
                        if how == "break" and events == 2:
                            break

            if how != "cut":
                await run()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(chooser.uniform(0.005, 0.06)):
                    await run()

        async def main() -> None:
            limits_ = httpx2.Limits(max_connections=300)
            async with httpx2.AsyncClient(limits=limits_, timeout=30) as client:

                async def worker(user: str) -> None:
                    for _ in range(5):
                        await one(client, user, chooser.choice(["end", "break", "close", "cut"]))

                await asyncio.gather(*(worker(f"m{i % 20}") for i in range(40)))

        asyncio.run(main())
        assert wait_for(lambda: store.leases() == 0, timeout=20)
        # Every call that reached the provider is billed there: the proxy must count it.
        forwarded: dict[str, int] = {}
        for request in upstream.requests:
            user = request.json()["messages"][0]["content"]
            forwarded[user] = forwarded.get(user, 0) + 1
        for user in (f"m{i}" for i in range(20)):
            expected = forwarded.get(user, 0) * STREAM_USAGE
            assert wait_for(lambda u=user, e=expected: store.tokens(value=u) == e), (
                user,
                expected,
                store.tokens(value=user),
            )
    assert sum(forwarded.values()) > 40
    assert store.estimated() == 0
    exits = {
        p.attributes["tokenlay.proxy.exit"]: p.value
        for p in telemetry.metrics()["tokenlay.proxy.settlements"][1]
        if p.attributes["tokenlay.usage.source"] == "upstream"
    }
    assert exits.get("done", 0) > 10 and exits.get("client_gone", 0) > 10, exits
    assert sum(exits.values()) == sum(forwarded.values())


def test_streams_read_by_a_raw_client_settle_before_their_end(store: StoreView) -> None:
    """What the bug looked like: a stream read to the end, then the connection dropped,
    and the settlement cancelled with it."""
    with FakeOpenAIServer() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        for _ in range(5):
            raw = read_raw_stream(proxy, upstream.url).decode()
            lines = [line for line in raw.splitlines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]"
            assert all(json.loads(line[5:]).get("usage") is None for line in lines[:-1])
        assert store.leases() == 0
        assert store.tokens() == 5 * STREAM_USAGE


# --- leases, drains and shutdown ------------------------------------------------------------


def test_a_long_stream_keeps_its_lease_and_a_second_call_waits(store: StoreView) -> None:
    with (
        FakeOpenAIServer() as upstream,
        gateway(store, upstream.url, ONE_AT_A_TIME, lease_s=0.6) as proxy,
    ):
        upstream.stream_delay = 0.4  # 2.4 s in all: four times the lease
        client = sdk_client(proxy, upstream.url)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        next(chunks)
        for _ in range(3):
            next(chunks)
            assert store.leases() == 1  # renewed while the call runs
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        list(chunks)
        assert store.leases() == 0
        assert store.tokens() == STREAM_USAGE


def test_a_drain_is_bounded_in_time(store: StoreView) -> None:
    with (
        FakeOpenAIServer() as upstream,
        gateway(store, upstream.url, ONE_AT_A_TIME, drain_timeout_s=0.2) as proxy,
    ):
        upstream.stream_delay = 1.0
        client = sdk_client(proxy, upstream.url)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
        # Upstream would take 5 s more; the drain gives up after 0.2 s and estimates.
        assert wait_for(lambda: store.tokens() > 0, timeout=3)
    assert store.estimated() == store.tokens() > 12


def test_shutdown_settles_the_calls_in_flight(store: StoreView) -> None:
    from tokenlay_otel.proxy.server import ServerLimits

    with FakeOpenAIServer() as upstream:
        upstream.stream_delay = 0.5
        limits = ServerLimits(graceful_shutdown_s=0.2)
        with gateway(
            store, upstream.url, ONE_AT_A_TIME, server_limits=limits, shutdown_timeout_s=0.5
        ) as proxy:
            client = sdk_client(proxy, upstream.url)
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            next(iter(stream))
            assert store.leases() == 1
        # The server stopped with the stream still going: it was settled on the way out.
        with contextlib.suppress(Exception):
            stream.close()
    assert store.leases() == 0
    assert store.estimated() == store.tokens() > 12


def test_a_line_separator_in_the_text_does_not_lose_the_usage(store: StoreView) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    text = "one\u2028two\u0085three"
    events = [
        {**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}},
    ]
    with raw_upstream() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        upstream.answers = [sse_response(events)]
        client = sdk_client(proxy, upstream.url)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
        assert store.tokens() == 15
    assert store.estimated() == 0


@pytest.mark.parametrize(("status", "refunded"), [(500, True), (429, True), (400, False)])
def test_an_upstream_error_gives_the_request_back_only_when_it_was_not_served(
    store: StoreView, status: int, refunded: bool
) -> None:
    limits = rules(
        {"type": "concurrent", "max": 1, "per": "user"},
        {"type": "requests", "max": 10, "window": "total", "per": "user"},
        {"type": "tokens", "max": 1000, "window": "total", "per": "user"},
    )
    with raw_upstream() as upstream, gateway(store, upstream.url, limits) as proxy:
        error = json.dumps({"error": {"message": "no", "type": "x"}}).encode()
        upstream.answers = [http_response(error, status=status)]
        client = sdk_client(proxy, upstream.url)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert info.value.status_code == status
    counters = store.counters()
    requests = [v for k, v in counters.items() if k.startswith("requests:")]
    assert requests == [0.0 if refunded else 1.0]
    assert store.tokens() == 0  # providers do not bill errors
    assert store.leases() == 0


def test_shutdown_answers_a_call_still_waiting_for_upstream(store: StoreView) -> None:
    import threading

    from tokenlay_otel.proxy.server import ServerLimits

    with raw_upstream() as upstream:
        upstream.hold = threading.Event()  # reads the request, then answers nothing
        limits = ServerLimits(graceful_shutdown_s=0.2)
        outcome: dict[str, Any] = {}
        with gateway(
            store, upstream.url, ONE_AT_A_TIME, server_limits=limits, shutdown_timeout_s=0.5
        ) as proxy:

            def call() -> None:
                r = httpx2.post(
                    proxy + "/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": MESSAGES},
                    headers=headers(upstream.url),
                    timeout=10,
                )
                outcome["status"], outcome["body"] = r.status_code, r.json()

            caller = threading.Thread(target=call)
            caller.start()
            assert wait_for(lambda: store.leases() == 1)
        caller.join(10)
        upstream.hold.set()
    assert outcome["status"] == 503
    assert outcome["body"]["error"]["code"] == "proxy_shutting_down"
    assert store.leases() == 0


def test_a_model_without_a_price_cannot_slip_past_a_cost_limit(store: StoreView) -> None:
    from tokenlay_otel._pricing import ModelRates, PriceBook

    limits = rules({"type": "cost", "max": 1.0, "window": "total", "per": "user"})
    with FakeOpenAIServer() as upstream:
        with gateway(store, upstream.url, limits) as proxy:
            client = sdk_client(proxy, upstream.url)
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="my-new-model", messages=MESSAGES)
            assert info.value.code == "unpriced_model"
            assert "--prices-file" in info.value.message
        assert upstream.requests == []
        prices = PriceBook({"my-new-model": ModelRates(input=1e-6, output=2e-6)})
        with gateway(store, upstream.url, limits, prices=prices) as proxy:
            client = sdk_client(proxy, upstream.url)
            client.chat.completions.create(model="my-new-model", messages=MESSAGES)
    (cost,) = [v for k, v in store.counters().items() if k.startswith("cost:")]
    assert cost == pytest.approx(12 * 1e-6 + 7 * 2e-6)


# --- found by attacking the reworked proxy ---------------------------------------------------


def test_a_base_without_v1_and_a_path_with_two_is_metered_all_the_same(store: StoreView) -> None:
    limits = rules({"type": "tokens", "max": 1000, "window": "total", "per": "user"})
    with FakeOpenAIServer() as upstream, gateway(store, upstream.url, limits) as proxy:
        r = httpx2.post(
            proxy + "/v1/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 10},
            headers={**headers(upstream.url), "x-tokenlay-provider-base": upstream.url},
        )
        assert r.status_code == 200
        assert upstream.requests[-1].path == "/v1/chat/completions"
    assert store.tokens() == BODY_USAGE


def test_a_caller_cannot_turn_the_usage_chunk_and_the_metering_off(store: StoreView) -> None:
    with FakeOpenAIServer() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        client = plain_client(proxy, upstream.url)
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": False},
        )
        chunks = list(stream)
        assert all(c.usage is None for c in chunks)  # as the caller asked
        assert upstream.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert store.tokens() == STREAM_USAGE


def test_a_caller_who_hangs_up_keeps_its_slot_while_upstream_works(store: StoreView) -> None:
    with FakeOpenAIServer() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        upstream.stream_delay = 0.3
        client = sdk_client(proxy, upstream.url)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
        # Upstream still generates for that call: a second one at once would be two.
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert wait_for(lambda: store.leases() == 0 and store.tokens() == STREAM_USAGE)
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_an_answer_without_usage_yet_is_charged_all_it_may_write(store: StoreView) -> None:
    limits = rules({"type": "tokens", "max": 100_000, "window": "total", "per": "user"})
    queued = json.dumps(
        {
            "id": "resp_1",
            "object": "response",
            "status": "queued",
            "model": "gpt-4o-mini",
            "output": [],
            "usage": None,
        }
    ).encode()
    with raw_upstream() as upstream, gateway(store, upstream.url, limits) as proxy:
        upstream.answers = [http_response(queued)]
        r = httpx2.post(
            proxy + "/v1/responses",
            json={
                "model": "gpt-4o-mini",
                "input": "Hello",
                "background": True,
                "max_output_tokens": 5000,
            },
            headers=headers(upstream.url),
        )
        assert r.status_code == 200
    assert store.tokens() == store.estimated() >= 5000


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # output missing: not believed, estimated from the text
        ([{"choices": [], "usage": {"prompt_tokens": 12}}], None),
        # a later, smaller report does not take back what the first one said
        (
            [
                {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 500}},
                {"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0}},
            ],
            512,
        ),
    ],
)
def test_a_hostile_stream_cannot_shrink_its_usage(
    store: StoreView, events: list[Any], expected: int | None
) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    text = {
        **base,
        "choices": [{"index": 0, "delta": {"content": "x" * 300}, "finish_reason": None}],
    }
    with raw_upstream() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        upstream.answers = [sse_response([text, *({**base, **e} for e in events)])]
        client = sdk_client(proxy, upstream.url)
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
        assert wait_for(lambda: store.leases() == 0 and store.tokens() > 0)
    if expected is None:
        assert store.tokens() == store.estimated() == 17 + 100  # 300 bytes of text
    else:
        assert store.tokens() == expected


def test_nothing_after_the_end_of_a_stream_is_relayed(store: StoreView) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    first = {**base, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    usage = {**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 1}}
    late = {**base, "choices": [{"index": 0, "delta": {"content": "free text"}}]}
    with raw_upstream() as upstream, gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
        # CR-only line endings are SSE too.
        upstream.answers = [sse_response([first, usage], end=b"\r\r", after=[late])]
        relayed = read_raw_stream(proxy, upstream.url)
    assert b"free text" not in relayed
    assert relayed.endswith(b"data: [DONE]\r\r")
    assert store.tokens() == 13 and store.estimated() == 0


def test_a_client_that_stops_reading_is_cut_after_the_send_timeout(store: StoreView) -> None:
    import socket

    words = ["x" * 20_000] * 500  # 10 MB of text
    with (
        FakeOpenAIServer(stream_words=words) as upstream,
        gateway(store, upstream.url, ONE_AT_A_TIME, send_timeout_s=0.3) as proxy,
    ):
        port = int(proxy.rsplit(":", 1)[1])
        body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
        head = "".join(f"{k}: {v}\r\n" for k, v in headers(upstream.url).items())
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{head}"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}"
        )
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(request.encode())
            assert wait_for(lambda: store.leases() == 1)
            # It reads nothing more: the proxy gives up on it and settles.
            assert wait_for(lambda: store.leases() == 0 and store.tokens() > 0, timeout=10)
    assert store.estimated() == store.tokens()


# --- our own failures, at the two steps that hold something ------------------------------------


def test_a_charge_that_fails_keeps_the_reservation_and_frees_the_slot(store: StoreView) -> None:
    from tokenlay_otel._pricing import ModelRates, PriceBook

    class FailsAfterTheEstimate(PriceBook):
        calls = 0

        def cost(self, *args: Any, **kwargs: Any) -> float | None:
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("a bug in pricing")
            return super().cost(*args, **kwargs)

    limits = rules(
        {"type": "concurrent", "max": 1, "per": "user"},
        {"type": "cost", "max": 1.0, "window": "total", "per": "user"},
    )
    prices = FailsAfterTheEstimate({"gpt-4o-mini": ModelRates(input=1e-6, output=1e-6)})
    with (
        FakeOpenAIServer() as upstream,
        gateway(store, upstream.url, limits, prices=prices) as proxy,
    ):
        client = sdk_client(proxy, upstream.url)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=10
        )
        assert reply.choices  # the caller is not broken by our bug
        assert store.leases() == 0
    (cost,) = [v for k, v in store.counters().items() if k.startswith("cost:")]
    assert cost == pytest.approx((17 + 10) * 1e-6)  # the reservation stands as the charge


def test_a_store_that_fails_to_settle_still_lets_the_lease_expire(store: StoreView) -> None:
    class SettleFails:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def settle(self, *args: Any) -> None:
            raise ConnectionError("the store went away")

    with FakeOpenAIServer() as upstream:
        config = {"lease_s": 0.5, "allow_providers": (upstream.url,)}
        with local_proxy(
            rules=ONE_AT_A_TIME,
            keys=(PROXY_KEY,),
            mock_upstream=False,
            store=SettleFails(store.make()),
            **config,
        ) as proxy:
            client = sdk_client(proxy, upstream.url)
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            assert store.leases() == 1  # not given back...
            assert wait_for(lambda: store.leases() == 0, timeout=5)  # ...but it expires
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


class _KeepAliveSSE(socketserver.ThreadingTCPServer):
    """Streams one SSE answer per request on kept-alive connections, its chunked end a
    moment after the last event (as providers may); counts the connections."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, body: bytes) -> None:
        self.body, self.connections = body, 0
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _KeepAliveHandler(socketserver.StreamRequestHandler):
    server: _KeepAliveSSE

    def handle(self) -> None:
        self.server.connections += 1
        while True:
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if not line:
                return
            self.rfile.read(length)
            body = self.server.body
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(body), body)
            )
            time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")


def test_a_stream_read_to_its_end_leaves_its_connection_for_the_next(store: StoreView) -> None:
    """After a stream's last event the proxy reads upstream's chunked end too, so the
    next stream reuses the connection instead of opening one (and waiting for it)."""
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    first = {**base, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    usage = {**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 1}}
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (first, usage))
    upstream = _KeepAliveSSE(body + b"data: [DONE]\n\n")
    try:
        with gateway(store, upstream.url, ONE_AT_A_TIME) as proxy:
            for _ in range(3):
                assert read_raw_stream(proxy, upstream.url).endswith(b"data: [DONE]\n\n")
                time.sleep(0.1)  # the proxy reads the end after the client has it all
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert upstream.connections == 1
    assert store.tokens() == 3 * 13 and store.leases() == 0
