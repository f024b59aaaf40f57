"""A private network of "hosts" on this machine: one network namespace per host.

Every host is a namespace with one veth link into a bridge in the root namespace; the
bridge holds the first address of a /24 in 10.77.0.0/16 that no route of the machine
uses yet, so the test process (in the root namespace) reaches every host and traffic
never leaves the machine. Processes run in a host with ``ip netns exec``, which execs
the command, so the PID we keep is the process itself.

:meth:`NetLab.close` removes everything :meth:`NetLab.add_host` and :meth:`NetLab.spawn`
made: processes (by PID, SIGTERM then SIGKILL), namespaces (their iptables rules and
veth ends go with them) and the bridge. It is safe to call after a partial set-up and
twice. Names carry this process's PID, and a new lab first removes what an earlier lab
of a dead process left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mailers_dev.procs import Proc, spawn

_PREFIX = "mlh"


def _ip(*args: str, netns: str | None = None) -> str:
    argv = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why this machine cannot run a lab, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, bridge, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"{_PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        return f"ip netns is unavailable: {exc}"
    try:
        done = subprocess.run(
            ["ip", "netns", "exec", probe, "iptables", "-S"], capture_output=True, timeout=10
        )
        if done.returncode != 0:
            return f"iptables does not work in a namespace: {done.stderr.decode().strip()}"
    finally:
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", probe)
    return None


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, killed but not reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _sweep_stale() -> None:
    """Remove what labs of dead processes (a killed test run) left: their processes,
    namespaces and links."""
    owners: set[int] = set()
    names = _ip("netns", "list").split()
    links = re.findall(rf"^\d+: ({_PREFIX}\d+\w*)[@:]", _ip("-o", "link", "show"), re.M)
    for name in [*names, *links]:
        match = re.match(rf"{_PREFIX}(\d+)", name)
        if match:
            owners.add(int(match.group(1)))
    for pid in owners:
        if pid == os.getpid() or _alive(pid):
            continue
        for ns in names:
            if ns.startswith(f"{_PREFIX}{pid}-"):
                # Processes an earlier lab started there, by PID, then the namespace.
                with contextlib.suppress(RuntimeError):
                    for stale in _ip("netns", "pids", ns).split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(stale), signal.SIGKILL)
                with contextlib.suppress(RuntimeError):
                    _ip("netns", "del", ns)
        for link in links:
            if link.startswith(f"{_PREFIX}{pid}"):
                with contextlib.suppress(RuntimeError):
                    _ip("link", "del", link)


def _free_subnet() -> str:
    """A 10.77.X.0/24 that no route of this machine touches: ``"10.77.X"``."""
    routes = _ip("-4", "route", "show", "table", "all")
    for third in range(0, 256):
        prefix = f"10.77.{third}"
        if f"{prefix}." not in routes and "10.77.0.0/16" not in routes:
            return prefix
    raise RuntimeError("no free /24 in 10.77.0.0/16")


@dataclasses.dataclass
class Host:
    name: str
    netns: str
    address: str


class NetLab:
    """Hosts on one bridge; see the module docstring. Use as a context manager."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.tag = f"{_PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self._namespaces: list[str] = []
        self._veths: list[str] = []
        self._bridge_made = False
        self.subnet = ""

    def __enter__(self) -> NetLab:
        try:
            _sweep_stale()
            self.subnet = _free_subnet()
            _ip("link", "add", self.bridge, "type", "bridge")
            self._bridge_made = True
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add_host(self, name: str, last_octet: int) -> Host:
        """A namespace with lo up and eth0 at <subnet>.<last_octet>/24 on the bridge."""
        netns = f"{self.tag}-{name}"
        veth = f"{self.tag}v{len(self.hosts)}"
        _ip("netns", "add", netns)
        self._namespaces.append(netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._veths.append(veth)
        _ip("link", "set", veth, "master", self.bridge, "up")
        address = f"{self.subnet}.{last_octet}"
        _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
        _ip("link", "set", "eth0", "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        host = Host(name, netns, address)
        self.hosts[name] = host
        return host

    def spawn(
        self, host: Host, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Proc:
        """Run argv inside host; output goes to log_dir/<name>.log."""
        proc = spawn(name, ["ip", "netns", "exec", host.netns, *argv], self.log_dir, env)
        self.procs.append(proc)
        return proc

    def cut_off(self, host: Host) -> None:
        """Drop every packet into and out of host's eth0 (loopback keeps working)."""
        for rule in (["INPUT", "-i", "eth0"], ["OUTPUT", "-o", "eth0"]):
            self._iptables(host, "-I", *rule, "-j", "DROP")

    def isolate(self, host: Host, peers: Sequence[Host]) -> None:
        """Drop every packet between host and peers, in both directions; host still
        reaches, and is reached from, everything else (the root namespace included)."""
        for peer in peers:
            for rule in (["INPUT", "-s", peer.address], ["OUTPUT", "-d", peer.address]):
                self._iptables(host, "-I", *rule, "-j", "DROP")

    def heal(self, host: Host) -> None:
        """Remove every rule :meth:`cut_off` or :meth:`isolate` put in host."""
        self._iptables(host, "-F")

    @staticmethod
    def _iptables(host: Host, *args: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", host.netns, "iptables", *args],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def close(self) -> None:
        """Stop every process (SIGTERM to all, then wait; SIGKILL stragglers), then remove
        the namespaces and the bridge. Errors are collected and raised at the end."""
        errors: list[str] = []
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        self.procs.clear()
        # Deleting the root end removes the pair at once; a namespace's deletion would
        # remove it too, but asynchronously.
        for veth in self._veths:
            try:
                _ip("link", "del", veth)
            except RuntimeError as exc:
                errors.append(str(exc))
        self._veths.clear()
        for netns in reversed(self._namespaces):
            try:
                _ip("netns", "del", netns)
            except RuntimeError as exc:
                errors.append(str(exc))
        self._namespaces.clear()
        if self._bridge_made:
            try:
                _ip("link", "del", self.bridge)
            except RuntimeError as exc:
                errors.append(str(exc))
            self._bridge_made = False
        if errors:
            raise RuntimeError("lab clean-up failed: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """Names of this lab's namespaces and links that still exist (should be none)."""
        names = [n for n in _ip("netns", "list").split() if n.startswith(f"{self.tag}-")]
        links = re.findall(rf"^\d+: ({self.tag}\w*)[@:]", _ip("-o", "link", "show"), re.M)
        return [*names, *links]


def wait_for_tcp(address: str, port: int, timeout_s: float, proc: Proc | None = None) -> None:
    """Block until address:port accepts a connection.

    Raises:
        TimeoutError: nothing listened within timeout_s.
        RuntimeError: proc exited first.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {address}:{port} after {timeout_s}s")
