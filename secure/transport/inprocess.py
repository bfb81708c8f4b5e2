"""In-process transport: three parties as threads of one process, linked by queues.

Tensors are copied on send so that no party can alias another's memory, and every byte
that would cross a wire is counted. A failing party calls :meth:`InProcessNetwork.abort`,
which wakes every blocked receiver with a :class:`TransportError` instead of letting the
others wait for the deadline.
"""

from __future__ import annotations

import queue
import threading

import torch

from secure.transport.base import (
    DEFAULT_DEADLINE_S,
    LinkCounters,
    PeerTimeoutError,
    TransportError,
    payload_bytes,
)

_ABORT = object()


class InProcessNetwork:
    """Queues for every ordered pair of the three parties."""

    def __init__(self, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.deadline_s = deadline_s
        self._queues = {(a, b): queue.Queue() for a in range(3) for b in range(3) if a != b}
        self._abort_reason: str | None = None
        self._lock = threading.Lock()

    def endpoint(self, party_id: int) -> InProcessTransport:
        if party_id not in (0, 1, 2):
            raise ValueError(f"party id must be 0, 1 or 2, got {party_id}")
        return InProcessTransport(self, party_id)

    def abort(self, reason: str) -> None:
        """Fail every pending and future receive with ``reason``."""
        with self._lock:
            if self._abort_reason is not None:
                return
            self._abort_reason = reason
        for q in self._queues.values():
            q.put(_ABORT)


class InProcessTransport:
    """One party's view of an :class:`InProcessNetwork`."""

    def __init__(self, network: InProcessNetwork, party_id: int) -> None:
        self.network = network
        self.party_id = party_id
        self.counters = LinkCounters()
        self._sent_seq = {p: 0 for p in range(3) if p != party_id}
        self._recv_seq = {p: 0 for p in range(3) if p != party_id}

    def _check_peer(self, peer: int) -> None:
        if peer not in self._sent_seq:
            raise ValueError(f"party {self.party_id} has no link to party {peer}")

    def send(self, to: int, tensors: list[torch.Tensor]) -> None:
        self._check_peer(to)
        copies = [t.detach().clone() for t in tensors]
        self.counters.record(to, payload_bytes(copies))
        self.network._queues[(self.party_id, to)].put((self._sent_seq[to], copies))
        self._sent_seq[to] += 1

    def recv(self, frm: int) -> list[torch.Tensor]:
        self._check_peer(frm)
        try:
            item = self.network._queues[(frm, self.party_id)].get(timeout=self.network.deadline_s)
        except queue.Empty:
            raise PeerTimeoutError(
                f"party {self.party_id}: no message from party {frm} within "
                f"{self.network.deadline_s:.1f} s (message #{self._recv_seq[frm]})"
            ) from None
        if item is _ABORT:
            self.network._queues[(frm, self.party_id)].put(_ABORT)
            raise TransportError(f"party {self.party_id}: run aborted: {self.network._abort_reason}")
        seq, tensors = item
        if seq != self._recv_seq[frm]:
            raise TransportError(
                f"party {self.party_id}: expected message #{self._recv_seq[frm]} from party {frm}, "
                f"got #{seq}: the parties are out of step"
            )
        self._recv_seq[frm] += 1
        return tensors
