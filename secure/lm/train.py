"""Train the shipped causal LM: a small LLaMA on the project's own English, deterministically.

``python -m secure.lm.train --out DIR [--steps N ...]`` (or ``python -m secure.lm``):

1. the corpus (:mod:`secure.lm.corpus`: WordNet training pool and docstring training pool,
   each text once) trains a byte-level BPE tokenizer (:mod:`secure.lm.tokenizer`);
2. every text becomes ``<s> tokens </s>``; each epoch the texts are shuffled (a seeded
   ``torch.randperm``), concatenated and cut into blocks of ``positions`` tokens;
3. a ``LlamaForCausalLM`` (grouped-query attention, RoPE, RMSNorm, SiLU-gated MLP, tied
   embeddings, SDPA attention) is trained on those blocks with AdamW (betas 0.9/0.95,
   weight decay on matrices), linear warm-up then cosine decay to a tenth, gradient
   norm clipped to 1; a progress line every ``--log-every`` steps;
4. perplexity on the held-out WordNet set and on the docstring evaluation set, beside the
   uniform (= vocabulary size) and unigram baselines, and greedy continuations of a few
   prompts are printed and written to ``training.json`` next to the model
   (``save_pretrained``, safetensors) and the tokenizer.

Deterministic: fixed seeds (model weights and data order; this is model training, not
share randomness), ``torch.use_deterministic_algorithms(True)`` and a fixed thread count,
so two runs of one command on one machine give identical weights.

Imports :mod:`secure.lm` and, through it, :mod:`secure.distill`'s corpus modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from secure.lm import corpus
from secure.lm.evaluate import LogitsFn, greedy_continuation, perplexity, unigram_perplexity
from secure.lm.tokenizer import encode_documents, train_tokenizer

SAMPLE_PROMPTS: tuple[str, ...] = ("a small", "the capital of", "Return the", "He was")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the trained weights (the defaults made the shipped model)."""

    steps: int = 1600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    vocab_size: int = 1024
    hidden: int = 192
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    positions: int = 128
    seed: int = 0
    threads: int = 1
    corpus_limit: int | None = None
    eval_texts: int = 256
    docstring_eval_texts: int = 64
    log_every: int = 25


def build_model(settings: Settings, tokenizer: object) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` of ``settings`` (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if settings.heads % settings.kv_heads or settings.hidden % settings.heads:
        raise ValueError(f"heads ({settings.heads}) must divide hidden ({settings.hidden}) and be a multiple of "
                         f"kv_heads ({settings.kv_heads})")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden, intermediate_size=settings.ffn,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads, hidden_act="silu", max_position_embeddings=settings.positions,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def blocks(documents: Sequence[list[int]], positions: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, positions]`` batches: per epoch the documents in a seeded random
    order, concatenated and cut into blocks (the last partial batch of an epoch dropped)."""
    tensors = [torch.tensor(d, dtype=torch.long) for d in documents]
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(tensors), generator=generator).tolist()
        stream = torch.cat([tensors[i] for i in order])
        usable = stream.numel() // (positions * batch_size) * positions * batch_size
        if usable == 0:
            raise ValueError(f"the corpus ({stream.numel()} tokens) is smaller than one batch "
                             f"({batch_size} x {positions})")
        yield from stream[:usable].view(-1, batch_size, positions)


def learning_rate(step: int, settings: Settings) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr / 10`` at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def _fit(model: torch.nn.Module, batches: Iterator[torch.Tensor], settings: Settings) -> list[float]:
    """The training loop; the mean loss of every logged window."""
    optimizer = _optimizer(model, settings)
    model.train()
    started, window, losses = time.monotonic(), [], []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(float(loss.detach()))
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            losses.append(sum(window) / len(window))
            elapsed = time.monotonic() - started
            left = elapsed / (step + 1) * (settings.steps - step - 1)
            done = (step + 1) * 20 // settings.steps
            print(f"[{'#' * done}{'.' * (20 - done)}] step {step + 1}/{settings.steps}  loss {losses[-1]:.3f}  "
                  f"lr {learning_rate(step, settings):.2e}  {_clock(elapsed)} elapsed, {_clock(left)} left",
                  flush=True)
            window = []
    model.eval()
    return losses


def _logits_fn(model: torch.nn.Module) -> LogitsFn:
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def train(settings: Settings, out: str | Path, command: str = "") -> dict:
    """Train, evaluate and save the LM into ``out``; the summary written to ``training.json``.

    Sets the process's torch thread count and deterministic mode (a caller that shares the
    process restores them)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    started = time.monotonic()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    texts = corpus.training_documents(settings.corpus_limit)
    tokenizer = train_tokenizer(texts, settings.vocab_size, settings.positions)
    documents = encode_documents(tokenizer, texts)
    counts = torch.bincount(torch.tensor([t for d in documents for t in d[1:]]), minlength=len(tokenizer))
    train_tokens = sum(len(d) for d in documents)
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts))} characters, {train_tokens} tokens "
          f"(vocabulary {len(tokenizer)}); tokenizer {_clock(time.monotonic() - started)}", flush=True)

    torch.manual_seed(settings.seed)  # model weights and data order, not share randomness
    model = build_model(settings, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {params} parameters, hidden {settings.hidden}, {settings.layers} layers, "
          f"{settings.heads} heads / {settings.kv_heads} kv heads, ffn {settings.ffn}", flush=True)
    fit_started = time.monotonic()
    losses = _fit(model, blocks(documents, settings.positions, settings.batch_size, settings.seed), settings)
    fit_seconds = time.monotonic() - fit_started

    held = corpus.held_out_documents(settings.eval_texts)
    docstrings = corpus.docstring_documents(settings.docstring_eval_texts)
    result = {
        "held_out_perplexity": perplexity(_logits_fn(model), tokenizer, held, settings.positions),
        "held_out_unigram_perplexity": unigram_perplexity(counts, tokenizer, held, settings.positions),
        "docstring_perplexity": perplexity(_logits_fn(model), tokenizer, docstrings, settings.positions),
        "docstring_unigram_perplexity": unigram_perplexity(counts, tokenizer, docstrings, settings.positions),
        "uniform_perplexity": float(len(tokenizer)),
    }
    samples = {p: greedy_continuation(model, tokenizer, p) for p in SAMPLE_PROMPTS}
    print(f"held-out WordNet perplexity {result['held_out_perplexity']:.2f} ({len(held)} texts; unigram "
          f"{result['held_out_unigram_perplexity']:.1f}, uniform {len(tokenizer)}); docstrings "
          f"{result['docstring_perplexity']:.2f} (unigram {result['docstring_unigram_perplexity']:.1f})")
    for text in samples.values():
        print(f"  greedy: {text!r}")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)  # transformers writes it owner-only; it is a shipped file
    summary = {
        "command": command,
        "settings": dataclasses.asdict(settings),
        "corpus": {"texts": len(texts), "characters": sum(map(len, texts)), "tokens": train_tokens,
                   "tokens_seen": settings.steps * settings.batch_size * settings.positions,
                   "held_out_texts": len(held), "docstring_texts": len(docstrings)},
        "parameters": params,
        "final_loss": losses[-1],
        "loss_curve": [round(x, 4) for x in losses],
        **{k: round(v, 4) for k, v in result.items()},
        "greedy_samples": samples,
        "train_seconds": round(fit_seconds, 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({_clock(summary['wall_seconds'])} in all)", flush=True)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, Path]:
    """(settings, output folder) of a command line."""
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m secure.lm.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model into")
    for field in dataclasses.fields(Settings):
        kind = int if field.name == "corpus_limit" else type(getattr(defaults, field.name))
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=getattr(defaults, field.name))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return Settings(**args), out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: train into ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, out = parse_args(argv)
    train(settings, out, command=" ".join(["python -m secure.lm.train", *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
