"""proxy/core/shapes.py: the OpenAI list shape for model listings, base64 embeddings."""

from __future__ import annotations

import base64
import struct

import orjson

from proxy.core.shapes import embeddings_as_base64, openai_list, wants_openai_list


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
