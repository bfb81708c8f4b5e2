"""Tests for secure.mpc.matmul: exact int64 (mod 2^64) matmul on CPU and via float64 limbs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure.mpc.matmul import limb_matmul, limb_max_inner_dim, ring_matmul

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MOD = 2**64


def rand64(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(INT64_MIN, INT64_MAX, shape, dtype=torch.int64, generator=gen)


def to_signed(x: int) -> int:
    x %= MOD
    return x - MOD if x >= 2**63 else x


def python_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Independent big-integer reference for 2-D operands, reduced mod 2^64."""
    al, bl = a.tolist(), b.tolist()
    k = a.shape[1]
    out = [
        [to_signed(sum(al[r][t] * bl[t][c] for t in range(k))) for c in range(b.shape[1])]
        for r in range(a.shape[0])
    ]
    return torch.tensor(out, dtype=torch.int64).reshape(a.shape[0], b.shape[1])


def assert_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.int64
    assert got.shape == want.shape
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- reference sanity


def test_cpu_int64_matmul_wraps_mod_2_64() -> None:
    a, b = rand64(5, 7, seed=1), rand64(7, 3, seed=2)
    assert_exact(torch.matmul(a, b), python_matmul(a, b))
    assert_exact(ring_matmul(a, b), python_matmul(a, b))


# --------------------------------------------------------------------------- limb_matmul exact


SHAPES = [
    ((128, 64), (64, 128)),  # 2-D
    ((128, 384), (384, 1536)),  # transformer-sized 2-D
    ((12, 128, 64), (12, 64, 128)),  # batched (attention heads)
    ((2, 3, 4, 5), (5, 6)),  # batched @ 2-D broadcast
    ((4, 5), (3, 5, 6)),  # 2-D @ batched broadcast
    ((2, 1, 4, 5), (1, 3, 5, 6)),  # both broadcast
    ((7, 1), (1, 9)),  # inner dim 1
    ((1, 1), (1, 1)),
    ((5,), (5, 3)),  # 1-D @ 2-D
    ((4, 5), (5,)),  # 2-D @ 1-D
    ((5,), (5,)),  # 1-D @ 1-D -> 0-d
    ((2, 4, 5), (5,)),  # batched @ 1-D
]


@pytest.mark.parametrize(("shape_a", "shape_b", "limb_bits"),
                         [(a, b, bits) for a, b in SHAPES for bits in (16, 22)
                          if a[-1] <= limb_max_inner_dim(bits)])  # within each limb width's exact bound
def test_limb_matmul_matches_int64_matmul(shape_a, shape_b, limb_bits) -> None:
    a, b = rand64(*shape_a, seed=3), rand64(*shape_b, seed=4)
    want = torch.matmul(a, b)
    assert_exact(limb_matmul(a, b, limb_bits=limb_bits), want)
    assert_exact(ring_matmul(a, b), want)


@pytest.mark.parametrize("limb_bits", [16, 22])
@pytest.mark.parametrize(
    ("shape_a", "shape_b", "shape_out"),
    [
        ((0, 5), (5, 3), (0, 3)),
        ((4, 0), (0, 3), (4, 3)),
        ((4, 5), (5, 0), (4, 0)),
        ((0, 4, 5), (5, 3), (0, 4, 3)),
        ((2, 4, 0), (2, 0, 3), (2, 4, 3)),
    ],
)
def test_zero_size_shapes(shape_a, shape_b, shape_out, limb_bits) -> None:
    a, b = rand64(*shape_a, seed=5), rand64(*shape_b, seed=6)
    zeros = torch.zeros(shape_out, dtype=torch.int64)
    assert_exact(limb_matmul(a, b, limb_bits=limb_bits), zeros)
    assert_exact(ring_matmul(a, b), zeros)


@pytest.mark.parametrize("limb_bits", [16, 22])
def test_negative_and_extreme_values(limb_bits) -> None:
    edge = [INT64_MIN, INT64_MIN + 1, -(2**62), -65536, -65535, -1, 0, 1, 65535, 2**62, INT64_MAX]
    a = torch.tensor(edge, dtype=torch.int64).view(-1, 1).expand(-1, 8).contiguous()
    a = a * torch.tensor([1, -1, 3, -3, 7, -7, 1, -1], dtype=torch.int64)  # wraps, fine
    b = torch.tensor(edge, dtype=torch.int64).view(1, -1).expand(8, -1).contiguous()
    want = python_matmul(a, b)
    assert_exact(torch.matmul(a, b), want)
    assert_exact(limb_matmul(a, b, limb_bits=limb_bits), want)
    negative = -rand64(16, 32, seed=7).abs()
    other = rand64(32, 8, seed=8)
    assert_exact(limb_matmul(negative, other, limb_bits=limb_bits), torch.matmul(negative, other))


@pytest.mark.parametrize("limb_bits", [16, 22])
def test_non_contiguous_inputs(limb_bits) -> None:
    a = rand64(40, 30, seed=9).t()  # (30, 40), transposed view
    b = rand64(80, 20, seed=10)[::2]  # (40, 20), strided view
    assert_exact(limb_matmul(a, b, limb_bits=limb_bits), torch.matmul(a, b))


def test_22_bit_worst_case_at_exact_bound() -> None:
    # All-ones bit patterns make every limb maximal, so each float64 limb-product entry is
    # K * (2^22 - 1)^2 (or smaller for the 20-bit top limb): 2^53 - 2^32 + 512 at K = 512.
    k = limb_max_inner_dim(22)
    assert k == 512
    assert k * (2**22 - 1) ** 2 <= 2**53 < (k + 1) * (2**22 - 1) ** 2
    a = torch.full((3, k), -1, dtype=torch.int64)
    b = torch.full((k, 2), -1, dtype=torch.int64)
    assert_exact(limb_matmul(a, b, limb_bits=22), torch.full((3, 2), k, dtype=torch.int64))
    a, b = rand64(16, k, seed=11), rand64(k, 24, seed=12)
    assert_exact(limb_matmul(a, b, limb_bits=22), torch.matmul(a, b))


def test_16_bit_bound_value() -> None:
    k = limb_max_inner_dim(16)
    assert k == 2**21 + 64
    assert k * (2**16 - 1) ** 2 <= 2**53 < (k + 1) * (2**16 - 1) ** 2
    # Max limbs (all bits set) on a long inner dimension: every entry sums to k * 1.
    kk = 1 << 16
    a = torch.full((2, kk), -1, dtype=torch.int64)
    b = torch.full((kk, 2), -1, dtype=torch.int64)
    assert_exact(limb_matmul(a, b), torch.full((2, 2), kk, dtype=torch.int64))


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    m=st.integers(0, 5),
    k=st.integers(0, 6),
    n=st.integers(0, 5),
    limb_bits=st.sampled_from([16, 22, 1, 8, 13, 26]),
)
def test_limb_matmul_hypothesis(data, m, k, n, limb_bits) -> None:
    k = min(k, limb_max_inner_dim(limb_bits))  # 26-bit limbs: K <= 2
    ints = st.integers(INT64_MIN, INT64_MAX)
    a_vals = data.draw(st.lists(ints, min_size=m * k, max_size=m * k))
    b_vals = data.draw(st.lists(ints, min_size=k * n, max_size=k * n))
    a = torch.tensor(a_vals, dtype=torch.int64).reshape(m, k)
    b = torch.tensor(b_vals, dtype=torch.int64).reshape(k, n)
    want = python_matmul(a, b)
    assert_exact(limb_matmul(a, b, limb_bits=limb_bits), want)
    assert_exact(ring_matmul(a, b), want)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.lists(st.integers(1, 3), max_size=2),
    m=st.integers(1, 9),
    k=st.integers(1, 70),
    n=st.integers(1, 9),
    limb_bits=st.sampled_from([16, 22]),
)
def test_limb_matmul_hypothesis_batched(seed, batch, m, k, n, limb_bits) -> None:
    a = rand64(*batch, m, k, seed=seed)
    b = rand64(*batch, k, n, seed=seed + 1)
    assert_exact(limb_matmul(a, b, limb_bits=limb_bits), torch.matmul(a, b))


# --------------------------------------------------------------------------- errors


def test_wrong_dtype_raises_type_error() -> None:
    a = rand64(3, 4)
    for fn in (ring_matmul, limb_matmul):
        with pytest.raises(TypeError, match="int32"):
            fn(a.to(torch.int32), a.t())
        with pytest.raises(TypeError, match="float64"):
            fn(a, a.t().to(torch.float64))
        with pytest.raises(TypeError):
            fn(a, [[1]])


def test_non_multiplying_shapes_raise_value_error() -> None:
    for fn in (ring_matmul, limb_matmul):
        with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 2\)"):
            fn(rand64(3, 4), rand64(5, 2))
        with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(3, 4, 2\)"):
            fn(rand64(2, 3, 4), rand64(3, 4, 2))  # batch dims 2 vs 3 do not broadcast
        with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)"):
            fn(rand64(4), rand64(5))
        with pytest.raises(ValueError):
            fn(torch.tensor(1, dtype=torch.int64), rand64(3))


def test_inner_dim_beyond_22_bit_bound_raises() -> None:
    k = limb_max_inner_dim(22) + 1
    a, b = rand64(2, k), rand64(k, 2)
    with pytest.raises(ValueError, match="exactness bound 512"):
        limb_matmul(a, b, limb_bits=22)
    assert_exact(limb_matmul(a, b, limb_bits=16), torch.matmul(a, b))


def test_inner_dim_beyond_16_bit_bound_raises_without_allocating() -> None:
    k = limb_max_inner_dim(16) + 1
    a = torch.zeros(1, 1, dtype=torch.int64).expand(3, k)  # stride-0 views: no memory
    b = torch.zeros(1, 1, dtype=torch.int64).expand(k, 3)
    with pytest.raises(ValueError, match="exactness bound 2097216"):
        limb_matmul(a, b)


def test_bad_limb_bits() -> None:
    a, b = rand64(2, 3), rand64(3, 2)
    for bad in (0, 27, 64, -16):
        with pytest.raises(ValueError, match="limb_bits"):
            limb_matmul(a, b, limb_bits=bad)
    with pytest.raises(TypeError, match="limb_bits"):
        limb_matmul(a, b, limb_bits=16.0)  # type: ignore[arg-type]


@pytest.mark.skip(reason="needs two devices (CUDA); device mismatch raises ValueError")
def test_device_mismatch_raises() -> None:  # pragma: no cover
    with pytest.raises(ValueError, match="devices"):
        ring_matmul(rand64(2, 2), rand64(2, 2).cuda())


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_ring_matmul_cuda_matches_cpu() -> None:  # pragma: no cover - needs a GPU
    for shape_a, shape_b in [
        ((128, 384), (384, 1536)),  # K <= 512: 22-bit limbs
        ((12, 128, 64), (12, 64, 128)),
        ((64, 1536), (1536, 384)),  # K > 512: 16-bit limbs
        ((0, 5), (5, 3)),
        ((4, 0), (0, 3)),
    ]:
        a, b = rand64(*shape_a, seed=13), rand64(*shape_b, seed=14)
        got = ring_matmul(a.cuda(), b.cuda())
        assert got.device.type == "cuda"
        assert_exact(got.cpu(), torch.matmul(a, b))
        for limb_bits in (16, 22) if shape_a[-1] <= 512 else (16,):
            assert_exact(limb_matmul(a.cuda(), b.cuda(), limb_bits).cpu(), torch.matmul(a, b))
    with pytest.raises(ValueError, match="devices"):
        ring_matmul(rand64(2, 2).cuda(), rand64(2, 2))


@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 30), st.sampled_from([(), (2,), (1, 3)]))
def test_ring_matmul_with_a_transposed_weight_is_exact(rows: int, inner: int, outer: int, batch: tuple) -> None:
    """A linear layer's ``x @ W^T`` (W contiguous) takes the transposed CPU path: the same
    wrapped int64 result as the plain product, one row (a decode step) or many."""
    gen = torch.Generator().manual_seed(rows * 1000 + inner * 10 + outer)
    a = torch.randint(-2**62, 2**62, (*batch, rows, inner), generator=gen)
    weight = torch.randint(-2**62, 2**62, (outer, inner), generator=gen)
    assert torch.equal(ring_matmul(a, weight.t()), torch.matmul(a, weight.t().contiguous()))
