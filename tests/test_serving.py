"""The serving layer on the HE node (the MPC node's are in tests/test_nodes.py).

One HE node serves the random-weight tiny model at length 8 over TLS with a certificate
named ``he-node``, a client token, two query slots and a 3 s receive deadline. Tested:
idle unauthenticated streams do not starve it, silent authenticated ones hold their slot
only until the receive deadline, a wrong server name or a missing token is refused, the
standard health service answers, and nothing runs in plaintext without ``insecure``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from client.he import HeSecureClient, pb2, pb2_grpc
from client.sdk import QueryFailed
from party.certs import make_ca, make_leaf
from party.config import TOKEN_METADATA_KEY, ConfigError, HeNodeConfig, token_digest
from party.he_node import HeNode
from party.launch import free_ports
from party.serving import Admission, Rejected, ServingLimits, TokenCheck, run_in_worker, server_credentials
from secure.evaluate.he_model import tiny_he_model
from secure.runtime.execute import run_float
from tests.silent_streams import SilentStreams

TOKEN = "he-client-token"
RECEIVE_S = 3.0
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 150, 2]])
MASK = torch.ones(1, 8, dtype=torch.long)


@pytest.fixture(scope="module")
def he(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HeNodeConfig, HeNode]]:
    certs = tmp_path_factory.mktemp("he-certs")
    ca_key, ca_cert = make_ca(certs)
    cert, key = make_leaf(certs, "he-node", ca_key, ca_cert)
    make_leaf(certs, "impostor", ca_key, ca_cert)
    port = free_ports(1)[0]
    raw = {"address": f"127.0.0.1:{port}", "bind": f"127.0.0.1:{port}",
           "tls": {"ca": str(certs / "ca.pem"), "cert": str(cert), "key": str(key)},
           "client_token_sha256": [token_digest(TOKEN)], "models": [{"model": "tiny", "seq_lens": [8]}],
           "max_concurrent_queries": 2, "receive_timeout_s": RECEIVE_S}
    path = certs / "he.json"
    path.write_text(json.dumps(raw))
    cfg = HeNodeConfig.load(path)
    node = HeNode({("tiny", 8): tiny_he_model(8)}, list(cfg.client_token_sha256),
                  ServingLimits(max_streams=cfg.max_concurrent_queries, receive_timeout_s=cfg.receive_timeout_s))
    node.start(cfg.bind_address, server_credentials(cfg.cert, cfg.key))
    yield cfg, node
    node.stop()


def _channel(cfg: HeNodeConfig, name: str = "he-node") -> grpc.Channel:
    assert cfg.ca is not None
    return grpc.secure_channel(cfg.address, grpc.ssl_channel_credentials(cfg.ca.read_bytes()),
                               options=[("grpc.ssl_target_name_override", name)])


def _reference(node: HeNode) -> torch.Tensor:
    m = node.models[("tiny", 8)]
    (ref,), _ = run_float(m.graph, m.weights, m.client_inputs(IDS, MASK))
    return ref


def _query_matches(cfg: HeNodeConfig, node: HeNode) -> None:
    with HeSecureClient.from_config(cfg, TOKEN, timeout_s=120) as client:
        result = client.query("tiny", IDS, MASK)
    ref = _reference(node)
    cos = torch.nn.functional.cosine_similarity(result.outputs[0].flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def _settle(condition: Any, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.05)
    assert condition()


def _silent_queries(cfg: HeNodeConfig, count: int, token: str | None) -> SilentStreams:
    """``count`` HE Query streams that send nothing until closed."""
    channel = _channel(cfg)
    metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
    stub = pb2_grpc.HeInferenceStub(channel)
    return SilentStreams(lambda requests: stub.Query(requests, metadata=metadata, timeout=60), count, channel)


@pytest.mark.parametrize("count", [12, 100])
def test_idle_unauthenticated_streams_do_not_starve_the_he_node(he: tuple[HeNodeConfig, HeNode], count: int) -> None:
    cfg, node = he
    idle = _silent_queries(cfg, count, token=None)
    try:
        with _channel(cfg) as channel:
            assert pb2_grpc.HeInferenceStub(channel).Health(pb2.HealthRequest(), timeout=5).live
        _query_matches(cfg, node)
        # refused without a message read: by the token check, or, when more arrive at once than
        # the node has threads, by gRPC's concurrency limit
        codes = [code for code, _ in idle.outcomes(timeout_s=10)]
        assert len(codes) == count and set(codes) <= REFUSED and grpc.StatusCode.UNAUTHENTICATED in codes
    finally:
        idle.close()


def test_silent_streams_hold_he_slots_only_until_the_receive_deadline(he: tuple[HeNodeConfig, HeNode]) -> None:
    cfg, node = he
    silent = _silent_queries(cfg, 2, token=TOKEN)
    try:
        _settle(lambda: node.admission.active == 2)
        with HeSecureClient.from_config(cfg, TOKEN, timeout_s=30) as client, pytest.raises(QueryFailed) as info:
            client.query("tiny", IDS, MASK)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        ended = silent.outcomes(timeout_s=RECEIVE_S + 10)
        assert len(ended) == 2 and all(code != grpc.StatusCode.OK for code, _ in ended), ended
        assert max(t for _, t in ended) <= RECEIVE_S + 3, ended
    finally:
        silent.close()
    _settle(lambda: node.admission.active == 0)  # the worker releases its slot as it ends
    _query_matches(cfg, node)


def test_he_node_identity_token_and_standard_health(he: tuple[HeNodeConfig, HeNode]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cfg, _ = he
    # a client expecting another name refuses the node's certificate
    with _channel(cfg, name="impostor") as channel, pytest.raises(grpc.RpcError) as info:
        pb2_grpc.HeInferenceStub(channel).Health(pb2.HealthRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with HeSecureClient.from_config(cfg, "wrong") as client, pytest.raises(QueryFailed) as failed:
        client.plan("tiny", 8)
    assert failed.value.code == grpc.StatusCode.UNAUTHENTICATED and "not accepted" in str(failed.value)
    with _channel(cfg) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_he_plaintext_needs_insecure(tmp_path: Path) -> None:
    path = tmp_path / "he.json"
    path.write_text(json.dumps({"address": "127.0.0.1:1", "models": [{"model": "tiny"}],
                                "client_token_sha256": [token_digest(TOKEN)]}))
    cfg = HeNodeConfig.load(path)
    with pytest.raises(ConfigError, match="refusing to run in plaintext"):
        cfg.require_tls(insecure=False)
    with pytest.raises(ConfigError, match="refusing to run in plaintext"):
        HeSecureClient.from_config(cfg, TOKEN)
    from party.he_node import main

    assert main(["--config", str(path)]) == 2


def test_he_plaintext_cache_budget_is_configured_and_checked(tmp_path: Path) -> None:
    base = {"address": "127.0.0.1:1", "models": [{"model": "tiny"}], "client_token_sha256": [token_digest(TOKEN)]}
    assert HeNodeConfig.from_dict(base).plaintext_cache_mib == 4096
    assert HeNodeConfig.from_dict({**base, "plaintext_cache_mib": 0}).plaintext_cache_mib == 0
    with pytest.raises(ConfigError, match="plaintext_cache_mib must be >= 0"):
        HeNodeConfig.from_dict({**base, "plaintext_cache_mib": -5})
    with pytest.raises(ConfigError, match="bad HE configuration"):
        HeNodeConfig.from_dict({**base, "plaintext_cache_mib": "lots"})


# ---- the serving pieces alone -----------------------------------------------------------------
def test_token_check_is_by_digest() -> None:
    check = TokenCheck([token_digest("a"), token_digest("b").upper()])
    assert check.accepts("a") and check.accepts("b") and not check.accepts("c") and not check.accepts("")
    for token, fragment in ((None, "missing"), ("", "missing"), ("c", "not accepted")):
        with pytest.raises(Rejected, match=fragment) as info:
            check.check(token)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_admission_counts_and_refuses_beyond_its_limit() -> None:
    slots = Admission(2)
    slots.acquire()
    slots.acquire()
    with pytest.raises(Rejected) as info:
        slots.acquire()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and slots.active == 2
    slots.release()
    slots.acquire()
    assert slots.active == 2


def test_worker_bridge_yields_in_order_then_raises_and_always_releases() -> None:
    released = []

    def work(emit: Any) -> None:
        emit(1)
        emit(2)
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for event in run_in_worker(work, "test", on_exit=lambda: released.append(True)):
            got.append(event)
    assert got == [1, 2] and released == [True]
