"""vllm_kvmove.blockhash computes vLLM's own block hashes: compared with vLLM's
``hash_block_tokens`` chained over a prompt, for each reproducible algorithm, with and without
``PYTHONHASHSEED`` and with a parent, and with what its request block hasher gives."""

from __future__ import annotations

import random

import pytest

from vllm_kvmove.blockhash import BlockHasher, external, hasher_for


@pytest.fixture(scope="module")
def vllm_hashing():
    utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    from vllm.utils.hashing import get_hash_fn_by_name

    return utils, get_hash_fn_by_name


def vllm_chain(utils, hash_fn, tokens, block_size):
    out, parent = [], None
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = utils.hash_block_tokens(hash_fn, parent, tokens[i:i + block_size])
        out.append(parent)
    return out


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
@pytest.mark.parametrize("pythonhashseed", [None, "7"])
def test_the_chain_is_vllms(vllm_hashing, monkeypatch, algo, pythonhashseed):
    utils, by_name = vllm_hashing
    if pythonhashseed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", pythonhashseed)
    hash_fn = by_name(algo)
    utils.init_none_hash(hash_fn)
    tokens = [random.Random(3).randrange(50_000) for _ in range(300)]  # 2 full blocks + a tail
    expected = vllm_chain(utils, hash_fn, tokens, 128)
    hasher = hasher_for(algo, 128)
    assert hasher.none_hash == utils.NONE_HASH
    assert hasher.chain(tokens) == expected and len(expected) == 2
    # Continuing from a parent: the second block alone, after the first's hash.
    assert hasher.chain(tokens[128:], parent=expected[0]) == expected[1:]


def test_the_request_block_hasher_agrees(vllm_hashing, monkeypatch):
    utils, by_name = vllm_hashing
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    hash_fn = by_name("sha256")
    utils.init_none_hash(hash_fn)
    tokens = list(range(100, 100 + 70))
    request = Request("r", tokens, SamplingParams(max_tokens=1), None, 0,
                      block_hasher=utils.get_request_block_hasher(16, hash_fn))
    assert BlockHasher("sha256", "vllm-none-hash", 16).chain(tokens) == list(request.block_hashes)


def test_unreproducible_and_external_forms():
    assert hasher_for("xxhash", 16) is None  # a random seed per process
    digest = bytes(range(32))
    assert external(digest) == int.from_bytes(digest[-8:], "big")
    assert external(digest, as_int=False) == digest
    with pytest.raises(ValueError):
        BlockHasher("md5", "s", 16)
