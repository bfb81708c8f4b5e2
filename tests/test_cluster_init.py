"""``secure-cluster`` (``party.cluster_init``) and dealing a model folder, end to end on loopback.

* three hosts: cluster init for 127.0.0.1, 127.0.0.2 and 127.0.0.3, a deal of a model folder
  that is not MiniLM (a random 2-layer BERT, hidden 32, saved with the bundled MiniLM
  tokenizer, dealt for length 16) into that folder, the three nodes started with exactly
  the commands cluster init printed, and the printed client command's answer against the
  plaintext model;
* start-up refusals: a node whose cluster file pins another digest, whose certificate or key
  is another party's or another CA's, or whose entry lists a token instead of its digest,
  and a client whose token file belongs to another cluster -- each naming the file;
* a deal made elsewhere, signed, pinned with ``secure-cluster pin``; a tampered one refused;
* bad input to cluster init, and a model the rewrite cannot handle refused before the deal
  writes anything.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cluster_folder import (
    HAVE_TOKENIZER,
    NO_TOKENIZER,
    TOKENIZER_FILES,
    as_argv,
    cosine,
    plain_embedding,
    printed,
    save_model_folder,
)

pytestmark = pytest.mark.skipif(not HAVE_TOKENIZER, reason=NO_TOKENIZER)

from client.__main__ import main as client_main  # noqa: E402
from client.sdk import SecureClient  # noqa: E402
from party.certs import make_cluster_certs  # noqa: E402
from party.cluster_init import main as cluster_main  # noqa: E402
from party.config import ClusterConfig, ConfigError, load_client_tokens  # noqa: E402
from party.deal import deal_model  # noqa: E402
from party.deal import main as deal_main  # noqa: E402
from party.integrity import load_signing_key, make_signing_key  # noqa: E402
from party.launch import REPO  # noqa: E402
from party.node import PartyNode  # noqa: E402
from secure.graph.passes import RECIPES  # noqa: E402
from secure.models import SentenceEncoder, load_tokenizer, minilm_path, tiny_bert  # noqa: E402

SEQ = 16
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
TEXT = "Three hosts from the README answer a question none of them can read."


# ---- helpers -------------------------------------------------------------------------------
def port_pairs(n: int) -> list[int]:
    """n ports p, each with p + 1 also free, no two pairs overlapping."""
    found: list[int] = []
    while len(found) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65534 or any(abs(p - q) < 2 for q in found):
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        found.append(p)
    return found


def refusal(cluster_file: Path, party: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ConfigError of starting ``party`` with ``cluster_file``; fails if a share file got unpickled."""
    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load called before the start-up checks refused the node")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(ConfigError) as info:
        PartyNode(ClusterConfig.load(cluster_file), party)
    return str(info.value)


def edited_copy(cluster: Path, party: int, dest: Path, edit: Any) -> Path:
    """A copy of party ``party``'s folder whose cluster.json ``edit(raw, folder)`` changed."""
    folder = Path(shutil.copytree(cluster / f"party{party}", dest / f"party{party}"))
    raw = json.loads((folder / "cluster.json").read_text())
    edit(raw, folder)
    (folder / "cluster.json").write_text(json.dumps(raw))
    return folder / "cluster.json"


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("model") / "tiny-bert")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, str]:
    """A cluster folder for three loopback hosts with the model folder dealt into it; and what
    cluster init printed."""
    out = tmp_path_factory.mktemp("cluster") / "cluster"
    ports = port_pairs(3)
    argv = [a for host, port in zip(HOSTS, ports) for a in ("--party", f"{host}:{port}")]
    import contextlib
    import io

    init_text, deal_text = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(init_text):
        assert cluster_main([*argv, "--out", str(out)]) == 0
    with contextlib.redirect_stdout(deal_text):
        assert deal_main(["--model", str(model_dir), "--out", str(out), "--seq-lens", str(SEQ)]) == 0
    assert "pinned tiny-bert" in deal_text.getvalue()  # the deal into a cluster folder pins it
    return out, init_text.getvalue()


@pytest.fixture(scope="module")
def running(cluster: tuple[Path, str]) -> Iterator[tuple[Path, str]]:
    """The three nodes, started as separate processes with the printed commands."""
    out, printed_text = cluster
    commands = printed(printed_text, "start")
    assert len(commands) == 3
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = []
    try:
        for i, command in enumerate(commands):
            argv, _ = as_argv(command)
            with open(out / f"node{i}.log", "w") as log:
                procs.append(subprocess.Popen(argv, cwd=out, stdout=log, stderr=subprocess.STDOUT, env=env))
        cfg = ClusterConfig.load(out / "client" / "cluster.json")
        client = SecureClient(cfg, load_client_tokens(out / "client" / "tokens.json"))
        with client:
            end = time.monotonic() + 90
            while not all(client.health(timeout_s=1.0)):
                for i, p in enumerate(procs):
                    assert p.poll() is None, (out / f"node{i}.log").read_text()
                assert time.monotonic() < end, [(out / f"node{i}.log").read_text() for i in range(3)]
                time.sleep(0.3)
        yield cluster
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# ---- three hosts ---------------------------------------------------------------------------
def test_cluster_init_writes_one_private_folder_per_host(cluster: tuple[Path, str]) -> None:
    out, text = cluster
    for i, host in enumerate(HOSTS):
        folder = out / f"party{i}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["ca.pem", "cluster.json", "manifest.json", f"party{i}.key", f"party{i}.pem", "shares.pt"])
        assert folder.stat().st_mode & 0o777 == 0o700
        for private in (f"party{i}.key", "shares.pt"):
            assert (folder / private).stat().st_mode & 0o777 == 0o600
        from party.certs import certificate_names

        assert certificate_names(folder / f"party{i}.pem") == [f"party{i}", host]
    client = out / "client"
    assert client.stat().st_mode & 0o777 == 0o700 and (client / "tokens.json").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in client.iterdir()) == ["ca.pem", "cluster.json", "tokenizer", "tokens.json"]
    assert (out / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    copies = {(out / f).read_text() for f in ("party0/cluster.json", "party1/cluster.json", "party2/cluster.json",
                                               "client/cluster.json")}
    assert len(copies) == 1  # one cluster file, resolved by each host to its own files
    cfg = ClusterConfig.load(out / "party1" / "cluster.json")
    manifest = json.loads((out / "manifest.json").read_text())
    assert cfg.model == "tiny-bert" and [p.host for p in cfg.parties] == list(HOSTS)
    assert [p.shares_sha256 for p in cfg.parties] == [p["sha256"] for p in manifest["parties"]]
    assert cfg.party(1).shares == out / "party1" / "shares.pt" and cfg.party(1).cert == out / "party1" / "party1.pem"
    assert printed(text, "start") == [f"python -m party --config party{i}/cluster.json --party {i}" for i in range(3)]


def test_three_hosts_answer_the_printed_client_command(running: tuple[Path, str], model_dir: Path) -> None:
    out, text = running
    (command,) = printed(text, "query")
    argv, stdin = as_argv(command)
    assert stdin == "question.txt"
    (out / stdin).write_text(TEXT)
    with open(out / stdin) as question:
        done = subprocess.run(argv, cwd=out, stdin=question, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    secure = torch.tensor(json.loads(done.stdout)["embedding"])
    similarity = cosine(secure, plain_embedding(model_dir, TEXT, SEQ))
    assert similarity > 0.999, similarity


# ---- start-up refusals ---------------------------------------------------------------------
def test_node_refuses_a_share_file_that_is_not_the_pinned_one(cluster: tuple[Path, str], tmp_path: Path) -> None:
    """Host 1 got party 2's share file: through the real start command, exit status 2, the
    file and both digests named."""
    out, _ = cluster
    cfg = ClusterConfig.load(out / "party0" / "cluster.json")

    def wrong_file(raw: dict[str, Any], folder: Path) -> None:
        shutil.copy(out / "party2" / "shares.pt", folder / "shares.pt")

    path = edited_copy(out, 1, tmp_path, wrong_file)
    done = subprocess.run([sys.executable, "-m", "party", "--config", str(path), "--party", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    message = done.stdout + done.stderr
    assert done.returncode == 2, message
    assert f"party 1's share file {path.parent / 'shares.pt'} does not match" in message, message
    assert f"sha256 expected {cfg.party(1).shares_sha256}, got {cfg.party(2).shares_sha256}" in message, message


def test_node_refuses_a_cluster_file_pinning_another_digest(cluster: tuple[Path, str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = cluster
    other = ClusterConfig.load(out / "party0" / "cluster.json").party(2).shares_sha256

    def pin_another(raw: dict[str, Any], folder: Path) -> None:
        raw["parties"][1]["shares_sha256"] = other

    path = edited_copy(out, 1, tmp_path, pin_another)
    message = refusal(path, 1, monkeypatch)
    assert f"the manifest {path.parent / 'manifest.json'} lists sha256" in message, message
    assert f"the configuration pins {other}" in message, message


@pytest.mark.parametrize("case", ["other_party", "other_key", "other_ca"])
def test_node_refuses_a_certificate_that_is_not_its_own(cluster: tuple[Path, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    out, _ = cluster

    def swap(raw: dict[str, Any], folder: Path) -> None:
        if case == "other_party":  # host 1 got party 0's certificate and key
            shutil.copy(out / "party0" / "party0.pem", folder / "party1.pem")
            shutil.copy(out / "party0" / "party0.key", folder / "party1.key")
        elif case == "other_key":
            shutil.copy(out / "party2" / "party2.key", folder / "party1.key")
        else:
            _, leaves = make_cluster_certs(tmp_path / "foreign")
            shutil.copy(leaves[1][0], folder / "party1.pem")
            shutil.copy(leaves[1][1], folder / "party1.key")

    path = edited_copy(out, 1, tmp_path, swap)
    message = refusal(path, 1, monkeypatch)
    cert, key = path.parent / "party1.pem", path.parent / "party1.key"
    expected = {"other_party": f"certificate {cert} does not name party1: common name party0",
                "other_key": f"key {key} is not the key of its certificate {cert}",
                "other_ca": f"certificate {cert} is not signed by the CA {path.parent / 'ca.pem'}"}[case]
    assert expected in message, message


def test_node_refuses_a_token_in_place_of_its_digest(cluster: tuple[Path, str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = cluster
    token = load_client_tokens(out / "client" / "tokens.json")[1]

    def paste_token(raw: dict[str, Any], folder: Path) -> None:
        raw["parties"][1]["client_token_sha256"] = [token]

    path = edited_copy(out, 1, tmp_path, paste_token)
    message = refusal(path, 1, monkeypatch)
    assert str(path) in message and "not a hex SHA-256 digest" in message and token not in message, message


def test_client_refuses_a_token_file_of_another_cluster(cluster: tuple[Path, str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = cluster
    foreign = tmp_path / "tokens.json"
    foreign.write_text(json.dumps({f"party{i}": f"token-of-another-cluster-{i}" for i in range(3)}))
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT))
    assert client_main(["--config", str(out / "client" / "cluster.json"), "--token-file", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert f"token file {foreign} does not match the cluster file" in err and "party0, party1, party2" in err, err


# ---- a deal made elsewhere -----------------------------------------------------------------
def _inputs(seq: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(1, seq + 1).unsqueeze(0), "attention_mask": torch.ones(1, seq, dtype=torch.long)}


def test_a_signed_deal_made_elsewhere_is_pinned_and_checked(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = make_signing_key(tmp_path / "owner")
    deal = tmp_path / "deal"
    deal_model(SentenceEncoder(tiny_bert()), None, _inputs, "tiny", RECIPES["ours"], deal, (8,), progress=False,
               sign_key=load_signing_key(key))
    out = tmp_path / "cluster"
    parties = [a for port in port_pairs(3) for a in ("--party", f"localhost:{port}")]
    assert cluster_main([*parties, "--out", str(out), "--dealer-public-key", str(pub), "--clients", "2"]) == 0
    assert cluster_main(["pin", "--deal", str(deal), "--out", str(out)]) == 0
    assert "pinned tiny" in capsys.readouterr().out
    for i in range(3):
        cfg = ClusterConfig.load(out / f"party{i}" / "cluster.json")
        assert cfg.dealer_public_key == out / f"party{i}" / "dealer.pub"
        assert (out / f"party{i}" / "manifest.sig").exists()
        PartyNode(cfg, i).stop(0)  # the signed manifest verifies and the file matches it
    tokens = [load_client_tokens(out / c / "tokens.json") for c in ("client", "client2")]
    assert tokens[0] != tokens[1] and all(len(cfg.party(i).client_token_sha256) == 2 for i in range(3))
    # a share file changed after the deal is refused by pin and never replaces the host's copy
    pinned = (out / "party1" / "shares.pt").read_bytes()
    data = (deal / "party1" / "shares.pt").read_bytes()
    (deal / "party1" / "shares.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert cluster_main(["pin", "--deal", str(deal), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{deal / 'party1' / 'shares.pt'} does not match the manifest" in err, err
    assert (out / "party1" / "shares.pt").read_bytes() == pinned
    assert not [p for p in (out / "party1").iterdir() if p.name.startswith(".")]  # no temporary left


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(("parties", "expected"), [
    (["10.0.0.1:5000", "10.0.0.2:5000"], "exactly three parties"),
    (["10.0.0.1:5000"] * 2 + ["10.0.0.3:5000", "10.0.0.4:5000"], "exactly three parties"),
    (["10.0.0.1", "10.0.0.2:5000", "10.0.0.3:5000"], "expected HOST:PORT"),
    (["10.0.0.1:0", "10.0.0.2:5000", "10.0.0.3:5000"], "from 1 to 65534"),
    (["10.0.0.1:70000", "10.0.0.2:5000", "10.0.0.3:5000"], "from 1 to 65534"),
    (["bad_host!:5000", "10.0.0.2:5000", "10.0.0.3:5000"], "neither an IP address nor a valid DNS name"),
    (["2001:db8::1:5000", "10.0.0.2:5000", "10.0.0.3:5000"], "IPv6 address in brackets"),
    (["0.0.0.0:5000", "10.0.0.2:5000", "10.0.0.3:5000"], "cannot be dialled"),
    (["10.0.0.1:5000", "10.0.0.1:5000", "10.0.0.3:5000"], "both use port 5000"),
    (["host.example.org:5000", "HOST.example.org:5001", "10.0.0.3:5000"], "both use port 5001"),
    (["127.0.0.1:5000", "127.0.0.2:5000", "10.0.0.3:5000"], "this machine (loopback)"),
])
def test_cluster_init_refuses_bad_parties(tmp_path: Path, capsys: pytest.CaptureFixture[str], parties: list[str],
                                          expected: str) -> None:
    out = tmp_path / "out"
    assert cluster_main([a for p in parties for a in ("--party", p)] + ["--out", str(out)]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_cluster_init_refuses_a_non_empty_folder_unless_forced(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    parties = ["--party", "[::1]:6000", "--party", "localhost:6002", "--party", "10.1.2.3:6000"]
    assert cluster_main([*parties, "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and not (out / "party0").exists()
    assert cluster_main([*parties, "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    cfg = ClusterConfig.load(out / "client" / "cluster.json")
    assert [p.peer_address for p in cfg.parties] == ["[::1]:6000", "localhost:6002", "10.1.2.3:6000"]


def test_cluster_init_with_an_existing_ca_or_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_pem, leaves = make_cluster_certs(tmp_path / "pki")
    ca_key = ca_pem.with_suffix(".key")
    parties = [a for p in ("10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000") for a in ("--party", p)]
    # signed by an existing CA
    assert cluster_main([*parties, "--out", str(tmp_path / "a"), "--ca-cert", str(ca_pem), "--ca-key",
                         str(ca_key)]) == 0
    from party.certs import check_party_certificate

    for i in range(3):
        folder = tmp_path / "a" / f"party{i}"
        check_party_certificate(folder / f"party{i}.pem", folder / f"party{i}.key", ca_pem, i)
    assert not (tmp_path / "a" / "ca").exists()
    # one of the pair without the other
    assert cluster_main([*parties, "--out", str(tmp_path / "b"), "--ca-cert", str(ca_pem)]) == 2
    assert "go together" in capsys.readouterr().err
    # bring your own, in the wrong order: refused, naming the certificate
    byo = [a for j in (1, 0, 2) for a in ("--cert", str(leaves[j][0]), "--key", str(leaves[j][1]))]
    assert cluster_main([*parties, "--out", str(tmp_path / "c"), "--ca-cert", str(ca_pem), *byo]) == 2
    assert f"party 0's certificate {leaves[1][0]} does not name party0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # in the right order: copied, keys private
    byo = [a for j in range(3) for a in ("--cert", str(leaves[j][0]), "--key", str(leaves[j][1]))]
    assert cluster_main([*parties, "--out", str(tmp_path / "d"), "--ca-cert", str(ca_pem), *byo]) == 0
    assert (tmp_path / "d" / "party2" / "party2.pem").read_bytes() == leaves[2][0].read_bytes()
    assert (tmp_path / "d" / "party2" / "party2.key").stat().st_mode & 0o777 == 0o600


def test_a_model_the_rewrite_cannot_handle_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = save_model_folder(tmp_path / "relu-bert", hidden_act="relu")
    out = tmp_path / "deal"
    assert deal_main(["--model", str(folder), "--out", str(out), "--seq-lens", "8"]) == 2
    err = capsys.readouterr().err
    assert "aten.relu" in err and "layer.0.intermediate" in err and "nothing was written" in err, err
    assert not out.exists()
    assert deal_main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err and not out.exists()


def test_a_causal_lm_folder_compiles_to_logits(tmp_path: Path) -> None:
    """A causal LM folder (random tiny GPT-2, the MiniLM tokenizer) is captured, rewritten and
    checked as the deal does, without writing: the client shares its token ids, the output
    is the logits of every position."""
    from party.deal import compile_model, model_source
    from secure.models import tiny_gpt2

    folder = tmp_path / "tiny-gpt2"
    tiny_gpt2(vocab_size=len(load_tokenizer(minilm_path()))).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    source = model_source(str(folder), None, None, (8,))
    compiled = compile_model(source.model, source.make_inputs, source.name, source.recipe, (8,), False)
    assert source.name == "tiny-gpt2" and compiled.recipe.name == "ours" and compiled.float_cosine > 0.99
    assert compiled.inputs[0] == {"name": "input_ids", "kind": "client", "vocab_size": 30522}
    assert compiled.graphs[8].outputs and not (tmp_path / "deal").exists()


def test_a_bare_ipv6_host_in_a_hand_written_cluster_file_is_dialled_in_brackets() -> None:
    from party.config import PartyEntry

    assert PartyEntry(0, "2001:db8::1", 50100, 50101).peer_address == "[2001:db8::1]:50100"
    assert PartyEntry(0, "[::1]", 50100, 50101).client_address == "[::1]:50101"
    assert PartyEntry(0, "host3.example.org", 50100, 50101).peer_address == "host3.example.org:50100"
