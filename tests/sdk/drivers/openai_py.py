"""openai-python (`OpenAI(base_url="http://proxy/v1")`), the calls together serves the OpenAI way."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Any

import openai
from common import LINES, TIMEOUT_S, Context, run


def client(ctx: Context) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=ctx.api_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        default_headers=ctx.headers(),
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
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
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


def images(ctx: Context) -> dict[str, Any]:
    r = client(ctx).images.generate(model=ctx.data["image_model"], prompt=ctx.marker(), n=1, size="512x512")
    data = r.data or []
    return {"count": len(data), "has_image": bool(data and (data[0].url or data[0].b64_json))}


def audio_speech(ctx: Context) -> dict[str, Any]:
    r = client(ctx).audio.speech.create(
        model=ctx.data["speech_model"], input=ctx.marker(), voice=ctx.data["voice"], response_format="wav"
    )
    return {"bytes": len(r.read())}


def audio_transcription(ctx: Context) -> dict[str, Any]:
    with open(ctx.data["audio_path"], "rb") as f:
        r = client(ctx).audio.transcriptions.create(file=f, model=ctx.data["transcription_model"])
    return {"text": r.text}


def files_upload(ctx: Context) -> dict[str, Any]:
    r = client(ctx).files.create(file=Path(ctx.data["upload_path"]), purpose="batch")
    return {"id": r.id, "purpose": r.purpose, "bytes": r.bytes}


def batches_create(ctx: Context) -> dict[str, Any]:
    r = client(ctx).batches.create(
        input_file_id=ctx.data["batch_file_id"], endpoint="/v1/chat/completions", completion_window="24h"
    )
    ctx.state["batch_id"] = r.id
    return {"id": r.id, "status": r.status, "input_file_id": r.input_file_id}


def batches_retrieve(ctx: Context) -> dict[str, Any]:
    r = client(ctx).batches.retrieve(ctx.batch_id)
    return {"id": r.id, "status": r.status}


def batches_list(ctx: Context) -> dict[str, Any]:
    return {"ids": [b.id for b in client(ctx).batches.list()]}


def batches_cancel(ctx: Context) -> dict[str, Any]:
    r = client(ctx).batches.cancel(ctx.batch_id)
    return {"id": r.id, "status": r.status}


def models_list(ctx: Context) -> dict[str, Any]:
    ids = [m.id for m in client(ctx).models.list()]
    return {"count": len(ids), "has_chat_model": ctx.data["chat_model"] in ids}


if __name__ == "__main__":
    # no rerank and no videos: the openai SDK has no call for together's
    sys.exit(
        run(
            "openai", importlib.metadata.version("openai"), {n: globals()[n] for n in LINES if n in globals()}
        )
    )
