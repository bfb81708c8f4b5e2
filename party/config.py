"""The cluster configuration file, read by the party nodes and by the client.

One JSON file per cluster::

    {
      "model": "minilm",
      "frac_bits": 18,
      "deadline_s": 60,
      "receive_timeout_s": 60,                  // a client's upload, from its first byte
      "max_request_bytes": 268435456,
      "tls": {"ca": "certs/ca.pem"},            // required unless nodes and client run --insecure
      "dealer_public_key": "dealer.pub",        // optional: Ed25519 key (PEM) signing the deal's manifest
      "parties": [
        {"id": 0, "host": "127.0.0.1", "peer_port": 50100, "client_port": 50200,
         "shares": "deal/party0/shares.pt", "cert": "certs/party0.pem", "key": "certs/party0.key",
         "shares_sha256": "<hex SHA-256 of the share file, as the dealer printed it>",
         "manifest": "deal/manifest.json",    // optional; needed with dealer_public_key
         "client_token_sha256": ["<hex SHA-256 of each client token party 0 accepts>"],
         "metrics_port": 9100, "metrics_bind": "127.0.0.1"},  // optional: Prometheus endpoint (party.metrics)
        ...
      ],
      "log_json": false                         // optional: JSON log lines (also: --log-json)
    }

Relative paths are relative to the file. A party only reads its own entry's shares, cert
and key; on separate hosts each host's copy needs only its own.

Share files are pinned: a node loads its file only if its SHA-256 equals the entry's
``shares_sha256``, or, with ``dealer_public_key``, the digest listed for that party in the
entry's ``manifest`` whose signature (``manifest.sig`` beside it) verifies under that key
(see ``party.integrity``). An unpinned share file is refused.

Identities: party N's certificate names it (``partyN``, in its subject and its DNS names);
peers and clients dial party N expecting that name, whatever address it has. Client
tokens are per party (a client holds three, see :func:`load_client_tokens`), so no party
can replay the token it received at another. A client sends its token in the call
metadata (:data:`TOKEN_METADATA_KEY`), where the node checks it before reading anything.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure.he.plain_cache import DEFAULT_BUDGET_BYTES

TOKEN_METADATA_KEY = "x-client-token"
MAX_LINEAR_WORKERS = 64


def default_linear_workers() -> int:
    """Worker processes an HE node starts for its linear layers: one per CPU beyond the first."""
    return max(0, min((os.cpu_count() or 1) - 1, MAX_LINEAR_WORKERS))


DEFAULT_METRICS_BIND = "127.0.0.1"  # metrics are exposed beyond the host only deliberately


class ConfigError(ValueError):
    """The cluster configuration is missing something or contradicts itself."""


def party_name(party_id: int) -> str:
    """The name party ``party_id``'s certificate carries and everyone dials it by."""
    return f"party{party_id}"


@dataclass(frozen=True)
class PartyEntry:
    id: int
    host: str
    peer_port: int
    client_port: int
    shares: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_token_sha256: tuple[str, ...] = ()
    shares_sha256: str | None = None  # the pinned SHA-256 (hex) of ``shares``
    manifest: Path | None = None  # the dealer's manifest.json (its .sig beside it)
    metrics_port: int | None = None  # Prometheus metrics endpoint (party.metrics); None: none
    metrics_bind: str = DEFAULT_METRICS_BIND

    @property
    def name(self) -> str:
        return party_name(self.id)

    @property
    def peer_address(self) -> str:
        return f"{_dialable(self.host)}:{self.peer_port}"

    @property
    def client_address(self) -> str:
        return f"{_dialable(self.host)}:{self.client_port}"


class _ConfigFile:
    """What both configuration files do: load from JSON, and refuse plaintext unless told."""

    what = "configuration file"
    tls: bool
    path: Path | None

    @classmethod
    def load(cls, path: str | Path) -> Any:
        path = Path(path)
        return cls.from_dict(_read_json(path, cls.what), path)  # type: ignore[attr-defined]

    def require_tls(self, insecure: bool) -> None:
        """Refuse to run without TLS unless explicitly told ``insecure``."""
        if not self.tls and not insecure:
            raise ConfigError(f"{self.path or f'the {self.what}'} has no 'tls' section: refusing to run in "
                              "plaintext; add tls (a CA and certificates) or pass --insecure for a local demo")


@dataclass(frozen=True)
class ClusterConfig(_ConfigFile):
    model: str
    parties: list[PartyEntry]
    frac_bits: int = 18
    deadline_s: float = 60.0
    receive_timeout_s: float = 60.0
    max_request_bytes: int = 256 << 20
    ca: Path | None = None
    dealer_public_key: Path | None = None  # Ed25519 public key (PEM) that signs the dealer's manifests
    path: Path | None = None
    log_json: bool = False  # JSON log lines (party.logs)

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def party(self, party_id: int) -> PartyEntry:
        for p in self.parties:
            if p.id == party_id:
                return p
        raise ConfigError(f"party {party_id} is not in the configuration (ids: {[p.id for p in self.parties]})")

    @staticmethod
    def from_dict(raw: dict[str, Any], path: Path | None = None) -> ClusterConfig:
        file = _resolver(path)

        if "client_token_sha256" in raw:
            raise ConfigError("'client_token_sha256' belongs in each party's entry now (one token per party, so "
                              "that no party can replay its token at another)")
        try:
            parties = [PartyEntry(int(p["id"]), str(p["host"]), int(p["peer_port"]), int(p["client_port"]),
                                  file(p.get("shares")), file(p.get("cert")), file(p.get("key")),
                                  tuple(str(t).lower() for t in p.get("client_token_sha256", [])),
                                  shares_sha256=sha256_hex(p["shares_sha256"]) if p.get("shares_sha256") else None,
                                  manifest=file(p.get("manifest")), **_metrics_setting(p, f"party {p['id']}"))
                       for p in raw["parties"]]
            tls = raw.get("tls")
            deadline_s = float(raw.get("deadline_s", 60.0))
            cfg = ClusterConfig(
                model=str(raw["model"]), parties=parties, frac_bits=int(raw.get("frac_bits", 18)),
                deadline_s=deadline_s, receive_timeout_s=float(raw.get("receive_timeout_s", deadline_s)),
                max_request_bytes=int(raw.get("max_request_bytes", 256 << 20)),
                ca=file(tls["ca"]) if tls else None, dealer_public_key=file(raw.get("dealer_public_key")),
                path=path, log_json=_flag(raw, "log_json"))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad cluster configuration{f' in {path}' if path else ''}: "
                              f"{type(e).__name__}: {e}") from None
        for p in cfg.parties:
            if p.metrics_port in (p.peer_port, p.client_port):
                raise ConfigError(f"bad cluster configuration{f' in {path}' if path else ''}: party {p.id}'s "
                                  f"metrics_port {p.metrics_port} is also its peer or client port")
        if sorted(p.id for p in cfg.parties) != [0, 1, 2]:
            raise ConfigError(f"the cluster needs parties 0, 1 and 2, got {[p.id for p in cfg.parties]}")
        if cfg.tls and any(p.cert is None or p.key is None for p in cfg.parties):
            raise ConfigError("with tls every party needs a cert and a key")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            if self.path is not None:
                try:
                    return str(p.relative_to(self.path.parent))
                except ValueError:
                    return str(p)
            return str(p)

        out: dict[str, Any] = {
            "model": self.model, "frac_bits": self.frac_bits, "deadline_s": self.deadline_s,
            "receive_timeout_s": self.receive_timeout_s, "max_request_bytes": self.max_request_bytes,
            "parties": [{"id": p.id, "host": p.host, "peer_port": p.peer_port, "client_port": p.client_port,
                         "shares": rel(p.shares), "cert": rel(p.cert), "key": rel(p.key),
                         "client_token_sha256": list(p.client_token_sha256),
                         "shares_sha256": p.shares_sha256, "manifest": rel(p.manifest)}
                        for p in self.parties],
        }
        if self.ca is not None:
            out["tls"] = {"ca": rel(self.ca)}
        if self.dealer_public_key is not None:
            out["dealer_public_key"] = rel(self.dealer_public_key)
        for entry, p in zip(out["parties"], self.parties):
            if p.metrics_port is not None:
                entry.update(metrics_port=p.metrics_port, metrics_bind=p.metrics_bind)
        if self.log_json:
            out["log_json"] = True
        return out


def token_digest(token: str) -> str:
    """What a configuration stores for a client token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def sha256_hex(value: Any) -> str:
    """A SHA-256 digest as 64 lower-case hex digits; ValueError for anything else."""
    digest = str(value).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{value!r} is not a hex SHA-256 digest")
    return digest


def load_client_tokens(path: str | Path) -> list[str]:
    """A client's tokens, one per party: a JSON object ``{"party0": ..., "party1": ..., "party2": ...}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        tokens = [str(raw[party_name(i)]) for i in range(3)]
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"token file {path} must be a JSON object with one token per party "
                          f"({', '.join(party_name(i) for i in range(3))}): {type(e).__name__}: {e}") from None
    if not all(tokens):
        raise ConfigError(f"token file {path} has an empty token")
    return tokens


@dataclass(frozen=True)
class HeModelEntry:
    """A model an HE node serves: ``tiny`` or a distilled Power-Softmax folder, at these lengths."""

    model: str
    seq_lens: tuple[int, ...] = (16,)


@dataclass(frozen=True)
class HeNodeConfig(_ConfigFile):
    """The HE node's configuration file, read by the node and by its clients::

        {
          "address": "he.example.org:50070",     // where clients dial
          "bind": "[::]:50070",                  // where the node listens (default: [::] and the port)
          "tls": {"ca": "certs/ca.pem", "cert": "certs/he-node.pem", "key": "certs/he-node.key",
                  "name": "he-node"},             // the name clients expect in the certificate
          "client_token_sha256": ["<hex SHA-256 of each accepted client token>"],
          "models": [{"model": "tiny", "seq_lens": [16]}],
          "max_concurrent_queries": 2,
          "receive_timeout_s": 120,              // each message the node waits for (refresh replies too)
          "flood_bits": 10,                      // optional: noise flooding of the outputs, 2^-k
          "plaintext_cache_mib": 4096,           // encoded weight diagonals kept between queries
          "linear_workers": 1,                   // worker processes for the linear layers (default: CPUs - 1)
          "metrics_port": 9100,                  // optional: Prometheus endpoint (party.metrics)
          "metrics_bind": "127.0.0.1",           // where it listens (default 127.0.0.1)
          "log_json": false                      // optional: JSON log lines (also: --log-json)
        }

    Relative paths are relative to the file; a client needs only ``address`` and ``tls.ca``.
    """

    what = "HE configuration file"
    address: str
    models: tuple[HeModelEntry, ...]
    client_token_sha256: tuple[str, ...] = ()
    bind: str = ""
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = "he-node"
    max_concurrent_queries: int = 2
    receive_timeout_s: float = 120.0
    flood_bits: int | None = None
    plaintext_cache_mib: int = DEFAULT_BUDGET_BYTES >> 20
    linear_workers: int = field(default_factory=default_linear_workers)
    path: Path | None = None
    metrics_port: int | None = None  # Prometheus metrics endpoint (party.metrics); None: none
    metrics_bind: str = DEFAULT_METRICS_BIND
    log_json: bool = False  # JSON log lines (party.logs)

    @property
    def tls(self) -> bool:
        return self.ca is not None

    @property
    def bind_address(self) -> str:
        return self.bind or f"[::]:{self.address.rsplit(':', 1)[-1]}"

    @staticmethod
    def from_dict(raw: dict[str, Any], path: Path | None = None) -> HeNodeConfig:
        file = _resolver(path)

        try:
            tls = raw.get("tls") or {}
            cfg = HeNodeConfig(
                address=str(raw["address"]),
                models=tuple(HeModelEntry(str(m["model"]), tuple(int(s) for s in m.get("seq_lens", [16])))
                             for m in raw["models"]),
                client_token_sha256=tuple(str(t).lower() for t in raw.get("client_token_sha256", [])),
                bind=str(raw.get("bind", "")), ca=file(tls.get("ca")), cert=file(tls.get("cert")),
                key=file(tls.get("key")), server_name=str(tls.get("name", "he-node")),
                max_concurrent_queries=int(raw.get("max_concurrent_queries", 2)),
                receive_timeout_s=float(raw.get("receive_timeout_s", 120.0)),
                flood_bits=None if raw.get("flood_bits") is None else int(raw["flood_bits"]),
                plaintext_cache_mib=int(raw.get("plaintext_cache_mib", DEFAULT_BUDGET_BYTES >> 20)),
                linear_workers=int(raw.get("linear_workers", default_linear_workers())), path=path,
                log_json=_flag(raw, "log_json"), **_metrics_setting(raw, "the HE node"))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad HE configuration{f' in {path}' if path else ''}: {type(e).__name__}: {e}") from None
        if not cfg.models:
            raise ConfigError("the HE configuration serves no model ('models' is empty)")
        if not 0 <= cfg.linear_workers <= MAX_LINEAR_WORKERS:
            raise ConfigError(f"linear_workers must be 0 to {MAX_LINEAR_WORKERS} (0: none), got {cfg.linear_workers}")
        if cfg.plaintext_cache_mib < 0:
            raise ConfigError(f"plaintext_cache_mib must be >= 0 (0: no cache), got {cfg.plaintext_cache_mib}")
        if tls and (cfg.ca is None or cfg.cert is None or cfg.key is None):
            raise ConfigError("the HE configuration's tls needs 'ca', 'cert' and 'key'")
        if cfg.metrics_port is not None and str(cfg.metrics_port) == cfg.bind_address.rsplit(":", 1)[-1]:
            raise ConfigError(f"bad HE configuration{f' in {path}' if path else ''}: metrics_port "
                              f"{cfg.metrics_port} is also the node's client port")
        return cfg


def _metrics_setting(raw: dict[str, Any], who: str) -> dict[str, Any]:
    """``metrics_port`` (an integer TCP port, 1-65535; absent: no endpoint) and ``metrics_bind``
    (an IP address or host name, default 127.0.0.1) of ``raw``; ValueError naming ``who``."""
    port, bind = raw.get("metrics_port"), raw.get("metrics_bind", DEFAULT_METRICS_BIND)
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise ValueError(f"{who}'s metrics_port must be a TCP port number from 1 to 65535, got {port!r}")
    host = bind.strip("[]") if isinstance(bind, str) else ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host):
            raise ValueError(f"{who}'s metrics_bind must be an IP address or a host name, got {bind!r}") from None
    return {"metrics_port": port, "metrics_bind": host}


def _flag(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _dialable(host: str) -> str:
    """``host`` as gRPC dials it with a port after it: a bare IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object")
    return raw


def _resolver(path: Path | None) -> Any:
    """Resolves a configured file name: relative names are relative to the configuration file."""
    base = path.parent if path else Path.cwd()

    def file(v: Any) -> Path | None:
        if v is None:
            return None
        p = Path(v)
        return p if p.is_absolute() else base / p

    return file
