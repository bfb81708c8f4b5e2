"""The op registry as the IR's allow-list and the interpreter's dispatch table: graphs that
name anything else are refused at load (secure/graph/registry.py, ir.py, runtime/interpreter.py)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from secure.graph.capture import capture
from secure.graph.ir import Graph, GraphValidationError, Node, Ref
from secure.graph.passes import OURS, SUPPORTED_SECRET_OPS, rewrite
from secure.graph.registry import DTYPES, OPS
from secure.models import CausalLM, SentenceEncoder, tiny_bert, tiny_gpt2, tiny_llama
from secure.runtime.execute import run_float
from secure.runtime.interpreter import SECRET_HANDLERS, Interpreter, InterpreterError


class Tiny(nn.Module):
    """Public mask nodes (unsqueeze, a dtype cast) and secret ones (linear, GeLU, LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.unsqueeze(-1).to(x.dtype)
        return self.norm(nn.functional.gelu(self.proj(x))) * keep


INPUTS = {"x": torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0)), "mask": torch.tensor([[1, 1, 0]])}


@pytest.fixture(scope="module")
def tiny() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON (parsed) of a captured and rewritten small graph, and its weights."""
    graph, weights = capture(Tiny(), INPUTS, secret_inputs=["x"])
    return json.loads(rewrite(graph, OURS).to_json()), weights


def _node(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in doc["nodes"] if n["name"] == name)


def _edited(doc: dict[str, Any], node: str, /, **fields: Any) -> str:
    """The JSON text of ``doc`` with these fields of node ``node`` replaced."""
    out = copy.deepcopy(doc)
    _node(out, node).update(fields)
    return json.dumps(out)


# ---- the registry and the dispatch agree ---------------------------------------------------

def test_every_registry_op_runs_somewhere() -> None:
    for name, spec in OPS.items():
        assert spec.fn is not None or name in SECRET_HANDLERS, f"{name} runs neither on public nor on secret values"
        if name.startswith("aten."):
            assert str(spec.fn) == name  # the callable is the aten object the name was derived from
        if name.startswith("secure."):
            assert spec.fn is None and name in SECRET_HANDLERS
    assert set(SECRET_HANDLERS) <= set(OPS)
    assert set(SECRET_HANDLERS) == SUPPORTED_SECRET_OPS  # what check_supported accepts is what runs


@pytest.mark.parametrize("make", [lambda: SentenceEncoder(tiny_bert()), lambda: CausalLM(tiny_gpt2()),
                                  lambda: CausalLM(tiny_llama())], ids=["bert", "gpt2", "llama"])
def test_captured_models_use_registry_ops_only(make) -> None:
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6 + [0] * 2])
    graph, _ = capture(make(), {"input_ids": ids, "attention_mask": mask})
    for g in (graph, rewrite(graph, OURS)):
        assert set(g.op_counts()) <= set(OPS), set(g.op_counts()) - set(OPS)
        assert Graph.from_json(g.to_json()).summary() == g.summary()


def test_the_tiny_graph_loads_and_runs(tiny) -> None:
    doc, weights = tiny
    graph = Graph.from_json(json.dumps(doc), source="tiny.json")
    (out,), _ = run_float(graph, weights, INPUTS)
    assert out.shape == (1, 3, 4) and float(out[0, 2].abs().max()) == 0.0  # the masked position


# ---- refused at load -----------------------------------------------------------------------

MALICIOUS_OPS = [
    "__init__.__globals__.get", "__init__.__builtins__.get", "builtins.exec", "builtins.eval",
    "aten.__class__.__base__", "os.system", "evil.op.default", "getattr", "import_module.__call__.__call__",
    "load_library.__call__.__call__", "aten.linear", "aten.linear.default.__call__", "torch.ops.aten.linear.default",
    "aten.from_file.default", "secure.gelu.__globals__", "operator.getitem", "", "aten..default", "Aten.linear.default",
]


@pytest.mark.parametrize("op", MALICIOUS_OPS)
def test_ops_outside_the_registry_are_refused(tiny, op: str) -> None:
    doc, _ = tiny
    with pytest.raises(GraphValidationError) as err:
        Graph.from_json(_edited(doc, "unsqueeze", op=op), source="party0/shares.pt")
    message = str(err.value)
    assert "'unsqueeze'" in message and repr(op) in message and "party0/shares.pt" in message
    assert "not in the op registry" in message


@pytest.mark.parametrize("encoded", [
    {"dtype": "__builtins__"}, {"dtype": "float32.__class__"}, {"dtype": "load"}, {"dtype": "os"},
    {"dtype": "complex64"}, {"dtype": 7}, {"ref": 3}, {"tensor": "x"}, {"code": "print(1)"},
    {"ref": "unsqueeze", "dtype": "float32"}, {"dict": [1]}, {},
])
def test_unknown_encodings_and_dtypes_are_refused(tiny, encoded: dict) -> None:
    doc, _ = tiny
    with pytest.raises(GraphValidationError, match=r"node '_to_copy' \(op 'aten._to_copy.default'\)"):
        Graph.from_json(_edited(doc, "_to_copy", kwargs={"dict": {"dtype": encoded}}))


@pytest.mark.parametrize(("name", "fields", "match"), [
    ("linear", {"args": [{"ref": "nowhere"}, {"ref": "proj.weight"}]}, "reads 'nowhere'"),
    ("unsqueeze", {"args": [{"ref": "mul"}, -1]}, "reads 'mul'"),  # a later node
    ("unsqueeze", {"name": 3}, "name must be a str"),
    ("mul", {"name": "linear"}, "already used"),
    ("unsqueeze", {"name": "x"}, "already used"),
    ("linear", {"kwargs": {"dict": {"__class__": 1}}}, "keyword argument '__class__'"),
    ("linear", {"args": [{"ref": "x"}] * 4}, "4 positional arguments"),
    ("linear", {"args": [{"ref": "x"}]}, "missing argument 'weight'"),
    ("gelu", {"args": ["x"]}, "argument 'x' must be ref"),
    ("gelu", {"kwargs": {"dict": {"degree": "7"}}}, "argument 'degree' must be int"),
    ("layer_norm", {"kwargs": {"dict": {}}}, "missing argument 'eps'"),
    ("unsqueeze", {"args": json.loads("[" * 20 + "0" + "]" * 20)}, "nested deeper"),
    ("unsqueeze", {"spec": {"shape": [1], "dtype": "object"}}, "allow-list"),
    ("unsqueeze", {"secret": "no"}, "secret must be a bool"),
    ("unsqueeze", {"extra": 1}, "unknown keys"),
])
def test_malformed_nodes_are_refused(tiny, name: str, fields: dict, match: str) -> None:
    doc, _ = tiny
    with pytest.raises(GraphValidationError, match=match) as err:
        Graph.from_json(_edited(doc, name, **fields))
    assert "not a valid serialised graph" in str(err.value)


def test_malformed_graphs_are_refused(tiny) -> None:
    doc, _ = tiny
    for edit, match in ((lambda d: d.update(outputs=["ghost"]), "output 'ghost'"),
                        (lambda d: d["inputs"][1].update(kind="secret"), "kind must be"),
                        (lambda d: d.update(constants={"c": "not base64!"}), "constant 'c'"),
                        (lambda d: d.update(extra=1), "unknown keys"),
                        (lambda d: d.update(nodes={}), "nodes must be a list")):
        bad = copy.deepcopy(doc)
        edit(bad)
        with pytest.raises(GraphValidationError, match=match):
            Graph.from_json(json.dumps(bad))
    with pytest.raises(GraphValidationError):
        Graph.from_json("[" * 100_000)


def test_the_dealer_cannot_write_what_a_party_refuses(tiny) -> None:
    doc, _ = tiny
    graph = Graph.from_json(json.dumps(doc))
    graph.nodes[0] = Node("unsqueeze", "aten.from_file.default", ["/etc/passwd"], {}, None, False)
    with pytest.raises(GraphValidationError, match="aten.from_file.default"):
        graph.to_json()
    graph.nodes[0] = Node("unsqueeze", "aten._to_copy.default", [Ref("mask")], {"dtype": torch.complex64}, None, False)
    with pytest.raises(TypeError, match="allow-list"):
        graph.to_json()


# ---- the attack itself -----------------------------------------------------------------------

def _exploit_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on sys.path that writes a marker file when imported: the payload of a graph
    whose public node is ``import_module.__call__.__call__`` (under the former string
    dispatch, ``getattr`` chains on ``torch.ops`` reached ``torch.ops.import_module``)."""
    marker = tmp_path / "pwned"
    name = f"exploit_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('code ran on a party')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name, marker


@pytest.mark.parametrize("op", ["import_module.__call__.__call__", "__init__.__globals__.get"])
def test_an_exploit_graph_does_not_run(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    doc, weights = tiny
    module, marker = _exploit_module(tmp_path, monkeypatch)
    text = _edited(doc, "unsqueeze", op=op, args=[module])
    with pytest.raises(GraphValidationError, match=r"node 'unsqueeze'.*not in the op registry"):
        Graph.from_json(text, source="shares.pt")
    assert not marker.exists()
    # a graph built in memory, past from_json, does not run either: dispatch is registry-only
    graph = Graph.from_json(json.dumps(doc))
    graph.nodes[0] = Node("unsqueeze", op, [module], {}, None, False)
    with pytest.raises(InterpreterError, match="not in the op registry"):
        Interpreter(graph, None).run({k: v.double() for k, v in weights.items()}, INPUTS)
    assert not marker.exists()


def test_a_secure_form_on_public_values_is_refused(tiny) -> None:
    doc, weights = tiny
    graph = Graph.from_json(_edited(doc, "unsqueeze", op="secure.silu", args=[{"ref": "mask"}]))
    with pytest.raises(InterpreterError, match="secret values only"):
        Interpreter(graph, None).run(weights, INPUTS)


# ---- property: whatever the text, it is refused or it names registry ops only ----------------

_NAMES = ["x", "mask", "proj.weight", "unsqueeze", "_to_copy", "linear", "gelu", "ghost", "__builtins__"]
_DOTTED = st.lists(st.sampled_from(["aten", "secure", "__init__", "__globals__", "__class__", "get", "linear",
                                    "default", "Tensor", "gelu", "os", "system", "__call__", ""]),
                   min_size=1, max_size=4).map(".".join)
_REGISTERED = st.sampled_from(sorted(OPS))
_MUTATED = st.tuples(_REGISTERED, st.sampled_from(["", ".", "_", "__", ".default", ".__call__"]),
                     st.booleans()).map(lambda t: (t[1] + t[0]) if t[2] else (t[0] + t[1]))
_OP_NAMES = st.one_of(_REGISTERED, _REGISTERED, st.sampled_from(MALICIOUS_OPS), _DOTTED, _MUTATED,  # registry: 2/7
                      st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0", max_size=30), st.integers(), st.none())
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
                     st.sampled_from(_NAMES), st.text(max_size=8))
_ENCODED = st.one_of(st.fixed_dictionaries({"ref": st.one_of(st.sampled_from(_NAMES), st.integers())}),
                     st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from([*DTYPES, "__builtins__", "os",
                                                                                "load", "float32 "]),
                                                               st.text(max_size=10))}))
_ARGS = st.recursive(st.one_of(_SCALARS, _ENCODED),
                     lambda children: st.one_of(st.lists(children, max_size=4),
                                                st.fixed_dictionaries({"dict": st.dictionaries(st.text(max_size=6),
                                                                                               children, max_size=3)}),
                                                st.dictionaries(st.sampled_from(["ref", "dtype", "dict", "code"]),
                                                                children, max_size=2)),
                     max_leaves=12)
_KWARGS = st.one_of(st.fixed_dictionaries({"dict": st.dictionaries(st.sampled_from(
    ["dtype", "alpha", "eps", "form", "kind", "approximate", "__class__", "shape"]), _ARGS, max_size=3)}), _ARGS)


_EDIT = st.fixed_dictionaries({}, optional={"op": _OP_NAMES, "args": st.lists(_ARGS, max_size=4) | _ARGS,
                                             "kwargs": _KWARGS})
"""Some of a node's fields replaced (each edit keeps the others, so many graphs still load)."""


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(["unsqueeze", "_to_copy", "linear", "gelu", "layer_norm", "mul"]),
                                _EDIT), min_size=1, max_size=3))
def test_any_text_is_refused_or_names_registry_ops_only(tiny, edits) -> None:
    doc, _ = tiny
    doc = copy.deepcopy(doc)
    for name, fields in edits:
        _node(doc, name).update(fields)
    try:
        graph = Graph.from_json(json.dumps(doc))
    except GraphValidationError:
        return
    assert all(n.op in OPS for n in graph.nodes)
    defined = {i.name for i in graph.inputs} | set(graph.weights) | set(graph.constants)
    for n in graph.nodes:
        assert set(n.refs()) <= defined
        defined.add(n.name)
        _assert_plain(n.args)
        _assert_plain(n.kwargs)


def _assert_plain(v: Any) -> None:
    """Decoded arguments hold refs, allow-listed dtypes, lists, dicts and JSON scalars only."""
    if isinstance(v, (list, tuple)):
        for x in v:
            _assert_plain(x)
    elif isinstance(v, dict):
        for x in v.values():
            _assert_plain(x)
    else:
        assert v is None or isinstance(v, (Ref, bool, int, float, str)) or v in DTYPES.values(), repr(v)
