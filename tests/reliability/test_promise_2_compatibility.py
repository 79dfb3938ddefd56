"""Promise 2: compatibility is checked before a byte moves — a move between engines whose
model, dtype, KV layout, block size, chunk size or hash seed differ is refused with 409 naming
the mismatch, and nothing changes on either side."""

from __future__ import annotations

import pytest

from tests.harness.api import LOC
from tests.harness.stores import fill

DIFFERENT = {"model": "other-model", "dtype": "float16", "backend": "cpu_attn/amx",
             "block_size": 32, "chunk_size": 64, "hash_seed": "other-seed", "num_kv_heads": 2}


@pytest.fixture(scope="module")
def source(fleet):
    src = fleet.add_sidecar("compat-src")
    tokens = list(range(100, 140))
    fill(src, tokens, seed=1)
    fleet.wait_lookup(tokens, {"compat-src": 40})
    return src, tokens


@pytest.mark.parametrize("field", sorted(DIFFERENT))
def test_incompatible_move_is_409_naming_the_field(fleet, source, field):
    src, tokens = source
    dst = fleet.add_sidecar(f"compat-{field}", **{field: DIFFERENT[field]})
    before = (src.store.snapshot(), dst.store.snapshot())
    for body in ({"tokens": tokens}, {"tokens": tokens, "copy": True}):
        r = fleet.http.post("/move", json={"old_position": ["compat-src", LOC],
                                           "new_position": [f"compat-{field}", LOC], **body})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["kind"] == "incompatible" and f"{field}:" in err["message"]
    assert (src.store.snapshot(), dst.store.snapshot()) == before
    assert dst.counters.fetches == dst.counters.fetch_failures == 0  # not a byte was read
