"""The shipped LM's tokenizer: byte-level BPE trained with Hugging Face ``tokenizers``.

Byte-level (every byte is a symbol, so any text encodes: no unknown token), no prefix
space, two special tokens: ``<s>`` (id 0, BOS, prepended by the post-processor as LLaMA's
tokenizer does) and ``</s>`` (id 1, EOS, also the padding token). Training is
deterministic for a given list of texts. Saved as ``tokenizer.json`` +
``tokenizer_config.json`` (a ``PreTrainedTokenizerFast``), which
``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)`` loads.

Imports no other project module.
"""

from __future__ import annotations

from collections.abc import Sequence

BOS: str = "<s>"
EOS: str = "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS)
"""In id order: BOS is 0, EOS (and padding) is 1."""


def train_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int = 128) -> object:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of ``vocab_size`` tokens (256 bytes, the
    two special tokens and the merges) trained on ``texts``; ``max_length`` is its
    ``model_max_length`` (the model's positions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes and special tokens), "
                         f"got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(list(texts), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, core.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=max_length)


def encode_documents(tokenizer: object, texts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + tokens + [EOS]`` of every text (the training and evaluation unit)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=True)
    return [e.ids + [tokenizer.eos_token_id] for e in encodings]


__all__ = ["BOS", "EOS", "SPECIAL_TOKENS", "encode_documents", "train_tokenizer"]
