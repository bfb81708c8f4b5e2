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
from secure.mpc.randomness import csprng_words
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
    sec. 3.2.2, for replicated sharing (see :func:`_exact_truncation`): A and B hold x as a
    2-out-of-2 sharing, A: x_A + x_B and B: x_D.
    """
    _owned(party, "truncate", *xs)
    role, _, _ = _roles(party)
    if role == "A":
        addends = [x.a + x.b for x in xs]
    elif role == "B":
        addends = [x.b for x in xs]
    else:
        addends = None
    return _exact_truncation(party, addends, xs, bits, from_products=False)


def _roles(party: Party) -> tuple[str, int, int]:
    """This party's role in a truncation (A, B or D, rotating with the round counter so
    traffic stays balanced) and the ids of the parties in roles A and B."""
    rotation = party.rounds % 3
    return "ABD"[(party.id - rotation) % 3], rotation, (rotation + 1) % 3


def _exact_truncation(party: Party, addends: list[torch.Tensor] | None, like: Sequence[AShare],
                      bits: Sequence[int], from_products: bool, extra: dict[int, list[torch.Tensor]] | None = None,
                      extra_from: Sequence[int] = ()) -> list[AShare]:
    """The exact truncation of x = sum of the parties' addends, replicated in the result.

    Roles A, B, D: D knows r = r_A + r_B (+ r_D) (r_A from the key of A and D, r_B from the
    key of B and D, r_D its own) and deals shares of r's top bit r_63 and of its bits
    d..62, rc. A and B learn c = x + 2^62 + r (round 1: A and B swap their masked addends;
    D sends its dealt shares and, for a 3-out-of-3 x such as a raw product, its own masked
    addend). With x' = x + 2^62 in [0, 2^63):
        floor(x' / 2^d) = c[d..62] - rc + 2^(63-d) (c_63 xor r_63)   (+-1 from the low bits),
    and 2^(62-d) is subtracted again. Round 2 turns the 2-out-of-2 result into replicated
    shares with one exchange between A and B, masked by PRF values D shares with each.
    A and B only see values masked by parts of r they do not know; D receives nothing.

    ``extra`` (messages to send in round 1, by destination) and ``extra_from`` (parties to
    receive extra round-1 messages from) let a caller share the round; the received extra
    tensors are returned through ``extra`` (key: sender) after the call.
    """
    sizes = [x.a.numel() for x in like]
    n = sum(sizes)
    device = like[0].device if like else party.device
    if n == 0 and not extra and not extra_from:  # all parties see the same shapes: skip together
        return [AShare(x.a, x.b, party.id, x.frac_bits - d) for x, d in zip(like, bits)]
    role, a_party, b_party = _roles(party)
    d_party = (a_party + 2) % 3
    shift = torch.cat([torch.full((s,), d, dtype=torch.int64, device=device) for s, d in zip(sizes, bits)]) \
        if like else torch.empty(0, dtype=torch.int64, device=device)
    if any(not 0 <= d < 62 for d in bits):
        raise ValueError(f"truncate: shifts must be in [0, 62), got {list(bits)}")
    low = (1 << (63 - shift)) - 1
    send: dict[int, list[torch.Tensor]] = {k: list(v) for k, v in (extra or {}).items()}
    recv = set(extra_from)

    def flat(ts: list[torch.Tensor] | None) -> torch.Tensor:
        if not ts:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.cat([t.reshape(-1) for t in ts])

    if role == "D":
        with_a = party.keys.with_next.words(4 * n, device)  # key shared with A (the next party)
        with_b = party.keys.with_prev.words(2 * n, device)  # key shared with B
        r_a, rb_a, rc_a, comp_a = _split_words(with_a, 4, n)
        r_b, comp_d = _split_words(with_b, 2, n)
        r = r_a + r_b
        if from_products:
            r_d = csprng_words(n, device)
            r = r + r_d
            masked = flat(addends) + r_d
            send.setdefault(a_party, []).append(masked)
            send.setdefault(b_party, []).append(masked)
        rb = (r >> 63) & 1
        rc = ((r << 1) >> (shift + 1)) & low
        send.setdefault(b_party, []).extend([_narrow_bit_share(rb - rb_a, bits), rc - rc_a])
        got = party.exchange(send, sorted(recv))
        party.exchange({}, [])
        first, second = comp_d, comp_a
    else:
        key = party.keys.with_prev if role == "A" else party.keys.with_next  # the key shared with D
        if role == "A":
            r_own, rb_own, rc_own, comp_own = _split_words(key.words(4 * n, device), 4, n)
            mine = flat(addends) + (1 << EXACT_OFFSET_BITS) + r_own
            other = b_party
        else:
            r_own, comp_own = _split_words(key.words(2 * n, device), 2, n)
            mine = flat(addends) + r_own
            other = a_party
        send.setdefault(other, []).append(mine)
        recv |= {other} | ({d_party} if (from_products or role == "B") else set())
        got = party.exchange(send, sorted(recv))
        from_other = got[other]
        from_d = got.get(d_party, [])
        # the caller's extra messages come first in each list, ours are at the end
        ours_other = from_other[-1]
        ours_d = from_d[len(from_d) - ((1 if from_products else 0) + (2 if role == "B" else 0)):]
        c = mine + ours_other + (ours_d[0] if from_products else 0)
        c_top = (c >> 63) & 1
        if role == "A":
            c_hat = ((c << 1) >> (shift + 1)) & low
            b_share = rb_own + c_top - 2 * c_top * rb_own
            y = c_hat - rc_own + (b_share << (63 - shift)) - (1 << (EXACT_OFFSET_BITS - shift))
        else:
            rb_b, rc_b = ours_d[-2].to(torch.int64), ours_d[-1]
            b_share = rb_b - 2 * c_top * rb_b
            y = -rc_b + (b_share << (63 - shift))
        sent = y - comp_own
        back = party.exchange({other: [sent]}, [other])[other][0]
        if role == "A":
            first, second = comp_own, sent + back
        else:
            first, second = sent + back, comp_own
        if extra is not None:
            extra.clear()
            extra.update({k: v[:-1] if k == other else v[:len(v) - len(ours_d)] if k == d_party else v
                          for k, v in got.items()})
        return _split(party, first, second, like, bits)
    if extra is not None:
        extra.clear()
        extra.update(got)
    return _split(party, first, second, like, bits)


def _narrow_bit_share(share: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """B's share of r_63 enters only as ``share << (63 - d)`` mod 2^64, so its low d + 1
    bits are all B needs: with every d < 32 they travel as int32 (the low 32 bits, still
    uniform since A's part is a full PRF word), 4 bytes instead of 8 per element."""
    if not bits or max(bits) >= 31:
        return share
    return (((share + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)).to(torch.int32)


def _split_words(words: torch.Tensor, parts: int, n: int) -> list[torch.Tensor]:
    """``parts`` consecutive blocks of n words (empty blocks when n is 0)."""
    return [words[i * n:(i + 1) * n] for i in range(parts)]


def _split(party: Party, first: torch.Tensor, second: torch.Tensor, like: Sequence[AShare],
           bits: Sequence[int]) -> list[AShare]:
    out, offset = [], 0
    for x, d in zip(like, bits):
        size = x.a.numel()
        out.append(AShare(first[offset:offset + size].reshape(x.shape), second[offset:offset + size].reshape(x.shape),
                          party.id, x.frac_bits - d))
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


@protocol("mul_trunc")
def mul_trunc_many(party: Party, pairs: Sequence[tuple[AShare, AShare]], matmul: bool = False) -> list[AShare]:
    """Fixed-point [x*y] (or [x@y]) with the exact truncation fused into the product: two
    rounds in all instead of three.

    The 3-out-of-3 products z_i go straight into the truncation's first round (each party's
    own z_i is its addend; D masks its own with private randomness), so no separate reshare
    round is needed. Products that need no truncation (with a 0/1 bit or an integer) are
    reshared in that same first round.
    """
    parts = [local_product(party, x, y, matmul) for x, y in pairs]
    f = party.fp.frac_bits
    scales = [x.frac_bits + y.frac_bits for x, y in pairs]
    cut = [k for k, sc in enumerate(scales) if sc > f]
    keep = [k for k, sc in enumerate(scales) if sc <= f]
    extra = {party.prev: [parts[k] for k in keep]} if keep else {}
    like = [AShare(parts[k], parts[k], party.id, scales[k]) for k in cut]
    truncated = _exact_truncation(party, [parts[k] for k in cut], like, [scales[k] - f for k in cut],
                                  from_products=True, extra=extra, extra_from=[party.next] if keep else [])
    out: list[AShare | None] = [None] * len(pairs)
    for k, t in zip(cut, truncated):
        out[k] = t
    if keep:
        for k, got in zip(keep, extra[party.next]):
            out[k] = AShare(parts[k], got, party.id, scales[k])
    return [o for o in out if o is not None]


@protocol("sum_of_products")
def sum_of_products(party: Party, pairs: Sequence[tuple[AShare, AShare]]) -> AShare:
    """[sum_j x_j * y_j] (broadcasting): the 3-out-of-3 local products, each brought to the
    largest product scale S by a public shift, are summed locally, so the whole sum costs
    what one product does: one reshare (S <= f), or the exact truncation fused into it
    (two rounds, the dealt masks once for the sum instead of once per product).
    The value at scale S must stay below 2^62 in magnitude (exact truncation's range)."""
    if not pairs:
        raise ValueError("sum_of_products needs at least one pair")
    scales = [x.frac_bits + y.frac_bits for x, y in pairs]
    top = max(scales)
    total: torch.Tensor | None = None
    for (x, y), sc in zip(pairs, scales):
        part = local_product(party, x, y) << (top - sc)
        total = part if total is None else total + part
    assert total is not None
    f = party.fp.frac_bits
    if top > f and party.fp.truncation == "exact":
        like = [AShare(total, total, party.id, top)]
        return _exact_truncation(party, [total], like, [top - f], from_products=True)[0]
    got = reshare(party, [total])[0]
    return to_scale(party, [AShare(total, got, party.id, top)])[0]


def mul_many(party: Party, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
    """Fixed-point [x*y] for each pair. With exact truncation (the default) the product and
    its truncation take two rounds together; with probabilistic truncation one
    multiplication round plus one truncation round. A product with a 0/1 bit or an integer
    needs no truncation."""
    if party.fp.truncation == "exact" and any(x.frac_bits + y.frac_bits > party.fp.frac_bits for x, y in pairs):
        return mul_trunc_many(party, pairs)
    return to_scale(party, mul_many_exact(party, pairs))


def mul(party: Party, x: AShare, y: AShare) -> AShare:
    """Fixed-point [x*y] with broadcasting (see :func:`mul_many`)."""
    return mul_many(party, [(x, y)])[0]


def matmul(party: Party, x: AShare, y: AShare) -> AShare:
    """Fixed-point [x @ y] (batched, broadcasting): two rounds with the exact truncation."""
    if party.fp.truncation == "exact" and x.frac_bits + y.frac_bits > party.fp.frac_bits:
        return mul_trunc_many(party, [(x, y)], matmul=True)[0]
    return to_scale(party, mul_many_exact(party, [(x, y)], matmul=True))[0]
