"""The host tier's KV events in vLLM's wire format: what a sidecar publishes decodes with
vLLM's own ``KVEventBatch`` decoder into vLLM's event classes, field for field; store events
without named blocks, and chunks without a full block, are not published; the connector's
container keeps, across tensor-parallel workers, the events every worker reported."""

from __future__ import annotations

import msgspec
import pytest

from sidecar.agent.kvevents import default_topic, to_batch
from vllm_kvmove.blockhash import BlockHasher, external
from vllm_kvmove.store import StoreEvent

kv_events = pytest.importorskip("vllm.distributed.kv_events")
HASHER = BlockHasher("sha256", "vllm-none-hash", 16)


def test_a_batch_decodes_with_vllms_decoder_field_for_field():
    tokens = list(range(40))
    first, second = HASHER.prompt_blocks(tokens, 32)  # 32 tokens (2 blocks), then 8 (none)
    batch = to_batch([StoreEvent(1, "admit", b"k" * 16, 32, first),
                      StoreEvent(2, "admit", b"t" * 16, 8, second),  # no full block
                      StoreEvent(3, "admit", b"u" * 16, 32),  # blocks not named
                      StoreEvent(4, "evict", b"k" * 16, 32, first)])
    decoded = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch).decode(
        msgspec.msgpack.encode(batch))
    chain = [external(h) for h in HASHER.chain(tokens)]
    assert decoded.events == [
        kv_events.BlockStored(block_hashes=chain, parent_block_hash=None, token_ids=tokens[:32],
                              block_size=16, lora_id=None, medium="CPU", lora_name=None),
        kv_events.BlockRemoved(block_hashes=chain, medium="CPU")]
    assert decoded.data_parallel_rank is None and decoded.ts == batch.ts
    assert to_batch([StoreEvent(1, "admit", b"u" * 16, 32)]) is None


def test_the_topic_names_the_engine_rank_and_model():
    assert default_topic("e1", "meta/llama", 0) == "kv@e1@meta/llama"
    assert default_topic("e1", "m", 1) == "kv@e1.rank1@m"


def test_only_events_every_tensor_parallel_worker_reported_are_kept():
    connector = pytest.importorskip("vllm_kvmove.connector")
    a = kv_events.BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[0] * 16,
                              block_size=16, lora_id=None, medium="CPU", lora_name=None)
    b = kv_events.BlockRemoved(block_hashes=[2], medium="CPU")
    rank0, rank1 = connector.KVMoveKVEvents(), connector.KVMoveKVEvents()
    rank0.add_events([a, b])
    rank1.add_events([a])
    rank0.add_events(rank1.get_all_events())  # as vLLM merges the workers' outputs
    rank0.increment_workers(1)
    assert rank0.aggregate().get_all_events() == [a]
