"""A subscriber of KV events in vLLM's wire format — an engine's own stream or a sidecar's —
decoding with vLLM's own ``KVEventBatch`` decoder, as a router would."""

from __future__ import annotations

import time

import msgspec
import zmq


class KVEventSubscriber:
    """A SUB socket on ``endpoint`` (topic prefix ``topic``).

    Args:
        endpoint: e.g. ``tcp://127.0.0.1:5557``.
        topic: subscription prefix (``b""``: everything).
    """

    def __init__(self, endpoint: str, topic: bytes = b""):
        from vllm.distributed.kv_events import KVEventBatch

        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(endpoint)
        self.seqs: list[int] = []
        time.sleep(0.3)  # the subscription reaches the publisher (PUB drops until it does)

    def events(self, until=lambda events: False, timeout: float = 5.0) -> list:
        """Events of the batches that arrive until ``until(events so far)`` holds or
        ``timeout`` passes."""
        out: list = []
        deadline = time.monotonic() + timeout
        while not until(out):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                break
            _topic, seq, payload = self.sock.recv_multipart()
            self.seqs.append(int.from_bytes(seq, "big"))
            out.extend(self.decoder.decode(payload).events)
        return out

    def close(self) -> None:
        self.sock.close()


def hashes(events, kind: str, medium: str) -> list:
    """The block hashes of the ``kind`` events ("BlockStored", "BlockRemoved") of ``medium``,
    in order."""
    return [h for e in events if type(e).__name__ == kind and e.medium == medium
            for h in e.block_hashes]
