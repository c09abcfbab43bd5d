"""Conformance of the upstream client (proxy/upstream/client.py) against real loopback servers.

The servers are raw asyncio servers (tests/upstream_support.py) that record the exact bytes they
receive and answer scripted bytes, so framing, codings, head sizes, stale connections, TLS and a
CONNECT proxy are all under the test's control. `max_connections=1` makes a leaked pool slot
visible: the next request could not get a connection.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.config import Upstream
from proxy.errors import BadRequest, ConfigError, InvalidField, UpstreamError, UpstreamTimeout
from proxy.upstream.client import (
    HIGH_WATER,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    UpstreamClient,
    UpstreamProxyError,
    UpstreamResponse,
    UpstreamStreamError,
    _Connection,
)
from tests.upstream_support import (
    ConnectProxy,
    Peer,
    Pki,
    RawServer,
    Script,
    answering,
    bounded,
    chunked,
    make_pki,
    response,
    server_tls,
    until,
)

OPERATOR_KEY = "op-key-123"
ENV_NAMES = (
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
    "ALL_PROXY", "all_proxy", "REQUEST_METHOD", "SSL_CERT_FILE", "SSL_CERT_DIR",
)  # fmt: skip
BODY = bytes(range(256)) * 400  # 100 KiB that no framing or coding bug leaves intact by chance

StartServer = Callable[..., Awaitable[RawServer]]
MakeClient = Callable[..., Awaitable[UpstreamClient]]


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA variables leak in from the environment the tests run in."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def servers() -> AsyncIterator[StartServer]:
    made: list[RawServer] = []

    async def start(script: Script, tls: Any = None) -> RawServer:
        server = await RawServer(script, tls).start()
        made.append(server)
        return server

    yield start
    for server in made:
        await server.close()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Awaitable[ConnectProxy]]]:
    made: list[ConnectProxy] = []

    async def start(**kwargs: Any) -> ConnectProxy:
        proxy = await ConnectProxy(**kwargs).start()
        made.append(proxy)
        return proxy

    yield start
    for proxy in made:
        await proxy.close()


@pytest.fixture
async def clients() -> AsyncIterator[MakeClient]:
    made: list[UpstreamClient] = []

    async def make(url: str, **settings: Any) -> UpstreamClient:
        settings = {"connect_timeout": 2.0, "first_byte_timeout": 5.0, **settings}
        client = UpstreamClient(Upstream(url=url, **settings), OPERATOR_KEY)
        await client.start()
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def http_url(server: RawServer, path: str = "/v1") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def get(client: UpstreamClient, path: str = "/v1/models") -> tuple[int, bytes]:
    async with await client.request("GET", path, body=None, incoming={}) as resp:
        return resp.status, await resp.read(1 << 26)


async def chunks_of(resp: UpstreamResponse) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(100_000):
        chunk = await bounded(resp.readany())
        if not chunk:
            return out
        out.append(chunk)
    raise AssertionError("the body did not end")


def trusting(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    """The test CA trusted through SSL_CERT_FILE, and nothing through SSL_CERT_DIR."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(pki.empty_dir))


# -- the request on the wire --------------------------------------------------------------------


async def test_request_head_bytes_are_exact(servers: StartServer, clients: MakeClient) -> None:
    """Request line, the fixed Host and operator key, allow-listed headers only, then the body."""
    server = await servers(answering(response()))
    client = await clients(http_url(server, "/api/v1"))
    incoming = {
        "accept": "application/json",
        "user-agent": "sdk/1.0 (x)",
        "host": "evil.example",
        "authorization": "Bearer tenant-key",
        "x-forwarded-for": "10.0.0.1",
    }
    body = b'{"model":"m"}'
    async with await client.request("POST", "/v1/chat/completions", body=body, incoming=incoming):
        pass
    assert server.peers[0].requests == [
        b"POST /api/v1/chat/completions HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Authorization: Bearer op-key-123\r\n"
        b"Accept-Encoding: identity\r\n"
        b"accept: application/json\r\n"
        b"user-agent: sdk/1.0 (x)\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 13\r\n"
        b"\r\n" % server.port + body
    ]


async def test_get_with_query_and_other_content_type(servers: StartServer, clients: MakeClient) -> None:
    """A /v2 path goes as it is with its query; a non-JSON content type is written as given."""
    server = await servers(answering(response()))
    client = await clients(http_url(server))
    async with await client.request("GET", "/v2/models", body=None, incoming={}, query="a=1&b=%20"):
        pass
    ctype = "multipart/form-data; boundary=xyz"
    async with await client.request("POST", "/v1/files", body=b"--xyz--", incoming={}, content_type=ctype):
        pass
    first, second = server.peers[0].requests
    assert first.startswith(b"GET /v2/models?a=1&b=%20 HTTP/1.1\r\n") and b"Content-Length" not in first
    assert (
        b"\r\nContent-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 7\r\n\r\n--xyz--" in second
    )


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v1/chat completions", ""),
        ("/v1/x\r\nX-Injected: 1", ""),
        ("/v1/x\nX: 1", ""),
        ("/v1/x\x00", ""),
        ("/v1/caf\u00e9", ""),
        ("/v1/x\x7f", ""),
        ("/v1/models", "a=b c"),
        ("/v1/models", "a=\r\n"),
        ("http://evil.example/v1/models", ""),
        ("*", ""),
    ],
)
async def test_unsafe_target_refused_before_sending(
    servers: StartServer, clients: MakeClient, path: str, query: str
) -> None:
    """A target with a byte outside 0x21..0x7E (or not origin-form) is a 400; nothing is sent."""
    server = await servers(answering(response()))
    client = await clients(http_url(server), max_connections=1)
    with pytest.raises(BadRequest) as info:
        await client.request("GET", path, body=None, incoming={}, query=query)
    assert info.value.status == 400 and client.open_connections == 0
    assert await get(client) == (200, b"{}")  # the slot was never taken
    assert [p.requests for p in server.peers] == [[server.peers[0].requests[0]]]
    assert server.peers[0].requests[0].startswith(b"GET /v1/models HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "incoming",
    [
        {"accept": "a\r\nX-Injected: 1"},
        {"accept": "a\nb"},
        {"user-agent": "a\rb"},
        {"user-agent": "a\x00b"},
        {"user-agent": "caf\u00e9"},
        {"user-agent": "a\x7fb"},
    ],
)
async def test_unsafe_header_value_refused_before_sending(
    servers: StartServer, clients: MakeClient, incoming: dict[str, str]
) -> None:
    """A forwarded header value with a control or non-ASCII byte is a 400; nothing is sent."""
    server = await servers(answering(response()))
    client = await clients(http_url(server), max_connections=1)
    with pytest.raises(InvalidField):
        await client.request("POST", "/v1/chat/completions", body=b"{}", incoming=incoming)
    assert server.peers == [] and client.open_connections == 0
    assert await get(client) == (200, b"{}")


@pytest.mark.parametrize("ctype", ["text/plain\r\nX-Injected: 1", "a\nb", "a\x00b", "multipart/caf\u00e9"])
async def test_unsafe_content_type_refused_before_sending(
    servers: StartServer, clients: MakeClient, ctype: str
) -> None:
    """A content type with a control or non-ASCII byte is a 400; nothing is sent."""
    server = await servers(answering(response()))
    client = await clients(http_url(server))
    with pytest.raises(InvalidField):
        await client.request("POST", "/v1/files", body=b"x", incoming={}, content_type=ctype)
    assert server.peers == [] and client.open_connections == 0


@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "get", "GET /x HTTP/1.1\r\nX:", ""])
async def test_method_outside_the_fixed_set_refused(
    servers: StartServer, clients: MakeClient, method: str
) -> None:
    """Only GET POST PUT PATCH DELETE HEAD OPTIONS are written on a request line."""
    server = await servers(answering(response()))
    client = await clients(http_url(server))
    with pytest.raises(BadRequest):
        await client.request(method, "/v1/models", body=None, incoming={})
    assert server.peers == [] and client.open_connections == 0


async def test_tab_in_header_value_is_forwarded(servers: StartServer, clients: MakeClient) -> None:
    """Tab is legal inside a field value and goes upstream unchanged."""
    server = await servers(answering(response()))
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/models", body=None, incoming={"user-agent": "a\tb"}):
        pass
    assert b"\r\nuser-agent: a\tb\r\n" in server.peers[0].requests[0]


# -- response bodies and connection reuse -------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
@pytest.mark.parametrize("mode", ["read", "readany"])
async def test_body_framings(servers: StartServer, clients: MakeClient, framing: str, mode: str) -> None:
    """Content-Length, chunked and close-delimited bodies arrive intact, whole or chunk by chunk."""

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(response(BODY, framing=framing, chunk_size=1000))
        if framing == "close":
            peer.writer.close()

    server = await servers(script)
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/files/f/content", body=None, incoming={}) as resp:
        data = await resp.read(1 << 20) if mode == "read" else b"".join(await chunks_of(resp))
        assert resp.complete and resp.until_eof == (framing == "close")
    assert data == BODY


async def test_keep_alive_reuses_one_connection(servers: StartServer, clients: MakeClient) -> None:
    """Exchanges that end cleanly share one pooled connection."""
    server = await servers(answering(response(b"a"), response(b"b", framing="chunked")))
    client = await clients(http_url(server))
    assert [await get(client) for _ in range(3)] == [(200, b"a"), (200, b"b"), (200, b"b")]
    assert len(server.peers) == 1 and len(server.peers[0].requests) == 3
    assert client.open_connections == 1


async def test_stale_pooled_connection_replaced(servers: StartServer, clients: MakeClient) -> None:
    """An idle connection the upstream closed leaves the pool (slot freed); the next request reconnects."""

    async def first_gives_up(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(response(b"first"))  # keep-alive framing, then the upstream gives up
            peer.writer.close()
            return
        await answering(response(b"second"))(peer)

    server = await servers(first_gives_up)
    client = await clients(http_url(server), max_connections=1)
    assert await get(client) == (200, b"first")
    await until(lambda: client.open_connections == 0)  # the client saw the close while idle
    assert await get(client) == (200, b"second")
    assert len(server.peers) == 2 and client.open_connections == 1


async def test_released_before_body_read_not_reused(servers: StartServer, clients: MakeClient) -> None:
    """A response released before the parser saw its whole body closes its connection."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(b"HTTP/1.1 200 X\r\nContent-Length: 100\r\n\r\n0123456789")
            return  # the other 90 bytes never come
        await answering(response(b"second"))(peer)

    server = await servers(script)
    client = await clients(http_url(server), max_connections=1)
    resp = await client.request("GET", "/v1/models", body=None, incoming={})
    assert not resp.complete
    resp.release()
    await bounded(server.peers[0].closed.wait())
    assert await get(client) == (200, b"second")
    assert len(server.peers) == 2 and client.open_connections == 1


async def test_unsent_request_bytes_prevent_reuse(servers: StartServer, clients: MakeClient) -> None:
    """An answer that came before the whole request body left makes the connection not reusable."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_head()  # and never the 32 MiB body
            await peer.send(b"HTTP/1.1 413 X\r\nContent-Length: 0\r\n\r\n")
            await peer.writer.wait_closed()
            return
        await answering(response(b"next"))(peer)

    server = await servers(script)
    client = await clients(http_url(server), max_connections=1)
    async with await client.request("POST", "/v1/files", body=b"x" * (32 << 20), incoming={}) as resp:
        assert resp.status == 413 and resp.complete and resp.keep_alive
    assert client.open_connections == 0  # closed at release (the server, not reading, cannot tell)
    assert await get(client) == (200, b"next")
    assert len(server.peers) == 2 and len(server.peers[0].requests) == 1


class _StubTransport(asyncio.Transport):
    """Records flow control; the connection under test never touches a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.closed = True

    close = abort


async def test_release_resumes_a_paused_complete_response(clients: MakeClient) -> None:
    """A complete response released while reading was paused is pooled with reading resumed."""
    client = await clients("http://127.0.0.1:9/v1")
    conn = _Connection(client)
    transport = _StubTransport()
    conn.connection_made(transport)
    conn.counted, client._open = True, 1  # as _acquire leaves a new connection
    resp = UpstreamResponse(conn, asyncio.get_running_loop())
    conn.response = resp
    body = b"x" * (HIGH_WATER + 10)
    conn.data_received(b"HTTP/1.1 200 X\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert resp.complete and transport.paused
    resp.release()
    assert not transport.paused and not transport.closed and list(client._idle) == [conn]


async def test_bytes_after_response_prevent_reuse(servers: StartServer, clients: MakeClient) -> None:
    """Bytes past the end of a response keep it intact but its connection out of the pool."""
    extra = b"HTTP/1.1 200 X\r\nContent-Length: 5\r\n\r\nforged"
    server = await servers(answering(response(b"real") + extra, response(b"fresh")))
    client = await clients(http_url(server), max_connections=1)
    assert await get(client) == (200, b"real")
    assert await get(client) == (200, b"real")  # a new connection: its first answer again
    assert len(server.peers) == 2 and len(server.peers[0].requests) == 1


async def test_interim_response_skipped(servers: StartServer, clients: MakeClient) -> None:
    """A 1xx interim answer (100 Continue, 103 Early Hints) is skipped for the final one."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
    server = await servers(answering(interim + response(b"final", headers=[("X-A", "1")])))
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/models", body=None, incoming={}) as resp:
        assert (resp.status, resp.headers.get("x-a"), "link" in resp.headers) == (200, "1", False)
        assert await resp.read(100) == b"final"


async def test_head_request_has_no_body(servers: StartServer, clients: MakeClient) -> None:
    """The answer to HEAD ends with its headers, whatever Content-Length says."""
    server = await servers(answering(b"HTTP/1.1 200 X\r\nContent-Length: 1234\r\n\r\n"))
    client = await clients(http_url(server))
    async with await client.request("HEAD", "/v1/models", body=None, incoming={}) as resp:
        assert resp.complete and await resp.read(10) == b""
        assert resp.headers["content-length"] == "1234"
    assert server.peers[0].requests[0].startswith(b"HEAD /v1/models HTTP/1.1\r\n")


# -- Content-Encoding ---------------------------------------------------------------------------


def _deflate(data: bytes, wbits: int) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


CODED = {
    "gzip": ("gzip", gzip.compress(BODY)),
    "x-gzip": ("x-gzip", gzip.compress(BODY)),
    "two-gzip-members": ("gzip", gzip.compress(BODY[:5000]) + gzip.compress(BODY[5000:])),
    "deflate-zlib": ("deflate", _deflate(BODY, zlib.MAX_WBITS)),
    "deflate-raw": ("deflate", _deflate(BODY, -zlib.MAX_WBITS)),
}


@pytest.mark.parametrize("case", list(CODED))
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_coded_body_decoded(servers: StartServer, clients: MakeClient, case: str, framing: str) -> None:
    """A gzip/deflate body is decoded whole; content-encoding and content-length are dropped."""
    coding, coded = CODED[case]
    server = await servers(
        answering(response(coded, framing=framing, headers=[("Content-Encoding", coding)]))
    )
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/models", body=None, incoming={}) as resp:
        assert "content-encoding" not in resp.headers and "content-length" not in resp.headers
        assert await resp.read(1 << 20) == BODY


@pytest.mark.parametrize("case", ["gzip", "deflate-zlib", "deflate-raw"])
async def test_coded_body_streamed_in_small_chunks(
    servers: StartServer, clients: MakeClient, case: str
) -> None:
    """A coded body sent in 7-byte chunks, written one by one, decodes to the same bytes."""
    coding, coded = CODED[case]

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            f"HTTP/1.1 200 X\r\nContent-Encoding: {coding}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        for i in range(0, len(coded), 7):
            piece = coded[i : i + 7]
            await peer.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        await peer.send(b"0\r\n\r\n")
        await answering(response())(peer)

    server = await servers(script)
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/models", body=None, incoming={}) as resp:
        assert b"".join(await chunks_of(resp)) == BODY
    assert await get(client) == (200, b"{}")  # the connection stayed usable
    assert len(server.peers) == 1


async def test_coded_stream_flows_before_its_end(servers: StartServer, clients: MakeClient) -> None:
    """Decoding is incremental: a flushed first event is readable before the stream ends."""
    first, rest = b"data: one\n\n", b"data: two\n\ndata: [DONE]\n\n"
    z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    part1 = z.compress(first) + z.flush(zlib.Z_SYNC_FLUSH)
    part2 = z.compress(rest) + z.flush()
    client_has_first = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.read_request()
        head = b"HTTP/1.1 200 X\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
        await peer.send(head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(part1), part1))
        await bounded(client_has_first.wait())
        await peer.send(chunked(part2))

    server = await servers(script)
    client = await clients(http_url(server))
    async with await client.request("POST", "/v1/chat/completions", body=b"{}", incoming={}) as resp:
        got = b""
        while got != first:  # bounded: each readany waits at most WAIT
            got += await bounded(resp.readany())
            assert first.startswith(got)
        client_has_first.set()
        assert b"".join(await chunks_of(resp)) == rest


async def test_identity_coding_is_a_no_op(servers: StartServer, clients: MakeClient) -> None:
    """Content-Encoding: identity changes nothing."""
    server = await servers(answering(response(b"plain", headers=[("Content-Encoding", "identity")])))
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/models", body=None, incoming={}) as resp:
        assert resp.headers["content-length"] == "5" and await resp.read(100) == b"plain"


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "gzip, deflate"])
async def test_unsupported_coding_refused(servers: StartServer, clients: MakeClient, coding: str) -> None:
    """Any coding but gzip/deflate/identity is a 502, and the client works afterwards."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(response(b"\x1b\x00garbage", headers=[("Content-Encoding", coding)]))
            return
        await answering(response())(peer)

    server = await servers(script)
    client = await clients(http_url(server), max_connections=1)
    with pytest.raises(UpstreamError) as info:
        await client.request("GET", "/v1/models", body=None, incoming={})
    assert info.value.status == 502 and "unsupported Content-Encoding" in str(info.value.__cause__)
    await bounded(server.peers[0].closed.wait())
    assert await get(client) == (200, b"{}")


@pytest.mark.parametrize(
    ("coded", "problem"),
    [
        (gzip.compress(BODY)[:-100], "cut short"),
        (gzip.compress(BODY)[:20] + b"\xff" * 200, "invalid gzip"),
        (gzip.compress(BODY) + b"garbage!", "invalid gzip"),
    ],
    ids=["truncated", "corrupt", "trailing-garbage"],
)
async def test_broken_coded_body_fails_the_read(
    servers: StartServer, clients: MakeClient, coded: bytes, problem: str
) -> None:
    """A truncated or corrupt gzip body fails the read; its connection is not reused."""
    broken = response(coded, headers=[("Content-Encoding", "gzip")])

    async def script(peer: Peer) -> None:
        await answering(broken if peer.index == 0 else response())(peer)

    server = await servers(script)
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/models", body=None, incoming={}) as resp:
        with pytest.raises(UpstreamStreamError, match=problem):
            await resp.read(1 << 20)
    assert await get(client) == (200, b"{}") and len(server.peers) == 2


# -- response head limits -----------------------------------------------------------------------


def _fields(n: int, value_size: int) -> bytes:
    return b"".join(b"X-F%d: %s\r\n" % (i, b"v" * value_size) for i in range(n))


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 X\r\nX-Big: " + b"v" * MAX_HEAD_BYTES + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 X\r\n" + _fields(MAX_HEADERS + 1, 1) + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 X\r\n" + _fields(100, 700) + b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 X\r\nX-Endless: " + b"v" * (2 * MAX_HEAD_BYTES),  # never ends: no timeout wait
    ],
    ids=["one-huge-field", "too-many-fields", "too-many-bytes", "endless-field"],
)
async def test_oversized_head_refused(servers: StartServer, clients: MakeClient, head: bytes) -> None:
    """A head over MAX_HEAD_BYTES or MAX_HEADERS is a 502 at once; the client works afterwards."""

    async def script(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head if peer.index == 0 else response())
        if peer.index > 0:
            await answering(response())(peer)

    server = await servers(script)
    client = await clients(http_url(server), max_connections=1, first_byte_timeout=30.0)
    with pytest.raises(UpstreamError) as info:
        await bounded(client.request("GET", "/v1/models", body=None, incoming={}))
    assert info.value.status == 502 and "exceeds" in str(info.value.__cause__)
    await bounded(server.peers[0].closed.wait())
    assert await get(client) == (200, b"{}")


async def test_head_at_the_limits_accepted(servers: StartServer, clients: MakeClient) -> None:
    """MAX_HEADERS fields (one of them Content-Length) within MAX_HEAD_BYTES pass."""
    head = b"HTTP/1.1 200 X\r\n" + _fields(MAX_HEADERS - 1, 200) + b"Content-Length: 2\r\n\r\nok"
    server = await servers(answering(head))
    client = await clients(http_url(server))
    async with await client.request("GET", "/v1/models", body=None, incoming={}) as resp:
        assert len(resp.headers) == MAX_HEADERS and await resp.read(10) == b"ok"


# -- every exit path frees the slot -------------------------------------------------------------


def _first_holds(after_request: bool) -> Script:
    """Connection 0 never answers (reads the request first if `after_request`); others answer."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            if after_request:
                await peer.read_request()
            return  # the server then only records until the client closes
        await answering(response(b"served"))(peer)

    return script


async def test_cancel_while_waiting_for_headers(servers: StartServer, clients: MakeClient) -> None:
    """Cancelled while awaiting the headers: connection closed, slot freed."""
    server = await servers(_first_holds(after_request=True))
    client = await clients(http_url(server), max_connections=1)
    task = asyncio.create_task(get(client))
    peer = await server.next_peer()
    await bounded(peer.got_request.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(task)
    await bounded(peer.closed.wait())
    assert client.open_connections == 0
    assert await get(client) == (200, b"served")


async def test_cancel_while_reading_the_body(servers: StartServer, clients: MakeClient) -> None:
    """Cancelled while reading the body (inside `async with`): connection closed, slot freed."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(b"HTTP/1.1 200 X\r\nContent-Length: 100\r\n\r\nfirst")
            return
        await answering(response(b"served"))(peer)

    server = await servers(script)
    client = await clients(http_url(server), max_connections=1)
    got_first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def consume() -> None:
        async with await client.request("GET", "/v1/models", body=None, incoming={}) as resp:
            got_first.set_result(await resp.readany())
            await resp.readany()  # the rest never comes

    task = asyncio.create_task(consume())
    assert await bounded(got_first) == b"first"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(task)
    await bounded(server.peers[0].closed.wait())
    assert client.open_connections == 0
    assert await get(client) == (200, b"served")


async def test_cancel_while_waiting_for_a_slot(servers: StartServer, clients: MakeClient) -> None:
    """Cancelled while queued for a pool slot: nothing is taken, the pool is intact."""
    server = await servers(answering(response(b"ok")))
    client = await clients(http_url(server), max_connections=1)
    held = await client.request("GET", "/v1/models", body=None, incoming={})
    task = asyncio.create_task(get(client))
    for _ in range(10):  # let it run up to its first suspension: the full pool
        await asyncio.sleep(0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(task)
    assert await held.read(10) == b"ok"
    held.release()
    assert await get(client) == (200, b"ok")
    assert len(server.peers) == 1 and client.open_connections == 1


async def test_cancel_during_tls_handshake(
    servers: StartServer, clients: MakeClient, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while connecting (the server holds the TLS handshake): socket closed, slot freed."""
    trusting(monkeypatch, pki)
    ctx = server_tls(pki.cert, pki.key, [])

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            return  # accepts TCP, never answers the ClientHello
        await peer.writer.start_tls(ctx)
        await answering(response(b"over tls"))(peer)

    server = await servers(script)
    client = await clients(f"https://localhost:{server.port}/v1", max_connections=1)
    task = asyncio.create_task(get(client))
    peer = await server.next_peer()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(task)
    await bounded(peer.closed.wait())
    assert client.open_connections == 0
    assert await get(client) == (200, b"over tls")


async def test_first_byte_timeout_frees_the_slot(servers: StartServer, clients: MakeClient) -> None:
    """A silent upstream is a 504 after first_byte_timeout; its connection is closed."""
    server = await servers(_first_holds(after_request=True))
    client = await clients(http_url(server), max_connections=1, first_byte_timeout=0.3)
    with pytest.raises(UpstreamTimeout) as info:
        await get(client)
    assert info.value.status == 504 and info.value.sent
    await bounded(server.peers[0].closed.wait())
    assert await get(client) == (200, b"served")


async def test_first_byte_timeout_on_a_pooled_connection(servers: StartServer, clients: MakeClient) -> None:
    """A request on a reused connection that gets no answer is a 504 (sent) after
    first_byte_timeout too; that connection is closed and the next request gets a new one."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(response(b"first"))
            await peer.read_request()  # the second request on this connection: no answer
            return
        await answering(response(b"served"))(peer)

    server = await servers(script)
    client = await clients(http_url(server), max_connections=1, first_byte_timeout=0.3)
    assert await get(client) == (200, b"first")
    started = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout) as info:
        await bounded(get(client))
    assert info.value.status == 504 and info.value.sent
    assert 0.25 <= asyncio.get_running_loop().time() - started < 5
    await bounded(server.peers[0].closed.wait())
    assert client.open_connections == 0
    assert await get(client) == (200, b"served") and len(server.peers) == 2


async def test_refused_connection_counts_as_unreachable(clients: MakeClient) -> None:
    """Connection refused: 502, and UNREACHABLE_AFTER such attempts flip `reachable`."""
    server = await RawServer(answering(response())).start()
    port = server.port
    await server.close()
    client = await clients(f"http://127.0.0.1:{port}/v1", max_connections=1)
    for attempt in range(1, 4):
        with pytest.raises(UpstreamError) as info:
            await get(client)
        assert info.value.status == 502 and client.failed_attempts == attempt
    assert not client.reachable and client.open_connections == 0
    assert not await client.probe()


async def test_reset_before_headers_is_a_502(servers: StartServer, clients: MakeClient) -> None:
    """The upstream closing before any answer is a 502; the slot is freed."""

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.writer.close()
            return
        await answering(response(b"served"))(peer)

    server = await servers(script)
    client = await clients(http_url(server), max_connections=1)
    with pytest.raises(UpstreamError) as info:
        await get(client)
    assert info.value.status == 502 and client.failed_attempts == 1
    assert await get(client) == (200, b"served") and client.failed_attempts == 0


# -- TLS ----------------------------------------------------------------------------------------


async def _tls_server(
    servers: StartServer, pki: Pki, wrong: bool = False
) -> tuple[RawServer, list[str | None]]:
    sni: list[str | None] = []
    cert, key = (pki.wrong_cert, pki.wrong_key) if wrong else (pki.cert, pki.key)
    return await servers(answering(response(b"secure")), server_tls(cert, key, sni)), sni


async def test_tls_trusts_ssl_cert_file(
    servers: StartServer, clients: MakeClient, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSL_CERT_FILE (read when the client is built) makes the test CA trusted; SNI is sent."""
    server, sni = await _tls_server(servers, pki)
    trusting(monkeypatch, pki)
    client = await clients(f"https://localhost:{server.port}/v1")
    assert await get(client) == (200, b"secure")
    assert sni == ["localhost"]
    assert (
        server.peers[0]
        .requests[0]
        .startswith(b"GET /v1/models HTTP/1.1\r\nHost: localhost:%d\r\n" % server.port)
    )


async def test_tls_trusts_ssl_cert_dir(
    servers: StartServer, clients: MakeClient, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSL_CERT_DIR (a hashed CA directory) is honoured as well."""
    server, _ = await _tls_server(servers, pki)
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    monkeypatch.setenv("SSL_CERT_DIR", str(pki.ca_dir))
    client = await clients(f"https://localhost:{server.port}/v1")
    assert await get(client) == (200, b"secure")


async def test_tls_untrusted_ca_refused(
    servers: StartServer, clients: MakeClient, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the CA in SSL_CERT_FILE/SSL_CERT_DIR the certificate is refused: 502."""
    server, _ = await _tls_server(servers, pki)
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    monkeypatch.setenv("SSL_CERT_DIR", str(pki.empty_dir))
    client = await clients(f"https://localhost:{server.port}/v1")
    with pytest.raises(UpstreamError) as info:
        await get(client)
    assert info.value.status == 502 and "SSLCertVerificationError" in info.value.message
    assert client.failed_attempts == 1 and client.open_connections == 0


async def test_tls_name_mismatch_refused(
    servers: StartServer, clients: MakeClient, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trusted certificate for another name is refused (hostname checked): 502."""
    server, sni = await _tls_server(servers, pki, wrong=True)
    trusting(monkeypatch, pki)
    client = await clients(f"https://localhost:{server.port}/v1")
    with pytest.raises(UpstreamError) as info:
        await get(client)
    assert "SSLCertVerificationError" in info.value.message and sni == ["localhost"]


# -- HTTPS_PROXY / HTTP_PROXY / NO_PROXY --------------------------------------------------------


async def test_https_proxy_tunnels_verified_tls(
    servers: StartServer,
    proxies: Callable[..., Awaitable[ConnectProxy]],
    clients: MakeClient,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY: CONNECT localhost:PORT, then TLS verified end to end (certificate, name, SNI)."""
    server, sni = await _tls_server(servers, pki)
    proxy = await proxies()
    trusting(monkeypatch, pki)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    client = await clients(f"https://localhost:{server.port}/v1")
    assert client.proxy_address == f"127.0.0.1:{proxy.port}"
    assert [await get(client) for _ in range(2)] == [(200, b"secure")] * 2
    authority = b"localhost:%d" % server.port
    assert proxy.heads == [b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)]
    assert sni == ["localhost"]


async def test_no_proxy_bypasses_the_proxy(
    servers: StartServer,
    proxies: Callable[..., Awaitable[ConnectProxy]],
    clients: MakeClient,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NO_PROXY naming the upstream host means a direct connection."""
    server, _ = await _tls_server(servers, pki)
    proxy = await proxies()
    trusting(monkeypatch, pki)
    monkeypatch.setenv("https_proxy", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,localhost")
    client = await clients(f"https://localhost:{server.port}/v1")
    assert client.proxy_address is None
    assert await get(client) == (200, b"secure") and proxy.heads == []


async def test_http_proxy_tunnels_plain_http(
    servers: StartServer,
    proxies: Callable[..., Awaitable[ConnectProxy]],
    clients: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY applies to an http upstream, through CONNECT as well; HTTPS_PROXY does not."""
    server = await servers(answering(response(b"plain")))
    proxy, unused = await proxies(), await proxies()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", unused.url)
    client = await clients(http_url(server))
    assert await get(client) == (200, b"plain")
    assert proxy.heads == [
        b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (server.port, server.port)
    ]
    assert unused.heads == []
    assert (
        server.peers[0]
        .requests[0]
        .startswith(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
    )


async def test_proxy_credentials_sent_once_never_shown(
    servers: StartServer,
    proxies: Callable[..., Awaitable[ConnectProxy]],
    clients: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Proxy URL credentials go as Proxy-Authorization: Basic on CONNECT only, shown nowhere."""
    server = await servers(answering(response(b"plain")))
    proxy = await proxies()
    monkeypatch.setenv("http_proxy", f"http://us%40er:p%3Ass@127.0.0.1:{proxy.port}")
    client = await clients(http_url(server))
    assert await get(client) == (200, b"plain")
    token = base64.b64encode(b"us@er:p:ss")
    assert b"\r\nProxy-Authorization: Basic %s\r\n" % token in proxy.heads[0]
    assert b"Proxy-Authorization" not in server.peers[0].received
    shown = f"{client.proxy_address} {client._proxy!r} {vars(client)!r}"
    assert "p:ss" not in shown and "p%3Ass" not in shown


async def test_proxy_refusal_is_unreachable(
    proxies: Callable[..., Awaitable[ConnectProxy]], clients: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-2xx answer to CONNECT (407) is a 502 like a refused connection."""
    proxy = await proxies(status=407)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    client = await clients("https://localhost:9/v1", max_connections=1)
    with pytest.raises(UpstreamError) as info:
        await get(client)
    assert info.value.status == 502 and isinstance(info.value.__cause__, UpstreamProxyError)
    assert "407" in str(info.value.__cause__)
    assert client.failed_attempts == 1 and client.open_connections == 0


async def test_unreachable_proxy_is_unreachable(clients: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy nobody listens on is a 502 and counts as a failed attempt; probe() says so."""
    dead = await RawServer(answering(response())).start()
    await dead.close()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{dead.port}")
    client = await clients("https://localhost:9/v1")
    with pytest.raises(UpstreamError):
        await get(client)
    assert client.failed_attempts == 1 and not await client.probe()


async def test_oversized_proxy_answer_refused(
    servers: StartServer, clients: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy answer longer than 8 KiB is refused without waiting for its end."""

    async def endless(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 9000)

    proxy = await servers(endless)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    client = await clients("https://localhost:9/v1", first_byte_timeout=30.0, connect_timeout=30.0)
    with pytest.raises(UpstreamError) as info:
        await bounded(get(client))
    assert "8192" in str(info.value.__cause__)


async def test_probe_targets_the_proxy(
    proxies: Callable[..., Awaitable[ConnectProxy]], clients: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a proxy, the /readyz probe connects to the proxy (the upstream is behind it)."""
    proxy = await proxies()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    client = await clients("https://localhost:9/v1")  # nothing listens on port 9
    assert await client.probe()


async def test_cancel_while_proxy_holds_connect(
    servers: StartServer,
    proxies: Callable[..., Awaitable[ConnectProxy]],
    clients: MakeClient,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled while the proxy has not answered CONNECT: socket closed, slot freed."""
    server, _ = await _tls_server(servers, pki)
    proxy = await proxies(hold=True)
    trusting(monkeypatch, pki)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    client = await clients(f"https://localhost:{server.port}/v1", max_connections=1)
    task = asyncio.create_task(get(client))
    await bounded(proxy.arrived.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(task)
    await bounded(proxy.closed.wait())
    assert client.open_connections == 0
    proxy.hold = False
    assert await get(client) == (200, b"secure")


async def test_proxy_env_read_once(
    servers: StartServer, clients: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proxy variables set after the client was built change nothing (read once)."""
    server = await servers(answering(response(b"direct")))
    client = await clients(http_url(server))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert await get(client) == (200, b"direct") and client.proxy_address is None


@pytest.mark.parametrize(
    ("var", "value", "problem"),
    [
        ("HTTPS_PROXY", "socks5://user:secret@127.0.0.1:1080", "http:// URL"),
        ("https_proxy", "https://user:secret@127.0.0.1:3128", "http:// URL"),
        ("HTTPS_PROXY", "http://user:secret@127.0.0.1:99999", "invalid port"),
        ("HTTPS_PROXY", "http://user:secret@:3128", "no host"),
    ],
)
def test_unusable_proxy_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, problem: str
) -> None:
    """An unusable proxy URL is a ConfigError naming the variable, never its password."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        UpstreamClient(Upstream(url="https://api.together.xyz/v1"), OPERATOR_KEY)
    assert info.value.key == var and problem in str(info.value) and "secret" not in str(info.value)


def test_proxy_for_the_other_scheme_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY (even an unusable one) does not concern an https upstream."""
    monkeypatch.setenv("HTTP_PROXY", "socks5://127.0.0.1:1080")
    assert UpstreamClient(Upstream(url="https://api.together.xyz/v1"), OPERATOR_KEY).proxy_address is None


# -- the same under uvloop, which `serve` runs on -----------------------------------------------


async def _proxied_roundtrip_and_cancel(pki: Pki) -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    sni: list[str | None] = []
    server = await RawServer(_first_holds(after_request=True), server_tls(pki.cert, pki.key, sni)).start()
    proxy = await ConnectProxy().start()
    os.environ["HTTPS_PROXY"] = proxy.url  # restored by monkeypatch in the caller
    client = UpstreamClient(
        Upstream(url=f"https://localhost:{server.port}/v1", max_connections=1), OPERATOR_KEY
    )
    await client.start()
    try:
        task = asyncio.create_task(get(client))
        peer = await server.next_peer()
        await bounded(peer.got_request.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(task)
        await bounded(peer.closed.wait())
        assert await bounded(get(client)) == (200, b"served")
        assert len(proxy.heads) == 2 and sni == ["localhost", "localhost"]
    finally:
        await client.close()
        await proxy.close()
        await server.close()


def test_proxied_tls_and_cancellation_under_uvloop(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under uvloop too: CONNECT then start_tls works, and a cancelled request frees its slot."""
    uvloop = pytest.importorskip("uvloop")
    trusting(monkeypatch, pki)
    monkeypatch.setenv("HTTPS_PROXY", "")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_proxied_roundtrip_and_cancel(pki))
