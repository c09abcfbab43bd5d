"""together.ai Batch jobs: meter what batches cost.

objects.py serves `/v1/files*` and `/v1/batches*` for tenants and remembers which tenant created
each batch. `BatchTracker` follows every unfinished batch to completion by itself, whether or not
the client ever polls, then prices each output line at batch rates and records one ledger row
per line. Its request ids are derived from the batch id and line number, so processing a batch
twice (after a crash between the rows and the `recorded` mark) adds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from proxy.config import Config
from proxy.core.budgets import Periods
from proxy.core.pricing import BATCH, cost_pusd
from proxy.core.routes import ID_RE
from proxy.core.usage import Tokenizer, Usage, completion_text, estimate_prompt_tokens, usage_from_json
from proxy.errors import MeterError, UpstreamProtocolError, UpstreamTimeout
from proxy.ledger import BatchJob, LedgerRow, LedgerUnavailable, OwnedFile, now_us
from proxy.server.relay import ENDPOINTS
from proxy.server.tokens import loaded
from proxy.upstream.client import UpstreamStreamError
from proxy.upstream.hosts import Upstreams

log = logging.getLogger(__name__)

COMPLETED = "COMPLETED"
FINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"})


class FileOwners(Protocol):
    async def add_file(self, f: OwnedFile) -> bool: ...


class BatchStore(FileOwners, Protocol):
    """What batch metering needs from the ledger (both backends have it)."""

    async def add_batch(self, batch: BatchJob) -> bool: ...

    async def update_batch(
        self, batch_id: str, status: str, output_file_id: str | None, recorded_us: int | None
    ) -> bool: ...

    async def batches(self, *, unrecorded: bool = False) -> list[BatchJob]: ...

    async def record(self, row: LedgerRow) -> bool: ...


def batch_request_id(batch_id: str, index: int) -> str:
    """The ledger key of output line `index` of a batch: the same on every run."""
    return f"batch_{batch_id}_{index}"


def job_of(data: bytes) -> dict[str, Any]:
    """The batch object of a create (`{"job": {...}}`) or retrieve (`{...}`) answer."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    if isinstance(obj, dict) and isinstance(obj.get("job"), dict):
        return obj["job"]
    return obj if isinstance(obj, dict) else {}


async def remember_batch_files(store: FileOwners, job: dict[str, Any], tenant: str, key_id: str) -> None:
    """A batch's output and error files belong to the batch's tenant (first owner stays)."""
    batch_id = job.get("id") if isinstance(job.get("id"), str) else None
    for key, source in (("output_file_id", "batch_output"), ("error_file_id", "batch_error")):
        file_id = job.get(key)
        if isinstance(file_id, str) and ID_RE.match(file_id):
            await store.add_file(OwnedFile(file_id, tenant, key_id, now_us(), source, batch_id))


class BatchTracker:
    """Background task: follows unfinished batches and records completed ones in the ledger."""

    def __init__(
        self,
        store: BatchStore,
        upstream: Upstreams,
        config: Callable[[], Config],
        periods: Periods,
        tokenizer: Tokenizer,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.config = config  # a getter: prices and the interval follow config reloads
        self.periods = periods
        self.tokenizer = tokenizer
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-tracker")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def poke(self) -> None:
        """Look at the batches now rather than at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # the upstream or the ledger is down: try again next time
                log.exception(
                    "batches: polling failed; retrying in %g s", self.config().batches.poll_interval
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config().batches.poll_interval):
                    await self._wake.wait()

    async def poll_once(self) -> int:
        """Look at every unrecorded batch once; the number of batches recorded by this call."""
        done = 0
        for batch in await self.store.batches(unrecorded=True):
            try:
                done += await self.follow(batch)
            except (MeterError, LedgerUnavailable) as exc:
                log.warning("batches: %s stays open: %s", batch.batch_id, exc)
        return done

    async def follow(self, batch: BatchJob) -> bool:
        """One look at one batch; True when it reached its end and its rows are recorded."""
        if not ID_RE.match(batch.batch_id):  # ids come from the upstream; never trust a path part
            await self.store.update_batch(batch.batch_id, "INVALID_ID", None, now_us())
            return True
        status_code, data = await self._get(f"/v1/batches/{batch.batch_id}")
        if status_code == 404:
            log.error("batches: the upstream no longer knows %s; giving up on it", batch.batch_id)
            await self.store.update_batch(batch.batch_id, "NOT_FOUND", None, now_us())
            return True
        if status_code != 200:
            raise UpstreamProtocolError(f"GET /v1/batches/{batch.batch_id} answered {status_code}")
        job = job_of(data)
        status = job["status"] if isinstance(job.get("status"), str) else batch.status
        output = job["output_file_id"] if isinstance(job.get("output_file_id"), str) else None
        await remember_batch_files(self.store, job, batch.tenant, batch.key_id)
        if status not in FINAL_STATUSES:
            if status != batch.status:
                await self.store.update_batch(batch.batch_id, status, None, None)
            return False
        if output:  # failed or expired batches may still have finished (and billed) some lines
            rows = await self._rows(batch, job, output)
            await asyncio.gather(*(self.store.record(r) for r in rows))  # one group commit
            log.info(
                "batches: %s %s, %d line(s) recorded for %s", batch.batch_id, status, len(rows), batch.tenant
            )
        await self.store.update_batch(batch.batch_id, status, output, now_us())
        return True

    async def _get(self, path: str) -> tuple[int, bytes]:
        config = self.config()
        up = await self.upstream.request("GET", path, body=None, incoming={})
        try:
            async with up, asyncio.timeout(config.upstream.idle_timeout):
                return up.status, await up.read(config.limits.max_response_bytes)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"The upstream stopped sending {path}.") from exc
        except UpstreamStreamError as exc:
            raise UpstreamProtocolError(f"{path} broke off: {exc}") from exc

    async def _file(self, file_id: str) -> bytes:
        if not ID_RE.match(file_id):
            raise UpstreamProtocolError(f"the upstream named an invalid file id {file_id!r}")
        status, data = await self._get(f"/v1/files/{file_id}/content")
        if status != 200:
            raise UpstreamProtocolError(f"GET /v1/files/{file_id}/content answered {status}")
        return data

    async def _rows(self, batch: BatchJob, job: dict[str, Any], output_file_id: str) -> list[LedgerRow]:
        lines = [line for line in (await self._file(output_file_id)).splitlines() if line.strip()]
        await loaded(self.tokenizer)  # a line may need an estimate: load it off the loop
        inputs: dict[str, dict[str, Any]] | None = None
        endpoint = ENDPOINTS.get(str(job.get("endpoint") or "/v1/chat/completions"), "chat")
        rows = []
        for index, line in enumerate(lines):
            try:
                out = orjson.loads(line)
            except orjson.JSONDecodeError:
                out = None
            if not isinstance(out, dict):
                out = {}
            response: dict[str, Any] = out["response"] if isinstance(out.get("response"), dict) else {}
            body: dict[str, Any] = response["body"] if isinstance(response.get("body"), dict) else {}
            if inputs is None and (usage_from_json(body.get("usage")) is None or not body.get("model")):
                inputs = await self._inputs(job)  # needed to estimate or to name the model
            request = (inputs or {}).get(str(out.get("custom_id")), {})
            rows.append(self.line_row(batch, index, endpoint, response, body, request))
        return rows

    async def _inputs(self, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """custom_id -> request body of the batch's input file ({} if it cannot be read)."""
        file_id = job.get("input_file_id")
        if not isinstance(file_id, str):
            return {}
        try:
            data = await self._file(file_id)
        except MeterError as exc:
            log.warning(
                "batches: input file %s unreadable (%s); lines without usage stay unknown", file_id, exc
            )
            return {}
        found = {}
        for line in data.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(line)
                if isinstance(obj, dict) and isinstance(obj.get("body"), dict):
                    found[str(obj.get("custom_id"))] = obj["body"]
        return found

    def line_row(
        self,
        batch: BatchJob,
        index: int,
        endpoint: str,
        response: dict[str, Any],
        body: dict[str, Any],
        request: dict[str, Any],
    ) -> LedgerRow:
        """The terminal ledger row of one output line, priced at batch rates."""
        now = now_us()
        model = body.get("model") or request.get("model") or "unknown"
        model = model if isinstance(model, str) else "unknown"
        code = response.get("status_code")
        code = code if type(code) is int else None
        upstream_id = body.get("id") if isinstance(body.get("id"), str) else None
        common: dict[str, Any] = {
            "finished_us": now,
            "upstream_status": code,
            "reserved_pusd": 0,
            "upstream_id": upstream_id,
        }
        if code != 200:
            return self._row(batch, index, model, endpoint, now, "upstream_error", common, cost_pusd=0)
        usage = usage_from_json(body.get("usage"), has_output=endpoint != "embeddings")
        if usage is None and request:
            prompt = estimate_prompt_tokens(endpoint, request, self.tokenizer)
            usage = Usage(prompt, self.tokenizer.count(completion_text(body)), "estimated")
        rates = self.config().prices.get(model)
        if usage is None:  # no usage and no input to estimate from: unknown, never 0 (I3)
            return self._row(batch, index, model, endpoint, now, "ok", common, stream_complete=True)
        return self._row(
            batch,
            index,
            model,
            endpoint,
            now,
            "ok",
            common,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            usage_source=usage.source,
            cost_pusd=cost_pusd(usage, rates, BATCH) if rates is not None else None,
            stream_complete=True,
        )

    def _row(
        self,
        batch: BatchJob,
        index: int,
        model: str,
        endpoint: str,
        now: int,
        status: str,
        common: dict[str, Any],
        **fields: Any,
    ) -> LedgerRow:
        # dated when the proxy saw the batch complete: that is when its cost became known
        return LedgerRow(
            batch_request_id(batch.batch_id, index),
            batch.tenant,
            batch.key_id,
            model,
            endpoint,
            BATCH,
            batch.feature,
            batch.environment,
            False,
            now,
            self.periods.of(now),
            status=status,
            **common,
            **fields,
        )
