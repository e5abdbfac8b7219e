"""TLS certificates and SuperNode keys for a Deployment Engine on this machine, made with
``cryptography``.

A self-signed CA and a server certificate for localhost/127.0.0.1/::1 signed by it (what
Flower's "Enable TLS connections" guide makes with openssl, with the extensions that strict
verifiers, Python 3.13+ among them, require); and per SuperNode an EC P-384 key pair in
OpenSSH format, as Flower's SuperNode authentication reads it. The CA's private key is never
written: nothing else is ever signed with it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

CERT_NAMES = ("localhost", "127.0.0.1", "::1")  # what the server certificate is valid for


@dataclass(frozen=True)
class TlsFiles:
    """The CA certificate everyone trusts, and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's authentication key pair (OpenSSH format, as Flower reads it)."""

    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (0600 from creation on)."""
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(data)


def make_tls_certificates(directory: Path, days: int = 30, hosts: tuple[str, ...] = ()
                          ) -> TlsFiles:
    """A new CA (``ca.crt``) and a server certificate (``server.pem``, key ``server.key``)
    signed by it, valid for CERT_NAMES and ``hosts`` (the addresses SuperNodes connect to:
    IP addresses or DNS names) for ``days`` days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reefl local CA")])

    def certificate(subject: x509.Name, key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False))

    ca = (certificate(ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names = [_san(name) for name in dict.fromkeys([*CERT_NAMES, *hosts])]
    server = (certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
                          server_key)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                           key_encipherment=True, data_encipherment=False,
                                           key_agreement=False, key_cert_sign=False,
                                           crl_sign=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    return files


def _san(name: str):  # noqa: ANN202 - a cryptography GeneralName
    """``name`` as a subject alternative name: an IP address, else a DNS name."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_node_keys(directory: Path, name: str) -> NodeKeys:
    """A new EC P-384 key pair ``<name>`` / ``<name>.pub`` (what ``ssh-keygen -t ecdsa -b
    384`` makes): Flower's SuperNode authentication takes NIST-curve EC keys in OpenSSH
    format, the private key for ``--auth-supernode-private-key`` and the public one for
    ``flwr supernode register``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(directory / name, directory / f"{name}.pub")
    _write_private(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    keys.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys
