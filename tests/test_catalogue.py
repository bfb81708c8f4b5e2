"""A model catalogue: one deal, one share file per party, several models chosen by name.

One deal (``python -m party.deal`` with two ``--model``) of a random 2-layer BERT
(hidden 32, an encoder at padded length 8) and a random 2-layer LLaMA (hidden 64, a
causal LM: prompt bucket 8, cache capacity 16), each with a small word-level tokenizer of
its own, served by three ``python -m party`` processes (``LocalNodes``, TLS):

* the dealer's files: format 2, model.json and the manifest list both models with their
  graph digests, the second model's tokenizer in ``tokenizers/NAME/``;
* ``Describe``: the catalogue with kinds, buckets, capacities, vocabulary and digests, the
  same on all three parties and equal to the dealer's; the legacy fields describe the
  configuration's model;
* ``Query`` by name: an embedding of the encoder (SDK and command line), FAILED_PRECONDITION
  for the causal LM and NOT_FOUND (listing the catalogue) for an unknown name, the node
  serving on;
* a format-1 share file still loads, as a catalogue of one with the same graph digest;
* the client refuses parties whose catalogues differ.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from client.sdk import QueryFailed, _check_same_catalogue, local_client
from party.catalogue import ServedModel, default_model, graph_digest, load_party_file
from party.config import TOKEN_METADATA_KEY, ClusterConfig
from party.deal import main as deal_main
from party.launch import LocalNodes
from protos import load as load_protos
from secure.models import SentenceEncoder, tiny_bert, tiny_llama

pb2, pb2_grpc = load_protos()

SEQ, BUCKET, CAPACITY = 8, 8, 16
ENCODER, CAUSAL = "tiny-bert", "lm"
WORDS = ("the a secret question answer model party share cluster client token word of to is and it was in "
         "for on with as by at from this that which private dealer catalogue").split()
TEXT = "the dealer was a private party to the secret question"


# ---- fixtures ------------------------------------------------------------------------------
def _save_tokenizer(folder: Path) -> int:
    """A word-level tokenizer over :data:`WORDS` (ids 0-2: padding, end of text, unknown); its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder))
    return len(vocab)


def _model_folders(root: Path) -> tuple[Path, Path]:
    """A BERT folder (dealt under its folder's name) and a LLaMA folder, each with the tokenizer."""
    bert, llama = root / ENCODER, root / "llama-folder"
    vocab = _save_tokenizer(bert)
    tiny_bert(vocab_size=vocab, layers=2, hidden=32, heads=2, seed=5).save_pretrained(bert)
    _save_tokenizer(llama)
    tiny_llama(vocab_size=vocab, seed=6).save_pretrained(llama)
    return bert, llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _model_folders(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, folders: tuple[Path, Path]) -> Iterator[LocalNodes]:
    """The two models dealt with the command line into the cluster's deal folder (which
    ``LocalNodes`` then reuses), served by three nodes."""
    bert, llama = folders
    workdir = tmp_path_factory.mktemp("catalogue")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert deal_main(["--model", str(bert), "--model", f"{CAUSAL}={llama}", "--out", str(workdir / "deal"),
                          "--seq-lens", str(SEQ), "--prompt-buckets", str(BUCKET), "--capacities",
                          str(CAPACITY)]) == 0
    text = out.getvalue()
    assert f"[1/2] {ENCODER}: encoder" in text and f"[2/2] {CAUSAL}: causal LM" in text, text
    assert f"checked {CAUSAL}: greedy generation" in text and f"dealt {CAUSAL} (causal, ours)" in text, text
    cluster = LocalNodes(workdir, seq_lens=(SEQ,), deadline_s=10.0, progress=False,
                         models=(str(bert), f"{CAUSAL}={llama}"), prompt_buckets=(BUCKET,), capacities=(CAPACITY,))
    deal_id = json.loads((workdir / "deal" / "manifest.json").read_text())["deal_id"]
    with cluster:
        assert json.loads((workdir / "deal" / "manifest.json").read_text())["deal_id"] == deal_id  # reused
        yield cluster


def _query_status(nodes: LocalNodes, model: str) -> tuple[grpc.StatusCode, str]:
    """A bare query header naming ``model`` sent to party 0; the status it ends with."""
    cfg = nodes.config
    assert cfg.ca is not None
    header = pb2.QueryPart(header=pb2.QueryHeader(query_id=uuid.uuid4().hex, model=model, seq_len=SEQ))
    channel = grpc.secure_channel(cfg.party(0).client_address, grpc.ssl_channel_credentials(cfg.ca.read_bytes()),
                                  options=[("grpc.ssl_target_name_override", "party0")])
    with channel:
        try:
            for _ in pb2_grpc.PartyStub(channel).Query(iter([header]), metadata=((TOKEN_METADATA_KEY,
                                                                                 nodes.tokens[0]),), timeout=20):
                pass
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _plain_embedding(folder: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModel

    with torch.no_grad():
        return SentenceEncoder(AutoModel.from_pretrained(folder).eval())(**inputs)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


# ---- the deal ------------------------------------------------------------------------------
def test_the_deal_writes_one_catalogue(nodes: LocalNodes) -> None:
    deal = nodes.dir / "deal"
    info = json.loads((deal / "model.json").read_text())
    manifest = json.loads((deal / "manifest.json").read_text())
    assert info["model"] == manifest["model"] == ENCODER and info["seq_lens"] == [SEQ]
    assert [(m["model"], m["kind"], m["seq_lens"], m["capacities"]) for m in manifest["models"]] == [
        (ENCODER, "encoder", [SEQ], []), (CAUSAL, "causal", [BUCKET], [CAPACITY])]
    assert [m["graph_sha256"] for m in info["models"]] == [m["graph_sha256"] for m in manifest["models"]]
    header = torch.load(deal / "party1" / "shares.pt", weights_only=True)
    assert header["format"] == 2 and header["party"] == 1 and header["deal_id"] == manifest["deal_id"]
    assert list(header["models"]) == [ENCODER, CAUSAL]
    lm = header["models"][CAUSAL]
    assert list(lm["graphs"]) == [str(BUCKET)] and list(lm["decode_graphs"]) == [str(CAPACITY)]
    assert lm["info"]["capacities"] == [CAPACITY] and header["models"][ENCODER]["decode_graphs"] == {}
    assert (deal / "tokenizer" / "tokenizer.json").is_file()  # the default model's, where a client looks
    assert (deal / "tokenizers" / CAUSAL / "tokenizer.json").is_file()
    assert (nodes.dir / "tokenizers" / CAUSAL).is_dir()  # copied beside the local cluster's config


# ---- Describe ------------------------------------------------------------------------------
def test_describe_lists_the_catalogue_alike_on_every_party(nodes: LocalNodes) -> None:
    dealt = {m["model"]: m["graph_sha256"] for m in json.loads((nodes.dir / "deal" / "model.json").read_text())
             ["models"]}
    with local_client(nodes) as client:
        infos = client.verify_parties()  # also checks that the three catalogues agree
        entries = {e.model: e for e in client.catalogue()}
    for info in infos:
        assert info.model == ENCODER and list(info.seq_lens) == [SEQ] and info.recipe == "ours"
        assert [(e.model, e.kind, list(e.seq_lens), list(e.capacities)) for e in info.catalogue] == [
            (ENCODER, "encoder", [SEQ], []), (CAUSAL, "causal", [BUCKET], [CAPACITY])]
        assert {e.model: e.graph_sha256 for e in info.catalogue} == dealt
    encoder, lm = entries[ENCODER], entries[CAUSAL]
    assert [i.name for i in encoder.inputs] == ["input_ids", "attention_mask"] and encoder.eos_token_id == -1
    assert [(i.name, i.kind) for i in lm.inputs] == [("input_ids", "client"), ("attention_mask", "public"),
                                                     ("position_ids", "public")]
    assert lm.vocab_size == len(WORDS) + 3 == lm.inputs[0].vocab_size
    assert lm.max_positions == 128 and lm.eos_token_id == 0 and lm.recipe == "ours"


# ---- Query by name -------------------------------------------------------------------------
def test_an_encoder_is_queried_by_name(nodes: LocalNodes, folders: tuple[Path, Path]) -> None:
    with local_client(nodes) as client:
        inputs = client.encode_text(TEXT, model=ENCODER)
        result = client.embed(TEXT, model=ENCODER)
    assert list(inputs["input_ids"].shape) == [1, SEQ] and int(inputs["attention_mask"].sum()) == SEQ
    assert _cosine(result.embedding, _plain_embedding(folders[0], inputs)) > 0.99


def test_threads_sharing_a_client_get_padded_inputs(nodes: LocalNodes) -> None:
    """A fast tokenizer sets its padding on each call; threads sharing one client (the
    batching benchmark's clients) once got an unpadded row, which the parties refused."""
    words = TEXT.split()
    texts = [" ".join(words[:k]) for k in range(1, len(words) + 1)] * 4
    shapes: list[list[int]] = []
    with local_client(nodes) as client:
        def encode(text: str) -> None:
            for _ in range(20):
                shapes.append(list(client.encode_text(text, model=ENCODER)["input_ids"].shape))

        threads = [threading.Thread(target=encode, args=(t,)) for t in texts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert shapes and all(shape == [1, SEQ] for shape in shapes)


def test_the_command_line_picks_a_model(nodes: LocalNodes, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from client.__main__ import main as client_main

    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT + "\n"))
    argv = ["--config", str(nodes.config_path), "--token-file", str(nodes.token_path), "--model", ENCODER]
    assert client_main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["embedding"]) == 32
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT + "\n"))
    assert client_main([*argv[:-1], CAUSAL]) == 1
    assert "is a causal LM: use Generate" in capsys.readouterr().err


@pytest.mark.parametrize(("model", "code", "fragments"), [
    (CAUSAL, grpc.StatusCode.FAILED_PRECONDITION, [f"model {CAUSAL!r} is a causal LM: use Generate"]),
    ("gpt-9000", grpc.StatusCode.NOT_FOUND, ["unknown model 'gpt-9000'", repr(ENCODER), repr(CAUSAL)]),
], ids=["causal", "unknown"])
def test_a_query_for_another_kind_or_name_is_refused(nodes: LocalNodes, model: str, code: grpc.StatusCode,
                                                     fragments: list[str]) -> None:
    got, details = _query_status(nodes, model)
    assert got == code, f"{got.name}: {details}"
    assert all(f in details for f in fragments), details
    with local_client(nodes) as client:
        with pytest.raises(QueryFailed) as refused:
            client.embed(TEXT, model=model)  # the client knows the catalogue: refused before sending
        assert refused.value.code == code
        assert client.embed(TEXT).embedding.shape[-1] == 32  # the nodes serve on


# ---- share files ---------------------------------------------------------------------------
def _pinned_config(nodes: LocalNodes, shares: Path, model: str) -> ClusterConfig:
    from party.integrity import file_sha256

    raw = json.loads(nodes.config_path.read_text())
    raw["model"] = model
    raw["parties"][0].update(shares=str(shares), shares_sha256=file_sha256(shares)[0])
    return ClusterConfig.from_dict(raw, nodes.config_path)


def test_a_format_1_file_loads_as_a_catalogue_of_one(nodes: LocalNodes, tmp_path: Path) -> None:
    data = torch.load(nodes.dir / "deal" / "party0" / "shares.pt", weights_only=True)
    entry = data["models"][ENCODER]
    old = tmp_path / "shares.pt"
    torch.save({"format": 1, "party": 0, "deal_id": data["deal_id"], "model": ENCODER, "recipe": entry["recipe"],
                "frac_bits": data["frac_bits"], "graphs": {int(k): v for k, v in entry["graphs"].items()},
                "weights": entry["weights"]}, old)
    header, models = load_party_file(_pinned_config(nodes, old, ENCODER), 0, torch.device("cpu"))
    assert header["format"] == 1 and header["model"] == ENCODER and list(models) == [ENCODER]
    (model,) = models.values()
    assert model.kind == "encoder" and model.buckets == [SEQ] and model.capacities == [] and model.info == {}
    assert model.graph_sha256 == graph_digest({SEQ: entry["graphs"][str(SEQ)]})
    _, current = load_party_file(_pinned_config(nodes, nodes.dir / "deal" / "party0" / "shares.pt", ENCODER), 0,
                                 torch.device("cpu"))
    assert current[ENCODER].graph_sha256 == model.graph_sha256  # the same graphs, whichever format holds them
    assert current[CAUSAL].kind == "causal" and current[CAUSAL].capacities == [CAPACITY]
    assert set(current[CAUSAL].weights) == set(data["models"][CAUSAL]["weights"])


def test_the_default_model_is_the_configured_one_else_the_first_encoder() -> None:
    def served(name: str, kind: str) -> ServedModel:
        return ServedModel(name, kind, {"name": "ours"}, {}, {}, {}, {}, "")

    catalogue = {m.name: m for m in (served("lm", "causal"), served("enc", "encoder"), served("enc2", "encoder"))}
    assert default_model(catalogue, "enc2").name == "enc2"
    assert default_model(catalogue, "gone").name == "enc"
    assert default_model({"lm": catalogue["lm"]}, "gone").name == "lm"


def test_the_client_refuses_parties_with_different_catalogues() -> None:
    def info(digest: str) -> Any:
        return pb2.ModelInfo(catalogue=[pb2.ModelEntry(model="enc", kind="encoder", graph_sha256="a" * 64),
                                        pb2.ModelEntry(model="lm", kind="causal", graph_sha256=digest)])

    _check_same_catalogue([info("b" * 64)] * 3)
    with pytest.raises(QueryFailed, match=r"party 2 reports another catalogue .*\['lm'\]"):
        _check_same_catalogue([info("b" * 64), info("b" * 64), info("c" * 64)])
