"""Power-Softmax attention for BERT-style Hugging Face models (DESIGN.md sec. 4).

Power-Softmax (Zimerman et al. 2024) replaces every attention softmax by

    PS(x)_j = m_j x_j^p / (eps + (1/L) sum_i m_i x_i^p),      L = sum_i m_i,

over the last dimension (the keys), with ``x = q k^T / sqrt(d)`` the scaled scores, ``p``
even, ``m`` the public 0/1 padding mask (1 = attend) and ``eps`` =
:data:`secure.approx.softmax.POWER_SOFTMAX_EPS`. It needs no max and no comparison, so it
is far cheaper under MPC and HE (:func:`secure.approx.softmax.power_softmax` is the secure
form: the same formula with the division done by Goldschmidt on a public bound ``upper``),
but a pretrained model does not survive the swap (MiniLM: sentence-embedding cosine 0.03-
0.06), so the model is distilled against the original (:mod:`secure.distill.train`).

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

This module owns the function (:func:`power_softmax_exact`), the two transformers
attention implementations (exact, and the secure form on floats), switching a model to
them (:func:`use_power_softmax`) and observing the scores of one model's attention calls
(:func:`observe_scores`: the observer is held by that model's attention modules, no global
state). It imports only ``secure.approx`` of the project.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from secure.approx.float_backend import FloatOps
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

ScoreObserver = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], None]
"""Called with (attention module, scaled scores, keep mask or None) by every Power-Softmax
attention call of an observed model (:func:`observe_scores`)."""

_OBSERVER_ATTR = "_power_softmax_observer"
"""Attribute of an attention module that holds its :data:`ScoreObserver` while observed."""


def check_p(p: int) -> None:
    """Raise ValueError unless ``p`` is an even integer >= 2 (odd powers change sign)."""
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
    check_p(p)
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


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The ``BertSelfAttention``-like modules (query/key/value projections and a head size):
    those transformers passes to the attention function."""
    return [mod for mod in model.modules()
            if all(hasattr(mod, a) for a in ("query", "key", "value", "attention_head_size"))]


def self_attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``layer_idx -> BertSelfAttention``-like module (has query/key/value and layer_idx)."""
    found: dict[int, nn.Module] = {}
    for mod in _attention_modules(model):
        idx = getattr(mod, "layer_idx", None)
        found[len(found) if idx is None else int(idx)] = mod
    return found


@contextlib.contextmanager
def observe_scores(model: nn.Module, observer: ScoreObserver) -> Iterator[None]:
    """Within the block, every Power-Softmax attention call (exact or secure form) of
    ``model`` calls ``observer(module, scores, keep)`` before computing its weights.

    The observer is set on the model's attention modules (query/key/value projections, as
    in BERT) and removed on exit (an enclosing observer of the same model is restored), so
    other models, a frozen teacher included, are never observed."""
    modules = _attention_modules(model)
    previous = [mod.__dict__.get(_OBSERVER_ATTR) for mod in modules]
    for mod in modules:
        setattr(mod, _OBSERVER_ATTR, observer)
    try:
        yield
    finally:
        for mod, prev in zip(modules, previous, strict=True):
            if prev is None:
                delattr(mod, _OBSERVER_ATTR)
            else:
                setattr(mod, _OBSERVER_ATTR, prev)


def _observe(module: nn.Module, scores: torch.Tensor, keep: torch.Tensor | None) -> None:
    observer = module.__dict__.get(_OBSERVER_ATTR)
    if observer is not None:
        observer(module, scores, keep)


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
    _observe(module, scores, keep)
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
    _observe(module, scores, keep)
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
    check_p(p)
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
