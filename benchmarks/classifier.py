"""The shipped classifier ``minilm-topics`` on its test split: plaintext against three parties.

For every text of the WordNet topic task's test split (``secure.classify.topics``: 384
definitions, 64 per class): the plaintext model's logits, the secure forms' on floats, and
the logits the client reconstructs from three parties (the in-process engine,
``LocalCluster``: the nodes' protocols without gRPC). Texts are sorted by token length and
run ``--batch`` at a time (16: one secure run shares its rounds among 16 texts), each batch
padded to the smallest bucket (16, 32, 64, 128) that holds its longest text; the
classifier is captured with that batch dimension once per bucket, its weights dealt once.
The plaintext and float-forms logits come from the same padded batches.

Reports the accuracy of each, the label agreement between shares and plaintext (the
target is at least 99.5%), the logit and probability differences, and time, rounds and
bytes per batch and per text. Prints a table and writes JSON (default
``benchmarks/results/classifier.json``).

    nice -n 10 python benchmarks/classifier.py                 # the whole test split (15-20 minutes on 2 cores)
    python benchmarks/classifier.py --limit 32                 # two batches, for a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from secure.classify import MINILM_TOPICS, load_topic_classifier
from secure.classify.topics import LABELS, test_examples
from secure.graph.buckets import BUCKETS, bucket_for
from secure.graph.capture import capture
from secure.graph.passes import RECIPES, rewrite
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_float, run_mpc


def _batches(tokenizer: Any, texts: list[str], batch: int) -> list[tuple[list[int], int]]:
    """(indices into ``texts``, padded length) per batch, texts sorted by token length."""
    lengths = [len(tokenizer(t, truncation=True, max_length=BUCKETS[-1])["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [(order[k:k + batch], bucket_for(max(lengths[i] for i in order[k:k + batch]), BUCKETS))
            for k in range(0, len(order), batch)]


def _inputs(tokenizer: Any, texts: list[str], batch: int, seq: int) -> dict[str, torch.Tensor]:
    """The batch's inputs, filled up to ``batch`` rows with empty texts (their outputs are dropped)."""
    rows = texts + [""] * (batch - len(texts))
    enc = tokenizer(rows, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run(limit: int | None, batch: int, recipe: str, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model, tokenizer = load_topic_classifier()
    examples = list(test_examples())[:limit]
    texts = [e.text for e in examples]
    truth = torch.tensor([e.label for e in examples])
    n = len(texts)
    plain = torch.zeros(n, len(LABELS), dtype=torch.float64)
    floats = torch.zeros_like(plain)
    secure = torch.zeros_like(plain)
    cluster = LocalCluster(deadline_s=600.0)
    graphs: dict[int, Any] = {}
    shares = None
    per_batch = []
    t_all = time.perf_counter()
    plan = _batches(tokenizer, texts, batch)
    for k, (rows, seq) in enumerate(plan):
        inputs = _inputs(tokenizer, [texts[i] for i in rows], batch, seq)
        if seq not in graphs:
            graph, weights = capture(model, inputs, meta={"model": MINILM_TOPICS, "seq_len": seq})
            graphs[seq] = rewrite(graph, RECIPES[recipe])
            if shares is None:
                shares = deal_weights(weights, cluster.fp)
                float_weights = weights
        graph = graphs[seq]
        with torch.no_grad():
            plain[rows] = model(**inputs).double()[:len(rows)]
        (f,), _ = run_float(graph, float_weights, inputs)
        floats[rows] = f[:len(rows)]
        bytes0, rounds0 = cluster.bytes_sent(), cluster.rounds
        t0 = time.perf_counter()
        (s,), _ = run_mpc(cluster, graph, shares, deal_inputs(graph, inputs, cluster.fp))
        seconds = time.perf_counter() - t0
        secure[rows] = s[:len(rows)]
        sent = [b - a for a, b in zip(bytes0, cluster.bytes_sent())]
        agree = int((secure[rows].argmax(-1) == plain[rows].argmax(-1)).sum())
        per_batch.append({"texts": len(rows), "seq_len": seq, "seconds": round(seconds, 2),
                          "rounds": cluster.rounds - rounds0, "bytes_per_party": sent, "agree": agree})
        print(f"batch {k + 1}/{len(plan)}: {len(rows)} texts at length {seq}: {seconds:.1f} s, "
              f"{cluster.rounds - rounds0} rounds, {max(sent) / 1e6:.0f} MB from the busiest party, "
              f"labels agree {agree}/{len(rows)}", flush=True)
    total_s = time.perf_counter() - t_all
    secure_s = sum(b["seconds"] for b in per_batch)
    p_plain, p_secure = torch.softmax(plain, -1), torch.softmax(secure, -1)
    disagree = (secure.argmax(-1) != plain.argmax(-1)).nonzero().flatten().tolist()
    top2 = plain.topk(2, dim=-1).values

    def acc(logits: torch.Tensor) -> float:
        return round(float((logits.argmax(-1) == truth).double().mean()), 4)

    return {
        "model": MINILM_TOPICS, "recipe": recipe, "task": "WordNet topic task, test split (secure.classify.topics)",
        "labels": list(LABELS), "texts": n, "batch": batch,
        "buckets": {str(s): sum(1 for _, q in plan if q == s) for s in sorted({q for _, q in plan})},
        "accuracy": {"plaintext": acc(plain), "float_forms": acc(floats), "three_parties": acc(secure)},
        "label_agreement": {"three_parties_vs_plaintext": round(1 - len(disagree) / n, 4),
                            "float_forms_vs_plaintext": round(float((floats.argmax(-1) == plain.argmax(-1))
                                                                    .double().mean()), 4),
                            "disagreements": [{"text": texts[i], "plaintext": LABELS[int(plain[i].argmax())],
                                               "three_parties": LABELS[int(secure[i].argmax())],
                                               "plaintext_top2_gap": round(float(top2[i, 0] - top2[i, 1]), 4)}
                                              for i in disagree]},
        "logit_error": {"max": round(float((secure - plain).abs().max()), 5),
                        "mean": round(float((secure - plain).abs().mean()), 5),
                        "float_forms_max": round(float((floats - plain).abs().max()), 5)},
        "probability_error_max": round(float((p_secure - p_plain).abs().max()), 5),
        "seconds": {"three_parties": round(secure_s, 1), "per_text": round(secure_s / n, 3),
                    "per_batch_mean": round(secure_s / len(per_batch), 2), "total": round(total_s, 1)},
        "rounds_per_batch": sorted({b["rounds"] for b in per_batch}),
        "bytes_per_text_busiest_party": round(sum(max(b["bytes_per_party"]) for b in per_batch) / n),
        "batches": per_batch,
        "machine": {"threads": threads, "cpus": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="only the first N test texts (default: all 384)")
    ap.add_argument("--batch", type=int, default=16, help="texts per secure run")
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/classifier.json"))
    args = ap.parse_args(argv)
    result = run(args.limit, args.batch, args.recipe, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    a, g, s = result["accuracy"], result["label_agreement"], result["seconds"]
    print(f"\n{result['texts']} test texts, batches of {result['batch']} ({result['buckets']} by padded length)")
    print(f"accuracy: plaintext {a['plaintext']:.4f}, secure forms on floats {a['float_forms']:.4f}, "
          f"three parties {a['three_parties']:.4f}")
    print(f"labels agree, three parties vs plaintext: {g['three_parties_vs_plaintext']:.4f} "
          f"({len(g['disagreements'])} differ); max logit difference {result['logit_error']['max']:.4f}, "
          f"max probability difference {result['probability_error_max']:.4f}")
    print(f"three parties: {s['three_parties']:.0f} s, {s['per_text']:.2f} s per text; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
