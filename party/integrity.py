"""What pins a dealt share file: its SHA-256 in the cluster file, or a dealer-signed manifest.

The dealer writes ``OUT/manifest.json`` beside the three party folders::

    {
      "format": 1,
      "deal_id": "<32 hex digits, random per deal>",
      "model": "minilm", "recipe": "ours", "frac_bits": 18, "seq_lens": [16, 32, 64, 128],
      "models": [                     // the deal's catalogue, its default (above) first
        {"model": "minilm", "kind": "encoder", "recipe": "ours", "seq_lens": [16, 32, 64, 128],
         "capacities": [], "graph_sha256": "<SHA-256 of its graphs, party.catalogue.graph_digest>"},
        {"model": "tiny-llama", "kind": "causal", "seq_lens": [16, 32], "capacities": [31, 63], ...}
      ],
      "parties": [
        {"id": 0, "path": "party0/shares.pt", "size": 12345678, "sha256": "<64 hex digits>"},
        ...
      ]
    }

(paths relative to the manifest's folder) and, when given an Ed25519 key,
``OUT/manifest.sig``: the raw 64-byte Ed25519 signature of manifest.json's exact bytes
(``openssl pkeyutl -verify -rawin -pubin -inkey dealer.pub -in manifest.json -sigfile
manifest.sig`` checks it too). Each party file's header repeats the deal id and its party id.

A node calls ``verify_party_file`` before it unpickles anything: the file's streamed
SHA-256 must equal the digest pinned for that party, either ``shares_sha256`` in its entry
of the cluster file or, with ``dealer_public_key``, the digest listed for it in a manifest
whose signature verifies. An unpinned file is refused. ``check_party_header`` then checks
the loaded header's party id and deal id against the manifest, when the entry names one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from party.config import ClusterConfig, ConfigError, PartyEntry, sha256_hex
from party.private_files import make_private_dir, write_private

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
CHUNK = 1 << 20


# ---- digests and manifests -----------------------------------------------------------------
def file_sha256(source: str | Path | IO[bytes]) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, streamed; an open file is read from its start and rewound."""
    h, size = hashlib.sha256(), 0
    f = open(source, "rb") if isinstance(source, (str, Path)) else source
    try:
        f.seek(0)
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
        f.seek(0)
    finally:
        if f is not source:
            f.close()
    return h.hexdigest(), size


def signature_path(manifest: Path) -> Path:
    """Where a manifest's signature lies: ``manifest.sig`` beside ``manifest.json``."""
    return manifest.with_suffix(".sig")


def make_manifest(out: Path, deal_id: str, files: dict[int, Path], info: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a deal in ``out``: ``info`` (model, recipe, frac_bits, seq_lens) plus each file's digest."""
    parties = []
    for party_id, path in sorted(files.items()):
        digest, size = file_sha256(path)
        parties.append({"id": party_id, "path": path.relative_to(out).as_posix(), "size": size, "sha256": digest})
    return {"format": MANIFEST_FORMAT, "deal_id": deal_id, **info, "parties": parties}


def write_manifest(out: Path, manifest: dict[str, Any], sign_key: Ed25519PrivateKey | None = None) -> Path:
    """Write ``out/manifest.json`` (and ``out/manifest.sig`` when signing); returns the manifest's path."""
    path = out / MANIFEST_NAME
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    path.write_bytes(data)
    sig = signature_path(path)
    if sign_key is not None:
        sig.write_bytes(sign_key.sign(data))
    else:
        sig.unlink(missing_ok=True)  # a stale signature of an earlier deal would only confuse
    return path


def read_manifest(path: Path, public_key: Ed25519PublicKey | None = None) -> dict[str, Any]:
    """Parse a manifest; with ``public_key``, first verify its signature over the exact bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the dealer's manifest {path}: {e}") from None
    if public_key is not None:
        sig = signature_path(path)
        try:
            public_key.verify(sig.read_bytes(), data)
        except OSError as e:
            raise ConfigError(f"cannot read the signature {sig} of the dealer's manifest {path}: {e}") from None
        except InvalidSignature:
            raise ConfigError(f"bad signature: {sig} is not the dealer's signature of {path} under the configured "
                              "dealer_public_key (the manifest was changed or signed by another key)") from None
    try:
        manifest = json.loads(data)
        if manifest["format"] != MANIFEST_FORMAT:
            raise ValueError(f"unknown format {manifest['format']!r}")
        manifest["deal_id"] = str(manifest["deal_id"])
        manifest["parties"] = [{"id": int(p["id"]), "path": str(p["path"]), "size": int(p["size"]),
                                "sha256": sha256_hex(p["sha256"])} for p in manifest["parties"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the dealer's manifest {path} is malformed: {type(e).__name__}: {e}") from None
    return manifest


def manifest_entry(manifest: dict[str, Any], party_id: int, path: Path) -> dict[str, Any]:
    """The manifest's line for one party."""
    for p in manifest["parties"]:
        if p["id"] == party_id:
            return p
    raise ConfigError(f"the dealer's manifest {path} lists no file for party {party_id}")


# ---- signing keys --------------------------------------------------------------------------
def make_signing_key(out: Path) -> tuple[Path, Path]:
    """A new Ed25519 dealer key: ``out/dealer.key`` (PEM, 0600, folder 0700) and ``out/dealer.pub``."""
    make_private_dir(out)
    key = Ed25519PrivateKey.generate()
    key_path, pub_path = out / "dealer.key", out / "dealer.pub"
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the dealer_public_key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"the dealer_public_key {path} is not an Ed25519 public key")
    return key


# ---- start-up checks -----------------------------------------------------------------------
def _how_to_pin(entry: PartyEntry) -> str:
    return (f"party {entry.id}'s share file {entry.shares} is not pinned, refusing to load it: add "
            f'"shares_sha256": "<digest>" to party {entry.id}\'s entry in the cluster file, with the digest the '
            f"dealer printed (also in the dealer's manifest.json; do not take it from the file itself), or set "
            f'"dealer_public_key" at the top level and "manifest" in the entry to use the dealer-signed manifest')


def _expected(entry: PartyEntry, cfg: ClusterConfig) -> tuple[str, int | None, str]:
    """(digest, size or None, what pinned it) for the entry's share file."""
    pinned = entry.shares_sha256
    if cfg.dealer_public_key is not None:
        if entry.manifest is None:
            raise ConfigError(f"the configuration has a dealer_public_key but party {entry.id}'s entry names no "
                              "'manifest' (the dealer's manifest.json, with manifest.sig beside it)")
        listed = manifest_entry(read_manifest(entry.manifest, load_public_key(cfg.dealer_public_key)),
                                entry.id, entry.manifest)
        if pinned is not None and not hmac.compare_digest(pinned, listed["sha256"]):
            raise ConfigError(f"party {entry.id}: the signed manifest {entry.manifest} lists sha256 "
                              f"{listed['sha256']}, the configuration pins {pinned}")
        return listed["sha256"], listed["size"], f"the signed manifest {entry.manifest}"
    if pinned is None:
        raise ConfigError(_how_to_pin(entry))
    if entry.manifest is not None:  # unsigned: only a cross-check that it describes the pinned deal
        listed = manifest_entry(read_manifest(entry.manifest), entry.id, entry.manifest)
        if not hmac.compare_digest(pinned, listed["sha256"]):
            raise ConfigError(f"party {entry.id}: the manifest {entry.manifest} lists sha256 {listed['sha256']}, "
                              f"the configuration pins {pinned} (a manifest of another deal?)")
    return pinned, None, "the configuration's shares_sha256"


def verify_party_file(entry: PartyEntry, cfg: ClusterConfig, fileobj: IO[bytes] | None = None) -> None:
    """Refuse (``ConfigError``) a share file whose content is not the pinned one; read nothing else of it.

    ``fileobj``, when given, is the already opened share file (hashed from its start and
    rewound), so that what is hashed is what the caller then loads.
    """
    if entry.shares is None:
        raise ConfigError(f"party {entry.id} has no 'shares' file in the configuration")
    expected, size, source = _expected(entry, cfg)
    try:
        got, got_size = file_sha256(fileobj if fileobj is not None else entry.shares)
    except OSError as e:
        raise ConfigError(f"cannot read party {entry.id}'s share file {entry.shares}: {e}") from None
    who = f"party {entry.id}'s share file {entry.shares} does not match {source}"
    if size is not None and got_size != size:
        raise ConfigError(f"{who}: size expected {size} bytes, got {got_size} (truncated or replaced?)")
    if not hmac.compare_digest(got, expected):
        raise ConfigError(f"{who}: sha256 expected {expected}, got {got} ({got_size} bytes; tampered, truncated, "
                          "or another party's or deal's file?)")


def check_party_header(header: dict[str, Any], entry: PartyEntry, cfg: ClusterConfig) -> None:
    """After loading: the file's party id is the entry's, and its deal id the manifest's (when there is one)."""
    if header.get("party") != entry.id:
        raise ConfigError(f"{entry.shares} holds the shares of party {header.get('party')}, not party {entry.id}")
    if entry.manifest is None:
        return
    key = load_public_key(cfg.dealer_public_key) if cfg.dealer_public_key is not None else None
    manifest = read_manifest(entry.manifest, key)
    if header.get("deal_id") != manifest["deal_id"]:
        raise ConfigError(f"{entry.shares} is from deal {header.get('deal_id')!r}, the manifest {entry.manifest} "
                          f"describes deal {manifest['deal_id']!r}")


def check_client_token_digests(entry: PartyEntry, cfg: ClusterConfig) -> None:
    """Refuse an entry whose ``client_token_sha256`` lists something that is not a SHA-256
    digest (a token pasted in place of its digest would lock every client out)."""
    for value in entry.client_token_sha256:
        try:
            sha256_hex(value)
        except ValueError:
            raise ConfigError(f"{cfg.path or 'the cluster file'}: party {entry.id}'s client_token_sha256 lists a "
                              f"value of {len(value)} characters that is not a hex SHA-256 digest (not shown: it may "
                              "be a token): list each client token's digest (party.config.token_digest; "
                              "`secure-cluster` writes them), never the token itself") from None


def pin_instructions(manifest: dict[str, Any], out: Path, public_key: Path | None = None) -> str:
    """What the dealer prints: each file's digest and the cluster-file lines that pin them."""
    lines = []
    for p in manifest["parties"]:
        lines.append(f"party {p['id']}: {out / p['path']}  {p['size'] / 1e6:.1f} MB  sha256 {p['sha256']}")
    lines.append("pin them in cluster.json, in each party's entry (paths as seen from here; in cluster.json "
                 "they are relative to that file):")
    for p in manifest["parties"]:
        lines.append(f'  {{"id": {p["id"]}, ..., "shares": "{(out / p["path"]).as_posix()}", '
                     f'"shares_sha256": "{p["sha256"]}"}},')
    if public_key is not None:
        lines.append("or, with the signed manifest (copy manifest.json and manifest.sig together):")
        lines.append(f'  "dealer_public_key": "{public_key.as_posix()}", and in each party\'s entry '
                     f'"manifest": "{(out / MANIFEST_NAME).as_posix()}"')
    return "\n".join(lines)
