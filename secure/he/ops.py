"""HeOps: the secure-form interface (:class:`secure.approx.interface.SecureOps`) over CKKS.

Values are :class:`~secure.he.layout.Cipher` (the client's data, encrypted under its
key) or :class:`~secure.he.layout.Plain` (the model owner's weights and every public
constant: the server holds the model in the clear in HE mode). The forms in
``secure.approx`` run unchanged; what costs what:

* add / sub, adding a public value: no level;
* a product (ciphertext-ciphertext or by a real public value): one level;
* ``matmul`` by a plaintext matrix: the diagonal method with baby-step giant-step
  rotations on the column-major layout, one level;
* ``matmul`` of two ciphertexts (attention): a re-layout through the client puts
  ``x[..., m, k]`` and ``y[..., k, n]`` in the same slot, then one product and a sum
  over k (whole ciphertexts, or rotations for small shapes);
* ``sum`` over the last dim: adds of ciphertexts and log2 rotations; the result is
  replicated over the columns, so broadcasting it back costs nothing;
* comparisons, max and frexp do not exist under CKKS and raise :class:`HeUnsupportedError`.

This module owns the slot layout of results and the element-wise work. The arithmetic
across slots (linear layers, ciphertext products, column sums) is :mod:`secure.he.linear`;
every trip through the client (a refresh when levels run out, a re-layout when slots do
not line up, the outputs' finishing) goes through the
:class:`~secure.he.refresh.RefreshSession` HeOps is given. It never imports the planner or
the transport.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from secure.he.layout import Cipher, Plain, canonical, is_canonical, referenced_mask, scatter_values
from secure.he.linear import matmul_plain, slab_layout, sum_columns, sum_slabs
from secure.he.refresh import OUTPUTS, RefreshSession

Value = Cipher | Plain

_ON_PLAIN = {"add": torch.add, "sub": torch.sub, "mul": torch.mul}


class HeUnsupportedError(RuntimeError):
    """An operation with no CKKS form (comparison, max, frexp)."""


class HeOps:
    """SecureOps over CKKS ciphertexts (SealEngine) or level counters (GhostEngine): the engine
    and every trip through the client are ``session``'s (a
    :class:`~secure.he.refresh.RefreshSession`, or the planner's ghost one)."""

    def __init__(self, session: RefreshSession) -> None:
        self.session = session
        self.engine = session.engine
        self.slots = session.engine.slots

    # ---- shape ---------------------------------------------------------------------
    def shape(self, x: Value) -> torch.Size:
        return x.shape

    def from_public(self, c: torch.Tensor) -> Plain:
        return Plain(torch.as_tensor(c, dtype=torch.float64))

    def map_shape(self, x: Value, fn: Callable[[torch.Tensor], torch.Tensor]) -> Value:
        if isinstance(x, Plain):
            return Plain(fn(x.value))
        index = fn(x.index)
        clean = x.clean
        if index.numel() < x.index.numel() and index.unique().numel() < x.index.unique().numel():
            clean = False  # slots that lost their element still hold it
        return Cipher(x.cts, index, x.period, clean)

    def concat(self, xs: Sequence[Value], dim: int) -> Value:
        if all(isinstance(x, Plain) for x in xs):
            return Plain(torch.cat([x.value for x in xs], dim))
        cts: list[Any] = []
        parts: list[torch.Tensor] = []
        clean = True
        for x in xs:
            c = self.encrypt_public(x.value) if isinstance(x, Plain) else x
            parts.append(c.index + len(cts) * self.slots)
            cts.extend(c.cts)
            clean = clean and c.clean and c.period is None
        return Cipher(cts, torch.cat(parts, dim), None, clean)

    def encrypt_public(self, value: torch.Tensor) -> Cipher:
        """A public tensor as a ciphertext (the server holds the client's public key)."""
        index, count = canonical(value.shape, self.slots)
        vecs = scatter_values(index, value, count, self.slots).numpy()
        return Cipher([self.engine.encrypt(v) for v in vecs], index.reshape(value.shape))

    # ---- layout ----------------------------------------------------------------------
    def _plain_vectors(self, x: Cipher, values: torch.Tensor) -> np.ndarray:
        """Slot vectors with ``values`` at every slot of x's elements (and their periodic copies)."""
        shape = torch.broadcast_shapes(x.shape, values.shape)
        if shape != x.shape:
            raise ValueError(f"a public operand of shape {tuple(values.shape)} would broadcast the "
                             f"encrypted {tuple(x.shape)} to {tuple(shape)}")
        index = x.index
        vals = torch.broadcast_to(values.to(torch.float64), shape)
        if x.period is not None:  # write every periodic copy, so the result stays periodic
            copies = torch.arange(0, self.slots, x.period, dtype=torch.int64)
            first = (index // self.slots) * self.slots + (index % self.slots) % x.period
            index = first.unsqueeze(-1) + copies
            vals = vals.unsqueeze(-1).expand(index.shape)
        out = np.zeros((len(x.cts), self.slots))
        out.reshape(-1)[index.reshape(-1).numpy()] = vals.reshape(-1).numpy()
        return out

    def _distinct(self, x: Cipher) -> Cipher:
        """x with one slot per element (a re-layout if an expand made elements share slots,
        since a public operand may give them different values)."""
        if x.index.unique().numel() == x.index.numel():
            return x
        return self.session.relayout([(x, canonical(x.shape, self.slots)[0])])[0]

    def _cleaned(self, x: Cipher) -> Cipher:
        """x with every unreferenced slot set to 0 (a product with a 0/1 mask: one level;
        CKKS cannot encode a mask at scale 1, its coefficients would round to 0)."""
        if x.clean and x.period is None:
            return x
        masks = referenced_mask(x.index, len(x.cts), self.slots).numpy()
        self.session.ensure_levels([x])
        return Cipher([self.engine.mul_plain(ct, m) for ct, m in zip(x.cts, masks)], x.index, None, True)

    def _canonical(self, x: Cipher) -> Cipher:
        """x in the canonical layout, clean (a mask product, or a re-layout)."""
        if is_canonical(Cipher(x.cts, x.index), self.slots):
            return self._cleaned(x)
        target, _ = canonical(x.shape, self.slots)
        return self.session.relayout([(x, target)])[0]

    def _one_level(self, x: Cipher) -> Cipher:
        """x with all its ciphertexts at their lowest level (one plaintext product level)."""
        low = min(self.engine.level(c) for c in x.cts)
        if all(self.engine.level(c) == low for c in x.cts):
            return x
        if low <= self.engine.floor:
            return self.session.refresh([x])[0]
        return Cipher([self.engine.lower_to(c, low) for c in x.cts], x.index, x.period, x.clean)

    def _pair(self, x: Cipher, y: Cipher) -> tuple[Cipher, Cipher, torch.Tensor, list[tuple[int, int]], int | None]:
        """Align two ciphers element-wise: (x, y, result index, ciphertext pairs, period);
        re-lays both out canonically (one trip) when their slots do not line up."""
        shape = torch.broadcast_shapes(x.shape, y.shape)
        xi = torch.broadcast_to(x.index, shape).reshape(-1)
        yi = torch.broadcast_to(y.index, shape).reshape(-1)
        if not _aligned(x, y, xi % self.slots, yi % self.slots):
            target, _ = canonical(shape, self.slots)
            return self._pair(*self.session.relayout([(x, target), (y, target)]))
        slot = (yi if x.period is not None and y.period is None else xi) % self.slots
        period = x.period if (x.period is not None and x.period == y.period) else None
        key = (xi // self.slots) * (len(y.cts) + 1) + yi // self.slots
        uniq, inverse = torch.unique(key, return_inverse=True)
        pairs = [(int(k) // (len(y.cts) + 1), int(k) % (len(y.cts) + 1)) for k in uniq]
        return x, y, (inverse * self.slots + slot).view(shape), pairs, period

    # ---- element-wise ----------------------------------------------------------------
    def _binary(self, x: Value, y: Value, op: str) -> Value:
        if isinstance(x, Plain) and isinstance(y, Plain):
            return Plain(_ON_PLAIN[op](x.value, y.value))
        if isinstance(x, Cipher) and isinstance(y, Cipher):
            return self._binary_ciphers(x, y, op)
        c, p, swapped = (x, y, False) if isinstance(x, Cipher) else (y, x, True)
        shape = torch.broadcast_shapes(c.shape, p.shape)
        if shape != c.shape:
            c = self.map_shape(c, lambda t: torch.broadcast_to(t, shape))
        if op == "mul":
            return self.mul_public(c, p.value)
        if op == "sub" and swapped:
            return self.add_public(self.neg(c), p.value)
        return self.add_public(c, p.value if op == "add" else -p.value)

    def _binary_ciphers(self, x: Cipher, y: Cipher, op: str) -> Cipher:
        if op == "mul":
            self.session.ensure_levels([x, y])
        x, y, index, pairs, period = self._pair(x, y)
        fn = {"add": self.engine.add, "sub": self.engine.sub, "mul": self.engine.mul}[op]
        cts = [fn(x.cts[a], y.cts[b]) for a, b in pairs]
        x_once = len({a for a, _ in pairs}) == len(pairs)
        y_once = len({b for _, b in pairs}) == len(pairs)
        if op == "mul":
            clean = (x.clean and x_once) or (y.clean and y_once)
        else:
            clean = x.clean and y.clean and x_once and y_once
        return Cipher(cts, index, period, clean)

    def add(self, x: Value, y: Value) -> Value:
        return self._binary(x, y, "add")

    def sub(self, x: Value, y: Value) -> Value:
        return self._binary(x, y, "sub")

    def neg(self, x: Value) -> Value:
        if isinstance(x, Plain):
            return Plain(-x.value)
        return Cipher([self.engine.neg(c) for c in x.cts], x.index, x.period, x.clean)

    def add_public(self, x: Value, c: float | torch.Tensor) -> Value:
        if isinstance(x, Plain):
            return Plain(x.value + c)
        if not isinstance(c, torch.Tensor) or c.numel() == 1:
            v = float(c)
            return Cipher([self.engine.add_plain(ct, v) for ct in x.cts], x.index, x.period, False)
        x = self._distinct(x)
        vecs = self._plain_vectors(x, c)
        return Cipher([self.engine.add_plain(ct, v) for ct, v in zip(x.cts, vecs)], x.index, x.period, x.clean)

    def mul_public(self, x: Value, c: float | torch.Tensor) -> Value:
        if isinstance(x, Plain):
            return Plain(x.value * c)
        if not isinstance(c, torch.Tensor) or c.numel() == 1:
            v = float(c)
            if v == 1.0:
                return x
            if v == -1.0:
                return self.neg(x)
            self.session.ensure_levels([x])
            return Cipher([self.engine.mul_plain(ct, v) for ct in x.cts], x.index, x.period, x.clean)
        c = c.to(torch.float64)
        x = self._distinct(x)
        vecs = self._plain_vectors(x, c)
        self.session.ensure_levels([x])
        return Cipher([self.engine.mul_plain(ct, v) for ct, v in zip(x.cts, vecs)], x.index, x.period, True)

    def dot_public(self, terms: Sequence[Value], coeffs: Sequence[float], bias: float = 0.0,
                   truncate: bool = True) -> Value:
        if len(terms) != len(coeffs):
            raise ValueError(f"dot_public: {len(terms)} terms but {len(coeffs)} coefficients")
        self.session.ensure_levels([t for t, c in zip(terms, coeffs) if c not in (0.0, 1.0, -1.0)])  # one trip
        fused = self._dot_one_level(terms, coeffs)
        if fused is not None:
            return self.add_public(fused, bias) if bias else fused
        out: Value | None = None
        for t, c in zip(terms, coeffs):
            if c == 0.0:
                continue
            term = self.mul_public(t, float(c))
            out = term if out is None else self.add(out, term)
        if out is None:
            out = self.mul_public(terms[0], 0.0)
        return self.add_public(out, bias) if bias else out

    def _dot_one_level(self, terms: Sequence[Value], coeffs: Sequence[float]) -> Cipher | None:
        """``sum_i c_i t_i`` as one plaintext product sum per ciphertext (one rescale), when
        every term is a cipher of one layout: the terms are moved to the lowest level among
        them by a modulus switch (free) instead of products with 1, and a Chebyshev piece of
        GeLU costs one rescale where it cost one per term. None where that does not apply."""
        live = [(t, float(c)) for t, c in zip(terms, coeffs) if c != 0.0]
        if len(live) < 2 or not all(isinstance(t, Cipher) for t, _ in live):
            return None
        first = live[0][0]
        for t, _ in live[1:]:
            if (len(t.cts) != len(first.cts) or t.period != first.period or t.index.shape != first.index.shape
                    or not torch.equal(t.index, first.index)):
                return None
        low = min(self.engine.level(ct) for t, _ in live for ct in t.cts)
        if low <= self.engine.floor:  # a +-1 term at the floor: the term-wise way needs no trip for it
            return None
        cts = [self.engine.mul_plain_sum([(self.engine.drop_to(t.cts[k], low), c) for t, c in live])
               for k in range(len(first.cts))]
        return Cipher(cts, first.index, first.period, all(t.clean for t, _ in live))

    def mul(self, x: Value, y: Value) -> Value:
        return self._binary(x, y, "mul")

    def sum_of_products(self, pairs: Sequence[tuple[Value, Value]], dim: int | None = None) -> Value:
        prods = self.mul_many(pairs)
        out = prods[0]
        for p in prods[1:]:
            out = self.add(out, p)
        return out if dim is None else self.sum(out, dim, keepdim=True)

    def mul_many(self, pairs: Sequence[tuple[Value, Value]]) -> list[Value]:
        self.session.ensure_levels([v for pair in pairs for v in pair])  # every tired operand in one client trip
        return [self.mul(x, y) for x, y in pairs]

    # ---- across slots ----------------------------------------------------------------
    def sum(self, x: Value, dim: int, keepdim: bool = False) -> Value:
        if isinstance(x, Plain):
            return Plain(x.value.sum(dim=dim, keepdim=keepdim))
        rank = len(x.shape)
        dim %= rank
        if dim != rank - 1:
            moved = self.map_shape(x, lambda t: t.movedim(dim, -1))
            out = self.sum(moved, -1, keepdim=True)
            out = self.map_shape(out, lambda t: t.movedim(-1, dim))
            return out if keepdim else self.map_shape(out, lambda t: t.squeeze(dim))
        out = sum_columns(self.engine, self._canonical(x))
        return out if keepdim else self.map_shape(out, lambda t: t.squeeze(-1))

    def matmul_many(self, pairs: Sequence[tuple[Value, Value]]) -> list[Value]:
        """Each ``x @ y``; linear layers of one encrypted input (attention's query, key and
        value: a ``secure.linears`` node) run as one layer on the concatenated weights, so
        the input's baby-step rotations happen once and the outputs fill whole ciphertexts
        (MiniLM at 16 tokens: 1920 plaintext products and 106 rotations per layer instead
        of 2304 and 183 apart); each result is a column slice of the shared ciphertexts."""
        out: list[Value | None] = [None] * len(pairs)
        groups: dict[int, list[int]] = {}
        for i, (x, y) in enumerate(pairs):
            if isinstance(x, Cipher) and isinstance(y, Plain) and y.value.dim() == 2:
                groups.setdefault(id(x), []).append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            weights = [pairs[i][1].value for i in members]
            fused = self._matmul_plain(pairs[members[0]][0], torch.cat(weights, dim=1))
            start = 0
            for i, w in zip(members, weights):
                # the other slices' values sit in the unreferenced slots: not clean
                out[i] = Cipher(fused.cts, fused.index[..., start:start + w.shape[1]], None, False)
                start += w.shape[1]
        return [done if done is not None else self.matmul(x, y) for done, (x, y) in zip(out, pairs)]

    def matmul(self, x: Value, y: Value) -> Value:
        if isinstance(x, Plain) and isinstance(y, Plain):
            return Plain(x.value @ y.value)
        if isinstance(x, Plain):  # (y^T x^T)^T
            yt = self.map_shape(y, lambda t: t.transpose(-1, -2))
            out = self.matmul(yt, Plain(x.value.transpose(-1, -2)))
            return self.map_shape(out, lambda t: t.transpose(-1, -2))
        if isinstance(y, Plain):
            return self._matmul_plain(x, y.value)
        return self._matmul_cipher(x, y)

    def _matmul_plain(self, x: Cipher, w: torch.Tensor) -> Cipher:
        """x[..., K] @ w[K, N]: x made canonical, at one level with a level left, then
        :func:`~secure.he.linear.matmul_plain` (the diagonal method)."""
        if w.dim() != 2:
            raise HeUnsupportedError(f"encrypted @ plaintext of shape {tuple(w.shape)}: only 2-D plaintext "
                                     "matrices (linear layers) are supported")
        x = self._one_level(self._canonical(x))
        self.session.ensure_levels([x])
        if self.session.allow_refresh:
            # the whole layer at the lowest level that still allows a product (its thousands of
            # products and rotations cost about half what they cost at the top level); the
            # levels given up come back by a refresh, where one is allowed
            low = self.engine.floor + 1
            x = Cipher([self.engine.drop_to(c, low) for c in x.cts], x.index, x.period, x.clean)
        return matmul_plain(self.engine, x, w)

    def _matmul_cipher(self, x: Cipher, y: Cipher) -> Cipher:
        """x[..., M, K] @ y[..., K, N]: one re-layout puts both on k-slabs
        (:func:`~secure.he.linear.slab_layout`), one product per ciphertext, the slabs summed."""
        layout = slab_layout(x, y, self.slots)
        x_rep, y_rep = self.session.relayout([(x, layout.target), (y, layout.target)],
                                             counts=[layout.count, layout.count],
                                             sources=[layout.x_source, layout.y_source])
        prods = [self.engine.mul_lazy(a, b) for a, b in zip(x_rep.cts, y_rep.cts)]
        return sum_slabs(self.engine, prods, layout)

    # ---- outputs ---------------------------------------------------------------------
    def finish_outputs(self, values: Sequence[Value], flood_bits: int | None = None) -> list[Cipher]:
        """The outputs as they go back to the client: a public one encrypted (its other slots
        are 0), an encrypted one reduced to its elements (:meth:`RefreshSession.referenced_only`),
        each flooded with ``2^-flood_bits`` noise when given (:meth:`RefreshSession.flooded`,
        which states the cost; default off: then there is no circuit privacy)."""
        session = self.session
        with session.at(OUTPUTS, "the " + OUTPUTS):
            return [session.flooded(self.encrypt_public(v.value) if isinstance(v, Plain)
                                    else session.referenced_only(v), flood_bits) for v in values]

    # ---- no CKKS form -----------------------------------------------------------------
    def check_range(self, x: Value, lower: float | None, upper: float | None, what: str) -> None:
        """A no-op: CKKS cannot compare, so the server cannot check a ciphertext's range
        (and decrypting to check would need the client's key). What guards the bounded forms
        here instead: the range guaranteed by construction where the structure allows it
        (Power-Softmax's denominator is ``>= eps``, so with ``eps`` at or above the
        division's lower end that end holds: :func:`secure.approx.softmax.power_softmax`),
        and the client's bound check on every refresh (:class:`secure.he.client.RefreshCheck`,
        :mod:`secure.he.refresh`): a value beyond ``M + B`` (M the mask amplitude, B the
        node's calibrated bound), as a diverging division or polynomial soon becomes, fails
        the query at its next refresh; a smaller excess over B only with probability about
        ``(|v| - B) / 2M``. Not caught under CKKS: a value outside the form's range that
        stays near B (a denominator below the division's lower end gives an underestimate;
        a GeLU input slightly past its bound), and anything after the node's last refresh.
        Adds no cost."""
        return None

    def less_than_public(self, x: Value, thresholds: Sequence[float], magnitude: float | None = None) -> list[Value]:
        raise HeUnsupportedError("comparisons have no CKKS form; use the HE recipe (polynomial forms)")

    def less_than(self, x: Value, y: Value) -> Value:
        raise HeUnsupportedError("comparisons have no CKKS form; use the HE recipe (polynomial forms)")

    def max(self, x: Value, dim: int = -1, keepdim: bool = True) -> Value:
        raise HeUnsupportedError("max has no CKKS form; use Power-Softmax (the power recipe)")

    def max_and_below(self, x: Value, gap: float, magnitude: float | None = None) -> tuple[Value, Value]:
        raise HeUnsupportedError("max has no CKKS form; use Power-Softmax (the power recipe)")

    def frexp(self, x: Value, exponent_fn: Callable[[int], float],
              bounds: tuple[float, float] | None = None) -> tuple[Value, Value]:
        raise HeUnsupportedError("frexp has no CKKS form; calibrate LayerNorm's variance range")

    def frexp_segments(self, x: Value, exponent_fn: Callable[[int], float], segments: int = 1,
                       tables: Sequence[Callable[[int], float]] = (),
                       times: Value | Callable[[], Value] | None = None,
                       bounds: tuple[float, float] | None = None,
                       mantissa_tables: Sequence[Callable[[int], float]] = (),
                       factor_tables: Sequence[Callable[[int], float]] = (),
                       times_table: Callable[[int], float] | None = None) -> tuple[Value, Value, list[Value]]:
        raise HeUnsupportedError("frexp has no CKKS form; calibrate LayerNorm's variance range")


def _aligned(x: Cipher, y: Cipher, xs: torch.Tensor, ys: torch.Tensor) -> bool:
    """Whether every element pair of x and y (slots ``xs``, ``ys`` within their ciphertexts)
    shares a slot, up to either operand's period."""
    ok = xs == ys
    if y.period is not None:
        ok |= (xs % y.period) == (ys % y.period)
    if x.period is not None:
        ok |= (xs % x.period) == (ys % x.period)
    return bool(ok.all())
