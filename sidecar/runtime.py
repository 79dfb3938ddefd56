"""The per-engine sidecar: control-plane agent living in the engine's worker process.

Contract
--------
* Started by the connector's worker side, once the store exists: :func:`start_sidecar`. It
  runs on one daemon thread with its own asyncio loop and never calls into vLLM, so the
  engine's forward pass only ever competes with it for the GIL, briefly. That thread, and
  every thread it starts (NIXL's, UCX's, the to_thread and verify workers), may run on any
  CPU of the process's cgroup, not just the core vLLM bound the worker to.
* It owns the engine's :class:`~vllm_kvmove.transfer.NixlTransfer` (created on the sidecar
  thread: ~0.45 s that engine start-up does not wait for) and three sockets:
    - DEALER to the controller's ROUTER (``controller_reply_url``): :class:`~sidecar.wire.Register`
      and :class:`~sidecar.wire.Snapshot` on start and on every :class:`~sidecar.wire.Resync`,
      a :class:`~sidecar.wire.Heartbeat` every ``heartbeat_interval_s``, and one
      :class:`~sidecar.wire.Reply` per command, carrying a heartbeat (the store's state right
      after it). Commands run concurrently, each in its own task.
    - PUSH to the controller's PULL (``controller_pull_url``): store events in batches, when
      the store signals new ones, and right before a command's reply (so the controller's
      index is current when it learns the command finished).
    - the NIXL metadata server (inside ``NixlTransfer``).
  Sends never block: while the controller is away they are dropped, and the controller heals
  the gap with a resync when it (re)appears. Engines may therefore start before or after
  the controller, and survive its restarts.
* HTTP (``sidecar_host:sidecar_port``, :mod:`sidecar.app`): health and store info.
* Commands touch the store only through its public, thread-safe API. A fetch publishes
  nothing unless every chunk arrived and matched its checksum. When the source's pool is in
  shared memory on this host (``same_host_copy``), the fetch maps it and copies the chunks
  itself (:mod:`vllm_kvmove.shm`: memcpy on ``copy_threads`` threads, each of which then
  hashes what it copied); otherwise it READs over NIXL, big fetches in pieces, each hashed on
  the verify thread while the next one is read. Mappings of peers that exited are dropped at
  every heartbeat.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

import msgspec
import zmq

from sidecar import wire
from sidecar.errors import token_matches
from sidecar.zmqio import LoopSocket
from vllm_kvmove.checksum import checksum_stream
from vllm_kvmove.config import KVMoveConfig
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.shm import MappedPool, PeerPools
from vllm_kvmove.store import ChunkStore, StoreError
from vllm_kvmove.transfer import NixlTransfer, ReadRange, TransferError, split_ranges

logger = logging.getLogger("vllm_kvmove.sidecar")

# Store events are pushed when the store signals them, batched over this window; with no
# signal the loop still wakes this often (a safety net, e.g. evictions of an aborted reserve).
_EVENT_BATCH_S = 0.002
_EVENT_FALLBACK_S = 1.0
# Below this size a pin or fetch runs on the event loop itself: a thread hop costs more.
_INLINE_BYTES = 1 << 20
# Verification pipeline granularity: a fetch is read in pieces this big, each hashed on the
# verify thread while the next is read (larger: fewer NIXL transfers; smaller: more overlap).
_PIECE_BYTES = 32 << 20


class IntegrityError(Exception):
    kind = "integrity"


class CommandError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _tcp(url: str) -> str:
    return url if "://" in url else f"tcp://{url}"


class Sidecar:
    """One engine's sidecar. See the module docstring.

    Args:
        config: the engine's kvmove config.
        store: the engine's chunk store.
        layout: the engine's KV layout.
    """

    def __init__(self, config: KVMoveConfig, store: ChunkStore, layout: KVLayout):
        self.config = config
        self.store = store
        self.layout = layout
        self.fingerprint = layout.fingerprint()
        self.transfer: NixlTransfer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.controller_id: str | None = None
        self.incarnation = uuid.uuid4().hex
        self.stats = {"fetches": 0, "fetch_failures": 0, "same_host_fetches": 0, "bytes_in": 0,
                      "bytes_out": 0, "pins": 0}
        self._thread = threading.Thread(target=self._thread_main, name="kvmove-sidecar", daemon=True)
        self._stopping: asyncio.Event | None = None
        self._server: Any = None
        self._dealer: LoopSocket | None = None
        self._push: LoopSocket | None = None
        self._tasks: set[asyncio.Task] = set()
        # One thread hashes the pieces of every fetch in order (see _read_verified).
        self._verify_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="kvmove-verify", initializer=_unpin_this_thread)
        # Same-host peers' pools, mapped on first use (see vllm_kvmove.shm).
        self.peer_pools = (PeerPools(config.copy_threads, thread_init=_unpin_this_thread)
                           if config.same_host_copy else None)
        self._event_lock: asyncio.Lock | None = None
        # Transfer pins held for the controller: PinChunks.req_id -> (keys, deadline).
        self._leases: dict[int, tuple[list[bytes], float]] = {}

    @property
    def sidecar_url(self) -> str:
        host = "127.0.0.1" if self.config.sidecar_host in ("0.0.0.0", "") else self.config.sidecar_host
        return f"http://{host}:{self.config.sidecar_port}"

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
        _unpin_this_thread()
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported through wait_ready / logs
            self.error = e
            logger.exception("kvmove sidecar stopped with an error")

    async def _main(self) -> None:
        import uvicorn

        from sidecar.app import create_sidecar_app

        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._event_lock = asyncio.Lock()
        cfg = self.config
        self.transfer = await asyncio.to_thread(
            NixlTransfer, cfg.instance_id, self.store.base_addr, self.store.pool_bytes,
            cfg.p2p_host, cfg.p2p_init_port, token=cfg.api_token)
        ctx = zmq.Context.instance()
        if cfg.controller_reply_url:
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, cfg.instance_id.encode())
            dealer.setsockopt(zmq.IMMEDIATE, 1)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(_tcp(cfg.controller_reply_url))
            self._dealer = LoopSocket(dealer)
        if cfg.controller_pull_url:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.IMMEDIATE, 1)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(_tcp(cfg.controller_pull_url))
            self._push = LoopSocket(push)
        app = create_sidecar_app(self)
        self._server = uvicorn.Server(uvicorn.Config(
            app, host=cfg.sidecar_host, port=cfg.sidecar_port, log_level="warning",
            lifespan="off", access_log=False))
        # Bind here (not inside serve()) so a taken port is an error start-up can report.
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
        # without it, keep-alive responses stall ~40 ms on delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.sidecar_host, cfg.sidecar_port))
        serve = asyncio.create_task(self._server.serve(sockets=[sock]))
        loops = [asyncio.create_task(c) for c in (self._recv_loop(), self._heartbeat_loop(),
                                                  self._event_loop(), self._lease_loop())]
        await self._send_registration()
        self.ready.set()
        logger.info("kvmove sidecar %s: http %s, nixl %s, controller %s", cfg.instance_id,
                    self.sidecar_url, self.transfer.p2p_url, cfg.controller_reply_url or "none")
        await self._stopping.wait()
        await self._send(self._dealer, wire.Goodbye(cfg.instance_id))
        self._server.should_exit = True
        for t in loops + list(self._tasks):
            t.cancel()
        await asyncio.gather(serve, *loops, return_exceptions=True)
        for s in (self._dealer, self._push):
            if s is not None:
                s.close()
        self.transfer.close()
        self._verify_pool.shutdown(wait=False)
        if self.peer_pools is not None:
            self.peer_pools.close()

    # -- sending ---------------------------------------------------------------------------
    async def _send(self, sock: LoopSocket | None, msg: Any) -> bool:
        if sock is None:
            return False
        try:
            sock.send(wire.sidecar_encoder.encode(msg))
            return True
        except zmq.Again:
            return False  # controller away: dropped; the resync protocol heals the gap

    async def _send_registration(self) -> None:
        cfg, store = self.config, self.store
        assert self.transfer is not None
        reg = wire.Register(
            instance_id=cfg.instance_id, engine_url=cfg.engine_url, sidecar_url=self.sidecar_url,
            p2p_url=self.transfer.p2p_url, agent_name=self.transfer.agent_name,
            model=self.layout.model, fingerprint=self.fingerprint, layout=self.layout.to_dict(),
            chunk_size=self.layout.chunk_size, capacity_bytes=store.num_slots * store.slot_bytes,
            slot_bytes=store.slot_bytes, incarnation=self.incarnation, pid=os.getpid(),
            auth=cfg.api_token,
            shared_pool=store.shared_pool if cfg.same_host_copy else None)
        async with self._event_lock:  # no event batch may slip between snapshot and its seq
            seq, chunks = store.snapshot()
            store.drain_events()  # covered by the snapshot
            if await self._send(self._dealer, reg):
                await self._send(self._dealer, wire.Snapshot(
                    cfg.instance_id, seq, [wire.ChunkRecord(k, n) for k, n in chunks]))

    async def flush_events(self) -> None:
        """Push every buffered store event to the controller now."""
        async with self._event_lock:
            events = self.store.drain_events()
            if events:
                await self._send(self._push, wire.EventBatch(self.config.instance_id, [
                    wire.StoreEventMsg(e.seq, e.kind, e.key, e.num_tokens) for e in events]))

    async def _event_loop(self) -> None:
        """Push store events when the store signals them (no polling: an idle engine's sidecar
        sleeps), then checksum newly saved chunks off the engine's save path."""
        wake = asyncio.Event()
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

    def heartbeat(self) -> wire.Heartbeat:
        """This store's summary now (O(1): ``stats()`` keeps counts)."""
        st = self.store.stats()
        return wire.Heartbeat(self.config.instance_id, st["seq"], st["num_chunks"],
                              st["used_bytes"], st["capacity_bytes"],
                              st["available_slots"] * self.store.slot_bytes)

    async def send_heartbeat(self) -> None:
        await self._send(self._dealer, self.heartbeat())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            await self.send_heartbeat()
            if self.peer_pools is not None:
                self.peer_pools.sweep()  # unmap pools of peers that exited (~10 µs per peer)

    # -- leases ----------------------------------------------------------------------------
    def release_leases(self, expired, why: str) -> int:
        """Unpin every lease whose deadline satisfies ``expired``; returns leases released."""
        gone = [pid for pid, (_, deadline) in self._leases.items() if expired(deadline)]
        for pid in gone:
            keys, _ = self._leases.pop(pid)
            self.store.unpin(keys)
        if gone:
            logger.warning("released %d transfer lease(s): %s", len(gone), why)
        return len(gone)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.release_leases(lambda deadline: deadline < now, "lease expired")

    # -- commands --------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        if self._dealer is None:
            return
        while True:
            raw = await self._dealer.recv()
            try:
                msg = wire.controller_msg_decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("dropping undecodable controller message (%d bytes)", len(raw))
                continue
            if isinstance(msg, wire.RegisterAck):
                if self.controller_id is not None and msg.controller_id != self.controller_id:
                    # A new controller: the old one's jobs are gone, so are their leases.
                    self.release_leases(lambda deadline: True, "controller restarted")
                self.controller_id = msg.controller_id
            elif isinstance(msg, wire.Resync):
                await self._send_registration()
            else:
                task = asyncio.create_task(self._run_command(msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def execute_authorized(self, msg: Any) -> wire.Reply:
        """Check the command's token, run it, and turn failures into a failed Reply."""
        try:
            if not token_matches(self.config.api_token, msg.auth):
                raise CommandError("unauthorized", "command without the fleet's API token refused")
            return await self.execute(msg)
        except (StoreError, TransferError, IntegrityError, CommandError) as e:
            reply = wire.Reply(req_id=msg.req_id, ok=False, error_kind=e.kind, error=str(e))
        except Exception as e:  # noqa: BLE001
            logger.exception("command %s failed", type(msg).__name__)
            reply = wire.Reply(req_id=msg.req_id, ok=False, error_kind="internal",
                               error=f"{type(e).__name__}: {e}")
        return reply

    async def _run_command(self, msg: Any) -> None:
        reply = await self.execute_authorized(msg)
        await self.flush_events()
        # The reply carries a heartbeat: the controller's view of this store's free space is
        # current when it sees the result (one message, not two: each send is a wake-up of
        # ZMQ's I/O thread, ~50 µs here).
        reply.heartbeat = self.heartbeat()
        await self._send(self._dealer, reply)

    async def execute(self, msg: Any) -> wire.Reply:
        """Run one command against the store / transfer layer and build its reply."""
        store = self.store
        if isinstance(msg, wire.PinChunks):
            small = len(msg.keys) * store.slot_bytes <= _INLINE_BYTES
            infos = store.pin(msg.keys) if small else await asyncio.to_thread(store.pin, msg.keys)
            self._leases[msg.req_id] = (list(msg.keys), time.monotonic() + msg.lease_s)
            self.stats["pins"] += len(infos)
            base = store.base_addr
            return wire.Reply(req_id=msg.req_id, ok=True, count=len(infos), chunks=[
                wire.ChunkDesc(i.key, i.num_tokens, base + i.offset, i.nbytes, i.checksum)
                for i in infos])
        if isinstance(msg, wire.UnpinChunks):
            lease = self._leases.pop(msg.pin_id, None)
            if lease is not None:  # else: already expired or released, nothing to unpin
                if msg.delete:  # a move: the destination holds them, the source lets go
                    store.delete(lease[0])
                store.unpin(lease[0])
            self.stats["bytes_out"] += msg.transferred_bytes
            return wire.Reply(req_id=msg.req_id, ok=True, count=len(lease[0]) if lease else 0)
        if isinstance(msg, wire.PersistChunks):
            return wire.Reply(req_id=msg.req_id, ok=True,
                              count=store.persist(msg.keys, msg.persistent))
        if isinstance(msg, wire.ClearChunks):
            n = store.clear() if msg.keys is None else store.delete(msg.keys)
            return wire.Reply(req_id=msg.req_id, ok=True, count=n)
        if isinstance(msg, wire.FetchChunks):
            try:
                # A small fetch runs inline if it needs no handshake; the mapping looked up for
                # that decision is the one its copy uses (one /proc check, not two).
                small = sum(c.nbytes for c in msg.chunks) <= _INLINE_BYTES
                mapped = self._mapped(msg.source) if small else None
                inline = small and (mapped is not None or self.transfer.knows_peer(
                    msg.source.agent_name, msg.source.p2p_url, msg.source.incarnation))
                nbytes, count = (self._fetch(msg, mapped) if inline
                                 else await asyncio.to_thread(self._fetch, msg, mapped))
            except Exception:
                self.stats["fetch_failures"] += 1
                raise
            self.stats["fetches"] += 1
            self.stats["bytes_in"] += nbytes
            return wire.Reply(req_id=msg.req_id, ok=True, count=count, bytes=nbytes)
        raise CommandError("bad_request", f"unknown command {type(msg).__name__}")

    def _fetch(self, msg: wire.FetchChunks, mapped: MappedPool | None = None) -> tuple[int, int]:
        """Read, verify and publish chunks from a peer (on a worker thread, or inline when
        small); ``mapped``: the source's pool, if the caller already mapped it."""
        store, layout, transfer = self.store, self.layout, self.transfer
        assert transfer is not None
        timeout = self.config.command_timeout_s
        for c in msg.chunks:
            if not 0 < c.num_tokens <= layout.chunk_size or c.nbytes != layout.valid_bytes(c.num_tokens):
                raise CommandError("incompatible",
                                   f"chunk {c.key.hex()}: {c.nbytes} bytes for {c.num_tokens} "
                                   f"tokens does not fit this engine's layout")
        reserved: list[tuple[wire.ChunkDesc, int]] = []
        try:
            for c in msg.chunks:
                slot = store.reserve(c.key, c.num_tokens)
                if slot is not None:
                    reserved.append((c, slot * store.slot_bytes))
            t_read = time.perf_counter()
            try:
                moved = self._read_verified(msg.source, reserved, timeout, mapped)
            except TransferError:
                transfer.forget_peer(msg.source.agent_name)  # re-handshake next time
                raise
        except BaseException:
            for c, _ in reserved:
                store.abort(c.key)
            raise
        for c, _ in reserved:
            store.commit(c.key, c.checksum)
        logger.debug("fetched %d chunks (%d bytes) from %s in %.1f ms (read and verify)",
                     len(reserved), moved, msg.source.instance_id,
                     (time.perf_counter() - t_read) * 1e3)
        return moved, len(reserved)

    def _mapped(self, source: wire.PeerInfo) -> MappedPool | None:
        """The source's pool mapped here (same host, shared pool), or None: use NIXL."""
        if self.peer_pools is None:
            return None
        return self.peer_pools.get(source.shared_pool)

    def _read_verified(self, source: wire.PeerInfo, reserved: list[tuple[wire.ChunkDesc, int]],
                       timeout: float, mapped: MappedPool | None = None) -> int:
        """Copy the reserved chunks from ``source`` and check each one's checksum (when
        verification is on); returns bytes copied. Raises TransferError or IntegrityError.

        Same host with a shared pool: copied from the mapped pool on the copy threads, each
        chunk checksummed in the same pass (:meth:`vllm_kvmove.shm.MappedPool.copy`).
        Otherwise a NIXL READ, verified in a pipeline: the bytes are read in pieces of at most
        ``_PIECE_BYTES``, and each piece is hashed (streaming XXH3, the same digest as
        one-shot) on the verify thread while the next piece is read here — both release the
        GIL, so on two cores the hash (~13 GB/s on one core) hides behind the copy instead of
        adding to it.
        """
        store, transfer = self.store, self.transfer
        assert transfer is not None
        ranges = [ReadRange(c.addr, store.base_addr + off, c.nbytes) for c, off in reserved]
        if not ranges:
            return 0  # this store holds them all already
        verify = self.config.verify_checksums
        if mapped is None:
            mapped = self._mapped(source)
        if mapped is not None:
            digests = mapped.copy(ranges, checksums=verify)
            moved = sum(r.nbytes for r in ranges)
            self.stats["same_host_fetches"] += 1
        else:
            transfer.connect_peer(source.agent_name, source.p2p_url, timeout, source.incarnation)
            if not verify:
                return transfer.read(source.agent_name, ranges, timeout)  # one transfer: fastest
            hashers = [checksum_stream() for _ in reserved]
            moved = self._read_pipelined(source, ranges, hashers, timeout)
            digests = [h.intdigest() for h in hashers]
        for (c, _), digest in zip(reserved, digests or ()):
            if digest != c.checksum:
                raise IntegrityError(f"chunk {c.key.hex()} from {source.instance_id}: checksum "
                                     f"{digest:08x} != {c.checksum:08x}")
        return moved

    def _read_pipelined(self, source: wire.PeerInfo, ranges: list[ReadRange], hashers: list,
                        timeout: float) -> int:
        """NIXL READ of ``ranges`` in pieces, each fed to its chunks' hashers on the verify
        thread while the next piece is read; returns bytes read."""
        store, transfer = self.store, self.transfer
        pieces = split_ranges(ranges, _PIECE_BYTES)
        moved = 0
        pending: list[concurrent.futures.Future] = []
        try:
            for piece in pieces:
                moved += transfer.read(source.agent_name, [r for _, r in piece], timeout)
                work = [(hashers[i], store.pool[r.local_addr - store.base_addr:
                                                r.local_addr - store.base_addr + r.nbytes].numpy())
                        for i, r in piece]
                if len(pieces) == 1:
                    _hash_pieces(work)  # nothing to overlap with
                else:
                    pending.append(self._verify_pool.submit(_hash_pieces, work))
        finally:
            concurrent.futures.wait(pending)  # no hashing may outlive the reservation
        for f in pending:
            f.result()
        return moved


def _hash_pieces(work: list[tuple[Any, Any]]) -> None:
    """Feed each (streaming hasher, bytes) pair, in order (runs on the verify thread)."""
    for hasher, data in work:
        hasher.update(data)


def _unpin_this_thread() -> None:
    """Let the calling thread (and the threads it starts: NIXL's progress thread, UCX's async
    thread, the to_thread workers) run on every CPU the process may use.

    vLLM's CPU worker binds each of its threads to the engine's OpenMP core before the
    connector starts us, and threads inherit that mask. Kept there, a NIXL transfer posted by
    the sidecar waits for UCX's threads to be scheduled on a core busy with the engine
    (measured: 0.15-3.3 ms for a 128 KiB read that takes 0.05 ms unpinned), and the sidecar's
    work competes with the forward pass on its one core instead of using idle ones.
    """
    try:
        cpus = _allowed_cpus()
        if cpus and cpus != os.sched_getaffinity(0):
            os.sched_setaffinity(0, cpus)  # pid 0: the calling thread only
    except OSError as e:
        logger.debug("could not widen the sidecar's CPU affinity: %s", e)


def _allowed_cpus() -> set[int]:
    """CPUs this cgroup may use (cgroup v2 cpuset), else every online CPU."""
    try:
        spec = open("/sys/fs/cgroup/cpuset.cpus.effective").read().strip()
    except OSError:
        spec = ""
    cpus: set[int] = set()
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus or set(range(os.cpu_count() or 1))


def start_sidecar(config: KVMoveConfig, store: ChunkStore, layout: KVLayout,
                  timeout: float = 30.0) -> Sidecar:
    """Start the sidecar of this engine on its own thread and wait until it serves.

    Raises:
        RuntimeError: it could not start (e.g. a port is taken); the engine should not start
            half-connected.
    """
    # The engine's threads hold the GIL for up to the switch interval (5 ms by default) before
    # another thread may run; a command waiting that long would dwarf a small move.
    # 0.2 ms bounds the wait at the price of a few more (cheap) handoffs while the sidecar is busy.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0002))
    sidecar = Sidecar(config, store, layout).start()
    sidecar.wait_ready(timeout)
    return sidecar
