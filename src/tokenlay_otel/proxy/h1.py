"""One HTTP/1.1 connection to a provider: a request out, one answer back, then reuse.

The proxy's only upstream protocol. It replaced httpx2 and httpcore2 on the hot path,
which were ~36% of the proxy's CPU per call under load (py-spy, 16 in flight): a
request object, an AnyIO stream, h11's generic state machine, the pool's locks and
cancel scopes, each around one socket write and a read or two. Here a connection is an
asyncio protocol; llhttp (through ``httptools``, which uvicorn uses for the other side)
frames the answer; waits are futures with timer handles.

What keeps a pooled connection honest: it goes back to the pool only when its answer
ended where its framing said, it was asked to stay open, and no byte came after the
end. Bytes past an answer (a forged second answer, say) or bytes while idle close it:
they would otherwise answer whoever is next on it. Anything odd closes the connection;
a closed connection costs one reconnect, a reused bad one costs someone else's answer.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import httptools

__all__ = [
    "Answer",
    "ConnectTimedOut",
    "Connection",
    "Lost",
    "NotSent",
    "TimedOut",
    "Upstream",
    "UpstreamAnswer",
    "UpstreamError",
    "request_head",
]

#: Body bytes held from the provider before its socket is no longer read (the caller
#: reads slower than the provider sends); reading resumes below a quarter of it.
_HIGH_WATER = 256 * 1024
#: Most bytes one decompression step may produce, so a small compressed body cannot
#: make one huge piece before the caller's size limit sees it.
_INFLATE_STEP = 256 * 1024
#: Most bytes between two pieces of body (a head, 1xx answers, trailers), as httpcore
#: allowed: llhttp sets no bound, and httptools gathers a header by concatenation, so
#: an endless one cost memory and event-loop time growing with its square (64 MB: 25 s).
_MAX_HEAD = 100 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(r"/[\x21-\x7e]*")


class UpstreamError(Exception):
    """The provider could not be asked, or its answer could not be read whole."""


class NotSent(UpstreamError):
    """Nothing of the request reached the provider (no connection, a refused address,
    no free connection in time, a request that cannot be written)."""


class Lost(UpstreamError):
    """The request went out, and its answer was cut, late or malformed: the provider
    may have done the work."""


class UpstreamAnswer(Protocol):
    """What the gateway reads of an answer: the real one, or the mock upstream's."""

    status: int
    headers: list[tuple[str, str]]  # names in lower case

    def header(self, name: str) -> str | None: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """Where the gateway sends a call: :class:`~.connect.UpstreamClient`, or the mock."""

    async def send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamAnswer: ...

    async def aclose(self) -> None: ...


class TimedOut(Lost):
    """The provider went quiet past the timeout, mid-request or mid-answer."""


class ConnectTimedOut(NotSent):
    """No connection within the timeout (lookup, TCP and TLS together)."""


class _Unsolicited(Exception):
    """Stops the parser at bytes no request asked for."""


def request_head(
    method: str, target: str, host: str, headers: dict[str, str], framing: str | None
) -> bytes:
    """A request's head, or :class:`NotSent` for what HTTP cannot carry.

    ``framing`` is the body's framing header line (``content-length: N``,
    ``transfer-encoding: chunked``) or ``None`` for no body. Checked here even though
    the gateway checked what it forwards: a header that broke the line would split the
    request, and the connection is shared.
    """
    if not _TARGET.fullmatch(target):
        raise NotSent("the request path holds what HTTP cannot send")
    lines = [f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n"]
    for name, value in headers.items():
        if not (_TOKEN.fullmatch(name) and _VALUE.fullmatch(value)):
            raise NotSent(f"the header {name[:40]!r} holds what HTTP cannot send")
        lines.append(f"{name}: {value}\r\n")
    if framing:
        lines.append(framing + "\r\n")
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise NotSent("a header holds characters HTTP cannot send") from None


class Connection(asyncio.Protocol):
    """One provider connection and its parser; at most one request at a time.

    ``idle_since`` is set while it waits in the pool; ``usable`` says whether it may
    be handed out again.
    """

    def __init__(self, on_lost: Callable[[Connection], None]) -> None:
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[bool] | None = None
        self._drained: asyncio.Future[bool] | None = None
        self._paused_writing = False
        self._paused_reading = False
        self._answer: Answer | None = None
        self._head_names: list[bytes] = []
        self._head_values: list[bytes] = []
        self._informational = False
        self._unframed = 0  # bytes fed since the last piece of body
        self.usable = True
        self.idle_since = 0.0
        self.key: Any = None

    # --- asyncio's side --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.usable = False
        answer = self._answer
        if answer is not None and not answer.complete and answer.error is None:
            if answer.status and answer.close_delimited and exc is None:
                answer.complete = True  # framed by the end of the connection; a reset cuts it
            else:
                answer.error = Lost("the provider closed the connection mid-answer")
        self._wake()
        if self._drained is not None:
            _settle(self._drained, True)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drained is not None:
            _settle(self._drained, True)

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.complete:
            self._taint()  # nobody asked: bytes while idle, or past the answer's end
            return
        self._unframed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Lost("the provider switched protocols"))
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _Unsolicited):
                self._taint()
            else:
                self._fail(Lost(f"the provider's answer is malformed ({exc})"))
            return
        if self._unframed > _MAX_HEAD and self._answer is not None and not self._answer.complete:
            self._fail(Lost(f"the provider sent over {_MAX_HEAD} bytes of head or trailers"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the answer

    # --- llhttp's side ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        answer = self._answer
        if answer is None or answer.status:
            raise _Unsolicited  # a second answer in the same bytes

    def on_header(self, name: bytes, value: bytes) -> None:
        answer = self._answer
        if answer is not None and answer.status:
            return  # a trailer: dropped (kept, it would head this connection's next answer)
        self._head_names.append(name)
        self._head_values.append(value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        names, values = self._head_names, self._head_values
        self._head_names, self._head_values = [], []
        if 100 <= status < 200:
            self._informational = True  # 100 Continue and the like: the answer follows
            return
        if status >= 600 or status < 100:  # llhttp takes any three digits
            self._fail(Lost(f"the provider answered with status {status}, not HTTP's"))
            return
        answer = self._answer
        assert answer is not None  # on_message_begin refused a message without one
        answer.start(status, names, values, self._parser.should_keep_alive())
        self._wake()

    def on_body(self, body: bytes) -> None:
        answer = self._answer
        if answer is None or not answer.status:
            return
        self._unframed = 0
        answer.buffer.append(body)
        answer.buffered += len(body)
        if answer.buffered > _HIGH_WATER and not self._paused_reading and self._transport:
            self._paused_reading = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        answer = self._answer
        if answer is not None:
            answer.complete = True
            if not self._parser.should_keep_alive():
                answer.to_close = True
        self._wake()

    # --- the request's side ----------------------------------------------------------

    def begin(self, answer: Answer) -> None:
        self._answer = answer
        self._unframed = 0
        self.idle_since = 0.0

    def write(self, data: bytes) -> None:
        if self._transport is None:
            raise Lost("the provider closed the connection")
        self._transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait while the socket's send buffer is full (a provider reading slowly)."""
        if not self._paused_writing:
            return
        if self._transport is None:
            raise Lost("the provider closed the connection")
        self._drained = self._loop.create_future()
        if not await _wait(self._loop, self._drained, timeout):
            raise TimedOut(f"the provider took no more of the request for {timeout:g} s")
        if self._transport is None:
            raise Lost("the provider closed the connection")

    async def wait(self, timeout: float) -> bool:
        """Wait for the next news of the answer; ``False`` on timeout."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            return await _wait(self._loop, waiter, timeout)
        finally:
            self._waiter = None

    def taken(self, size: int) -> None:
        """The caller took ``size`` buffered bytes: read on once it caught up."""
        answer = self._answer
        if answer is None:
            return
        answer.buffered -= size
        if self._paused_reading and answer.buffered < _HIGH_WATER // 4 and self._transport:
            self._paused_reading = False
            self._transport.resume_reading()

    def finish(self) -> bool:
        """The answer was read to its end: whether the connection may be used again."""
        answer, self._answer = self._answer, None
        keep = (
            self.usable
            and answer is not None
            and answer.complete
            and not answer.to_close
            and self._transport is not None
            and not self._paused_reading
        )
        if not keep:
            self.close()
        return keep

    def close(self) -> None:
        self._taint()
        self._answer = None

    def _taint(self) -> None:
        """Never to be used again; the answer in progress stays (it may be whole)."""
        self.usable = False
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: Lost) -> None:
        answer = self._answer
        if answer is not None and not answer.complete:
            answer.error = error
        self._taint()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            _settle(self._waiter, True)


async def _wait(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool], timeout: float
) -> bool:
    # A timer handle, not asyncio.timeout: the wait is on every answer's way.
    timer = loop.call_later(timeout, _settle, future, False)
    try:
        return await future
    finally:
        timer.cancel()


def _settle(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class Answer:
    """The provider's answer: status and headers once they came, then the body."""

    __slots__ = (
        "_connection",
        "_decoder",
        "_read_timeout",
        "_release",
        "buffer",
        "buffered",
        "close_delimited",
        "complete",
        "error",
        "headers",
        "status",
        "to_close",
    )

    def __init__(
        self,
        connection: Connection,
        read_timeout: float,
        release: Callable[[Connection, bool], None],
    ) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.to_close = False
        self.close_delimited = False
        self.error: UpstreamError | None = None
        self._connection: Connection | None = connection
        self._read_timeout = read_timeout
        self._decoder: Any = None
        self._release = release

    def start(self, status: int, names: list[bytes], values: list[bytes], keep: bool) -> None:
        self.status = status
        headers = [
            (n.decode("latin-1").lower(), v.decode("latin-1"))
            for n, v in zip(names, values, strict=True)
        ]
        self.headers = headers
        self.to_close = not keep
        encodings: list[str] = []
        framed = status in (204, 304)
        for name, value in headers:
            if name in ("transfer-encoding", "content-length"):
                framed = True
            elif name == "content-encoding":
                encodings += [e.strip().lower() for e in value.split(",")]
        # Without either, the body runs to the end of the connection (llhttp knows,
        # but cannot be told the connection ended).
        self.close_delimited = not framed
        self._decoder = _decoder(encodings)

    def header(self, name: str) -> str | None:
        """The first value of a header (``name`` in lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def wait_head(self) -> None:
        connection = self._connection
        assert connection is not None
        while not self.status:
            if self.error is not None:
                raise self.error
            if not connection.usable and not self.complete:
                raise Lost("the provider closed the connection before answering")
            if not await connection.wait(self._read_timeout):
                raise TimedOut(f"no answer from the provider within {self._read_timeout:g} s")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, decoded (gzip, deflate); then the connection goes
        back to the pool, unless anything about it was odd."""
        connection = self._connection
        if connection is None:
            return
        buffer = self.buffer
        while True:
            if buffer:
                data = b"".join(buffer)
                buffer.clear()
                connection.taken(len(data))
                if self._decoder is None:
                    yield data
                else:
                    for piece in _inflate(self._decoder, data):
                        yield piece
                continue
            if self.complete:
                break
            if self.error is not None:
                raise self.error
            if self._connection is None:
                return  # closed while we waited (aclose from another task)
            if not await connection.wait(self._read_timeout):
                raise TimedOut(f"the provider sent nothing for {self._read_timeout:g} s")
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error as exc:
                raise Lost(f"the provider's body does not decode ({exc})") from None
            if rest:
                yield rest
        self._done()

    def _done(self) -> None:
        """Give the connection back: to the pool when the answer came whole and nothing
        else came, otherwise closed. Once; later calls do nothing."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._release(connection, connection.finish())

    async def aclose(self) -> None:
        self._done()


def _decoder(encodings: list[str]) -> Any:
    """A zlib decompressor for the body's one compression (the proxy asks for gzip or
    deflate only); ``None`` for none. An unknown coding is left as it is."""
    known = [e for e in encodings if e in ("gzip", "x-gzip", "deflate")]
    if not known:
        return None
    if known[-1] == "deflate":
        return _Deflate()
    return zlib.decompressobj(zlib.MAX_WBITS | 16)


class _Deflate:
    """``deflate`` as servers send it: zlib-wrapped, or raw (some do)."""

    def __init__(self) -> None:
        self._inner: Any = None
        self.unconsumed_tail = b""

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        if self._inner is None:
            wrapped = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        out = self._inner.decompress(data, max_length)
        self.unconsumed_tail = self._inner.unconsumed_tail
        return bytes(out)

    def flush(self) -> bytes:
        return bytes(self._inner.flush()) if self._inner is not None else b""


def _inflate(decoder: Any, data: bytes) -> Iterator[bytes]:
    """Decoded pieces of ``data``, each at most :data:`_INFLATE_STEP` bytes, made only
    as they are taken: the caller's size limit stops a decompression bomb."""
    try:
        while data:
            piece = decoder.decompress(data, _INFLATE_STEP)
            if piece:
                yield piece
            data = decoder.unconsumed_tail
    except zlib.error as exc:
        raise Lost(f"the provider's body does not decode ({exc})") from None
