"""Comparison family on arithmetic shares, all built on one batched MSB.

x < y is MSB(x - y), correct whenever |x - y| < 2^63 in ring units (for fixed point
with f = 18: |x - y| < 3.5e13). Every function takes lists where batching helps, so
all comparisons of one step cost a single 8-round MSB pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from secure.mpc import scale
from secure.mpc import shares as sh
from secure.mpc.arithmetic import mul_many, mul_untruncated_many, open_many, to_scale
from secure.mpc.boolean import (
    DaBits,
    bit_decompose,
    bits_to_arith,
    highest_bit_onehot,
    msb_many,
    open_bits_xor,
)
from secure.mpc.party import Party
from secure.mpc.shares import AShare
from secure.profile.profiler import protocol


@protocol("less_than")
def less_than_many(party: Party, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
    """[1{x < y}] for each pair (broadcasting), as 0/1 shares at scale 0. 8 rounds in all."""
    diffs = []
    for x, y in pairs:
        d = sh.sub(x, y)
        diffs.append(d)
    return msb_many(party, diffs)


def less_than(party: Party, x: AShare, y: AShare) -> AShare:
    """[1{x < y}] element-wise (see :func:`less_than_many`)."""
    return less_than_many(party, [(x, y)])[0]


def less_than_public(party: Party, x: AShare, thresholds: Sequence[float]) -> list[AShare]:
    """[1{x < c}] for each public real c, one MSB pass for all thresholds.

    An integral x (a bit, a count) compared with a fractional c is lifted to scale f first
    (``secure.mpc.scale.comparison_scale``); each c is encoded at x's scale.
    """
    s = scale.comparison_scale(x.frac_bits, thresholds, party.fp.frac_bits)
    if s != x.frac_bits:
        x = sh.lift(x, s)
    party.fp.encode(torch.tensor(list(thresholds), dtype=torch.float64))  # range check
    diffs = [sh.add_ring_public(x, -scale.encode_public(c, s, x.device), party.id) for c in thresholds]
    return msb_many(party, diffs)


@protocol("range_check")
def count_out_of_range(party: Party, x: AShare, lower: float | None, upper: float | None) -> int:
    """The number of elements of x outside ``[lower, upper]`` (None: that end open); only
    that count is opened, to all three parties.

    One MSB pass on ``x - lower`` and ``upper - x`` (the pass of ``less_than_public`` with
    both thresholds: 8 rounds; ``1{x < lower}``, ``1{x > upper}``, thresholds encoded at
    ``scale.comparison_scale``), the 0/1 shares summed locally over every element into one
    arithmetic share at scale 0, and that share opened (1 round, 24 bytes over the three
    parties). 9 rounds. What it reveals: the count, i.e. how many elements of this value
    left the range (0 for every query that is answered); no value, position or sign.
    """
    if lower is None and upper is None:
        raise ValueError("count_out_of_range needs a lower or an upper end")
    thresholds = [float(c) for c in (lower, upper) if c is not None]
    s = scale.comparison_scale(x.frac_bits, thresholds, party.fp.frac_bits)
    if s != x.frac_bits:
        x = sh.lift(x, s)
    party.fp.encode(torch.tensor(thresholds, dtype=torch.float64))  # range check
    diffs = []
    if lower is not None:  # MSB(x - lower) = 1{x < lower}
        diffs.append(sh.add_ring_public(x, -scale.encode_public(lower, s, x.device), party.id))
    if upper is not None:  # MSB(upper - x) = 1{x > upper}
        diffs.append(sh.add_ring_public(sh.neg(x), scale.encode_public(upper, s, x.device), party.id))
    count: AShare | None = None
    for bits in msb_many(party, diffs):
        total = bits.map(lambda t: t.reshape(-1).sum(0, keepdim=True))
        count = total if count is None else sh.add(count, total)
    assert count is not None
    (opened,) = open_many(party, [count])
    return int(opened.item())


def relu_mask(party: Party, x: AShare) -> AShare:
    """[1{x >= 0}] = 1 - MSB(x)."""
    (m,) = msb_many(party, [x])
    return bit_not(party, m)


def bit_not(party: Party, b: AShare) -> AShare:
    """[1 - b] for a 0/1 share b (local)."""
    return sh.add_ring_public(sh.neg(b), torch.tensor(1 << b.frac_bits, device=b.device), party.id)


@protocol("relu")
def relu(party: Party, x: AShare) -> AShare:
    """[max(x, 0)] = x * 1{x >= 0}: 9 rounds (MSB, then one untruncated product with the bit)."""
    mask = relu_mask(party, x)
    return mul_untruncated_many(party, [(mask, x)])[0]


@protocol("select")
def select_many(party: Party, items: Sequence[tuple[AShare, AShare, AShare]]) -> list[AShare]:
    """[b ? x : y] = y + b (x - y) for each (b, x, y) with b a 0/1 share. One round in all."""
    prods = mul_untruncated_many(party, [(b, sh.sub(x, y)) for b, x, y in items])
    return [sh.add(y, p) for p, (_, _, y) in zip(prods, items)]


def select(party: Party, b: AShare, x: AShare, y: AShare) -> AShare:
    """[b ? x : y] (see :func:`select_many`)."""
    return select_many(party, [(b, x, y)])[0]


@protocol("equal")
def equal(party: Party, x: AShare, y: AShare) -> AShare:
    """[1{x == y}] = 1 - 1{x < y} - 1{y < x}: both comparisons in one 8-round pass."""
    lt, gt = less_than_many(party, [(x, y), (y, x)])
    return bit_not(party, sh.add(lt, gt))


@protocol("max")
def max_along(party: Party, x: AShare, dim: int = -1, keepdim: bool = True) -> AShare:
    """Maximum along ``dim`` by a tree: ceil(log2 n) levels of one comparison pass and one
    selection round each (9 rounds per level)."""
    dim = dim % len(x.shape)
    cur = x
    n = cur.shape[dim]
    if n == 0:
        raise ValueError("max over an empty dimension")
    while n > 1:
        h = n // 2
        lo = cur.map(lambda t, h=h: t.narrow(dim, 0, h))
        hi = cur.map(lambda t, h=h: t.narrow(dim, h, h))
        (lt,) = less_than_many(party, [(lo, hi)])
        (best,) = select_many(party, [(lt, hi, lo)])
        if n % 2:
            best = sh.cat([best, cur.map(lambda t, h=h: t.narrow(dim, 2 * h, 1))], dim)
        cur, n = best, best.shape[dim]
    return cur if keepdim else cur.map(lambda t: t.squeeze(dim))


@protocol("frexp")
def frexp(party: Party, x: AShare, exponent_fn: Callable[[int], float],
          extra_bits: int = scale.FREXP_EXTRA_BITS) -> tuple[AShare, AShare]:
    """For x > 0 at scale f: x = m * 2^e with m in [0.5, 1); returns ([m], [exponent_fn(e)]).

    Bit decomposition (8 rounds), one-hot of the highest set bit (6), opening the one-hot
    bits masked by daBits (1), then m = x * 2^-e (one product with its exact truncation
    fused: 2). 17 rounds. Domain:
    2^-f <= x < 2^(f + extra_bits) (3.8e-6 to 6.7e7 for f = 18); outside it (x <= 0
    included) both results are 0, which cannot be detected without opening x.
    exponent_fn values are clamped to the fixed-point range.
    """
    f = party.fp.frac_bits
    positions = scale.frexp_positions(f, extra_bits)
    (x,) = to_scale(party, [x])
    if x.frac_bits < f:
        x = sh.lift(x, f)
    dabits = DaBits(party, torch.Size((*x.shape, positions)))
    word = bit_decompose(party, x, dabits)
    onehot = highest_bit_onehot(party, word)
    j = torch.arange(positions, device=x.device)
    onehot_bits = onehot.map(lambda t: (t.unsqueeze(-1) >> j) & 1)
    opened = open_bits_xor(party, onehot_bits.a ^ dabits.binary.a)
    b = bits_to_arith(party, opened, dabits)

    inv_pow = scale.frexp_inverse_powers(f, extra_bits, x.device)
    inv = AShare((b.a * inv_pow).sum(-1), (b.b * inv_pow).sum(-1), party.id, f + extra_bits)
    factor_ring = scale.frexp_factors(party.fp, exponent_fn, extra_bits, x.device)
    factor = AShare((b.a * factor_ring).sum(-1), (b.b * factor_ring).sum(-1), party.id, f)
    (m,) = mul_many(party, [(x, inv)])
    return m, factor
