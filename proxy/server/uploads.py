"""The together SDKs' presigned upload through the proxy (docs/batches.md#uploads).

`POST /v1/files`: the form is rebuilt from its known fields (core/uploads.upload_form) and
forwarded for the tenant, one row `files.create` (cost 0). together answers 302 naming the new
file (`X-Together-File-Id`) and a presigned object-store URL (`Location`). The file becomes the
tenant's before the client sees the redirect, and the Location becomes the proxy's own upload
URL, `<public url>/v1/files/uploads/<token>`, whose signed token carries the presigned URL, the
tenant, the file and an expiry (unless `files.relay_uploads` is false: then it passes unchanged).
(The OpenAI SDKs' multipart `files.create` on the same route is no presigned upload: objects.py
sends it to together's `/v1/files/upload` and never calls this.)

`PUT /v1/files/uploads/<token>`: the SDKs send no API key here, so the token is the authority
(checked: signature, expiry, tenant and key still configured, and an Authorization header, if
one is sent, must be the same tenant's). Its length must be declared and within
`limits.max_body_bytes` (411/413 before anything is sent); the body streams to the presigned URL
(upstream/store.py), one row `files.put` (cost 0). The store's 2xx is passed on; its error
becomes an OpenAI-shaped error with the store's status, so a failed upload never looks done.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Protocol

import orjson
from aiohttp import web

from proxy.core.auth import Principal
from proxy.core.routes import ID_RE, Match
from proxy.core.uploads import (
    FORM_CT,
    MAX_TOKEN,
    StoreURL,
    UploadGrant,
    open_grant,
    sign_grant,
    store_url,
    upload_form,
)
from proxy.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    InvalidTarget,
    LengthRequired,
    MeterError,
    NotReady,
    ObjectStoreError,
    UploadTokenInvalid,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from proxy.ledger import LedgerRow, OwnedFile, now_us
from proxy.server.passthrough import Outbound, Passthrough, respond
from proxy.server.relay import Relay
from proxy.server.responses import error_response
from proxy.upstream.client import UpstreamResponse
from proxy.upstream.store import BodySourceError, ObjectStore

log = logging.getLogger(__name__)
UPLOAD_PATH = "/v1/files/uploads/"
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?\Z")
_S3_FIELD = re.compile(rb"<(Code|Message)>([^<]{0,200})</")


class FileOwners(Protocol):
    async def add_file(self, f: OwnedFile) -> bool: ...

    async def file_owner(self, file_id: str) -> str | None: ...


class UploadRelay:
    """`POST /v1/files` and the relayed PUT; see the module docstring."""

    def __init__(
        self, relay: Relay, passthrough: Passthrough, owners: FileOwners, store: ObjectStore, key: bytes
    ) -> None:
        self.relay, self.pt, self.owners, self.store = relay, passthrough, owners, store
        self._key = key  # HMAC key of the tokens (core/uploads.token_key); never logged

    # -- POST /v1/files ---------------------------------------------------------------------

    async def create(
        self, request: web.Request, principal: Principal, match: Match, body: bytes
    ) -> web.StreamResponse:
        """Forward the upload request (`body`, already read); the 302's file becomes the
        caller's, its Location ours."""
        base = self._public_base(request) if self.relay.config.files.relay_uploads else None
        form = upload_form(request.headers.get("Content-Type", ""), body, match.target.query)
        pt = self.pt
        row = await pt.begin(request, principal, match.route.name, 0)
        try:
            out = Outbound("POST", match.upstream_path, "", form, FORM_CT)
            up = await pt.send(request, row, out)
            data = await pt.read(row, up, 0, settle=False)
            if not 300 <= up.status < 400:
                await pt.settle(row, up, 0)
                return await self._not_redirected(up, data, principal, row)
            file_id, location = await self._redirect(row, up, principal, base)
        finally:
            await pt.close(row)
        await self._own(file_id, principal)
        headers = {"Location": location, "X-Together-File-Id": file_id, "x-request-id": row.request_id}
        return web.Response(status=up.status, headers=headers)

    def _public_base(self, request: web.Request) -> str:
        """Where clients reach the proxy: `files.public_url`, else this request's own origin."""
        public = self.relay.config.files.public_url
        if public:
            return public
        host = request.headers.get("Host", "")
        if not _HOST_RE.match(host):
            raise InvalidTarget(
                "The Host header must name this proxy (host[:port]) to build the upload URL; "
                "the operator can set files.public_url instead."
            )
        return f"{'https' if request.secure else 'http'}://{host}"

    async def _redirect(
        self, row: LedgerRow, up: UpstreamResponse, principal: Principal, base: str | None
    ) -> tuple[str, str]:
        """The new file's id and the Location for the client; the row made terminal."""
        location, file_id = up.headers.get("location", ""), up.headers.get("x-together-file-id", "")
        try:
            if not ID_RE.match(file_id):
                raise ValueError("it names no valid X-Together-File-Id")
            store_url(location, self.relay.config.upstream.url)
            if base is not None:
                location = self._proxy_location(base, location, file_id, principal)
        except ValueError as exc:
            await self.pt.finish(row, "upstream_error", up.status, 0, UpstreamProtocolError.code)
            log.error("files: together's upload redirect for %s cannot be used: %s", principal.tenant, exc)
            raise UpstreamProtocolError(f"The upstream's upload redirect cannot be used: {exc}.") from None
        await self.pt.finish(row, "ok", up.status, 0, None)
        return file_id, location

    def _proxy_location(self, base: str, presigned: str, file_id: str, principal: Principal) -> str:
        expires = int(time.time() + self.relay.config.files.upload_token_ttl)
        grant = UploadGrant(presigned, principal.tenant, principal.key_id, file_id, expires)
        token = sign_grant(grant, self._key)
        if len(token) > MAX_TOKEN:
            raise ValueError("its presigned URL is too long to relay (set files.relay_uploads: false)")
        return base + UPLOAD_PATH + token

    async def _own(self, file_id: str, principal: Principal) -> None:
        """Record the caller as the file's owner, or refuse before the client uploads anything."""
        owned = OwnedFile(file_id, principal.tenant, principal.key_id, now_us(), "upload")
        try:
            added = await self.owners.add_file(owned)
            owner = principal.tenant if added else await self.owners.file_owner(file_id)
        except Exception:
            log.exception("files: could not record the owner of %s (%s)", file_id, principal.tenant)
            raise NotReady("The new file's owner could not be recorded; nothing was uploaded.") from None
        if owner != principal.tenant:
            log.error("files: together named file %s, which %s already owns", file_id, owner)
            raise UpstreamProtocolError("The upstream named a file that is not yours.")

    async def _not_redirected(
        self, up: UpstreamResponse, data: bytes, principal: Principal, row: LedgerRow
    ) -> web.Response:
        """together's answer as it came (a file it made at once is the caller's), except a
        duplicate (409) naming someone else's file."""
        made = _field(data, "id") if 200 <= up.status < 300 else None
        if made is not None and ID_RE.match(made):
            await self._own(made, principal)
        if up.status == 409:
            other = _field(data, "file_id")
            if other is not None and await self.owners.file_owner(other) != principal.tenant:
                return error_response(
                    BadRequest("together refused the upload as a duplicate.", code="file_exists"),
                    row.request_id,
                )
        return respond(up, data, row.request_id)

    # -- PUT /v1/files/uploads/{token} ------------------------------------------------------

    async def put(self, request: web.Request, match: Match) -> web.StreamResponse:
        """Check the token and the length, stream the bytes to the store, relay its answer."""
        grant = open_grant(match.params["token"], self._key, time.time())
        principal = self._uploader(request, grant)
        url = self._store_url(grant)
        length = self._length(request)
        if not self.relay.accepting:
            raise NotReady("The proxy is shutting down; retry on another instance.")
        pt = self.pt
        row = await pt.begin(request, principal, match.route.name, 0)
        try:
            up = await self._send(request, row, url, length)
            data = await pt.read(row, up, 0)
        finally:
            await pt.close(row)
        if 200 <= up.status < 300:
            headers = {"x-request-id": row.request_id}
            if "etag" in up.headers:
                headers["ETag"] = up.headers["etag"]
            return web.Response(status=up.status, body=data, headers=headers)
        log.warning("files: the object store refused an upload of %s: %d", grant.file_id, up.status)
        return error_response(_store_error(up.status, data), row.request_id)

    def _uploader(self, request: web.Request, grant: UploadGrant) -> Principal:
        """The token's tenant, if it and the key it was issued to are still configured; an
        Authorization header, if sent, must be a key of that same tenant."""
        tenant = self.relay.config.tenants.get(grant.tenant)
        if tenant is None or not any(d.startswith(grant.key_id) for d in tenant.key_digests):
            raise UploadTokenInvalid("This upload URL is not valid.")
        if "Authorization" in request.headers and self.relay.authenticate(request).tenant != grant.tenant:
            raise UploadTokenInvalid("This upload URL was issued to another tenant.")
        return Principal(grant.tenant, grant.key_id)

    def _store_url(self, grant: UploadGrant) -> StoreURL:
        try:
            return store_url(grant.url, self.relay.config.upstream.url)
        except ValueError:  # the upstream changed since the token was made
            raise UploadTokenInvalid("This upload URL is no longer valid; start the upload again.") from None

    def _length(self, request: web.Request) -> int:
        length = request.content_length
        if length is None:
            raise LengthRequired("Send the upload with a Content-Length header (the object store needs it).")
        limit = self.relay.config.limits.max_body_bytes
        if length > limit:
            raise BodyTooLarge(f"The upload of {length} bytes exceeds the limit of {limit} bytes.")
        return length

    async def _send(
        self, request: web.Request, row: LedgerRow, url: StoreURL, length: int
    ) -> UpstreamResponse:
        """The store's answer; any failure first makes the row terminal (nothing was stored)."""
        try:
            return await self.store.put(url, length, self._chunks(request, length))
        except BodySourceError:
            await self.pt.finish(row, "client_aborted", None, 0, "client_gone")
            raise BadRequest("The upload ended before its Content-Length.", code="incomplete_body") from None
        except MeterError as exc:
            if isinstance(exc, BodyTimeout):
                status = "client_aborted"
            else:
                status = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"
            await self.pt.finish(row, status, None, 0, exc.code)
            raise

    async def _chunks(self, request: web.Request, length: int) -> AsyncIterator[bytes]:
        """The client's body as it arrives: each gap within `limits.body_timeout`, the whole
        within `upstream.total_timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.relay.config.upstream.total_timeout
        gap = self.relay.config.limits.body_timeout
        left = length
        while left > 0:
            try:
                async with asyncio.timeout(max(0.0, min(gap, deadline - loop.time()))):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise BodyTimeout(f"The upload stalled for {gap:g} s or ran out of time.") from None
            except Exception as exc:
                raise BodySourceError(str(exc)) from exc
            if not chunk:
                raise BodySourceError("the client sent fewer bytes than its Content-Length")
            left -= len(chunk)
            yield chunk


def _store_error(status: int, data: bytes) -> ObjectStoreError:
    """The store's refusal with its status and, from an S3-style XML body, its code and message."""
    found = [value.decode("latin-1") for _, value in _S3_FIELD.findall(data)]
    reason = f": {', '.join(found)}" if found else ""
    return ObjectStoreError(f"The object store refused the upload ({status}{reason}).", status=status)


def _field(data: bytes, name: str) -> str | None:
    """A string field of a JSON object answer, if there is one."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    value = obj.get(name) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


__all__ = ["UPLOAD_PATH", "FileOwners", "UploadRelay"]
