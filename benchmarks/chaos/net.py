"""A test network of hosts made of Linux network namespaces, veth pairs and a bridge.

Layout (``X`` is a per-run subnet byte, so two runs never share addresses):

* root namespace: the bridge ``<prefix>br`` (10.X.0.254/24) that every host's *control
  link* plugs into, and the nodeos simulator (the chain) listening on 0.0.0.0;
* one namespace per host, ``<prefix>-<host>``: its control link ``ctl0`` (10.X.0.N/24,
  to etcd and to the other producer; VRRP runs here) and, for producer hosts, a
  point-to-point *nodeos link* ``nod0`` (10.X.N.2/30 <-> root 10.X.N.1/30) to its own
  simulated nodeos, which the harness never cuts (it stands for localhost:8888).

Faults are nftables rules in the host's own namespace (table ``inet chaos``), so the
carrier of the link stays up, as when a switch or a firewall between hosts fails:
a cut drops everything on ``ctl0`` both ways; ``drop_one_way`` only one direction;
``block_peer`` only traffic with one address; ``loss`` drops a random share of packets
with ``numgen random mod 100 < P``. ``tc netem`` is not used (this kernel lacks it).

Cleanup always runs: :class:`Network` is a context manager, registers an ``atexit`` hook
and SIGTERM/SIGINT/SIGHUP handlers, kills every process started in its namespaces
(including grandchildren such as the agent's guard process, found by ``ip netns pids``)
and deletes namespaces, veths and bridge. At start, namespaces of earlier runs whose
owner process is gone (a marker file under ``/run/bpl-chaos`` names it) are removed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

MARKERS = Path("/run/bpl-chaos")
PREFIX_RE = re.compile(r"^bc[0-9a-f]{4}$")
CTL = "ctl0"
NOD = "nod0"


def sh(*args: str, check: bool = True, input_text: str | None = None,
       timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its stderr (not just the exit code)."""
    r = subprocess.run(list(args), capture_output=True, text=True, input=input_text,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def netns_usable() -> tuple[bool, str]:
    """Whether namespaces, veth and nftables work here (the reason when not)."""
    if os.geteuid() != 0:
        return False, "needs root (ip netns)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return False, f"{tool} not installed"
    name = f"bcprobe{os.getpid() % 10000}"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "netns", "exec", name, "nft", "add", "table", "inet", "probe")
        return True, ""
    except (RuntimeError, subprocess.SubprocessError) as exc:
        return False, f"ip netns unusable: {exc}"
    finally:
        sh("ip", "netns", "del", name, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(ns: str) -> None:
    r = sh("ip", "netns", "pids", ns, check=False)
    for word in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGCONT)
            os.kill(int(word), signal.SIGKILL)


def cleanup_stale() -> list[str]:
    """Remove namespaces and links of earlier runs whose owner process is gone."""
    removed: list[str] = []
    if not MARKERS.is_dir():
        return removed
    for marker in MARKERS.glob("bc*.pid"):
        prefix = marker.stem
        try:
            owner = int(marker.read_text().strip() or "0")
        except (OSError, ValueError):
            owner = 0
        if owner and _pid_alive(owner):
            continue
        _remove_prefix(prefix)
        marker.unlink(missing_ok=True)
        removed.append(prefix)
    return removed


def _remove_prefix(prefix: str) -> None:
    if not PREFIX_RE.match(prefix):
        return
    for ns in sh("ip", "netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(prefix + "-"):
            _kill_netns_pids(name)
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            if link.startswith(prefix):
                sh("ip", "link", "del", link, check=False)


@dataclass
class Host:
    name: str
    index: int
    ns: str
    ctl_ip: str
    nodeos_ip: str | None = None  # the root side of the nodeos link (where nodeos listens)
    rules: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Proc:
    """A process started in a host's namespace (``ip netns exec`` execs it: same pid)."""

    host: str | None
    popen: subprocess.Popen[bytes]
    frozen: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None


class Network:
    """Hosts on one bridge; faults; processes; cleanup. Use ``with Network(...) as net``."""

    def __init__(self, workdir: Path) -> None:
        self.prefix = "bc" + secrets.token_hex(2)
        self.workdir = workdir
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self.subnet = self._pick_subnet()
        self.bridge = f"{self.prefix}br"
        self._closed = False
        self._old_handlers: dict[int, Any] = {}

    @staticmethod
    def _pick_subnet() -> int:
        used = sh("ip", "-o", "addr", "show", check=False).stdout
        for _ in range(200):
            x = 100 + secrets.randbelow(150)
            if f" 10.{x}." not in used:
                return x
        raise RuntimeError("no free 10.X.0.0/16 subnet for the test network")

    @property
    def root_ip(self) -> str:
        return f"10.{self.subnet}.0.254"

    @property
    def vip(self) -> str:
        return f"10.{self.subnet}.0.100"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Network:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        cleanup_stale()
        MARKERS.mkdir(parents=True, exist_ok=True)
        (MARKERS / f"{self.prefix}.pid").write_text(str(os.getpid()))
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self.workdir.mkdir(parents=True, exist_ok=True)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.root_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.close()
        raise SystemExit(128 + signum)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self.procs:
            if p.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                    p.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(5)
        _remove_prefix(self.prefix)
        (MARKERS / f"{self.prefix}.pid").unlink(missing_ok=True)
        with contextlib.suppress(ValueError):
            atexit.unregister(self.close)
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)

    # ------------------------------------------------------------------ topology

    def add_host(self, name: str, nodeos_link: bool = False) -> Host:
        index = len(self.hosts) + 1
        ns = f"{self.prefix}-{name}"
        host = Host(name, index, ns, f"10.{self.subnet}.0.{index}")
        sh("ip", "netns", "add", ns)
        self.ns_exec(host, "ip", "link", "set", "lo", "up")
        outer, inner = f"{self.prefix}{index}c", f"{self.prefix}{index}C"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        self.ns_exec(host, "ip", "link", "set", inner, "name", CTL)
        self.ns_exec(host, "ip", "addr", "add", f"{host.ctl_ip}/24", "dev", CTL)
        self.ns_exec(host, "ip", "link", "set", CTL, "up")
        sh("ip", "link", "set", outer, "master", self.bridge)
        sh("ip", "link", "set", outer, "up")
        if nodeos_link:
            outer, inner = f"{self.prefix}{index}n", f"{self.prefix}{index}N"
            root_ip, ns_ip = f"10.{self.subnet}.{index}.1", f"10.{self.subnet}.{index}.2"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            self.ns_exec(host, "ip", "link", "set", inner, "name", NOD)
            self.ns_exec(host, "ip", "addr", "add", f"{ns_ip}/30", "dev", NOD)
            self.ns_exec(host, "ip", "link", "set", NOD, "up")
            sh("ip", "addr", "add", f"{root_ip}/30", "dev", outer)
            sh("ip", "link", "set", outer, "up")
            host.nodeos_ip = root_ip
        self.hosts[name] = host
        self._apply(host)
        return host

    def ns_exec(self, host: Host, *args: str, check: bool = True,
                input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", host.ns, *args, check=check, input_text=input_text)

    # ------------------------------------------------------------------ processes

    def spawn(self, host: str | None, args: Sequence[str], log: Path,
              env: dict[str, str] | None = None) -> Proc:
        """Start ``args`` in the host's namespace (``None``: the root namespace)."""
        out: IO[bytes] = open(log, "ab")
        cmd = [*args] if host is None else ["ip", "netns", "exec", self.hosts[host].ns, *args]
        try:
            popen = subprocess.Popen(cmd,
                                     stdout=out, stderr=out, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        finally:
            out.close()
        proc = Proc(host, popen)
        self.procs.append(proc)
        return proc

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        if proc.running:
            if proc.frozen:
                self.thaw(proc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(10)

    def freeze(self, proc: Proc) -> None:
        os.kill(proc.pid, signal.SIGSTOP)
        proc.frozen = True

    def thaw(self, proc: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.frozen = False

    def kill_host_procs(self, host: str) -> None:
        """Every process in the host's namespace (the agent's guard included)."""
        for p in self.procs:
            if p.host == host and p.running:
                self.kill(p)
        _kill_netns_pids(self.hosts[host].ns)

    # ------------------------------------------------------------------ faults

    def _apply(self, host: Host) -> None:
        inp = [r for key, rs in sorted(host.rules.items()) for r in rs if r.startswith("in ")]
        out = [r for key, rs in sorted(host.rules.items()) for r in rs if r.startswith("out ")]
        body = (
            "table inet chaos\ndelete table inet chaos\ntable inet chaos {\n"
            "  chain input { type filter hook input priority 0; policy accept;\n"
            + "".join(f"    {r[3:]}\n" for r in inp)
            + "  }\n  chain output { type filter hook output priority 0; policy accept;\n"
            + "".join(f"    {r[4:]}\n" for r in out)
            + "  }\n}\n")
        self.ns_exec(host, "nft", "-f", "-", input_text=body)

    def _set(self, host: str, key: str, rules: list[str]) -> None:
        h = self.hosts[host]
        if rules:
            h.rules[key] = rules
        else:
            h.rules.pop(key, None)
        self._apply(h)

    def cut(self, host: str) -> None:
        """Drop everything on the host's control link, both ways (carrier stays up)."""
        self._set(host, "cut", [f'in iifname "{CTL}" drop', f'out oifname "{CTL}" drop'])

    def heal(self, host: str) -> None:
        """Remove every fault of the host."""
        h = self.hosts[host]
        h.rules.clear()
        self._apply(h)

    def drop_one_way(self, host: str, direction: str) -> None:
        """Drop the control link's incoming ("in") or outgoing ("out") packets only."""
        rule = f'in iifname "{CTL}" drop' if direction == "in" else f'out oifname "{CTL}" drop'
        self._set(host, f"oneway-{direction}", [rule])

    def block_peer(self, host: str, peer: str) -> None:
        """Drop traffic between ``host`` and ``peer`` only (both still reach the others)."""
        ip = self.hosts[peer].ctl_ip
        self._set(host, f"peer-{peer}", [f"in ip saddr {ip} drop", f"out ip daddr {ip} drop"])

    def loss(self, host: str, percent: int) -> None:
        """Drop ``percent`` % of the control link's packets at random, each direction."""
        p = int(percent)
        self._set(host, "loss", [f'in iifname "{CTL}" numgen random mod 100 < {p} drop',
                                 f'out oifname "{CTL}" numgen random mod 100 < {p} drop'])

    def wait_port(self, host: str, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.ns_exec(self.hosts[host], "ss", "-ltn", f"sport = :{port}", check=False)
            if str(port) in r.stdout:
                return
            time.sleep(0.1)
        raise TimeoutError(f"nothing listens on {host}:{port}")
