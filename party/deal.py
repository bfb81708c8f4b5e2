"""Model dealing: the owner compiles one or several models with a recipe and deals weight shares.

    python -m party.deal keygen --out keys/              # optional: an Ed25519 dealer key
    python -m party.deal --model minilm --recipe ours --out deal/ [--sign-key keys/dealer.key]
    python -m party.deal --model path/to/hf-folder --out deal/ [--name NAME] [--seq-lens 16,32]
    python -m party.deal --model minilm-power --out deal/        # distilled Power-Softmax (recipe power)
    python -m party.deal --model minilm --model tiny-llama --out deal/   # a catalogue: several models
    python -m party.deal --model minilm-topics --out deal/       # the shipped topic classifier
    python -m party.deal --model enc=path/to/bert --model lm=path/to/llama --prompt-buckets 16 --capacities 31,63

``--model`` (repeatable; ``NAME=SOURCE`` deals SOURCE under NAME) is ``minilm`` (the shipped
all-MiniLM-L6-v2), ``minilm-power`` (its distilled Power-Softmax form,
``secure.distill.cache``), ``tiny-llama`` (the shipped small LLaMA-style LM,
``secure.lm.shipped_lm_path()``), ``minilm-topics`` (MiniLM plus a linear head: the WordNet
topic classifier of ``secure.classify``) or a local Hugging Face folder (config.json,
weights and tokenizer; loaded offline, no code from the folder). An encoder is served as its
mean-pooled sentence embedding (``secure.models.SentenceEncoder``, kind ``encoder``, one
graph per padded length of ``--seq-lens``); a classifier (``minilm-topics``, or a folder
whose architecture is a ``...ForSequenceClassification``: ``secure.models.SequenceClassifier``)
as its logits, kind ``classifier``, with its label names, at the same lengths; a causal LM
for generation (kind ``causal``,
``secure.graph.causal``: a prefill graph per prompt bucket of ``--prompt-buckets`` and a
decode graph per key/value cache capacity of ``--capacities``). A folder with
``secure_recipe.json`` (written by ``python -m secure.distill``) is dealt with its
Power-Softmax recipe (``--recipe power``, the default there). Before anything is written
every model is captured, rewritten and checked: each graph must load as a party loads it,
every client input must be token ids for an embedding lookup; an encoder's secure forms on
floats must agree with the model (cosine >= ``MIN_FLOAT_COSINE``), a causal LM's greedy
continuation on floats is compared with the model's (printed; a disagreement is a warning).
A model the rewrite cannot handle is refused with the op and the module.

It writes ``party0/shares.pt``, ``party1/shares.pt``, ``party2/shares.pt`` (one per party, each
in its own 0700 folder, each file 0600 from its first byte; format 2, see
``party.catalogue``: per model its rewritten graphs and that party's pair of every weight's
shares; any two of them give the models), ``model.json`` (what clients may know: each
model's name, kind, lengths, inputs), ``manifest.json`` (the deal id, the models and each
file's size and SHA-256, see ``party.integrity``; signed into ``manifest.sig`` with
``--sign-key``) and the tokenizers a client needs: the first model's in ``tokenizer/``
(none for ``minilm``, whose tokenizer every client has), every other's in
``tokenizers/NAME/``. The first model is the deal's default (``model`` in the manifest and
the cluster file). It prints the digests and the cluster file lines that pin them: nodes
refuse unpinned share files. Dealt into a folder written by ``secure-cluster``
(``party.cluster_init``), it pins them itself in every copy of cluster.json there. Hand
each party only its own folder. No party file holds plain weights. Two of the three share
components are PRG-expanded from 128-bit seeds (as the client does for its one-hot), so
party 0's file holds seeds only and the others one dense component each.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tqdm import tqdm

from party.catalogue import FORMAT, MODEL_NAME, graph_digest
from party.cluster_init import TOKENIZER_DIR, TOKENIZERS_DIR
from party.config import ConfigError
from party.integrity import load_signing_key, make_manifest, make_signing_key, pin_instructions, write_manifest
from party.private_files import make_private_dir, open_private
from secure.classify import MINILM_TOPICS, load_topic_classifier
from secure.graph.buckets import BUCKETS
from secure.graph.capture import CaptureError, capture
from secure.graph.causal import CausalGraphs, GenerationLimitError, capture_causal
from secure.graph.ir import Graph, GraphValidationError
from secure.graph.passes import RECIPES, REWRITE_VERSION, Recipe, UnsupportedOpError
from secure.graph.passes import rewrite as rewrite_graph
from secure.models import (
    ModelFolderError,
    SentenceEncoder,
    SequenceClassifier,
    load_minilm,
    load_model_folder,
    max_positions,
)
from secure.mpc.embedding import SeededComponent, seeded_deal
from secure.mpc.ring import FixedPoint
from secure.runtime.execute import run_float
from secure.runtime.generate import generate_float, plaintext_continuation
from secure.runtime.interpreter import embedding_vocab

DEFAULT_SEQ_LENS = BUCKETS
DEFAULT_PROMPT_BUCKETS = (16, 32)
"""A causal LM's default prompt buckets (the prompt is left-padded to one of them)."""
DEFAULT_CAPACITIES = (31, 63)
"""A causal LM's default key/value cache capacities (one decode graph each): 2^k - 1, so that
a decode step's softmax row (the capacity plus the new token) is a power of two and its max
tree has no extra level (9 rounds a layer saved against 32 and 64)."""
CHECK_NEW_TOKENS = 4
"""How many greedy tokens the dealer generates on floats to check a causal LM."""
CHECK_TEXT = "The secure dealer"
"""The prompt of that check (tokenized, truncated to the smallest prompt bucket)."""
MIN_FLOAT_COSINE = 0.99
"""The least cosine between the secure forms on floats and the model, on the dealer's example."""
SHIPPED_LM = "tiny-llama"
"""``--model`` name of the shipped small causal LM (``secure.lm.shipped_lm_path()``)."""
BUNDLED_TOKENIZERS = ("minilm", "minilm-power", MINILM_TOPICS)
"""Models whose tokenizer every client has (the bundled MiniLM's): none is written for them."""
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
    """A model captured and rewritten at every length, and checked; nothing written yet.

    An encoder (``kind`` "encoder") has one graph per padded length, and so has a classifier
    ("classifier", its label names in ``info["labels"]``); a causal LM ("causal")
    a prefill graph per prompt bucket (``seq_lens``, ``graphs``), a decode graph per cache
    capacity (``decode_graphs``) and its public facts (``info``: ``CausalGraphs.info()``).
    ``float_cosine`` is the check's cosine against the model (an encoder's output, a causal
    LM's first logits); ``agreement`` a causal LM's greedy tokens on floats that agree with
    the model's, of those generated."""

    name: str
    recipe: Recipe
    seq_lens: tuple[int, ...]
    graphs: dict[int, Graph]
    weights: dict[str, torch.Tensor]
    inputs: list[dict[str, Any]]
    float_cosine: float
    kind: str = "encoder"
    decode_graphs: dict[int, Graph] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    agreement: tuple[int, int] | None = None

    def graph_texts(self) -> tuple[dict[int, str], dict[int, str]]:
        """The graphs' JSON texts (what the party files hold), then the decode graphs'."""
        return ({k: g.to_json() for k, g in sorted(self.graphs.items())},
                {k: g.to_json() for k, g in sorted(self.decode_graphs.items())})

    def check_line(self) -> str:
        """What the dealer checked, in one line."""
        if self.agreement is None:
            return f"{self.name}: the secure forms on floats against the model, cosine {self.float_cosine:.6f}"
        same, total = self.agreement
        return (f"{self.name}: greedy generation with the secure forms on floats: the first {same} of {total} "
                f"tokens agree with the model's (first logits cosine {self.float_cosine:.6f})")

    def public(self, graph_sha256: str) -> dict[str, Any]:
        """What clients may know of the model (model.json, the manifest)."""
        labels = {"labels": list(self.info["labels"])} if self.kind == "classifier" else {}
        return {"model": self.name, "kind": self.kind, "recipe": self.recipe.name,
                "rewrite_version": REWRITE_VERSION, "seq_lens": list(self.seq_lens),
                "capacities": sorted(self.decode_graphs), "inputs": self.inputs, "graph_sha256": graph_sha256,
                **labels}


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
        graphs[seq] = rewrite_graph(graph, recipe, weights=w)
        weights = weights or w
    compiled = CompiledModel(model_name, recipe, tuple(seq_lens), graphs, weights,
                             _client_inputs(graphs[seq_lens[0]]), float("nan"))
    compiled.float_cosine = check_compiled(compiled, reference or model, make_inputs)
    return compiled


def _client_inputs(graph: Graph) -> list[dict[str, Any]]:
    """What a client sends a graph: name, kind and vocabulary of every input but the parties' state."""
    return [{"name": i.name, "kind": i.kind, "vocab_size": embedding_vocab(graph, i.name) or 0}
            for i in graph.inputs if i.kind != "state"]


def _check_graphs(graphs: dict[int, Graph], what: str) -> None:
    """Every graph loads as a party loads it (the op registry), and its client inputs are
    token ids that feed an embedding lookup (what a client can share)."""
    for seq, graph in graphs.items():
        Graph.from_json(graph.to_json(), source=f"the {what} at length {seq}")
        for spec in graph.inputs:
            if spec.kind == "client" and embedding_vocab(graph, spec.name) is None:
                raise DealError(f"the {what}'s input {spec.name!r} does not feed an embedding lookup: a client can "
                                "only share token ids (a one-hot) with the parties")


def check_compiled(compiled: CompiledModel, reference: torch.nn.Module, make_inputs: MakeInputs) -> float:
    """What a party and a client will need, checked before anything is dealt: every graph
    loads as a party loads it (the op registry), every client input is token ids that feed an
    embedding lookup (what a client can share), and at the shortest length the secure forms
    on floats agree with ``reference`` (finite, same shape, cosine >= ``MIN_FLOAT_COSINE``).
    Returns that cosine."""
    _check_graphs(compiled.graphs, f"graph of {compiled.name}")
    seq = min(compiled.seq_lens)
    graph = compiled.graphs[seq]
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
    cosine = _cosine(out, expected)
    if not cosine >= MIN_FLOAT_COSINE:
        raise DealError(f"the rewritten {compiled.name} ({compiled.recipe.name} recipe) disagrees with the model on "
                        f"floats at length {seq}: cosine {cosine:.4f} < {MIN_FLOAT_COSINE} (a module the rewrite "
                        "translates wrongly, or a recipe the model was not distilled for)")
    return cosine


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def compile_causal(lm: torch.nn.Module, model_name: str, recipe: Recipe,
                   prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS,
                   capacities: tuple[int, ...] = DEFAULT_CAPACITIES, prompt: Sequence[int] = (1, 2, 3)
                   ) -> CompiledModel:
    """Capture a Hugging Face causal LM (the ``...ForCausalLM`` itself) for generation
    (``secure.graph.causal.capture_causal``), rewrite every prefill and decode graph with
    ``recipe`` and check it (:func:`check_causal`, on ``prompt``'s token ids)."""
    graphs = capture_causal(lm, prompt_buckets, capacities, meta={"model": model_name})
    graphs.prefill = {b: rewrite_graph(g, recipe, weights=graphs.weights) for b, g in graphs.prefill.items()}
    graphs.decode = {c: rewrite_graph(g, recipe, weights=graphs.weights) for c, g in graphs.decode.items()}
    _check_graphs(graphs.prefill, f"prefill graph of {model_name}")
    _check_graphs(graphs.decode, f"decode graph of {model_name}")
    first = graphs.prefill[min(graphs.prefill)]
    compiled = CompiledModel(model_name, recipe, tuple(sorted(graphs.prefill)), graphs.prefill, graphs.weights,
                             _client_inputs(first), float("nan"), "causal", graphs.decode, graphs.info())
    compiled.float_cosine, compiled.agreement = check_causal(graphs, lm, torch.tensor(list(prompt)), model_name)
    return compiled


def check_causal(graphs: CausalGraphs, lm: torch.nn.Module, prompt: torch.Tensor, model_name: str
                 ) -> tuple[float, tuple[int, int]]:
    """Generate a few greedy tokens from ``prompt`` with the rewritten graphs on floats
    (prefill, then decode steps on the key/value cache) and with the model itself: refuses
    a failing or non-finite run (``DealError``); returns the first step's logits cosine and
    (how many leading tokens agree, how many were generated). A disagreement is not refused:
    a random-weight model's near-ties may tip either way."""
    prompt = prompt.reshape(-1)[:min(graphs.prefill)]
    bucket = min(graphs.prefill)
    new_tokens = max(1, min(CHECK_NEW_TOKENS, max(graphs.decode) - bucket + 1,
                            graphs.max_positions - prompt.numel() + 1))
    try:
        got = generate_float(graphs, prompt, new_tokens, bucket)
    except (RuntimeError, ValueError) as e:  # the interpreter names the node and the op
        raise DealError(f"the rewritten {model_name} fails to generate on floats: {type(e).__name__}: {e}") from e
    if not all(bool(torch.isfinite(logits).all()) for logits in got.logits):
        raise DealError(f"the rewritten {model_name} gives non-finite logits on floats")
    want, want_logits = plaintext_continuation(lm, prompt, new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(got.tokens, want)) if a != b), len(want))
    return _cosine(got.logits[0], want_logits[0]), (same, len(want))


def write_deal(compiled: CompiledModel | Sequence[CompiledModel], out: Path, fp: FixedPoint | None = None,
               progress: bool = True, sign_key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """Deal the compiled models' weights and write the party files (format 2, see
    ``party.catalogue``), model.json and the manifest; the first model is the deal's
    default. Returns model.json's content."""
    models = [compiled] if isinstance(compiled, CompiledModel) else list(compiled)
    _check_names([m.name for m in models])
    fp = fp or FixedPoint()
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = [{} for _ in range(3)]
    public = []
    for m in models:
        texts, decode_texts = m.graph_texts()
        public.append(m.public(graph_digest(texts, decode_texts)))
        shares: list[dict[str, Any]] = [{} for _ in range(3)]
        for name, value in tqdm(m.weights.items(), desc=f"deal {m.name}'s weight shares", disable=not progress):
            for i, pair in enumerate(deal_weight(value, fp)):
                shares[i][name] = {"shape": list(value.shape), "first": pair[0], "second": pair[1]}
        for i in range(3):
            entries[i][m.name] = {"kind": m.kind, "recipe": m.recipe.to_dict(),
                                  "graphs": {str(k): t for k, t in texts.items()},
                                  "decode_graphs": {str(k): t for k, t in decode_texts.items()},
                                  "info": m.info, "weights": shares[i]}
    deal_id = secrets.token_hex(16)
    files = {i: party_file(out, i) for i in range(3)}
    default = models[0]
    for i, path in files.items():
        make_private_dir(path.parent)
        with open_private(path) as f:
            torch.save({"format": FORMAT, "party": i, "deal_id": deal_id, "model": default.name,
                        "frac_bits": fp.frac_bits, "models": entries[i]}, f)
    info = {"model": default.name, "seq_lens": list(default.seq_lens), "inputs": default.inputs,
            "recipe": default.recipe.name, "frac_bits": fp.frac_bits, "models": public}
    (out / "model.json").write_text(json.dumps(info, indent=2))
    listed = [{k: p[k] for k in ("model", "kind", "recipe", "seq_lens", "capacities", "graph_sha256")}
              for p in public]
    manifest = {**{k: info[k] for k in ("model", "recipe", "frac_bits", "seq_lens")}, "models": listed}
    write_manifest(out, make_manifest(out, deal_id, files, manifest), sign_key)
    return info


def _check_names(names: list[str]) -> None:
    seen = set()
    for name in names:
        if not MODEL_NAME.match(name):
            raise DealError(f"the model name {name!r} must be 1-64 characters of [A-Za-z0-9_.:-]; deal it as "
                            "NAME=SOURCE (or --name NAME)")
        if name in seen:
            raise DealError(f"two models of the deal are called {name!r}: give one another name (NAME=SOURCE)")
        seen.add(name)


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
    and the model the secure forms are checked against (a distilled model's exact Power-Softmax).
    ``causal``: a causal LM (``model`` is its ``CausalLM`` wrapper, ``model.lm`` the Hugging
    Face model), dealt for generation. ``labels``: a classifier's label names, one per logit
    (empty for any other model)."""

    model: torch.nn.Module
    make_inputs: MakeInputs
    name: str
    recipe: Recipe
    tokenizer: Any
    reference: torch.nn.Module | None = None
    folder: Path | None = None
    causal: bool = False
    labels: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``encoder``, ``classifier`` or ``causal`` (the catalogue's kinds)."""
        return "causal" if self.causal else "classifier" if self.labels else "encoder"

    @property
    def needs_tokenizer(self) -> bool:
        """Whether a client needs this model's tokenizer from the deal (it has MiniLM's)."""
        return self.folder is not None or self.name not in BUNDLED_TOKENIZERS


def tokenized_inputs(tokenizer: Any, text: str = "dealing") -> MakeInputs:
    """Example inputs of a given length: ``text`` tokenized, right-padded (pad id, or 0 for a
    tokenizer without one), with its attention mask."""
    def make_inputs(seq: int) -> dict[str, torch.Tensor]:
        ids = list(tokenizer(text, truncation=True, max_length=seq)["input_ids"])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        mask = [1] * len(ids) + [0] * (seq - len(ids))
        return {"input_ids": torch.tensor([ids + [pad] * (seq - len(ids))]), "attention_mask": torch.tensor([mask])}

    return make_inputs


def parse_seq_lens(text: str, option: str = "--seq-lens") -> tuple[int, ...]:
    """``--seq-lens`` (or ``option``): comma-separated lengths, each at least 2, returned sorted and unique."""
    try:
        lengths = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise DealError(f"{option} must be comma-separated whole numbers (e.g. 16,32,64,128), got {text!r}") from None
    if not lengths or lengths[0] < 2:
        raise DealError(f"{option} needs at least one length, each at least 2, got {text!r}")
    return tuple(lengths)


def parse_model_spec(text: str) -> tuple[str | None, str]:
    """``--model``'s value: ``NAME=SOURCE`` (SOURCE dealt under NAME) or ``SOURCE``."""
    name, sep, source = text.partition("=")
    if sep and source and MODEL_NAME.match(name):
        return name, source
    return None, text


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


def _shipped_lm_folder() -> Path:
    try:
        from secure.lm import shipped_lm_path
    except ImportError as e:
        raise DealError(f"--model {SHIPPED_LM}: secure.lm is not in this checkout ({e})") from None
    folder = shipped_lm_path()
    if not (folder / "config.json").is_file():
        raise DealError(f"--model {SHIPPED_LM}: the shipped model folder {folder} is not there (not trained or "
                        "not committed yet?)")
    return folder


def default_name(model: str) -> str:
    """The name a ``--model`` SOURCE is dealt under without ``NAME=``: ``minilm``,
    ``minilm-power``, ``tiny-llama``, ``minilm-topics``, or the folder's name."""
    from secure.distill.cache import DISTILLED_NAMES

    shipped = ("minilm", SHIPPED_LM, MINILM_TOPICS, *DISTILLED_NAMES)
    return model if model in shipped else Path(model).resolve().name


def model_source(model: str, recipe: str | None = None, name: str | None = None,
                 seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
                 prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS) -> ModelSource:
    """Load what ``--model`` names: ``minilm``, ``minilm-power`` (distilled on first use, see
    ``secure.distill.cache``), ``tiny-llama``, ``minilm-topics`` or a Hugging Face folder
    (a ``...ForSequenceClassification`` one as a classifier); ``DealError``/
    ``ModelFolderError`` when it cannot be dealt with ``recipe`` at ``seq_lens`` (an encoder)
    or ``prompt_buckets`` (a causal LM)."""
    if model == "minilm":
        encoder, tokenizer = load_minilm()
        return ModelSource(SentenceEncoder(encoder), tokenized_inputs(tokenizer), name or "minilm",
                           _recipe_for(recipe, None), tokenizer)
    if model == MINILM_TOPICS:
        classifier, tokenizer = load_topic_classifier()
        return ModelSource(classifier, tokenized_inputs(tokenizer), name or MINILM_TOPICS, _recipe_for(recipe, None),
                           tokenizer, labels=classifier.labels)
    from secure.distill.cache import DISTILLED_NAMES, resolve_model

    folder = _shipped_lm_folder() if model == SHIPPED_LM else resolve_model(model)  # distilled on first use
    if not folder.is_dir():
        raise DealError(f"--model {model}: not a folder, nor one of minilm, {', '.join(DISTILLED_NAMES)}, "
                        f"{SHIPPED_LM}, {MINILM_TOPICS}")
    name = name or default_name(model)
    if not MODEL_NAME.match(name):
        raise DealError(f"the model name {name!r} must be 1-64 characters of [A-Za-z0-9_.:-]; pass --name NAME "
                        "(or --model NAME=SOURCE)")
    chosen = _recipe_for(recipe, folder)
    wrapped, tokenizer, causal = load_model_folder(folder)
    longest = max_positions(wrapped)
    lengths, option = (prompt_buckets, "--prompt-buckets") if causal else (seq_lens, "--seq-lens")
    if longest is not None and max(lengths) > longest:
        raise DealError(f"{folder} holds at most {longest} positions; {option} asks for {max(lengths)}")
    reference = None
    if chosen.softmax.kind == "power" and not causal:  # checked against its exact Power-Softmax, not softmax
        from secure.distill.attention import load_power_softmax_model

        reference = SentenceEncoder(load_power_softmax_model(folder))
    labels = wrapped.labels if isinstance(wrapped, SequenceClassifier) else ()
    return ModelSource(wrapped, tokenized_inputs(tokenizer), name, chosen, tokenizer, reference, folder, causal, labels)


def compile_source(source: ModelSource, seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
                   prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS,
                   capacities: tuple[int, ...] = DEFAULT_CAPACITIES, progress: bool = True) -> CompiledModel:
    """Compile and check ``source``: an encoder at ``seq_lens``, a causal LM at
    ``prompt_buckets`` and ``capacities``; refuses a tokenizer with ids beyond the embedding."""
    if source.causal:
        prompt = list(source.tokenizer(CHECK_TEXT)["input_ids"]) or [1, 2, 3]
        compiled = compile_causal(source.model.lm, source.name, source.recipe, prompt_buckets, capacities, prompt)
    else:
        compiled = compile_model(source.model, source.make_inputs, source.name, source.recipe, seq_lens, progress,
                                 source.reference)
        if source.labels:
            _as_classifier(compiled, source.labels)
    vocab = max((i["vocab_size"] for i in compiled.inputs), default=0)
    if vocab and len(source.tokenizer) > vocab:
        raise DealError(f"{source.name}'s tokenizer has {len(source.tokenizer)} ids but its embedding table only "
                        f"{vocab} rows: a client's token ids would fall outside it")
    return compiled


def _as_classifier(compiled: CompiledModel, labels: Sequence[str]) -> None:
    """Mark a compiled model as a classifier with ``labels``, after checking that its one
    output holds one logit per label."""
    for seq, graph in compiled.graphs.items():
        node = next((n for n in graph.nodes if n.name == graph.outputs[0]), None)
        shape = node.spec.shape if node is not None and node.spec is not None else None
        if len(graph.outputs) != 1 or not shape or shape[-1] != len(labels):
            raise DealError(f"{compiled.name} is dealt as a classifier of {len(labels)} labels, but its graph at "
                            f"length {seq} gives {len(graph.outputs)} outputs of shape {shape}")
    compiled.kind = "classifier"
    compiled.info = {"labels": list(labels)}


def deal_sources(sources: Sequence[ModelSource], out: Path, seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
                 prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS,
                 capacities: tuple[int, ...] = DEFAULT_CAPACITIES, fp: FixedPoint | None = None,
                 progress: bool = True, sign_key: Ed25519PrivateKey | None = None) -> list[CompiledModel]:
    """Compile and check every source, then (only then) deal them all into ``out``, one
    catalogue; the first source's tokenizer goes to ``out/tokenizer/`` and every other's to
    ``out/tokenizers/NAME/`` (where the client needs one, see ``ModelSource.needs_tokenizer``)."""
    _check_names([s.name for s in sources])
    if any(s.causal for s in sources) and min(capacities) < min(prompt_buckets):
        raise DealError(f"every cache capacity must hold the smallest prompt bucket ({min(prompt_buckets)}); "
                        f"--capacities gives {min(capacities)}")
    compiled = []
    for n, source in enumerate(sources, 1):
        if progress:
            lengths = (f"prompt buckets {list(prompt_buckets)}, capacities {list(capacities)}" if source.causal
                       else f"lengths {list(seq_lens)}")
            kind = "causal LM" if source.causal else source.kind
            print(f"[{n}/{len(sources)}] {source.name}: {kind}, "
                  f"{source.recipe.name} recipe, {lengths}: capture, rewrite, check", flush=True)
        model = compile_source(source, seq_lens, prompt_buckets, capacities, progress)
        if progress:
            print(f"      checked {model.check_line()}", flush=True)
        if model.agreement is not None and (model.agreement[0] < model.agreement[1]
                                            or model.float_cosine < MIN_FLOAT_COSINE):
            print(f"warning: {source.name}'s secure forms on floats do not follow the model exactly "
                  f"({model.check_line()}); expected of a random-weight test model, not of a trained one",
                  file=sys.stderr)
        compiled.append(model)
    write_deal(compiled, out, fp, progress, sign_key)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)  # never a tokenizer of an earlier deal
    shutil.rmtree(out / TOKENIZERS_DIR, ignore_errors=True)
    for n, source in enumerate(sources):
        if source.needs_tokenizer:
            source.tokenizer.save_pretrained(str(out / TOKENIZER_DIR if n == 0 else out / TOKENIZERS_DIR / source.name))
    return compiled


def deal_source(source: ModelSource, out: Path, seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
                fp: FixedPoint | None = None, progress: bool = True,
                sign_key: Ed25519PrivateKey | None = None) -> CompiledModel:
    """One source dealt alone (see :func:`deal_sources`)."""
    return deal_sources([source], out, seq_lens, fp=fp, progress=progress, sign_key=sign_key)[0]


def keygen_main(argv: list[str]) -> int:
    """``python -m party.deal keygen --out DIR``: a new Ed25519 dealer key pair."""
    ap = argparse.ArgumentParser(prog="python -m party.deal keygen", description=keygen_main.__doc__)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    key, pub = make_signing_key(args.out)
    print(f"dealer signing key {key} (0600, keep it with the model owner); public key {pub} (give it to every "
          'party: "dealer_public_key" in cluster.json)')
    return 0


def _sources(args: argparse.Namespace, seq_lens: tuple[int, ...], prompt_buckets: tuple[int, ...]
             ) -> list[ModelSource]:
    specs = [parse_model_spec(m) for m in args.model or ["minilm"]]
    if args.name is not None:
        if len(specs) != 1 or specs[0][0] is not None:
            raise DealError("--name names the one model of a deal; with several, write --model NAME=SOURCE")
        specs = [(args.name, specs[0][1])]
    return [model_source(source, args.recipe, name, seq_lens, prompt_buckets) for name, source in specs]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", action="append",
                    help=f"repeatable, [NAME=]SOURCE: minilm (default), minilm-power, {SHIPPED_LM}, {MINILM_TOPICS}, "
                         "or a Hugging Face model folder (config.json, weights, tokenizer; an encoder, a sequence "
                         "classifier or a causal LM); the first is the deal's default")
    ap.add_argument("--recipe", default=None, choices=[*sorted(RECIPES), "power"],
                    help="secure forms of every model (default: power for a distilled folder, else ours)")
    ap.add_argument("--name", help="the dealt model's name when there is one --model (default: minilm, "
                                   "minilm-power, tiny-llama, minilm-topics, or the folder's name)")
    ap.add_argument("--out", type=Path, required=True,
                    help="where to write the deal (a folder written by secure-cluster: pinned there too)")
    ap.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)), help="an encoder's padded lengths")
    ap.add_argument("--prompt-buckets", default=",".join(map(str, DEFAULT_PROMPT_BUCKETS)),
                    help="a causal LM's padded prompt lengths")
    ap.add_argument("--capacities", default=",".join(map(str, DEFAULT_CAPACITIES)),
                    help="a causal LM's key/value cache capacities (each at least the smallest prompt bucket)")
    ap.add_argument("--frac-bits", type=int, default=18)
    ap.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM) signing manifest.json into manifest.sig")
    args = ap.parse_args(argv)
    sign_key = load_signing_key(args.sign_key) if args.sign_key else None
    t0 = time.perf_counter()
    try:
        seq_lens = parse_seq_lens(args.seq_lens)
        prompt_buckets = parse_seq_lens(args.prompt_buckets, "--prompt-buckets")
        capacities = parse_seq_lens(args.capacities, "--capacities")
        compiled = deal_sources(_sources(args, seq_lens, prompt_buckets), args.out, seq_lens, prompt_buckets,
                                capacities, FixedPoint(args.frac_bits), sign_key=sign_key)
    except (DealError, ModelFolderError, CaptureError, UnsupportedOpError, GraphValidationError,
            GenerationLimitError) as e:
        print(f"error: {e}\nnothing was written to {args.out}", file=sys.stderr)
        return 2
    for m in compiled:
        lengths = (f"prompt buckets {list(m.seq_lens)}, capacities {sorted(m.decode_graphs)}" if m.kind == "causal"
                   else f"lengths {list(m.seq_lens)}")
        print(f"dealt {m.name} ({m.kind}, {m.recipe.name}) for {lengths}")
    print(f"into {args.out} in {time.perf_counter() - t0:.1f} s (default model: {compiled[0].name})")
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
