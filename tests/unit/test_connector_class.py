"""What the connector class tells vLLM before any instance exists (vLLM asks these of the
class): the paged cache's physical order it needs, LBHNC — a name vLLM's layout resolution
accepts."""

from __future__ import annotations


def test_the_connector_asks_for_the_lbhnc_layout_vllm_knows():
    from vllm.v1.kv_cache_interface import KVCacheLayout

    from vllm_kvmove.connector import KVMoveConnector

    layout = KVMoveConnector.get_required_kvcache_layout(None)
    assert layout == "LBHNC"
    # vLLM resolves the name to its enum: layers, blocks, heads, tokens, channels in order.
    assert KVCacheLayout[layout].value == (0, 1, 2, 3, 4)
