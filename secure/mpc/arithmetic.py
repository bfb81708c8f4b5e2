"""Arithmetic protocols on replicated shares: open, multiply, matmul, truncate.

Multiplication (ABY3): with x = sum x_j and y = sum y_j, party i computes
    z_i = x_i*y_i + x_i*y_{i+1} + x_{i+1}*y_i + alpha_i
(alpha a zero sharing from the PRF keys), so z_0 + z_1 + z_2 = x*y, and sends z_i to
party i-1: one round, one ring element per output element per party. Matmul is the
same with two local matmuls, x_i @ (y_i + y_{i+1}) + x_{i+1} @ y_i.

Truncation (ABY3 Share Truncation, SecureML's local trick), written for roles 0, 1, 2
(which rotate over the parties from call to call): x = x_0 + u with u = x_1 + x_2 known
to party 1. Parties 0 and 2 compute y_0 = x_0 >> d, party 1 computes u' = -((-u) >> d)
and sends y_1 = u' - y_2 to party 0, where y_2 = F(k_2) is drawn by parties 1 and 2 from
their common key. One round, one message. The result is
x / 2^d + e with e in {-1, 0, 1} ulp, except with probability |x| / 2^64 (x in ring
units at its pre-truncation scale: the signed sum x_0 + u overflows when the uniform
x_0 falls within |x| of -2^63), when it is off by about 2^(64 - d). For f = 18 and a
product of magnitude v at scale 2^36 that is v / 2^28 per element (3.7e-9 for v = 1,
3.7e-7 for v = 100); the rate is checked by a test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from secure.mpc.matmul import ring_matmul
from secure.mpc.party import Party
from secure.mpc.shares import AShare
from secure.runtime.profiler import protocol


def _owned(party: Party, what: str, *shares: AShare) -> None:
    for s in shares:
        party.check_owner(s.owner, what)


@protocol("open")
def open_many(party: Party, xs: Sequence[AShare]) -> list[torch.Tensor]:
    """Reveal ring values to all three parties: party i sends x_{i+1} to party i-1. One round."""
    _owned(party, "open", *xs)
    got = party.exchange({party.prev: [x.b for x in xs]}, [party.next])[party.next]
    return [x.a + x.b + missing for x, missing in zip(xs, got)]


def open_value(party: Party, x: AShare) -> torch.Tensor:
    """Reveal one share as a ring tensor (see :func:`open_many`)."""
    return open_many(party, [x])[0]


def open_float(party: Party, x: AShare) -> torch.Tensor:
    """Reveal a fixed-point share and decode it to float64."""
    return party.fp.decode(open_value(party, x), x.frac_bits)


def local_product(party: Party, x: AShare, y: AShare, matmul: bool = False) -> torch.Tensor:
    """z_i of x*y (or x@y): this party's part of a 3-out-of-3 sharing, masked by a zero share."""
    _owned(party, "multiply", x, y)
    if matmul:
        z = ring_matmul(x.a, y.a + y.b) + ring_matmul(x.b, y.a)
    else:
        z = x.a * (y.a + y.b) + x.b * y.a
    return z + party.keys.zero_share(z.shape, z.device)


def reshare(party: Party, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """From 3-out-of-3 parts z_i to replicated pairs: send z_i to party i-1. One round."""
    got = party.exchange({party.prev: list(parts)}, [party.next])[party.next]
    return got


@protocol("mul")
def mul_many_exact(party: Party, pairs: Sequence[tuple[AShare, AShare]],
                   matmul: bool = False) -> list[AShare]:
    """[x*y] (or [x@y]) for each pair, at scale fx + fy (no truncation). One round in all."""
    parts = [local_product(party, x, y, matmul) for x, y in pairs]
    nxt = reshare(party, parts)
    return [AShare(z, zn, party.id, x.frac_bits + y.frac_bits)
            for z, zn, (x, y) in zip(parts, nxt, pairs)]


@protocol("truncate")
def truncate_many(party: Party, xs: Sequence[AShare], bits: Sequence[int]) -> list[AShare]:
    """[x / 2^d] for each x with its d (probabilistic, see module docstring). One round.

    The roles rotate with the round counter (equal on all parties), so that the one
    party that sends is a different one each time and the traffic stays balanced.
    """
    _owned(party, "truncate", *xs)
    if any(d < 0 for d in bits):
        raise ValueError(f"truncate: negative shift in {list(bits)}")
    rotation = party.rounds % 3
    role = (party.id - rotation) % 3  # the party in role 1 sends to the party in role 0
    sender, receiver = (1 + rotation) % 3, rotation
    if role == 1:
        out, sent = [], []
        for x, d in zip(xs, bits):
            u_trunc = -((-(x.a + x.b)) >> d)
            y2 = party.keys.with_next.words(x.a.numel(), x.device).reshape(x.shape)
            sent.append(u_trunc - y2)
            out.append(AShare(sent[-1], y2, party.id, x.frac_bits - d))
        party.exchange({receiver: sent}, [])
        return out
    if role == 0:
        got = party.exchange({}, [sender])[sender]
        return [AShare(x.a >> d, y1, party.id, x.frac_bits - d) for x, d, y1 in zip(xs, bits, got)]
    party.exchange({}, [])
    out = []
    for x, d in zip(xs, bits):
        y2 = party.keys.with_prev.words(x.a.numel(), x.device).reshape(x.shape)
        out.append(AShare(y2, x.b >> d, party.id, x.frac_bits - d))
    return out


EXACT_OFFSET_BITS = 62  # x + 2^62 lies in [0, 2^63) for |x| < 2^62


@protocol("truncate_exact")
def truncate_exact_many(party: Party, xs: Sequence[AShare], bits: Sequence[int]) -> list[AShare]:
    """[floor(x / 2^d)] (+-1 ulp) for |x| < 2^62 ring units, with no failure mode. Two rounds.

    Dalskov, Escudero, Keller, "Secure Evaluation of Quantized Neural Networks" (2020),
    sec. 3.2.2, for replicated sharing; roles A, B, D rotate over the parties. A and B hold
    x as a 2-out-of-2 sharing (A: x_A + x_B, B: x_D). D knows r = r_A + r_B (r_A from the
    key of A and D, r_B from the key of B and D) and deals shares of its top bit r_63 and
    of its bits d..62, rc; A and B open c = x + 2^62 + r between them (round 1; D sends its
    part in the same round). With x' = x + 2^62 in [0, 2^63):
        floor(x' / 2^d) = c[d..62] - rc + 2^(63-d) (c_63 xor r_63)   (+-1 from the low bits),
    and 2^(62-d) is subtracted again. The 2-out-of-2 result becomes replicated with one more
    exchange between A and B (round 2), masked by PRF values that D shares with each.
    A and B only ever see values masked by the half of r they do not know; D receives
    nothing.
    """
    _owned(party, "truncate", *xs)
    if not xs:
        return []
    if any(not 0 <= d < 62 for d in bits):
        raise ValueError(f"truncate: shifts must be in [0, 62), got {list(bits)}")
    sizes = [x.a.numel() for x in xs]
    n = sum(sizes)
    device = xs[0].device
    if n == 0:
        return [AShare(x.a, x.b, party.id, x.frac_bits - d) for x, d in zip(xs, bits)]
    shift = torch.cat([torch.full((s,), d, dtype=torch.int64, device=device) for s, d in zip(sizes, bits)])
    rotation = party.rounds % 3
    role = "ABD"[(party.id - rotation) % 3]
    a_party, b_party = rotation, (rotation + 1) % 3
    top = 63 - shift

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1)

    if role == "D":
        with_a = party.keys.with_next.words(4 * n, device)  # key shared with A (the next party)
        with_b = party.keys.with_prev.words(2 * n, device)  # key shared with B
        r_a, rb_a, rc_a, comp_a = with_a.split(n)
        r_b, comp_d = with_b.split(n)
        r = r_a + r_b
        rb = (r >> 63) & 1
        rc = ((r << 1) >> (shift + 1)) & ((1 << (63 - shift)) - 1)
        party.exchange({b_party: [rb - rb_a, rc - rc_a]}, [])
        party.exchange({}, [])
        pairs = (comp_d, comp_a)
    elif role == "A":
        with_d = party.keys.with_prev.words(4 * n, device)
        r_a, rb_a, rc_a, comp_a = with_d.split(n)
        s_a = torch.cat([flat(x.a + x.b) for x in xs]) + (1 << EXACT_OFFSET_BITS)
        mine = s_a + r_a
        got = party.exchange({b_party: [mine]}, [b_party])[b_party][0]
        c = mine + got
        c_top = (c >> 63) & 1
        c_hat = ((c << 1) >> (shift + 1)) & ((1 << (63 - shift)) - 1)
        b_share = rb_a + c_top - 2 * c_top * rb_a
        y = c_hat - rc_a + (b_share << top) - (1 << (EXACT_OFFSET_BITS - shift))
        sent = y - comp_a
        other = party.exchange({b_party: [sent]}, [b_party])[b_party][0]
        pairs = (comp_a, sent + other)
    else:  # role B
        with_d = party.keys.with_next.words(2 * n, device)
        r_b, comp_d = with_d.split(n)
        s_b = torch.cat([flat(x.b) for x in xs])
        mine = s_b + r_b
        got = party.exchange({a_party: [mine]}, [a_party, (rotation + 2) % 3])
        c = mine + got[a_party][0]
        rb_b, rc_b = got[(rotation + 2) % 3]
        c_top = (c >> 63) & 1
        b_share = rb_b - 2 * c_top * rb_b
        y = -rc_b + (b_share << top)
        sent = y - comp_d
        other = party.exchange({a_party: [sent]}, [a_party])[a_party][0]
        pairs = (sent + other, comp_d)
    out, offset = [], 0
    for x, size, d in zip(xs, sizes, bits):
        first, second = (t[offset:offset + size].reshape(x.shape) for t in pairs)
        out.append(AShare(first, second, party.id, x.frac_bits - d))
        offset += size
    return out


def to_scale(party: Party, xs: Sequence[AShare]) -> list[AShare]:
    """Truncate every share whose scale exceeds the party's f down to f: the exact
    truncation (two rounds) unless the fixed-point format asks for the probabilistic one."""
    f = party.fp.frac_bits
    idx = [k for k, x in enumerate(xs) if x.frac_bits > f]
    if not idx:
        return list(xs)
    truncate = truncate_exact_many if party.fp.truncation == "exact" else truncate_many
    done = truncate(party, [xs[k] for k in idx], [xs[k].frac_bits - f for k in idx])
    out = list(xs)
    for k, t in zip(idx, done):
        out[k] = t
    return out


def mul_many(party: Party, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
    """Fixed-point [x*y] for each pair: one multiplication round, then one truncation round
    for the products whose scale exceeds f (a product with a 0/1 bit or an integer needs none)."""
    return to_scale(party, mul_many_exact(party, pairs))


def mul(party: Party, x: AShare, y: AShare) -> AShare:
    """Fixed-point [x*y] with broadcasting (see :func:`mul_many`)."""
    return mul_many(party, [(x, y)])[0]


def matmul(party: Party, x: AShare, y: AShare) -> AShare:
    """Fixed-point [x @ y] (batched, broadcasting): one round plus one truncation round."""
    return to_scale(party, mul_many_exact(party, [(x, y)], matmul=True))[0]
