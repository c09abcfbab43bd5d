"""The simulator's Files, Batches and fine-tuning API: together.ai's shapes, one bill per batch line."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
from together import AsyncTogether, Together

from proxy.simulator import RunningSimulator, SimulatorOptions, start

CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
AUTH = {"Authorization": "Bearer test-key"}
FORM_CT = "application/x-www-form-urlencoded"
FORM = {**AUTH, "Content-Type": FORM_CT}


def batch_input(n: int, **extra: Any) -> bytes:
    """A JSONL batch input file of `n` chat requests (line i asks for i + 1 tokens)."""
    lines = [
        {
            "custom_id": f"req-{i}",
            "body": {
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": f"Question number {i}?"}],
                "max_tokens": i + 1,
                **extra,
            },
        }
        for i in range(n)
    ]
    return b"\n".join(json.dumps(line).encode() for line in lines) + b"\n"


async def upload(base: str, content: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST {base}/files/upload as multipart (file + purpose=batch-api)."""
    form = aiohttp.FormData()
    form.add_field("purpose", "batch-api")
    form.add_field("file", content, filename="input.jsonl", content_type="application/jsonl")
    async with aiohttp.ClientSession() as s, s.post(f"{base}/files/upload", data=form, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


async def send(method: str, url: str, headers: dict[str, str], body: Any = None) -> tuple[int, Any]:
    """Any method, an optional JSON body; the status and the decoded JSON answer."""
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def create_batch(sim: RunningSimulator, file_id: str, **simulate: Any) -> str:
    status, created = await send(
        "POST",
        f"{sim.url}/batches",
        AUTH,
        {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "simulate": simulate},
    )
    assert status == 200, created
    return str(created["job"]["id"])


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start(options=SimulatorOptions(batch_delay_ms=50))
    yield running
    await running.stop()


@pytest.fixture
async def together(sim: RunningSimulator) -> AsyncIterator[AsyncTogether]:
    async with AsyncTogether(api_key="test-key", base_url=sim.origin, max_retries=0) as client:
        yield client


async def test_upload_answers_a_file_object(sim: RunningSimulator) -> None:
    """An uploaded file gets an id, its size and purpose; GET /v1/files/{id}/content returns it."""
    content = batch_input(2)
    status, info = await upload(sim.url, content, AUTH)
    assert status == 200, info
    assert info["object"] == "file" and info["purpose"] == "batch-api" and info["bytes"] == len(content)
    status, body = await get(f"{sim.url}/files/{info['id']}/content", AUTH)
    assert (status, body) == (200, content)
    status, body = await get(f"{sim.url}/files/{info['id']}", AUTH)
    assert status == 200 and json.loads(body)["id"] == info["id"]


async def test_upload_reads_the_specs_form_and_answers_its_file_object(sim: RunningSimulator) -> None:
    """POST /v1/files/upload takes the spec's file_name and file_type; its answer is the spec's
    FileResponse, `Processed` (required, a bool) included; a purpose outside the spec's
    FilePurpose (OpenAI's `batch`) is refused with 400, as together refuses it."""
    form = aiohttp.FormData()
    for name, value in (("purpose", "batch-api"), ("file_name", "named.csv"), ("file_type", "csv")):
        form.add_field(name, value)
    form.add_field("file", b"a,b\n", filename="part.bin", content_type="application/octet-stream")
    async with aiohttp.ClientSession() as s, s.post(f"{sim.url}/files/upload", data=form, headers=AUTH) as r:
        assert r.status == 200
        info = await r.json()
    required = {"id", "object", "created_at", "filename", "bytes", "purpose", "FileType", "Processed"}
    assert required <= set(info)
    assert (info["filename"], info["FileType"], info["Processed"], info["bytes"]) == (
        "named.csv",
        "csv",
        True,
        4,
    )
    for purpose in ("batch", "assistants"):
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field("file", b"{}\n", filename="in.jsonl")
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{sim.url}/files/upload", data=form, headers=AUTH) as r,
        ):
            assert r.status == 400 and "Invalid purpose" in (await r.json())["error"]["message"]
    form_body = urlencode({"purpose": "batch", "file_name": "in.jsonl", "file_type": "jsonl"}).encode()
    status, _, body = await raw("POST", f"{sim.url}/files", FORM, form_body)
    assert status == 400 and b"Invalid purpose" in body


async def test_batch_runs_to_completion_and_bills_each_line(
    sim: RunningSimulator, together: AsyncTogether
) -> None:
    """The SDK creates and retrieves a batch; it completes after its delay with one output line per
    input line, each carrying usage, and each line billed once in batch mode."""
    _, info = await upload(sim.url, batch_input(3), AUTH)
    created = await together.batches.create(
        input_file_id=info["id"], endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert created.job is not None and created.job.id
    assert created.job.status == "VALIDATING"
    batch_id = created.job.id
    assert (await together.batches.retrieve(batch_id)).status == "IN_PROGRESS"
    assert sim.billed.entries == []  # nothing billed before the batch ran
    await asyncio.sleep(0.08)
    job = await together.batches.retrieve(batch_id)
    assert job.status == "COMPLETED" and job.output_file_id and job.completed_at is not None
    assert job.error_file_id is None
    status, output = await get(f"{sim.url}/files/{job.output_file_id}/content", AUTH)
    assert status == 200
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["custom_id"] for line in lines] == ["req-0", "req-1", "req-2"]
    billed = sim.billed.entries
    assert len(billed) == 3 and {e["mode"] for e in billed} == {"batch"}
    for line, entry in zip(lines, billed, strict=True):
        assert line["response"]["status_code"] == 200
        usage = line["response"]["body"]["usage"]
        assert usage["prompt_tokens"] == entry["prompt_tokens"]
        assert usage["completion_tokens"] == entry["completion_tokens"]
    assert [e["completion_tokens"] for e in billed] == [1, 2, 3]
    await together.batches.retrieve(batch_id)  # looking again bills nothing more
    assert len(sim.billed.entries) == 3
    listed = await together.batches.list()
    assert [b.id for b in listed] == [batch_id]


async def test_error_lines_and_missing_usage(sim: RunningSimulator) -> None:
    """`simulate.status` makes a line an error (not billed); `usage: none` drops its usage."""
    lines = [
        {"custom_id": "ok", "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}},
        {
            "custom_id": "bad",
            "body": {
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "simulate": {"status": 500},
            },
        },
        {
            "custom_id": "quiet",
            "body": {
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "simulate": {"usage": "none"},
            },
        },
    ]
    content = b"\n".join(json.dumps(x).encode() for x in lines)
    _, info = await upload(sim.url, content, AUTH)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{sim.url}/batches",
            json={
                "input_file_id": info["id"],
                "endpoint": "/v1/chat/completions",
                "simulate": {"batch_delay_ms": 0},
            },
            headers=AUTH,
        ) as r,
    ):
        batch_id = (await r.json())["job"]["id"]
    _, body = await get(f"{sim.url}/batches/{batch_id}", AUTH)
    job = json.loads(body)
    assert job["status"] == "COMPLETED"
    _, output = await get(f"{sim.url}/files/{job['output_file_id']}/content", AUTH)
    out = {x["custom_id"]: x["response"] for x in map(json.loads, output.splitlines())}
    assert out["ok"]["status_code"] == 200 and "usage" in out["ok"]["body"]
    assert out["bad"]["status_code"] == 500 and "error" in out["bad"]["body"]
    assert out["quiet"]["status_code"] == 200 and "usage" not in out["quiet"]["body"]
    assert sorted(e["custom_id"] for e in sim.billed.entries) == ["ok", "quiet"]


async def test_batch_endpoints_require_a_key_and_known_ids(sim: RunningSimulator) -> None:
    """No key: 401; an unknown batch or file: 404; an unknown input file: 400."""
    assert (await get(f"{sim.url}/batches/nope", {}))[0] == 401
    assert (await get(f"{sim.url}/batches/nope", AUTH))[0] == 404
    assert (await get(f"{sim.url}/files/nope/content", AUTH))[0] == 404
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{sim.url}/batches", json={"input_file_id": "nope"}, headers=AUTH) as r,
    ):
        assert r.status == 400


async def test_delete_answers_file_delete_response_and_forgets_the_file(
    sim: RunningSimulator, together: AsyncTogether
) -> None:
    """DELETE /v1/files/{id} answers {"id", "deleted": true}; the file is gone from every route after."""
    _, info = await upload(sim.url, batch_input(1), AUTH)
    deleted = await together.files.delete(info["id"])
    assert (deleted.id, deleted.deleted) == (info["id"], True)
    assert (await get(f"{sim.url}/files/{info['id']}", AUTH))[0] == 404
    assert (await get(f"{sim.url}/files/{info['id']}/content", AUTH))[0] == 404
    assert (await send("GET", f"{sim.url}/files", AUTH))[1]["data"] == []
    status, again = await send("DELETE", f"{sim.url}/files/{info['id']}", AUTH)
    assert status == 404 and again["error"]["code"] == "not_found"


async def test_delete_needs_the_key(sim: RunningSimulator) -> None:
    """DELETE without a key is refused (401) and the file stays."""
    _, info = await upload(sim.url, batch_input(1), AUTH)
    assert (await send("DELETE", f"{sim.url}/files/{info['id']}", {}))[0] == 401
    assert (await get(f"{sim.url}/files/{info['id']}", AUTH))[0] == 200


async def test_a_batch_runs_even_if_its_input_file_was_deleted(sim: RunningSimulator) -> None:
    """A batch reads its input at creation: deleting the input file afterwards changes nothing."""
    _, info = await upload(sim.url, batch_input(2), AUTH)
    batch_id = await create_batch(sim, info["id"], batch_delay_ms=0)
    assert (await send("DELETE", f"{sim.url}/files/{info['id']}", AUTH))[0] == 200
    status, job = await send("GET", f"{sim.url}/batches/{batch_id}", AUTH)
    assert (status, job["status"]) == (200, "COMPLETED") and len(sim.billed.entries) == 2


async def test_cancel_answers_the_job_cancelled_and_it_never_runs(
    sim: RunningSimulator, together: AsyncTogether
) -> None:
    """Cancel answers the BatchJob itself as CANCELLED; past its due time it still never runs nor bills."""
    _, info = await upload(sim.url, batch_input(3), AUTH)
    batch_id = await create_batch(sim, info["id"], batch_delay_ms=50)
    job = await together.batches.cancel(batch_id)
    assert (job.id, job.status, job.output_file_id, job.error_file_id) == (batch_id, "CANCELLED", None, None)
    await asyncio.sleep(0.08)
    assert (await together.batches.retrieve(batch_id)).status == "CANCELLED"
    assert [(b.id, b.status) for b in await together.batches.list()] == [(batch_id, "CANCELLED")]
    status, again = await send("POST", f"{sim.url}/batches/{batch_id}/cancel", AUTH)
    assert (status, again["status"], again["completed_at"]) == (200, "CANCELLED", None)
    assert sim.billed.entries == []
    assert [f["id"] for f in (await send("GET", f"{sim.url}/files", AUTH))[1]["data"]] == [info["id"]]


async def test_cancel_refuses_unknown_unauthorised_and_finished_batches(sim: RunningSimulator) -> None:
    """Cancel: 404 for an unknown batch, 401 without a key, 400 once the job has run (its bill unchanged)."""
    assert (await send("POST", f"{sim.url}/batches/nope/cancel", AUTH))[0] == 404
    _, info = await upload(sim.url, batch_input(2), AUTH)
    batch_id = await create_batch(sim, info["id"], batch_delay_ms=0)
    assert (await send("POST", f"{sim.url}/batches/{batch_id}/cancel", {}))[0] == 401
    status, refused = await send("POST", f"{sim.url}/batches/{batch_id}/cancel", AUTH)
    assert status == 400 and refused["error"]["code"] == "invalid_batch_state"
    status, job = await send("GET", f"{sim.url}/batches/{batch_id}", AUTH)
    assert job["status"] == "COMPLETED" and len(sim.billed.entries) == 2


async def test_fine_tune_jobs_are_created_listed_and_retrieved(
    sim: RunningSimulator, together: AsyncTogether
) -> None:
    """POST /v1/fine-tunes makes a pending ft-... job; the SDK lists it ({"data": [...]}) and retrieves it."""
    _, info = await upload(sim.url, batch_input(1), AUTH)
    status, job = await send(
        "POST", f"{sim.url}/fine-tunes", AUTH, {"model": CHAT_MODEL, "training_file": info["id"]}
    )
    assert status == 200 and job["id"].startswith("ft-")
    assert (job["status"], job["model"], job["training_file"]) == ("pending", CHAT_MODEL, info["id"])
    assert job["created_at"] and job["updated_at"]
    listed = await together.fine_tuning.list()
    assert [(j.id, j.status) for j in listed.data] == [(job["id"], "pending")]
    got = await together.fine_tuning.retrieve(job["id"])
    assert (got.id, got.model, got.training_file) == (job["id"], CHAT_MODEL, info["id"])
    assert (await send("GET", f"{sim.url}/fine-tunes/ft-nope", AUTH))[0] == 404


async def test_fine_tune_create_checks_its_body_and_key(sim: RunningSimulator) -> None:
    """A fine-tune needs a key (401), a model and an uploaded training file (400); else nothing is made."""
    _, info = await upload(sim.url, batch_input(1), AUTH)
    url = f"{sim.url}/fine-tunes"
    assert (await send("POST", url, {}, {"model": CHAT_MODEL, "training_file": info["id"]}))[0] == 401
    assert (await send("GET", url, {}))[0] == 401
    assert (await send("POST", url, AUTH, {"training_file": info["id"]}))[0] == 400
    status, refused = await send("POST", url, AUTH, {"model": CHAT_MODEL, "training_file": "file-nope"})
    assert status == 400 and refused["error"]["code"] == "invalid_training_file"
    assert (await send("GET", url, AUTH))[1] == {"data": []}


# -- the SDKs' presigned upload (POST /v1/files -> 302 -> PUT to the store -> preprocess) ------


async def raw(
    method: str, url: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, headers=headers, data=data, allow_redirects=False) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def announce(sim: RunningSimulator, **extra: str) -> tuple[str, str]:
    form = {"purpose": "batch-api", "file_name": "in.jsonl", "file_type": "jsonl", **extra}
    status, headers, body = await raw("POST", f"{sim.url}/files", FORM, urlencode(form).encode())
    assert status == 302, body
    return headers["x-together-file-id"], headers["location"]


async def test_presigned_upload_flow(sim: RunningSimulator) -> None:
    """302 naming the file and a presigned-looking store URL on the simulator's origin; the PUT
    (no key) stores the bytes: listed as PENDING, preprocess makes it COMPLETED; a batch runs on it."""
    file_id, location = await announce(sim)
    url = urlsplit(location)
    assert f"{url.scheme}://{url.netloc}" == sim.origin and url.path == f"/_sim/store/{file_id}"
    assert set(parse_qs(url.query)) == {"X-Sim-Expires", "X-Sim-Signature"}
    status, _ = await get(f"{sim.url}/files/{file_id}", AUTH)
    assert status == 404  # nothing uploaded yet
    status, _, body = await raw("POST", f"{sim.url}/files/{file_id}/preprocess", AUTH)
    assert status == 400 and b"file_not_uploaded" in body
    content = batch_input(2)
    status, headers, _ = await raw("PUT", location, data=content)
    assert status == 200 and headers["etag"].startswith('"')
    status, body = await get(f"{sim.url}/files/{file_id}", AUTH)
    pending = json.loads(body)
    assert status == 200 and (pending["processing_status"], pending["Processed"]) == ("PENDING", False)
    status, _, body = await raw("POST", f"{sim.url}/files/{file_id}/preprocess", AUTH)
    info = json.loads(body)
    assert status == 200 and (info["id"], info["bytes"], info["processing_status"], info["Processed"]) == (
        file_id,
        len(content),
        "COMPLETED",
        True,
    )
    assert info["filename"] == "in.jsonl" and info["FileType"] == "jsonl"
    await create_batch(sim, file_id)


async def test_the_store_refuses_like_s3(sim: RunningSimulator) -> None:
    """A wrong signature, another object's signature, an API key alongside the signature, no
    Content-Length: S3's XML errors, nothing stored. A store fault answers once."""
    file_id, location = await announce(sim)
    other_id, other = await announce(sim)
    wrong = location.replace("X-Sim-Signature=", "X-Sim-Signature=0")
    swapped = other.replace(other_id, file_id)
    for url, headers, code in (
        (wrong, {}, b"SignatureDoesNotMatch"),
        (swapped, {}, b"SignatureDoesNotMatch"),
        (location, AUTH, b"InvalidArgument"),
    ):
        status, got, body = await raw("PUT", url, headers, b"{}\n")
        assert status in (400, 403) and code in body and got["content-type"].startswith("application/xml")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}\n"

    async with aiohttp.ClientSession() as s, s.put(location, data=chunks()) as r:
        assert r.status == 411 and b"MissingContentLength" in await r.read()
    assert (await get(f"{sim.url}/files/{file_id}", AUTH))[0] == 404
    status, _ = await send("POST", f"{sim.origin}/_sim/store_fault", {}, {"status": 503})
    assert status == 200
    status, _, body = await raw("PUT", location, data=b"{}\n")
    assert status == 503 and b"InternalError" in body
    status, _, _ = await raw("PUT", location, data=b"{}\n")
    assert status == 200


async def test_expired_store_url() -> None:
    """A presigned URL past its expiry: 403 AccessDenied 'Request has expired'."""
    sim = await start(options=SimulatorOptions(upload_url_ttl_s=0))
    try:
        _, location = await announce(sim)
        status, _, body = await raw("PUT", location, data=b"{}\n")
        assert status == 403 and b"Request has expired" in body
    finally:
        await sim.stop()


async def test_checksum_of_a_stored_file_is_409(sim: RunningSimulator) -> None:
    """together deduplicates by checksum: a known one answers 409 naming the stored file."""
    content = batch_input(1)
    status, info = await upload(sim.url, content, AUTH)
    assert status == 200
    checksum = hashlib.sha256(content).hexdigest()
    form = urlencode({"purpose": "batch-api", "file_name": "x.jsonl", "checksum": checksum}).encode()
    status, _, body = await raw("POST", f"{sim.url}/files", FORM, form)
    assert status == 409 and json.loads(body)["file_id"] == info["id"]
    status, _, _ = await raw("POST", f"{sim.url}/files", {"Content-Type": FORM_CT}, form)
    assert status == 401


async def test_the_real_sdk_uploads_to_the_simulator(sim: RunningSimulator, tmp_path: Path) -> None:
    """together 3.1.1's files.upload against the simulator directly (its validation of the
    Location and the file id included)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(batch_input(2))

    def run() -> Any:
        with Together(api_key="test-key", base_url=sim.origin, max_retries=0, timeout=20) as client:
            return client.files.upload(path, purpose="batch-api")

    info = await asyncio.to_thread(run)
    assert info.bytes == path.stat().st_size and info.processing_status == "COMPLETED"
