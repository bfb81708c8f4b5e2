"""``python -m client --config cluster.json --token-file TOKEN "sentence"``: one secure query.

Prints the sentence embedding (L2-normalised, as sentence-transformers gives it) as JSON.
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
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--token-file", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole query")
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
