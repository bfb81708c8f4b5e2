"""LLaMA-7B scale: one LLaMA-7B-shaped decoder layer on three parties, projected to the
whole model and set beside PUMA's published figure.

    python benchmarks/llama7b.py            # full shape: 5-13 minutes on 2 cores (load), 12 GB peak
    python benchmarks/llama7b.py --quick    # hidden 1024: a smoke test in about a minute
    python benchmarks/llama7b.py --seq 64   # another prompt length

What runs (all on the in-process engine, ``LocalCluster``: three parties as threads of one
process on this machine, no network):

* **the layer**: a ``transformers.LlamaForCausalLM`` with LLaMA-7B's layer shape (hidden
  4096, 32 heads, 32 key/value heads, FFN 11008, RMSNorm, SiLU, RoPE) and ONE layer, random
  weights (std 0.02; the embedding std 1, so the layer's input has the scale of a middle
  layer's hidden states) and a 256-token vocabulary, so the embedding and the head are a
  small part of its figures. Captured with ``capture_causal`` (prompt bucket ``seq``,
  cache capacity ``seq``), rewritten with ``OURS`` (PUMA's SiLU and softmax structure),
  dealt, and run with ``generate_mpc``: the prefill of a ``seq``-token prompt, then one
  decode step. The next token is forced to the plaintext model's greedy choice, so both
  steps' logits are checked against the plaintext model.
* **the layer alone**: party 0's span per graph node (``trace=True``) splits each step into
  the decoder layer (nodes of ``model.layers.0``) and the rest (embedding, final RMSNorm,
  head, glue).
* **LLaMA-7B's vocabulary ends** (32000 x 4096), measured as the interpreter runs them:
  the head as ``[1, 4096] @ W^T`` on shares (one position: the prefill keeps only the last
  one, ``logits_to_keep=1``) and the embedding as the client's one-hot shares ``[n, 32000]
  @ [32000, 4096]`` (n = 1 for a decode step, ``seq`` for the prefill). One dealt table
  serves both (the real model has two; the cost is the same).

The projection (a model, not a measurement): the cost is linear in the layers and the
rest is paid once per step, so for LLaMA-7B (32 layers)

    step(7B) = step(1 layer, vocab 256) + 31 * layer + (head_32000 - head_256)
               + (embedding_32000 - embedding_256)

for time, rounds and bytes alike, on this machine (2 cores shared by all three parties).
Rounds and times come from the step; the layer's and the small ends' bytes are party 0's
(our protocols rotate roles, so the parties differ by a few percent). Links: the project's
model of ``benchmarks/network.py``, t(link) = t(in-process) + rounds * latency + busiest
party's bytes * 8 / rate, for LAN (1 ms, 5 Gbps) and WAN (40 ms, 100 Mbps).

PUMA's figure is the one ``shared/DESIGN.md`` records from its abstract: LLaMA-7B "around
5 minutes to generate 1 token" on three 32-vCPU hosts (5 Gbps LAN). SPU's simulator is run
only where its venv exists (``benchmarks/peers/setup_peers.sh``); ``spu_runner.py`` is
BERT-only, so the script reports why it did not run. Results: a table on stdout and
``benchmarks/results/llama7b.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from secure.graph.causal import capture_causal
from secure.graph.passes import OURS, rewrite
from secure.mpc import shares as sh
from secure.mpc.backend import MpcOps
from secure.mpc.embedding import client_onehot_shares
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_weights
from secure.runtime.generate import StepCost, generate_mpc

HERE = Path(__file__).resolve().parent
LAYERS_7B = 32
SMALL_VOCAB = 256
PUMA = {"seconds_per_token": 300.0, "hosts": "3 x 32 vCPU", "vcpus": 96, "link": "LAN, 5 Gbps",
        "source": "shared/DESIGN.md sec. 7 (PUMA's abstract: LLaMA-7B 'around 5 minutes to generate 1 token')"}
SPU_VENV = Path(os.environ.get("SECURE_PEERS_DIR", Path.home() / ".cache" / "secure-inference-peers")) / "spu"


def _network_module() -> Any:
    """benchmarks/network.py (the link model), loaded by path: benchmarks is no package."""
    spec = importlib.util.spec_from_file_location("bench_network", HERE / "network.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Shape:
    """A LLaMA decoder layer's shape and the vocabulary of the head it is projected with."""

    name: str
    hidden: int
    heads: int
    ffn: int
    vocab: int


FULL = Shape("llama-7b", 4096, 32, 11008, 32000)
QUICK = Shape("quick (hidden 1024)", 1024, 8, 2752, 8000)


# ---- memory ---------------------------------------------------------------------------------

def rss_gb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gb() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} rss {rss_gb():5.1f} GB] {msg}", flush=True)


# ---- the layer ------------------------------------------------------------------------------

def build_lm(shape: Shape, seq: int) -> torch.nn.Module:
    """LLaMA with ``shape``'s layer, one layer, a 256-token vocabulary, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # benchmark weights only
    config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=1, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                         max_position_embeddings=seq + 8, hidden_act="silu", initializer_range=0.02,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=0,
                         attn_implementation="sdpa")
    lm = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        lm.model.embed_tokens.weight.normal_(0.0, 1.0)
    return lm


def plaintext_logits(lm: torch.nn.Module, prompt: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """The plaintext model's greedy next token and its last-position logits after the prompt
    and after the prompt plus that token."""
    with torch.no_grad():
        first = lm(input_ids=prompt.reshape(1, -1)).logits[0, -1].double()
        token = int(first.argmax())
        ids = torch.cat([prompt, torch.tensor([token])]).reshape(1, -1)
        second = lm(input_ids=ids).logits[0, -1].double()
    return token, [first, second]


def _group(span_name: str) -> str:
    if ".layers." in span_name:
        return "layer"
    for key, group in (("embed_tokens", "embedding"), ("lm_head", "head"), ("model.norm", "final_norm")):
        if span_name.endswith(key):
            return group
    return "other"


def split_step(step: StepCost, cpu_seconds: float) -> dict[str, Any]:
    """A step's cost (rounds and time of the step; bytes of the busiest party; CPU seconds of
    the whole process) and party 0's node spans added up by group: the decoder layer, the
    embedding, the head, the rest. A group's CPU seconds are the step's in proportion to
    its wall time (the spans time wall clock only)."""
    groups: dict[str, dict[str, float]] = {}
    for s in step.spans:
        g = groups.setdefault(_group(s.name), {"seconds": 0.0, "rounds": 0, "bytes_sent": 0})
        g["seconds"] += s.duration_s
        g["rounds"] += s.rounds
        g["bytes_sent"] += s.bytes_sent
    for g in groups.values():
        g["cpu_seconds"] = cpu_seconds * g["seconds"] / step.seconds
    return {"seconds": step.seconds, "cpu_seconds": cpu_seconds, "rounds": step.rounds, "bytes_sent": step.bytes_sent,
            "capacity": step.capacity, "groups": groups}


def measure_layer(shape: Shape, seq: int, cluster: LocalCluster) -> dict[str, Any]:
    """Capture, deal and run the one-layer model: the prefill of ``seq`` tokens and one
    decode step, each split into the layer and the rest; logits against plaintext."""
    t0 = time.perf_counter()
    lm = build_lm(shape, seq)
    params = sum(p.numel() for p in lm.model.layers[0].parameters())
    prompt = torch.randint(1, SMALL_VOCAB, (seq,), generator=torch.Generator().manual_seed(1))
    token, reference = plaintext_logits(lm, prompt)
    log(f"built the one-layer model ({params / 1e6:.0f} M layer parameters) in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    graphs = capture_causal(lm, [seq], [seq])
    del lm
    gc.collect()
    graphs.prefill = {k: rewrite(g, OURS) for k, g in graphs.prefill.items()}
    graphs.decode = {k: rewrite(g, OURS) for k, g in graphs.decode.items()}
    capture_s = time.perf_counter() - t0
    log(f"captured and rewrote prefill + decode in {capture_s:.0f} s")
    t0 = time.perf_counter()
    weight_shares = deal_weights(graphs.weights, cluster.fp)
    graphs.weights = {}  # the owner's plain copy: the parties need only the shares
    gc.collect()
    deal_s = time.perf_counter() - t0
    log(f"dealt the weights in {deal_s:.0f} s")
    forced = [token]  # the first token is the plaintext model's, then greedy on the opened logits
    cpu = [time.process_time()]  # CPU seconds of all threads: at the start and after each step

    def choose(logits: torch.Tensor) -> int:
        cpu.append(time.process_time())
        return forced.pop() if forced else int(logits.argmax())

    out = generate_mpc(cluster, graphs, weight_shares, prompt, 2, bucket=seq, choose=choose, trace=True)
    del weight_shares
    gc.collect()
    errors = [float((a - b).abs().max()) for a, b in zip(out.logits, reference)]
    prefill, decode = (split_step(s, cpu[i + 1] - cpu[i]) for i, s in enumerate(out.steps))
    log(f"prefill {prefill['seconds']:.1f} s ({prefill['cpu_seconds']:.0f} CPU s), decode {decode['seconds']:.1f} s "
        f"({decode['cpu_seconds']:.0f} CPU s); "
        f"logit error vs plaintext {errors[0]:.3g} / {errors[1]:.3g}")
    return {"layer_parameters": params, "capture_seconds": capture_s, "deal_seconds": deal_s,
            "prefill": prefill, "decode": decode, "max_abs_logit_error": {"prefill": errors[0], "decode": errors[1]},
            "logit_scale": float(reference[0].abs().max()),
            "top1_agrees": [int(a.argmax()) == int(b.argmax()) for a, b in zip(out.logits, reference)]}


# ---- the vocabulary ends --------------------------------------------------------------------

def _timed(cluster: LocalCluster, program: Any, args: list[tuple]) -> tuple[list[Any], dict[str, Any]]:
    bytes0, rounds0 = cluster.bytes_sent(), cluster.rounds
    t0, cpu0 = time.perf_counter(), time.process_time()
    results = cluster.run(program, args)
    sent = [b - a for a, b in zip(bytes0, cluster.bytes_sent())]
    return results, {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
                     "rounds": cluster.rounds - rounds0,
                     "bytes_sent": max(sent), "bytes_sent_per_party": sent}


def _opened(cluster: LocalCluster, results: list[sh.AShare]) -> torch.Tensor:
    return cluster.fp.decode(sh.reconstruct(results), results[0].frac_bits)


def measure_vocab_ends(shape: Shape, seq: int, cluster: LocalCluster) -> dict[str, Any]:
    """The head ([1, H] @ W^T, W [V, H]) and the embedding (one-hot [n, V] @ W) on shares
    of a random [V, H] table, as the interpreter's linear and embedding nodes run them."""
    torch.manual_seed(2)  # benchmark weights only
    table = torch.randn(shape.vocab, shape.hidden) * 0.02
    x = torch.randn(1, shape.hidden)
    t0 = time.perf_counter()
    table_shares = [w["table"] for w in deal_weights({"table": table}, cluster.fp)]
    x_shares = sh.deal_shares(cluster.fp.encode(x.double()), cluster.fp.frac_bits)
    log(f"dealt the {shape.vocab} x {shape.hidden} table in {time.perf_counter() - t0:.0f} s")

    def head(party: Any, x: sh.AShare, w: sh.AShare) -> sh.AShare:
        ops = MpcOps(party)
        return ops.matmul(x, ops.map_shape(w, lambda t: t.transpose(-1, -2)))

    results, cost = _timed(cluster, head, [(x_shares[i], table_shares[i]) for i in range(3)])
    cost["max_abs_error"] = float((_opened(cluster, results) - x.double() @ table.double().T).abs().max())
    out = {"head": cost}
    log(f"head: {cost['seconds']:.1f} s ({cost['cpu_seconds']:.0f} CPU s), {cost['rounds']} rounds, "
        f"{cost['bytes_sent'] / 1e6:.2f} MB")

    def embed(party: Any, onehot: Any, w: sh.AShare) -> sh.AShare:
        return MpcOps(party).matmul(onehot.expand(party.id), w)

    for rows, key in ((1, "embedding_decode"), (seq, "embedding_prefill")):
        ids = torch.randint(0, shape.vocab, (rows,), generator=torch.Generator().manual_seed(rows))
        onehots = client_onehot_shares(ids, shape.vocab)
        results, cost = _timed(cluster, embed, [(onehots[i], table_shares[i]) for i in range(3)])
        cost["rows"] = rows
        cost["client_upload_bytes"] = [o.wire_bytes for o in onehots]
        cost["max_abs_error"] = float((_opened(cluster, results) - table.double()[ids]).abs().max())
        out[key] = cost
        log(f"embedding of {rows} row(s): {cost['seconds']:.1f} s ({cost['cpu_seconds']:.0f} CPU s), "
            f"{cost['rounds']} rounds, "
            f"{cost['bytes_sent'] / 1e6:.2f} MB")
    return out


# ---- projection -----------------------------------------------------------------------------

COST_KEYS = ("seconds", "cpu_seconds", "rounds", "bytes_sent")


def project(step: dict[str, Any], head: dict[str, Any], embedding: dict[str, Any], layers: int) -> dict[str, Any]:
    """step(1 layer, small vocabulary) + (layers - 1) * layer + the large ends in place of
    the small ones (see the module docstring)."""
    g = step["groups"]
    zero = dict.fromkeys(COST_KEYS, 0)
    layer, small_head, small_embed = g.get("layer", zero), g.get("head", zero), g.get("embedding", zero)
    return {k: step[k] + (layers - 1) * layer[k] + (head[k] - small_head[k]) + (embedding[k] - small_embed[k])
            for k in COST_KEYS}


def on_links(cost: dict[str, Any], network: Any) -> dict[str, float]:
    loopback = {"seconds": cost["seconds"], "rounds": cost["rounds"], "bytes_sent": [cost["bytes_sent"]]}
    return {name: network.modelled(loopback, **link) for name, link in network.LINKS.items()}


def spu_status(shape: Shape) -> dict[str, Any]:
    """Whether SPU's simulator could run this layer here, and why not."""
    shares_gb = 3 * 2 * 8 * (4 * shape.hidden**2 + 3 * shape.hidden * shape.ffn) / 1e9
    if not (SPU_VENV / "bin" / "python").exists():
        why = (f"no SPU venv at {SPU_VENV} (benchmarks/peers/setup_peers.sh spu creates it; not created here); "
               f"its simulator would also hold 3 parties x 2 share components of the layer's weights, "
               f"{shares_gb:.1f} GB in FM64, before any copy of its own")
        return {"ran": False, "why": why}
    return {"ran": False, "why": "benchmarks/peers/spu_runner.py runs a BERT layer only; no LLaMA layer runner "
                                 f"(RMSNorm, RoPE, SiLU) exists yet; its weight shares alone: {shares_gb:.1f} GB"}


# ---- report ---------------------------------------------------------------------------------

def _row(label: str, cost: dict[str, Any], links: dict[str, float] | None = None) -> str:
    text = (f"  {label:<44} {cost['seconds']:9.1f} s {cost['cpu_seconds']:9.1f} CPU s {cost['rounds']:6d} rounds "
            f"{cost['bytes_sent'] / 1e6:10.1f} MB")
    if links:
        text += f"   LAN {links['LAN']:8.1f} s   WAN {links['WAN']:8.1f} s"
    return text


def report(result: dict[str, Any]) -> None:
    lay, ends, proj, shape = result["layer"], result["vocab_ends"], result["projection"], result["shape"]
    seq = result["seq"]
    print(f"\n{shape['name']}: hidden {shape['hidden']}, {shape['heads']} heads, FFN {shape['ffn']}, prompt {seq} "
          f"tokens; three parties in one process on {result['machine']['cpus']} cores (no network)")
    print("measured (bytes: the busiest party's; layer rows: party 0's node spans)")
    for kind in ("prefill", "decode"):
        step = lay[kind]
        label = f"{kind} step, 1 layer + vocab-{SMALL_VOCAB} ends"
        print(_row(label, step))
        print(_row(f"  of which the decoder layer ({kind})", step["groups"]["layer"]))
    print(_row(f"head [1,{shape['hidden']}] @ [{shape['hidden']},{shape['vocab']}]", ends["head"]))
    for key in ("embedding_decode", "embedding_prefill"):
        e = ends[key]
        print(_row(f"embedding one-hot [{e['rows']},{shape['vocab']}] @ table", e))
    print(f"\nprojected to {LAYERS_7B} layers + head + embedding (linear in layers; LAN/WAN modelled: "
          "in-process time + rounds x latency + bytes / rate)")
    print(_row("per generated token (one decode step)", proj["decode"], proj["decode_links"]))
    print(_row(f"prefill of {seq} tokens (first token)", proj["prefill"], proj["prefill_links"]))
    puma = result["puma"]
    if not result["comparable_to_puma"]:
        print("\n(quick shape, not LLaMA-7B's: the lines below only exercise the code)")
    print(f"\nPUMA (published): about {puma['seconds_per_token']:.0f} s per token, {puma['hosts']}, {puma['link']}"
          f"\n  source: {puma['source']}")
    for key, label in (("decode", "per token (decode, KV cache)"), ("prefill", f"prefill of {seq} tokens")):
        r = result["ratio_to_puma"][key]
        print(f"  ours / PUMA, {label}: in-process {r['in_process']:.2f}, LAN {r['LAN']:.2f}, WAN {r['WAN']:.2f}; "
              f"our CPU s / PUMA's vCPU s (300 s x {puma['vcpus']}) {r['cpu_seconds_vs_puma_vcpu_seconds']:.3f}")
    print("  (ours: all three parties share this machine's cores; PUMA: one 32-vCPU host per party, so its\n"
          "  vCPU seconds are an upper bound on its work. PUMA's prompt length is not recorded in DESIGN.md.)")
    print(f"SPU simulator: {'ran' if result['spu']['ran'] else 'not run'}: {result['spu']['why']}")
    err = lay["max_abs_logit_error"]
    print(f"\nlogits vs plaintext (max abs): prefill {err['prefill']:.3g}, decode {err['decode']:.3g} "
          f"(largest logit {lay['logit_scale']:.2f}); head error {ends['head']['max_abs_error']:.2g}, "
          f"embedding error {ends['embedding_prefill']['max_abs_error']:.2g}")
    load = result["machine"]["loadavg_start_end"]
    print(f"peak memory {result['peak_rss_gb']:.1f} GB (this process), wall {result['wall_seconds']:.0f} s; "
          f"load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end (wall times grow with it, "
          "CPU seconds much less)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"hidden {QUICK.hidden}, vocabulary {QUICK.vocab}, seq 32")
    ap.add_argument("--seq", type=int, default=None, help="prompt length (default 128; 32 with --quick)")
    ap.add_argument("--json", type=Path, default=None,
                    help="default benchmarks/results/llama7b.json (llama7b_quick.json with --quick)")
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else FULL
    seq = args.seq or (32 if args.quick else 128)
    out_path = args.json or HERE / "results" / ("llama7b_quick.json" if args.quick else "llama7b.json")
    start = time.perf_counter()
    load0 = os.getloadavg()
    network = _network_module()
    cluster = LocalCluster(deadline_s=900.0)  # a party's big local matmul can outlast the 60 s default
    log(f"{shape.name}, prompt {seq} tokens")
    layer = measure_layer(shape, seq, cluster)
    ends = measure_vocab_ends(shape, seq, cluster)
    projection: dict[str, Any] = {
        "decode": project(layer["decode"], ends["head"], ends["embedding_decode"], LAYERS_7B),
        "prefill": project(layer["prefill"], ends["head"], ends["embedding_prefill"], LAYERS_7B),
    }
    for kind in ("decode", "prefill"):
        projection[f"{kind}_links"] = on_links(projection[kind], network)
    puma_s = PUMA["seconds_per_token"]
    ratio = {kind: {"in_process": projection[kind]["seconds"] / puma_s,
                    **{k: v / puma_s for k, v in projection[f"{kind}_links"].items()},
                    "cpu_seconds_vs_puma_vcpu_seconds": projection[kind]["cpu_seconds"] / (puma_s * PUMA["vcpus"])}
             for kind in ("decode", "prefill")}
    result = {
        "shape": asdict(shape), "comparable_to_puma": shape == FULL, "seq": seq, "layers_projected": LAYERS_7B,
        "recipe": "ours",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_start_end": [list(load0), list(os.getloadavg())]},
        "layer": layer, "vocab_ends": ends, "projection": projection,
        "links": network.LINKS, "puma": PUMA, "ratio_to_puma": ratio, "spu": spu_status(shape),
        "model": "step(7B) = step(1 layer, vocab 256) + 31 x layer + (head_32000 - head_256) + "
                 "(embedding_32000 - embedding_256); linear in layers, same machine, in-process, no network; "
                 "links modelled as in benchmarks/network.py",
        "peak_rss_gb": peak_rss_gb(), "wall_seconds": time.perf_counter() - start,
    }
    report(result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
