"""An untrusted tenant against the proxy: every attack is a line of ATTACKS.

The proxy runs in front of the simulator through a TCP relay that keeps every byte the upstream
was sent. Each attack is raw bytes on a fresh connection to the public listener (so no client
library normalises the target first); for each we assert the answer, the exact request lines
the upstream received, and the ledger rows it left (one per forwarded call, naming the tenant
and the route). At the end no tenant key appears anywhere in what the upstream received, and
every request it received carried the operator's key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httptools
import pytest

from proxy.config import Config
from proxy.core.routes import Grant
from proxy.core.uploads import open_grant, sign_grant, token_key
from tests.faultrelay import FaultRelay

from .support import CHAT_MODEL, OPERATOR_KEY, Meter, StartMeter, error_of, start_simulator

READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class Attack:
    """Raw request bytes ({key}, {gkey}, {gfile}, {gbatch}, {afile}, {opfile}, {body}, and acme's
    upload tokens {atoken}, {ftoken} (forged), {xtoken} (expired) are filled in), the status and
    error code expected, the request lines the upstream must see (exactly, in order), and the
    ledger endpoints of the rows it must leave (one per forwarded call)."""

    name: str
    raw: str
    status: int | tuple[int, ...]
    code: str | None = None
    upstream: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()


def get(target: str, *extra: str, key: str = "{key}") -> str:
    headers = "".join(f"{h}\r\n" for h in extra)
    auth = f"Authorization: Bearer {key}\r\n"
    return f"GET {target} HTTP/1.1\r\nHost: proxy\r\n{auth}{headers}Connection: close\r\n\r\n"


def send(
    method: str, target: str, body: str = "", *extra: str, key: str = "{key}", ctype: str = "application/json"
) -> str:
    headers = "".join(f"{h}\r\n" for h in extra)
    return (
        f"{method} {target} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {key}\r\n{headers}"
        f"Content-Type: {ctype}\r\n" + "Content-Length: {len}\r\nConnection: close\r\n\r\n" + body
    )


def put_upload(token: str, key: str | None = None) -> str:
    """The relayed PUT of an upload as the SDKs send it: no Authorization (unless `key`)."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"PUT /v1/files/uploads/{token} HTTP/1.1\r\nHost: proxy\r\n{auth}"
        "Content-Length: 3\r\nConnection: close\r\n\r\n{}\n"
    )


CHAT = '{"model": "' + CHAT_MODEL + '", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'
SMUGGLE_QUERY = "x=%20HTTP/1.1%0D%0AHost:%20h%0D%0A%0D%0AGET%20/v1/SMUGGLED%20HTTP/1.1%0D%0AX:%20y"
BAD = "invalid_request"
NOT_FOUND = "not_found"

ATTACKS = [
    # -- smuggling through the path, the query and headers, in every encoding --------------------
    Attack("query CRLF smuggling", get(f"/v1/models?{SMUGGLE_QUERY}"), 400, BAD),
    Attack("query lower-case crlf", get("/v1/models?x=%0d%0aInjected:%20yes"), 400, BAD),
    Attack("query NUL", get("/v1/models?dedicated=%00"), 400, BAD),
    Attack("query encoded space", get("/v1/models?dedicated=a%20b"), 400, BAD),
    Attack("query encoded non-ASCII", get("/v1/models?dedicated=%C3%A9"), 400, BAD),
    Attack("query DEL", get("/v1/models?dedicated=%7F"), 400, BAD),
    Attack("query malformed escape", get("/v1/models?dedicated=%G1"), 400, BAD),
    Attack("path CRLF header injection", get("/v1/files/abc%0D%0AInjected:%20yes/content"), 400, BAD),
    Attack("path NUL", get("/v1/files/abc%00/content"), 400, BAD),
    Attack("path tab", get("/v1/files/abc%09/content"), 400, BAD),
    Attack("path encoded space", get("/v1/files/a%20b"), 400, BAD),
    Attack("path encoded non-ASCII", get("/v1/files/%C3%A9"), 400, BAD),
    Attack("path encoded slash", get("/v1/files/a%2Fb/content"), 400, BAD),
    Attack("path encoded question mark", get("/v1/files/a%3Fx=1/content"), 400, BAD),
    Attack("path encoded percent", get("/v1/files/a%25b"), 400, BAD),
    Attack("chat path with CRLF escape", send("POST", "/v1/chat/completions%0D%0AX:%20y", CHAT), 400, BAD),
    Attack(
        "raw non-ASCII in target", "GET /v1/files/\xe9 HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n", 400
    ),
    Attack("raw CR in a header", get("/v1/models", "User-Agent: a\rInjected: yes"), 400),
    Attack("raw NUL in a header", get("/v1/models", "User-Agent: a\x00b"), 400),
    Attack(
        "non-ASCII user agent on chat",
        send("POST", "/v1/chat/completions", CHAT, "User-Agent: caf\xe9"),
        400,
        BAD,
    ),
    Attack("non-ASCII accept on models", get("/v1/models", "Accept: caf\xe9"), 400, BAD),
    Attack(
        "double-encoded CRLF stays encoded",
        get("/v1/models?dedicated=%250D%250A"),
        200,
        upstream=("GET /v1/models?dedicated=%250D%250A HTTP/1.1",),
    ),
    Attack(
        "unknown query parameters are not forwarded",
        get("/v1/models?dedicated=true&api_key=sk-x&x=%2Fetc"),
        200,
        upstream=("GET /v1/models?dedicated=true HTTP/1.1",),
    ),
    Attack(
        "chat query string is dropped",
        send("POST", "/v1/chat/completions?x=1", CHAT),
        200,
        upstream=("POST /v1/chat/completions HTTP/1.1",),
        rows=("chat",),
    ),
    # -- CL/TE conflicts and pipelining towards the public listener --------------------------
    Attack(
        "CL and TE together",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        400,
    ),
    Attack(
        "duplicate Content-Length",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 2\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{}",
        400,
    ),
    Attack(
        "TE obfuscated",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {key}\r\n"
        "Transfer-Encoding: xchunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        400,
    ),
    Attack(
        "short Content-Length pipelines a second request, seen as its own",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: {bodylen}\r\n\r\n{body}"
        "GET /v1/SMUGGLED HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        (200, 404),
        upstream=("POST /v1/chat/completions HTTP/1.1",),
        rows=("chat",),
    ),
    Attack(
        "chunked request body goes upstream with a Content-Length",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "{chunked}",
        200,
        upstream=("POST /v1/chat/completions HTTP/1.1",),
        rows=("chat",),
    ),
    # -- absolute-form, Host and X-Forwarded-* never choose the upstream ----------------------
    Attack(
        "absolute-form target",
        get("http://evil.example:81/v1/models"),
        200,
        upstream=("GET /v1/models HTTP/1.1",),
    ),
    Attack(
        "absolute-form chat",
        send("POST", "http://evil.example/v1/chat/completions", CHAT),
        200,
        upstream=("POST /v1/chat/completions HTTP/1.1",),
        rows=("chat",),
    ),
    Attack(
        "Host and X-Forwarded headers",
        get(
            "/v1/models", "X-Forwarded-Host: evil.example", "X-Forwarded-Proto: https", "Forwarded: host=evil"
        ),
        200,
        upstream=("GET /v1/models HTTP/1.1",),
    ),
    # -- traversal -------------------------------------------------------------------------------
    Attack("dot-dot", get("/v1/files/../batches"), 400, BAD),
    Attack("encoded dot-dot", get("/v1/files/%2e%2e/batches"), 400, BAD),
    Attack("upper-case encoded dot-dot", get("/v1/files/%2E%2E/batches"), 400, BAD),
    Attack("dot-dot into chat", send("POST", "/v1/files/../chat/completions", CHAT), 400, BAD),
    Attack("dot segment", get("/v1/./models"), 400, BAD),
    Attack("double slash", get("//v1/models"), 400, BAD),
    Attack("inner double slash", get("/v1//models"), 400, BAD),
    Attack("trailing slash", get("/v1/models/"), 400, BAD),
    Attack("backslash", get("/v1/files/..%5Cbatches"), 400, BAD),
    # -- cross-tenant ids on every Files/Batches route ---------------------------------------
    Attack("other's file", get("/v1/files/{gfile}"), 404, NOT_FOUND),
    Attack("other's file content", get("/v1/files/{gfile}/content"), 404, NOT_FOUND),
    Attack("delete other's file", send("DELETE", "/v1/files/{gfile}"), 404, NOT_FOUND),
    Attack("other's batch", get("/v1/batches/{gbatch}"), 404, NOT_FOUND),
    Attack("cancel other's batch", send("POST", "/v1/batches/{gbatch}/cancel"), 404, NOT_FOUND),
    Attack(
        "batch over other's file",
        send("POST", "/v1/batches", '{"input_file_id": "{gfile}", "endpoint": "/v1/chat/completions"}'),
        400,
        "invalid_input_file",
    ),
    Attack(
        "upload with a non-ASCII content type",
        send("POST", "/v1/files/upload", "x", ctype="multipart/form-data; boundary=\xe9"),
        400,
        BAD,
    ),
    Attack("preprocess other's file", send("POST", "/v1/files/{gfile}/preprocess"), 404, NOT_FOUND),
    Attack("preprocess operator's file", send("POST", "/v1/files/{opfile}/preprocess"), 404, NOT_FOUND),
    Attack(
        "own preprocess",
        send("POST", "/v1/files/{afile}/preprocess"),
        200,
        upstream=("POST /v1/files/{afile}/preprocess HTTP/1.1",),
        rows=("files.preprocess",),
    ),
    Attack(
        "upload request: query dropped, form rebuilt",
        send(
            "POST",
            "/v1/files?purpose=fine-tune&api_key=sk-x",
            "purpose=batch-api&file_name=a.jsonl&file_type=jsonl&checksum=0f",
            ctype="application/x-www-form-urlencoded",
        ),
        302,
        upstream=("POST /v1/files HTTP/1.1",),
        rows=("files.create",),
    ),
    Attack("upload request with a JSON body", send("POST", "/v1/files", '{"purpose": "x"}'), 400, BAD),
    Attack("forged upload token", put_upload("{ftoken}"), 403, "invalid_upload_token"),
    Attack("expired upload token", put_upload("{xtoken}"), 403, "upload_token_expired"),
    Attack("other's upload token", put_upload("{atoken}", key="{gkey}"), 403, "invalid_upload_token"),
    Attack("upload token with a CRLF escape", put_upload("a%0D%0AX:%20y"), 400, BAD),
    Attack("upload token route, wrong method", get("/v1/files/uploads/{atoken}"), 405, "method_not_allowed"),
    Attack("operator's own file", get("/v1/files/{opfile}"), 404, NOT_FOUND),
    Attack("operator's own file content", get("/v1/files/{opfile}/content"), 404, NOT_FOUND),
    Attack("missing file", get("/v1/files/file-does-not-exist"), 404, NOT_FOUND),
    Attack("missing batch", get("/v1/batches/batch-does-not-exist"), 404, NOT_FOUND),
    Attack(
        "own file",
        get("/v1/files/{afile}"),
        200,
        upstream=("GET /v1/files/{afile} HTTP/1.1",),
        rows=("files.retrieve",),
    ),
    Attack(
        "own file content",
        get("/v1/files/{afile}/content"),
        200,
        upstream=("GET /v1/files/{afile}/content HTTP/1.1",),
        rows=("files.content",),
    ),
    Attack("file list", get("/v1/files"), 200, upstream=("GET /v1/files HTTP/1.1",)),
    Attack("batch list", get("/v1/batches"), 200, upstream=("GET /v1/batches HTTP/1.1",)),
    # -- routes that act on the operator's account --------------------------------------------
    Attack("fine-tunes list", get("/v1/fine-tunes"), 403, "route_not_allowed"),
    Attack(
        "fine-tune create",
        send("POST", "/v1/fine-tunes", '{"model": "m", "training_file": "{afile}"}'),
        403,
        "route_not_allowed",
    ),
    Attack("fine-tune retrieve", get("/v1/fine-tunes/ft-1"), 403, "route_not_allowed"),
    Attack("endpoints", get("/v1/endpoints"), 403, "route_not_allowed"),
    Attack("endpoint delete", send("DELETE", "/v1/endpoints/e-1"), 403, "route_not_allowed"),
    Attack("hardware", get("/v1/hardware"), 403, "route_not_allowed"),
    Attack("model upload", send("POST", "/v1/models", '{"model_name": "x"}'), 403, "route_not_allowed"),
    Attack("jobs", get("/v1/jobs"), 403, "route_not_allowed"),
    Attack("evaluations", get("/v1/evaluation"), 403, "route_not_allowed"),
    Attack("unknown route", get("/v1/assistants"), 404, "unknown_url"),
    Attack("unknown v2 route", get("/v2/projects/p/endpoints"), 404, "unknown_url"),
    Attack("simulator internals", get("/_sim/billed"), 404, "unknown_url"),
    Attack(
        "granted route is forwarded with a row",
        get("/v1/fine-tunes/ft-1", key="{gkey}"),
        404,
        upstream=("GET /v1/fine-tunes/ft-1 HTTP/1.1",),
        rows=("fine-tunes.retrieve",),
    ),
    Attack(
        "granted list",
        get("/v1/fine-tunes", key="{gkey}"),
        200,
        upstream=("GET /v1/fine-tunes HTTP/1.1",),
        rows=("fine-tunes.list",),
    ),
    Attack(
        "grant is per method", send("POST", "/v1/fine-tunes", "{}", key="{gkey}"), 403, "route_not_allowed"
    ),
    # -- keys -----------------------------------------------------------------------------------
    Attack(
        "no key on a management route",
        "GET /v1/fine-tunes HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        401,
        "invalid_api_key",
    ),
    Attack("operator key is not a tenant key", get("/v1/models", key=OPERATOR_KEY), 401, "invalid_api_key"),
    Attack(
        "two Authorization headers",
        get("/v1/models", "Authorization: Bearer {gkey}"),
        401,
        "invalid_api_key",
    ),
]

GRANTS = (Grant.parse("GET /v1/fine-tunes"), Grant.parse("GET /v1/fine-tunes/*"))


def _chunked(body: str) -> str:
    data = body.encode()
    return f"{len(data):x}\r\n{body}\r\n0\r\n\r\n"


async def exchange(port: int, raw: bytes) -> list[tuple[int, bytes]]:
    """Send raw bytes on a fresh connection; every (status, body) answered until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = bytearray()
        async with asyncio.timeout(READ_TIMEOUT):
            while chunk := await reader.read(65536):
                data += chunk
    finally:
        writer.close()
    return parse_responses(bytes(data))


class _Collector:
    def __init__(self) -> None:
        self.items: list[tuple[int, bytes]] = []
        self.body = bytearray()
        self.parser: Any = None

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.items.append((self.parser.get_status_code(), bytes(self.body)))
        self.body = bytearray()


def parse_responses(data: bytes) -> list[tuple[int, bytes]]:
    collector = _Collector()
    collector.parser = httptools.HttpResponseParser(collector)
    while data:
        try:
            collector.parser.feed_data(data)
            break
        except httptools.HttpParserUpgrade:
            break
        except httptools.HttpParserError:
            break
    return collector.items


def request_heads(stream: bytes) -> list[tuple[str, dict[str, str]]]:
    """The request line and headers of every request in a client -> server byte stream (our
    upstream client always sends Content-Length, never chunked)."""
    found = []
    rest = stream
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"an incomplete request head reached the upstream: {head!r}"
        line, *fields = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for f in fields:
            name, _, value = f.partition(":")
            assert name.lower() not in headers, f"duplicate header {name} upstream"
            headers[name.lower()] = value.strip()
        found.append((line, headers))
        rest = rest[int(headers.get("content-length", "0")) :]
    return found


@pytest.fixture
async def attacked(start_meter: StartMeter) -> AsyncIterator[tuple[Meter, FaultRelay, dict[str, str]]]:
    """A proxy in front of the simulator through a recording relay; globex may read fine-tunes.
    Yields the meter, the relay and the values ATTACKS are filled with."""
    sim, _ = await start_simulator()
    relay = await FaultRelay.start("127.0.0.1", sim.port)

    def grant(config: Config) -> Config:
        tenants = dict(config.tenants)
        tenants["globex"] = replace(tenants["globex"], routes=GRANTS)
        # the batch tracker looks once, at creation, and not again during the test: its own
        # requests to the upstream must not mix with the attacks'
        batches = replace(config.batches, poll_interval=3600.0)
        return replace(config, tenants=tenants, batches=batches)

    try:
        async with start_meter(upstream=relay.url("/v1"), change=grant) as meter:
            values = await _objects(meter, sim.url)
            await _tracker_looked(meter)
            relay.received.clear()
            yield meter, relay, values
    finally:
        await relay.close()
        await sim.stop()


async def _objects(meter: Meter, sim_url: str) -> dict[str, str]:
    """globex's file and batch, acme's file, and a file made on the operator's account."""
    import aiohttp

    async def upload(tenant: str | None) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch-api")
        line = {
            "custom_id": "1",
            "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}]},
        }
        form.add_field("file", json.dumps(line).encode(), filename="b.jsonl")
        base, key = (meter.base_url, meter.keys[tenant]) if tenant else (sim_url, OPERATOR_KEY)
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{base}/files/upload", data=form, headers=headers) as r,
        ):
            assert r.status == 200, await r.text()
            return str((await r.json())["id"])

    values = {"gfile": await upload("globex"), "afile": await upload("acme"), "opfile": await upload(None)}
    async with aiohttp.ClientSession() as s:
        body = {
            "input_file_id": values["gfile"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        async with s.post(f"{meter.base_url}/batches", json=body, headers=meter.auth("globex")) as r:
            assert r.status == 200, await r.text()
            values["gbatch"] = str((await r.json())["job"]["id"])
        form = "purpose=batch-api&file_name=a.jsonl&file_type=jsonl"
        headers = {**meter.auth("acme"), "Content-Type": "application/x-www-form-urlencoded"}
        async with s.post(f"{meter.base_url}/files", data=form, headers=headers, allow_redirects=False) as r:
            assert r.status == 302, await r.text()
            token = r.headers["Location"].rsplit("/", 1)[1]
    key = token_key(OPERATOR_KEY)
    grant = open_grant(token, key, time.time())
    values["atoken"] = token
    values["ftoken"] = token[:8] + ("A" if token[8] != "A" else "B") + token[9:]
    values["xtoken"] = sign_grant(replace(grant, expires=int(time.time()) - 1), key)
    values["key"], values["gkey"] = meter.keys["acme"], meter.keys["globex"]
    values["body"], values["bodylen"], values["chunked"] = CHAT, str(len(CHAT)), _chunked(CHAT)
    return values


async def _tracker_looked(meter: Meter) -> None:
    """Wait (bounded) until the batch tracker's first look at the batch is over."""
    for _ in range(200):
        jobs = await meter.proxy.ledger.batches()
        if jobs and all(j.status != "VALIDATING" for j in jobs):
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the batch tracker did not look at the new batch within 5 s")


def fill(text: str, values: dict[str, str]) -> str:
    """The template with its values; `{len}` becomes the length of the (filled) body after it."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    if "{len}" in text:
        head, _, body = text.partition("\r\n\r\n")
        text = head.replace("{len}", str(len(body.encode("latin-1")))) + "\r\n\r\n" + body
    return text


async def _run(meter: Meter, relay: FaultRelay, values: dict[str, str], attack: Attack) -> list[str]:
    """The ways `attack` went wrong (empty: held)."""
    problems = []
    before = {r.request_id for r in await meter.rows()}
    start = len(relay.received)
    answers = await exchange(meter.proxy.port, fill(attack.raw, values).encode("latin-1"))
    expected = attack.status if isinstance(attack.status, tuple) else (attack.status,)
    statuses = tuple(s for s, _ in answers)
    if not answers or statuses[0] != expected[0] or (len(expected) > 1 and statuses != expected):
        problems.append(f"answered {statuses}, expected {expected}")
    elif attack.code is not None:
        try:
            code = error_of(answers[0][1])["code"]
        except (AssertionError, ValueError):
            code = f"not an OpenAI error: {answers[0][1][:80]!r}"
        if code != attack.code:
            problems.append(f"error code {code!r}, expected {attack.code!r}")
    await asyncio.sleep(0.05)  # the relay hands bytes on asynchronously
    lines = tuple(line for line, _ in request_heads(bytes(relay.received[start:])))
    want = tuple(fill(u, values) for u in attack.upstream)
    if lines != want:
        problems.append(f"upstream saw {lines}, expected {want}")
    rows = [r for r in await meter.wait_terminal(0) if r.request_id not in before]
    if sorted(r.endpoint for r in rows) != sorted(attack.rows):
        problems.append(f"rows {[r.endpoint for r in rows]}, expected {list(attack.rows)}")
    owner = "globex" if "{gkey}" in attack.raw else "acme"
    problems += [f"row of {r.tenant}, not {owner}" for r in rows if r.tenant != owner]
    return problems


async def test_attacks(attacked: tuple[Meter, FaultRelay, dict[str, str]]) -> None:
    """Every attack of ATTACKS gets its expected answer, reaches the upstream exactly as listed
    (nothing for a refused one) and leaves exactly its ledger rows; no tenant key ever reaches
    the upstream and every request it received carries the operator's key and its own Host."""
    meter, relay, values = attacked
    failures = {}
    for attack in ATTACKS:
        problems = await _run(meter, relay, values, attack)
        if problems:
            failures[attack.name] = problems
    assert not failures, json.dumps(failures, indent=1)
    heads = request_heads(bytes(relay.received))
    assert heads, "no attack reached the upstream at all"
    for line, headers in heads:
        assert headers["authorization"] == f"Bearer {OPERATOR_KEY}", line
        assert headers["host"] == f"127.0.0.1:{relay.port}", line
        assert not any(h.startswith(("x-forwarded", "forwarded", "x-meter")) for h in headers), line
    for key in meter.keys.values():
        assert key.encode() not in relay.received
    await meter.proxy.upstream.probe()
    assert meter.proxy.relay.accepting  # the process keeps serving


async def test_lists_hold_only_own_objects(attacked: tuple[Meter, FaultRelay, dict[str, str]]) -> None:
    """GET /v1/files and /v1/batches list only the caller's own objects (never the operator's
    or another tenant's), and a missing id answers exactly as another tenant's id does."""
    meter, _, values = attacked
    port = meter.proxy.port
    [(status, body)] = await exchange(port, fill(get("/v1/files"), values).encode())
    assert status == 200
    assert [f["id"] for f in json.loads(body)["data"]] == [values["afile"]]
    [(status, body)] = await exchange(port, fill(get("/v1/files", key="{gkey}"), values).encode())
    ids = {f["id"] for f in json.loads(body)["data"]}
    assert values["gfile"] in ids and values["afile"] not in ids and values["opfile"] not in ids
    [(status, body)] = await exchange(port, fill(get("/v1/batches"), values).encode())
    assert (status, json.loads(body)) == (200, [])
    [(status, body)] = await exchange(port, fill(get("/v1/batches", key="{gkey}"), values).encode())
    assert [b["id"] for b in json.loads(body)] == [values["gbatch"]]
    others = await exchange(port, fill(get("/v1/files/{gfile}"), values).encode())
    missing = await exchange(port, fill(get("/v1/files/{gfile}x"), values).encode())
    assert others[0][0] == missing[0][0] == 404
    assert json.loads(others[0][1].replace(values["gfile"].encode(), b"ID")) == json.loads(
        missing[0][1].replace((values["gfile"] + "x").encode(), b"ID")
    )
