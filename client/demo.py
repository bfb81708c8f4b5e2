"""The main job: three party nodes on loopback serving two models; a secret-shared
embedding query and a secure generation, each beside the plaintext model's answer.

    python -m client.demo ["your sentence"] [--prompt "a prompt"] [--new-tokens 12] [--recipe ours|puma]

1. The model owner deals all-MiniLM-L6-v2 and the shipped causal LM ``tiny-llama``
   (captured, rewritten with the secure forms, weights split into three shares) into one
   catalogue in ``.cluster/deal`` -- once; later runs reuse it.
2. A development CA and party certificates are made; three ``python -m party`` processes
   start on 127.0.0.1 with mutually authenticated TLS between them.
3. The client tokenizes its sentence locally, shares its one-hot tokens, sends each party
   its shares over TLS with its client token, and reconstructs the sentence embedding,
   printed beside the plaintext model's with the per-part breakdown the nodes report.
4. The client shares a prompt; the parties keep the LM's keys and values as shares and
   open only the next token's logits to the client, token after token; the continuation
   is printed beside the plaintext model's greedy one. The nodes are stopped at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from client.generate import TokenEvent, generate, model_tokenizer
from client.sdk import SecureClient, local_client
from party.launch import REPO, LocalNodes
from secure.graph.passes import RECIPES
from secure.lm import SHIPPED_LM_NAME, shipped_lm_path
from secure.models import SentenceEncoder, compare_embeddings, load_minilm, load_model_folder
from secure.runtime.breakdown import breakdown_table
from secure.runtime.generate import plaintext_continuation

DEFAULT_TEXT = "A client asks a question of a model it may not see; the owner must not see the question."
DEFAULT_PROMPT = "a small"
MODELS = ("minilm", SHIPPED_LM_NAME)
"""The catalogue the demo deals (``party.deal``'s ``--model`` values): an encoder, then a causal LM."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("text", nargs="?", default=DEFAULT_TEXT, help="the client's sentence")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt {SHIPPED_LM_NAME} continues")
    ap.add_argument("--new-tokens", type=int, default=12, help="tokens to generate")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="ours")
    ap.add_argument("--workdir", type=Path, default=REPO / ".cluster", help="where deal, certs and logs go")
    ap.add_argument("--insecure", action="store_true", help="no TLS between parties (logged loudly by the nodes)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    print(f"[1/4] dealing all-MiniLM-L6-v2 and {SHIPPED_LM_NAME} ({args.recipe}) into {args.workdir / 'deal'} "
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
            print(f"      answer reconstructed by the client in {result.seconds:.2f} s "
                  f"({result.rounds} rounds; MB sent per party {[round(b / 1e6, 1) for b in result.bytes_sent]}; "
                  f"client upload {[round(b / 1e6, 2) for b in result.upload_bytes]} MB)\n")
            print(compare_embeddings(result.embedding, plain))
            print()
            print(breakdown_table(result.spans, "part (as reported by party 0)"))
            print()
            _generation(client, args.prompt, args.new_tokens)
    finally:
        nodes.stop()
    return 0


def _generation(client: SecureClient, prompt: str, new_tokens: int) -> None:
    """Step 4: a secure greedy continuation of ``prompt``, beside the plaintext model's."""
    tokenizer = model_tokenizer(client, SHIPPED_LM_NAME)
    print(f"[4/4] secure generation with {SHIPPED_LM_NAME}: {new_tokens} tokens after {prompt!r} (the parties "
          "keep the keys and values as shares and open each step's logits to the client only)")

    def show(e: TokenEvent) -> None:
        cache = f", cache {e.capacity}" if e.capacity else ""
        print(f"      token {e.index + 1:2d} {e.text!r:<14} {e.kind}{cache}: {e.seconds:.2f} s, "
              f"{max(e.bytes_sent) / 1e6:.2f} MB, {e.rounds} rounds")

    secure = generate(client, SHIPPED_LM_NAME, prompt, new_tokens, tokenizer=tokenizer, on_token=show)
    lm = load_model_folder(shipped_lm_path())[0].lm
    plain_ids, _ = plaintext_continuation(lm, torch.tensor(secure.prompt_ids), new_tokens)
    eos = lm.config.eos_token_id
    if eos in plain_ids:
        plain_ids = plain_ids[:plain_ids.index(eos) + 1]
    same = sum(a == b for a, b in zip(secure.token_ids, plain_ids))
    decode = [e for e in secure.events if e.kind == "decode"]
    per_token = sum(e.seconds for e in decode) / max(len(decode), 1)
    print(f"\n      secure:    {prompt}{secure.text}")
    print(f"      plaintext: {prompt}{tokenizer.decode(plain_ids)}")
    print(f"      {same} of {len(plain_ids)} tokens equal the plaintext model's; prefill "
          f"{secure.events[0].seconds:.2f} s, then {per_token:.2f} s per token")


if __name__ == "__main__":
    raise SystemExit(main())
