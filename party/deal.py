"""Model dealing: the owner compiles a model with a recipe and deals weight shares.

    python -m party.deal keygen --out keys/              # optional: an Ed25519 dealer key
    python -m party.deal --model minilm --recipe ours --out deal/ [--sign-key keys/dealer.key]

writes ``party0/shares.pt``, ``party1/shares.pt``, ``party2/shares.pt`` (one per party, each
in its own 0700 folder, each file 0600 from its first byte: the rewritten graphs for each
padded length and that party's pair of every weight's shares; any two of them give the
model), ``model.json`` (what clients may know: model name, lengths, inputs), and
``manifest.json`` (the deal id and each file's size and SHA-256, see ``party.integrity``;
signed into ``manifest.sig`` with ``--sign-key``). It prints the digests and the cluster
file lines that pin them: nodes refuse unpinned share files. Hand each party only its own
folder. No party file holds plain weights. Two of the three share components are
PRG-expanded from 128-bit seeds (as the client does for its one-hot), so party 0's file
holds seeds only and the others one dense component each.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tqdm import tqdm

from party.integrity import load_signing_key, make_manifest, make_signing_key, pin_instructions, write_manifest
from party.private_files import make_private_dir, open_private
from secure.graph.buckets import BUCKETS
from secure.graph.capture import capture
from secure.graph.passes import RECIPES, Recipe
from secure.graph.passes import rewrite as rewrite_graph
from secure.models import SentenceEncoder, load_minilm
from secure.mpc.embedding import SeededComponent, seeded_deal
from secure.mpc.ring import FixedPoint
from secure.runtime.interpreter import embedding_vocab

FORMAT = 1
DEFAULT_SEQ_LENS = BUCKETS


def _component(c: SeededComponent | torch.Tensor) -> dict[str, Any]:
    if isinstance(c, SeededComponent):
        return {"seed": torch.frombuffer(bytearray(c.seed), dtype=torch.uint8).clone()}
    return {"dense": c}


def deal_weight(value: torch.Tensor, fp: FixedPoint) -> list[tuple[dict, dict]]:
    """The three parties' pairs for one weight: x_0, x_1 from seeds, x_2 = W - x_0 - x_1."""
    return [(_component(a), _component(b)) for a, b in seeded_deal(fp.encode(value.to(torch.float64)))]


def deal_model(model: torch.nn.Module, example: dict[str, torch.Tensor], make_inputs: Any, model_name: str,
               recipe: Recipe, out: Path, seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
               fp: FixedPoint | None = None, progress: bool = True,
               sign_key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """Capture ``model`` at every padded length, rewrite, deal, and write the party files and manifest."""
    fp = fp or FixedPoint()
    out.mkdir(parents=True, exist_ok=True)
    graphs: dict[int, str] = {}
    weights: dict[str, torch.Tensor] = {}
    info_inputs: list[dict[str, Any]] = []
    for seq in tqdm(seq_lens, desc="capture and rewrite", disable=not progress):
        graph, w = capture(model, make_inputs(seq), meta={"model": model_name, "seq_len": seq})
        secure_graph = rewrite_graph(graph, recipe)
        graphs[seq] = secure_graph.to_json()
        weights = weights or w
        if not info_inputs:
            info_inputs = [{"name": i.name, "kind": i.kind, "vocab_size": embedding_vocab(secure_graph, i.name) or 0}
                           for i in secure_graph.inputs]
    per_party: list[dict[str, Any]] = [{} for _ in range(3)]
    for name, value in tqdm(weights.items(), desc="deal weight shares", disable=not progress):
        for i, pair in enumerate(deal_weight(value, fp)):
            per_party[i][name] = {"shape": list(value.shape), "first": pair[0], "second": pair[1]}
    deal_id = secrets.token_hex(16)
    files = {i: party_file(out, i) for i in range(3)}
    for i, path in files.items():
        make_private_dir(path.parent)
        with open_private(path) as f:
            torch.save({"format": FORMAT, "party": i, "deal_id": deal_id, "model": model_name,
                        "recipe": recipe.to_dict(), "frac_bits": fp.frac_bits, "graphs": graphs,
                        "weights": per_party[i]}, f)
    info = {"model": model_name, "seq_lens": list(seq_lens), "inputs": info_inputs, "recipe": recipe.name,
            "frac_bits": fp.frac_bits}
    (out / "model.json").write_text(json.dumps(info, indent=2))
    public = {k: info[k] for k in ("model", "recipe", "frac_bits", "seq_lens")}
    write_manifest(out, make_manifest(out, deal_id, files, public), sign_key)
    return info


def party_file(out: Path, party_id: int) -> Path:
    """Where the dealer writes party ``party_id``'s shares: ``out/party<id>/shares.pt``."""
    return out / f"party{party_id}" / "shares.pt"


def deal_minilm(out: Path, recipe: Recipe, seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
                fp: FixedPoint | None = None, progress: bool = True,
                sign_key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """Deal the shipped all-MiniLM-L6-v2 sentence encoder."""
    encoder, tokenizer = load_minilm()

    def make_inputs(seq: int) -> dict[str, torch.Tensor]:
        enc = tokenizer(["dealing"], padding="max_length", max_length=seq, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return deal_model(SentenceEncoder(encoder), make_inputs(seq_lens[0]), make_inputs, "minilm", recipe, out,
                      seq_lens, fp, progress, sign_key)


def keygen_main(argv: list[str]) -> int:
    """``python -m party.deal keygen --out DIR``: a new Ed25519 dealer key pair."""
    ap = argparse.ArgumentParser(prog="python -m party.deal keygen", description=keygen_main.__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    key, pub = make_signing_key(args.out)
    print(f"dealer signing key {key} (0600, keep it with the model owner); public key {pub} (give it to every "
          'party: "dealer_public_key" in cluster.json)')
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=["minilm"])
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)))
    ap.add_argument("--frac-bits", type=int, default=18)
    ap.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) signing manifest.json into manifest.sig")
    args = ap.parse_args(argv)
    sign_key = load_signing_key(args.sign_key) if args.sign_key else None
    t0 = time.perf_counter()
    seq_lens = tuple(int(s) for s in args.seq_lens.split(","))
    deal_minilm(args.out, RECIPES[args.recipe], seq_lens, FixedPoint(args.frac_bits), sign_key=sign_key)
    print(f"dealt {args.model} ({args.recipe}) for lengths {list(seq_lens)} into {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    manifest = json.loads((args.out / "manifest.json").read_text())
    public = None
    if args.sign_key:
        public = args.sign_key.with_suffix(".pub")
        public = public if public.exists() else Path("<the dealer's public key PEM>")
    print(pin_instructions(manifest, args.out, public))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
