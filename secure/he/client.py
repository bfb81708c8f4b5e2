"""The client's side of an HE query: keys, encryption, refreshes and decryption.

Only this object ever holds the secret key. The server gets :meth:`HeClient.public_context`:
the parameters, the public key, the relinearisation key and the Galois keys for exactly
the rotation steps the planner listed.

A refresh reveals ``value + mask`` per slot. Each refresh item carries the public bound B
the server sized its mask for (every slot's ``|value| <= B``) and the mask amplitude M
(uniform in ``[-M, M]``); for two values ``|x|, |x'| <= B`` the client's views
``x + m`` and ``x' + m`` are at statistical distance ``|x - x'| / (2M) <= B / M``, and the
client refuses a request promising less than ``B / M <= 2^-HIDING_BITS``. After
decrypting it checks ``|value + mask| <= M + B`` on every slot it sees: a slot beyond
proves ``|value| > B`` (the promise is broken), and the query stops with
:class:`RefreshBoundError` naming the graph node. The check is certain for
``|value| >= 2M + B`` only: a value in ``(B, 2M + B)`` escapes it with probability about
``1 - (|value| - B) / (2M)`` per slot, so it catches gross overflows (a diverging
iteration), not a calibration that is slightly off.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure.he.engine import HeFormatError, PublicKeys, SealContext, SealEngine, Stats
from secure.he.layout import canonical, scatter_values
from secure.he.params import CkksParams, HeParameterError, galois_element

_MAGIC = b"HECTX1"
MAX_CONTEXT_BYTES: int = 1 << 30

HIDING_BITS: int = 13
"""A refresh mask of amplitude M hides values bounded by B to B / M <= 2^-13."""


class RefreshBoundError(ValueError):
    """A refresh whose mask hides less than promised: a value beyond its bound B (seen by
    the client) or a mask too small for B (refused by either side)."""


@dataclass(frozen=True)
class RefreshCheck:
    """What a refresh request promises: ``|value| <= bounds[i]`` on every slot of item i,
    masked uniformly in ``[-masks[i], masks[i]]``; ``node`` names where it happens."""

    node: str
    bounds: list[float]
    masks: list[float]


def pack_sections(header: dict, sections: list[tuple[str, bytes]]) -> bytes:
    """magic | u32 header length | JSON header (with section sizes) | section bytes."""
    head = json.dumps({**header, "sections": [[name, len(b)] for name, b in sections]}).encode()
    return _MAGIC + struct.pack("<I", len(head)) + head + b"".join(b for _, b in sections)


def unpack_sections(blob: bytes) -> tuple[dict, dict[str, bytes]]:
    if len(blob) > MAX_CONTEXT_BYTES:
        raise HeFormatError(f"public context of {len(blob)} bytes exceeds {MAX_CONTEXT_BYTES}")
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 4:
        raise HeFormatError("not an HE public context (bad magic)")
    (n,) = struct.unpack_from("<I", blob, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(blob[start:start + n])
        sections: dict[str, bytes] = {}
        pos = start + n
        for name, size in header["sections"]:
            if size < 0 or pos + size > len(blob):
                raise HeFormatError(f"section {name} runs past the end of the context")
            sections[str(name)] = blob[pos:pos + size]
            pos += size
    except (ValueError, KeyError, TypeError) as e:
        raise HeFormatError(f"malformed public context header: {e}") from e
    return header, sections


class HeClient:
    """Generates keys for ``params`` with Galois keys for ``steps`` and serves refreshes."""

    def __init__(self, params: CkksParams, steps: Iterable[int] = (), *, _secret_key: bytes | None = None) -> None:
        self.params = params
        self.ctx = SealContext(params)
        sa = self.ctx.sa
        self.steps = sorted(set(steps))
        self._public_sections: list[tuple[str, bytes]] = []
        if _secret_key is None:
            keygen = sa.KeyGenerator(self.ctx.context)
            self._secret = keygen.secret_key()
            # relinearisation and Galois keys are saved seeded (half of each key's polynomials go
            # as a PRNG seed; the bindings offer no seeded public key, one ciphertext's size)
            public = sa.PublicKey()
            keygen.create_public_key(public)
            sections = [("public", self.ctx.save(public)), ("relin", self.ctx.save(keygen.create_relin_keys()))]
            if self.steps:
                elements = [galois_element(s, params.poly_degree) for s in self.steps]
                sections.append(("galois", self.ctx.save(keygen.create_galois_keys(elements))))
            self._public_sections = sections
        else:  # a worker of this client's pool: the secret key, no public keys
            self._secret = self.ctx.load("SecretKey", _secret_key)
        # symmetric encryption under the secret key, saved seeded: the second polynomial goes as
        # its PRNG seed, so each ciphertext the client sends is half the size and half the time
        # (measured, N = 8192 top level: 196 KB and 3.9 ms against 396 KB and 8.1 ms)
        self._encryptor = sa.Encryptor(self.ctx.context, self._secret)
        self._decryptor = sa.Decryptor(self.ctx.context, self._secret)
        self.stats = Stats()
        self.slots = params.slots
        self.pool: Any = None
        """Worker processes for the refreshes (:class:`secure.he.pool.ClientPool`), set by the caller."""
        self._key_material: bytes | None = None

    def key_material(self) -> bytes:
        """Parameters and the secret key, for this client's own worker processes only
        (:class:`secure.he.pool.ClientPool`; a server refuses a context carrying it)."""
        if self._key_material is None:
            self._key_material = pack_sections({"params": self.params.to_dict()},
                                               [("secret", self.ctx.save(self._secret))])
        return self._key_material

    @classmethod
    def from_key_material(cls, blob: bytes) -> HeClient:
        """A client that can decrypt and encrypt under the key of :meth:`key_material`."""
        header, sections = unpack_sections(blob)
        return cls(CkksParams.from_dict(header["params"]), _secret_key=sections["secret"])

    def public_context(self) -> bytes:
        """Parameters and public keys (never the secret key), for the server."""
        return pack_sections({"params": self.params.to_dict(), "steps": self.steps}, self._public_sections)

    def encrypt_vector(self, values: np.ndarray) -> bytes:
        """One ciphertext of ``values`` (one per slot) at the top level."""
        with self.stats.timed("encode"):
            pt = self.ctx.encode(values, self.ctx.top_level, self.ctx.scales[self.ctx.top_level])
        with self.stats.timed("encrypt"):
            seeded = self._encryptor.encrypt_symmetric(pt)
        with self.stats.timed("serialize"):
            return self.ctx.save(seeded)

    def decrypt_vector(self, blob: bytes) -> np.ndarray:
        """The slot values of one ciphertext."""
        with self.stats.timed("serialize"):
            ct = self.ctx.load("Ciphertext", blob)
        with self.stats.timed("decrypt"):
            pt = self.ctx.sa.Plaintext()
            self._decryptor.decrypt(ct, pt)
            return np.asarray(self.ctx.encoder.decode_double(pt), dtype=np.float64)

    def _map(self, kind: str, items: list[Any], one: Callable[[Any], Any]) -> list[Any]:
        """``[one(item) for item in items]``, on the pool's workers too when there is one."""
        if self.pool is None or len(items) < 2:
            return [one(item) for item in items]
        return self.pool.map(self, kind, items, one)

    def encrypt(self, x: torch.Tensor) -> tuple[list[bytes], torch.Tensor]:
        """(ciphertexts, index) of x in the canonical layout."""
        index, count = canonical(x.shape, self.slots)
        vecs = scatter_values(index, x, count, self.slots).numpy()
        return self._map("encrypt", list(vecs), self.encrypt_vector), index.reshape(x.shape)

    def decrypt(self, blobs: list[bytes], index: torch.Tensor) -> torch.Tensor:
        """The tensor whose element i sits at flat slot ``index[i]`` of ``blobs``."""
        if index.numel() and (int(index.max()) >= len(blobs) * self.slots or int(index.min()) < 0):
            raise HeFormatError("result index points outside the returned ciphertexts")
        flat = np.concatenate(self._map("decrypt", blobs, self.decrypt_vector))
        return torch.from_numpy(flat[index.reshape(-1).numpy()]).view(index.shape)

    def refresh(self, items: list[tuple[list[bytes], np.ndarray | None, int]],
                check: RefreshCheck) -> list[list[bytes]]:
        """Decrypt the masked ciphertexts, check every slot against ``check`` (module
        docstring), gather their slots, re-encrypt at the top level.

        The client sees ``value + mask`` per slot, never the value (the server keeps the
        mask); what that reveals is stated in the README (HE mode)."""
        if len(check.bounds) != len(items) or len(check.masks) != len(items):
            raise HeFormatError(f"refresh of {len(items)} items states {len(check.bounds)} bounds "
                                f"and {len(check.masks)} masks")
        out = []
        for (blobs, gather, count), bound, mask in zip(items, check.bounds, check.masks):
            if not 0.0 < bound * 2.0**HIDING_BITS <= mask:
                raise RefreshBoundError(f"refresh in {check.node}: a mask of {mask:g} for values up to {bound:g} "
                                        f"would hide them to more than 2^-{HIDING_BITS}; refusing the query")
            with self.stats.timed("refresh (client)"):
                flat = np.concatenate(self._map("decrypt", blobs, self.decrypt_vector))
                worst = float(np.abs(flat).max(initial=0.0))
                if worst > mask + bound:
                    raise RefreshBoundError(
                        f"refresh in {check.node}: a slot decrypts to |value + mask| = {worst:.6g} > M + B = "
                        f"{mask:g} + {bound:g}, so |value| > B: the mask hides it less than promised "
                        f"(2^-{HIDING_BITS}); refusing the query")
                if gather is None:
                    moved = flat
                else:
                    if gather.size != count * self.slots or int(gather.max(initial=-1)) >= flat.size:
                        raise HeFormatError("refresh gather index does not match the ciphertexts")
                    moved = np.where(gather >= 0, flat[np.maximum(gather, 0)], 0.0)
                if moved.size != count * self.slots:
                    raise HeFormatError(f"refresh of {len(blobs)} ciphertexts cannot give {count}")
                out.append(self._map("encrypt", list(moved.reshape(count, self.slots)), self.encrypt_vector))
        return out


def server_engine(public_context: bytes) -> SealEngine:
    """The server's engine from a client's public context (validated by SEAL)."""
    header, sections = unpack_sections(public_context)
    try:
        params = CkksParams.from_dict(header["params"])
    except (KeyError, TypeError, ValueError, HeParameterError) as e:
        raise HeFormatError(f"bad parameters in the public context: {e}") from e
    if "secret" in sections:
        raise HeFormatError("the context carries a secret key; a server must never receive it")
    for name in ("public", "relin"):
        if name not in sections:
            raise HeFormatError(f"public context lacks the {name} key")
    ctx = SealContext(params)
    keys = PublicKeys(ctx.load("PublicKey", sections["public"]), ctx.load("RelinKeys", sections["relin"]),
                      ctx.load("GaloisKeys", sections["galois"]) if "galois" in sections else None)
    engine = SealEngine(ctx, keys)
    engine.public_context = public_context
    return engine
