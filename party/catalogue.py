"""A party's model catalogue: the dealt share file read into the models a node serves.

A share file (one per party, written by ``party.deal``) is a ``torch.save`` of plain data:

format 2 (several models)::

    {"format": 2, "party": 0, "deal_id": "<32 hex>", "frac_bits": 18,
     "model": "<the deal's first model: its default>",
     "models": {name: {"kind": "encoder" | "classifier" | "causal",
                       "recipe": Recipe.to_dict(),
                       "graphs": {"16": graph JSON, ...},          # encoder: by padded length;
                                                                   # causal: prefill, by prompt bucket
                       "decode_graphs": {"32": graph JSON, ...},   # causal: by cache capacity; else {}
                       "info": CausalGraphs.info() or {},          # causal; a classifier:
                                                                   # {"labels": [name per logit]}
                       "weights": {weight name: share spec}}}}     # this party's pair of each weight

format 1 (one model, still read, as a catalogue of one encoder-kind model served by
``Query``)::

    {"format": 1, "party", "deal_id", "model", "recipe", "frac_bits", "graphs", "weights"}

A share spec is ``{"shape": [...], "first": c, "second": c}`` with each component ``c``
either ``{"seed": 16 uint8}`` (PRG-expanded) or ``{"dense": int64 tensor}``.

Everything here stays data: the file is hashed and checked against its pin
(``party.integrity.verify_party_file``) before anything of it is unpickled, it is read
with ``torch.load(weights_only=True)``, and every graph goes through ``Graph.from_json``
(ops outside the registry are refused, naming node, op and file). Never imports the node,
the client or the dealer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from party.config import ClusterConfig, ConfigError
from party.integrity import check_party_header, verify_party_file
from secure.graph.ir import Graph, GraphValidationError
from secure.mpc.embedding import SeededComponent
from secure.mpc.shares import AShare
from secure.runtime.inputs import InputSpec, input_specs

FORMAT = 2
"""The share-file format the dealer writes; :func:`load_party_file` also reads format 1."""
KINDS = ("encoder", "classifier", "causal")
"""``encoder``: one graph per padded length, served by ``Query``; ``classifier``: the same,
its output one logit per label (``info["labels"]``); ``causal``: prefill and decode graphs
of a causal LM, served by ``Generate``."""
QUERY_KINDS = ("encoder", "classifier")
"""The kinds ``Query`` serves."""
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""What a dealt model may be called (the name a client's query header carries)."""
CAUSAL_INFO_KEYS = ("vocab_size", "max_positions", "eos_token_id", "prompt_buckets", "capacities")


@dataclass
class ServedModel:
    """One model of a node's catalogue: its graphs (by padded length or prompt bucket; a
    causal LM's decode graphs by cache capacity), this party's weight shares, its public
    facts (``info``: a causal LM's ``CausalGraphs.info()``) and ``graph_sha256``
    (:func:`graph_digest` of the graphs it was dealt)."""

    name: str
    kind: str
    recipe: dict[str, Any]
    graphs: dict[int, Graph]
    decode_graphs: dict[int, Graph]
    weights: dict[str, AShare]
    info: dict[str, Any]
    graph_sha256: str

    @property
    def buckets(self) -> list[int]:
        """The padded lengths (an encoder) or prompt buckets (a causal LM), ascending."""
        return sorted(self.graphs)

    @property
    def capacities(self) -> list[int]:
        """A causal LM's key/value cache capacities, ascending (empty for an encoder)."""
        return sorted(self.decode_graphs)

    @property
    def inputs(self) -> list[InputSpec]:
        """What a client sends for the first graph (every graph of a model takes the same names)."""
        return input_specs(self.graphs[self.buckets[0]])

    @property
    def labels(self) -> list[str]:
        """A classifier's label names, one per logit (empty for the other kinds)."""
        return list(self.info.get("labels") or [])

    def summary(self) -> str:
        """One line for the node's start-up log."""
        text = f"{self.name} ({self.kind}, {self.recipe.get('name')}, {len(self.weights)} weights, "
        if self.kind == "causal":
            return text + f"prompt buckets {self.buckets}, capacities {self.capacities})"
        if self.kind == "classifier":
            return text + f"lengths {self.buckets}, {len(self.labels)} labels)"
        return text + f"lengths {self.buckets})"


def graph_digest(graphs: Mapping[int, str], decode_graphs: Mapping[int, str] | None = None) -> str:
    """SHA-256 of a model's graph JSON texts: its graphs by padded length (or prompt
    bucket), then its decode graphs by capacity, each in ascending order, each preceded
    by ``"<kind> <length> <bytes>\\n"`` (so no two lists of texts hash alike)."""
    h = hashlib.sha256()
    for kind, texts in (("graph", graphs), ("decode", decode_graphs or {})):
        for length in sorted(texts):
            data = texts[length].encode()
            h.update(f"{kind} {length} {len(data)}\n".encode())
            h.update(data)
    return h.hexdigest()


def default_model(models: Mapping[str, ServedModel], configured: str) -> ServedModel:
    """The model the legacy (top-level) answers describe: ``configured`` when the
    catalogue has it, else its first encoder, else its first model."""
    if configured in models:
        return models[configured]
    return next((m for m in models.values() if m.kind == "encoder"), next(iter(models.values())))


def load_party_file(cfg: ClusterConfig, party_id: int, device: torch.device
                    ) -> tuple[dict[str, Any], dict[str, ServedModel]]:
    """Read party ``party_id``'s dealt file: (its header, its models by name, in file order).

    Nothing of it is unpickled before its content matches the pin in the configuration
    (``party.integrity.verify_party_file``: a digest, or a dealer-signed manifest); the file
    is opened once, so what is hashed is what is loaded. Then its party id and deal id are
    checked against the entry and the manifest. The header holds ``format``, ``party``,
    ``deal_id``, ``frac_bits`` and ``model`` (the deal's first model).
    """
    entry = cfg.party(party_id)
    path = entry.shares
    if path is None:
        raise ConfigError(f"party {party_id} has no 'shares' file in the configuration")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConfigError(f"cannot read party {party_id}'s share file {path}: {e}") from None
    with f:
        verify_party_file(entry, cfg, f)
        data = torch.load(f, weights_only=True)
    if not isinstance(data, dict) or data.get("format") not in (1, FORMAT):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path}: unknown party file format {found!r}")
    check_party_header(data, entry, cfg)
    try:
        frac_bits = int(data["frac_bits"])
        raw = _format1_models(data) if data["format"] == 1 else dict(data["models"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: a malformed party file header: {type(e).__name__}: {e}") from None
    if not raw:
        raise ConfigError(f"{path}: the party file holds no model")
    models = {name: _served_model(name, spec, party_id, frac_bits, device, path) for name, spec in raw.items()}
    header = {"format": data["format"], "party": data["party"], "deal_id": data.get("deal_id"),
              "frac_bits": frac_bits, "model": data.get("model") or next(iter(models))}
    return header, models


def _format1_models(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 file as a catalogue of one: its graphs are served by ``Query``, whatever the model."""
    return {data["model"]: {"kind": "encoder", "recipe": data["recipe"], "graphs": data["graphs"],
                            "decode_graphs": {}, "info": {}, "weights": data["weights"]}}


def _served_model(name: Any, spec: Any, party_id: int, frac_bits: int, device: torch.device, path: Path
                  ) -> ServedModel:
    """One catalogue entry, checked: a valid name and kind, graphs that validate, a causal
    LM's decode graphs and info consistent with its buckets and capacities."""
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise ConfigError(f"{path}: a model name must be 1-64 characters of [A-Za-z0-9_.:-], got {name!r}")
    where = f"{path}, model {name!r}"
    try:
        kind, recipe, info = spec["kind"], dict(spec["recipe"]), dict(spec.get("info") or {})
        graph_texts = {int(k): v for k, v in spec["graphs"].items()}
        decode_texts = {int(k): v for k, v in (spec.get("decode_graphs") or {}).items()}
        weight_specs = dict(spec["weights"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{where}: a malformed catalogue entry: {type(e).__name__}: {e}") from None
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if not graph_texts:
        raise ConfigError(f"{where}: no graph")
    if (kind == "causal") != bool(decode_texts):
        raise ConfigError(f"{where}: a {kind} model {'needs' if kind == 'causal' else 'has no'} decode graphs")
    if not all(isinstance(t, str) for t in (*graph_texts.values(), *decode_texts.values())):
        raise ConfigError(f"{where}: a graph is not JSON text")
    if kind == "causal":
        _check_causal_info(info, graph_texts, decode_texts, where)
    labels = info.get("labels")
    if kind == "classifier" and not (isinstance(labels, list) and labels
                                     and all(isinstance(v, str) and v for v in labels)):
        raise ConfigError(f"{where}: a classifier's info needs its label names (a list of strings), got {labels!r}")
    try:  # a graph is data: ops outside the registry are refused, naming node, op and file
        graphs = {k: Graph.from_json(v, source=where) for k, v in graph_texts.items()}
        decode = {k: Graph.from_json(v, source=f"{where}, decode") for k, v in decode_texts.items()}
    except GraphValidationError as e:
        raise ConfigError(str(e)) from None
    weights = _weight_shares(weight_specs, party_id, frac_bits, device, where)
    return ServedModel(name, kind, recipe, graphs, decode, weights, info, graph_digest(graph_texts, decode_texts))


def _check_causal_info(info: dict[str, Any], graphs: Iterable[int], decode: Iterable[int], where: str) -> None:
    missing = [k for k in CAUSAL_INFO_KEYS if k not in info]
    if missing:
        raise ConfigError(f"{where}: a causal LM's info lacks {missing}")
    if list(info["prompt_buckets"]) != sorted(graphs) or list(info["capacities"]) != sorted(decode):
        raise ConfigError(f"{where}: info lists prompt buckets {info['prompt_buckets']} and capacities "
                          f"{info['capacities']}, the graphs are for {sorted(graphs)} and {sorted(decode)}")


def _weight_shares(specs: dict[str, Any], party_id: int, frac_bits: int, device: torch.device, where: str
                   ) -> dict[str, AShare]:
    """This party's pair of every weight: seeded components expanded, dense ones moved to ``device``."""
    weights = {}
    for name, spec in specs.items():
        try:
            shape = tuple(int(d) for d in spec["shape"])
            parts = []
            for comp in (spec["first"], spec["second"]):
                if "seed" in comp:
                    parts.append(SeededComponent(bytes(comp["seed"].tolist())).expand(shape, device))
                else:
                    parts.append(comp["dense"].to(device))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: weight {name!r} is malformed: {type(e).__name__}: {e}") from None
        weights[name] = AShare(parts[0], parts[1], party_id, frac_bits)
    return weights


__all__ = ["FORMAT", "KINDS", "MODEL_NAME", "QUERY_KINDS", "ServedModel", "default_model", "graph_digest",
           "load_party_file"]
