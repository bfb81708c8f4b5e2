"""Worker processes that share the linear layers of an HE query.

SEAL's Python bindings (``tenseal.sealapi``) hold the GIL through every primitive, so two
threads run a linear layer's thousands of plaintext products no faster than one (measured:
2000 products, 0.27 s in one thread, 0.28 s in two). Processes do: :class:`HePool` keeps
``workers`` processes, each with its own SEAL context, the query's public keys and its own
plaintext cache, and splits each layer's diagonal method (:func:`~secure.he.linear.diagonal_products`)
between them and the calling process:

* by output ciphertexts when the layer has at least as many outputs as inputs (each part
  rotates every input, its baby steps, and owns whole outputs), else by input ciphertexts
  (each part rotates only its inputs; the caller adds the parts' partial outputs);
* the caller sends each worker the serialised inputs of its part (after the level drop,
  so the smallest blobs), the weight matrix and the part's indices, computes its own part,
  then collects the workers' ciphertexts: one message each way per worker and layer.

A worker holds the keys of the last :data:`KEYS_KEPT` public contexts (by digest; a query's
context is sent once, when the worker first meets it) and the diagonals of its parts only,
so the cache budget is split between the processes, not copied. Nothing secret crosses: the
workers see what the server sees (ciphertexts, public keys, weights). A worker that dies or
stops answering within ``timeout_s`` fails the layer with :class:`HeWorkerError`; the pool
then stops all workers and starts fresh ones for the next query.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from secure.he.engine import SealEngine
from secure.he.linear import diagonal_products
from secure.he.plain_cache import PlainCache

KEYS_KEPT: int = 4
"""Public contexts a worker keeps loaded: the HE node admits two queries at a time."""


class HeWorkerError(RuntimeError):
    """A worker process died, refused a part, or did not answer in time."""


def split(n: int, parts: int) -> list[list[int]]:
    """0..n-1 in ``min(parts, n)`` contiguous runs of near-equal length (the first ones longer)."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


def context_digest(public_context: bytes) -> bytes:
    return hashlib.blake2b(public_context, digest_size=16).digest()


class HePool:
    """``workers`` processes for the linear layers (0: everything in the caller).

    ``cache_bytes``: each worker's plaintext cache budget (the caller keeps its own, the
    engine's ``plain_cache``). Thread-safe: parts of concurrent queries go one at a time.
    """

    def __init__(self, workers: int, cache_bytes: int = 0, timeout_s: float = 600.0) -> None:
        if workers < 0:
            raise ValueError(f"an HE pool needs 0 or more workers, got {workers}")
        self.workers = workers
        self.cache_bytes = cache_bytes
        self.timeout_s = timeout_s
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._known: list[OrderedDict[bytes, None]] = []  # the contexts each worker holds, as it evicts them
        self._lock = threading.Lock()

    # ---- life cycle ----------------------------------------------------------------
    def _start(self) -> None:
        """A fresh interpreter per worker (no fork of a threaded server, and unlike
        multiprocessing's spawn no re-import of the caller's main script), joined by a
        socket pair."""
        if self._procs or not self.workers:
            return
        for _ in range(self.workers):
            here, there = socket.socketpair()
            code = f"from secure.he.pool import _worker_main; _worker_main({there.fileno()}, {self.cache_bytes})"
            proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[there.fileno()], stdin=subprocess.DEVNULL)
            there.close()
            self._procs.append(proc)
            self._conns.append(Connection(here.detach()))
            self._known.append(OrderedDict())

    def close(self) -> None:
        """Stop the workers (they also end with this process)."""
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._known = [], [], []

    def __enter__(self) -> HePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one layer -------------------------------------------------------------------
    def diagonal_products(self, engine: SealEngine, cts: Sequence[Any], wn: np.ndarray, stride: int,
                          count: int) -> list[Any]:
        """:func:`~secure.he.linear.diagonal_products` on all of ``cts`` and every output,
        split between the workers and the caller (module docstring)."""
        public = getattr(engine, "public_context", None)
        if not self.workers or public is None:
            return diagonal_products(engine, cts, wn, stride, count)
        by_outputs = count >= len(cts)
        runs = split(count if by_outputs else len(cts), self.workers + 1)
        if len(runs) == 1:
            return diagonal_products(engine, cts, wn, stride, count)
        with self._lock:
            try:
                return self._run(engine, public, list(cts), wn, stride, count, by_outputs, runs)
            except HeWorkerError:
                self.close()
                raise

    def _run(self, engine: SealEngine, public: bytes, cts: list[Any], wn: np.ndarray, stride: int, count: int,
             by_outputs: bool, runs: list[list[int]]) -> list[Any]:
        self._start()
        digest = context_digest(public)
        everything = list(range(len(cts)))
        blobs = [engine.serialize(ct) for ct in cts] if by_outputs else None
        for w, run in enumerate(runs[1:]):
            inputs, outputs = (everything, run) if by_outputs else (run, list(range(count)))
            sent = blobs if blobs is not None else [engine.serialize(cts[g]) for g in run]
            known = self._known[w]
            context = None if digest in known else public
            self._send(w, ("part", digest, context, sent, wn, stride, count, inputs, outputs))
            known[digest] = None
            known.move_to_end(digest)
            while len(known) > KEYS_KEPT:
                known.popitem(last=False)
        mine = runs[0]
        if by_outputs:
            local = diagonal_products(engine, cts, wn, stride, count, everything, mine)
        else:
            local = diagonal_products(engine, [cts[g] for g in mine], wn, stride, count, mine, None)
        results = [self._receive(w, engine) for w in range(len(runs) - 1)]
        if by_outputs:
            return local + [ct for part in results for ct in part]
        total = local
        for part in results:
            total = [engine.add(a, b) for a, b in zip(total, part)]
        return total

    def _send(self, w: int, message: tuple) -> None:
        try:
            self._conns[w].send(message)
        except (OSError, ValueError) as e:
            raise HeWorkerError(f"HE worker {w} is gone ({e}); the pool restarts for the next query") from e

    def _receive(self, w: int, engine: SealEngine) -> list[Any]:
        conn, proc = self._conns[w], self._procs[w]
        try:
            if not conn.poll(self.timeout_s):
                raise HeWorkerError(f"HE worker {w} did not answer within {self.timeout_s:g} s")
            reply = conn.recv()
        except (EOFError, OSError) as e:
            raise HeWorkerError(f"HE worker {w} exited (code {proc.poll()}) during a linear layer") from e
        if reply[0] == "error":
            raise HeWorkerError(f"HE worker {w} failed its part: {reply[1]}")
        _, blobs, stats = reply
        for name, (n, seconds) in stats.items():
            engine.stats.count[f"{name} (worker)"] += n
            engine.stats.seconds[f"{name} (worker)"] += seconds
        return [engine.deserialize(b) for b in blobs]


# ---- the worker process ------------------------------------------------------------------
def _worker_main(fd: int, cache_bytes: int) -> None:
    """Serve parts on the socket ``fd`` until "close" or the caller's end closes."""
    from secure.he.client import server_engine

    conn = Connection(fd)
    cache = PlainCache(cache_bytes) if cache_bytes else None
    engines: OrderedDict[bytes, SealEngine] = OrderedDict()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "close":
            return
        try:
            _, digest, context, blobs, wn, stride, count, inputs, outputs = message
            if context is not None:
                engines[digest] = server_engine(context)
                engines[digest].plain_cache = cache
                while len(engines) > KEYS_KEPT:
                    engines.popitem(last=False)
            engine = engines.get(digest)
            if engine is None:
                raise KeyError("a part for a public context this worker does not hold")
            engines.move_to_end(digest)
            engine.stats = type(engine.stats)()
            cts = [engine.deserialize(b) for b in blobs]
            out = diagonal_products(engine, cts, wn, stride, count, inputs, outputs)
            reply = ("ok", [engine.serialize(ct) for ct in out],
                     {k: (engine.stats.count[k], engine.stats.seconds[k]) for k in engine.stats.count})
        except Exception as e:  # noqa: BLE001 - reported to the caller, which fails the layer
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
