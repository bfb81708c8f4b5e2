"""Encoded weight plaintexts kept between queries.

A linear layer under CKKS multiplies by thousands of encoded diagonals of its weight
matrix (:func:`secure.he.linear.matmul_plain`); encoding one (an inverse FFT and one NTT
per prime) costs more than the product itself, and the diagonals depend only on the
weights, the layout, the level and the scale, never on the client or its keys. So the
server keeps them, up to a memory budget, for every later query with the same parameters.

An entry at level ``l`` holds ``N (l + 1)`` 64-bit words (the plaintext in NTT form over
the level's primes): 320 KiB at the top level of N = 8192. The cache fills in the order of
first use and never evicts: a query walks the same diagonals in the same order every time,
and under a budget smaller than that working set least-recently-used eviction would miss
on every access, where keeping the first entries hits on all of them.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

DEFAULT_BUDGET_BYTES: int = 4 << 30
"""The HE node's default: 4 GiB of encoded plaintexts."""


def weight_key(w: np.ndarray, *layout: int) -> bytes:
    """A key for a weight matrix under one layout: a BLAKE2b digest of its shape, dtype,
    bytes and the layout's integers (content, not identity: a recycled buffer with other
    values must never hit)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((w.shape, str(w.dtype), layout)).encode())
    h.update(np.ascontiguousarray(w).tobytes())
    return h.digest()


class PlainCache:
    """Encoded plaintexts by (key, level, scale), up to ``budget_bytes``; counts hits,
    misses and bytes held."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"plaintext cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[tuple[Hashable, int, float], Any] = {}
        self._lock = threading.Lock()  # queries run in worker threads and share the cache

    def get(self, key: Hashable, level: int, scale: float, size: int, encode: Callable[[], Any]) -> Any:
        """The plaintext for (key, level, scale): cached, or ``encode()`` (kept if its ``size``
        bytes fit the budget)."""
        full = (key, level, scale)
        with self._lock:
            pt = self._entries.get(full)
            if pt is not None:
                self.hits += 1
                return pt
            self.misses += 1
        pt = encode()
        with self._lock:
            if full not in self._entries and self.bytes + size <= self.budget_bytes:
                self._entries[full] = pt
                self.bytes += size
        return pt

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def summary(self) -> dict[str, float]:
        """Entries, MiB held, hits and misses so far."""
        return {"entries": len(self._entries), "mib": self.bytes / 2**20, "hits": self.hits, "misses": self.misses}
