"""Arithmetic protocols on replicated shares: open, multiply, matmul, truncate.

This module owns the products and truncations of arithmetic shares; the scale a product
is held at and when it is truncated come from ``secure.mpc.scale``. It imports only
``secure.mpc`` and the profiler, never the interpreter or the forms. Bytes below are
per element of the result, over the three parties together (a ring element is 8 bytes).

Open (:func:`open_many`): party i sends x_{i+1} to party i-1. One round, 24 bytes.

Untruncated product (ABY3, :func:`mul_untruncated_many`): with x = sum x_j and
y = sum y_j, party i computes
    z_i = x_i*y_i + x_i*y_{i+1} + x_{i+1}*y_i + alpha_i
(alpha a zero sharing from the PRF keys), so z_0 + z_1 + z_2 = x*y at scale fx + fy, and
sends z_i to party i-1 (:func:`reshare`). One round, 24 bytes. Matmul is the same with two
local matmuls, x_i @ (y_i + y_{i+1}) + x_{i+1} @ y_i.

Exact truncation (the default, :func:`truncate_exact_many`; Dalskov, Escudero, Keller
2020, sec. 3.2.2): floor(x / 2^d) within 1 ulp for |x| < 2^62 ring units, with no failure
mode. Two rounds. Roles A, B, D rotate with the round counter. :func:`_exact_truncation`
sets a call up; :func:`_dealer_half` is D's part (it deals B's shares of the mask's top
and middle bits, and receives nothing); :func:`_holder_half` is A's and B's (they swap
their masked addends in round 1 and their result parts in round 2). 44 bytes: A and B
send 16 each, D sends B 12 (the top-bit share travels as int32 while every d < 31;
48 bytes in all otherwise).

Fixed-point product (:func:`mul_many`, :func:`mul`, :func:`matmul`): with exact
truncation, products whose scale exceeds f go through :func:`mul_trunc_many`, where the
3-out-of-3 z_i enter the truncation's first round directly (D masks its own and sends it
to A and B): two rounds and 60 bytes for product and truncation together. Products with a
0/1 bit or an integer need no truncation: one round, 24 bytes (reshared in that same first
round when they come in one call with truncated ones). :func:`sum_of_products` sums the
local products before that, so a whole sum costs what one product does.

Probabilistic truncation (an option, ``FixedPoint(truncation="probabilistic")``,
:func:`truncate_many`; ABY3 Share Truncation, SecureML's local trick), written for roles
0, 1, 2 (which rotate over the parties from call to call): x = x_0 + u with u = x_1 + x_2
known to party 1. Parties 0 and 2 compute y_0 = x_0 >> d, party 1 computes
u' = -((-u) >> d) and sends y_1 = u' - y_2 to party 0, where y_2 = F(k_2) is drawn by
parties 1 and 2 from their common key. One round, one message of 8 bytes. The result is
x / 2^d + e with e in {-1, 0, 1} ulp, except with probability |x| / 2^64 (x in ring
units at its pre-truncation scale: the signed sum x_0 + u overflows when the uniform
x_0 falls within |x| of -2^63), when it is off by about 2^(64 - d). For f = 18 and a
product of magnitude v at scale 2^36 that is v / 2^28 per element (3.7e-9 for v = 1,
3.7e-7 for v = 100); the rate is checked by a test. With it, a fixed-point product is
one multiplication round plus one truncation round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from secure.mpc import scale
from secure.mpc.matmul import ring_matmul
from secure.mpc.party import Party
from secure.mpc.randomness import csprng_words
from secure.mpc.shares import AShare
from secure.profile.profiler import protocol


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
        # x_a y_a + x_a y_b + x_b y_a, with the smaller operand's pair summed: a linear layer's
        # activations, not its weight (a decode step's one row against a whole matrix)
        if x.a.numel() <= y.a.numel():
            z = ring_matmul(x.a + x.b, y.a) + ring_matmul(x.a, y.b)
        else:
            z = ring_matmul(x.a, y.a + y.b) + ring_matmul(x.b, y.a)
    else:
        z = x.a * (y.a + y.b) + x.b * y.a
    return z + party.keys.zero_share(z.shape, z.device)


def reshare(party: Party, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """From 3-out-of-3 parts z_i to replicated pairs: send z_i to party i-1. One round."""
    got = party.exchange({party.prev: list(parts)}, [party.next])[party.next]
    return got


@protocol("mul")
def mul_untruncated_many(party: Party, pairs: Sequence[tuple[AShare, AShare]],
                         matmul: bool = False) -> list[AShare]:
    """[x*y] (or [x@y]) for each pair, held at scale fx + fy (not truncated). One round in all."""
    parts = [local_product(party, x, y, matmul) for x, y in pairs]
    nxt = reshare(party, parts)
    return [AShare(z, zn, party.id, scale.product_scale(x.frac_bits, y.frac_bits))
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
    role = _roles(party).role
    addends = [x.a + x.b for x in xs] if role == "A" else [x.b for x in xs] if role == "B" else []
    truncated, _ = _exact_truncation(party, addends, xs, bits, from_products=False)
    return truncated


@dataclass(frozen=True)
class _Roles:
    """The roles of one exact truncation: this party's, and the ids of A, B and D."""

    role: str
    a: int
    b: int

    @property
    def d(self) -> int:
        return (self.a + 2) % 3


def _roles(party: Party) -> _Roles:
    """Roles A, B, D rotate with the round counter (equal on all parties), so that the
    traffic stays balanced; A is party ``rounds % 3``, B the next one, D the previous one."""
    rotation = party.rounds % 3
    return _Roles("ABD"[(party.id - rotation) % 3], rotation, (rotation + 1) % 3)


@dataclass(frozen=True)
class _Truncation:
    """What every role needs to know about one exact truncation of n elements."""

    roles: _Roles
    n: int
    shift: torch.Tensor  # d per element (int64, flat)
    bits: Sequence[int]  # d per truncated value
    from_products: bool  # x is 3-out-of-3 (raw products): D holds an addend too

    @property
    def device(self) -> torch.device:
        return self.shift.device


@dataclass(frozen=True)
class _Dealt:
    """D's round-1 message to A or B: its masked addend (3-out-of-3 inputs only, to both)
    and, to B only, B's shares of the mask's top bit r_63 and of its bits d..62."""

    masked_addend: torch.Tensor | None = None
    top_bit: torch.Tensor | None = None
    middle_bits: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.masked_addend, self.top_bit, self.middle_bits) if t is not None]

    @classmethod
    def read(cls, tensors: Sequence[torch.Tensor], from_products: bool, to_b: bool) -> _Dealt:
        it = iter(tensors)
        masked = next(it) if from_products else None
        top, middle = (next(it), next(it)) if to_b else (None, None)
        return cls(masked, top, middle)


def _exact_truncation(party: Party, addends: Sequence[torch.Tensor], like: Sequence[AShare], bits: Sequence[int],
                      from_products: bool, reshare_parts: Sequence[torch.Tensor] = ()
                      ) -> tuple[list[AShare], list[torch.Tensor]]:
    """The exact truncation of x = sum of the parties' addends, replicated in the result.

    Roles A, B, D: D knows r = r_A + r_B (+ r_D) (r_A from the key of A and D, r_B from the
    key of B and D, r_D its own) and deals B's shares of r's top bit r_63 and of its bits
    d..62, rc. A and B learn c = x + 2^62 + r (round 1: A and B swap their masked addends;
    D sends its dealt shares and, for a 3-out-of-3 x such as a raw product, its own masked
    addend). With x' = x + 2^62 in [0, 2^63):
        floor(x' / 2^d) = c[d..62] - rc + 2^(63-d) (c_63 xor r_63)   (+-1 from the low bits),
    and 2^(62-d) is subtracted again. Round 2 turns the 2-out-of-2 result into replicated
    shares with one exchange between A and B, masked by PRF values D shares with each.
    A and B only see values masked by parts of r they do not know; D receives nothing.

    ``addends`` are this party's (empty for D unless ``from_products``); ``like`` gives the
    shapes and scales of the values. ``reshare_parts`` (3-out-of-3 parts of products that
    need no truncation) are reshared in round 1 too: sent to the previous party, and the
    next party's parts returned beside the truncated shares.
    """
    sizes = [x.a.numel() for x in like]
    n = sum(sizes)
    if n == 0 and not reshare_parts:  # all parties see the same shapes: skip together
        return [AShare(x.a, x.b, party.id, x.frac_bits - d) for x, d in zip(like, bits)], []
    device = like[0].device if like else party.device
    shift = torch.cat([torch.full((s,), d, dtype=torch.int64, device=device) for s, d in zip(sizes, bits)]) \
        if like else torch.empty(0, dtype=torch.int64, device=device)
    if any(not 0 <= d < 62 for d in bits):
        raise ValueError(f"truncate: shifts must be in [0, 62), got {list(bits)}")
    job = _Truncation(_roles(party), n, shift, bits, from_products)
    own = torch.cat([t.reshape(-1) for t in addends]) if addends else torch.empty(0, dtype=torch.int64, device=device)
    if job.roles.role == "D":
        first, second, reshared = _dealer_half(party, job, own, reshare_parts)
    else:
        first, second, reshared = _holder_half(party, job, own, reshare_parts)
    return _split(party, first, second, like, bits), reshared


def _round_one(party: Party, messages: dict[int, list[torch.Tensor]], reshare_parts: Sequence[torch.Tensor],
               senders: set[int]) -> tuple[dict[int, list[torch.Tensor]], list[torch.Tensor]]:
    """The truncation's first round, shared with a reshare: each message to the previous
    party starts with this party's reshare parts, each message from the next party with its
    parts. Returns the truncation's messages (by sender) and the received reshare parts."""
    send = {to: list(msg) for to, msg in messages.items()}
    if reshare_parts:
        send[party.prev] = [*reshare_parts, *send.get(party.prev, [])]
        senders = senders | {party.next}
    got = party.exchange(send, sorted(senders))
    reshared: list[torch.Tensor] = []
    if reshare_parts:
        from_next = got[party.next]
        reshared, got[party.next] = from_next[:len(reshare_parts)], from_next[len(reshare_parts):]
    return got, reshared


def _top_bit(v: torch.Tensor) -> torch.Tensor:
    """Bit 63 of each ring element."""
    return (v >> 63) & 1


def _middle_bits(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Bits d..62 of each ring element, as an integer: floor((v mod 2^63) / 2^d)."""
    return ((v << 1) >> (shift + 1)) & ((1 << (63 - shift)) - 1)


def _dealer_half(party: Party, job: _Truncation, own: torch.Tensor, reshare_parts: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Role D: deal B's shares of the mask's top and middle bits (and, for a 3-out-of-3 x,
    send its own addend masked by r_D to A and B). D's result shares are PRF values it
    shares with B and with A; it takes part in round 2 without sending anything."""
    n, device = job.n, job.device
    r_a, top_a, middle_a, comp_a = _split_words(party.keys.with_next.words(4 * n, device), 4, n)  # key of A and D
    r_b, comp_d = _split_words(party.keys.with_prev.words(2 * n, device), 2, n)  # key of B and D
    r = r_a + r_b
    masked = None
    if job.from_products:
        r_d = csprng_words(n, device)
        r = r + r_d
        masked = own + r_d
    to_b = _Dealt(masked, _narrow_bit_share(_top_bit(r) - top_a, job.bits), _middle_bits(r, job.shift) - middle_a)
    messages = {job.roles.b: to_b.tensors()}
    if masked is not None:
        messages[job.roles.a] = _Dealt(masked).tensors()
    _, reshared = _round_one(party, messages, reshare_parts, set())
    party.exchange({}, [])  # round 2 is between A and B
    return comp_d, comp_a, reshared


def _holder_half(party: Party, job: _Truncation, own: torch.Tensor, reshare_parts: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Roles A and B: swap masked addends to learn c = x + 2^62 + r (round 1), compute this
    party's part of the 2-out-of-2 result, and make it replicated by one exchange (round 2)."""
    n, device, roles = job.n, job.device, job.roles
    is_a = roles.role == "A"
    other = roles.b if is_a else roles.a
    if is_a:  # the key shared with D (A's previous party)
        r_own, top_own, middle_own, comp_own = _split_words(party.keys.with_prev.words(4 * n, device), 4, n)
        mine = own + (1 << EXACT_OFFSET_BITS) + r_own
    else:  # the key shared with D (B's next party)
        r_own, comp_own = _split_words(party.keys.with_next.words(2 * n, device), 2, n)
        mine = own + r_own
    from_d = job.from_products or not is_a
    got, reshared = _round_one(party, {other: [mine]}, reshare_parts, {other} | ({roles.d} if from_d else set()))
    (theirs,) = got[other]
    dealt = _Dealt.read(got.get(roles.d, []), job.from_products, to_b=not is_a)
    c = mine + theirs
    if dealt.masked_addend is not None:
        c = c + dealt.masked_addend
    if is_a:
        y = _a_result(c, job.shift, top_own, middle_own)
    else:
        y = _b_result(c, job.shift, dealt)
    sent = y - comp_own
    (back,) = party.exchange({other: [sent]}, [other])[other]
    if is_a:
        return comp_own, sent + back, reshared
    return sent + back, comp_own, reshared


def _a_result(c: torch.Tensor, shift: torch.Tensor, top_own: torch.Tensor, middle_own: torch.Tensor) -> torch.Tensor:
    """A's part of floor(x / 2^d): c[d..62] - rc_A + 2^(63-d) [c_63 xor r_63]_A - 2^(62-d)."""
    c_top = _top_bit(c)
    top_share = top_own + c_top - 2 * c_top * top_own
    return _middle_bits(c, shift) - middle_own + (top_share << (63 - shift)) - (1 << (EXACT_OFFSET_BITS - shift))


def _b_result(c: torch.Tensor, shift: torch.Tensor, dealt: _Dealt) -> torch.Tensor:
    """B's part of floor(x / 2^d): -rc_B + 2^(63-d) [c_63 xor r_63]_B."""
    assert dealt.top_bit is not None and dealt.middle_bits is not None
    c_top = _top_bit(c)
    top_b = dealt.top_bit.to(torch.int64)
    return -dealt.middle_bits + ((top_b - 2 * c_top * top_b) << (63 - shift))


def _narrow_bit_share(share: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """B's share of r_63 enters only as ``share << (63 - d)`` mod 2^64, so its low d + 1
    bits are all B needs: with every d < 31 they travel as int32 (the low 32 bits, still
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
    idx = [k for k, x in enumerate(xs) if scale.excess_bits(x.frac_bits, f)]
    if not idx:
        return list(xs)
    truncate = truncate_exact_many if party.fp.truncation == "exact" else truncate_many
    done = truncate(party, [xs[k] for k in idx], [scale.excess_bits(xs[k].frac_bits, f) for k in idx])
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
    scales = [scale.product_scale(x.frac_bits, y.frac_bits) for x, y in pairs]
    cut = [k for k, sc in enumerate(scales) if scale.excess_bits(sc, f)]
    keep = [k for k, sc in enumerate(scales) if not scale.excess_bits(sc, f)]
    like = [AShare(parts[k], parts[k], party.id, scales[k]) for k in cut]
    truncated, reshared = _exact_truncation(party, [parts[k] for k in cut], like,
                                            [scale.excess_bits(scales[k], f) for k in cut], from_products=True,
                                            reshare_parts=[parts[k] for k in keep])
    out = dict(zip(cut, truncated))
    out.update({k: AShare(parts[k], got, party.id, scales[k]) for k, got in zip(keep, reshared)})
    return [out[k] for k in range(len(pairs))]


@protocol("sum_of_products")
def sum_of_products(party: Party, pairs: Sequence[tuple[AShare, AShare]], dim: int | None = None) -> AShare:
    """[sum_j x_j * y_j] (broadcasting): the 3-out-of-3 local products, each brought to the
    largest product scale S by a public shift, are summed locally, so the whole sum costs
    what one product does: one reshare (S <= f), or the exact truncation fused into it
    (two rounds, the dealt masks once for the sum instead of once per product). With
    ``dim`` the local sum also runs over that dimension (kept), so a row's sum of products
    is reshared and truncated once. The value at scale S must stay below 2^62 in magnitude
    (exact truncation's range)."""
    scales = [scale.product_scale(x.frac_bits, y.frac_bits) for x, y in pairs]
    top = scale.sum_of_products_scale(scales)
    total: torch.Tensor | None = None
    for (x, y), sc in zip(pairs, scales):
        part = local_product(party, x, y) << (top - sc)
        total = part if total is None else total + part
    assert total is not None
    if dim is not None:
        total = total.sum(dim=dim, keepdim=True)
    f = party.fp.frac_bits
    if scale.excess_bits(top, f) and party.fp.truncation == "exact":
        like = [AShare(total, total, party.id, top)]
        (out,), _ = _exact_truncation(party, [total], like, [scale.excess_bits(top, f)], from_products=True)
        return out
    got = reshare(party, [total])[0]
    return to_scale(party, [AShare(total, got, party.id, top)])[0]


def _needs_fused_truncation(party: Party, pairs: Sequence[tuple[AShare, AShare]]) -> bool:
    """Exact truncation is on and some product's scale exceeds f."""
    f = party.fp.frac_bits
    return party.fp.truncation == "exact" and any(
        scale.excess_bits(scale.product_scale(x.frac_bits, y.frac_bits), f) for x, y in pairs)


def mul_many(party: Party, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
    """Fixed-point [x*y] for each pair. With exact truncation (the default) the product and
    its truncation take two rounds together; with probabilistic truncation one
    multiplication round plus one truncation round. A product with a 0/1 bit or an integer
    needs no truncation (one round)."""
    if _needs_fused_truncation(party, pairs):
        return mul_trunc_many(party, pairs)
    return to_scale(party, mul_untruncated_many(party, pairs))


def mul(party: Party, x: AShare, y: AShare) -> AShare:
    """Fixed-point [x*y] with broadcasting (see :func:`mul_many`)."""
    return mul_many(party, [(x, y)])[0]


def matmul(party: Party, x: AShare, y: AShare) -> AShare:
    """Fixed-point [x @ y] (batched, broadcasting): two rounds with the exact truncation."""
    return matmul_many(party, [(x, y)])[0]


def matmul_many(party: Party, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
    """Fixed-point [x @ y] for each pair, all in the same two rounds (exact truncation)."""
    if _needs_fused_truncation(party, pairs):
        return mul_trunc_many(party, pairs, matmul=True)
    return to_scale(party, mul_untruncated_many(party, pairs, matmul=True))
