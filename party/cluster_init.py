"""``cluster init``: what three hosts and their clients need, one folder per host.

    secure-cluster --party 10.0.0.1:50051 --party 10.0.0.2:50051 --party host3.example.org:50051 --out cluster/
    python -m party.deal --model minilm --out cluster/          # deals into the host folders and pins them
    secure-cluster pin --deal DEAL --out cluster/               # instead: copy and pin a deal made elsewhere

(``python -m party.cluster_init`` is the same command.) Each ``--party HOST:PORT`` gives a
party's host (DNS name or IP address; IPv6 in brackets) and its peer port, in party order;
its client port is PORT + 1. Written under OUT:

* ``ca/ca.pem``, ``ca/ca.key`` -- the cluster CA (not with ``--ca-cert/--ca-key``, an
  existing CA that signs instead); the key stays with the operator, on no host;
* ``partyN/`` (0700) -- all that host N needs: ``ca.pem``, ``partyN.pem`` and ``partyN.key``
  (0600; the certificate names ``partyN`` and the host, see ``party.certs``),
  ``cluster.json``, and once dealt ``shares.pt`` (0600) and ``manifest.json``;
* ``client/`` (0700; ``client2/``... with ``--clients N``) -- ``ca.pem``, ``cluster.json``,
  ``tokens.json`` (0600: one token per party) and, for a dealt model folder, ``tokenizer/``
  (another model of the deal: ``tokenizers/NAME/``).

``cluster.json`` is the same file in every folder (``party.config.ClusterConfig``; relative
paths, so each host resolves its own entry: ``shares.pt``, ``partyN.pem``, ``partyN.key``).
It lists each party's address, TLS files and the SHA-256 of every client's token for that
party. The share-file pins (``shares_sha256``, and ``manifest``) exist only once the model
is dealt: ``pin_deal`` writes them into every copy, called by ``python -m party.deal`` when
its ``--out`` is such a folder, or by ``secure-cluster pin`` for a deal made elsewhere (it
copies each party's file in, checking it against the manifest; with ``--dealer-public-key``
at init, the manifest's signature too).

Everything is checked before anything is written: three parties, valid hosts and ports, no
port used twice on one machine (every loopback address is this machine: nodes listen on
all interfaces), certificates brought with ``--cert/--key`` that name their party and chain
to ``--ca-cert``, and an empty output folder unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from party.certs import check_party_certificate, load_ca, make_ca, make_leaf
from party.config import ClusterConfig, ConfigError, party_name, token_digest
from party.integrity import CHUNK, MANIFEST_NAME, load_public_key, manifest_entry, read_manifest, signature_path
from party.private_files import make_private_dir, open_private, write_private

CLUSTER_FILE = "cluster.json"
SHARES_FILE = "shares.pt"
TOKEN_FILE = "tokens.json"
CA_FILE = "ca.pem"
DEALER_KEY_FILE = "dealer.pub"
TOKENIZER_DIR = "tokenizer"  # the deal's default model's tokenizer, when a client needs one
TOKENIZERS_DIR = "tokenizers"  # every other model's: tokenizers/NAME/
DEFAULT_DAYS = 365
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ClusterInitError(ConfigError):
    """Bad input to ``cluster init`` or ``pin``; nothing was written."""


# ---- addresses -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PartyAddress:
    """Where a party listens: its host, its peer port and its client port (peer port + 1)."""

    host: str
    peer_port: int
    client_port: int

    @property
    def machine(self) -> str:
        """The machine the host names, for port clashes: every loopback address is this one."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return "loopback" if self.host == "localhost" else self.host
        return "loopback" if ip.is_loopback else str(ip)

    @property
    def ports(self) -> tuple[int, int]:
        return self.peer_port, self.client_port

    @property
    def dial_host(self) -> str:
        """The host as the cluster file gives it (gRPC dials ``host:port``): IPv6 in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return f"{self.dial_host}:{self.peer_port}"


def parse_party(text: str) -> PartyAddress:
    """``HOST:PORT`` (``[IPv6]:PORT``) -> the party's address; ClusterInitError saying what is wrong."""
    text = text.strip()
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) if text.startswith("[") else None
    if m:
        host, port_text = m.group(1), m.group(2)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ClusterInitError(f"--party {text!r}: expected HOST:PORT (e.g. 10.0.0.1:50051)")
        if ":" in host:
            raise ClusterInitError(f"--party {text!r}: put an IPv6 address in brackets, e.g. [2001:db8::1]:50051")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65534:
        raise ClusterInitError(f"--party {text!r}: the port must be a number from 1 to 65534 (the client port is "
                               "the next one)")
    return PartyAddress(_check_host(host, text), int(port_text), int(port_text) + 1)


def _check_host(host: str, text: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.lower().rstrip(".")
        if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise ClusterInitError(f"--party {text!r}: {host!r} is neither an IP address nor a valid DNS "
                                   "name") from None
        if name.replace(".", "").isdigit():
            raise ClusterInitError(f"--party {text!r}: {host!r} is not a valid IPv4 address") from None
        return name
    if ip.is_unspecified or ip.is_multicast:
        raise ClusterInitError(f"--party {text!r}: {host} cannot be dialled; give the host's own address")
    return str(ip)


def check_addresses(addresses: list[PartyAddress]) -> None:
    """Three parties, and no port that two parties (peer or client port) use on one machine."""
    if len(addresses) != 3:
        raise ClusterInitError(f"a cluster has exactly three parties, in order (--party three times); got "
                               f"{len(addresses)}")
    for i, a in enumerate(addresses):
        for j in range(i + 1, 3):
            b = addresses[j]
            clash = sorted(set(a.ports) & set(b.ports))
            if a.machine == b.machine and clash:
                where = "this machine (loopback)" if a.machine == "loopback" else a.machine
                raise ClusterInitError(
                    f"party {i} ({a}) and party {j} ({b}) are on the same host, {where}, and both use port "
                    f"{clash[0]} (each party uses its port and the next one): give them ports at least 2 apart")


# ---- the plan it prints ----------------------------------------------------------------------
@dataclass
class ClusterPlan:
    """What ``init_cluster`` wrote and the commands to run on each host."""

    out: Path
    addresses: list[PartyAddress]
    clients: list[Path]
    ca_key: Path | None
    node_commands: list[str] = field(default_factory=list)
    client_commands: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def instructions(self) -> str:
        out = self.out
        lines = [f"cluster written to {out} in {self.seconds:.1f} s: one folder per host, {len(self.clients)} "
                 f"client{'s' if len(self.clients) > 1 else ''}"]
        if self.ca_key is not None:
            lines.append(f"the CA's key {self.ca_key} stays with you: copy it to no host")
        lines += ["next, deal the model into this folder; that pins each share file in every cluster.json "
                  "(MiniLM: about 25 s):",
                  f"  python -m party.deal --model minilm --out {out}",
                  "  (your own model: --model PATH_TO_HF_FOLDER; a deal made elsewhere: "
                  f"secure-cluster pin --deal DEAL --out {out})",
                  "then copy each folder to its host and run its command there, from the folder that holds the copy "
                  "(the project installed there: scripts/setup.sh):"]
        lines += host_lines(out, self.addresses, self.clients)
        return "\n".join(lines)


def node_command(party: int) -> str:
    """The command that starts party ``party``'s node, from the folder holding its copied folder."""
    return f"python -m party --config party{party}/{CLUSTER_FILE} --party {party}"


def client_command(client: str) -> str:
    """The command a client runs, from the folder holding its copied folder."""
    return f"python -m client --config {client}/{CLUSTER_FILE} --token-file {client}/{TOKEN_FILE} < question.txt"


def host_lines(out: Path, addresses: list[PartyAddress], clients: list[Path]) -> list[str]:
    """Per host: what to copy there and the one command to run."""
    lines = []
    for i, a in enumerate(addresses):
        folder = out / f"party{i}"
        target = a.dial_host
        lines += [f"party {i} on {a.host} (peer port {a.peer_port}: open to the other two hosts; client port "
                  f"{a.client_port}: open to clients):",
                  f"  copy:  scp -rp {folder} {target}:      ({_listing(folder)})",
                  f"  start: {node_command(i)}"]
    for c in clients:
        lines += [f"client folder {c.name}/ (its own tokens):", f"  copy:  {c}      ({_listing(c)})",
                  f"  query: {client_command(c.name)}"]
    return lines


def _listing(folder: Path) -> str:
    return " ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                           if not p.name.startswith(".")))


# ---- init ------------------------------------------------------------------------------------
def client_folders(out: Path) -> list[Path]:
    """The client folders of a cluster folder: ``client``, ``client2``, ... (those with a token file)."""
    found = [p for p in out.glob("client*") if re.fullmatch(r"client(\d*)", p.name) and (p / TOKEN_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[6:] or 1))


def is_cluster_folder(path: Path) -> bool:
    """Whether ``path`` was written by ``init_cluster`` (three party folders and a client folder)."""
    return all((path / party_name(i) / CLUSTER_FILE).is_file() for i in range(3)) and bool(client_folders(path))


def _check_inputs(out: Path, force: bool, clients: int, days: int, ca_cert: Path | None, ca_key: Path | None,
                  certs: list[tuple[Path, Path]] | None, dealer_public_key: Path | None) -> None:
    if out.exists() and not out.is_dir():
        raise ClusterInitError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ClusterInitError(f"{out} exists and is not empty: choose a new folder, or pass --force to write into "
                               "it (the files cluster init writes are replaced; others are left)")
    if not 1 <= clients <= 1000:
        raise ClusterInitError(f"--clients must be from 1 to 1000, got {clients}")
    if days < 1:
        raise ClusterInitError(f"--days must be at least 1, got {days}")
    if certs is not None:
        if len(certs) != 3:
            raise ClusterInitError(f"--cert and --key come three times each, in party order; got {len(certs)} pairs")
        if ca_cert is None:
            raise ClusterInitError("certificates brought with --cert/--key need --ca-cert, the CA that signed them")
        for i, (cert, key) in enumerate(certs):
            check_party_certificate(cert, key, ca_cert, i)
    elif (ca_cert is None) != (ca_key is None):
        raise ClusterInitError("--ca-cert and --ca-key go together (an existing CA to sign the party certificates)")
    if dealer_public_key is not None:
        load_public_key(dealer_public_key)


def init_cluster(out: Path, parties: list[str], clients: int = 1, ca_cert: Path | None = None,
                 ca_key: Path | None = None, certs: list[tuple[Path, Path]] | None = None,
                 dealer_public_key: Path | None = None, force: bool = False, days: int = DEFAULT_DAYS
                 ) -> ClusterPlan:
    """Write a cluster folder for three hosts (see the module doc); ClusterInitError (or
    ConfigError for a certificate) before anything is written when the input is bad."""
    t0 = time.perf_counter()
    addresses = [parse_party(p) for p in parties]
    check_addresses(addresses)
    _check_inputs(out, force, clients, days, ca_cert, ca_key, certs, dealer_public_key)
    make_private_dir(out)
    made_ca_key = None
    if certs is None and ca_cert is None:
        signing_key, signing_cert = make_ca(out / "ca", days=days)
        ca_cert, made_ca_key = out / "ca" / "ca.pem", out / "ca" / "ca.key"
    elif certs is None:
        assert ca_cert is not None and ca_key is not None
        signing_key, signing_cert = load_ca(ca_cert, ca_key)
    assert ca_cert is not None
    ca_pem = ca_cert.read_bytes()
    for i, address in enumerate(addresses):
        folder = make_private_dir(out / party_name(i))
        (folder / CA_FILE).write_bytes(ca_pem)
        if certs is None:
            make_leaf(folder, party_name(i), signing_key, signing_cert, hosts=(address.host,), days=days)
        else:
            (folder / f"{party_name(i)}.pem").write_bytes(certs[i][0].read_bytes())
            write_private(folder / f"{party_name(i)}.key", certs[i][1].read_bytes())
        if dealer_public_key is not None:
            (folder / DEALER_KEY_FILE).write_bytes(dealer_public_key.read_bytes())
    digests: list[list[str]] = [[], [], []]
    client_dirs = []
    for c in range(clients):
        folder = make_private_dir(out / ("client" if c == 0 else f"client{c + 1}"))
        (folder / CA_FILE).write_bytes(ca_pem)
        tokens = [secrets.token_urlsafe(32) for _ in range(3)]  # one per party: none can replay another's
        write_private(folder / TOKEN_FILE, json.dumps({party_name(i): t for i, t in enumerate(tokens)}).encode())
        for i in range(3):
            digests[i].append(token_digest(tokens[i]))
        client_dirs.append(folder)
    raw: dict[str, Any] = {
        "model": "", "frac_bits": 18, "deadline_s": 60.0, "receive_timeout_s": 60.0, "tls": {"ca": CA_FILE},
        "parties": [{"id": i, "host": a.dial_host, "peer_port": a.peer_port, "client_port": a.client_port,
                     "cert": f"{party_name(i)}.pem", "key": f"{party_name(i)}.key", "shares": SHARES_FILE,
                     "client_token_sha256": digests[i]} for i, a in enumerate(addresses)],
    }
    if dealer_public_key is not None:
        raw["dealer_public_key"] = DEALER_KEY_FILE
    write_cluster_files(out, raw)
    plan = ClusterPlan(out, addresses, client_dirs, made_ca_key, [node_command(i) for i in range(3)],
                       [client_command(c.name) for c in client_dirs])
    plan.seconds = time.perf_counter() - t0
    return plan


def write_cluster_files(out: Path, raw: dict[str, Any]) -> list[Path]:
    """The same cluster.json into every party and client folder, each read back as a node reads it."""
    paths = [out / party_name(i) / CLUSTER_FILE for i in range(3)] + [c / CLUSTER_FILE for c in client_folders(out)]
    text = json.dumps(raw, indent=2) + "\n"
    for path in paths:
        path.write_text(text)
        ClusterConfig.load(path)
    return paths


# ---- pin -------------------------------------------------------------------------------------
def _copy_checked(src: Path, dst: Path, listed: dict[str, Any], manifest: Path) -> None:
    """Copy a share file to ``dst`` (0600 from its first byte) if it has the size and SHA-256
    the manifest lists, else leave ``dst`` as it was and refuse; a file already at ``dst`` is
    only checked."""
    def check(digest: str, size: int) -> None:
        if (digest, size) != (listed["sha256"], listed["size"]):
            raise ClusterInitError(f"{src} does not match the manifest {manifest}: sha256 {digest} ({size} bytes), "
                                   f"the manifest lists {listed['sha256']} ({listed['size']} bytes)")

    h, size = hashlib.sha256(), 0
    try:
        same = dst.exists() and src.samefile(dst)
        with open(src, "rb") as f:
            if same:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                check(h.hexdigest(), size)
                return
            with open_private(dst) as g:  # an exception inside discards the copy, dst untouched
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    g.write(chunk)
                check(h.hexdigest(), size)
    except OSError as e:
        raise ClusterInitError(f"cannot copy the share file {src} to {dst}: {e}") from None


def copy_tokenizers(deal: Path, dest: Path) -> None:
    """Put a deal's tokenizers (``tokenizer/``, ``tokenizers/NAME/``) into ``dest``, in place of
    any earlier deal's (a client looks for them beside its cluster.json)."""
    for name in (TOKENIZER_DIR, TOKENIZERS_DIR):
        shutil.rmtree(dest / name, ignore_errors=True)  # never a tokenizer of an earlier deal
        if (deal / name).is_dir():
            shutil.copytree(deal / name, dest / name)


def pin_deal(deal: Path, out: Path) -> str:
    """Put a deal into a cluster folder: each party's share file into its folder (checked
    against the dealer's manifest, whose signature is checked first when the cluster has a
    dealer_public_key), the manifest beside it, a model folder's tokenizer into each client
    folder, and the pins (model, frac_bits, ``shares_sha256``, ``manifest``) into every
    cluster.json. Returns what to copy where, as :meth:`ClusterPlan.instructions` does."""
    if not is_cluster_folder(out):
        raise ClusterInitError(f"{out} is not a folder written by secure-cluster (party0/, party1/, party2/ and "
                               "client/, each with cluster.json)")
    raw = json.loads((out / party_name(0) / CLUSTER_FILE).read_text())
    key = None
    if raw.get("dealer_public_key"):
        key = load_public_key(out / party_name(0) / raw["dealer_public_key"])
    manifest_path = deal / MANIFEST_NAME
    manifest = read_manifest(manifest_path, key)
    manifest_bytes = manifest_path.read_bytes()
    signature = signature_path(manifest_path)
    lines = []
    for entry in raw["parties"]:
        i = int(entry["id"])
        listed = manifest_entry(manifest, i, manifest_path)
        src, folder = deal / listed["path"], out / party_name(i)
        _copy_checked(src, folder / SHARES_FILE, listed, manifest_path)
        digest, size = listed["sha256"], listed["size"]
        if not (folder / MANIFEST_NAME).exists() or not (folder / MANIFEST_NAME).samefile(manifest_path):
            (folder / MANIFEST_NAME).write_bytes(manifest_bytes)
            if signature.exists():
                signature_path(folder / MANIFEST_NAME).write_bytes(signature.read_bytes())
            else:
                signature_path(folder / MANIFEST_NAME).unlink(missing_ok=True)
        entry["shares"], entry["shares_sha256"], entry["manifest"] = SHARES_FILE, digest, MANIFEST_NAME
        lines.append(f"party {i}: {folder / SHARES_FILE}  {size / 1e6:.1f} MB  sha256 {digest}")
    raw["model"], raw["frac_bits"] = manifest["model"], int(manifest["frac_bits"])
    for client in client_folders(out):
        copy_tokenizers(deal, client)
    write_cluster_files(out, raw)
    addresses = [PartyAddress(str(p["host"]).strip("[]"), int(p["peer_port"]), int(p["client_port"]))
                 for p in raw["parties"]]
    lines.insert(0, f"pinned {manifest['model']} (deal {manifest['deal_id']}, {manifest.get('recipe')} recipe, "
                    f"lengths {manifest.get('seq_lens')}) in every cluster.json under {out}:")
    if len(manifest.get("models", [])) > 1:  # a catalogue: the default model first
        lines.insert(1, "the deal's catalogue: " + ", ".join(f"{m['model']} ({m['kind']})" for m in manifest["models"]))
    lines.append("copy each folder to its host and run its command there, from the folder that holds the copy:")
    return "\n".join(lines + host_lines(out, addresses, client_folders(out)))


# ---- command line ----------------------------------------------------------------------------
def pin_main(argv: list[str]) -> int:
    """``secure-cluster pin --deal DEAL --out CLUSTER``: copy a deal into a cluster folder and pin it."""
    ap = argparse.ArgumentParser(prog="secure-cluster pin", description=pin_main.__doc__)
    ap.add_argument("--deal", type=Path, required=True, help="the dealer's --out folder (manifest.json, partyN/)")
    ap.add_argument("--out", type=Path, required=True, help="the folder secure-cluster wrote")
    args = ap.parse_args(argv)
    try:
        print(pin_deal(args.deal, args.out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pin"]:
        return pin_main(argv[1:])
    if argv[:1] == ["init"]:
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="secure-cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--party", action="append", default=[], metavar="HOST:PORT",
                    help="a party's host and peer port (its client port is PORT+1); three times, in party order")
    ap.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")
    ap.add_argument("--clients", type=int, default=1, help="how many clients get a token file (default 1)")
    ap.add_argument("--ca-cert", type=Path, help="an existing CA certificate (PEM) instead of a new CA")
    ap.add_argument("--ca-key", type=Path, help="its private key (PEM), to sign the party certificates")
    ap.add_argument("--cert", action="append", type=Path, help="bring your own party certificate (three, in order)")
    ap.add_argument("--key", action="append", type=Path, help="the key of each --cert (three, in order)")
    ap.add_argument("--dealer-public-key", type=Path,
                    help="the dealer's Ed25519 public key: nodes then also check the signed manifest")
    ap.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity of new certificates (default 365)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty folder")
    args = ap.parse_args(argv)
    try:
        if (args.cert is None) != (args.key is None) or len(args.cert or []) != len(args.key or []):
            raise ClusterInitError("--cert and --key come in pairs, three of each in party order")
        certs = list(zip(args.cert, args.key)) if args.cert else None
        plan = init_cluster(args.out, args.party, args.clients, args.ca_cert, args.ca_key, certs,
                            args.dealer_public_key, args.force, args.days)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.instructions())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
