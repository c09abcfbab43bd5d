"""The route table: every together.ai route a tenant may call, and how the proxy treats it.

Pure: no aiohttp, no I/O. `parse_target` turns the raw request target (still percent-encoded,
as the client sent it) into validated parts or refuses it; `ROUTES.resolve` names the route.
What goes upstream is rebuilt from the route's pattern and validated parameters only, so no
client byte reaches the upstream's request line unchecked (docs/security.md).

Kinds:
  inference  metered: priced from the answer's usage (chat, completions, embeddings, rerank)
  unit       metered in together's other units: megapixels or images (images), seconds of audio
             (speech, transcriptions, translations) or video (videos); proxy/core/units.py
  object     tenant-owned files and batches: ownership checked, one ledger row (cost 0);
             their lists are filtered to the caller's own objects (no row). One of them,
             the PUT of an upload's bytes, is authorised by the signed token in its path
             (`Route.token`) instead of a tenant key
  catalogue  read-only listings of models: passed through, no row
  operator   acts on the operator's account (fine-tunes, endpoints, ...): 403 unless the
             config grants it to the tenant, then forwarded with a ledger row (cost unknown)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from proxy.errors import InvalidTarget, MethodNotAllowed

Kind = Literal["inference", "unit", "object", "catalogue", "operator"]
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# after percent-decoding, a path segment may hold only these (no '/', '?', '#', '%', '\\')
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=-]+\Z")
_QUERY_RE = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=/?%-]*\Z")
_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ABSOLUTE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_VERSION_RE = re.compile(r"^v[0-9]{1,3}\Z")
# together's object ids (file-..., batch uuids, ft-...): anything else cannot exist upstream
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


@dataclass(frozen=True, slots=True)
class Target:
    """A validated request target: decoded path segments and the raw (encoded) query."""

    segments: tuple[str, ...]
    query: str  # percent-encoded as sent; only visible ASCII, no control byte once decoded

    @property
    def path(self) -> str:
        return "/" + "/".join(self.segments)


def parse_target(raw: str) -> Target:
    """Validate the raw request target (origin- or absolute-form) or raise InvalidTarget.

    Absolute-form (`http://host/path`) is accepted and its authority ignored: the upstream
    comes only from config. Refused: bytes outside visible ASCII (raw or percent-encoded),
    malformed escapes, empty segments (`//`), dot segments (`.`, `..`, `%2e%2e`), and
    encoded '/', '?', '#', '%' or '\\' inside a segment. A doubled leading version
    (`/v1/v1/...`, `/v1/v2/...`) is then undone: see `undouble_version`.
    """
    if not raw.isascii() or any(c <= " " or c == "\x7f" for c in raw):
        raise InvalidTarget("The request target may contain only visible ASCII characters.")
    absolute = _ABSOLUTE_RE.match(raw)
    if absolute is not None:
        raw = raw[absolute.end() :] or "/"
    path, _, query = raw.partition("?")
    if "#" in raw or not path.startswith("/"):
        raise InvalidTarget("The request target must be a path starting with '/', without a fragment.")
    if _PCT_RE.search(raw):
        raise InvalidTarget("The request target has a malformed percent-escape.")
    segments = tuple(_segment(s) for s in path[1:].split("/")) if path != "/" else ()
    if query and (not _QUERY_RE.match(query) or not _visible(_unquote(query))):
        raise InvalidTarget("The query string may contain only visible ASCII characters.")
    return Target(undouble_version(segments), query)


def undouble_version(segments: tuple[str, ...]) -> tuple[str, ...]:
    """`/v1/v1/...` -> `/v1/...` and `/v1/v2/...` -> `/v2/...`: a leading `v1` followed by a
    version segment (`v` + digits) is dropped, once. together SDK 3.x paths carry their own
    version, so a 3.x client given the base URL `http://proxy/v1` sends `/v1/v1/chat/completions`
    (and `/v1/v2/...`); it is served as the path it meant. Runs on validated segments only."""
    if len(segments) > 1 and segments[0] == "v1" and _VERSION_RE.match(segments[1]):
        return segments[1:]
    return segments


def _segment(raw: str) -> str:
    value = _unquote(raw) if "%" in raw else raw
    if not value:
        raise InvalidTarget("The request path has an empty segment ('//' or a trailing '/').")
    if value in (".", ".."):
        raise InvalidTarget("The request path may not contain '.' or '..' segments.")
    if not _SEGMENT_RE.match(value):
        raise InvalidTarget(
            "A path segment may contain only letters, digits and -._~:@!$&'()*+,;= (after percent-decoding)."
        )
    return value


def _unquote(text: str) -> str:
    """Percent-decoding to latin-1 characters (one per byte), so any byte is seen as itself."""
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _visible(text: str) -> bool:
    return all("!" <= c <= "~" for c in text)


@dataclass(frozen=True, slots=True)
class Route:
    """One together.ai route as the proxy treats it; `name` is the ledger's endpoint."""

    method: str
    pattern: str  # e.g. /v1/files/{id}/content
    kind: Kind
    name: str
    query: frozenset[str] = frozenset()  # parameters passed upstream; others are dropped
    token: bool = False  # authorised by a signed token in the path, not a tenant key (uploads)
    upstream: str | None = None  # the upstream's pattern, where it differs from `pattern`

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.pattern[1:].split("/"))

    def upstream_path(self, params: dict[str, str]) -> str:
        """The path sent upstream: the pattern filled with validated parameters only."""
        parts = self.parts if self.upstream is None else tuple(self.upstream[1:].split("/"))
        return "/" + "/".join(params[p[1:-1]] if p.startswith("{") else p for p in parts)


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: dict[str, str]
    target: Target

    @property
    def upstream_path(self) -> str:
        return self.route.upstream_path(self.params)

    @property
    def upstream_query(self) -> str:
        """The validated query cut to the route's known parameters (raw, still encoded)."""
        if not self.target.query or not self.route.query:
            return ""
        keep = self.route.query
        return "&".join(p for p in self.target.query.split("&") if _unquote(p.partition("=")[0]) in keep)


class RouteTable:
    """Routes by pattern; `resolve` matches a validated target (literal parts exactly)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._by_len: dict[int, list[Route]] = {}
        for route in self.routes:
            self._by_len.setdefault(len(route.parts), []).append(route)

    def resolve(self, method: str, target: Target) -> Match | None:
        """The route for `method` and `target`; None if no pattern matches the path.

        Raises MethodNotAllowed when the path is known but not with this method.
        """
        allowed: list[str] = []
        for route in self._by_len.get(len(target.segments), ()):
            params = _match(route.parts, target.segments)
            if params is None:
                continue
            if route.method == method:
                return Match(route, params, target)
            allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed(
                f"{method} is not allowed on {target.path}; use {' or '.join(sorted(set(allowed)))}."
            )
        return None


def _match(parts: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for part, seg in zip(parts, segments, strict=True):
        if part.startswith("{"):
            params[part[1:-1]] = seg
        elif part != seg:
            return None
    return params


def _routes(kind: Kind, *entries: tuple[str, str, str] | tuple[str, str, str, str]) -> list[Route]:
    """Routes from (method, pattern, name[, "space separated query parameters"])."""
    return [
        Route(e[0], e[1], kind, e[2], frozenset(e[3].split()) if len(e) > 3 else frozenset()) for e in entries
    ]


# The together.ai routes the SDKs call. Inference routes are also registered with aiohttp
# directly (the hot path); everything else is dispatched from this table.
ROUTES = RouteTable(
    [
        *_routes(
            "inference",
            ("POST", "/v1/chat/completions", "chat"),
            ("POST", "/v1/completions", "completions"),
            ("POST", "/v1/embeddings", "embeddings"),
            ("POST", "/v1/rerank", "rerank"),
        ),
        *_routes(
            "unit",
            ("POST", "/v1/images/generations", "images"),
            ("POST", "/v1/audio/speech", "audio.speech"),
            ("POST", "/v1/audio/transcriptions", "audio.transcriptions"),
            ("POST", "/v1/audio/translations", "audio.translations"),
            ("POST", "/v2/videos", "videos"),
        ),
        *_routes(
            "catalogue",
            ("GET", "/v1/models", "models.list", "dedicated"),
            ("GET", "/v2/projects/{project}/models", "models.list", "dedicated"),
        ),
        *_routes(
            "object",
            ("GET", "/v1/files", "files.list", "limit after purpose"),
            ("GET", "/v1/batches", "batches.list", "limit after"),
            ("POST", "/v1/files/upload", "files.upload"),
            ("POST", "/v1/files", "files.create"),  # the SDKs' upload: 302 to a presigned URL
            ("POST", "/v1/files/{id}/preprocess", "files.preprocess"),
            ("GET", "/v1/files/{id}", "files.retrieve"),
            ("DELETE", "/v1/files/{id}", "files.delete"),
            ("GET", "/v1/files/{id}/content", "files.content"),
            ("POST", "/v1/batches", "batches.create"),
            ("GET", "/v1/batches/{id}", "batches.retrieve"),
            ("POST", "/v1/batches/{id}/cancel", "batches.cancel"),
            ("GET", "/v2/videos/{id}", "videos.retrieve"),
        ),
        # the PUT of an upload's bytes, relayed to together's object store (core/uploads.py)
        Route("PUT", "/v1/files/uploads/{token}", "object", "files.put", token=True),
        # the npm together-ai SDK with a custom baseURL sends videos under /v1: together serves /v2
        Route("POST", "/v1/videos", "unit", "videos", upstream="/v2/videos"),
        Route("GET", "/v1/videos/{id}", "object", "videos.retrieve", upstream="/v2/videos/{id}"),
        *_routes(
            "operator",
            ("GET", "/v1/fine-tunes", "fine-tunes.list"),
            ("POST", "/v1/fine-tunes", "fine-tunes.create"),
            ("GET", "/v1/fine-tunes/{id}", "fine-tunes.retrieve"),
            ("DELETE", "/v1/fine-tunes/{id}", "fine-tunes.delete"),
            ("POST", "/v1/fine-tunes/{id}/cancel", "fine-tunes.cancel"),
            ("GET", "/v1/fine-tunes/{id}/events", "fine-tunes.events"),
            ("GET", "/v1/fine-tunes/{id}/checkpoints", "fine-tunes.checkpoints"),
            ("GET", "/v1/finetune/download", "fine-tunes.download"),
            ("GET", "/v1/endpoints", "endpoints.list"),
            ("POST", "/v1/endpoints", "endpoints.create"),
            ("GET", "/v1/endpoints/{id}", "endpoints.retrieve"),
            ("PATCH", "/v1/endpoints/{id}", "endpoints.update"),
            ("DELETE", "/v1/endpoints/{id}", "endpoints.delete"),
            ("GET", "/v1/hardware", "hardware.list"),
            ("POST", "/v1/models", "models.upload"),
            ("GET", "/v1/jobs", "jobs.list"),
            ("GET", "/v1/jobs/{id}", "jobs.retrieve"),
            ("POST", "/v1/evaluation", "evaluations.create"),
            ("GET", "/v1/evaluation", "evaluations.list"),
            ("GET", "/v1/evaluation/{id}", "evaluations.retrieve"),
            ("GET", "/v1/evaluation/{id}/status", "evaluations.status"),
        ),
    ]
)

# together.ai's inference paths: where `upstream.inference_url` is set, these go there (together's
# SDK 3.x sends inference to api-inference.together.ai; dedicated endpoints answer there); files,
# batches, models, videos and the operator's routes stay on `upstream.url`. Listed whether or not
# the table above serves them yet, so a route added later goes to the right host.
INFERENCE_HOST_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)

# Ledger endpoints of object routes: together bills nothing for them (cost 0, usage "none"
# is expected, not unknown)
OBJECT_ENDPOINTS = frozenset(r.name for r in ROUTES.routes if r.kind == "object")


@dataclass(frozen=True, slots=True)
class Grant:
    """One `tenants.<t>.routes` entry: `METHOD /path` with `*` for one segment, a final
    `**` for any rest (zero or more segments), and `*` as method for any method."""

    method: str
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Grant:
        """`GET /v1/fine-tunes/*`; raises ValueError saying what is wrong."""
        method, _, path = text.strip().partition(" ")
        method, path = method.upper(), path.strip()
        if method != "*" and method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(sorted(METHODS))} or *, got {method!r}")
        if not path.startswith("/") or path == "/":
            raise ValueError(f"path must start with '/', got {path!r}")
        parts = tuple(path[1:].split("/"))
        for i, part in enumerate(parts):
            if part == "**" and i != len(parts) - 1:
                raise ValueError("'**' may only end the path")
            if part not in ("*", "**") and not _SEGMENT_RE.match(part):
                raise ValueError(f"invalid path segment {part!r}")
            if part in (".", ".."):
                raise ValueError("'.' and '..' segments are not allowed")
        return cls(method, parts)

    def allows(self, method: str, target: Target) -> bool:
        if self.method not in ("*", method):
            return False
        segs, parts = target.segments, self.parts
        if parts and parts[-1] == "**":
            return len(segs) >= len(parts) - 1 and _glob(parts[:-1], segs[: len(parts) - 1])
        return len(segs) == len(parts) and _glob(parts, segs)

    def __str__(self) -> str:
        return f"{self.method} /{'/'.join(self.parts)}"


_HEADER_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*\Z")


def check_header_values(headers: Mapping[str, str], names: Iterable[str]) -> None:
    """Refuse (400) a forwarded header whose value holds anything but visible ASCII, space or tab."""
    for name in names:
        value = headers.get(name)
        if value is not None and not _HEADER_VALUE_RE.match(value):
            raise InvalidTarget(f"The {name} header may contain only visible ASCII characters.")


def _glob(parts: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    return all(p == "*" or p == s for p, s in zip(parts, segments, strict=True))
