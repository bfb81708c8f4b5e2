"""Client SDK: tokenize locally, secret-share the query, gather and open the answer.

    client = SecureClient(ClusterConfig.load("cluster.json"), load_client_tokens("tokens.json"))
    result = client.embed("How private is this question?")
    result.embedding        # the sentence embedding, reconstructed by the client only
    client.classify("A hand tool for boring holes.", model="minilm-topics").label   # a classifier

A classifier's logits come back like an embedding (``query``/``embed``); ``classify``
applies softmax to them at the client and names the labels the catalogue lists.

Each party receives only its own pair of shares (for token ids: the PRG-compressed
one-hot, so party 0 receives two 16-byte seeds) and returns its pair of the output
shares; no party ever sees the text, the token ids or the answer.

A cluster serves a catalogue of models (``catalogue()``); every call may name one
(``embed(text, model="minilm")``), else it goes to the client's model (the configuration's
``model`` unless the client was made with another). The client pads to the chosen model's
lengths and shares the inputs it lists.

Before any share leaves, the client checks whom it talks to: it dials party N expecting
the certificate name ``partyN`` (so a node at the wrong address fails the TLS handshake),
then asks every node to describe itself and refuses unless each reports the party id it
was dialled as, the configured model and the share-file digest the configuration pins,
and all three report the same catalogue (model names, kinds, graph digests and labels).
Each party gets its own token, in the call metadata. Without ``tls`` in the configuration
the client refuses to connect unless it is made with ``insecure=True``.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from party.config import TOKEN_METADATA_KEY, ClusterConfig, party_name, token_digest
from protos import load as load_protos
from secure.graph.buckets import bucket_for
from secure.mpc.ring import FixedPoint
from secure.mpc.shares import reconstruct
from secure.profile.profiler import Span
from secure.runtime.inputs import InputSpec, client_parts, upload_bytes
from secure.transport.wire import TensorAssembler, tensor_chunks

pb2, pb2_grpc = load_protos()

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


class QueryFailed(RuntimeError):
    """A query failed on at least one party; ``code`` is the first gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Classification:
    """A classifier's answer: the label names, the logits the client reconstructed, their
    softmax (computed here, at the client) and the query's figures (``result``)."""

    labels: list[str]
    logits: torch.Tensor
    probabilities: torch.Tensor
    result: QueryResult

    @property
    def label(self) -> str:
        """The most probable label."""
        return self.labels[int(self.probabilities.argmax())]

    def as_dict(self) -> dict[str, float]:
        """``{label: probability}`` in the classifier's order."""
        return {name: float(p) for name, p in zip(self.labels, self.probabilities.tolist())}


@dataclass
class QueryResult:
    outputs: list[torch.Tensor]
    seconds: float
    party_seconds: list[float]
    bytes_sent: list[int]
    rounds: int
    upload_bytes: list[int]
    spans: list[Span] = field(default_factory=list)  # party 0's traced nodes, start_s from its query's start

    @property
    def embedding(self) -> torch.Tensor:
        return self.outputs[0]


class SecureClient:
    """Talks to the three parties of a cluster."""

    def __init__(self, cfg: ClusterConfig, tokens: list[str], timeout_s: float | None = None,
                 insecure: bool = False, tokenizer_dir: str | Path | None = None, model: str | None = None) -> None:
        """``model``: the catalogue's model a call goes to when it names none (default: the
        configuration's ``model``); ``tokenizer_dir``: that model's tokenizer folder."""
        if isinstance(tokens, str) or len(tokens) != 3:
            raise ValueError("a client needs one token per party (three), see party.config.load_client_tokens")
        cfg.require_tls(insecure)
        self.cfg = cfg
        self.tokens = list(tokens)
        self.timeout_s = timeout_s or cfg.deadline_s * 4
        self.fp = FixedPoint(cfg.frac_bits)
        self._channels = [self._channel(i) for i in range(3)]
        self.stubs = [pb2_grpc.PartyStub(c) for c in self._channels]
        self._retired: list[grpc.Channel] = []
        self._infos: list[Any] | None = None
        self._tokenizers: dict[str, Any] = {}
        # a fast tokenizer sets its padding and truncation on every call: threads sharing it must take turns
        self._tokenize_lock = threading.Lock()
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.model = model or cfg.model

    def _channel(self, party: int) -> grpc.Channel:
        target = self.cfg.party(party).client_address
        if self.cfg.ca is None:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", party_name(party))]
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(self.cfg.ca.read_bytes()), options=options)

    def metadata(self, party: int) -> tuple[tuple[str, str], ...]:
        """The call metadata that authenticates this client to ``party``."""
        return ((TOKEN_METADATA_KEY, self.tokens[party]),)

    def close(self) -> None:
        for c in [*self._channels, *self._retired]:
            c.close()

    def _renew_channels(self) -> None:
        """New channels (new connections) to all three parties after a query failed: a
        connection broken silently (a cut cable, a restarted party) would otherwise swallow
        the next query until TCP gives up on it. The old channels close with the client, so
        a concurrent query on them is not cut short."""
        self._retired.extend(self._channels)
        self._channels = [self._channel(i) for i in range(3)]
        self.stubs = [pb2_grpc.PartyStub(c) for c in self._channels]

    def __enter__(self) -> SecureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self, timeout_s: float = 2.0) -> list[bool]:
        """Readiness of each party (False where it does not answer)."""
        out = []
        for stub in self.stubs:
            try:
                out.append(bool(stub.Health(pb2.HealthRequest(), timeout=timeout_s).ready))
            except grpc.RpcError:
                out.append(False)
        return out

    def describe(self) -> Any:
        """Party 0's description of the model, once every party has been verified."""
        return self.verify_parties()[0]

    def verify_parties(self) -> list[Any]:
        """Each node's description, after checking that it is the party it was dialled as,
        serves the configured model, holds the share file the configuration pins, and that
        the three report the same catalogue (names, kinds, graph digests)."""
        if self._infos is None:
            infos = []
            for i, stub in enumerate(self.stubs):
                try:
                    info = stub.Describe(pb2.DescribeRequest(), metadata=self.metadata(i), timeout=10)
                except grpc.RpcError as e:
                    raise QueryFailed(f"describe failed on party {i}: {e.code().name}: {e.details()}",
                                      e.code()) from None
                _check_identity(self.cfg, i, info)
                infos.append(info)
            _check_same_catalogue(infos)
            self._infos = infos
        return self._infos

    def catalogue(self) -> list[Any]:
        """The models the cluster serves (``ModelEntry``: model, kind, seq_lens, capacities,
        inputs, recipe, graph_sha256, ...), as the verified parties report them; a node that
        predates catalogues is read as a catalogue of its one model."""
        info = self.describe()
        if info.catalogue:
            return list(info.catalogue)
        return [pb2.ModelEntry(model=info.model, kind="encoder", seq_lens=info.seq_lens, inputs=info.inputs,
                               recipe=info.recipe)]

    def model_entry(self, model: str | None = None) -> Any:
        """The catalogue's entry of ``model`` (default: the client's model); ``QueryFailed``
        with NOT_FOUND when the cluster does not serve it."""
        name = model or self.model
        entries = self.catalogue()
        for entry in entries:
            if entry.model == name:
                return entry
        raise QueryFailed(f"unknown model {name!r}; the cluster serves {', '.join(repr(e.model) for e in entries)}",
                          grpc.StatusCode.NOT_FOUND)

    # ---- high level: sentence embeddings ------------------------------------------------
    def tokenizer(self, model: str | None = None) -> Any:
        """``model``'s tokenizer (default: the client's model). The client's model: its
        ``tokenizer_dir`` if given. Any model: ``tokenizers/NAME/`` beside the cluster file,
        then (the configuration's model) ``tokenizer/`` there (``secure-cluster`` copies a
        deal's tokenizers there), then the bundled MiniLM's for ``minilm``, its distilled
        ``minilm-power`` and the ``minilm-topics`` classifier."""
        name = model or self.model
        if name not in self._tokenizers:
            from secure.models import load_tokenizer, minilm_path

            here = self.cfg.path.parent if self.cfg.path is not None else None
            beside = [] if here is None else [here / "tokenizers" / name,
                                              *([here / "tokenizer"] if name == self.cfg.model else [])]
            folder = next((c for c in beside if c.is_dir()), None)
            if name == self.model and self.tokenizer_dir is not None:
                folder = self.tokenizer_dir
            if folder is not None:
                self._tokenizers[name] = load_tokenizer(folder)
            elif name in ("minilm", "minilm-power", "minilm-topics"):  # all three keep MiniLM's tokenizer
                self._tokenizers[name] = load_tokenizer(minilm_path())
            else:
                raise ValueError(f"no tokenizer known for model {name!r}: give the dealt model's tokenizer folder "
                                 "(the deal's tokenizer/ or tokenizers/NAME/; secure-cluster copies them beside "
                                 "each client's cluster.json)")
        return self._tokenizers[name]

    def encode_text(self, text: str, model: str | None = None) -> dict[str, torch.Tensor]:
        """Tokenize for ``model`` (default: the client's) and pad to the smallest of its dealt
        lengths that holds the text (truncating to the longest)."""
        entry = self.model_entry(model)
        _require_encoder(entry)
        lengths = sorted(entry.seq_lens)
        tok = self.tokenizer(entry.model)
        with self._tokenize_lock:
            n = len(tok(text, truncation=True, max_length=lengths[-1])["input_ids"])
            seq = bucket_for(n, lengths)
            enc = tok([text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embed(self, text: str, trace: bool = False, progress: Callable[[int, int], None] | None = None,
              model: str | None = None) -> QueryResult:
        """The sentence embedding of ``text`` (mean pooled, not normalised) by ``model``
        (default: the client's)."""
        return self.query(self.encode_text(text, model), trace=trace, progress=progress, model=model)

    def classify(self, text: str, model: str | None = None, trace: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Classification:
        """The label probabilities of ``text`` by the classifier ``model`` (default: the
        client's): the parties return shares of the logits only; the softmax is the client's."""
        entry = self.model_entry(model)
        if entry.kind != "classifier":
            raise QueryFailed(f"model {entry.model!r} is {'a causal LM' if entry.kind == 'causal' else 'an encoder'}, "
                              "not a classifier", grpc.StatusCode.FAILED_PRECONDITION)
        result = self.query(self.encode_text(text, entry.model), trace=trace, progress=progress, model=entry.model)
        logits = result.outputs[0].reshape(-1).double()
        if logits.numel() != len(entry.labels):
            raise QueryFailed(f"model {entry.model!r} answered {logits.numel()} logits for {len(entry.labels)} labels")
        return Classification(list(entry.labels), logits, torch.softmax(logits, dim=-1), result)

    # ---- low level: any inputs ---------------------------------------------------------
    def _parts_for(self, inputs: dict[str, torch.Tensor], seq_len: int, query_id: str, trace: bool, entry: Any
                   ) -> tuple[list[list[Any]], list[int]]:
        """Each party's stream: the header, then its parts of the inputs in chunks."""
        specs = [InputSpec(i.name, i.kind, int(i.vocab_size)) for i in entry.inputs]
        header = pb2.QueryPart(header=pb2.QueryHeader(query_id=query_id, model=entry.model, seq_len=seq_len,
                                                      want_trace=trace))
        per_party = client_parts(specs, inputs, self.fp)
        streams = [[header, *(pb2.QueryPart(input=pb2.InputChunk(name=p.name, kind=p.kind, part=p.part, chunk=chunk))
                              for p in parts for chunk in tensor_chunks(p.tensor, pb2.TensorChunk))]
                   for parts in per_party]
        return streams, [upload_bytes(parts) for parts in per_party]

    def query(self, inputs: dict[str, torch.Tensor], trace: bool = False,
              progress: Callable[[int, int], None] | None = None, query_id: str | None = None,
              model: str | None = None) -> QueryResult:
        """Share ``inputs`` to the three parties, run ``model`` (an encoder or a classifier of the catalogue;
        default: the client's model), and reconstruct the outputs."""
        entry = self.model_entry(model)
        _require_encoder(entry)
        seq_len = int(inputs["input_ids"].shape[-1]) if "input_ids" in inputs else int(
            next(iter(inputs.values())).shape[-1])
        query_id = query_id or uuid.uuid4().hex
        parts, upload = self._parts_for(inputs, seq_len, query_id, trace, entry)
        results: list[Any] = [None, None, None]
        errors: queue.Queue = queue.Queue()
        calls = [self.stubs[i].Query(iter(parts[i]), metadata=self.metadata(i), timeout=self.timeout_s)
                 for i in range(3)]
        t0 = time.perf_counter()

        def call(i: int) -> None:
            try:
                results[i] = self._collect(calls[i], progress if i == 0 else None)
            except grpc.RpcError as e:
                errors.put((i, e))
                for j, other in enumerate(calls):  # the others would only wait for their deadline
                    if j != i:
                        other.cancel()

        threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not errors.empty():
            failures = []
            while not errors.empty():
                failures.append(errors.get())
            # the party that failed first explains best: cancelled and aborted calls come last
            failures.sort(key=lambda f: (f[1].code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED), f[0]))
            i, e = failures[0]
            detail = "; ".join(f"party {j}: {err.code().name}: {err.details()}" for j, err in failures)
            self._renew_channels()
            raise QueryFailed(f"query {query_id} failed: {detail}", e.code())
        outputs = []
        for index in range(len(results[0]["outputs"])):
            try:
                ring = reconstruct([tuple(r["outputs"][index]) for r in results])
            except ValueError as e:
                raise QueryFailed(f"query {query_id}: the parties' output shares are inconsistent ({e})") from None
            outputs.append(self.fp.decode(ring, results[0]["frac_bits"][index]))
        return QueryResult(outputs, time.perf_counter() - t0, [r["done"].seconds for r in results],
                           [int(r["done"].bytes_sent) for r in results], int(results[0]["done"].rounds), upload,
                           [Span.from_proto(s) for s in results[0]["done"].spans])

    @staticmethod
    def _collect(events: Iterator[Any], progress: Callable[[int, int], None] | None) -> dict[str, Any]:
        assemblers: dict[tuple[int, int], TensorAssembler] = {}
        outputs: dict[int, list[torch.Tensor | None]] = {}
        frac_bits: dict[int, int] = {}
        done = None
        for ev in events:
            if ev.HasField("progress") and progress is not None:
                progress(ev.progress.done, ev.progress.total)
            elif ev.HasField("output"):
                o = ev.output
                asm = assemblers.setdefault((o.index, o.part), TensorAssembler(1 << 34))
                t = asm.add(o.chunk)
                if t is not None:
                    outputs.setdefault(o.index, [None, None])[o.part] = t
                    frac_bits[o.index] = o.frac_bits
            elif ev.HasField("done"):
                done = ev.done
        if done is None:
            raise QueryFailed("a party closed the stream without finishing")
        ordered = [outputs[k] for k in sorted(outputs)]
        return {"outputs": ordered, "frac_bits": [frac_bits[k] for k in sorted(outputs)], "done": done}


def token_mismatches(cfg: ClusterConfig, tokens: list[str]) -> list[int]:
    """The parties whose entry lists accepted token digests without this client's token for it
    (a token file of another cluster, or of a client the cluster file does not know)."""
    return [i for i, token in enumerate(tokens)
            if cfg.party(i).client_token_sha256 and token_digest(token) not in cfg.party(i).client_token_sha256]


def _require_encoder(entry: Any) -> None:
    """Refuse to ``Query`` a causal LM (as the nodes would, FAILED_PRECONDITION)."""
    if entry.kind == "causal":
        raise QueryFailed(f"model {entry.model!r} is a causal LM: use Generate", grpc.StatusCode.FAILED_PRECONDITION)


def _catalogue_digests(info: Any) -> list[tuple[str, str, str, tuple[str, ...]]]:
    return sorted((m.model, m.kind, m.graph_sha256, tuple(m.labels)) for m in info.catalogue)


def _check_same_catalogue(infos: list[Any]) -> None:
    """Refuse parties that report different catalogues: they hold different deals (or a
    node lies about its graphs), and a query would fail or mislead."""
    first = _catalogue_digests(infos[0])
    for party, info in enumerate(infos[1:], 1):
        other = _catalogue_digests(info)
        if other != first:
            differ = sorted({m for m, *_ in set(first) ^ set(other)})
            raise QueryFailed(f"party {party} reports another catalogue than party 0 (models {differ} differ in "
                              "name, kind, graph digest or labels): the parties hold different deals; refusing to "
                              "send shares")


def _check_identity(cfg: ClusterConfig, party: int, info: Any) -> None:
    """Refuse a node that is not the party the configuration names at its address."""
    where = cfg.party(party).client_address
    if info.party_id != party:
        raise QueryFailed(f"the node at {where} says it is party {info.party_id}, not party {party}: refusing to "
                          f"send it party {party}'s shares")
    if info.model != cfg.model:
        raise QueryFailed(f"party {party} at {where} serves model {info.model!r}, the configuration says "
                          f"{cfg.model!r}")
    pinned = cfg.party(party).shares_sha256
    if pinned and info.shares_sha256 != pinned:
        raise QueryFailed(f"party {party} at {where} holds share file {info.shares_sha256[:16] or '(none)'}..., "
                          f"the configuration pins {pinned[:16]}...: refusing to send it shares")


def local_client(nodes: Any, timeout_s: float | None = None) -> SecureClient:
    """A client of a local cluster (``party.launch.LocalNodes``: its configuration and tokens;
    plaintext exactly when the cluster runs without TLS)."""
    return SecureClient(nodes.config, nodes.tokens, timeout_s, insecure=not nodes.tls)
