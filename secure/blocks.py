"""A BERT encoder layer written once against :class:`SecureOps`.

The same function runs on plaintext floats (the fidelity of the secure forms alone) and on
three-party shares. It is the hand-written reference block for demos and benchmarks;
whole models go through graph capture and rewriting instead.

Post-LN BERT layer, hidden H, ``heads`` heads of width d = H / heads, sequence L:
    qkv = x W_qkv + b_qkv                       (W_q, b_q pre-scaled by 1/sqrt(d))
    P   = softmax(q k^T + mask_bias)            (per head; PUMA softmax)
    h   = LayerNorm(x + (P v) W_o + b_o)
    out = LayerNorm(h + GeLU(h W_1 + b_1) W_2 + b_2)   (PUMA GeLU)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Generic

import torch

from secure.approx.gelu import puma_gelu
from secure.approx.interface import SecureOps, T
from secure.approx.norms import layer_norm
from secure.approx.softmax import puma_softmax

Trace = Callable[[str], AbstractContextManager]


def _no_trace(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class EncoderWeights(Generic[T]):
    """Weights of one layer, each a secret of the backend's type (torch layout: x @ W)."""

    w_qkv: T
    b_qkv: T
    w_o: T
    b_o: T
    ln1_gamma: T
    ln1_beta: T
    w_1: T
    b_1: T
    w_2: T
    b_2: T
    ln2_gamma: T
    ln2_beta: T

    def map(self, fn: Callable[[object], object]) -> EncoderWeights:
        return EncoderWeights(*(fn(getattr(self, f.name)) for f in fields(self)))


def random_encoder_weights(hidden: int, heads: int, ffn: int, seed: int = 0
                           ) -> EncoderWeights[torch.Tensor]:
    """Plaintext float64 weights with BERT-like scales (a demo model, not a trained one)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    w_qkv = rnd(hidden, 3 * hidden, std=hidden**-0.5)
    b_qkv = rnd(3 * hidden, std=0.02)
    scale = (hidden // heads) ** -0.5
    w_qkv[:, :hidden] *= scale  # the owner folds 1/sqrt(d) into W_q and b_q
    b_qkv[:hidden] *= scale
    return EncoderWeights(
        w_qkv, b_qkv, rnd(hidden, hidden, std=hidden**-0.5), rnd(hidden, std=0.02),
        1 + rnd(hidden, std=0.1), rnd(hidden, std=0.05),
        rnd(hidden, ffn, std=hidden**-0.5), rnd(ffn, std=0.02),
        rnd(ffn, hidden, std=ffn**-0.5), rnd(hidden, std=0.02),
        1 + rnd(hidden, std=0.1), rnd(hidden, std=0.05),
    )


def encoder_layer(ops: SecureOps[T], x: T, w: EncoderWeights[T], heads: int,
                  mask_bias: torch.Tensor | None = None, trace: Trace = _no_trace) -> T:
    """One post-LN BERT layer on x of shape (L, H); ``mask_bias`` (L,) or (L, L) is public."""
    seq, hidden = ops.shape(x)
    d = hidden // heads

    def split_heads(t: torch.Tensor, part: int) -> torch.Tensor:
        return t[:, part * hidden:(part + 1) * hidden].reshape(seq, heads, d).transpose(0, 1)

    with trace("attention.qkv"):
        qkv = ops.add(ops.matmul(x, w.w_qkv), w.b_qkv)
        q = ops.map_shape(qkv, lambda t: split_heads(t, 0))
        k_t = ops.map_shape(qkv, lambda t: split_heads(t, 1).transpose(1, 2))
        v = ops.map_shape(qkv, lambda t: split_heads(t, 2))
    with trace("attention.scores"):
        scores = ops.matmul(q, k_t)
    with trace("attention.softmax"):
        probs = puma_softmax(ops, scores, mask_bias=mask_bias)
    with trace("attention.context"):
        ctx = ops.matmul(probs, v)
        ctx = ops.map_shape(ctx, lambda t: t.transpose(0, 1).reshape(seq, hidden))
    with trace("attention.output"):
        attn = ops.add(ops.matmul(ctx, w.w_o), w.b_o)
    with trace("layernorm.1"):
        h = layer_norm(ops, ops.add(x, attn), w.ln1_gamma, w.ln1_beta)
    with trace("ffn.up"):
        up = ops.add(ops.matmul(h, w.w_1), w.b_1)
    with trace("ffn.gelu"):
        act = puma_gelu(ops, up)
    with trace("ffn.down"):
        down = ops.add(ops.matmul(act, w.w_2), w.b_2)
    with trace("layernorm.2"):
        return layer_norm(ops, ops.add(h, down), w.ln2_gamma, w.ln2_beta)


def reference_encoder_layer(x: torch.Tensor, w: EncoderWeights[torch.Tensor], heads: int,
                            mask_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exact layer in plain torch (exact GeLU, softmax and LayerNorm)."""
    seq, hidden = x.shape
    d = hidden // heads
    qkv = x @ w.w_qkv + w.b_qkv
    q, k, v = (qkv[:, i * hidden:(i + 1) * hidden].reshape(seq, heads, d).transpose(0, 1)
               for i in range(3))
    scores = q @ k.transpose(1, 2)
    if mask_bias is not None:
        scores = scores + mask_bias
    ctx = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(seq, hidden)
    ln = torch.nn.functional.layer_norm
    h = ln(x + ctx @ w.w_o + w.b_o, (hidden,), w.ln1_gamma, w.ln1_beta, eps=1e-12)
    f = torch.nn.functional.gelu(h @ w.w_1 + w.b_1) @ w.w_2 + w.b_2
    return ln(h + f, (hidden,), w.ln2_gamma, w.ln2_beta, eps=1e-12)
