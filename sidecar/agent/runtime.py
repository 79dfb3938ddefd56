"""The per-engine sidecar: the control-plane agent living in the engine's worker process.

Contract
--------
* Started by the connector's worker side, once the store exists: :func:`start_sidecar` (the
  connector's one tie to the control plane). It runs on one daemon thread with its own
  asyncio loop and never calls into vLLM, so the engine's forward pass only ever competes with
  it for the GIL, briefly. That thread, and every thread it starts (NIXL's, UCX's, the
  to_thread, verify and copy workers), may run on any CPU of the process's cgroup, not just
  the core vLLM bound the worker to (:func:`widen_cpu_affinity`).
* It owns the engine's :class:`~vllm_kvmove.transfer.NixlTransfer` (created on the sidecar
  thread: ~0.45 s that engine start-up does not wait for) and three sockets:
    - DEALER to the controller's ROUTER (``controller_reply_url``):
      :class:`~sidecar.protocol.Register` and :class:`~sidecar.protocol.Snapshot` on start
      (repeated until a controller acknowledges them) and on every
      :class:`~sidecar.protocol.Resync`, a :class:`~sidecar.protocol.Heartbeat` every
      ``heartbeat_interval_s``, and one
      :class:`~sidecar.protocol.Reply` per command, carrying a heartbeat (the store's state
      right after it). Commands run concurrently, each in its own task
      (:mod:`sidecar.agent.commands`).
    - PUSH to the controller's PULL (``controller_pull_url``): store events in batches, when
      the store signals new ones, and right before a command's reply (so the controller's
      index is current when it learns the command finished).
    - the NIXL metadata server (inside ``NixlTransfer``).
  Sends never block: while the controller is away they are dropped, and the controller heals
  the gap with a resync when it (re)appears. Engines may therefore start before or after
  the controller, and survive its restarts.
* HTTP (``sidecar_host:sidecar_port``, :mod:`sidecar.agent.app`): health, store info, chunks,
  metrics.
* Security: with the fleet secret (``api_token``) every ZMQ socket runs CURVE
  (:class:`~vllm_kvmove.zmqauth.FleetSecurity`): only fleet members can connect, and nothing
  secret crosses the wire. The controller knows this sidecar by the connection its
  registration came on (the sidecar sets no routing id of its own), not by a name anyone
  could claim. Every receive loop survives any input: a message of the wrong shape is
  dropped, counted (``dropped``) and logged once per kind.
* Liveness both ways: the controller answers every heartbeat (:class:`~sidecar.protocol.HeartbeatAck`);
  a sidecar that hears nothing from it for :data:`ACK_TIMEOUT_INTERVALS` heartbeat intervals
  registers again.
* Process-wide changes it makes: :func:`start_sidecar` lowers ``sys.setswitchinterval`` to
  0.2 ms; the NIXL agent's creation sets ``UCX_TLS``, ``UCX_NET_DEVICES`` and UCX's tcp
  segment sizes (each if unset) and
  wraps NIXL's agent constructor for the call (:mod:`vllm_kvmove.transfer`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import msgspec
import uvicorn
import zmq

from sidecar import protocol
from sidecar.agent.app import create_sidecar_app
from sidecar.agent.commands import CommandExecutor
from sidecar.agent.fetch import ChunkFetcher
from sidecar.agent.kvevents import KVEventPublisher, default_topic
from sidecar.httpkit import plain_http_warning, server_config
from sidecar.zmqio import LoopSocket, serve_forever
from vllm_kvmove.affinity import widen_cpu_affinity
from vllm_kvmove.blockhash import BlockHasher
from vllm_kvmove.config import KVMoveConfig
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.shm import CopyThreads, PeerPools
from vllm_kvmove.store import ChunkStore
from vllm_kvmove.transfer import NixlTransfer
from vllm_kvmove.zmqauth import FleetSecurity

logger = logging.getLogger("vllm_kvmove.sidecar")

# Store events are pushed when the store signals them, batched over this window; with no
# signal the loop still wakes this often (a safety net, e.g. evictions of an aborted reserve).
_EVENT_BATCH_S = 0.002
_EVENT_FALLBACK_S = 1.0
# The pool is committed this much per thread hop (see Sidecar._prefault): ~35 ms each here
# (the kernel zeroes every page: ~1.8 GB/s on one core).
_PREFAULT_PIECE = 64 << 20
# Heartbeat intervals without a word from the controller before registering again.
ACK_TIMEOUT_INTERVALS = 3
# Largest message the sidecar reads from the controller (a fetch of 256 MiB of chunks is ~60
# KiB of descriptors); a bigger one drops the connection inside ZMQ.
_MAX_MESSAGE = 64 << 20
# Open HTTP connections beyond which the sidecar's server closes a new one (it runs inside the
# engine's worker process: its file descriptors are the engine's).
_HTTP_MAX_CONNECTIONS = 256


def _tcp(url: str) -> str:
    return url if "://" in url else f"tcp://{url}"


class Sidecar:
    """One engine's sidecar. See the module docstring.

    Args:
        config: the engine's kvmove config (its rank's: :meth:`KVMoveConfig.for_rank`).
        store: the engine's chunk store (its rank's).
        layout: the engine's KV layout (per rank).
        rank, world_size: its tensor-parallel rank and degree (registered with the controller,
            which groups an engine's ranks into one instance).
        block_hasher: how the engine names its blocks, when it publishes KV events (then
            registered, so moves into it name their chunks' blocks too).
        engine_events: where the engine publishes its own KV events, for routers (registered).

    Attributes (read by the HTTP app, metrics and tests; written only on the sidecar's thread):
        counters: transfer counters since start.
        controller_id: the controller that last acknowledged our registration, or None.
        transfer: the NIXL endpoint, once started.
        commands: the command executor (and its leases), once started.
        dropped: messages dropped by a receive loop, by reason.
    """

    def __init__(self, config: KVMoveConfig, store: ChunkStore, layout: KVLayout,
                 rank: int = 0, world_size: int = 1, block_hasher: BlockHasher | None = None,
                 engine_events: str = ""):
        self.config = config
        self.store = store
        self.layout = layout
        self.rank, self.world_size = rank, world_size
        self.block_hasher = block_hasher
        self.engine_events = engine_events
        self.kv_events: KVEventPublisher | None = None
        self.fingerprint = layout.fingerprint()
        self.transfer: NixlTransfer | None = None
        self.commands: CommandExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.controller_id: str | None = None
        self.incarnation = uuid.uuid4().hex
        self.counters = protocol.TransferCounters()
        self.dropped: Counter[str] = Counter()
        self.security = FleetSecurity(config.api_token)
        self._last_heard = 0.0  # monotonic time of the controller's last message to us
        self._silence_reported = False
        self._thread = threading.Thread(target=self._thread_main, name="kvmove-sidecar", daemon=True)
        self._stopping: asyncio.Event | None = None
        self._server: Any = None
        self._dealer: LoopSocket | None = None
        self._push: LoopSocket | None = None
        self._drained: asyncio.Future | None = None  # the DrainEnded that leave() awaits
        self._tasks: set[asyncio.Task] = set()
        # The engine's copy threads: same-host copies, and the checksums a lease computes.
        self.copy_threads = CopyThreads(config.copy_threads, thread_init=widen_cpu_affinity)
        # Same-host peers' pools, mapped on first use (see vllm_kvmove.shm).
        self.peer_pools = (PeerPools(copy_threads=self.copy_threads)
                           if config.same_host_copy else None)
        self._event_lock: asyncio.Lock | None = None

    @property
    def sidecar_url(self) -> str:
        host = "127.0.0.1" if self.config.sidecar_host in ("0.0.0.0", "") else self.config.sidecar_host
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{host}:{self.config.sidecar_port}"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Sidecar":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close sockets; safe to call twice."""
        loop, stopping = self.loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout=timeout)

    def leave(self, timeout: float) -> protocol.DrainEnded | None:
        """Ask the controller to drain this engine (it is shutting down) and wait until the
        drain ended, at most ``timeout`` seconds. Call from any thread but the sidecar's.

        Returns:
            how the drain ended, or None if no answer came in time — or at once if the sidecar
            is not running, has no controller, or has not heard from it lately (an engine
            whose controller is gone does not wait for it).
        """
        loop = self.loop
        silent = time.monotonic() - self._last_heard > max(5.0, 3 * self.config.heartbeat_interval_s)
        if loop is None or loop.is_closed() or self._dealer is None or \
                self.controller_id is None or silent:
            logger.warning("no drain: the controller %s", "is not configured" if
                           self._dealer is None else "has not answered lately")
            return None

        async def ask() -> protocol.DrainEnded | None:
            self._drained = loop.create_future()
            await self._send(self._dealer, protocol.Leaving(self.config.instance_id))
            try:
                return await asyncio.wait_for(self._drained, timeout)
            except asyncio.TimeoutError:
                return None

        try:
            return asyncio.run_coroutine_threadsafe(ask(), loop).result(timeout + 5)
        except Exception:  # noqa: BLE001 - a stopped loop: nothing to wait for
            logger.exception("could not ask the controller for a drain")
            return None

    def wait_ready(self, timeout: float) -> None:
        """Block until the sidecar serves. Raises RuntimeError if it failed or timed out."""
        t0 = time.monotonic()
        while not self.ready.wait(0.05):
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"kvmove sidecar {self.config.instance_id} failed to start: "
                                   f"{self.error!r}") from self.error
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"kvmove sidecar {self.config.instance_id} not ready after {timeout} s")

    def _thread_main(self) -> None:
        widen_cpu_affinity()
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported through wait_ready / logs
            self.error = e
            logger.exception("kvmove sidecar stopped with an error")

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._event_lock = asyncio.Lock()
        cfg = self.config
        # First: committing the pool runs beside the NIXL agent's creation (~0.45 s), so it is
        # well ahead of the first fetch once the controller knows this sidecar.
        prefault = asyncio.create_task(self._prefault())
        try:
            self.transfer = await asyncio.to_thread(
                NixlTransfer, cfg.instance_id, self.store.base_addr, self.store.pool_bytes,
                cfg.p2p_host, cfg.p2p_init_port, security=self.security,
                data_ports=cfg.p2p_data_ports)
        except BaseException:
            prefault.cancel()
            raise
        fetcher = ChunkFetcher(self.store, self.layout, self.transfer, self.peer_pools,
                               cfg.verify_checksums, cfg.command_timeout_s,
                               thread_init=widen_cpu_affinity, rank=self.rank,
                               world_size=self.world_size)
        self.commands = CommandExecutor(self.store, fetcher, self.counters,
                                        hash_executor=self.copy_threads.executor)
        ctx = zmq.Context.instance()
        if cfg.controller_reply_url:
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IMMEDIATE, 1)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE)
            self.security.client(dealer)
            dealer.connect(_tcp(cfg.controller_reply_url))
            self._dealer = LoopSocket(dealer)
        if cfg.controller_pull_url:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.IMMEDIATE, 1)
            push.setsockopt(zmq.LINGER, 0)
            self.security.client(push)
            push.connect(_tcp(cfg.controller_pull_url))
            self._push = LoopSocket(push)
        if cfg.kv_events_port:
            self.kv_events = KVEventPublisher(
                cfg.sidecar_host, cfg.kv_events_port,
                cfg.kv_events_topic or default_topic(cfg.instance_id, self.layout.model,
                                                     self.rank), self.security)
        app = create_sidecar_app(self)
        self._server = uvicorn.Server(server_config(
            app, cfg.sidecar_host, cfg.sidecar_port, max_connections=_HTTP_MAX_CONNECTIONS,
            lifespan="off", tls_cert=cfg.tls_cert, tls_key=cfg.tls_key))
        warning = plain_http_warning(cfg.sidecar_host, cfg.api_token, bool(cfg.tls_cert))
        if warning:
            logger.warning(warning)
        # Bind here (not inside serve()) so a taken port is an error start-up can report.
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
        # without it, keep-alive responses stall ~40 ms on delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.sidecar_host, cfg.sidecar_port))
        serve = asyncio.create_task(self._server.serve(sockets=[sock]))
        loops = [asyncio.create_task(c) for c in (self._recv_loop(), self._heartbeat_loop(),
                                                  self._event_loop(), self._lease_loop(),
                                                  self._register_until_acked())]
        loops.append(prefault)
        self.ready.set()
        logger.info("kvmove sidecar %s: http %s, nixl %s, controller %s", cfg.instance_id,
                    self.sidecar_url, self.transfer.p2p_url, cfg.controller_reply_url or "none")
        await self._stopping.wait()
        await self._send(self._dealer, protocol.Goodbye(cfg.instance_id))
        self._server.should_exit = True
        for t in loops + list(self._tasks):
            t.cancel()
        await asyncio.gather(serve, *loops, return_exceptions=True)
        for s in (self._dealer, self._push):
            if s is not None:
                s.close()
        if self.kv_events is not None:
            self.kv_events.close()
        self.transfer.close()
        fetcher.close()
        if self.peer_pools is not None:
            self.peer_pools.close()
        self.copy_threads.shutdown()

    # -- sending ---------------------------------------------------------------------------
    async def _send(self, sock: LoopSocket | None, msg: Any) -> bool:
        if sock is None:
            return False
        try:
            sock.send(protocol.sidecar_encoder.encode(msg))
            return True
        except zmq.Again:
            return False  # controller away: dropped; the resync protocol heals the gap

    async def _send_registration(self) -> None:
        cfg, store = self.config, self.store
        assert self.transfer is not None
        reg = protocol.Register(
            instance_id=cfg.instance_id, engine_url=cfg.engine_url, sidecar_url=self.sidecar_url,
            p2p_url=self.transfer.p2p_url, agent_name=self.transfer.agent_name,
            model=self.layout.model, fingerprint=self.fingerprint, layout=self.layout.to_dict(),
            chunk_size=self.layout.chunk_size, capacity_bytes=store.num_slots * store.slot_bytes,
            slot_bytes=store.slot_bytes, incarnation=self.incarnation, pid=os.getpid(),
            shared_pool=store.shared_pool if cfg.same_host_copy else None, rank=self.rank,
            world_size=self.world_size,
            block_hashing=None if self.block_hasher is None
            else protocol.BlockHashing(**self.block_hasher.to_dict()),
            kv_events=self.kv_events.endpoint if self.kv_events is not None else "",
            engine_events=self.engine_events)
        async with self._event_lock:  # no event batch may slip between snapshot and its seq
            seq, chunks = store.snapshot()
            store.drain_events()  # covered by the snapshot
            if await self._send(self._dealer, reg):
                await self._send(self._dealer, protocol.Snapshot(
                    cfg.instance_id, seq, protocol.pack_chunks(chunks)))

    async def _register_until_acked(self) -> None:
        """Send the registration until a controller acknowledges one. A send made before the
        DEALER connected is dropped (IMMEDIATE), and a controller started later never hears
        it; waiting for the first heartbeat to be answered by a resync would tie registration
        to ``heartbeat_interval_s``. Afterwards, a restarted controller asks for it (Resync)."""
        delay = 0.05
        while self._dealer is not None and self.controller_id is None:
            await self._send_registration()
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)

    async def flush_events(self) -> None:
        """Push every buffered store event to the controller now."""
        async with self._event_lock:
            events = self.store.drain_events()
            if events and self.kv_events is not None:
                self.kv_events.publish(events)
            if events:
                await self._send(self._push, protocol.EventBatch(
                    self.config.instance_id, self.incarnation,
                    [protocol.StoreEventMsg(e.seq, e.kind, e.key, e.num_tokens) for e in events],
                    self.rank))

    async def _event_loop(self) -> None:
        """Push store events when the store signals them (no polling: an idle engine's sidecar
        sleeps), then checksum newly saved chunks off the engine's save path."""
        wake = asyncio.Event()
        wake.set()  # at once: chunks the store held before we started wait for their checksums
        loop = asyncio.get_running_loop()
        self.store.on_events = lambda: loop.call_soon_threadsafe(wake.set)
        try:
            while True:
                try:
                    await asyncio.wait_for(wake.wait(), _EVENT_FALLBACK_S)
                    await asyncio.sleep(_EVENT_BATCH_S)
                except asyncio.TimeoutError:
                    pass
                wake.clear()
                await self.flush_events()
                # A thread hop only when there is hashing to do (engine saves), not after
                # every command's events.
                while self.store.checksums_pending() and await asyncio.to_thread(
                        self.store.fill_checksums, 16):
                    pass
        finally:
            self.store.on_events = None

    async def _prefault(self) -> None:
        """Commit the store's pool ahead of need (``prefault_pool``), a piece per thread hop
        so the loop stays responsive: the engine's first fetches and saves then write into
        committed pages."""
        if not self.config.prefault_pool:
            return
        t0 = time.perf_counter()
        while await asyncio.to_thread(self.store.prefault, _PREFAULT_PIECE):
            pass
        logger.info("kvmove sidecar %s: store pool committed (%.2f GiB) in %.2f s",
                    self.config.instance_id, self.store.pool_bytes / 2**30,
                    time.perf_counter() - t0)

    def heartbeat(self) -> protocol.Heartbeat:
        """This store's summary now (O(1): ``stats()`` keeps counts)."""
        st = self.store.stats()
        return protocol.Heartbeat(self.config.instance_id, st["seq"], st["num_chunks"],
                                  st["used_bytes"], st["capacity_bytes"],
                                  st["available_slots"] * self.store.slot_bytes)

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            silent = time.monotonic() - self._last_heard
            if self.controller_id is not None and silent > ACK_TIMEOUT_INTERVALS * interval:
                # The controller stopped answering us (it lost our registration, or our
                # connection, or it is down): register again, every few intervals until it
                # answers; said once per silence.
                if not self._silence_reported:
                    logger.warning("no word from the controller for %.1f s: registering again "
                                   "until it answers", silent)
                    self._silence_reported = True
                self._last_heard = time.monotonic()
                await self._send_registration()
            else:
                await self._send(self._dealer, self.heartbeat())
            if self.peer_pools is not None:
                self.peer_pools.sweep()  # unmap pools of peers that exited (~10 µs per peer)

    async def _lease_loop(self) -> None:
        assert self.commands is not None
        while True:
            await asyncio.sleep(1.0)
            self.commands.leases.expire()

    # -- commands --------------------------------------------------------------------------
    def _drop(self, reason: str, detail: str) -> None:
        """Count a dropped message; log the first of each reason."""
        self.dropped[reason] += 1
        if self.dropped[reason] == 1:
            logger.warning("dropping a controller message (%s): %s; further ones are counted "
                           "only", reason, detail)

    async def _recv_loop(self) -> None:
        if self._dealer is not None:
            await serve_forever(self._dealer, self._on_controller_message, "the controller socket")

    async def _on_controller_message(self, frames: list[bytes]) -> None:
        assert self.commands is not None
        if len(frames) != 1:
            self._drop("frames", f"{len(frames)} frames, expected 1")
            return
        try:
            msg = protocol.controller_msg_decoder.decode(frames[0])
        except msgspec.DecodeError as e:
            self._drop("undecodable", str(e))
            return
        self._last_heard = time.monotonic()
        self._silence_reported = False
        if isinstance(msg, protocol.RegisterAck):
            if self.controller_id is not None and msg.controller_id != self.controller_id:
                # A new controller: the old one's jobs are gone, so are their leases.
                self.commands.leases.end_all("controller restarted")
            self.controller_id = msg.controller_id
        elif isinstance(msg, protocol.HeartbeatAck):
            pass  # heard: that is all it says
        elif isinstance(msg, protocol.RegisterRefused):
            self._drop("refused", f"the controller refused our registration: {msg.reason}")
        elif isinstance(msg, protocol.Resync):
            await self._send_registration()
        elif isinstance(msg, protocol.DrainEnded):
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(msg)
        else:
            task = asyncio.create_task(self._run_command(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_command(self, msg: Any) -> None:
        assert self.commands is not None
        reply = await self.commands.run(msg)
        await self.flush_events()
        # The reply carries a heartbeat: the controller's view of this store's free space is
        # current when it sees the result (one message, not two: each send is a wake-up of
        # ZMQ's I/O thread, ~50 µs here).
        reply.heartbeat = self.heartbeat()
        await self._send(self._dealer, reply)


def start_sidecar(config: KVMoveConfig, store: ChunkStore, layout: KVLayout,
                  timeout: float = 30.0, rank: int = 0, world_size: int = 1,
                  block_hasher: BlockHasher | None = None, engine_events: str = "") -> Sidecar:
    """Start the sidecar of this engine (of its tensor-parallel ``rank`` of ``world_size``:
    ``config`` is :meth:`~vllm_kvmove.config.KVMoveConfig.for_rank`'s) on its own thread and
    wait until it serves.

    Process-wide side effect: lowers the interpreter's GIL switch interval to 0.2 ms (see
    below).

    Raises:
        RuntimeError: it could not start (e.g. a port is taken); the engine should not start
            half-connected.
    """
    # The engine's threads hold the GIL for up to the switch interval (5 ms by default) before
    # another thread may run; a command waiting that long would dwarf a small move.
    # 0.2 ms bounds the wait at the price of a few more (cheap) handoffs while the sidecar is busy.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
    sidecar = Sidecar(config, store, layout, rank, world_size, block_hasher,
                      engine_events).start()
    sidecar.wait_ready(timeout)
    return sidecar
