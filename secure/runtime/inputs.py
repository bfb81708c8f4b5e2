"""A client's inputs on their way to the parties: one encoding, one decoding, one size.

The client turns each graph input into named *parts* for each party
(:func:`client_parts`): a public input goes to every party as it is (kind ``public``);
token ids that feed the secure embedding become the client's own one-hot, shared with
two components given as 128-bit PRG seeds (kind ``seed``, 16 bytes) and one dense
(kind ``share``); any other secret input becomes fixed-point replicated shares (two
``share`` parts per party). A party rebuilds and checks its values from the parts it
received (:func:`party_inputs`), raising :class:`InputError` with a message fit for the
client. The in-process engine, the gRPC client and the party node all go through here,
so what the client uploads (:func:`upload_bytes`) is counted the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from secure.graph.ir import Graph
from secure.mpc.embedding import OneHotShare, SeededComponent, client_onehot_shares
from secure.mpc.ring import FixedPoint
from secure.mpc.shares import AShare, deal_shares
from secure.runtime.interpreter import embedding_vocab

KINDS = ("share", "seed", "public")


class InputError(ValueError):
    """A party's received inputs are missing, duplicated or malformed; the message says which."""


@dataclass(frozen=True)
class InputSpec:
    """What a client must know of one graph input: its name, ``client`` or ``public``, and
    the vocabulary size when it holds token ids for the secure embedding (else 0)."""

    name: str
    kind: str
    vocab_size: int = 0


@dataclass(frozen=True)
class InputPart:
    """One tensor the client sends one party: ``part`` 0 or 1 is the component of the
    party's pair (always 0 for a public input)."""

    name: str
    kind: str
    part: int
    tensor: torch.Tensor

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.name, self.kind, self.part)


def input_specs(graph: Graph) -> list[InputSpec]:
    """The graph's inputs as a client sees them (not the parties' own ``state`` inputs)."""
    return [InputSpec(i.name, i.kind, embedding_vocab(graph, i.name) or 0) for i in graph.inputs
            if i.kind != "state"]


def client_parts(specs: list[InputSpec], inputs: Mapping[str, torch.Tensor], fp: FixedPoint
                 ) -> list[list[InputPart]]:
    """Each party's parts of the client's ``inputs`` (fresh randomness every call)."""
    per_party: list[list[InputPart]] = [[], [], []]
    for spec in specs:
        if spec.name not in inputs:
            raise ValueError(f"missing input {spec.name!r}; the model takes {[s.name for s in specs]}")
        value = inputs[spec.name]
        if spec.kind == "public":
            for parts in per_party:
                parts.append(InputPart(spec.name, "public", 0, value))
        elif spec.vocab_size > 0:
            for parts, share in zip(per_party, client_onehot_shares(value, spec.vocab_size)):
                for p, comp in enumerate((share.first, share.second)):
                    if isinstance(comp, SeededComponent):
                        seed = torch.frombuffer(bytearray(comp.seed), dtype=torch.uint8)
                        parts.append(InputPart(spec.name, "seed", p, seed))
                    else:
                        parts.append(InputPart(spec.name, "share", p, comp))
        else:
            for parts, share in zip(per_party, deal_shares(fp.encode(value.to(torch.float64)), fp.frac_bits)):
                parts += [InputPart(spec.name, "share", 0, share.a), InputPart(spec.name, "share", 1, share.b)]
    return per_party


def upload_bytes(parts: list[InputPart]) -> int:
    """Bytes of tensor data in ``parts`` (what one party receives, framing aside)."""
    return sum(p.tensor.numel() * p.tensor.element_size() for p in parts)


def check_part_key(graph: Graph, name: str, kind: str, part: int) -> None:
    """Refuse a part that no input of ``graph`` takes (a party calls this as each part
    starts arriving, before reading its data)."""
    known = [i.name for i in graph.inputs if i.kind != "state"]
    if name not in known:
        raise InputError(f"unknown input {name!r}; the model takes {sorted(known)} from the client")
    if kind not in KINDS or part not in (0, 1):
        raise InputError(f"bad input kind/part {kind!r}/{part}")


def party_inputs(graph: Graph, received: Mapping[tuple[str, str, int], torch.Tensor], party_id: int,
                 frac_bits: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The interpreter's inputs on party ``party_id`` from the parts it received, keyed by
    (name, kind, part): public tensors, and :class:`AShare` pairs for secret inputs (the
    one-hot of token ids at scale 0, other inputs at ``frac_bits``). The parties' own
    ``state`` inputs are not among them: the caller adds those."""
    for key in received:
        check_part_key(graph, *key)
    ready: dict[str, Any] = {}
    for spec in graph.inputs:
        if spec.kind == "state":
            continue
        shape = tuple(spec.spec.shape)
        if spec.kind == "public":
            ready[spec.name] = _public(spec.name, shape, spec.spec.dtype, received.get((spec.name, "public", 0)))
        else:
            ready[spec.name] = _secret(graph, spec.name, shape, received, party_id, frac_bits, device)
    return ready


def _public(name: str, shape: tuple[int, ...], dtype: str, t: torch.Tensor | None) -> torch.Tensor:
    """A public input exactly as the graph was captured for: its shape and dtype."""
    if t is None:
        raise InputError(f"missing public input {name!r}")
    want = dtype.removeprefix("torch.")
    if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != want:
        raise InputError(f"input {name!r} must be {want} of shape {list(shape)}, got "
                         f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
    return t


def _secret(graph: Graph, name: str, shape: tuple[int, ...], received: Mapping[tuple[str, str, int], torch.Tensor],
            party_id: int, frac_bits: int, device: torch.device | str) -> AShare:
    vocab = embedding_vocab(graph, name)
    full = (*shape, vocab) if vocab else shape
    rows = int(torch.Size(shape).numel())
    flat = (rows, vocab) if vocab else full
    comps: list[SeededComponent | torch.Tensor] = []
    for p in (0, 1):
        seed, dense = received.get((name, "seed", p)), received.get((name, "share", p))
        if (seed is None) == (dense is None):
            raise InputError(f"input {name!r} needs exactly one seed or share for component {p}")
        if seed is not None:
            if not vocab:
                raise InputError(f"input {name!r} is not token ids: it takes shares, not seeds")
            if seed.dtype != torch.uint8 or seed.numel() != 16:
                raise InputError("a seed is 16 bytes (uint8)")
            comps.append(SeededComponent(bytes(seed.tolist())))
        else:
            assert dense is not None
            if dense.dtype != torch.int64 or tuple(dense.shape) not in (tuple(full), tuple(flat)):
                raise InputError(f"share of {name!r} must be int64 of shape {list(full)}, got {dense.dtype} "
                                 f"{list(dense.shape)}")
            comps.append(dense)
    if vocab:
        parts = [c.reshape(flat) if isinstance(c, torch.Tensor) else c for c in comps]
        share = OneHotShare(parts[0], parts[1], (rows, vocab)).expand(party_id, device)
        return share.map(lambda t: t.reshape(full))
    tensors = [c.to(device) for c in comps if isinstance(c, torch.Tensor)]
    return AShare(tensors[0], tensors[1], party_id, frac_bits)
