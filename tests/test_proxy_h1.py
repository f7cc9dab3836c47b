"""The proxy's HTTP/1.1 upstream client against scripted servers on 127.0.0.1: framing,
decoding, reuse only of connections that are clean, timeouts, the pool's bound."""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tokenlay_otel.proxy.connect import UpstreamClient
from tokenlay_otel.proxy.h1 import Answer, Lost, NotSent, TimedOut
from tokenlay_otel.proxy.providers import AllowList

Handler = Callable[["Scripted", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A server whose every connection runs ``handler(server, reader, writer, index)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer, self.connections)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        lower = head.lower()
        if b"content-length: " in lower:
            await reader.readexactly(int(lower.split(b"content-length: ")[1].split(b"\r\n")[0]))
        return head


def client_for(server: Scripted, **options: Any) -> UpstreamClient:
    allow = AllowList.build([server.url], defaults=False)
    return UpstreamClient(allow, **{"timeout": 5.0, **options})


async def read(answer: Answer) -> bytes:
    try:
        return b"".join([chunk async for chunk in answer.chunks()])
    finally:
        await answer.aclose()


async def get(client: UpstreamClient, server: Scripted) -> tuple[int, bytes]:
    answer = await client.send("GET", server.url + "/v1/x", {}, None)
    return answer.status, await read(answer)


def _ok(body: bytes, *headers: str) -> bytes:
    extra = "".join(h + "\r\n" for h in headers).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def serve_forever(*answers: bytes) -> Handler:
    """Answer each request on a connection with the next of ``answers`` (the last
    repeats)."""

    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        index = 0
        while True:
            await server.request(reader)
            writer.write(answers[min(index, len(answers) - 1)])
            index += 1
            await writer.drain()

    return handler


def run(handler: Handler, scenario: Callable[[Scripted], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with Scripted(handler) as server:
            return await scenario(server)

    return asyncio.run(main())


def test_sized_and_chunked_answers_are_read_whole_on_one_kept_connection() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n"
    )

    async def scenario(server: Scripted) -> Any:
        client = client_for(server)
        got = [await get(client, server) for _ in range(3)]
        await client.aclose()
        return got, server.connections

    got, connections = run(serve_forever(_ok(b"first"), chunked), scenario)
    assert got == [(200, b"first"), (200, b"hello, world"), (200, b"hello, world")]
    assert connections == 1


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some send
    ],
    ids=["gzip", "zlib-deflate", "raw-deflate"],
)
def test_compressed_answers_are_decoded(encoding: str, encode: Callable[[bytes], bytes]) -> None:
    body = b'{"usage": {"prompt_tokens": 3}}' * 50

    async def scenario(server: Scripted) -> Any:
        return await get(client_for(server), server)

    answer = _ok(encode(body), f"content-encoding: {encoding}")
    assert run(serve_forever(answer), scenario) == (200, body)


def test_a_decompression_bomb_comes_out_in_bounded_pieces() -> None:
    bomb = gzip.compress(b"\0" * (20 << 20))  # 20 MB of zeros in ~20 KB

    async def scenario(server: Scripted) -> Any:
        answer = await client_for(server).send("GET", server.url + "/v1/x", {}, None)
        largest, total = 0, 0
        async for piece in answer.chunks():
            largest, total = max(largest, len(piece)), total + len(piece)
            if total > 1 << 20:  # the caller's limit: it stops reading here
                break
        await answer.aclose()
        return largest, total

    largest, total = run(serve_forever(_ok(bomb, "content-encoding: gzip")), scenario)
    assert largest <= 256 * 1024 and total <= (1 << 20) + 256 * 1024


def test_a_body_ended_by_close_is_read_whole_and_its_connection_not_kept() -> None:
    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
        await writer.drain()

    async def scenario(server: Scripted) -> Any:
        client = client_for(server)
        got = [await get(client, server), await get(client, server)]
        return got, server.connections

    got, connections = run(handler, scenario)
    assert got == [(200, b"until the end")] * 2
    assert connections == 2


def test_a_body_ended_by_close_is_cut_when_the_connection_is_reset() -> None:
    """Only a clean close ends a body framed by the connection: a reset is a cut (the
    provider failed mid-answer), not an end, and the part read is not the answer."""

    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await server.request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n{"half": ')
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def scenario(server: Scripted) -> None:
        with pytest.raises(Lost):
            await get(client_for(server), server)

    run(handler, scenario)


def test_an_informational_answer_is_skipped() -> None:
    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        while True:
            await server.request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)  # the real answer in a later packet
            writer.write(_ok(b"real"))
            await writer.drain()

    async def scenario(server: Scripted) -> Any:
        client = client_for(server)
        got = [await get(client, server), await get(client, server)]
        return got, server.connections

    got, connections = run(handler, scenario)
    assert got == [(200, b"real")] * 2
    assert connections == 1


@pytest.mark.parametrize("same_write", [True, False], ids=["same-write", "while-idle"])
def test_bytes_nobody_asked_for_close_the_connection(same_write: bool) -> None:
    """A forged second answer (in the same write as the first, or sent while the
    connection is idle) never answers the next request: that one gets a new
    connection and its own answer."""

    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.request(reader)
        if n > 1:
            writer.write(_ok(b"honest"))
            await writer.drain()
            await reader.read()
            return
        forged = _ok(b"FORGED")
        writer.write(_ok(b"first") + (forged if same_write else b""))
        await writer.drain()
        if not same_write:
            await asyncio.sleep(0.05)
            writer.write(forged)
            await writer.drain()
        await reader.read()

    async def scenario(server: Scripted) -> Any:
        client = client_for(server)
        first = await get(client, server)
        await asyncio.sleep(0.2)
        second = await get(client, server)
        await client.aclose()
        return first, second, server.connections

    assert run(handler, scenario) == ((200, b"first"), (200, b"honest"), 2)


def test_an_idle_connection_the_provider_closed_is_not_used() -> None:
    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await server.request(reader)
        writer.write(_ok(b"once"))
        await writer.drain()  # then closes: keep-alive said yes, the server changed its mind

    async def scenario(server: Scripted) -> Any:
        client = client_for(server)
        first = await get(client, server)
        await asyncio.sleep(0.1)
        second = await get(client, server)
        return first, second, server.connections

    assert run(handler, scenario) == ((200, b"once"), (200, b"once"), 2)


def test_silence_before_or_within_an_answer_times_out_as_lost() -> None:
    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.request(reader)
        if n == 2:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
            await writer.drain()
        await asyncio.sleep(5)

    async def scenario(server: Scripted) -> Any:
        client = client_for(server, timeout=0.2)
        with pytest.raises(TimedOut):  # no head at all
            await client.send("GET", server.url + "/v1/x", {}, None)
        answer = await client.send("GET", server.url + "/v1/x", {}, None)
        with pytest.raises(TimedOut):  # the body stops half-way
            await read(answer)
        return server.connections

    assert run(handler, scenario) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf",  # then closes
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
    ids=["cut", "bad-chunk", "garbage"],
)
def test_cut_or_malformed_answers_are_lost_not_half_read(answer: bytes) -> None:
    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await server.request(reader)
        writer.write(answer)
        await writer.drain()

    async def scenario(server: Scripted) -> None:
        client = client_for(server)
        with pytest.raises(Lost):
            await get(client, server)

    run(handler, scenario)


_MEGABYTE = 1024 * 1024


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nx-big: %s\r\ncontent-length: 2\r\n\r\nok" % (b"a" * _MEGABYTE),
        b"HTTP/1.1 200 OK\r\n%scontent-length: 2\r\n\r\nok" % (b"x: y\r\n" * (_MEGABYTE // 6)),
        b"HTTP/1.1 100 Continue\r\n\r\n" * (_MEGABYTE // 25) + _ok(b"ok"),
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-big: %s\r\n\r\n"
        % (b"a" * _MEGABYTE),
    ],
    ids=["long-header", "many-headers", "endless-1xx", "long-trailer"],
)
def test_a_head_or_trailers_past_the_bound_are_lost(answer: bytes) -> None:
    """llhttp bounds no head, and httptools gathers a header value by concatenation:
    a provider sending an endless one held the event loop for a time growing with its
    square (64 MB: 25 s) and its memory. A whole answer, so only the bound stops it."""

    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await server.request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    async def scenario(server: Scripted) -> None:
        client = client_for(server)
        with pytest.raises(Lost, match="bytes of head or trailers"):
            await get(client, server)

    run(handler, scenario)


def test_the_pool_bound_waits_then_gives_up_as_never_sent() -> None:
    async def scenario(server: Scripted) -> Any:
        client = client_for(server, max_connections=1, timeout=0.2)
        held = await client.send("GET", server.url + "/v1/x", {}, None)
        with pytest.raises(NotSent, match="no free provider connection"):
            await client.send("GET", server.url + "/v1/x", {}, None)
        waiting = asyncio.ensure_future(get(client, server))
        await asyncio.sleep(0.05)
        assert await read(held) == b"ok"  # its connection goes back: the waiter takes it
        return await waiting, server.connections

    assert run(serve_forever(_ok(b"ok")), scenario) == ((200, b"ok"), 1)


def test_the_pool_bound_holds_for_calls_that_connect_at_once() -> None:
    """Connections still being opened count against the bound: a burst of calls each
    saw the open set below it and all connected (200 at once against a bound of 20)."""

    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        while True:
            await server.request(reader)
            await asyncio.sleep(0.05)
            writer.write(_ok(b"ok"))
            await writer.drain()

    async def scenario(server: Scripted) -> Any:
        client = client_for(server, max_connections=4)
        answers = await asyncio.gather(*(get(client, server) for _ in range(40)))
        return answers == [(200, b"ok")] * 40, server.connections

    assert run(handler, scenario) == (True, 4)


def test_a_slow_reader_holds_a_bounded_buffer() -> None:
    body = b"x" * (8 << 20)

    async def scenario(server: Scripted) -> Any:
        answer = await client_for(server).send("GET", server.url + "/v1/x", {}, None)
        most, total = 0, 0
        async for piece in answer.chunks():
            total += len(piece)
            await asyncio.sleep(0.002)  # the caller is slower than loopback
            most = max(most, answer.buffered + len(piece))
        await answer.aclose()
        return most, total

    most, total = run(serve_forever(_ok(body)), scenario)
    assert total == len(body)
    assert most < 2 << 20  # 8 MB went through; never more than ~256 KB + one read held


def test_a_cancelled_call_closes_its_connection() -> None:
    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await server.request(reader)
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            await writer.drain()
            await reader.read()  # until the client closes
            return
        writer.write(_ok(b"fresh"))
        await writer.drain()
        await reader.read()

    async def scenario(server: Scripted) -> Any:
        client = client_for(server)

        async def reads_forever() -> bytes:
            return await read(await client.send("GET", server.url + "/v1/x", {}, None))

        task = asyncio.ensure_future(reads_forever())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await get(client, server), server.connections

    assert run(handler, scenario) == ((200, b"fresh"), 2)


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("/v1/x", {"x-evil": "a\r\nx-injected: 1"}),
        ("/v1/x", {"bad name": "1"}),
        ("/v1/x HTTP/1.1\r\nx: y", {}),
        ("/v1/é", {}),
    ],
)
def test_a_request_http_cannot_carry_is_never_sent(url: str, headers: dict[str, str]) -> None:
    async def scenario(server: Scripted) -> int:
        with pytest.raises(NotSent):
            await client_for(server).send("GET", server.url + url, headers, None)
        return server.connections

    assert run(serve_forever(_ok(b"ok")), scenario) == 0


def test_an_upload_that_fails_closes_the_connection_and_raises_its_own_error() -> None:
    class Stopped(Exception):
        pass

    async def upload() -> AsyncIterator[bytes]:
        yield b"part"
        raise Stopped

    async def scenario(server: Scripted) -> Any:
        client = client_for(server)
        with pytest.raises(Stopped):
            await client.send("POST", server.url + "/v1/x", {}, upload())
        return await get(client, server), server.connections

    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if n == 1:
            await reader.read()  # the half upload, then the close
            return
        await server.request(reader)
        writer.write(_ok(b"next"))
        await writer.drain()
        await reader.read()

    assert run(handler, scenario) == ((200, b"next"), 2)


def test_the_pool_keeps_no_entry_for_origins_it_no_longer_holds() -> None:
    """Callers can name many hosts under a wildcard pattern: the pool's bookkeeping
    must shrink back as their connections close, not keep one entry per host ever."""

    async def handler(
        server: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await server.request(reader)
        writer.write(_ok(b"ok"))  # kept alive, then closed by the provider while idle
        await writer.drain()
        await asyncio.sleep(0.01)

    async def scenario(server: Scripted) -> Any:
        # A wildcard reaches global addresses only: the test resolves every host to
        # 8.8.8.8 and its opener goes to the server on 127.0.0.1 instead.
        allow = AllowList.build([f"http://*.test:{server.port}"], defaults=False)

        async def public(host: str, port: int) -> list[str]:
            return ["8.8.8.8"]

        async def to_server(factory: Any, address: str, port: int, *_: Any) -> Any:
            loop = asyncio.get_running_loop()
            return await loop.create_connection(factory, "127.0.0.1", server.port)

        client = UpstreamClient(allow, resolver=public, opener=to_server)
        for n in range(20):
            answer = await client.send("GET", f"http://h{n}.test:{server.port}/v1/x", {}, None)
            assert await read(answer) == b"ok"
        await asyncio.sleep(0.2)  # every provider closed its idle connection by now
        return len(client._idle), server.connections

    assert run(handler, scenario) == (0, 20)
