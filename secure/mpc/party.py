"""One computing party: its id, its links, its PRF keys and its counters.

The three parties run the same program in lockstep (SPMD). Communication happens only
through :meth:`Party.exchange`, and every call of it is one round for every party, even
for a party that neither sends nor receives in it, so the three round counters agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from secure.mpc.concurrent import Merger, run_concurrently
from secure.mpc.randomness import PairwiseKeys, PrfStream, random_key
from secure.mpc.ring import FixedPoint
from secure.profile.profiler import Profiler
from secure.transport.base import Transport

R = TypeVar("R")


class ShareOwnershipError(PermissionError):
    """A party tried to compute on a share that belongs to another party."""


class Party:
    """State of party ``transport.party_id`` in a three-party session."""

    def __init__(
        self,
        transport: Transport,
        fixed_point: FixedPoint | None = None,
        device: torch.device | str = "cpu",
        profiler: Profiler | None = None,
    ) -> None:
        if transport.party_id not in (0, 1, 2):
            raise ValueError(f"party id must be 0, 1 or 2, got {transport.party_id}")
        self.id = transport.party_id
        self.transport = transport
        self.fp = fixed_point or FixedPoint()
        self.device = torch.device(device)
        self.profiler = profiler
        self.rounds = 0
        self._keys: PairwiseKeys | None = None
        self._merger: Merger | None = None

    @property
    def next(self) -> int:
        return (self.id + 1) % 3

    @property
    def prev(self) -> int:
        return (self.id + 2) % 3

    @property
    def bytes_sent(self) -> int:
        return self.transport.counters.total_bytes

    @property
    def keys(self) -> PairwiseKeys:
        merger = self._merger
        if merger is not None and merger.owns_current_thread():
            return merger.current_keys()
        if self._keys is None:
            raise RuntimeError(f"party {self.id}: call setup_keys() before drawing randomness")
        return self._keys

    def setup_keys(self) -> None:
        """Agree on the pairwise PRF keys (one round).

        Party i samples k_{i+1} and sends it to party i+1, and receives k_i from party i-1.
        Over the gRPC transport the links are mutually authenticated, so only the two
        holders of a key ever see it.
        """
        mine = random_key()
        received = self.exchange(
            {self.next: [torch.frombuffer(bytearray(mine), dtype=torch.uint8)]}, [self.prev]
        )
        theirs = bytes(received[self.prev][0].cpu().numpy().tobytes())
        self._keys = PairwiseKeys(with_prev=PrfStream(theirs), with_next=PrfStream(mine))

    def exchange(
        self, send: dict[int, list[torch.Tensor]], recv_from: list[int]
    ) -> dict[int, list[torch.Tensor]]:
        """One communication round: send to some peers, then receive from some peers (inside
        :meth:`concurrently`, a branch's round, merged with the other branches')."""
        merger = self._merger
        if merger is not None and merger.owns_current_thread():
            return merger.exchange(send, recv_from)
        return self._exchange_now(send, recv_from)

    def _exchange_now(
        self, send: dict[int, list[torch.Tensor]], recv_from: list[int]
    ) -> dict[int, list[torch.Tensor]]:
        got = self._exchange_messages(list(send.items()), recv_from)
        return dict(zip(recv_from, got))

    def _exchange_messages(
        self, sends: Sequence[tuple[int, list[torch.Tensor]]], recv_from: Sequence[int]
    ) -> list[list[torch.Tensor]]:
        """One round of messages in order (several to one peer allowed): send them all, then
        receive one message per entry of ``recv_from``, in order."""
        self.rounds += 1
        for to, tensors in sends:
            self.transport.send(to, [t.contiguous() for t in tensors])
        return [[t.to(self.device) for t in self.transport.recv(frm)] for frm in recv_from]

    def concurrently(self, branches: Sequence[Callable[[], R]]) -> list[R]:
        """Run independent protocol branches with their k-th rounds merged into one
        (:mod:`secure.mpc.concurrent`): the rounds of the longest branch instead of the sum,
        plus an 8-byte header per branch in each merged message. Results in order. Inside a
        branch, a further call runs its branches one after the other."""
        if self._merger is not None or len(branches) <= 1:
            return [b() for b in branches]
        keys = [self.keys.fork() for _ in branches]
        return run_concurrently(branches, self._exchange_messages, self._install_merger, keys)

    def _install_merger(self, merger: Merger | None) -> None:
        self._merger = merger

    def check_owner(self, owner: int, what: str) -> None:
        """Raise ShareOwnershipError unless the share was made for this party."""
        if owner != self.id:
            raise ShareOwnershipError(
                f"{what}: the share belongs to party {owner}, but party {self.id} tried to use it"
            )
