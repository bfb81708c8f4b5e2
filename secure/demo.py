"""all-MiniLM-L6-v2 on secret shares with the three parties in this process (the main job,
``python -m client.demo``, runs them as gRPC nodes).

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
import time

import torch

from secure.graph.buckets import BUCKETS, bucket_for, buckets_up_to
from secure.graph.capture import capture
from secure.graph.passes import RECIPES, rewrite
from secure.models import SentenceEncoder, compare_embeddings, load_minilm
from secure.mpc.engine import LocalCluster
from secure.runtime.breakdown import breakdown_table
from secure.runtime.execute import deal_inputs, deal_weights, run_mpc

DEFAULT_TEXT = "A client asks a question of a model it may not see; the owner must not see the question."

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
    seq = bucket_for(tokens, buckets_up_to(args.max_length))
    enc = tokenizer([args.text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    print(f"all-MiniLM-L6-v2, recipe {args.recipe!r}: {tokens} tokens padded to {seq}; "
          "three parties in one process")

    # model owner: capture, rewrite, deal weight shares
    graph, weights = capture(model, inputs)
    secure_graph = rewrite(graph, RECIPES[args.recipe], weights=weights)
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
    print(f"\nsecure query: {seconds:.2f} s, {cluster.rounds - rounds0} rounds, MB sent per party "
          f"{[round(b / 1e6, 1) for b in sent]}")
    print(compare_embeddings(secure, plain))

    spans = [s for s in cluster.parties[0].profiler.spans if s.depth == 1]  # the nodes inside the query span
    print()
    print(breakdown_table(spans, "part (party 0)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
