"""Make the secrets a Mailers deployment reads, for trying a deployment out.

    python deploy/make_secrets.py DIR --preset compose        (the compose `init` service)
    python deploy/make_secrets.py DIR --preset kubernetes [--nodes 12]

It writes a development CA and the certificates every process needs, the coordinators'
auth file with an admin token and a tenant token, and the PostgreSQL password, one
directory per consumer (so each container or Secret gets only its own files):

    DIR/ca/                ca.crt, ca.key: the CA; ca.key issues certificates every
                           process trusts, so nothing mounts this directory
    DIR/coordinator/       ca.crt, tls.crt, tls.key (CN mailers-coordinator: gRPC server
                           and client, etcd user), auth.json, postgres-password
    DIR/node-<id>/         ca.crt, tls.crt, tls.key (CN mailers-node-<id>: gRPC server and
                           client, the node's etcd user)
    DIR/etcd/              ca.crt, tls.crt, tls.key: the etcd members (server and peer)
    DIR/etcd-root/         ca.crt, tls.crt, tls.key (CN root): `mailers etcd-auth` only
    DIR/postgres/          ca.crt, tls.crt, tls.key, password: the PostgreSQL server
    DIR/relay/             tls.crt, tls.key: the compose mail catcher's STARTTLS (compose)
    DIR/admin/             ca.crt, client.crt, client.key, admin.token, <tenant>.token:
                           what an operator's `mailers` command needs

Nothing that exists is replaced, so running it again is harmless; to renew something,
delete it and run again (deploy/README.md, Rotation). Without DIR/ca/ca.key a new CA is
made and every certificate is issued again. Private keys, tokens and passwords are mode
0600. With ``--preset compose`` and run as root (the `init` service), files are given to
the user of the container that reads them: 10001 (Mailers), 999 (PostgreSQL: root owns
its key and password, group 999 reads them, as PostgreSQL requires).

Production deployments take certificates from their own PKI and tokens from
``python -m coordinator.auth hash``; this script is the quick way to a working cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from coordinator.auth import hash_token, new_token
from mailers_dev.certs import CertSpec, DevCA

MAILERS_UID = 10001
POSTGRES_GID = 999
"""The ``postgres`` group of the official PostgreSQL image (Debian variant)."""
LOOPBACK = ("localhost", "127.0.0.1")
"""Probes in a container dial its own process on loopback."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """Names for one flavour: which node ids exist and what each server is dialed as."""

    nodes: tuple[str, ...]
    coordinator_hosts: tuple[str, ...]
    node_hosts: tuple[str, ...]
    """Names every node certificate carries (plus its own id for compose)."""
    etcd_hosts: tuple[str, ...]
    postgres_hosts: tuple[str, ...]
    relay_hosts: tuple[str, ...] = ()
    """A mail catcher with STARTTLS; empty: the relays are real and bring their own."""
    own_name_in_node_cert: bool = False
    chown: bool = False
    """Give files to the uid/gid of the container reading them (when run as root)."""


def compose_preset() -> Preset:
    """deploy/compose.yaml: services dial each other by service name; etcd by IP."""
    etcd_ips = ("172.28.77.11", "172.28.77.12", "172.28.77.13")
    return Preset(
        nodes=("node1", "node2", "node3"),
        coordinator_hosts=("coordinator1", "coordinator2", *LOOPBACK),
        node_hosts=LOOPBACK,
        etcd_hosts=("etcd1", "etcd2", "etcd3", *etcd_ips, *LOOPBACK),
        postgres_hosts=("postgres", *LOOPBACK),
        relay_hosts=("mailpit",),
        own_name_in_node_cert=True,
        chown=True,
    )


def kubernetes_preset(nodes: int) -> Preset:
    """deploy/k8s: StatefulSet pods mailers-node-<n>, dialed by pod IP and checked for the
    name mailers-node; etcd members by their headless-Service names."""
    return Preset(
        nodes=tuple(f"mailers-node-{n}" for n in range(nodes)),
        coordinator_hosts=("mailers", *LOOPBACK),
        node_hosts=("mailers-node", *LOOPBACK),
        etcd_hosts=(
            "etcd",
            *(f"etcd-{n}.etcd-headless" for n in range(3)),
            *LOOPBACK,
        ),
        postgres_hosts=("mailers-postgres",),
    )


@dataclasses.dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    mode: int = 0o600
    """Mode of secret files (keys, tokens, passwords); certificates are 0644."""


class Writer:
    """Writes files under a directory, skipping those that exist, chowning on request."""

    def __init__(self, root: Path, *, chown: bool) -> None:
        self.root = root
        self.chown = chown and os.geteuid() == 0
        self.written: list[Path] = []

    def directory(self, name: str, owner: Owner) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o750 if owner.gid != owner.uid else 0o700)
        if self.chown:
            os.chown(path, owner.uid, owner.gid)
        return path

    def put(self, path: Path, data: bytes, owner: Owner, *, secret: bool) -> None:
        """Write data at path (mode 0600/owner.mode if secret, else 0644) unless it exists."""
        if path.exists():
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        path.chmod(owner.mode if secret else 0o644)
        if self.chown:
            os.chown(path, owner.uid, owner.gid)
        self.written.append(path)


def _issue(ca: DevCA, spec: CertSpec, target: Path, writer: Writer, owner: Owner) -> None:
    """Issue spec into target/tls.crt and tls.key unless both exist."""
    if (target / "tls.crt").exists() and (target / "tls.key").exists():
        return
    for stale in ("tls.crt", "tls.key"):
        (target / stale).unlink(missing_ok=True)
    paths = ca.issue(spec)
    writer.put(target / "tls.crt", paths.cert.read_bytes(), owner, secret=False)
    writer.put(target / "tls.key", paths.key.read_bytes(), owner, secret=True)
    paths.cert.unlink()
    paths.key.unlink()


def _certificate_authority(root: Path, writer: Writer, owner: Owner) -> DevCA:
    """The deployment's CA: loaded, or made afresh (then every certificate is reissued)."""
    ca_dir = writer.directory("ca", owner)
    if (ca_dir / "ca.key").exists():
        return DevCA.load(ca_dir)
    # A new CA makes every certificate signed by the old one useless: issue them all.
    for name in ("coordinator", "etcd", "etcd-root", "postgres", "relay", "admin"):
        for stale in ("tls.crt", "tls.key", "client.crt", "client.key", "ca.crt"):
            (root / name / stale).unlink(missing_ok=True)
    for node_dir in root.glob("node-*"):
        shutil.rmtree(node_dir)
    ca = DevCA.create(ca_dir, name="Mailers deployment CA (development)")
    writer.written.append(ca.cert_path)
    return ca


def _admin_client_certificate(ca: DevCA, writer: Writer, admin: Path, owner: Owner) -> None:
    """The operators' client certificate (CN mailers-client), unless it exists."""
    if (admin / "client.crt").exists() and (admin / "client.key").exists():
        return
    paths = ca.issue(CertSpec("client", "mailers-client", server=False))
    for path, secret in ((paths.cert, False), (paths.key, True)):
        (admin / path.name).unlink(missing_ok=True)
        writer.put(admin / path.name, path.read_bytes(), owner, secret=secret)
        path.unlink()


def _auth_file(writer: Writer, coordinator: Path, admin: Path, tenant: str, mailers: Owner) -> None:
    # The auth file and its tokens are made together: a token whose digest is not in
    # the file opens nothing.
    if not (coordinator / "auth.json").exists():
        admin_token, tenant_token = new_token(), new_token()
        auth = {
            "tenants": {tenant: {"tokens": [hash_token(tenant_token)]}},
            "admins": [hash_token(admin_token)],
        }
        for name, token in (("admin", admin_token), (tenant, tenant_token)):
            (admin / f"{name}.token").unlink(missing_ok=True)
            writer.put(admin / f"{name}.token", token.encode(), mailers, secret=True)
        writer.put(
            coordinator / "auth.json",
            (json.dumps(auth, indent=2) + "\n").encode(),
            mailers,
            secret=True,
        )


def _database_password(
    writer: Writer, coordinator: Path, pg: Path, mailers: Owner, postgres: Owner
) -> None:
    # One password, two readers: the server (POSTGRES_PASSWORD_FILE) and coordinators
    # (MAILER_DATABASE_PASSWORD_FILE). No trailing newline: both read the file as it is.
    if not (pg / "password").exists():
        password = secrets.token_urlsafe(24).encode()
        writer.put(pg / "password", password, postgres, secret=True)
        (coordinator / "postgres-password").unlink(missing_ok=True)
    writer.put(coordinator / "postgres-password", (pg / "password").read_bytes(), mailers,
               secret=True)  # fmt: skip


def make(root: Path, preset: Preset, tenant: str) -> list[Path]:
    """Write everything missing under root; returns the files written.

    Raises:
        OSError: root is not writable.
    """
    writer = Writer(root, chown=preset.chown)
    root_owner = Owner(0, 0)
    mailers = Owner(MAILERS_UID, MAILERS_UID) if writer.chown else Owner(os.getuid(), os.getgid())
    postgres = Owner(0, POSTGRES_GID, 0o640) if writer.chown else mailers
    ca = _certificate_authority(root, writer, root_owner if writer.chown else mailers)
    ca_pem = ca.cert_path.read_bytes()

    def consumer(name: str, owner: Owner, spec: CertSpec | None, *, ca_file: bool = True) -> Path:
        target = writer.directory(name, owner)
        if ca_file:
            writer.put(target / "ca.crt", ca_pem, owner, secret=False)
        if spec is not None:
            _issue(ca, spec, target, writer, owner)
        return target

    coordinator = consumer(
        "coordinator",
        mailers,
        CertSpec("tls", "mailers-coordinator", preset.coordinator_hosts),
    )
    for node in preset.nodes:
        hosts = (node, *preset.node_hosts) if preset.own_name_in_node_cert else preset.node_hosts
        consumer(f"node-{node}", mailers, CertSpec("tls", f"mailers-node-{node}", hosts))
    # etcd and the mail catcher run as root in their images.
    runs_as_root = root_owner if writer.chown else mailers
    consumer("etcd", runs_as_root, CertSpec("tls", "etcd", preset.etcd_hosts))
    consumer("etcd-root", mailers, CertSpec("tls", "root", server=False))
    pg_spec = CertSpec("tls", "postgres", preset.postgres_hosts, client=False)
    pg = consumer("postgres", postgres, pg_spec)
    if preset.relay_hosts:
        relay_spec = CertSpec("tls", "relay", preset.relay_hosts, client=False)
        consumer("relay", runs_as_root, relay_spec, ca_file=False)
    admin = consumer("admin", mailers, None)
    _admin_client_certificate(ca, writer, admin, mailers)

    _auth_file(writer, coordinator, admin, tenant, mailers)
    _database_password(writer, coordinator, pg, mailers, postgres)
    return writer.written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python deploy/make_secrets.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--preset", required=True, choices=["compose", "kubernetes"])
    parser.add_argument(
        "--nodes",
        type=int,
        default=12,
        help="kubernetes: node identities mailers-node-0..N-1 (default 12; the HPA's "
        "maxReplicas must not exceed it)",
    )
    parser.add_argument("--tenant", default="demo", help="the tenant whose token is made")
    ns = parser.parse_args(argv)
    if ns.nodes < 1:
        parser.error("--nodes must be at least 1")
    preset = compose_preset() if ns.preset == "compose" else kubernetes_preset(ns.nodes)
    root = Path(ns.directory)
    written = make(root, preset, ns.tenant)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(written)} files written, the rest of {root} was already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
