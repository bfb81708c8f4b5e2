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


def to_scale(party: Party, xs: Sequence[AShare]) -> list[AShare]:
    """Truncate every share whose scale exceeds the party's f down to f (one round if any)."""
    f = party.fp.frac_bits
    idx = [k for k, x in enumerate(xs) if x.frac_bits > f]
    if not idx:
        return list(xs)
    done = truncate_many(party, [xs[k] for k in idx], [xs[k].frac_bits - f for k in idx])
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
