"""proxy/core/routes.py: target validation, the route table, query cuts and route grants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.routes import (
    INFERENCE_HOST_PATHS,
    OBJECT_ENDPOINTS,
    ROUTES,
    Grant,
    InvalidTarget,
    check_header_values,
    parse_target,
    undouble_version,
)
from proxy.errors import MethodNotAllowed

REFUSED = [
    "/v1/models?x=%20HTTP/1.1%0D%0AHost:%20h%0D%0A%0D%0AGET%20/v1/SMUGGLED",
    "/v1/files/abc%0D%0AInjected:%20yes/content",
    "/v1/files/abc%0d%0a",
    "/v1/files/a%00",
    "/v1/files/a%7f",
    "/v1/files/a%20b",
    "/v1/files/%C3%A9",
    "/v1/files/a%2Fb",
    "/v1/files/a%2fb",
    "/v1/files/a%3F",
    "/v1/files/a%23",
    "/v1/files/a%25",
    "/v1/files/a%5C",
    "/v1/files/a%zz",
    "/v1/files/a%2",
    "/v1/files/../batches",
    "/v1/files/%2e%2e/batches",
    "/v1/files/%2E%2e/batches",
    "/v1/./models",
    "/v1/files/.",
    "//v1/models",
    "/v1//models",
    "/v1/models/",
    "/v1/models#frag",
    "v1/models",
    "*",
    "/v1/models?a=%0A",
    "/v1/models?a=%00",
    "/v1/models?a=%C3%A9",
    "/v1/models?a=%20",
    "/v1/models?a=b c",
    "/v1/models?a=%",
    "/v1/models?a=\x7f",
    "/v1/files/\xe9",
    "/v1/files/a\tb",
    "/v1/files/a\\b",
    '/v1/files/a"b',
    "/v1/files/a<b",
    "/v1/models?a=<script>",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_refused_targets(raw: str) -> None:
    """Controls, spaces, non-ASCII (raw or encoded), bad escapes, dot and empty segments and
    encoded separators are refused with 400 invalid_request."""
    with pytest.raises(InvalidTarget) as info:
        parse_target(raw)
    assert (info.value.status, info.value.code) == (400, "invalid_request")


def test_accepted_targets_decode_segments_and_keep_the_query_encoded() -> None:
    """Segments are percent-decoded (only to safe characters); the query stays as sent."""
    t = parse_target("/v1/files/file-%41bc/content?x=%250D")
    assert t.segments == ("v1", "files", "file-Abc", "content")
    assert t.path == "/v1/files/file-Abc/content"
    assert t.query == "x=%250D"


def test_absolute_form_ignores_the_authority() -> None:
    """`http://elsewhere/v1/models` is the path /v1/models: the authority never picks the upstream."""
    for raw in ("http://evil.example/v1/models", "https://u:p@evil:81/v1/models?dedicated=1"):
        t = parse_target(raw)
        assert t.path == "/v1/models"
    assert parse_target("http://evil.example").path == "/"


@given(st.text(min_size=1, max_size=40))
def test_whatever_is_accepted_is_safe_on_a_request_line(raw: str) -> None:
    """Any accepted target rebuilds to a path and query of visible ASCII, without dot segments."""
    try:
        t = parse_target("/" + raw)
    except InvalidTarget:
        return
    line = t.path + ("?" + t.query if t.query else "")
    assert all("!" <= c <= "~" for c in line), line
    assert ".." not in t.segments and "." not in t.segments and "" not in t.segments
    assert all("/" not in s and "?" not in s and "%" not in s for s in t.segments)


def test_resolve_names_routes_and_fills_patterns_from_validated_parts() -> None:
    """Each route resolves by method and pattern; the upstream path comes from the pattern."""
    m = ROUTES.resolve("GET", parse_target("/v1/files/file-1/content"))
    assert m is not None and (m.route.name, m.route.kind) == ("files.content", "object")
    assert m.upstream_path == "/v1/files/file-1/content" and m.params == {"id": "file-1"}
    m = ROUTES.resolve("POST", parse_target("/v1/files/upload"))
    assert m is not None and m.route.name == "files.upload"
    m = ROUTES.resolve("GET", parse_target("/v1/files/upload"))  # an id that happens to be "upload"
    assert m is not None and m.route.name == "files.retrieve"
    m = ROUTES.resolve("POST", parse_target("/v1/chat/completions"))
    assert m is not None and m.route.kind == "inference" and m.route.name == "chat"
    m = ROUTES.resolve("POST", parse_target("/v1/fine-tunes"))
    assert m is not None and m.route.kind == "operator"
    assert ROUTES.resolve("GET", parse_target("/v1/assistants")) is None


def test_the_presigned_upload_routes() -> None:
    """POST /v1/files and .../preprocess are tenant object routes; only the PUT of an upload's
    bytes is authorised by its token, and its token never goes upstream as a path."""
    m = ROUTES.resolve("POST", parse_target("/v1/files?file_name=a.jsonl&purpose=batch-api"))
    assert m is not None and (m.route.name, m.route.kind, m.route.token) == ("files.create", "object", False)
    assert m.upstream_path == "/v1/files" and m.upstream_query == ""
    m = ROUTES.resolve("POST", parse_target("/v1/files/file-1/preprocess"))
    assert m is not None and (m.route.name, m.params, m.route.token) == (
        "files.preprocess",
        {"id": "file-1"},
        False,
    )
    m = ROUTES.resolve("PUT", parse_target("/v1/files/uploads/abc.def"))
    assert m is not None and (m.route.name, m.params, m.route.token) == (
        "files.put",
        {"token": "abc.def"},
        True,
    )
    assert [r.name for r in ROUTES.routes if r.token] == ["files.put"]
    m = ROUTES.resolve("GET", parse_target("/v1/files/uploads/content"))  # a file id "uploads"
    assert m is not None and m.route.name == "files.content"
    with pytest.raises(MethodNotAllowed, match="use GET"):
        ROUTES.resolve("PUT", parse_target("/v1/files/file-1/content"))
    with pytest.raises(MethodNotAllowed, match="use PUT"):
        ROUTES.resolve("GET", parse_target("/v1/files/uploads/abc.def"))
    assert "files.put" in OBJECT_ENDPOINTS and "files.create" in OBJECT_ENDPOINTS


def test_a_known_path_with_another_method_is_405() -> None:
    """GET on chat completions, or PUT on a file, is method_not_allowed naming the methods."""
    with pytest.raises(MethodNotAllowed, match="use POST"):
        ROUTES.resolve("GET", parse_target("/v1/chat/completions"))
    with pytest.raises(MethodNotAllowed, match="DELETE or GET"):
        ROUTES.resolve("PUT", parse_target("/v1/files/file-1"))


def test_query_is_cut_to_the_route_parameters() -> None:
    """Only the route's known parameters go upstream, in their order, still encoded."""
    m = ROUTES.resolve("GET", parse_target("/v1/models?api_key=x&dedicated=true&dedicated%3D=1"))
    assert m is not None and m.upstream_query == "dedicated=true"
    m = ROUTES.resolve("GET", parse_target("/v1/files/f-1/content?dedicated=true"))
    assert m is not None and m.upstream_query == ""
    m = ROUTES.resolve("GET", parse_target("/v1/batches?limit=5&after=b-1&x=y"))
    assert m is not None and m.upstream_query == "limit=5&after=b-1"


def test_grants() -> None:
    """`*` is one segment, a final `**` any rest (or none), `*` as method any method."""
    one = Grant.parse("GET /v1/fine-tunes/*")
    assert one.allows("GET", parse_target("/v1/fine-tunes/ft-1"))
    assert not one.allows("GET", parse_target("/v1/fine-tunes"))
    assert not one.allows("GET", parse_target("/v1/fine-tunes/ft-1/events"))
    assert not one.allows("POST", parse_target("/v1/fine-tunes/ft-1"))
    rest = Grant.parse("* /v1/fine-tunes/**")
    assert rest.allows("DELETE", parse_target("/v1/fine-tunes"))
    assert rest.allows("GET", parse_target("/v1/fine-tunes/ft-1/events"))
    assert not rest.allows("GET", parse_target("/v1/fine-tunesX"))
    assert str(Grant.parse("get /v1/hardware")) == "GET /v1/hardware"


@pytest.mark.parametrize(
    "text",
    ["FETCH /v1/x", "GET v1/x", "GET /", "GET /v1/**/x", "GET /v1/../x", "GET /v1/a b", "GET"],
)
def test_bad_grants_are_refused(text: str) -> None:
    """A grant names a method and an absolute path of valid segments; `**` only at the end."""
    with pytest.raises(ValueError):
        Grant.parse(text)


def test_forwarded_header_values_are_checked() -> None:
    """A forwarded header with a control or non-ASCII character is 400; others are not looked at."""
    check_header_values({"user-agent": "openai/1.0 (x)\tok", "x-other": "caf\xe9"}, ("user-agent",))
    for bad in ("caf\xe9", "a\x00b", "a\x7f", "a\rb"):
        with pytest.raises(InvalidTarget):
            check_header_values({"user-agent": bad}, ("user-agent", "accept"))


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/v1/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/v1/models", "/v1/models"),
        ("/v1/v2/projects/p/models", "/v2/projects/p/models"),
        ("/v1/v2/videos", "/v2/videos"),
        ("/v1/v3/whoami", "/v3/whoami"),
        ("/v1/v1/v1/chat/completions", "/v1/v1/chat/completions"),  # once only
        ("/v1/v1", "/v1"),
        ("/v2/v1/models", "/v2/v1/models"),  # only a leading v1 is dropped
        ("/v1/files/v1", "/v1/files/v1"),
        ("/v1/vx/models", "/v1/vx/models"),
        ("/v1/V1/models", "/v1/V1/models"),
        ("http://elsewhere/v1/v1/models?dedicated=true", "/v1/models"),
    ],
)
def test_a_doubled_leading_version_is_undone(raw: str, path: str) -> None:
    """A together SDK 3.x client given `.../v1` sends `/v1/v1/...` or `/v1/v2/...`: served as meant."""
    assert parse_target(raw).path == path


def test_doubled_paths_resolve_to_the_routes_they_meant() -> None:
    """/v1/v1/chat/completions is the chat route; /v1/v2/projects/p/models the project listing."""
    m = ROUTES.resolve("POST", parse_target("/v1/v1/chat/completions"))
    assert m is not None and m.route.name == "chat" and m.upstream_path == "/v1/chat/completions"
    m = ROUTES.resolve("GET", parse_target("/v1/v2/projects/p/models?dedicated=true"))
    assert m is not None and m.route.name == "models.list"
    assert (m.upstream_path, m.upstream_query) == ("/v2/projects/p/models", "dedicated=true")
    m = ROUTES.resolve("POST", parse_target("/v1/v1/batches/b-1/cancel"))
    assert m is not None and m.route.name == "batches.cancel" and m.params == {"id": "b-1"}
    assert ROUTES.resolve("POST", parse_target("/v1/v1/v1/chat/completions")) is None


@pytest.mark.parametrize("raw", [f"/v1{r}" for r in REFUSED if r.startswith("/v1/")])
def test_doubled_paths_are_validated_like_any_other(raw: str) -> None:
    """The doubled form gets no way around target validation: every refused target stays refused."""
    with pytest.raises(InvalidTarget):
        parse_target(raw)


@given(st.lists(st.sampled_from(["v1", "v2", "v10", "chat", "models", "x"]), max_size=5))
def test_undoubling_drops_at_most_one_leading_v1(segments: list[str]) -> None:
    """The rule only ever removes the first segment, and only a `v1` before a version segment."""
    out = undouble_version(tuple(segments))
    assert out == tuple(segments) or (segments[0] == "v1" and out == tuple(segments[1:]) and out[0][0] == "v")


def test_inference_host_paths_are_the_inference_routes_and_no_other() -> None:
    """chat, completions, embeddings, rerank, images and audio go to the inference host; files,
    batches, models, videos and operator routes never do (they must reach the account's API host)."""
    inference = {
        r.pattern
        for r in ROUTES.routes
        if r.kind == "inference" or r.pattern.startswith(("/v1/images", "/v1/audio"))
    }
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"} <= inference
    assert inference == INFERENCE_HOST_PATHS
    others = {r.upstream_path({p[1:-1]: "x" for p in r.parts if p.startswith("{")}) for r in ROUTES.routes}
    assert not {o for o in others if o not in inference} & INFERENCE_HOST_PATHS
