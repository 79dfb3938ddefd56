"""EngineBook: what the router knows of the engines it routes to — who is up, how loaded, and
which prefixes each can serve without prefill.

Contract
--------
* One per router, on its event loop (nothing here is thread-safe).
* Engines come from the controller (``GET /instances``, every ``refresh_s``: engine URL, up,
  draining, block hashing, the engine's own KV events endpoint) or from a fixed list. An engine the
  router failed to reach is kept out of rotation for ``cooldown_s``.
* Two tiers of prefixes, in tokens matched from a prompt's start:

  - **GPU** (vLLM's own prefix cache): from each engine's KV events stream (its
    ``--kv-events-config`` endpoint), ``BlockStored``/``BlockRemoved``/``AllBlocksCleared`` of
    ``medium="GPU"`` kept as a set of block hashes per engine; a prompt's blocks are named with
    the engine's hashing (:class:`vllm_kvmove.blockhash.BlockHasher`), and the leading ones
    present count. A subscriber that sees a sequence gap (lost batches) forgets that engine's
    set: better a miss than a phantom hit.
  - **expected** blocks: a prompt the router has just sent to an engine is not in its events
    until its prefill is done (seconds on a busy engine), yet the next request for the same
    prefix should follow it there, not start a second prefill elsewhere. So the router counts
    a routed prompt's blocks as that engine's (:meth:`EngineBook.expect`) until the engine's
    events speak for them (stored or removed), or ``expect_s`` passes (a request that failed
    or was cut short).
  - **host** (the connector's store): the controller's ``/lookup``, one request per routed
    prompt (its index is authoritative; events could be lost).
* Load: requests the router has in flight to each engine (it sees them start and end; one
  whose answer has started streaming is decoding and weighs ``decode_weight``: its prefill,
  the part that delays a new request's first token, is over), plus
  the others the engine reports — its own count of running and waiting requests
  (``vllm:num_requests_running`` + ``vllm:num_requests_waiting`` on its ``/metrics``, read
  every ``load_s``) less the router's own in flight during that read. The engine's count lags
  (a busy engine answers /metrics seconds late): the router's own requests are never counted
  from it, so a stale read does not hold their load after they ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx
import msgspec
import zmq

from sidecar import protocol
from sidecar.zmqio import LoopSocket, serve_forever
from vllm_kvmove.blockhash import BlockHasher, external

logger = logging.getLogger("vllm_kvmove.router")

_instances = msgspec.json.Decoder(protocol.InstanceList)
_batches = msgspec.msgpack.Decoder(protocol.KVEventBatch)


@dataclass
class Engine:
    """One engine as the router sees it.

    Attributes:
        instance_id: its name (the controller's, or the one given on the command line).
        url: base URL of its OpenAI server.
        up: the controller says it is up (always True for a fixed engine).
        hasher: how it names blocks (None: its GPU tier is not followed).
        events: its own KV events endpoint ("" if none).
        gpu_blocks: block hashes (vLLM's external form) its GPU tier holds, per its events.
        expected: block hashes of prompts the router sent it, not yet in its events, each
            with the monotonic time after which it is no longer counted.
        inflight: requests the router has in flight to it; ``decoding``: those of them whose
            answer has started (prefill over).
        decode_weight: what one of ``decoding`` weighs in :attr:`load`.
        recent: the prompts routed to it lately, by their start (a digest of the first
            tokens): ``(monotonic time last routed, most tokens)`` — its working set, which
            places the prefixes no engine holds (:meth:`EngineBook.working_set`).
        others: running + waiting requests not the router's, per its last ``/metrics`` read.
        down_until: monotonic time before which it is out of rotation (it failed).
        draining: a drain is emptying it (it is going away): ranked after every other.
    """

    instance_id: str
    url: str
    up: bool = True
    hasher: BlockHasher | None = None
    events: str = ""
    gpu_blocks: set[int | bytes] = field(default_factory=set)
    expected: dict[int | bytes, float] = field(default_factory=dict)
    inflight: int = 0
    decoding: int = 0
    decode_weight: float = 1.0
    recent: dict[bytes, tuple[float, int]] = field(default_factory=dict)
    others: int = 0
    down_until: float = 0.0
    last_seq: int = 0
    draining: bool = False

    def usable(self, now: float) -> bool:
        return self.up and now >= self.down_until

    @property
    def load(self) -> float:
        """Requests it is busy with: the router's in flight (decoding ones weighed
        ``decode_weight``) and the others it reported."""
        return self.inflight - (1.0 - self.decode_weight) * self.decoding + self.others


class EngineBook:
    """The engines, their GPU tiers and loads (see the module docstring).

    Args:
        controller: the controller's base URL ("": engines are ``fixed``).
        fixed: ``{instance_id: url}`` of engines routed to without a controller (kept beside
            the controller's, if both are given).
        http: the client for the controller (it carries the fleet secret).
        probe: the client for the engines' ``/metrics`` (default ``http``; the router passes
            one without the fleet secret: engines are not the controller).
        refresh_s: how often the engine list is re-read from the controller.
        cooldown_s: how long an engine that failed stays out of rotation.
        load_s: how often each engine's ``/metrics`` is read for its queue.
        decode_weight: what a request of the router's that is decoding weighs in an engine's
            load, against 1 for one still waiting for its first token.
        expect_s: how long a routed prompt's blocks count as its engine's without its events
            confirming them.
        working_set_s: how long a prompt routed to an engine counts in its working set.
    """

    def __init__(self, controller: str, fixed: dict[str, str], http: httpx.AsyncClient,
                 refresh_s: float = 1.0, cooldown_s: float = 5.0, load_s: float = 0.5,
                 probe: httpx.AsyncClient | None = None, decode_weight: float = 1.0,
                 expect_s: float = 30.0, working_set_s: float = 60.0):
        self.controller = controller.rstrip("/")
        self.http = http
        self.probe = probe or http
        self._fixed = set(fixed)
        self.refresh_s, self.cooldown_s, self.load_s = refresh_s, cooldown_s, load_s
        self.decode_weight, self.expect_s = decode_weight, expect_s
        self.working_set_s = working_set_s
        self._load_task: asyncio.Task | None = None
        self.engines: dict[str, Engine] = {iid: self._engine(iid, url)
                                           for iid, url in fixed.items()}
        self._subscriptions: dict[str, tuple[str, asyncio.Task, LoopSocket]] = {}
        self._task: asyncio.Task | None = None

    def _engine(self, instance_id: str, url: str) -> Engine:
        return Engine(instance_id, url.rstrip("/"), decode_weight=self.decode_weight)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the engines once and keep re-reading them; a controller that is not up yet
        does not stop the router (it serves the fixed engines, if any, meanwhile)."""
        if self.controller:
            await self._try_refresh()
            self._task = asyncio.create_task(self._refresh_loop())
        self._load_task = asyncio.create_task(self._load_loop())

    async def stop(self) -> None:
        for task in (self._task, self._load_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for iid in list(self._subscriptions):
            await self._unsubscribe(iid)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._try_refresh()

    async def _try_refresh(self) -> None:
        """:meth:`refresh`, logging a failure: the controller may be away for a while (or not
        up yet); the engines known stand meanwhile."""
        try:
            await self.refresh()
        except Exception:  # noqa: BLE001
            logger.warning("cannot read the engines from %s; retrying every %.1f s",
                           self.controller, self.refresh_s, exc_info=True)

    async def _load_loop(self) -> None:
        """Read each engine's queue, each on its own schedule: a busy engine's API server
        (sharing a core with it) can take seconds to answer /metrics, and must not delay the
        others' reads; the last count stands meanwhile."""
        reading: dict[str, asyncio.Task] = {}
        try:
            while True:
                now = time.monotonic()
                for e in list(self.engines.values()):
                    forget_expected(e.expected, now)
                    for head in [h for h, (t, _) in e.recent.items()
                                 if t <= now - self.working_set_s]:
                        del e.recent[head]
                    task = reading.get(e.instance_id)
                    if e.up and (task is None or task.done()):
                        reading[e.instance_id] = asyncio.create_task(self._read_load(e))
                await asyncio.sleep(self.load_s)
        finally:
            for task in reading.values():
                task.cancel()

    async def _read_load(self, e: Engine) -> None:
        ours = e.inflight
        try:
            r = await self.probe.get(f"{e.url}/metrics", timeout=30.0)
            r.raise_for_status()
        except httpx.HTTPError:
            return  # its requests say whether it is down (the router's own in flight remain)
        # The count includes the router's own requests of that moment (as many as were in
        # flight at the read's start or end: the read took a while).
        e.others = max(0, queued_requests(r.text) - max(ours, e.inflight))

    async def refresh(self) -> None:
        """Re-read the engines from the controller; follow the KV events of new ones."""
        r = await self.http.get(f"{self.controller}/instances")
        r.raise_for_status()
        seen = set()
        for info in _instances.decode(r.content).instances:
            seen.add(info.instance_id)
            e = self.engines.get(info.instance_id)
            if e is None or e.url != info.engine_url.rstrip("/"):
                e = self.engines[info.instance_id] = self._engine(info.instance_id,
                                                                  info.engine_url)
            e.up, e.draining = info.up, bool(info.draining)
            h = info.block_hashing
            e.hasher = None if h is None else BlockHasher(h.algo, h.seed, h.block_size)
            e.events = info.engine_events
            if e.events and self._subscriptions.get(e.instance_id, ("",))[0] != e.events:
                await self._subscribe(e)
        for iid in set(self.engines) - seen - self._fixed:
            del self.engines[iid]
            await self._unsubscribe(iid)

    # -- the GPU tier, from the engines' KV events -----------------------------------------
    async def _subscribe(self, e: Engine) -> None:
        await self._unsubscribe(e.instance_id)
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(e.events)
        loop_sock = LoopSocket(sock)
        e.gpu_blocks.clear()
        e.last_seq = 0
        task = asyncio.create_task(serve_forever(
            loop_sock, lambda frames, iid=e.instance_id: self._on_batch(iid, frames),
            f"events of {e.instance_id}"))
        self._subscriptions[e.instance_id] = (e.events, task, loop_sock)

    async def _unsubscribe(self, iid: str) -> None:
        sub = self._subscriptions.pop(iid, None)
        if sub is not None:
            sub[1].cancel()
            await asyncio.gather(sub[1], return_exceptions=True)
            sub[2].close()

    def _on_batch(self, iid: str, frames: list[bytes]) -> None:
        e = self.engines.get(iid)
        if e is None or len(frames) != 3 or len(frames[1]) != 8:
            return
        seq = int.from_bytes(frames[1], "big")
        if e.last_seq and seq != e.last_seq + 1:
            logger.warning("%s: KV events %d..%d lost; forgetting its GPU tier", iid,
                           e.last_seq + 1, seq - 1)
            e.gpu_blocks.clear()
        e.last_seq = seq
        try:
            batch = _batches.decode(frames[2])
        except msgspec.DecodeError:
            return
        apply_events(e.gpu_blocks, batch.events, "GPU", e.expected)

    # -- queries ---------------------------------------------------------------------------
    @staticmethod
    def _chain(e: Engine, tokens: list[int], chains: dict[BlockHasher, list] | None) -> list:
        """The prompt's block hashes as ``e`` names them; ``chains`` caches them per hashing
        (engines alike share them: one SHA-256 per block per request, not per engine)."""
        assert e.hasher is not None
        chain = None if chains is None else chains.get(e.hasher)
        if chain is None:
            chain = [external(h) for h in e.hasher.chain(tokens)]
            if chains is not None:
                chains[e.hasher] = chain
        return chain

    def gpu_prefix(self, e: Engine, tokens: list[int],
                   chains: dict[BlockHasher, list] | None = None) -> int:
        """Tokens of ``tokens``' leading full blocks that ``e``'s GPU tier holds, or will hold
        once the prefills the router sent it are done (its expected blocks)."""
        if e.hasher is None or not (e.gpu_blocks or e.expected):
            return 0
        now = time.monotonic()
        n = 0
        for h in self._chain(e, tokens, chains):
            if h not in e.gpu_blocks and e.expected.get(h, 0.0) <= now:
                break
            n += 1
        return n * e.hasher.block_size

    def expect(self, e: Engine, tokens: list[int],
               chains: dict[BlockHasher, list] | None = None) -> None:
        """The router sent ``tokens`` to ``e``: count their full blocks as ``e``'s until its
        events speak for them, or for ``expect_s``."""
        if e.hasher is None or not tokens:
            return
        until = time.monotonic() + self.expect_s
        for h in self._chain(e, tokens, chains):
            if h not in e.gpu_blocks:
                e.expected[h] = until

    def routed(self, e: Engine, head: bytes, num_tokens: int) -> None:
        """The router sent ``e`` a prompt of ``num_tokens`` starting with ``head`` (see
        :attr:`Engine.recent`)."""
        _, most = e.recent.get(head, (0.0, 0))
        e.recent[head] = (time.monotonic(), max(most, num_tokens))

    def working_set(self, e: Engine) -> int:
        """Tokens of the distinct prompts (by their start) routed to ``e`` in the last
        ``working_set_s``: how much of the workload's KV it is asked to keep. Placing a prefix
        nobody holds on the engine with the least keeps the prefixes spread over the engines'
        caches, as the instantaneous load (which swings with every request) does not."""
        since = time.monotonic() - self.working_set_s
        return sum(n for t, n in e.recent.values() if t > since)

    def failed(self, e: Engine) -> None:
        """``e`` could not be reached: out of rotation for ``cooldown_s``."""
        e.down_until = time.monotonic() + self.cooldown_s


_QUEUE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def queued_requests(metrics_text: str) -> int:
    """``vllm:num_requests_running`` + ``vllm:num_requests_waiting`` from an engine's
    Prometheus text (summed over label sets; 0 when absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.split("{", 1)[0] in _QUEUE_GAUGES:
            try:
                total += float(value)
            except ValueError:
                pass
    return int(total)


def apply_events(blocks: set, events: list, medium: str,
                 expected: dict | None = None) -> None:
    """Apply KV events of ``medium`` to a set of block hashes; the blocks they name are no
    longer ``expected`` (the engine's word replaces the router's guess)."""
    for ev in events:
        if isinstance(ev, protocol.KVAllBlocksCleared):
            blocks.clear()
            if expected is not None:
                expected.clear()
            continue
        if ev.medium != medium:
            continue
        if isinstance(ev, protocol.KVBlockStored):
            blocks.update(ev.block_hashes)
        else:
            blocks.difference_update(ev.block_hashes)
        if expected:
            for h in ev.block_hashes:
                expected.pop(h, None)


def forget_expected(expected: dict, now: float) -> None:
    """Drop the expected blocks whose time is up."""
    for h in [h for h, until in expected.items() if until <= now]:
        del expected[h]
