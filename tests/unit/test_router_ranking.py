"""The router's choice, without engines: an engine's GPU tier follows its KV events (a lost
batch forgets it rather than guess), a prompt's prefix is matched by the engine's own block
hashes, and the score weighs GPU tokens, host-store tokens and load as documented."""

from __future__ import annotations

import asyncio

import httpx
import msgspec

from sidecar import protocol
from sidecar.router.app import Router, RouterSettings
from sidecar.router.fleet import Engine, EngineBook, queued_requests
from vllm_kvmove.blockhash import BlockHasher, external

HASHER = BlockHasher("sha256", "vllm-none-hash", 16)
TOKENS = list(range(1000, 1000 + 72))  # 4 full blocks and 8 tokens
CHAIN = [external(h) for h in HASHER.chain(TOKENS)]


def stored(hashes, medium="GPU"):
    return protocol.KVBlockStored(block_hashes=hashes, parent_block_hash=None,
                                  token_ids=[0] * 16 * len(hashes), block_size=16, lora_id=None,
                                  medium=medium, lora_name=None)


def frames(seq: int, *events) -> list[bytes]:
    return [b"kv@x@m", seq.to_bytes(8, "big"),
            msgspec.msgpack.encode(protocol.KVEventBatch(0.0, list(events)))]


def book_with(*engines: Engine) -> EngineBook:
    book = EngineBook("", {}, httpx.AsyncClient())
    for e in engines:
        book.engines[e.instance_id] = e
    return book


def test_the_gpu_tier_follows_the_engines_events_and_forgets_on_a_gap():
    e = Engine("e", "http://e", hasher=HASHER)
    book = book_with(e)
    book._on_batch("e", frames(1, stored(CHAIN[:3]), stored([CHAIN[3]], medium="CPU")))
    assert book.gpu_prefix(e, TOKENS) == 48  # 3 blocks on the GPU; the 4th is host-tier only
    book._on_batch("e", frames(2, protocol.KVBlockRemoved(block_hashes=[CHAIN[1]],
                                                          medium="GPU")))
    assert book.gpu_prefix(e, TOKENS) == 16  # a hole after the first block
    book._on_batch("e", frames(3, protocol.KVAllBlocksCleared()))
    assert book.gpu_prefix(e, TOKENS) == 0
    book._on_batch("e", frames(4, stored(CHAIN)))
    assert book.gpu_prefix(e, TOKENS) == 64
    book._on_batch("e", frames(6, stored([12345])))  # batch 5 was lost
    assert book.gpu_prefix(e, TOKENS) == 0 and e.gpu_blocks == {12345}
    book._on_batch("e", [b"garbage"])  # any frame shape: ignored
    book._on_batch("e", [b"t", (7).to_bytes(8, "big"), b"\xc1"])


def test_the_score_weighs_gpu_host_and_load():
    async def main():
        router = Router(RouterSettings(host_weight=0.8, load_tokens=1024))
        gpu = Engine("gpu", "http://a", hasher=HASHER, gpu_blocks=set(CHAIN))
        host = Engine("host", "http://b", hasher=HASHER)
        idle = Engine("idle", "http://c", hasher=HASHER)
        router.book = book_with(gpu, host, idle)
        ranked = router.rank(TOKENS, {"host": 72, "gpu": 72})
        assert [(c.engine.instance_id, c.route, c.score) for c in ranked] == [
            ("gpu", "gpu", 64 + 0.8 * 8), ("host", "host", 0.8 * 72), ("idle", "load", 0)]
        gpu.inflight = 1  # one request in flight outweighs 64 cached tokens
        assert router.rank(TOKENS, {"host": 72})[0].engine.instance_id == "host"
        host.inflight = 2
        assert [c.engine.instance_id for c in router.rank(TOKENS, {})] == ["idle", "gpu", "host"]
        host.inflight, idle.others = 0, 3  # others' requests, seen on the engine's /metrics
        assert [c.engine.instance_id for c in router.rank(TOKENS, {})] == ["host", "gpu", "idle"]
        host.down_until = float("inf")  # failed: out of rotation
        assert "host" not in [c.engine.instance_id for c in router.rank(TOKENS, {})]
        idle.others, gpu.inflight, gpu.draining = 0, 0, True  # going away: the last resort
        assert [c.engine.instance_id for c in router.rank(TOKENS, {"gpu": 72})] == ["idle", "gpu"]
        await router.stop()

    asyncio.run(main())


def test_an_engines_own_queue_is_read_from_its_metrics():
    text = "\n".join([
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0',
        'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 3.0',
        'vllm:num_requests_running_total 99.0', "garbage line"])
    assert queued_requests(text) == 5
    assert queued_requests("") == 0


def test_a_router_started_before_its_controller_waits_for_it():
    """Started while the controller is not up yet: it starts anyway (no engines), and the
    engines appear once the controller answers."""
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, content=msgspec.json.encode(protocol.InstanceList([])))

    async def main():
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        book = EngineBook("http://controller", {}, client, refresh_s=0.05)
        await book.start()  # does not raise
        assert book.engines == {}
        await asyncio.sleep(0.2)
        await book.stop()
        await client.aclose()

    asyncio.run(main())
    assert len(calls) >= 2 and set(calls) == {"/instances"}
