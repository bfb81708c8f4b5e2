"""How a logical tensor lies in ciphertext slots.

A :class:`Cipher` is a list of ciphertexts of S slots each plus ``index``: an integer
tensor of the logical shape whose entries are ``ciphertext * S + slot``. Shape operations
(view, transpose, expand, slicing) act on ``index`` alone and cost nothing; element-wise
operations pair ciphertexts whose slots line up; anything else is a re-layout, done by the
client during a refresh (:mod:`secure.he.refresh`).

The canonical layout of a tensor ``[..., C]`` with ``R`` rows (the product of the leading
dims) is column-major: element ``(r, c)`` sits at flat position ``c * R' + r`` with
``R' = next_pow2(R)`` when ``R <= S`` (a ciphertext then holds ``S / R'`` whole columns,
so rotating by ``k R'`` moves whole columns: the diagonal method for plaintext matrices
and column sums by rotation), else ``R'`` = R rounded up to whole ciphertexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Plain:
    """A public (to the server) tensor: model weights, masks, constants."""

    value: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.value.shape


@dataclass
class Cipher:
    """An encrypted tensor: ciphertexts plus the slot of every logical element.

    ``period``: every ciphertext repeats with this period (a row statistic replicated over
    the columns by a rotation sum), so an element is also found at ``slot + k period``.
    ``clean``: slots that no element references hold 0 (needed before rotations mix slots).
    """

    cts: list[Any]
    index: torch.Tensor
    period: int | None = None
    clean: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return self.index.shape


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def row_stride(rows: int, slots: int) -> int:
    """R': the slot distance between two columns of the canonical layout."""
    if rows <= slots:
        return next_pow2(rows)
    return -(-rows // slots) * slots


def canonical(shape: torch.Size | list[int] | tuple[int, ...], slots: int) -> tuple[torch.Tensor, int]:
    """(index, number of ciphertexts) of the canonical layout of ``shape``."""
    shape = list(shape) or [1]
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    stride = row_stride(rows, slots)
    r = torch.arange(rows, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.int64).unsqueeze(0)
    flat = (c * stride + r).reshape(shape)
    return flat, max(1, -(-cols * stride // slots))


def is_canonical(x: Cipher, slots: int) -> bool:
    if x.period is not None:
        return False
    index, count = canonical(x.shape, slots)
    return len(x.cts) == count and torch.equal(x.index, index)


def referenced_mask(index: torch.Tensor, count: int, slots: int) -> torch.Tensor:
    """0/1 per slot of each ciphertext: 1 where some element lives."""
    mask = torch.zeros(count * slots, dtype=torch.float64)
    mask[index.reshape(-1)] = 1.0
    return mask.view(count, slots)


def scatter_values(index: torch.Tensor, values: torch.Tensor, count: int, slots: int) -> torch.Tensor:
    """Per-ciphertext slot vectors holding ``values`` (broadcast to index's shape) at
    ``index``; 0 elsewhere."""
    out = torch.zeros(count * slots, dtype=torch.float64)
    out[index.reshape(-1)] = torch.broadcast_to(values.to(torch.float64), index.shape).reshape(-1)
    return out.view(count, slots)
