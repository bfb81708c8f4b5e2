"""Binary-share protocols: AND, arithmetic-to-binary, MSB and bit injection.

Bits are packed: a binary share is a tensor of 64-bit words and AND/XOR act on all 64
bit positions at once, so a parallel-prefix adder costs one AND layer per level for the
whole word.

Arithmetic to binary. One party holds two of the three arithmetic components and adds
them, so x = u + v is a sum of two words: u known to that party, v to the other two.
The generate bits u & v come from one padded message and one swap between the other two
parties (2 rounds, :func:`_generate_propagate`; ABY3's carry-save layer and resharing
AND took the same two rounds and twice the bytes), then a Kogge-Stone adder takes one
round per level (shifts 1, 2, 4, 8, 16, 32).

MSB with arithmetic output in 8 rounds. The carry into bit 63 needs the levels up to
shift 32; the last level's single AND is not reshared but folded into an opening of
b xor r, where r is a random bit held both as a binary and as an arithmetic sharing
(a "daBit"). Then [b] = c + [r] - 2c[r] with c = b xor r public. The daBit's arithmetic
form is made in the same two rounds as the generate bits, so 2 (generate) + 5 (levels
1..16) + 1 (last level and opening) = 8 rounds, 102 bytes per element over the three
parties (150 with the carry-save layer and two resharing products for the daBit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from secure.mpc.party import Party
from secure.mpc.shares import AShare, BShare
from secure.profile.profiler import protocol

KOGGE_STONE_SHIFTS = (1, 2, 4, 8, 16, 32)


def and_local(party: Party, x: BShare, y: BShare) -> torch.Tensor:
    """z_i of x & y: this party's part of a 3-out-of-3 XOR sharing, masked by a zero share."""
    z = (x.a & y.a) ^ (x.a & y.b) ^ (x.b & y.a)
    return z ^ party.keys.zero_share_xor(z.shape, z.device)


def reshare_parts(party: Party, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Send each part to party i-1 and receive party i+1's: one round."""
    return party.exchange({party.prev: list(parts)}, [party.next])[party.next]


@protocol("and")
def and_many(party: Party, pairs: Sequence[tuple[BShare, BShare]]) -> list[BShare]:
    """[x & y] for each pair, one round in all."""
    parts = [and_local(party, x, y) for x, y in pairs]
    got = reshare_parts(party, parts)
    return [BShare(z, zn, party.id) for z, zn in zip(parts, got)]


class DaBits:
    """Random bits r as a binary sharing (free: r = r_0 xor r_1 xor r_2, r_j = F(k_j) & 1)
    and, once :func:`_generate_propagate` has run (in its two rounds), as an arithmetic one.
    """

    def __init__(self, party: Party, shape: torch.Size) -> None:
        self.party = party
        ra, rb = party.keys.draw(shape, party.device)
        self.binary = BShare(ra & 1, rb & 1, party.id)
        self.arith: AShare | None = None


def _component(party: Party, ra: torch.Tensor, rb: torch.Tensor, j: int) -> torch.Tensor | None:
    """This party's copy of r_j (bit 0 of F(k_j)) if it holds component j, else None."""
    if party.id == j:
        return ra & 1
    if (party.id + 1) % 3 == j:
        return rb & 1
    return None


def a2b_role(party: Party) -> int:
    """This party's role in the next arithmetic-to-binary step: 0 (S, party ``rounds % 3``),
    1 (N, after it) or 2 (P, before it). The roles rotate with the round counter."""
    return (party.id - party.rounds % 3) % 3


def a2b_word(role: int, x: AShare) -> torch.Tensor:
    """This party's word of x = u + v for the A2B step: S holds the components x_S, x_N
    and adds them (``u = x_S + x_N``); N and P hold ``v = x_P`` (N as its second
    component, P as its first)."""
    return x.a + x.b if role == 0 else x.b if role == 1 else x.a


def _generate_propagate(party: Party, word: torch.Tensor, dabits: DaBits,
                        width: int = 64) -> tuple[BShare, BShare]:
    """Generate and propagate bits of x = v + u (2 rounds, 48 bytes per element over the
    three parties at 64 bits, 36 at 32), advancing ``dabits`` to arithmetic form in the
    same two rounds. ``word`` is this party's :func:`a2b_word` (u on S, v on N and P),
    taken in the role :func:`a2b_role` gives now.

    Roles rotate with the round counter: S (party ``rounds % 3``), N after it, P before
    it. S holds the components x_S, x_N and adds them, ``u = x_S + x_N``; ``v = x_P`` is
    held by N and P. With m a pad S shares with P:

    * round 1: S sends ``mu = u xor m`` to N. Then u is shared as (m, mu, 0) (m on S and
      P, mu on S and N), v as (0, 0, v), so ``p = u xor v`` is local, and
      ``g = u & v = (mu & v) xor (m & v)``: N's and P's parts;
    * round 2: N and P swap their parts masked by pads each shares with S, which makes
      g a replicated sharing (q with N, q' with P, and ``g xor q xor q'`` on N and P).

    The daBit rides along: S knows r_S and r_N, so ``a = r_S xor r_N``, and
    ``r = a + r_P - 2 a r_P`` with r_P on N and P. S sends ``a + m2`` to N in round 1
    (m2 shared with P); N's ``(a + m2)(1 - 2 r_P) + r_P`` and P's ``-m2 (1 - 2 r_P)`` sum
    to r, made replicated by the same swap in round 2. What each party sees: N gets
    values padded by S's pads with P, P gets N's padded by S's pads with N, S gets
    nothing. The carry-save layer and the two resharing products this replaces cost
    96 bytes. With ``width`` < 64 only the low ``width`` bits of g and p are used after
    this step, so the binary words travel in the narrow integer type (mu and the two
    parts of g: 12 bytes fewer per element at 32 bits, 18 at 16). Returns (g, p) with
    g = u & v and p = u xor v (bits above ``width`` then meaningless).
    """
    rotation = party.rounds % 3
    role = a2b_role(party)  # 0: S, 1: N, 2: P
    s_id, n_id, p_id = rotation, (rotation + 1) % 3, (rotation + 2) % 3
    n, device = word.numel(), word.device
    r_bit_a, r_bit_b = dabits.binary.a, dabits.binary.b
    wire = _wire(width)
    if role == 0:  # S: holds (x_S, x_N) and the pads with P (with_prev) and N (with_next)
        pad_m, pad_m2 = _split_words(party.keys.with_prev.words(2 * n, device), 2)
        mu = word ^ pad_m
        a_bit = r_bit_a ^ r_bit_b
        party.exchange({n_id: [wire(mu), a_bit + pad_m2]}, [])
        q_p, q2_p = _split_words(party.keys.with_prev.words(2 * n, device), 2)
        q_n, q2_n = _split_words(party.keys.with_next.words(2 * n, device), 2)
        party.exchange({}, [])
        dabits.arith = AShare(q2_p, q2_n, party.id, 0)
        return BShare(q_p, q_n, party.id), BShare(pad_m, mu, party.id)
    if role == 1:  # N: holds (x_N, x_P = v); r_P is its second bit
        (mu, alpha) = party.exchange({}, [s_id])[s_id]
        mu = mu.to(torch.int64)
        v, r_p = word, r_bit_b
        g_part = mu & v
        r_part = alpha * (1 - 2 * r_p) + r_p
        q_n, q2_n = _split_words(party.keys.with_prev.words(2 * n, device), 2)
        got = party.exchange({p_id: [wire(g_part ^ q_n), r_part - q2_n]}, [p_id])[p_id]
        g_p = g_part ^ q_n ^ got[0].to(torch.int64)
        dabits.arith = AShare(q2_n, r_part - q2_n + got[1], party.id, 0)
        return BShare(q_n, g_p, party.id), BShare(mu, v, party.id)
    # P: holds (x_P = v, x_S); r_P is its first bit; shares the pads of S with P (with_next)
    party.exchange({}, [])
    pad_m, pad_m2 = _split_words(party.keys.with_next.words(2 * n, device), 2)
    v, r_p = word, r_bit_a
    g_part = pad_m & v
    r_part = -pad_m2 * (1 - 2 * r_p)
    q_p, q2_p = _split_words(party.keys.with_next.words(2 * n, device), 2)
    got = party.exchange({n_id: [wire(g_part ^ q_p), r_part - q2_p]}, [n_id])[n_id]
    g_p = g_part ^ q_p ^ got[0].to(torch.int64)
    dabits.arith = AShare(r_part - q2_p + got[1], q2_p, party.id, 0)
    return BShare(g_p, q_p, party.id), BShare(v, pad_m, party.id)


def _wire(width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Words whose low ``width`` bits alone matter, cast to the narrowest type that holds
    them for the wire (the cast keeps the low bits; the high bits it brings back on the
    other side are never read)."""
    dtype = _WIRE_DTYPES[max(8, 1 << (max(width, 1) - 1).bit_length())] if width < 64 else None
    return (lambda t: t) if dtype is None else (lambda t: t.to(dtype))


def _split_words(words: torch.Tensor, parts: int) -> list[torch.Tensor]:
    n = words.numel() // parts
    return [words[k * n:(k + 1) * n] for k in range(parts)]


def _kogge_stone(party: Party, g: BShare, p: BShare) -> BShare:
    """All carries: after levels with shifts 1..32, bit j of g is the carry out of bit j."""
    for k in KOGGE_STONE_SHIFTS:
        new_g, new_p = and_many(party, [(p, g.shift_left(k)), (p, p.shift_left(k))])
        g, p = g ^ new_g, new_p
    return g


_COMPACT_STEPS = ((1, 0x3333333333333333), (2, 0x0F0F0F0F0F0F0F0F), (4, 0x00FF00FF00FF00FF),
                  (8, 0x0000FFFF0000FFFF), (16, 0x00000000FFFFFFFF))
_EVEN_BITS = 0x5555555555555555
_ODD_BITS = -0x5555555555555556  # 0xAAAAAAAAAAAAAAAA as a signed 64-bit value


def _even_bits(t: torch.Tensor, word_bits: int = 64) -> torch.Tensor:
    """Bits 0, 2, 4, ... of the low ``word_bits`` bits moved to bits 0, 1, 2, ...

    XOR-linear, so it acts on each share component separately.
    """
    t = t & _EVEN_BITS  # a fresh tensor, so the steps may work in place (a third of the time)
    for k, mask in _COMPACT_STEPS:
        if 2 * k >= word_bits + 1:
            break
        t.bitwise_xor_(t >> k).bitwise_and_(mask)
    return t


_WIRE_DTYPES = {64: torch.int64, 32: torch.int32, 16: torch.int16, 8: torch.uint8}


def _and_narrow(party: Party, x: BShare, y: BShare, width: int) -> BShare:
    """[x & y] for words of ``width`` valid low bits, sent in the narrowest integer type."""
    part = and_local(party, x, y)
    mask = -1 if width == 64 else (1 << width) - 1
    part = part & mask
    (got,) = reshare_parts(party, [_wire(width)(part)])
    return BShare(part, got.to(torch.int64) & mask, party.id)


def _carry_into_msb(party: Party, g: BShare, p: BShare, width: int = 64) -> tuple[BShare, torch.Tensor]:
    """Carry into bit ``width - 1`` by a binary tree over bit positions (``log2(width) - 1``
    AND rounds: 5 for 64 bits, 4 for 32).

    Positions 0..62 move up by one and position 0 gets the identity (g, p) = (0, 1), so
    the group generate of all 64 positions is the carry into bit 63. Each level combines
    odd (hi) with even (lo) positions: (g_hi ^ p_hi & g_lo, p_hi & p_lo), both ANDs in
    one word. The first level works in place on full words (p_hi & g_lo on even bits,
    p_hi & p_lo on odd bits); then g and p are compacted into one word g | p << w and
    every level halves w (64, 32, 16, 8 and 4 bits on the wire).
    Returns g of the last pair (bits 0 = lo, 1 = hi) and this party's part of the final
    p_hi & g_lo, to be opened by the caller.
    """
    g = g.shift_left(1)
    p = p.shift_left(1).xor_public(1, party.id)
    if width < 64:  # positions 0 .. width - 1 only; g | p << width starts the packed tree
        low = (1 << width) - 1
        word = g.and_public(low) ^ p.and_public(low).map(lambda t: t << width)
        return _carry_tree(party, word, width)
    left = p.map(lambda t: ((t >> 1) & _EVEN_BITS) ^ (t & _ODD_BITS))
    right = BShare(g.a & _EVEN_BITS, g.b & _EVEN_BITS, party.id) ^ p.map(lambda t: (t << 1) & _ODD_BITS)
    both = _and_narrow(party, left, right, 64)
    g = g.map(lambda t: (t >> 1) & _EVEN_BITS) ^ both.and_public(_EVEN_BITS)
    p = both.map(lambda t: (t >> 1) & _EVEN_BITS)
    word = g.map(_even_bits) ^ p.map(lambda t: _even_bits(t) << 32)
    return _carry_tree(party, word, 32)


def _carry_tree(party: Party, word: BShare, width: int) -> tuple[BShare, torch.Tensor]:
    """The levels of :func:`_carry_into_msb` from a word holding g of ``width`` positions in
    its low bits and their p above them, down to the last pair."""
    while width > 2:
        half = width // 2
        low = (1 << half) - 1
        lo = word.map(lambda t, w=width: _even_bits(t, 2 * w))  # g_lo | p_lo << half
        hi = word.map(lambda t, w=width: _even_bits(t >> 1, 2 * w))  # g_hi | p_hi << half
        p_hi = hi.map(lambda t, h=half, m=low: (t >> h) & m)
        both = _and_narrow(party, p_hi ^ p_hi.shift_left(half), lo, width)
        g_new = hi.and_public(low) ^ both.and_public(low)
        word = g_new ^ both.map(lambda t, h=half, m=low: ((t >> h) & m) << h)
        width = half
    # width 2: bits 0, 1 hold g_lo, g_hi and bits 2, 3 hold p_lo, p_hi
    g_final = word.and_public(3)
    last = and_local(party, word.map(lambda t: (t >> 3) & 1), word.and_public(1))
    return g_final, last


def open_bits_xor(party: Party, bits: torch.Tensor) -> torch.Tensor:
    """Open a 3-out-of-3 XOR sharing of 0/1 values (masked by a zero share): one round.

    Each party sends its part to both others, one byte per bit.
    """
    zero = party.keys.zero_share_xor(bits.shape, bits.device) & 1
    mine = ((bits & 1) ^ zero).to(torch.uint8)
    got = party.exchange({party.prev: [mine], party.next: [mine]}, [party.prev, party.next])
    return (mine ^ got[party.prev][0] ^ got[party.next][0]).to(torch.int64)


def bits_to_arith(party: Party, opened: torch.Tensor, dabits: DaBits) -> AShare:
    """[b] from the public c = b xor r and the daBit r: c + [r] - 2c[r] (local)."""
    r = dabits.arith
    assert r is not None, "daBits must be advanced to arithmetic form first"
    return _xor_public_bit(party, r, opened)


def _flatten(party: Party, xs: Sequence[AShare], what: str) -> AShare:
    for x in xs:
        party.check_owner(x.owner, what)
    return AShare(torch.cat([x.a.reshape(-1) for x in xs]),
                  torch.cat([x.b.reshape(-1) for x in xs]), party.id, 0)


def _unflatten(flat: AShare, shapes: Sequence[torch.Size]) -> list[AShare]:
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat.map(lambda t, o=offset, n=n, shp=shape: t[o:o + n].reshape(shp)))
        offset += n
    return out


@protocol("msb")
def msb_many(party: Party, xs: Sequence[AShare], width: int = 64) -> list[AShare]:
    """[MSB(x)] for each x as an arithmetic 0/1 share (scale 0). 8 rounds for all of them:
    generate bits and daBits (2), the packed carry tree (5), the last AND fused with the
    opening of msb xor r (1). 102 bytes per element over the three parties (34 each).

    ``width`` < 64 (16 or 32): the sign bit of x mod 2^width, which is x's sign when the
    caller guarantees ``|x| < 2^(width - 1)`` in ring units (reduction mod 2^width is a
    ring homomorphism, so the shares need no change): the carry tree starts at ``width``
    positions, one round fewer per halving (7 rounds at 32 bits, 6 at 16), and the
    binary words travel narrow: 66 bytes per element over the three parties at 32 bits,
    48 at 16."""
    if not xs:
        return []
    _check_width(width)
    flat = _flatten(party, xs, "msb")
    bits = _msb_of_words(party, a2b_word(a2b_role(party), flat), width)
    return _unflatten(bits, [x.shape for x in xs])


@protocol("msb")
def msb_of_differences(party: Party, pairs: Sequence[tuple[AShare, AShare, int | torch.Tensor]],
                       width: int, shift: int) -> list[AShare]:
    """``[1{X - Y < c}]`` for each ``(x, y, c)`` (broadcasting), where X and Y are x and y
    read to a resolution of ``2^shift`` ring units: comparisons with a tolerance, in the
    rounds and bytes of :func:`msb_many` at ``width`` bits (16 or 32). ``c`` is a public
    integer in units of ``2^shift``.

    Math: with x = u + v the A2B split (:func:`a2b_word`; u on S, v on N and P), every
    party shifts its own word, ``X = (u >> shift) + (v >> shift)``, which is
    ``floor(x / 2^shift) - carry`` with the carry out of the low ``shift`` bits in {0, 1},
    mod 2^(64 - shift) (the split's wrap mod 2^64 vanishes mod 2^width while
    ``shift <= 64 - width``). So X lies in ``[x / 2^shift - 2, x / 2^shift]``, and
    ``MSB((X - Y - c) mod 2^width)`` is ``1{X - Y < c}`` whenever
    ``|X - Y - c| < 2^(width - 1)``: the caller guarantees
    ``|x - y| / 2^shift + |c| + 2 < 2^(width - 1)``.

    Within one call every x has one X (one split, one role S for the whole pass), so the
    comparisons of one call are exact comparisons of the values X: consistent (a total
    preorder), which a tournament needs for exactly one winner per group
    (:func:`secure.mpc.compare.max_along`). Each of them reads ``x < y + c 2^shift`` right
    when the two sides differ by more than ``2^(shift + 1)`` ring units."""
    if not pairs:
        return []
    _check_width(width)
    if not 0 <= shift <= 64 - width:
        raise ValueError(f"msb_of_differences: shift must be in [0, {64 - width}] at {width} bits, got {shift}")
    role = a2b_role(party)
    words, shapes = [], []
    for x, y, c in pairs:
        party.check_owner(x.owner, "msb")
        party.check_owner(y.owner, "msb")
        d = (a2b_word(role, x) >> shift) - (a2b_word(role, y) >> shift)
        if role == 0:
            d = d - c
        d = d.expand(torch.broadcast_shapes(d.shape, torch.as_tensor(c).shape))
        shapes.append(d.shape)
        words.append(d.reshape(-1))
    return _unflatten(_msb_of_words(party, torch.cat(words), width), shapes)


def _check_width(width: int) -> None:
    if width not in (16, 32, 64):
        raise ValueError(f"msb width must be 16, 32 or 64, got {width}")


def _msb_of_words(party: Party, word: torch.Tensor, width: int) -> AShare:
    """MSB of ``(u + v) mod 2^width`` from this party's A2B word, as flat 0/1 shares."""
    dabits = DaBits(party, word.shape)
    g, p = _generate_propagate(party, word, dabits, width)
    g_pair, last_and = _carry_into_msb(party, g, p, width)
    msb_part = ((p.a >> (width - 1)) ^ (g_pair.a >> 1) ^ last_and) & 1
    opened = open_bits_xor(party, msb_part ^ dabits.binary.a)
    return bits_to_arith(party, opened, dabits)


@protocol("bit_decompose")
def bit_decompose(party: Party, x: AShare, dabits: DaBits) -> BShare:
    """Binary sharing of the 64-bit word x (all carries: 8 rounds)."""
    flat = _flatten(party, [x], "bit_decompose")
    g, p = _generate_propagate(party, a2b_word(a2b_role(party), flat), dabits)
    carries = _kogge_stone(party, g, p)
    return (p ^ carries.shift_left(1)).map(lambda t: t.reshape(x.shape))


def _xor_public_bit(party: Party, r: AShare, c: torch.Tensor) -> AShare:
    """[c xor r] = c + [r] - 2c[r] for a public bit tensor c and shared bit r."""
    one_minus_2c = 1 - 2 * c
    a = r.a * one_minus_2c + (c if party.id == 0 else 0)
    b = r.b * one_minus_2c + (c if party.id == 2 else 0)
    return AShare(a, b, party.id, 0)
