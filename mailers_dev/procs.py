"""Starting and stopping the local processes of a cluster: etcd members and our own.

Used by ``mailers cluster`` and by the integration and chaos tests. Every process
started here is tracked by PID and stopped by :meth:`Proc.stop`, SIGTERM first and
SIGKILL after a grace period, so no test or demo leaves servers behind.

:class:`EtcdCluster` runs plaintext by default. Given an ``EtcdTls`` (the members' CA,
certificate and key) its members serve clients and each other over TLS only and
require a certificate signed by that CA from both (``--client-cert-auth``,
``--peer-client-cert-auth``); etcd then takes a client certificate's common name as
the etcd user once auth is enabled (``mailers.etcd_auth``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mailers_runtime.etcd import EtcdTls

ETCD_BINARY = "etcd"


_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` gave this process. The kernel offers a port again as soon as
the probing socket closes, so two callers (a test reserving a node's port, then the
cluster choosing its coordinators') could get the same one before either binds it."""


_PICK_SPAN = 12_000
"""How many ports below the kernel's ephemeral range :func:`free_port` picks from."""

PORT_SLICE_ENV = "MAILERS_PORT_SLICE"
"""``k/n``: :func:`free_port` draws only from the k-th (from 0) of n equal slices of its
span. Processes that pick ports at the same time (the test runner's workers, which set
it) each get a slice of their own, so none can hand out a port that another handed out
a moment before and whose server has not bound it yet. Children inherit it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, that this process was not
    given before, and that lies below the kernel's ephemeral range.

    Below that range because a port is handed out some time before its server binds it,
    and in between, any outgoing connection on the machine (a test's thousands of SMTP,
    gRPC and PostgreSQL connections) may be given an ephemeral port as its local one:
    a port the kernel offered for ``bind(0)`` was taken that way, and the coordinator
    meant to listen on it could not start.

    Raises:
        RuntimeError: no such port in 1,000 tries.
    """
    low = _ephemeral_low()
    # An unusual range with no room below it: take what the kernel offers (port 0).
    span = _slice(low - _PICK_SPAN, low) if low - _PICK_SPAN >= 1024 else None
    # A generator of its own, seeded by the OS: the module's shared one is reseeded by
    # tests (Hypothesis does it per example), so two processes could draw alike.
    rng = random.Random()
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", rng.randrange(*span) if span else 0))
            except OSError:
                continue  # in use (or lingering) right now
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port that was not handed out already")


def _slice(low: int, high: int) -> tuple[int, int]:
    """The part of ``[low, high)`` that :data:`PORT_SLICE_ENV` gives this process (all of
    it when unset).

    Raises:
        ValueError: the variable is not ``k/n`` with ``0 <= k < n``.
    """
    value = os.environ.get(PORT_SLICE_ENV)
    if not value:
        return low, high
    k, sep, n = value.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise ValueError(f"{PORT_SLICE_ENV} must be k/n with 0 <= k < n, not {value!r}")
    width = (high - low) // int(n)
    return low + int(k) * width, low + (int(k) + 1) * width


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default when unreadable)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def wait_for_port(
    port: int,
    timeout_s: float,
    proc: subprocess.Popen[bytes] | None = None,
    host: str = "127.0.0.1",
) -> None:
    """Block until host:port accepts connections, and, given ``proc``, until the socket
    listening there is that process's (or one of its children's).

    The second check is what tells a server that started from one that could not bind
    its port while another process already listened there (another test's etcd, say):
    a connection alone would be answered by the other process.

    Raises:
        TimeoutError: nothing listened within timeout_s, or only another process did.
        RuntimeError: proc exited first.
    """
    deadline = time.monotonic() + timeout_s
    someone_else = False
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            if proc is None or listens(proc.pid, port) is not False:
                return
            someone_else = True
        time.sleep(0.05)
    if proc is not None and someone_else:
        raise TimeoutError(f"{host}:{port} answers, but not from process {proc.pid}")
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s")


def listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` or one of its children holds a socket listening on TCP
    ``port`` (in the process's own network namespace); None when ``/proc`` cannot tell
    (no such process, or one this user may not look into)."""
    try:
        inodes = {f"socket:[{inode}]" for inode in _listening_inodes(pid, port)}
        if not inodes:
            return False
        for holder in (pid, *_children(pid)):
            for fd in os.listdir(f"/proc/{holder}/fd"):
                with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                    if os.readlink(f"/proc/{holder}/fd/{fd}") in inodes:
                        return True
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return False


_LISTEN = "0A"
"""The state column's value for a listening socket in ``/proc/net/tcp``."""


def _listening_inodes(pid: int, port: int) -> list[str]:
    """Inodes of the sockets listening on ``port`` in ``pid``'s network namespace."""
    found: list[str] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            if table == "tcp":
                raise  # the process is gone
            continue  # a kernel without IPv6 has no tcp6 table
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and int(local.rpartition(":")[2], 16) == port:
                found.append(inode)
    return found


def _children(pid: int) -> list[int]:
    """The process's children (of every thread), from ``/proc``."""
    children: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            children.extend(int(child) for child in text.split())
    return children


@dataclasses.dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after grace_s; waits for the exit. Idempotent."""
        stop_together([self], grace_s)

    def terminate(self) -> None:
        """SIGTERM (after SIGCONT, so a stopped process gets it); does not wait."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)
                os.kill(self.popen.pid, signal.SIGTERM)

    def reap(self, deadline: float) -> None:
        """Wait for the exit until ``deadline`` (monotonic), then SIGKILL and wait."""
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def stop_together(procs: Sequence[Proc], grace_s: float = 5.0) -> None:
    """SIGTERM each of ``procs`` at once, then wait for all within one ``grace_s``
    (SIGKILL for those still running): stopping them one by one costs the sum of their
    shutdowns. Idempotent."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.reap(deadline)


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
) -> Proc:
    """Start argv with stdout and stderr going to log_dir/<name>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    return Proc(name=name, popen=popen, log_path=log_path)


def spawn_python(
    name: str, module: str, log_dir: Path, env: Mapping[str, str], args: Sequence[str] = ()
) -> Proc:
    """Start ``python -m module`` with this interpreter."""
    return spawn(name, [sys.executable, "-m", module, *args], log_dir, env)


@dataclasses.dataclass
class EtcdMember:
    """One member. ``host`` and ``netns`` may be changed before it starts: the member
    then runs in that network namespace (``ip netns exec``, which execs etcd, so the PID
    kept is etcd's) and listens on that address, which its peers and clients reach."""

    name: str
    client_port: int
    peer_port: int
    proc: Proc | None = None
    host: str = "127.0.0.1"
    netns: str | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"


class EtcdCluster:
    """One or more real etcd members on loopback, each with its own data dir and ports.

    Args:
        base_dir: Data directories and logs go here.
        size: Number of members.
        tls: Serve clients and peers over TLS with this CA, certificate and key
            (``EtcdTls.from_dir(pki_dir, "etcd")`` for ``make_dev_pki``'s), and accept
            only clients and peers with a certificate signed by the CA. The certificate
            must be usable for server and client authentication (members dial each
            other) and name 127.0.0.1. None: plaintext, no client certificates.
    """

    def __init__(self, base_dir: Path, size: int = 1, tls: EtcdTls | None = None) -> None:
        if shutil.which(ETCD_BINARY) is None:
            raise FileNotFoundError("etcd is not installed (apt-get install etcd-server)")
        self.base_dir = base_dir
        self.tls = tls
        self.members = [
            EtcdMember(name=f"etcd{i}", client_port=free_port(), peer_port=free_port())
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of each member, as ``mailers_runtime.etcd.connect`` takes them."""
        return [m.endpoint for m in self.members]

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def client_urls(self) -> list[str]:
        """Each member's client URL (``https://`` with TLS), as etcdctl takes them."""
        return [f"{self.scheme}://{m.endpoint}" for m in self.members]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={self.scheme}://{m.host}:{m.peer_port}" for m in self.members)

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return []
        ca, cert, key = (str(p) for p in (self.tls.ca_file, self.tls.cert_file, self.tls.key_file))
        return [
            "--trusted-ca-file", ca, "--cert-file", cert, "--key-file", key,
            "--client-cert-auth",
            "--peer-trusted-ca-file", ca, "--peer-cert-file", cert, "--peer-key-file", key,
            "--peer-client-cert-auth",
        ]  # fmt: skip

    def start_member(self, member: EtcdMember, state: str = "new") -> None:
        data_dir = self.base_dir / member.name
        client_url = f"{self.scheme}://{member.host}:{member.client_port}"
        peer_url = f"{self.scheme}://{member.host}:{member.peer_port}"
        in_netns = ["ip", "netns", "exec", member.netns] if member.netns else []
        argv = [
            *in_netns,
            ETCD_BINARY,
            "--name", member.name,
            "--data-dir", str(data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            *self._tls_args(),
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-state", state,
            "--initial-cluster-token", f"mailers-{self.members[0].peer_port}",
            # Leader elections inside etcd finish well within a second on loopback. A
            # lone member has no peer to miss heartbeats from, so it may elect itself
            # sooner (it is the wait before a secured cluster can set up its users).
            "--heartbeat-interval", "100" if len(self.members) > 1 else "50",
            "--election-timeout", "1000" if len(self.members) > 1 else "500",
            # A member cut off from its peers rejoins without forcing an election
            # (etcd 3.4 leaves pre-vote off; 3.5 turns it on).
            "--pre-vote",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        member.proc = spawn(member.name, argv, self.base_dir / "logs")

    def start(self, timeout_s: float = 30.0) -> None:
        for member in self.members:
            self.start_member(member)
        for member in self.members:
            assert member.proc is not None
            wait_for_port(member.client_port, timeout_s, member.proc.popen, member.host)

    def restart_member(self, member: EtcdMember, timeout_s: float = 30.0) -> None:
        self.start_member(member, state="existing")
        assert member.proc is not None
        wait_for_port(member.client_port, timeout_s, member.proc.popen, member.host)

    def stop(self) -> None:
        stop_together([m.proc for m in self.members if m.proc is not None])


PG_TEMPLATE_ENV = "MAILERS_PG_TEMPLATE"
"""A directory where :class:`PostgresServer` keeps one ``initdb``'d cluster per
PostgreSQL version and owner, and copies it rather than running ``initdb`` for each
server (the test suite sets it: it starts some seventy servers)."""

PG_BIN_DIRS = tuple(Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15))
"""Where Debian's ``postgresql`` package puts the server binaries (not on PATH)."""


def pg_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None when not installed."""
    for candidate in PG_BIN_DIRS:
        if (candidate / "initdb").is_file():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclasses.dataclass(frozen=True)
class PgTls:
    """A server certificate and key for PostgreSQL, and the CA that signed it (which
    clients verify it against, with ``sslmode=verify-full``)."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class PostgresServer:
    """A private PostgreSQL server on a free loopback port, for tests, demos and benches.

    ``initdb`` makes a fresh cluster with one role, ``mailers`` (password from
    :attr:`password_file`, SCRAM over TCP) and a database of the same name. As root
    the server runs as the ``postgres`` user (or ``nobody``), since PostgreSQL refuses
    to run as root; its directory then lives under /tmp so that user can reach it.

    Args:
        base_dir: Logs and the password file go here (and the data, unless root).
        durable: False turns ``fsync`` off: commits still reach the OS before they
            return (a killed server loses nothing), only a machine crash could. For
            tests on slow disks; benchmarks and demos keep PostgreSQL's defaults.
        tls: Serve TLS with this certificate (clients then use ``sslmode=verify-full``).
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        durable: bool = True,
        tls: PgTls | None = None,
        listen: str = "127.0.0.1",
    ) -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bindir = bindir
        self.base_dir = base_dir
        self.durable = durable
        self.tls = tls
        self.listen = listen
        self.port = free_port()
        self.proc: Proc | None = None
        self._password_due: str | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres" if _user_exists("postgres") else "nobody"
            self.data_root = Path(tempfile.mkdtemp(prefix="mailers-pg-"))
            shutil.chown(self.data_root, self._user)
        else:
            self.data_root = base_dir / "pg"
            self.data_root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.data_root / "data"
        self.password_file = base_dir / "pg-password"

    @property
    def url(self) -> str:
        """The server's URL, without the password (it is in :attr:`password_file`)."""
        return self.database_url("mailers")

    def database_url(self, database: str) -> str:
        """The URL of one database of this server."""
        ssl = ""
        if self.tls is not None:
            ssl = f"?sslmode=verify-full&sslrootcert={self.tls.ca_file}"
        return f"postgresql://mailers@{self.listen}:{self.port}/{database}{ssl}"

    @property
    def env(self) -> dict[str, str]:
        """``MAILER_DATABASE_*`` for a coordinator using this server."""
        return {
            "MAILER_DATABASE_URL": self.url,
            "MAILER_DATABASE_PASSWORD_FILE": str(self.password_file),
        }

    def _as_owner(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as the server's owner: as root, through ``setpriv`` (util-linux),
        which drops to that user and then execs it.

        Not ``subprocess``'s ``user=``: with it CPython makes a real ``fork()`` rather
        than a ``vfork()``, so the atfork handlers of whatever the parent has loaded run
        in the child. gRPC's restart its pollers there, and one such start of
        PostgreSQL died of a SIGSEGV before its ``exec``.
        """
        if self._user is None:
            return list(argv)
        owner = pwd.getpwnam(self._user)
        return [
            "setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups",
            "--", *argv,
        ]  # fmt: skip

    def _run(self, argv: Sequence[str], cwd: Path, *, as_owner: bool = True) -> None:
        """Run ``argv`` (as the server's owner unless ``as_owner`` is False)."""
        command = self._as_owner(argv) if as_owner else list(argv)
        done = subprocess.run(command, capture_output=True, cwd=cwd, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode(errors='replace')}")

    def init(self) -> None:
        """Create the cluster (once): initdb (or a copy of :envvar:`MAILERS_PG_TEMPLATE`'s
        cluster), the role's password, settings."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(18)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        cache = os.environ.get(PG_TEMPLATE_ENV)
        if cache:
            # cp -a keeps the owner (as root, the server's user) and the modes.
            template = self._template(Path(cache))
            self._run(
                ["cp", "-a", str(template), str(self.data_dir)], self.data_root, as_owner=False
            )
            self._password_due = password  # set once the server runs (see start)
        else:
            self._initdb(self.data_root, self.data_dir, password)
        settings = [
            f"listen_addresses = '{self.listen}'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.data_root}'",
            "max_connections = 200",
            "shared_buffers = 128MB",
        ]
        if not self.durable:
            settings += ["fsync = off", "full_page_writes = off"]
        if self.tls is not None:
            for name, source in (
                ("server.crt", self.tls.cert_file),
                ("server.key", self.tls.key_file),
            ):
                target = self.data_dir / name
                shutil.copyfile(source, target)
                target.chmod(0o600)
                if self._user is not None:
                    shutil.chown(target, self._user)
            settings += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# mailers_dev.procs.PostgresServer\n" + "\n".join(settings) + "\n")
        # initdb allows TCP from 127.0.0.1 only; let in the subnet we listen on as well.
        with (self.data_dir / "pg_hba.conf").open("a") as hba:
            hba.write("host all mailers samenet scram-sha-256\n")

    def _initdb(self, workdir: Path, data_dir: Path, password: str) -> None:
        """Run initdb as the server's owner, in ``workdir`` (a directory the owner may
        write), making ``data_dir`` with the role ``mailers`` and ``password``."""
        pwfile = workdir / "initdb-pw"
        pwfile.write_text(password + "\n")
        if self._user is not None:
            shutil.chown(pwfile, self._user)
        # --no-sync: a crash of the machine during initdb could only spoil a directory
        # that no run keeps (every run makes its own); waiting for the disk cost 2-3 s of
        # each cluster's start. The server itself keeps its durability (``durable``).
        try:
            self._run(
                [
                    str(self.bindir / "initdb"), "--no-sync", "-D", str(data_dir),
                    "-U", "mailers", f"--pwfile={pwfile}", "--auth-local=trust",
                    "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
                    "--no-instructions",
                ],
                cwd=workdir,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)

    def _template(self, cache: Path) -> Path:
        """The cache's initdb'd cluster for this PostgreSQL and owner, made on first use.

        Several processes may ask at once (a test suite's workers): each that finds none
        makes its own and renames it into place, and the first rename wins. Its role's
        password was random and forgotten: each copy gets its own (see :meth:`start`).
        """
        owner = self._user or str(os.geteuid())
        template = cache / f"{self.bindir.parent.name}-{owner}"
        if (template / "PG_VERSION").exists():
            return template
        cache.mkdir(parents=True, exist_ok=True)
        # Made where the owner may write (as root, under /tmp, as data_root is).
        workdir = Path(tempfile.mkdtemp(prefix="mailers-pg-template-"))
        try:
            if self._user is not None:
                shutil.chown(workdir, self._user)
            self._initdb(workdir, workdir / "data", secrets.token_urlsafe(18))
            with contextlib.suppress(OSError):  # another process's rename came first
                (workdir / "data").rename(template)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if not (template / "PG_VERSION").exists():
            raise RuntimeError(f"no PostgreSQL template cluster at {template}")
        return template

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server (initialising it first if needed) and create the database;
        nothing when it already runs."""
        if self.proc is not None and self.proc.alive():
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self.init()
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        self.proc = spawn("postgres", self._as_owner(argv), self.base_dir / "logs")
        wait_for_port(self.port, timeout_s, self.proc.popen, host=self.listen)
        self._wait_ready(timeout_s)
        if self._password_due is not None:
            # Over the Unix socket (trust), and from stdin: never on a command line.
            quoted = self._password_due.replace("'", "''")
            self.sql(f"ALTER ROLE mailers PASSWORD '{quoted}'", secret=True)
            self._password_due = None
        self._createdb()

    def _psql(
        self, sql: str, database: str = "postgres", *, secret: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """``sql`` run by psql; a ``secret`` one goes in on stdin, off the command line."""
        return subprocess.run(
            self._as_owner([
                str(self.bindir / "psql"), "-h", str(self.data_root), "-p", str(self.port),
                "-U", "mailers", "-d", database, "-v", "ON_ERROR_STOP=1", "-qAt",
                *(("-f", "-") if secret else ("-c", sql)),
            ]),
            input=sql.encode() if secret else None, capture_output=True, timeout=60,
        )  # fmt: skip

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._psql("SELECT 1").returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on port {self.port} is not ready")
            time.sleep(0.1)

    def _createdb(self) -> None:
        exists = self._psql("SELECT 1 FROM pg_database WHERE datname = 'mailers'")
        if exists.stdout.strip() != b"1":
            self.sql("CREATE DATABASE mailers")

    def sql(self, statement: str, database: str = "postgres", *, secret: bool = False) -> str:
        """Run one statement as the ``mailers`` role over the Unix socket; its output.
        A ``secret`` statement is given to psql on stdin rather than on its command line."""
        done = self._psql(statement, database, secret=secret)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()

    def create_database(self, name: str, template: str = "template1") -> str:
        """A new empty database (for a test of its own); returns its URL."""
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.database_url(name)

    def halt(self) -> None:
        """Stop the server (fast shutdown), keeping its data: :meth:`start` resumes it
        on the same port."""
        if self.proc is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: abort sessions, checkpoint, exit.
            self.proc.signal(signal.SIGINT)
            self.proc.stop(grace_s=30)
            self.proc = None

    @property
    def outside(self) -> Path | None:
        """The server's directory when it lives outside ``base_dir`` (as root, under
        /tmp): :meth:`stop` removes it, and whoever could be killed before that names it."""
        return None if self._user is None else self.data_root

    def stop(self) -> None:
        """Stop the server (fast shutdown) and, when it lived under /tmp, remove it."""
        self.halt()
        if self.outside is not None:
            shutil.rmtree(self.outside, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
