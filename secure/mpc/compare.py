"""Comparison family on arithmetic shares, all built on one batched MSB.

x < y is MSB(x - y), correct whenever |x - y| < 2^63 in ring units (for fixed point
with f = 18: |x - y| < 3.5e13). Every function takes lists where batching helps, so
all comparisons of one step cost a single 8-round MSB pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from secure.mpc import scale
from secure.mpc import shares as sh
from secure.mpc.arithmetic import mul_many, mul_untruncated_many, open_many
from secure.mpc.boolean import msb_many, msb_of_differences
from secure.mpc.matmul import ring_matmul
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


def less_than_public(party: Party, x: AShare, thresholds: Sequence[float],
                     magnitude: float | None = None) -> list[AShare]:
    """[1{x < c}] for each public real c, one MSB pass for all thresholds.

    An integral x (a bit, a count) compared with a fractional c is lifted to scale f first
    (``secure.mpc.scale.comparison_scale``); each c is encoded at x's scale. ``magnitude``,
    a bound on |x| that the structure guarantees (:mod:`secure.graph.bounds`), lets the pass
    look at the low bits only (:func:`comparison_width`): 7 rounds and 66 bytes per
    comparison over the three parties at 32 bits, instead of 8 and 102.
    """
    s = scale.comparison_scale(x.frac_bits, thresholds, party.fp.frac_bits)
    if s != x.frac_bits:
        x = sh.lift(x, s)
    party.fp.encode(torch.tensor(list(thresholds), dtype=torch.float64))  # range check
    diffs = [sh.add_ring_public(x, -scale.encode_public(c, s, x.device), party.id) for c in thresholds]
    return msb_many(party, diffs, comparison_width(magnitude, thresholds, s))


def comparison_width(magnitude: float | None, thresholds: Sequence[float], s: int) -> int:
    """The narrowest MSB width (16, 32 or 64 bits) at which the sign of ``x - c`` is read
    right for every ``|x| <= magnitude`` and threshold c, both at scale s: reduction mod
    2^w keeps the sign while ``|x - c| < 2^(w-1)`` in ring units (2 units cover the
    encodings' rounding). 64 without a magnitude."""
    if magnitude is None:
        return 64
    if not math.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"a comparison's magnitude bound must be finite and >= 0, got {magnitude}")
    return msb_width((magnitude + max((abs(float(c)) for c in thresholds), default=0.0)) * 2.0**s + 2)


def msb_width(reach: float) -> int:
    """The narrowest MSB width (16, 32 or 64) whose sign bit is a difference's sign for
    every difference below ``reach`` in ring units: ``reach <= 2^(w-1)``."""
    return next((w for w in (16, 32) if reach <= 2.0 ** (w - 1)), 64)


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


MAX_GROUP: int = 32
"""The largest group of candidates compared all against all in one level of :func:`max_along`."""

ROUND_WORTH_BYTES: int = 352 * 1024
"""Bytes per party that one round is worth when a protocol may trade one for the other. On
a 40 ms / 100 Mbps WAN link a round's latency carries 500 kB, but every byte also costs
the parties compute: about 33 ms per MB per party on this project's 2-core reference
machine (MiniLM at 32 tokens: 120 MB per party in about 4 s on loopback), so a round is
worth 40 ms / (80 + 33) ns per byte ~ 352 kB. (A 1 ms / 5 Gbps LAN round carries 625 kB of
link time but is worth only about 30 kB of compute; the WAN, where rounds decide, sets
the price.) :func:`max_plan` picks the maximum's group sizes, and whether the softmax clip
rides in its last level, by this price."""

MSB_ROUNDS: dict[int, int] = {64: 8, 32: 7, 16: 6}
"""Rounds of one MSB pass by width (:func:`secure.mpc.boolean.msb_many`)."""
MSB_BYTES: dict[int, int] = {64: 34, 32: 22, 16: 16}
"""Bytes per element and party of one MSB pass by width (102, 66 and 48 over the three)."""
_PRODUCT_BYTES = 8  # per element and party: an untruncated product's reshare

MAX_TOLERANCE: float = 2.0**-10
"""The most a bounded maximum's comparisons may misread per tournament level, in real
units (:func:`max_reading`): each level's winner is within it of its group's maximum."""


def max_reading(magnitude: float | None, gap: float | None, s: int) -> tuple[int, int]:
    """(MSB width, shift) for the comparisons of a maximum over values with
    ``|x| <= magnitude`` at scale s (and, with ``gap``, its clip ``x - max < gap``):
    the narrowest width (16 or 32; 64 without a magnitude) at which some shift keeps
    every difference readable, ``(2 magnitude + |gap|) 2^(s - shift) + 3 < 2^(width - 1)``
    (:func:`secure.mpc.boolean.msb_of_differences`), with the smallest such shift whose
    tolerance ``2^(shift + 1 - s)`` stays within :data:`MAX_TOLERANCE`. Shift 0 reads
    exactly."""
    if magnitude is None:
        return 64, 0
    if not math.isfinite(magnitude) or magnitude < 0:
        raise ValueError(f"a maximum's magnitude bound must be finite and >= 0, got {magnitude}")
    reach = (2.0 * magnitude + abs(gap or 0.0)) * 2.0**s
    for width in (16, 32):
        room = 2.0 ** (width - 1) - 3
        shift = max(0, math.ceil(math.log2(reach / room))) if reach > room else 0
        if 2.0 ** (shift + 1 - s) <= MAX_TOLERANCE:
            return width, shift
    return 64, 0


@functools.cache
def max_plan(rows: int, n: int, with_gap: bool, group: int = MAX_GROUP,
             width: int = 64) -> tuple[tuple[int, ...], bool]:
    """(group size of each level, whether the clip's bits ride in the last level) for the
    maximum over rows of n candidates (``rows`` per item of the batch dimension), its
    comparisons ``width`` bits wide, minimising ``rounds * ROUND_WORTH_BYTES + bytes per
    party``.

    A level with groups of g costs ``MSB_ROUNDS[width] + ceil(log2 g)`` rounds (one
    comparison pass, then the product trees) and, per group, ``g (g - 1) / 2`` comparisons
    and ``g (g - 1)`` products; the clip's bits cost, per element of the row and finalist,
    one comparison and one product in the last level, or a pass of their own (one
    comparison per element). For 12 x 32 x 32 scores at 64 bits: groups 8, 4 with the
    clip fused (21 rounds, about 4.2 MB; 4, 4, 2 took 29 rounds and 2.1 MB); for
    12 x 128 x 128: 2, 2, 4, 8 and the clip in a pass of its own (47 rounds); for one
    decode row per head, one group of up to 32."""
    row_length = n
    pass_rounds, comparison = MSB_ROUNDS[width], MSB_BYTES[width]

    @functools.cache
    def best(m: int) -> tuple[float, tuple[int, ...], bool]:
        if m == 1:
            return 0, (), False
        options = []
        for g in range(2, min(group, m) + 1):
            k = -(-m // g)
            level = (pass_rounds + math.ceil(math.log2(g))) * ROUND_WORTH_BYTES \
                + rows * k * g * (g - 1) * (comparison / 2 + _PRODUCT_BYTES)
            if k == 1:
                fused = rows * row_length * (g * comparison + (g - 1) * _PRODUCT_BYTES)
                alone = pass_rounds * ROUND_WORTH_BYTES + rows * row_length * comparison
                if not with_gap:
                    options.append((level, (g,), False))
                else:
                    options.append((level + min(fused, alone), (g,), fused <= alone))
            else:
                rest, plan, fuse = best(k)
                options.append((level + rest, (g, *plan), fuse))
        return min(options, key=lambda o: (o[0], len(o[1])))

    if n == 1:
        return (), False
    _, plan, fuse = best(n)
    return plan, fuse


@protocol("max")
def max_along(party: Party, x: AShare, dim: int = -1, keepdim: bool = True, group: int = MAX_GROUP,
              magnitude: float | None = None) -> AShare:
    """Maximum along ``dim`` by a tournament of all-against-all groups.

    Each level splits the row into groups of g candidates (the last candidate repeated to
    fill the last group) and, in one comparison pass (8 rounds), compares every pair
    i < j of a group: ``c_ij = 1{x_i < x_j}``. Candidate i wins its group iff every earlier
    candidate is strictly smaller and no later one is larger:
    ``w_i = prod_{j<i} c_ji * prod_{j>i} (1 - c_ij)``, exactly one winner per group (the
    first maximal one), so the group's maximum is ``sum_i w_i x_i``; the g - 1 bits and
    x_i are multiplied by a product tree, ``ceil(log2 g)`` rounds with no truncation (bits
    are integers). A level costs ``8 + ceil(log2 g)`` rounds and divides n by g (two binary
    levels took 18 rounds where a level of 4 takes 10). The group sizes (at most ``group``)
    come from :func:`max_plan`, which weighs the rounds saved against the bytes by
    :data:`ROUND_WORTH_BYTES`, per item of the leading (batch) dimension: a query's
    12 x 32 x 32 attention scores go 8, 4 (21 rounds; 45 as a binary tree).

    ``magnitude``, a bound on |x| that the structure guarantees
    (:mod:`secure.graph.bounds`), lets each pass read the candidates to a resolution of
    ``2^shift`` ring units at 32 (or 16) bits (:func:`max_reading`,
    :func:`~secure.mpc.boolean.msb_of_differences`): one round (two) fewer per level and
    66 (48) bytes per comparison over the three parties instead of 102. A pass compares
    the candidates' readings exactly, so each group still has exactly one winner, and it
    is within ``2^(shift + 1)`` ring units of the group's maximum: the result is a
    candidate within ``levels * 2^(shift + 1 - s)`` of the row's maximum (at most
    :data:`MAX_TOLERANCE` a level; 2^-13 = 1.2e-4 for a MiniLM query's scores, read at shift 4).
    """
    return _tournament(party, x, dim, keepdim, group, None, magnitude)[0]


@protocol("max")
def max_and_below(party: Party, x: AShare, gap: float, dim: int = -1, keepdim: bool = True,
                  group: int = MAX_GROUP, magnitude: float | None = None) -> tuple[AShare, AShare]:
    """(max along ``dim``, ``[1{x - max < gap}]``) for a public ``gap`` < 0, in the rounds of
    :func:`max_along` alone where :func:`max_plan` finds it worth the bytes.

    The bits ride in the last level's comparison pass: with that level's candidates
    ``c_1 .. c_g`` (the maximum is one of them and none exceeds it),
    ``x_i - max < gap`` iff ``x_i - c_j < gap`` for some j, i.e.
    ``1 - prod_j (1 - 1{x_i - c_j < gap})``, a product tree no deeper than the winner's.
    Bytes: g comparisons and g - 1 products per element of the row where a pass of their
    own (8 more rounds) takes one comparison. With ``magnitude`` (see :func:`max_along`)
    the clip is read to the same resolution as the maximum.
    """
    out, below = _tournament(party, x, dim, keepdim, group, gap, magnitude)
    assert below is not None
    return out, below


def _tournament(party: Party, x: AShare, dim: int, keepdim: bool, group: int, gap: float | None,
                magnitude: float | None) -> tuple[AShare, AShare | None]:
    if group < 2:
        raise ValueError(f"max_along: group must be >= 2, got {group}")
    dim = dim % len(x.shape)
    n = x.shape[dim]
    if n == 0:
        raise ValueError("max over an empty dimension")
    if gap is not None and x.frac_bits < party.fp.frac_bits:
        x = sh.lift(x, party.fp.frac_bits)  # the gap is a real
    reading = _Reading.of(magnitude, gap, x.frac_bits)
    row = x.map(lambda t: t.movedim(dim, -1))
    # the plan follows one item of the leading (batch) dimension, so that a query in a batched
    # execution costs what it costs alone and its bytes do not tell that it was batched
    items = x.shape[0] if len(x.shape) > 1 and dim != 0 else 1
    plan, fuse_gap = max_plan(row.a.numel() // items // n, n, gap is not None, group, reading.width)
    cur, below = row, None
    for level, g in enumerate(plan):
        groups = -(-n // g)
        pad = groups * g - n
        if pad:
            cur = cur.map(lambda t, pad=pad: torch.cat([t, t[..., -1:].expand(*t.shape[:-1], pad)], -1))
        cur = cur.map(lambda t, g=g, k=groups: t.reshape(*t.shape[:-1], k, g))
        last = level == len(plan) - 1 and fuse_gap
        cur, below = _group_max(party, cur, g, reading, (row, gap) if last else None)  # type: ignore[arg-type]
        n = groups
    if gap is not None and not fuse_gap:  # a pass of its own: x - max < gap
        below = reading.less_than(party, [(row, cur, gap)])[0]
    out = cur.map(lambda t: t.movedim(-1, dim))
    if below is not None:
        below = below.map(lambda t: t.movedim(-1, dim))
    return (out if keepdim else out.map(lambda t: t.squeeze(dim))), below


@dataclass(frozen=True)
class _Reading:
    """How a maximum's passes read ``x - y < c``: exactly at 64 bits (shift 0), or from
    the candidates read to ``2^shift`` ring units at a narrower width (:func:`max_reading`)."""

    width: int
    shift: int

    @classmethod
    def of(cls, magnitude: float | None, gap: float | None, s: int) -> _Reading:
        return cls(*max_reading(magnitude, gap, s))

    def less_than(self, party: Party, triples: Sequence[tuple[AShare, AShare, float]]) -> list[AShare]:
        """``[1{x - y < c}]`` for each ``(x, y, c)`` (broadcasting; c a public real, x and y
        at one scale s >= f when c is not 0), all in one pass."""
        if self.width == 64:
            return msb_many(party, [_minus_public(party, sh.sub(x, y), c) if c else sh.sub(x, y)
                                    for x, y, c in triples])
        return msb_of_differences(party, [(x, y, _reading_units(c, x.frac_bits, self.shift))
                                          for x, y, c in triples], self.width, self.shift)


def _reading_units(c: float, s: int, shift: int) -> int:
    """A public real c in units of ``2^shift`` ring units at scale s."""
    return round(c * 2.0 ** (s - shift))


def _minus_public(party: Party, x: AShare, c: float) -> AShare:
    """x - c for a public real c encoded at x's scale (x at scale >= f)."""
    return sh.add_ring_public(x, -scale.encode_public(c, x.frac_bits, x.device), party.id)


def _group_max(party: Party, x: AShare, g: int, reading: _Reading, gap_of: tuple[AShare, float] | None
               ) -> tuple[AShare, AShare | None]:
    """[..., k, g] -> [..., k]: the maximum of each group of g (see :func:`max_along`); with
    ``gap_of = (row, gap)`` (k = 1) also ``1{row_i - max < gap}`` (:func:`max_and_below`)."""
    pairs = [(i, j) for i in range(g) for j in range(i + 1, g)]
    lo = torch.tensor([i for i, _ in pairs], device=x.device)
    hi = torch.tensor([j for _, j in pairs], device=x.device)
    triples = [(x.map(lambda t: t.index_select(-1, lo)), x.map(lambda t: t.index_select(-1, hi)), 0.0)]
    if gap_of is not None:
        row, gap = gap_of
        # [..., n, g]: row_i - c_j < gap, the candidates broadcast over the row
        triples.append((row.map(lambda t: t.unsqueeze(-1)), x, gap))
    bits = reading.less_than(party, triples)
    # candidate i's factors, over the other candidates j in order: c_ji for j < i (x_j < x_i:
    # i beats the earlier j), 1 - c_ij for j > i (x_i >= x_j: i beats the later j)
    index = {pair: p for p, pair in enumerate(pairs)}
    others = [[j for j in range(g) if j != i] for i in range(g)]
    which = torch.tensor([[index[(min(i, j), max(i, j))] for j in row] for i, row in enumerate(others)],
                         device=x.device)
    later = torch.tensor([[int(j > i) for j in row] for i, row in enumerate(others)], device=x.device)
    chosen = bits[0].map(lambda t: t.index_select(-1, which.reshape(-1)).reshape(*t.shape[:-1], g, g - 1))
    signed = chosen.map(lambda t: t * (1 - 2 * later))
    factors = sh.add_ring_public(signed, later, party.id)  # [..., k, g, g - 1]
    trees = [[factors.map(lambda t, q=q: t[..., q]) for q in range(g - 1)] + [x]]
    if gap_of is not None:
        trees.append([bit_not(party, bits[1].map(lambda t, j=j: t[..., j])) for j in range(g)])
    winners, *rest = _product_trees(party, trees)
    best = sh.sum_share(winners, -1)
    return best, (bit_not(party, rest[0]) if rest else None)


def _product_trees(party: Party, trees: list[list[AShare]]) -> list[AShare]:
    """The product of each list of factors (no truncation: all but one are bits), every
    list reduced by pairs in the same rounds: ceil(log2 of the longest) rounds."""
    while any(len(t) > 1 for t in trees):
        jobs = [(ti, k) for ti, t in enumerate(trees) for k in range(len(t) // 2)]
        prods = mul_untruncated_many(party, [(trees[ti][2 * k], trees[ti][2 * k + 1]) for ti, k in jobs])
        new: list[list[AShare]] = [[] for _ in trees]
        for (ti, _), p in zip(jobs, prods):
            new[ti].append(p)
        for ti, t in enumerate(trees):
            if len(t) % 2:
                new[ti].append(t[-1])
        trees = new
    return [t[0] for t in trees]


def frexp(party: Party, x: AShare, exponent_fn: Callable[[int], float],
          extra_bits: int = scale.FREXP_EXTRA_BITS,
          bounds: tuple[float, float] | None = None) -> tuple[AShare, AShare]:
    """For x > 0: x = m * 2^e with m in [0.5, 1); returns ([m], [exponent_fn(e)]).

    x is taken at its own scale s (lifted to f when below f, never truncated first, so a
    value left at a product's scale costs no truncation here). With X its ring value and
    [first, last] the window of :func:`secure.mpc.scale.frexp_window`, one comparison
    pass gives the bits ``b_k = 1{X < 2^k}`` for k = first .. last + 1 (8 rounds); they
    are monotone in k, so the one-hot of the highest set bit is ``b_(k+1) - b_k`` and
    both ``2^-e`` (as the ring value 2^(last - k)) and ``exponent_fn(e)`` (e = k + 1 - s)
    are public-coefficient sums of the bits: local. Then m = X * 2^-e is one product
    with its exact truncation fused (2 rounds). 10 rounds in all (the bit decomposition
    it replaces took 17). Bytes: one comparison per threshold and element (about 45 bytes
    per party each): ``last - first + 2`` of them, 45 over the whole domain at scale f, a
    handful with ``bounds``.

    Domain: without ``bounds`` 2^-f <= x < 2^(f + extra_bits) (3.8e-6 to 8.8e12 for f = 18;
    at scales above f, X < 2^61); with ``bounds = (lo, hi)`` only [lo, hi] (the
    caller guarantees it, e.g. a softmax row sum in [1, n]). Outside the window (x <= 0
    included) both results are 0, which cannot be detected without opening x.
    exponent_fn values are clamped to the fixed-point range.
    """
    m, factor, _ = frexp_segments(party, x, exponent_fn, extra_bits=extra_bits, bounds=bounds)
    return m, factor


@protocol("frexp")
def frexp_segments(party: Party, x: AShare, exponent_fn: Callable[[int], float], segments: int = 1,
                   tables: Sequence[Callable[[int], float]] = (),
                   times: AShare | Callable[[], AShare] | None = None,
                   extra_bits: int = scale.FREXP_EXTRA_BITS, bounds: tuple[float, float] | None = None,
                   mantissa_tables: Sequence[Callable[[int], float]] = (),
                   factor_tables: Sequence[Callable[[int], float]] = (),
                   times_table: Callable[[int], float] | None = None) -> tuple[AShare, AShare, list[AShare]]:
    """:func:`frexp` on finer pieces: with x = m 2^e (m in [0.5, 1)) and j the segment of m
    (``2^(j / segments) <= 2m < 2^((j + 1) / segments)``), returns
    ``([m], [times * exponent_fn(e)] (or [exponent_fn(e)] when times is None),
    [table(j) for table in tables])``.

    The comparison pass takes ``segments`` thresholds per octave
    (:func:`secure.mpc.scale.frexp_intervals`), so any public function of (e, j) is a local
    sum of the one-hot of the piece; ``times * exponent_fn(e)`` is formed in the same product
    pass as m. Rounds as :func:`frexp` (10); comparisons ``segments`` times as many. Domain
    and zero outside it as :func:`frexp`; table values are encoded at f. With ``bounds`` the
    window ends at 2^(last + 1), so every difference X - T_i is below it in magnitude and the
    comparisons look at the low 16 or 32 bits only (:func:`msb_many`'s ``width``): 9 rounds
    for a softmax row sum (X < 2^25 at f = 18). ``times`` may be a
    function computing it, run :meth:`~secure.mpc.party.Party.concurrently` with the
    comparison pass (attention's ``e @ v``, ready for the product pass at no round of its own).

    ``mantissa_tables`` append ``[m * table(j)]`` to the tables' values, formed in the same
    product pass as m: X times the one-hot sum of ``table(j) 2^-e``, held with f extra bits
    (:func:`secure.mpc.scale.frexp_mantissa_products`), which fits only a narrow window:
    they need ``bounds``. ``factor_tables`` append ``[exponent_fn(e) table(j)]`` and
    ``times_table`` makes the factor ``exponent_fn(e) times_table(j)``: both local one-hot
    sums, like the tables (:func:`secure.mpc.scale.frexp_piece_factors`).
    """
    f = party.fp.frac_bits
    if x.frac_bits < f:
        x = sh.lift(x, f)
    first, last = scale.frexp_window(f, x.frac_bits, extra_bits, bounds)
    pieces = scale.frexp_pieces(party.fp, exponent_fn, x.frac_bits, first, last, segments, tables, mantissa_tables,
                                x.device, factor_tables, times_table)
    thresholds = pieces.thresholds
    ring_thresholds = torch.tensor(thresholds, dtype=torch.int64, device=x.device).view(-1, *[1] * x.a.dim())
    stacked = x.map(lambda t: t.unsqueeze(0).expand(len(thresholds), *t.shape))
    diffs = [sh.add_ring_public(stacked, -ring_thresholds, party.id)]
    # with bounds, |X - T_i| < 2^(last + 1): the sign of the low bits is the sign
    width = msb_width(2.0 ** (last + 1)) if bounds is not None else 64
    if callable(times):
        (below,), times = party.concurrently([lambda: msb_many(party, diffs, width), times])
    else:
        (below,) = msb_many(party, diffs, width)  # 1{X < T_i}, stacked on a new first dim
    inv, factor, *values = _onehot_sums(party, below, pieces.values, pieces.frac_bits)
    local = len(tables) + len(factor_tables)
    pairs = [(x, inv)] + [(x, v) for v in values[local:]] + ([(times, factor)] if times is not None else [])
    m, *products = mul_many(party, pairs)
    values[local:] = products[:len(mantissa_tables)]
    return m, (products[-1] if times is not None else factor), values


def _onehot_sums(party: Party, below: AShare, tables: Sequence[torch.Tensor],
                 frac_bits: Sequence[int]) -> list[AShare]:
    """For each table v (ring values, one per piece): ``sum_k (b_(k+1) - b_k) v[k]`` for
    monotone bits b stacked on the first dim of ``below`` (the value of the piece each
    element falls in), as the local sum ``sum_j b_j (v[j-1] - v[j])``; all tables in one
    ring product with the bits."""
    zero = tables[0].new_zeros(1)
    coeffs = torch.stack([torch.cat([zero, v]) - torch.cat([v, zero]) for v in tables])  # [tables, bits]
    shape = below.shape[1:]
    a = ring_matmul(coeffs, below.a.reshape(below.shape[0], -1))
    b = ring_matmul(coeffs, below.b.reshape(below.shape[0], -1))
    return [AShare(a[t].reshape(shape), b[t].reshape(shape), party.id, fb) for t, fb in enumerate(frac_bits)]
