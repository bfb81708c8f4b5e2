"""Launch a local three-party cluster on loopback: certificates, dealing, configuration,
and one process per party node.

Used by the main job and the tests::

    with LocalNodes(Path("/tmp/cluster")) as nodes:
        with SecureClient(nodes.config, nodes.tokens) as client:
            print(client.embed("hello").embedding)

    LocalNodes(workdir, models=("minilm", "tiny-llama"))   # a catalogue: --model values of party.deal

(The party side never imports the client: readiness is probed with the nodes' own
``Health``.)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from party.certs import make_cluster_certs
from party.cluster_init import copy_tokenizers
from party.config import ClusterConfig, party_name, token_digest
from party.deal import (
    DEFAULT_CAPACITIES,
    DEFAULT_PROMPT_BUCKETS,
    DEFAULT_SEQ_LENS,
    deal_minilm,
    deal_sources,
    default_name,
    model_source,
    parse_model_spec,
)
from party.integrity import MANIFEST_NAME, read_manifest
from party.private_files import write_private
from protos import load as load_protos
from secure.graph.passes import RECIPES, REWRITE_VERSION

REPO = Path(__file__).resolve().parent.parent
pb2, pb2_grpc = load_protos()


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalNodes:
    """Three party processes on 127.0.0.1 serving a dealt all-MiniLM-L6-v2, or the
    catalogue ``models`` names (``party.deal``'s ``--model`` values, ``[NAME=]SOURCE``; the
    first is the cluster's default model): encoders at ``seq_lens``, causal LMs at
    ``prompt_buckets`` and ``capacities``, all with ``recipe``. ``link_shape`` (e.g.
    ``"40ms,100mbit"``, benchmarks only) makes the nodes emulate that link between them;
    ``max_batch`` and ``batch_window_ms`` are the nodes' ``--max-batch`` and
    ``--batch-window-ms`` (``party.batching``; None: the node's default)."""

    def __init__(self, workdir: Path, recipe: str = "ours", seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS,
                 tls: bool = True, deadline_s: float = 30.0, progress: bool = True,
                 models: Sequence[str] = ("minilm",), prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS,
                 capacities: tuple[int, ...] = DEFAULT_CAPACITIES, receive_timeout_s: float | None = None,
                 link_shape: str | None = None, max_batch: int | None = None,
                 batch_window_ms: float | None = None) -> None:
        self.dir = workdir
        self.recipe = recipe
        self.seq_lens = seq_lens
        self.models = [parse_model_spec(m) for m in models]
        self.prompt_buckets = prompt_buckets
        self.capacities = capacities
        self.tls = tls
        self.deadline_s = deadline_s
        self.receive_timeout_s = receive_timeout_s if receive_timeout_s is not None else deadline_s
        self.progress = progress
        self.link_shape = link_shape  # the nodes' --link-shape (benchmarks: an emulated link); read at start()
        self.max_batch = max_batch
        self.batch_window_ms = batch_window_ms
        self.procs: list[subprocess.Popen | None] = [None, None, None]
        self.tokens: list[str] = []
        self.config_path = self.dir / "cluster.json"

    # ---- set-up ------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        """The dealt models' names, the default first."""
        return [name or default_name(source) for name, source in self.models]

    def _dealt(self, deal_dir: Path) -> bool:
        """Whether ``deal_dir`` holds a deal of these models, recipe and lengths (model.json)."""
        info_path = deal_dir / "model.json"
        if not info_path.exists() or not (deal_dir / MANIFEST_NAME).exists():
            return False
        info = json.loads(info_path.read_text())
        models = info.get("models") or [{**info, "kind": "encoder", "capacities": []}]  # a format-1 deal
        if [m.get("model") for m in models] != self.model_names:
            return False
        for m in models:
            causal = m.get("kind") == "causal"
            wanted = (list(self.prompt_buckets if causal else self.seq_lens), list(self.capacities) if causal else [])
            if (m.get("seq_lens"), m.get("capacities")) != wanted or m.get("recipe") != self.recipe:
                return False
            if m.get("rewrite_version") != REWRITE_VERSION:  # dealt by code whose passes wrote other graphs
                return False
        return True

    def deal(self, deal_dir: Path) -> None:
        """Deal the models into ``deal_dir`` (MiniLM alone: ``party.deal.deal_minilm``)."""
        if self.models == [(None, "minilm")]:
            deal_minilm(deal_dir, RECIPES[self.recipe], self.seq_lens, progress=self.progress)
            return
        sources = [model_source(source, self.recipe, name, self.seq_lens, self.prompt_buckets)
                   for name, source in self.models]
        deal_sources(sources, deal_dir, self.seq_lens, self.prompt_buckets, self.capacities, progress=self.progress)

    def prepare(self) -> ClusterConfig:
        """Certificates, dealt shares (reused when the same models, recipe and lengths are
        there), the deal's tokenizers beside the config (where a client looks), config."""
        self.dir.mkdir(parents=True, exist_ok=True)
        deal_dir = self.dir / "deal"
        if not self._dealt(deal_dir):
            self.deal(deal_dir)
        copy_tokenizers(deal_dir, self.dir)
        pins = {p["id"]: p for p in read_manifest(deal_dir / MANIFEST_NAME)["parties"]}
        ca = None
        leaves: list[tuple[Path | None, Path | None]] = [(None, None)] * 3
        if self.tls:
            ca, pairs = make_cluster_certs(self.dir / "certs")
            leaves = list(pairs)
        self.tokens = [secrets.token_urlsafe(24) for _ in range(3)]  # one per party: none can replay another's
        write_private(self.token_path, json.dumps({party_name(i): t for i, t in enumerate(self.tokens)}).encode())
        ports = free_ports(6)
        raw = {
            "model": self.model_names[0], "frac_bits": 18, "deadline_s": self.deadline_s,
            "receive_timeout_s": self.receive_timeout_s,
            "parties": [{"id": i, "host": "127.0.0.1", "peer_port": ports[2 * i], "client_port": ports[2 * i + 1],
                         "shares": str(deal_dir / pins[i]["path"]), "shares_sha256": pins[i]["sha256"],
                         "client_token_sha256": [token_digest(self.tokens[i])],
                         "cert": str(leaves[i][0]) if leaves[i][0] else None,
                         "key": str(leaves[i][1]) if leaves[i][1] else None} for i in range(3)],
        }
        if ca is not None:
            raw["tls"] = {"ca": str(ca)}
        self.config_path.write_text(json.dumps(raw, indent=2))
        return ClusterConfig.load(self.config_path)

    @property
    def token_path(self) -> Path:
        """The client's token file (0600): one token per party."""
        return self.dir / "client_tokens.json"

    @property
    def config(self) -> ClusterConfig:
        return ClusterConfig.load(self.config_path)

    # ---- processes ---------------------------------------------------------------------
    def log_path(self, party: int) -> Path:
        return self.dir / f"party{party}.log"

    def start(self, party: int | None = None) -> None:
        """Start one party (or all) as ``python -m party`` processes, logging to files."""
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for i in ([party] if party is not None else [0, 1, 2]):
            with open(self.log_path(i), "a") as log:  # the child keeps its own copy of the descriptor
                insecure = [] if self.tls else ["--insecure"]
                shape = ["--link-shape", str(self.link_shape)] if self.link_shape else []
                shape += [] if self.max_batch is None else ["--max-batch", str(self.max_batch)]
                shape += [] if self.batch_window_ms is None else ["--batch-window-ms", str(self.batch_window_ms)]
                self.procs[i] = subprocess.Popen(
                    [sys.executable, "-m", "party", "--config", str(self.config_path), "--party", str(i), *insecure,
                     *shape],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))

    def ready(self, party: int, timeout_s: float = 1.0) -> bool:
        """Whether ``party`` answers Health as ready (it and both its peers up)."""
        cfg = self.config
        target = cfg.party(party).client_address
        if cfg.ca is None:
            channel = grpc.insecure_channel(target)
        else:
            channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(cfg.ca.read_bytes()),
                                          options=[("grpc.ssl_target_name_override", party_name(party))])
        with channel:
            try:
                return bool(pb2_grpc.PartyStub(channel).Health(pb2.HealthRequest(), timeout=timeout_s).ready)
            except grpc.RpcError:
                return False

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until all three nodes answer Health as ready; raise with their logs' tail if not."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"party {i} exited with {p.returncode}:\n{self.tail(i)}")
            if all(self.ready(i) for i in range(3)):
                return
            time.sleep(0.3)
        raise TimeoutError(f"the parties were not ready within {timeout_s:.0f} s:\n" +
                           "\n".join(self.tail(i) for i in range(3)))

    def tail(self, party: int, lines: int = 15) -> str:
        path = self.log_path(party)
        text = path.read_text().splitlines()[-lines:] if path.exists() else ["(no log)"]
        return f"--- party {party} ---\n" + "\n".join(text)

    def kill(self, party: int) -> None:
        """Kill a party abruptly (SIGKILL), as a crash would."""
        p = self.procs[party]
        if p is not None:
            p.kill()
            p.wait(10)
            self.procs[party] = None

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                self.procs[i] = None

    def __enter__(self) -> LocalNodes:
        self.prepare()
        self.start()
        try:
            self.wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
