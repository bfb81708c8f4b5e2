"""Worker processes for the HE linear layers (secure.he.pool): the parts add up to the
layer, other queries' keys reach the workers, and a dead worker fails the layer loudly and
is replaced. Tolerances as in test_he.py: 1e-3 on a linear layer of unit-scale values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure.he.client import HeClient, server_engine
from secure.he.engine import HeFormatError
from secure.he.layout import Cipher, Plain
from secure.he.ops import HeOps
from secure.he.params import PARAM_SETS
from secure.he.pool import ClientPool, HePool, HeWorkerError, split
from secure.he.refresh import RefreshSession

P = PARAM_SETS[0]
STRIDE = 16
STEPS = sorted({i * STRIDE for i in range(1, 16)} | {j * 256 for j in range(1, 16)}
               | {P.slots - (STRIDE << k) for k in range(8)})


@given(n=st.integers(1, 40), parts=st.integers(1, 9))
def test_split_covers_every_index_once_in_near_equal_runs(n, parts):
    runs = split(n, parts)
    assert [i for run in runs for i in run] == list(range(n))
    assert len(runs) == min(n, parts)
    assert max(map(len, runs)) - min(map(len, runs)) <= 1


class Query:
    """One client's keys and a server engine on its public context, sharing ``pool``."""

    def __init__(self, pool: HePool) -> None:
        self.client = HeClient(P, STEPS)
        self.engine = server_engine(self.client.public_context())
        self.engine.pool = pool
        self.ops = HeOps(RefreshSession(self.engine, self.client))

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        blobs, index = self.client.encrypt(x.to(torch.float64))
        out = self.ops.matmul(Cipher([self.engine.deserialize(b) for b in blobs], index), Plain(w))
        return self.client.decrypt([self.engine.serialize(ct) for ct in out.cts], out.index)


@pytest.fixture(scope="module")
def pool():
    with HePool(workers=1) as p:
        yield p


@pytest.fixture(scope="module")
def query(pool):
    return Query(pool)


def _r(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=4, deadline=None)
@given(k_in=st.integers(1, 600), n_out=st.integers(1, 600), seed=st.integers(0, 99))
def test_a_linear_layer_split_with_a_worker_matches_plaintext(query, k_in, n_out, seed):
    """By outputs (as many outputs as inputs) or by inputs (the parts' partial sums added):
    either way the layer's value, and the worker really did a part."""
    q = query
    before = q.engine.stats.count["ct-pt product (worker)"]
    x, w = _r(16, k_in, seed=seed), _r(k_in, n_out, scale=k_in**-0.5, seed=seed + 1)
    got = q.linear(x, w)
    assert (got - x @ w).abs().max() < 1e-3
    ciphertexts_in, ciphertexts_out = -(-k_in // 256), -(-n_out // 256)
    if max(ciphertexts_in, ciphertexts_out) > 1:  # something to split
        assert q.engine.stats.count["ct-pt product (worker)"] > before


def test_both_ways_of_splitting_and_a_second_querys_keys(pool, query):
    first, second = query, Query(pool)
    x, w_out = _r(16, 300, seed=1), _r(300, 700, scale=300**-0.5, seed=2)  # 2 inputs, 3 outputs
    x_in, w_in = _r(16, 700, seed=3), _r(700, 40, scale=700**-0.5, seed=4)  # 3 inputs, 1 output
    for q in (first, second, first):  # the worker keeps both queries' keys
        assert (q.linear(x, w_out) - x @ w_out).abs().max() < 1e-3
        assert (q.linear(x_in, w_in) - x_in @ w_in).abs().max() < 1e-3


def test_a_dead_worker_fails_the_layer_and_the_next_one_runs_on_fresh_workers():
    with HePool(workers=1, timeout_s=60.0) as pool:
        q = Query(pool)
        x, w = _r(16, 300, seed=5), _r(300, 600, scale=300**-0.5, seed=6)
        assert (q.linear(x, w) - x @ w).abs().max() < 1e-3
        pool._procs[0].kill()
        pool._procs[0].wait()
        with pytest.raises(HeWorkerError, match="worker 0"):
            q.linear(x, w)
        assert (q.linear(x, w) - x @ w).abs().max() < 1e-3


def test_a_client_pool_encrypts_decrypts_and_refreshes_like_the_client_alone():
    """The client's workers hold its secret key (its own processes); a server refuses that
    key material as a public context."""
    with ClientPool(workers=1) as client_pool:
        q = Query(HePool(workers=0))
        q.client.pool = client_pool
        x = _r(16, 1000, seed=7)  # 4 ciphertexts
        blobs, index = q.client.encrypt(x)
        assert q.client.stats.count["encrypt (worker)"] > 0
        assert (q.client.decrypt(blobs, index) - x).abs().max() < 1e-4
        cipher = Cipher([q.engine.deserialize(b) for b in blobs], index)
        (fresh,) = q.ops.session.refresh([cipher])
        back = q.client.decrypt([q.engine.serialize(ct) for ct in fresh.cts], fresh.index)
        assert (back - x).abs().max() < 1e-4 and q.client.stats.count["decrypt (worker)"] > 0
        with pytest.raises(HeFormatError, match="secret key"):
            server_engine(q.client.key_material())


def test_a_pool_refuses_a_negative_worker_count():
    with pytest.raises(ValueError, match="0 or more workers"):
        HePool(workers=-1)
