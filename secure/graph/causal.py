"""Capture a causal LM as the graphs secure generation runs: prefill and decode.

Generation keeps every layer's keys and values as the parties' shares (the KV cache) and
runs each new token against them, never recomputing the prefix. Two kinds of graph, both
captured from one :class:`CausalStep` around the Hugging Face model, so they name the
same weights and share one deal:

* **prefill**, one per prompt bucket ``L``: the client's prompt, *left*-padded to ``L``.
  Inputs: ``input_ids`` [1, L] (client), ``attention_mask`` [1, L] (public, 0 on the
  padding) and ``position_ids`` [1, L] (public, ``max(cumsum(mask) - 1, 0)``). Outputs:
  the logits of the last position [1, 1, V] (left padding puts the prompt's last token
  there, so the LM head runs on one row) and each layer's keys and values
  [1, kv_heads, L, head_dim].
* **decode**, one per cache capacity ``C``: one new token. Inputs: ``input_ids`` [1, 1]
  (client), ``attention_mask`` [1, C + 1] (public: which cache slots hold a token, then 1
  for the new one), ``position_ids`` [1, 1] (public) and ``past_key_i`` /
  ``past_value_i`` [1, kv_heads, C, head_dim] (``state``: held by the parties). Outputs:
  the logits [1, 1, V] and each layer's new key and value [1, kv_heads, 1, head_dim].

Cache slots: the prefill fills slots 0..L-1 (the first ``L - n`` are padding, masked);
the token generated at step ``j`` (1-based) is fed at step ``j`` and its keys and values
go to slot ``L + j - 1``. A step runs the smallest captured capacity that holds the
filled slots; the empty slots are masked. Positions, the mask and the slot count are
public (the parties learn the prompt's padded and real length, as for every query).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secure.graph.capture import CaptureError, capture
from secure.graph.ir import Graph

INPUT_IDS, ATTENTION_MASK, POSITION_IDS = "input_ids", "attention_mask", "position_ids"


def past_names(layer: int) -> tuple[str, str]:
    """The decode graph's state inputs of one layer: its cached keys and values."""
    return f"past_key_{layer}", f"past_value_{layer}"


class CausalStep(nn.Module):
    """One forward of a Hugging Face causal LM over explicit key/value tensors.

    Without ``past_*`` inputs it is the prefill; with them (``layers`` pairs) a decode
    step. It returns the last position's logits, then per layer the keys and values of
    the positions it was given (the whole prompt, or the one new token)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for layer in range(len(past) // 2):
            key, value = past_names(layer)
            cache.update(past[key], past[value], layer)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        new = input_ids.shape[-1]
        kv: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            kv += [layer.keys[:, :, -new:], layer.values[:, :, -new:]]
        return (out.logits, *kv)


@dataclass(frozen=True)
class CacheLayout:
    """The shape of one layer's cached keys (and values): [1, kv_heads, slots, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int

    def shape(self, slots: int) -> list[int]:
        return [1, self.kv_heads, slots, self.head_dim]


@dataclass
class CausalGraphs:
    """A causal LM captured for generation: prefill graphs by prompt bucket, decode graphs
    by cache capacity, the weights (plain, for the owner to deal) and what the client and
    parties need to know: vocabulary, positions, cache layout, end-of-text token."""

    prefill: dict[int, Graph]
    decode: dict[int, Graph]
    weights: dict[str, torch.Tensor]
    layout: CacheLayout
    vocab_size: int
    max_positions: int
    eos_token_id: int | None = None
    pad_token_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """The public facts of the model, as stored beside its graphs in a deal."""
        return {"kind": "causal", "layers": self.layout.layers, "kv_heads": self.layout.kv_heads,
                "head_dim": self.layout.head_dim, "vocab_size": self.vocab_size,
                "max_positions": self.max_positions, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "prompt_buckets": sorted(self.prefill),
                "capacities": sorted(self.decode)}


class GenerationLimitError(ValueError):
    """A prompt or token budget the captured graphs cannot serve; the message says why."""


def prefill_inputs(prompt: torch.Tensor, bucket: int, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """The prefill's inputs for ``prompt`` (token ids, shape [n]) left-padded to ``bucket``."""
    ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    n = ids.numel()
    if n == 0:
        raise GenerationLimitError("the prompt is empty: give at least one token")
    if n > bucket:
        raise GenerationLimitError(f"a prompt of {n} tokens does not fit the bucket of {bucket}")
    input_ids = torch.full((1, bucket), pad_token_id, dtype=torch.long)
    input_ids[0, bucket - n:] = ids
    mask = torch.zeros(1, bucket, dtype=torch.long)
    mask[0, bucket - n:] = 1
    return {INPUT_IDS: input_ids, ATTENTION_MASK: mask, POSITION_IDS: positions_of(mask)}


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask: 0, 1, ... over its ones (0 on the padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def decode_public(prompt_len: int, bucket: int, filled: int, capacity: int) -> dict[str, torch.Tensor]:
    """The decode step's public inputs: with ``filled`` cache slots in use (the bucket, then
    one per fed token), slots ``bucket - prompt_len .. filled - 1`` hold tokens; the new
    token's position is ``prompt_len + filled - bucket``."""
    if not bucket <= filled <= capacity:
        raise GenerationLimitError(f"{filled} filled slots do not fit a cache of {capacity}")
    mask = torch.zeros(1, capacity + 1, dtype=torch.long)
    mask[0, bucket - prompt_len:filled] = 1
    mask[0, capacity] = 1
    return {ATTENTION_MASK: mask, POSITION_IDS: torch.tensor([[prompt_len + filled - bucket]], dtype=torch.long)}


def capacity_for(capacities: Iterable[int], filled: int) -> int:
    """The smallest capacity that holds ``filled`` slots."""
    fitting = [c for c in capacities if c >= filled]
    if not fitting:
        raise GenerationLimitError(f"{filled} cache slots exceed the largest captured capacity "
                                   f"{max(capacities, default=0)}")
    return min(fitting)


def check_budget(graphs_info: dict[str, Any], prompt_len: int, bucket: int, new_tokens: int) -> None:
    """Refuse a generation the model cannot serve: positions beyond its table or a cache
    beyond the largest capacity (``graphs_info`` is :meth:`CausalGraphs.info`)."""
    if new_tokens < 1:
        raise GenerationLimitError(f"the token budget must be at least 1, got {new_tokens}")
    last_position = prompt_len + new_tokens - 1
    if last_position > graphs_info["max_positions"]:
        raise GenerationLimitError(f"{prompt_len} prompt tokens + {new_tokens} new tokens exceed the model's "
                                   f"{graphs_info['max_positions']} positions")
    # the last generated token is never fed back: new_tokens - 1 decode steps, the last of
    # which reads the bucket's slots plus the new_tokens - 2 tokens fed before it
    filled = bucket + new_tokens - 2
    capacities = graphs_info["capacities"]
    if new_tokens > 1 and filled > max(capacities):
        raise GenerationLimitError(f"a prompt bucket of {bucket} and {new_tokens} new tokens need {filled} cache "
                                   f"slots; the largest captured capacity is {max(capacities)}")


def _config_int(config: Any, *keys: str) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def capture_causal(lm: nn.Module, prompt_buckets: Sequence[int], capacities: Sequence[int],
                   meta: dict[str, Any] | None = None) -> CausalGraphs:
    """Capture a Hugging Face causal LM (``...ForCausalLM`` / ``GPT2LMHeadModel``, not a
    wrapper) for generation: one prefill graph per prompt bucket, one decode graph per
    cache capacity. The graphs are unrewritten (rewrite each with the recipe)."""
    config = lm.config
    max_positions = _config_int(config, "max_position_embeddings", "n_positions")
    if max_positions is None:
        raise CaptureError(f"{type(lm).__name__}: its config names no max_position_embeddings")
    vocab = _config_int(config, "vocab_size")
    if vocab is None:
        raise CaptureError(f"{type(lm).__name__}: its config names no vocab_size")
    if not prompt_buckets or not capacities:
        raise CaptureError("give at least one prompt bucket and one cache capacity")
    step = CausalStep(lm).eval()
    prefill: dict[int, Graph] = {}
    weights: dict[str, torch.Tensor] = {}
    layout: CacheLayout | None = None
    for bucket in sorted(set(prompt_buckets)):
        example = prefill_inputs(torch.arange(1, bucket + 1) % vocab, bucket)
        graph, weights = capture(step, example, secret_inputs=(INPUT_IDS,), meta=dict(meta or {}))
        outputs = [_output_spec(graph, o) for o in graph.outputs]
        if len(outputs) < 3 or len(outputs) % 2 == 0:
            raise CaptureError(f"{type(lm).__name__}: the prefill returned {len(outputs)} tensors, expected the "
                               "logits and a key and a value per layer")
        _, kv_heads, _, head_dim = outputs[1]
        layout = CacheLayout((len(outputs) - 1) // 2, kv_heads, head_dim)
        prefill[bucket] = graph
    assert layout is not None
    decode: dict[int, Graph] = {}
    for capacity in sorted(set(capacities)):
        if capacity < min(prompt_buckets):
            raise CaptureError(f"cache capacity {capacity} is below the smallest prompt bucket {min(prompt_buckets)}")
        example = {INPUT_IDS: torch.ones(1, 1, dtype=torch.long),
                   **decode_public(1, min(prompt_buckets), min(prompt_buckets), capacity)}
        state = []
        for layer in range(layout.layers):
            for name in past_names(layer):
                example[name] = torch.zeros(layout.shape(capacity))
                state.append(name)
        graph, decode_weights = capture(step, example, secret_inputs=(INPUT_IDS,), state_inputs=state,
                                        meta=dict(meta or {}))
        if set(decode_weights) != set(weights):
            raise CaptureError("the decode graph names other weights than the prefill graph")
        decode[capacity] = graph
    return CausalGraphs(prefill, decode, weights, layout, vocab, max_positions,
                        _token_id(config, "eos_token_id", vocab), _token_id(config, "pad_token_id", vocab) or 0,
                        dict(meta or {}))


def _token_id(config: Any, key: str, vocab: int) -> int | None:
    """A special token id of the config, if it names one inside the vocabulary."""
    value = getattr(config, key, None)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and 0 <= value < vocab else None


def _output_spec(graph: Graph, name: str) -> list[int]:
    for n in graph.nodes:
        if n.name == name and n.spec is not None:
            return n.spec.shape
    raise CaptureError(f"graph output {name!r} has no shape")
