"""Binary-share protocols: AND, arithmetic-to-binary, MSB and bit injection.

Bits are packed: a binary share is a tensor of 64-bit words and AND/XOR act on all 64
bit positions at once, so a parallel-prefix adder costs one AND layer per level for the
whole word.

Arithmetic to binary (ABY3). The three arithmetic components x_0, x_1, x_2 are each a
trivial binary sharing (component j = x_j, others 0), so x = x_0 + x_1 + x_2 is a sum of
three binary-shared words. A carry-save layer (sum = a^b^c, carry = maj(a, b, c): one
AND round) leaves two addends, added by a Kogge-Stone adder: one AND round for the
generate bits, then one round per level (shifts 1, 2, 4, 8, 16, 32).

MSB with arithmetic output in 8 rounds. The carry into bit 63 needs the levels up to
shift 32; the last level's single AND is not reshared but folded into an opening of
b xor r, where r is a random bit held both as a binary and as an arithmetic sharing
(a "daBit"). Then [b] = c + [r] - 2c[r] with c = b xor r public. The daBit costs two
multiplications that run in the same rounds as the adder's first two layers, so
1 (carry-save) + 1 (generate) + 5 (levels 1..16) + 1 (last level and opening) = 8 rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from secure.mpc.arithmetic import local_product
from secure.mpc.party import Party
from secure.mpc.shares import AShare, BShare, trivial_component
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


def component_words(party: Party, x: AShare) -> list[BShare]:
    """The trivial binary sharings of x's three arithmetic components x_0, x_1, x_2."""
    out = []
    for j in range(3):
        val = x.a if party.id == j else (x.b if (party.id + 1) % 3 == j else None)
        a, b = trivial_component(val, j, party.id, x.shape, x.device)
        out.append(BShare(a, b, party.id))
    return out


class DaBits:
    """Random bits r as a binary sharing and (after two multiplication rounds) arithmetic.

    r = r_0 xor r_1 xor r_2 with r_j = F(k_j) & 1; arithmetic r via
    a = r_0 + r_1 - 2 r_0 r_1 and r = a + r_2 - 2 a r_2.
    """

    def __init__(self, party: Party, shape: torch.Size) -> None:
        self.party = party
        ra, rb = party.keys.draw(shape, party.device)
        self.binary = BShare(ra & 1, rb & 1, party.id)
        self._parts = []
        for j in range(3):
            known = _component(party, ra, rb, j)
            pair = trivial_component(known, j, party.id, shape, party.device)
            self._parts.append(AShare(*pair, party.id, 0))
        self.arith: AShare | None = None
        self._a: AShare | None = None

    def step1_part(self) -> torch.Tensor:
        return local_product(self.party, self._parts[0], self._parts[1])

    def step1_finish(self, part: torch.Tensor, received: torch.Tensor) -> None:
        prod = AShare(part, received, self.party.id, 0)
        r0, r1 = self._parts[0], self._parts[1]
        self._a = AShare(r0.a + r1.a - 2 * prod.a, r0.b + r1.b - 2 * prod.b, self.party.id, 0)

    def step2_part(self) -> torch.Tensor:
        assert self._a is not None
        return local_product(self.party, self._a, self._parts[2])

    def step2_finish(self, part: torch.Tensor, received: torch.Tensor) -> None:
        assert self._a is not None
        a, r2 = self._a, self._parts[2]
        self.arith = AShare(a.a + r2.a - 2 * part, a.b + r2.b - 2 * received, self.party.id, 0)


def _component(party: Party, ra: torch.Tensor, rb: torch.Tensor, j: int) -> torch.Tensor | None:
    """This party's copy of r_j (bit 0 of F(k_j)) if it holds component j, else None."""
    if party.id == j:
        return ra & 1
    if (party.id + 1) % 3 == j:
        return rb & 1
    return None


def _carry_save(party: Party, x: AShare, extra: list[torch.Tensor]
                ) -> tuple[BShare, BShare, list[torch.Tensor]]:
    """Carry-save layer over x's components: returns (sum, carry<<1) and the extra parts'
    counterparts, all in one round."""
    c0, c1, c2 = component_words(party, x)
    s = c0 ^ c1 ^ c2
    maj_part = and_local(party, c0 ^ c2, c1 ^ c2)
    got = reshare_parts(party, [maj_part, *extra])
    maj = BShare(maj_part, got[0], party.id) ^ c2
    return s, maj.shift_left(1), got[1:]


def _generate_propagate(party: Party, flat: AShare, dabits: DaBits
                        ) -> tuple[BShare, BShare]:
    """Carry-save layer and generate bits over the three components of ``flat`` (2 rounds),
    advancing ``dabits`` to arithmetic form in the same two rounds.

    Returns (g, p) with g = s & c and p = s ^ c, where x = s + c (c = carry << 1).
    """
    d1 = dabits.step1_part()
    s, c, (d1_next,) = _carry_save(party, flat, [d1])
    dabits.step1_finish(d1, d1_next)

    g_part = and_local(party, s, c)
    d2 = dabits.step2_part()
    g_next, d2_next = reshare_parts(party, [g_part, d2])
    dabits.step2_finish(d2, d2_next)
    return BShare(g_part, g_next, party.id), s ^ c


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
    t = t & _EVEN_BITS
    for k, mask in _COMPACT_STEPS:
        if 2 * k >= word_bits + 1:
            break
        t = (t ^ (t >> k)) & mask
    return t


_WIRE_DTYPES = {64: torch.int64, 32: torch.int32, 16: torch.int16, 8: torch.uint8}


def _and_narrow(party: Party, x: BShare, y: BShare, width: int) -> BShare:
    """[x & y] for words of ``width`` valid low bits, sent in the narrowest integer type."""
    part = and_local(party, x, y)
    mask = -1 if width == 64 else (1 << width) - 1
    part = part & mask
    wire = _WIRE_DTYPES[max(8, 1 << (max(width, 1) - 1).bit_length())]
    (got,) = reshare_parts(party, [part.to(wire)])
    return BShare(part, got.to(torch.int64) & mask, party.id)


def _carry_into_msb(party: Party, g: BShare, p: BShare) -> tuple[BShare, torch.Tensor]:
    """Carry into bit 63 by a binary tree over bit positions (5 AND rounds).

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
    left = p.map(lambda t: ((t >> 1) & _EVEN_BITS) ^ (t & _ODD_BITS))
    right = BShare(g.a & _EVEN_BITS, g.b & _EVEN_BITS, party.id) ^ p.map(lambda t: (t << 1) & _ODD_BITS)
    both = _and_narrow(party, left, right, 64)
    g = g.map(lambda t: (t >> 1) & _EVEN_BITS) ^ both.and_public(_EVEN_BITS)
    p = both.map(lambda t: (t >> 1) & _EVEN_BITS)
    width = 32
    word = g.map(_even_bits) ^ p.map(lambda t: _even_bits(t) << 32)
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


def _unflatten(flat: AShare, xs: Sequence[AShare]) -> list[AShare]:
    out, offset = [], 0
    for x in xs:
        n = x.a.numel()
        out.append(flat.map(lambda t, o=offset, n=n, shp=x.shape: t[o:o + n].reshape(shp)))
        offset += n
    return out


@protocol("msb")
def msb_many(party: Party, xs: Sequence[AShare]) -> list[AShare]:
    """[MSB(x)] for each x as an arithmetic 0/1 share (scale 0). 8 rounds for all of them:
    carry-save (1), generate (1), the packed carry tree (5), the last AND fused with the
    opening of msb xor r (1). About 50 bytes per element per party."""
    if not xs:
        return []
    flat = _flatten(party, xs, "msb")
    dabits = DaBits(party, flat.shape)
    g, p = _generate_propagate(party, flat, dabits)
    g_pair, last_and = _carry_into_msb(party, g, p)
    msb_part = ((p.a >> 63) ^ (g_pair.a >> 1) ^ last_and) & 1
    opened = open_bits_xor(party, msb_part ^ dabits.binary.a)
    return _unflatten(bits_to_arith(party, opened, dabits), xs)


@protocol("bit_decompose")
def bit_decompose(party: Party, x: AShare, dabits: DaBits) -> BShare:
    """Binary sharing of the 64-bit word x (all carries: 8 rounds)."""
    flat = _flatten(party, [x], "bit_decompose")
    g, p = _generate_propagate(party, flat, dabits)
    carries = _kogge_stone(party, g, p)
    return (p ^ carries.shift_left(1)).map(lambda t: t.reshape(x.shape))


@protocol("highest_bit")
def highest_bit_onehot(party: Party, word: BShare) -> BShare:
    """One-hot word of the highest set bit: OR-smear right (6 AND rounds), then y ^ (y >> 1)."""
    y = word
    for k in KOGGE_STONE_SHIFTS:
        (both,) = and_many(party, [(y, y.shift_right(k))])
        y = y ^ y.shift_right(k) ^ both
    return y ^ y.map(lambda t: (t >> 1) & 0x7FFFFFFFFFFFFFFF)


def _xor_public_bit(party: Party, r: AShare, c: torch.Tensor) -> AShare:
    """[c xor r] = c + [r] - 2c[r] for a public bit tensor c and shared bit r."""
    one_minus_2c = 1 - 2 * c
    a = r.a * one_minus_2c + (c if party.id == 0 else 0)
    b = r.b * one_minus_2c + (c if party.id == 2 else 0)
    return AShare(a, b, party.id, 0)
