"""ChunkLocks: which chunks of which instance the operations in flight touch, so that two of
them never work on the same chunks of one instance at once.

Why: every operation is safe alone, but two on the same prefix can lose it — opposite moves
(a→b and b→a) each find the prefix already at their destination and both delete their
source; a clear of a move's destination between its fetch and its source's delete leaves the
prefix nowhere; two fetches into one destination race for the same chunks. Such a second
operation is refused at once with ``conflict`` (HTTP 409) naming the first; nothing is queued,
so a client never waits on an invisible line and can retry.

Contract: a plain data structure, used on the controller's event loop only. A claim is on a
set of chunk keys at one instance (or on the whole instance: a clear of everything), shared
(read: the source of a copy) or exclusive (write or delete: a move's source, any
destination, a clear). Shared claims coexist; an exclusive claim conflicts with any other
claim on one of its chunks. :meth:`ChunkLocks.acquire` takes all of a job's claims or none.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sidecar.httpkit import ApiError


@dataclass(frozen=True)
class Claim:
    """``keys`` (None: every chunk) of ``instance_id``, shared or ``exclusive``."""

    instance_id: str
    keys: tuple[bytes, ...] | None
    exclusive: bool


@dataclass
class _Held:
    exclusive: str | None = None  # the holder with an exclusive claim
    shared: set[str] = field(default_factory=set)  # holders with a shared claim


class ChunkLocks:
    """The claims of the jobs in flight; a holder is named by a short description of its job
    (e.g. ``"move 3f2a…"``), which a refusal quotes."""

    def __init__(self) -> None:
        self._chunks: dict[tuple[str, bytes], _Held] = {}
        self._whole: dict[str, str] = {}  # instance -> holder of a whole-instance claim
        self._per_instance: Counter[str] = Counter()  # instance -> chunk claims on it
        self._claims: dict[str, list[Claim]] = {}  # holder -> its claims

    def acquire(self, holder: str, claims: list[Claim]) -> None:
        """Take every claim for ``holder``, or none.

        Raises:
            ApiError: ``conflict``, naming the operation in the way.
        """
        for c in claims:
            other = self._conflict(holder, c)
            if other is not None:
                raise ApiError("conflict", f"{other} is working on these chunks at "
                                           f"{c.instance_id}; retry when it has ended")
        for c in claims:
            if c.keys is None:
                self._whole[c.instance_id] = holder
                continue
            for k in c.keys:
                held = self._chunks.setdefault((c.instance_id, k), _Held())
                if c.exclusive:
                    held.exclusive = holder
                else:
                    held.shared.add(holder)
                self._per_instance[c.instance_id] += 1
        self._claims[holder] = claims

    def release(self, holder: str) -> None:
        """Drop every claim of ``holder`` (nothing if it holds none)."""
        for c in self._claims.pop(holder, ()):
            if c.keys is None:
                self._whole.pop(c.instance_id, None)
                continue
            for k in c.keys:
                held = self._chunks.get((c.instance_id, k))
                if held is None:
                    continue
                if held.exclusive == holder:
                    held.exclusive = None
                held.shared.discard(holder)
                if held.exclusive is None and not held.shared:
                    del self._chunks[c.instance_id, k]
                self._per_instance[c.instance_id] -= 1
                if not self._per_instance[c.instance_id]:
                    del self._per_instance[c.instance_id]

    def _conflict(self, holder: str, c: Claim) -> str | None:
        """Another holder whose claims on ``c.instance_id`` conflict with ``c``, or None."""
        whole = self._whole.get(c.instance_id)
        if whole is not None and whole != holder:
            return whole
        if c.keys is None:  # every chunk: any other claim on the instance is in the way
            if self._per_instance.get(c.instance_id):
                return next(h.exclusive or next(iter(h.shared))
                            for (iid, _), h in self._chunks.items() if iid == c.instance_id)
            return None
        for k in c.keys:
            held = self._chunks.get((c.instance_id, k))
            if held is None:
                continue
            if held.exclusive is not None and held.exclusive != holder:
                return held.exclusive
            if c.exclusive and held.shared - {holder}:
                return next(iter(held.shared - {holder}))
        return None

    def __len__(self) -> int:
        """Holders with claims."""
        return len(self._claims)
