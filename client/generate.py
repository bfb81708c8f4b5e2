"""Secure text generation from the client's side: one ``Party.Generate`` stream per party
per session.

    with SecureClient(cfg, tokens) as client:
        for event in stream_generation(client, "tiny-llama", "a small", max_new_tokens=16):
            print(event.text, end="", flush=True)

The client tokenizes the prompt, left-pads it to the smallest dealt prompt bucket and
shares it (the token ids as PRG-compressed one-hot shares; the mask and positions are
public). After every step it opens what the parties reveal to it alone -- the last
position's logits (``reveal="logits"``: it samples with its :class:`client.sampling.Sampler`)
or only the greedy token id (``reveal="argmax"``: the parties pick it on shares) -- and
shares the chosen token's one-hot for the next step. It stops at the token budget or at
the model's end-of-text token, and then half-closes the three streams (the parties free
the session). A failure on any party cancels the others' streams and raises
:class:`GenerationFailed` with the first party's status.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from client.sampling import Sampler
from client.sdk import QueryFailed, SecureClient, pb2
from secure.graph.buckets import bucket_for
from secure.graph.causal import INPUT_IDS, GenerationLimitError, check_budget, prefill_inputs
from secure.mpc.shares import reconstruct
from secure.runtime.inputs import InputSpec, client_parts
from secure.transport.wire import TensorAssembler, tensor_chunks


class GenerationFailed(QueryFailed):
    """A generation session failed on a party (its status) or was refused before it started."""


@dataclass
class TokenEvent:
    """One generated token: its index (0-based), id and text, the step's wall time at the
    client, and the parties' figures for the step (seconds, bytes per party, rounds)."""

    index: int
    token_id: int
    text: str
    kind: str
    capacity: int
    seconds: float
    party_seconds: float
    bytes_sent: list[int]
    rounds: int
    logits: torch.Tensor | None = None  # reveal="logits" only


@dataclass
class GenerationResult:
    """A whole generation: the prompt's and the new tokens, their text, and every step."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    events: list[TokenEvent] = field(default_factory=list)
    seconds: float = 0.0


def model_entry(client: SecureClient, model: str) -> Any:
    """The catalogue entry of ``model`` (a causal LM) on party 0, after the parties were verified."""
    info = client.describe()
    names = [e.model for e in info.catalogue]
    for entry in info.catalogue:
        if entry.model == model:
            if entry.kind != "causal":
                what = "a classifier" if entry.kind == "classifier" else f"an {entry.kind}"
                raise GenerationFailed(f"model {model!r} is {what}, not a causal LM")
            return entry
    raise GenerationFailed(f"the cluster serves no model {model!r}; its catalogue: {names}",
                           grpc.StatusCode.NOT_FOUND)


class _PartyStream:
    """One party's Generate call: requests go in through a queue, events come out."""

    def __init__(self, client: SecureClient, party: int, timeout_s: float) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = client.stubs[party].Generate(self._feed(), metadata=client.metadata(party), timeout=timeout_s)
        self.events = iter(self.call)

    def _feed(self) -> Iterator[Any]:
        while (message := self._requests.get()) is not None:
            yield message

    def send(self, messages: list[Any]) -> None:
        for message in messages:
            self._requests.put(message)

    def half_close(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        """Cancel the call and end the request feed (gRPC's thread reading it would otherwise
        wait on the queue for ever)."""
        self.call.cancel()
        self._requests.put(None)

    def read_step(self) -> tuple[tuple[torch.Tensor, torch.Tensor], int, Any]:
        """This party's shares of the step's output, their scale, and its StepResult."""
        assemblers = {0: TensorAssembler(1 << 30), 1: TensorAssembler(1 << 30)}
        parts: dict[int, torch.Tensor] = {}
        frac_bits = 0
        for event in self.events:
            if event.HasField("output"):
                tensor = assemblers[event.output.part].add(event.output.chunk)
                frac_bits = event.output.frac_bits
                if tensor is not None:
                    parts[event.output.part] = tensor
            elif event.HasField("step"):
                if set(parts) != {0, 1}:
                    raise GenerationFailed("a party ended a step without its output shares")
                return (parts[0], parts[1]), frac_bits, event.step
        raise GenerationFailed("a party closed the session stream in the middle of a step")

    def read_done(self) -> Any:
        for event in self.events:
            if event.HasField("done"):
                return event.done
        raise GenerationFailed("a party closed the session stream without its summary")


def _parts(client: SecureClient, specs: list[InputSpec], inputs: dict[str, torch.Tensor], session_id: str,
           step: int) -> list[list[Any]]:
    per_party = client_parts(specs, inputs, client.fp)
    end = pb2.GenerateRequest(end=pb2.StepEnd(session_id=session_id, step=step))
    return [[*(pb2.GenerateRequest(input=pb2.InputChunk(name=p.name, kind=p.kind, part=p.part, chunk=chunk))
               for p in parts for chunk in tensor_chunks(p.tensor, pb2.TensorChunk)), end]
            for parts in per_party]


def _in_parallel(streams: list[_PartyStream], fn: Callable[[_PartyStream], Any]) -> list[Any]:
    """``fn`` on the three streams at once; the first party's failure cancels the others'
    calls and raises :class:`GenerationFailed` with every party's status."""
    results: list[Any] = [None, None, None]
    failures: list[tuple[int, BaseException]] = []

    def run(i: int) -> None:
        try:
            results[i] = fn(streams[i])
        except (grpc.RpcError, GenerationFailed) as e:
            failures.append((i, e))
            for other in streams:
                other.cancel()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        def rank(f: tuple[int, BaseException]) -> tuple[bool, int]:
            code = f[1].code() if isinstance(f[1], grpc.RpcError) else None
            return code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED), f[0]

        failures.sort(key=rank)
        first = failures[0][1]
        detail = "; ".join(f"party {i}: " + (f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError)
                                             else str(e)) for i, e in failures)
        raise GenerationFailed(f"generation failed: {detail}",
                               first.code() if isinstance(first, grpc.RpcError) else None)
    return results


def stream_generation(client: SecureClient, model: str, prompt: str | Sequence[int], max_new_tokens: int = 16,
                      sampler: Sampler | None = None, reveal: str = "logits", tokenizer: Any = None,
                      stop_at_eos: bool = True, keep_logits: bool = False, session_id: str | None = None
                      ) -> Iterator[TokenEvent]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text, with ``tokenizer``,
    or token ids), yielding each as it comes (see the module docstring)."""
    if reveal not in ("logits", "argmax"):
        raise ValueError(f"reveal must be 'logits' or 'argmax', got {reveal!r}")
    sampler = sampler or Sampler()
    if reveal == "argmax" and not sampler.greedy:
        raise ValueError("reveal='argmax' picks greedily on shares; sampling needs reveal='logits'")
    entry = model_entry(client, model)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs the model's tokenizer")
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    else:
        prompt_ids = [int(t) for t in prompt]
    vocab = int(entry.vocab_size)
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise GenerationLimitError(f"a prompt token id is outside the model's vocabulary of {vocab}")
    buckets = sorted(entry.seq_lens)
    if len(prompt_ids) > buckets[-1]:
        raise GenerationLimitError(f"the prompt has {len(prompt_ids)} tokens; the largest prompt bucket of "
                                   f"{model!r} is {buckets[-1]}")
    bucket = bucket_for(len(prompt_ids), buckets)
    info = {"max_positions": int(entry.max_positions), "capacities": list(entry.capacities)}
    check_budget(info, len(prompt_ids), bucket, max_new_tokens)
    specs = [InputSpec(i.name, i.kind, int(i.vocab_size)) for i in entry.inputs]
    token_spec = [s for s in specs if s.name == INPUT_IDS]
    session_id = session_id or uuid.uuid4().hex
    start = pb2.GenerateRequest(start=pb2.GenerateStart(session_id=session_id, model=model, prompt_bucket=bucket,
                                                        max_new_tokens=max_new_tokens, reveal=reveal))
    eos = int(entry.eos_token_id)
    streams = [_PartyStream(client, i, client.timeout_s) for i in range(3)]
    try:
        inputs = prefill_inputs(torch.tensor(prompt_ids), bucket)
        for stream, parts in zip(streams, _parts(client, specs, inputs, session_id, 0)):
            stream.send([start, *parts])
        for index in range(max_new_tokens):
            t0 = time.perf_counter()
            answers = _in_parallel(streams, _PartyStream.read_step)
            try:
                ring = reconstruct([a[0] for a in answers])
            except ValueError as e:
                raise GenerationFailed(f"session {session_id}: the parties' shares are inconsistent ({e})") from None
            opened = client.fp.decode(ring, answers[0][1]).reshape(-1)
            token = int(torch.round(opened).item()) if reveal == "argmax" else sampler(opened)
            step = answers[0][2]
            yield TokenEvent(index, token, tokenizer.decode([token]) if tokenizer is not None else "",
                             step.kind, int(step.capacity), time.perf_counter() - t0, step.seconds,
                             [int(a[2].bytes_sent) for a in answers], int(step.rounds),
                             opened if keep_logits and reveal == "logits" else None)
            if index + 1 == max_new_tokens or (stop_at_eos and token == eos):
                break
            token_inputs = {INPUT_IDS: torch.tensor([[token]])}
            for stream, parts in zip(streams, _parts(client, token_spec, token_inputs, session_id, index + 1)):
                stream.send(parts)
        for stream in streams:
            stream.half_close()
        _in_parallel(streams, _PartyStream.read_done)
    except BaseException:
        for stream in streams:
            stream.cancel()
        client._renew_channels()
        raise


def generate(client: SecureClient, model: str, prompt: str | Sequence[int], max_new_tokens: int = 16,
             sampler: Sampler | None = None, reveal: str = "logits", tokenizer: Any = None,
             stop_at_eos: bool = True, on_token: Callable[[TokenEvent], None] | None = None,
             keep_logits: bool = False) -> GenerationResult:
    """:func:`stream_generation`, collected (``on_token`` hears of each token as it comes)."""
    t0 = time.perf_counter()
    prompt_ids = (list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) and tokenizer is not None
                  else [] if isinstance(prompt, str) else [int(t) for t in prompt])
    events = []
    for event in stream_generation(client, model, prompt, max_new_tokens, sampler, reveal, tokenizer, stop_at_eos,
                                   keep_logits):
        events.append(event)
        if on_token is not None:
            on_token(event)
    ids = [e.token_id for e in events]
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    return GenerationResult(prompt_ids, ids, text, events, time.perf_counter() - t0)


# ---- command line ------------------------------------------------------------------------------

def model_tokenizer(client: SecureClient, model: str, folder: str | None = None) -> Any:
    """The tokenizer of ``model``: ``folder``, else the shipped LM's own for its name, else
    ``tokenizers/<model>/`` beside the cluster file (a deal of several models), or
    ``tokenizer/`` there for the cluster's default model."""
    from secure.lm import SHIPPED_LM_NAME, shipped_lm_path
    from secure.models import load_tokenizer

    if folder is not None:
        return load_tokenizer(folder)
    if model == SHIPPED_LM_NAME:
        return load_tokenizer(shipped_lm_path())
    if client.cfg.path is not None:
        beside = client.cfg.path.parent
        candidates = [beside / "tokenizers" / model] + ([beside / "tokenizer"] if model == client.cfg.model else [])
        for candidate in candidates:
            if (candidate / "tokenizer_config.json").is_file() or (candidate / "tokenizer.json").is_file():
                return load_tokenizer(candidate)
    raise ValueError(f"no tokenizer known for model {model!r}: give --tokenizer (the dealt model's folder)")


def main(argv: list[str] | None = None) -> int:
    """``python -m client generate``: stream a secure continuation of a prompt."""
    import argparse
    import sys
    from pathlib import Path

    from client.text_input import read_text
    from party.config import ClusterConfig, ConfigError, load_client_tokens

    ap = argparse.ArgumentParser(prog="python -m client generate", description=(
        "Generate text with a causal LM on the cluster's three parties. The prompt is read from standard input "
        "('-' or nothing), --text-file, or the command line (visible in ps: prefer the first two). The text streams "
        "to standard output, a progress line per token to standard error."))
    ap.add_argument("prompt", nargs="?", default="-")
    ap.add_argument("--text-file", type=Path)
    ap.add_argument("--config", type=Path, required=True, help="cluster config")
    ap.add_argument("--token-file", type=Path, required=True)
    ap.add_argument("--model", default="tiny-llama", help="a causal LM of the cluster's catalogue")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None, help="the sampler's seed (default: fresh randomness)")
    ap.add_argument("--reveal", choices=["logits", "argmax"], default="logits",
                    help="logits: the parties open the logits to this client, which samples; argmax: they pick the "
                         "greedy token on shares and open only its id")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    ap.add_argument("--tokenizer", default=None, help="the model's tokenizer folder")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the whole session")
    ap.add_argument("--insecure", action="store_true", help="allow a configuration without TLS (local demos only)")
    args = ap.parse_args(argv)
    try:
        prompt = read_text(args.prompt, args.text_file, "prompt")
        sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
        cfg = ClusterConfig.load(args.config)
        client = SecureClient(cfg, load_client_tokens(args.token_file), args.timeout, insecure=args.insecure)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with client:
        try:
            tokenizer = model_tokenizer(client, args.model, args.tokenizer)
            ids: list[int] = []
            for event in stream_generation(client, args.model, prompt, args.max_new_tokens, sampler, args.reveal,
                                           tokenizer, stop_at_eos=not args.no_stop):
                ids.append(event.token_id)
                cache = f" (cache {event.capacity})" if event.capacity else ""
                print(f"token {event.index + 1}/{args.max_new_tokens} {event.text!r}: {event.kind}{cache} "
                      f"{event.seconds:.2f} s, {max(event.bytes_sent) / 1e6:.2f} MB, {event.rounds} rounds",
                      file=sys.stderr, flush=True)
            print(prompt + tokenizer.decode(ids))
        except (GenerationFailed, GenerationLimitError, ValueError) as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
    return 0
