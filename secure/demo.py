"""Main job (until the party nodes exist): a BERT encoder layer on secret shares.

The model owner deals shares of the layer's weights, the client deals shares of its
input (with a padding mask), and the three parties, threads of this process linked by
in-process queues, evaluate the layer with the PUMA forms. The result is opened and
printed beside the exact plaintext layer and beside the same forms run on floats, with
a per-step breakdown of time, bytes and rounds.

    python -m secure.demo [--seq 32] [--hidden 128] [--heads 2] [--ffn 512]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from secure.approx.float_backend import FloatOps
from secure.blocks import encoder_layer, random_encoder_weights, reference_encoder_layer
from secure.mpc import shares as sh
from secure.mpc.arithmetic import open_float
from secure.mpc.backend import MpcOps
from secure.mpc.engine import LocalCluster
from secure.runtime.profiler import span


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--padding", type=int, default=4, help="masked positions at the end")
    args = ap.parse_args(argv)
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if not 0 <= args.padding < args.seq:
        ap.error(f"--padding must be in [0, --seq), got {args.padding}")

    weights = random_encoder_weights(args.hidden, args.heads, args.ffn, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.seq, args.hidden, generator=gen, dtype=torch.float64)
    mask_bias = torch.zeros(args.seq, dtype=torch.float64)
    mask_bias[args.seq - args.padding:] = -1e4
    print(f"BERT layer: seq {args.seq} ({args.padding} padded), hidden {args.hidden}, "
          f"{args.heads} heads, FFN {args.ffn}; three parties in one process")

    exact = reference_encoder_layer(x, weights, args.heads, mask_bias)
    forms = encoder_layer(FloatOps(), x, weights, args.heads, mask_bias)

    cluster = LocalCluster()
    fp = cluster.fp
    w_shares = weights.map(lambda t: sh.deal_shares(fp.encode(t), fp.frac_bits))
    x_shares = sh.deal_shares(fp.encode(x), fp.frac_bits)
    per_party = [(x_shares[i], w_shares.map(lambda s, i=i: s[i])) for i in range(3)]

    def program(party, xs, ws):
        out = encoder_layer(MpcOps(party), xs, ws, args.heads, mask_bias,
                            trace=lambda name: span(party, name))
        return open_float(party, out)

    bytes0, rounds0 = cluster.bytes_sent(), cluster.rounds
    t0 = time.perf_counter()
    secure = cluster.run(program, per_party)[0]
    seconds = time.perf_counter() - t0
    sent = [b - b0 for b, b0 in zip(cluster.bytes_sent(), bytes0)]

    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    keep = slice(0, args.seq - args.padding)
    print(f"\nsecure run: {seconds:.2f} s, {cluster.rounds - rounds0} rounds, "
          f"MB sent per party {[round(b / 1e6, 2) for b in sent]}")
    print(f"max |secure - exact|  = {float((secure - exact)[keep].abs().max()):.4f}   "
          f"min token cosine {float(cosine(secure, exact)[keep].min()):.6f}")
    print(f"max |forms  - exact|  = {float((forms - exact)[keep].abs().max()):.4f}   "
          f"(the approximations alone, on floats)")
    print(f"max |secure - forms|  = {float((secure - forms)[keep].abs().max()):.4f}   "
          f"(fixed point and truncation)")
    print("first token, first 6 features:")
    for name, t in (("exact", exact), ("secure", secure)):
        print(f"  {name:<7}" + " ".join(f"{v:8.4f}" for v in t[0, :6].tolist()))

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for s in cluster.parties[0].profiler.spans:
        if s.depth == 0 and "." in s.name:
            t = totals[s.name]
            t[0] += s.duration_s
            t[1] += s.bytes_sent
            t[2] += s.rounds
    total_s = sum(t[0] for t in totals.values()) or 1.0
    print(f"\n{'step (party 0)':<20}{'seconds':>9}{'share':>8}{'MB sent':>10}{'rounds':>8}")
    for name, (secs, nbytes, rounds) in totals.items():
        print(f"{name:<20}{secs:9.3f}{secs / total_s:8.1%}{nbytes / 1e6:10.2f}{rounds:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
