"""Main job (until the party nodes exist): all-MiniLM-L6-v2 on secret shares, in process.

The model owner captures the shipped model, rewrites it with the secure forms and deals
weight shares to three parties; the client tokenizes its sentence locally and deals its
one-hot token shares; the three parties (threads of this process over in-process
queues) run the rewritten graph in lockstep; the client alone reconstructs the sentence
embedding. It is printed beside the plaintext model's, with the cosine and a breakdown
of time, bytes and rounds per part of the model.

    python -m secure.demo ["your sentence"] [--recipe ours|puma] [--max-length 128]
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch

from secure.graph.capture import capture
from secure.graph.fidelity import BUCKETS, bucket_length
from secure.graph.passes import RECIPES, rewrite
from secure.models import SentenceEncoder, load_minilm
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_mpc

DEFAULT_TEXT = "A client asks a question of a model it may not see; the owner must not see the question."

_PARTS = [
    (re.compile(r"embeddings"), "embedding + LayerNorm"),
    (re.compile(r"layer\.(\d+)\.attention\.self"), "layer {} attention (QKV, softmax, context)"),
    (re.compile(r"layer\.(\d+)\.attention\.output\.dense"), "layer {} attention output"),
    (re.compile(r"layer\.(\d+)\.attention\.output"), "layer {} LayerNorm 1"),
    (re.compile(r"layer\.(\d+)\.intermediate"), "layer {} FFN up + GeLU"),
    (re.compile(r"layer\.(\d+)\.output\.dense"), "layer {} FFN down"),
    (re.compile(r"layer\.(\d+)\.output"), "layer {} LayerNorm 2"),
]


def part_of(label: str) -> str:
    """Human name of the model part a traced node belongs to."""
    for pattern, name in _PARTS:
        m = pattern.search(label)
        if m:
            return name.format(*m.groups())
    return "pooling"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("text", nargs="?", default=DEFAULT_TEXT, help="the client's sentence")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="ours")
    ap.add_argument("--max-length", type=int, default=128, choices=BUCKETS)
    args = ap.parse_args(argv)

    t_setup = time.perf_counter()
    encoder, tokenizer = load_minilm()
    model = SentenceEncoder(encoder)
    tokens = len(tokenizer(args.text, truncation=True, max_length=args.max_length)["input_ids"])
    seq = bucket_length(tokens, [b for b in BUCKETS if b <= args.max_length])
    enc = tokenizer([args.text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    print(f"all-MiniLM-L6-v2, recipe {args.recipe!r}: {tokens} tokens padded to {seq}; "
          "three parties in one process")

    # model owner: capture, rewrite, deal weight shares
    graph, weights = capture(model, inputs)
    secure_graph = rewrite(graph, RECIPES[args.recipe])
    cluster = LocalCluster()
    weight_shares = deal_weights(weights, cluster.fp)
    # client: one-hot token shares
    client = deal_inputs(secure_graph, inputs, cluster.fp)
    print(f"set-up (load, capture, rewrite, deal): {time.perf_counter() - t_setup:.1f} s; client upload "
          f"per party {[round(b / 1e6, 2) for b in client.upload_bytes]} MB")

    for p in cluster.parties:
        p.profiler.clear()
    bytes0, rounds0 = cluster.bytes_sent(), cluster.rounds
    t0 = time.perf_counter()
    (secure,), _ = run_mpc(cluster, secure_graph, weight_shares, client, trace_spans=True)
    seconds = time.perf_counter() - t0
    sent = [b - b0 for b, b0 in zip(cluster.bytes_sent(), bytes0)]
    with torch.no_grad():
        plain = model(**inputs).double()
    cosine = float(torch.nn.functional.cosine_similarity(secure, plain))
    secure_n = torch.nn.functional.normalize(secure, dim=-1)[0]
    plain_n = torch.nn.functional.normalize(plain, dim=-1)[0]

    print(f"\nsecure query: {seconds:.2f} s, {cluster.rounds - rounds0} rounds, MB sent per party "
          f"{[round(b / 1e6, 1) for b in sent]}")
    print(f"cosine(secure, plaintext) = {cosine:.6f}   max |difference| of normalised embeddings "
          f"{float((secure_n - plain_n).abs().max()):.2e}")
    print("normalised embedding, first 8 of 384:")
    for name, t in (("plaintext", plain_n), ("secure", secure_n)):
        print(f"  {name:<10}" + " ".join(f"{v:8.4f}" for v in t[:8].tolist()))

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for s in cluster.parties[0].profiler.spans:
        if s.depth == 0:
            t = totals[part_of(s.name)]
            t[0] += s.duration_s
            t[1] += s.bytes_sent
            t[2] += s.rounds
    total = sum(t[0] for t in totals.values()) or 1.0
    print(f"\n{'part (party 0)':<42}{'seconds':>9}{'share':>8}{'MB sent':>10}{'rounds':>8}")
    for name, (secs, nbytes, rounds) in totals.items():
        print(f"{name:<42}{secs:9.3f}{secs / total:8.1%}{nbytes / 1e6:10.2f}{rounds:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
