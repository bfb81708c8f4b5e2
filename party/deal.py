"""Model dealing: the owner compiles a model with a recipe and deals weight shares.

    python -m party.deal keygen --out keys/              # optional: an Ed25519 dealer key
    python -m party.deal --model minilm --recipe ours --out deal/ [--sign-key keys/dealer.key]
    python -m party.deal --model path/to/hf-folder --out deal/ [--name NAME] [--seq-lens 16,32]
    python -m party.deal --model minilm-power --out deal/        # distilled Power-Softmax (recipe power)

``--model`` is ``minilm`` (the shipped all-MiniLM-L6-v2), ``minilm-power`` (its distilled
Power-Softmax form, ``secure.distill.cache``) or a local Hugging Face folder (config.json,
weights and tokenizer; loaded offline, no code from the folder): an encoder is served as
its mean-pooled sentence embedding (``secure.models.SentenceEncoder``), a causal LM as the
logits of every position (``CausalLM``). A folder with ``secure_recipe.json`` (written by
``python -m secure.distill``) is dealt with its Power-Softmax recipe (``--recipe power``,
the default there). Before anything is written the model is captured and rewritten at
every length and checked: each graph must load as a party loads it, every client input
must be token ids for an embedding lookup, and the secure forms on floats must agree with
the model (cosine >= ``MIN_FLOAT_COSINE``); a model the rewrite cannot handle is refused
with the op and the module.

It writes ``party0/shares.pt``, ``party1/shares.pt``, ``party2/shares.pt`` (one per party, each
in its own 0700 folder, each file 0600 from its first byte: the rewritten graphs for each
padded length and that party's pair of every weight's shares; any two of them give the
model), ``model.json`` (what clients may know: model name, lengths, inputs),
``manifest.json`` (the deal id and each file's size and SHA-256, see ``party.integrity``;
signed into ``manifest.sig`` with ``--sign-key``) and, for a model folder, ``tokenizer/``
(the client tokenizes with it). It prints the digests and the cluster file lines that pin
them: nodes refuse unpinned share files. Dealt into a folder written by ``secure-cluster``
(``party.cluster_init``), it pins them itself in every copy of cluster.json there. Hand
each party only its own folder. No party file holds plain weights. Two of the three share
components are PRG-expanded from 128-bit seeds (as the client does for its one-hot), so
party 0's file holds seeds only and the others one dense component each.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tqdm import tqdm

from party.config import ConfigError
from party.integrity import load_signing_key, make_manifest, make_signing_key, pin_instructions, write_manifest
from party.private_files import make_private_dir, open_private
from secure.graph.buckets import BUCKETS
from secure.graph.capture import CaptureError, capture
from secure.graph.ir import Graph, GraphValidationError
from secure.graph.passes import RECIPES, Recipe, UnsupportedOpError
from secure.graph.passes import rewrite as rewrite_graph
from secure.models import ModelFolderError, SentenceEncoder, load_minilm, load_model_folder, max_positions
from secure.mpc.embedding import SeededComponent, seeded_deal
from secure.mpc.ring import FixedPoint
from secure.runtime.execute import run_float
from secure.runtime.interpreter import embedding_vocab

FORMAT = 1
DEFAULT_SEQ_LENS = BUCKETS
MIN_FLOAT_COSINE = 0.99
"""The least cosine between the secure forms on floats and the model, on the dealer's example."""
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""What a dealt model may be called (the name a client's query header carries)."""
DISTILLED_RECIPE_FILE = "secure_recipe.json"
MakeInputs = Callable[[int], dict[str, torch.Tensor]]


class DealError(ValueError):
    """A model or a setting the dealer refuses, before it writes anything."""


def _component(c: SeededComponent | torch.Tensor) -> dict[str, Any]:
    if isinstance(c, SeededComponent):
        return {"seed": torch.frombuffer(bytearray(c.seed), dtype=torch.uint8).clone()}
    return {"dense": c}


def deal_weight(value: torch.Tensor, fp: FixedPoint) -> list[tuple[dict, dict]]:
    """The three parties' pairs for one weight: x_0, x_1 from seeds, x_2 = W - x_0 - x_1."""
    return [(_component(a), _component(b)) for a, b in seeded_deal(fp.encode(value.to(torch.float64)))]


@dataclass
class CompiledModel:
    """A model captured and rewritten at every padded length, and checked; nothing written yet."""

    name: str
    recipe: Recipe
    seq_lens: tuple[int, ...]
    graphs: dict[int, Graph]
    weights: dict[str, torch.Tensor]
    inputs: list[dict[str, Any]]
    float_cosine: float


def compile_model(model: torch.nn.Module, make_inputs: MakeInputs, model_name: str, recipe: Recipe,
                  seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS, progress: bool = True,
                  reference: torch.nn.Module | None = None) -> CompiledModel:
    """Capture ``model`` at every padded length, rewrite it with ``recipe`` and check it (see
    :func:`check_compiled`); raises ``CaptureError``, ``UnsupportedOpError`` (naming the op and
    the module) or ``DealError``."""
    graphs: dict[int, Graph] = {}
    weights: dict[str, torch.Tensor] = {}
    for seq in tqdm(seq_lens, desc="capture and rewrite", disable=not progress):
        graph, w = capture(model, make_inputs(seq), meta={"model": model_name, "seq_len": seq})
        graphs[seq] = rewrite_graph(graph, recipe)
        weights = weights or w
    secure_graph = graphs[seq_lens[0]]
    inputs = [{"name": i.name, "kind": i.kind, "vocab_size": embedding_vocab(secure_graph, i.name) or 0}
              for i in secure_graph.inputs]
    compiled = CompiledModel(model_name, recipe, tuple(seq_lens), graphs, weights, inputs, float("nan"))
    compiled.float_cosine = check_compiled(compiled, reference or model, make_inputs)
    return compiled


def check_compiled(compiled: CompiledModel, reference: torch.nn.Module, make_inputs: MakeInputs) -> float:
    """What a party and a client will need, checked before anything is dealt: every graph
    loads as a party loads it (the op registry), every client input is token ids that feed an
    embedding lookup (what a client can share), and at the shortest length the secure forms
    on floats agree with ``reference`` (finite, same shape, cosine >= ``MIN_FLOAT_COSINE``).
    Returns that cosine."""
    for seq, graph in compiled.graphs.items():
        Graph.from_json(graph.to_json(), source=f"the graph of {compiled.name} at length {seq}")
    seq = min(compiled.seq_lens)
    graph = compiled.graphs[seq]
    for spec in graph.inputs:
        if spec.kind == "client" and embedding_vocab(graph, spec.name) is None:
            raise DealError(f"the model's input {spec.name!r} does not feed an embedding lookup: a client can only "
                            "share token ids (a one-hot) with the parties")
    example = make_inputs(seq)
    try:
        (out,), _ = run_float(graph, compiled.weights, example)
    except (RuntimeError, ValueError) as e:  # the interpreter names the node and the op
        raise DealError(f"the rewritten {compiled.name} fails on floats at length {seq}: {type(e).__name__}: "
                        f"{e}") from e
    with torch.no_grad():
        expected = reference(**example)
    if tuple(out.shape) != tuple(expected.shape):
        raise DealError(f"the rewritten {compiled.name} gives shape {tuple(out.shape)} on floats where the model "
                        f"gives {tuple(expected.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise DealError(f"the rewritten {compiled.name} gives non-finite values on floats at length {seq}")
    cosine = float(torch.nn.functional.cosine_similarity(out.flatten().double(), expected.flatten().double(), dim=0))
    if not cosine >= MIN_FLOAT_COSINE:
        raise DealError(f"the rewritten {compiled.name} ({compiled.recipe.name} recipe) disagrees with the model on "
                        f"floats at length {seq}: cosine {cosine:.4f} < {MIN_FLOAT_COSINE} (a module the rewrite "
                        "translates wrongly, or a recipe the model was not distilled for)")
    return cosine


def write_deal(compiled: CompiledModel, out: Path, fp: FixedPoint | None = None, progress: bool = True,
               sign_key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """Deal a compiled model's weights and write the party files, model.json and the manifest."""
    fp = fp or FixedPoint()
    out.mkdir(parents=True, exist_ok=True)
    graphs = {seq: graph.to_json() for seq, graph in compiled.graphs.items()}
    per_party: list[dict[str, Any]] = [{} for _ in range(3)]
    for name, value in tqdm(compiled.weights.items(), desc="deal weight shares", disable=not progress):
        for i, pair in enumerate(deal_weight(value, fp)):
            per_party[i][name] = {"shape": list(value.shape), "first": pair[0], "second": pair[1]}
    deal_id = secrets.token_hex(16)
    files = {i: party_file(out, i) for i in range(3)}
    recipe = compiled.recipe
    for i, path in files.items():
        make_private_dir(path.parent)
        with open_private(path) as f:
            torch.save({"format": FORMAT, "party": i, "deal_id": deal_id, "model": compiled.name,
                        "recipe": recipe.to_dict(), "frac_bits": fp.frac_bits, "graphs": graphs,
                        "weights": per_party[i]}, f)
    info = {"model": compiled.name, "seq_lens": list(compiled.seq_lens), "inputs": compiled.inputs,
            "recipe": recipe.name, "frac_bits": fp.frac_bits}
    (out / "model.json").write_text(json.dumps(info, indent=2))
    public = {k: info[k] for k in ("model", "recipe", "frac_bits", "seq_lens")}
    write_manifest(out, make_manifest(out, deal_id, files, public), sign_key)
    return info


def deal_model(model: torch.nn.Module, example: dict[str, torch.Tensor] | None, make_inputs: MakeInputs,
               model_name: str, recipe: Recipe, out: Path, seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
               fp: FixedPoint | None = None, progress: bool = True,
               sign_key: Ed25519PrivateKey | None = None, reference: torch.nn.Module | None = None
               ) -> dict[str, Any]:
    """Capture ``model`` at every padded length, rewrite, check, then deal and write the party
    files and manifest (``example`` is unused: ``make_inputs(seq)`` gives each length's)."""
    compiled = compile_model(model, make_inputs, model_name, recipe, seq_lens, progress, reference)
    return write_deal(compiled, out, fp, progress, sign_key)


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


@dataclass
class ModelSource:
    """What ``--model`` named, loaded: the wrapped model, how to make an example input of each
    length, its dealt name and recipe, its tokenizer (written beside the deal for the client),
    and the model the secure forms are checked against (a distilled model's exact Power-Softmax)."""

    model: torch.nn.Module
    make_inputs: MakeInputs
    name: str
    recipe: Recipe
    tokenizer: Any
    reference: torch.nn.Module | None = None
    folder: Path | None = None


def tokenized_inputs(tokenizer: Any, text: str = "dealing") -> MakeInputs:
    """Example inputs of a given length: ``text`` tokenized, right-padded (pad id, or 0 for a
    tokenizer without one), with its attention mask."""
    def make_inputs(seq: int) -> dict[str, torch.Tensor]:
        ids = list(tokenizer(text, truncation=True, max_length=seq)["input_ids"])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        mask = [1] * len(ids) + [0] * (seq - len(ids))
        return {"input_ids": torch.tensor([ids + [pad] * (seq - len(ids))]), "attention_mask": torch.tensor([mask])}

    return make_inputs


def parse_seq_lens(text: str) -> tuple[int, ...]:
    """``--seq-lens``: comma-separated padded lengths, each at least 2, returned sorted and unique."""
    try:
        lengths = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise DealError(f"--seq-lens must be comma-separated whole numbers (e.g. 16,32,64,128), got {text!r}") from None
    if not lengths or lengths[0] < 2:
        raise DealError(f"--seq-lens needs at least one length, each at least 2, got {text!r}")
    return tuple(lengths)


def _recipe_for(recipe: str | None, folder: Path | None) -> Recipe:
    distilled = folder is not None and (folder / DISTILLED_RECIPE_FILE).is_file()
    name = recipe or ("power" if distilled else "ours")
    if name != "power":
        if name not in RECIPES:
            raise DealError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)} or 'power'")
        return RECIPES[name]
    if not distilled:
        raise DealError(f"recipe 'power' needs a distilled Power-Softmax model (a folder with "
                        f"{DISTILLED_RECIPE_FILE}, written by `python -m secure.distill --out DIR`, or minilm-power); "
                        f"{folder or 'minilm'} is not one")
    from secure.evaluate.fidelity import resolve_recipe

    return resolve_recipe("power", str(folder))


def model_source(model: str, recipe: str | None = None, name: str | None = None,
                 seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS) -> ModelSource:
    """Load what ``--model`` names: ``minilm``, ``minilm-power`` (distilled on first use, see
    ``secure.distill.cache``) or a Hugging Face folder; ``DealError``/``ModelFolderError`` when
    it cannot be dealt with ``recipe`` at ``seq_lens``."""
    if model == "minilm":
        if name not in (None, "minilm"):
            raise DealError("--name is for model folders; the shipped all-MiniLM-L6-v2 is dealt as 'minilm'")
        encoder, tokenizer = load_minilm()
        return ModelSource(SentenceEncoder(encoder), tokenized_inputs(tokenizer), "minilm", _recipe_for(recipe, None),
                           tokenizer)
    from secure.distill.cache import DISTILLED_NAMES, resolve_model

    folder = resolve_model(model)  # a catalogue name is distilled on its first use
    if not folder.is_dir():
        raise DealError(f"--model {model}: not a folder, nor one of minilm, {', '.join(DISTILLED_NAMES)}")
    default_name = model if model in DISTILLED_NAMES else folder.resolve().name
    name = name or default_name
    if not MODEL_NAME.match(name):
        raise DealError(f"the model name {name!r} must be 1-64 characters of [A-Za-z0-9_.:-]; pass --name NAME")
    chosen = _recipe_for(recipe, folder)
    wrapped, tokenizer, causal = load_model_folder(folder)
    longest = max_positions(wrapped)
    if longest is not None and max(seq_lens) > longest:
        raise DealError(f"{folder} holds at most {longest} positions; --seq-lens asks for {max(seq_lens)}")
    reference = None
    if chosen.softmax.kind == "power" and not causal:  # checked against its exact Power-Softmax, not softmax
        from secure.distill.attention import load_power_softmax_model

        reference = SentenceEncoder(load_power_softmax_model(folder))
    return ModelSource(wrapped, tokenized_inputs(tokenizer), name, chosen, tokenizer, reference, folder)


def deal_source(source: ModelSource, out: Path, seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
                fp: FixedPoint | None = None, progress: bool = True,
                sign_key: Ed25519PrivateKey | None = None) -> CompiledModel:
    """Compile and check ``source``, then (only then) deal it into ``out``; a model folder's
    tokenizer goes to ``out/tokenizer/`` for the client."""
    compiled = compile_model(source.model, source.make_inputs, source.name, source.recipe, seq_lens, progress,
                             source.reference)
    vocab = max((i["vocab_size"] for i in compiled.inputs), default=0)
    if vocab and len(source.tokenizer) > vocab:
        raise DealError(f"{source.name}'s tokenizer has {len(source.tokenizer)} ids but its embedding table only "
                        f"{vocab} rows: a client's token ids would fall outside it")
    write_deal(compiled, out, fp, progress, sign_key)
    if source.folder is not None:
        source.tokenizer.save_pretrained(str(out / "tokenizer"))
    return compiled


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
    ap.add_argument("--model", default="minilm",
                    help="minilm, minilm-power, or a Hugging Face model folder (config.json, weights, tokenizer)")
    ap.add_argument("--recipe", default=None, choices=[*sorted(RECIPES), "power"],
                    help="secure forms (default: power for a distilled folder, else ours)")
    ap.add_argument("--name", help="the dealt model's name (default: minilm, minilm-power, or the folder's name)")
    ap.add_argument("--out", type=Path, required=True,
                    help="where to write the deal (a folder written by secure-cluster: pinned there too)")
    ap.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)))
    ap.add_argument("--frac-bits", type=int, default=18)
    ap.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) signing manifest.json into manifest.sig")
    args = ap.parse_args(argv)
    sign_key = load_signing_key(args.sign_key) if args.sign_key else None
    t0 = time.perf_counter()
    try:
        seq_lens = parse_seq_lens(args.seq_lens)
        if args.model == "minilm" and args.name in (None, "minilm") and args.recipe in (None, *RECIPES):
            deal_minilm(args.out, RECIPES[args.recipe or "ours"], seq_lens, FixedPoint(args.frac_bits),
                        sign_key=sign_key)
            recipe = args.recipe or "ours"
        else:
            source = model_source(args.model, args.recipe, args.name, seq_lens)
            compiled = deal_source(source, args.out, seq_lens, FixedPoint(args.frac_bits), sign_key=sign_key)
            recipe = compiled.recipe.name
            print(f"checked: the secure forms on floats against the model, cosine {compiled.float_cosine:.6f}")
    except (DealError, ModelFolderError, CaptureError, UnsupportedOpError, GraphValidationError) as e:
        print(f"error: {e}\nnothing was written to {args.out}", file=sys.stderr)
        return 2
    print(f"dealt {args.model} ({recipe}) for lengths {list(seq_lens)} into {args.out} in "
          f"{time.perf_counter() - t0:.1f} s")
    from party.cluster_init import is_cluster_folder, pin_deal

    if is_cluster_folder(args.out):
        try:
            print(pin_deal(args.out, args.out))
        except ConfigError as e:
            print(f"error: dealt into {args.out}, but could not pin it there: {e}", file=sys.stderr)
            return 2
        return 0
    manifest = json.loads((args.out / "manifest.json").read_text())
    public = None
    if args.sign_key:
        public = args.sign_key.with_suffix(".pub")
        public = public if public.exists() else Path("<the dealer's public key PEM>")
    print(pin_instructions(manifest, args.out, public))
    print(f"or copy them into a folder written by secure-cluster: secure-cluster pin --deal {args.out} --out CLUSTER")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
