"""The protocols with shares on a CUDA device (skipped where there is none)."""

from __future__ import annotations

import pytest
import torch

from secure.approx.gelu import puma_gelu
from secure.mpc import arithmetic as ar
from secure.mpc import compare as cmp
from secure.mpc import shares as sh
from secure.mpc.backend import MpcOps
from secure.mpc.engine import LocalCluster

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_cluster() -> LocalCluster:
    return LocalCluster(device="cuda")


def _deal(cluster: LocalCluster, x: torch.Tensor) -> list[sh.AShare]:
    return sh.deal_shares(cluster.fp.encode(x).cuda(), cluster.fp.frac_bits)


def test_matmul_comparison_and_gelu_on_cuda(gpu_cluster):
    x = torch.randn(64, 96, dtype=torch.float64)
    w = torch.randn(96, 80, dtype=torch.float64) / 10

    def prog(p, a, b):
        assert a.device.type == "cuda"
        y = ar.matmul(p, a, b)
        lt = cmp.less_than_public(p, y, [0.0])[0]
        g = puma_gelu(MpcOps(p), y)
        return [ar.open_float(p, t).cpu() for t in (y, lt, g)]

    inputs = list(zip(_deal(gpu_cluster, x), _deal(gpu_cluster, w)))
    y, lt, g = gpu_cluster.run(prog, inputs)[0]
    ref = x @ w
    assert torch.allclose(y, ref, atol=1e-3)
    assert torch.equal(lt, (y < 0).double())
    assert float((g - torch.nn.functional.gelu(ref)).abs().max()) <= 0.021
