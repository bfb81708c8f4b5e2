"""The main job: three party nodes on loopback, a secret-shared query, the answer.

    python -m client.demo ["your sentence"] [--recipe ours|puma] [--insecure]

1. The model owner deals all-MiniLM-L6-v2 (captured, rewritten with the secure forms,
   weights split into three shares) into ``.cluster/deal`` -- once; later runs reuse it.
2. A development CA and party certificates are made; three ``python -m party`` processes
   start on 127.0.0.1 with mutually authenticated TLS between them.
3. The client tokenizes its sentence locally, shares its one-hot tokens, sends each party
   its shares over TLS with its client token, and reconstructs the sentence embedding.
4. The answer is printed beside the plaintext model's, with the per-part breakdown the
   nodes report. The nodes are stopped at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from client.sdk import local_client
from party.launch import REPO, LocalNodes
from secure.graph.passes import RECIPES
from secure.models import SentenceEncoder, compare_embeddings, load_minilm
from secure.runtime.breakdown import breakdown_table

DEFAULT_TEXT = "A client asks a question of a model it may not see; the owner must not see the question."
MODELS = ("minilm",)
"""The catalogue the demo deals (``party.deal``'s ``--model`` values); it queries the first."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("text", nargs="?", default=DEFAULT_TEXT, help="the client's sentence")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="ours")
    ap.add_argument("--workdir", type=Path, default=REPO / ".cluster", help="where deal, certs and logs go")
    ap.add_argument("--insecure", action="store_true", help="no TLS between parties (logged loudly by the nodes)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    print(f"[1/4] dealing all-MiniLM-L6-v2 ({args.recipe}) into {args.workdir / 'deal'} "
          "(first run only: about a minute)")
    nodes = LocalNodes(args.workdir, recipe=args.recipe, tls=not args.insecure, models=MODELS)
    nodes.prepare()
    print(f"[2/4] starting three party nodes on 127.0.0.1 ({'plaintext' if args.insecure else 'mutual TLS'}); "
          f"logs in {args.workdir}/party*.log")
    nodes.start()
    try:
        nodes.wait_ready()
        print(f"      ready after {time.perf_counter() - t0:.0f} s")
        with local_client(nodes) as client:
            inputs = client.encode_text(args.text)
            tokens = int(inputs["attention_mask"].sum())
            print(f"[3/4] secret-shared query: {tokens} tokens padded to {inputs['input_ids'].shape[-1]}")
            bar = tqdm(total=1, desc="parties computing", unit="node")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            result = client.query(inputs, trace=True, progress=progress)
            bar.close()
        encoder, _ = load_minilm()
        with torch.no_grad():
            plain = SentenceEncoder(encoder)(**inputs).double()
        secure = result.embedding
        print(f"[4/4] answer reconstructed by the client in {result.seconds:.2f} s "
              f"({result.rounds} rounds; MB sent per party {[round(b / 1e6, 1) for b in result.bytes_sent]}; "
              f"client upload {[round(b / 1e6, 2) for b in result.upload_bytes]} MB)\n")
        print(compare_embeddings(secure, plain))
        print()
        print(breakdown_table(result.spans, "part (as reported by party 0)"))
    finally:
        nodes.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
