"""``bpleader demo``: a whole producer setup on this machine, and failovers to watch.

Three real etcd members on loopback, the nodeos simulator with one node per agent (a
Savanna chain unless ``--legacy``: each node has its own BLS finalizer key, and the agents
move the producer's active key to the leader), and one real ``bpleader agent`` process per
node, all children of this process and cleaned up on exit or Ctrl-C. The view shows each
node's role, sync, head, paused state, finalizer key and the chain's ledger, with every
measured failover; faults are injected by keys, or played in order by ``--script``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import select
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bpleader.antelope import new_private_key, public_key_of
from bpleader.localetcd import ELECTION_TIMEOUT, EtcdCluster
from bpleader.sim import SimCluster
from bpleader.store import EtcdSettings, EtcdStore, Keys, Snapshot, StoreError

PRODUCER = "demobp"
TIMING = {"lease_ttl": 2, "keepalive_interval": 0.3, "fence_guard": 0.9,
          "takeover_delay": 0.5, "check_interval": 0.25, "continuity_timeout": 3.0,
          "doppelganger_quiet": 10.0}
KEYS = "k kill leader's agent  c crash leader's host  f freeze leader 3xTTL  " \
       "d desync leader's nodeos  s switchover  q cut/restore etcd quorum  " \
       "r restart stopped agents  x quit"


@dataclass
class Demo:
    root: Path
    nodes: list[str]
    etcd: EtcdCluster
    sim: SimCluster
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    failovers: list[tuple[str, float]] = field(default_factory=list)
    frozen: dict[str, float] = field(default_factory=dict)
    quorum_cut: bool = False
    finkey: str = ""  # the K1 private key of the producer's finkey permission (Savanna)
    started: float = field(default_factory=time.monotonic)

    # ------------------------------------------------------------ processes

    def config_path(self, node: str) -> Path:
        return self.root / f"{node}.toml"

    def write_config(self, node: str) -> None:
        eps = ", ".join(f'"{e}"' for e in self.etcd.endpoints)
        timing = "\n".join(f"{k} = {v}" for k, v in TIMING.items())
        path = self.config_path(node)
        path.write_text(
            f'[node]\nname = "{node}"\nproducer = "{PRODUCER}"\n\n'
            f"[etcd]\nendpoints = [{eps}]\nelection_timeout = {ELECTION_TIMEOUT}\n\n"
            f'[nodeos]\nurl = "{self.sim.node(node).url}"\ntimeout = 0.3\n\n'
            f"[timing]\n{timing}\n\n{self._finalizer_section(node)}"
            f'[metrics]\nlisten = "127.0.0.1:0"\n')
        path.chmod(0o600)

    def _finalizer_section(self, node: str) -> str:
        if not self.sim.savanna:
            return ""
        key_file = self.root / f"{node}.finkey"
        key_file.write_text(self.finkey + "\n")
        key_file.chmod(0o600)
        return (f'[finalizer]\nkey = "{self.sim.finalizer_keys()[node]}"\n'
                f'permission = "{PRODUCER}@finkey"\nsigning_key_file = "{key_file}"\n\n')

    def start_agent(self, node: str) -> None:
        log = open(self.root / f"{node}.log", "ab")
        self.agents[node] = subprocess.Popen(
            [sys.executable, "-m", "bpleader.cli", "agent", "--config",
             str(self.config_path(node))], stdout=log, stderr=log)
        log.close()
        self.event(f"agent {node} started")

    def stop(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ----------------------------------------------------------- observation

    def snapshot(self) -> Snapshot | None:
        store = EtcdStore(EtcdSettings(tuple(self.etcd.endpoints), 0.5), Keys("/bpleader",
                                                                               PRODUCER))
        try:
            return asyncio.run(store.snapshot())
        except StoreError:
            return None
        finally:
            store.close()

    def producing(self) -> list[str]:
        return [n for n in self.nodes if self.sim.node(n).producing]

    def leader(self) -> str | None:
        p = self.producing()
        return p[0] if len(p) == 1 else None

    def event(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:7.1f}s  {text}")

    # ---------------------------------------------------------------- faults

    def active_key_node(self) -> str | None:
        return self.sim.ledger_summary().get("active_finalizer_node")

    def _timed_failover(self, what: str, old: str | None, timeout: float = 40.0) -> None:
        """Time from the fault to a new producer, and on Savanna to its own finalizer key
        active (production failover is complete only then)."""
        t0 = time.monotonic()
        self.event(what)
        new: str | None = None
        while time.monotonic() - t0 < timeout:
            self.thaw_due()
            if new is None:
                new = self.leader()
                if new is not None and new == old:
                    new = None
                if new is not None:
                    self.event(f"{new} producing {time.monotonic() - t0:.2f}s after: {what}")
            if new is not None and (not self.sim.savanna or self.active_key_node() == new):
                took = time.monotonic() - t0
                self.failovers.append((what, took))
                if self.sim.savanna:
                    self.event(f"{new}'s finalizer key active {took:.2f}s after: {what}")
                return
            time.sleep(0.05)
        self.event(f"no failover completed within {timeout:.0f}s after: {what}")

    def kill_leader(self, wait: bool) -> None:
        old = self.leader()
        if old is None or self.agents[old].poll() is not None:
            self.event("no leader agent to kill")
            return
        self.agents[old].kill()
        self.agents[old].wait()
        if wait:
            self._timed_failover(f"SIGKILL agent {old}", old)
        else:
            self.event(f"SIGKILL agent {old}")

    def crash_leader_host(self, wait: bool) -> None:
        """The leader's host dies: agent and nodeos at once; nodeos comes back 5 s later,
        paused (pause-on-startup), as systemd would start it again."""
        old = self.leader()
        if old is None or self.agents[old].poll() is not None:
            self.event("no leader to crash")
            return
        self.agents[old].kill()
        self.agents[old].wait()
        self.sim.node(old).restart(5.0)
        if wait:
            self._timed_failover(f"host of {old} crashed (agent and nodeos)", old)
        else:
            self.event(f"host of {old} crashed (agent and nodeos)")

    def freeze_leader(self, wait: bool) -> None:
        old = self.leader()
        if old is None:
            return
        self.agents[old].send_signal(signal.SIGSTOP)
        self.frozen[old] = time.monotonic() + 3 * TIMING["lease_ttl"]
        if wait:
            self._timed_failover(f"SIGSTOP agent {old} for 3xTTL", old)
        else:
            self.event(f"SIGSTOP agent {old} for 3xTTL")

    def thaw_due(self) -> None:
        for node, at in list(self.frozen.items()):
            if time.monotonic() >= at:
                self.agents[node].send_signal(signal.SIGCONT)
                del self.frozen[node]
                self.event(f"SIGCONT agent {node}")

    def desync_leader(self, wait: bool) -> None:
        old = self.leader()
        if old is None:
            return
        self.sim.node(old).set_fault("desync")
        if wait:
            self._timed_failover(f"nodeos of {old} out of sync", old)
            self.sim.node(old).clear_faults()
            self.event(f"nodeos of {old} back in sync")
        else:
            self.event(f"nodeos of {old} out of sync (press d again to heal)")

    def heal_desync(self) -> bool:
        healed = False
        for n in self.nodes:
            if self.sim.node(n).faults:
                self.sim.node(n).clear_faults()
                self.event(f"nodeos of {n} healed")
                healed = True
        return healed

    def switchover(self, wait: bool) -> None:
        old = self.leader()
        if old is None:
            return
        cmd = [sys.executable, "-m", "bpleader.cli", "switchover", "--config",
               str(self.config_path(old))]
        if wait:
            t0 = time.monotonic()
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            text = (res.stdout or res.stderr).strip()
            self.event(text)
            if res.returncode == 0:
                self._wait_own_key(t0 + 40.0)
                self.failovers.append(("switchover", time.monotonic() - t0))
        else:
            self.event(f"switchover requested from {old}")
            threading.Thread(target=self._switchover_in_background, args=(cmd,),
                             daemon=True).start()

    def _wait_own_key(self, deadline: float) -> None:
        """The command returns once the new leader produces; on Savanna the switchover
        is complete when its own finalizer key is active too."""
        while self.sim.savanna and time.monotonic() < deadline:
            new = self.leader()
            if new is not None and self.active_key_node() == new:
                return
            time.sleep(0.05)

    def _switchover_in_background(self, cmd: list[str]) -> None:
        """The live view shows how it went, a refusal with its reason."""
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        self.event((res.stdout or res.stderr).strip() or f"switchover exited {res.returncode}")
        if res.returncode == 0:
            self.failovers.append(("switchover", time.monotonic() - t0))

    def toggle_quorum(self) -> None:
        cut = self.etcd.members[:2]
        if not self.quorum_cut:
            for m in cut:
                self.etcd.kill(m)
            self.quorum_cut = True
            self.event("etcd quorum cut: 2 of 3 members killed")
        else:
            for m in cut:
                self.etcd.start_member(m)
            self.quorum_cut = False
            self.event("etcd quorum restored")

    def restart_stopped(self) -> None:
        for node, proc in self.agents.items():
            if proc.poll() is not None:
                self.start_agent(node)

    # ------------------------------------------------------------------ view

    def view(self) -> str:
        snap = self.snapshot()
        ledger = self.sim.ledger_summary()
        lines = [f"bpleader demo: producer {PRODUCER}, {len(self.nodes)} nodes, 3 etcd members"
                 f"{' (QUORUM CUT)' if self.quorum_cut else ''}", ""]
        lines.append(f"{'NODE':<8} {'AGENT':<8} {'ROLE':<12} {'IN SYNC':<8} {'HEAD':>8} "
                     f"{'PAUSED':<7} {'BLOCKS':>7}  {'FINALIZER KEY':<24}")
        active = ledger.get("active_finalizer_node")
        blocks = ledger.get("blocks_by_node", {})
        for n in self.nodes:
            proc = self.agents.get(n)
            state = "frozen" if n in self.frozen else (
                "running" if proc is not None and proc.poll() is None else "stopped")
            rec = snap.records.get(n) if snap else None
            sim_node = self.sim.node(n)
            status = sim_node.status()
            paused = "implicit" if status.get("implicitly_paused") else \
                str(sim_node.paused).lower()
            key = status.get("finalizer_key") or "-"
            key = f"{key[:16]}…{' ACTIVE' if n == active else ''}" if key != "-" else key
            lines.append(
                f"{n:<8} {state:<8} {(rec.role if rec else '-'):<12} "
                f"{(str(rec.in_sync).lower() if rec else '-'):<8} "
                f"{(rec.head_block_num if rec else 0):>8} "
                f"{paused:<7} {blocks.get(n, 0):>7}  {key:<24}")
        leader = snap.leader.node if snap and snap.leader else "none (etcd unreachable)" \
            if snap is None else "none"
        chain = "Savanna" if self.sim.savanna else "legacy"
        lines += ["", f"etcd leader key: {leader}    chain: {chain}, LIB "
                      f"#{ledger.get('last_irreversible_block_num') or '-'}",
                  f"ledger: our slots {ledger['our_slots']}, missed {ledger['missed_slots']}, "
                  f"DOUBLE PRODUCED SLOTS {ledger['double_produced_slots']}, "
                  f"double heights {ledger['double_produced_heights']}, vote equivocations "
                  f"{ledger['vote_equivocations']}"]
        if self.failovers:
            lines.append("failovers: " + "; ".join(f"{what} {took:.2f}s"
                                                    for what, took in self.failovers[-4:]))
        lines += ["", "events:", *self.events[-10:]]
        return "\n".join(lines)

    def summary(self) -> str:
        ledger = self.sim.ledger_summary()
        lines = ["", "== summary",
                 f"our slots: {ledger['our_slots']}  missed: {ledger['missed_slots']}  "
                 f"double-produced slots: {ledger['double_produced_slots']}  "
                 f"double-produced heights: {ledger['double_produced_heights']}  "
                 f"vote equivocations: {ledger['vote_equivocations']}",
                 "blocks per node: " + ", ".join(
                     f"{n}={c}" for n, c in sorted(ledger.get("blocks_by_node", {}).items()))]
        until = "new producer, own finalizer key active" if self.sim.savanna else \
            "new producer"
        for what, took in self.failovers:
            lines.append(f"failover {took:6.2f}s  {what}  (fault to {until})")
        return "\n".join(lines)


@contextlib.contextmanager
def _cluster(nodes: list[str], workdir: Path | None, savanna: bool) -> Iterator[Demo]:
    root = workdir or Path(tempfile.mkdtemp(prefix="bpleader-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    etcd = EtcdCluster(root / "etcd", size=3)
    etcd.start()
    try:
        # Another producer fills half of each round, as on a real chain: our head keeps
        # moving while none of our nodes produces, so a standby can be in sync.
        finkey = new_private_key() if savanna else ""
        extra = {"finalizer_permission": "finkey",
                 "finalizer_permission_key": public_key_of(finkey)} if savanna else {}
        with SimCluster(PRODUCER, nodes, block_interval=0.5, pause_on_startup=True,
                        other_producers=["otherbp"], slots_per_producer=4, savanna=savanna,
                        **extra) as sim:  # type: ignore[arg-type]
            demo = Demo(root, nodes, etcd, sim, finkey=finkey)
            for n in nodes:
                demo.write_config(n)
                demo.start_agent(n)
            try:
                yield demo
            finally:
                demo.stop()
    finally:
        etcd.stop()


def _wait_leader(demo: Demo, timeout: float = 30.0) -> str | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        leader = demo.leader()
        if leader:
            demo.event(f"{leader} is the leader and producing")
            return leader
        time.sleep(0.1)
    demo.event("no leader elected")
    return None


def _play_script(demo: Demo, say: Callable[[str], None]) -> None:
    steps: list[tuple[str, Callable[[], None]]] = [
        ("kill the leader's agent (SIGKILL)", lambda: demo.kill_leader(wait=True)),
        ("restart the killed agent", demo.restart_stopped),
        ("freeze the leader's agent for 3 x TTL (SIGSTOP)", lambda: demo.freeze_leader(True)),
        ("put the leader's nodeos out of sync", lambda: demo.desync_leader(wait=True)),
        ("planned switchover", lambda: demo.switchover(wait=True)),
    ]
    if _wait_leader(demo) is None:
        return
    for title, action in steps:
        time.sleep(3)
        demo.thaw_due()
        say(f"-- {title}")
        action()
        say("   " + demo.events[-1])
    time.sleep(2)
    demo.thaw_due()
    say("-- cut etcd quorum: every node must pause")
    demo.toggle_quorum()
    t0 = time.monotonic()
    while demo.producing() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    demo.event(f"producing after quorum loss: {demo.producing() or 'nobody'} "
               f"({time.monotonic() - t0:.2f}s)")
    say("   " + demo.events[-1])
    time.sleep(3)
    say("-- restore etcd quorum")
    demo.toggle_quorum()
    _wait_leader(demo, 60)
    say("   " + demo.events[-1])
    time.sleep(2)


def _interactive(demo: Demo) -> None:
    actions: dict[str, Callable[[], None]] = {
        "k": lambda: demo.kill_leader(wait=False),
        "c": lambda: demo.crash_leader_host(wait=False),
        "f": lambda: demo.freeze_leader(wait=False),
        "d": lambda: None if demo.heal_desync() else demo.desync_leader(wait=False),
        "s": lambda: demo.switchover(wait=False),
        "q": demo.toggle_quorum,
        "r": demo.restart_stopped,
    }
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        while True:
            demo.thaw_due()
            sys.stdout.write("\x1b[H\x1b[2J" + demo.view() + "\n\n" + KEYS + "\n")
            sys.stdout.flush()
            ready, _, _ = select.select([sys.stdin], [], [], 1.0)
            if ready:
                key = sys.stdin.read(1).lower()
                if key == "x":
                    return
                if key in actions:
                    actions[key]()
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bpleader demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2, choices=[2, 3], help="producer nodes")
    p.add_argument("--script", action="store_true",
                   help="play a fixed sequence of faults without a terminal, then summarise")
    p.add_argument("--workdir", type=Path, help="keep configs, logs and etcd data here")
    p.add_argument("--legacy", action="store_true",
                   help="a pre-Savanna chain: no finalizer keys, no votes")
    args = p.parse_args(argv)
    nodes = [f"bp-{c}" for c in "abc"[: args.nodes]]
    interactive = not args.script and sys.stdin.isatty() and sys.stdout.isatty()
    signal.signal(signal.SIGTERM, _interrupt)

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        with _cluster(nodes, args.workdir, not args.legacy) as demo:
            say(f"demo files (configs, agent logs): {demo.root}")
            if args.script:
                _play_script(demo, say)
            elif interactive:
                _interactive(demo)
            else:
                _wait_leader(demo)
                while True:  # no terminal: a plain view every few seconds until Ctrl-C
                    say(demo.view() + "\n")
                    time.sleep(5)
            say(demo.summary())
            return 0 if demo.sim.ledger_summary()["double_produced_slots"] == 0 else 1
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1

