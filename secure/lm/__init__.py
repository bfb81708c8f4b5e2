"""The small causal LM the project ships for secure generation: ``tiny-llama``.

A ``LlamaForCausalLM`` trained here from scratch (not downloaded), in ``tiny_llama/``
(:func:`shipped_lm_path`; installed with the package, loaded by
:func:`secure.models.load_model_folder` as a causal LM):

* vocabulary 1024 (byte-level BPE, :mod:`secure.lm.tokenizer`; ``<s>`` 0 is BOS and is
  prepended, ``</s>`` 1 is EOS and padding), hidden 192, 4 layers, 4 attention heads
  sharing 2 key/value heads (grouped-query attention, head size 48), SiLU-gated MLP of
  512, RMSNorm, RoPE (theta 10,000), 128 positions, tied input/output embeddings, SDPA
  attention; 1,820,352 parameters, float32 safetensors (7.3 MB);
* corpus (:mod:`secure.lm.corpus`): the WordNet 3.0 training pool (examples and
  definitions) and the docstring training pool of :mod:`secure.distill`, 174,474 texts,
  8.5 M characters, 3.70 M tokens; 1600 steps of 32 x 128 tokens (6.55 M tokens, 1.8 epochs);
* held-out WordNet perplexity 34.5 (256 texts never trained on; uniform 1024, unigram 361),
  docstring evaluation set 38.4 (unigram 431); final training loss 2.63;
* greedy: "a small" -> "a smaller than a single-handed bird.", "She went to the" ->
  "She went to the house.";
* made by ``nice -n 10 python -m secure.lm.train --out secure/lm/tiny_llama`` (the
  defaults, one thread, deterministic: :mod:`secure.lm.train`): 1136 s of training,
  19 min 25 s in all on 2 shared cores beside other jobs (about 0.65 s a step alone).
  ``tiny_llama/training.json`` records the settings, loss curve, figures and versions.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_LM_NAME: str = "tiny-llama"
"""The shipped causal LM's name."""


def shipped_lm_path() -> Path:
    """The committed model folder (config.json, model.safetensors, tokenizer, training.json)."""
    return Path(__file__).with_name("tiny_llama")


__all__ = ["SHIPPED_LM_NAME", "shipped_lm_path"]
