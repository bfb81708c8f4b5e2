"""The cluster configuration file, read by the party nodes and by the client.

One JSON file per cluster::

    {
      "model": "minilm",
      "frac_bits": 18,
      "deadline_s": 60,
      "max_request_bytes": 268435456,
      "client_token_sha256": ["<hex digest of each accepted client token>"],
      "tls": {"ca": "certs/ca.pem"},            // omit for the logged insecure mode
      "parties": [
        {"id": 0, "host": "127.0.0.1", "peer_port": 50100, "client_port": 50200,
         "shares": "deal/party0.pt", "cert": "certs/party0.pem", "key": "certs/party0.key"},
        ...
      ]
    }

Relative paths are relative to the file. A party only reads its own entry's shares, cert
and key; on separate hosts each host's copy needs only its own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The cluster configuration is missing something or contradicts itself."""


@dataclass(frozen=True)
class PartyEntry:
    id: int
    host: str
    peer_port: int
    client_port: int
    shares: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def peer_address(self) -> str:
        return f"{self.host}:{self.peer_port}"

    @property
    def client_address(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    parties: list[PartyEntry]
    frac_bits: int = 18
    deadline_s: float = 60.0
    max_request_bytes: int = 256 << 20
    client_token_sha256: list[str] = field(default_factory=list)
    ca: Path | None = None
    path: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def party(self, party_id: int) -> PartyEntry:
        for p in self.parties:
            if p.id == party_id:
                return p
        raise ConfigError(f"party {party_id} is not in the configuration (ids: {[p.id for p in self.parties]})")

    def accepts_token(self, token: str) -> bool:
        """Constant-time check of a client token against the configured digests."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        ok = False
        for allowed in self.client_token_sha256:
            ok |= hmac.compare_digest(digest, allowed)
        return ok

    @staticmethod
    def load(path: str | Path) -> ClusterConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"configuration file {path} is not valid JSON: {e}") from None
        return ClusterConfig.from_dict(raw, path)

    @staticmethod
    def from_dict(raw: dict[str, Any], path: Path | None = None) -> ClusterConfig:
        base = path.parent if path else Path.cwd()

        def file(v: Any) -> Path | None:
            if v is None:
                return None
            p = Path(v)
            return p if p.is_absolute() else base / p

        try:
            parties = [PartyEntry(int(p["id"]), str(p["host"]), int(p["peer_port"]), int(p["client_port"]),
                                  file(p.get("shares")), file(p.get("cert")), file(p.get("key")))
                       for p in raw["parties"]]
            tls = raw.get("tls")
            cfg = ClusterConfig(
                model=str(raw["model"]), parties=parties, frac_bits=int(raw.get("frac_bits", 18)),
                deadline_s=float(raw.get("deadline_s", 60.0)),
                max_request_bytes=int(raw.get("max_request_bytes", 256 << 20)),
                client_token_sha256=[str(t) for t in raw.get("client_token_sha256", [])],
                ca=file(tls["ca"]) if tls else None, path=path)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad cluster configuration{f' in {path}' if path else ''}: "
                              f"{type(e).__name__}: {e}") from None
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
            "max_request_bytes": self.max_request_bytes, "client_token_sha256": self.client_token_sha256,
            "parties": [{"id": p.id, "host": p.host, "peer_port": p.peer_port, "client_port": p.client_port,
                         "shares": rel(p.shares), "cert": rel(p.cert), "key": rel(p.key)}
                        for p in self.parties],
        }
        if self.ca is not None:
            out["tls"] = {"ca": rel(self.ca)}
        return out


def token_digest(token: str) -> str:
    """What the configuration stores for a client token."""
    return hashlib.sha256(token.encode()).hexdigest()
