"""Secure embedding lookup: one-hot(token ids) @ secret table.

Two ways to get a shared one-hot matrix O (L x V) of the client's token ids:

* **Client one-hot** (ours). The client knows its ids, builds O itself and shares it with
  two of the three components expanded from 128-bit seeds: o_0 = PRG(s_0),
  o_1 = PRG(s_1), o_2 = O - o_0 - o_1. Party 0 gets (s_0, s_1): 32 bytes. Parties 1 and 2
  each get the dense o_2 (8 L V bytes) and one seed. No secure equality at all; the
  parties' only cost is the one-round matmul O @ W (O is integral, so no truncation).
* **PUMA one-hot** (for comparison). The client shares its ids; the parties compute
  1{id == v} for every vocabulary entry v with a secure equality (two comparisons in one
  8-round pass over L V elements), which is what SPU users report as most of the traffic.

Either way the parties learn L and V (shapes) and nothing about the ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secure.mpc import shares as sh
from secure.mpc.arithmetic import mul_untruncated_many
from secure.mpc.boolean import msb_many
from secure.mpc.compare import bit_not
from secure.mpc.party import Party
from secure.mpc.randomness import PrfStream, random_key
from secure.mpc.ring import RING_DTYPE
from secure.mpc.shares import AShare
from secure.profile.profiler import protocol


@dataclass(frozen=True)
class SeededComponent:
    """A share component given as a PRG seed (expanded by the receiving party)."""

    seed: bytes

    def expand(self, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return PrfStream(self.seed).words(n, device).reshape(shape)


Component = SeededComponent | torch.Tensor


@dataclass(frozen=True)
class OneHotShare:
    """One party's pair of a client-made one-hot sharing, each part a seed or a dense tensor."""

    first: Component
    second: Component
    shape: tuple[int, int]

    @property
    def wire_bytes(self) -> int:
        """Bytes the client sends this party."""
        return sum(len(c.seed) if isinstance(c, SeededComponent) else c.numel() * 8
                   for c in (self.first, self.second))

    def expand(self, owner: int, device: torch.device | str = "cpu") -> AShare:
        """The party's arithmetic pair of O at scale 0."""
        parts = [c.expand(self.shape, device) if isinstance(c, SeededComponent) else c.to(device)
                 for c in (self.first, self.second)]
        return AShare(parts[0], parts[1], owner, 0)


def seeded_deal(x: torch.Tensor) -> list[tuple[Component, Component]]:
    """Replicated pairs of the ring tensor x with x_0, x_1 given as fresh 128-bit seeds and
    x_2 = x - x_0 - x_1 dense: [(s_0, s_1), (s_1, x_2), (x_2, s_0)], entry i for party i."""
    shape = tuple(x.shape)
    s0, s1 = SeededComponent(random_key()), SeededComponent(random_key())
    x2 = x - s0.expand(shape, x.device) - s1.expand(shape, x.device)
    return [(s0, s1), (s1, x2), (x2, s0)]


def client_onehot_shares(token_ids: torch.Tensor, vocab_size: int) -> list[OneHotShare]:
    """The three parties' compressed shares of one-hot(token_ids) (L x vocab_size)."""
    ids = _check_ids(token_ids, vocab_size)
    shape = (int(ids.numel()), vocab_size)
    onehot = torch.zeros(shape, dtype=RING_DTYPE)
    onehot[torch.arange(shape[0]), ids] = 1
    return [OneHotShare(first, second, shape) for first, second in seeded_deal(onehot)]


def _check_ids(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token ids must be an integer tensor, got {token_ids.dtype}")
    ids = token_ids.reshape(-1).to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


@protocol("embedding")
def embed(party: Party, onehot: AShare, table: AShare) -> AShare:
    """[O @ W]: rows of the secret table W (V x H) picked by the shared one-hot O. One round."""
    if onehot.frac_bits != 0:
        raise ValueError("embed: the one-hot share must be integral (frac_bits 0)")
    if onehot.shape[-1] != table.shape[0]:
        raise ValueError(f"embed: one-hot width {onehot.shape[-1]} does not match the table's "
                         f"{table.shape[0]} rows")
    return mul_untruncated_many(party, [(onehot, table)], matmul=True)[0]


@protocol("puma_onehot")
def puma_onehot(party: Party, token_ids: AShare, vocab_size: int) -> AShare:
    """[1{id_l == v}] (L x V) from shared ids by a secure equality per entry (PUMA's way).

    d = id - v; equal iff not (d < 0) and not (-d < 0): one 8-round MSB pass over 2 L V values.
    """
    if token_ids.frac_bits != 0:
        raise ValueError("puma_onehot: token ids must be shared as integers (frac_bits 0)")
    vocab = torch.arange(vocab_size, dtype=RING_DTYPE, device=token_ids.device)
    col = token_ids.map(lambda t: t.reshape(-1, 1).expand(-1, vocab_size))
    d = sh.add_ring_public(col, -vocab, party.id)
    below, above = msb_many(party, [d, sh.neg(d)])
    return bit_not(party, sh.add(below, above))
