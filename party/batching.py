"""Batched queries on the party nodes: concurrent queries of one model and length run as one
execution (``secure.runtime.batching``), their rounds shared.

**Who decides.** Party 0 is the batch coordinator. Every party validates a query's upload
as for a lone query (a malformed upload is refused there and never joins a batch); a
follower (party 1 or 2) then reports the query ready to party 0 over the authenticated
peer link (a control message, :data:`CONTROL_TAG`). Party 0 batches only queries that
are ready on all three parties, so a batch never waits on a missing upload. Ready
queries of the same model and padded length wait up to ``window_s`` (from the first of
them) for others, up to ``max_batch``; party 0 then announces the batch (its id and its
query ids, in order) to both followers and every party runs it at once, tagged by the
batch id. A query with ``want_trace`` (per-node spans) runs as a batch of its own.

**Bounds and failures.** A query that is ready here but not on every party within
``join_timeout_s`` is dropped by party 0 (DEADLINE_EXCEEDED to its client on every
party); a follower gives up on a query party 0 never schedules after ``join_timeout_s``
plus twice the peer deadline (UNAVAILABLE). A client that goes away before its batch is
formed leaves it; one that goes away during the run does not stop the others (when all
of a batch's clients have gone, the batch is aborted). A query that leaves a bounded
form's range fails alone (per-query range checks). Anything else that fails the run (a
party dies, a link is cut, a peer aborts) fails every query of the batch, each client
with the status a lone query would get.

**What a client sees.** Its own output rows only; the run's time; the batch's rounds; and
as bytes sent, the key set-up plus its share of the rest: a lone query's figures (the one
protocol whose plan depends on a value's size, the softmax maximum, plans per item of the
batch dimension). Never the batch's size, id or members: an error message names the
client's own query id where the run's tag would be. The time of the answer is the
batch's (timing is inherent: a client that measures it may guess the load).

Never imports ``party.node`` (the node hands this module what it needs).
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from party.catalogue import ServedModel
from party.metrics import QueryRecord
from protos import load as load_protos
from secure.graph.ir import Graph
from secure.mpc.party import Party
from secure.mpc.ring import FixedPoint
from secure.profile.profiler import Profiler, span
from secure.runtime.batching import BatchedGraphs, run_batch
from secure.transport.wire import MessageAssembler, WireError, tensor_chunks

pb2, _ = load_protos()
log = logging.getLogger("party.batching")

CONTROL_TAG = "#batch"
"""The peer-frame tag of the batch protocol's control messages; '#' is outside a client
query id's alphabet, so no query can use it."""

BATCH_TAG_PREFIX = "#b:"
MAX_CONTROL_BYTES = 64 << 10
LEADER = 0
FOLLOWERS = (1, 2)
_RECENT = 10_000  # query ids party 0 remembers as dropped (late reports get "drop" again)
# the statuses a "drop" may carry, read from this table only
_DROP_CODES = {c.name: c for c in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                                   grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
                                   grpc.StatusCode.UNAVAILABLE)}


@dataclass(frozen=True)
class BatchOptions:
    """How a node batches: ``max_batch`` queries at most per execution (1: never, each
    query runs alone as before), waiting at most ``window_s`` for others. Only party 0's
    window and size are used; all three must agree on whether batching is on."""

    window_s: float = 0.1
    max_batch: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 64:
            raise ValueError(f"max_batch must be in 1..64, got {self.max_batch}")
        if not 0.0 <= self.window_s <= 10.0:
            raise ValueError(f"the batch window must be within 0-10 s, got {self.window_s}")

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


class BatchFailed(Exception):
    """A query of a batch failed or was dropped; ``code`` is its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_END = object()


@dataclass(eq=False)
class Member:
    """One client's query on this party, from its validated upload to its answer.

    ``inputs`` are its interpreter inputs (``party_inputs`` of ``graph``); ``on_exit``
    frees what the query holds on the node (its slot, its id), once."""

    query_id: str
    model: ServedModel
    graph: Graph
    seq_len: int
    inputs: dict[str, Any]
    want_trace: bool = False
    record: QueryRecord | None = None
    on_exit: Callable[[], None] = lambda: None
    solo: bool = False  # runs as a batch of its own (set by party 0)
    gone: bool = False
    delivered: bool = False
    since: float = field(default_factory=time.monotonic)
    _events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: bool = False

    @property
    def key(self) -> tuple[str, int]:
        """What queries must share to be batched: the model and the padded length."""
        return (self.model.name, self.seq_len)

    def emit(self, event: Any) -> None:
        self._events.put(event)

    def finish(self, failure: BatchFailed | None = None) -> None:
        """End the query (with ``failure``: its status); runs ``on_exit`` the first time only."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        if failure is not None:
            self._events.put(failure)
        self._events.put(_END)
        try:
            self.on_exit()
        except Exception:  # noqa: BLE001 - a release must not stop the others'
            log.exception("releasing query %s failed", self.query_id)

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._finished

    def stream(self) -> Iterator[Any]:
        """The events for the client (progress, its outputs, done), in order; raises
        :class:`BatchFailed` at the end when the query failed."""
        failure: BatchFailed | None = None
        while True:
            event = self._events.get()
            if event is _END:
                break
            if isinstance(event, BatchFailed):
                failure = event
                continue
            yield event
        if failure is not None:
            raise failure


@dataclass(eq=False)
class _Entry:
    """Party 0's view of one query: whether its upload is complete here and on each follower."""

    query_id: str
    created: float
    member: Member | None = None
    peers: set[int] = field(default_factory=set)
    complete_at: float | None = None

    @property
    def complete(self) -> bool:
        return self.member is not None and self.peers >= set(FOLLOWERS)


def encode_control(message: dict[str, Any]) -> torch.Tensor:
    """A control message as the one uint8 tensor of a peer message."""
    data = json.dumps(message, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_control(frame: Any, max_bytes: int = MAX_CONTROL_BYTES) -> dict[str, Any]:
    """The control message a peer frame carries; WireError when it is not one."""
    specs = [(t.dtype, tuple(t.shape)) for t in frame.tensors]
    if len(specs) != 1 or specs[0][0] != "uint8" or int(frame.part_index) != 0 or int(frame.part_count) != 1:
        raise WireError("a batch control message is one uint8 tensor in one frame")
    (tensor,) = MessageAssembler(specs, 1, max_bytes).add(0, 1, frame.data) or [torch.empty(0)]
    try:
        message = json.loads(bytes(tensor.tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"a batch control message is not JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise WireError("a batch control message is an object with a type 't'")
    return message


class BatchScheduler:
    """This party's side of the batch protocol (see the module docstring).

    The node hands it: ``transport_for(tag)`` (a peer transport for one execution),
    ``send_control(peer, tensors)``, ``abort_remote(tag, reason)`` (an abort frame to both
    peers), ``abort_local(tag, reason)`` (fail this party's waits on a tag), the fixed
    point, the device and the time limits; ``release_tag(tag)`` frees a finished batch's
    peer state."""

    def __init__(self, party_id: int, options: BatchOptions, fp: FixedPoint, device: torch.device,
                 transport_for: Callable[[str], Any], send_control: Callable[[int, int, list[torch.Tensor]], None],
                 abort_remote: Callable[[str, str], None], abort_local: Callable[[str, str], None],
                 join_timeout_s: float, deadline_s: float, release_tag: Callable[[str], None] = lambda tag: None,
                 graphs: BatchedGraphs | None = None) -> None:
        self.id = party_id
        self.options = options
        self.fp = fp
        self.device = device
        self.transport_for = transport_for
        self._send = send_control
        self.abort_remote = abort_remote
        self.abort_local = abort_local
        self.release_tag = release_tag
        self.join_timeout_s = join_timeout_s
        self.follower_timeout_s = join_timeout_s + 2 * deadline_s
        self.graphs = graphs or BatchedGraphs()
        self._cond = threading.Condition()
        self._seq = {p: 0 for p in range(3) if p != party_id}
        self._entries: dict[str, _Entry] = {}  # party 0: queries not yet in a batch
        self._queues: dict[tuple[str, int], list[_Entry]] = {}  # party 0: complete, in order
        self._solo: list[_Entry] = []  # party 0: complete, to run alone
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self._waiting: dict[str, Member] = {}  # followers: reported, not yet announced
        self._batches: dict[str, list[Member]] = {}  # running here
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def leader(self) -> bool:
        return self.id == LEADER

    # ---- life ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that forms batches (party 0) and expires stale queries."""
        if self._thread is None and self.options.enabled:
            self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # ---- a client's query --------------------------------------------------------------------
    def submit(self, member: Member) -> Iterator[Any]:
        """Queue a validated query for a batch; returns its events for the client (raising
        :class:`BatchFailed` at the end if it fails)."""
        if self.leader:
            # derived once per graph, here rather than in the scheduler's thread
            member.solo = member.want_trace or self.graphs.batchable(member.graph) is not None
            with self._cond:
                entry = self._entries.setdefault(member.query_id, _Entry(member.query_id, time.monotonic()))
                entry.member = member
                self._maybe_complete(entry)
        else:
            with self._cond:
                self._waiting[member.query_id] = member
            self._control(LEADER, {"t": "ready", "q": member.query_id, "m": member.model.name, "s": member.seq_len})
        return member.stream()

    def client_gone(self, member: Member) -> None:
        """The client's stream ended (cancelled, failed elsewhere, or after its answer)."""
        if member.delivered:
            return
        member.gone = True
        abort: str | None = None
        with self._cond:
            if self.leader:
                entry = self._entries.get(member.query_id)
                if entry is not None and entry.member is member:
                    self._drop(entry, None)
                    member.finish(BatchFailed(grpc.StatusCode.CANCELLED, "the client cancelled the query"))
                    return
            elif self._waiting.get(member.query_id) is member:
                # its inputs stay until party 0 answers: it may already have announced the batch
                member.finish(BatchFailed(grpc.StatusCode.CANCELLED, "the client cancelled the query"))
                tell_leader = True
            else:
                tell_leader = False
            for tag, members in self._batches.items():
                if member in members and all(m.gone for m in members):
                    abort = tag
        if not self.leader and tell_leader:
            self._control(LEADER, {"t": "gone", "q": member.query_id})
        if abort is not None:
            self.abort_local(abort, "every client of the batch went away")

    # ---- control messages ----------------------------------------------------------------------
    def _control(self, peer: int, message: dict[str, Any]) -> None:
        with self._cond:
            seq = self._seq[peer]
            self._seq[peer] += 1
        try:
            self._send(peer, seq, [encode_control(message)])
        except Exception as e:  # noqa: BLE001 - a lost control message ends in a deadline, not a crash
            log.warning("party %d: batch control message to party %d failed: %s", self.id, peer, e)

    def deliver(self, frame: Any) -> None:
        """A control frame from a peer (its sender checked against its certificate)."""
        sender = int(frame.sender)
        try:
            message = decode_control(frame)
        except WireError as e:
            log.warning("party %d: malformed batch control message from party %d: %s", self.id, sender, e)
            return
        kind = message["t"]
        if self.leader and sender in FOLLOWERS and kind in ("ready", "gone"):
            query_id = message.get("q")
            if not isinstance(query_id, str) or not 0 < len(query_id) <= 64:
                log.warning("party 0: batch control %r from party %d without a query id", kind, sender)
                return
            if not self.options.enabled:
                self._control(sender, {"t": "drop", "q": query_id, "code": "FAILED_PRECONDITION",
                                       "why": "party 0 does not batch (--max-batch 1): all three nodes must run "
                                              "with batching on, or all with it off"})
            elif kind == "ready":
                self._ready(query_id, sender)
            else:
                with self._cond:
                    entry = self._entries.get(query_id)
                    if entry is not None:
                        member = entry.member
                        self._drop(entry, None)
                        if member is not None:
                            member.finish(BatchFailed(grpc.StatusCode.CANCELLED,
                                                      f"query {query_id} was cancelled on party {sender}"))
        elif not self.leader and sender == LEADER and kind == "batch":
            self._announced(message)
        elif not self.leader and sender == LEADER and kind == "drop":
            self._dropped_here(message)
        else:
            log.warning("party %d: unexpected batch control %r from party %d", self.id, kind, sender)

    def _ready(self, query_id: str, sender: int) -> None:
        with self._cond:
            if query_id in self._dropped:
                again = True
            else:
                again = False
                entry = self._entries.setdefault(query_id, _Entry(query_id, time.monotonic()))
                entry.peers.add(sender)
                self._maybe_complete(entry)
        if again:
            self._control(sender, {"t": "drop", "q": query_id, "code": "ABORTED",
                                   "why": "party 0 no longer holds this query"})

    def _maybe_complete(self, entry: _Entry) -> None:
        """(Holding the lock.) Queue a query once it is ready on all three parties."""
        if not entry.complete or entry.complete_at is not None:
            return
        entry.complete_at = time.monotonic()
        assert entry.member is not None
        if entry.member.solo:
            self._solo.append(entry)
        else:
            self._queues.setdefault(entry.member.key, []).append(entry)
        self._cond.notify_all()

    def _drop(self, entry: _Entry, failure: BatchFailed | None) -> None:
        """(Holding the lock; party 0.) Take a query out of batching everywhere."""
        self._entries.pop(entry.query_id, None)
        if entry in self._solo:
            self._solo.remove(entry)
        if entry.member is not None:
            queued = self._queues.get(entry.member.key, [])
            if entry in queued:
                queued.remove(entry)
        self._dropped[entry.query_id] = None
        while len(self._dropped) > _RECENT:
            self._dropped.popitem(last=False)
        code = failure.code.name if failure is not None else "CANCELLED"
        why = str(failure) if failure is not None else "the client cancelled the query"
        self._tell_followers({"t": "drop", "q": entry.query_id, "code": code, "why": why})
        if entry.member is not None and failure is not None:
            entry.member.finish(failure)

    def _tell_followers(self, message: dict[str, Any]) -> None:
        for peer in FOLLOWERS:
            self._control(peer, message)

    def _dropped_here(self, message: dict[str, Any]) -> None:
        query_id = message.get("q")
        with self._cond:
            member = self._waiting.pop(query_id, None) if isinstance(query_id, str) else None
        if member is not None:
            code = _DROP_CODES.get(str(message.get("code")), grpc.StatusCode.ABORTED)
            why = str(message.get("why", "dropped by party 0"))[:300]
            member.finish(BatchFailed(code, why if why.startswith(f"query {query_id}") else f"query {query_id}: {why}"))

    def _announced(self, message: dict[str, Any]) -> None:
        """A follower's side of a batch party 0 announced: run it if every query is here."""
        tag, ids = message.get("id"), message.get("q")
        if not (isinstance(tag, str) and tag.startswith(BATCH_TAG_PREFIX) and len(tag) <= 64
                and isinstance(ids, list) and 0 < len(ids) <= 64 and all(isinstance(q, str) for q in ids)
                and len(set(ids)) == len(ids)):
            log.warning("party %d: malformed batch announcement from party 0", self.id)
            return
        with self._cond:
            missing = [q for q in ids if q not in self._waiting]
            keys = {self._waiting[q].key for q in ids if q in self._waiting}
            if missing or len(keys) != 1 or keys != {(message.get("m"), message.get("s"))}:
                members = []
            else:
                members = [self._waiting.pop(q) for q in ids]
                self._batches[tag] = members
        if not members:
            reason = (f"party {self.id} does not hold {len(missing)} of the batch's queries" if missing
                      else f"party {self.id} holds the batch's queries for another model or length")
            log.warning("batch %s refused: %s", tag, reason)
            self.abort_remote(tag, reason)
            return
        threading.Thread(target=self._execute, args=(tag, members), name=f"batch-{tag}", daemon=True).start()

    # ---- party 0: forming batches ------------------------------------------------------------
    def _loop(self) -> None:
        window, size = self.options.window_s, self.options.max_batch
        while True:
            launch: list[tuple[str, list[_Entry]]] = []
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                wake = now + 1.0
                if self.leader:
                    batches = [[e] for e in self._solo]
                    self._solo.clear()
                    for queued in self._queues.values():
                        while queued and (len(queued) >= size or now >= (queued[0].complete_at or now) + window):
                            batches.append(queued[:size])
                            del queued[:size]
                        if queued:
                            wake = min(wake, (queued[0].complete_at or now) + window)
                    for taken in batches:
                        for e in taken:
                            self._entries.pop(e.query_id, None)
                        launch.append((BATCH_TAG_PREFIX + secrets.token_hex(12), taken))
                    for entry in [e for e in self._entries.values() if e.complete_at is None]:
                        due = entry.created + self.join_timeout_s
                        if now >= due:
                            self._drop(entry, BatchFailed(
                                grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"query {entry.query_id}: its inputs did not reach all three parties within "
                                f"{self.join_timeout_s:.1f} s (or the nodes disagree on --max-batch)"))
                        else:
                            wake = min(wake, due)
                else:
                    for member in list(self._waiting.values()):
                        due = member.since + self.follower_timeout_s
                        if now >= due:
                            del self._waiting[member.query_id]
                            member.finish(BatchFailed(grpc.StatusCode.UNAVAILABLE,
                                                      f"query {member.query_id}: party 0 did not schedule it within "
                                                      f"{self.follower_timeout_s:.1f} s"))
                            self._control(LEADER, {"t": "gone", "q": member.query_id})
                        else:
                            wake = min(wake, due)
                for tag, entries in launch:
                    self._batches[tag] = [e.member for e in entries if e.member is not None]
                if not launch:
                    self._cond.wait(max(0.0, wake - now))
                    continue
            for tag, entries in launch:
                members = [e.member for e in entries if e.member is not None]
                first = members[0]
                self._tell_followers({"t": "batch", "id": tag, "m": first.model.name, "s": first.seq_len,
                                      "q": [m.query_id for m in members]})
                threading.Thread(target=self._execute, args=(tag, members), name=f"batch-{tag}",
                                 daemon=True).start()

    # ---- running a batch ------------------------------------------------------------------------
    def _execute(self, tag: str, members: list[Member]) -> None:
        """Run one batch on this party and answer each member with its own rows."""
        size = len(members)
        first = members[0]
        transport = self.transport_for(tag)
        profiler = Profiler()
        party = Party(transport, self.fp, self.device, profiler)
        secret = graph_secret_count(first.graph)
        done = [0]
        t0 = time.perf_counter()

        def trace(node: Any) -> Any:
            done[0] += 1
            if done[0] % 25 == 0 or done[0] == secret:
                event = pb2.QueryEvent(progress=pb2.Progress(done=done[0], total=secret, stage="compute"))
                for m in members:
                    m.emit(event)
            return span(party, node.origin or node.op)

        log.info("batch %s of %d queries started", tag, size)
        setup_bytes = 0
        try:
            party.setup_keys()
            setup_bytes = party.bytes_sent
            batched = self.graphs.get(first.graph, size)
            per_query = [m.inputs for m in members]
            for m in members:
                m.inputs = {}  # held once, stacked, while the batch runs
            result = run_batch(party, first.graph, batched, first.model.weights, per_query, trace)
            seconds = time.perf_counter() - t0
            self._account(members, party, transport)
            # a lone query's figure: the key set-up, and its share of what grows with the batch
            sent = setup_bytes + round((party.bytes_sent - setup_bytes) / size)
            spans = []
            if size == 1 and first.want_trace:
                spans = [s.since(t0).to_proto(pb2.Span) for s in profiler.spans if s.depth == 0]
            for i, m in enumerate(members):
                rows = result.outputs[i]
                if rows is None:
                    error = result.failed[i]
                    m.finish(BatchFailed(grpc.StatusCode.ABORTED, f"query {m.query_id} failed on party {self.id}: "
                                                                  f"{type(error).__name__}: {error}"))
                    continue
                for index, share in enumerate(rows):
                    for p, comp in enumerate((share.a, share.b)):
                        for chunk in tensor_chunks(comp.contiguous(), pb2.TensorChunk):
                            m.emit(pb2.QueryEvent(output=pb2.OutputChunk(index=index, part=p,
                                                                         frac_bits=share.frac_bits, chunk=chunk)))
                m.delivered = True
                if m.record is not None:
                    m.record.succeeded()
                m.emit(pb2.QueryEvent(done=pb2.Done(seconds=seconds, bytes_sent=sent, rounds=party.rounds,
                                                    spans=spans)))
                m.finish()
            log.info("batch %s of %d queries done: %.2f s, %d rounds, %.1f MB sent (%s)", tag, size, seconds,
                     party.rounds, party.bytes_sent / 1e6, ", ".join(m.query_id for m in members))
            for m in members:  # each query's own line, as a lone query logs it
                log.info("query %s done in batch %s: %.2f s, %d rounds, %.1f MB sent", m.query_id, tag, seconds,
                         party.rounds, sent / 1e6)
        except Exception as e:  # noqa: BLE001 - every query of the batch fails; the node serves on
            reason = f"{type(e).__name__}: {e}"
            transport.abort(reason)
            self._account(members, party, transport)
            elapsed = time.perf_counter() - t0
            log.warning("batch %s of %d queries failed after %.1f s: %s", tag, size, elapsed, reason)
            for m in members:
                log.warning("query %s failed after %.1f s in batch %s: %s", m.query_id, elapsed, tag,
                            reason.replace(tag, m.query_id))
            code = grpc.StatusCode.DEADLINE_EXCEEDED if "within" in reason else grpc.StatusCode.ABORTED
            for m in members:
                # the client learns its own query's failure, never the batch's tag
                m.finish(BatchFailed(code, f"query {m.query_id} failed on party {self.id}: "
                                           f"{reason.replace(tag, m.query_id)}"))
        finally:
            for m in members:  # no-op unless something above failed to answer it
                m.finish(BatchFailed(grpc.StatusCode.INTERNAL, "the batch ended without an answer"))
            with self._cond:
                self._batches.pop(tag, None)
            self.release_tag(tag)

    @staticmethod
    def _account(members: list[Member], party: Party, transport: Any) -> None:
        """Each query's metrics: its share of the batch's traffic, and the batch's rounds."""
        size = len(members)
        received = int(getattr(transport, "bytes_received", 0))
        for m in members:
            if m.record is not None:
                m.record.add_traffic(round(party.bytes_sent / size), round(received / size), party.rounds)


def graph_secret_count(graph: Graph) -> int:
    """The number of secret nodes of ``graph`` (a query's progress total)."""
    secret = graph.secret_names()
    return sum(1 for n in graph.nodes if n.name in secret)
