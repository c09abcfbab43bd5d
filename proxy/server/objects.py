"""Files and batches belong to the tenant that created them through the proxy.

The proxy records the owner of every file it uploads and every batch it creates (and of each
batch's output and error files). A tenant's lists hold only its own objects; retrieving,
reading, cancelling or deleting anything else answers 404 exactly as a missing object would,
and nothing is forwarded. Objects made directly on the operator's account belong to no tenant,
so no tenant sees them. Every forwarded call gets one ledger row (passthrough.py); lists none.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson
from aiohttp import web

from proxy.core.auth import Principal
from proxy.core.calls import header_attribution, new_request_id
from proxy.core.routes import ID_RE, Match
from proxy.core.shapes import openai_batch, openai_file, openai_page, wants_openai_list
from proxy.core.uploads import TOGETHER_UPLOAD_PATH, openai_upload
from proxy.errors import InvalidField, InvalidJSON, NotFound, UpstreamProtocolError
from proxy.ledger import BatchJob, OwnedFile, now_us
from proxy.server.batches import BatchTracker, job_of, remember_batch_files
from proxy.server.passthrough import Outbound, Passthrough, respond
from proxy.server.relay import Relay
from proxy.server.responses import JSON_CT
from proxy.server.uploads import UploadRelay
from proxy.server.videos import VideoTracker

log = logging.getLogger(__name__)
Handler = Callable[[web.Request, Principal, Match], Awaitable[web.StreamResponse]]


class OwnershipStore(Protocol):
    """What ownership needs from the ledger (both backends have it)."""

    async def add_file(self, f: OwnedFile) -> bool: ...

    async def file_owner(self, file_id: str) -> str | None: ...

    async def files_of(self, tenant: str) -> set[str]: ...

    async def add_batch(self, batch: BatchJob) -> bool: ...

    async def batch_owner(self, batch_id: str) -> str | None: ...

    async def batches_of(self, tenant: str) -> set[str]: ...


def not_found(kind: str, object_id: str) -> NotFound:
    """The one answer for a missing object and for another tenant's: they cannot be told apart."""
    return NotFound(f"No {kind} with id '{object_id}' was found.", code="not_found")


def filter_listing(data: bytes, owned: set[str]) -> bytes:
    """A list answer (bare array, or {"object": "list", "data": [...]}) cut to `owned` ids.

    Only `object` and `data` are kept: cursors or first/last ids could name others' objects.
    An answer of any other shape is refused rather than passed on unfiltered.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, list):
        return orjson.dumps([x for x in obj if isinstance(x, dict) and x.get("id") in owned])
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        kept = [x for x in obj["data"] if isinstance(x, dict) and x.get("id") in owned]
        return orjson.dumps({"object": obj.get("object", "list"), "data": kept})
    raise UpstreamProtocolError("The upstream's list answer has an unexpected shape.")


class ObjectGateway:
    """The Files and Batches routes for tenants: ownership checked, one row per forwarded call."""

    def __init__(
        self,
        relay: Relay,
        passthrough: Passthrough,
        store: OwnershipStore,
        tracker: BatchTracker,
        uploads: UploadRelay,
        videos: VideoTracker,
    ) -> None:
        self.relay, self.pt, self.store, self.tracker = relay, passthrough, store, tracker
        self.videos = videos  # a job read here and seen ended is recorded at once
        self.uploads = uploads  # the together SDKs' presigned upload: POST /v1/files and its PUT
        self._handlers: dict[str, Handler] = {
            "files.list": self._list,
            "batches.list": self._list,
            "files.upload": self._upload,
            "files.create": self._create_file,
            "files.preprocess": self._owned,
            "batches.create": self._create_batch,
            "files.retrieve": self._owned,
            "files.content": self._owned,
            "files.delete": self._owned,
            "batches.retrieve": self._owned,
            "batches.cancel": self._owned,
            "videos.retrieve": self._owned,
        }

    async def handle(self, request: web.Request, principal: Principal, match: Match) -> web.StreamResponse:
        return await self._handlers[match.route.name](request, principal, match)

    async def put_upload(self, request: web.Request, match: Match) -> web.StreamResponse:
        """The relayed PUT of an upload: its token, not a tenant key, says whose it is."""
        return await self.uploads.put(request, match)

    async def _list(self, request: web.Request, principal: Principal, match: Match) -> web.StreamResponse:
        """A list read (no row): the upstream's list cut to the caller's own objects."""
        files = match.route.name == "files.list"
        up = await self.relay.upstream.request(
            "GET", match.upstream_path, body=None, incoming=request.headers, query=match.upstream_query
        )
        async with up:
            data = await self.relay.read_upstream(up)
        if up.status != 200:
            return respond(up, data, new_request_id())
        owned = await (self.store.files_of if files else self.store.batches_of)(principal.tenant)
        body = filter_listing(data, owned)
        if wants_openai_list(request.headers):  # an OpenAI SDK pages through a cursor list
            body = openai_page(body)
        return web.Response(body=body, content_type=JSON_CT)

    async def _owned(self, request: web.Request, principal: Principal, match: Match) -> web.StreamResponse:
        """Retrieve, content, delete, cancel, preprocess: only of the caller's own object."""
        kind = match.route.name.partition(".")[0].removesuffix("s").replace("batche", "batch")
        object_id = match.params["id"]
        owner = None
        if ID_RE.match(object_id):  # video jobs are kept with the files (`source` video)
            lookup = self.store.batch_owner if kind == "batch" else self.store.file_owner
            owner = await lookup(object_id)
        if owner != principal.tenant:
            raise not_found(kind, object_id)
        pt = self.pt
        row = await pt.begin(request, principal, match.route.name, 0)
        try:
            body = b"" if request.method == "POST" else None  # a POST upstream says its length
            out = Outbound(request.method, match.upstream_path, match.upstream_query, body)
            up = await pt.send(request, row, out)
            if match.route.name == "files.content" and up.status == 200:
                return await pt.relay_body(request, row, up, 0)
            data = await pt.read(row, up, 0)
        finally:
            await pt.close(row)
        if match.route.name == "batches.retrieve" and up.status == 200:
            await remember_batch_files(self.store, job_of(data), principal.tenant, principal.key_id)
        elif match.route.name == "videos.retrieve" and up.status == 200:
            self.videos.seen(data)
        return respond(up, data, row.request_id)

    async def _upload(self, request: web.Request, principal: Principal, match: Match) -> web.StreamResponse:
        """together's multipart upload, sent on as it came; the new file is the caller's."""
        body = await self.relay.read_body(request)
        ctype = request.headers.get("Content-Type", JSON_CT)
        out = Outbound("POST", match.upstream_path, match.upstream_query, body, ctype)
        return await self._store_file(request, principal, out)

    async def _create_file(
        self, request: web.Request, principal: Principal, match: Match
    ) -> web.StreamResponse:
        """POST /v1/files: the OpenAI SDKs' `files.create` (multipart, a `file` part) is
        together's upload, answered as OpenAI's FileObject; any other form is the together
        SDKs' presigned upload (uploads.py)."""
        body = await self.relay.read_body(request)
        form = openai_upload(request.headers.get("Content-Type", ""), body)
        if form is None:
            return await self.uploads.create(request, principal, match, body)
        out = Outbound("POST", TOGETHER_UPLOAD_PATH, "", form.body, form.content_type)
        return await self._store_file(request, principal, out, form.purpose)

    async def _store_file(
        self, request: web.Request, principal: Principal, out: Outbound, openai_purpose: str | None = None
    ) -> web.StreamResponse:
        """One upload (row `files.upload`); the new file is the caller's before it is answered."""
        pt = self.pt
        row = await pt.begin(request, principal, "files.upload", 0)
        try:
            data = await pt.read(row, up := await pt.send(request, row, out), 0)
        finally:
            await pt.close(row)
        if 200 <= up.status < 300:
            file_id = _id_of(data)
            if file_id is None:
                log.error("files: the upstream stored a file for %s without an id", principal.tenant)
            else:
                owned = OwnedFile(file_id, principal.tenant, principal.key_id, now_us(), "upload")
                await self._own(owned)
            if openai_purpose is not None:
                data = openai_file(data, openai_purpose)
        return respond(up, data, row.request_id)

    async def _create_batch(
        self, request: web.Request, principal: Principal, match: Match
    ) -> web.StreamResponse:
        """A batch over one of the caller's files; the proxy then follows it (batches.py)."""
        body = await self.relay.read_body(request)
        await self._check_input(body, principal.tenant)
        feature, environment = header_attribution(request.headers)
        pt = self.pt
        row = await pt.begin(request, principal, match.route.name, 0, admit=True)
        try:
            out = Outbound("POST", match.upstream_path, match.upstream_query, body)
            data = await pt.read(row, up := await pt.send(request, row, out), 0)
        finally:
            await pt.close(row)
        if 200 <= up.status < 300:
            await self._remember(data, principal, feature, environment)
            if wants_openai_list(request.headers):  # an OpenAI SDK reads the batch itself
                data = openai_batch(data)
        return respond(up, data, row.request_id)

    async def _check_input(self, body: bytes, tenant: str) -> None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidJSON(f"The request body is not valid JSON: {exc.args[0]}") from None
        file_id = obj.get("input_file_id") if isinstance(obj, dict) else None
        if not isinstance(file_id, str) or not ID_RE.match(file_id):
            raise InvalidField("'input_file_id' must name a file you uploaded.")
        if await self.store.file_owner(file_id) != tenant:
            raise InvalidField(
                f"'input_file_id' {file_id!r} names no file you uploaded.", code="invalid_input_file"
            )

    async def _remember(
        self, data: bytes, principal: Principal, feature: str | None, environment: str | None
    ) -> None:
        job = job_of(data)
        batch_id = job.get("id")
        if not isinstance(batch_id, str) or not ID_RE.match(batch_id):
            log.error(
                "batches: the upstream created a batch for %s without an id; it is not metered",
                principal.tenant,
            )
            return
        status = job.get("status")
        batch = BatchJob(
            batch_id,
            principal.tenant,
            principal.key_id,
            feature,
            environment,
            now_us(),
            status if isinstance(status, str) else "VALIDATING",
        )
        try:
            await self.store.add_batch(batch)
        except Exception:
            log.exception(
                "batches: could not remember batch %s of %s; it is not metered", batch_id, principal.tenant
            )
            return
        self.tracker.poke()

    async def _own(self, owned: OwnedFile) -> None:
        try:
            await self.store.add_file(owned)
        except Exception:  # the file exists upstream; without its owner no tenant can reach it
            log.exception("files: could not record the owner of %s (%s)", owned.file_id, owned.tenant)


def _id_of(data: bytes) -> str | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    file_id = obj.get("id") if isinstance(obj, dict) else None
    return file_id if isinstance(file_id, str) and ID_RE.match(file_id) else None


__all__ = ["ObjectGateway", "OwnershipStore", "filter_listing", "not_found"]
