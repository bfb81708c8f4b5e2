"""Ring, fixed point, CSPRNG correlated randomness and the dealer-side sharing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secure.mpc import shares as sh
from secure.mpc.randomness import PairwiseKeys, PrfStream, csprng_words, random_key
from secure.mpc.ring import FixedPoint, FixedPointOverflowError, logical_right_shift


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=0, max_size=50),
       st.integers(8, 24))
def test_encode_decode_roundtrip(values, f):
    fp = FixedPoint(f)
    x = torch.tensor(values, dtype=torch.float64)
    back = fp.decode(fp.encode(x))
    assert torch.all((back - x).abs() <= 2.0 ** -(f + 1) + 1e-12)


def test_encode_range_is_enforced_and_named():
    fp = FixedPoint(18)
    fp.encode(torch.tensor([2.0**43, -(2.0**43)]))
    with pytest.raises(FixedPointOverflowError, match="out of the fixed-point range"):
        fp.encode(torch.tensor([2.0**44]))
    with pytest.raises(ValueError, match="NaN or infinity"):
        fp.encode(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="frac_bits"):
        FixedPoint(40)


def test_ring_wraps_modulo_2_64():
    big = torch.tensor([2**62], dtype=torch.int64)
    assert int((big * 4)[0]) == 0  # 2^64 == 0 in the ring
    assert int((big + big)[0]) == -(2**63)  # wraps to the most negative element
    assert int(logical_right_shift(torch.tensor([-1]), 60)[0]) == 15


def test_decode_rejects_non_ring_tensor():
    with pytest.raises(TypeError, match="int64"):
        FixedPoint().decode(torch.zeros(3, dtype=torch.float32))


def test_prf_is_deterministic_per_nonce_and_fresh_across_calls():
    key = random_key()
    a, b = PrfStream(key), PrfStream(key)
    first = a.words(1000)
    assert torch.equal(first, b.words(1000))
    assert not torch.equal(first, a.words(1000))
    with pytest.raises(ValueError, match="16 bytes"):
        PrfStream(b"short")


def test_zero_shares_sum_to_zero():
    k = [random_key() for _ in range(3)]
    # party i holds k_i (with i-1) and k_{i+1} (with i+1)
    parties = [PairwiseKeys(PrfStream(k[i]), PrfStream(k[(i + 1) % 3])) for i in range(3)]
    z = [p.zero_share((64, 3)) for p in parties]
    assert torch.equal(z[0] + z[1] + z[2], torch.zeros(64, 3, dtype=torch.int64))
    x = [p.zero_share_xor((64,)) for p in parties]
    assert torch.equal(x[0] ^ x[1] ^ x[2], torch.zeros(64, dtype=torch.int64))
    assert not torch.equal(z[0], z[1])


def test_single_share_of_a_constant_looks_uniform():
    """Shares of an all-zero (then all-ones) tensor: no party's share equals another's,
    and every bit position of a share is set about half of the time."""
    for value in (0, 1 << 18):
        x = torch.full((20000,), value, dtype=torch.int64)
        pairs = sh.deal(x)
        comps = [pairs[0][0], pairs[1][0], pairs[2][0]]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not torch.equal(comps[i], comps[j])
                assert float((comps[i] == comps[j]).double().mean()) < 1e-3
        for c in comps:
            bits = ((c.unsqueeze(-1) >> torch.arange(64)) & 1).double().mean(0)
            assert float(bits.min()) > 0.47 and float(bits.max()) < 0.53
            assert len(torch.unique(c)) > 19990
        assert torch.equal(sh.reconstruct(pairs), x)


def test_csprng_words_are_not_torch_rng():
    torch.manual_seed(0)
    a = csprng_words(8)
    torch.manual_seed(0)
    assert not torch.equal(a, csprng_words(8))


def test_reconstruct_detects_inconsistent_pairs():
    pairs = sh.deal(torch.arange(5, dtype=torch.int64))
    bad = [pairs[0], (pairs[1][0] + 1, pairs[1][1]), pairs[2]]
    with pytest.raises(ValueError, match="inconsistent shares"):
        sh.reconstruct(bad)
    assert torch.equal(sh.reconstruct(pairs[:2]), torch.arange(5))


def test_share_construction_checks_dtype_and_shape():
    with pytest.raises(TypeError, match="torch.int64"):
        sh.AShare(torch.zeros(3), torch.zeros(3), 0, 18)
    with pytest.raises(ValueError, match="differ in shape"):
        sh.AShare(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 0, 18)
    with pytest.raises(TypeError, match="int64"):
        sh.deal(torch.zeros(3))
