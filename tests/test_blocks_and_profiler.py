"""A BERT layer on shares against the same forms on floats, and the profiler's accounting."""

from __future__ import annotations

import torch

from secure.approx.float_backend import FloatOps
from secure.blocks import encoder_layer, random_encoder_weights, reference_encoder_layer
from secure.mpc import shares as sh
from secure.mpc.arithmetic import mul, open_float
from secure.mpc.backend import MpcOps
from secure.runtime.profiler import span


def test_encoder_layer_on_shares_matches_forms_and_exact(cluster):
    seq, hidden, heads, ffn = 8, 32, 2, 64
    w = random_encoder_weights(hidden, heads, ffn, seed=3)
    x = torch.randn(seq, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    bias = torch.zeros(seq, dtype=torch.float64)
    bias[-2:] = -1e4
    fp = cluster.fp
    ws = w.map(lambda t: sh.deal_shares(fp.encode(t), fp.frac_bits))
    xs = sh.deal_shares(fp.encode(x), fp.frac_bits)
    out = cluster.run(lambda p, a, ww: open_float(p, encoder_layer(MpcOps(p), a, ww, heads, bias)),
                      [(xs[i], ws.map(lambda s, i=i: s[i])) for i in range(3)])[0]
    forms = encoder_layer(FloatOps(), x, w, heads, bias)
    exact = reference_encoder_layer(x, w, heads, bias)
    assert float((out - forms)[:-2].abs().max()) < 5e-3
    cos = torch.nn.functional.cosine_similarity(out[:-2], exact[:-2], dim=-1)
    assert float(cos.min()) > 0.999


def test_spans_add_up_and_match_transport_counters(cluster, runner):
    x = runner.share(torch.randn(64, dtype=torch.float64))
    for p in cluster.parties:
        p.profiler.clear()
    before = cluster.bytes_sent()

    def prog(p, a):
        with span(p, "outer"):
            b = mul(p, a, a)
            return mul(p, b, a)

    cluster.run(prog, [(s,) for s in x])
    sent = [b - b0 for b, b0 in zip(cluster.bytes_sent(), before)]
    for party, nbytes in zip(cluster.parties, sent):
        top = party.profiler.summary(top_level_only=True)
        assert list(top) == ["outer"]
        assert top["outer"].bytes_sent == nbytes
        assert top["outer"].rounds == 4
        inner = party.profiler.summary()
        assert inner["mul"].calls == 2 and inner["truncate"].calls == 2
        assert inner["mul"].bytes_sent + inner["truncate"].bytes_sent == nbytes
