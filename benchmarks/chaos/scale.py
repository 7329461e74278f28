"""Scale run: many producers, two agents each, against one 3-member etcd cluster.

Loopback only (no namespaces): the point is etcd's load and failover time as the number
of agents grows, not the network. Agents use DESIGN.md's default timing (lease_ttl 5 s,
keepalive 1 s, check 0.5 s), as an operator running many producers would. For each size:
start every agent, wait until each producer has one producing node, measure etcd's load
and every process's CPU for ``--measure`` seconds at rest, then crash the leader agent of
``--kills`` producers at once and time each failover (until the other agent of the pair
has resumed its nodeos), and read the simulator's ledger (double-produced slots, must
be 0).

Two ways to run the agents (``--mode``):

* ``process``: one ``bpleader agent`` process per agent, each with its guard process
  (as in production); a crash is a SIGKILL of the agent, and its guard fences nodeos.
* ``inproc``: many :class:`bpleader.agent.Agent` on one asyncio loop per agent host
  process (``--agent-procs``; a pair's two agents sit in different hosts when there are
  several), each with its own etcd store (own lease, session, keepalive stream, watch),
  nodeos client and fence; no guard processes. A crash cancels the agent's task and
  closes its etcd connection; its fence, still armed, pauses nodeos at the lease
  deadline minus fence_guard. See :mod:`benchmarks.chaos.scale_hosts`.

``auto`` (the default) runs up to 50 agents as processes and more in process: fifty
agent processes with their guards already take 22 s to start on two cores.

Every producer's chain and both its simulated nodeos live in a simulator process of
``--sim-pairs`` producers (see :class:`Simulators` for why not one process). The run
reads each process's CPU time from ``/proc/<pid>/stat`` (etcd: its three members summed;
agents: the agent processes, with their guards; the simulator processes) and etcd's own
``/metrics``: ``grpc_server_handled_total`` (gRPC calls completed: a unary request counts
once, a stream once when it ends, so renewals on a kept keepalive stream do not count)
and ``grpc_server_msg_received_total`` (every message received, each renewal and watch
request included). Every wait is bounded: a size whose agents never all produce, whose
failovers time out, or that saturates the CPU is recorded with what limited it, and the
larger sizes are skipped (``--keep-going`` tries them anyway).

    python -m benchmarks.chaos.scale --pairs 10,50,100,200,500 --mode inproc
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from benchmarks.chaos.scale_hosts import account, pair_nodes
from benchmarks.chaos.world import DEFAULT_TIMING, PYTHON, SRC, proc_usage, write_toml

from bpleader.fence import kill_guards
from bpleader.localetcd import ELECTION_TIMEOUT, EtcdCluster

PREFIX = "/bpl-scale"
CORES = os.cpu_count() or 1
# What counts as out of CPU: the machine busy this much of its cores, a Python process
# (one GIL) this much of one core, an agent loop this late for a 100 ms sleep.
SATURATED = 0.9
GIL_BOUND = 0.85
LOOP_LAGGING = 0.25  # half a check interval
FAILOVER_TIMEOUT = 60.0
AUTO_INPROC_ABOVE = 50  # agents


class HostError(RuntimeError):
    pass


class Host:
    """A host process driven by one-line commands, each answered by one JSON line."""

    def __init__(self, argv: list[str], log_path: Path, nice: int = 0) -> None:
        log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, "PYTHONPATH": f"{SRC}:{SRC.parent}"},
            preexec_fn=(lambda: os.nice(nice)) if nice else None)
        log.close()
        self.log_path = log_path
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise HostError(f"{self.log_path.name}: cannot send {command!r}: {exc}") from None

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise HostError(f"{self.log_path.name}: no answer within {timeout:g} s") from None
        if line is None:
            raise HostError(f"{self.log_path.name}: exited (see the log)")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        self.send(command)
        return self.read(timeout)

    def close(self, command: str | None, timeout: float) -> dict[str, Any] | None:
        """Send the closing command (None: it was sent), read its answer, wait for the
        exit (killed when there is none within ``timeout``)."""
        answer = None
        with contextlib.suppress(HostError):
            if command is not None:
                self.send(command)
            answer = self.read(timeout)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return answer


class Simulators:
    """The simulator: one host process per ``per_process`` producers.

    One process for all would be the simplest, but a Python process serving hundreds of
    simulated nodes (a thread per connection, a slot clock thread per chain) starves its
    own main thread of the GIL: measured here, one process could not even start 500
    chains within minutes, nor answer the benchmark's poll within 30 s at 200. Every
    chain is still independent, so splitting them changes nothing they simulate.
    """

    def __init__(self, pairs: int, per_process: int, work: Path) -> None:
        self.hosts: list[Host] = []
        for j, first in enumerate(range(0, pairs, per_process)):
            n = min(per_process, pairs - first)
            self.hosts.append(Host([PYTHON, "-m", "benchmarks.chaos.scale_hosts", "sim",
                                    "--first", str(first), "--pairs", str(n)],
                                   work / f"sim{j}.log"))
        self.urls: dict[str, str] = {}
        for host in self.hosts:
            self.urls.update(host.read(60 + 0.2 * per_process)["nodes"])

    def pids(self) -> dict[str, int]:
        return {f"sim{j}": h.pid for j, h in enumerate(self.hosts)}

    def ask_all(self, command: str, timeout: float) -> list[dict[str, Any]]:
        for host in self.hosts:
            host.send(command)
        return [host.read(timeout) for host in self.hosts]

    def producing(self, timeout: float = 30.0) -> set[str]:
        """The simulated nodes up and unpaused now."""
        return {n for r in self.ask_all("producing", timeout) for n in r["producing"]}

    def ledger(self, timeout: float = 30.0) -> dict[str, int]:
        total: Counter[str] = Counter()
        for r in self.ask_all("ledger", timeout):
            total.update(r)
        return dict(total)

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(HostError):
                host.send("quit")
        for host in self.hosts:
            host.close(None, 5)


# ----------------------------------------------------------------------- measurements


def etcd_counter(endpoints: list[str], name: str) -> float:
    total = 0.0
    for url in endpoints:
        with contextlib.suppress(httpx.HTTPError):
            for line in httpx.get(f"{url}/metrics", timeout=3).text.splitlines():
                if line.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def guard_pids(urls: set[str]) -> list[int]:
    """Guard processes fencing these nodeos URLs (per-process mode)."""
    wanted = {u.encode() for u in urls}
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (pid_dir / "cmdline").read_bytes().split(b"\0")
                if b"bpleader.guard" in cmd and wanted & set(cmd):
                    pids.append(int(pid_dir.name))
    return pids


@dataclass
class Sample:
    """Counters at one instant, to be subtracted from a later sample."""

    at: float
    requests: float
    messages: float
    cpu: dict[str, float]  # CPU seconds per process label
    busy: int
    total: int


@dataclass
class Rig:
    """What one size runs: etcd, the simulator host, the agents."""

    etcd: EtcdCluster
    sim: Simulators
    urls: dict[str, str]
    agent_pids: dict[str, int] = field(default_factory=dict)  # label -> pid

    def pids(self) -> dict[str, list[int]]:
        """Process labels -> pids: etcd members, the simulator, each agent process."""
        out = {f"etcd:{m.name}": [m.proc.pid] for m in self.etcd.members if m.proc}
        out.update({label: [pid] for label, pid in self.sim.pids().items()})
        out["driver"] = [os.getpid()]  # this process: polling the simulator and etcd
        for label, pid in self.agent_pids.items():
            out[label] = [pid]
        return out

    def sample(self, guards: bool = False) -> Sample:
        pids = self.pids()
        if guards:
            pids["guards"] = guard_pids(set(self.urls.values()))
        busy, total = machine_jiffies()
        return Sample(time.monotonic(),
                      etcd_counter(self.etcd.endpoints, "grpc_server_handled_total"),
                      etcd_counter(self.etcd.endpoints, "grpc_server_msg_received_total"),
                      {label: proc_usage(p)[0] for label, p in pids.items()}, busy, total)

    def rss_mib(self) -> dict[str, float]:
        groups: dict[str, list[int]] = {"etcd": [], "sim": [], "agents": []}
        for label, pids in self.pids().items():
            if label != "driver":
                groups["etcd" if label.startswith("etcd") else
                       "sim" if label.startswith("sim") else "agents"] += pids
        groups["agents"] += guard_pids(set(self.urls.values()))
        return {k: round(proc_usage(v)[1], 1) for k, v in groups.items()}

    def producing(self, timeout: float = 30.0) -> Counter[int]:
        """Per producer index, how many of its nodes are up and unpaused now."""
        return Counter(int(n[1:].split("-")[0]) for n in self.sim.producing(timeout))


def cpu_between(a: Sample, b: Sample) -> dict[str, Any]:
    """CPU seconds per second per group (etcd summed over members), and the busiest
    single process of each Python group."""
    span = b.at - a.at
    busy = (b.busy - a.busy) / max(1, b.total - a.total) * CORES
    per = {k: (b.cpu.get(k, 0.0) - a.cpu.get(k, 0.0)) / span for k in b.cpu}
    etcd = {k: v for k, v in per.items() if k.startswith("etcd:")}
    sims = {k: v for k, v in per.items() if k.startswith("sim")}
    agents = {k: v for k, v in per.items()
              if not k.startswith(("etcd:", "sim")) and k != "driver"}
    return {
        "etcd": round(sum(etcd.values()), 3),
        "etcd_max_member": round(max(etcd.values(), default=0.0), 3),
        "agents": round(sum(agents.values()), 3),
        "agents_max_process": round(max(agents.values(), default=0.0), 3),
        "sim": round(sum(sims.values()), 3),
        "sim_max_process": round(max(sims.values(), default=0.0), 3),
        "driver": round(per.get("driver", 0.0), 3),
        "machine_busy_cores": round(busy, 3),
        # Whatever else ran on the machine meanwhile (another user's jobs): figures taken
        # beside a busy neighbour are not the machine's own limit.
        "others": round(max(0.0, busy - sum(per.values())), 3),
    }


COUNTERS = ("leader_changes", "etcd_errors", "nodeos_errors", "lease_losses",
            "renewal_failures", "fences_fired")


def counted_since(before: dict[str, Any] | None, after: dict[str, Any] | None) \
        -> dict[str, Any] | None:
    """The agents' stats with their counters made relative to ``before`` (the host
    counts from its start; a window wants what happened inside it)."""
    if before is None or after is None:
        return after
    return {**after, **{k: after[k] - before.get(k, 0) for k in COUNTERS if k in after}}


def limits(cpu: dict[str, Any], lag: dict[str, Any] | None, inproc: bool) -> list[str]:
    """What ran out, in words: the machine's CPU, one GIL-bound Python process, a lagging
    agent loop. Empty when nothing did."""
    found = []
    if cpu["machine_busy_cores"] >= SATURATED * CORES:
        ranked = sorted(((cpu["etcd"], "etcd (3 members)"), (cpu["agents"], "agents"),
                         (cpu["sim"], "simulator"), (cpu["others"], "other processes")),
                        reverse=True)
        found.append(f"machine CPU saturated: {cpu['machine_busy_cores']:.2f} of {CORES} cores "
                     "busy (" + ", ".join(f"{n} {v:.2f}" for v, n in ranked) + ")")
    if inproc and cpu["agents_max_process"] >= GIL_BOUND:
        found.append(f"an agent host process at {cpu['agents_max_process']:.2f} core "
                     "(one Python process: GIL-bound)")
    if cpu["sim_max_process"] >= GIL_BOUND:
        found.append(f"a simulator process at {cpu['sim_max_process']:.2f} core (GIL-bound)")
    if lag is not None and (lag.get("p99") or 0.0) >= LOOP_LAGGING:
        found.append(f"agent event loop late by {lag['p99']:.2f} s (p99) for a 100 ms sleep")
    return found


# ----------------------------------------------------------------------- agents


class ProcessAgents:
    """One ``bpleader agent`` process per agent, each with its guard (production's way)."""

    inproc = False

    def __init__(self, rig: Rig, work: Path, pairs: int) -> None:
        self.rig, self.work = rig, work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for i in range(pairs):
            for node in pair_nodes(i):
                cfg = write_toml(work / f"{node}.toml", agent_config(rig, node, account(i)))
                log = open(work / f"{node}.log", "ab")
                self.procs[node] = subprocess.Popen(
                    [PYTHON, "-m", "bpleader.cli", "agent", "--config", str(cfg)],
                    stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(SRC)})
                log.close()
                rig.agent_pids[f"agent:{node}"] = self.procs[node].pid

    def ready(self, timeout: float) -> None:
        pass

    def crash(self, nodes: list[str]) -> None:
        for node in nodes:
            self.procs[node].kill()

    def stats(self) -> dict[str, Any] | None:
        return None

    def stop(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        kill_guards(set(self.rig.urls.values()))


class InprocAgents:
    """Agents on the event loops of ``hosts`` agent host processes (scale_hosts)."""

    inproc = True

    def __init__(self, rig: Rig, work: Path, pairs: int, hosts: int, fence: str,
                 pool: int) -> None:
        self.rig = rig
        specs: list[list[dict[str, str]]] = [[] for _ in range(hosts)]
        self.where: dict[str, int] = {}
        j = 0
        for i in range(pairs):
            for node in pair_nodes(i):
                specs[j % hosts].append({"node": node, "producer": account(i),
                                         "url": rig.urls[node]})
                self.where[node] = j % hosts
                j += 1
        self.hosts: list[Host] = []
        for h, agents in enumerate(specs):
            spec = work / f"agents{h}.json"
            spec.write_text(json.dumps({
                "agents": agents, "endpoints": rig.etcd.endpoints, "prefix": PREFIX,
                "election_timeout": ELECTION_TIMEOUT, "timing": DEFAULT_TIMING,
                "fence": fence, "pool": pool}))
            host = Host([PYTHON, "-m", "benchmarks.chaos.scale_hosts", "agents",
                         "--spec", str(spec)], work / f"agents{h}.log")
            self.hosts.append(host)
            rig.agent_pids[f"agents{h}"] = host.pid

    def ready(self, timeout: float) -> None:
        for host in self.hosts:
            host.read(timeout)

    def crash(self, nodes: list[str]) -> None:
        """All hosts are told first, then answer: the crashes happen together."""
        by_host: dict[int, list[str]] = {}
        for node in nodes:
            by_host.setdefault(self.where[node], []).append(node)
        for h, victims in by_host.items():
            self.hosts[h].send("kill " + ",".join(victims))
        for h, victims in by_host.items():
            killed = self.hosts[h].read(60)["killed"]
            if len(killed) != len(victims):
                raise HostError(f"agents{h}: crashed {killed} of {victims}")

    def stats(self) -> dict[str, Any] | None:
        """Counters summed over the hosts; the worst host's loop lag."""
        total: dict[str, Any] = {"roles": Counter(), "loop_lag": {}}
        for host in self.hosts:
            s = host.ask("stats", 60)
            total["roles"].update(s.pop("roles"))
            lag = s.pop("loop_lag")
            for k, v in lag.items():
                if v is not None:
                    total["loop_lag"][k] = max(v, total["loop_lag"].get(k, 0.0))
            s.pop("died")
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        total["roles"] = dict(total["roles"])
        return total

    def stop(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(HostError):
                host.send("stop 30")
        for host in self.hosts:
            host.close(None, 45)
        kill_guards(set(self.rig.urls.values()))


def agent_config(rig: Rig, node: str, producer: str) -> dict[str, dict[str, Any]]:
    return {
        "node": {"name": node, "producer": producer},
        "etcd": {"endpoints": rig.etcd.endpoints, "prefix": PREFIX,
                 "election_timeout": ELECTION_TIMEOUT},
        "nodeos": {"url": rig.urls[node], "timeout": 0.5, "max_head_lag": 3.0},
        "timing": dict(DEFAULT_TIMING),
        "metrics": {"listen": "127.0.0.1:0"},
    }


# ----------------------------------------------------------------------- one size


@dataclass
class Options:
    mode: str
    measure: float
    kills: int
    agent_procs: int
    fence: str
    pool: int
    sim_pairs: int


def mode_for(opts: Options, agents: int) -> str:
    if opts.mode != "auto":
        return opts.mode
    return "inproc" if agents > AUTO_INPROC_ABOVE else "process"


def run_size(pairs: int, opts: Options, work: Path) -> dict[str, Any]:
    """One size, start to teardown; never raises for a size the machine cannot hold: the
    row then says where it stopped and what limited it."""
    agents = 2 * pairs
    mode = mode_for(opts, agents)
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"mode": mode, "agents": agents, "producers": pairs,
                           "timing": DEFAULT_TIMING, "stopped": None}
    if mode == "inproc":
        # Two from 400 agents: one loop was GIL-bound there (0.93 core, 167 of 200
        # producers started in 120 s; 192 with two).
        hosts = opts.agent_procs or (2 if agents >= 400 else 1)
        row.update(agent_processes=hosts, fence=f"{opts.fence} (in-process)",
                   guard_processes=False, etcd_call_pool=opts.pool or "per store")
    else:
        row.update(agent_processes=agents, fence="thread + guard process",
                   guard_processes=True)
    etcd = EtcdCluster(work / "etcd", size=3)
    etcd.start()
    sim: Simulators | None = None
    runner: ProcessAgents | InprocAgents | None = None
    try:
        sim = Simulators(pairs, opts.sim_pairs, work)
        rig = Rig(etcd, sim, sim.urls)
        s0 = rig.sample()
        t_start = time.monotonic()
        if mode == "inproc":
            runner = InprocAgents(rig, work, pairs, row["agent_processes"], opts.fence,
                                  opts.pool)
        else:
            runner = ProcessAgents(rig, work, pairs)
        startup_limit = 60 + (0.15 if mode == "inproc" else 3.0) * agents
        runner.ready(startup_limit)
        one = 0
        while True:
            counts = rig.producing()
            one = sum(1 for i in range(pairs) if counts[i] == 1)
            if one == pairs:
                break
            if time.monotonic() - t_start > startup_limit:
                break
            time.sleep(0.5)
        startup = time.monotonic() - t_start
        s1 = rig.sample(guards=not runner.inproc)
        row["startup_cpu"] = cpu_between(s0, s1)
        if one < pairs:
            # Still measured: etcd's load and the CPU at this producer count are what the
            # run is for, even when the machine cannot keep every producer producing.
            row.update(startup_s=None, producing_at_timeout=one)
            row.update(measure_at_rest(rig, runner, pairs, opts.measure))
            row["stopped"] = (f"startup: {one} of {pairs} producers had one producing node "
                              f"after {startup:.0f} s; "
                              + ("; ".join(row["limits"]) or "no CPU limit seen"))
        else:
            row["startup_s"] = round(startup, 1)
            time.sleep(5)
            row.update(measure_at_rest(rig, runner, pairs, opts.measure))
            row.update(failovers(rig, runner, pairs, opts.kills))
            if row["failed_over"] < row["kills"]:
                row["stopped"] = (f"failover: {row['kills'] - row['failed_over']} of "
                                  f"{row['kills']} not done within {FAILOVER_TIMEOUT:.0f} s; "
                                  + ("; ".join(row["limits"]) or "no CPU limit seen"))
        time.sleep(3)
        ledger = sim.ledger()  # the invariant holds or not whatever the load
        row["double_produced_slots"] = ledger["double_produced_slots"]
        row["double_produced_heights"] = ledger["double_produced_heights"]
        return row
    except HostError as exc:
        row["stopped"] = f"host failed: {exc}"
        return row
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                row["rss_mib_at_end"] = rig.rss_mib()
            runner.stop()
        if sim is not None:
            sim.close()
        etcd.stop()


def measure_at_rest(rig: Rig, runner: ProcessAgents | InprocAgents, pairs: int,
                    measure: float) -> dict[str, Any]:
    """etcd's load, every process's CPU and the agents' health with nothing failing."""
    before = runner.stats()  # also starts the loop lag window
    a = rig.sample(guards=not runner.inproc)
    off = 0  # samples of a producer with no or two producing nodes
    end = time.monotonic() + measure
    while time.monotonic() < end:
        counts = rig.producing()
        off += sum(1 for i in range(pairs) if counts[i] != 1)
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    b = rig.sample(guards=not runner.inproc)
    stats = counted_since(before, runner.stats())
    span = b.at - a.at
    rps, msgs = (b.requests - a.requests) / span, (b.messages - a.messages) / span
    agents = 2 * pairs
    cpu = cpu_between(a, b)
    return {
        "etcd_rps": round(rps, 1), "etcd_rps_per_agent": round(rps / agents, 2),
        "etcd_msgs": round(msgs, 1), "etcd_msgs_per_agent": round(msgs / agents, 2),
        "cpu": cpu, "rss_mib": rig.rss_mib(),
        "agent_stats_at_rest": stats,
        "producer_samples_not_one_producing": off,
        "limits": limits(cpu, stats and stats["loop_lag"], runner.inproc),
    }


def failovers(rig: Rig, runner: ProcessAgents | InprocAgents, pairs: int,
              kills: int) -> dict[str, Any]:
    """Crash the leader agent of ``kills`` producers (spread over all) at once; time each
    until the other node of the pair produces and the old one does not."""
    before = runner.stats()
    producing = rig.sim.producing()
    # Only producers with one producing node now (one without has nothing to fail over).
    ready = [i for i in range(pairs) if sum(n in producing for n in pair_nodes(i)) == 1]
    victims = ready[::max(1, len(ready) // kills)][:kills]
    old = {i: next(n for n in pair_nodes(i) if n in producing) for i in victims}
    new = {i: next(n for n in pair_nodes(i) if n != old[i]) for i in victims}
    t_kill = time.monotonic()
    runner.crash(list(old.values()))
    done: dict[int, float] = {}
    while len(done) < len(victims) and time.monotonic() - t_kill < FAILOVER_TIMEOUT:
        now = rig.sim.producing()
        for i in victims:
            if i not in done and new[i] in now and old[i] not in now:
                done[i] = time.monotonic() - t_kill
        time.sleep(0.05)
    times = sorted(done.values())
    return {
        "kills": len(victims), "failed_over": len(times),
        "failover": {"median": round(statistics.median(times), 2) if times else None,
                     "max": round(times[-1], 2) if times else None},
        "agent_stats_during_failover": counted_since(before, runner.stats()),
    }


# ----------------------------------------------------------------------- main


def summary_line(row: dict[str, Any]) -> str:
    """One line per size for the terminal (the JSON has everything)."""
    if "cpu" not in row:
        return f"{row['agents']:>5} agents ({row['mode']}): STOPPED {row['stopped']}"
    cpu = row["cpu"]
    fo = row.get("failover", {"median": None, "max": None})
    return (f"{row['agents']:>5} agents {row['producers']:>4} producers ({row['mode']}): "
            f"startup {row['startup_s']} s, etcd {row['etcd_rps']} req/s "
            f"({row['etcd_rps_per_agent']}/agent), {row['etcd_msgs']} msg/s, "
            f"CPU etcd {cpu['etcd']} agents {cpu['agents']} sim {cpu['sim']} "
            f"others {cpu['others']} machine {cpu['machine_busy_cores']}/{CORES}, "
            f"failover {fo['median']} / {fo['max']} s ({row.get('failed_over', 0)}/"
            f"{row.get('kills', 0)}), double "
            f"{row.get('double_produced_slots')}" + (f"; STOPPED {row['stopped']}"
                                                  if row["stopped"] else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="", help="numbers of producers (two agents each)")
    p.add_argument("--sizes", default="", help="numbers of agents (pairs x 2); the older "
                   "spelling of --pairs (default: --pairs 5,25)")
    p.add_argument("--mode", choices=("auto", "process", "inproc"), default="auto",
                   help=f"agent processes: one per agent, or in-process hosts (auto: "
                   f"in-process above {AUTO_INPROC_ABOVE} agents)")
    p.add_argument("--agent-procs", type=int, default=0,
                   help="in-process: number of agent host processes (0: 1, 2 from 400 "
                   "agents)")
    p.add_argument("--fence", choices=("shared", "thread"), default="shared",
                   help="in-process: one fence thread for all agents of a host, or "
                   "bpleader.fence.ThreadFence per agent")
    p.add_argument("--pool", type=int, default=64,
                   help="in-process: threads for etcd calls shared by a host's stores "
                   "(0: each store its own 4-thread pool, as in production)")
    p.add_argument("--sim-pairs", type=int, default=50,
                   help="producers per simulator process")
    p.add_argument("--measure", type=float, default=30.0, help="seconds at rest measured")
    p.add_argument("--kills", type=int, default=10, help="leader agents crashed at once")
    p.add_argument("--keep-going", action="store_true",
                   help="try larger sizes after one stopped")
    p.add_argument("--out", type=Path, default=Path("benchmarks/chaos/results"))
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    if args.pairs:
        sizes = [int(s) for s in args.pairs.split(",") if s]
    elif args.sizes:
        sizes = [int(s) // 2 for s in args.sizes.split(",") if s]
    else:
        sizes = [5, 25]
    opts = Options(args.mode, args.measure, args.kills, args.agent_procs, args.fence, args.pool,
                   args.sim_pairs)
    rows: list[dict[str, Any]] = []
    command = " ".join(["python -m benchmarks.chaos.scale", *(argv or sys.argv[1:])])
    tmp = Path(tempfile.mkdtemp(prefix="bpl-scale-"))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for pairs in sizes:
            row = {"command": command, "cores": CORES,
                   **run_size(pairs, opts, tmp / str(pairs))}
            rows.append(row)
            print(summary_line(row), flush=True)
            write(args.out / "scale.json", rows)
            if row["stopped"] and not args.keep_going:
                print(f"larger sizes skipped: {row['stopped']}", flush=True)
                break
    finally:
        if args.keep_logs:
            print(f"logs in {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    """After every size: a run cut short keeps the sizes it finished (one row per size,
    as before; each row also names its command line and the machine's cores)."""
    path.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
