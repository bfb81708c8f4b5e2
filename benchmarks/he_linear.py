"""Encrypted activations times a plaintext weight matrix: TenSEAL's own packings against
ours (the diagonal method on a column-major layout, ``secure.he.linear``).

    python benchmarks/he_linear.py [--rows 16 32 128] [--dim 128]

For each row count: TenSEAL ``CKKSTensor(batch=True)`` reshaped to (1, dim) ``.mm`` (rows in the slots, one
ciphertext per column), TenSEAL ``CKKSVector.mm`` (one ciphertext per row; timed on a
few rows and scaled), and ours, all at N = 8192 on the same matrix; max abs error
against float64. Writes benchmarks/results/he_linear.json. About 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from secure.he.client import HeClient, server_engine
from secure.he.engine import GhostCt, GhostEngine
from secure.he.layout import Cipher, canonical
from secure.he.linear import matmul_plain
from secure.he.params import PARAM_SETS


def ours(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    ghost = GhostEngine(PARAM_SETS[0])  # the rotation steps the client needs Galois keys for
    index, count = canonical(x.shape, ghost.slots)
    matmul_plain(ghost, Cipher([GhostCt(ghost.top_level) for _ in range(count)], index), w)
    client = HeClient(PARAM_SETS[0], sorted(ghost.steps))
    engine = server_engine(client.public_context())
    blobs, idx = client.encrypt(x)
    cx = Cipher([engine.deserialize(b) for b in blobs], idx)  # fresh: canonical, clean, one level
    t = time.perf_counter()
    y = matmul_plain(engine, cx, w)
    seconds = time.perf_counter() - t
    got = client.decrypt([engine.serialize(c) for c in y.cts], y.index)
    return seconds, float((got - x @ w).abs().max())


def tenseal_tensor(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[40, 30, 30, 30, 30, 58])
    ctx.global_scale = 2**30
    ctx.generate_galois_keys()
    enc = ts.ckks_tensor(ctx, ts.plain_tensor(x.tolist()), batch=True)  # rows in the slots: shape (dim,)
    t = time.perf_counter()
    y = enc.reshape([1, x.shape[1]]).mm(ts.plain_tensor(w.tolist()))
    seconds = time.perf_counter() - t
    got = torch.tensor(y.decrypt().tolist(), dtype=torch.float64).reshape(x.shape[0], w.shape[1])
    return seconds, float((got - x @ w).abs().max())


def tenseal_vector(x: torch.Tensor, w: torch.Tensor, sample: int = 2) -> tuple[float, float]:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[40, 30, 30, 30, 30, 58])
    ctx.global_scale = 2**30
    ctx.generate_galois_keys()
    err = 0.0
    t = time.perf_counter()
    for r in range(sample):
        y = ts.ckks_vector(ctx, x[r].tolist()).mm(w.tolist())
        err = max(err, float((torch.tensor(y.decrypt(), dtype=torch.float64) - x[r] @ w).abs().max()))
    return (time.perf_counter() - t) / sample * x.shape[0], err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.dim, args.dim, dtype=torch.float64, generator=gen) / args.dim**0.5
    results = []
    print(f"{'rows':>5} {'method':<32}{'seconds':>9}{'max err':>10}{'ratio to ours':>15}")
    for rows in args.rows:
        x = torch.randn(rows, args.dim, dtype=torch.float64, generator=gen)
        row = {"rows": rows, "dim": args.dim}
        for name, fn in (("ours (diagonal, column-major)", ours), ("TenSEAL CKKSTensor batch mm", tenseal_tensor),
                         ("TenSEAL CKKSVector mm per row", tenseal_vector)):
            seconds, err = fn(x, w)
            row[name] = {"seconds": seconds, "max_abs_error": err}
        base = row["ours (diagonal, column-major)"]["seconds"]
        for name in ("ours (diagonal, column-major)", "TenSEAL CKKSTensor batch mm", "TenSEAL CKKSVector mm per row"):
            r = row[name]
            print(f"{rows:5d} {name:<32}{r['seconds']:9.2f}{r['max_abs_error']:10.1e}{r['seconds'] / base:15.1f}")
        results.append(row)
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "he_linear.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'he_linear.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
