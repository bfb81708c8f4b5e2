"""What a Power-Softmax student is trained towards and measured by: sentence embeddings
(mean pooling, as sentence-transformers), their cosine against the teacher's, the
distillation loss and the optional penalty that keeps denominators inside a window.

The loss is ``(1/(N+1)) sum_l MSE(h_l^S, h_l^T)`` over unmasked tokens (every hidden
state, embeddings included) plus ``(1 - cos(e^S, e^T))`` averaged over the batch, where
``e`` is the mean-pooled sentence embedding (:func:`distillation_loss`).

Imports only :mod:`secure.distill.attention` of the project.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from secure.distill.attention import observe_scores


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding ``e = sum_t m_t h_t / max(1e-9, sum_t m_t)`` (sentence-transformers'
    mean pooling over the attention mask; not normalised)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


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


@contextlib.contextmanager
def range_penalty(model: nn.Module, p: int, eps: float, window: tuple[float, float], rows: str = "real"
                  ) -> Iterator[list[torch.Tensor]]:
    """Collect, per Power-Softmax attention call of ``model``, ``mean_rows (relu(log(lo/d))
    + relu(log(d/hi)))^2`` over the rows' denominators d (differentiable): keeps d
    inside a window whose ratio the bounded reciprocal covers with few iterations.
    ``rows``: ``"real"`` (unpadded queries) or ``"all"`` (padded queries too, which the
    secure form computes as well; see :func:`secure.distill.calibrate.row_denominators`)."""
    terms: list[torch.Tensor] = []
    lo, hi = math.log(window[0]), math.log(window[1])

    def hook(module: nn.Module, scores: torch.Tensor, keep: torch.Tensor | None) -> None:
        xp = scores.pow(p)
        if keep is None:
            denom = xp.mean(-1) + eps
            real = torch.ones_like(denom)
        else:
            denom = (xp * keep).sum(-1) / keep.sum(-1).clamp(min=1.0) + eps
            square = scores.shape[-1] == scores.shape[-2]
            real = torch.diagonal(keep, dim1=-2, dim2=-1) if square and rows == "real" else (
                keep.sum(-1) > 0).to(scores.dtype)
        ld = torch.log(denom)
        out = (torch.relu(lo - ld) + torch.relu(ld - hi)).pow(2)
        terms.append((out * real).sum() / real.sum().clamp(min=1.0))

    with observe_scores(model, hook):
        yield terms
