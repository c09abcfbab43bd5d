"""The runner every Python SDK driver shares (standard library only: it runs in each SDK's venv).

A driver is `python <driver>.py SPEC.json`. The spec names the base URL (None: the SDK reads its
environment), the key, a label and the lines to run, plus the models and files they use. Each
line runs once, in order, with its own client whose default headers say `X-Meter-Feature: <line>`
and `X-Meter-Environment: <label>`, so the proxy's ledger rows name the line that made them.
One JSON object per line goes to stdout: {"line", "ok", "fields"} or {"line", "ok": false,
"error": {"type", "status", "message"}}, then {"line": "_done", ...}.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

LINES = (
    "chat",
    "chat_stream",
    "completions",
    "embeddings",
    "rerank",
    "images",
    "audio_speech",
    "audio_transcription",
    "files_upload",
    "batches_create",
    "batches_retrieve",
    "batches_list",
    "batches_cancel",
    "models_list",
    "videos",
)
TIMEOUT_S = 20.0  # each SDK call (the SDKs' own timeout), with no retry


class NotApplicable(Exception):
    """The SDK has no such call."""


class Context:
    """What a line needs: the spec, headers naming the line, and state shared by the lines."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.base_url: str | None = spec["base_url"]
        self.api_key: str = spec["api_key"]
        self.label: str = spec["label"]
        self.data: dict[str, Any] = spec["data"]
        self.state: dict[str, Any] = {}
        self.line = ""

    def headers(self) -> dict[str, str]:
        return {"X-Meter-Feature": self.line, "X-Meter-Environment": self.label}

    def marker(self) -> str:
        """Text that ties a request body to its driver run and line."""
        return f"matrix {self.label} {self.line}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.marker()}: how much did this cost?"}]

    def base_kwargs(self, name: str = "base_url") -> dict[str, Any]:
        return {} if self.base_url is None else {name: self.base_url}

    @property
    def batch_id(self) -> str:
        batch_id = self.state.get("batch_id")
        if not batch_id:
            raise RuntimeError("no batch: batches_create did not succeed")
        return str(batch_id)


def describe(exc: BaseException) -> dict[str, Any]:
    status = None
    for name in ("status_code", "http_status", "status"):
        value = getattr(exc, name, None)
        if isinstance(value, int):
            status = value
            break
    message = str(exc) or repr(exc)
    if not isinstance(exc, NotApplicable) and status is None:
        message += " | " + "".join(traceback.format_exception(exc)[-3:])
    return {"type": type(exc).__name__, "status": status, "message": message[:1500]}


def run(sdk: str, version: str, lines: dict[str, Callable[[Context], dict[str, Any]]]) -> int:
    """Run the spec's lines (argv[1]) with these implementations; print one JSON line each."""
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    ctx = Context(spec)
    for line in spec["lines"]:
        ctx.line = line
        started = time.monotonic()
        out: dict[str, Any] = {"line": line}
        try:
            impl = lines.get(line)
            if impl is None:
                raise NotApplicable(f"{sdk} has no call for {line}")
            out.update(ok=True, fields=impl(ctx))
        except Exception as exc:
            out.update(ok=False, error=describe(exc))
        out["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(out, default=str), flush=True)
    print(json.dumps({"line": "_done", "sdk": sdk, "version": version}), flush=True)
    return 0


def jsonable(value: Any) -> Any:
    """An SDK object (pydantic, enum, list of them) as plain JSON values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return getattr(value, "value", value)
