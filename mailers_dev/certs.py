"""A development certificate authority: a CA and the certificates a cluster needs.

For local clusters, tests and trying TLS out; production deployments bring certificates
from their own PKI. Keys are ECDSA P-256 (fast to make, accepted by gRPC, etcd and
OpenSSL); private keys are written with mode 0600.

``mailers certs DIR`` (see ``mailers/cli.py``) writes ``ca.crt``/``ca.key`` and one
``<name>.crt``/``<name>.key`` pair per :class:`CertSpec`.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""Subject alternative names of server certificates unless others are given."""


@dataclasses.dataclass(frozen=True)
class CertSpec:
    """One certificate to issue.

    Attributes:
        name: File stem: ``<name>.crt`` and ``<name>.key``.
        common_name: Subject CN. etcd takes it as the user name of a client certificate.
        hosts: DNS names and IP addresses for subjectAltName (servers; empty for clients).
        server: Usable for TLS server authentication.
        client: Usable for TLS client authentication.
    """

    name: str
    common_name: str
    hosts: tuple[str, ...] = ()
    server: bool = True
    client: bool = True


@dataclasses.dataclass(frozen=True)
class CertPaths:
    """Where one issued certificate and its key were written."""

    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


class DevCA:
    """A CA whose certificate and key live in ``directory`` (``ca.crt``, ``ca.key``).

    Use :meth:`create` for a new one or :meth:`load` for an existing one.
    """

    def __init__(
        self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.directory = directory
        self._cert = cert
        self._key = key

    @property
    def cert_path(self) -> Path:
        """``ca.crt``: what every peer trusts."""
        return self.directory / "ca.crt"

    @classmethod
    def create(cls, directory: Path, *, days: int = 365, name: str = "Mailers dev CA") -> DevCA:
        """Make a new CA in ``directory`` (created if missing), replacing any there."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_key(directory / "ca.key", key)
        (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, cert, key)

    @classmethod
    def load(cls, directory: Path) -> DevCA:
        """The CA previously made in ``directory``."""
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'ca.key'} is not an EC private key")
        return cls(directory, cert, key)

    def issue(self, spec: CertSpec, *, days: int = 365) -> CertPaths:
        """Issue ``spec``'s certificate, signed by this CA, into the CA's directory."""
        if not (spec.server or spec.client):
            raise ValueError(f"{spec.name}: a certificate must be for server or client use")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usages = []
        if spec.server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if spec.client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        hosts = spec.hosts or (DEFAULT_HOSTS if spec.server else ())
        if hosts:
            builder = builder.add_extension(_san(hosts), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        paths = CertPaths(self.directory / f"{spec.name}.crt", self.directory / f"{spec.name}.key")
        _write_key(paths.key, key)
        paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return paths


def cluster_specs(nodes: Sequence[str], hosts: Sequence[str] = DEFAULT_HOSTS) -> list[CertSpec]:
    """The certificates of a cluster, with the common names etcd's roles are keyed on.

    - ``coordinator``: server (SDK clients dial it) and client (it dials nodes and etcd),
      CN ``mailers-coordinator``.
    - ``node-<id>`` per node: server (the coordinator dials it) and client (etcd),
      CN ``mailers-node-<id>``.
    - ``client``: an SDK/CLI client certificate, CN ``mailers-client``.
    - ``etcd``: the etcd members' server and peer certificate, CN ``etcd``.
    - ``etcd-root``: etcd's ``root`` user (used once, to set up users and roles).
    """
    host_tuple = tuple(hosts)
    specs = [
        CertSpec("coordinator", "mailers-coordinator", host_tuple),
        CertSpec("client", "mailers-client", server=False),
        CertSpec("etcd", "etcd", host_tuple),
        CertSpec("etcd-root", "root", server=False),
    ]
    specs += [CertSpec(f"node-{node}", f"mailers-node-{node}", host_tuple) for node in nodes]
    return specs


def make_dev_pki(
    directory: Path, nodes: Sequence[str], hosts: Sequence[str] = DEFAULT_HOSTS
) -> dict[str, CertPaths]:
    """A new CA in ``directory`` and every certificate of :func:`cluster_specs`.

    Returns:
        The written paths by certificate name (``"ca"`` included, its key beside it).
    """
    ca = DevCA.create(directory)
    written = {"ca": CertPaths(ca.cert_path, directory / "ca.key")}
    for spec in cluster_specs(nodes, hosts):
        written[spec.name] = ca.issue(spec)
    return written
