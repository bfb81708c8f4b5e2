"""One query's trips through the client: refreshes, re-layouts, and the outputs' finishing.

When a product needs a level that a ciphertext no longer has, or a layout must change,
:class:`RefreshSession` asks the client through its ``link``: it adds a fresh uniform mask
to every slot, the client decrypts, re-arranges the slots by a public gather index,
re-encrypts at the top level, and the session subtracts the (moved) mask. Each refresh
states, per item, the public bound B on every slot's |value| (calibrated per graph node:
:data:`REFRESH_BOUNDS_META`) and the mask amplitude ``M = max(2^20, B 2^13)``, so that the
client's view ``value + mask`` hides any two values within the bound to ``B / M <= 2^-13``
(statistical distance); the client checks ``|value + mask| <= M + B``
(:mod:`secure.he.client`). Before outputs go back, :meth:`RefreshSession.referenced_only`
zeroes every slot that is not an output element and :meth:`RefreshSession.flooded`
optionally floods the rest with noise.

The session owns what a query reports about its trips (client trips, re-layouts, bytes each
way) and the graph node being evaluated (:attr:`RefreshSession.node`, set through
:meth:`RefreshSession.at`). It never imports the ops (:mod:`secure.he.ops`), the packing
(:mod:`secure.he.linear`), the planner or the transport; the planner's level-counting session
(:class:`secure.runtime.he_planner.GhostRefresh`) overrides :meth:`RefreshSession.trip`,
:meth:`RefreshSession.exchange` and :meth:`RefreshSession.flooded`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from secure.he.client import HIDING_BITS, RefreshBoundError, RefreshCheck
from secure.he.engine import MASK_BOUND, GhostEngine, OutOfLevelsError, SealEngine, secure_uniform
from secure.he.layout import Cipher, referenced_mask

REFRESH_BOUND: float = 2.0**7
"""B where no calibrated bound is known (outside a graph node, or a node the calibration did
not see) and the least calibrated B: masks stay at 2^20 for B <= 2^7."""

MAX_MASK_BOUND: float = 2.0**34
"""The largest mask amplitude M: the masked value must fit the floor level's 2^39 headroom,
and the client's decoding and encoding in doubles lose about ``M 2^-50`` per refresh.
Measured, 5 refreshes of one cipher, max abs error: 1.75e-5 at M = 2^20, 2.3e-5 at 2^30,
2.6e-5 at 2^33, 3.1e-5 at 2^34, 4.3e-5 at 2^35, 8.9e-5 at 2^36, 3.4e-4 at 2^38 (the cost
doubles with each bit above 2^34). MiniLM's LayerNorms need B = 2^18, M = 2^31."""

REFRESH_BOUNDS_META: str = "refresh_bounds"
"""``graph.meta`` key of the per-node bounds B ({node name: B}, :func:`secure.evaluate.he_model.refresh_bounds`)."""

OUTPUTS: str = "graph outputs"
"""The bounds key and name of a refresh that the outputs' finishing needs."""

Trip = tuple[Cipher, torch.Tensor | None, int, torch.Tensor | None]
"""One item of a round trip: (cipher, target slot positions or None to keep its layout,
ciphertexts wanted back, x's element for every target position)."""

Sent = tuple[list[bytes], np.ndarray | None, int]
"""What the client receives for one item: masked ciphertexts, gather index or None, count wanted back."""


def mask_amplitude(bound: float, where: str) -> float:
    """M for values with ``|value| <= bound``: ``max(MASK_BOUND, bound 2^HIDING_BITS)``, so that
    ``B / M <= 2^-13``; refuses (:class:`RefreshBoundError`, naming ``where``) a bound that would
    need a mask above :data:`MAX_MASK_BOUND`: the server never sends a mask that hides worse
    than documented. Measured: 5 refreshes of values ~N(0, 1) cost 1.75e-5 at M = 2^20,
    1.96e-5 at 2^26, 2.05e-5 at 2^30, 3.1e-5 at 2^34."""
    mask = max(MASK_BOUND, bound * 2.0**HIDING_BITS)
    if not 0.0 < bound or mask > MAX_MASK_BOUND:
        raise RefreshBoundError(f"refresh in {where}: values up to {bound:g} need a mask of {mask:g} "
                                f"> {MAX_MASK_BOUND:g} for 2^-{HIDING_BITS} hiding; the server refuses to send it")
    return mask


def gather_index(target: torch.Tensor, source: torch.Tensor, count: int, slots: int) -> np.ndarray:
    """The client's gather index of a re-layout: ``out[target[i]] = in[source[i]]``, -1 (a 0) elsewhere."""
    gather = np.full(count * slots, -1, dtype=np.int64)
    gather[target.reshape(-1).numpy()] = source.reshape(-1).numpy()
    return gather


def refreshed(x: Cipher, target: torch.Tensor | None, cts: list[Any]) -> Cipher:
    """The cipher a trip returns: x's layout kept (target None) or the new one, clean."""
    if target is None:
        return Cipher(cts, x.index, x.period, x.clean)
    return Cipher(cts, target, None, True)


class RefreshLink(Protocol):
    """The client's side of a refresh: decrypt masked ciphertexts, gather, re-encrypt."""

    def refresh(self, items: list[Sent], check: RefreshCheck) -> list[list[bytes]]:
        """For each (masked ciphertexts, gather index or None, output count): the client's
        fresh ciphertexts of ``out[j] = in_flat[gather[j]]`` (0 where gather is -1), after it
        checked every slot against ``check`` (bound and mask per item, the node's name)."""
        ...


class RefreshSession:
    """The trips of one query through ``link``, with their counters.

    ``allow_refresh=False`` turns a needed trip into :class:`OutOfLevelsError` (what the
    planner reports for a non-interactive run). ``on_event(kind, detail)`` is called for
    each trip (progress display). ``refresh_bounds``: B per graph node name
    (``graph.meta[REFRESH_BOUNDS_META]``); ``node`` is (name, description) of the node being
    evaluated (:meth:`at`), None outside a node; a node without a bound, or no node, gets
    ``default_bound`` (:data:`REFRESH_BOUND`).
    """

    def __init__(self, engine: SealEngine | GhostEngine, link: RefreshLink | None = None, *,
                 allow_refresh: bool = True, on_event: Callable[[str, dict], None] | None = None,
                 refresh_bounds: dict[str, float] | None = None, default_bound: float = REFRESH_BOUND) -> None:
        self.engine = engine
        self.slots = engine.slots
        self.link = link
        self.allow_refresh = allow_refresh
        self.on_event = on_event
        self.refresh_bounds = dict(refresh_bounds or {})
        self.default_bound = default_bound
        self.node: tuple[str, str] | None = None
        self.refreshes = 0
        self.relayouts = 0
        self.bytes_to_client = 0
        self.bytes_from_client = 0

    @contextlib.contextmanager
    def at(self, key: str, where: str) -> Iterator[None]:
        """Trips inside are bounded by ``refresh_bounds[key]`` and named ``where`` to the client."""
        prev, self.node = self.node, (key, where)
        try:
            yield
        finally:
            self.node = prev

    # ---- what the ops ask for ----------------------------------------------------------
    def ensure_levels(self, xs: Sequence[Any]) -> None:
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
        return self.trip([(x, None, len(x.cts), None) for x in xs])

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
        return self.trip(trips)

    # ---- one round trip ------------------------------------------------------------------
    def trip(self, items: list[Trip]) -> list[Cipher]:
        """One round trip for all items: counted, reported to ``on_event``, then :meth:`exchange`."""
        if not self.allow_refresh:
            what = "a re-layout" if any(t is not None for _, t, _, _ in items) else "a refresh"
            raise OutOfLevelsError(f"{what} through the client is needed but refresh is disabled")
        self.refreshes += 1
        if self.on_event is not None:
            self.on_event("refresh", {"ciphertexts": sum(len(x.cts) for x, *_ in items)})
        return self.exchange(items)

    def exchange(self, items: list[Trip]) -> list[Cipher]:
        """Mask every item, send it through the link, take the mask off the fresh ciphertexts."""
        if self.link is None:
            raise OutOfLevelsError("a refresh through the client is needed but no client link is set")
        check = self._check(len(items))
        with self.engine.stats.timed("refresh (server side)"):
            sent = [self._masked(item, amplitude) for item, amplitude in zip(items, check.masks)]
        with self.engine.stats.timed("refresh (client round trip)"):
            replies = self.link.refresh([s for s, _ in sent], check)
        with self.engine.stats.timed("refresh (server side)"):
            return [self._unmasked(item, s[1], mask, reply) for item, (s, mask), reply in zip(items, sent, replies)]

    def _check(self, items: int) -> RefreshCheck:
        """The bound B of the current node and its mask amplitude M, for every item."""
        key, where = self.node or ("", "no graph node")
        bound = float(self.refresh_bounds.get(key, self.default_bound))
        amplitude = mask_amplitude(bound, where)
        return RefreshCheck(where, [bound] * items, [amplitude] * items)

    def _masked(self, item: Trip, amplitude: float) -> tuple[Sent, np.ndarray]:
        """What the client receives for one item, and the masks of all its slots."""
        x, target, count, src = item
        blobs, masks = [], []
        for ct in x.cts:
            mask = secure_uniform(self.slots, amplitude)
            blobs.append(self.engine.serialize(self.engine.add_plain(ct, mask)))
            masks.append(mask)
        gather = None if target is None else gather_index(target, src, count, self.slots)
        self.bytes_to_client += sum(len(b) for b in blobs) + (0 if gather is None else gather.size * 4)
        return (blobs, gather, count), np.concatenate(masks)

    def _unmasked(self, item: Trip, gather: np.ndarray | None, mask: np.ndarray, reply: list[bytes]) -> Cipher:
        """The client's fresh ciphertexts of one item less the mask, moved as the gather moved the slots."""
        x, target, count, _ = item
        if len(reply) != count:
            raise ValueError(f"refresh reply has {len(reply)} ciphertexts, expected {count}")
        self.bytes_from_client += sum(len(b) for b in reply)
        moved = mask if gather is None else np.where(gather >= 0, mask[np.maximum(gather, 0)], 0.0)
        moved = moved.reshape(count, self.slots)
        cts = [self.engine.add_plain(self.engine.deserialize(b), -moved[i]) for i, b in enumerate(reply)]
        return refreshed(x, target, cts)

    # ---- outputs ---------------------------------------------------------------------------
    def referenced_only(self, v: Cipher) -> Cipher:
        """v as it goes back to the client: only the ciphertexts its index references, each
        multiplied by the 0/1 plaintext of its referenced slots (one level; a refresh first at
        the floor): period copies, partial sums and stale values, which depend on the weights,
        decrypt to CKKS noise instead (measured: 2.1 before, 7.9e-6 after, on the tiny model)."""
        used = torch.unique(v.index.reshape(-1) // self.slots)  # sorted ciphertext numbers
        index = torch.searchsorted(used, v.index // self.slots) * self.slots + v.index % self.slots
        out = Cipher([v.cts[i] for i in used.tolist()], index)
        self.ensure_levels([out])
        masks = referenced_mask(index, len(out.cts), self.slots).numpy()
        return Cipher([self.engine.mul_plain(ct, m) for ct, m in zip(out.cts, masks)], index)

    def flooded(self, c: Cipher, flood_bits: int | None) -> Cipher:
        """c with noise flooding (None: c itself, and then there is no circuit privacy).

        ``flood_bits = k``: every ciphertext gets a fresh encryption (public key, OS CSPRNG via
        ``secrets``) of noise uniform in ``[-2^-k, 2^-k]`` on the real and the imaginary part of
        every slot (all N coefficients of the decrypted polynomial), so the low bits the client
        decrypts no longer show the evaluation's noise (about 1e-5 at scale 2^30: two
        evaluations whose noise differs by d give views at statistical distance ``d 2^(k-1)``
        per slot part, about 2^-7 for k = 10: a heuristic, far from the 2^-40 of provable
        flooding, which 30-bit scales cannot afford), and the ciphertext is re-randomised.
        Cost: ``|flooded - unflooded| <= 2^-k`` per element plus the fresh encryption's noise
        (about 1e-5); measured on the tiny model (hidden 128, 2 layers, seq 16), max / mean:
        k = 8: 3.8e-3 / 1.9e-3, k = 10: 9.8e-4 / 5.2e-4, k = 12: 2.4e-4 / 1.3e-4,
        k = 16: 1.8e-5 / 7.5e-6, k = 20: 8.2e-6 / 1.1e-6.
        """
        if flood_bits is None:
            return c
        return Cipher([self._flood(ct, 2.0**-flood_bits) for ct in c.cts], c.index)

    def _flood(self, ct: Any, amplitude: float) -> Any:
        """ct + Enc(u), u uniform in [-amplitude, amplitude] + i [-amplitude, amplitude] per slot
        (encoded here: SealEngine.add_plain encodes real vectors only)."""
        eng = self.engine
        noise = secure_uniform(self.slots, amplitude) + 1j * secure_uniform(self.slots, amplitude)
        pt, fresh, out = eng.sa.Plaintext(), eng.sa.Ciphertext(), eng.sa.Ciphertext()
        with eng.stats.timed("flood"):
            eng.ctx.encoder.encode(noise, eng.ctx.parms_ids[eng.level(ct)], ct.scale, pt)
            eng.encryptor.encrypt(pt, fresh)
            eng.ev.add(ct, fresh, out)
        return out
