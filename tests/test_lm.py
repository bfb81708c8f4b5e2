"""The shipped causal LM (:mod:`secure.lm`): it loads as the service loads a model folder,
has the architecture the secure runtime expects, is far better than chance on held-out
English, and the committed training command is deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from secure.distill import wordnet  # noqa: E402
from secure.lm import SHIPPED_LM_NAME, shipped_lm_path  # noqa: E402
from secure.lm.corpus import held_out_documents  # noqa: E402
from secure.lm.evaluate import perplexity  # noqa: E402
from secure.lm.train import Settings, main, parse_args  # noqa: E402
from secure.models import CausalLM, load_model_folder  # noqa: E402

needs_wordnet = pytest.mark.skipif(not wordnet.available(), reason=wordnet.missing_reason() or "")

TINY = ["--steps", "4", "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--ffn", "64", "--vocab-size", "300", "--corpus-limit", "400", "--eval-texts", "4",
        "--docstring-eval-texts", "2", "--log-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def shipped() -> tuple[CausalLM, object]:
    model, tokenizer, causal = load_model_folder(shipped_lm_path())
    assert causal and isinstance(model, CausalLM)
    return model, tokenizer


def test_shipped_folder_is_a_small_llama(shipped: tuple[CausalLM, object]) -> None:
    model, tokenizer = shipped
    config = model.lm.config
    assert SHIPPED_LM_NAME == "tiny-llama" and config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.tie_word_embeddings and config.hidden_act == "silu"
    assert model.lm.lm_head.weight.data_ptr() == model.lm.model.embed_tokens.weight.data_ptr()
    assert config.max_position_embeddings == 128 and config.vocab_size == len(tokenizer) <= 2048
    assert tokenizer.bos_token_id == config.bos_token_id and tokenizer.eos_token_id == config.eos_token_id
    folder = shipped_lm_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json"):
        assert (folder / name).is_file(), name
    assert sum(f.stat().st_size for f in folder.iterdir()) < 20 * 2**20


@needs_wordnet
def test_shipped_perplexity_is_far_below_uniform(shipped: tuple[CausalLM, object]) -> None:
    model, tokenizer = shipped
    # measured: 35.15 on these 20 held-out WordNet texts (34.52 on 256; unigram 361, uniform 1024)
    value = perplexity(model, tokenizer, held_out_documents(20))
    assert value < len(tokenizer) / 20


def test_shipped_tokenizer_round_trips(shipped: tuple[CausalLM, object]) -> None:
    _, tokenizer = shipped
    for text in ("The capital of France is Paris.", "  two  spaces,\ttabs\nand lines", "naïve café — 東京 🙂", ""):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != tokenizer.bos_token_id


def test_command_line_defaults_are_the_shipped_settings() -> None:
    settings, out = parse_args(["--out", "x"])
    assert settings == Settings() and out == Path("x")
    recorded = json.loads((shipped_lm_path() / "training.json").read_text())
    assert recorded["settings"] == {**Settings().__dict__}


@needs_wordnet
def test_training_command_is_deterministic(tmp_path: Path) -> None:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        for run in ("a", "b"):
            assert main([*TINY, "--out", str(tmp_path / run)]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    first, second = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    summary = json.loads((tmp_path / "a" / "training.json").read_text())
    assert summary["parameters"] < 30_000 and summary["settings"]["steps"] == 4
    model, tokenizer, causal = load_model_folder(tmp_path / "a")
    assert causal and model.lm.config.num_key_value_heads == 1 and len(tokenizer) == 300
