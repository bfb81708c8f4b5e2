"""Generation sessions on a party node: the ``Party.Generate`` stream.

One bidirectional stream per session (see ``GenerateRequest`` in the proto). The client
sends ``start``, the prompt's inputs and ``end(step=0)``; the party runs the prefill of
the prompt's bucket, keeps every layer's keys and values as its shares (the KV cache,
``secure.runtime.generate.GenerationSession``) and answers with its shares of the step's
output and a ``StepResult``. Each next token comes as its one-hot shares and
``end(step=k)``: a decode step on the cache. Masks, positions and slot counts are public
and computed here; a decode step accepts ``input_ids`` only.

A session ends, and its cache and peer state are freed on this party, when:

* the client half-closes the stream (finished: a ``Done`` event closes it);
* the client cancels, or another party fails the session (its peers' frames stop: our
  next wait for them fails within the cluster's ``deadline_s``);
* the client sends nothing for ``receive_timeout_s`` between steps, the session outlives
  its deadline (the call's gRPC deadline, at most :data:`MAX_SESSION_S`), or it asks for
  more steps than its token budget allows.

Every failure is aborted on the peers (so they free the session too) and reported to the
client with a gRPC status naming the cause; the node keeps serving.

Never imports ``party.node`` (the node hands this module what it needs).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from party.serving import ReceiveDeadline, Rejected
from party.uploads import InputCollector
from secure.approx.argmax import argmax
from secure.graph.causal import (
    ATTENTION_MASK,
    INPUT_IDS,
    POSITION_IDS,
    GenerationLimitError,
    check_budget,
    positions_of,
)
from secure.graph.ir import Graph
from secure.mpc.backend import MpcOps
from secure.mpc.party import Party
from secure.mpc.ring import FixedPoint
from secure.mpc.shares import AShare
from secure.profile.profiler import Profiler, span
from secure.runtime.generate import ARGMAX_SPAN, REVEALS, GenerationSession
from secure.runtime.inputs import InputError, party_inputs
from secure.runtime.interpreter import no_trace
from secure.transport.wire import tensor_chunks

log = logging.getLogger("party.generation")

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_SESSION_S = 1800.0
"""The longest a session may live, whatever deadline its call carries."""


@dataclass
class ServedCausal:
    """What generation needs of a dealt causal model (``party.catalogue.ServedModel`` has it)."""

    name: str
    graphs: Mapping[int, Graph]
    decode_graphs: Mapping[int, Graph]
    weights: Mapping[str, AShare]
    info: Mapping[str, Any]


@dataclass
class SessionRecord:
    """A live session, as :meth:`GenerationService.active` lists it."""

    session_id: str
    model: str
    started: float
    steps: int = 0


class GenerationService:
    """The generation sessions of one party node.

    ``transport_for(session_id)`` makes the session's peer transport (tagged by its id);
    ``claim(session_id)`` registers the id among the node's running queries (raising
    :class:`Rejected` ALREADY_EXISTS when it is taken) and ``release(session_id)`` frees it
    and the peer mailbox; ``abort_local(session_id, reason)`` fails this party's waits for
    the session's peer messages; ``served(name, "causal")`` is the dealt causal model of that
    name (raising :class:`Rejected` NOT_FOUND or FAILED_PRECONDITION otherwise).
    """

    def __init__(self, party_id: int, fp: FixedPoint, device: torch.device, served: Callable[[str, str], Any],
                 transport_for: Callable[[str], Any], claim: Callable[[str], None], release: Callable[[str], None],
                 abort_local: Callable[[str, str], None], receive_timeout_s: float, max_request_bytes: int,
                 on_step: Callable[[str, float, int, int], None] | None = None) -> None:
        self.party_id = party_id
        self.fp = fp
        self.device = device
        self.served = served
        self.transport_for = transport_for
        self.claim = claim
        self.release = release
        self.abort_local = abort_local
        self.on_step = on_step  # (kind, seconds, bytes sent, rounds) of every step run (the node's metrics)
        self.receive_timeout_s = receive_timeout_s
        self.max_request_bytes = max_request_bytes
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionRecord] = {}

    def active(self) -> list[SessionRecord]:
        """The sessions holding a cache on this party now."""
        with self._lock:
            return list(self._sessions.values())

    # ---- one stream ----------------------------------------------------------------------
    def serve(self, requests: Iterator[Any], context: grpc.ServicerContext, pb2: Any) -> Iterator[Any]:
        """The events of one session's stream; raises :class:`Rejected` for the caller to
        turn into the call's status (after the peers were told)."""
        with ReceiveDeadline(context, self.receive_timeout_s) as deadline:
            timed = deadline.timed(requests, "the session's next message")
            start = self._start(timed)
            model = self._causal_model(start.model)
            session_id = start.session_id
            self.claim(session_id)
            record = SessionRecord(session_id, model.name, time.monotonic())
            with self._lock:
                self._sessions[session_id] = record
            transport = None
            try:
                transport = self.transport_for(session_id)
                # a client that goes away mid-step fails our waits for the peers at once
                context.add_callback(lambda: self.abort_local(session_id, "the client cancelled the session"))
                yield from self._run(start, model, timed, context, transport, record, pb2)
            except Rejected as e:
                if transport is not None:
                    transport.abort(f"party {self.party_id}: {e}")
                raise
            except Exception as e:  # noqa: BLE001 - a failed step: the peers are told, the client gets a status
                if transport is not None:
                    transport.abort(f"party {self.party_id}: {type(e).__name__}: {e}")
                code = grpc.StatusCode.DEADLINE_EXCEEDED if "within" in str(e) else grpc.StatusCode.ABORTED
                raise Rejected(code, f"session {session_id} failed on party {self.party_id}: "
                                     f"{type(e).__name__}: {e}") from e
            finally:
                with self._lock:
                    self._sessions.pop(session_id, None)
                self.release(session_id)

    def _start(self, requests: Iterator[Any]) -> Any:
        first = next(requests, None)
        if first is None or not first.HasField("start"):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "a generation stream must begin with start")
        start = first.start
        if not SESSION_ID.match(start.session_id):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "session id must be 1-64 characters of [A-Za-z0-9_.:-]")
        if start.reveal not in REVEALS:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"reveal must be one of {list(REVEALS)}, "
                                                             f"got {start.reveal!r}")
        if start.max_new_tokens < 1:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"the token budget must be at least 1, got "
                                                             f"{start.max_new_tokens}")
        return start

    def _causal_model(self, name: str) -> ServedCausal:
        model = self.served(name, "causal")
        return ServedCausal(name, model.graphs, model.decode_graphs, model.weights, model.info)

    def _run(self, start: Any, model: ServedCausal, requests: Iterator[Any], context: grpc.ServicerContext,
             transport: Any, record: SessionRecord, pb2: Any) -> Iterator[Any]:
        bucket = int(start.prompt_bucket)
        graph = model.graphs.get(bucket)
        if graph is None:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"prompt bucket {bucket} was not dealt for "
                                                             f"{model.name!r}; available: {sorted(model.graphs)}")
        remaining = context.time_remaining()
        lifetime = MAX_SESSION_S if remaining is None else min(MAX_SESSION_S, remaining)
        ends_at = time.monotonic() + lifetime
        profiler = Profiler() if start.want_trace else None
        party = Party(transport, self.fp, self.device, profiler)
        trace = (lambda node: span(party, node.origin or node.op)) if start.want_trace else no_trace
        session = GenerationSession(model.graphs, model.decode_graphs, MpcOps(party), model.weights, trace)
        t_session = time.perf_counter()
        log.info("session %s accepted: model %r, prompt bucket %d, budget %d tokens, reveal %s", start.session_id,
                 model.name, bucket, start.max_new_tokens, start.reveal)
        try:
            received = self._step_inputs(requests, graph, start.session_id, 0, None)
            ready = self._prefill_inputs(graph, received, model, bucket, int(start.max_new_tokens))
            party.setup_keys()
            yield from self._answer(party, session, lambda: session.prefill(ready), start, 0, 0, pb2)
            step = 0
            while True:
                if time.monotonic() > ends_at:
                    raise Rejected(grpc.StatusCode.DEADLINE_EXCEEDED, f"session {start.session_id} outlived its "
                                                                      f"deadline of {lifetime:.0f} s")
                message = next(requests, None)
                if message is None:  # the client half-closed: finished
                    yield pb2.GenerateEvent(done=pb2.Done(seconds=time.perf_counter() - t_session,
                                                          bytes_sent=party.bytes_sent, rounds=party.rounds))
                    log.info("session %s finished: %d steps, %d rounds, %.1f MB sent", start.session_id,
                             step + 1, party.rounds, party.bytes_sent / 1e6)
                    return
                step += 1
                if step >= start.max_new_tokens:
                    raise Rejected(grpc.StatusCode.OUT_OF_RANGE, f"session {start.session_id}: the token budget of "
                                                                 f"{start.max_new_tokens} is spent")
                capacity = session.capacity()
                decode = model.decode_graphs[capacity]
                received = self._step_inputs(requests, decode, start.session_id, step, message)
                received.update({(k, "public", 0): v for k, v in session.public_step_inputs().items()})
                try:
                    token = party_inputs(decode, received, self.party_id, self.fp.frac_bits, self.device)
                except InputError as e:
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
                record.steps = step
                yield from self._answer(party, session, lambda token=token: session.decode(token), start, step,
                                        capacity, pb2)
        finally:
            session.close()

    def _step_inputs(self, requests: Iterator[Any], graph: Graph, session_id: str, step: int,
                     first: Any | None) -> dict[tuple[str, str, int], torch.Tensor]:
        """A step's input chunks up to its ``end``; a decode step takes ``input_ids`` only."""
        collector = InputCollector(graph, self.max_request_bytes, None if step == 0 else {INPUT_IDS})
        message = first if first is not None else next(requests, None)
        while message is not None:
            if message.HasField("input"):
                collector.add(message.input)
            elif message.HasField("end"):
                end = message.end
                if end.session_id != session_id:
                    with self._lock:
                        other = end.session_id in self._sessions
                    raise Rejected(grpc.StatusCode.PERMISSION_DENIED if other else grpc.StatusCode.NOT_FOUND,
                                   f"a step for session {end.session_id!r} on the stream of session {session_id!r}: "
                                   + ("another client's session" if other else "no such session")
                                   + "; a session's steps go on its own stream")
                if end.step != step:
                    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"session {session_id}: expected step {step}, "
                                                                     f"got {end.step}")
                return collector.complete()
            else:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "only one start per session")
            message = next(requests, None)
        raise Rejected(grpc.StatusCode.CANCELLED if step else grpc.StatusCode.INVALID_ARGUMENT,
                       f"session {session_id}: the stream ended inside step {step}")

    def _prefill_inputs(self, graph: Graph, received: dict[tuple[str, str, int], torch.Tensor],
                        model: ServedCausal, bucket: int, new_tokens: int) -> dict[str, Any]:
        try:
            ready = party_inputs(graph, received, self.party_id, self.fp.frac_bits, self.device)
        except InputError as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        mask = ready[ATTENTION_MASK]
        n = int(mask.sum())
        ones = torch.zeros_like(mask)
        ones[..., bucket - n:] = 1
        if n < 1 or not torch.equal(mask, ones):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the prompt's attention_mask must be left padding "
                                                             "(zeros) then at least one 1")
        if not torch.equal(ready[POSITION_IDS], positions_of(mask)):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "position_ids must count the prompt's tokens "
                                                             "(max(cumsum(attention_mask) - 1, 0))")
        try:
            check_budget(dict(model.info), n, bucket, new_tokens)
        except GenerationLimitError as e:
            raise Rejected(grpc.StatusCode.OUT_OF_RANGE, str(e)) from None
        return ready

    def _answer(self, party: Party, session: GenerationSession, compute: Callable[[], AShare], start: Any,
                step: int, capacity: int, pb2: Any) -> Iterator[Any]:
        """Run one step and yield this party's shares of its output, then its StepResult."""
        rounds0, bytes0 = party.rounds, party.bytes_sent
        if party.profiler is not None:
            party.profiler.spans.clear()
        t0 = time.perf_counter()
        logits = compute()
        out = logits.map(lambda t: t.reshape(-1, t.shape[-1])[-1])
        if start.reveal == "argmax":
            with span(party, ARGMAX_SPAN):
                out = argmax(MpcOps(party), out)
        seconds = time.perf_counter() - t0
        for p, comp in enumerate((out.a, out.b)):
            for chunk in tensor_chunks(comp, pb2.TensorChunk):
                yield pb2.GenerateEvent(output=pb2.OutputChunk(index=0, part=p, frac_bits=out.frac_bits, chunk=chunk))
        spans = []
        if party.profiler is not None:
            spans = [s.since(t0).to_proto(pb2.Span) for s in party.profiler.spans if s.depth == 0]
        kind = "prefill" if step == 0 else "decode"
        if self.on_step is not None:
            self.on_step(kind, seconds, party.bytes_sent - bytes0, party.rounds - rounds0)
        yield pb2.GenerateEvent(step=pb2.StepResult(
            step=step, kind=kind, capacity=capacity, seconds=seconds,
            bytes_sent=party.bytes_sent - bytes0, rounds=party.rounds - rounds0, spans=spans))
