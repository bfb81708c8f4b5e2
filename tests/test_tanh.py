"""The secure tanh (``secure.approx.tanh``) on floats, on the fixed-point simulation and on
three-party shares, against ``torch.tanh`` over the whole real line; its rounds and bytes;
its fit; and the rewrite of ``aten.tanh`` on a secret into ``secure.tanh``.

Bounds (measured maxima, see the form's docstring): 6.1e-7 on floats, 2.0-2.3e-5 under
fixed point and on shares (about 6 steps of 2^-18); asserted 7e-7 and 3e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secure.approx.float_backend import FloatOps
from secure.approx.tanh import TANH_BOUND, TANH_CHEBYSHEV, tanh, tanh_fit
from secure.graph.capture import capture
from secure.graph.ir import Graph
from secure.graph.passes import OURS, rewrite
from secure.mpc.backend import MpcOps
from secure.mpc.ring import FixedPoint
from secure.mpc.simulation import FixedPointOps
from secure.runtime.execute import run_fixed, run_float

F64 = torch.float64
FLOAT_BOUND = 7e-7
FIXED_BOUND = 3e-5
LINE = torch.linspace(-12, 12, 240001, dtype=F64)
"""The tails beyond |x| = 7.5 are constant (+-1): [-12, 12] covers every case of the form."""
FAR = torch.tensor([-1e6, -3e4, -100.0, -7.6, 7.6, 100.0, 3e4, 1e6], dtype=F64)
"""Beyond the bound: exactly +-1 on every backend."""


def test_the_fit_is_what_the_form_uses() -> None:
    u = np.linspace(0.0, TANH_BOUND, 400001)
    v = 2.0 * u / TANH_BOUND - 1.0
    assert float(np.abs(np.polynomial.chebyshev.chebval(v, TANH_CHEBYSHEV) - np.tanh(u)).max()) <= 4.6e-7
    quick = tanh_fit(points=2001, iterations=100)  # the same fit, coarser: close to the stored one
    assert float(np.abs(np.polynomial.chebyshev.chebval(v, quick) - np.tanh(u)).max()) <= 5e-7
    # at the bound the form switches to +-1: that jump is no larger than the fit's error
    edge = torch.tensor([-TANH_BOUND, TANH_BOUND], dtype=F64)
    assert float((tanh(FloatOps(), edge) - torch.tanh(edge)).abs().max()) <= 6.2e-7


def test_tanh_on_floats() -> None:
    err = (tanh(FloatOps(), LINE) - torch.tanh(LINE)).abs()
    assert float(err.max()) <= FLOAT_BOUND
    far = tanh(FloatOps(), FAR)
    assert torch.equal(far, torch.sign(FAR))


@pytest.mark.parametrize("truncation", ["floor", "probabilistic"])
def test_tanh_on_fixed_point(truncation: str) -> None:
    ops = FixedPointOps(FixedPoint(), truncation=truncation, seed=1)
    out = ops.decode(tanh(ops, ops.encode(LINE)))
    assert float((out - torch.tanh(LINE)).abs().max()) <= FIXED_BOUND
    far = ops.decode(tanh(ops, ops.encode(FAR)))
    assert torch.equal(far, torch.sign(FAR))


def test_tanh_on_shares(runner) -> None:
    x = torch.cat([torch.linspace(-12, 12, 48001, dtype=F64), FAR])
    out = runner.run(lambda p, a: tanh(MpcOps(p), a), runner.share(x))
    assert float((out - torch.tanh(x)).abs().max()) <= FIXED_BOUND
    assert float((out - tanh(FloatOps(), x)).abs().max()) <= FIXED_BOUND
    assert torch.equal(out[-len(FAR):], torch.sign(FAR))


def test_tanh_rounds_and_bytes(runner) -> None:
    """One comparison pass (8 rounds), the product for v (2), five basis passes (10), the
    final sum of products (2): 22 rounds; 1566 bytes per element over the three parties
    (three comparisons 306, 21 truncated products 60 each)."""
    x = runner.share(torch.randn(1, 768, dtype=F64))
    before = list(runner.cluster.bytes_sent())
    assert runner.rounds_of(lambda p, a: tanh(MpcOps(p), a), x) == 22
    sent = sum(b - a for a, b in zip(before, runner.cluster.bytes_sent()))
    assert sent == 1566 * 768


class _Pooler(nn.Module):
    """BERT's pooler on a secret input, and a tanh of a public value (which stays plaintext)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x)) * torch.tanh(mask)


def test_the_rewrite_replaces_a_secret_tanh_only() -> None:
    torch.manual_seed(0)
    model = _Pooler().eval()
    with torch.no_grad():
        model.dense.weight.mul_(8.0)  # inputs well into both tails
    inputs = {"x": torch.randn(2, 8), "mask": torch.ones(2, 8)}
    graph, weights = capture(model, inputs, secret_inputs=("x",))
    secure = rewrite(graph, OURS)
    ops = {n.op: n.secret for n in secure.nodes if "tanh" in n.op}
    assert ops == {"secure.tanh": True, "aten.tanh.default": False}
    Graph.from_json(secure.to_json())  # the registry knows secure.tanh: a party may load it
    with torch.no_grad():
        expected = model(**inputs).double()
    (floats,), _ = run_float(secure, weights, inputs)
    (fixed,), _ = run_fixed(secure, weights, inputs)
    assert float((floats - expected).abs().max()) <= 1e-6
    assert float((fixed - expected).abs().max()) <= 1e-4
