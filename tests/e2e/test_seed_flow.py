"""The seed's move flow on two real vLLM engines with real NIXL transfers (issue: foundation).

The proof of every move is the destination engine's own word: its
``vllm:external_prefix_cache_hits_total`` rises by at least N-1 for an N-token prompt, the hits
are attributed to the host tier, ``usage.prompt_tokens_details.cached_tokens`` agrees, its
greedy output equals the source's, and the moved bytes are identical.
"""

from __future__ import annotations

import pytest

from tests.harness.engines import S1, S2, chunk_keys

FLOW_PROMPT = "Describe how a prefix cache saves prefill time in a language model server."


def test_instances_describe_both_engines(cluster):
    inst = {i["instance_id"]: i for i in cluster.http.get("/instances").json()["instances"]}
    assert {S1, S2} <= set(inst)
    for iid in (S1, S2):
        i = inst[iid]
        assert i["up"] and i["engine_url"] == cluster.engines[iid].url
        assert i["sidecar_url"] == cluster.engines[iid].sidecar_url
        assert i["model"] == str(cluster.local.model_dir)  # the model the KV belongs to (its path)
        assert i["layout"]["backend"].startswith("cpu_attn/") and i["layout"]["block_size"] == 128
        assert i["last_heartbeat_s_ago"] < 5
    assert inst[S1]["fingerprint"] == inst[S2]["fingerprint"]


def test_seed_flow_move(cluster):
    """Steps 4-7 of the seed: complete on engine 1, tokenize, move, check status, serve on 2."""
    e1, e2 = cluster.engines[S1], cluster.engines[S2]
    src = e1.complete(FLOW_PROMPT)
    tokens = e1.tokenize(FLOW_PROMPT)
    assert cluster.wait_lookup(tokens, {S1: len(tokens)}) == {S1: len(tokens)}
    keys = chunk_keys(cluster.http, tokens, S1)
    before = {k: e1.chunk_bytes(k) for k in keys}
    assert all(before.values())

    r = cluster.move(S1, S2, tokens=tokens)
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == len(tokens)
    st = cluster.wait_job(r.json()["event_id"])
    assert st["status"] == "done", st
    assert st["num_chunks"] == len(keys) and st["bytes"] > 0 and st["error"] is None

    # The bytes went over NIXL: the seed's LMCache files say transfer_channel "nixl", which
    # turns the same-host shortcut off (tests/e2e_same_host has the engines that use it).
    transfers = e2.sidecar("/store").json()["transfers"]
    assert transfers["fetches"] >= 1 and transfers["same_host_fetches"] == 0, transfers

    # A move: the destination holds the chunks byte for byte, the source no longer does.
    assert {k: e2.chunk_bytes(k) for k in keys} == before
    assert all(e1.chunk_bytes(k) is None for k in keys)
    assert cluster.wait_lookup(tokens, {S2: len(tokens)}) == {S2: len(tokens)}
    e2.serve_and_check(FLOW_PROMPT, tokens, src["choices"][0]["text"])

    finish = cluster.http.post("/check_finish", json={"event_id": st["event_id"]}).json()
    assert finish["status"] == "done" and finish["num_tokens"] == len(tokens)


def test_twelve_token_prompt_is_stored_and_moved(cluster):
    """The seed's 12-token prompt moved nothing in LMCache; here all 12 tokens move."""
    e1, e2 = cluster.engines[S1], cluster.engines[S2]
    tokens = e1.tokenize("def twelve_tokens(self, value): return value * 12 + 3")[:12]
    assert len(tokens) == 12
    src = e1.complete(tokens)
    cluster.wait_lookup(tokens, {S1: 12})
    r = cluster.move(S1, S2, tokens=tokens)
    assert r.json()["num_tokens"] == 12
    assert cluster.wait_job(r.json()["event_id"])["status"] == "done"
    hits = e2.serve_and_check(tokens, tokens, src["choices"][0]["text"])
    assert hits == 11  # vLLM always recomputes the last prompt token


def long_prompt(tag: str, words: int = 380) -> str:
    return " ".join(f"{tag}{i} import os, sys; value = compute({i})" for i in range(words // 8))


def test_copy_of_multi_chunk_prompt_with_partial_tail(cluster):
    e1, e2 = cluster.engines[S1], cluster.engines[S2]
    prompt = long_prompt("copy")
    tokens = e1.tokenize(prompt)
    assert len(tokens) > 512 and len(tokens) % 256, "want several chunks and a partial tail"
    src = e1.complete(prompt)
    cluster.wait_lookup(tokens, {S1: len(tokens)})
    keys = chunk_keys(cluster.http, tokens, S1)
    r = cluster.move(S1, S2, tokens=tokens, copy=True)
    st = cluster.wait_job(r.json()["event_id"])
    assert st["status"] == "done" and st["kind"] == "copy" and st["num_chunks"] == len(keys) >= 3
    # Copy: both hold every chunk, byte for byte.
    for k in keys:
        a, b = e1.chunk_bytes(k), e2.chunk_bytes(k)
        assert a is not None and a == b
    assert cluster.wait_lookup(tokens, {S1: len(tokens), S2: len(tokens)}) == {S1: len(tokens),
                                                                             S2: len(tokens)}
    e2.serve_and_check(prompt, tokens, src["choices"][0]["text"])


def test_move_by_prompt_tokenizes_on_the_source(cluster):
    e1, e2 = cluster.engines[S1], cluster.engines[S2]
    prompt = long_prompt("byprompt", 200)
    src = e1.complete(prompt)
    tokens = e1.tokenize(prompt)
    cluster.wait_lookup(tokens, {S1: len(tokens)})
    r = cluster.move(S1, S2, prompt=prompt)
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == len(tokens)
    assert cluster.wait_job(r.json()["event_id"])["status"] == "done"
    e2.serve_and_check(prompt, tokens, src["choices"][0]["text"])
    assert cluster.wait_lookup(tokens, {S2: len(tokens)}) == {S2: len(tokens)}


def test_move_back_and_forth_keeps_serving(cluster):
    """Move engine 2's KV back to engine 1 (which no longer holds it), then serve there."""
    e1, e2 = cluster.engines[S1], cluster.engines[S2]
    prompt = long_prompt("roundtrip", 120)
    tokens = e2.tokenize(prompt)
    ref = e2.complete(prompt)
    cluster.wait_lookup(tokens, {S2: len(tokens)})
    r = cluster.move(S2, S1, tokens=tokens)
    assert cluster.wait_job(r.json()["event_id"])["status"] == "done"
    e1.serve_and_check(prompt, tokens, ref["choices"][0]["text"])


@pytest.mark.parametrize("body,status", [
    ({"old_position": ["nobody", "LocalCPUBackend"], "new_position": [S2, "LocalCPUBackend"], "tokens": [1]}, 404),
    ({"old_position": [S1, "LocalDiskBackend"], "new_position": [S2, "LocalCPUBackend"], "tokens": [1]}, 400),
    ({"old_position": [S1, "LocalCPUBackend"], "new_position": [S2, "LocalCPUBackend"], "tokens": []}, 400),
    ({"old_position": [S1, "LocalCPUBackend"], "new_position": [S2, "LocalCPUBackend"], "prompt": ""}, 400),
])
def test_bad_input_on_the_real_controller(cluster, body, status):
    r = cluster.http.post("/move", json=body)
    assert r.status_code == status and r.json()["error"]["message"]
    bad = cluster.http.post("/move", content=b"{oops", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
