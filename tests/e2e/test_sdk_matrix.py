"""Every SDK line through the real proxy, each in its documented base-URL form (issue 17 point 3).

together SDK 1.x, 2.x (own venvs) and 3.x, the `together-ai` npm SDK, openai-python and the
`openai` npm SDK run their real calls (tests/sdk/drivers, tests/sdk/node) against one
`together-meter serve` process in front of one simulator. Each (SDK form, line) is a test: the
SDK's answer is what the simulator sent, and the ledger holds exactly the rows that call should
make (one per metered call, at the simulator's bill; one per object call at cost 0; none for the
lists), told apart by `X-Meter-Environment: <form>` and `X-Meter-Feature: <line>`.

Lines the proxy does not serve yet (work in flight on other branches) are here as strict xfails:
they fail today for the stated reason, and the matrix says so (XPASS fails) when they start to work.
A line an SDK itself cannot run (SDK_DEFECTS) is a strict xfail too, but only for its exact
error: failing any other way fails the test.
Environments: tests/sdk/envs.py (first run makes them, within its time bounds; later runs reuse them).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.simulator import MEDIA_MODELS, TOKEN_MODELS, SimulatorOptions, billed_pusd
from tests.sdk.envs import NODE_MIN_MAJOR, EnvError, ensure_all
from tests.sdk.matrix import (
    TOKEN_LINES,
    VARIANTS,
    DriverRun,
    SimulatorThread,
    Variant,
    run_driver,
    serving,
    write_wav,
)

from .procs import free_port, ledger_rows, write_config
from .support import CHAT_MODEL, EMBEDDING_MODEL, LANGUAGE_MODEL

DATA = {
    "chat_model": CHAT_MODEL,
    "language_model": LANGUAGE_MODEL,
    "embedding_model": EMBEDDING_MODEL,
    "rerank_model": "Salesforce/Llama-Rank-V1",
    "image_model": "black-forest-labs/FLUX.1-schnell",
    "speech_model": "cartesia/sonic",
    "voice": "laidback woman",
    "transcription_model": "openai/whisper-large-v3",
    "video_model": "google/veo-3.0",
    "documents": ["a meter counts", "a bill sums", "a budget limits"],
}
WORDS = ["Hello", "from", "the", "simulated", "together", "upstream"]  # what the simulator answers
BATCH_INPUT = (
    b'{"custom_id": "q-1", "body": {"model": "' + CHAT_MODEL.encode() + b'", '
    b'"messages": [{"role": "user", "content": "Summarise the meter."}], "max_tokens": 5}}\n'
)
# ledger endpoint of each metered line; its rows are priced and match a simulator bill entry
METERED = {
    "chat": "chat",
    "chat_stream": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
    "rerank": "rerank",
    "images": "images",
    "audio_speech": "audio.speech",
    "audio_transcription": "audio.transcriptions",
}
OBJECT_ROWS = {
    "batches_create": "batches.create",
    "batches_retrieve": "batches.retrieve",
    "batches_cancel": "batches.cancel",
}
NO_ROWS = ("batches_list", "models_list")  # list reads: no ledger row (docs/security.md)
_UNITS = "units and sim-media work, other branches"
IN_FLIGHT_ELSEWHERE: dict[str, str] = {}  # line -> why the proxy does not serve it yet
SERVED_FOR: dict[str, frozenset[str]] = {}  # where an IN_FLIGHT_ELSEWHERE line already works


class KnownSDKDefect(Exception):
    """A line failed with exactly the error its SDK_DEFECTS entry names."""


# (form, line) -> (why the SDK cannot run it, the error it fails with). The npm SDK's
# files.upload (together-ai 0.52.0, lib/upload.js) PUTs a fs.ReadStream with the global fetch
# and no `duplex: 'half'`, which Node's fetch (undici) refuses before sending anything, on Node
# 20, 22 and 24 alike: its POST /v1/files goes through the proxy (the 302 is served), the PUT
# never leaves the SDK. The line `files_upload_duplex` runs the same call with the README's
# work-around (a fetch that adds the duplex) and passes.
SDK_DEFECTS = {
    ("together-ai", "files_upload"): (
        "together-ai 0.52.0's files.upload PUTs a stream body with fetch and no duplex: 'half', "
        "which Node's fetch refuses before sending (Node 20, 22 and 24 alike)",
        "RequestInit: duplex option is required when sending a body",
    ),
}


@dataclass
class Matrix:
    runs: dict[str, DriverRun]
    bills: dict[str, list[dict[str, Any]]]  # label -> the simulator's bill entries made during its run
    rows: list[dict[str, Any]]  # every ledger row, read from the SQLite file
    batch_files: dict[str, str]  # label -> the input file id its batch lines use
    seconds: float

    def result(self, label: str, line: str) -> dict[str, Any]:
        run = self.runs[label]
        assert line in run.results, (
            f"{label} reported nothing for {line} (exit {run.returncode}): {run.stderr}"
        )
        return run.results[line]

    def rows_of(self, label: str, line: str) -> list[dict[str, Any]]:
        return sorted(
            (r for r in self.rows if r["environment"] == label and r["feature"] == line),
            key=lambda r: r["started_us"],
        )

    def billed(self, label: str) -> dict[str, list[dict[str, Any]]]:
        """line -> its bill entries: the run's metered rows (answered 200) and the entries the
        simulator made meanwhile, paired in order (their counts must agree)."""
        metered = sorted(
            (
                r
                for r in self.rows
                if r["environment"] == label and r["feature"] in METERED and r["upstream_status"] == 200
            ),
            key=lambda r: r["started_us"],
        )
        entries = self.bills[label]
        assert len(metered) == len(entries), (label, [r["feature"] for r in metered], len(entries))
        out: dict[str, list[dict[str, Any]]] = {}
        for row, entry in zip(metered, entries, strict=True):
            out.setdefault(row["feature"], []).append(entry)
        return out


def _upload(origin: str, key: str, label: str) -> str:
    """The batch input file of one form, uploaded through the proxy (multipart /v1/files/upload)."""
    headers = {"Authorization": f"Bearer {key}", "X-Meter-Environment": label, "X-Meter-Feature": "setup"}
    files = {"file": ("batch.jsonl", BATCH_INPUT, "application/jsonl")}
    r = httpx.post(
        f"{origin}/v1/files/upload", data={"purpose": "batch-api"}, files=files, headers=headers, timeout=20
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    """One simulator, one proxy process, every form's driver run once (in order)."""
    try:
        envs = ensure_all()
    except EnvError as exc:
        pytest.fail(f"the SDK environments could not be made: {exc}")
    tmp = tmp_path_factory.mktemp("sdk-matrix")
    config, key = write_config(tmp)
    ledger = tmp / "ledger.db"
    data = {
        **DATA,
        "upload_path": str(tmp / "upload.jsonl"),
        "audio_path": str(write_wav(tmp / "hello.wav")),
    }
    Path(data["upload_path"]).write_bytes(BATCH_INPUT)
    started = time.monotonic()
    runs: dict[str, DriverRun] = {}
    bills: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, str] = {}
    with (
        SimulatorThread(SimulatorOptions(batch_delay_ms=3_600_000)) as sim,
        serving(config, sim.url, ledger, tmp / "proxy.log", (free_port(), free_port())) as origin,
    ):
        for variant in VARIANTS:
            files[variant.label] = _upload(origin, key, variant.label)
            before = len(sim.entries())
            runs[variant.label] = run_driver(
                variant, envs, origin, key, {**data, "batch_file_id": files[variant.label]}, tmp
            )
            bills[variant.label] = sim.entries()[before:]
        rows = list(ledger_rows(ledger).values())
    yield Matrix(runs, bills, rows, files, time.monotonic() - started)


# -- what each line must show ---------------------------------------------------------------------


def _status(value: Any) -> str:
    return str(value).rsplit(".", 1)[-1].upper()


def _check_metered(matrix: Matrix, label: str, line: str, fields: dict[str, Any]) -> None:
    """One ok row at the line's endpoint whose tokens/quantity and cost are the simulator's bill."""
    (row,) = matrix.rows_of(label, line)
    (entry,) = matrix.billed(label).get(line, [None])
    assert entry is not None, f"the simulator billed nothing for {label} {line}"
    assert (row["status"], row["endpoint"], row["tenant"]) == ("ok", METERED[line], "acme")
    assert row["stream"] == (line == "chat_stream")
    assert row["cost_pusd"] == billed_pusd(entry) and row["cost_pusd"] is not None and row["cost_pusd"] > 0
    if "quantity" in entry:  # a unit route (CONTRACT: images, audio, videos)
        assert row.get("unit") == entry["unit"]
        assert row.get("quantity_micros") == int(Decimal(entry["quantity"]) * 1_000_000)
    else:
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            entry["prompt_tokens"],
            entry["completion_tokens"],
        )
    body = entry.get("body")
    if isinstance(body, dict) and line in TOKEN_LINES:  # the request that was billed is this line's
        assert f"matrix {label} {line}" in str(body)
    usage = fields.get("usage")
    if usage is not None:
        assert usage == [entry["prompt_tokens"], entry["completion_tokens"]]


def check_chat(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["content"] == " ".join(WORDS[:5]) and fields["usage"] is not None
    _check_metered(matrix, label, "chat", fields)
    assert fields["id"] == matrix.billed(label)["chat"][0]["id"]


def check_chat_stream(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["content"] == " ".join(WORDS[:6]) and fields["chunks"] >= 6
    assert fields["usage"] is not None and fields["usage"][1] == 6
    _check_metered(matrix, label, "chat_stream", fields)
    (row,) = matrix.rows_of(label, "chat_stream")
    assert row["stream_complete"] == 1 and row["usage_source"] == "upstream"


def check_completions(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["text"] == " ".join(WORDS[:4])
    _check_metered(matrix, label, "completions", fields)


def check_embeddings(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert (fields["count"], fields["dims"]) == (2, 8)
    _check_metered(matrix, label, "embeddings", fields)
    (row,) = matrix.rows_of(label, "embeddings")
    assert row["usage_source"] == "estimated" and row["completion_tokens"] == 0


def check_rerank(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert len(fields["results"]) == 2 and fields["usage"] is not None
    _check_metered(matrix, label, "rerank", fields)


def check_images(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["count"] == 1 and fields["has_image"]
    _check_metered(matrix, label, "images", fields)


def check_audio_speech(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["bytes"] > 44  # more than a WAV header
    _check_metered(matrix, label, "audio_speech", fields)


def check_audio_transcription(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert isinstance(fields["text"], str) and fields["text"]
    _check_metered(matrix, label, "audio_transcription", fields)


def check_files_upload(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["id"] and fields["bytes"] == len(BATCH_INPUT)
    # the OpenAI SDKs send (and read back) OpenAI's purpose; together stores it as batch-api
    assert fields["purpose"] == ("batch" if label.startswith("openai") else "batch-api")
    rows = matrix.rows_of(label, "files_upload")
    assert rows and all(r["endpoint"].startswith("files.") and r["cost_pusd"] == 0 for r in rows), rows
    assert all(r["status"] == "ok" for r in rows)
    assert "files_upload" not in matrix.billed(label)


def check_files_upload_duplex(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    """The npm SDK's upload given the fetch it needs (README): the proxy serves it whole."""
    assert fields["id"] and fields["bytes"] == len(BATCH_INPUT) and fields["purpose"] == "batch-api"
    (row,) = matrix.rows_of(label, "files_upload_duplex")  # its retrieve: the POST and PUT are unlabelled
    assert (row["endpoint"], row["status"], row["cost_pusd"]) == ("files.retrieve", "ok", 0)
    assert "files_upload_duplex" not in matrix.billed(label)


def _check_object_row(matrix: Matrix, label: str, line: str) -> None:
    (row,) = matrix.rows_of(label, line)
    assert (row["status"], row["endpoint"], row["cost_pusd"], row["upstream_status"]) == (
        "ok",
        OBJECT_ROWS[line],
        0,
        200,
    )


def check_batches_create(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["id"] and _status(fields["status"]) in ("VALIDATING", "IN_PROGRESS")
    assert fields["input_file_id"] == matrix.batch_files[label]
    _check_object_row(matrix, label, "batches_create")


def _created(matrix: Matrix, label: str) -> str:
    created = matrix.result(label, "batches_create")
    assert created["ok"], created
    return str(created["fields"]["id"])


def check_batches_retrieve(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["id"] == _created(matrix, label) and _status(fields["status"]) == "IN_PROGRESS"
    _check_object_row(matrix, label, "batches_retrieve")


def check_batches_list(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    # the tenant's own batches: this form's, and those the forms before it created
    assert _created(matrix, label) in fields["ids"]
    earlier = [v.label for v in VARIANTS[: [v.label for v in VARIANTS].index(label) + 1]]
    mine = {
        matrix.result(v, "batches_create")["fields"]["id"]
        for v in earlier
        if _ran_ok(matrix, v, "batches_create")
    }
    assert set(fields["ids"]) == mine
    assert matrix.rows_of(label, "batches_list") == []


def _ran_ok(matrix: Matrix, label: str, line: str) -> bool:
    return bool(matrix.runs[label].results.get(line, {}).get("ok"))


def check_batches_cancel(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["id"] == _created(matrix, label) and _status(fields["status"]) == "CANCELLED"
    _check_object_row(matrix, label, "batches_cancel")


def check_models_list(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["count"] in (len(TOKEN_MODELS), len(TOKEN_MODELS) + len(MEDIA_MODELS))
    assert fields["has_chat_model"]
    assert matrix.rows_of(label, "models_list") == []


def check_videos(matrix: Matrix, label: str, fields: dict[str, Any]) -> None:
    assert fields["id"]
    rows = matrix.rows_of(label, "videos")
    # the create call costs 0; the job's own row comes when it ends (tests/e2e/test_video_jobs.py)
    created = [r for r in rows if r["endpoint"] == "videos.create"]
    assert created and all(r["status"] == "ok" and r["cost_pusd"] == 0 for r in created), rows
    assert fields["id"] in {r["upstream_id"] for r in created}
    ended = [r for r in rows if r["endpoint"] == "videos"]
    assert all(r["status"] == "ok" and r["request_id"] == f"video_{r['upstream_id']}" for r in ended), rows
    assert len(created) + len(ended) == len(rows), rows


CHECKS = {name[len("check_") :]: f for name, f in dict(globals()).items() if name.startswith("check_")}


def _cases() -> list[Any]:
    cases = []
    for variant in VARIANTS:
        for line in variant.lines:
            reason = None if variant.label in SERVED_FOR.get(line, ()) else IN_FLIGHT_ELSEWHERE.get(line)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            if (variant.label, line) in SDK_DEFECTS:
                why = SDK_DEFECTS[variant.label, line][0]
                marks = [pytest.mark.xfail(strict=True, reason=why, raises=KnownSDKDefect)]
            cases.append(pytest.param(variant.label, line, marks=marks, id=f"{variant.label}-{line}"))
    return cases


@pytest.mark.parametrize(("label", "line"), _cases())
def test_line(matrix: Matrix, label: str, line: str) -> None:
    """The SDK call works through the proxy and leaves exactly its ledger rows, at the bill."""
    result = matrix.result(label, line)
    defect = SDK_DEFECTS.get((label, line))
    if defect is not None and not result["ok"] and defect[1] in str(result["error"].get("message")):
        raise KnownSDKDefect(defect[0])
    assert result["ok"], result["error"]
    CHECKS[line](matrix, label, result["fields"])


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.label for v in VARIANTS])
def test_driver_ran_the_pinned_sdk(matrix: Matrix, variant: Variant) -> None:
    """Each driver ran to its end, on the SDK line it stands for."""
    run = matrix.runs[variant.label]
    assert run.returncode == 0 and run.done is not None, run.stderr
    assert (run.done["sdk"], run.done["version"][: len(variant.version_prefix)]) == (
        variant.sdk,
        variant.version_prefix,
    )
    assert set(run.results) == set(variant.lines)
    if variant.runtime == "node":  # the npm SDKs' own runtime (openai 7.x: Node >= 22)
        assert int(run.done["node"].lstrip("v").split(".")[0]) >= NODE_MIN_MAJOR, run.done


def test_every_row_belongs_to_a_line_and_the_ledger_equals_the_bill(matrix: Matrix) -> None:
    """No row the lines do not account for; every row terminal; the ledger's total cost of the
    metered rows is exactly what the simulator billed over the whole matrix."""
    labels = {v.label: set(v.lines) | {"setup"} for v in VARIANTS}
    for row in matrix.rows:
        # the upload flow's requests do not all carry the SDK's extra headers (the presigned PUT goes
        # to the Location as is; together 1.x's file manager sends its own)
        unlabelled = row["endpoint"] in ("files.create", "files.put") and row["environment"] is None
        assert unlabelled or (
            row["environment"] in labels and row["feature"] in labels[row["environment"]]
        ), row
        assert row["status"] not in ("in_flight", "orphaned"), row
        assert row["tenant"] == "acme"
    for v in VARIANTS:  # one upload per form, at cost 0
        setup = matrix.rows_of(v.label, "setup")
        assert [(r["endpoint"], r["cost_pusd"]) for r in setup] == [("files.upload", 0)]
        matrix.billed(v.label)  # the run's metered rows and bill entries pair up
    entries = [e for label in matrix.bills for e in matrix.bills[label]]
    metered = [r for r in matrix.rows if r["feature"] in METERED and r["upstream_status"] == 200]
    assert entries and sum(r["cost_pusd"] for r in metered) == sum(billed_pusd(e) for e in entries)


def test_the_matrix_is_quick(matrix: Matrix) -> None:
    """The whole matrix (every form, one proxy, one simulator) stays well under two minutes."""
    assert matrix.seconds < 90, {label: round(r.seconds, 1) for label, r in matrix.runs.items()}
