"""Calibration of a Power-Softmax student's denominators: the public ``upper`` and the
Goldschmidt iteration count of the secure form's division.

Every denominator ``d = eps + (1/L) sum_i m_i x_i^p`` is at least ``eps``, so the lower end
is settled by construction, not by data: the distillation trains with an ``eps`` (0.01 by
default) and :func:`choose_calibration` takes the smallest iteration count whose accuracy
range ``[lower, upper]`` (:func:`bounded_reciprocal_start`) starts at ``lower <= eps``.
No input, seen or unseen, can then put a row below the range (below it the division
underestimates; earlier students, trained with eps = 1e-6, had rows there).

The upper end depends on the data: a denominator above ``upper (1 + lower/upper)`` makes
the iteration diverge (inf on floats, and ``0 * inf`` = NaN reaches the next layer through
the masked keys). The denominators are recorded per layer and head
(:func:`record_denominators`) over every row that the secure form computes, padded query
rows included (``rows="all"``: a service pads each query to its bucket), on calibration
texts from the training pools, and ``upper`` is ``headroom`` times the largest, rounded up
to 1/2/5 x 10^k. The distillation then records the same on held-out texts and reports
how close they come to ``upper`` (never used to choose it).

PS is invariant to scaling one head's scores up to eps (:func:`align_head_scales`); the
distillation uses that once, before training, to start every head at the same scale.

Imports only ``secure.approx`` and :mod:`secure.distill.attention` of the project.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secure.approx.reciprocal import bounded_reciprocal_start
from secure.distill.attention import observe_scores, self_attention_modules

ROWS = ("real", "all")
"""Which rows :func:`row_denominators` counts: ``"real"`` (unpadded queries) or ``"all"``
(every row with an attended key, padded queries included)."""


def row_denominators(
    scores: torch.Tensor, keep: torch.Tensor | None, p: int, eps: float, rows: str = "real"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``[..., q]``: the denominator ``d = eps + (1/L) sum_i m_i x_i^p`` and a
    bool flag of the rows counted.

    ``rows="real"``: for self-attention (square scores) row i counts when its own key i is
    attended (``keep[..., i, i] = 1``). ``rows="all"``: every row with an attended key,
    padded query rows included. Padded rows never reach a real token (their keys are
    masked), but the secure form computes them too: on floats a padded row whose
    denominator exceeds ``upper`` diverges to inf and ``0 * inf`` = NaN reaches the real
    rows of the next layer, and under HE it would break the refresh bounds. A service
    pads every query to its bucket, so the public ``upper`` must cover them."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    xp = scores.pow(p)
    if keep is None:
        return xp.mean(dim=-1) + eps, torch.ones(scores.shape[:-1], dtype=torch.bool, device=scores.device)
    k = keep.to(scores.dtype)
    denom = (xp * k).sum(-1) / k.sum(-1).clamp(min=1.0) + eps
    if rows == "real" and scores.shape[-1] == scores.shape[-2]:
        real = torch.diagonal(k, dim1=-2, dim2=-1) > 0
    else:
        real = k.sum(-1) > 0
    return denom, torch.broadcast_to(real, denom.shape)


HIST_LOW: int = -12
HIST_BINS_PER_DECADE: int = 10


@dataclass
class LayerRange:
    """What one attention layer's Power-Softmax saw over real (unpadded) query rows:
    min / max of the denominator ``eps + (1/L) sum_i m_i x_i^p`` (overall and per head)
    and the largest ``|x|`` over attended entries."""

    denominator_min: float = math.inf
    denominator_max: float = 0.0
    max_abs_score: float = 0.0
    head_min: list[float] = field(default_factory=list)
    head_max: list[float] = field(default_factory=list)
    log10_hist: list[int] = field(default_factory=list)
    """Row counts per 1/HIST_BINS_PER_DECADE decade of log10(d), from 10^HIST_LOW up."""

    def update(self, denom: torch.Tensor, real: torch.Tensor, abs_scores: torch.Tensor) -> None:
        """Fold in one call's ``denom`` / ``real`` ``[b, h, q]`` and ``|x|`` ``[b, h, q, k]``."""
        heads = denom.shape[1]
        if not self.head_min:
            self.head_min, self.head_max = [math.inf] * heads, [0.0] * heads
        nbins = 2 * -HIST_LOW * HIST_BINS_PER_DECADE
        if not self.log10_hist:
            self.log10_hist = [0] * nbins
        pos = ((torch.log10(denom[real]) - HIST_LOW) * HIST_BINS_PER_DECADE).floor().clamp(0, nbins - 1)
        for i, c in enumerate(torch.bincount(pos.long(), minlength=nbins).tolist()):
            self.log10_hist[i] += c
        for h in range(heads):
            r = real[:, h]
            if bool(r.any()):
                d = denom[:, h][r]
                self.head_min[h] = min(self.head_min[h], float(d.min()))
                self.head_max[h] = max(self.head_max[h], float(d.max()))
                self.max_abs_score = max(self.max_abs_score, float(abs_scores[:, h].amax(-1)[r].max()))
        self.denominator_min = min(self.head_min)
        self.denominator_max = max(self.head_max)


    @property
    def rows(self) -> int:
        """Number of real rows recorded."""
        return sum(self.log10_hist)

    def rows_below(self, x: float) -> int:
        """Rows whose denominator is below x (to the histogram's resolution: rows in the
        bin that holds x count as below)."""
        edge = math.ceil((math.log10(x) - HIST_LOW) * HIST_BINS_PER_DECADE)
        return sum(self.log10_hist[: max(0, edge)])

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view (no histogram)."""
        return {"denominator_min": self.denominator_min, "denominator_max": self.denominator_max,
                "max_abs_score": self.max_abs_score, "head_min": self.head_min, "head_max": self.head_max,
                "rows": self.rows}


@contextlib.contextmanager
def record_denominators(model: nn.Module, p: int, eps: float, rows: str = "real"
                        ) -> Iterator[dict[int, LayerRange]]:
    """Within the block, every Power-Softmax attention call (exact or secure form) of
    ``model`` records its denominator range over the ``rows`` of :func:`row_denominators`
    into the yielded dict (key: the module's ``layer_idx``, else the order of first
    appearance)."""
    ranges: dict[int, LayerRange] = {}
    order: dict[int, int] = {}

    def record(module: nn.Module, scores: torch.Tensor, keep: torch.Tensor | None) -> None:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = order.setdefault(id(module), len(order))
        with torch.no_grad():
            s = scores.detach().to(torch.float64)
            denom, real = row_denominators(s, None if keep is None else keep.to(s.dtype), p, eps, rows)
            abs_s = s.abs() if keep is None else s.abs() * keep.to(s.dtype)
            ranges.setdefault(int(idx), LayerRange()).update(denom, real, abs_s)

    with observe_scores(model, record):
        yield ranges


def align_head_scales(model: nn.Module, ranges: dict[int, LayerRange], p: int, target: float) -> None:
    """Rescale every head's queries so that its largest denominator becomes ``target``.

    Multiplying head h's query projection (weight rows and bias) by
    ``s = (target / max_h)^(1/p)`` multiplies its scores by s and ``mean x^p`` by s^p;
    ``PS`` is invariant to that (up to eps, ``eps / d`` changes by s^-p), so the model's
    function is kept while every head's range ends at the same place, and one public
    ``upper`` covers them all with the smallest ratio ``upper / lower``. In place;
    ``ranges`` is updated to the new values (eps ignored)."""
    layers = self_attention_modules(model)
    with torch.no_grad():
        for idx, r in ranges.items():
            attn = layers[idx]
            d = attn.attention_head_size
            for h, hmax in enumerate(r.head_max):
                if not hmax > 0.0:
                    continue
                s = (target / hmax) ** (1.0 / p)
                attn.query.weight[h * d : (h + 1) * d].mul_(s)
                attn.query.bias[h * d : (h + 1) * d].mul_(s)
                r.head_min[h] *= s**p
                r.head_max[h] = target
                r.max_abs_score = math.nan  # no longer known: re-record to refresh
                r.log10_hist = []
            r.denominator_min, r.denominator_max = min(r.head_min), max(r.head_max)


def nice_ceil(x: float) -> float:
    """Smallest value of the form {1, 2, 5} * 10^k that is >= x (x > 0)."""
    if x <= 0.0:
        raise ValueError(f"x must be > 0, got {x}")
    e = math.floor(math.log10(x))
    for base in (1.0, 2.0, 5.0, 10.0):
        v = base * 10.0**e
        if v >= x * (1.0 - 1e-12):
            return v
    return 10.0 ** (e + 1)


@dataclass
class Calibration:
    """The public parameters of the secure form's division and what they cover.

    ``upper = nice_ceil(headroom * max denominator)``; ``iterations`` is the smallest
    count in ``[min_iterations, max_iterations]`` whose accuracy range ``[lower, upper]``
    (relative error <= 1e-3, :func:`bounded_reciprocal_start`) has ``lower * margin <=``
    the smallest denominator seen (``covered``), else ``max_iterations`` (not covered:
    rows below ``lower`` are underestimated).

    With ``eps`` given to :func:`choose_calibration` the lower end is guaranteed instead of
    observed: every denominator is ``eps + mean(x^p) >= eps``, so ``iterations`` is the
    smallest count with ``lower <= eps`` and ``covered`` (= ``eps_guarantee``) holds for
    every input, seen or not. Only ``upper`` then depends on the data."""

    upper: float
    iterations: int
    lower: float
    error_bound: float
    denominator_min: float
    denominator_max: float
    max_abs_score: float
    covered: bool
    fraction_below_lower: float = 0.0
    per_layer: dict[int, LayerRange] = field(default_factory=dict)
    headroom: float = 2.0
    eps_guarantee: bool = False
    """True when ``lower <= eps``: no denominator can fall below the accuracy range."""


def choose_calibration(
    ranges: dict[int, LayerRange],
    *,
    headroom: float = 2.0,
    margin: float = 2.0,
    min_iterations: int = 8,
    max_iterations: int = 16,
    eps: float | None = None,
) -> Calibration:
    """Pick ``upper`` and ``iterations`` for :func:`secure.approx.softmax.power_softmax`
    from recorded denominator ranges (see :class:`Calibration`; with ``eps``, the
    iteration count makes ``lower <= eps``).

    Each iteration is one product pass (2 rounds under MPC, one level of depth under HE)
    and halves ``log(lower / upper)``'s reach only logarithmically (``lower / upper ~
    3.45 / 2^k``), so ``max_iterations`` caps the cost; ``fraction_below_lower`` then says
    how many recorded rows fall under the accuracy range (their weights are
    underestimated: by ~3% at lower/2, ~50% at lower/10)."""
    if not ranges:
        raise ValueError("no denominators were recorded")
    dmin = min(r.denominator_min for r in ranges.values())
    dmax = max(r.denominator_max for r in ranges.values())
    upper = nice_ceil(headroom * dmax)
    chosen = max_iterations
    for k in range(min_iterations, max_iterations + 1):
        _, lower, _ = bounded_reciprocal_start(upper, k)
        if (lower <= eps) if eps is not None else (lower * margin <= dmin):
            chosen = k
            break
    _, lower, bound = bounded_reciprocal_start(upper, chosen)
    guaranteed = eps is not None and lower <= eps
    rows = sum(r.rows for r in ranges.values())
    below = sum(r.rows_below(lower) for r in ranges.values())
    return Calibration(
        upper=upper,
        iterations=chosen,
        lower=lower,
        error_bound=bound,
        denominator_min=dmin,
        denominator_max=dmax,
        max_abs_score=max(r.max_abs_score for r in ranges.values()),
        covered=guaranteed if eps is not None else lower * margin <= dmin,
        fraction_below_lower=below / rows if rows else 0.0,
        per_layer=dict(sorted(ranges.items())),
        headroom=headroom,
        eps_guarantee=guaranteed,
    )

