"""Ciphertext arithmetic for the CKKS backend.

:class:`SealEngine` wraps TenSEAL's SEAL bindings (``tenseal.sealapi``) with exact scale
management: every ciphertext at chain level ``l`` has the scale ``s_l`` with
``s_top = 2^scale_bits`` and ``s_(l-1) = s_l^2 / q_l`` (``q_l`` the prime a rescale at
level ``l`` drops). A ciphertext product then lands exactly on ``s_(l-1)``, a plaintext
product is encoded at ``s_(l-1) q_l / s_l`` so it lands there too, and levels are aligned
by a product with 1, never by a bare modulus switch. Adding never meets a scale mismatch
(TenSEAL issues 78, 205, 300: "scale out of bounds" is what users of ad hoc scales meet).

:class:`GhostEngine` has the same methods on level counters only: the planner runs a
whole graph through it to learn the depth, the refreshes and the rotation steps.

Both count and time each primitive in ``stats`` (the per-operation breakdown).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure.he.params import CkksParams, galois_element
from secure.he.plain_cache import PlainCache


class HeFormatError(ValueError):
    """A ciphertext or key blob that does not load, or belongs to other parameters."""


class OutOfLevelsError(RuntimeError):
    """A product needs a level that the ciphertext no longer has and refresh is off."""


MASK_BOUND: float = 2.0**20
"""Refresh masks are uniform in [-MASK_BOUND, MASK_BOUND] (see README: what a refresh reveals)."""


def secure_uniform(n: int, bound: float) -> np.ndarray:
    """n floats uniform in [-bound, bound] from the OS CSPRNG (53 random bits each)."""
    words = np.frombuffer(secrets.token_bytes(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (words.astype(np.float64) / float(1 << 53) * 2.0 - 1.0) * bound


class Stats:
    """Count and seconds per primitive."""

    def __init__(self) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def timed(self, name: str, n: int = 1) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t
            self.count[name] += n

    def pairs(self) -> dict[str, tuple[int, float]]:
        """(count, seconds) per primitive: what a worker process reports."""
        return {k: (self.count[k], self.seconds[k]) for k in self.count}

    def merge(self, pairs: dict[str, tuple[int, float]], suffix: str = "") -> None:
        """Add another process's :meth:`pairs`, each name followed by ``suffix``."""
        for name, (n, seconds) in pairs.items():
            self.count[name + suffix] += n
            self.seconds[name + suffix] += seconds

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"count": self.count[k], "seconds": self.seconds[k]} for k in sorted(self.count)}


def _sealapi() -> Any:
    try:
        import tenseal.sealapi as sa
    except ImportError as e:  # pragma: no cover - tenseal is a project dependency
        raise ImportError("the HE backend needs tenseal (pip install tenseal)") from e
    return sa


class SealContext:
    """SEAL context, encoder and the per-level scales for one parameter set."""

    def __init__(self, params: CkksParams) -> None:
        sa = _sealapi()
        self.sa = sa
        self.params = params
        parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(params.poly_degree)
        parms.set_coeff_modulus(sa.CoeffModulus.Create(params.poly_degree, params.coeff_bits))
        self.context = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise HeFormatError(f"SEAL rejects the parameters {params}")
        self.encoder = sa.CKKSEncoder(self.context)
        self.evaluator = sa.Evaluator(self.context)
        top = self.context.first_context_data()
        self.top_level = top.chain_index()
        primes = [q.value() for q in top.parms().coeff_modulus()]
        self.primes = primes  # index l = the prime a rescale at level l drops
        self.scales = [0.0] * (self.top_level + 1)
        self.scales[self.top_level] = float(2**params.scale_bits)
        for level in range(self.top_level, 0, -1):
            self.scales[level - 1] = self.scales[level] ** 2 / primes[level]
        self.parms_ids: dict[int, Any] = {}
        data = top
        while data is not None:
            self.parms_ids[data.chain_index()] = data.parms_id()
            data = data.next_context_data()
        # SEAL's bindings serialise through files: a private tmpfs folder, removed with the context
        self._tmp = tempfile.mkdtemp(prefix="he-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        weakref.finalize(self, shutil.rmtree, self._tmp, True)

    def level(self, ct: Any) -> int:
        return self.context.get_context_data(ct.parms_id()).chain_index()

    def encode(self, values: np.ndarray | float, level: int, scale: float) -> Any:
        pt = self.sa.Plaintext()
        if isinstance(values, float):
            self.encoder.encode(values, self.parms_ids[level], scale, pt)
        else:
            self.encoder.encode(np.ascontiguousarray(values, dtype=np.float64), self.parms_ids[level], scale, pt)
        return pt

    def save(self, obj: Any) -> bytes:
        path = os.path.join(self._tmp, f"{secrets.token_hex(8)}.bin")
        try:
            obj.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            if os.path.exists(path):
                os.remove(path)

    def load(self, cls_name: str, blob: bytes) -> Any:
        obj = getattr(self.sa, cls_name)()
        path = os.path.join(self._tmp, f"{secrets.token_hex(8)}.bin")
        try:
            with open(path, "wb") as f:
                f.write(blob)
            obj.load(self.context, path)
        except Exception as e:
            raise HeFormatError(f"malformed {cls_name} ({len(blob)} bytes): {e}") from e
        finally:
            if os.path.exists(path):
                os.remove(path)
        if not self.sa.is_valid_for(obj, self.context):
            raise HeFormatError(f"{cls_name} is not valid for parameters {self.params}")
        return obj


@dataclass
class PublicKeys:
    """What the server holds: the client's public, relinearisation and Galois keys."""

    public: Any
    relin: Any
    galois: Any | None


class SealEngine:
    """Server-side ciphertext arithmetic (no secret key)."""

    def __init__(self, ctx: SealContext, keys: PublicKeys) -> None:
        self.ctx = ctx
        self.sa = ctx.sa
        self.ev = ctx.evaluator
        self.keys = keys
        self.encryptor = self.sa.Encryptor(ctx.context, keys.public)
        self.stats = Stats()
        self.slots = ctx.params.slots
        self.top_level = ctx.top_level
        self.floor = ctx.params.floor_level
        self.plain_cache: PlainCache | None = None
        """Encoded weight diagonals kept across queries (:mod:`secure.he.plain_cache`), set by the server."""
        self.public_context: bytes | None = None
        """The client's public context this engine was made from (what a worker process loads)."""
        self.pool: Any = None
        """Worker processes for the linear layers (:class:`secure.he.pool.HePool`), set by the server."""

    def level(self, ct: Any) -> int:
        return self.ctx.level(ct)

    def _new(self) -> Any:
        return self.sa.Ciphertext()

    def encrypt(self, values: np.ndarray) -> Any:
        """A fresh encryption at the top level (public key: the server may encrypt constants)."""
        with self.stats.timed("encode"):
            pt = self.ctx.encode(values, self.top_level, self.ctx.scales[self.top_level])
        with self.stats.timed("encrypt"):
            out = self._new()
            self.encryptor.encrypt(pt, out)
        return out

    def lower_to(self, ct: Any, level: int) -> Any:
        """The same value at a lower level (products with 1 keep the scale invariant)."""
        while self.level(ct) > level:
            ct = self.mul_plain(ct, 1.0)
        return ct

    def drop_to(self, ct: Any, level: int) -> Any:
        """The same value at a lower level by a bare modulus switch: no product, no noise,
        but the scale stays the one of ct's level, so only a plaintext product may follow
        (:meth:`mul_plain_sum` encodes against ct's actual scale and lands on the standard
        one). Used where a whole linear layer would otherwise run at a higher level: a
        product at level ``l`` costs about ``l + 1`` NTTs' worth of words (measured at
        N = 8192: 236 us at level 4, 92 us at level 1; rotations 4.4 ms and 1.3 ms)."""
        if self.level(ct) <= level:
            return ct
        out = self._new()
        with self.stats.timed("mod switch"):
            self.ev.mod_switch_to(ct, self.ctx.parms_ids[level], out)
        return out

    def align(self, a: Any, b: Any) -> tuple[Any, Any]:
        la, lb = self.level(a), self.level(b)
        if la > lb:
            a = self.lower_to(a, lb)
        elif lb > la:
            b = self.lower_to(b, la)
        return a, b

    def add(self, a: Any, b: Any) -> Any:
        a, b = self.align(a, b)
        with self.stats.timed("add"):
            out = self._new()
            self.ev.add(a, b, out)
        return out

    def sub(self, a: Any, b: Any) -> Any:
        a, b = self.align(a, b)
        with self.stats.timed("add"):
            out = self._new()
            self.ev.sub(a, b, out)
        return out

    def neg(self, a: Any) -> Any:
        out = self._new()
        self.ev.negate(a, out)
        return out

    def add_plain(self, a: Any, values: np.ndarray | float) -> Any:
        with self.stats.timed("encode"):
            pt = self.ctx.encode(values, self.level(a), a.scale)
        with self.stats.timed("add"):
            out = self._new()
            self.ev.add_plain(a, pt, out)
        return out

    def _rescale(self, ct: Any, level: int) -> Any:
        with self.stats.timed("rescale"):
            self.ev.rescale_to_next_inplace(ct)
        ct.scale = self.ctx.scales[level - 1]  # equal up to rounding: pin the invariant exactly
        return ct

    def mul(self, a: Any, b: Any) -> Any:
        return self.finish_product(self.mul_lazy(a, b))

    def mul_lazy(self, a: Any, b: Any) -> Any:
        """a * b not yet relinearised nor rescaled (three polynomials, scale ``s_l^2``): such
        products may be added, then :meth:`finish_product` makes their sum an ordinary
        ciphertext, one key switch and one rescale for the whole sum."""
        a, b = self.align(a, b)
        level = self.level(a)
        if level <= self.floor:
            raise OutOfLevelsError(f"ciphertext product at level {level} (floor {self.floor})")
        with self.stats.timed("ct-ct product"):
            out = self._new()
            if a is b:
                self.ev.square(a, out)
            else:
                self.ev.multiply(a, b, out)
        return out

    def finish_product(self, ct: Any) -> Any:
        """A product (or a sum of products) of :meth:`mul_lazy`, relinearised and rescaled."""
        with self.stats.timed("relinearize"):
            self.ev.relinearize_inplace(ct, self.keys.relin)
        return self._rescale(ct, self.level(ct))

    def _plain_scale(self, level: int, ct_scale: float) -> float:
        """The plaintext's scale that makes a product with a ciphertext of scale ``ct_scale``
        at ``level`` land exactly on the next level's scale after the rescale."""
        return self.ctx.scales[level - 1] * self.ctx.primes[level] / ct_scale

    def mul_plain(self, a: Any, values: np.ndarray | float) -> Any:
        """a * values, one level."""
        return self.mul_plain_sum([(a, values)])

    def mul_plain_sum(self, terms: Sequence[tuple[Any, np.ndarray | float | Callable[[], np.ndarray]]],
                      keys: Sequence[Hashable | None] | None = None) -> Any:
        """sum_i a_i * v_i with one rescale (all a_i at one level, at any scale: each v_i is
        encoded so that its product lands on the same one). ``keys[i]`` (not None)
        names v_i for :attr:`plain_cache`: the same key must always mean the same values.
        A callable v_i (never all zero) makes its values only when they must be encoded: a
        cached diagonal costs no vector at all.

        Terms whose v_i is all zero are skipped (SEAL refuses a product that comes out as a
        transparent ciphertext, e.g. a padded block of masked attention scores); when every
        term is zero the result is a fresh encryption of zeros at the product's level."""
        level = self.level(terms[0][0])
        if level <= self.floor:
            raise OutOfLevelsError(f"plaintext product at level {level} (floor {self.floor})")
        size = self.ctx.params.poly_degree * (level + 1) * 8
        acc = None
        for t, (a, v) in enumerate(terms):
            if self.level(a) != level:
                raise ValueError("mul_plain_sum terms must share one level")
            scale = self._plain_scale(level, a.scale)  # every product lands on the same scale
            if not callable(v) and not (np.any(v) if isinstance(v, np.ndarray) else v != 0.0):
                continue
            key = None if keys is None or self.plain_cache is None else keys[t]

            def encode(v: Any = v, scale: float = scale) -> Any:
                return self.ctx.encode(v() if callable(v) else v, level, scale)

            with self.stats.timed("encode"):
                pt = encode() if key is None else self.plain_cache.get((self.ctx.params, key), level, scale, size,
                                                                       encode)
            with self.stats.timed("ct-pt product"):
                prod = self._new()
                self.ev.multiply_plain(a, pt, prod)
                if acc is None:
                    acc = prod
                else:
                    self.ev.add_inplace(acc, prod)
        if acc is None:
            return self.zeros(level - 1)
        return self._rescale(acc, level)

    def zeros(self, level: int) -> Any:
        """A fresh encryption (public key) of zeros at ``level`` and its standard scale."""
        with self.stats.timed("encrypt"):
            pt = self.ctx.encode(0.0, level, self.ctx.scales[level])
            out = self._new()
            self.encryptor.encrypt(pt, out)
        return out

    def rotate(self, a: Any, step: int) -> Any:
        if self.keys.galois is None:
            raise HeFormatError("rotation requested but the client sent no Galois keys")
        with self.stats.timed("rotation"):
            out = self._new()
            try:
                self.ev.rotate_vector(a, step, self.keys.galois, out)
            except Exception as e:
                raise HeFormatError(f"no Galois key for rotation step {step} "
                                    f"(element {galois_element(step, self.ctx.params.poly_degree)}): {e}") from e
        return out

    def serialize(self, ct: Any) -> bytes:
        with self.stats.timed("serialize"):
            return self.ctx.save(ct)

    def deserialize(self, blob: bytes) -> Any:
        with self.stats.timed("serialize"):
            return self.ctx.load("Ciphertext", blob)


@dataclass
class GhostCt:
    """A ciphertext stand-in that only knows its level."""

    level: int


class GhostEngine:
    """Level counting with SealEngine's interface: no data, no keys."""

    def __init__(self, params: CkksParams, levels: int | None = None) -> None:
        self.params = params
        self.slots = params.slots
        self.top_level = params.levels if levels is None else levels
        self.floor = params.floor_level
        self.stats = Stats()
        self.steps: set[int] = set()

    def level(self, ct: GhostCt) -> int:
        return ct.level

    def encrypt(self, values: Any) -> GhostCt:
        return GhostCt(self.top_level)

    def lower_to(self, ct: GhostCt, level: int) -> GhostCt:
        return GhostCt(min(ct.level, level))

    def drop_to(self, ct: GhostCt, level: int) -> GhostCt:
        return GhostCt(min(ct.level, level))

    def align(self, a: GhostCt, b: GhostCt) -> tuple[GhostCt, GhostCt]:
        m = min(a.level, b.level)
        return GhostCt(m), GhostCt(m)

    def add(self, a: GhostCt, b: GhostCt) -> GhostCt:
        return GhostCt(min(a.level, b.level))

    sub = add

    def neg(self, a: GhostCt) -> GhostCt:
        return a

    def add_plain(self, a: GhostCt, values: Any) -> GhostCt:
        return a

    def _down(self, level: int, what: str) -> GhostCt:
        if level <= self.floor:
            raise OutOfLevelsError(f"{what} at level {level} (floor {self.floor})")
        self.stats.count[what] += 1
        return GhostCt(level - 1)

    def mul(self, a: GhostCt, b: GhostCt) -> GhostCt:
        return self._down(min(a.level, b.level), "ct-ct product")

    def mul_lazy(self, a: GhostCt, b: GhostCt) -> GhostCt:
        level = min(a.level, b.level)
        self._down(level, "ct-ct product")  # the floor check and the count
        return GhostCt(level)

    def finish_product(self, ct: GhostCt) -> GhostCt:
        return GhostCt(ct.level - 1)

    def mul_plain(self, a: GhostCt, values: Any) -> GhostCt:
        return self._down(a.level, "ct-pt product")

    def mul_plain_sum(self, terms: Sequence[tuple[GhostCt, Any]], keys: Sequence[Hashable | None] | None = None
                      ) -> GhostCt:
        self.stats.count["ct-pt product"] += len(terms) - 1
        return self._down(terms[0][0].level, "ct-pt product")

    def rotate(self, a: GhostCt, step: int) -> GhostCt:
        self.steps.add(step)
        self.stats.count["rotation"] += 1
        return a
