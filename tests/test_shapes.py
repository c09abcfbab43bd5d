"""proxy/core/shapes.py: OpenAI shapes of model, file and batch lists, batch creation, base64 embeddings."""

from __future__ import annotations

import base64
import struct

import orjson

from proxy.core.shapes import (
    embeddings_as_base64,
    openai_batch,
    openai_file,
    openai_list,
    openai_page,
    wants_openai_list,
)


def test_openai_clients_are_told_apart_from_together_ones() -> None:
    """OpenAI SDK user agents get the list object; together SDKs and others the bare array;
    X-Meter-Models-Shape overrides the guess either way."""
    assert wants_openai_list({"User-Agent": "AsyncOpenAI/Python 3.63.0"})
    assert wants_openai_list({"User-Agent": "OpenAI/JS 5.1.0"})
    assert not wants_openai_list({"User-Agent": "AsyncTogether/Python 3.1.1"})
    assert not wants_openai_list({"User-Agent": "curl/8.0"})
    assert wants_openai_list({"User-Agent": "curl/8.0", "X-Meter-Models-Shape": "openai"})
    assert not wants_openai_list({"User-Agent": "OpenAI/Python 1.0", "X-Meter-Models-Shape": "together"})


def test_a_bare_array_is_wrapped_and_nothing_else_changes() -> None:
    """[...] becomes {"object": "list", "data": [...]}; an object or non-JSON stays as it is."""
    models = [{"id": "m", "object": "model", "type": "chat"}]
    assert orjson.loads(openai_list(orjson.dumps(models))) == {"object": "list", "data": models}
    wrapped = b'{"object":"list","data":[]}'
    assert openai_list(wrapped) is wrapped
    assert openai_list(b"[oops") == b"[oops"


def test_float_embeddings_become_little_endian_float32_base64() -> None:
    """Each float vector is packed as float32 LE and base64-encoded, as OpenAI answers base64."""
    body = {"object": "list", "data": [{"index": 0, "embedding": [0.5, -1.25, 3]}], "model": "e"}
    out = orjson.loads(embeddings_as_base64(orjson.dumps(body)))
    packed = base64.b64decode(out["data"][0]["embedding"])
    assert struct.unpack("<3f", packed) == (0.5, -1.25, 3.0)
    assert out["model"] == "e" and out["data"][0]["index"] == 0


def test_base64_answers_and_non_embeddings_are_left_alone() -> None:
    """An answer already in base64, or without a data list, is returned unchanged."""
    done = b'{"data":[{"embedding":"AAAAPw=="}]}'
    assert embeddings_as_base64(done) is done
    assert embeddings_as_base64(b'{"error":{}}') == b'{"error":{}}'
    assert embeddings_as_base64(b"nope") == b"nope"


def test_lists_become_whole_cursor_pages() -> None:
    """A bare array or a {object, data} list becomes {object: list, data, has_more: false} (so an
    OpenAI SDK's auto-paging stops); anything else is left alone."""
    jobs = [{"id": "b-1", "status": "IN_PROGRESS"}]
    page = {"object": "list", "data": jobs, "has_more": False}
    assert orjson.loads(openai_page(orjson.dumps(jobs))) == page
    assert orjson.loads(openai_page(orjson.dumps({"object": "list", "data": jobs}))) == page
    for other in (b'{"error": {"message": "x"}}', b"[oops", b'"text"'):
        assert openai_page(other) == other


def test_batch_creation_answers_the_job_itself() -> None:
    """{"job": {...}, "warning": null} becomes the job; a warning stays as its field; a job
    already bare (or anything else) is unchanged."""
    job = {"id": "b-1", "status": "VALIDATING", "input_file_id": "file-1"}
    assert orjson.loads(openai_batch(orjson.dumps({"job": job, "warning": None}))) == job
    warned = orjson.loads(openai_batch(orjson.dumps({"job": job, "warning": "slow"})))
    assert warned == {**job, "warning": "slow"}
    for other in (orjson.dumps(job), b"[]", b"not json"):
        assert openai_batch(other) == other


def test_a_file_object_carries_the_clients_purpose_and_a_status() -> None:
    """together's file object keeps its fields, gets the purpose the OpenAI client sent (together
    stores `batch` as `batch-api`) and OpenAI's `status` (uploaded while not Processed); an
    error answer or anything without an id is unchanged."""
    info = {"id": "file-1", "object": "file", "bytes": 3, "purpose": "batch-api", "Processed": True}
    assert orjson.loads(openai_file(orjson.dumps(info), "batch")) == {
        **info,
        "purpose": "batch",
        "status": "processed",
    }
    pending = orjson.loads(openai_file(orjson.dumps({**info, "Processed": False}), "batch"))
    assert pending["status"] == "uploaded"
    assert (
        orjson.loads(openai_file(orjson.dumps({**info, "status": "error"}), "fine-tune"))["status"] == "error"
    )
    for other in (b'{"error": {"message": "x"}}', b"[]", b"not json"):
        assert openai_file(other, "batch") == other
