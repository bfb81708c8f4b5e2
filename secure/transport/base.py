"""The transport interface: point-to-point tagged tensor messages between three parties.

One interface for the in-process loopback (tests, single-host benchmarks) and the gRPC
peers of the party nodes. A message is a list of tensors sent from one party to another;
messages between a fixed pair arrive in the order sent. Each message carries a sequence
number so that a desynchronised protocol fails loudly instead of mixing up tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

DEFAULT_DEADLINE_S = 60.0


class TransportError(RuntimeError):
    """A peer is gone, too slow, or sent something the protocol did not expect."""


class PeerTimeoutError(TransportError):
    """No message from a peer within the deadline."""


@dataclass
class LinkCounters:
    """Traffic one party has sent: bytes and messages, per destination."""

    bytes_sent: dict[int, int] = field(default_factory=dict)
    messages_sent: dict[int, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())

    def record(self, to: int, nbytes: int) -> None:
        self.bytes_sent[to] = self.bytes_sent.get(to, 0) + nbytes
        self.messages_sent[to] = self.messages_sent.get(to, 0) + 1


class Transport(Protocol):
    """What a party needs from the network."""

    party_id: int
    counters: LinkCounters

    def send(self, to: int, tensors: list[torch.Tensor]) -> None:
        """Send a list of tensors to party ``to`` (non-blocking or buffered)."""
        ...

    def recv(self, frm: int) -> list[torch.Tensor]:
        """Receive the next message from party ``frm``; raises PeerTimeoutError past the deadline."""
        ...


def payload_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes the tensors occupy on the wire as raw little-endian data."""
    return sum(t.numel() * t.element_size() for t in tensors)
