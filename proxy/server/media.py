"""The routes together bills in units other than tokens: images, audio and video.

Same contract as the token routes (relay.py): authenticate -> validate -> admit (budget check
and reservation) -> in-flight row -> forward -> meter -> terminal row before the client sees the
answer. The quantity comes from proxy/core/units.py (together's answer where it states it, else
the request or the returned bytes, flagged `estimated` when not exact), the cost from the model's
per-unit price; a model without one is recorded with an unknown cost (NULL), never 0.

A video job is created here and belongs to the tenant that created it (GET /v2/videos/{id} is an
owned object, objects.py). together bills it when it completes, so the create call's row
(`videos.create`) costs 0 and the job's own row is recorded at its end by videos.py; its bound
stays reserved meanwhile. Should the job not be remembered (the ledger failing just then, an
answer without an id), the create row is charged the requested seconds instead: never less.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web

from proxy.core.auth import Principal
from proxy.core.calls import attribution, new_request_id
from proxy.core.multipart import parse_form
from proxy.core.pricing import SERVERLESS, Rates, unit_cost_pusd
from proxy.core.routes import ID_RE, Match, check_header_values
from proxy.core.sse import SSEFramer
from proxy.core.units import (
    Quantity,
    audio_seconds,
    decimal_micros,
    image_bound,
    image_quantity,
    images_returned,
    pcm_quantity,
    speech_bound,
    speech_event_audio,
    transcription_quantity,
    upload_bound,
    video_bound,
    video_quantity,
)
from proxy.core.videos import RUNNING
from proxy.errors import InvalidField, InvalidJSON, MeterError, NotReady
from proxy.ledger import LedgerRow, OwnedFile, VideoJob, now_us
from proxy.server.recorder import Recorder
from proxy.server.relay import Relay
from proxy.server.responses import JSON_CT, client_gone, error_response
from proxy.upstream.client import FORWARDED_HEADERS, UpstreamResponse, UpstreamStreamError

log = logging.getLogger(__name__)
ROW_ENDPOINT = {"videos": "videos.create"}  # the job's own row, at its end, is "videos"
UNIT_OF_ROUTE = {
    "images": "megapixel",
    "audio.speech": "audio_second",
    "audio.transcriptions": "audio_second",
    "audio.translations": "audio_second",
    "videos": "video_second",
}


class VideoOwners(Protocol):
    async def add_file(self, f: OwnedFile) -> bool: ...


class VideoJobs(Protocol):
    async def add(self, job: VideoJob) -> None: ...


@dataclass(frozen=True, slots=True)
class UnitCall:
    """A validated request to a unit route: what to forward and what meters it."""

    route: str
    model: str
    body: dict[str, Any]  # the JSON body, or the multipart form's text fields
    raw: bytes
    content_type: str
    upload: bytes = b""  # transcriptions: the audio file
    upload_type: str = ""


def parse_unit_call(route: str, raw: bytes, content_type: str) -> UnitCall:
    """The body of a unit route: JSON (images, speech, videos) or multipart (transcriptions)."""
    if route in ("audio.transcriptions", "audio.translations"):
        form = parse_form(raw, content_type)
        upload = form.files.get("file")
        if upload is None:
            raise InvalidField("'file' (the audio to transcribe) is required.")
        model = form.fields.get("model", "")
        if not model:
            raise InvalidField("'model' is required and must be a non-empty string.")
        return UnitCall(route, model, dict(form.fields), raw, content_type, upload.data, upload.content_type)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc.args[0]}") from None
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidField("'model' is required and must be a non-empty string.")
    _check_fields(route, body)
    return UnitCall(route, name, body, raw, JSON_CT)


def _check_fields(route: str, body: dict[str, Any]) -> None:
    for key in ("n", "width", "height", "steps"):
        value = body.get(key)
        if value is not None and (type(value) is not int or not 0 < value <= 100_000):
            raise InvalidField(f"'{key}' must be a positive integer.")
    if route == "audio.speech" and not isinstance(body.get("input"), str):
        raise InvalidField("'input' (the text to speak) must be a string.")
    if route in ("images", "videos") and "prompt" in body and not isinstance(body["prompt"], str):
        raise InvalidField("'prompt' must be a string.")


def bound_micros(call: UnitCall, rates: Rates | None) -> int:
    """The most units the call can be billed for (its budget reservation), in millionths."""
    if call.route == "images":
        return image_bound(call.body, rates)
    if call.route == "audio.speech":
        return speech_bound(call.body)
    if call.route == "videos":
        return video_bound(call.body)
    return upload_bound(call.upload, call.upload_type)


def measure(call: UnitCall, rates: Rates | None, data: bytes, content_type: str) -> Quantity:
    """The billed quantity of a 200 answer."""
    if call.route == "audio.speech":
        return audio_seconds(data, content_type, call.body)
    answer = _json(data)
    if call.route == "images":
        return image_quantity(call.body, rates, images_returned(answer))
    if call.route == "videos":
        return video_quantity(answer, call.body)
    return transcription_quantity(answer, call.upload, call.upload_type)


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class UnitRelay:
    """Serves the unit routes with the token relay's parts (auth, budgets, ledger, recorder)."""

    def __init__(self, relay: Relay, owners: VideoOwners, videos: VideoJobs) -> None:
        self.relay, self.owners, self.videos = relay, owners, videos

    async def handle(self, request: web.Request, match: Match) -> web.StreamResponse:
        t0 = time.perf_counter()
        request_id = new_request_id()
        relay = self.relay
        try:
            principal = relay.authenticate(request)
            if not relay.accepting:
                raise NotReady("The proxy is shutting down; retry on another instance.")
            check_header_values(request.headers, FORWARDED_HEADERS)
        except MeterError as exc:
            return error_response(exc, request_id)
        admitted = await self._admit(request, principal, match.route.name, request_id)
        if isinstance(admitted, web.Response):
            return admitted
        call, rates, row = admitted
        meter = Recorder(relay.sinks, row, rates, t0)
        try:
            return await self._run(request, call, meter, match)
        finally:
            await meter.ensure_finished()

    async def _admit(
        self, request: web.Request, principal: Principal, route: str, request_id: str
    ) -> tuple[UnitCall, Rates | None, LedgerRow] | web.Response:
        relay = self.relay
        started = relay.clock()
        seen: dict[str, Any] = {"model": "", "feature": None, "environment": None}
        try:
            ctype = request.headers.get("Content-Type", JSON_CT)
            call = parse_unit_call(route, await relay.read_body(request), ctype)
            seen["model"] = call.model
            rates = relay.rates_for(principal, call.model)
            seen["feature"], seen["environment"] = attribution(request.headers, call)
            reserved = self._reserve(call, rates)
            relay.budgets.admit(principal.tenant, seen["feature"], relay.period(started), reserved or 0)
        except MeterError as exc:
            await relay.record_rejected(principal, request_id, route, started, exc, **seen)
            return error_response(exc, request_id)
        row = LedgerRow(
            request_id, principal.tenant, principal.key_id, call.model, ROW_ENDPOINT.get(route, route),
            SERVERLESS, seen["feature"], seen["environment"], False, started, relay.period(started),
            reserved_pusd=reserved, unit=UNIT_OF_ROUTE[route] if rates is None else rates.unit,
        )  # fmt: skip
        refused = await relay.begin_row(row, principal, route, started, seen)
        return refused if refused is not None else (call, rates, row)

    @staticmethod
    def _reserve(call: UnitCall, rates: Rates | None) -> int | None:
        """The call's upper bound in pico-USD; None when the model has no price for its unit."""
        if rates is None or rates.by_token:
            return None
        return unit_cost_pusd(bound_micros(call, rates), rates)

    async def _run(
        self, request: web.Request, call: UnitCall, meter: Recorder, match: Match
    ) -> web.StreamResponse:
        relay = self.relay
        relay.metrics.in_flight += 1
        try:
            try:
                up = await relay.upstream.request(
                    "POST", match.upstream_path, body=call.raw, incoming=request.headers,
                    query=match.upstream_query, content_type=call.content_type,
                )  # fmt: skip
                if up.status == 200 and up.content_type == "text/event-stream":
                    async with up:  # streamed speech: relayed event by event
                        return await SpeechStream(relay, meter, call).run(request, up)
                async with up:
                    data = await relay.read_upstream(up)
            except MeterError as exc:
                await meter.fail(exc)
                return error_response(exc, meter.row.request_id)
            return await self._answer(request, call, meter, up, data)
        finally:
            relay.metrics.in_flight -= 1

    async def _answer(
        self, request: web.Request, call: UnitCall, meter: Recorder, up: UpstreamResponse, data: bytes
    ) -> web.Response:
        limits = self.relay.limits_of(meter, up)
        headers = {"x-request-id": meter.row.request_id, **limits}
        ctype = up.content_type or JSON_CT
        if up.status != 200:
            await meter.upstream_error(up.status)
            return web.Response(body=data, status=up.status, headers=headers, content_type=ctype)
        gone = client_gone(request)
        answer_id = _answer_id(data) if call.route == "videos" else None
        if answer_id is None or not await self._start_video(answer_id, call, meter, gone):
            quantity = measure(call, meter.rates, data, ctype)
            await meter.finish_units(quantity, up.status, answer_id, client_gone=gone)
        if answer_id is not None:
            await self._own_video(answer_id, meter.row)
        headers["x-meter-cost-usd"] = meter.cost_text
        headers["x-meter-usage-source"] = meter.usage_source
        return web.Response(body=data, status=200, headers=headers, content_type=ctype)

    async def _start_video(self, video_id: str, call: UnitCall, meter: Recorder, gone: bool) -> bool:
        """The job is followed to its end (videos.py), its bound held meanwhile; the create call
        itself costs 0. False if the job could not be remembered (the caller charges the call)."""
        row = meter.row
        job = VideoJob(
            video_id, row.tenant, row.key_id, call.model, row.feature, row.environment, now_us(),
            row.request_id, row.reserved_pusd, decimal_micros(call.body.get("seconds")), RUNNING,
        )  # fmt: skip
        try:
            await self.videos.add(job)  # holds the job's bound before the call's own is released
        except Exception:
            log.exception("videos: could not remember %s of %s; charged at creation", video_id, row.tenant)
            return False
        await meter.finish_units(
            Quantity("video_second", 0, "upstream"), 200, video_id, client_gone=gone, free=True
        )
        return True

    async def _own_video(self, video_id: str, row: LedgerRow) -> None:
        """The new video job is the caller's (its status and result are read through the proxy)."""
        try:
            await self.owners.add_file(OwnedFile(video_id, row.tenant, row.key_id, now_us(), "video"))
        except Exception:
            log.exception("videos: could not record the owner of %s (%s)", video_id, row.tenant)


class SpeechStream:
    """Streamed speech (`stream: true`): together's SSE events relayed as they come, the audio
    they carry counted; the row is made terminal before `data: [DONE]` reaches the client."""

    def __init__(self, relay: Relay, meter: Recorder, call: UnitCall) -> None:
        self.relay, self.meter, self.call = relay, meter, call
        self.audio = 0  # bytes of audio relayed
        self.done = False  # the upstream's [DONE] was seen
        self.client_gone = False

    async def run(self, request: web.Request, up: UpstreamResponse) -> web.StreamResponse:
        headers = {"x-request-id": self.meter.row.request_id, **self.relay.limits_of(self.meter, up)}
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        status = "ok"
        try:
            await self._pump(resp, up)
        except (TimeoutError, UpstreamStreamError):
            status = "upstream_aborted"
        if not self.done and status == "ok":
            status = "upstream_aborted"  # ended without [DONE]: what came is what is counted
        quantity = pcm_quantity(self.audio, self.call.body)
        await self.meter.finish_units(
            quantity, 200, None, client_gone=self.client_gone or client_gone(request), status=status
        )
        if self.done and not self.client_gone:
            with contextlib.suppress(ConnectionError):
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
        return resp

    async def _pump(self, resp: web.StreamResponse, up: UpstreamResponse) -> None:
        framer = SSEFramer()
        idle = self.relay.config.upstream.idle_timeout
        while not self.done:
            async with asyncio.timeout(idle):
                chunk = await up.readany()
            if not chunk:
                return
            for event in framer.feed(chunk):
                if event.is_done:
                    self.done = True
                    break
                self.audio += len(speech_event_audio(event.data))
                await self._write(resp, event.raw)

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        if self.client_gone:
            return  # keep reading: the upstream bills what it sends
        try:
            await resp.write(data)
        except ConnectionError:
            self.client_gone = True


def _answer_id(data: bytes) -> str | None:
    obj = _json(data)
    found = obj.get("id") if isinstance(obj, dict) else None
    return found if isinstance(found, str) and ID_RE.match(found) else None


__all__ = ["UNIT_OF_ROUTE", "UnitCall", "UnitRelay", "bound_micros", "measure", "parse_unit_call"]
