"""The two designs under test on the namespace network, and the shared pieces.

* :class:`Testbed`: the network, a 3-member etcd cluster (one namespace per member), and
  two producer hosts ``bp-a`` and ``bp-b``; a fresh nodeos simulator per trial.
* :class:`Bpleader`: one ``bpleader agent`` per producer host (fast timing profile).
* :class:`Keepalived`: the baseline, real keepalived with VRRP between the producer
  hosts, the ``isInSync.sh`` track script and the ``check_nodeos.sh`` notify script.

The simulator runs in the root namespace: it *is* the chain (the p2p network) and both
nodeos processes. Each producer host reaches its own nodeos over its nodeos link, which
no scenario cuts (on a real host that is localhost:8888); blocks reach every simulated
node through the simulator itself, so the chain link is never cut either, exactly as in
the split brain of the issue (the leader loses etcd and its peer, keeps the chain).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from benchmarks.chaos.net import Network, Proc, sh

from bpleader.antelope import new_private_key, public_key_of
from bpleader.localetcd import ELECTION_TIMEOUT, RAFT_FLAGS

PRODUCER = "mybp"
NODES = ("bp-a", "bp-b")
ETCD = ("etcd0", "etcd1", "etcd2")
# Another producer fills half of every round, as on a real chain (same as the
# integration tests): without it a standby's head would stop with the leader.
CHAIN = ["--other-producers", "otherbp", "--slots-per-producer", "4",
         "--block-interval", "0.5"]
# A chain with a gap after our round (ours 4 s, then 8 s of two other producers), where a
# switchover timed to the gap can move production without a slot of ours due.
GAP_CHAIN = ["--other-producers", "ob1,ob2", "--slots-per-producer", "8",
             "--block-interval", "0.5"]
BLOCK_INTERVAL = 0.5
# DESIGN.md's fast profile (tests/harness.py FAST_TIMING).
FAST_TIMING: dict[str, float] = {
    "lease_ttl": 2, "keepalive_interval": 0.3, "fence_guard": 0.9, "takeover_delay": 0.5,
    "check_interval": 0.25, "continuity_timeout": 3.0, "doppelganger_quiet": 10.0,
}
# The agent's defaults (config.TimingConfig), the profile DESIGN.md recommends.
DEFAULT_TIMING: dict[str, float] = {
    "lease_ttl": 5, "keepalive_interval": 1.0, "fence_guard": 1.5, "takeover_delay": 1.0,
    "check_interval": 0.5, "continuity_timeout": 5.0, "doppelganger_quiet": 60.0,
}
PROFILES: dict[str, dict[str, float]] = {"fast": FAST_TIMING, "default": DEFAULT_TIMING}
# The baseline's track script threshold: the fork's 10 s scaled to this chain. Both
# designs call a node in sync when its head is at most 3 s old (bpleader max_head_lag).
BASELINE_MAX_AGE = 3
SRC = Path(__file__).resolve().parents[2] / "src"
PYTHON = sys.executable
DELAY_PORT = 23790  # the delaying proxies' first port, on each producer host's loopback
BASELINE_DIR = Path(__file__).resolve().parent / "baseline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        port: int = s.getsockname()[1]
        return port


def _toml(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, fields in sections.items():
        lines += [f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in fields.items()), ""]
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


class Sim:
    """The nodeos simulator of one trial (root namespace, all addresses)."""

    def __init__(self, net: Network, workdir: Path, finkey: str = "",
                 shape: list[str] = CHAIN) -> None:
        """``finkey``: the K1 private key of the producer's ``finkey`` permission on a
        Savanna chain; empty for a legacy chain. ``shape``: CHAIN or GAP_CHAIN."""
        # While no node of ours produces (start-up), our round leaves the head as old as
        # the round is long: both designs' head-age threshold must cover it.
        round_s = int(shape[shape.index("--slots-per-producer") + 1]) * BLOCK_INTERVAL
        self.max_head_lag = max(3.0, round_s + 1.0)
        self.ports = {n: free_port() for n in NODES}
        ready = workdir / "sim.ready"
        ready.unlink(missing_ok=True)
        chain = ["--finalizer-permission", f"finkey={public_key_of(finkey)}"] if finkey \
            else ["--legacy"]
        args = [PYTHON, "-m", "bpleader.cli", "sim", "--producer", PRODUCER,
                "--nodes", ",".join(NODES), *shape, *chain, "--pause-on-startup-all",
                "--host", "0.0.0.0", "--ready-file", str(ready), "--log-level", "WARNING"]
        # base-port would need consecutive free ports; ephemeral ports are read back.
        self.proc = net.spawn(None, args, workdir / "sim.log",
                              env={"PYTHONPATH": str(SRC)})
        deadline = time.monotonic() + 15
        while not ready.exists():
            if time.monotonic() > deadline or not self.proc.running:
                raise RuntimeError(f"simulator did not start: see {workdir / 'sim.log'}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.control = info["control"].replace("0.0.0.0", "127.0.0.1")
        self.ports = {n: int(u.rsplit(":", 1)[1]) for n, u in info["nodes"].items()}
        self.finalizer_keys: dict[str, str] = info["finalizer_keys"]
        self.http = httpx.Client(base_url=self.control, timeout=5.0)
        self.net = net

    def url_from(self, node: str) -> str:
        """The node's API as its producer host reaches it (over the nodeos link)."""
        ip = self.net.hosts[node].nodeos_ip
        return f"http://{ip}:{self.ports[node]}"

    def producing(self) -> dict[str, bool]:
        nodes = self.http.get("/nodes").json()["nodes"]
        return {n["name"]: bool(n["producing"]) for n in nodes}

    def ledger(self) -> dict[str, Any]:
        result: dict[str, Any] = self.http.get("/ledger").json()
        return result

    def slots(self, since: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.http.get(
            "/ledger/slots", params={"since": since, "limit": 100000}).json()["slots"]
        return result

    def fault(self, node: str, kind: str) -> None:
        self.http.post(f"/nodes/{node}/fault", json={"kind": kind}).raise_for_status()

    def clear(self, node: str) -> None:
        self.http.post(f"/nodes/{node}/clear", json={}).raise_for_status()

    def close(self) -> None:
        self.http.close()
        self.net.kill(self.proc, signal.SIGTERM)


@dataclass
class Testbed:
    net: Network
    workdir: Path
    finkey: str = ""  # Savanna: the producer's finkey permission key; "": legacy chain
    etcd_delay: float = 0.0  # seconds added each way between the agents and etcd
    profile: str = "fast"  # the agents' timing: a key of PROFILES
    etcd_procs: dict[str, Proc] = field(default_factory=dict)

    @classmethod
    def create(cls, net: Network, workdir: Path, savanna: bool = True,
               etcd_delay: float = 0.0, profile: str = "fast") -> Testbed:
        bed = cls(net, workdir, new_private_key() if savanna else "", etcd_delay, profile)
        for name in ETCD:
            net.add_host(name)
        for name in NODES:
            net.add_host(name, nodeos_link=True)
        bed.start_etcd()
        return bed

    @property
    def timing(self) -> dict[str, float]:
        return PROFILES[self.profile]

    @property
    def lease_ttl(self) -> float:
        return float(self.timing["lease_ttl"])

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.net.hosts[e].ctl_ip}:2379" for e in ETCD]

    def start_etcd(self) -> None:
        hosts = self.net.hosts
        cluster = ",".join(f"{e}=http://{hosts[e].ctl_ip}:2380" for e in ETCD)
        for e in ETCD:
            ip = hosts[e].ctl_ip
            args = ["/usr/bin/etcd", "--name", e, "--data-dir", str(self.workdir / e),
                    "--listen-client-urls", f"http://{ip}:2379",
                    "--advertise-client-urls", f"http://{ip}:2379",
                    "--listen-peer-urls", f"http://{ip}:2380",
                    "--initial-advertise-peer-urls", f"http://{ip}:2380",
                    "--initial-cluster", cluster, "--initial-cluster-state", "new",
                    "--initial-cluster-token", self.net.prefix,
                    *RAFT_FLAGS,
                    "--logger", "zap", "--log-level", "warn"]
            self.etcd_procs[e] = self.net.spawn(e, args, self.workdir / f"{e}.log")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = self.etcdctl("endpoint", "health")
            if r.returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"etcd not healthy: {r.stderr}")

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh("etcdctl", f"--endpoints={','.join(self.endpoints)}", "--dial-timeout=2s",
                  "--command-timeout=3s", *args, check=False)

    def etcd_leader(self) -> str:
        """The etcd member that leads raft now (etcd0 when it cannot be told)."""
        r = self.etcdctl("endpoint", "status", "-w", "json")
        with contextlib.suppress(ValueError, KeyError):
            for st in json.loads(r.stdout):
                s = st["Status"]
                if s["header"]["member_id"] == s["leader"]:
                    for e in ETCD:
                        if self.net.hosts[e].ctl_ip in st["Endpoint"]:
                            return e
        return ETCD[0]

    def etcd_requests(self) -> float:
        """gRPC calls handled by all members since they started (a stream counts once,
        when it ends)."""
        return self.etcd_counter("grpc_server_handled_total")

    def etcd_messages(self) -> float:
        """gRPC messages received by all members: one per unary call, one per message on
        a stream (each renewal on a kept keepalive stream, each watch request)."""
        return self.etcd_counter("grpc_server_msg_received_total")

    def etcd_counter(self, name: str) -> float:
        total = 0.0
        for url in self.endpoints:
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{url}/metrics", timeout=2).text
                for line in text.splitlines():
                    if line.startswith(name + "{"):
                        total += float(line.rsplit(" ", 1)[1])
        return total


def proc_usage(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds, resident MiB) summed over ``pids``; CPU includes reaped children
    (keepalived's track and notify scripts)."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = rss = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        cpu += sum(int(f) for f in fields[11:15]) / tick
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
    return cpu, rss


class Design:
    """What a scenario needs from a design; one instance per trial."""

    name = ""

    def __init__(self, bed: Testbed, sim: Sim, trial_dir: Path) -> None:
        self.bed, self.sim, self.dir = bed, sim, trial_dir
        self.net = bed.net

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill_leader(self, node: str) -> None:
        raise NotImplementedError

    def freeze(self, node: str) -> None:
        raise NotImplementedError

    def thaw(self, node: str) -> None:
        raise NotImplementedError

    def restart(self, node: str) -> None:
        raise NotImplementedError

    def switchover(self, old: str, new: str, now: bool = False) -> list[float]:
        """Start a planned handover; the list receives the time it took effect, when
        that is later than the call (empty: at the call)."""
        raise NotImplementedError

    def graceful_stop(self, node: str) -> None:
        """What an operator's ``systemctl stop`` does to the leader's HA process."""
        raise NotImplementedError

    def pids(self, node: str) -> list[int]:
        r = sh("ip", "netns", "pids", self.net.hosts[node].ns, check=False)
        return [int(w) for w in r.stdout.split()]

    def wait_producer(self, node: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sim.producing().get(node):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: {node} did not start producing in {timeout} s")


class Bpleader(Design):
    name = "bpleader"

    def __init__(self, bed: Testbed, sim: Sim, trial_dir: Path) -> None:
        super().__init__(bed, sim, trial_dir)
        self.prefix = f"/bpl-{trial_dir.name}"
        self.agents: dict[str, Proc] = {}
        self.configs = {n: self._config(n) for n in NODES}

    def _config(self, node: str) -> Path:
        host = self.net.hosts[node]
        return write_toml(self.dir / f"{node}.toml", {
            "node": {"name": node, "producer": PRODUCER},
            "etcd": {"endpoints": self._endpoints(), "prefix": self.prefix,
                     "election_timeout": ELECTION_TIMEOUT},
            "nodeos": {"url": self.sim.url_from(node), "timeout": 0.3,
                       "max_head_lag": self.sim.max_head_lag},
            "timing": dict(self.bed.timing),
            "metrics": {"listen": f"{host.ctl_ip}:9750"},
            **self._finalizer(node),
        })

    def _endpoints(self) -> list[str]:
        """etcd as the agents reach it: directly, or through the delaying proxies."""
        if not self.bed.etcd_delay:
            return self.bed.endpoints
        return [f"http://127.0.0.1:{DELAY_PORT + i}" for i in range(len(ETCD))]

    def _start_delays(self, node: str) -> None:
        """One proxy per etcd member in the host's namespace (benchmarks.chaos.delay)."""
        for i, member in enumerate(ETCD):
            target = f"{self.net.hosts[member].ctl_ip}:2379"
            self.net.spawn(node, [PYTHON, "-m", "benchmarks.chaos.delay", "--listen",
                                  f"127.0.0.1:{DELAY_PORT + i}", "--to", target, "--delay",
                                  str(self.bed.etcd_delay)], self.dir / f"{node}-delay.log",
                           env={"PYTHONPATH": str(SRC.parent)})
            self.net.wait_port(node, DELAY_PORT + i)

    def _finalizer(self, node: str) -> dict[str, dict[str, Any]]:
        """On Savanna each agent moves its own node's finalizer key with production."""
        if not self.bed.finkey:
            return {}
        key_file = self.dir / f"{node}.finkey"
        key_file.write_text(self.bed.finkey + "\n")
        key_file.chmod(0o600)
        return {"finalizer": {"key": self.sim.finalizer_keys[node],
                              "permission": f"{PRODUCER}@finkey",
                              "signing_key_file": str(key_file)}}

    def _spawn(self, node: str) -> None:
        self.agents[node] = self.net.spawn(
            node, [PYTHON, "-m", "bpleader.cli", "agent", "--config", str(self.configs[node])],
            self.dir / f"{node}.log", env={"PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1"})

    def start(self) -> None:
        if self.bed.etcd_delay:
            for node in NODES:
                self._start_delays(node)
        self._spawn(NODES[0])
        self.wait_producer(NODES[0])
        self._spawn(NODES[1])
        self.net.wait_port(NODES[1], 9750)

    def stop(self) -> None:
        for node, proc in self.agents.items():
            self.net.kill(proc, signal.SIGTERM)
            self.net.kill_host_procs(node)

    def graceful_stop(self, node: str) -> None:
        """SIGTERM the agent (not waiting for it): it pauses nodeos and resigns."""
        os.kill(self.agents[node].pid, signal.SIGTERM)

    def kill_leader(self, node: str) -> None:
        """SIGKILL the agent only: its guard process (the dead-man fence) survives."""
        self.net.kill(self.agents[node], signal.SIGKILL)

    def freeze(self, node: str) -> None:
        self.net.freeze(self.agents[node])

    def thaw(self, node: str) -> None:
        self.net.thaw(self.agents[node])

    def restart(self, node: str) -> None:
        self.net.kill_host_procs(node)
        self._spawn(node)

    def switchover(self, old: str, new: str, now: bool = False) -> list[float]:
        """``bpleader switchover --to new``: timed to the gap after our round unless
        ``now``. It takes effect when the command writes the request to etcd (it says
        so): that, not the start of a Python process, is the handover's start. It runs on
        the new leader's host, as an operator would run it: the config's etcd endpoints
        are that host's view (through its delaying proxies when etcd is far)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.net.hosts[new].ns,
                                 PYTHON, "-m", "bpleader.cli", "switchover", "--config",
                                 str(self.configs[new]), "--to", new,
                                 *(["--now"] if now else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(SRC)})
        requested: list[float] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(b"switchover requested") and not requested:
                    requested.append(time.time())
            proc.wait()

        threading.Thread(target=read, daemon=True).start()
        return requested


KEEPALIVED_CONF = """\
global_defs {{
    router_id {node}
    script_user root
}}

vrrp_script isInSync {{
    script "{run}/isInSync.sh {url} {max_age}"
    interval 2
    timeout 2
}}

vrrp_instance VI_1 {{
    state {state}
    interface ctl0
    virtual_router_id 51
    priority {priority}
    advert_int 1
    unicast_src_ip {src}
    unicast_peer {{
        {peer}
    }}
    authentication {{
        auth_type PASS
        auth_pass bplchaos
    }}
    virtual_ipaddress {{
        {vip}/24 dev ctl0
    }}
    track_script {{
        isInSync
    }}
    notify "{run}/check_nodeos.sh {url} {run}/{node}.notify.log"
}}
"""


class Keepalived(Design):
    """The baseline: unicast VRRP on the control link, priority 200 (bp-a) / 100 (bp-b)."""

    name = "keepalived"

    def __init__(self, bed: Testbed, sim: Sim, trial_dir: Path) -> None:
        super().__init__(bed, sim, trial_dir)
        self.procs: dict[str, Proc] = {}
        for script in ("isInSync.sh", "check_nodeos.sh"):
            dst = self.dir / script
            dst.write_bytes((BASELINE_DIR / script).read_bytes())
            dst.chmod(0o755)
        self.confs = {n: self._conf(n) for n in NODES}

    def _conf(self, node: str) -> Path:
        hosts = self.net.hosts
        peer = NODES[1] if node == NODES[0] else NODES[0]
        first = node == NODES[0]
        path = self.dir / f"{node}.keepalived.conf"
        path.write_text(KEEPALIVED_CONF.format(
            node=node, run=self.dir, url=self.sim.url_from(node),
            max_age=max(BASELINE_MAX_AGE, int(self.sim.max_head_lag)),
            state="MASTER" if first else "BACKUP", priority=200 if first else 100,
            src=hosts[node].ctl_ip, peer=hosts[peer].ctl_ip, vip=self.net.vip))
        return path

    def _pidfile(self, node: str, kind: str) -> Path:
        return self.dir / f"{node}.{kind}.pid"

    def _spawn(self, node: str) -> None:
        for kind in ("main", "vrrp", "check"):
            self._pidfile(node, kind).unlink(missing_ok=True)
        self.procs[node] = self.net.spawn(
            node, ["keepalived", "-n", "-l", "-D", "-f", str(self.confs[node]),
                   "-p", str(self._pidfile(node, "main")),
                   "-r", str(self._pidfile(node, "vrrp")),
                   "-c", str(self._pidfile(node, "check"))],
            self.dir / f"{node}.keepalived.log")

    def _all_pids(self, node: str) -> list[int]:
        pids = []
        for kind in ("main", "vrrp", "check"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(self._pidfile(node, kind).read_text().strip()))
        return pids

    def start(self) -> None:
        self._spawn(NODES[0])
        self.wait_producer(NODES[0])
        self._spawn(NODES[1])
        time.sleep(1.5)

    def stop(self) -> None:
        for node in NODES:
            self.net.kill_host_procs(node)

    def _signal(self, node: str, sig: int) -> None:
        for pid in self._all_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill_leader(self, node: str) -> None:
        """SIGKILL all three keepalived processes: no priority-0 advert, no notify."""
        self._signal(node, signal.SIGKILL)

    def freeze(self, node: str) -> None:
        self._signal(node, signal.SIGSTOP)

    def thaw(self, node: str) -> None:
        self._signal(node, signal.SIGCONT)

    def restart(self, node: str) -> None:
        self.net.kill_host_procs(node)
        self._spawn(node)

    def switchover(self, old: str, new: str, now: bool = False) -> list[float]:
        """`systemctl stop keepalived` on the master: SIGTERM (priority-0 advert)."""
        self._signal(old, signal.SIGTERM)
        return []

    def graceful_stop(self, node: str) -> None:
        self._signal(node, signal.SIGTERM)


DESIGNS: dict[str, type[Design]] = {"bpleader": Bpleader, "keepalived": Keepalived}
