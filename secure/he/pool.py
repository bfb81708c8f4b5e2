"""Worker processes for an HE query: the server's linear layers, the client's refreshes.

SEAL's Python bindings (``tenseal.sealapi``) hold the GIL through every primitive, so two
threads run a linear layer's thousands of plaintext products no faster than one (measured:
2000 products, 0.27 s in one thread, 0.28 s in two). Processes do. :class:`WorkerProcesses`
keeps ``workers`` interpreters, each joined to the caller by a socket pair, each holding
the keys of the last :data:`KEYS_KEPT` queries it served (sent once, when it first meets a
query: the caller mirrors what each worker holds). A worker that dies or stops answering
within ``timeout_s`` fails the call with :class:`HeWorkerError`; the pool then stops all
workers and starts fresh ones at the next call.

* :class:`HePool` (the server's): each linear layer's diagonal method
  (:func:`~secure.he.linear.diagonal_products`) is split between the workers and the
  caller, by output ciphertexts when the layer has at least as many outputs as inputs
  (each part rotates every input and owns whole outputs), else by input ciphertexts (each
  part rotates only its inputs; the caller adds the partial outputs). One message each
  way per worker and layer: the part's serialised inputs, the weights and the indices,
  then its ciphertexts. A worker sees what the server sees (ciphertexts, public keys,
  weights) and keeps the diagonals of its parts only, so the plaintext cache budget is
  split between the processes, not copied.
* :class:`ClientPool` (the client's, on the client's machine): a refresh's decryptions and
  re-encryptions split between the workers and the caller. These workers hold the
  client's secret key: they are the client's own processes and nothing else talks to them.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from secure.he.engine import SealEngine
from secure.he.linear import diagonal_products
from secure.he.plain_cache import PlainCache

KEYS_KEPT: int = 4
"""Queries' keys a worker keeps loaded: the HE node admits two queries at a time."""


class HeWorkerError(RuntimeError):
    """A worker process died, refused a job, or did not answer in time."""


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


def cache_share(budget_bytes: int, workers: int) -> int:
    """Each process's plaintext cache budget when the caller and ``workers`` workers split
    ``budget_bytes`` (each keeps the diagonals of its own parts only)."""
    return budget_bytes // (workers + 1)


def context_digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


class WorkerProcesses:
    """``workers`` worker interpreters and the jobs sent to them (module docstring).
    Thread-safe: the jobs of concurrent queries go one call at a time."""

    def __init__(self, workers: int, cache_bytes: int = 0, timeout_s: float = 600.0) -> None:
        if workers < 0:
            raise ValueError(f"an HE pool needs 0 or more workers, got {workers}")
        self.workers = workers
        self.cache_bytes = cache_bytes
        self.timeout_s = timeout_s
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._known: list[OrderedDict[bytes, None]] = []  # the keys each worker holds, as it evicts them
        self._digests: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()  # id(keys) -> (keys, digest)
        self._lock = threading.Lock()

    def _start(self) -> None:
        """A fresh interpreter per worker (no fork of a threaded server, and unlike
        multiprocessing's spawn no re-import of the caller's main script)."""
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
        """Stop the workers (they also end when this process closes its sockets)."""
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

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spread(self, kind: str, keys: bytes, payloads: list[Any], local: Callable[[], Any]) -> tuple[Any, list]:
        """Send ``payloads[w]`` to worker w (with ``keys``, the query's key material, where
        it does not hold them yet), run ``local()`` here meanwhile, then collect the
        workers' results, in order; a worker's failure stops the pool and raises."""
        with self._lock:
            try:
                self._start()
                digest = self._digest(keys)
                for w, payload in enumerate(payloads):
                    known = self._known[w]
                    self._send(w, ("job", kind, digest, None if digest in known else keys, payload))
                    known[digest] = None
                    known.move_to_end(digest)
                    while len(known) > KEYS_KEPT:
                        known.popitem(last=False)
                mine = local()
                return mine, [self._receive(w) for w in range(len(payloads))]
            except HeWorkerError:
                self.close()
                raise

    def _digest(self, keys: bytes) -> bytes:
        """The digest of a query's key material, hashed once per query, not once per call
        (a public context is about 40 MB: 43 ms to hash, 24 linear layers a query)."""
        held = self._digests.get(id(keys))
        if held is None or held[0] is not keys:
            held = (keys, context_digest(keys))  # the bytes are held, so their id is not reused
            self._digests[id(keys)] = held
            while len(self._digests) > KEYS_KEPT:
                self._digests.popitem(last=False)
        return held[1]

    def _send(self, w: int, message: tuple) -> None:
        try:
            self._conns[w].send(message)
        except (OSError, ValueError) as e:
            raise HeWorkerError(f"HE worker {w} is gone ({e}); the pool restarts at the next call") from e

    def _receive(self, w: int) -> tuple[Any, dict[str, tuple[int, float]]]:
        conn, proc = self._conns[w], self._procs[w]
        try:
            if not conn.poll(self.timeout_s):
                raise HeWorkerError(f"HE worker {w} did not answer within {self.timeout_s:g} s")
            reply = conn.recv()
        except (EOFError, OSError) as e:
            raise HeWorkerError(f"HE worker {w} exited (code {proc.poll()}) during its job") from e
        if reply[0] == "error":
            raise HeWorkerError(f"HE worker {w} failed its job: {reply[1]}")
        return reply[1], reply[2]


class HePool(WorkerProcesses):
    """The server's workers for the linear layers (0 workers: everything in the caller).
    ``cache_bytes``: each worker's plaintext cache budget (the caller keeps its own, the
    engine's ``plain_cache``)."""

    def diagonal_products(self, engine: SealEngine, cts: Sequence[Any], wn: np.ndarray, stride: int,
                          count: int) -> list[Any]:
        """:func:`~secure.he.linear.diagonal_products` on all of ``cts`` and every output,
        split between the workers, which take the longer runs, and the caller, which takes
        the last (it has the serialisation and the rest of the query besides)."""
        public = engine.public_context
        by_outputs = count >= len(cts)
        runs = split(count if by_outputs else len(cts), self.workers + 1)
        if not self.workers or public is None or len(runs) == 1:
            return diagonal_products(engine, cts, wn, stride, count)
        cts = list(cts)
        everything = list(range(len(cts)))
        theirs, mine = runs[:-1], runs[-1]
        blobs = [engine.serialize(ct) for ct in cts] if by_outputs else None
        payloads = []
        for run in theirs:
            if by_outputs:
                payloads.append((blobs, wn, stride, count, everything, run))
            else:
                payloads.append(([engine.serialize(cts[g]) for g in run], wn, stride, count, run, list(range(count))))

        def local() -> list[Any]:
            if by_outputs:
                return diagonal_products(engine, cts, wn, stride, count, everything, mine)
            return diagonal_products(engine, [cts[g] for g in mine], wn, stride, count, mine, None)

        here, results = self._spread("linear", public, payloads, local)
        parts = []
        for out, stats in results:
            engine.stats.merge(stats, " (worker)")
            parts.append([engine.deserialize(b) for b in out])
        if by_outputs:
            return [ct for part in parts for ct in part] + here
        total = here
        for part in parts:
            total = [engine.add(a, b) for a, b in zip(total, part)]
        return total


class ClientPool(WorkerProcesses):
    """The client's workers for the decryptions and re-encryptions of a refresh."""

    def map(self, client: Any, kind: str, items: Sequence[Any], one: Callable[[Any], Any]) -> list[Any]:
        """``[one(item) for item in items]`` ("decrypt": blobs to slot vectors, "encrypt":
        slot vectors to blobs), the items split between the workers and the caller."""
        runs = split(len(items), self.workers + 1)
        if not self.workers or len(runs) == 1:
            return [one(item) for item in items]
        theirs, mine = runs[:-1], runs[-1]
        here, results = self._spread(kind, client.key_material(), [[items[i] for i in run] for run in theirs],
                                     lambda: [one(items[i]) for i in mine])
        out = []
        for part, stats in results:
            client.stats.merge(stats, " (worker)")
            out += part
        return out + here


# ---- the worker process ------------------------------------------------------------------
def _worker_main(fd: int, cache_bytes: int) -> None:
    """Serve jobs on the socket ``fd`` until "close" or the caller's end closes."""
    from secure.he.client import HeClient, server_engine

    conn = Connection(fd)
    cache = PlainCache(cache_bytes) if cache_bytes else None
    holders: OrderedDict[bytes, Any] = OrderedDict()  # a query's SealEngine (server) or HeClient (client)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "close":
            return
        try:
            _, kind, digest, keys, payload = message
            if keys is not None:
                if kind == "linear":
                    holder = server_engine(keys)
                    holder.plain_cache = cache
                else:
                    holder = HeClient.from_key_material(keys)
                holders[digest] = holder
                while len(holders) > KEYS_KEPT:
                    holders.popitem(last=False)
            holder = holders.get(digest)
            if holder is None:
                raise KeyError("a job for keys this worker does not hold")
            holders.move_to_end(digest)
            holder.stats = type(holder.stats)()
            if kind == "linear":
                blobs, wn, stride, count, inputs, outputs = payload
                out = diagonal_products(holder, [holder.deserialize(b) for b in blobs], wn, stride, count,
                                        inputs, outputs)
                result: Any = [holder.serialize(ct) for ct in out]
            elif kind == "decrypt":
                result = [holder.decrypt_vector(b) for b in payload]
            elif kind == "encrypt":
                result = [holder.encrypt_vector(v) for v in payload]
            else:
                raise ValueError(f"unknown job {kind!r}")
            reply = ("ok", result, holder.stats.pairs())
        except Exception as e:  # noqa: BLE001 - reported to the caller, which fails the call
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
