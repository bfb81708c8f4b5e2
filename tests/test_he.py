"""CKKS backend: each operation and form against plaintext, the planner, malformed input.

Tolerances: CKKS at scale 2^30 gives about 1e-5 absolute error per fresh value; rotations
and refreshes add a few 1e-5. Every check below states its bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure.approx.float_backend import FloatOps
from secure.approx.gelu import poly_gelu
from secure.approx.norms import layer_norm
from secure.approx.softmax import power_softmax
from secure.evaluate.he_model import tiny_he_model
from secure.he.client import HeClient, RefreshCheck, pack_sections, server_engine
from secure.he.engine import MASK_BOUND, HeFormatError
from secure.he.layout import Cipher, Plain
from secure.he.ops import HeOps, HeUnsupportedError
from secure.he.params import PARAM_SETS, CkksParams, HeParameterError
from secure.he.refresh import REFRESH_BOUND, REFRESH_BOUNDS_META, RefreshSession
from secure.runtime.execute import run_float
from secure.runtime.execute_he import run_he
from secure.runtime.he_planner import HeDepthError, plan

P = PARAM_SETS[0]
STRIDE = 16  # every tensor below has 16 rows: columns 16 slots apart, 256 per ciphertext
# baby and giant steps, column sums, and the right moves that make a narrow input periodic
STEPS = sorted({i * STRIDE for i in range(1, 16)} | {j * 256 for j in range(1, 16)}
               | {STRIDE << k for k in range(8)} | {P.slots - (STRIDE << k) for k in range(8)})


class Spy:
    """A refresh link that records what the client decrypts."""

    def __init__(self, client: HeClient) -> None:
        self.client = client
        self.seen: list[np.ndarray] = []
        self.checks: list[RefreshCheck] = []

    def refresh(self, items, check):
        for blobs, _, _ in items:
            self.seen.append(np.concatenate([self.client.decrypt_vector(b) for b in blobs]))
        self.checks.append(check)
        return self.client.refresh(items, check)


@pytest.fixture(scope="module")
def he():
    client = HeClient(P, STEPS)
    engine = server_engine(client.public_context())
    spy = Spy(client)
    # these forms run outside any graph node, on values up to a few hundred (x^4 of |x| < 5):
    # their refreshes are bounded accordingly (a calibrated graph gets B per node instead)
    ops = HeOps(RefreshSession(engine, spy, default_bound=2.0**10))

    def enc(x: torch.Tensor) -> Cipher:
        blobs, index = client.encrypt(x.to(torch.float64))
        return Cipher([engine.deserialize(b) for b in blobs], index)

    def dec(c: Cipher) -> torch.Tensor:
        return client.decrypt([engine.serialize(ct) for ct in c.cts], c.index)

    return ops, enc, dec, spy, engine


def _r(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale


def test_elementwise_and_broadcast_within_1e4(he):
    ops, enc, dec, _, _ = he
    x, y = _r(16, 40), _r(16, 40, seed=1)
    cx, cy = enc(x), enc(y)
    assert (dec(ops.add(cx, cy)) - (x + y)).abs().max() < 1e-4
    assert (dec(ops.sub(cx, cy)) - (x - y)).abs().max() < 1e-4
    assert (dec(ops.mul(cx, cy)) - x * y).abs().max() < 1e-4
    assert (dec(ops.mul_public(cx, 0.37)) - 0.37 * x).abs().max() < 1e-4
    c = _r(40, seed=2)
    assert (dec(ops.add_public(cx, c)) - (x + c)).abs().max() < 1e-4
    assert (dec(ops.mul(cx, Plain(c))) - x * c).abs().max() < 1e-4
    row = ops.sum(cx, -1, keepdim=True)  # replicated over the columns: broadcasting is free
    assert (dec(row) - x.sum(-1, keepdim=True)).abs().max() < 1e-3
    assert (dec(ops.sub(cx, row)) - (x - x.sum(-1, keepdim=True))).abs().max() < 1e-3
    t = ops.map_shape(cx, lambda v: v.view(2, 8, 40).transpose(0, 1))
    assert torch.allclose(dec(t), x.view(2, 8, 40).transpose(0, 1), atol=1e-4)
    col, p = _r(16, 1, seed=11), _r(16, 8, seed=12)  # an expanded cipher meets a public matrix
    wide = ops.map_shape(enc(col), lambda v: v.expand(16, 8))
    assert (dec(ops.mul(wide, Plain(p))) - col * p).abs().max() < 1e-4
    assert (dec(ops.add(wide, Plain(p))) - (col + p)).abs().max() < 1e-4


@settings(max_examples=6, deadline=None)
@given(k_in=st.integers(1, 300), n_out=st.integers(1, 300), seed=st.integers(0, 99))
def test_linear_by_the_diagonal_method_matches_plaintext(he, k_in, n_out, seed):
    ops, enc, dec, _, _ = he
    x, w = _r(16, k_in, seed=seed), _r(k_in, n_out, scale=k_in**-0.5, seed=seed + 1)
    got = dec(ops.matmul(enc(x), Plain(w)))
    assert (got - x @ w).abs().max() < 1e-3


def test_linear_layers_of_one_input_run_as_one_with_fewer_rotations(he):
    """Query, key and value of one input: one layer on the concatenated weights, each result a
    column slice of it, equal to the layers apart, with the input's rotations done once."""
    ops, enc, dec, _, engine = he
    x = _r(16, 300, seed=21)
    ws = [_r(300, n, scale=300**-0.5, seed=22 + n) for n in (300, 300, 100)]
    cx = enc(x)
    before = engine.stats.count["rotation"]
    fused = ops.matmul_many([(cx, Plain(w)) for w in ws])
    fused_rotations = engine.stats.count["rotation"] - before
    before = engine.stats.count["rotation"]
    apart = [ops.matmul(cx, Plain(w)) for w in ws]
    apart_rotations = engine.stats.count["rotation"] - before
    for f, a, w in zip(fused, apart, ws):
        assert f.shape == a.shape and (dec(f) - x @ w).abs().max() < 1e-3
    assert fused_rotations < apart_rotations


def test_a_public_dot_of_terms_at_several_levels_takes_one_rescale_per_ciphertext(he):
    """Terms of one layout at different levels (a Chebyshev basis): moved down by a modulus
    switch, multiplied and summed with one rescale; the same value as term by term."""
    ops, enc, dec, _, engine = he
    x = _r(16, 40, seed=31) * 0.5
    t1 = enc(x)
    t2 = ops.mul(t1, t1)  # one level below t1
    t3 = ops.mul(t2, t1)  # two levels below
    coeffs = [0.5, -1.25, 2.0]
    before = engine.stats.count["rescale"]
    got = ops.dot_public([t1, t2, t3], coeffs, bias=0.1)
    assert engine.stats.count["rescale"] - before == len(got.cts)
    want = 0.1 + 0.5 * x - 1.25 * x**2 + 2.0 * x**3
    assert (dec(got) - want).abs().max() < 1e-4


def test_ciphertext_matmul_and_sum_over_a_middle_dim(he):
    ops, enc, dec, _, engine = he
    q, k = _r(1, 2, 8, 4), _r(1, 2, 4, 8, seed=3)
    assert (dec(ops.matmul(enc(q), enc(k))) - q @ k).abs().max() < 1e-3
    # the slab products are summed before one key switch per output ciphertext
    q, k = _r(12, 16, 32, seed=5) * 0.3, _r(12, 32, 16, seed=6) * 0.3  # attention's shape: 24 products
    before = {name: engine.stats.count[name] for name in ("ct-ct product", "relinearize")}
    assert (dec(ops.matmul(enc(q), enc(k))) - q @ k).abs().max() < 1e-3
    products = engine.stats.count["ct-ct product"] - before["ct-ct product"]
    assert engine.stats.count["relinearize"] - before["relinearize"] == 1 < products
    z = _r(2, 8, 5, seed=4)
    assert (dec(ops.sum(enc(z), 1, keepdim=True)) - z.sum(1, keepdim=True)).abs().max() < 1e-3


def test_forms_match_their_float_evaluation(he):
    """Power-Softmax, LayerNorm (bounded rsqrt) and the GeLU polynomial: CKKS against the
    same form on floats, within 1e-3 (several refreshes happen inside each)."""
    ops, enc, dec, _, _ = he
    s = _r(2, 8, 16, scale=1.5, seed=5)
    mask = (torch.arange(16) < 12).to(torch.float64)
    ref = power_softmax(FloatOps(), s, p=4, upper=50.0, iterations=8, mask=mask, normalize=True)
    got = dec(power_softmax(ops, enc(s), p=4, upper=50.0, iterations=8, mask=mask, normalize=True))
    assert (got - ref).abs().max() < 1e-3
    assert bool((got[..., 12:].abs() < 1e-3).all())  # masked keys are 0, up to the CKKS noise the test allows
    x, g, b = _r(16, 32, scale=3.0, seed=6), _r(32, seed=7) * 0.1 + 1, _r(32, seed=8) * 0.1
    ref = layer_norm(FloatOps(), x, g, b, variance_range=(0.5, 50.0))
    got = dec(layer_norm(ops, enc(x), Plain(g), Plain(b), variance_range=(0.5, 50.0)))
    assert (got - ref).abs().max() < 1e-3
    assert (ref - torch.nn.functional.layer_norm(x, (32,), g, b)).abs().max() < 1e-3  # the form itself
    x = _r(16, 32, scale=2.0, seed=9)
    got = dec(poly_gelu(ops, enc(x), 8.0))
    assert (got - poly_gelu(FloatOps(), x, 8.0)).abs().max() < 1e-3
    assert (got - torch.nn.functional.gelu(x)).abs().max() < 0.03  # the polynomial's own error at bound 8


def test_a_refresh_shows_the_client_only_masked_values(he):
    ops, enc, _, spy, _ = he
    x = _r(16, 8, scale=0.5, seed=10)
    spy.seen.clear()
    ops.session.refresh([enc(x)])
    seen = spy.seen[0]
    used = seen[np.abs(seen) > 0]
    assert used.size > 100 and np.std(used) > MASK_BOUND / 4  # uniform on [-2^20, 2^20], not |x| < 3


def test_comparisons_have_no_ckks_form(he):
    ops, enc, _, _, _ = he
    with pytest.raises(HeUnsupportedError, match="no CKKS form"):
        ops.less_than_public(enc(_r(16, 2)), [0.0])
    with pytest.raises(HeUnsupportedError, match="Power-Softmax"):
        ops.max(enc(_r(16, 2)))


def test_malformed_ciphertext_and_context_get_clear_errors(he):
    _, _, _, _, engine = he
    with pytest.raises(HeFormatError, match="malformed Ciphertext"):
        engine.deserialize(b"\x00garbage" * 20)
    with pytest.raises(HeFormatError, match="bad magic"):
        server_engine(b"not a context")
    with pytest.raises(HeFormatError, match="secret key"):
        server_engine(pack_sections({"params": P.to_dict()}, [("public", b""), ("relin", b""), ("secret", b"x")]))
    with pytest.raises(HeFormatError, match="malformed PublicKey"):
        server_engine(pack_sections({"params": P.to_dict()}, [("public", b"junk"), ("relin", b"junk")]))
    with pytest.raises(HeFormatError, match="bad parameters"):
        server_engine(pack_sections({"params": {"poly_degree": 8192}}, []))
    with pytest.raises(HeParameterError, match="128-bit"):
        CkksParams(8192, 40, 60, 4, 60)


@pytest.fixture(scope="module")
def small_model():
    return tiny_he_model(seq=8, hidden=32, layers=1, heads=2)


def test_planner_refuses_a_graph_that_cannot_fit_without_refresh(small_model):
    m = small_model
    inputs = m.client_inputs(torch.arange(1, 9).view(1, 8), torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(HeDepthError) as err:
        plan(m.graph, m.weights, inputs, allow_refresh=False)
    msg = str(err.value)
    assert "levels missing" in msg and "N=32768" in msg and "node" in msg and "encoder" in msg
    ok = plan(m.graph, m.weights, inputs)  # with refresh: the cheapest set, its rotation keys
    assert ok.params == PARAM_SETS[0] and ok.refreshes > 0 and ok.steps and ok.depth > 25


def test_tiny_model_end_to_end_under_ckks(small_model):
    m = small_model
    inputs = m.client_inputs(torch.tensor([[5, 17, 3, 99, 42, 8, 150, 2]]), torch.ones(1, 8, dtype=torch.long))
    (ref,), _ = run_float(m.graph, m.weights, inputs)
    run = run_he(m.graph, m.weights, inputs)
    got = run.outputs[0]
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and (got - ref).abs().max() < 1e-2
    assert run.refreshes == run.plan.refreshes  # the planner predicted the real run
    parts = {s.name for s in run.spans}
    assert any("attention" in p for p in parts) and run.bytes["refresh_from_client"] > 0


def test_he_queries_over_grpc_with_bad_input_answered_and_the_node_serving_on(small_model):
    import grpc

    from client.he import HeSecureClient, pb2, pb2_grpc
    from client.sdk import QueryFailed
    from party.config import TOKEN_METADATA_KEY, token_digest
    from party.he_node import HeNode

    node = HeNode({("tiny", 8): small_model}, [token_digest("secret-token")])
    port = node.start("127.0.0.1:0", None)  # plaintext: tests/test_serving.py covers TLS
    ids, mask = torch.tensor([[5, 17, 3, 99, 42, 8, 150, 2]]), torch.ones(1, 8, dtype=torch.long)
    stub = pb2_grpc.HeInferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def raw(*messages):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Query(iter(messages), metadata=((TOKEN_METADATA_KEY, "secret-token"),), timeout=60))
        return err.value

    start = pb2.HeStart(model="tiny", seq_len=8, input_ciphertexts=1,
                        attention_mask=mask.numpy().astype("<i8").tobytes())
    try:
        e = raw(pb2.HeClientMessage(start=start), pb2.HeClientMessage(blob=pb2.HeBlob(kind="context", data=b"junk")))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "public context" in e.details()
        client = HeClient(PARAM_SETS[0], plan(small_model.graph, small_model.weights,
                                              small_model.client_inputs(ids, mask)).steps)
        ctx = [pb2.HeClientMessage(blob=p) for p in blob_pieces_of(client.public_context())]
        e = raw(pb2.HeClientMessage(start=start), *ctx,
                pb2.HeClientMessage(blob=pb2.HeBlob(kind="input", data=b"\x00garbage ciphertext")))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "input ciphertext" in e.details()
        e = raw(pb2.HeClientMessage(blob=pb2.HeBlob(kind="input", data=b"x")))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "start" in e.details()
        with HeSecureClient(f"127.0.0.1:{port}", "wrong", insecure=True) as bad, pytest.raises(QueryFailed,
                                                                                                match="token"):
            bad.query("tiny", ids, mask)
        with HeSecureClient(f"127.0.0.1:{port}", "secret-token", timeout_s=120, insecure=True) as c:
            with pytest.raises(QueryFailed, match="unknown model"):
                c.query("other", ids, mask)
            seen = []
            result = c.query("tiny", ids, mask, progress=lambda done, total: seen.append(done))
        (ref,), _ = run_float(small_model.graph, small_model.weights, small_model.client_inputs(ids, mask))
        cos = torch.nn.functional.cosine_similarity(result.outputs[0].flatten(), ref.flatten(), dim=0)
        assert cos > 0.999 and result.refreshes > 0 and seen and result.spans
    finally:
        node.stop()


def blob_pieces_of(data: bytes):
    from client.he import pb2
    from secure.transport.he_wire import blob_pieces

    return list(blob_pieces(pb2.HeBlob, "context", 0, 0, data))


# ---- what a refresh promises, what the outputs carry (issue 10, item 7) -------------------

def test_a_refresh_beyond_its_bound_is_refused_by_the_client_naming_the_node(he):
    from secure.graph.ir import Node
    from secure.he.breakdown import HeTracer
    from secure.he.client import RefreshBoundError

    ops, enc, dec, spy, _ = he
    node = Node("big", "aten.mul.Tensor", [], {}, None, True, "encoder.layer.0.output")
    ops.session.refresh_bounds["big"] = REFRESH_BOUND  # as a calibrated graph would say for this node
    with HeTracer(ops.session)(node):
        ok = ops.session.refresh([enc(torch.full((16, 8), 100.0))])[0]  # |value| <= B = 2^7: accepted
        assert spy.checks[-1] == RefreshCheck("node big (aten.mul.Tensor) in encoder.layer.0.output",
                                              [REFRESH_BOUND], [MASK_BOUND])
        # |value + mask| >= 3 2^20 - 2^20 > M + B whatever the mask: certain refusal
        with pytest.raises(RefreshBoundError, match=r"node big \(aten.mul.Tensor\) in encoder\.layer\.0\.output.*"
                                                    r"\|value\| > B"):
            ops.session.refresh([enc(torch.full((16, 8), 3 * MASK_BOUND))])
    del ops.session.refresh_bounds["big"]
    assert ops.session.node is None and (dec(ok) - 100.0).abs().max() < 1e-4


def test_masks_that_would_hide_less_than_2_to_minus_13_are_refused_on_both_sides(he):
    from secure.graph.ir import Node
    from secure.he.breakdown import HeTracer
    from secure.he.client import RefreshBoundError
    from secure.he.refresh import mask_amplitude

    ops, enc, _, spy, _ = he
    assert mask_amplitude(2.0**7, "x") == MASK_BOUND and mask_amplitude(2.0**13, "x") == 2.0**26  # B / M = 2^-13
    ops.session.refresh_bounds["wide"] = 2.0**22  # would need M = 2^35, above the 2^34 that precision allows
    try:
        wide = Node("wide", "secure.layer_norm", [], {}, None, True, "encoder.embeddings.LayerNorm")
        with HeTracer(ops.session)(wide):
            with pytest.raises(RefreshBoundError, match=r"node wide .* in encoder\.embeddings\.LayerNorm.*2\^-13"):
                ops.session.refresh([enc(_r(16, 8))])
    finally:
        del ops.session.refresh_bounds["wide"]
    blobs, _ = spy.client.encrypt(_r(16, 8))
    with pytest.raises(RefreshBoundError, match="node n: a mask of 1.04858e.06 for values up to 1024"):
        spy.client.refresh([(blobs, None, 1)], RefreshCheck("node n", [2.0**10], [MASK_BOUND]))


@pytest.fixture(scope="module")
def tiny_output():
    """The tiny model (hidden 32, 1 layer) at seq 16 under CKKS with its calibrated refresh
    bounds: (model, ops, the raw output cipher, all slots of a cipher, its elements)."""
    from secure.he.breakdown import HeTracer
    from secure.runtime.interpreter import Interpreter

    m = tiny_he_model(seq=16, hidden=32, layers=1, heads=2)
    inputs = m.client_inputs(torch.arange(3, 19).view(1, 16), torch.ones(1, 16, dtype=torch.long))
    the_plan = plan(m.graph, m.weights, inputs)
    client = HeClient(the_plan.params, the_plan.steps)
    engine = server_engine(client.public_context())
    ops = HeOps(RefreshSession(engine, Spy(client), refresh_bounds=m.graph.meta[REFRESH_BOUNDS_META]))
    blobs, index = client.encrypt(inputs[m.embeds_input])
    (raw,), _ = Interpreter(m.graph, ops, HeTracer(ops.session)).run(
        {k: Plain(v.to(torch.float64)) for k, v in m.weights.items()},
        {m.embeds_input: Cipher([engine.deserialize(b) for b in blobs], index),
         "attention_mask": inputs["attention_mask"]})

    def slots(c: Cipher, part: str = "real") -> np.ndarray:
        out = []
        for ct in c.cts:
            pt = client.ctx.sa.Plaintext()
            client._decryptor.decrypt(client.ctx.load("Ciphertext", engine.serialize(ct)), pt)
            out.append(getattr(np.asarray(client.ctx.encoder.decode_complex(pt)), part))
        return np.concatenate(out)

    def elements(c: Cipher) -> torch.Tensor:
        return client.decrypt([engine.serialize(ct) for ct in c.cts], c.index)

    return m, ops, raw, slots, elements


def _unused(c: Cipher, slots: int) -> np.ndarray:
    used = np.zeros(len(c.cts) * slots, dtype=bool)
    used[c.index.reshape(-1).numpy()] = True
    return ~used


def test_refresh_bounds_are_calibrated_per_node_and_hold_on_a_query(tiny_output):
    m, ops, _, _, _ = tiny_output
    bounds = m.graph.meta[REFRESH_BOUNDS_META]
    assert bounds["layer_norm"] >= 2.0**12  # the embeddings' LayerNorm: Newton's y^2 ~ 1/var reaches 1.3e3
    assert min(bounds.values()) == REFRESH_BOUND and all(np.log2(b) % 1 == 0 for b in bounds.values())
    checks = ops.session.link.checks
    assert ops.session.refreshes == len(checks) > 0 and {c.node for c in checks} >= {
        "node layer_norm (secure.layer_norm) in encoder.embeddings.LayerNorm"}
    assert all(mask >= bound * 2**13 for c in checks for bound, mask in zip(c.bounds, c.masks))


def test_unused_output_slots_decrypt_to_zero(tiny_output):
    _, ops, raw, slots, elements = tiny_output
    before = slots(raw)[_unused(raw, ops.slots)]
    assert np.abs(before).max() > 0.1  # period copies of the pooled row (measured 1.4)
    (out,) = ops.finish_outputs([raw])
    after = slots(out)[_unused(out, ops.slots)]
    assert np.abs(after).max() < 1e-3  # CKKS noise only (measured 9e-6)
    assert (elements(out) - elements(raw)).abs().max() < 1e-4


def test_flooding_moves_outputs_by_at_most_its_stated_cost(tiny_output):
    _, ops, raw, slots, elements = tiny_output
    (plain,) = ops.finish_outputs([raw])
    (flooded,) = ops.finish_outputs([raw], flood_bits=10)
    d = (elements(flooded) - elements(plain)).abs()
    assert d.max() <= 2.0**-10 + 3e-5 and d.mean() > 2.0**-13  # uniform on [-2^-10, 2^-10]: mean 2^-11
    for part in ("real", "imag"):  # every slot, both parts: the client's decryption shows no bare noise
        noise = np.abs(slots(flooded, part) - slots(plain, part))
        assert noise.max() <= 2.0**-10 + 3e-5 and np.median(noise) > 2.0**-12


# ---- encoded weights kept between queries (issue 11, item 4) ----------------------------

def test_cached_diagonals_give_the_same_linear_and_are_reused_across_engines(he):
    from secure.he.plain_cache import PlainCache

    ops, enc, dec, _, engine = he
    x, w = _r(16, 40, seed=3), _r(40, 24, scale=40**-0.5, seed=4)
    cold = dec(ops.matmul(enc(x), Plain(w)))
    cache = PlainCache()
    engine.plain_cache = cache
    try:
        first = dec(ops.matmul(enc(x), Plain(w)))
        filled = cache.summary()
        assert filled["entries"] == filled["misses"] > 0 and filled["hits"] == 0
        other = server_engine(ops.session.link.client.public_context())  # another query's engine, same keys
        other.plain_cache = cache
        again = dec(HeOps(RefreshSession(other, ops.session.link)).matmul(enc(x), Plain(w)))
        assert cache.hits == filled["entries"] and cache.misses == filled["misses"]  # every diagonal reused
        # each run encrypts x afresh: equal up to CKKS noise (about 1e-5)
        assert (first - cold).abs().max() < 1e-4 and (again - x @ w).abs().max() < 1e-3
        changed = w.clone()
        changed[0, 0] += 1.0  # same shape, other values: must never hit
        got = dec(ops.matmul(enc(x), Plain(changed)))
        assert (got - x @ changed).abs().max() < 1e-3 and cache.misses > filled["misses"]
    finally:
        engine.plain_cache = None


def test_the_plaintext_cache_keeps_nothing_beyond_its_budget():
    from secure.he.plain_cache import PlainCache, weight_key

    cache = PlainCache(budget_bytes=100)
    assert cache.get("a", 2, 1.0, 60, lambda: "pt-a") == "pt-a"
    assert cache.get("b", 2, 1.0, 60, lambda: "pt-b") == "pt-b"  # 120 > 100: encoded, not kept
    assert cache.get("a", 2, 1.0, 60, lambda: "other") == "pt-a"
    assert cache.get("b", 2, 1.0, 60, lambda: "again") == "again"
    assert cache.summary() == {"entries": 1, "mib": 60 / 2**20, "hits": 1, "misses": 3}
    a = np.arange(6.0).reshape(2, 3)
    assert weight_key(a, 16) == weight_key(a.copy(), 16) != weight_key(a, 32) != weight_key(a.T.copy(), 16)
    with pytest.raises(ValueError, match="budget"):
        PlainCache(-1)


def test_range_misses_name_the_nodes_a_query_leaves(small_model):
    from secure.evaluate.he_ranges import range_misses

    m = small_model
    ids = torch.tensor([[5, 17, 3, 99, 42, 8, 150, 2]])
    normal = m.client_inputs(ids, torch.ones(1, 8, dtype=torch.long))
    loud = dict(normal)
    loud[m.embeds_input] = normal[m.embeds_input] * 1e3  # variance far above the embeddings' range
    assert range_misses(m.graph, m.weights, [normal]) == [[]]
    (missed,) = range_misses(m.graph, m.weights, [loud])
    ln = [n.name for n in m.graph.nodes if n.op == "secure.layer_norm"][0]
    assert ln in missed


def test_products_with_all_zero_plaintexts_give_encrypted_zeros(he):
    """A padded query masks whole ciphertexts of attention scores to 0: SEAL refuses such a
    product (a transparent ciphertext), so the engine encrypts zeros instead (seen at 128 tokens)."""
    ops, enc, dec, _, engine = he
    x = _r(16, 40, seed=5)
    c = enc(x)
    zero = Cipher([engine.mul_plain(ct, np.zeros(engine.slots)) for ct in c.cts], c.index)
    assert dec(zero).abs().max() < 1e-4
    assert all(engine.level(z) == engine.level(ct) - 1 for z, ct in zip(zero.cts, c.cts))
    half = np.zeros(engine.slots)
    half[:8] = 2.0
    mixed = engine.mul_plain_sum([(c.cts[0], np.zeros(engine.slots)), (c.cts[0], half)])
    assert dec(Cipher([mixed], c.index)).abs().max() > 0.1  # the non-zero term still counts
    assert (dec(ops.matmul(c, Plain(torch.zeros(40, 8)))).abs().max()) < 1e-4
