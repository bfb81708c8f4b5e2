"""Exact matrix multiplication in the ring Z_2^64 for int64 secret shares.

Secret shares are int64 tensors whose arithmetic wraps around modulo 2^64, so a share
matmul must be the *exact* integer product reduced mod 2^64.

Why this module exists
----------------------
* On CPU, ``torch.matmul`` supports int64 and wraps modulo 2^64, which is exactly the ring
  product.  :func:`ring_matmul` uses it directly.
* On CUDA, cuBLAS has no int64 GEMM, so ``torch.matmul`` on int64 CUDA tensors is not
  available.  :func:`limb_matmul` therefore emulates the int64 product with a handful of
  float64 GEMMs on small "limbs" of the operands, each of which is exact because every
  intermediate value is an integer below 2^53 (float64 has a 53-bit significand).  This is
  the same idea CrypTen's ``CUDALongTensor`` uses.  It is device agnostic, so it is tested
  on CPU against the int64 product.

The math
--------
Read every int64 value as an unsigned 64-bit integer ``x = sum_i x_i 2^(w*i)`` with
``L = ceil(64 / w)`` limbs ``x_i = (x >> (w*i)) & (2^w - 1)`` of ``w = limb_bits`` bits (the
arithmetic right shift is harmless because of the mask; the top limb just has fewer than
``w`` significant bits when ``w`` does not divide 64).  Then, modulo 2^64,

    A @ B = sum_{i + j <= L - 1} (A_i @ B_j) << (w * (i + j))

because every pair with ``i + j >= L`` is shifted by at least 64 bits and vanishes.  For
``w = 16`` this is 10 of the 16 limb products; for ``w = 22`` (``L = 3``) it is 6 of 9.

Exactness bound
---------------
Each entry of ``A_i @ B_j`` is a sum of ``K`` (inner dimension) non-negative integer
products, each at most ``(2^w - 1)^2``.  Every partial sum a float64 GEMM can form (in any
order, blocked or with FMA) is a non-negative integer no larger than the full sum, so the
float64 result is exact iff the full sum fits, i.e. when

    K * (2^w - 1)^2 <= 2^53   <=>   K <= floor(2^53 / (2^w - 1)^2)

(see :func:`limb_max_inner_dim`).  That is ``K <= 2_097_216 = 2^21 + 64`` for ``w = 16`` and
``K <= 512`` for ``w = 22`` (``512 * (2^22 - 1)^2 = 2^53 - 2^32 + 512``).  The float64
results are then converted to int64 exactly and shifted/added in int64, where wrap-around
is the ring reduction.  :func:`limb_matmul` checks ``K`` against the bound before doing any
work and raises ``ValueError`` beyond it.

How the products are grouped (fewer, larger GEMMs)
--------------------------------------------------
The limbs of ``A`` are stacked along the row dimension, ``S = [A_0; A_1; ...; A_{L-1}]``
(shape ``(L*M, K)``, built in one vectorised op), and for each ``j`` one GEMM computes
``S[: (L-j)*M] @ B_j``, whose row block ``i`` is ``A_i @ B_j``.  That is ``L`` GEMMs (4 for
``w = 16``) with exactly the flops of the 10 needed limb products, on contiguous row slices,
and the inner dimension stays ``K`` so the bound above is unchanged.  The alternative of
grouping equal shifts by concatenating limbs along the inner dimension
(``sum_{i+j=s} A_i @ B_j = [A_0 .. A_s] @ [B_s; ..; B_0]``) also needs only 4 GEMMs but
sums up to ``L*K`` products per entry, which would cut the bound by a factor of ``L``
(``K <= 524_304`` for ``w = 16``) for no reduction in flops, and its concatenation copies
made it about 1.7x slower than the row-stacked scheme on CPU (128x768 @ 768x768), so it is
not used.  On CPU ``limb_matmul`` is roughly 5x slower than int64 ``torch.matmul`` (the 10
limb products alone cost about 10 float64 GEMMs), which is why :func:`ring_matmul` only
uses it off CPU.
"""

from __future__ import annotations

import torch

__all__ = ["limb_matmul", "limb_max_inner_dim", "ring_matmul"]

_FLOAT64_EXACT_BITS = 53
_MAX_LIMB_BITS = 26  # (2^27 - 1)^2 > 2^53: wider limbs cannot even multiply exactly once.


def limb_max_inner_dim(limb_bits: int = 16) -> int:
    """Largest inner dimension ``K`` for which :func:`limb_matmul` is exact.

    ``floor(2^53 / (2^limb_bits - 1)^2)``: every float64 limb product entry is a sum of ``K``
    integers each at most ``(2^limb_bits - 1)^2`` and must not exceed ``2^53``.

    Returns 2_097_216 (``2^21 + 64``) for ``limb_bits=16`` and 512 for ``limb_bits=22``.
    """
    _check_limb_bits(limb_bits)
    return (1 << _FLOAT64_EXACT_BITS) // ((1 << limb_bits) - 1) ** 2


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` modulo 2^64 for int64 tensors, with ``torch.matmul`` broadcasting.

    On CPU this is plain int64 ``torch.matmul`` (it wraps modulo 2^64).  On other devices
    (CUDA: cuBLAS has no int64 GEMM) it is :func:`limb_matmul`, using 22-bit limbs (6 float64
    limb products) when the inner dimension is at most 512 and 16-bit limbs (10 products)
    otherwise.

    Raises:
        TypeError: if an operand is not a tensor or not int64.
        ValueError: if the operands are on different devices, are 0-d, or their shapes do
            not multiply (inner dimensions differ or batch dimensions do not broadcast).
    """
    _validate(a, b, "ring_matmul")
    if a.device.type == "cpu":
        if b.dim() == 2 and a.dim() >= 2 and b.mT.is_contiguous() and not b.is_contiguous():
            return _cpu_matmul_transposed(a, b)
        return torch.matmul(a, b)
    k = a.shape[-1]
    limb_bits = 22 if k <= limb_max_inner_dim(22) else 16
    return limb_matmul(a, b, limb_bits=limb_bits)


def _cpu_matmul_transposed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` where ``b`` is a transposed contiguous matrix (a linear layer's ``W^T``).

    torch's int64 CPU kernel has no BLAS and walks ``b`` across its rows there; computed as
    ``(W @ a^T)^T`` (or a matrix-vector product for one row) it reads ``W`` in order:
    measured 3x faster at 16-128 rows and 15x at one row (a decode step), same exact result.
    """
    rows = a.reshape(-1, a.shape[-1])
    weight = b.mT
    out = torch.mv(weight, rows[0]).unsqueeze(0) if rows.shape[0] == 1 else torch.matmul(weight, rows.mT).mT
    return out.reshape(*a.shape[:-1], b.shape[-1])


def limb_matmul(a: torch.Tensor, b: torch.Tensor, limb_bits: int = 16) -> torch.Tensor:
    """Exact ``a @ b`` modulo 2^64 for int64 tensors via float64 GEMMs on limbs.

    Device agnostic (CPU or CUDA); same shapes and broadcasting as ``torch.matmul``.  With
    ``w = limb_bits`` and ``L = ceil(64 / w)`` unsigned limbs ``x_i = (x >> w*i) & (2^w - 1)``:

        a @ b  =  sum_{i + j <= L - 1} (a_i @ b_j) << (w * (i + j))   (mod 2^64)

    Each ``a_i @ b_j`` is computed in float64 and is exact because the inner dimension ``K``
    satisfies ``K * (2^w - 1)^2 <= 2^53`` (checked first; see :func:`limb_max_inner_dim`:
    ``K <= 2_097_216`` for ``w = 16``, ``K <= 512`` for ``w = 22``).  The needed products are
    computed in ``L`` GEMMs ``[a_0; ..; a_{L-1-j}] @ b_j`` (row-stacked limbs of ``a``).

    Args:
        a: int64 tensor, shape ``(..., M, K)`` (or ``(K,)``).
        b: int64 tensor, shape ``(..., K, N)`` (or ``(K,)``), on the same device as ``a``.
        limb_bits: limb width ``w`` in bits, 1..26; 16 (4 limbs) and 22 (3 limbs) are the
            useful choices.

    Raises:
        TypeError: if an operand is not an int64 tensor or ``limb_bits`` is not an int.
        ValueError: if devices differ, shapes do not multiply, ``limb_bits`` is out of
            range, or ``K`` exceeds the exactness bound for ``limb_bits``.
    """
    _check_limb_bits(limb_bits)
    _validate(a, b, "limb_matmul")
    k = a.shape[-1]
    k_max = limb_max_inner_dim(limb_bits)
    if k > k_max:
        raise ValueError(
            f"limb_matmul: inner dimension {k} exceeds the float64 exactness bound {k_max} "
            f"for limb_bits={limb_bits} (K * (2^{limb_bits} - 1)^2 must be <= 2^53)"
        )

    # Follow torch.matmul for 1-D operands: promote to a matrix, drop the added dim after.
    squeeze_m = a.dim() == 1
    squeeze_n = b.dim() == 1
    if squeeze_m:
        a = a.unsqueeze(0)
    if squeeze_n:
        b = b.unsqueeze(-1)

    n_limbs = -(-64 // limb_bits)
    mask = (1 << limb_bits) - 1
    m = a.shape[-2]

    # S = [a_0; a_1; ...; a_{L-1}] stacked along rows: shape (..., L*M, K), contiguous.
    shifts = torch.arange(n_limbs, device=a.device, dtype=torch.int64) * limb_bits
    a_stack = ((a.unsqueeze(-3) >> shifts.view(n_limbs, 1, 1)) & mask).to(torch.float64)
    a_stack = a_stack.reshape(*a.shape[:-2], n_limbs * m, k)

    out: torch.Tensor | None = None
    for j in range(n_limbs):
        b_j = ((b >> (limb_bits * j)) & mask).to(torch.float64)
        rows = (n_limbs - j) * m
        # Row block i of this product is a_i @ b_j, every entry an integer < 2^53: exact.
        prod = torch.matmul(a_stack[..., :rows, :], b_j).to(torch.int64)
        for i in range(n_limbs - j):
            term = prod[..., i * m : (i + 1) * m, :] << (limb_bits * (i + j))
            out = term if out is None else out.add_(term)  # int64 wrap-around = mod 2^64
            # (the first term is a fresh tensor from `<<`, so in-place adds are safe)

    assert out is not None
    if squeeze_m:  # (..., 1, N) -> (..., N); must come first for the 1-D @ 1-D case
        out = out.squeeze(-2)
    if squeeze_n:  # (..., M, 1) -> (..., M)
        out = out.squeeze(-1)
    return out


def _check_limb_bits(limb_bits: int) -> None:
    if not isinstance(limb_bits, int) or isinstance(limb_bits, bool):
        raise TypeError(f"limb_bits must be an int, got {type(limb_bits).__name__}")
    if not 1 <= limb_bits <= _MAX_LIMB_BITS:
        raise ValueError(f"limb_bits must be in [1, {_MAX_LIMB_BITS}], got {limb_bits}")


def _validate(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Check operand types, dtypes, devices and that the shapes multiply like torch.matmul."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(
            f"{name}: expected two torch.Tensor operands, got "
            f"{type(a).__name__} and {type(b).__name__}"
        )
    if a.dtype != torch.int64 or b.dtype != torch.int64:
        raise TypeError(f"{name}: expected int64 operands, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name}: operands on different devices: {a.device} and {b.device}")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(
            f"{name}: operands must be at least 1-D, got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.dim() == 1 else b.shape[-2]
    if k_a != k_b:
        raise ValueError(
            f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied "
            f"(inner dimensions {k_a} != {k_b})"
        )
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied "
            f"(batch dimensions {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])} do not "
            "broadcast)"
        ) from exc
