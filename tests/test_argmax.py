"""Greedy argmax (secure.approx.argmax) on floats, fixed point and three-party shares.

The form returns torch.argmax exactly on floats (ties: the first maximum); on fixed point
and on shares exactly torch.argmax of the encoded ring values (no truncation anywhere,
exact comparisons), which is torch.argmax of the floats when the maximum is separated
from the runner-up by more than an ulp.

Three parties, batch 1 (measured, equal on the three parties): n = 1024: 90 rounds,
47,054 bytes sent per party; n = 2048: 99 rounds, 94,158 bytes per party (63,422 and
126,910 before the comparisons' cheaper first two rounds).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secure.approx.argmax import argmax, argmax_rounds
from secure.approx.float_backend import FloatOps
from secure.mpc.backend import MpcOps
from secure.mpc.simulation import FixedPointOps

F64 = torch.float64
FRAC = 18
ULP = 2.0**-FRAC

BYTES_PER_PARTY = {1024: 47_054, 2048: 94_158}
"""Measured bytes each party sends for argmax over one row of length n (pinned)."""


@st.composite
def cases(draw, max_len: int = 300):
    """(x, dim): batch dims of 0-2 axes, the argmax axis anywhere, length 1..max_len;
    half the draws from a few integers (many ties), half Gaussian."""
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    n = draw(st.integers(1, max_len))
    dim = draw(st.integers(0, len(batch)))
    shape = [*batch[:dim], n, *batch[dim:]]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.booleans()):
        x = torch.randint(-3, 4, shape, generator=g).to(F64)
    else:
        x = torch.randn(shape, generator=g, dtype=F64) * 10
    return x, dim - len(shape) if draw(st.booleans()) else dim


@given(cases(), st.booleans())
def test_float_argmax_is_torch_argmax(case, keepdim):
    x, dim = case
    out = argmax(FloatOps(), x, dim, keepdim=keepdim)
    assert out.dtype == F64
    assert torch.equal(out, x.argmax(dim, keepdim=keepdim).to(F64))


def test_ties_keep_the_first_maximum():
    ops = FloatOps()
    assert float(argmax(ops, torch.tensor([2.0, 5.0, 5.0, 1.0, 5.0]))) == 1
    assert float(argmax(ops, torch.zeros(37, dtype=F64))) == 0
    assert float(argmax(ops, torch.tensor([-1.0, -1.0, -1.0]))) == 0


def test_argmax_rejects_an_empty_or_missing_dimension():
    with pytest.raises(ValueError, match="empty"):
        argmax(FloatOps(), torch.zeros(3, 0), -1)
    with pytest.raises(ValueError, match="out of range"):
        argmax(FloatOps(), torch.zeros(3, 4), 2)


def test_argmax_rounds():
    assert [argmax_rounds(n) for n in (1, 2, 3, 4, 5, 1024, 1025, 2048)] == [0, 9, 18, 18, 27, 90, 99, 99]


@st.composite
def separated(draw, max_len: int = 300):
    """(x, dim) as :func:`cases`, with the first maximum of every row raised by 8 ulps, so
    it lies at least 8 ulps above every other element (ties included)."""
    x, dim = draw(cases(max_len))
    first = x.argmax(dim, keepdim=True)
    return x.scatter_add(dim, first, torch.full(first.shape, 8 * ULP, dtype=F64)), dim


@given(separated())
def test_fixed_point_argmax_is_torch_argmax(case):
    x, dim = case
    ops = FixedPointOps()
    out = argmax(ops, ops.encode(x), dim)
    assert out.frac_bits == FRAC  # the index at the value scale, exact
    assert torch.equal(ops.decode(out), x.argmax(dim).to(F64))


@given(cases(), st.integers(0, 3))
def test_fixed_point_argmax_is_exact_on_ring_values(case, shift):
    """Values closer than an ulp: the ring values decide, ties to the first."""
    x, dim = case
    ops = FixedPointOps()
    enc = ops.encode(x * 2.0 ** -(FRAC + shift))  # 1 to 1/8 ulp apart: many equal rings
    out = argmax(ops, enc, dim)
    assert torch.equal(ops.decode(out), enc.ring.argmax(dim).to(F64))


def test_on_shares_a_vocabulary(runner):
    g = torch.Generator().manual_seed(11)
    for n in (1024, 2048):
        x = torch.randn(1, n, generator=g, dtype=F64) * 4
        before = runner.cluster.bytes_sent()
        assert runner.rounds_of(lambda p, a: argmax(MpcOps(p), a), runner.share(x)) == argmax_rounds(n)
        sent = [b - a for a, b in zip(before, runner.cluster.bytes_sent())]
        assert sent == [BYTES_PER_PARTY[n]] * 3
        out = runner.run(lambda p, a: argmax(MpcOps(p), a), runner.share(x))
        assert torch.equal(out, x.argmax(-1).to(F64))
    assert argmax_rounds(1024) == 90 and argmax_rounds(2048) == 99


def test_on_shares_batches_ties_and_near_ties(runner):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 37, 2, generator=g, dtype=F64) * 3
    out = runner.run(lambda p, a: argmax(MpcOps(p), a, 1), runner.share(x))
    assert torch.equal(out, x.argmax(1).to(F64))

    ties = torch.tensor([[2.0, 5.0, 5.0, 1.0, 5.0], [-3.0] * 5, [0.0, 0.0, 0.0, 0.0, 7.5]], dtype=F64)
    out = runner.run(lambda p, a: argmax(MpcOps(p), a), runner.share(ties))
    assert out.tolist() == [1.0, 0.0, 4.0]

    # within an ulp: the simulation predicts the protocol exactly (ring values, ties first)
    near = torch.randint(-2, 3, (4, 301), generator=g).to(F64) * ULP / 3 + 1.0
    ops = FixedPointOps()
    out = runner.run(lambda p, a: argmax(MpcOps(p), a), runner.share(near))
    assert torch.equal(out, ops.decode(argmax(ops, ops.encode(near))))

    one = runner.run(lambda p, a: argmax(MpcOps(p), a, 0, keepdim=True), runner.share(torch.tensor([4.0])))
    assert one.tolist() == [0.0]
