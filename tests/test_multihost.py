"""The README's "Running a cluster yourself" across a real network: three hosts and a client,
each in its own network namespace, and a link cut mid-query.

The network: four namespaces (``mhtest<pid>-p0``/``-p1``/``-p2`` for the parties, ``-cl`` for
the client), each with loopback up and one address on 10.203.0.0/24, a subnet that exists
only inside them, joined by veth pairs to a bridge in a fifth namespace (``-br``): nothing
of it touches the root namespace's interfaces, routes or firewall, and no namespace has a
route anywhere else. Everything is removed afterwards, also when a test fails; namespaces
of an earlier run that crashed (its pid gone) are removed first.

1. ``secure-cluster`` for the three namespace addresses (all on the README's port 50051:
   each is its own host), a deal of a model folder that is not MiniLM (the random 2-layer
   BERT of ``test_cluster_init``) for length 128 into that folder, then the deadlines set
   small in every copy of cluster.json alike (``deadline_s`` and ``receive_timeout_s``:
   3 s) with a Prometheus endpoint per node (``metrics_port``), and each party's folder
   copied alone to its host's folder and the client's to the client's (as ``scp -rp``);
2. each node started in its namespace with exactly the command ``secure-cluster`` printed
   (``ip netns exec NS python -m party ...``), ready when every node's metrics report both
   peers up (what its Health calls ready);
3. the printed client command, run in the client's namespace: its answer against the
   plaintext model (cosine > 0.999). The command starts with its standard input a pipe
   and gets the question when the test writes it (as ``< question.txt`` would give it),
   so that its 4-5 s of imports overlap the test's waiting and its query starts when the
   test wants;
4. the link cut, made deterministic by the traffic itself: a query of about 460 rounds
   and 74 MB through party 1's cable starts; once all three nodes have logged it accepted
   and half of what such a query moves through that cable has gone (the veth's byte
   counters against a query seen before), party 1's cable is cut (``ip link set`` its veth
   ``down`` at the bridge: every packet to and from party 1 is lost, nothing is reset).
   The client fails within the deadline with DEADLINE_EXCEEDED naming the query; every
   node (party 1 too, behind its cut cable) logs the query failed after some of its rounds
   but not all, frees it (``active_queries`` 0, one more failed query in ``queries_total``)
   and reports the peers it cannot reach down; then the cable is plugged back in, the
   nodes report each other up, and the next query, started at once, is answered right.

The namespaces need root and ``ip`` (iproute2); where they cannot be made the module skips,
saying why. About 45 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from tests.cluster_folder import (
    HAVE_TOKENIZER,
    NO_TOKENIZER,
    as_argv,
    cosine,
    plain_embedding,
    printed,
    save_model_folder,
)

pytestmark = pytest.mark.skipif(not HAVE_TOKENIZER, reason=NO_TOKENIZER)

SUBNET_BITS = 24  # 10.203.0.0/24: exists only inside the test's namespaces
PARTY_ADDRESSES = ("10.203.0.1", "10.203.0.2", "10.203.0.3")
CLIENT_ADDRESS = "10.203.0.10"
PORT = 50051  # every party on its own host: the README's port for all three
METRICS_PORT = 9100  # each node's own, on its namespace's loopback
DEADLINE_S = 3.0
SEQ = 128  # the one dealt length: about 460 rounds, 36 MB sent per party (seconds on 2 cores)
VICTIM = 1
TEXT = "Three hosts on one bridge answer a question none can read."
LONG_TEXT = ("A link between two of the three hosts goes dark in the middle of a long question, and the client "
             "must hear about it within the deadline instead of waiting forever; once the cable is plugged back "
             "in, the very next question has to come back right.")
NAME = re.compile(r"^mhtest(\d+)-(p[012]|cl|br)$")
SCRAPE = ("import sys, urllib.request; "
          "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
ACTIVE = "secure_inference_active_queries"
_LIBC = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


# ---- the network ---------------------------------------------------------------------------
class NetworkUnavailable(Exception):
    """A command that builds the test network failed: the test cannot run here."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, ["ip", *args], done.stdout, done.stderr)
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Network:
    """Three party namespaces and a client namespace on one bridge, in a namespace of its own.

    Interface ``v<i>`` in the bridge's namespace is the bridge's end of host ``i``'s cable
    (``i`` = 3: the client's); the host's end is ``eth0`` in its namespace.
    """

    def __init__(self, tag: str) -> None:
        self.hosts = [f"{tag}-p{i}" for i in range(3)]
        self.client = f"{tag}-cl"
        self.switch = f"{tag}-br"
        self.made: list[str] = []

    @staticmethod
    def remove_stale() -> None:
        """Remove the namespaces of earlier runs whose process is gone (a crash, a kill -9)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout
        for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
            m = NAME.match(name)
            if m and not _pid_alive(int(m.group(1))):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)

    def build(self) -> None:
        """The namespaces, the bridge, the cables and the addresses; NetworkUnavailable naming
        the command and its error when this machine cannot make them."""
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (ns, address) in enumerate(zip([*self.hosts, self.client], [*PARTY_ADDRESSES, CLIENT_ADDRESS])):
                self._add(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", self.switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{address}/{SUBNET_BITS}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except subprocess.CalledProcessError as e:
            raise NetworkUnavailable(f"{' '.join(e.cmd)} failed: {(e.stderr or '').strip()}") from None

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.made.append(ns)

    def remove(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.made.clear()

    def exec(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def set_cable(self, host: int, up: bool) -> None:
        """Cut (``up=False``) or plug back in host ``host``'s cable, at the bridge's end."""
        _ip("-n", self.switch, "link", "set", f"v{host}", "up" if up else "down")


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("no 'ip' command (iproute2) to make network namespaces")
    Network.remove_stale()
    net = Network(f"mhtest{os.getpid()}")
    try:
        try:
            net.build()
        except NetworkUnavailable as e:
            pytest.skip(f"cannot make the test network: {e}")
        yield net
    finally:
        net.remove()


# ---- the cluster -----------------------------------------------------------------------------
@dataclass
class Cluster:
    net: Network
    model_dir: Path
    homes: list[Path]  # each host's folder, holding its copy of partyN/
    client_home: Path  # the client's, holding client/
    node_commands: list[str]
    client_command: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    clients: list[subprocess.Popen] = field(default_factory=list)
    spare: subprocess.Popen | None = None  # a client command started ahead, importing

    def log(self, party: int) -> str:
        return (self.homes[party] / "node.log").read_text(errors="replace")

    def metrics(self, party: int) -> dict[str, float]:
        """Node ``party``'s Prometheus metrics, scraped inside its namespace (series -> value);
        empty while it does not answer."""
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        done = subprocess.run(self.net.exec(self.net.hosts[party], [sys.executable, "-I", "-c", SCRAPE, url]),
                              capture_output=True, text=True, timeout=20)
        series = {}
        for line in done.stdout.splitlines() if done.returncode == 0 else []:
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                series[name] = float(value)
        return series

    def start_client(self, spare: bool = True) -> subprocess.Popen:
        """The printed client command in the client's namespace, its standard input a pipe: it
        imports what it needs, then waits for the question (``_ask``). Hands out the one started
        ahead, if any, and (``spare``) starts the next one ahead."""
        proc, self.spare = self.spare, None
        if proc is None or proc.poll() is not None:
            proc = self._client()
        if spare:
            self.spare = self._client()
        return proc

    def _client(self) -> subprocess.Popen:
        argv, stdin = as_argv(self.client_command)
        assert stdin == "question.txt"
        proc = subprocess.Popen(self.net.exec(self.net.client, argv), cwd=self.client_home, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                preexec_fn=_die_with_the_test)
        self.clients.append(proc)
        return proc

    def cable_bytes(self, party: int) -> int:
        """Bytes through party ``party``'s cable so far, both ways (its node's view of its
        namespace's ``eth0``, ``/proc/PID/net/dev``)."""
        for line in Path(f"/proc/{self.procs[party].pid}/net/dev").read_text().splitlines():
            name, _, fields = line.partition(":")
            if name.strip() == "eth0":
                counters = fields.split()
                return int(counters[0]) + int(counters[8])  # received, transmitted
        raise AssertionError(f"party {party}'s namespace has no eth0")

    def wait_ready(self, timeout_s: float) -> None:
        """Until every node's metrics report both its peers up (its Health's readiness)."""
        end = time.monotonic() + timeout_s
        while True:
            for i, p in enumerate(self.procs):
                assert p.poll() is None, f"node {i} exited: {self.log(i)}"
            up = [_peers_up(self.metrics(i), i) for i in range(3)]
            if all(all(u.values()) for u in up):
                return
            assert time.monotonic() < end, (up, [self.log(i) for i in range(3)])
            time.sleep(0.3)


def _peers_up(metrics: dict[str, float], party: int) -> dict[str, bool]:
    return {f"party{p}": metrics.get(f'secure_inference_peer_up{{peer="party{p}"}}') == 1.0 for p in range(3)
            if p != party}


def _failed(metrics: dict[str, float]) -> float:
    """Queries the node counted as failed (any status)."""
    return sum(v for k, v in metrics.items() if k.startswith("secure_inference_queries_total{") and
               'outcome="failed"' in k)


def _env() -> dict[str, str]:
    from party.launch import REPO

    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _prepare(out: Path, model_dir: Path) -> str:
    """cluster init for the namespace addresses and the deal into its folder, as the README
    does; then the small deadlines and the metrics ports into every copy of cluster.json
    alike. Returns what cluster init printed."""
    from party.cluster_init import main as cluster_main
    from party.config import ClusterConfig
    from party.deal import main as deal_main

    init_text, deal_text = io.StringIO(), io.StringIO()
    parties = [a for host in PARTY_ADDRESSES for a in ("--party", f"{host}:{PORT}")]
    with contextlib.redirect_stdout(init_text):
        assert cluster_main([*parties, "--out", str(out)]) == 0
    with contextlib.redirect_stdout(deal_text):
        assert deal_main(["--model", str(model_dir), "--out", str(out), "--seq-lens", str(SEQ)]) == 0
    assert "pinned tiny-bert" in deal_text.getvalue()
    copies = [out / f"party{i}" / "cluster.json" for i in range(3)] + [out / "client" / "cluster.json"]
    for path in copies:
        raw = json.loads(path.read_text())
        raw.update(deadline_s=DEADLINE_S, receive_timeout_s=DEADLINE_S)
        for entry in raw["parties"]:
            entry["metrics_port"] = METRICS_PORT
        path.write_text(json.dumps(raw, indent=2) + "\n")
    assert len({p.read_text() for p in copies}) == 1
    cfg = ClusterConfig.load(copies[0])
    assert [p.peer_address for p in cfg.parties] == [f"{h}:{PORT}" for h in PARTY_ADDRESSES]
    return init_text.getvalue()


@pytest.fixture(scope="module")
def cluster(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The dealt cluster, each folder copied to its host's folder, and the three nodes started in
    their namespaces with the printed commands; stopped afterwards."""
    root = tmp_path_factory.mktemp("multihost")
    model_dir = save_model_folder(root / "tiny-bert")
    out = root / "cluster"
    text = _prepare(out, model_dir)
    node_commands, (client_command,) = printed(text, "start"), printed(text, "query")
    assert node_commands == [f"python -m party --config party{i}/cluster.json --party {i}" for i in range(3)]
    homes = [root / f"host{i}" for i in range(3)]
    for i, home in enumerate(homes):  # host i gets party i's folder only (copytree keeps the modes)
        home.mkdir()
        shutil.copytree(out / f"party{i}", home / f"party{i}")
    client_home = root / "client-host"
    client_home.mkdir()
    shutil.copytree(out / "client", client_home / "client")
    c = Cluster(network, model_dir, homes, client_home, node_commands, client_command)
    try:
        for i, (home, command) in enumerate(zip(homes, node_commands)):
            argv, stdin = as_argv(command)
            assert stdin is None
            with open(home / "node.log", "w") as log:
                c.procs.append(subprocess.Popen(network.exec(network.hosts[i], argv), cwd=home, stdout=log,
                                                stderr=subprocess.STDOUT, env=_env(), preexec_fn=_die_with_the_test))
        c.spare = c._client()  # its imports overlap the nodes' start
        _wait_for(lambda: all(f"party {i} ready" in c.log(i) or c.procs[i].poll() is not None for i in range(3)), 90,
                  "the nodes to start")
        c.wait_ready(30)
        yield c
    finally:
        _stop([*c.clients, *c.procs])


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()


def _die_with_the_test() -> None:
    """In a child, before it runs: SIGTERM when the test process dies (a node or client left
    running would keep its namespace alive)."""
    _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---- helpers -------------------------------------------------------------------------------
def _ask(proc: subprocess.Popen, text: str) -> None:
    """The question, as the client command's ``< question.txt`` gives it."""
    assert proc.stdin is not None and proc.poll() is None, proc.communicate()
    proc.stdin.write(text)
    proc.stdin.close()
    proc.stdin = None  # communicate() then leaves it alone


def _finish(proc: subprocess.Popen, timeout_s: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the client did not return within {timeout_s} s: {err}") from None
    return proc.returncode, out, err


def _answer(cluster: Cluster, proc: subprocess.Popen, text: str) -> float:
    """Ask ``text`` and wait: the answer's cosine against the plaintext model."""
    _ask(proc, text)
    code, out, err = _finish(proc, 120)
    assert code == 0, err
    return cosine(torch.tensor(json.loads(out)["embedding"]), plain_embedding(cluster.model_dir, text, SEQ))


def _wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    """Until ``condition()`` is true; its value."""
    end = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def _accepted(log: str) -> list[str]:
    return re.findall(rf"query (\S+) accepted: (?:model \S+, )?length {SEQ}\b", log)


def _outcome(log: str, qid: str) -> tuple[str, int, int] | None:
    """How query ``qid`` ended on a node, by its log: (outcome, rounds, peer bytes both ways)."""
    m = re.search(rf"query {qid} (\w+) \(\w+\) after [\d.]+ s: (\d+) rounds, (\d+) bytes sent, (\d+) received", log)
    return None if m is None else (m.group(1), int(m.group(2)), int(m.group(3)) + int(m.group(4)))


# ---- the tests -------------------------------------------------------------------------------
def test_the_printed_commands_answer_across_hosts(cluster: Cluster) -> None:
    """Nodes in three namespaces, the client in a fourth: the answer against the plaintext model."""
    similarity = _answer(cluster, cluster.start_client(), TEXT)
    assert similarity > 0.999, similarity
    for i in range(3):  # each node was dialled at its own address, across the bridge
        assert len(_accepted(cluster.log(i))) == 1, cluster.log(i)


def test_a_cable_cut_mid_query_fails_it_within_the_deadline_then_the_next_query_succeeds(cluster: Cluster) -> None:
    net = cluster.net
    cut, after = cluster.start_client(), cluster.start_client(spare=False)  # after: once the cable is back
    if not _accepted(cluster.log(VICTIM)):  # a whole query to measure the cut one by (the first test's)
        assert _answer(cluster, cluster.start_client(spare=False), TEXT) > 0.999
    whole = _outcome(cluster.log(VICTIM), _accepted(cluster.log(VICTIM))[-1])
    assert whole is not None and whole[0] == "ok", cluster.log(VICTIM)
    before = [cluster.metrics(i) for i in range(3)]
    seen = len(_accepted(cluster.log(0)))
    _ask(cut, LONG_TEXT)
    plugged = True
    try:
        _wait_for(lambda: all(len(_accepted(cluster.log(i))) > seen for i in range(3)) or cut.poll() is not None, 60,
                  "the three nodes to accept the query")
        start = cluster.cable_bytes(VICTIM)
        qid = _accepted(cluster.log(0))[-1]
        assert all(_accepted(cluster.log(i))[-1] == qid for i in range(3))
        # half-way through by party 1's traffic (its client upload came before it accepted)
        _wait_for(lambda: cluster.cable_bytes(VICTIM) - start >= whole[2] // 2 or cut.poll() is not None, 60,
                  "half of the query's traffic")
        assert cut.poll() is None, f"the query ended before the cut: {cut.communicate()}"
        net.set_cable(VICTIM, up=False)
        plugged = False
        cut_at = time.monotonic()
        code, out, err = _finish(cut, DEADLINE_S * 4 + 30)
        elapsed = time.monotonic() - cut_at
        # the client fails within the deadline, clearly
        assert code == 1, (code, out, err)
        assert elapsed <= DEADLINE_S + 5, f"the client took {elapsed:.1f} s to fail (deadline {DEADLINE_S} s): {err}"
        assert f"query {qid} failed" in err and "DEADLINE_EXCEEDED" in err, err
        assert f"within {DEADLINE_S:.1f} s" in err, err
        # every party fails the query mid-way and frees it (party 1 too, behind its cut cable)
        for i in range(3):
            _wait_for(lambda i=i: _outcome(cluster.log(i), qid) is not None, DEADLINE_S + 10,
                      f"party {i} to end query {qid}")
            outcome, rounds, _ = _outcome(cluster.log(i), qid) or ("", 0, 0)
            assert outcome == "failed" and 0 < rounds < whole[1], (i, cluster.log(i))
            assert f"query {qid} failed after" in cluster.log(i)  # with the reason
            now = _wait_for(lambda i=i: (m := cluster.metrics(i)).get(ACTIVE) == 0.0 and m, DEADLINE_S + 10,
                            f"party {i} to free it")
            assert _failed(now) == _failed(before[i]) + 1, now
            # and reports the peers it cannot reach down, as its Health does
            assert _peers_up(now, i) == {f"party{p}": VICTIM not in (i, p) for p in range(3) if p != i}, now
        net.set_cable(VICTIM, up=True)
        plugged = True
    finally:
        if not plugged:
            net.set_cable(VICTIM, up=True)
    cluster.wait_ready(30)
    similarity = _answer(cluster, after, LONG_TEXT)  # started at once: no stale connection may swallow it
    assert similarity > 0.999, similarity
