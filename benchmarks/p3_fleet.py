"""Shared by P3 and P3b: a simulated fleet of sidecars holding chunk keys, registered with a
real controller process, and the ``/lookup`` workload over it.

* :class:`Holdings` — who holds which synthetic prefix (1,024 tokens, 4 chunks of 256): each
  instance a set number of keys, some prefixes shared by 2-12 instances (some of those holders
  only hold their leading 1-3 chunks), the rest private; keys computed exactly as every engine
  computes them (:func:`chunk_spans`).
* :class:`SimSidecars` — one DEALER socket per instance, all served by one thread (of this
  process, or of a child process: :class:`SimProcess`), speaking the real protocol as
  :mod:`sidecar.agent.runtime` does: Register then Snapshot, a Heartbeat every second, Register
  + Snapshot again whenever the controller answers Resync.
* :func:`workload` — the P3 mix of lookups, each with the answer the registered holdings imply.
* :func:`controller_tree` / :func:`start_controller` — a controller from this tree or from an
  exported commit (a "before" arm in the same run).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import httpx
import zmq

from common import REPO, WORK
from sidecar import protocol
from vllm_kvmove.hashing import chunk_spans
from vllm_kvmove.layout import KVLayout

CHUNK = 256
PROMPT_CHUNKS = 4
PROMPT_TOKENS = CHUNK * PROMPT_CHUNKS  # 1,024
HEARTBEAT_S = 1.0

LAYOUT = KVLayout(model="Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16", num_layers=24,
                  num_kv_heads=2, head_size=64, block_size=16, chunk_size=CHUNK,
                  backend="cpu_attn/vec")
FP = LAYOUT.fingerprint()
HEADERS = {"content-type": "application/json"}

Tokens = Callable[[int], list[int]]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports from 20000-31999 (below the ephemeral range)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def prefix_keys(tokens: list[int]) -> list[bytes]:
    return [s.key for s in chunk_spans(tokens, CHUNK, FP)]


class Holdings:
    """Who holds which prefix, and each instance's snapshot (exactly ``keys_per_instance``
    keys each).

    Args:
        n_instances, keys_per_instance: the fleet.
        n_shared: prefixes drawn to be held by several instances (those that end up with >= 2
            holders are kept).
        shared_cap: at most this many of an instance's keys are shared ones.
        tokens: a prefix's 1,024 token ids from its id (deterministic).
        keys: ``pids -> {pid: its 4 keys}`` (default: :func:`prefix_keys` of ``tokens``, here).
    """

    def __init__(self, n_instances: int, keys_per_instance: int, n_shared: int,
                 shared_cap: int, tokens: Tokens, seed: int = 3,
                 keys: Callable[[list[int]], dict[int, list[bytes]]] | None = None):
        rng = random.Random(seed)
        self.tokens = tokens
        self.ids = [f"sim-{i:03d}" for i in range(n_instances)]
        # prefix id -> {instance: leading chunks held}; prefix seeds are the ids themselves.
        self.holders: dict[int, dict[str, int]] = {}
        self.shared: list[int] = []
        self.private: list[int] = []
        counts = [0] * n_instances
        next_id = 1_000_000
        for _ in range(n_shared):
            pid, next_id = next_id, next_id + 1
            k = min(12, 2 + int(rng.expovariate(1 / 2.5)))
            held: dict[str, int] = {}
            for i in rng.sample(range(n_instances), k):
                n = PROMPT_CHUNKS if rng.random() < 0.7 else rng.randint(1, PROMPT_CHUNKS - 1)
                if counts[i] + n <= shared_cap:
                    counts[i] += n
                    held[self.ids[i]] = n
            if len(held) >= 2:
                self.holders[pid] = held
                self.shared.append(pid)
        for i, iid in enumerate(self.ids):
            left = keys_per_instance - counts[i]
            while left:
                pid, next_id = next_id, next_id + 1
                n = min(PROMPT_CHUNKS, left)
                self.holders[pid] = {iid: n}
                self.private.append(pid)
                left -= n
        self.next_id = next_id
        # The keys, computed exactly as every engine computes them.
        keys_of = keys(list(self.holders)) if keys is not None else \
            {pid: prefix_keys(tokens(pid)) for pid in self.holders}
        self.snapshot: dict[str, list[tuple[bytes, int]]] = {iid: [] for iid in self.ids}
        for pid, held in self.holders.items():
            for iid, n in held.items():
                self.snapshot[iid].extend((k, CHUNK) for k in keys_of[pid][:n])
        self.distinct_keys = sum(max(h.values()) for h in self.holders.values())
        self.total_keys = sum(len(s) for s in self.snapshot.values())
        assert all(len(s) == keys_per_instance for s in self.snapshot.values())
        assert self.total_keys == n_instances * keys_per_instance

    def expect(self, pid: int, chunks: int) -> dict[str, int]:
        """What /lookup must answer for the first ``chunks`` chunks of prefix ``pid`` (then
        anything else): matched tokens per holder."""
        return {iid: min(n, chunks) * CHUNK for iid, n in self.holders[pid].items()}


class Encoded:
    """One simulated sidecar's messages, encoded once: Register, Snapshot(s) by name, Heartbeat."""

    def __init__(self, iid: str, n: int, snaps: dict[str, list[tuple[bytes, int]]],
                 incarnation: str, at_start: bool = True):
        self.at_start = at_start
        enc = protocol.sidecar_encoder
        slot_bytes = LAYOUT.chunk_bytes
        num = len(next(iter(snaps.values())))
        capacity = (num + num // 5) * slot_bytes
        self.register = enc.encode(protocol.Register(
            instance_id=iid, engine_url=f"http://127.0.0.1:{18000 + n}",
            sidecar_url=f"http://127.0.0.1:{19000 + n}", p2p_url=f"127.0.0.1:{17000 + n}",
            agent_name=f"kvmove-{iid}-{incarnation}", model=LAYOUT.model, fingerprint=FP,
            layout=LAYOUT.to_dict(), chunk_size=CHUNK, capacity_bytes=capacity,
            slot_bytes=slot_bytes, incarnation=f"{incarnation}-{iid}", pid=100_000 + n))
        self.snaps = {name: enc.encode(protocol.Snapshot(iid, 1, protocol.pack_chunks(recs)))
                      for name, recs in snaps.items()}
        self.snap = next(iter(self.snaps.values()))  # the one sent at (re)registration
        used = num * slot_bytes
        self.beat = enc.encode(protocol.Heartbeat(iid, 1, num, used, capacity, capacity - used))


def encode_fleet(h: Holdings) -> dict[str, Encoded]:
    incarnation = uuid.uuid4().hex[:8]
    return {iid: Encoded(iid, n, {"snap": h.snapshot[iid]}, incarnation)
            for n, iid in enumerate(h.ids)}


class SimSidecars:
    """One DEALER socket per instance (identity = instance id), served by one thread.

    Args:
        reply_url: the controller's ROUTER.
        fleet: each instance's encoded messages.
        spread: heartbeats spread evenly over each second (independent sidecars); otherwise
            all sent together once a second.

    An instance whose :attr:`Encoded.at_start` is False registers (and heartbeats) only once
    :meth:`send_snapshot` is called for it with ``register=True``.
    """

    def __init__(self, reply_url: str, fleet: dict[str, Encoded], spread: bool = False):
        self.fleet = fleet
        self.spread = spread
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, len(fleet) + 64)
        self.socks: dict[zmq.Socket, str] = {}
        self.by_iid: dict[str, zmq.Socket] = {}
        for iid in fleet:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IDENTITY, iid.encode())
            s.setsockopt(zmq.IMMEDIATE, 1)  # as the runtime: drop while the controller is away
            s.setsockopt(zmq.LINGER, 0)
            s.connect(reply_url)
            self.socks[s] = iid
            self.by_iid[iid] = s
        self.acks = self.resyncs = self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="p3-sim-sidecars", daemon=True)
        self._order: list[zmq.Socket] = []  # the registered sockets, in heartbeat order
        self.extra_fds: list[int] = []
        self.on_fd: Callable[[], None] | None = None

    def start(self) -> "SimSidecars":
        self._thread.start()
        return self

    def _send(self, sock: zmq.Socket, raw: bytes) -> bool:
        try:
            sock.send(raw, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def _register(self, sock: zmq.Socket) -> None:
        enc = self.fleet[self.socks[sock]]
        if self._send(sock, enc.register):
            self._send(sock, enc.snap)

    def send_snapshot(self, iid: str, name: str, register: bool = False) -> None:
        """Send instance ``iid``'s snapshot ``name`` now (a resync as the controller sees it),
        after a Register if ``register`` (it heartbeats from then on)."""
        sock = self.by_iid[iid]
        if register:
            self._send(sock, self.fleet[iid].register)
            if sock not in self._order:
                self._order.append(sock)
        self._send(sock, self.fleet[iid].snaps[name])

    def run(self) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        for fd in self.extra_fds:
            poller.register(fd, zmq.POLLIN)
        time.sleep(0.2)  # let the connections come up; a dropped Register is healed by Resync
        order = self._order
        order.extend(s for s, iid in self.socks.items() if self.fleet[iid].at_start)
        for s in list(order):
            self._register(s)
        step = HEARTBEAT_S / len(order) if self.spread else 0.0
        cycle = t_beat = time.monotonic() + HEARTBEAT_S  # when order[k]'s next heartbeat is due
        k = 0
        while not self._stop.is_set():
            timeout_ms = max(0, int((t_beat - time.monotonic()) * 1000))
            for s, _ in poller.poll(min(timeout_ms, 200)):
                if not isinstance(s, zmq.Socket):
                    if self.on_fd is not None:
                        self.on_fd()
                    continue
                while True:
                    try:
                        raw = s.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = protocol.controller_msg_decoder.decode(raw)
                    if isinstance(msg, protocol.RegisterAck):
                        self.acks += 1
                    elif isinstance(msg, protocol.Resync):
                        self.resyncs += 1
                        self._register(s)
            now = time.monotonic()
            while t_beat <= now and not self._stop.is_set():
                s = order[k]
                self._send(s, self.fleet[self.socks[s]].beat)
                k += 1
                if k >= len(order):  # a new second: every instance once more
                    k = 0
                    cycle = t_beat = cycle + HEARTBEAT_S
                    step = HEARTBEAT_S / len(order) if self.spread else 0.0
                else:
                    t_beat += step

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for s in self.socks:
            s.close(0)
        self.ctx.term()


def _sim_process_main(fleet_path: str, reply_url: str, conn) -> None:
    import pickle

    with open(fleet_path, "rb") as f:
        fleet = pickle.load(f)
    sims = SimSidecars(reply_url, fleet, spread=True)
    sims.extra_fds = [conn.fileno()]

    def serve() -> None:
        while conn.poll():
            cmd = conn.recv()
            if cmd[0] == "snap":
                sims.send_snapshot(cmd[1], cmd[2], cmd[3])
                conn.send(("sent", time.monotonic()))
            elif cmd[0] == "stats":
                conn.send((sims.acks, sims.resyncs, sims.dropped))
            elif cmd[0] == "stop":
                sims.stop()
                return

    sims.on_fd = serve
    conn.send(("ready",))
    try:
        sims.run()
    finally:
        sims.close()
        conn.send(("stopped",))


class SimProcess:
    """:class:`SimSidecars` (heartbeats spread) in a child process, so that its thread shares
    no interpreter lock with the timing client; ``fleet_path`` is a pickle of ``{iid:
    Encoded}``."""

    def __init__(self, fleet_path: Path, reply_url: str):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sim_process_main, args=(str(fleet_path), reply_url, child),
                                name="p3-sim-process", daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(600) or self.conn.recv() != ("ready",):
            raise RuntimeError("the simulated sidecars' process did not start")

    def send_snapshot(self, iid: str, name: str, register: bool = False) -> float:
        """Have ``iid`` send its snapshot ``name`` (see :meth:`SimSidecars.send_snapshot`);
        returns when it was sent (monotonic)."""
        self.conn.send(("snap", iid, name, register))
        return self.conn.recv()[1]

    def stats(self) -> tuple[int, int, int]:
        """(acks, resyncs, dropped sends) so far."""
        self.conn.send(("stats",))
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
            self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def workload(h: Holdings, n: int, rng: random.Random) -> list[tuple[bytes, dict[str, int]]]:
    """``n`` (JSON body, expected answer) pairs of 1,024-token prompts: 45 % shared prefixes,
    35 % private ones, 10 % a shared prefix's first two chunks with a fresh tail, 10 % misses."""
    tokens = h.tokens
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            pid = rng.choice(h.shared)
            toks, expect = tokens(pid), h.expect(pid, PROMPT_CHUNKS)
        elif r < 0.80:
            pid = rng.choice(h.private)
            toks, expect = tokens(pid), h.expect(pid, PROMPT_CHUNKS)
        elif r < 0.90:  # shared system prompt + conversation nobody has seen
            pid = rng.choice(h.shared)
            toks = tokens(pid)[:2 * CHUNK] + tokens(rng.randrange(1 << 40))[:2 * CHUNK]
            expect = h.expect(pid, 2)
        else:  # miss
            toks, expect = tokens(rng.randrange(1 << 40)), {}
        out.append((lookup_body(toks), expect))
    return out


def lookup_body(tokens: list[int]) -> bytes:
    return json.dumps({"tokens": tokens}, separators=(",", ":")).encode()


def wait_indexed(client: httpx.Client, n_instances: int, keys_per_instance: int,
                 distinct_keys: int, stats: Callable[[], tuple[int, int, int]],
                 timeout: float = 180, raise_on_timeout: bool = True) -> dict | None:
    """Wait until the controller shows every instance up with all its keys (an HTTP timeout
    counts as not yet). Returns its /health, or None at the timeout if not ``raise_on_timeout``."""
    t0 = time.monotonic()
    health: dict = {}
    while time.monotonic() - t0 < timeout:
        try:
            health = client.get("/health").json()
            if health["instances_up"] == n_instances and health["chunks_indexed"] == distinct_keys:
                insts = client.get("/instances").json()["instances"]
                if (len(insts) == n_instances and all(i["up"] for i in insts)
                        and all(i["num_chunks"] == keys_per_instance for i in insts)
                        and all(i["fingerprint"] == FP for i in insts)):
                    return health
        except httpx.TimeoutException:
            health = {"last poll": "timed out"}
        time.sleep(0.5)
    acks, resyncs, dropped = stats()
    why = (f"controller never indexed the fleet: {health} (expected {distinct_keys} distinct "
           f"keys; acks {acks}, resyncs {resyncs}, dropped {dropped})")
    if raise_on_timeout:
        raise RuntimeError(why)
    print(why, flush=True)
    return None


def answer(body: bytes) -> dict[str, int]:
    """A /lookup answer's matched tokens per instance."""
    info = json.loads(body)["layout_info"]
    for loc, _ in info.values():
        assert loc == protocol.LOCATION, loc
    return {iid: n for iid, (_, n) in info.items()}


def controller_tree(ref: str) -> Path:
    """The packages ``sidecar`` and ``vllm_kvmove`` as of commit ``ref``, exported under
    WORK (for a controller from before a change, in the same run as this tree's)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", ref + "^{commit}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    out = WORK / f"tree-{sha[:12]}"
    if not (out / "sidecar" / "controller" / "index.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "sidecar",
                                  "vllm_kvmove"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def start_controller(cluster, ports: tuple[int, int, int], tree: Path | None = None):
    """Start a controller (from ``tree``: :func:`controller_tree`, or this checkout) and wait
    until it answers; checks which code it imports."""
    env_before = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)
    try:
        where = subprocess.run([cluster.python, "-c", "import sidecar.controller.index as m; "
                                "print(m.__file__)"], check=True, capture_output=True,
                               text=True, cwd=cluster.workdir).stdout.strip()
        expected = (tree or REPO) / "sidecar" / "controller" / "index.py"
        assert Path(where).resolve() == expected.resolve(), (where, expected)
        ctl = cluster.start_controller(*ports)
    finally:
        if tree is not None:
            if env_before is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env_before
    cluster.wait_ready(ctl, timeout=60)
    return ctl


def rss_bytes(pid: int) -> dict[str, int]:
    """A process's resident memory now and its peak (``VmRSS``, ``VmHWM``), in bytes."""
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            name, value, _unit = line.split()
            out[name[:-1]] = int(value) * 1024
    return out


def close_all(*things) -> None:
    """Close each of ``things`` that was made (None: it was not): a benchmark's clean-up."""
    for thing in things:
        if thing is not None:
            thing.close()
