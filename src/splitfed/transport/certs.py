"""A throw-away certificate authority for TLS between parties (tests, trials, private networks).

``splitfed certs DIR --host server.example.org`` writes ``ca.pem``, ``server.pem``/``server.key``
and, per data party, ``<name>.pem``/``<name>.key`` for mutual TLS. For production use your
organisation's CA; the files have the same roles.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    name: str,
    hosts: Sequence[str],
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_test_ca(
    directory: str | Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    clients: Sequence[str] = ("data-party",),
    days: int = 30,
) -> dict[str, Path]:
    """Write a CA, a server certificate for ``hosts`` and one client certificate per name.

    Returns the paths by role: ``ca``, ``server_cert``, ``server_key``, ``<client>_cert``,
    ``<client>_key``. Private keys are written with mode 0600.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitfed test CA")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": out / "ca.pem", "ca_key": out / "ca.key"}
    _write_cert(paths["ca"], ca_cert)
    _write_key(paths["ca_key"], ca_key)
    cert, key = _issue(
        ca_key, ca_name, hosts[0] if hosts else "server", hosts, ExtendedKeyUsageOID.SERVER_AUTH, days
    )
    paths["server_cert"], paths["server_key"] = out / "server.pem", out / "server.key"
    _write_cert(paths["server_cert"], cert)
    _write_key(paths["server_key"], key)
    for client in clients:
        cert, key = _issue(ca_key, ca_name, client, (), ExtendedKeyUsageOID.CLIENT_AUTH, days)
        paths[f"{client}_cert"], paths[f"{client}_key"] = out / f"{client}.pem", out / f"{client}.key"
        _write_cert(paths[f"{client}_cert"], cert)
        _write_key(paths[f"{client}_key"], key)
    return paths
