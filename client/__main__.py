"""One secure query from the command line; prints the sentence embedding (L2-normalised,
as sentence-transformers gives it) as JSON, for a classifier its label and the label
probabilities (softmax at the client), or for a causal LM of a format-1 deal (dealt
as logits of every position, served by ``Query``) the token it predicts next.

    echo "sentence" | python -m client --config cluster.json --token-file TOKENS.json    # MPC
    echo "sentence" | python -m client --config cluster.json --token-file TOKENS.json --model minilm
    python -m client --mode he --config he.json --token-file TOKEN --text-file Q.txt     # HE
    echo "a small" | python -m client generate --config cluster.json --token-file TOKENS.json --model tiny-llama

``generate`` streams a causal LM's continuation (see ``client.generate``; ``--help`` there).

The query is read from standard input (``-`` or no text), from ``--text-file``, or from
the command line; prefer the first two: a command line is visible to every user of the
machine (``ps``). MPC mode's token file holds one token per party (JSON, see
``party.config.load_client_tokens``).

MPC mode secret-shares the query to the three party nodes of the cluster config, for the
model ``--model`` names in their catalogue (default: the cluster file's ``model``). HE mode
encrypts it under a fresh CKKS key for one HE node (``python -m party.he_node``) serving a
Power-Softmax model (``--model`` names it as the node does: a distilled folder, or
``tiny`` for the random-weight test model, whose ids are the tokenizer's modulo its
vocabulary). A progress line counts the client refreshes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from client.sdk import QueryFailed, SecureClient, token_mismatches
from client.text_input import read_text
from party.config import ClusterConfig, ConfigError, HeNodeConfig, load_client_tokens


def main(argv: list[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else argv
    if args_given[:1] == ["generate"]:  # python -m client generate ...: a causal LM's continuation
        from client.generate import main as generate_main

        return generate_main(args_given[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("text", nargs="?", default="-",
                    help="the query; '-' or nothing reads standard input (recommended: argv is visible in ps)")
    ap.add_argument("--text-file", type=Path, help="read the query from this file")
    ap.add_argument("--mode", choices=["mpc", "he"], default="mpc")
    ap.add_argument("--config", type=Path, required=True,
                    help="cluster config (MPC mode) or HE node config (HE mode, party.he_config)")
    ap.add_argument("--model", default=None,
                    help="MPC mode: the model of the cluster's catalogue to query (default: the cluster file's "
                         "model); HE mode: the model name on the HE node: tiny (default), minilm-power or a "
                         "distilled folder")
    ap.add_argument("--seq", type=int, default=16, help="padded length the HE node serves (HE mode)")
    ap.add_argument("--workers", type=int, default=0,
                    help="HE mode: worker processes of this client for its refreshes (each starts in about "
                         "a second; worth it for MiniLM, not for the tiny model)")
    ap.add_argument("--token-file", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="the queried model's tokenizer folder (MPC mode; default: tokenizers/MODEL/ or tokenizer/ "
                         "beside the cluster file, or the bundled MiniLM's)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole query")
    ap.add_argument("--insecure", action="store_true", help="allow a configuration without TLS (local demos only)")
    args = ap.parse_args(args_given)
    try:
        args.text = read_text(args.text, args.text_file)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.mode == "he":
        return _he(args)
    try:
        cfg = ClusterConfig.load(args.config)
        tokens = load_client_tokens(args.token_file)
        if mismatched := token_mismatches(cfg, tokens):
            raise ConfigError(f"the token file {args.token_file} does not match the cluster file {args.config}: its "
                              f"token for {', '.join(f'party{i}' for i in mismatched)} is not among the digests the "
                              "cluster file accepts there (a token file of another cluster?)")
        client = SecureClient(cfg, tokens, args.timeout, insecure=args.insecure, tokenizer_dir=args.tokenizer,
                              model=args.model)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with client:
        try:
            answer = None
            if client.model_entry().kind == "classifier":
                answer = client.classify(args.text)
                result = answer.result
            else:
                inputs = client.encode_text(args.text)
                result = client.query(inputs)
        except QueryFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ValueError as e:  # no tokenizer for the model
            print(f"error: {e}", file=sys.stderr)
            return 2
        stats = {"seconds": round(result.seconds, 3), "rounds": result.rounds,
                 "bytes_sent_per_party": result.bytes_sent}
        if answer is not None:
            probabilities = {k: round(v, 6) for k, v in answer.as_dict().items()}
            print(json.dumps({"label": answer.label, "probabilities": probabilities, **stats}))
            return 0
        if result.outputs[0].dim() == 3:  # a causal LM of a format-1 deal (logits of every position): next token
            last = int(inputs["attention_mask"][0].sum()) - 1
            token = int(result.outputs[0][0, last].argmax())
            print(json.dumps({"next_token_id": token, "next_token": client.tokenizer().decode([token]), **stats}))
            return 0
    embedding = torch.nn.functional.normalize(result.embedding, dim=-1)[0]
    print(json.dumps({"embedding": [round(v, 6) for v in embedding.tolist()], **stats}))
    return 0


def _he(args: argparse.Namespace) -> int:
    from client.he import HeSecureClient
    from secure.distill.cache import tokenizer_dir
    from secure.models import load_minilm

    args.model = args.model or "tiny"
    try:
        token = args.token_file.read_text().strip()
        client = HeSecureClient.from_config(HeNodeConfig.load(args.config), token, args.timeout, args.insecure,
                                            args.workers)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, tokenizer = load_minilm(None if args.model == "tiny" else tokenizer_dir(args.model))
    enc = tokenizer([args.text], padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    with client:
        ids = enc["input_ids"]
        if args.model == "tiny":
            ids = ids % client.table(args.model).shape[0]

        def progress(done: int, total: int) -> None:
            print(f"\rclient refreshes {done}/{total}", end="", file=sys.stderr, flush=True)

        try:
            result = client.query(args.model, ids, enc["attention_mask"], progress)
        except QueryFailed as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    print(file=sys.stderr)
    embedding = torch.nn.functional.normalize(result.outputs[0], dim=-1)[0]
    print(json.dumps({"embedding": [round(v, 6) for v in embedding.tolist()], "seconds": round(result.seconds, 3),
                      "client_refreshes": result.refreshes, "bytes_up": result.bytes_up,
                      "bytes_down": result.bytes_down}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
