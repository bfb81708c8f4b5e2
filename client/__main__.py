"""One secure query from the command line; prints the sentence embedding (L2-normalised,
as sentence-transformers gives it) as JSON.

    python -m client --config cluster.json --token-file TOKEN "sentence"            # MPC
    python -m client --mode he --server 127.0.0.1:50070 --model DIR --seq 16 \
        --token-file TOKEN "sentence"                                                # HE

MPC mode secret-shares the query to the three party nodes of the cluster config. HE mode
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

from client.sdk import QueryFailed, SecureClient
from party.config import ClusterConfig, ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("text")
    ap.add_argument("--mode", choices=["mpc", "he"], default="mpc")
    ap.add_argument("--config", type=Path, help="cluster config (MPC mode)")
    ap.add_argument("--server", default="127.0.0.1:50070", help="HE node address (HE mode)")
    ap.add_argument("--model", default="tiny", help="model name on the HE node (HE mode)")
    ap.add_argument("--seq", type=int, default=16, help="padded length the HE node serves (HE mode)")
    ap.add_argument("--root-cert", type=Path, help="CA certificate of the HE node's TLS (HE mode)")
    ap.add_argument("--token-file", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole query")
    args = ap.parse_args(argv)
    if args.mode == "he":
        return _he(args)
    if args.config is None:
        print("error: --config is required in MPC mode", file=sys.stderr)
        return 2
    try:
        cfg = ClusterConfig.load(args.config)
        token = args.token_file.read_text().strip()
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with SecureClient(cfg, token, args.timeout) as client:
        try:
            result = client.embed(args.text)
        except QueryFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    embedding = torch.nn.functional.normalize(result.embedding, dim=-1)[0]
    print(json.dumps({"embedding": [round(v, 6) for v in embedding.tolist()], "seconds": round(result.seconds, 3),
                      "rounds": result.rounds, "bytes_sent_per_party": result.bytes_sent}))
    return 0


def _he(args: argparse.Namespace) -> int:
    from client.he import HeSecureClient
    from secure.models import load_minilm

    try:
        token = args.token_file.read_text().strip()
        root = args.root_cert.read_bytes() if args.root_cert else None
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, tokenizer = load_minilm(None if args.model == "tiny" else args.model)
    enc = tokenizer([args.text], padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    with HeSecureClient(args.server, token, args.timeout, root) as client:
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
