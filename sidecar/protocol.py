"""The protocol between sidecars, the controller and HTTP clients: every message type, limit
and state name, in one module that imports nothing else of the control plane.

Two transports, one set of types:

* **ZMQ, msgpack** (tagged ``msgspec.Struct`` unions, the tag is the class name):
    - sidecar DEALER → controller ROUTER (``controller_reply_url``, seed :8400):
      :data:`SidecarMessage` — registration, snapshots, heartbeats and command replies;
    - controller ROUTER → sidecar DEALER: :data:`ControllerMessage` — acks, resync requests and
      commands, each command carrying a ``req_id`` that its :class:`Reply` echoes, so any number
      of commands can be in flight to one sidecar at once;
    - sidecar PUSH → controller PULL (``controller_pull_url``, seed :8300): :class:`EventBatch`.
* **HTTP, JSON**: the request bodies (``*Request``), decoded strictly (unknown fields are
  ignored, wrong types are a 400 that names the field), and the response bodies the handlers
  build (so the OpenAPI documents, generated from these types, describe what is sent).

Sequence numbers: each store numbers its admit/evict events 1, 2, 3... without gaps. A
heartbeat and a snapshot carry the store's latest ``seq``; a controller that sees an event
batch start past ``last_seq + 1``, or a heartbeat ahead of what it applied, asks for a
:class:`Resync`, and rebuilds that instance's holdings from the :class:`Snapshot`.

Three words for three things that keep a chunk in a store:

* a **hold** is a counted, short-lived reference taken by a load or a transfer (the store's
  ``hold``/``release``): a held chunk is never evicted, and a delete waits for its last release;
* a **lease** is a transfer's holds at a source, named by the :class:`LeaseChunks` command's
  ``req_id`` and ended by :class:`EndLease` (or by expiry, or a controller restart);
* a **pin** is an operator's never-evict flag (HTTP ``/pin`` and ``/unpin``, :class:`SetPinned`),
  which lasts until unpinned.

Keys are 16-byte chunk keys (:mod:`vllm_kvmove.hashing`): raw bytes over msgpack, lowercase
hex over JSON.
"""

from __future__ import annotations

import struct
from typing import Annotated, Iterable, Iterator, Literal, Union

import msgspec

from vllm_kvmove.shm import PoolHandle

# Version 5: a Snapshot's chunks travel packed in one bytes field (20 bytes a chunk): a list of
# a million records took the controller 0.13-0.22 s to decode, holding its event loop.
# Version 4: the controller lists a store's chunks with their prompt parents and pins
# (ListChunks, a drain's plan); leased chunks name their parent, and a fetch may pin what it
# writes (FetchChunks.pinned); an engine shutting down asks for its drain (Leaving →
# DrainEnded).
# Version 3: a sidecar registers as one rank of a tensor-parallel engine (Register's rank and
# world_size, EventBatch's rank); fetches may convert between formats (FetchChunks.convert).
# Version 2: the transfer lease and the operator's pin got names of their own. A sidecar and a
# controller of different versions refuse each other.
PROTOCOL_VERSION = 5
# The one store location there is (LMCache's name for host memory).
LOCATION = "LocalCPUBackend"

# Largest token list a request may name (a 1M-token list of real ids fits the body limit).
MAX_TOKENS = 1_000_000
# Token ids are in [0, TOKEN_ID_LIMIT): they must fit an int32.
TOKEN_ID_LIMIT = 1 << 31

# The states a job can be in; "done", "failed" and "cancelled" are final.
JobStatus = Literal["pending", "running", "done", "failed", "cancelled"]
FINAL_STATES = frozenset({"done", "failed", "cancelled"})
# What a job does: "move" and "copy" run asynchronously between two instances, "drain" moves
# everything one instance holds to others; "pin", "unpin" and "clear" act on one instance and
# end before their HTTP answer.
JobKind = Literal["move", "copy", "drain", "pin", "unpin", "clear"]
TRANSFER_KINDS = frozenset({"move", "copy", "drain"})


# Bounds every decoder enforces (a message outside them is refused as a whole, naming the
# field): what a well-behaved peer sends fits with room to spare.
MIN_CHUNK_TOKENS = 16  # vLLM's smallest block size; below it a 1M-token lookup hashes too much
MAX_CHUNK_TOKENS = 1 << 16
ChunkKey = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
ChunkTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_TOKENS)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Url = Annotated[str, msgspec.Meta(max_length=512)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
# The longest lease a sidecar accepts (a day).
MAX_LEASE_S = 86400.0
LeaseSeconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_LEASE_S)]
# Every field of a KVLayout (``KVLayout.to_dict()``).
LayoutFields = Annotated[dict[Annotated[str, msgspec.Meta(max_length=64)],
                              Annotated[str, msgspec.Meta(max_length=4096)] | int],
                         msgspec.Meta(max_length=64)]
# Tensor-parallel degrees a registration may claim, and the ranks within them.
MAX_WORLD_SIZE = 1024
WorldSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
Rank = Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD_SIZE)]


class _Tagged(msgspec.Struct, tag=True, omit_defaults=False):
    pass


class _Command(_Tagged, kw_only=True):
    """Base of controller → sidecar commands.

    Attributes:
        req_id: echoed by the :class:`Reply` (assigned by the controller, unique per
            controller start: a reply meant for a previous controller never matches).
    """

    req_id: int = 0


# ---------------------------------------------------------------------------------------------
# Sidecar → controller (DEALER → ROUTER)
# ---------------------------------------------------------------------------------------------
class Register(_Tagged):
    """A sidecar announces itself (on start, and whenever the controller asks to resync).

    An engine with tensor parallelism ``N`` has ``N`` sidecars, one per rank, each with a store
    of its own holding that rank's shard of every chunk; each registers with the engine's
    ``instance_id`` and its ``rank``. The controller groups them into one instance, up only
    while all ``world_size`` ranks are; the fields that describe the engine rather than the
    rank (model, fingerprint, layout, chunk size, slot size, engine URL, world size) must agree
    across ranks (a rank that disagrees with live ones is refused).

    Attributes:
        instance_id: the engine's name, unique in the fleet.
        engine_url: base URL of the engine's OpenAI server (for ``/tokenize``).
        sidecar_url: base URL of the sidecar's HTTP app.
        p2p_url: ``host:port`` of the NIXL metadata server.
        agent_name: NIXL agent name.
        model: model identity served by the engine.
        fingerprint: KV-compatibility fingerprint (``KVLayout.fingerprint()``).
        layout: every field of the engine's ``KVLayout``.
        chunk_size: tokens per chunk.
        capacity_bytes: store capacity.
        slot_bytes: bytes one chunk occupies in the store.
        incarnation: random id of this sidecar start; a peer that cached our NIXL metadata
            re-handshakes when it changes (a restarted engine has a new agent).
        pid: worker process id (diagnostics).
        protocol: wire protocol version.
        shared_pool: the store pool, when it is in shared memory: what a peer on the same
            host needs to map it (:class:`vllm_kvmove.shm.PoolHandle`: boot id, pid
            namespace, pid, memfd descriptor and inode, size, base address).
        rank: this sidecar's tensor-parallel rank, in ``[0, world_size)``.
        world_size: the engine's tensor-parallel degree.
        block_hashing: how the engine names its blocks (:class:`BlockHashing`), when it
            publishes KV events; a move into it then tells its store each chunk's blocks.
        kv_events: where this sidecar publishes the store's KV events (``tcp://host:port``),
            or "".
        engine_events: where the engine publishes its own KV events (its
            ``--kv-events-config`` endpoint, as a subscriber reaches it), or "".
    """

    instance_id: Name
    engine_url: Url
    sidecar_url: Url
    p2p_url: Url
    agent_name: Name
    model: Text
    fingerprint: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
    layout: LayoutFields
    chunk_size: Annotated[int, msgspec.Meta(ge=MIN_CHUNK_TOKENS, le=MAX_CHUNK_TOKENS)]
    capacity_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 50)]
    slot_bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 40)]
    incarnation: Name
    pid: Count
    protocol: int = PROTOCOL_VERSION
    shared_pool: PoolHandle | None = None
    rank: Rank = 0
    world_size: WorldSize = 1
    block_hashing: BlockHashing | None = None
    kv_events: Url = ""
    engine_events: Url = ""


class BlockHashing(msgspec.Struct):
    """An engine's block hashing (:class:`vllm_kvmove.blockhash.BlockHasher`): its
    ``--prefix-caching-hash-algo``, the seed of its ``NONE_HASH`` and its block size."""

    algo: Annotated[str, msgspec.Meta(max_length=32)]
    seed: Annotated[str, msgspec.Meta(max_length=256)]
    block_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_TOKENS)]


BlockHash = Annotated[bytes, msgspec.Meta(min_length=1, max_length=64)]


class ChunkBlocksMsg(msgspec.Struct, array_like=True):
    """The vLLM blocks of one chunk (:class:`vllm_kvmove.blockhash.ChunkBlocks`):
    ``[parent, hashes, token_ids, block_size]``."""

    parent: BlockHash | None
    hashes: Annotated[list[BlockHash], msgspec.Meta(max_length=MAX_CHUNK_TOKENS)]
    token_ids: Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]],
                         msgspec.Meta(max_length=MAX_CHUNK_TOKENS)]
    block_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNK_TOKENS)]


# A chunk in a Snapshot: its 16-byte key, then its token count (uint32, little-endian).
SNAPSHOT_RECORD = struct.Struct("<16sI")


class Snapshot(_Tagged):
    """Everything a store holds, consistent with its event ``seq``.

    Attributes:
        instance_id: sender.
        seq: the store's last event sequence number when the snapshot was taken.
        chunks: every ready chunk, packed (:func:`pack_chunks`): one bytes field, so that
            decoding a million chunks is one copy, and the receiver reads the records as it
            applies them (:func:`unpack_chunks`), a slice at a time.
    """

    instance_id: Name
    seq: Count
    chunks: bytes

    @property
    def num_chunks(self) -> int:
        return len(self.chunks) // SNAPSHOT_RECORD.size


def pack_chunks(chunks: Iterable[tuple[bytes, int]]) -> bytes:
    """``(key, num_tokens)`` pairs as :attr:`Snapshot.chunks`."""
    pack = SNAPSHOT_RECORD.pack
    return b"".join(pack(key, num_tokens) for key, num_tokens in chunks)


def unpack_chunks(chunks: bytes) -> Iterator[tuple[bytes, int]]:
    """The ``(key, num_tokens)`` records of :attr:`Snapshot.chunks`, lazily, skipping any
    whose token count is outside ``1..MAX_CHUNK_TOKENS`` (a malformed sender's: checked here,
    record by record, as the receiver applies them, since a decoder cannot look inside bytes).

    Raises:
        struct.error: ``chunks`` is not a whole number of records (check it first:
            :func:`snapshot_problem`).
    """
    for key, num_tokens in SNAPSHOT_RECORD.iter_unpack(chunks):
        if 1 <= num_tokens <= MAX_CHUNK_TOKENS:
            yield key, num_tokens


def snapshot_problem(chunks: bytes) -> str | None:
    """Why :attr:`Snapshot.chunks` cannot be read (not whole records), or None."""
    if len(chunks) % SNAPSHOT_RECORD.size:
        return (f"{len(chunks)} bytes of chunks is not a whole number of "
                f"{SNAPSHOT_RECORD.size}-byte records")
    return None


class Heartbeat(_Tagged):
    """Liveness and store summary, every ``heartbeat_interval_s``.

    Attributes:
        instance_id: sender.
        seq: the store's last event sequence number.
        num_chunks: chunks held.
        used_bytes: pool bytes in use.
        capacity_bytes: pool size.
        available_bytes: bytes that are free or could be freed by evicting chunks neither held
            nor pinned.
    """

    instance_id: Name
    seq: Count
    num_chunks: Count
    used_bytes: Count
    capacity_bytes: Count
    available_bytes: Count


class ChunkDesc(msgspec.Struct, array_like=True):
    """A leased chunk at a source, as needed to read it.

    Attributes:
        key: chunk key.
        num_tokens: tokens in the chunk.
        addr: address of its bytes in the source's registered pool.
        nbytes: valid bytes (contiguous).
        checksum: XXH3-64 of those bytes.
        parent: the key of the chunk before it in its prompt, when the source knows it (the
            destination keeps it, so that a later drain keeps the prefix together).
    """

    key: ChunkKey
    num_tokens: ChunkTokens
    addr: Annotated[int, msgspec.Meta(ge=0)]
    nbytes: Count
    checksum: Annotated[int, msgspec.Meta(ge=0)]
    parent: ChunkKey | None = None


class ChunkListing(msgspec.Struct, array_like=True):
    """A chunk a store holds, as :class:`ListChunks` reports it: ``[key, num_tokens, parent,
    pinned]`` (``parent``: the key of the chunk before it in its prompt, None when it starts
    one or its writer did not say; ``pinned``: the operator's pin)."""

    key: ChunkKey
    num_tokens: ChunkTokens
    parent: ChunkKey | None
    pinned: bool


class Reply(_Tagged):
    """Answer to one command.

    Attributes:
        req_id: the command's ``req_id``.
        ok: whether it succeeded.
        error_kind: on failure, a key of the controller's error map (e.g. ``"not_found"``).
        error: on failure, a human-readable cause.
        chunks: for :class:`LeaseChunks`, the leased chunks in request order.
        listing: for :class:`ListChunks`, every chunk the store holds.
        count: chunks affected (lease, end of lease, pin, unpin, clear, fetch).
        bytes: bytes moved (fetch).
        heartbeat: the store's summary right after the command (counts as a heartbeat).
    """

    req_id: Count
    ok: bool
    error_kind: Annotated[str, msgspec.Meta(max_length=64)] = ""
    error: Text = ""
    chunks: list[ChunkDesc] = []
    listing: list[ChunkListing] = []
    count: Count = 0
    bytes: Count = 0
    heartbeat: Heartbeat | None = None


class Goodbye(_Tagged):
    """The sidecar is shutting down (its engine stops): forget the instance and its chunks."""

    instance_id: Name


class Leaving(_Tagged):
    """The engine is shutting down and wants its KV kept: drain the instance (one drain,
    whichever rank asks first) and send every rank a :class:`DrainEnded` once it ended."""

    instance_id: Name


SidecarMessage = Union[Register, Snapshot, Heartbeat, Reply, Goodbye, Leaving]


# ---------------------------------------------------------------------------------------------
# Controller → sidecar (ROUTER → DEALER)
# ---------------------------------------------------------------------------------------------
class RegisterAck(_Tagged):
    """The controller accepted a :class:`Register`. ``controller_id`` changes per restart."""

    controller_id: str


class RegisterRefused(_Tagged):
    """The controller refused a :class:`Register` (or another message it could not read
    from this sidecar); ``reason`` says why, for the sidecar's log."""

    reason: str


class HeartbeatAck(_Tagged):
    """The controller knows the sender (the answer to each :class:`Heartbeat`): a sidecar
    that stops hearing these re-registers."""

    controller_id: str


class Resync(_Tagged):
    """Send :class:`Register` and :class:`Snapshot` again (gap seen, or unknown sender)."""

    reason: str = ""


class DrainEnded(_Tagged):
    """The drain of this sidecar's instance ended (or could not start: ``event_id`` "").

    Attributes:
        event_id: the drain job.
        status: its final state ("done", "failed" or "cancelled").
        error: why not everything moved (or why it could not start), "" if it did.
        units_done, units_total: prefixes moved, of those planned.
        chunks_done: chunks moved.
        bytes: bytes moved.
        destinations: where they went.
    """

    event_id: str
    status: JobStatus
    error: Text = ""
    units_done: Count = 0
    units_total: Count = 0
    chunks_done: Count = 0
    bytes: Count = 0
    destinations: list[str] = []


class LeaseChunks(_Command, kw_only=True):
    """Hold chunks at a source for a transfer (all or none) and describe them.

    The holds are a lease named by this command's ``req_id``: ended by an :class:`EndLease`
    naming it, or by the sidecar when ``lease_s`` passes or when a new controller registers
    it (a crashed controller's jobs never leak holds).
    """

    keys: list[ChunkKey]
    lease_s: LeaseSeconds = 120.0


class EndLease(_Command, kw_only=True):
    """End the lease of the :class:`LeaseChunks` whose ``req_id`` is ``lease_id`` (one hold per
    key), deleting the chunks first when ``delete`` (a move whose destination holds them all);
    ``transferred_bytes`` is what a peer read meanwhile (the source cannot see a one-sided
    READ, so the controller tells it)."""

    lease_id: Count
    delete: bool = False
    transferred_bytes: Count = 0


class SetPinned(_Command, kw_only=True):
    """Set (``pinned=True``, the controller's ``/pin``) or clear (``/unpin``) the operator's
    never-evict flag of held chunks. Idempotent."""

    keys: list[ChunkKey]
    pinned: bool = True


class ListChunks(_Command, kw_only=True):
    """List every chunk the store holds, with its prompt parent and pin (a drain's plan):
    answered in the Reply's ``listing``."""


class ClearChunks(_Command, kw_only=True):
    """Delete the given chunks, or every chunk when ``keys`` is None (the controller's ``/clear``)."""

    keys: list[ChunkKey] | None = None


class PeerInfo(msgspec.Struct):
    """How to reach another sidecar's pool: its NIXL agent (``incarnation`` as in
    :class:`Register`), and its shared pool when it has one (a destination on the same host
    maps it instead of reading over NIXL)."""

    instance_id: str
    agent_name: str
    p2p_url: str
    incarnation: str
    shared_pool: PoolHandle | None = None


class ShardRead(msgspec.Struct):
    """One source rank's shards of a converted fetch's chunks.

    Attributes:
        source: that rank's sidecar.
        rank: its tensor-parallel rank.
        chunks: its leased shards, in the order of the fetch's ``chunks`` (the same keys).
    """

    source: PeerInfo
    rank: Rank
    chunks: list[ChunkDesc]


class Conversion(msgspec.Struct):
    """The source engine's chunks are in another format than this store's (block size,
    packing, or tensor parallelism; :mod:`vllm_kvmove.convert`): read every shard listed,
    verify each, and write this rank's shard in this store's format.

    Attributes:
        layout: every field of the source engine's ``KVLayout`` (per rank).
        world_size: the source engine's tensor-parallel degree.
        shards: the source ranks whose heads this rank holds, in rank order; the fetch's
            ``source`` and ``chunks`` are the first one's.
    """

    layout: LayoutFields
    world_size: WorldSize
    shards: Annotated[list[ShardRead], msgspec.Meta(min_length=1, max_length=MAX_WORLD_SIZE)]


class FetchChunks(_Command, kw_only=True):
    """Read leased chunks from ``source`` into this store; verify; then publish them.

    Chunks this store already holds are skipped; a chunk another writer is still writing here
    fails the fetch (``conflict``): it is not held yet. On any failure nothing is published.
    With ``hold``, every chunk of the batch (fetched or already here) stays held under a
    lease named by this command's ``req_id`` until an :class:`EndLease` (or ``lease_s``):
    the destination of a move keeps its copy while the source deletes its own. With
    ``convert``, the chunks are read from every shard it lists and converted
    (:class:`Conversion`). ``blocks``, when given, names each chunk's vLLM blocks in this
    engine's hashing (one entry per chunk, in order), for its KV events. ``pinned``, when
    given, says per chunk (in order) whether to pin it as it is written (a drain carries the
    operator's pins over).
    """

    source: PeerInfo
    chunks: list[ChunkDesc]
    hold: bool = False
    lease_s: LeaseSeconds = 120.0
    convert: Conversion | None = None
    blocks: list[ChunkBlocksMsg] | None = None
    pinned: list[bool] | None = None


ControllerMessage = Union[RegisterAck, RegisterRefused, HeartbeatAck, Resync, LeaseChunks,
                          EndLease, FetchChunks, SetPinned, ClearChunks, ListChunks,
                          DrainEnded]


# ---------------------------------------------------------------------------------------------
# Sidecar → controller (PUSH → PULL)
# ---------------------------------------------------------------------------------------------
class StoreEventMsg(msgspec.Struct, array_like=True):
    """One store change: ``[seq, kind, key, num_tokens]``; ``kind`` is "admit" or "evict"."""

    seq: Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]
    kind: Literal["admit", "evict"]
    key: ChunkKey
    num_tokens: ChunkTokens


class EventBatch(_Tagged):
    """Store events in ``seq`` order, from the sidecar start named by ``incarnation`` (a
    batch from another start than the registered one is dropped) of tensor-parallel ``rank``
    (each rank's store numbers its own events)."""

    instance_id: Name
    incarnation: Name
    events: list[StoreEventMsg]
    rank: Rank = 0


# ---------------------------------------------------------------------------------------------
# KV events, in vLLM's own wire format (sidecar PUB → routers)
# ---------------------------------------------------------------------------------------------
# vLLM's ``vllm/distributed/kv_events.py`` (0.32), field for field, so that a subscriber
# decodes a sidecar's batches with vLLM's own ``msgspec.msgpack.Decoder(KVEventBatch)``
# (tested): a batch is an array ``[ts, events, data_parallel_rank]``; each event a map tagged
# ``"type"``. Published as ZMQ frames ``[topic, seq (8 bytes, big-endian), batch]`` — vLLM's
# ZmqEventPublisher's — seq counting batches from 1 without gaps.
ExternalBlockHash = Union[int, bytes]


class KVBlockStored(msgspec.Struct, tag="BlockStored", omit_defaults=True):
    """Blocks became available (``medium="CPU"``: in the engine's host store).

    Attributes:
        block_hashes: the blocks, in order (vLLM's external form: the low 64 bits, an int).
        parent_block_hash: the block before the first (None: they start a prompt).
        token_ids: the blocks' tokens.
        block_size: tokens per block.
        lora_id, lora_name: always None here (no LoRA blocks).
        medium: ``"CPU"``.
    """

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class KVBlockRemoved(msgspec.Struct, tag="BlockRemoved", omit_defaults=True):
    """Blocks are gone from the medium (evicted, deleted, cleared, or moved away)."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None


class KVAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True):
    """Every block of the engine's GPU tier is gone (vLLM's prefix-cache reset); never sent
    by a sidecar, read by the router."""


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    """One published batch: wall-clock ``ts`` and its events (``data_parallel_rank``: None)."""

    ts: float
    events: list[Union[KVBlockStored, KVBlockRemoved, KVAllBlocksCleared]]
    data_parallel_rank: int | None = None


# ---------------------------------------------------------------------------------------------
# Controller HTTP API (JSON)
# ---------------------------------------------------------------------------------------------
class MoveRequest(msgspec.Struct, forbid_unknown_fields=False):
    """``POST /move``. Exactly one of ``tokens``, ``prompt``, ``prefixes`` and ``all``.

    Attributes:
        old_position: ``[instance_id, location]`` of the source.
        new_position: ``[instance_id, location]`` of the destination.
        tokens: prompt token ids.
        prompt: prompt text, tokenized by the source engine's ``/tokenize``.
        prefixes: several prompts' token ids: one job moves what the source holds of each
            (a batch move: its status reports per prefix family, as a drain's does).
        all: every chunk the source holds (a batch move).
        copy: keep the source's chunks (default: move, deleting them once the destination
            holds them).
        should_copy: LMCache's name for ``copy``.
        max_bytes_per_s: this job's bandwidth cap (default: none but the controller's).
    """

    old_position: tuple[str, str]
    new_position: tuple[str, str]
    tokens: list[int] | None = None
    prompt: str | None = None
    prefixes: Annotated[list[list[int]], msgspec.Meta(min_length=1, max_length=4096)] | None = None
    all: bool = False
    copy: bool | None = None
    should_copy: bool | None = None
    max_bytes_per_s: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 50)] | None = None


class MoveResponse(msgspec.Struct):
    """Answer to ``POST /move``: tokens whose KV will move, and the job's id."""

    num_tokens: int
    event_id: str


class DrainRequest(msgspec.Struct):
    """``POST /drain``: move every chunk an instance holds to others.

    Attributes:
        instance_id: the instance to drain.
        to: the destinations (default: every other instance that is up, can take its KV and
            is not draining itself), filled by free space.
        copy: copy instead of move (the source keeps its chunks).
        max_bytes_per_s: this drain's bandwidth cap (default: none but the controller's).
    """

    instance_id: Name
    to: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=1024)] | None = None
    copy: bool = False
    max_bytes_per_s: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 50)] | None = None


class DrainResponse(msgspec.Struct):
    """Answer to ``POST /drain``: the job's id and the destinations it may fill."""

    event_id: str
    destinations: list[str]


class DrainDestination(msgspec.Struct):
    """What a drain put at one destination: ``units`` (whole prefixes, or the part of one
    that fitted), their ``chunks`` and ``bytes``; ``lost``: it went down mid-drain (its
    remaining units went to the others)."""

    instance_id: str
    units: int = 0
    chunks: int = 0
    bytes: int = 0
    lost: bool = False


class DrainProblem(msgspec.Struct):
    """A unit of a drain that did not move (it stays at the source).

    Attributes:
        first_chunk: the hex key of its first chunk (units are ordered parents first).
        num_chunks: its chunks; ``num_tokens``: their tokens.
        outcome: "skipped" (no room, cancelled, gone from the source) or "failed".
        reason: why.
    """

    first_chunk: str
    num_chunks: int
    num_tokens: int
    outcome: Literal["skipped", "failed"]
    reason: str


class DrainStatus(msgspec.Struct):
    """A drain's progress (``GET /events/{id}``'s ``drain``).

    A *unit* is one prefix family — the chunks of the prompts that share a first chunk —
    moved whole to one destination where it fits; a family that fits nowhere whole is split
    parents-first: the part that fits is copied (the source keeps the whole family, so the rest
    stays usable there) and the rest is a unit skipped for want of room.

    Attributes:
        units_total, units_done, units_failed, units_skipped: units planned, moved, failed,
            skipped (``units_total`` grows if the source gained chunks meanwhile: a drain
            lists the source again once its plan is done).
        chunks_total, chunks_done: the same in chunks.
        copy: the source keeps its chunks.
        destinations: per destination used or planned.
        problems: the first 100 units that did not move, with their reasons.
    """

    units_total: int
    units_done: int
    units_failed: int
    units_skipped: int
    chunks_total: int
    chunks_done: int
    copy: bool
    destinations: list[DrainDestination]
    problems: list[DrainProblem]


class LookupRequest(msgspec.Struct):
    """``POST /lookup``: exactly one of ``tokens`` and ``prompt``; ``instance_id`` picks the
    engine that tokenizes a prompt (default: any live one)."""

    tokens: list[int] | None = None
    prompt: str | None = None
    instance_id: str | None = None


class StoreOpRequest(msgspec.Struct):
    """``POST /pin``, ``/unpin`` and ``/clear``: the chunks of a prefix at one instance.

    Attributes:
        instance_id: the instance (LMCache's field name).
        location: must be ``"LocalCPUBackend"``.
        tokens: the prefix's token ids.
        prompt: or its text, tokenized by that instance's engine.
    For ``/clear``, giving neither ``tokens`` nor ``prompt`` clears the whole store.
    """

    instance_id: str
    location: str = LOCATION
    tokens: list[int] | None = None
    prompt: str | None = None


class InstanceRequest(msgspec.Struct):
    """LMCache's ``POST /health`` and ``POST /query_worker_info``: one instance, and the
    workers (tensor-parallel ranks) to report (default: all of the engine's)."""

    instance_id: str
    worker_ids: list[int] | None = None


class EventIdRequest(msgspec.Struct):
    """``POST /check_finish``."""

    event_id: str


class JobPhases(msgspec.Struct):
    """Where a move's or copy's time went, in seconds (``GET /events/{id}``'s ``phases``). A
    phase is set when it ends, so a running or failed job shows those it finished.

    Attributes:
        lease_s: holding the chunks at the source (every rank) — including the checksums the
            source computes for chunks it saved too recently to have hashed them yet.
        transfer_s: the destination's fetches, from the first sent to the last settled:
            copies, checksum verification, commits, and any wait for a bandwidth cap.
        release_s: ending the source's lease (a move: deleting its chunks there).
    """

    lease_s: float | None = None
    transfer_s: float | None = None
    release_s: float | None = None


class JobStatusBody(msgspec.Struct):
    """A job as reported by ``GET /events/{event_id}``, ``GET /events`` and ``POST /check_finish``.

    Attributes:
        event_id: the job id.
        status: one of :data:`JobStatus`.
        kind: "move", "copy", "drain", "pin", "unpin" or "clear".
        source: source instance id (the instance acted on, for pin/unpin/clear).
        destination: destination instance id ("" for pin/unpin/clear; the destinations of a
            drain, comma-separated).
        num_tokens: tokens covered.
        num_chunks: chunks covered.
        bytes: bytes moved so far.
        total_bytes: bytes the job will move (known once the source leased the chunks; chunks
            the destination already holds are not moved, so ``bytes`` may end below it).
        elapsed_s: seconds since creation (until the end, once final).
        error: cause, when failed (or what a cancelled job had moved).
        error_kind: the cause's kind (a key of the HTTP error map, e.g. ``store_full``).
        max_bytes_per_s: the job's own bandwidth cap, if it was given one.
        drain: a drain's or batch move's progress (units, destinations, what did not move
            and why).
        phases: a move's or copy's time by phase, so far (None for other kinds, and before
            the move started).
    """

    event_id: str
    status: JobStatus
    kind: JobKind
    source: str
    destination: str
    num_tokens: int
    num_chunks: int
    bytes: int
    total_bytes: int
    elapsed_s: float
    error: str | None = None
    error_kind: str | None = None
    max_bytes_per_s: int | None = None
    drain: DrainStatus | None = None
    phases: JobPhases | None = None


# ---------------------------------------------------------------------------------------------
# HTTP responses (JSON): what the handlers encode, and what the OpenAPI documents describe
# ---------------------------------------------------------------------------------------------
# ``[location, matched_tokens]``. (Not ``tuple[str, int]``: its ``prefixItems`` schema is valid
# OpenAPI 3.1, but tools such as schemathesis mishandle it in responses.)
LayoutEntry = Annotated[list[Union[str, int]], msgspec.Meta(
    min_length=2, max_length=2, description="[location, matched_tokens]")]


class LookupResponse(msgspec.Struct):
    """``POST /lookup``: per instance holding a prefix of the tokens, ``[location, matched_tokens]``."""

    event_id: str
    layout_info: dict[str, LayoutEntry]


class StoreOpResponse(msgspec.Struct):
    """``POST /pin``, ``/unpin``, ``/clear``: the finished job's id and what it covered."""

    event_id: str
    num_tokens: int
    num_chunks: int


class EventList(msgspec.Struct):
    """``GET /events``: the most recent jobs, newest first."""

    events: list[JobStatusBody]


class ControllerHealth(msgspec.Struct):
    """``GET /health`` of the controller."""

    status: str
    controller_id: str
    instances: int
    instances_up: int
    chunks_indexed: int


class RankInfo(msgspec.Struct):
    """One tensor-parallel rank's sidecar and store, as the controller knows it.

    Attributes:
        rank: the rank.
        up: it heartbeats.
        sidecar_url, p2p_url: where its sidecar's HTTP app and NIXL metadata socket listen.
        num_chunks, used_bytes, capacity_bytes, available_bytes: its store, as of its last
            heartbeat (``available_bytes``: free or evictable).
        last_heartbeat_s_ago: seconds since its last heartbeat.
        kv_events: where it publishes its store's KV events, or "".
    """

    rank: int
    up: bool
    sidecar_url: str
    p2p_url: str
    num_chunks: int
    used_bytes: int
    capacity_bytes: int
    available_bytes: int
    last_heartbeat_s_ago: float
    kv_events: str = ""


class InstanceInfo(msgspec.Struct):
    """One registered engine, as the controller knows it (``GET /instances``): one entry per
    engine, whatever its tensor parallelism.

    Attributes:
        up: every rank is registered and heartbeats.
        sidecar_url, p2p_url: rank 0's (each rank's are in ``ranks``).
        num_chunks: chunks every rank holds (the ones the engine can load).
        used_bytes, capacity_bytes: summed over the ranks.
        available_bytes: free or evictable at the rank with the least (what a move into the
            engine can use: each rank needs a slot per chunk for its shard).
        same_host_copy: its pool is shared: destinations on its host copy from it directly.
        last_heartbeat_s_ago: of the rank heard from longest ago.
        world_size: tensor-parallel degree; ``ranks``: the ranks registered so far.
        block_hashing: how the engine names its blocks in KV events, when it publishes them.
        engine_events: where the engine publishes its own KV events (GPU tier), or "".
        draining: the event id of the drain emptying it (moves into it are refused), or "".
    """

    instance_id: str
    up: bool
    engine_url: str
    sidecar_url: str
    p2p_url: str
    model: str
    fingerprint: str
    layout: dict[str, str | int]
    chunk_size: int
    num_chunks: int
    used_bytes: int
    capacity_bytes: int
    available_bytes: int
    same_host_copy: bool
    last_heartbeat_s_ago: float
    world_size: int = 1
    ranks: list[RankInfo] = []
    block_hashing: BlockHashing | None = None
    engine_events: str = ""
    draining: str = ""


class InstanceList(msgspec.Struct):
    """``GET /instances``."""

    instances: list[InstanceInfo]


class InstanceHealth(msgspec.Struct):
    """LMCache's ``POST /health``: per worker (tensor-parallel rank), 0 if up, 1 if down or
    not registered."""

    event_id: str
    error_codes: dict[str, int]


class WorkerInfo(msgspec.Struct):
    """LMCache's worker description: one per tensor-parallel rank (its sidecar), ``worker_id``
    being the rank."""

    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str
    registration_time: float
    last_heartbeat_time: float


class WorkerInfoList(msgspec.Struct):
    """LMCache's ``POST /query_worker_info``."""

    event_id: str
    worker_infos: list[WorkerInfo]


class SidecarHealth(msgspec.Struct):
    """``GET /health`` of a sidecar; ``controller_id`` is null until a controller acknowledged it."""

    status: str
    instance_id: str
    controller_id: str | None


class TransferCounters(msgspec.Struct):
    """A sidecar's transfer counters since it started.

    Attributes:
        fetches: fetches completed here (as a destination).
        fetch_failures: fetches that failed here.
        same_host_fetches: fetches copied from a same-host peer's shared pool (the rest went
            over NIXL).
        bytes_in: bytes fetched into this store.
        bytes_out: bytes peers read from this store (as told by the controller at each lease's
            end: a one-sided READ is invisible to its source).
        leased_chunks: chunks leased to transfers (as a source).
    """

    fetches: int = 0
    fetch_failures: int = 0
    same_host_fetches: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    leased_chunks: int = 0


class StoreInfo(msgspec.Struct):
    """``GET /store`` of a sidecar: store statistics, KV layout, fingerprint, transfer counters.

    Attributes:
        num_chunks: chunks held and visible; ``num_tokens``: their tokens.
        used_bytes: slots in use (visible, being written, or deleted but still held).
        free_slots: slots holding nothing; ``available_slots``: free or evictable.
        held_chunks: chunks held by a load or a transfer lease right now.
        pinned_chunks: chunks an operator pinned (``/pin``).
        writing_chunks: reserved, not yet committed (invisible).
        evictions: chunks evicted to make room since start.
        seq: the store's last event sequence number.
        engine_loads: the engine's loads from the store (steps that loaded prefix hits);
            ``engine_loaded_bytes``: their bytes; ``engine_load_us``: their wall time from
            the step's start to its last copy, microseconds (with layer-wise loading it
            overlaps the forward pass).
    """

    instance_id: str
    location: str
    fingerprint: str
    layout: dict[str, str | int]
    num_chunks: int
    num_tokens: int
    used_bytes: int
    capacity_bytes: int
    num_slots: int
    free_slots: int
    available_slots: int
    held_chunks: int
    pinned_chunks: int
    writing_chunks: int
    evictions: int
    seq: int
    engine_loads: int
    engine_loaded_bytes: int
    engine_load_us: int
    transfers: TransferCounters


class ChunkEntry(msgspec.Struct):
    key: str
    num_tokens: int


class ChunkList(msgspec.Struct):
    """``GET /chunks`` of a sidecar: how many chunks the store holds, and the first ``limit``."""

    total: int
    chunks: list[ChunkEntry]


class ErrorBody(msgspec.Struct):
    kind: str
    message: str


class ErrorEnvelope(msgspec.Struct):
    """Every error response: ``{"error": {"kind": ..., "message": ...}}``."""

    error: ErrorBody


sidecar_encoder = msgspec.msgpack.Encoder()
controller_msg_decoder = msgspec.msgpack.Decoder(ControllerMessage)
sidecar_msg_decoder = msgspec.msgpack.Decoder(SidecarMessage)
event_batch_decoder = msgspec.msgpack.Decoder(EventBatch)
