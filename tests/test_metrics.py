"""The nodes' Prometheus metrics and JSON logs (``party.metrics``, ``party.logs``).

* MPC: three party nodes in this process (the 2-layer tiny BERT of tests/test_integrity.py,
  dealt for length 8, TLS), each with its own metrics endpoint on loopback. Two queries
  answered, one refused for its token and one for an unknown model: the counters, the
  latency histogram, the bytes and rounds (against what the nodes reported to the client,
  and sent = received over the three parties), the active queries and the peer links
  (down once a party stops); a malformed and a silent scrape do not stop the node serving;
  a stopped node leaves no port bound; the query's JSON log line.
* HE: a node with the endpoint its configuration names, on a 1-layer tiny model: one query
  answered (bytes equal to what its client counted, client trips), one refused for its
  token, one for its model; the port released when the node stops.
* Configuration: a bad ``metrics_port`` or ``metrics_bind`` is refused naming the file; the
  ``--log-json`` flag of both nodes.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.he import HeSecureClient, pb2, pb2_grpc
from client.sdk import QueryFailed, SecureClient
from party import he_node, node
from party.certs import make_cluster_certs
from party.config import TOKEN_METADATA_KEY, ClusterConfig, ConfigError, HeNodeConfig, token_digest
from party.he_node import HeNode
from party.launch import free_ports
from party.logs import JsonLines
from party.metrics import NodeMetrics
from party.node import PartyNode
from secure.evaluate.he_model import tiny_he_model
from tests import test_serving
from tests.test_integrity import SEQ, TOKEN, _deal_tiny, _inputs, _raw
from tests.test_nodes import _query_status

P = "secure_inference_"


# ---- helpers ----------------------------------------------------------------------------------
class Scrape:
    """One scrape of a metrics endpoint: ``value(name, **labels)`` (0 for a missing sample)."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            text = reply.read().decode()
        self.samples = {(s.name, frozenset(s.labels.items())): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((P + name, frozenset(labels.items())), 0.0)


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port, and a new listener can take it."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    return True


# ---- MPC ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterConfig, list[PartyNode]]]:
    root = tmp_path_factory.mktemp("metrics-mpc")
    _deal_tiny(root / "deal")
    make_cluster_certs(root / "certs")
    raw = _raw(root / "deal", root / "certs")
    ports = free_ports(9)
    for i, p in enumerate(raw["parties"]):
        p.update(peer_port=ports[3 * i], client_port=ports[3 * i + 1], metrics_port=ports[3 * i + 2])
    raw["deadline_s"] = 20
    cfg = ClusterConfig.from_dict(raw)
    nodes = [PartyNode(cfg, i) for i in range(3)]
    try:
        for n in nodes:
            n.start()
        with SecureClient(cfg, [TOKEN] * 3) as client:
            test_serving._settle(lambda: all(client.health()), timeout_s=30)
        yield cfg, nodes
    finally:
        for n in nodes:
            n.stop(0)


def test_mpc_metrics_count_what_happened(mpc: tuple[ClusterConfig, list[PartyNode]],
                                         caplog: pytest.LogCaptureFixture) -> None:
    cfg, nodes = mpc
    ports = [p.metrics_port for p in cfg.parties]
    assert all(n.metrics.port == port for n, port in zip(nodes, ports))
    before = [Scrape(port) for port in ports]
    caplog.set_level(logging.INFO, logger="party")
    with SecureClient(cfg, [TOKEN] * 3) as client:
        t0 = time.monotonic()
        results = [client.query(_inputs(SEQ)) for _ in range(2)]
        elapsed = time.monotonic() - t0
    address = cfg.party(0).client_address
    code, _ = _query_status(cfg, address, [], "not-the-token")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    header = pb2.QueryPart(header=pb2.QueryHeader(query_id="unknown-model", model="nope", seq_len=SEQ))
    code, _ = _query_status(cfg, address, [header], TOKEN)
    assert code == grpc.StatusCode.NOT_FOUND
    after = [Scrape(port) for port in ports]

    def delta(i: int, name: str, **labels: str) -> float:
        return after[i].value(name, **labels) - before[i].value(name, **labels)

    for i in range(3):
        assert delta(i, "queries_total", outcome="ok", code="OK") == 2
        assert delta(i, "query_duration_seconds_count", outcome="ok") == 2
        assert 0 < delta(i, "query_duration_seconds_sum", outcome="ok") <= elapsed
        assert delta(i, "query_sent_bytes_total") == sum(r.bytes_sent[i] for r in results) > 0
        assert delta(i, "query_rounds_total") == sum(r.rounds for r in results) > 0
        assert after[i].value("active_queries") == 0 and after[i].value("query_slots") == 8
        assert after[i].value("node_info", kind="party", node=f"party{i}") == 1
        assert all(after[i].value("peer_up", peer=f"party{j}") == 1 for j in range(3) if j != i)
    # every byte a party sent, another received
    assert sum(delta(i, "query_received_bytes_total") for i in range(3)) == \
        sum(delta(i, "query_sent_bytes_total") for i in range(3))
    assert delta(0, "queries_total", outcome="refused", code="UNAUTHENTICATED") == 1
    assert delta(0, "unauthenticated_calls_total", method="Query") == 1
    assert delta(0, "queries_total", outcome="refused", code="NOT_FOUND") == 1
    assert delta(0, "query_duration_seconds_count", outcome="ok") == 2  # refusals are not timed
    assert delta(1, "queries_total", outcome="refused", code="NOT_FOUND") == 0

    text = "\n".join(JsonLines("party").format(r) for r in caplog.records if r.name.startswith("party"))
    lines = [json.loads(line) for line in text.splitlines()]
    ends = [r for r in lines if r["logger"] == "party.metrics" and r.get("outcome") == "ok"]
    assert len(ends) == 6  # two queries on each of the three nodes of this process
    assert all(r["code"] == "OK" and r["rounds"] == results[0].rounds and r["seconds"] > 0 for r in ends)
    assert any(r.get("outcome") == "refused" and r.get("code") == "NOT_FOUND" for r in lines)
    assert TOKEN not in text and "tensor(" not in text


def test_bad_scrapes_do_not_stop_the_node(mpc: tuple[ClusterConfig, list[PartyNode]]) -> None:
    cfg, _ = mpc
    port = cfg.party(1).metrics_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port)) as silent, \
            socket.create_connection(("127.0.0.1", port)) as garbage:
        garbage.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        garbage.settimeout(10)
        assert b"400" in garbage.recv(4096)  # Bad Request, answered in its own thread
        silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # and then nothing
        assert Scrape(port).value("query_slots") == 8
        with SecureClient(cfg, [TOKEN] * 3) as client:
            assert client.query(_inputs(SEQ)).outputs[0].shape[-1] > 0


def test_stopped_party_is_reported_down_and_frees_its_port(mpc: tuple[ClusterConfig, list[PartyNode]]) -> None:
    cfg, nodes = mpc
    port = cfg.party(2).metrics_port
    assert port is not None
    nodes[2].stop(0)
    assert _port_free(port)
    test_serving._settle(lambda: Scrape(cfg.party(0).metrics_port or 0).value("peer_up", peer="party2") == 0,
                         timeout_s=10)
    assert Scrape(cfg.party(0).metrics_port or 0).value("peer_up", peer="party1") == 1


# ---- HE ---------------------------------------------------------------------------------------------
def _he_node(tmp_path: Path) -> tuple[HeNodeConfig, HeNode]:
    """An HE node on loopback with its metrics endpoint as its configuration says, serving a
    1-layer, hidden-32 tiny model at length 8 (a third of test_serving's node's query time),
    in plaintext (TLS and tokens on the HE node are tests/test_serving.py's)."""
    grpc_port, metrics_port = free_ports(2)
    raw = {"address": f"127.0.0.1:{grpc_port}", "bind": f"127.0.0.1:{grpc_port}", "metrics_port": metrics_port,
           "client_token_sha256": [token_digest(test_serving.TOKEN)], "models": [{"model": "tiny", "seq_lens": [8]}]}
    (tmp_path / "he.json").write_text(json.dumps(raw))
    cfg = HeNodeConfig.load(tmp_path / "he.json")
    node = HeNode({("tiny", 8): tiny_he_model(8, hidden=32, layers=1)}, list(cfg.client_token_sha256))
    node.start(cfg.bind_address, None)
    assert cfg.metrics_port is not None and cfg.metrics_bind == "127.0.0.1"
    node.metrics.serve(cfg.metrics_bind, cfg.metrics_port)
    return cfg, node


def test_he_metrics_count_what_happened(tmp_path: Path) -> None:
    cfg, node = _he_node(tmp_path)
    port = cfg.metrics_port or 0
    try:
        before = Scrape(port)
        with HeSecureClient.from_config(cfg, test_serving.TOKEN, timeout_s=120, insecure=True) as client:
            result = client.query("tiny", test_serving.IDS, test_serving.MASK)
        mid = Scrape(port)
        with HeSecureClient.from_config(cfg, "wrong", timeout_s=30, insecure=True) as client, \
                pytest.raises(QueryFailed):
            client.query("tiny", test_serving.IDS, test_serving.MASK)  # refused at its first call, the plan
        start = pb2.HeClientMessage(start=pb2.HeStart(model="nope", seq_len=8, input_ciphertexts=1))
        for token, expected in ((test_serving.TOKEN, grpc.StatusCode.NOT_FOUND),
                                ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
            with grpc.insecure_channel(cfg.address) as channel, pytest.raises(grpc.RpcError) as info:
                list(pb2_grpc.HeInferenceStub(channel).Query(iter([start]), metadata=((TOKEN_METADATA_KEY, token),),
                                                             timeout=10))
            assert info.value.code() == expected
        after = Scrape(port)
    finally:
        node.stop()
    assert _port_free(port)

    assert mid.value("queries_total", outcome="ok", code="OK") - before.value("queries_total", outcome="ok",
                                                                              code="OK") == 1
    assert mid.value("query_duration_seconds_count", outcome="ok") - \
        before.value("query_duration_seconds_count", outcome="ok") == 1
    assert mid.value("query_received_bytes_total") - before.value("query_received_bytes_total") == result.bytes_up
    assert mid.value("query_sent_bytes_total") - before.value("query_sent_bytes_total") == result.bytes_down
    assert mid.value("query_rounds_total") - before.value("query_rounds_total") == result.refreshes > 0
    assert after.value("queries_total", outcome="refused", code="NOT_FOUND") == 1
    assert after.value("queries_total", outcome="refused", code="UNAUTHENTICATED") == 1
    assert after.value("unauthenticated_calls_total", method="Plan") == 1
    assert after.value("unauthenticated_calls_total", method="Query") == 1
    assert after.value("active_queries") == 0 and after.value("node_info", kind="he", node="he-node") == 1
    assert after.value("peer_up", peer="party1") == 0  # no peers on an HE node


# ---- configuration and flags ------------------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ({"metrics_port": 70000}, "metrics_port must be a TCP port number from 1 to 65535, got 70000"),
    ({"metrics_port": "9100"}, "metrics_port must be a TCP port number from 1 to 65535, got '9100'"),
    ({"metrics_port": True}, "metrics_port must be a TCP port number from 1 to 65535, got True"),
    ({"metrics_port": 9100, "metrics_bind": "0.0.0.0:9100 please"}, "metrics_bind must be an IP address or a host"),
    ({"metrics_port": 50011}, "metrics_port 50011 is also its peer or client port"),
])
def test_bad_metrics_setting_is_refused_naming_the_file(tmp_path: Path, setting: dict[str, Any], message: str
                                                        ) -> None:
    raw: dict[str, Any] = {"model": "tiny", "parties": [{"id": i, "host": "127.0.0.1", "peer_port": 50001 + i,
                                                         "client_port": 50011 + i} for i in range(3)]}
    raw["parties"][0].update(setting)
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        ClusterConfig.load(path)
    assert str(path) in str(info.value) and message in str(info.value)
    if "peer or client" not in message:
        he_raw = {"address": "127.0.0.1:50070", "models": [{"model": "tiny"}], **setting}
        (tmp_path / "he.json").write_text(json.dumps(he_raw))
        with pytest.raises(ConfigError) as info:
            HeNodeConfig.load(tmp_path / "he.json")
        assert str(tmp_path / "he.json") in str(info.value) and message in str(info.value)


def test_metrics_setting_round_trips_and_defaults_to_loopback() -> None:
    raw: dict[str, Any] = {"model": "tiny", "log_json": True,
                           "parties": [{"id": i, "host": "127.0.0.1", "peer_port": 50001 + i,
                                        "client_port": 50011 + i} for i in range(3)]}
    raw["parties"][1]["metrics_port"] = 9101
    cfg = ClusterConfig.from_dict(raw)
    assert (cfg.party(1).metrics_port, cfg.party(1).metrics_bind, cfg.party(0).metrics_port) == (9101, "127.0.0.1",
                                                                                                 None)
    again = ClusterConfig.from_dict(cfg.to_dict())
    assert again.parties == cfg.parties and again.log_json
    with pytest.raises(ConfigError, match="metrics_port 50070 is also the node's client port"):
        HeNodeConfig.from_dict({"address": "127.0.0.1:50070", "models": [{"model": "tiny"}], "metrics_port": 50070})


@pytest.mark.parametrize("main, args", [(node.main, ["--party", "0"]), (he_node.main, [])])
def test_log_json_flag(main: Any, args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["--config", str(tmp_path / "missing.json"), *args, "--log-json"]) == 2
    finally:  # main set the process's logging up: give pytest's back
        root.handlers[:] = handlers
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["level"] == "ERROR" and "cannot start" in line["message"] and "does not exist" in line["message"]


@pytest.mark.parametrize("running, ok, code, error, outcome, status", [
    (True, True, None, False, "ok", "OK"),
    (False, False, grpc.StatusCode.NOT_FOUND, True, "refused", "NOT_FOUND"),
    (False, False, grpc.StatusCode.INTERNAL, True, "failed", "INTERNAL"),  # the node's fault, not a refusal
    (False, False, None, False, "failed", "CANCELLED"),  # the client went away while uploading
    (True, False, grpc.StatusCode.ABORTED, True, "failed", "ABORTED"),
    (True, False, None, True, "failed", "UNKNOWN"),  # an exception without a status
])
def test_query_outcome_classification(running: bool, ok: bool, code: grpc.StatusCode | None, error: bool,
                                      outcome: str, status: str) -> None:
    metrics = NodeMetrics("party", "party0", 2, lambda: 0)
    record = metrics.query()
    if running:
        record.running()
    if ok:
        record.succeeded()
    record.finish(code, error)
    get = metrics.registry.get_sample_value
    assert get(P + "queries_total", {"outcome": outcome, "code": status}) == 1
    assert get(P + "query_duration_seconds_count", {"outcome": outcome}) == (1 if running else None)


def test_generation_metrics_count_sessions_and_steps() -> None:
    """A party node's generation metrics: live sessions when scraped, steps and their seconds
    by kind, their traffic with the queries'."""
    live = [2]
    metrics = NodeMetrics("party", "party0", 8, lambda: 0)
    metrics.track_generation(lambda: live[0])
    metrics.generation_step("prefill", 0.5, 1000, 40)
    metrics.generation_step("decode", 0.25, 100, 30)
    metrics.generation_step("decode", 0.25, 100, 30)
    port = metrics.serve("127.0.0.1", 0)
    try:
        scrape = Scrape(port)
        assert scrape.value("generation_sessions") == 2
        assert scrape.value("generation_steps_total", kind="decode") == 2
        assert scrape.value("generation_steps_total", kind="prefill") == 1
        assert scrape.value("generation_step_seconds_total", kind="decode") == 0.5
        assert scrape.value("query_sent_bytes_total") == 1200 and scrape.value("query_rounds_total") == 100
        live[0] = 0
        assert Scrape(port).value("generation_sessions") == 0
    finally:
        metrics.stop()
