"""etcd TLS settings from the environment and the role table (no etcd involved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailers.etcd_auth import COORDINATOR_USER, Access, Grant, node_user, role_table
from mailers_runtime import settings
from mailers_runtime.errors import ConfigError
from mailers_runtime.etcd import TLS_ENV, EtcdTls
from mailers_runtime.etcd import tls_setting as etcd_tls_setting
from mailers_runtime.tls import TlsFiles


@settings.config
class _WithEtcd:
    """A config holding etcd TLS as the processes' configs do."""

    tls: TlsFiles | None = etcd_tls_setting()


def from_env(environ: dict[str, str]) -> TlsFiles | None:
    return settings.load(_WithEtcd, environ).tls


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """The three variables, each naming an existing (empty) file."""
    env = {}
    for name in TLS_ENV:
        path = tmp_path / name.lower()
        path.write_text("")
        env[name] = str(path)
    return env


def test_no_variables_means_plaintext() -> None:
    assert from_env({}) is None
    assert from_env({"MAILER_ETCD_CA": " "}) is None


def test_all_three_variables(files: dict[str, str]) -> None:
    tls = from_env(files)
    assert tls == EtcdTls(
        Path(files["MAILER_ETCD_CA"]),
        Path(files["MAILER_ETCD_CERT"]),
        Path(files["MAILER_ETCD_KEY"]),
    )
    assert tls.server_name is None
    assert from_env(tls.env()) == tls


def test_server_name_is_optional(files: dict[str, str]) -> None:
    tls = from_env({**files, "MAILER_ETCD_SERVER_NAME": "etcd.internal"})
    assert tls is not None and tls.server_name == "etcd.internal"
    assert from_env(tls.env()) == tls


@pytest.mark.parametrize("unset", [(n,) for n in TLS_ENV] + [TLS_ENV[:2], TLS_ENV[1:]])
def test_a_partial_set_names_what_is_missing(files: dict[str, str], unset: tuple[str, ...]) -> None:
    env = {k: v for k, v in files.items() if k not in unset}
    with pytest.raises(ConfigError, match="missing: " + ", ".join(unset) + "$"):
        from_env(env)


def test_a_missing_file_is_named(files: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MAILER_ETCD_KEY='.*absent.key': no such file"):
        from_env({**files, "MAILER_ETCD_KEY": str(tmp_path / "absent.key")})


def test_server_name_without_certificates_is_an_error() -> None:
    with pytest.raises(ConfigError, match="MAILER_ETCD_SERVER_NAME"):
        from_env({"MAILER_ETCD_SERVER_NAME": "etcd.internal"})


def test_from_dir_follows_the_dev_pki_layout(tmp_path: Path) -> None:
    tls = EtcdTls.from_dir(tmp_path, "node-n1")
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (
        tmp_path / "ca.crt",
        tmp_path / "node-n1.crt",
        tmp_path / "node-n1.key",
    )


def test_role_table() -> None:
    table = role_table("/mailers", ["n1", "n2"])
    assert table == {
        # The whole prefix with its trailing slash, so "/mailers2" stays out of reach
        COORDINATOR_USER: {Grant(b"/mailers/", b"/mailers0", Access.READWRITE)},
        # Its own registration and hand-back keys (an empty range end means that key
        # alone), and reading the election keys to learn the leader's epoch
        node_user("n1"): {
            Grant(b"/mailers/nodes/n1", b"", Access.READWRITE),
            Grant(b"/mailers/handback/n1", b"", Access.READWRITE),
            Grant(b"/mailers/election/", b"/mailers/election0", Access.READ),
        },
        node_user("n2"): {
            Grant(b"/mailers/nodes/n2", b"", Access.READWRITE),
            Grant(b"/mailers/handback/n2", b"", Access.READWRITE),
            Grant(b"/mailers/election/", b"/mailers/election0", Access.READ),
        },
    }


@pytest.mark.parametrize("node_id", ["", "a/b"])
def test_role_table_rejects_node_ids_that_are_no_single_key(node_id: str) -> None:
    with pytest.raises(ValueError, match="node id"):
        role_table("/mailers", [node_id])
