from __future__ import annotations

import asyncio
import threading

import pytest

from tokenlay_otel import AsyncTokenlayOpenAI, TokenlayOpenAI, metadata
from tokenlay_otel._context import current_metadata
from tokenlay_otel.testing import FakeOpenAIServer

from .conftest import PROVIDER_KEY, TOKENLAY_KEY


def test_nesting_innermost_wins_and_restores() -> None:
    assert dict(current_metadata()) == {}
    with metadata(user="outer", org="o"):
        with metadata(user="inner", feature="f"):
            assert dict(current_metadata()) == {"user": "inner", "org": "o", "feature": "f"}
        assert dict(current_metadata()) == {"user": "outer", "org": "o"}
    assert dict(current_metadata()) == {}


def test_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), metadata(user="u"):
        raise RuntimeError("boom")
    assert dict(current_metadata()) == {}


def test_decorator_sync_and_async() -> None:
    @metadata(feature="summary")
    def work() -> dict[str, str | None]:
        return dict(current_metadata())

    @metadata(feature="async-summary")
    async def awork() -> dict[str, str | None]:
        await asyncio.sleep(0)
        return dict(current_metadata())

    with metadata(user="u"):
        assert work() == {"user": "u", "feature": "summary"}
        assert asyncio.run(awork()) == {"user": "u", "feature": "async-summary"}
    assert work() == {"feature": "summary"}
    assert dict(current_metadata()) == {}


def test_decorating_a_generator_is_refused() -> None:
    with pytest.raises(TypeError, match="generator"):

        @metadata(user="u")
        def gen():
            yield 1


def test_invalid_values_raise_at_the_call_site() -> None:
    with pytest.raises(ValueError, match="'user' contains a control character"):
        metadata(user="evil\r\nx: y")
    with pytest.raises(ValueError, match="invalid metadata field name"):
        metadata(**{"bad name": "v"})


def test_the_same_scope_object_can_be_shared_across_threads() -> None:
    scope = metadata(org="shared")
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        try:
            with metadata(user=f"u{i}"):
                barrier.wait()
                with scope:
                    barrier.wait()
                    assert dict(current_metadata()) == {"user": f"u{i}", "org": "shared"}
                assert dict(current_metadata()) == {"user": f"u{i}"}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_thread_isolation_on_the_wire(server: FakeOpenAIServer) -> None:
    client = TokenlayOpenAI(
        provider_api_key=PROVIDER_KEY, tokenlay_key=TOKENLAY_KEY, tokenlay_base_url=server.url
    )
    barrier = threading.Barrier(16)

    def run(i: int) -> None:
        with metadata(user=f"thread-{i}"):
            barrier.wait()
            for _ in range(5):
                client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": f"from {i}"}],
                )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(server.requests) == 80
    for request in server.requests:
        sender = request.json()["messages"][0]["content"].removeprefix("from ")
        assert request.header_values("x-tokenlay-user") == [f"thread-{sender}"]


def test_asyncio_task_isolation_100_users(server: FakeOpenAIServer) -> None:
    async def main() -> None:
        client = AsyncTokenlayOpenAI(
            provider_api_key=PROVIDER_KEY,
            tokenlay_key=TOKENLAY_KEY,
            tokenlay_base_url=server.url,
            metadata={"org": "acme"},
        )

        async def one(i: int) -> None:
            with metadata(user=f"user-{i}"):
                await asyncio.sleep(0)
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"from {i}"}]
                )

        await asyncio.gather(*(one(i) for i in range(100)))

    asyncio.run(main())
    assert len(server.requests) == 100
    seen = set()
    for request in server.requests:
        sender = request.json()["messages"][0]["content"].removeprefix("from ")
        assert request.header_values("x-tokenlay-user") == [f"user-{sender}"]
        assert request.header_values("x-tokenlay-org") == ["acme"]
        seen.add(sender)
    assert len(seen) == 100


def test_child_tasks_inherit_the_scope() -> None:
    async def main() -> dict[str, str | None]:
        with metadata(user="parent"):
            task = asyncio.create_task(child())
        return await task

    async def child() -> dict[str, str | None]:
        await asyncio.sleep(0)
        return dict(current_metadata())

    assert asyncio.run(main()) == {"user": "parent"}
