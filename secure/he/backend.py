"""HeOps: the secure-form interface (:class:`secure.approx.interface.SecureOps`) over CKKS.

Values are :class:`~secure.he.layout.Cipher` (the client's data, encrypted under its
key) or :class:`~secure.he.layout.Plain` (the model owner's weights and every public
constant: the server holds the model in the clear in HE mode). The forms in
``secure.approx`` run unchanged; what costs what:

* add / sub, adding a public value: no level;
* a product (ciphertext-ciphertext or by a real public value): one level;
* ``matmul`` by a plaintext matrix: the diagonal method with baby-step giant-step
  rotations on the column-major layout, one level;
* ``matmul`` of two ciphertexts (attention): a refresh re-lays both operands out so that
  ``x[..., m, k]`` and ``y[..., k, n]`` meet in the same slot, then one product and a sum
  over k (whole ciphertexts, or rotations for small shapes);
* ``sum`` over the last dim: adds of ciphertexts and log2 rotations; the result is
  replicated over the columns, so broadcasting it back costs nothing;
* comparisons, max and frexp do not exist under CKKS and raise :class:`HeUnsupportedError`.

When a product needs a level that a ciphertext no longer has, or a layout must change,
the backend asks the client for a *refresh* through ``link``: it adds a fresh uniform
mask to every slot, the client decrypts, re-arranges the slots by a public gather index,
re-encrypts at the top level, and the server subtracts the mask (:meth:`HeOps.refresh`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from secure.he.engine import GhostEngine, OutOfLevelsError, SealEngine
from secure.he.layout import (
    Cipher,
    Plain,
    canonical,
    is_canonical,
    next_pow2,
    referenced_mask,
    row_stride,
    scatter_values,
)

Value = Cipher | Plain


class HeUnsupportedError(RuntimeError):
    """An operation with no CKKS form (comparison, max, frexp)."""


class RefreshLink(Protocol):
    """The client's side of a refresh: decrypt masked ciphertexts, gather, re-encrypt."""

    def refresh(self, items: list[tuple[list[bytes], np.ndarray | None, int]]) -> list[list[bytes]]:
        """For each (masked ciphertexts, gather index or None, output count): the client's
        fresh ciphertexts of ``out[j] = in_flat[gather[j]]`` (0 where gather is -1)."""
        ...


def _refreshed(x: Cipher, target: torch.Tensor | None, cts: list[Any]) -> Cipher:
    """The cipher a refresh returns: x's layout kept (target None) or the new one, clean."""
    if target is None:
        return Cipher(cts, x.index, x.period, x.clean)
    return Cipher(cts, target, None, True)


class HeOps:
    """SecureOps over CKKS ciphertexts (SealEngine) or level counters (GhostEngine).

    ``allow_refresh=False`` turns an exhausted level into :class:`OutOfLevelsError`
    (what the planner reports for a non-interactive run) and forbids re-layouts.
    ``on_event(kind, detail)`` is called for refreshes (progress display).
    """

    def __init__(self, engine: SealEngine | GhostEngine, link: RefreshLink | None = None,
                 allow_refresh: bool = True, on_event: Callable[[str, dict], None] | None = None,
                 count_depth: bool = False) -> None:
        self.engine = engine
        self.link = link
        self.allow_refresh = allow_refresh
        self.slots = engine.slots
        self.ghost = isinstance(engine, GhostEngine)
        self.on_event = on_event
        self.refreshes = 0
        self.relayouts = 0
        self.bytes_to_client = 0
        self.bytes_from_client = 0
        self.count_depth = count_depth  # ghost only: re-layouts keep levels (depth of the whole graph)

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

    # ---- element-wise --------------------------------------------------------------
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
        return self.relayout([(x, canonical(x.shape, self.slots)[0])])[0]

    def _pair(self, x: Cipher, y: Cipher) -> tuple[Cipher, Cipher, torch.Tensor, list[tuple[int, int]], int | None]:
        """Align two ciphers element-wise: (x, y, result index, ciphertext pairs, period);
        re-lays both out canonically (one refresh) when their slots do not line up."""
        shape = torch.broadcast_shapes(x.shape, y.shape)
        xi = torch.broadcast_to(x.index, shape).reshape(-1)
        yi = torch.broadcast_to(y.index, shape).reshape(-1)
        xs, ys = xi % self.slots, yi % self.slots
        ok = xs == ys
        if y.period is not None:
            ok |= (xs % y.period) == (ys % y.period)
        if x.period is not None:
            ok |= (xs % x.period) == (ys % x.period)
        if not bool(ok.all()):
            target, _ = canonical(shape, self.slots)
            x, y = self.relayout([(x, target), (y, target)])
            return self._pair(x, y)
        if x.period is not None and y.period is None:
            slot = ys
        else:
            slot = xs
        period = x.period if (x.period is not None and x.period == y.period) else None
        key = (xi // self.slots) * (len(y.cts) + 1) + yi // self.slots
        uniq, inverse = torch.unique(key, return_inverse=True)
        pairs = [(int(k) // (len(y.cts) + 1), int(k) % (len(y.cts) + 1)) for k in uniq]
        index = (inverse * self.slots + slot).view(shape)
        return x, y, index, pairs, period

    def _binary(self, x: Value, y: Value, op: str) -> Value:
        if isinstance(x, Plain) and isinstance(y, Plain):
            return Plain({"add": torch.add, "sub": torch.sub, "mul": torch.mul}[op](x.value, y.value))
        if isinstance(x, Plain) or isinstance(y, Plain):
            c, p, swapped = (x, y, False) if isinstance(x, Cipher) else (y, x, True)
            shape = torch.broadcast_shapes(c.shape, p.shape)
            if shape != c.shape:
                c = self.map_shape(c, lambda t: torch.broadcast_to(t, shape))
            if op == "mul":
                return self.mul_public(c, p.value)
            if op == "sub" and swapped:
                return self.add_public(self.neg(c), p.value)
            return self.add_public(c, p.value if op == "add" else -p.value)
        if op == "mul":
            self._ensure_levels([x, y])
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
            self._ensure_levels([x])
            return Cipher([self.engine.mul_plain(ct, v) for ct in x.cts], x.index, x.period, x.clean)
        c = c.to(torch.float64)
        x = self._distinct(x)
        vecs = self._plain_vectors(x, c)
        self._ensure_levels([x])
        return Cipher([self.engine.mul_plain(ct, v) for ct, v in zip(x.cts, vecs)], x.index, x.period, True)

    def dot_public(self, terms: Sequence[Value], coeffs: Sequence[float], bias: float = 0.0,
                   truncate: bool = True) -> Value:
        if len(terms) != len(coeffs):
            raise ValueError(f"dot_public: {len(terms)} terms but {len(coeffs)} coefficients")
        self._ensure_levels([t for t, c in zip(terms, coeffs) if c not in (0.0, 1.0, -1.0)])  # one trip
        out: Value | None = None
        for t, c in zip(terms, coeffs):
            if c == 0.0:
                continue
            term = self.mul_public(t, float(c))
            out = term if out is None else self.add(out, term)
        if out is None:
            out = self.mul_public(terms[0], 0.0)
        return self.add_public(out, bias) if bias else out

    def mul(self, x: Value, y: Value) -> Value:
        return self._binary(x, y, "mul")

    def sum_of_products(self, pairs: Sequence[tuple[Value, Value]]) -> Value:
        prods = self.mul_many(pairs)
        out = prods[0]
        for p in prods[1:]:
            out = self.add(out, p)
        return out

    def mul_many(self, pairs: Sequence[tuple[Value, Value]]) -> list[Value]:
        self._ensure_levels([v for pair in pairs for v in pair])  # every tired operand in one client trip
        return [self.mul(x, y) for x, y in pairs]

    # ---- reductions ------------------------------------------------------------------
    def _cleaned(self, x: Cipher) -> Cipher:
        """x with every unreferenced slot set to 0 (a product with a 0/1 mask: one level;
        CKKS cannot encode a mask at scale 1, its coefficients would round to 0)."""
        if x.clean and x.period is None:
            return x
        masks = referenced_mask(x.index, len(x.cts), self.slots).numpy()
        self._ensure_levels([x])
        return Cipher([self.engine.mul_plain(ct, m) for ct, m in zip(x.cts, masks)], x.index, None, True)

    def _canonical(self, x: Cipher) -> Cipher:
        if is_canonical(Cipher(x.cts, x.index), self.slots):
            return self._cleaned(x)
        target, _ = canonical(x.shape, self.slots)
        return self.relayout([(x, target)])[0]

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
        x = self._canonical(x)
        rows = math.prod(x.shape[:-1])
        stride = row_stride(rows, self.slots)
        cols = x.shape[-1]
        out_shape = [*x.shape[:-1], 1]
        if stride <= self.slots:
            acc = x.cts[0]
            for ct in x.cts[1:]:
                acc = self.engine.add(acc, ct)
            step = stride
            while step < self.slots:  # every column slab ends up holding the row sum
                acc = self.engine.add(acc, self.engine.rotate(acc, step))
                step *= 2
            index = torch.arange(rows, dtype=torch.int64).view(out_shape)
            out = Cipher([acc], index, stride if stride < self.slots else None, stride >= self.slots)
        else:
            per = stride // self.slots
            accs = []
            for j in range(per):
                acc = x.cts[j]
                for c in range(1, cols):
                    acc = self.engine.add(acc, x.cts[c * per + j])
                accs.append(acc)
            out = Cipher(accs, torch.arange(rows, dtype=torch.int64).view(out_shape), None, True)
        return out if keepdim else self.map_shape(out, lambda t: t.squeeze(-1))

    # ---- matrix products ---------------------------------------------------------------
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
        """x[..., K] @ w[K, N] by the diagonal method (baby-step giant-step)."""
        if w.dim() != 2:
            raise HeUnsupportedError(f"encrypted @ plaintext of shape {tuple(w.shape)}: only 2-D plaintext "
                                     "matrices (linear layers) are supported")
        k_in, n_out = w.shape
        x = self._one_level(self._canonical(x))
        self._ensure_levels([x])
        rows = math.prod(x.shape[:-1])
        stride = row_stride(rows, self.slots)
        out_shape = [*x.shape[:-1], n_out]
        index, count = canonical(out_shape, self.slots)
        wn = w.to(torch.float64).numpy()
        if stride > self.slots:  # columns span whole ciphertexts: scalar products
            per = stride // self.slots
            out = []
            for j in range(n_out):
                for q in range(per):
                    terms = [(x.cts[i * per + q], float(wn[i, j])) for i in range(k_in) if wn[i, j] != 0.0]
                    out.append(self.engine.mul_plain_sum(terms) if terms else
                               self.engine.mul_plain(x.cts[q], 0.0))
            return Cipher(out, index, None, True)
        blocks = self.slots // stride
        n_in_ct = len(x.cts)
        wp = np.zeros((n_in_ct * blocks, count * blocks))
        wp[:k_in, :n_out] = wn
        baby = 1 << math.ceil(math.log2(blocks) / 2)
        giant = blocks // baby
        b = np.arange(blocks)
        rotated = [[ct if i == 0 else self.engine.rotate(ct, i * stride) for i in range(min(baby, blocks))]
                   for ct in x.cts]
        out = []
        for go in range(count):
            total = None
            for j in range(giant):
                terms = []
                for g in range(n_in_ct):
                    for i in range(baby):
                        k = j * baby + i
                        diag = wp[g * blocks + (b + k) % blocks, go * blocks + b]
                        if not diag.any():
                            continue
                        vec = np.roll(np.repeat(diag, stride), j * baby * stride)
                        terms.append((rotated[g][i], vec))
                if not terms:
                    continue
                part = self.engine.mul_plain_sum(terms)
                if j:
                    part = self.engine.rotate(part, j * baby * stride)
                total = part if total is None else self.engine.add(total, part)
            if total is None:
                total = self.engine.mul_plain(x.cts[0], 0.0)
            out.append(total)
        return Cipher(out, index, None, True)

    def _matmul_cipher(self, x: Cipher, y: Cipher) -> Cipher:
        """x[..., M, K] @ y[..., K, N]: a refresh lays out x[..., m, k] and y[..., k, n] in
        the same slot of k-slabs; one product per ciphertext, then the slabs are summed."""
        m, k = x.shape[-2], x.shape[-1]
        k2, n = y.shape[-2], y.shape[-1]
        if k != k2:
            raise ValueError(f"matmul shapes {tuple(x.shape)} @ {tuple(y.shape)}")
        batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
        rows = math.prod(batch) * m
        stride = row_stride(rows, self.slots)
        slab = n * stride
        slab = -(-slab // self.slots) * self.slots if slab >= self.slots else next_pow2(slab)
        per_ct = max(1, self.slots // slab)
        k_pad = -(-k // per_ct) * per_ct
        row = torch.arange(rows, dtype=torch.int64).view(*batch, m, 1, 1)
        col = torch.arange(n, dtype=torch.int64).view(1, n, 1)
        kk = torch.arange(k, dtype=torch.int64).view(1, 1, k)
        flat = kk * slab + col * stride + row  # [*batch, m, n, k]
        full = [*batch, m, n, k]
        xi = torch.broadcast_to(x.index, [*batch, m, k]).unsqueeze(-2).expand(full)
        yi = torch.broadcast_to(y.index, [*batch, k, n]).transpose(-1, -2).unsqueeze(-3).expand(full)
        count = k_pad * slab // self.slots
        x_rep, y_rep = self.relayout([(x, flat), (y, flat)], counts=[count, count], sources=[xi, yi])
        prods = [self.engine.mul(a, b) for a, b in zip(x_rep.cts, y_rep.cts)]
        out_shape = [*batch, m, n]
        index, out_count = canonical(out_shape, self.slots)
        if slab >= self.slots:
            per = slab // self.slots
            sums = []
            for j in range(per):
                acc = prods[j]
                for kk_ in range(1, k_pad):
                    acc = self.engine.add(acc, prods[kk_ * per + j])
                sums.append(acc)
            return Cipher(sums[:out_count], index, None, True)
        total = prods[0]
        for p in prods[1:]:
            total = self.engine.add(total, p)
        step = slab
        while step < self.slots:  # the k-slabs of one ciphertext, summed by rotation
            total = self.engine.add(total, self.engine.rotate(total, step))
            step *= 2
        return Cipher([total], index, slab, False)

    def _one_level(self, x: Cipher) -> Cipher:
        """x with all its ciphertexts at their lowest level (one plaintext product level)."""
        low = min(self.engine.level(c) for c in x.cts)
        if all(self.engine.level(c) == low for c in x.cts):
            return x
        if low <= self.engine.floor:
            return self.refresh([x])[0]
        return Cipher([self.engine.lower_to(c, low) for c in x.cts], x.index, x.period, x.clean)

    # ---- refresh -------------------------------------------------------------------
    def _ensure_levels(self, xs: Sequence[Cipher]) -> None:
        """Refresh (one trip) every cipher in xs with a ciphertext at the floor level."""
        tired = [x for x in xs if isinstance(x, Cipher)
                 and any(self.engine.level(c) <= self.engine.floor for c in x.cts)]
        unique = list({id(x): x for x in tired}.values())
        if unique:
            fresh = self.refresh(unique)
            for old, new in zip(unique, fresh):
                old.cts = new.cts

    def refresh(self, xs: Sequence[Cipher]) -> list[Cipher]:
        """Bring each cipher back to the top level (same layout) through the client."""
        return self._trip([(x, None, len(x.cts), None) for x in xs])

    def relayout(self, items: Sequence[tuple[Cipher, torch.Tensor]], counts: Sequence[int] | None = None,
                 sources: Sequence[torch.Tensor] | None = None) -> list[Cipher]:
        """Cipher ``x`` re-laid out so that element ``target[i]`` (a flat slot position)
        holds x's element ``sources[i]`` (default: x.index broadcast to target's shape)."""
        self.relayouts += 1
        trips = []
        for j, (x, target) in enumerate(items):
            src = sources[j] if sources is not None else torch.broadcast_to(x.index, target.shape)
            count = counts[j] if counts is not None else max(1, -(-(int(target.max()) + 1) // self.slots))
            trips.append((x, target, count, src))
        return self._trip(trips)

    def _trip(self, items: list[tuple[Cipher, torch.Tensor | None, int, torch.Tensor | None]]) -> list[Cipher]:
        if self.ghost and self.count_depth:
            out = []
            for x, target, count, _ in items:
                low = min(self.engine.level(c) for c in x.cts)
                out.append(Cipher([self.engine.lower_to(self.engine.encrypt(None), low) for _ in range(count)],
                                  x.index if target is None else target, None, True))
            return out
        if not self.allow_refresh:
            what = "a re-layout" if any(t is not None for _, t, _, _ in items) else "a refresh"
            raise OutOfLevelsError(f"{what} through the client is needed but refresh is disabled")
        self.refreshes += 1
        if self.on_event is not None:
            self.on_event("refresh", {"ciphertexts": sum(len(x.cts) for x, *_ in items)})
        if self.ghost:
            out = []
            for x, target, count, _ in items:
                cts = [self.engine.encrypt(None) for _ in range(count)]
                out.append(_refreshed(x, target, cts))
            return out
        if self.link is None:
            raise OutOfLevelsError("a refresh through the client is needed but no client link is set")
        payload = []
        masks = []
        with self.engine.stats.timed("refresh (server side)"):
            for x, target, count, src in items:
                blobs, m = [], []
                for ct in x.cts:
                    masked, mask = self.engine.mask(ct)
                    blobs.append(self.engine.serialize(masked))
                    m.append(mask)
                gather = None
                if target is not None:
                    gather = np.full(count * self.slots, -1, dtype=np.int64)
                    gather[target.reshape(-1).numpy()] = src.reshape(-1).numpy()
                payload.append((blobs, gather, count))
                masks.append(np.concatenate(m))
                self.bytes_to_client += sum(len(b) for b in blobs) + (0 if gather is None else gather.size * 4)
        with self.engine.stats.timed("refresh (client round trip)"):
            replies = self.link.refresh(payload)
        out = []
        with self.engine.stats.timed("refresh (server side)"):
            for (x, target, count, _), (_sent, gather, _), mask, reply in zip(items, payload, masks, replies):
                if len(reply) != count:
                    raise ValueError(f"refresh reply has {len(reply)} ciphertexts, expected {count}")
                self.bytes_from_client += sum(len(b) for b in reply)
                moved = mask if gather is None else np.where(gather >= 0, mask[np.maximum(gather, 0)], 0.0)
                moved = moved.reshape(count, self.slots)
                cts = [self.engine.add_plain(self.engine.deserialize(b), -moved[i]) for i, b in enumerate(reply)]
                out.append(_refreshed(x, target, cts))
        return out

    # ---- no CKKS form -----------------------------------------------------------------
    def less_than_public(self, x: Value, thresholds: Sequence[float]) -> list[Value]:
        raise HeUnsupportedError("comparisons have no CKKS form; use the HE recipe (polynomial forms)")

    def less_than(self, x: Value, y: Value) -> Value:
        raise HeUnsupportedError("comparisons have no CKKS form; use the HE recipe (polynomial forms)")

    def max(self, x: Value, dim: int = -1, keepdim: bool = True) -> Value:
        raise HeUnsupportedError("max has no CKKS form; use Power-Softmax (the power recipe)")

    def frexp(self, x: Value, exponent_fn: Callable[[int], float]) -> tuple[Value, Value]:
        raise HeUnsupportedError("frexp has no CKKS form; calibrate LayerNorm's variance range")
