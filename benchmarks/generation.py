"""Secure generation on three parties in process: fidelity and per-token cost (issue 13).

    python benchmarks/generation.py [--model tiny-llama] [--recipe ours] [--prompts 20]
        [--new-tokens 16] [--texts 20] [--argmax-prompts 4] [--quick] [--json PATH]

``--model``: ``tiny-llama`` (the shipped LM, ``secure/lm/tiny_llama``), ``random-llama``
(``secure.models.tiny_llama()``, random weights, UTF-8 bytes as tokens: a stand-in while
developing) or a model folder. Three figures, all on the in-process engine (LocalCluster):

1. **greedy generation**: ``--new-tokens`` tokens from ``--prompts`` prompts (BOS and the
   first 3-8 tokens of held-out texts, left-padded to a prompt bucket of 16), the parties
   revealing the logits. Continuation equality: the fraction of prompts whose secure
   continuation equals the plaintext model's own greedy continuation
   (``plaintext_continuation``); top-1 agreement over every position (the secure logits'
   argmax against the plaintext model's argmax on the prefix the secure run saw: the
   prompt and its own tokens so far); the max and mean abs logit error there. The same on
   the secure forms in float64 (``generate_float``) separates the forms' error from the
   fixed-point one.
2. **perplexity** of ``--texts`` held-out texts (``[BOS] text [EOS]``, cut to the model's
   positions, right-padded to 16/32/64/128, padding masked out of the loss), from the
   all-position logits graph (``capture(CausalLM(lm))`` rewritten with the recipe) on
   shares (``run_mpc``) and on the forms in float64 (``run_float``), against the Hugging
   Face model in float64 (the baseline) and in float32. (``run_reference`` would run the
   unrewritten graph, but a GQA graph's ``aten.clone`` carries its memory format as a
   string there, which plain torch refuses.)
3. **per-token cost**: the prefill's time, bytes and rounds; the decode steps' means per
   cache capacity and over all steps; decode/prefill ratios; and, on ``--argmax-prompts``
   prompts, the extra cost per step of revealing only the token id (``reveal="argmax"``:
   an argmax tournament on shares) instead of the logits (each run right after the
   prompt's logits run, so that both see the same machine load).

Bytes are what one party sends (the largest of the three), rounds are communication
rounds, time is wall time of the three party threads on this machine (after a warm-up).
The held-out texts are those the LM's training code holds out
(``secure.lm.corpus.held_out_documents``). Writes JSON (default
``benchmarks/results/generation_<model>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secure.graph.buckets import BUCKETS, bucket_for
from secure.graph.capture import capture
from secure.graph.causal import CausalGraphs, capture_causal
from secure.graph.ir import Graph
from secure.graph.passes import RECIPES, rewrite
from secure.mpc import shares as sh
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_float, run_mpc
from secure.runtime.generate import Generation, StepCost, generate_float, generate_mpc, plaintext_continuation

PROMPT_BUCKET = 16
PROMPT_TOKENS = (3, 8)
"""A prompt is BOS and the first k tokens of a held-out text, k cycling over 3..8."""


# ---- the model and its texts ----------------------------------------------------------------

@dataclass
class LoadedLM:
    """A causal LM with its tokenisation: ``encode`` gives ``[BOS] tokens [EOS]`` per text."""

    name: str
    lm: torch.nn.Module
    encode: Callable[[Sequence[str]], list[list[int]]]
    decode: Callable[[Sequence[int]], str]
    pad_token_id: int
    note: str


def _byte_lm() -> LoadedLM:
    from secure.models import tiny_llama

    lm = tiny_llama()

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [[0, *t.encode("utf-8"), 0] for t in texts]

    def decode(ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    return LoadedLM("random-llama", lm, encode, decode, 0, "secure.models.tiny_llama(): random weights, byte tokens")


def load_lm(model: str) -> LoadedLM:
    """``tiny-llama`` (the shipped LM), ``random-llama`` or a model folder."""
    if model == "random-llama":
        return _byte_lm()
    from secure.lm import SHIPPED_LM_NAME, shipped_lm_path
    from secure.lm.tokenizer import encode_documents
    from secure.models import load_model_folder

    folder = shipped_lm_path() if model == SHIPPED_LM_NAME else Path(model)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} holds no model yet (config.json); train it with `python -m secure.lm.train "
                         f"--out {folder}` or run with --model random-llama")
    wrapper, tokenizer, causal = load_model_folder(folder)
    if not causal:
        raise SystemExit(f"{folder} is not a causal LM")

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return encode_documents(tokenizer, texts)

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    name = SHIPPED_LM_NAME if model == SHIPPED_LM_NAME else folder.name
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return LoadedLM(name, wrapper.lm.eval(), encode, decode, int(pad), f"model folder {folder}")


def held_out(n: int) -> list[str]:
    """The first ``n`` texts of the held-out set the LM's training code holds out."""
    from secure.lm.corpus import held_out_documents

    return held_out_documents(n)


def draw_prompts(model: LoadedLM, n: int) -> list[list[int]]:
    """``n`` distinct prompts: BOS and the first k tokens of successive held-out texts, k
    cycling over :data:`PROMPT_TOKENS` (a text too short for its k is skipped)."""
    low, high = PROMPT_TOKENS
    prompts: list[list[int]] = []
    texts = 4 * n + 8
    while len(prompts) < n:
        prompts = []
        for doc in model.encode(held_out(texts)):
            k = low + len(prompts) % (high - low + 1)
            prompt = doc[:1 + k]
            if len(doc) >= k + 2 and prompt not in prompts:  # k text tokens, then more of the text
                prompts.append(prompt)
            if len(prompts) == n:
                break
        texts *= 2
    return prompts


def capacities_for(bucket: int, new_tokens: int, step: int = 8) -> list[int]:
    """Cache capacities in steps of ``step`` above the bucket, up to what ``new_tokens``
    need (``bucket + new_tokens - 1`` filled slots at the last decode step)."""
    needed = max(bucket + new_tokens - 1, bucket + 1)
    return list(range(bucket + step, needed + step, step)) if needed > bucket + step else [bucket + step]


def code_version() -> dict[str, Any]:
    """The commit the figures ran on and the tracked files modified on top of it (others
    edit the tree concurrently: a recipe's forms can change between two runs)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).resolve().parent).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "modified": modified}


def compile_causal(lm: torch.nn.Module, recipe: str, buckets: Sequence[int], capacities: Sequence[int]
                   ) -> CausalGraphs:
    """The generation graphs, each rewritten with the recipe (as the dealer does)."""
    graphs = capture_causal(lm, buckets, capacities)
    graphs.prefill = {k: rewrite(g, RECIPES[recipe], weights=graphs.weights) for k, g in graphs.prefill.items()}
    graphs.decode = {k: rewrite(g, RECIPES[recipe], weights=graphs.weights) for k, g in graphs.decode.items()}
    return graphs


# ---- 1. greedy generation -------------------------------------------------------------------

def reference_logits(lm: torch.nn.Module, prompt: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """[len(tokens), V]: the plaintext logits after each prefix a run saw (the prompt, then
    its own tokens but the last)."""
    ids = torch.tensor([*prompt, *tokens[:-1]], dtype=torch.long).reshape(1, -1)
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].to(torch.float64)
    return logits[len(prompt) - 1:]


def judge(lm: torch.nn.Module, prompt: Sequence[int], run: Generation, plain: Sequence[int]) -> dict[str, Any]:
    """One prompt's figures: continuation equal?, top-1 agreement, logit errors, and where
    and by what plaintext margin the run first left the plaintext continuation."""
    reference = reference_logits(lm, prompt, run.tokens)
    seen = torch.stack([t.to(torch.float64) for t in run.logits])
    diff = (seen - reference).abs()
    top2 = reference.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = seen.argmax(-1) == reference.argmax(-1)
    diverges = next((i for i, (a, b) in enumerate(zip(run.tokens, plain)) if a != b), None)
    return {"prompt": list(prompt), "tokens": list(run.tokens), "plaintext_tokens": list(plain),
            "equal": list(run.tokens) == list(plain), "agreeing": int(agree.sum()), "positions": int(agree.numel()),
            "max_abs_error": float(diff.max()), "sum_abs_error": float(diff.sum()), "values": diff.numel(),
            "first_divergence": diverges,
            "margin_at_divergence": None if diverges is None else float(margin[diverges]),
            "error_at_divergence": None if diverges is None else float(diff[diverges].max()),
            "smallest_margin": float(margin.min())}


def summarise(judged: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Over prompts: continuation equality, top-1 agreement, max and mean abs logit error."""
    positions = sum(j["positions"] for j in judged)
    return {"prompts": len(judged), "continuations_equal": sum(j["equal"] for j in judged),
            "continuation_equality": sum(j["equal"] for j in judged) / len(judged),
            "top1_agreement": sum(j["agreeing"] for j in judged) / positions, "positions": positions,
            "max_abs_logit_error": max(j["max_abs_error"] for j in judged),
            "mean_abs_logit_error": sum(j["sum_abs_error"] for j in judged) / sum(j["values"] for j in judged)}


# ---- 2. perplexity --------------------------------------------------------------------------

def _nll(logits: torch.Tensor, ids: torch.Tensor, length: int) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens 1..length-1 (the padding is not scored)."""
    logp = torch.log_softmax(logits[0, :length - 1].to(torch.float64), dim=-1)
    return float(-logp.gather(1, ids[0, 1:length].unsqueeze(1)).sum()), length - 1


def perplexities(model: LoadedLM, recipe: str, cluster: LocalCluster, texts: int, progress: bool = True
                 ) -> dict[str, Any]:
    """Held-out perplexity from the all-position logits graph on shares and on the forms in
    float64, against the HF model in float64 (the baseline) and in float32."""
    from secure.models import CausalLM, max_positions

    wrapped = CausalLM(model.lm).eval()
    plain64 = copy.deepcopy(wrapped).double()
    longest = max_positions(model.lm) or max(BUCKETS)
    buckets = sorted(b for b in BUCKETS if b <= longest) or [longest]
    docs = [d[:longest] for d in model.encode(held_out(texts))]
    graphs: dict[int, Graph] = {}
    weights: dict[str, torch.Tensor] = {}
    shares: list[dict[str, sh.AShare]] | None = None
    sums = {k: [0.0, 0] for k in ("reference", "hf", "float", "mpc")}
    agree = {"float": 0, "mpc": 0}
    worst = {"float": 0.0, "mpc": 0.0}
    per_bucket: dict[int, int] = {}
    seconds = 0.0
    for i, doc in enumerate(docs):
        bucket = bucket_for(len(doc), buckets)
        per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
        ids = torch.full((1, bucket), model.pad_token_id, dtype=torch.long)
        ids[0, :len(doc)] = torch.tensor(doc)
        mask = torch.zeros(1, bucket, dtype=torch.long)
        mask[0, :len(doc)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if bucket not in graphs:
            graph, weights = capture(wrapped, batch)
            graphs[bucket] = rewrite(graph, RECIPES[recipe], weights=weights)
        if shares is None:
            shares = deal_weights(weights, cluster.fp)
        secure = graphs[bucket]
        with torch.no_grad():
            reference, hf = plain64(**batch), wrapped(**batch)
        (floats,), _ = run_float(secure, weights, batch)
        t0 = time.perf_counter()
        (opened,), _ = run_mpc(cluster, secure, shares, deal_inputs(secure, batch, cluster.fp))
        seconds += time.perf_counter() - t0
        n = len(doc)
        for key, logits in (("reference", reference), ("hf", hf), ("float", floats), ("mpc", opened)):
            nll, count = _nll(logits, ids, n)
            sums[key][0] += nll
            sums[key][1] += count
        for key, logits in (("float", floats), ("mpc", opened)):
            agree[key] += int((logits[0, :n].argmax(-1) == reference[0, :n].argmax(-1)).sum())
            worst[key] = max(worst[key], float((logits[0, :n] - reference[0, :n]).abs().max()))
        if progress:
            print(f"  perplexity: text {i + 1}/{len(docs)} ({n} tokens, bucket {bucket})", flush=True)
    ppl = {k: math.exp(total / count) for k, (total, count) in sums.items()}
    positions = sum(len(d) for d in docs)
    return {"texts": len(docs), "scored_tokens": sums["mpc"][1], "buckets": dict(sorted(per_bucket.items())),
            "perplexity": ppl,
            "relative_difference": {"mpc_vs_plaintext": ppl["mpc"] / ppl["reference"] - 1,
                                    "float_forms_vs_plaintext": ppl["float"] / ppl["reference"] - 1,
                                    "mpc_vs_float_forms": ppl["mpc"] / ppl["float"] - 1,
                                    "float32_vs_float64": ppl["hf"] / ppl["reference"] - 1},
            "top1_agreement": {k: v / positions for k, v in agree.items()},
            "max_abs_logit_error": worst, "mpc_seconds": seconds}


# ---- 3. cost ----------------------------------------------------------------------------------

def _mean(steps: Sequence[StepCost]) -> dict[str, Any]:
    return {"steps": len(steps), "seconds": sum(s.seconds for s in steps) / len(steps),
            "bytes_sent": sum(s.bytes_sent for s in steps) / len(steps),
            "rounds": sum(s.rounds for s in steps) / len(steps),
            "constant_traffic": len({(s.bytes_sent, s.rounds) for s in steps}) == 1}


def step_costs(runs: Sequence[Generation]) -> dict[str, Any]:
    """Prefill and decode figures over runs: means per capacity and over all decode steps,
    and the decode/prefill ratios of a token's time and bytes."""
    prefill = [s for r in runs for s in r.steps if s.kind == "prefill"]
    decode = [s for r in runs for s in r.steps if s.kind == "decode"]
    out: dict[str, Any] = {"prefill": _mean(prefill)}
    if decode:
        out["decode_by_capacity"] = {c: _mean([s for s in decode if s.capacity == c])
                                     for c in sorted({s.capacity for s in decode})}
        out["decode"] = _mean(decode)
        out["ratios"] = {k: out["decode"][k] / out["prefill"][k] for k in ("seconds", "bytes_sent", "rounds")}
    return out


def argmax_extra(logit_runs: Sequence[Generation], argmax_runs: Sequence[Generation], node_names: set[str]
                 ) -> dict[str, Any]:
    """What revealing only the greedy token id costs per step over revealing the logits
    (step by step on the same prompts; a step's traffic depends only on its capacity).
    The argmax runs are traced: their spans not named after a graph node are the argmax
    tournament's own protocol calls, timed inside the step (``argmax_in_step``)."""
    pairs = [(a, b) for la, ar in zip(logit_runs, argmax_runs) for a, b in zip(la.steps, ar.steps)]
    extra = {"rounds": [b.rounds - a.rounds for a, b in pairs], "bytes_sent": [b.bytes_sent - a.bytes_sent
                                                                              for a, b in pairs],
             "seconds": [b.seconds - a.seconds for a, b in pairs]}
    same = sum(la.tokens == ar.tokens[:len(la.tokens)] for la, ar in zip(logit_runs, argmax_runs))
    own = [[x for x in s.spans if x.name not in node_names] for r in argmax_runs for s in r.steps]
    return {"prompts": len(argmax_runs), "steps": len(pairs),
            "extra_per_step": {k: sum(v) / len(v) for k, v in extra.items()},
            "argmax_in_step": {"seconds": sum(x.duration_s for o in own for x in o) / len(own),
                               "bytes_sent_party0": sum(x.bytes_sent for o in own for x in o) / len(own),
                               "rounds": sum(x.rounds for o in own for x in o) / len(own)},
            "extra_rounds_constant": len(set(extra["rounds"])) == 1,
            "extra_bytes_constant": len(set(extra["bytes_sent"])) == 1,
            "argmax_costs": step_costs(argmax_runs),
            "tokens_equal_to_logits_mode": same}


# ---- the run ----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    started, load_before, code = time.perf_counter(), os.getloadavg(), code_version()
    model = load_lm(args.model)
    capacities = args.capacities or capacities_for(PROMPT_BUCKET, args.new_tokens)
    print(f"{model.name} ({model.note}); recipe {args.recipe}; prompt bucket {PROMPT_BUCKET}, capacities "
          f"{capacities}", flush=True)
    t0 = time.perf_counter()
    graphs = compile_causal(model.lm, args.recipe, [PROMPT_BUCKET], capacities)
    compile_seconds = time.perf_counter() - t0
    cluster = LocalCluster()
    shares = deal_weights(graphs.weights, cluster.fp)
    prompts = draw_prompts(model, args.prompts)
    generate_mpc(cluster, graphs, shares, torch.tensor(prompts[0]), min(2, args.new_tokens), PROMPT_BUCKET)  # warm-up

    secure_runs, secure_judged, float_judged, argmax_runs = [], [], [], []
    for i, prompt in enumerate(prompts):
        plain, _ = plaintext_continuation(model.lm, torch.tensor(prompt), args.new_tokens)
        out = generate_mpc(cluster, graphs, shares, torch.tensor(prompt), args.new_tokens, PROMPT_BUCKET)
        if i < args.argmax_prompts:  # right after the logits run, under the same machine load
            argmax_runs.append(generate_mpc(cluster, graphs, shares, torch.tensor(prompt), args.new_tokens,
                                            PROMPT_BUCKET, reveal="argmax", trace=True))
        secure_runs.append(out)
        secure_judged.append(judge(model.lm, prompt, out, plain))
        floats = generate_float(graphs, torch.tensor(prompt), args.new_tokens, PROMPT_BUCKET)
        float_judged.append(judge(model.lm, prompt, floats, plain))
        j = secure_judged[-1]
        print(f"  prompt {i + 1}/{len(prompts)} {model.decode(prompt)!r} -> {model.decode(out.tokens)!r}: "
              f"{'equal' if j['equal'] else 'differs at step ' + str(j['first_divergence'])}, top-1 "
              f"{j['agreeing']}/{j['positions']}, max error {j['max_abs_error']:.3f}, "
              f"{sum(s.seconds for s in out.steps):.1f} s{' (and reveal argmax)' if i < args.argmax_prompts else ''}",
              flush=True)
    costs = step_costs(secure_runs)
    vocab = graphs.vocab_size
    costs["opened_values_per_step"] = {"logits": vocab, "argmax": 1}
    if argmax_runs:
        nodes = {n.origin or n.op for g in (*graphs.prefill.values(), *graphs.decode.values()) for n in g.nodes}
        costs["argmax_reveal"] = argmax_extra(secure_runs, argmax_runs, nodes)
    ppl = perplexities(model, args.recipe, cluster, args.texts) if args.texts else None
    return {
        "model": model.name, "model_note": model.note, "recipe": args.recipe,
        "recipe_forms": RECIPES[args.recipe].to_dict(), "code": code, "prompt_bucket": PROMPT_BUCKET,
        "capacities": capacities, "new_tokens": args.new_tokens, "vocab_size": vocab,
        "generation": {"mpc": summarise(secure_judged), "float_forms": summarise(float_judged),
                       "prompts": [{**j, "text": model.decode(j["prompt"]), "continuation": model.decode(j["tokens"]),
                                    "plaintext_continuation": model.decode(j["plaintext_tokens"])}
                                   for j in secure_judged]},
        "perplexity": ppl, "cost": costs, "compile_seconds": compile_seconds,
        "wall_seconds": time.perf_counter() - started,
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "host": platform.node(),
                    "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()}},
        "command": " ".join(["python benchmarks/generation.py", *sys.argv[1:]]),
    }


def table(result: dict[str, Any]) -> str:
    """The console summary of a result."""
    g, c = result["generation"], result["cost"]
    lines = [f"{result['model']} ({result['model_note']}), recipe {result['recipe']}, "
             f"{g['mpc']['prompts']} prompts x {result['new_tokens']} tokens, prompt bucket "
             f"{result['prompt_bucket']}, capacities {result['capacities']}",
             f"{'generation':<28}{'equal':>10}{'top-1':>10}{'max err':>10}{'mean err':>10}"]
    for key, label in (("mpc", "three parties"), ("float_forms", "secure forms, float64")):
        s = g[key]
        lines.append(f"{label:<28}{s['continuations_equal']:>5}/{s['prompts']:<4}{s['top1_agreement']:10.2%}"
                     f"{s['max_abs_logit_error']:10.4f}{s['mean_abs_logit_error']:10.5f}")
    p = result["perplexity"]
    if p:
        r = p["relative_difference"]
        lines += [f"perplexity of {p['texts']} held-out texts ({p['scored_tokens']} tokens, buckets {p['buckets']}):",
                  f"  plaintext, float64         {p['perplexity']['reference']:.4f}   (float32 "
                  f"{p['perplexity']['hf']:.4f})",
                  f"  secure forms, float64      {p['perplexity']['float']:.4f}   "
                  f"({r['float_forms_vs_plaintext']:+.3%})",
                  f"  three parties (shares)     {p['perplexity']['mpc']:.4f}   ({r['mpc_vs_plaintext']:+.3%}; "
                  f"vs the float forms {r['mpc_vs_float_forms']:+.3%}); top-1 {p['top1_agreement']['mpc']:.2%}"]
    lines.append(f"{'cost (party, largest)':<28}{'steps':>7}{'seconds':>10}{'MB sent':>10}{'rounds':>9}")

    def row(label: str, m: dict[str, Any]) -> str:
        return f"{label:<28}{m['steps']:7d}{m['seconds']:10.3f}{m['bytes_sent'] / 1e6:10.3f}{m['rounds']:9.1f}"

    lines.append(row(f"prefill (bucket {result['prompt_bucket']})", c["prefill"]))
    for capacity, m in c.get("decode_by_capacity", {}).items():
        lines.append(row(f"decode, capacity {capacity}", m))
    if "decode" in c:
        lines.append(row("decode, all steps", c["decode"]))
        r = c["ratios"]
        lines.append(f"decode/prefill: time {r['seconds']:.3f}, bytes {r['bytes_sent']:.4f}, rounds {r['rounds']:.3f}")
    if "argmax_reveal" in c:
        a = c["argmax_reveal"]
        e = a["extra_per_step"]
        lines.append(f"reveal argmax ({a['prompts']} prompts, {a['steps']} steps): +{e['rounds']:.1f} rounds, "
                     f"+{e['bytes_sent'] / 1e3:.1f} kB per step; the tournament takes "
                     f"{a['argmax_in_step']['seconds'] * 1e3:.0f} ms of the step (wall difference "
                     f"{e['seconds'] * 1e3:+.0f} ms); opens 1 value instead of "
                     f"{c['opened_values_per_step']['logits']}; "
                     f"tokens equal to logits mode {a['tokens_equal_to_logits_mode']}/{a['prompts']}")
    m = result["machine"]
    lines.append(f"wall {result['wall_seconds']:.0f} s (compile {result['compile_seconds']:.0f} s), {m['cpus']} CPUs, "
                 f"{m['threads']} torch threads, load average {m['load_average_1_5_15_min']['start'][0]:.1f} at the "
                 f"start, {m['load_average_1_5_15_min']['end'][0]:.1f} at the end")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", help="tiny-llama (shipped), random-llama, or a model folder")
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--texts", type=int, default=20, help="held-out texts for perplexity (0: skip)")
    ap.add_argument("--argmax-prompts", type=int, default=4, help="prompts also run with reveal=argmax (0: skip)")
    ap.add_argument("--capacities", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="cache capacities, comma-separated (default: steps of 8 up to what the tokens need)")
    ap.add_argument("--quick", action="store_true", help="3 prompts x 4 tokens, 3 texts, 1 argmax prompt (~1 min)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the three parties share them)")
    ap.add_argument("--json", type=Path, default=None, help="default benchmarks/results/generation_<model>.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.texts, args.argmax_prompts = 3, 4, 3, 1
    if args.prompts < 1 or args.new_tokens < 1:
        ap.error("--prompts and --new-tokens must be at least 1")
    torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    path = args.json or Path(f"benchmarks/results/generation_{result['model']}{'_quick' if args.quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
