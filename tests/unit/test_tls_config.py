"""TLS settings: what the environment chooses, what is refused, and who a peer is.

The handshakes themselves are tested on real processes (tests/integration/test_tls.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client_sdk import ClientTls
from mailers_dev.certs import make_dev_pki
from mailers_runtime import settings
from mailers_runtime.errors import ConfigError
from mailers_runtime.tls import (
    ClientAuth,
    TlsConfig,
    TlsConfigError,
    TlsFiles,
    TlsMaterial,
    Transport,
    peer_names,
    refusal,
)
from sender_node.config import from_env as node_config

FILES = {"MAILER_TLS_CA": "ca.crt", "MAILER_TLS_CERT": "c.crt", "MAILER_TLS_KEY": "c.key"}
NODE = {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:2379", "MAILER_RELAYS": "127.0.0.1:25"}


def coordinator_from_env(environ: dict[str, str]) -> TlsConfig:
    """A coordinator's TLS settings: the TlsConfig declarations with their defaults."""
    return settings.load(TlsConfig, environ)


def node_from_env(environ: dict[str, str]) -> TlsConfig:
    """A node's TLS settings, as its configuration reads them."""
    return node_config(NODE | environ, hostname="h", pid=1).tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_dev_pki(directory, ["n1"])
    return directory


def test_nothing_chosen_is_a_valid_value_but_refused_at_start() -> None:
    # Given no transport variable at all
    config = coordinator_from_env({})
    assert config == TlsConfig() and not config.enabled and not config.plaintext
    # Then loading it refuses, saying what to set
    with pytest.raises(TlsConfigError) as info:
        Transport.load(config)
    assert str(info.value) == (
        "no transport security chosen: set MAILER_TLS_CA, MAILER_TLS_CERT and MAILER_TLS_KEY "
        "(`mailers certs DIR` makes a development CA and certificates), "
        "or MAILER_PLAINTEXT=1 for local development"
    )


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_plaintext_is_an_explicit_choice(value: str) -> None:
    transport = Transport.load(node_from_env({"MAILER_PLAINTEXT": value}))
    assert transport.plaintext and transport.interceptors() == []
    assert transport.describe().startswith("PLAINTEXT")


def test_contradictions_and_half_settings_are_refused() -> None:
    with pytest.raises(TlsConfigError, match="choose TLS or plaintext"):
        coordinator_from_env({**FILES, "MAILER_PLAINTEXT": "1"})
    with pytest.raises(ConfigError) as info:
        coordinator_from_env({"MAILER_TLS_CA": "ca.crt"})
    assert str(info.value) == (
        "MAILER_TLS_CA, MAILER_TLS_CERT, MAILER_TLS_KEY go together; "
        "missing: MAILER_TLS_CERT, MAILER_TLS_KEY"
    )
    with pytest.raises(ConfigError, match="MAILER_PLAINTEXT='maybe'"):
        coordinator_from_env({"MAILER_PLAINTEXT": "maybe"})
    with pytest.raises(ConfigError, match="expected require or none"):
        coordinator_from_env({**FILES, "MAILER_TLS_CLIENT_AUTH": "optional"})


def test_a_server_name_alone_is_ignored() -> None:
    # Given plaintext and a server name (which only matters when dialing over TLS)
    config = coordinator_from_env({"MAILER_PLAINTEXT": "1", "MAILER_TLS_SERVER_NAME": "n"})
    # Then it is accepted, and there are no files to check it with
    assert config.plaintext and config.files is None and config.server_name == ""


def test_coordinators_may_skip_client_certificates_nodes_may_not() -> None:
    env = {**FILES, "MAILER_TLS_CLIENT_AUTH": "none"}
    assert coordinator_from_env(env).client_auth is ClientAuth.NONE
    with pytest.raises(ConfigError, match="always require client certificates"):
        node_from_env(env)


def test_allowed_client_names_default_per_process() -> None:
    # Nodes accept coordinators only; coordinators any certificate from the CA
    assert node_from_env(FILES).allowed_clients == ("mailers-coordinator",)
    assert coordinator_from_env(FILES).allowed_clients == ()
    # "*" lifts the node's restriction; a list replaces it
    assert node_from_env({**FILES, "MAILER_TLS_ALLOWED_CLIENTS": "*"}).allowed_clients == ()
    listed = {**FILES, "MAILER_TLS_ALLOWED_CLIENTS": " a , b,"}
    assert node_from_env(listed).allowed_clients == ("a", "b")
    named = coordinator_from_env({**FILES, "MAILER_TLS_SERVER_NAME": "n"})
    assert named.files == TlsFiles(Path("ca.crt"), Path("c.crt"), Path("c.key"), "n")
    assert named.server_name == "n"


def test_peer_names_are_the_cn_and_dns_sans_never_ips() -> None:
    context = {
        "x509_common_name": [b"mailers-node-n1"],
        "x509_subject_alternative_name": [b"localhost", b"127.0.0.1"],
        "peer_dns": [b"localhost"],
        "peer_ip": [b"127.0.0.1"],
    }
    names = peer_names(context)
    assert names == ["mailers-node-n1", "localhost"]
    assert refusal(names, ["127.0.0.1"]) != ""
    assert refusal(names, ["localhost"]) == ""
    assert refusal([], ["mailers-coordinator"]) == (
        "client certificate (no name) is not one of mailers-coordinator "
        "(MAILER_TLS_ALLOWED_CLIENTS)"
    )


def _env(pki: Path, name: str) -> dict[str, str]:
    return {
        "MAILER_TLS_CA": str(pki / "ca.crt"),
        "MAILER_TLS_CERT": str(pki / f"{name}.crt"),
        "MAILER_TLS_KEY": str(pki / f"{name}.key"),
    }


def test_tls_material_is_read_once_and_checked(pki: Path, tmp_path: Path) -> None:
    transport = Transport.load(node_from_env(_env(pki, "node-n1")))
    assert transport.material is not None
    assert transport.material.common_name == "mailers-node-n1"
    assert "PRIVATE" not in repr(transport)
    assert len(transport.interceptors()) == 1
    # A key that is not the certificate's
    mismatched = {**_env(pki, "node-n1"), "MAILER_TLS_KEY": str(pki / "client.key")}
    with pytest.raises(TlsConfigError, match="is not the key of the certificate"):
        Transport.load(node_from_env(mismatched))
    # A file that is not PEM: the message names it and does not quote it
    junk = tmp_path / "junk.crt"
    junk.write_text("SECRET-LOOKING CONTENT")
    with pytest.raises(TlsConfigError) as info:
        Transport.load(node_from_env({**_env(pki, "node-n1"), "MAILER_TLS_CERT": str(junk)}))
    assert str(info.value) == f"MAILER_TLS_CERT={junk}: no PEM certificate in it"
    # Without labels (files not from variables) the message names the field
    with pytest.raises(TlsConfigError, match=f"^cert_file={junk}: no PEM"):
        TlsMaterial.load(TlsFiles(pki / "ca.crt", junk, pki / "node-n1.key"))


def test_client_tls_reads_files_and_names_the_bad_one(pki: Path, tmp_path: Path) -> None:
    tls = ClientTls.from_files(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    assert tls.private_key is not None and b"PRIVATE KEY" in tls.private_key
    assert "PRIVATE" not in repr(tls)
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        ClientTls.from_files(pki / "ca.crt", pki / "client.crt")
    missing = tmp_path / "missing.crt"
    with pytest.raises(ValueError, match=f"TLS CA file {missing}: cannot read"):
        ClientTls.from_files(missing)
    assert ClientTls(server_name="mailers").channel_options() == [
        ("grpc.ssl_target_name_override", "mailers")
    ]
