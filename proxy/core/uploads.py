"""The together SDKs' presigned upload, made safe to relay: the form, the store URL, the token.

Pure: no aiohttp, no I/O. The SDKs' `files.upload` sends `POST /v1/files` (a small form:
purpose, file_name, file_type, and in 2.x/3.x a checksum), together answers 302 with a presigned
object-store URL in `Location` and the new id in `X-Together-File-Id`, the SDK PUTs the bytes
there (without an API key) and then calls `POST /v1/files/{id}/preprocess`.

- `upload_form` rebuilds the form from its known fields only, as `x-www-form-urlencoded` (the
  body the 1.x and npm SDKs send). The checksum is left out on purpose: together deduplicates
  uploads by checksum across the whole account, and its answer (409 with the existing file's
  id) would tell one tenant that another uploaded the same bytes.
- `store_url` accepts the `Location` only as an absolute https URL (or plain http on the
  upstream's own origin, e.g. the simulator) of visible ASCII, without user info or fragment.
- An upload token is `<payload>.<mac>` in base64url: the payload (zlib-compressed JSON) names
  the presigned URL, the tenant, its key id, the file id and an expiry; the mac is
  HMAC-SHA256 under a key derived from the operator's together key, so any worker or replica
  holding that key can check a token without shared state. The token is signed, not
  encrypted: its holder can read the presigned URL (docs/security.md).

The OpenAI SDKs' `files.create` sends `POST /v1/files` too, but as multipart/form-data with the
bytes in a `file` part and a `purpose`. `openai_upload` tells that form apart (a `file` part with
a filename) and rebuilds it as together's multipart `POST /v1/files/upload` (file, file_name,
purpose, file_type), OpenAI's purpose `batch` becoming together's `batch-api`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from proxy.core.multipart import parse_form
from proxy.errors import BadRequest, InvalidField, UploadTokenInvalid

FORM_CT = "application/x-www-form-urlencoded"
UPLOAD_FIELDS = ("purpose", "file_name", "file_type")  # what together's POST /v1/files reads
MAX_FIELD = 512  # characters of one form value
MAX_TOKEN = 7000  # characters: the PUT request line must stay under aiohttp's 8190 bytes
_MAX_PAYLOAD = 16 * 1024  # bytes a token's payload may inflate to
_KEY_LABEL = b"together-meter upload token v1"
_VISIBLE = re.compile(r"^[\x21-\x7e]+\Z")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])\Z")
_B64 = re.compile(r"^[A-Za-z0-9_-]+\Z")


# -- the form ---------------------------------------------------------------------------------


def upload_form(content_type: str, body: bytes, query: str = "") -> bytes:
    """The urlencoded form sent upstream: UPLOAD_FIELDS from the body (multipart or urlencoded),
    else from the query string (the npm SDK sends both). BadRequest for a body of another kind."""
    fields = _form_fields(content_type, body)
    try:
        for name, given in parse_qsl(query, keep_blank_values=True, errors="strict"):
            fields.setdefault(name, given)
    except ValueError:
        raise BadRequest("The query string of POST /v1/files is not valid UTF-8.") from None
    kept = []
    for name in UPLOAD_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if len(value) > MAX_FIELD or not value.isprintable():
            raise BadRequest(f"The form field '{name}' must be printable text (<= {MAX_FIELD} characters).")
        kept.append((name, value))
    return urlencode(kept).encode("ascii")


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    kind = content_type.split(";", 1)[0].strip().lower()
    if not body.strip():
        return {}
    try:
        if kind == FORM_CT:
            return dict(parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="strict"))
        if kind == "multipart/form-data":
            return _multipart(content_type, body)
    except (UnicodeDecodeError, ValueError):
        pass
    raise BadRequest("POST /v1/files takes a multipart/form-data or x-www-form-urlencoded form.")


def _multipart(content_type: str, body: bytes) -> dict[str, str]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser().parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("not multipart")
    fields: dict[str, str] = {}
    for part in message.get_payload():
        assert isinstance(part, Message)
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes) and part.get_filename() is None:
            fields.setdefault(name, payload.decode("utf-8"))
    return fields


# -- OpenAI's files.create --------------------------------------------------------------------

TOGETHER_UPLOAD_PATH = "/v1/files/upload"  # together's multipart upload (the spec's /files/upload)
OPENAI_PURPOSES = {"batch": "batch-api"}  # OpenAI's purpose -> together's; others pass as sent
FILE_TYPES = ("jsonl", "parquet", "csv")  # together's FileType, read from the file name


@dataclass(frozen=True, slots=True)
class OpenAIUpload:
    """An OpenAI `files.create` form rebuilt for together's `POST /v1/files/upload`."""

    body: bytes
    content_type: str
    purpose: str  # as the client sent it: its answer says the same


def openai_upload(content_type: str, body: bytes, boundary: str | None = None) -> OpenAIUpload | None:
    """The OpenAI SDKs' multipart `files.create` (a `file` part with a filename, a `purpose`)
    rebuilt from those two only; None for any other body (the together SDKs' presigned form)."""
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        return None
    try:
        form = parse_form(body, content_type)
    except InvalidField:
        return None
    part = form.files.get("file")
    if part is None:
        return None
    purpose = form.fields.get("purpose", "")
    name = part.filename
    if not purpose or len(purpose) > MAX_FIELD or not purpose.isprintable():
        raise InvalidField("The upload needs a 'purpose' (batch for a batch input file).")
    if not name or len(name) > MAX_FIELD or not name.isprintable() or '"' in name or "\\" in name:
        raise InvalidField("The 'file' part needs a printable filename without quotes or backslashes.")
    fields = [("file_name", name), ("purpose", OPENAI_PURPOSES.get(purpose, purpose))]
    extension = name.rpartition(".")[2].lower()
    if extension in FILE_TYPES:
        fields.append(("file_type", extension))
    boundary = boundary or f"together-meter-{secrets.token_hex(16)}"
    if f"--{boundary}".encode("ascii") in part.data:  # only a caller-chosen boundary can collide
        raise ValueError("the boundary occurs in the file")
    head = f"--{boundary}\r\nContent-Disposition: form-data; name="
    chunks = [f'{head}"{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    chunks.append(
        f'{head}"file"; filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
    )
    chunks += [part.data, f"\r\n--{boundary}--\r\n".encode("ascii")]
    return OpenAIUpload(b"".join(chunks), f"multipart/form-data; boundary={boundary}", purpose)


# -- the object-store URL ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreURL:
    """Where a presigned PUT goes: origin parts and the request target, exactly as signed."""

    scheme: str
    host: str
    port: int
    target: str  # path and query, still percent-encoded as the signer made them

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.scheme == "https" else 80)
        return host if default else f"{host}:{self.port}"


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, lower-cased, with the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def store_url(location: str, upstream_url: str) -> StoreURL:
    """The presigned URL of an upstream's `Location`, or ValueError saying why it is refused."""
    if not _VISIBLE.match(location):
        raise ValueError("it holds a byte outside visible ASCII")
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("it is not an absolute http(s) URL")
    if "@" in parts.netloc or parts.fragment or "#" in location:
        raise ValueError("it has user info or a fragment")
    host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    if not _HOST.match(host):
        raise ValueError("its host is not a plain name or address")
    origin = origin_of(location)  # raises ValueError on a bad port
    if scheme == "http" and origin != origin_of(upstream_url):
        raise ValueError("plain http is accepted only on the upstream's own origin")
    path = parts.path or "/"
    if not path.startswith("/"):
        raise ValueError("its path does not start with '/'")
    return StoreURL(scheme, origin[1], origin[2], path + (f"?{parts.query}" if parts.query else ""))


# -- the token --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadGrant:
    """What a token carries: this tenant (key) may PUT file `file_id`'s bytes to `url` until
    `expires` (unix seconds)."""

    url: str
    tenant: str
    key_id: str
    file_id: str
    expires: int


def token_key(secret: str) -> bytes:
    """The token key derived from a secret every worker and replica has (the together key)."""
    return hmac.new(secret.encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()


def sign_grant(grant: UploadGrant, key: bytes) -> str:
    payload = orjson.dumps([1, grant.url, grant.tenant, grant.key_id, grant.file_id, grant.expires])
    body = _b64(zlib.compress(payload, 9))
    return f"{body}.{_mac(key, body)}"


def open_grant(token: str, key: bytes, now: float) -> UploadGrant:
    """The grant of a token made by `sign_grant` with `key`; UploadTokenInvalid for a forged,
    damaged or expired one (the message never says which byte was wrong)."""
    body, _, mac = token.partition(".")
    if len(token) > MAX_TOKEN or not _B64.match(body) or not _B64.match(mac):
        raise UploadTokenInvalid("This upload URL is not valid.")
    if not hmac.compare_digest(_mac(key, body), mac):
        raise UploadTokenInvalid("This upload URL is not valid.")
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)), _MAX_PAYLOAD)
        version, url, tenant, key_id, file_id, expires = orjson.loads(raw)
    except (ValueError, TypeError, zlib.error, binascii.Error):
        raise UploadTokenInvalid("This upload URL is not valid.") from None
    fields = (url, tenant, key_id, file_id)
    if version != 1 or not all(isinstance(f, str) for f in fields) or type(expires) is not int:
        raise UploadTokenInvalid("This upload URL is not valid.")
    if now >= expires:
        raise UploadTokenInvalid(
            "This upload URL has expired; start the upload again.", code="upload_token_expired"
        )
    return UploadGrant(url, tenant, key_id, file_id, expires)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mac(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, body.encode("ascii"), hashlib.sha256).digest())


__all__ = [
    "FILE_TYPES",
    "FORM_CT",
    "MAX_TOKEN",
    "OPENAI_PURPOSES",
    "TOGETHER_UPLOAD_PATH",
    "UPLOAD_FIELDS",
    "OpenAIUpload",
    "StoreURL",
    "UploadGrant",
    "open_grant",
    "openai_upload",
    "origin_of",
    "sign_grant",
    "store_url",
    "token_key",
    "upload_form",
]
