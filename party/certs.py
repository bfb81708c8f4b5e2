"""Development certificates: a cluster CA and one certificate per party.

For local clusters and tests. Production clusters bring their own PKI; the nodes only
need a CA file and each party's certificate and key (PEM). Keys are written 0600 from
their first byte into a 0700 folder (``party.private_files``).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from party.private_files import make_private_dir, write_private


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secure-inference"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Certificates are public; keys are created 0600 from their first byte (``write_private``)."""
    if private:
        write_private(path, data)
    else:
        path.write_bytes(data)


def make_ca(out: Path, name: str = "secure-inference cluster CA"
            ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA written to out/ca.pem and out/ca.key (the folder 0700, the key 0600)."""
    make_private_dir(out)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    _write(out / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), private=True)
    return key, cert


def make_leaf(out: Path, stem: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
              hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path]:
    """A certificate for ``stem`` (client and server use) signed by the CA: out/stem.pem/.key.

    Its subject's common name and its first DNS name are ``stem`` (``party1``): peers and
    clients dial a party by that name, so a certificate of another party (same CA) fails
    their handshake whatever address it answers on."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(stem)]
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
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
