"""together SDK 1.x (`Together(base_url="http://proxy/v1")`: its paths are relative to /v1)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import together
from common import LINES, TIMEOUT_S, Context, jsonable, run


def client(ctx: Context) -> Any:
    return together.Together(
        api_key=ctx.api_key,
        timeout=TIMEOUT_S,
        max_retries=0,
        supplied_headers=ctx.headers(),
        **ctx.base_kwargs(),
    )


def _usage(usage: Any) -> list[int] | None:
    return None if usage is None else [usage.prompt_tokens, usage.completion_tokens]


def chat(ctx: Context) -> dict[str, Any]:
    r = client(ctx).chat.completions.create(
        model=ctx.data["chat_model"], messages=ctx.messages(), max_tokens=5
    )
    return {"id": r.id, "content": r.choices[0].message.content, "usage": _usage(r.usage)}


def chat_stream(ctx: Context) -> dict[str, Any]:
    stream = client(ctx).chat.completions.create(
        model=ctx.data["chat_model"], messages=ctx.messages(), max_tokens=6, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta)
    usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)
    return {"content": text, "chunks": len(chunks), "usage": _usage(usage)}


def completions(ctx: Context) -> dict[str, Any]:
    r = client(ctx).completions.create(model=ctx.data["language_model"], prompt=ctx.marker(), max_tokens=4)
    return {"id": r.id, "text": r.choices[0].text, "usage": _usage(r.usage)}


def embeddings(ctx: Context) -> dict[str, Any]:
    r = client(ctx).embeddings.create(
        model=ctx.data["embedding_model"], input=[ctx.marker(), "a second input"]
    )
    return {"count": len(r.data), "dims": len(r.data[0].embedding)}


def rerank(ctx: Context) -> dict[str, Any]:
    r = client(ctx).rerank.create(
        model=ctx.data["rerank_model"], query=ctx.marker(), documents=ctx.data["documents"], top_n=2
    )
    return {"results": [[x.index, x.relevance_score] for x in r.results or []], "usage": _usage(r.usage)}


def images(ctx: Context) -> dict[str, Any]:
    r = client(ctx).images.generate(
        model=ctx.data["image_model"], prompt=ctx.marker(), width=512, height=512, steps=4, n=1
    )
    data = r.data or []
    return {"count": len(data), "has_image": bool(data and (data[0].url or data[0].b64_json))}


def audio_speech(ctx: Context) -> dict[str, Any]:
    r = client(ctx).audio.speech.create(
        model=ctx.data["speech_model"], input=ctx.marker(), voice=ctx.data["voice"], response_format="wav"
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "speech.wav")
        r.stream_to_file(path)
        return {"bytes": os.path.getsize(path)}


def audio_transcription(ctx: Context) -> dict[str, Any]:
    r = client(ctx).audio.transcriptions.create(
        file=Path(ctx.data["audio_path"]), model=ctx.data["transcription_model"]
    )
    return {"text": r.text}


def files_upload(ctx: Context) -> dict[str, Any]:
    r = client(ctx).files.upload(file=Path(ctx.data["upload_path"]), purpose="batch-api", check=False)
    return {"id": r.id, "purpose": jsonable(r.purpose), "bytes": r.bytes}


def batches_create(ctx: Context) -> dict[str, Any]:
    job = client(ctx).batches.create_batch(ctx.data["batch_file_id"], endpoint="/v1/chat/completions")
    ctx.state["batch_id"] = job.id
    return {"id": job.id, "status": jsonable(job.status), "input_file_id": job.input_file_id}


def batches_retrieve(ctx: Context) -> dict[str, Any]:
    job = client(ctx).batches.get_batch(ctx.batch_id)
    return {"id": job.id, "status": jsonable(job.status)}


def batches_list(ctx: Context) -> dict[str, Any]:
    return {"ids": [job.id for job in client(ctx).batches.list_batches()]}


def batches_cancel(ctx: Context) -> dict[str, Any]:
    job = client(ctx).batches.cancel_batch(ctx.batch_id)
    return {"id": job.id, "status": jsonable(job.status)}


def models_list(ctx: Context) -> dict[str, Any]:
    ids = [m.id for m in client(ctx).models.list()]
    return {"count": len(ids), "has_chat_model": ctx.data["chat_model"] in ids}


def videos(ctx: Context) -> dict[str, Any]:
    r = client(ctx).videos.create(model=ctx.data["video_model"], prompt=ctx.marker())
    return {"id": r.id, "status": None}


if __name__ == "__main__":
    sys.exit(run("together", importlib.metadata.version("together"), {n: globals()[n] for n in LINES}))
