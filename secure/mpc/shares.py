"""Replicated three-party shares and the operations on them that need no communication.

Arithmetic sharing: x = x_0 + x_1 + x_2 (mod 2^64); party i holds the pair
(x_i, x_{i+1}) as ``AShare(a=x_i, b=x_{i+1})``. Binary sharing is the same with XOR
(``BShare``). Any one pair is uniformly random and says nothing about x; two pairs
determine x (honest majority).

Each share records the party it was made for (``owner``) and, for arithmetic shares,
its fixed-point scale (``frac_bits``: f for reals, 0 for integers and 0/1 bits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from secure.mpc.randomness import csprng_words
from secure.mpc.ring import RING_DTYPE, check_ring


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    check_ring(a, what)
    check_ring(b, what)
    if a.shape != b.shape:
        raise ValueError(f"{what}: share components differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{what}: share components on different devices: {a.device} vs {b.device}")


@dataclass(frozen=True)
class AShare:
    """Party ``owner``'s pair (x_i, x_{i+1}) of an arithmetic sharing at scale 2^frac_bits."""

    a: torch.Tensor
    b: torch.Tensor
    owner: int
    frac_bits: int

    def __post_init__(self) -> None:
        _check_pair(self.a, self.b, "AShare")

    @property
    def shape(self) -> torch.Size:
        return self.a.shape

    @property
    def device(self) -> torch.device:
        return self.a.device

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AShare:
        """Apply a linear shape operation (view, slice, transpose, ...) to both components."""
        return AShare(fn(self.a), fn(self.b), self.owner, self.frac_bits)

    def __getitem__(self, index: object) -> AShare:
        return self.map(lambda t: t[index])

    def reshape(self, *shape: int) -> AShare:
        return self.map(lambda t: t.reshape(*shape))

    def transpose(self, d0: int, d1: int) -> AShare:
        return self.map(lambda t: t.transpose(d0, d1))


@dataclass(frozen=True)
class BShare:
    """Party ``owner``'s pair (x_i, x_{i+1}) of a binary (XOR) sharing of 64-bit words."""

    a: torch.Tensor
    b: torch.Tensor
    owner: int

    def __post_init__(self) -> None:
        _check_pair(self.a, self.b, "BShare")

    @property
    def shape(self) -> torch.Size:
        return self.a.shape

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BShare:
        return BShare(fn(self.a), fn(self.b), self.owner)

    def __xor__(self, other: BShare) -> BShare:
        _same_owner(self.owner, other.owner, "xor")
        return BShare(self.a ^ other.a, self.b ^ other.b, self.owner)

    def xor_public(self, c: torch.Tensor | int, party_id: int) -> BShare:
        """x xor c: c goes into component 0, held by parties 0 (first) and 2 (second)."""
        a = self.a ^ c if party_id == 0 else self.a
        b = self.b ^ c if party_id == 2 else self.b
        return BShare(a, b, self.owner)

    def shift_left(self, k: int) -> BShare:
        return self.map(lambda t: t << k)

    def shift_right(self, k: int) -> BShare:
        return self.map(lambda t: t >> k)

    def and_public(self, c: torch.Tensor | int) -> BShare:
        return self.map(lambda t: t & c)


def _same_owner(o1: int, o2: int, what: str) -> None:
    if o1 != o2:
        raise ValueError(f"{what}: shares of different parties ({o1} and {o2}) cannot be combined")


def _align(x: AShare, y: AShare, what: str) -> tuple[AShare, AShare]:
    """Bring two shares to the same scale by an exact left shift of the coarser one."""
    _same_owner(x.owner, y.owner, what)
    if x.frac_bits == y.frac_bits:
        return x, y
    if x.frac_bits < y.frac_bits:
        return lift(x, y.frac_bits), y
    return x, lift(y, x.frac_bits)


def lift(x: AShare, frac_bits: int) -> AShare:
    """The same value at a finer scale (exact: multiply by 2^(frac_bits - x.frac_bits))."""
    if frac_bits < x.frac_bits:
        raise ValueError(f"lift: cannot lower scale {x.frac_bits} to {frac_bits} without truncation")
    k = frac_bits - x.frac_bits
    return AShare(x.a << k, x.b << k, x.owner, frac_bits)


def add(x: AShare, y: AShare) -> AShare:
    """[x + y] (local)."""
    x, y = _align(x, y, "add")
    return AShare(x.a + y.a, x.b + y.b, x.owner, x.frac_bits)


def sub(x: AShare, y: AShare) -> AShare:
    """[x - y] (local)."""
    x, y = _align(x, y, "sub")
    return AShare(x.a - y.a, x.b - y.b, x.owner, x.frac_bits)


def neg(x: AShare) -> AShare:
    """[-x] (local)."""
    return AShare(-x.a, -x.b, x.owner, x.frac_bits)


def add_ring_public(x: AShare, c: torch.Tensor, party_id: int) -> AShare:
    """[x + c] for a public ring tensor c already at x's scale: c joins component 0."""
    a = x.a + c if party_id == 0 else x.a
    b = x.b + c if party_id == 2 else x.b
    if a.shape != x.shape or b.shape != x.shape:
        a, b = torch.broadcast_tensors(a, b)
    return AShare(a, b, x.owner, x.frac_bits)


def mul_ring_public(x: AShare, c: torch.Tensor | int) -> AShare:
    """[x * c] for a public integer c (no change of scale, local)."""
    return AShare(x.a * c, x.b * c, x.owner, x.frac_bits)


def sum_share(x: AShare, dim: int, keepdim: bool = False) -> AShare:
    """[sum of x along dim] (local)."""
    return x.map(lambda t: t.sum(dim=dim, keepdim=keepdim))


def cat(shares: Sequence[AShare], dim: int = 0) -> AShare:
    """Concatenate shares of equal scale."""
    first = shares[0]
    for s in shares[1:]:
        _same_owner(first.owner, s.owner, "cat")
        if s.frac_bits != first.frac_bits:
            raise ValueError(f"cat: scales differ ({first.frac_bits} vs {s.frac_bits})")
    return AShare(torch.cat([s.a for s in shares], dim), torch.cat([s.b for s in shares], dim),
                  first.owner, first.frac_bits)


def trivial_component(value: torch.Tensor | None, component: int, party_id: int,
                      shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This party's pair of the sharing whose component ``component`` is ``value``, others 0.

    Only the two parties holding that component need ``value``; the third passes None.
    """
    zero = torch.zeros(shape, dtype=RING_DTYPE, device=device)
    a = value if party_id == component else zero
    b = value if (party_id + 1) % 3 == component else zero
    if a is None or b is None:
        raise ValueError(f"party {party_id} holds component {component} but got no value for it")
    return a, b


# ---- dealer side: sharing and reconstruction outside the parties (client, model owner) ----

def deal(x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a ring tensor into three replicated pairs with CSPRNG randomness.

    Returns [(x_0, x_1), (x_1, x_2), (x_2, x_0)]: entry i is party i's pair.
    """
    check_ring(x, "deal")
    n = x.numel()
    x0 = csprng_words(n, x.device).reshape(x.shape)
    x1 = csprng_words(n, x.device).reshape(x.shape)
    x2 = x - x0 - x1
    return [(x0, x1), (x1, x2), (x2, x0)]


def deal_shares(x: torch.Tensor, frac_bits: int) -> list[AShare]:
    """:func:`deal` wrapped as the three parties' AShares."""
    return [AShare(a, b, i, frac_bits) for i, (a, b) in enumerate(deal(x))]


def reconstruct(shares: Sequence[AShare | tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """x = x_0 + x_1 + x_2 from at least two parties' pairs (checks that they agree)."""
    pairs = [(s.a, s.b) if isinstance(s, AShare) else s for s in shares]
    if len(pairs) == 3:
        for i in range(3):
            if not torch.equal(pairs[i][1], pairs[(i + 1) % 3][0]):
                raise ValueError(f"inconsistent shares: party {i}'s second component differs from "
                                 f"party {(i + 1) % 3}'s first")
        return pairs[0][0] + pairs[1][0] + pairs[2][0]
    if len(pairs) == 2:
        (a0, b0), (a1, b1) = pairs
        return a0 + b0 + b1
    raise ValueError(f"reconstruct needs the pairs of 2 or 3 parties, got {len(pairs)}")
