"""File uploads through the proxy: the together SDKs' presigned upload (issue 17), and the OpenAI
SDKs' multipart `files.create` on the same `POST /v1/files` (at the end).

`client.files.upload(...)` of every together SDK: `POST /v1/files` -> 302 (Location: a presigned
object-store URL, X-Together-File-Id) -> PUT of the bytes there -> `POST /v1/files/{id}/preprocess`
(the npm SDK retrieves the file instead). The proxy rewrites the Location to its own upload URL
with a signed token and relays the PUT to the simulator's presigned "object store" (on the
simulator's own loopback origin). Run with the real together 3.1.1 SDK (2.42.0 has the same
upload code), and as raw HTTP in the exact shapes of the 1.x SDK (requests) and the npm SDK.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
import requests
from aiohttp import web
from openai import APIStatusError as OpenAIStatusError
from together import APIStatusError as TogetherStatusError
from together import AsyncTogether, Together

from proxy.config import Config
from proxy.core.uploads import open_grant, sign_grant, token_key
from proxy.ledger import LedgerRow
from proxy.server.app import Secrets
from proxy.simulator import billed_pusd

from .support import (
    ADMIN_TOKEN,
    CHAT_MODEL,
    OPERATOR_KEY,
    Meter,
    StartMeter,
    _start_proxy,
    closed_port,
    error_of,
)

LINE = {"custom_id": "req-0", "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}}
POLL = 0.05


def batch_file(tmp_path: Path, lines: int = 2, name: str = "input.jsonl", pad: int = 0) -> Path:
    """A valid batch-api JSONL file (`pad` spaces of filler make it larger)."""
    rows = []
    for i in range(lines):
        line = json.loads(json.dumps(LINE))
        line["custom_id"] = f"req-{i}"
        line["body"]["max_tokens"] = 3 + i
        rows.append(json.dumps(line))
    if pad:
        rows[0] = rows[0][:-1] + ', "pad": "' + "x" * pad + '"}'
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return path


def sdk(meter: Meter, tenant: str = "acme") -> Together:
    return Together(api_key=meter.keys[tenant], base_url=meter.origin, max_retries=0, timeout=20)


async def sdk_upload(meter: Meter, path: Path, tenant: str = "acme") -> Any:
    """`Together(...).files.upload(path, purpose="batch-api")` (sync SDK, off the loop)."""

    def run() -> Any:
        with sdk(meter, tenant) as client:
            return client.files.upload(path, purpose="batch-api")

    return await asyncio.to_thread(run)


async def sdk_error(meter: Meter, path: Path, tenant: str = "acme") -> TogetherStatusError:
    """The APIStatusError the SDK's upload raises."""
    with pytest.raises(TogetherStatusError) as err:
        await sdk_upload(meter, path, tenant)
    return err.value


async def request(
    method: str, url: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw request, redirects not followed: status, headers (lower-case names), body."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(method, url, headers=headers, data=data, allow_redirects=False) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def announce(meter: Meter, tenant: str = "acme", name: str = "in.jsonl") -> tuple[str, str]:
    """POST /v1/files as the 1.x/npm SDKs send it (urlencoded); (file id, Location)."""
    form = f"purpose=batch-api&file_name={name}&file_type=jsonl".encode()
    headers = {**meter.auth(tenant), "Content-Type": "application/x-www-form-urlencoded"}
    status, head, body = await request("POST", meter.base_url + "/files", headers, form)
    assert status == 302, body
    return head["x-together-file-id"], head["location"]


def put_count(meter: Meter) -> int:
    """PUTs that reached the simulator's object store."""
    return sum(1 for s in meter.upstream_seen if s["method"] == "PUT")


def rows_of(rows: list[LedgerRow], endpoint: str) -> list[LedgerRow]:
    return [r for r in rows if r.endpoint == endpoint]


async def test_sdk_upload_end_to_end_and_owned(meter: Meter, tmp_path: Path) -> None:
    """together 3.1.1's files.upload works through the proxy: the file is listed and readable
    by its tenant, byte for byte; another tenant gets the 404 of a missing file on retrieve,
    content, preprocess and delete, with nothing forwarded. One row per forwarded call, cost 0;
    neither key travels to the object store, the operator key goes to the API only."""
    path = batch_file(tmp_path)
    info = await sdk_upload(meter, path)
    assert (info.filename, info.purpose, info.file_type, info.bytes) == (
        "input.jsonl",
        "batch-api",
        "jsonl",
        path.stat().st_size,
    )
    assert info.processing_status == "COMPLETED"
    assert await meter.proxy.ledger.file_owner(info.id) == "acme"

    with sdk(meter) as client:
        listed = await asyncio.to_thread(client.files.list)
        content = await asyncio.to_thread(lambda: client.files.content(info.id).read())
    assert [f.id for f in listed.data] == [info.id]
    assert content == path.read_bytes()

    seen_before = len(meter.upstream_seen)
    for method, suffix in (("GET", ""), ("GET", "/content"), ("POST", "/preprocess"), ("DELETE", "")):
        status, _, body = await request(
            method, f"{meter.base_url}/files/{info.id}{suffix}", meter.auth("globex")
        )
        assert status == 404 and error_of(body)["code"] == "not_found", (method, suffix)
    assert len(meter.upstream_seen) == seen_before  # nothing forwarded for globex
    with sdk(meter, "globex") as client:
        assert (await asyncio.to_thread(client.files.list)).data == []

    rows = await meter.wait_terminal(4)
    calls = [r for r in rows if r.endpoint.startswith("files.")]
    assert sorted(r.endpoint for r in calls) == sorted(
        ["files.create", "files.put", "files.preprocess", "files.content"]
    )
    assert all((r.tenant, r.status, r.cost_pusd) == ("acme", "ok", 0) for r in calls)
    (create,) = rows_of(rows, "files.create")
    assert create.upstream_status == 302

    announced, put, preprocess = [
        s for s in meter.upstream_seen if s["path"].startswith(("/v1/files", "/_sim"))
    ][:3]
    assert (announced["method"], announced["path"]) == ("POST", "/v1/files")
    assert announced["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert (put["method"], put["path"]) == ("PUT", f"/_sim/store/{info.id}")
    assert "authorization" not in put["headers"]
    assert put["headers"]["content-length"] == str(path.stat().st_size)
    assert (preprocess["method"], preprocess["path"]) == ("POST", f"/v1/files/{info.id}/preprocess")
    for seen in meter.upstream_seen:
        if seen["method"] != "PUT":
            assert seen["headers"]["authorization"] == f"Bearer {meter.operator_key}"
        assert not any(key in json.dumps(seen["headers"]) for key in meter.keys.values())


@pytest.mark.sqlite_only
async def test_async_sdk_upload(meter: Meter, tmp_path: Path) -> None:
    """AsyncTogether's files.upload (its own PUT path) works through the proxy too."""
    path = batch_file(tmp_path, 3)
    async with AsyncTogether(
        api_key=meter.keys["acme"], base_url=meter.origin, max_retries=0, timeout=20
    ) as c:
        info = await c.files.upload(path, purpose="batch-api")
        again = await c.files.retrieve(info.id)
    assert again.bytes == path.stat().st_size and again.processing_status == "COMPLETED"


async def test_the_proxy_strips_the_checksum_so_tenants_never_share_files(
    meter: Meter, tmp_path: Path
) -> None:
    """together deduplicates uploads by checksum across the account (409 naming the existing
    file); the proxy drops the SDK's checksum, so a second tenant uploading the same bytes gets
    a file of its own and learns nothing about the first."""
    path = batch_file(tmp_path)
    first = await sdk_upload(meter, path, "acme")
    second = await sdk_upload(meter, path, "globex")
    assert first.id != second.id
    assert await meter.proxy.ledger.file_owner(second.id) == "globex"
    # the simulator does deduplicate when it is given a checksum (so this test can fail)
    checksum = hashlib.sha256(path.read_bytes()).hexdigest()
    form = f"purpose=batch-api&file_name=x.jsonl&file_type=jsonl&checksum={checksum}"
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}", "Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = await request("POST", meter.sim.url + "/files", headers, form.encode())
    assert status == 409 and json.loads(body)["file_id"] == first.id


async def test_batch_from_an_sdk_uploaded_file(start_meter: StartMeter, tmp_path: Path) -> None:
    """A batch over a file uploaded with files.upload runs, and its lines are recorded for the
    tenant at batch rates; another tenant cannot create a batch over that file."""

    def fast(config: Config) -> Config:
        return replace(config, batches=replace(config.batches, poll_interval=POLL))

    async with start_meter(change=fast) as meter:
        info = await sdk_upload(meter, batch_file(tmp_path, 3))
        async with AsyncTogether(api_key=meter.keys["globex"], base_url=meter.origin, max_retries=0) as other:
            with pytest.raises(TogetherStatusError) as err:
                await other.batches.create(
                    input_file_id=info.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
            assert err.value.status_code == 400
        async with AsyncTogether(api_key=meter.keys["acme"], base_url=meter.origin, max_retries=0) as client:
            created = await client.batches.create(
                input_file_id=info.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert created.job is not None
        deadline = time.monotonic() + 10
        while len([r for r in await meter.rows() if r.mode == "batch"]) < 3:
            assert time.monotonic() < deadline, "batch lines not recorded in 10 s"
            await asyncio.sleep(POLL)
        lines = [r for r in await meter.rows() if r.mode == "batch"]
        billed = [e for e in meter.sim.billed.entries if e.get("mode") == "batch"]
        assert len(billed) == 3 and all(r.tenant == "acme" and r.status == "ok" for r in lines)
        assert sorted(r.completion_tokens or 0 for r in lines) == sorted(
            e["completion_tokens"] for e in billed
        )


async def test_sdk_1x_request_shapes(meter: Meter) -> None:
    """together 1.x (requests): urlencoded POST without redirects, a PUT of the open file with
    no Authorization to the absolute Location, then POST files/{id}/preprocess without a body;
    its FileResponse fields come back."""
    headers = {
        "Authorization": f"Bearer {meter.keys['acme']}",
        "User-Agent": "Together/v1 PythonBindings/1.5.34",
        "X-Together-Client-User-Agent": json.dumps({"bindings_version": "1.5.34", "httplib": "requests"}),
    }
    content = json.dumps(LINE).encode() + b"\n"
    data = {"purpose": "batch-api", "file_name": "one.jsonl", "file_type": "jsonl"}

    def run() -> tuple[requests.Response, requests.Response, requests.Response]:
        with requests.Session() as s:
            first = s.request(
                "POST", meter.base_url + "/files", headers=headers, data=data, allow_redirects=False
            )
            location = first.headers["Location"]
            put = s.request("PUT", location, headers={}, data=content)
            done = s.request(
                "POST",
                f"{meter.base_url}/files/{first.headers['X-Together-File-Id']}/preprocess",
                headers=headers,
            )
            return first, put, done

    first, put, done = await asyncio.to_thread(run)
    assert first.status_code == 302
    location = urlsplit(first.headers["Location"])
    assert (location.scheme, location.netloc) == ("http", f"127.0.0.1:{meter.proxy.port}")
    assert location.path.startswith("/v1/files/uploads/")
    assert put.status_code == 200
    assert done.status_code == 200
    info = done.json()
    assert {"id", "bytes", "created_at", "filename", "FileType", "object", "purpose"} <= set(info)
    assert (info["id"], info["bytes"], info["filename"]) == (
        first.headers["X-Together-File-Id"],
        len(content),
        "one.jsonl",
    )


async def test_sdk_2_0_request_shapes(meter: Meter) -> None:
    """together 2.0-2.3x (httpx): a multipart POST with a checksum-less form and redirects off,
    then `client._client.put(url=Location, content=bytes)` on the SDK's own httpx client (its
    base URL set, no Authorization), then POST /v1/files/{id}/preprocess. (2.42's upload code is
    the same as 3.1.1's, run above with the real SDK.)"""
    content = json.dumps(LINE).encode() + b"\n"
    form = {"purpose": "batch-api", "file_name": "three.jsonl", "file_type": "jsonl"}

    def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        with httpx.Client(base_url=meter.origin, follow_redirects=True, timeout=20) as client:
            first = client.post(
                "/v1/files", data=form, files={"": ("", b"")}, headers=meter.auth(), follow_redirects=False
            )
            put = client.put(url=first.headers["Location"], content=content)
            done = client.post(
                f"/v1/files/{first.headers['X-Together-File-Id']}/preprocess", headers=meter.auth()
            )
            return first, put, done

    first, put, done = await asyncio.to_thread(run)
    assert first.status_code == 302 and first.headers["content-length"] == "0"
    assert put.status_code == 200 and put.request.headers.get("authorization") is None
    assert done.status_code == 200 and done.json()["bytes"] == len(content)


async def test_npm_sdk_request_shapes(meter: Meter) -> None:
    """The npm SDK: fields in the query and an urlencoded body, redirect 'manual', a PUT with
    Content-Type application/octet-stream, then it retrieves the file (no preprocess call)."""
    query = "file_name=two.jsonl&file_type=jsonl&purpose=batch-api"
    headers = {**meter.auth(), "Content-Type": "application/x-www-form-urlencoded"}
    status, head, _ = await request("POST", f"{meter.base_url}/files?{query}", headers, query.encode())
    assert status == 302
    body = json.dumps(LINE).encode() + b"\n"
    put_headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
    status, _, _ = await request("PUT", head["location"], put_headers, body)
    assert status == 200
    status, _, got = await request(
        "GET", f"{meter.base_url}/files/{head['x-together-file-id']}", meter.auth()
    )
    assert status == 200 and json.loads(got)["bytes"] == len(body)
    (announced,) = [s for s in meter.upstream_seen if s["path"] == "/v1/files"]
    assert "checksum" not in json.dumps(announced)


async def test_oversized_upload_is_413_and_never_reaches_the_store(
    start_meter: StartMeter, tmp_path: Path
) -> None:
    """An upload over limits.max_body_bytes: 413 request_too_large from the SDK's PUT, before any
    byte is sent to the object store; the file stays unstored upstream."""

    def small(config: Config) -> Config:
        return replace(config, limits=replace(config.limits, max_body_bytes=2048))

    async with start_meter(change=small) as meter:
        err = await sdk_error(meter, batch_file(tmp_path, pad=4000))
        assert err.status_code == 413
        assert json.loads(err.response.content)["error"]["code"] == "request_too_large"
        assert put_count(meter) == 0
        rows = await meter.wait_terminal(1)
        assert [r.endpoint for r in rows] == ["files.create"]
        # a body without a Content-Length cannot be checked in advance (nor sent to S3): 411
        _, location = await announce(meter)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"{}\n"

        async with aiohttp.ClientSession() as s, s.put(location, data=chunks()) as r:
            assert r.status == 411 and (await r.json())["error"]["code"] == "length_required"
        assert put_count(meter) == 0


async def test_forged_expired_and_foreign_tokens_are_refused(meter: Meter) -> None:
    """A token changed by one byte, one past its expiry, one sent with another tenant's key, one
    whose tenant key is gone, one naming a plain-http store: 403, nothing reaches the store. The
    right tenant's own key on the PUT is accepted."""
    file_id, location = await announce(meter)
    token = location.rsplit("/", 1)[1]
    key = token_key(OPERATOR_KEY)
    grant = open_grant(token, key, time.time())
    assert (grant.tenant, grant.file_id) == ("acme", file_id)
    base = location.rsplit("/", 1)[0] + "/"
    flipped = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    expired = sign_grant(replace(grant, expires=int(time.time()) - 1), key)
    gone_key = sign_grant(replace(grant, key_id="00000000"), key)
    elsewhere = sign_grant(replace(grant, url="http://127.0.0.1:1/x"), key)
    cases = [
        (flipped, {}, "invalid_upload_token"),
        (expired, {}, "upload_token_expired"),
        (token, meter.auth("globex"), "invalid_upload_token"),
        (gone_key, {}, "invalid_upload_token"),
        (elsewhere, {}, "invalid_upload_token"),
    ]
    for candidate, headers, code in cases:
        status, _, body = await request("PUT", base + candidate, headers, b"{}\n")
        assert (status, error_of(body)["code"]) == (403, code), (code, body)
    status, _, body = await request("PUT", location, {"Authorization": "Bearer tm-wrong"}, b"{}\n")
    assert status == 401 and error_of(body)["code"] == "invalid_api_key"
    assert put_count(meter) == 0
    status, _, _ = await request("PUT", location, meter.auth("acme"), b"{}\n")
    assert status == 200 and put_count(meter) == 1
    rows = await meter.wait_terminal(2)
    (put,) = rows_of(rows, "files.put")
    assert (put.tenant, put.status, put.upstream_status) == ("acme", "ok", 200)


async def test_store_failures_are_clear_errors(meter: Meter, tmp_path: Path) -> None:
    """The store refusing (503 from it) reaches the SDK as that status with the store's reason;
    an unreachable store is 502 upstream_unreachable. Never a silent success."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(meter.sim.origin + "/_sim/store_fault", json={"status": 503}) as r,
    ):
        assert r.status == 200
    err = await sdk_error(meter, batch_file(tmp_path))
    assert err.status_code == 503
    error = json.loads(err.response.content)["error"]
    assert error["code"] == "object_store_error" and "InternalError" in error["message"]
    rows = await meter.wait_terminal(2)
    (put,) = rows_of(rows, "files.put")
    assert (put.status, put.upstream_status, put.error_code) == ("upstream_error", 503, "upstream_503")

    file_id, location = await announce(meter)
    key = token_key(OPERATOR_KEY)
    grant = open_grant(location.rsplit("/", 1)[1], key, time.time())
    unreachable = sign_grant(
        replace(grant, url=f"https://127.0.0.1:{closed_port()}/bucket/{file_id}?sig=1"), key
    )
    status, _, body = await request("PUT", location.rsplit("/", 1)[0] + "/" + unreachable, {}, b"{}\n")
    assert (status, error_of(body)["code"]) == (502, "upstream_unreachable")


async def test_a_bad_redirect_from_the_upstream_is_refused(start_meter: StartMeter) -> None:
    """A 302 whose Location is plain http to another origin (or has no file id) is answered 502
    upstream_protocol_error; the client never gets a URL to upload to, and no file is owned. A
    2xx file object instead of a 302 is passed on, its file the caller's."""
    answers = [
        {"Location": "http://store.elsewhere.example/x?sig=1", "X-Together-File-Id": "file-x1"},
        {"Location": "https://store.example/x?sig=1"},
    ]

    async def fake(request: web.Request) -> web.Response:
        if not answers:  # an upstream that makes the file at once: it is still the caller's
            return web.json_response({"id": "file-y2", "object": "file"})
        return web.Response(status=302, headers=answers.pop(0))

    app = web.Application()
    app.router.add_post("/v1/files", fake)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        upstream = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        async with start_meter(upstream=upstream) as meter:
            for _ in range(2):
                headers = {**meter.auth(), "Content-Type": "application/x-www-form-urlencoded"}
                status, head, body = await request(
                    "POST", meter.base_url + "/files", headers, b"purpose=batch-api"
                )
                assert (status, error_of(body)["code"]) == (502, "upstream_protocol_error")
                assert "location" not in head
            assert await meter.proxy.ledger.file_owner("file-x1") is None
            rows = await meter.wait_terminal(2)
            assert [(r.endpoint, r.status) for r in rows] == [("files.create", "upstream_error")] * 2
            status, _, body = await request("POST", meter.base_url + "/files", headers, b"purpose=batch-api")
            assert status == 200 and json.loads(body)["id"] == "file-y2"
            assert await meter.proxy.ledger.file_owner("file-y2") == "acme"
    finally:
        await runner.cleanup()


async def test_passthrough_mode_and_public_url(start_meter: StartMeter, tmp_path: Path) -> None:
    """files.relay_uploads false: the SDK gets together's presigned URL and PUTs there itself
    (the file is still the tenant's). files.public_url: the upload URL starts with it."""

    def direct(config: Config) -> Config:
        return replace(config, files=replace(config.files, relay_uploads=False))

    async with start_meter(change=direct) as meter:
        file_id, location = await announce(meter)
        assert location.startswith(meter.sim.origin + "/_sim/store/" + file_id + "?")
        info = await sdk_upload(meter, batch_file(tmp_path))
        assert await meter.proxy.ledger.file_owner(info.id) == "acme"
        assert [r.endpoint for r in await meter.rows() if r.endpoint == "files.put"] == []

    def public(config: Config) -> Config:
        return replace(config, files=replace(config.files, public_url="https://meter.example.com/together"))

    async with start_meter(change=public) as meter:
        _, location = await announce(meter)
        assert location.startswith("https://meter.example.com/together/v1/files/uploads/")


async def test_tokens_work_on_any_replica(meter: Meter, tmp_path: Path) -> None:
    """The token is stateless: a second proxy with the same together key and tenants (another
    replica, with its own ledger) relays an upload the first one announced."""
    config = replace(
        meter.config,
        ledger=replace(meter.config.ledger, backend="sqlite", path=str(tmp_path / "b.db"), dsn=None),
    )
    other = await _start_proxy(
        config, Secrets(OPERATOR_KEY, admin_token=ADMIN_TOKEN), meter.proxy.relay.tokenizer
    )
    try:
        file_id, location = await announce(meter)
        moved = location.replace(f":{meter.proxy.port}/", f":{other.port}/")
        status, _, _ = await request("PUT", moved, {}, json.dumps(LINE).encode())
        assert status == 200
        (put,) = [r for r in await other.ledger.rows() if r.endpoint == "files.put"]
        assert (put.tenant, put.status) == ("acme", "ok")
        status, _, got = await request("GET", f"{meter.base_url}/files/{file_id}", meter.auth())
        assert status == 200 and json.loads(got)["bytes"] == len(json.dumps(LINE))
    finally:
        await other.stop()


@pytest.mark.sqlite_only
async def test_a_large_upload_streams_through_whole(meter: Meter, tmp_path: Path) -> None:
    """A 3.5 MiB file (under the default 4 MiB limit, many times the socket buffers) arrives at
    the store byte for byte: the body streams with back-pressure, nothing is lost or repeated."""
    path = batch_file(tmp_path, pad=int(3.5 * 1024 * 1024))
    info = await sdk_upload(meter, path)
    status, _, content = await request("GET", f"{meter.base_url}/files/{info.id}/content", meter.auth())
    assert status == 200 and content == path.read_bytes()


async def test_a_body_cut_short_stores_nothing(meter: Meter) -> None:
    """A client that stops after part of its declared length: the store connection is cut, no
    partial object is stored, and the row says client_aborted."""
    file_id, location = await announce(meter)
    target = location.split(f":{meter.proxy.port}", 1)[1]
    _, writer = await asyncio.open_connection("127.0.0.1", meter.proxy.port)
    try:
        writer.write(f"PUT {target} HTTP/1.1\r\nHost: p\r\nContent-Length: 100000\r\n\r\n".encode())
        writer.write(b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.2)
    finally:
        writer.close()
    deadline = time.monotonic() + 10
    while not rows_of(await meter.rows(), "files.put") or any(
        r.status == "in_flight" for r in await meter.rows()
    ):
        assert time.monotonic() < deadline, await meter.rows()
        await asyncio.sleep(0.05)
    (put,) = rows_of(await meter.rows(), "files.put")
    assert (put.status, put.cost_pusd) == ("client_aborted", 0)
    status, _, _ = await request("GET", f"{meter.base_url}/files/{file_id}", meter.auth())
    assert status == 404  # together never got the bytes


# -- the OpenAI SDKs' files.create: multipart POST /v1/files -> together's POST /v1/files/upload --


async def direct_file(meter: Meter, file_id: str) -> dict[str, Any]:
    """The simulator's own file object (what together stored), read with the operator key."""
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    status, _, body = await request("GET", f"{meter.sim.url}/files/{file_id}", headers)
    assert status == 200, body
    return dict(json.loads(body))


async def test_openai_files_create_is_owned_and_answered_as_openai(meter: Meter, tmp_path: Path) -> None:
    """openai's files.create(file, purpose="batch") through the proxy: together gets its multipart
    upload (file_name, purpose batch-api, file_type) with the operator key; the SDK gets OpenAI's
    FileObject (purpose batch, status processed); the file is the tenant's before the answer:
    readable byte for byte by it, and another tenant gets the 404 of a missing file, nothing
    forwarded. One row files.upload, cost 0."""
    path = batch_file(tmp_path)
    client = meter.openai()
    created = await client.files.create(file=path, purpose="batch")
    assert (created.object, created.purpose, created.status, created.filename, created.bytes) == (
        "file",
        "batch",
        "processed",
        "input.jsonl",
        path.stat().st_size,
    )
    assert await meter.proxy.ledger.file_owner(created.id) == "acme"
    (sent,) = [s for s in meter.upstream_seen if s["path"].startswith("/v1/files")]
    stored = await direct_file(meter, created.id)
    assert (stored["purpose"], stored["filename"], stored["FileType"]) == (
        "batch-api",
        "input.jsonl",
        "jsonl",
    )
    assert (sent["method"], sent["path"]) == ("POST", "/v1/files/upload")
    assert sent["headers"]["authorization"] == f"Bearer {meter.operator_key}"
    assert sent["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert not any(key in json.dumps(sent["headers"]) for key in meter.keys.values())

    assert (await (await client.files.content(created.id)).aread()) == path.read_bytes()
    assert [f.id for f in (await client.files.list()).data] == [created.id]
    other = meter.openai("globex")
    seen_before = len(meter.upstream_seen)
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(OpenAIStatusError) as err:
            await call(created.id)
        assert err.value.status_code == 404 and error_of(err.value.response.content)["code"] == "not_found"
    assert len(meter.upstream_seen) == seen_before  # nothing forwarded for globex
    assert (await other.files.list()).data == []

    rows = await meter.wait_terminal(2)
    (upload,) = [r for r in rows if r.endpoint.startswith("files.upload")]
    assert (upload.tenant, upload.status, upload.upstream_status, upload.cost_pusd) == ("acme", "ok", 200, 0)
    assert [r.endpoint for r in rows if r.endpoint.startswith("files.")] == ["files.upload", "files.content"]


async def test_openai_files_create_over_the_limit_is_413(start_meter: StartMeter, tmp_path: Path) -> None:
    """An OpenAI upload over limits.max_body_bytes is 413 request_too_large before anything is
    forwarded or recorded; with or without a Content-Length (a chunked body is cut at the limit)."""

    def small(config: Config) -> Config:
        return replace(config, limits=replace(config.limits, max_body_bytes=2048))

    async with start_meter(change=small) as meter:
        with pytest.raises(OpenAIStatusError) as err:
            await meter.openai().files.create(file=batch_file(tmp_path, pad=4000), purpose="batch")
        assert err.value.status_code == 413
        assert error_of(err.value.response.content)["code"] == "request_too_large"

        boundary = "b0undary"
        part = b'Content-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode()
            + f"--{boundary}\r\n".encode()
            + part
            + b"{}" * 4000
            + f"\r\n--{boundary}--\r\n".encode()
        )

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        headers = {**meter.auth(), "Content-Type": f"multipart/form-data; boundary={boundary}"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(meter.base_url + "/files", data=chunks(), headers=headers) as r,
        ):
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        assert not [s for s in meter.upstream_seen if s["path"].startswith("/v1/files")]
        assert await meter.rows() == []


async def test_openai_files_create_refuses_an_incomplete_form(meter: Meter) -> None:
    """A `file` part without a purpose (or an empty one), or with a filename that cannot be
    sent on as it is: 400 invalid_field, nothing forwarded."""
    files = {"file": ("in.jsonl", b"{}\n", "application/jsonl")}

    def run() -> list[httpx.Response]:
        with httpx.Client(base_url=meter.base_url, headers=meter.auth(), timeout=20) as c:
            return [
                c.post("/files", files=files),
                c.post("/files", files={**files, "purpose": (None, "")}),
                c.post("/files", files={"file": ("a\\b.jsonl", b"{}\n")}, data={"purpose": "batch"}),
            ]

    answers = await asyncio.to_thread(run)
    assert [(r.status_code, r.json()["error"]["code"]) for r in answers] == [(400, "invalid_field")] * 3
    assert meter.upstream_seen == []


async def test_batch_from_an_openai_uploaded_file(start_meter: StartMeter, tmp_path: Path) -> None:
    """A batch over a file made with openai's files.create runs through the openai SDK, its lines
    recorded for the tenant at batch rates; another tenant cannot start a batch over that file."""

    def fast(config: Config) -> Config:
        return replace(config, batches=replace(config.batches, poll_interval=POLL))

    async with start_meter(change=fast) as meter:
        created = await meter.openai().files.create(file=batch_file(tmp_path, 3), purpose="batch")
        with pytest.raises(OpenAIStatusError) as err:
            await meter.openai("globex").batches.create(
                input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert err.value.status_code == 400
        assert error_of(err.value.response.content)["code"] == "invalid_input_file"
        batch = await meter.openai().batches.create(
            input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.input_file_id == created.id
        deadline = time.monotonic() + 10
        while len([r for r in await meter.rows() if r.mode == "batch"]) < 3:
            assert time.monotonic() < deadline, "batch lines not recorded in 10 s"
            await asyncio.sleep(POLL)
        lines = [r for r in await meter.rows() if r.mode == "batch"]
        billed = [e for e in meter.sim.billed.entries if e.get("mode") == "batch"]
        assert len(billed) == 3 and all(r.tenant == "acme" and r.status == "ok" for r in lines)
        assert sum(r.cost_pusd or 0 for r in lines) == sum(billed_pusd(e) for e in billed)
