"""Secure embedding: the client's PRG-compressed one-hot and PUMA's equality one-hot."""

from __future__ import annotations

import pytest
import torch

from secure.mpc import shares as sh
from secure.mpc.embedding import SeededComponent, client_onehot_shares, embed, puma_onehot
from secure.mpc.engine import PartyFailure


def test_client_onehot_shares_reconstruct_and_compress():
    ids = torch.tensor([3, 0, 7, 7, 1])
    parts = client_onehot_shares(ids, vocab_size=10)
    pairs = [(p.first, p.second) for p in parts]
    dense = [tuple(c.expand(p.shape, "cpu") if isinstance(c, SeededComponent) else c for c in pair)
             for pair, p in zip(pairs, parts)]
    onehot = sh.reconstruct(dense)
    assert torch.equal(onehot, torch.nn.functional.one_hot(ids, 10))
    assert parts[0].wire_bytes == 32  # two seeds
    assert parts[1].wire_bytes == parts[2].wire_bytes == 5 * 10 * 8 + 16
    # the dense component is not the one-hot itself
    assert not torch.equal(parts[1].second, onehot)


def test_client_onehot_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        client_onehot_shares(torch.tensor([1, 10]), 10)
    with pytest.raises(TypeError, match="integer tensor"):
        client_onehot_shares(torch.tensor([1.0]), 10)


def test_embedding_lookup_both_ways(runner, cluster):
    vocab, width = 50, 6
    table = torch.randn(vocab, width, dtype=torch.float64)
    ids = torch.tensor([4, 49, 0, 4, 17])
    table_sh = runner.share(table)
    expected = runner.fp.decode(runner.fp.encode(table))[ids]

    onehot = client_onehot_shares(ids, vocab)
    out = runner.run(lambda p, o, t: embed(p, o.expand(p.id, p.device), t), onehot, table_sh)
    assert torch.equal(out, expected)
    assert runner.rounds_of(lambda p, o, t: embed(p, o.expand(p.id, p.device), t), onehot, table_sh) == 1

    id_sh = runner.share(ids, integral=True)
    out = runner.run(lambda p, i, t: embed(p, puma_onehot(p, i, vocab), t), id_sh, table_sh)
    assert torch.equal(out, expected)


def test_embed_checks_shapes(cluster, runner):
    onehot = client_onehot_shares(torch.tensor([1]), 8)
    table = runner.share(torch.zeros(9, 2, dtype=torch.float64))
    with pytest.raises(PartyFailure, match="does not match the table's 9 rows"):
        cluster.run(lambda p, o, t: embed(p, o.expand(p.id), t), [(onehot[i], table[i]) for i in range(3)])
