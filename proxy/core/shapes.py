"""Answer shapes the OpenAI SDKs expect where together.ai's differ (opt-in per client).

- `GET /v1/models`: together answers a bare JSON array; the OpenAI SDKs need
  `{"object": "list", "data": [...]}` (their `models.list()` raises on the array).
- Embeddings: the Node `openai` SDK asks for `encoding_format: "base64"` by default and decodes
  what comes back as base64; together answers floats, which that SDK would turn into a wrong vector.
- Batches: together answers `POST /v1/batches` with `{"job": {...}, "warning": ...}` and
  `GET /v1/batches` with a bare array; the OpenAI SDKs read the batch itself and a cursor page
  (`{"object": "list", "data": [...], "has_more": false}`: without `has_more` their auto-paging
  asks for the next page after the last id, again and again). File lists get the same page.
- Files: an OpenAI `files.create` (multipart `POST /v1/files`) is answered with together's file
  object, whose purpose is together's (`batch-api` for OpenAI's `batch`) and which has no
  `status`; OpenAI's FileObject carries the purpose the client sent and a `status`.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping

import orjson

SHAPE_HEADER = "X-Meter-Models-Shape"  # openai | together: overrides the User-Agent guess


def wants_openai_list(headers: Mapping[str, str]) -> bool:
    """An OpenAI SDK (its User-Agent says `OpenAI/...` or `AsyncOpenAI/...`), or asked for."""
    shape = headers.get(SHAPE_HEADER)
    if shape is not None:
        return shape.strip().lower() == "openai"
    agent = headers.get("User-Agent", "")
    return agent.startswith(("OpenAI/", "AsyncOpenAI/"))


def openai_list(data: bytes) -> bytes:
    """A bare JSON array as `{"object": "list", "data": [...]}`; anything else unchanged."""
    if not data.lstrip().startswith(b"["):
        return data
    try:
        items = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    return orjson.dumps({"object": "list", "data": items})


def embeddings_as_base64(data: bytes) -> bytes:
    """Float embeddings re-encoded as base64 of little-endian float32 (what OpenAI sends for
    `encoding_format: "base64"`); an answer already in base64, or not JSON, unchanged."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    items = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return data
    changed = False
    for item in items:
        vector = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vector, list) and all(isinstance(x, int | float) for x in vector):
            packed = struct.pack(f"<{len(vector)}f", *vector)
            item["embedding"] = base64.b64encode(packed).decode("ascii")
            changed = True
    return orjson.dumps(obj) if changed else data


def openai_page(data: bytes) -> bytes:
    """A list answer (a bare array or `{"object": "list", "data": [...]}`) as OpenAI's cursor page
    with `has_more: false`: the proxy's file and batch lists are whole (cut to the caller's own
    objects, cursors dropped). Anything else unchanged."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    items = obj if isinstance(obj, list) else obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return data
    return orjson.dumps({"object": "list", "data": items, "has_more": False})


def openai_batch(data: bytes) -> bytes:
    """together's batch creation answer `{"job": {...}, "warning": w}` as the job itself, as
    OpenAI's `batches.create` returns it (a warning, if any, kept as its `warning` field)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    job = obj.get("job") if isinstance(obj, dict) else None
    if not isinstance(job, dict):
        return data
    warning = obj.get("warning")
    return orjson.dumps({**job, "warning": warning} if warning is not None else job)


def openai_file(data: bytes, purpose: str) -> bytes:
    """together's file object as OpenAI's FileObject: `purpose` as the client sent it (together
    stores OpenAI's `batch` as `batch-api`) and `status` "processed" ("uploaded" while together
    says `Processed: false`); together's own fields kept. Anything else unchanged."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        return data
    obj["purpose"] = purpose
    obj.setdefault("status", "uploaded" if obj.get("Processed") is False else "processed")
    return orjson.dumps(obj)
