"""The client's sampler: greedy, temperature, top-k and top-p against their definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from client.sampling import Sampler

logits_lists = st.lists(st.integers(-2000, 2000).map(lambda v: v / 100), min_size=2, max_size=40, unique=True)


@given(logits_lists)
def test_greedy_and_degenerate_filters_pick_the_argmax(values: list[float]) -> None:
    logits = torch.tensor(values, dtype=torch.float64)
    best = int(torch.argmax(logits))
    assert Sampler()(logits) == best
    assert Sampler(temperature=1.0, top_k=1, seed=0)(logits) == best
    assert Sampler(temperature=1.0, top_p=1e-9, seed=0)(logits) == best


@given(logits_lists, st.integers(1, 10), st.floats(0.05, 1.0))
def test_filters_keep_the_right_support(values: list[float], k: int, p: float) -> None:
    logits = torch.tensor(values, dtype=torch.float64)
    probs = Sampler(temperature=0.7, top_k=k, top_p=p, seed=0).probabilities(logits)
    assert abs(float(probs.sum()) - 1.0) < 1e-9
    kept = probs > 0
    assert int(kept.sum()) <= min(k, logits.numel()) or bool((logits[kept] >= torch.topk(logits, k).values[-1]).all())
    # top-p keeps the most likely tokens first: nothing kept is less likely than something dropped
    if (~kept).any():
        assert float(logits[kept].min()) >= float(logits[~kept].max())
    # the kept set reaches p of the top-k distribution's mass
    base = Sampler(temperature=0.7, top_k=k, seed=0).probabilities(logits)
    assert float(base[kept].sum()) >= p - 1e-9


def test_temperature_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    sampler = Sampler(temperature=1.0, seed=7)
    draws = torch.tensor([sampler(logits) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logits.double(), -1), atol=0.03)
    again = Sampler(temperature=1.0, seed=7)
    assert [again(logits) for _ in range(20)] == draws[:20].tolist()


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Sampler(**kwargs)
