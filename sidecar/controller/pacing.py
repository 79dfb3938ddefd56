"""Bandwidth caps: a move's own (``max_bytes_per_s`` in ``POST /move``) and the controller's for
all jobs together (``--max-mib-per-s``), so that moving KV does not starve the engines' serving
traffic on the same links.

Contract
--------
* A :class:`RateLimit` paces *starts*: ``await take(n)`` returns when ``n`` more bytes may be
  sent. It keeps a virtual clock — the time by which everything already granted would have
  gone at the cap — and a caller waits until that clock, then advances it by ``n / rate``.
  Grants are first come, first served — except *background* ones (a drain's batches), which
  reserve nothing ahead: each waits until every grant already made is due and then takes
  its own, so an operator's move asked for meanwhile goes first. An idle limit does not bank
  credit beyond ``burst_s``.
* Only the controller's event loop calls it (no locking). Cancelling a waiting ``take`` gives
  back nothing it did not take.
* Accuracy follows from the grant size: over any window of W seconds, at most
  ``rate * (W + burst_s) + largest grant`` bytes start; bytes *completing* in a window may
  exceed that by one more grant (transfer times vary). :func:`grant_bytes` picks a batch size
  of a twentieth of a second at the cap, so that a 1 s window stays within 10 % of it — as long
  as a chunk (the smallest batch) is no larger than that.
"""

from __future__ import annotations

import asyncio
import time


class RateLimit:
    """A pacer of byte grants at ``bytes_per_s``.

    Args:
        bytes_per_s: the cap (> 0).
        burst_s: seconds of unused cap an idle limit may bank (0: none).
        clock: monotonic time source (tests inject one).
    """

    def __init__(self, bytes_per_s: float, burst_s: float = 0.0, clock=time.monotonic):
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be > 0")
        self.bytes_per_s = float(bytes_per_s)
        self.burst_s = burst_s
        self._clock = clock
        self._next = clock()

    async def take(self, nbytes: int, background: bool = False) -> float:
        """Wait until ``nbytes`` may start; returns the seconds waited. ``background``: yield
        to every grant asked for before this one starts (see the module docstring)."""
        waited = 0.0
        if background:
            while (ahead := self._next - self._clock()) > 0:
                await asyncio.sleep(ahead)
                waited += ahead
        return waited + await self._grant(nbytes)

    async def _grant(self, nbytes: int) -> float:
        now = self._clock()
        start = max(self._next, now - self.burst_s)
        self._next = start + nbytes / self.bytes_per_s
        delay = start - now
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                # Not sent: later callers need not wait for it (the clock is rolled back only
                # when nobody took a grant after this one).
                if self._next == start + nbytes / self.bytes_per_s:
                    self._next = start
                raise
        return max(delay, 0.0)


def grant_bytes(limits: list[RateLimit], batch_bytes: int) -> int:
    """The largest batch to send under ``limits``: ``batch_bytes``, or a twentieth of a second
    at the slowest cap if smaller (so any 1 s window stays within 10 % of it)."""
    if not limits:
        return batch_bytes
    return max(1, min(batch_bytes, int(min(lim.bytes_per_s for lim in limits) / 20)))
