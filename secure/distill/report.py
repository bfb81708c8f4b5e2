"""The figures of one distillation run and the ``secure_recipe.json`` it writes beside the
student (read back by ``secure.evaluate.fidelity.resolve_recipe`` for ``--recipe power``).

Imports only :mod:`secure.distill.calibrate` of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from secure.distill.calibrate import Calibration

RECIPE_FILE = "secure_recipe.json"


@dataclass
class DistillReport:
    """Figures of one distillation run (also written to ``secure_recipe.json``)."""

    out_dir: str
    p: int
    eps: float
    normalize: bool
    upper: float
    iterations: int
    lower: float
    steps: int
    batch_size: int
    max_length: int
    lr: float
    seconds: float
    """Wall time of the whole run (loading, evaluations, training, calibration; not saving)."""
    train_seconds: float
    cosine_before: dict[str, float]
    cosine_after: dict[str, float]
    cosine_after_secure_form: dict[str, float]
    loss_start: float
    loss_end: float
    calibration: Calibration
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per held-out set: the denominator range over every row (padded ones included) and
    how many rows exceed ``upper`` (measured after calibration, never used by it)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The other settings of the run (init target, penalty, headroom, corpus sizes, ...)."""

    def recipe(self, distilled_from: str) -> dict[str, Any]:
        """The ``secure_recipe.json`` contents."""
        cal = self.calibration
        return {
            "softmax": "power",
            "p": self.p,
            "eps": self.eps,
            "normalize": self.normalize,
            "upper": self.upper,
            "iterations": self.iterations,
            "lower": self.lower,
            "distilled_from": distilled_from,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "lr": self.lr,
            "seconds": round(self.seconds, 1),
            "train_seconds": round(self.train_seconds, 1),
            "threads": torch.get_num_threads(),
            "loss_start": self.loss_start,
            "loss_end": self.loss_end,
            "cosine_before": self.cosine_before,
            "cosine_after": self.cosine_after,
            "cosine_after_secure_form": self.cosine_after_secure_form,
            "calibration": {
                "denominator_min": cal.denominator_min,
                "denominator_max": cal.denominator_max,
                "max_abs_score": cal.max_abs_score,
                "covered": cal.covered,
                "error_bound": cal.error_bound,
                "fraction_below_lower": cal.fraction_below_lower,
                "headroom": cal.headroom,
                "eps_guarantee": cal.eps_guarantee,
                "per_layer": {str(k): v.summary() for k, v in cal.per_layer.items()},
            },
            "held_out_denominators": self.held_out,
            "settings": self.settings,
        }
