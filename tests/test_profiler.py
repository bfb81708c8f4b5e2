"""The profiler's accounting: spans nest, add up, and match the transport's counters."""

from __future__ import annotations

import torch

from secure.mpc.arithmetic import mul
from secure.profile.profiler import span


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
        assert top["outer"].rounds == 4  # two products, each two rounds with its fused exact truncation
        inner = party.profiler.summary()
        assert inner["mul_trunc"].calls == 2
        assert inner["mul_trunc"].bytes_sent == nbytes
