"""The OpenAI SDKs' expectations through the proxy: `models.list()` and base64 embeddings."""

from __future__ import annotations

import base64
import struct

import pytest

from .support import EMBEDDING_MODEL, Meter, post_raw


async def test_openai_models_list_works(meter: Meter) -> None:
    """OpenAI(...).models.list() gets the list object and parses; a plain client keeps
    together's bare array, as the together SDKs expect."""
    page = await meter.openai().models.list()
    ids = [m.id for m in page.data]
    status, _, raw = await post_raw(f"{meter.base_url}/models", None, meter.auth(), method="GET")
    assert status == 200 and raw.lstrip().startswith(b"[")
    assert ids and EMBEDDING_MODEL in ids


@pytest.mark.parametrize("explicit", [True, False])
async def test_base64_embeddings_decode_to_the_upstream_vector(meter: Meter, explicit: bool) -> None:
    """encoding_format=base64 (the Node SDK's default, and what the Python SDK asks by itself)
    gets base64 float32; decoded, it is the upstream's vector at float32 precision."""
    client = meter.openai()
    direct = await meter.direct_openai().embeddings.create(
        model=EMBEDDING_MODEL, input="hello", encoding_format="float"
    )
    want = list(
        struct.unpack(
            f"<{len(direct.data[0].embedding)}f",
            struct.pack(f"<{len(direct.data[0].embedding)}f", *direct.data[0].embedding),
        )
    )
    if explicit:
        r = await client.embeddings.create(model=EMBEDDING_MODEL, input="hello", encoding_format="base64")
        value = r.data[0].embedding
        assert isinstance(value, str)
        got = list(struct.unpack(f"<{len(want)}f", base64.b64decode(value)))
    else:
        r = await client.embeddings.create(model=EMBEDDING_MODEL, input="hello")
        got = list(r.data[0].embedding)
    assert got == want
