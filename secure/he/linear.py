"""Arithmetic across the slots of the column-major layout: linear layers by the diagonal
method (baby-step giant-step rotations), products of two ciphertext matrices on k-slabs, and
sums over the last dim, on a :class:`~secure.he.engine.SealEngine` or the planner's
:class:`~secure.he.engine.GhostEngine` (the same calls, so the planner counts the real
rotations and products).

The layout (:func:`secure.he.layout.canonical`): element ``[..., c]`` of a tensor with R rows
lies in slot ``c * stride + r`` (``stride = row_stride(R)``), spilling over to the next
ciphertext. Every function here takes ciphers already laid out as it says and with the
levels it needs: re-layouts and refreshes are the caller's (:mod:`secure.he.ops`). This
module never imports the ops, the refresh session or the planner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure.he.engine import GhostEngine, SealEngine
from secure.he.layout import Cipher, canonical, next_pow2, row_stride
from secure.he.plain_cache import weight_key


def add_all(engine: SealEngine | GhostEngine, cts: Sequence[Any]) -> Any:
    """The sum of the ciphertexts, added left to right."""
    acc = cts[0]
    for ct in cts[1:]:
        acc = engine.add(acc, ct)
    return acc


def rotate_sum(engine: SealEngine | GhostEngine, ct: Any, step: int) -> Any:
    """ct plus its rotations by step, 2 step, 4 step, ... below the slot count: every block of
    ``step`` slots ends up holding the sum of all blocks (log2(slots / step) rotations)."""
    while step < engine.slots:
        ct = engine.add(ct, engine.rotate(ct, step))
        step *= 2
    return ct


# ---- sums over the last dim ------------------------------------------------------------------
def sum_columns(engine: SealEngine | GhostEngine, x: Cipher) -> Cipher:
    """x[..., C] summed over its last dim, kept as a dim of 1 (x canonical and clean). Within
    a ciphertext the row sum ends up in every column slab (the result is periodic: broadcasting
    it back over the columns is free); columns spanning whole ciphertexts are added as such."""
    slots = engine.slots
    rows = math.prod(x.shape[:-1])
    stride = row_stride(rows, slots)
    index = torch.arange(rows, dtype=torch.int64).view([*x.shape[:-1], 1])
    if stride > slots:
        per = stride // slots
        accs = [add_all(engine, [x.cts[c * per + j] for c in range(x.shape[-1])]) for j in range(per)]
        return Cipher(accs, index, None, True)
    acc = rotate_sum(engine, add_all(engine, x.cts), stride)
    return Cipher([acc], index, stride if stride < slots else None, stride >= slots)


# ---- encrypted @ plaintext (linear layers) -----------------------------------------------------
def matmul_plain(engine: SealEngine | GhostEngine, x: Cipher, w: torch.Tensor) -> Cipher:
    """x[..., K] @ w[K, N] (w 2-D; x canonical and clean, all ciphertexts at one level with a
    level left): one plaintext-product level, the result canonical and clean."""
    k_in, n_out = w.shape
    rows = math.prod(x.shape[:-1])
    stride = row_stride(rows, engine.slots)
    index, count = canonical([*x.shape[:-1], n_out], engine.slots)
    wn = w.to(torch.float64).numpy()
    if stride > engine.slots:
        return Cipher(_column_products(engine, x.cts, wn, stride // engine.slots), index, None, True)
    return Cipher(_diagonal_products(engine, x.cts, wn, stride, count), index, None, True)


def _column_products(engine: SealEngine | GhostEngine, cts: list[Any], wn: np.ndarray, per: int) -> list[Any]:
    """Columns spanning ``per`` whole ciphertexts: output column j, part q is
    ``sum_i w[i, j] x[i, q]``, scalar products only."""
    k_in, n_out = wn.shape
    out = []
    for j in range(n_out):
        for q in range(per):
            terms = [(cts[i * per + q], float(wn[i, j])) for i in range(k_in) if wn[i, j] != 0.0]
            out.append(engine.mul_plain_sum(terms) if terms else engine.mul_plain(cts[q], 0.0))
    return out


def _diagonal_products(engine: SealEngine | GhostEngine, cts: list[Any], wn: np.ndarray, stride: int,
                       count: int) -> list[Any]:
    """The diagonal method on blocks of ``stride`` slots (see :func:`diagonal_products`), on the
    engine's worker processes when it has them (``engine.pool``, :mod:`secure.he.pool`)."""
    pool = getattr(engine, "pool", None)
    if pool is not None:
        return pool.diagonal_products(engine, cts, wn, stride, count)
    return diagonal_products(engine, cts, wn, stride, count)


def diagonal_products(engine: SealEngine | GhostEngine, cts: Sequence[Any], wn: np.ndarray, stride: int,
                      count: int, inputs: Sequence[int] | None = None,
                      outputs: Sequence[int] | None = None) -> list[Any]:
    """The diagonal method on blocks of ``stride`` slots: output ciphertext ``go`` sums, over the
    input ciphertexts and the ``blocks`` diagonals of w's padded block matrix, each rotated input
    times its diagonal; baby steps rotate the inputs (``baby`` rotations each), giant steps the
    partial sums (``blocks / baby`` rotations per output).

    ``inputs`` / ``outputs`` (default: all) restrict the work to a part: the result has one
    ciphertext per output in ``outputs``, summed over the input ciphertexts in ``inputs`` only
    (``cts`` holds those, in that order), so parts over disjoint inputs add up to the whole.

    An input ciphertext holding at most half its ``blocks`` columns (the last one of MiniLM's
    384 = 1.5 x 256 at 16 tokens) is first made periodic: its ``P = next_pow2(columns)``
    columns copied over the whole ciphertext (``log2(blocks / P)`` rotations and adds; the
    unused columns are 0, the input being clean), so that ``P`` diagonals cover all its rows
    instead of ``blocks`` (:func:`_input_period`): MiniLM's query-key-value, output and FFN-up
    layers take a quarter fewer plaintext products, a whole query 16% fewer (60 856 -> 50 884)."""
    inputs = list(range(len(cts))) if inputs is None else list(inputs)
    outputs = list(range(count)) if outputs is None else list(outputs)
    if len(cts) != len(inputs):
        raise ValueError(f"{len(cts)} ciphertexts for the {len(inputs)} inputs of this part")
    blocks = engine.slots // stride
    n_in = -(-wn.shape[0] // blocks)
    wp = np.zeros((n_in * blocks, count * blocks))
    wp[:wn.shape[0], :wn.shape[1]] = wn
    baby = 1 << math.ceil(math.log2(blocks) / 2)
    # the diagonals' cache key, by content and layout; None where the engine keeps no cache (the planner's)
    key = weight_key(wn, stride, count, n_in) if getattr(engine, "plain_cache", None) is not None else None
    periods = {g: _input_period(wn.shape[0], g, blocks) for g in inputs}
    rotated = {}
    for g, ct in zip(inputs, cts):
        ct = _periodic(engine, ct, periods[g], blocks, stride)
        rotated[g] = [ct if i == 0 else engine.rotate(ct, i * stride) for i in range(min(baby, periods[g]))]
    out = []
    for go in outputs:
        total = None
        for j in range(blocks // baby):
            part = _giant_step(engine, rotated, periods, wp[:, go * blocks:(go + 1) * blocks], j, baby, stride,
                               None if key is None else (key, go))
            if part is not None:
                total = part if total is None else engine.add(total, part)
        out.append(total if total is not None else engine.mul_plain(cts[0], 0.0))
    return out


def _input_period(rows: int, g: int, blocks: int) -> int:
    """The column period input ciphertext g is given: ``next_pow2`` of the columns it holds
    when that is at most half of ``blocks``, else ``blocks`` (left as it is)."""
    period = next_pow2(max(1, min(blocks, rows - g * blocks)))
    return period if 2 * period <= blocks else blocks


def _periodic(engine: SealEngine | GhostEngine, ct: Any, period: int, blocks: int, stride: int) -> Any:
    """ct's first ``period`` columns repeated over all ``blocks`` (its other columns are 0):
    each step adds the ciphertext moved right by the columns filled so far."""
    filled = period
    while filled < blocks:
        ct = engine.add(ct, engine.rotate(ct, engine.slots - filled * stride))
        filled *= 2
    return ct


def _giant_step(engine: SealEngine | GhostEngine, rotated: dict[int, list[Any]], periods: dict[int, int],
                wcol: np.ndarray, j: int, baby: int, stride: int, key: tuple[bytes, int] | None = None) -> Any | None:
    """Giant step j of one output ciphertext (``wcol``: its block columns of w): the sum over
    input ciphertexts g and baby steps i of ``rotated[g][i]`` times diagonal ``d = j baby + i``
    (pre-rotated back), rotated by ``j baby stride``; None when all those diagonals are 0. An
    input of column period ``P = periods[g]`` has diagonals ``d < P`` only, slot b reading its
    row ``(b + d) mod P``. ``key``: (weight key, output ciphertext) for the plaintext cache."""
    blocks = wcol.shape[1]
    b = np.arange(blocks)
    terms, keys = [], []
    for g, rots in rotated.items():
        for i in range(min(baby, periods[g] - j * baby)):
            diag = wcol[g * blocks + (b + j * baby + i) % periods[g], b]
            if diag.any():  # the slot vector is made only if the cache lacks it
                terms.append((rots[i], lambda diag=diag: np.roll(np.repeat(diag, stride), j * baby * stride)))
                keys.append(None if key is None else (*key, j, g, i))
    if not terms:
        return None
    part = engine.mul_plain_sum(terms, keys)
    return engine.rotate(part, j * baby * stride) if j else part


# ---- encrypted @ encrypted (attention) ---------------------------------------------------------
@dataclass(frozen=True)
class SlabLayout:
    """Where the terms of ``x[..., M, K] @ y[..., K, N]`` meet: term (m, n, k) of both operands
    lies in slot ``target[..., m, n, k] = k slab + n stride + row`` (k-slabs of ``slab`` slots,
    ``k_pad`` of them over ``count`` ciphertexts per operand); ``x_source`` / ``y_source`` name
    the element of x / y each target position holds (what the re-layout gathers)."""

    target: torch.Tensor
    x_source: torch.Tensor
    y_source: torch.Tensor
    count: int
    slab: int
    k_pad: int
    out_shape: list[int]


def slab_layout(x: Cipher, y: Cipher, slots: int) -> SlabLayout:
    """The k-slab layout of ``x @ y`` (batch dims broadcast)."""
    m, k = x.shape[-2], x.shape[-1]
    k2, n = y.shape[-2], y.shape[-1]
    if k != k2:
        raise ValueError(f"matmul shapes {tuple(x.shape)} @ {tuple(y.shape)}")
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    rows = math.prod(batch) * m
    stride = row_stride(rows, slots)
    slab = n * stride
    slab = -(-slab // slots) * slots if slab >= slots else next_pow2(slab)
    per_ct = max(1, slots // slab)
    k_pad = -(-k // per_ct) * per_ct
    row = torch.arange(rows, dtype=torch.int64).view(*batch, m, 1, 1)
    col = torch.arange(n, dtype=torch.int64).view(1, n, 1)
    kk = torch.arange(k, dtype=torch.int64).view(1, 1, k)
    full = [*batch, m, n, k]
    x_source = torch.broadcast_to(x.index, [*batch, m, k]).unsqueeze(-2).expand(full)
    y_source = torch.broadcast_to(y.index, [*batch, k, n]).transpose(-1, -2).unsqueeze(-3).expand(full)
    return SlabLayout(kk * slab + col * stride + row, x_source, y_source, k_pad * slab // slots, slab, k_pad,
                      [*batch, m, n])


def sum_slabs(engine: SealEngine | GhostEngine, prods: list[Any], layout: SlabLayout) -> Cipher:
    """The products of the slab layout (:meth:`~secure.he.engine.SealEngine.mul_lazy`: not yet
    relinearised nor rescaled) summed over k, each sum then finished once (one key switch and
    one rescale per output ciphertext instead of one per product): whole ciphertexts when a
    slab spans them (canonical, clean), else adds and rotations within one ciphertext
    (periodic by the slab)."""
    slots = engine.slots
    index, out_count = canonical(layout.out_shape, slots)
    if layout.slab >= slots:
        per = layout.slab // slots
        sums = [engine.finish_product(add_all(engine, [prods[kk * per + j] for kk in range(layout.k_pad)]))
                for j in range(min(per, out_count))]
        return Cipher(sums, index, None, True)
    total = rotate_sum(engine, engine.finish_product(add_all(engine, prods)), layout.slab)
    return Cipher([total], index, layout.slab, False)
