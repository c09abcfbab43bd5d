"""proxy/core/uploads.py: the rebuilt upload form, the store URL check and the upload token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import zlib
from email.message import Message
from email.parser import BytesParser
from urllib.parse import parse_qsl

import httpx
import orjson
import pytest

from proxy.core.routes import ROUTES, parse_target
from proxy.core.uploads import (
    FORM_CT,
    MAX_TOKEN,
    UploadGrant,
    open_grant,
    openai_upload,
    sign_grant,
    store_url,
    token_key,
    upload_form,
)
from proxy.errors import BadRequest, InvalidField, UploadTokenInvalid

KEY = token_key("sk-operator")
PRESIGNED = (
    "https://bucket.s3.us-west-2.amazonaws.com/files/file-1?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIA%2F20261205%2Fus-west-2%2Fs3%2Faws4_request&X-Amz-Date=20261205T000000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=" + "ab" * 32
)
GRANT = UploadGrant(PRESIGNED, "acme", "1a2b3c4d", "file-1", 2_000_000_000)


def multipart(fields: dict[str, str], file: bytes | None = None) -> tuple[str, bytes]:
    """A multipart/form-data body as httpx (the 2.x/3.x SDKs' client) writes it."""
    files = {"file": ("x.jsonl", file)} if file is not None else {"": ("", b"")}
    request = httpx.Request("POST", "http://proxy/v1/files", data=fields, files=files)
    return request.headers["content-type"], request.read()


def test_multipart_form_becomes_urlencoded_without_the_checksum() -> None:
    """The 2.x/3.x SDK's multipart form goes upstream as urlencoded purpose/file_name/file_type
    only: the checksum (together's cross-account dedup key) and anything else are dropped."""
    fields = {
        "purpose": "batch-api",
        "file_name": "in put.jsonl",
        "file_type": "jsonl",
        "checksum": "0" * 64,
        "extra": "x",
    }
    ctype, body = multipart(fields, file=b"file bytes are not form fields")
    out = upload_form(ctype, body)
    assert parse_qsl(out.decode()) == [
        ("purpose", "batch-api"),
        ("file_name", "in put.jsonl"),
        ("file_type", "jsonl"),
    ]


def test_urlencoded_form_and_query_fallback() -> None:
    """The 1.x/npm urlencoded body is kept (known fields); a field only in the query is used."""
    out = upload_form(FORM_CT, b"purpose=fine-tune&file_name=a.jsonl&checksum=abc", "file_type=jsonl&x=1")
    assert out == b"purpose=fine-tune&file_name=a.jsonl&file_type=jsonl"
    body_wins = upload_form(FORM_CT, b"purpose=batch-api", "purpose=fine-tune")
    assert body_wins == b"purpose=batch-api"
    assert upload_form("", b"", "") == b""


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("application/json", b'{"purpose": "batch-api"}'),
        ("multipart/form-data; boundary=zzz", b"not a multipart body"),
        (FORM_CT, b"file_name=%FF%FE"),
    ],
)
def test_other_bodies_are_refused(ctype: str, body: bytes) -> None:
    """A body that is not a form this route knows is 400, before anything is forwarded."""
    with pytest.raises(BadRequest):
        upload_form(ctype, body)


def test_control_characters_in_a_field_are_refused() -> None:
    with pytest.raises(BadRequest, match="file_name"):
        upload_form(FORM_CT, b"file_name=a%0D%0AX:%20y.jsonl")


def parts_of(content_type: str, body: bytes) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, bytes) of each part, read with the standard library's MIME parser."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser().parsebytes(head + body)
    out = []
    for part in message.get_payload():
        assert isinstance(part, Message)
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((str(part.get_param("name", header="content-disposition")), part.get_filename(), payload))
    return out


def openai_form(
    purpose: str | None, name: str = "batch.jsonl", data: bytes = b'{"a": 1}\n'
) -> tuple[str, bytes]:
    """openai-python's files.create body (httpx multipart), with a field it may add."""
    fields = {"expires_after[anchor]": "created_at"} | ({"purpose": purpose} if purpose is not None else {})
    request = httpx.Request("POST", "http://proxy/v1/files", data=fields, files={"file": (name, data)})
    return request.headers["content-type"], request.read()


def test_openai_form_becomes_togethers_multipart_upload() -> None:
    """OpenAI's files.create form is rebuilt as together's /v1/files/upload form: file_name,
    purpose (batch -> batch-api), file_type from the name, the file's bytes exactly; other
    fields dropped. The answer keeps the purpose the client sent."""
    data = b'{"custom_id": "x"}\r\n--not-a-boundary\r\n' + bytes(range(256))
    ctype, body = openai_form("batch", data=data)
    form = openai_upload(ctype, body, boundary="b-1")
    assert form is not None and form.purpose == "batch"
    assert form.content_type == "multipart/form-data; boundary=b-1"
    assert parts_of(form.content_type, form.body) == [
        ("file_name", None, b"batch.jsonl"),
        ("purpose", None, b"batch-api"),
        ("file_type", None, b"jsonl"),
        ("file", "batch.jsonl", data),
    ]
    tuned = openai_upload(*openai_form("fine-tune", "train.parquet"))
    assert tuned is not None and tuned.content_type.startswith(
        "multipart/form-data; boundary=together-meter-"
    )
    assert [p[:2] for p in parts_of(tuned.content_type, tuned.body)][:3] == [
        ("file_name", None),
        ("purpose", None),
        ("file_type", None),
    ]
    assert parts_of(tuned.content_type, tuned.body)[1][2] == b"fine-tune"
    other = openai_upload(*openai_form("batch", "notes.txt"))  # no known type: together's default
    assert other is not None and [p[0] for p in parts_of(other.content_type, other.body)] == [
        "file_name",
        "purpose",
        "file",
    ]


def test_other_forms_are_not_openais() -> None:
    """The together SDKs' presigned forms (urlencoded; multipart without a `file` part, as 2.x/3.x
    send it), a malformed multipart body: not OpenAI's upload (None)."""
    ctype, body = multipart({"purpose": "batch-api", "file_name": "a.jsonl", "file_type": "jsonl"})
    assert openai_upload(ctype, body) is None
    assert openai_upload(FORM_CT, b"purpose=batch-api&file_name=a.jsonl") is None
    assert openai_upload("multipart/form-data; boundary=x", b"--x\r\nno end") is None
    assert openai_upload("", b"") is None


@pytest.mark.parametrize(
    ("purpose", "name"),
    [
        (None, "a.jsonl"),
        ("", "a.jsonl"),
        ("bat\x00ch", "a.jsonl"),
        ("batch", "a\\b.jsonl"),
        ("batch", "x" * 600),
    ],
)
def test_an_incomplete_openai_form_is_refused(purpose: str | None, name: str) -> None:
    """No purpose, a purpose or filename that cannot be sent on as it is: InvalidField (400)."""
    with pytest.raises(InvalidField):
        openai_upload(*openai_form(purpose, name))


def test_store_url_keeps_the_signed_target_exactly() -> None:
    """An https presigned URL: origin parts, and path + query byte for byte (the signature)."""
    url = store_url(PRESIGNED, "https://api.together.xyz/v1")
    assert (url.scheme, url.host, url.port, url.authority) == (
        "https",
        "bucket.s3.us-west-2.amazonaws.com",
        443,
        "bucket.s3.us-west-2.amazonaws.com",
    )
    assert PRESIGNED.endswith(url.target) and url.target.startswith("/files/file-1?X-Amz-")
    local = store_url("http://127.0.0.1:8123/_sim/store/f?s=1", "http://127.0.0.1:8123/v1")
    assert (local.authority, local.target) == ("127.0.0.1:8123", "/_sim/store/f?s=1")
    assert store_url("https://[::1]:9000", "https://x").target == "/"


@pytest.mark.parametrize(
    "location",
    [
        "",
        "/relative/path",
        "ftp://store.example/x",
        "http://store.example/x",  # plain http, not the upstream's origin
        "http://127.0.0.1:8124/x",  # the upstream's host, another port
        "https://user:pw@store.example/x",
        "https://store.example/x#frag",
        "https://store.example/a b",
        "https://store.example/a\r\nX-Injected: 1",
        "https://store.example/\x00",
        "https://stor\u00e9.example/x",
        "https://store_example/x",
        "https://store.example:99999/x",
        "https:///x",
    ],
)
def test_store_url_refusals(location: str) -> None:
    """Only an absolute https URL (plain http on the upstream's own origin) of visible ASCII,
    without user info or fragment, may be relayed to."""
    with pytest.raises(ValueError):
        store_url(location, "http://127.0.0.1:8123/v1")


def test_token_round_trip_and_path_safety() -> None:
    """A token opens to its grant, fits one path segment the route table accepts, and resolves
    to the token route."""
    token = sign_grant(GRANT, KEY)
    assert open_grant(token, KEY, now=1_900_000_000) == GRANT
    assert len(token) < MAX_TOKEN
    match = ROUTES.resolve("PUT", parse_target("/v1/files/uploads/" + token))
    assert match is not None and match.route.token and match.params["token"] == token
    assert match.route.name == "files.put"


def test_the_token_key_is_derived_not_the_secret() -> None:
    """The key is an HMAC of the secret, so a token never holds or reveals the together key."""
    assert KEY != b"sk-operator" and len(KEY) == 32
    assert b"sk-operator" not in base64.urlsafe_b64decode(sign_grant(GRANT, KEY).split(".")[0] + "==")
    assert token_key("sk-other") != KEY


def _flip(text: str, at: int) -> str:
    return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]


def test_forged_and_damaged_tokens_are_refused() -> None:
    """Another key, a changed payload or mac, garbage, an overlong token: 403 invalid_upload_token."""
    token = sign_grant(GRANT, KEY)
    body, mac = token.split(".")
    bad = [
        sign_grant(GRANT, token_key("sk-someone-else")),
        _flip(body, 5) + "." + mac,
        body + "." + _flip(mac, 3),
        body,
        "." + mac,
        "x.y",
        token + "=",
        "A" * (MAX_TOKEN + 1),
    ]
    for forged in bad:
        with pytest.raises(UploadTokenInvalid) as err:
            open_grant(forged, KEY, now=1_900_000_000)
        assert err.value.code == "invalid_upload_token" and err.value.status == 403


def test_a_changed_grant_signed_elsewhere_is_refused() -> None:
    """Swapping in another tenant's name needs the key: a payload re-signed without it fails."""
    payload = orjson.dumps([1, PRESIGNED, "globex", "1a2b3c4d", "file-1", 2_000_000_000])
    body = base64.urlsafe_b64encode(zlib.compress(payload)).rstrip(b"=").decode()
    mac = hmac.new(b"guess", body.encode(), hashlib.sha256).digest()
    forged = body + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    with pytest.raises(UploadTokenInvalid):
        open_grant(forged, KEY, now=0)


def test_well_signed_but_malformed_payloads_are_refused() -> None:
    """Even with the right key, a payload of another version or shape opens to nothing."""
    for payload in (
        orjson.dumps([2, PRESIGNED, "acme", "k", "f", 2_000_000_000]),
        orjson.dumps([1, PRESIGNED, "acme", "k", "f", "2000000000"]),
        orjson.dumps({"u": PRESIGNED}),
        b"not json",
    ):
        body = base64.urlsafe_b64encode(zlib.compress(payload)).rstrip(b"=").decode()
        mac = hmac.new(KEY, body.encode(), hashlib.sha256).digest()
        token = body + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        with pytest.raises(UploadTokenInvalid, match="not valid"):
            open_grant(token, KEY, now=0)


def test_expired_token() -> None:
    """At or after its expiry a token is refused with its own code, so the client knows to restart."""
    token = sign_grant(GRANT, KEY)
    with pytest.raises(UploadTokenInvalid) as err:
        open_grant(token, KEY, now=GRANT.expires)
    assert err.value.code == "upload_token_expired"
    assert open_grant(token, KEY, now=GRANT.expires - 1).file_id == "file-1"
