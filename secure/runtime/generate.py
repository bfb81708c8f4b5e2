"""Secure generation: a session's prefill and decode steps over any backend, and the
in-process drivers (plaintext floats, three parties) that tests and benchmarks use.

A :class:`GenerationSession` is one party's (or one float run's) side of a generation:
it runs the prefill graph of the prompt's bucket, keeps every layer's keys and values
as values of its backend (replicated shares on a party: the KV cache never leaves the
parties), and runs each decode step on the smallest captured cache capacity that holds
the filled slots (``secure.graph.causal``). The client's token arrives as its one-hot;
positions, masks and the slot count are public and computed here, never sent.

What the parties reveal per step, to the client only: the last position's logits
(``reveal="logits"``: the client samples) or the greedy token id (``reveal="argmax"``:
a comparison tournament on shares, ``secure.approx.argmax``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from secure.approx.argmax import argmax
from secure.approx.float_backend import FloatOps
from secure.approx.interface import SecureOps
from secure.graph.causal import (
    ATTENTION_MASK,
    INPUT_IDS,
    CausalGraphs,
    GenerationLimitError,
    capacity_for,
    check_budget,
    decode_public,
    past_names,
    prefill_inputs,
)
from secure.graph.ir import Graph
from secure.mpc import shares as sh
from secure.mpc.backend import MpcOps
from secure.mpc.engine import LocalCluster
from secure.profile.profiler import Span, span
from secure.runtime.inputs import client_parts, input_specs, party_inputs
from secure.runtime.interpreter import Interpreter, Trace, client_input, no_trace

ARGMAX_SPAN = "reveal.argmax"
"""The span of the greedy argmax on shares (``reveal="argmax"``) in a traced step."""

REVEALS = ("logits", "argmax")
"""What the parties open to the client per step: the logits, or only the greedy token id."""


class GenerationSession:
    """One side of a generation session on one backend (see the module docstring)."""

    def __init__(self, prefill: Mapping[int, Graph], decode: Mapping[int, Graph], ops: SecureOps,
                 weights: Mapping[str, Any], trace: Trace = no_trace) -> None:
        self.prefill_graphs = prefill
        self.decode_graphs = decode
        self.ops = ops
        self.weights = weights
        self.trace = trace
        self.bucket = 0
        self.prompt_len = 0
        self.filled = 0
        self.cache: list[list[Any]] = []  # per layer: [keys, values], each [1, kv_heads, filled, head_dim]

    @property
    def steps(self) -> int:
        """Decode steps run so far."""
        return self.filled - self.bucket if self.bucket else 0

    def prefill(self, inputs: Mapping[str, Any]) -> Any:
        """Run the prompt (prepared inputs of the prefill graph of its bucket); returns the
        last position's logits and keeps the keys and values."""
        mask = torch.as_tensor(inputs[ATTENTION_MASK])
        bucket = int(mask.shape[-1])
        graph = self.prefill_graphs.get(bucket)
        if graph is None:
            raise GenerationLimitError(f"no prefill graph for a prompt bucket of {bucket}; captured: "
                                       f"{sorted(self.prefill_graphs)}")
        outputs, _ = Interpreter(graph, self.ops, self.trace).run(dict(self.weights), dict(inputs))
        self.bucket, self.prompt_len, self.filled = bucket, int(mask.sum()), bucket
        self.cache = [[outputs[1 + 2 * i], outputs[2 + 2 * i]] for i in range((len(outputs) - 1) // 2)]
        return outputs[0]

    def capacity(self) -> int:
        """The cache capacity the next decode step runs on."""
        return capacity_for(self.decode_graphs, self.filled)

    def public_step_inputs(self) -> dict[str, torch.Tensor]:
        """The next decode step's public inputs (mask over the filled slots, the position)."""
        return decode_public(self.prompt_len, self.bucket, self.filled, self.capacity())

    def decode(self, token: Mapping[str, Any]) -> Any:
        """Feed one token (``{"input_ids": its prepared one-hot}`` plus the public inputs of
        :meth:`public_step_inputs`); returns its logits and appends its keys and values."""
        if not self.cache:
            raise GenerationLimitError("a decode step before the prefill")
        capacity = self.capacity()
        graph = self.decode_graphs[capacity]
        inputs = dict(token)
        for layer, (keys, values) in enumerate(self.cache):
            key_name, value_name = past_names(layer)
            inputs[key_name] = self._padded(keys, capacity)
            inputs[value_name] = self._padded(values, capacity)
        outputs, _ = Interpreter(graph, self.ops, self.trace).run(dict(self.weights), inputs)
        for layer, pair in enumerate(self.cache):
            pair[0] = self.ops.concat([pair[0], outputs[1 + 2 * layer]], 2)
            pair[1] = self.ops.concat([pair[1], outputs[2 + 2 * layer]], 2)
        self.filled += 1
        return outputs[0]

    def _padded(self, value: Any, capacity: int) -> Any:
        """``value`` [1, h, filled, d] with empty (masked) slots up to ``capacity``."""
        shape = list(self.ops.shape(value))
        missing = capacity - shape[2]
        if missing == 0:
            return value
        empty = self.ops.from_public(torch.zeros(shape[0], shape[1], missing, shape[3], dtype=torch.float64))
        return self.ops.concat([value, empty], 2)

    def close(self) -> None:
        """Drop the cache (a finished, cancelled or failed session)."""
        self.cache = []


# ---- in-process drivers ---------------------------------------------------------------------

Chooser = Callable[[torch.Tensor], int]
"""The client's choice of the next token from the last position's logits [V]."""


def greedy(logits: torch.Tensor) -> int:
    """The most likely token (the first on ties, as ``torch.argmax``)."""
    return int(torch.argmax(logits))


@dataclass
class StepCost:
    """One step of a generation: ``kind`` "prefill" or "decode", the capacity it ran on
    (0 for the prefill), its wall time and the rounds and bytes (per party, largest);
    with tracing, party 0's span per secret node (start counted from the step's start)."""

    kind: str
    capacity: int
    seconds: float
    rounds: int = 0
    bytes_sent: int = 0
    spans: list[Span] = field(default_factory=list)


@dataclass
class Generation:
    """What a generation produced: the new tokens, the logits the client saw per step
    (empty with ``reveal="argmax"``), and each step's cost."""

    tokens: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)
    steps: list[StepCost] = field(default_factory=list)


def _last_logits(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1, value.shape[-1])[-1]


def _float_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float64) for k, v in weights.items()}


def generate_float(model: CausalGraphs, prompt: torch.Tensor, new_tokens: int, bucket: int,
                   choose: Chooser = greedy) -> Generation:
    """The rewritten graphs' secure forms on plaintext floats (the fidelity of the forms)."""
    prompt = torch.as_tensor(prompt).reshape(-1)
    check_budget(model.info(), prompt.numel(), bucket, new_tokens)
    ops = FloatOps()
    session = GenerationSession(model.prefill, model.decode, ops, _float_weights(model.weights))
    graph = model.prefill[bucket]
    raw = prefill_inputs(prompt, bucket, model.pad_token_id)
    out = Generation([])
    t0 = time.perf_counter()
    logits = _last_logits(session.prefill({**raw, INPUT_IDS: client_input(graph, INPUT_IDS, raw[INPUT_IDS])}))
    out.steps.append(StepCost("prefill", 0, time.perf_counter() - t0))
    while True:
        out.logits.append(logits)
        out.tokens.append(choose(logits))
        if len(out.tokens) == new_tokens:
            return out
        t0 = time.perf_counter()
        capacity = session.capacity()
        token = torch.tensor([[out.tokens[-1]]])
        step = {**session.public_step_inputs(),
                INPUT_IDS: client_input(model.decode[capacity], INPUT_IDS, token)}
        logits = _last_logits(session.decode(step))
        out.steps.append(StepCost("decode", capacity, time.perf_counter() - t0))


def generate_mpc(cluster: LocalCluster, model: CausalGraphs, weight_shares: list[dict[str, sh.AShare]],
                 prompt: torch.Tensor, new_tokens: int, bucket: int, choose: Chooser = greedy,
                 reveal: str = "logits", trace: bool = False) -> Generation:
    """Generate on the in-process three-party engine: the client shares the prompt and
    each chosen token, the parties keep the KV cache as shares, and only the client opens
    each step's logits (or, with ``reveal="argmax"``, only the greedy token id)."""
    if reveal not in REVEALS:
        raise ValueError(f"reveal must be one of {REVEALS}, got {reveal!r}")
    prompt = torch.as_tensor(prompt).reshape(-1)
    check_budget(model.info(), prompt.numel(), bucket, new_tokens)
    sessions: list[GenerationSession | None] = [None, None, None]
    fp = cluster.fp

    def node_span(party: Any) -> Any:
        return lambda node: span(party, node.origin or node.op)

    def step_program(party: Any, weights: dict[str, sh.AShare], parts: list, graph: Graph, first: bool) -> Any:
        received = {p.key: p.tensor for p in parts}
        if party.profiler is not None:
            party.profiler.spans.clear()
        if first:
            sessions[party.id] = GenerationSession(model.prefill, model.decode, MpcOps(party), weights,
                                                   node_span(party) if trace else no_trace)
        session = sessions[party.id]
        assert session is not None
        if not first:
            received.update({(k, "public", 0): v for k, v in session.public_step_inputs().items()})
        ready = party_inputs(graph, received, party.id, fp.frac_bits, party.device)
        logits = session.prefill(ready) if first else session.decode(ready)
        last = logits.map(lambda t: t.reshape(-1, t.shape[-1])[-1])
        if reveal == "argmax":
            with span(party, ARGMAX_SPAN):
                return argmax(MpcOps(party), last)
        return last

    def run_step(graph: Graph, inputs: dict[str, torch.Tensor], first: bool, capacity: int) -> Any:
        specs = [s for s in input_specs(graph) if s.name in inputs]
        per_party = client_parts(specs, inputs, fp)
        rounds0, bytes0 = cluster.rounds, cluster.bytes_sent()
        t0 = time.perf_counter()
        results = cluster.run(step_program, [(weight_shares[i], per_party[i], graph, first) for i in range(3)])
        profiler = cluster.parties[0].profiler
        spans = [x.since(t0) for x in profiler.spans if x.depth == 0] if trace and profiler is not None else []
        cost = StepCost("prefill" if first else "decode", capacity, time.perf_counter() - t0,
                        cluster.rounds - rounds0, max(b - a for a, b in zip(bytes0, cluster.bytes_sent())), spans)
        opened = fp.decode(sh.reconstruct(results).cpu(), results[0].frac_bits)
        return opened, cost

    out = Generation([])
    try:
        opened, cost = run_step(model.prefill[bucket], prefill_inputs(prompt, bucket, model.pad_token_id), True, 0)
        while True:
            out.steps.append(cost)
            if reveal == "argmax":
                out.tokens.append(int(torch.round(opened).item()))
            else:
                out.logits.append(opened)
                out.tokens.append(choose(opened))
            if len(out.tokens) == new_tokens:
                return out
            first_session = sessions[0]
            assert first_session is not None
            capacity = first_session.capacity()
            opened, cost = run_step(model.decode[capacity], {INPUT_IDS: torch.tensor([[out.tokens[-1]]])}, False,
                                    capacity)
    finally:
        for s in sessions:
            if s is not None:
                s.close()


def plaintext_continuation(lm: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int],
                                                                                                list[torch.Tensor]]:
    """The plaintext model's greedy continuation and its logits per step (its own KV cache)."""
    ids = torch.as_tensor(prompt).reshape(1, -1)
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    with torch.no_grad():
        out = lm(input_ids=ids, use_cache=True)
        for _ in range(new_tokens):
            last = out.logits[0, -1].to(torch.float64)
            logits.append(last)
            tokens.append(int(torch.argmax(last)))
            out = lm(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits
