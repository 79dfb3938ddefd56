"""The router's choice, without engines: an engine's GPU tier follows its KV events (a lost
batch forgets it rather than guess), a prompt's prefix is matched by the engine's own block
hashes, and the score weighs GPU tokens, host-store tokens and load as documented."""

from __future__ import annotations

import asyncio

import httpx
import msgspec

from sidecar import protocol
from sidecar.router.app import Router, RouterSettings, head_digest
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


LONG = list(range(5000, 5000 + 2048))  # a 2,048-token system prompt: 128 blocks of 16


def test_a_prompt_sent_to_an_engine_counts_as_its_until_its_events_speak():
    """Requests for a prefix follow the first one sent while its prefill is still running
    (nothing in the events yet), instead of starting a second prefill on the idle engine; the
    engine's events then replace the router's guess, and an unconfirmed guess expires."""
    async def main():
        router = Router(RouterSettings(load_tokens=1024))
        a, b = (Engine(i, f"http://{i}", hasher=HASHER) for i in ("a", "b"))
        router.book = book_with(a, b)
        router.book.expect_s = 30.0
        first = router.rank(LONG, {})[0].engine
        other = b if first is a else a
        chains: dict = {}
        assert router.rank(LONG, {}, chains)[0].engine is first
        router.book.expect(first, LONG, chains)
        first.inflight = 1  # its prefill is running: one request of load
        ranked = router.rank(LONG, {})
        assert (ranked[0].engine, ranked[0].gpu, ranked[0].route) == (first, 2048, "gpu")
        assert router.rank(list(range(9000, 9100)), {})[0].engine is other  # another prompt
        # The engine's events confirm the first 100 blocks and remove block 100: the guess is
        # gone for those, the rest still expected.
        chain = [external(h) for h in HASHER.chain(LONG)]
        router.book._on_batch(first.instance_id, frames(1, stored(chain[:100])))
        router.book._on_batch(first.instance_id, frames(
            2, protocol.KVBlockRemoved(block_hashes=[chain[100]], medium="GPU")))
        assert len(first.expected) == 27 and router.book.gpu_prefix(first, LONG) == 100 * 16
        # A guess no event confirms counts for expect_s only.
        first.gpu_blocks.clear()
        router.book.expect_s = 0.0
        router.book.expect(other, LONG)
        assert router.book.gpu_prefix(other, LONG) == 0
        from sidecar.router.fleet import forget_expected
        forget_expected(other.expected, float("inf"))
        assert other.expected == {}
        await router.stop()

    asyncio.run(main())


def test_a_decoding_request_weighs_less_than_a_prefill():
    e = Engine("e", "http://e", decode_weight=0.25)
    e.inflight, e.decoding, e.others = 5, 4, 2
    assert e.load == 1 + 4 * 0.25 + 2
    assert Engine("f", "http://f").load == 0


def test_prefixes_nobody_holds_spread_over_idle_engines_the_same_way_every_time():
    """Ties (idle engines, prefix held nowhere) go by rendezvous hashing of the prompt's
    start, not to the first engine by name: 64 new system prompts split about evenly, the same
    prompt always prefers the same engine, whatever order the engines are listed in."""
    async def main():
        router = Router(RouterSettings())
        names = ["r1", "r2", "r3"]
        router.book = book_with(*(Engine(i, f"http://{i}") for i in names))
        prompts = [[p] * 80 + list(range(100)) for p in range(64)]
        picks = [router.rank(t, {})[0].engine.instance_id for t in prompts]
        counts = {n: picks.count(n) for n in names}
        assert all(10 <= c <= 35 for c in counts.values()), counts
        router.book = book_with(*(Engine(i, f"http://{i}") for i in reversed(names)))
        assert [router.rank(t, {})[0].engine.instance_id for t in prompts] == picks
        assert router.rank([1 << 70, -5] + list(range(64)), {})  # any ints: the engine judges
        # Same first 64 tokens, different turns: the same engine (one system prompt).
        assert {router.rank(prompts[0][:64] + [7, 8, 9], {})[0].engine.instance_id,
                router.rank(prompts[0][:64] + [1], {})[0].engine.instance_id} == {picks[0]}
        await router.stop()

    asyncio.run(main())


def test_a_request_counts_as_decoding_from_its_first_bytes_until_done():
    from sidecar.router.app import _Flight

    async def main():
        e = Engine("e", "http://e", decode_weight=0.25)
        e.inflight = 1
        upstream = httpx.Response(200, stream=httpx.ByteStream(b"data: 1\n\n"))
        flight = _Flight(e, upstream)
        relay = flight.relay()
        assert e.decoding == 0
        assert await relay.__anext__() == b"data: 1\n\n"
        assert e.decoding == 1 and e.load == 0.25
        await relay.aclose()
        await flight.done()
        assert (e.inflight, e.decoding, e.load) == (0, 0, 0)

    asyncio.run(main())


def test_a_prefix_nobody_holds_goes_to_the_engine_asked_to_keep_the_least():
    """A new prefix is placed by the engines' working sets (distinct prompts routed to each
    lately), among the engines within one request of the least loaded: 8 system prompts
    arriving one after another split 4/4 whatever their hashes prefer; a clearly busier
    engine is not chosen; a prompt an engine holds is routed by the score as before."""
    async def main():
        router = Router(RouterSettings())
        a, b = Engine("a", "http://a"), Engine("b", "http://b")
        router.book = book_with(a, b)
        prompts = [[p] * 64 + list(range(2048)) for p in range(8)]
        for t in prompts:
            chosen = router.rank(t, {})[0].engine
            router.book.routed(chosen, head_digest(t), len(t))
        assert router.book.working_set(a) == router.book.working_set(b) == 4 * 2112
        new = [9] * 64 + list(range(100))
        a.recent.clear()
        assert router.rank(new, {})[0].engine is a  # a keeps nothing now
        a.inflight = 1
        assert router.rank(new, {})[0].engine is a  # one request more: within the slack
        a.inflight = 2
        assert router.rank(new, {})[0].engine is b  # two more: the less loaded
        # Held somewhere: the score decides (b's host store holds it), working sets aside.
        a.inflight = 0
        assert router.rank(new, {"b": 100})[0].engine is b
        router.book.working_set_s = 0.0  # a working set is only the prompts of late
        assert router.book.working_set(b) == 0
        await router.stop()

    asyncio.run(main())
