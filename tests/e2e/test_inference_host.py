"""`upstream.inference_url`: inference to one together host, everything else to the API host.

Two simulators stand for api.together.ai (`upstream.url`) and api-inference.together.ai
(`upstream.inference_url`). The tenant uses one base URL and cannot tell: the answers, headers
and ledger rows are what one host would give; the operator key reaches both hosts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import orjson
import pytest
from together import AsyncTogether

from proxy.config import Config
from proxy.simulator import MEDIA_MODELS, TOKEN_MODELS, RunningSimulator, billed_pusd

from .support import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    LANGUAGE_MODEL,
    MESSAGES,
    Meter,
    StartMeter,
    post_raw,
    start_simulator,
)
from .test_batches import upload


@pytest.fixture
async def inference_sim() -> AsyncIterator[tuple[RunningSimulator, list[dict[str, Any]]]]:
    sim, seen = await start_simulator()
    try:
        yield sim, seen
    finally:
        await sim.stop()


def inference_at(url: str) -> Callable[[Config], Config]:
    def change(config: Config) -> Config:
        return replace(config, upstream=replace(config.upstream, inference_url=url))

    return change


@pytest.fixture
async def split(
    start_meter: StartMeter, inference_sim: tuple[RunningSimulator, list[dict[str, Any]]]
) -> AsyncIterator[tuple[Meter, RunningSimulator, list[dict[str, Any]]]]:
    sim, seen = inference_sim
    async with start_meter(change=inference_at(sim.url)) as m:
        yield m, sim, seen


def _paths(seen: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["method"], s["path"]) for s in seen]


async def test_each_route_goes_to_its_host(
    split: tuple[Meter, RunningSimulator, list[dict[str, Any]]],
) -> None:
    """chat (plain, stream), completions, embeddings reach the inference host; models, files and
    batches the API host; every call carries the operator key; rows match the inference bill."""
    meter, inference, inference_seen = split
    client = meter.openai()
    chat = await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=3)
    stream = await client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=4, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.completions.create(model=LANGUAGE_MODEL, prompt="Once", max_tokens=2)
    await client.embeddings.create(model=EMBEDDING_MODEL, input=["a bill"])
    assert chat.choices[0].message.content == "Hello from the"
    assert streamed == "Hello from the simulated"
    models = await client.models.list()
    assert len(models.data) == len(TOKEN_MODELS) + len(MEDIA_MODELS)
    info = await upload(meter, b'{"custom_id": "1", "body": {"model": "m", "messages": []}}\n')
    async with AsyncTogether(
        api_key=meter.keys["acme"], base_url=meter.origin, project_id="p", max_retries=0, timeout=20
    ) as together:
        job = await together.batches.create(
            input_file_id=info["id"],
            endpoint="/v1/chat/completions",
            extra_body={"simulate": {"batch_delay_ms": 600_000}},  # it must not run (and bill) here
        )
        assert job.job is not None
        await together.batches.retrieve(job.job.id)
        assert len([m async for m in await together.models.list()]) == len(TOKEN_MODELS)
    assert _paths(inference_seen) == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
    ]
    # the batch tracker may look at the batch too (GET /v1/batches/{id}): on the API host as well
    assert set(_paths(meter.upstream_seen)) == {
        ("GET", "/v1/models"),
        ("POST", "/v1/files/upload"),
        ("POST", "/v1/batches"),
        ("GET", f"/v1/batches/{job.job.id}"),
        ("GET", "/v2/projects/p/models"),
    }
    for seen in (*inference_seen, *meter.upstream_seen):
        assert seen["headers"]["authorization"] == f"Bearer {meter.operator_key}"
    assert meter.sim.billed.entries == [] and len(inference.billed.entries) == 4
    rows = await meter.rows()
    metered = [r for r in rows if r.endpoint in ("chat", "completions", "embeddings")]
    assert [(r.endpoint, r.stream, r.status) for r in metered] == [
        ("chat", False, "ok"),
        ("chat", True, "ok"),
        ("completions", False, "ok"),
        ("embeddings", False, "ok"),
    ]
    for row, entry in zip(metered, inference.billed.entries, strict=True):
        assert (row.prompt_tokens, row.completion_tokens) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        )
        assert row.cost_pusd == billed_pusd(entry)
    assert sorted(r.endpoint for r in rows if r not in metered) == [
        "batches.create",
        "batches.retrieve",
        "files.upload",
    ]


async def test_tenant_cannot_tell_the_hosts_apart(
    split: tuple[Meter, RunningSimulator, list[dict[str, Any]]], start_meter: StartMeter
) -> None:
    """The same call through a one-host proxy and a two-host proxy: same status, same body
    (but for the id and time), same response header names."""
    meter, _, _ = split
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 3}
    status, headers, split_body = await post_raw(meter.base_url + "/chat/completions", body, meter.auth())
    async with start_meter() as single:
        s_status, s_headers, single_body = await post_raw(
            single.base_url + "/chat/completions", body, single.auth()
        )
    assert (status, s_status) == (200, 200)
    a, b = orjson.loads(split_body), orjson.loads(single_body)
    assert list(a) == list(b) and {**a, "id": 0, "created": 0} == {**b, "id": 0, "created": 0}
    assert sorted(k.lower() for k in headers if k.lower() != "date") == sorted(
        k.lower() for k in s_headers if k.lower() != "date"
    )


async def test_serve_upstream_flag_sends_everything_to_one_host(
    start_meter: StartMeter, inference_sim: tuple[RunningSimulator, list[dict[str, Any]]]
) -> None:
    """`serve --upstream URL` (with_overrides) drops a configured inference host: all to URL."""
    from proxy.server.app import with_overrides

    sim, seen = inference_sim

    def configured_then_overridden(config: Config) -> Config:
        config = inference_at(sim.url)(config)
        return with_overrides(config, upstream=config.upstream.url)

    async with start_meter(change=configured_then_overridden) as m:
        r = await m.openai().chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2)
        assert r.choices[0].message.content == "Hello from"
        assert m.proxy.config.upstream.inference_url is None
        assert _paths(m.upstream_seen) == [("POST", "/v1/chat/completions")]
    assert seen == []
