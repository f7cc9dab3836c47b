"""The provider allow-list (pure) and the SSRF-proof upstream client (real sockets on
127.0.0.1 only; public names never reach DNS: every test that uses one injects a resolver)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest

from tokenlay_otel.proxy.connect import UpstreamClient, refused_by_policy
from tokenlay_otel.proxy.h1 import Connection, ConnectTimedOut, NotSent
from tokenlay_otel.proxy.providers import DEFAULT_PROVIDERS, AllowList, ProviderError

DEFAULTS = AllowList.build()


# --- check_base -------------------------------------------------------------------------


def _sample_base(pattern: str) -> str:
    return pattern.replace("*.", "myres.") + "/v1"


@pytest.mark.parametrize("pattern", DEFAULT_PROVIDERS)
def test_every_default_provider_accepts_its_base(pattern: str) -> None:
    assert pattern.startswith("https://")
    assert DEFAULTS.check_base(_sample_base(pattern)) == _sample_base(pattern)


@pytest.mark.parametrize(
    ("base", "normalized"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("https://api.openai.com", "https://api.openai.com"),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1"),
        ("HTTPS://API.OpenAI.COM:443/v1", "https://api.openai.com/v1"),
        (
            "https://myres.openai.azure.com/openai/deployments/x",
            "https://myres.openai.azure.com/openai/deployments/x",
        ),
        ("https://a.b.openai.azure.com/openai", "https://a.b.openai.azure.com/openai"),
        (
            "https://myres.cognitiveservices.azure.com/v1",
            "https://myres.cognitiveservices.azure.com/v1",
        ),
        ("https://api.anthropic.com/v1", "https://api.anthropic.com/v1"),
        (
            "https://generativelanguage.googleapis.com/v1beta/openai",
            "https://generativelanguage.googleapis.com/v1beta/openai",
        ),
        ("https://openrouter.ai/api/v1", "https://openrouter.ai/api/v1"),
        (
            "https://api.cloudflare.com/client/v4/accounts/abc/ai/v1",
            "https://api.cloudflare.com/client/v4/accounts/abc/ai/v1",
        ),
    ],
)
def test_check_base_normalizes(base: str, normalized: str) -> None:
    assert DEFAULTS.check_base(base) == normalized


@pytest.mark.parametrize(
    ("base", "problem"),
    [
        ("http://user:pw@api.openai.com/v1", "user info"),
        ("https://api.openai.com@evil.com/v1", "user info"),
        ("https://api.openai.com/v1?", "a query ('?')"),
        ("https://api.openai.com/v1?x=1", "a query ('?')"),
        ("https://api.openai.com/v1#", "a fragment ('#')"),
        ("https://api.openai.com:99999/v1", "port '99999'"),
        ("https://api.openai.com:0/v1", "port '0'"),
        ("https://api.openai.com:/v1", "port ''"),
        ("https://api.openai.com:44a/v1", "port '44a'"),
        ("https://api.openai.com:-1/v1", "port '-1'"),
        ("ftp://api.openai.com/v1", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("api.openai.com/v1", "must start with https:// or http://"),
        ("https:/api.openai.com/v1", "must start with https:// or http://"),
        ("https:///v1", "has no host"),
        ("https://api.openai.com/v1/../admin", "'..' segment"),
        ("https://api.openai.com/./v1", "'.'"),
        ("https://api.openai.com//v1", "empty"),
        ("https://api.openai.com/v1/%2e%2e/admin", "'%2e'"),
        ("https://api.openai.com/v1/%2E%2E/admin", "'%2e'"),
        ("https://api.openai.com/v1%2Fadmin", "'%2f'"),
        ("https://api.openai.com/v1%5cadmin", "'%5c'"),
        ("https://api.openai.com/v1%zz", "%XX"),
        ("https://api.openai.com/v1\\admin", "backslash"),
        ("https://api.openai.com /v1", "contains ' '"),
        ("https://api.openai.com/v1\n", "contains '\\n'"),
        ("https://api.openai.com/v1\t", "contains '\\t'"),
        ("https://api.openai.com/v1\x00", "contains '\\x00'"),
        ("https://\u0430pi.openai.com/v1", "printable ASCII"),
        ("https://api.openai.com./v1", "not a valid host name"),
        ("https://api..openai.com/v1", "not a valid host name"),
        ("https://-api.openai.com/v1", "not a valid host name"),
        ("https://2130706433/v1", "not a dotted-quad"),
        ("https://127.1/v1", "not a dotted-quad"),
        ("https://0x7f.0.0.1/v1", "not a dotted-quad"),
        ("https://0177.0.0.1/v1", "not a dotted-quad"),
        ("https://[::1/v1", "unclosed '['"),
        ("https://[fe80::1%25eth0]/v1", "not an IPv6 address"),
        ("https://[1.2.3.4]/v1", "not an IPv6 address"),
        ("https://[::1]x/v1", "'x' after the host"),
        ("https://*.openai.azure.com/v1", "'*'"),
        ("https://*/v1", "'*' alone"),
        ("", "is empty"),
        ("https://api.openai.com/" + "a" * 3000, "longer than 2048"),
    ],
)
def test_check_base_refuses_malformed(base: str, problem: str) -> None:
    with pytest.raises(ProviderError) as info:
        DEFAULTS.check_base(base)
    assert (info.value.status, info.value.code) == (400, "invalid_provider_base")
    assert str(info.value).startswith("provider base ")
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "base",
    [
        "http://api.openai.com/v1",  # the defaults are https only
        "http://127.0.0.1:8080",
        "https://127.0.0.1/v1",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/v1",
        "https://evil.com",
        "https://api.openai.com.evil.com/v1",
        "https://evilopenai.azure.com/v1",
        "https://openai.azure.com/v1",  # a wildcard does not match the apex
        "https://api.openai.com:8443/v1",  # no port in the pattern: 443 only
        "https://localhost/v1",
    ],
)
def test_check_base_refuses_hosts_off_the_list(base: str) -> None:
    with pytest.raises(ProviderError) as info:
        DEFAULTS.check_base(base)
    assert (info.value.status, info.value.code) == (403, "provider_not_allowed")
    assert "--allow-provider" in str(info.value)


def test_not_allowed_message_says_how_to_allow() -> None:
    with pytest.raises(ProviderError, match="allow-list") as info:
        DEFAULTS.check_base("http://127.0.0.1:8080/v1")
    assert str(info.value) == (
        "provider base host 127.0.0.1:8080 is not on the proxy's allow-list for http; "
        "start the proxy with --allow-provider http://127.0.0.1:8080 to allow it"
    )


EXTRA = AllowList.build(
    [
        "http://10.0.0.5:8000",
        "https://*.example.com/api",
        "my-vllm.internal:8000",
        "http://[::1]:9000",
        "http://*.test",
    ]
)


@pytest.mark.parametrize(
    ("base", "result"),
    [
        ("http://10.0.0.5:8000/v1", "http://10.0.0.5:8000/v1"),
        ("https://10.0.0.5:8000/v1", 403),  # an http:// pattern matches http only
        ("http://10.0.0.5/v1", 403),
        ("https://x.example.com/api/v1", "https://x.example.com/api/v1"),
        ("https://x.example.com/api", "https://x.example.com/api"),
        ("https://x.example.com/apiv1", 403),  # prefixes end on a segment boundary
        ("https://x.example.com/other", 403),
        ("https://example.com/api", 403),
        ("https://my-vllm.internal:8000/v1", "https://my-vllm.internal:8000/v1"),
        ("http://my-vllm.internal:8000/v1", 403),  # no scheme in the pattern: https
        ("http://[::1]:9000/v1", "http://[::1]:9000/v1"),
        ("http://[0:0::1]:9000", "http://[::1]:9000"),
        ("http://provider.test/v1", "http://provider.test/v1"),
        ("http://provider.test:80/v1", "http://provider.test/v1"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
    ],
)
def test_operator_patterns(base: str, result: str | int) -> None:
    if isinstance(result, str):
        assert EXTRA.check_base(base) == result
    else:
        with pytest.raises(ProviderError) as info:
            EXTRA.check_base(base)
        assert info.value.status == result


def test_defaults_can_be_left_out() -> None:
    allow = AllowList.build(["https://llm.example.org"], defaults=False)
    assert allow.check_base("https://llm.example.org/v1") == "https://llm.example.org/v1"
    with pytest.raises(ProviderError, match="allow-list"):
        allow.check_base("https://api.openai.com/v1")


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("*", "'*' alone"),
        ("https://*", "'*' alone"),
        ("*.", "has no host"),
        ("https://a.*.com", "'*' may only be a pattern's first label"),
        ("https://*example.com", "'*' may only be a pattern's first label"),
        ("https://*.*.example.com", "'*' may only be a pattern's first label"),
        ("ftp://files.example.com", "scheme 'ftp'"),
        ("http://example.com:99999", "port '99999'"),
        ("https://user@example.com", "user info"),
        ("https://example.com/a?", "a query"),
        ("https://example.com/#", "a fragment"),
        ("https://example.com/a/../b", "'..'"),
        ("https://*.10.0.0.1", "not a dotted-quad"),
        ("https://10.0.0.1.5", "not a dotted-quad"),
        ("https://exa mple.com", "contains ' '"),
        ("", "is empty"),
    ],
)
def test_bad_patterns_fail_at_setup(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError, match="provider pattern") as info:
        AllowList.build([pattern])
    assert not isinstance(info.value, ProviderError)
    assert str(info.value).startswith(f"provider pattern {pattern!r} ")
    assert problem in str(info.value)


# --- address_allowed --------------------------------------------------------------------

NOT_GLOBAL = [
    "127.0.0.1",
    "127.5.6.7",
    "::1",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "fd00:ec2::254",
    "fe80::1",
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "224.0.0.1",
    "ff02::1",
    "192.0.2.1",
    "2001:db8::1",
    "198.18.0.1",
    "240.0.0.1",
    "255.255.255.255",
]
GLOBAL = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NOT_GLOBAL)
def test_defaults_never_reach_non_global_addresses(address: str) -> None:
    assert DEFAULTS.address_allowed("api.openai.com", 443, address) is False
    assert DEFAULTS.address_allowed("myres.openai.azure.com", 443, address) is False


@pytest.mark.parametrize("address", GLOBAL)
def test_defaults_reach_global_addresses(address: str) -> None:
    assert DEFAULTS.address_allowed("api.openai.com", 443, address) is True


OPERATOR = AllowList.build(
    [
        "http://10.0.0.5:8000",
        "http://my-vllm.internal:8000",
        "http://127.0.0.1:9000",
        "http://[::1]:9001",
        "http://*.internal:8000",
    ]
)


@pytest.mark.parametrize(
    ("host", "port", "address", "allowed"),
    [
        ("my-vllm.internal", 8000, "10.1.2.3", True),  # explicit, exact
        ("my-vllm.internal", 8000, "127.0.0.1", True),
        ("10.0.0.5", 8000, "10.0.0.5", True),
        ("127.0.0.1", 9000, "127.0.0.1", True),
        ("::1", 9001, "::1", True),
        ("[::1]", 9001, "::1", True),
        ("other.internal", 8000, "10.1.2.3", False),  # wildcard: global only
        ("other.internal", 8000, "8.8.8.8", True),
        ("my-vllm.internal", 8001, "10.1.2.3", False),  # no pattern for that port
        ("my-vllm.internal", 8001, "8.8.8.8", False),
        ("127.0.0.1", 9001, "127.0.0.1", False),
        ("evil.com", 443, "8.8.8.8", False),  # not on the list at all
        ("api.openai.com", 443, "10.0.0.1", False),  # a default, not explicit
        ("api.openai.com", 443, "not-an-ip", False),
    ],
)
def test_operator_exact_patterns_may_reach_private_addresses(
    host: str, port: int, address: str, allowed: bool
) -> None:
    assert OPERATOR.address_allowed(host, port, address) is allowed


# --- the client, over real sockets on 127.0.0.1 -----------------------------------------


class _Server:
    """A tiny keep-alive HTTP/1.1 server on 127.0.0.1 that counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.heads: list[bytes] = []

    async def __aenter__(self) -> _Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def host_headers(self) -> list[str]:
        lines = [line for head in self.heads for line in head.decode().split("\r\n")]
        return [line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("host:")]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                self.heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-served: yes\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _resolver(table: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


async def _no_lookup(host: str, port: int) -> list[str]:
    raise AssertionError(f"an IP literal was resolved: {host}")


class _Recorder:
    """An opener that records every address the client hands on; 'reaches' the public
    ones it is told about by connecting to the test server instead, so nothing leaves
    127.0.0.1."""

    def __init__(self, redirect: dict[str, int], refuse: Iterable[str] = ()) -> None:
        self.attempts: list[tuple[str, int]] = []
        self.writes: list[bytes] = []
        self._redirect = redirect
        self._refuse = set(refuse)

    async def __call__(
        self,
        factory: Callable[[], asyncio.Protocol],
        address: str,
        port: int,
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        self.attempts.append((address, port))
        if address in self._refuse or address not in self._redirect:
            raise OSError(f"test refuses {address}")
        protocol = factory()
        assert isinstance(protocol, Connection)
        write, writes = protocol.write, self.writes

        def counted(data: bytes) -> None:
            writes.append(data)
            write(data)

        protocol.write = counted  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        return await loop.create_connection(lambda: protocol, "127.0.0.1", self._redirect[address])


async def _fetch(
    client: UpstreamClient, url: str, method: str = "GET", body: Any = None
) -> tuple[int, str, bytes]:
    answer = await client.send(method, url, {"accept": "*/*"}, body)
    try:
        data = b"".join([chunk async for chunk in answer.chunks()])
    finally:
        await answer.aclose()
    return answer.status, answer.header("x-served") or "", data


def test_wildcard_pattern_never_connects_to_loopback() -> None:
    async def main() -> None:
        async with _Server() as server:
            allow = AllowList.build([f"http://*.test:{server.port}"], defaults=False)
            client = UpstreamClient(allow, resolver=_resolver({"provider.test": ["127.0.0.1"]}))
            with pytest.raises(NotSent) as info:
                await _fetch(client, f"http://provider.test:{server.port}/v1/models")
            assert refused_by_policy(info.value) == (
                "the provider host provider.test resolves only to non-public addresses (127.0.0.1)"
            )
            assert server.connections == 0

    asyncio.run(main())


def test_explicit_exact_pattern_connects_to_the_checked_address_by_name() -> None:
    async def main() -> None:
        async with _Server() as server:
            allow = AllowList.build([f"http://provider.test:{server.port}"], defaults=False)
            client = UpstreamClient(allow, resolver=_resolver({"provider.test": ["127.0.0.1"]}))
            url = f"http://provider.test:{server.port}/v1/models"
            first, second = await _fetch(client, url), await _fetch(client, url)
            await client.aclose()
            assert first == second == (200, "yes", b"ok")
            assert server.host_headers() == [f"provider.test:{server.port}"] * 2
            assert server.connections == 1  # kept alive and reused

    asyncio.run(main())


def test_only_allowed_addresses_are_tried_in_order() -> None:
    async def main() -> None:
        async with _Server() as server:
            port = server.port
            allow = AllowList.build([f"http://*.test:{port}"], defaults=False)
            resolver = _resolver(
                {"provider.test": ["169.254.169.254", "10.0.0.1", "8.8.4.4", "::1", "8.8.8.8"]}
            )
            recorder = _Recorder(redirect={"8.8.8.8": port}, refuse=["8.8.4.4"])
            client = UpstreamClient(allow, resolver=resolver, opener=recorder)
            assert await _fetch(client, f"http://provider.test:{port}/v1/models") == (
                200,
                "yes",
                b"ok",
            )
            assert recorder.attempts == [("8.8.4.4", port), ("8.8.8.8", port)]
            assert server.host_headers() == [f"provider.test:{port}"]

    asyncio.run(main())


def test_https_uses_the_name_for_tls_after_connecting_to_the_ip() -> None:
    seen: list[tuple[str, bool, str | None]] = []

    async def probe(
        factory: Callable[[], asyncio.Protocol],
        address: str,
        port: int,
        tls: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        assert tls is not None
        seen.append((address, tls.check_hostname, server_hostname))
        raise OSError("probe stops before the handshake")

    async def main() -> None:
        resolver = _resolver({"api.openai.com": ["10.0.0.7", "8.8.8.8"]})
        client = UpstreamClient(DEFAULTS, resolver=resolver, opener=probe)
        with pytest.raises(NotSent, match="probe"):
            await _fetch(client, "https://api.openai.com/v1/models")

    asyncio.run(main())
    assert seen == [("8.8.8.8", True, "api.openai.com")]


def test_defaults_refuse_private_resolutions_before_any_socket() -> None:
    async def main() -> None:
        recorder = _Recorder(redirect={})
        resolver = _resolver({"api.openai.com": ["10.0.0.7", "::ffff:169.254.169.254"]})
        client = UpstreamClient(DEFAULTS, resolver=resolver, opener=recorder)
        with pytest.raises(NotSent) as info:
            await _fetch(client, "https://api.openai.com/v1/models")
        assert refused_by_policy(info.value) == (
            "the provider host api.openai.com resolves only to non-public addresses "
            "(10.0.0.7, ::ffff:169.254.169.254)"
        )
        assert recorder.attempts == []

    asyncio.run(main())


def test_the_client_refuses_hosts_off_the_list_without_lookup() -> None:
    async def main() -> None:
        async with _Server() as server:
            client = UpstreamClient(DEFAULTS, resolver=_no_lookup)
            with pytest.raises(NotSent) as info:
                await _fetch(client, f"http://127.0.0.1:{server.port}/v1/models")
            assert refused_by_policy(info.value) == (
                f"the host 127.0.0.1:{server.port} is not on the proxy's allow-list"
            )
            assert server.connections == 0

    asyncio.run(main())


def test_explicit_ip_pattern_connects_without_lookup() -> None:
    async def main() -> None:
        async with _Server() as server:
            allow = AllowList.build([f"http://127.0.0.1:{server.port}"], defaults=False)
            client = UpstreamClient(allow, resolver=_no_lookup)
            status, _, _ = await _fetch(client, f"http://127.0.0.1:{server.port}/v1/models")
            assert (status, server.connections) == (200, 1)

    asyncio.run(main())


def test_default_resolver_with_localhost() -> None:
    # localhost comes from the hosts file, not DNS; if it lists ::1 first, the
    # connection falls over to 127.0.0.1 where the server listens.
    async def main() -> None:
        async with _Server() as server:
            allow = AllowList.build([f"http://localhost:{server.port}"], defaults=False)
            client = UpstreamClient(allow)
            status, _, _ = await _fetch(client, f"http://localhost:{server.port}/v1/models")
            assert (status, server.host_headers()) == (200, [f"localhost:{server.port}"])

    asyncio.run(main())


def test_lookup_failure_and_timeout_are_never_sent() -> None:
    async def failing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def hanging(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        return []

    async def main() -> None:
        for resolver, error in ((failing, NotSent), (hanging, ConnectTimedOut)):
            client = UpstreamClient(DEFAULTS, resolver=resolver, timeout=0.05)
            with pytest.raises(error) as info:
                await _fetch(client, "https://api.openai.com/v1/models")
            assert refused_by_policy(info.value) is None

    asyncio.run(main())


def test_refused_by_policy_ignores_other_errors() -> None:
    assert refused_by_policy(ValueError("x")) is None
    looped = RuntimeError("loop")
    looped.__context__ = RuntimeError("inner")
    looped.__context__.__context__ = looped
    assert refused_by_policy(looped) is None


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_closed_port_is_never_sent() -> None:
    closed = _closed_port()

    async def main() -> None:
        allow = AllowList.build([f"http://127.0.0.1:{closed}"], defaults=False)
        with pytest.raises(NotSent, match=r"could not connect to 127\.0\.0\.1"):
            await _fetch(UpstreamClient(allow), f"http://127.0.0.1:{closed}/v1")

    asyncio.run(main())


def test_a_request_goes_upstream_in_one_write() -> None:
    """A request's head leaves with its body in one write (one system call, one
    wake-up of the provider), with or without a body, sized or streamed, and what
    arrives is the request as sent."""

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        received: list[bytes] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while not reader.at_eof():
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).lower()
                except asyncio.IncompleteReadError:
                    return  # the client closed its connection
                body = b""
                if b"content-length: " in head:
                    size = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(size)
                elif b"chunked" in head:
                    body = await reader.readuntil(b"0\r\n\r\n")
                received.append(head.split(b"\r\n")[0] + b" " + body)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        recorder = _Recorder(redirect={"127.0.0.1": port})
        allow = AllowList.build([f"http://127.0.0.1:{port}"], defaults=False)
        client = UpstreamClient(allow, opener=recorder)

        async def upload() -> Any:
            yield b"part1"
            await asyncio.sleep(0.01)
            yield b"part2"

        async with server:
            base = f"http://127.0.0.1:{port}"
            for answer in (
                await _fetch(client, f"{base}/v1/a", "POST", b'{"x": 1}'),
                await _fetch(client, f"{base}/v1/b"),
                await _fetch(client, f"{base}/v1/c", "POST", upload()),
            ):
                assert answer[2] == b"ok"
            await client.aclose()
        return recorder.writes, received

    writes, received = asyncio.run(scenario())
    assert received == [
        b'post /v1/a http/1.1 {"x": 1}',
        b"get /v1/b http/1.1 ",
        b"post /v1/c http/1.1 5\r\npart1\r\n5\r\npart2\r\n0\r\n\r\n",
    ]
    heads = [w.split(b"\r\n")[0] for w in writes]
    # The sized POST and the GET: one write each; the streamed one: its head with its
    # first part, then each further part and the end.
    assert heads == [
        b"POST /v1/a HTTP/1.1",
        b"GET /v1/b HTTP/1.1",
        b"POST /v1/c HTTP/1.1",
        b"5",
        b"0",
    ]
    assert writes[0].endswith(b'\r\n\r\n{"x": 1}')
