"""Power-Softmax attention, calibration, distillation and the offline corpus
(secure/distill/) on a tiny random BERT."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertModel, BertTokenizer  # noqa: E402

from secure.approx.float_backend import FloatOps  # noqa: E402
from secure.approx.reciprocal import bounded_reciprocal_start  # noqa: E402
from secure.approx.softmax import POWER_SOFTMAX_EPS, power_softmax  # noqa: E402
from secure.distill import cache, corpus, mixture, wordnet  # noqa: E402
from secure.distill.attention import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    keep_mask,
    load_power_softmax_model,
    power_softmax_exact,
    use_power_softmax,
)
from secure.distill.calibrate import (  # noqa: E402
    LayerRange,
    align_head_scales,
    choose_calibration,
    nice_ceil,
    record_denominators,
)
from secure.distill.loss import cosine_stats, sentence_embeddings  # noqa: E402
from secure.distill.report import RECIPE_FILE  # noqa: E402
from secure.distill.train import DISTILL_DEFAULTS, distill_power_softmax, tokenize  # noqa: E402

needs_wordnet = pytest.mark.skipif(not wordnet.available(), reason=wordnet.missing_reason() or "")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tiny_vocab() -> list[str]:
    words: set[str] = set()
    for s in corpus.training_pool()[:400] + corpus.evaluation_pool()[:100]:
        words.update(w.lower() for w in corpus._WORD.findall(s))
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,;:!?'\"()-_=*/[]<>")
    pieces = ["##" + c for c in chars]
    return SPECIALS + sorted(set(chars)) + pieces + sorted(words - set(chars))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 32, 2 heads) and a small WordPiece tokenizer, saved."""
    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(_tiny_vocab()) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab_file=str(vocab), do_lower_case=True)
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128,
                     initializer_range=0.2)  # scores of order 1: mean x^4 well above eps
    model = BertModel(cfg, add_pooling_layer=False).eval()
    model.save_pretrained(str(path))
    return path


def _batch(tiny_dir: Path, texts: list[str]) -> dict:
    tok = BertTokenizer.from_pretrained(str(tiny_dir))
    return dict(tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"))


# ---- the function -----------------------------------------------------------------------


def test_exact_formula_and_mask_semantics() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64) * 2
    keep = torch.ones(2, 1, 1, 7, dtype=torch.float64)
    keep[0, ..., 5:] = 0
    out = power_softmax_exact(x, 4, keep=keep)
    xp = x**4 * keep
    L = keep.sum(-1, keepdim=True)
    ref = xp / (POWER_SOFTMAX_EPS + xp.sum(-1, keepdim=True) / L)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    assert bool((out[0, ..., 5:] == 0).all())
    # the bare form's rows sum to about L (the secure form's semantics); normalised: to 1
    torch.testing.assert_close(out.sum(-1), L.squeeze(-1).expand(2, 3, 5), rtol=1e-6, atol=0)
    norm = power_softmax_exact(x, 4, keep=keep, normalize=True)
    torch.testing.assert_close(norm.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64), rtol=1e-6, atol=0)
    # and it is what the secure form approximates
    _, lower, _ = bounded_reciprocal_start(1e4, 16)
    assert lower < float((xp.sum(-1) / L.squeeze(-1)).min())
    sec = power_softmax(FloatOps(), x, p=4, mask=keep, upper=1e4, iterations=16)
    torch.testing.assert_close(sec, out, rtol=2e-3, atol=1e-9)
    with pytest.raises(ValueError):
        power_softmax_exact(x, 3)


def test_keep_mask_from_bool_and_additive_masks() -> None:
    shape = (1, 2, 3, 3)
    bool_mask = torch.tensor([True, True, False]).expand(1, 1, 3, 3)
    add_mask = torch.where(bool_mask, 0.0, torch.finfo(torch.float32).min)
    for m in (bool_mask, add_mask):
        keep = keep_mask(m, shape)
        assert keep.shape == shape and keep.dtype == torch.float32
        assert keep[..., 2].sum() == 0 and keep[..., :2].sum() == 2 * 3 * 2
    assert keep_mask(None, shape) is None
    with pytest.raises(ValueError):
        keep_mask(add_mask + 0.5, shape)


def test_power_attention_layer_matches_hand_computation(tiny_dir: Path) -> None:
    model = use_power_softmax(BertModel.from_pretrained(str(tiny_dir)), p=4).eval()
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    batch = _batch(tiny_dir, ["a short one.", "a somewhat longer sentence for the test."])
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    attn = model.encoder.layer[0].attention.self
    h = out.hidden_states[0]
    b, n, _ = h.shape
    heads, d = attn.num_attention_heads, attn.attention_head_size

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, n, heads, d).transpose(1, 2)

    q, k, v = split(attn.query(h)), split(attn.key(h)), split(attn.value(h))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    keep = batch["attention_mask"][:, None, None, :].to(scores.dtype)
    xp = scores**4 * keep
    weights = xp / (POWER_SOFTMAX_EPS + xp.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True))
    torch.testing.assert_close(out.attentions[0], weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, power_softmax_exact(scores, 4, keep=keep))
    with torch.no_grad():
        ctx = attn(h, attention_mask=batch["attention_mask"][:, None, None, :].bool())[0]
    torch.testing.assert_close(ctx.reshape(b, n, heads * d), (weights @ v).transpose(1, 2).reshape(b, n, -1),
                               rtol=1e-5, atol=1e-6)
    # masked keys get exactly zero weight, in every layer and head
    pad = batch["attention_mask"] == 0
    assert bool(pad.any())
    for a in out.attentions:
        assert bool((a.permute(0, 3, 1, 2)[pad] == 0).all())


def test_p_is_read_from_config(tiny_dir: Path) -> None:
    model = BertModel.from_pretrained(str(tiny_dir)).eval()
    batch = _batch(tiny_dir, ["one more sentence here."])
    outs = []
    for p in (2, 6):
        use_power_softmax(model, p=p)
        with torch.no_grad():
            outs.append(model(**batch, output_attentions=True).attentions[0])
    assert not torch.allclose(outs[0], outs[1])


# ---- calibration ------------------------------------------------------------------------


def test_calibration_choice() -> None:
    assert nice_ceil(3.1) == 5.0 and nice_ceil(100.0) == 100.0 and nice_ceil(0.011) == 0.02
    r = LayerRange(denominator_min=0.5, denominator_max=40.0, head_min=[0.5], head_max=[40.0])
    cal = choose_calibration({0: r}, headroom=2.0, margin=2.0)
    assert cal.upper == 100.0 and cal.covered
    _, lower, _ = bounded_reciprocal_start(cal.upper, cal.iterations)
    assert lower * 2.0 <= 0.5 and cal.lower == lower
    _, lower_less, _ = bounded_reciprocal_start(cal.upper, cal.iterations - 1)
    assert lower_less * 2.0 > 0.5  # the smallest iteration count that covers


def test_align_head_scales_keeps_the_function(tiny_dir: Path) -> None:
    model = use_power_softmax(BertModel.from_pretrained(str(tiny_dir)), normalize=True).eval()
    batch = _batch(tiny_dir, ["the first text.", "and a second text that is a bit longer."])
    with torch.no_grad(), record_denominators(model, 4, POWER_SOFTMAX_EPS) as ranges:
        before = model(**batch).last_hidden_state
    align_head_scales(model, ranges, 4, target=50.0)
    with torch.no_grad(), record_denominators(model, 4, POWER_SOFTMAX_EPS) as after_ranges:
        after = model(**batch).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    for r in after_ranges.values():
        for hmax in r.head_max:
            assert hmax == pytest.approx(50.0, rel=1e-3)


def test_only_the_observed_model_records_and_only_within_the_block(tiny_dir: Path) -> None:
    observed = use_power_softmax(BertModel.from_pretrained(str(tiny_dir))).eval()
    other = use_power_softmax(BertModel.from_pretrained(str(tiny_dir))).eval()
    batch = _batch(tiny_dir, ["a text to observe.", "and another one, longer than the first."])
    with torch.no_grad(), record_denominators(observed, 4, POWER_SOFTMAX_EPS) as ranges:
        other(**batch)
        assert not ranges
        observed(**batch)
    rows = {k: r.rows for k, r in ranges.items()}
    assert sorted(rows) == [0, 1] and all(n > 0 for n in rows.values())
    with torch.no_grad():
        observed(**batch)
    assert {k: r.rows for k, r in ranges.items()} == rows
    assert not any("_power_softmax_observer" in m.__dict__ for m in observed.modules())


# ---- distillation -----------------------------------------------------------------------


def _docstring_texts() -> dict:
    """Training, calibration and held-out texts from the docstring corpus only (no WordNet)."""
    return {"train_texts": corpus.training_sentences(240, seed=0),
            "calibration_texts": corpus.training_sentences(32, seed=9),
            "held_out": {"docstrings": corpus.evaluation_sentences(8), "everyday": mixture.everyday_sentences()}}


@pytest.fixture(scope="module")
def tiny_student(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The tiny BERT distilled for 30 steps with the default eps / headroom (docstring texts)."""
    out = tmp_path_factory.mktemp("student")
    report = distill_power_softmax(
        tiny_dir, out, p=4, steps=30, batch_size=8, max_length=32, lr=3e-3, seed=0, progress=False,
        eval_texts=corpus.evaluation_sentences(16), calibration_batches=4, distilled_from="tiny-bert",
        **_docstring_texts(),
    )
    return out, report


def test_short_distillation_reduces_loss_and_saves(tiny_dir: Path, tiny_student: tuple[Path, object]) -> None:
    out, report = tiny_student
    assert report.loss_end < 0.8 * report.loss_start
    assert report.cosine_after["mean"] > report.cosine_before["mean"]
    assert 0.0 < report.lower < report.upper
    assert report.calibration.denominator_max * DISTILL_DEFAULTS["headroom"] <= report.upper
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["softmax"] == "power" and recipe["p"] == 4 and recipe["eps"] == DISTILL_DEFAULTS["eps"]
    assert recipe["upper"] == report.upper and recipe["iterations"] == report.iterations
    assert recipe["distilled_from"] == "tiny-bert" and recipe["steps"] == 30
    for key in ("cosine_before", "cosine_after", "cosine_after_secure_form"):
        assert set(recipe[key]) == {"mean", "min"}
    assert (out / "model.safetensors").is_file()
    student = load_power_softmax_model(out)
    assert student.config._attn_implementation == ATTN_IMPLEMENTATION
    assert student.config.power_softmax_p == 4 and student.config.power_softmax_upper == report.upper
    tok = BertTokenizer.from_pretrained(str(out))
    texts = corpus.evaluation_sentences(16)
    teacher = BertModel.from_pretrained(str(tiny_dir)).eval()
    b = [dict(tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))]
    cos = cosine_stats(sentence_embeddings(student, b), sentence_embeddings(teacher, b))
    assert cos["mean"] == pytest.approx(report.cosine_after["mean"], abs=1e-5)


# ---- corpus -----------------------------------------------------------------------------


def test_corpus_is_deterministic_disjoint_and_varied() -> None:
    ev = corpus.evaluation_sentences()
    tr = corpus.training_sentences(500, seed=3)
    assert len(ev) == 64 and len(set(ev)) == 64 and len(tr) == 500
    corpus.all_sentences.cache_clear()
    corpus._pools.cache_clear()
    corpus._evaluation_phrases.cache_clear()
    assert corpus.evaluation_sentences() == ev
    assert corpus.training_sentences(500, seed=3) == tr
    assert corpus.training_sentences(500, seed=4) != tr
    assert corpus.evaluation_sentences(10) == ev[:10]
    assert not set(ev) & set(corpus.training_sentences(3000, seed=0))
    assert not set(corpus.training_pool()) & set(corpus.evaluation_pool())
    assert list(corpus.all_sentences()) == sorted(set(corpus.all_sentences()))
    words = sorted(len(s.split()) for s in ev)
    assert words[0] <= 4 and words[-1] >= 60
    assert len(corpus.all_sentences()) > 1000


def test_distilled_recipe_keeps_eps_at_or_above_lower(tiny_student: tuple[Path, object]) -> None:
    """eps >= lower: no denominator (>= eps by construction) can fall below the bounded
    division's accuracy range, whatever the input; upper has headroom over what was seen."""
    out, report = tiny_student
    recipe = json.loads((out / RECIPE_FILE).read_text())
    _, lower, _ = bounded_reciprocal_start(recipe["upper"], recipe["iterations"])
    assert recipe["eps"] >= lower and recipe["lower"] == pytest.approx(lower)
    assert recipe["calibration"]["eps_guarantee"] and recipe["calibration"]["covered"]
    # the smallest iteration count that does it
    _, lower_less, _ = bounded_reciprocal_start(recipe["upper"], recipe["iterations"] - 1)
    assert lower_less > recipe["eps"] or recipe["iterations"] == 8
    held = recipe["held_out_denominators"]
    assert set(held) == {"docstrings", "everyday"}
    for h in held.values():
        assert h["rows"] > 0 and h["denominator_min"] >= recipe["eps"]
        assert h["max_over_upper"] == pytest.approx(h["denominator_max"] / recipe["upper"])


def test_choose_calibration_with_eps_picks_lower_below_eps() -> None:
    r = LayerRange(denominator_min=0.01, denominator_max=40.0, head_min=[0.01], head_max=[40.0])
    cal = choose_calibration({0: r}, headroom=5.0, max_iterations=20, eps=0.01)
    assert cal.upper == 200.0 and cal.eps_guarantee and cal.covered
    assert cal.lower <= 0.01 < bounded_reciprocal_start(200.0, cal.iterations - 1)[1]
    tight = choose_calibration({0: r}, headroom=5.0, max_iterations=12, eps=0.01)
    assert tight.iterations == 12 and not tight.eps_guarantee and not tight.covered


def test_padded_rows_are_recorded_with_rows_all(tiny_dir: Path) -> None:
    model = use_power_softmax(BertModel.from_pretrained(str(tiny_dir)), eps=0.01, normalize=True).eval()
    tok = BertTokenizer.from_pretrained(str(tiny_dir))
    batch = tokenize(tok, ["thanks!"], 32)
    assert batch["input_ids"].shape[-1] == 16 and int(batch["attention_mask"].sum()) < 16  # padded to its bucket
    counts = {}
    for rows in ("real", "all"):
        with torch.no_grad(), record_denominators(model, 4, 0.01, rows=rows) as ranges:
            model(**batch)
        counts[rows] = sum(r.rows for r in ranges.values())
    real = int(batch["attention_mask"].sum())
    assert counts["real"] == 2 * 2 * real and counts["all"] == 2 * 2 * 16  # layers x heads x rows


def test_evaluation_command_on_a_tiny_model(tiny_dir: Path, tiny_student: tuple[Path, object], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from secure.evaluate import distilled

    out, _ = tiny_student
    general = 8 if wordnet.available() else 0
    report = tmp_path / "eval.json"
    rc = distilled.main([str(out), "--reference", str(tiny_dir), "--general", str(general), "--docstrings", "4",
                         "--seq", "32", "--json", str(report), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "secure mean" in printed and "everyday" in printed
    data = json.loads(report.read_text())
    sets = {s["set"]: s for s in data["sets"]}
    assert set(sets) == {"docstrings", "everyday"} | ({"general"} if general else set())
    assert sets["everyday"]["texts"] == 50 and set(sets["everyday"]["buckets"]) <= {"16", "32"}
    for s in sets.values():
        assert s["non_finite"] == 0 and s["rows_above_upper"] == 0
        assert -1.0 <= s["secure_min"] <= s["secure_mean"] <= 1.0
        # the secure form on floats tracks the exact distilled model closely
        assert abs(s["secure_mean"] - s["exact_mean"]) < 0.02
        assert len(s["per_text"]["secure"]) == s["texts"]
    assert data["recipe"]["eps"] >= bounded_reciprocal_start(data["recipe"]["upper"], data["recipe"]["iterations"])[1]


def test_named_model_is_distilled_once_and_cached(tiny_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURE_INFERENCE_CACHE", str(tmp_path / "cache"))
    said: list[str] = []
    kwargs = dict(model_dir=tiny_dir, steps=2, batch_size=4, max_length=32, calibration_batches=2,
                  eval_texts=corpus.evaluation_sentences(4), **_docstring_texts())
    folder = cache.ensure_distilled("minilm-power", progress=False, say=said.append, **kwargs)
    assert folder == tmp_path / "cache" / "minilm-power" and cache.is_distilled(folder)
    assert len(said) == 2 and "not cached" in said[0] and "distilled in" in said[1]
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]
    assert cache.resolve_model("minilm-power", say=said.append, **kwargs) == folder and len(said) == 2  # cached
    assert cache.resolve_model(str(tiny_dir)) == tiny_dir
    # distilled with other settings (as after a change of the defaults): distilled again, never served
    assert cache.stale_settings(folder, {**kwargs, "steps": 3}) == ["steps=2 (now 3)"]
    assert cache.ensure_distilled("minilm-power", progress=False, say=said.append, **{**kwargs, "steps": 3}) == folder
    assert "other settings (steps=2 (now 3))" in said[2] and not cache.stale_settings(folder, {**kwargs, "steps": 3})
    with pytest.raises(ValueError):
        cache.ensure_distilled("no-such-model")


# ---- the general-English corpus (WordNet) -----------------------------------------------------


def test_wordnet_cleaning() -> None:
    assert wordnet.clean_text("the barn spider was made famous in `Charlotte's Web'") == (
        "The barn spider was made famous in 'Charlotte's Web'.")
    assert wordnet.clean_text("  a prissy creature...settles  into a mold ") == "A prissy creature settles into a mold."
    assert wordnet.clean_text("is it?") == "Is it?"
    assert wordnet.clean_text("x = <y>") is None and wordnet.clean_text(" ; ") is None
    defs, exs = wordnet.parse_gloss('extend one\'s body or limbs; "Let\'s stretch for a minute"; "stretch out"  ')
    assert defs == ["extend one's body or limbs"] and exs == ["Let's stretch for a minute", "stretch out"]


def _clear_wordnet_caches() -> None:
    for fn in (wordnet._load, wordnet._pools, wordnet._held_out_phrases):
        fn.cache_clear()


def test_missing_wordnet_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECURE_WORDNET_DIR", str(tmp_path))
    _clear_wordnet_caches()
    try:
        assert not wordnet.available()
        with pytest.raises(wordnet.WordNetMissing, match="wordnet-base"):
            wordnet.held_out_texts(4)
        with pytest.raises(wordnet.WordNetMissing, match="wordnet-base"):
            mixture.training_texts(4)
    finally:
        monkeypatch.delenv("SECURE_WORDNET_DIR")
        _clear_wordnet_caches()


@needs_wordnet
def test_general_english_split_is_fixed_and_disjoint() -> None:
    held = wordnet.held_out_texts()
    train = mixture.training_texts(3000, seed=0)
    calib = mixture.calibration_texts(500, seed=0)
    assert len(held) == 256 >= 200 and len(set(held)) == 256
    _clear_wordnet_caches()
    assert wordnet.held_out_texts() == held and wordnet.held_out_texts(20) == held[:20]
    assert mixture.training_texts(3000, seed=0) == train and mixture.training_texts(3000, seed=1) != train
    everyday = mixture.everyday_sentences()
    assert len(everyday) == 50 and everyday[0] == "Thanks!" and len(set(everyday)) == 50
    never = set(held) | set(everyday) | set(corpus.evaluation_sentences())
    assert not never & set(train) and not never & set(calib)
    exs, defs = wordnet.training_pool()
    h_exs, h_defs = wordnet.held_out_pool()
    assert not (set(exs) | set(defs)) & (set(h_exs) | set(h_defs))
    assert len(exs) > 40_000 and len(defs) > 100_000 and len(h_exs) > 2_000
    # the mixture: a third docstring items, the rest general English, shuffled together
    k = round(300 * mixture.DOCSTRING_SHARE)
    mixed = mixture.training_texts(300, seed=0)
    assert sorted(mixed) == sorted(wordnet.training_texts(300 - k, 0) + corpus.training_sentences(k, 0))
    assert mixed != wordnet.training_texts(300 - k, 0) + corpus.training_sentences(k, 0)
    words = sorted(len(t.split()) for t in held)
    assert words[0] <= 2 and words[-1] >= 60
