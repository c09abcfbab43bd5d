"""The simulator's Files and Batches API: together.ai's shapes, one billed line per input line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from together import AsyncTogether

from proxy.simulator import RunningSimulator, SimulatorOptions, start

CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
AUTH = {"Authorization": "Bearer test-key"}


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
