"""Private files and pinned share files (no processes, no MiniLM).

* private files: dealt share files, TLS keys, the dealer's signing key and the local
  cluster's client token are created 0600 (``os.open`` with that mode, under umask 0, no
  chmod afterwards, never seen with another mode by a polling thread), in 0700 folders;
* pinning: ``PartyNode(cfg, party)`` loads a file whose SHA-256 is pinned in the cluster
  file or listed in a dealer-signed manifest, and refuses, before unpickling anything, a
  tampered, truncated, another party's or another deal's file, a manifest with a changed
  digest or another key's signature, and an unpinned file (saying how to pin it).

The model is a 2-layer BERT with hidden size 32 (``secure.models.tiny_bert``), dealt for
one padded length of 8.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from party.certs import make_cluster_certs
from party.config import ClusterConfig, ConfigError, token_digest
from party.deal import deal_model
from party.deal import main as deal_main
from party.integrity import (
    check_party_header,
    file_sha256,
    load_signing_key,
    make_signing_key,
    read_manifest,
    signature_path,
    write_manifest,
)
from party.node import PartyNode
from party.private_files import open_private, write_private
from secure.graph.passes import RECIPES
from secure.models import SentenceEncoder, tiny_bert

SEQ = 8
TOKEN = "integrity-test-token"


# ---- helpers -------------------------------------------------------------------------------
def _inputs(seq: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(1, seq + 1).unsqueeze(0), "attention_mask": torch.ones(1, seq, dtype=torch.long)}


def _deal_tiny(out: Path, sign_key: Any = None, model_name: str = "tiny") -> dict[str, Any]:
    return deal_model(SentenceEncoder(tiny_bert()), _inputs(SEQ), _inputs, model_name, RECIPES["ours"], out, (SEQ,),
                      progress=False, sign_key=sign_key)


class Recorder:
    """Every ``os.open``, ``os.chmod`` and ``os.fchmod`` while active, under umask 0.

    With umask 0 a file's mode is exactly what its creator asked for, so a 0600 file proves
    0600 was asked for at creation."""

    def __init__(self) -> None:
        self.opens: list[tuple[Path, int, int]] = []
        self.chmods: list[Any] = []

    @contextmanager
    def active(self) -> Iterator[Recorder]:
        real_open, real_chmod, real_fchmod = os.open, os.chmod, os.fchmod

        def rec_open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
            self.opens.append((Path(os.fsdecode(path)), flags, mode))
            return real_open(path, flags, mode, *args, **kwargs)

        def rec_chmod(path: Any, mode: int, *args: Any, **kwargs: Any) -> None:
            self.chmods.append(path)
            real_chmod(path, mode, *args, **kwargs)

        def rec_fchmod(fd: int, mode: int) -> None:
            self.chmods.append(fd)
            real_fchmod(fd, mode)

        old_umask = os.umask(0)
        try:
            with mock.patch("os.open", rec_open), mock.patch("os.chmod", rec_chmod), \
                    mock.patch("os.fchmod", rec_fchmod):
                yield self
        finally:
            os.umask(old_umask)

    def assert_created_private(self, final: Path) -> None:
        """``final`` is 0600, was created by os.open(O_CREAT | O_EXCL, 0o600) (as a temp beside
        it), and nothing chmod-ed any file."""
        created = [(flags, mode) for path, flags, mode in self.opens
                   if path.parent == final.parent and path.name.startswith(f".{final.name}.")
                   and flags & os.O_CREAT]
        assert created, f"{final} was not created through os.open"
        for flags, mode in created:
            assert flags & os.O_EXCL and mode == 0o600, (final, oct(flags), oct(mode))
        assert _mode(final) == 0o600, (final, oct(_mode(final)))
        assert not [c for c in self.chmods if isinstance(c, int) or not Path(c).is_dir()], self.chmods


class ModeWatcher(threading.Thread):
    """Polls the mode of every file and folder under ``root`` until stopped: what another local
    user could have caught while the files were being written."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[str, set[int]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for folder, dirs, files in os.walk(self.root):
                for name in [*dirs, *files]:
                    path = os.path.join(folder, name)
                    try:
                        mode = os.lstat(path).st_mode & 0o777
                    except FileNotFoundError:
                        continue
                    self.seen.setdefault(os.path.relpath(path, self.root), set()).add(mode)
            time.sleep(0.0005)

    def __enter__(self) -> ModeWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _raw(deal: Path, certs: Path, pin: str = "digest", keys: Path | None = None) -> dict[str, Any]:
    """A cluster file for the deal: ``pin`` is "digest" (shares_sha256), "signed" (dealer key and
    manifest) or "none"."""
    manifest = json.loads((deal / "manifest.json").read_text())
    parties = []
    for p in manifest["parties"]:
        i = p["id"]
        entry: dict[str, Any] = {"id": i, "host": "127.0.0.1", "peer_port": 50001 + i, "client_port": 50011 + i,
                                 "shares": str(deal / p["path"]), "cert": str(certs / f"party{i}.pem"),
                                 "key": str(certs / f"party{i}.key"), "client_token_sha256": [token_digest(TOKEN)]}
        if pin == "digest":
            entry["shares_sha256"] = p["sha256"]
        elif pin == "signed":
            entry["manifest"] = str(deal / "manifest.json")
        parties.append(entry)
    raw: dict[str, Any] = {"model": "tiny", "frac_bits": 18, "tls": {"ca": str(certs / "ca.pem")}, "parties": parties}
    if pin == "signed":
        assert keys is not None
        raw["dealer_public_key"] = str(keys / "dealer.pub")
    return raw


def _node(raw: dict[str, Any], party: int) -> PartyNode:
    return PartyNode(ClusterConfig.from_dict(raw), party)


def _refused(raw: dict[str, Any], party: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ConfigError message of starting ``party``; fails if anything got unpickled first."""
    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load called on an unverified share file")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(ConfigError) as info:
        _node(raw, party)
    return str(info.value)


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Recorder]:
    """The dealer's Ed25519 key pair made by ``python -m party.deal keygen``, recorded."""
    out = tmp_path_factory.mktemp("keys") / "dealer"
    with Recorder().active() as rec:
        assert deal_main(["keygen", "--out", str(out)]) == 0
    return out, rec


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Recorder]:
    out = tmp_path_factory.mktemp("certs") / "certs"
    with Recorder().active() as rec:
        make_cluster_certs(out)
    return out, rec


@pytest.fixture(scope="module")
def dealt(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Recorder]
          ) -> tuple[Path, Recorder, ModeWatcher]:
    """One signed deal of the tiny model, recorded and watched while it was written."""
    out = tmp_path_factory.mktemp("dealt") / "deal"
    out.mkdir()
    sign_key = load_signing_key(keys[0] / "dealer.key")
    with Recorder().active() as rec, ModeWatcher(out) as watcher:
        _deal_tiny(out, sign_key)
    return out, rec, watcher


@pytest.fixture()
def deal(dealt: tuple[Path, Recorder, ModeWatcher], tmp_path: Path) -> Path:
    """A private copy of the deal that a test may damage."""
    return Path(shutil.copytree(dealt[0], tmp_path / "deal"))


# ---- private files -------------------------------------------------------------------------
def test_open_private_is_0600_before_the_first_byte_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    old = os.umask(0)
    try:
        with open_private(target) as f:
            assert os.fstat(f.fileno()).st_mode & 0o777 == 0o600  # nothing written yet
            assert not target.exists()  # readers never see a partial file
            f.write(b"first")
        assert target.read_bytes() == b"first" and _mode(target) == 0o600
        with pytest.raises(RuntimeError), open_private(target) as f:
            f.write(b"half")
            raise RuntimeError("the writer fails")
        assert target.read_bytes() == b"first"  # left as it was
        write_private(target, b"second")
        assert target.read_bytes() == b"second" and _mode(target) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporaries left


def test_dealt_files_are_private_from_creation(dealt: tuple[Path, Recorder, ModeWatcher]) -> None:
    out, rec, watcher = dealt
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "manifest.sig", "model.json",
                                                     "party0", "party1", "party2"]
    for i in range(3):
        folder = out / f"party{i}"
        assert _mode(folder) == 0o700
        assert [p.name for p in folder.iterdir()] == ["shares.pt"]
        rec.assert_created_private(folder / "shares.pt")
    for name, modes in watcher.seen.items():
        if name.startswith("party"):
            assert modes == ({0o700} if "/" not in name else {0o600}), (name, modes)
    manifest = read_manifest(out / "manifest.json")
    assert manifest["model"] == "tiny" and manifest["seq_lens"] == [SEQ] and manifest["recipe"] == "ours"
    assert manifest["frac_bits"] == 18 and len(manifest["deal_id"]) == 32
    for p in manifest["parties"]:
        assert (p["sha256"], p["size"]) == file_sha256(out / p["path"])
        header = torch.load(out / p["path"], weights_only=True)
        assert (header["party"], header["deal_id"]) == (p["id"], manifest["deal_id"])


def test_keys_are_private_from_creation(certs: tuple[Path, Recorder], keys: tuple[Path, Recorder]) -> None:
    folder, rec = certs
    assert _mode(folder) == 0o700
    for name in ("ca.key", "party0.key", "party1.key", "party2.key"):
        rec.assert_created_private(folder / name)
    key_dir, rec = keys
    assert _mode(key_dir) == 0o700
    rec.assert_created_private(key_dir / "dealer.key")


def test_local_cluster_token_is_private_and_shares_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``LocalNodes.prepare`` writes its client token 0600 and pins the digests of its deal."""
    from party import launch

    monkeypatch.setattr(launch, "deal_minilm", lambda out, *args, **kwargs: _deal_tiny(out, model_name="minilm"))
    nodes = launch.LocalNodes(tmp_path / "cluster", seq_lens=(SEQ,), progress=False)
    with Recorder().active() as rec:
        cfg = nodes.prepare()
    rec.assert_created_private(nodes.token_path)
    rec.assert_created_private(nodes.dir / "certs" / "party0.key")
    manifest = read_manifest(nodes.dir / "deal" / "manifest.json")
    for p in manifest["parties"]:
        assert cfg.party(p["id"]).shares_sha256 == p["sha256"]
        PartyNode(cfg, p["id"]).stop(0)


# ---- pinning -------------------------------------------------------------------------------
def test_config_round_trips_the_pins(deal: Path, certs: tuple[Path, Recorder], keys: tuple[Path, Recorder]
                                     ) -> None:
    raw = _raw(deal, certs[0], "signed", keys[0])
    raw["parties"][1]["shares_sha256"] = "AB" * 32
    cfg = ClusterConfig.from_dict(raw)
    assert cfg.dealer_public_key == keys[0] / "dealer.pub"
    assert cfg.party(1).shares_sha256 == "ab" * 32 and cfg.party(1).manifest == deal / "manifest.json"
    assert ClusterConfig.from_dict(cfg.to_dict()) == cfg
    raw["parties"][1]["shares_sha256"] = "not a digest"
    with pytest.raises(ConfigError, match="not a hex SHA-256 digest"):
        ClusterConfig.from_dict(raw)


@pytest.mark.parametrize("pin", ["digest", "signed"])
def test_pinned_file_loads(deal: Path, certs: tuple[Path, Recorder], keys: tuple[Path, Recorder], pin: str) -> None:
    for i in range(3):
        node = _node(_raw(deal, certs[0], pin, keys[0]), i)
        assert node.header["model"] == "tiny" and sorted(node.graphs) == [SEQ]
        node.stop(0)


@pytest.mark.parametrize("pin", ["digest", "signed"])
@pytest.mark.parametrize("damage", ["tampered", "other_party", "truncated"])
def test_damaged_share_file_is_refused(deal: Path, certs: tuple[Path, Recorder], keys: tuple[Path, Recorder],
                                       monkeypatch: pytest.MonkeyPatch, damage: str, pin: str) -> None:
    raw = _raw(deal, certs[0], pin, keys[0])
    path = deal / "party1" / "shares.pt"
    data = path.read_bytes()
    if damage == "tampered":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])
    elif damage == "other_party":
        raw["parties"][1]["shares"] = str(deal / "party2" / "shares.pt")
    else:
        path.write_bytes(data[: len(data) // 2])
    message = _refused(raw, 1, monkeypatch)
    assert "party 1's share file" in message and raw["parties"][1]["shares"] in message
    if pin == "signed" and damage != "tampered":  # the manifest knows the size too
        assert "size expected" in message and "signed manifest" in message, message
    else:
        assert "sha256 expected" in message, message


def test_manifest_with_a_changed_digest_is_refused(deal: Path, certs: tuple[Path, Recorder],
                                                  keys: tuple[Path, Recorder], monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    """Party 1's file is replaced and the manifest edited to list the new file's digest."""
    raw = _raw(deal, certs[0], "signed", keys[0])
    path = deal / "party1" / "shares.pt"
    old_digest = file_sha256(path)[0]
    path.write_bytes(path.read_bytes() + b"\0")
    manifest_path = deal / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace(old_digest, file_sha256(path)[0]))
    message = _refused(raw, 1, monkeypatch)
    assert "bad signature" in message and str(manifest_path) in message, message


def test_manifest_signed_by_another_key_is_refused(deal: Path, certs: tuple[Path, Recorder],
                                                  keys: tuple[Path, Recorder], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Party 1's file is replaced and the manifest rewritten and signed with an attacker's key."""
    raw = _raw(deal, certs[0], "signed", keys[0])
    path = deal / "party1" / "shares.pt"
    path.write_bytes(path.read_bytes() + b"\0")
    manifest = read_manifest(deal / "manifest.json")
    manifest["parties"][1]["sha256"], manifest["parties"][1]["size"] = file_sha256(path)
    other_key, _ = make_signing_key(tmp_path / "attacker")
    write_manifest(deal, manifest, load_signing_key(other_key))
    assert signature_path(deal / "manifest.json").exists()
    message = _refused(raw, 1, monkeypatch)
    assert "bad signature" in message and "another key" in message, message


def test_pin_that_disagrees_with_the_signed_manifest_is_refused(deal: Path, certs: tuple[Path, Recorder],
                                                               keys: tuple[Path, Recorder],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw(deal, certs[0], "signed", keys[0])
    raw["parties"][2]["shares_sha256"] = "0" * 64
    message = _refused(raw, 2, monkeypatch)
    assert "signed manifest" in message and "the configuration pins " + "0" * 64 in message, message


def test_unpinned_file_is_refused_with_how_to_pin_it(deal: Path, certs: tuple[Path, Recorder],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw(deal, certs[0], "none")
    message = _refused(raw, 0, monkeypatch)
    assert "is not pinned" in message and raw["parties"][0]["shares"] in message
    assert '"shares_sha256"' in message and "dealer_public_key" in message and '"manifest"' in message


def test_file_of_another_deal_is_refused(deal: Path, certs: tuple[Path, Recorder], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of a second deal, pinned by its own digest, beside the first deal's manifest."""
    other = tmp_path / "other"
    _deal_tiny(other)
    raw = _raw(deal, certs[0], "digest")
    raw["parties"][1]["manifest"] = str(deal / "manifest.json")
    raw["parties"][1]["shares"] = str(other / "party1" / "shares.pt")
    raw["parties"][1]["shares_sha256"] = file_sha256(other / "party1" / "shares.pt")[0]
    # the header check after loading would name the deal ids
    cfg = ClusterConfig.from_dict(raw)
    header = torch.load(other / "party1" / "shares.pt", weights_only=True)
    with pytest.raises(ConfigError, match="is from deal"):
        check_party_header(header, cfg.party(1), cfg)
    # but the node refuses it before loading: the manifest lists another digest
    message = _refused(raw, 1, monkeypatch)
    assert "another deal" in message, message


def test_a_pinned_file_whose_graph_runs_code_is_refused_at_start_up(deal: Path, certs: tuple[Path, Recorder]
                                                                    ) -> None:
    """The digest proves who dealt a file, not that it is harmless: a model owner who pins a
    graph naming an attribute chain (the exploit of issue 10) gets a node that refuses to
    start, naming the node, the op and the file (tests/test_registry.py shows the chain is
    never executed)."""
    from party.integrity import file_sha256

    path = deal / "party1" / "shares.pt"
    data = torch.load(path, weights_only=True)
    graphs = data["models"]["tiny"]["graphs"]  # share-file format 2 (party.catalogue)
    graph = json.loads(graphs[str(SEQ)])
    victim = next(n for n in graph["nodes"] if not n["secret"])
    victim["op"], victim["args"] = "__init__.__globals__.get", ["__builtins__"]
    graphs[str(SEQ)] = json.dumps(graph)
    torch.save(data, path)
    raw = _raw(deal, certs[0])
    raw["parties"][1]["shares_sha256"] = file_sha256(path)[0]
    with pytest.raises(ConfigError) as info:
        _node(raw, 1)
    message = str(info.value)
    assert victim["name"] in message and "__init__.__globals__.get" in message and str(path) in message
