"""ChunkIndex: which sidecar holds which chunk — the controller's one picture of the fleet's
holdings, from which ``/lookup`` answers without asking any sidecar.

Holders are named by :func:`~sidecar.controller.instances.holder_name`: the instance id of an
engine without tensor parallelism, one name per rank otherwise (the registry combines a
tensor-parallel engine's ranks; this index does not know about ranks).

Contract: a plain data structure, used only on the controller's event loop (not thread-safe).
It is fed by :mod:`sidecar.controller.instances` from sidecar snapshots and sequence-numbered
events, and read by lookups and by move validation. Every operation is O(keys touched), except
:meth:`ChunkIndex.drop_instance` and :meth:`ChunkIndex.replace` (O(the instance's keys)).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from vllm_kvmove.hashing import ChunkSpan


class ChunkIndex:
    """``key -> {instance_id: num_tokens}``, and each instance's keys."""

    def __init__(self) -> None:
        self._holders: dict[bytes, dict[str, int]] = {}
        self._by_instance: dict[str, set[bytes]] = {}

    def add(self, instance_id: str, key: bytes, num_tokens: int) -> None:
        self._holders.setdefault(key, {})[instance_id] = num_tokens
        self._by_instance.setdefault(instance_id, set()).add(key)

    def remove(self, instance_id: str, key: bytes) -> None:
        self._by_instance.get(instance_id, set()).discard(key)
        self._unlink(instance_id, key)

    def replace(self, instance_id: str, chunks: Iterable[tuple[bytes, int]]) -> None:
        """Make ``chunks`` (``(key, num_tokens)`` pairs) all that ``instance_id`` holds."""
        self.drop_instance(instance_id)
        for key, num_tokens in chunks:
            self.add(instance_id, key, num_tokens)

    def drop_instance(self, instance_id: str) -> None:
        """Forget everything ``instance_id`` holds."""
        for key in self._by_instance.pop(instance_id, set()):
            self._unlink(instance_id, key)

    def _unlink(self, instance_id: str, key: bytes) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.pop(instance_id, None)
            if not holders:
                del self._holders[key]

    def held_prefix(self, instance_id: str, spans: Sequence[ChunkSpan]) -> int:
        """Number of leading ``spans`` that ``instance_id`` holds."""
        n = 0
        for s in spans:
            if instance_id not in self._holders.get(s.key, ()):
                break
            n += 1
        return n

    def prefix_holders(self, spans: Sequence[ChunkSpan]) -> dict[str, int]:
        """:meth:`held_prefix` of every instance at once, walking ``spans`` once: the number
        of leading ``spans`` each instance holding ``spans[0]`` holds."""
        out: dict[str, int] = {}
        get = self._holders.get
        alive: set[str] | None = None
        for n, s in enumerate(spans, 1):
            holders = get(s.key)
            if not holders:
                break
            alive = set(holders) if alive is None else alive.intersection(holders)
            if not alive:
                break
            out.update(dict.fromkeys(alive, n))
        return out

    def keys_of(self, instance_id: str) -> Iterable[bytes]:
        """The keys ``instance_id`` holds (a live view: do not change the index meanwhile)."""
        return self._by_instance.get(instance_id, ())

    def num_tokens(self, instance_id: str, key: bytes) -> int:
        """Tokens of the chunk ``key`` at ``instance_id`` (0 if it does not hold it)."""
        return self._holders.get(key, {}).get(instance_id, 0)

    def holds(self, instance_id: str, key: bytes) -> bool:
        return instance_id in self._holders.get(key, ())

    def count(self, instance_id: str) -> int:
        return len(self._by_instance.get(instance_id, ()))

    def __len__(self) -> int:
        return len(self._holders)
