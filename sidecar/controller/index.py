"""ChunkIndex: which sidecar holds which chunk — the controller's one picture of the fleet's
holdings, from which ``/lookup`` answers without asking any sidecar.

Holders are named by :func:`~sidecar.controller.instances.holder_name`: the instance id of an
engine without tensor parallelism, one name per rank otherwise (the registry combines a
tensor-parallel engine's ranks; this index does not know about ranks).

Contract: a plain data structure, used only on the controller's event loop (not thread-safe).
It is fed by :mod:`sidecar.controller.instances` from sidecar snapshots and sequence-numbered
events, and read by lookups and by move validation. Every operation is O(keys touched)
(amortized: :meth:`ChunkIndex.add` now and then compacts its holder's key list), except
:meth:`ChunkIndex.drop_instance`, :meth:`ChunkIndex.keys_of` and :meth:`ChunkIndex.replace`
(O(the instance's keys)).

:meth:`ChunkIndex.replace_steps` replaces a holder's holdings in slices (a generator: the
caller runs other work between slices): the new holdings are built under a hidden holder id
and switched in at once, so a reader between two slices sees the old holdings whole, then the
new ones whole, never a mix. Meanwhile :meth:`ChunkIndex.add` and :meth:`ChunkIndex.remove`
for that holder change the old holdings, which the switch discards: the caller holds such
events back until the replacement is in.

Layout (memory: a fleet of 10 M keys must fit a small process): one dict from key to an
``int`` that packs its holders, each as a 64-bit code ``holder id << 17 | num_tokens`` (two or
more holders: the codes side by side, 64 bits apart); a single holder's code object is shared
by every key with that code. Keys and ints are atoms, so the dict holds no object the garbage
collector has to visit. Each holder id keeps a list of its keys (entries of keys it no longer
holds, and repeats, are dropped when the list outgrows twice its count).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from vllm_kvmove.hashing import ChunkSpan

_TOKEN_BITS = 17  # num_tokens up to 2^17 - 1 (the protocol allows up to 2^16)
_MAX_TOKENS = (1 << _TOKEN_BITS) - 1
_CODE_BITS = 64
_CODE = (1 << _CODE_BITS) - 1
_COMPACT_SLACK = 1024
SLICE_KEYS = 4096  # keys linked or unlinked per slice of :meth:`ChunkIndex.replace_steps`


class _Build:
    """A replacement under construction: its hidden holder id, and whether it was abandoned."""

    __slots__ = ("hid", "cancelled")

    def __init__(self, hid: int):
        self.hid = hid
        self.cancelled = False


class ChunkIndex:
    """``key -> {holder: num_tokens}``, and each holder's keys."""

    def __init__(self) -> None:
        self._holders: dict[bytes, int] = {}  # key -> its holders' codes, packed
        self._hid: dict[str, int] = {}  # visible holder name -> id
        self._names: list[str | None] = []  # id -> name (None: free or hidden)
        self._keys: list[list[bytes]] = []  # id -> every key it holds (and maybe stale ones)
        self._count: list[int] = []  # id -> keys it holds
        self._free: list[int] = []  # ids to reuse
        self._codes: dict[int, int] = {}  # one shared int object per single-holder code
        self._building: dict[str, _Build] = {}  # holder name -> its replacement in progress

    # -- holder ids ------------------------------------------------------------------------
    def _new_id(self) -> int:
        if self._free:
            hid = self._free.pop()
            self._keys[hid], self._count[hid] = [], 0
            return hid
        self._names.append(None)
        self._keys.append([])
        self._count.append(0)
        return len(self._names) - 1

    def _visible_id(self, instance_id: str) -> int:
        hid = self._hid.get(instance_id)
        if hid is None:
            hid = self._hid[instance_id] = self._new_id()
            self._names[hid] = instance_id
        return hid

    def _release(self, hid: int) -> Iterator[bool]:
        """Unlink every key of the (hidden) id ``hid``, a slice at a time, then free it."""
        self._names[hid] = None
        keys = self._keys[hid]
        unlink = self._unlink
        for i, key in enumerate(keys, 1):
            unlink(hid, key)
            if not i % SLICE_KEYS:
                yield True
        self._keys[hid], self._count[hid] = [], 0
        self._free.append(hid)

    # -- one key, one holder id ------------------------------------------------------------
    def _link(self, hid: int, key: bytes, num_tokens: int) -> None:
        if not 0 < num_tokens <= _MAX_TOKENS:
            raise ValueError(f"num_tokens {num_tokens} out of range")
        code = hid << _TOKEN_BITS | num_tokens
        code = self._codes.setdefault(code, code)
        v = self._holders.get(key)
        if v is None:
            self._holders[key] = code
        elif v <= _CODE:
            if v >> _TOKEN_BITS == hid:
                self._holders[key] = code
                return
            self._holders[key] = v | code << _CODE_BITS
        else:
            shift, w = 0, v
            while w:
                c = w & _CODE
                if c >> _TOKEN_BITS == hid:
                    self._holders[key] = v ^ (c << shift) ^ (code << shift)
                    return
                w >>= _CODE_BITS
                shift += _CODE_BITS
            self._holders[key] = v | code << shift
        keys = self._keys[hid]
        keys.append(key)
        n = self._count[hid] = self._count[hid] + 1
        if len(keys) > 2 * n + _COMPACT_SLACK:
            self._compact(hid)

    def _unlink(self, hid: int, key: bytes) -> None:
        v = self._holders.get(key)
        if v is None:
            return
        if v <= _CODE:
            if v >> _TOKEN_BITS != hid:
                return
            del self._holders[key]
        else:
            shift, w = 0, v
            while w:
                if (w & _CODE) >> _TOKEN_BITS == hid:
                    rest = v & ((1 << shift) - 1) | (v >> (shift + _CODE_BITS)) << shift
                    if rest <= _CODE:
                        rest = self._codes.setdefault(rest, rest)
                    self._holders[key] = rest
                    break
                w >>= _CODE_BITS
                shift += _CODE_BITS
            else:
                return
        self._count[hid] -= 1

    def _tokens(self, hid: int | None, key: bytes) -> int:
        """Tokens of ``key`` at ``hid`` (0: not held)."""
        v = self._holders.get(key)
        if v is None or hid is None:
            return 0
        while v:
            c = v & _CODE
            if c >> _TOKEN_BITS == hid:
                return c & _MAX_TOKENS
            v >>= _CODE_BITS
        return 0

    def _compact(self, hid: int) -> list[bytes]:
        """Drop the entries of keys ``hid`` no longer holds, and repeats, from its list."""
        tokens = self._tokens
        keys = self._keys[hid] = [k for k in dict.fromkeys(self._keys[hid]) if tokens(hid, k)]
        return keys

    # -- changes ---------------------------------------------------------------------------
    def add(self, instance_id: str, key: bytes, num_tokens: int) -> None:
        self._link(self._visible_id(instance_id), key, num_tokens)

    def remove(self, instance_id: str, key: bytes) -> None:
        hid = self._hid.get(instance_id)
        if hid is not None:
            self._unlink(hid, key)

    def replace(self, instance_id: str, chunks: Iterable[tuple[bytes, int]]) -> None:
        """Make ``chunks`` (``(key, num_tokens)`` pairs) all that ``instance_id`` holds."""
        for _ in self.replace_steps(instance_id, chunks):
            pass

    def replace_steps(self, instance_id: str, chunks: Iterable[tuple[bytes, int]]
                      ) -> Iterator[bool]:
        """:meth:`replace`, a slice of :data:`SLICE_KEYS` keys per step (see the module
        docstring): yields False after each slice of the new holdings, True after each slice
        of the old ones' release (the new ones are in). A replacement of the same holder
        started later, or :meth:`drop_instance`, abandons this one (its steps then end at
        once); a generator closed before its end finishes its work at once (or abandons it,
        before the switch). Returns (``StopIteration.value``) whether the new holdings were
        switched in."""
        self._abandon(instance_id)
        build = self._building[instance_id] = _Build(self._new_id())
        hid, link, switched = build.hid, self._link, False
        try:
            for i, (key, num_tokens) in enumerate(chunks, 1):
                link(hid, key, num_tokens)
                if not i % SLICE_KEYS:
                    yield False
                    if build.cancelled:
                        return False
            del self._building[instance_id]
            old = self._hid.get(instance_id)
            self._hid[instance_id] = hid
            self._names[hid] = instance_id
            switched = True
            if old is not None:
                yield from self._release(old)
            return True
        finally:
            if not switched and not build.cancelled:  # closed early: as if abandoned
                self._abandon(instance_id)
            elif switched and old is not None and self._names[old] is None \
                    and old not in self._free:  # closed while releasing: finish now
                for _ in self._release(old):
                    pass

    def _abandon(self, instance_id: str) -> None:
        build = self._building.pop(instance_id, None)
        if build is not None:
            build.cancelled = True
            for _ in self._release(build.hid):
                pass

    def drop_instance(self, instance_id: str) -> None:
        """Forget everything ``instance_id`` holds (and a replacement in progress)."""
        self._abandon(instance_id)
        hid = self._hid.pop(instance_id, None)
        if hid is not None:
            for _ in self._release(hid):
                pass

    # -- queries ---------------------------------------------------------------------------
    def held_prefix(self, instance_id: str, spans: Sequence[ChunkSpan]) -> int:
        """Number of leading ``spans`` that ``instance_id`` holds."""
        hid = self._hid.get(instance_id)
        n = 0
        for s in spans:
            if not self._tokens(hid, s.key):
                break
            n += 1
        return n

    def prefix_holders(self, spans: Sequence[ChunkSpan]) -> dict[str, int]:
        """:meth:`held_prefix` of every instance at once, walking ``spans`` once: the number
        of leading ``spans`` each instance holding ``spans[0]`` holds."""
        out: dict[int, int] = {}
        get = self._holders.get
        alive: set[int] | None = None
        for n, s in enumerate(spans, 1):
            v = get(s.key)
            if v is None:
                break
            if v <= _CODE:
                hid = v >> _TOKEN_BITS
                if alive is not None and hid not in alive:
                    break
                alive = {hid}
            else:
                ids = set()
                while v:
                    ids.add((v & _CODE) >> _TOKEN_BITS)
                    v >>= _CODE_BITS
                alive = ids if alive is None else alive & ids
                if not alive:
                    break
            for hid in alive:
                out[hid] = n
        names = self._names
        return {names[hid]: n for hid, n in out.items() if names[hid] is not None}

    def keys_of(self, instance_id: str) -> Iterable[bytes]:
        """The keys ``instance_id`` holds (a live view: do not change the index meanwhile)."""
        hid = self._hid.get(instance_id)
        if hid is None:
            return ()
        keys = self._keys[hid]
        return keys if len(keys) == self._count[hid] else self._compact(hid)

    def num_tokens(self, instance_id: str, key: bytes) -> int:
        """Tokens of the chunk ``key`` at ``instance_id`` (0 if it does not hold it)."""
        return self._tokens(self._hid.get(instance_id), key)

    def holds(self, instance_id: str, key: bytes) -> bool:
        return self._tokens(self._hid.get(instance_id), key) > 0

    def count(self, instance_id: str) -> int:
        hid = self._hid.get(instance_id)
        return 0 if hid is None else self._count[hid]

    def __len__(self) -> int:
        """Distinct keys held (by a replacement in progress too)."""
        return len(self._holders)
