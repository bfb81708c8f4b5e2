"""Cluster certificates: a CA, one certificate per party, and the check a node makes of its own.

``make_ca`` and ``make_leaf`` make them (local clusters, tests, and ``party.cluster_init``
for real hosts); clusters may instead bring their own PKI: the nodes only need a CA file
and each party's certificate and key (PEM). A party certificate names its party
(``partyN``, its subject's common name and a DNS name: peers and clients dial it by that
name) and may name its host's DNS name or IP address too. ``check_party_certificate`` is
what a node checks before it starts: that name, the key, the CA and the validity dates.
Keys are written 0600 from their first byte into a 0700 folder (``party.private_files``).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from party.config import ConfigError
from party.private_files import make_private_dir, write_private

DEFAULT_DAYS = 30
CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
"""The private key kinds a CA may sign with (an existing CA's, or one ``make_ca`` made)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secure-inference"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Certificates are public; keys are created 0600 from their first byte (``write_private``)."""
    if private:
        write_private(path, data)
    else:
        path.write_bytes(data)


def make_ca(out: Path, name: str = "secure-inference cluster CA", days: int = DEFAULT_DAYS
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA, valid ``days``, written to out/ca.pem and out/ca.key (the folder 0700, the key 0600)."""
    make_private_dir(out)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    _write(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), private=True)
    return key, cert


def make_leaf(out: Path, stem: str, ca_key: CaKey, ca_cert: x509.Certificate,
              hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = DEFAULT_DAYS) -> tuple[Path, Path]:
    """A certificate for ``stem`` (client and server use) signed by the CA: out/stem.pem/.key.

    Its subject's common name and its first DNS name are ``stem`` (``party1``): peers and
    clients dial a party by that name, so a certificate of another party (same CA) fails
    their handshake whatever address it answers on. ``hosts`` (DNS names or IP addresses)
    follow as further subjectAltName entries."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(stem)]
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    names = list(dict.fromkeys(names))  # a host named like the party is listed once
    cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    make_private_dir(out)
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), private=True)
    return cert_path, key_path


def make_cluster_certs(out: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
                       ) -> tuple[Path, list[tuple[Path, Path]]]:
    """CA plus party0..party2 certificates; returns (ca.pem, [(cert, key)] per party)."""
    ca_key, ca_cert = make_ca(out)
    leaves = [make_leaf(out, f"party{i}", ca_key, ca_cert, hosts) for i in range(3)]
    return out / "ca.pem", leaves


# ---- reading and checking certificates -------------------------------------------------------
def load_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (a leaf, or a leaf then its intermediates); ConfigError if none."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"the {what} {path} is not a PEM certificate: {e}") from None
    return certs


def _private_key(path: Path, what: str) -> Any:
    """An unencrypted PEM private key; ConfigError naming ``what`` and the file otherwise."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} {path} is not an unencrypted PEM private key: {e}") from None


def load_ca(cert_path: Path, key_path: Path) -> tuple[CaKey, x509.Certificate]:
    """An existing CA to sign party certificates with: its certificate must be a CA's, its key
    (PEM, unencrypted) the certificate's."""
    cert = load_certificates(cert_path, "CA certificate")[0]
    key = _private_key(key_path, "the CA key")
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ConfigError(f"the CA key {key_path} is a {type(key).__name__}; an EC, RSA or Ed25519 key is needed")
    if not _same_key(key, cert):
        raise ConfigError(f"the CA key {key_path} is not the key of the CA certificate {cert_path}")
    if not _is_ca(cert):
        raise ConfigError(f"{cert_path} is not a CA certificate (its basicConstraints do not say CA:TRUE)")
    return key, cert


def check_party_certificate(cert_path: Path, key_path: Path, ca_path: Path, party_id: int,
                            now: datetime.datetime | None = None) -> None:
    """Refuse (``ConfigError``, naming the file and the mismatch) a party certificate that a
    peer or a client would refuse: it must name ``partyN`` (common name and DNS name), be
    the certificate of ``key_path``, chain to a certificate of ``ca_path``, and be valid now."""
    name = f"party{party_id}"
    chain = load_certificates(cert_path)
    leaf = chain[0]
    common = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    dns = _dns_names(leaf)
    if name not in common or name not in dns:
        raise ConfigError(f"party {party_id}'s certificate {cert_path} does not name {name}: common name "
                          f"{', '.join(map(str, common)) or '(none)'}, DNS names {', '.join(dns) or '(none)'} "
                          f"(peers and clients dial party {party_id} as {name!r}; is it another party's "
                          "certificate?)")
    key = _private_key(key_path, f"party {party_id}'s key")
    if not _same_key(key, leaf):
        raise ConfigError(f"party {party_id}'s key {key_path} is not the key of its certificate {cert_path} "
                          "(a key of another party or of an earlier certificate?)")
    if not _chains_to(chain, load_certificates(ca_path, "CA certificate")):
        raise ConfigError(f"party {party_id}'s certificate {cert_path} is not signed by the CA {ca_path} "
                          "(a certificate of another cluster?)")
    now = now or datetime.datetime.now(datetime.UTC)
    if now < leaf.not_valid_before_utc or now > leaf.not_valid_after_utc:
        raise ConfigError(f"party {party_id}'s certificate {cert_path} is valid from {leaf.not_valid_before_utc} "
                          f"to {leaf.not_valid_after_utc}, not now ({now:%Y-%m-%d %H:%M} UTC)")


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate's subjectAltName lists."""
    leaf = load_certificates(path)[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        return []


def _same_key(key: object, cert: x509.Certificate) -> bool:
    def spki(public: object) -> bytes:
        return public.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    return hasattr(key, "public_key") and spki(key.public_key()) == spki(cert.public_key())  # type: ignore[attr-defined]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _chains_to(chain: list[x509.Certificate], roots: list[x509.Certificate], depth: int = 4) -> bool:
    """Whether ``chain[0]`` is signed by one of ``roots``, directly or through ``chain[1:]``."""
    current = chain[0]
    for _ in range(depth):
        for issuer in [*roots, *chain[1:]]:
            if issuer is current:
                continue
            try:
                current.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if any(issuer is r for r in roots):
                return True
            current = issuer
            break
        else:
            return False
    return False
