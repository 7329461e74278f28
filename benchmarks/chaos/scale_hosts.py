"""The two kinds of process the scale run starts besides etcd: a simulator host and agent hosts.

Why separate processes: the run must say which process a size runs out of CPU in (etcd,
the agents, the simulator), and a process's CPU time is only readable per process. Each
host is driven by the benchmark over its stdin and answers each command with one JSON line
on its stdout (its logging goes to stderr, which the benchmark sends to a file):

* ``python -m benchmarks.chaos.scale_hosts sim --first F --pairs N``: one
  :class:`SimCluster` per producer F..F+N-1 (two simulated nodeos each, plus another
  producer filling half of every round), all in this process. Commands: ``producing``
  (the nodes unpaused and up), ``ledger`` (double productions summed over its chains),
  ``quit``.
* ``python -m benchmarks.chaos.scale_hosts agents --spec FILE``: many
  :class:`bpleader.agent.Agent` instances on one asyncio loop, each wired as
  :func:`bpleader.service.run_agent` wires one (its own configuration, :class:`EtcdStore`
  with its own lease, session, keepalive stream and watch, its own :class:`NodeosClient`,
  its own fence), without what a daemon needs and a benchmark does not (metrics HTTP
  server, notifier, systemd notifications, signal handlers). Commands: ``kill NODE,...``
  (a crash), ``stats``, ``stop`` (graceful: every agent pauses, resigns and revokes).

A *crash* cancels the agent's task (its loop and lease keepalives stop at once, with no
pause, resign or revoke) and closes its etcd connection; its fence stays armed and pauses
nodeos at ``deadline - fence_guard``, as the guard process does for a SIGKILLed agent.
No guard processes are started here: a thousand of them would cost ~14 GiB, and the
fence that survives the crash plays their part (see ``--fence``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.scale")

# Many threads per host (HTTP connections in the simulator, etcd calls in the agents):
# small stacks keep the address space modest; none of them recurses deeply.
THREAD_STACK = 512 * 1024


def account(i: int) -> str:
    """An EOSIO account name for producer ``i`` (digits 1-5 only): prod + base-5 letters."""
    digits = ""
    while True:
        digits = "abcde"[i % 5] + digits
        i //= 5
        if i == 0:
            return "prod" + digits


def pair_nodes(i: int) -> list[str]:
    return [f"p{i}-a", f"p{i}-b"]


def reply(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- simulator


def sim_main(first: int, pairs: int) -> int:
    """One simulator process hosting these producers' chains and nodes."""
    from bpleader.sim import SimCluster

    threading.stack_size(THREAD_STACK)
    sims = [SimCluster(account(i), pair_nodes(i), other_producers=["otherbp"],
                       slots_per_producer=4, pause_on_startup=True)
            for i in range(first, first + pairs)]
    try:
        for sim in sims:
            sim.start()
        reply({"nodes": {n: sim.node(n).url for sim in sims for n in sim.node_names}})
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "producing":
                reply({"producing": [n for sim in sims for n in sim.node_names
                                     if sim.node(n).producing]})
            elif cmd[0] == "ledger":
                summaries = [sim.ledger_summary() for sim in sims]
                reply({key: sum(s[key] for s in summaries)
                       for key in ("double_produced_slots", "double_produced_heights",
                                   "our_slots", "missed_slots")})
            elif cmd[0] == "quit":
                break
            else:
                reply({"error": f"unknown command {cmd[0]!r}"})
    finally:
        # No polite stop: SimCluster.stop takes a quarter of a second per chain (its
        # servers' poll interval), and an exiting process closes every socket anyway.
        sys.stdout.flush()
        os._exit(0)


# --------------------------------------------------------------------------- fences


class FenceClock:
    """Layer 3 for every agent of this process: one thread, outside the event loop.

    :class:`bpleader.fence.ThreadFence` is one thread per agent that wakes every 50 ms
    while armed (every leader is armed): 500 leaders make 10,000 wake-ups a second, each
    taking the GIL from the event loop. This keeps the same contract (pause at the armed
    time unless re-armed or disarmed first, whatever the loop is blocked on) with one
    thread that wakes at the earliest armed time (or every 50 ms, as ThreadFence, so a
    suspend is seen); the pauses run on a small pool so one slow nodeos delays no other.
    """

    def __init__(self, workers: int = 8) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._next = float("inf")
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fence-pause")
        self.fired = 0
        threading.Thread(target=self._run, name="fence-clock", daemon=True).start()

    def fence(self, pause: Callable[[], tuple[bool, str]], describe: str) -> Fence:
        return Fence(self, pause, describe)

    def arm(self, key: int, pause_at: float, fire: Callable[[], None]) -> None:
        with self._cond:
            self._armed[key] = (pause_at, fire)
            if pause_at < self._next:  # a later time needs no wake-up: it is re-planned
                self._next = pause_at
                self._cond.notify()

    def disarm(self, key: int) -> None:
        with self._cond:
            self._armed.pop(key, None)

    def _run(self) -> None:
        from bpleader.clock import boottime

        while True:
            with self._cond:
                now = boottime()
                due = [k for k, (at, _) in self._armed.items() if at <= now]
                fires = [self._armed.pop(k)[1] for k in due]
                self._next = min((at for at, _ in self._armed.values()), default=float("inf"))
                if not fires:
                    self._cond.wait(min(self._next - now, 0.05) if self._armed else None)
                    continue
            for fire in fires:
                self.fired += 1
                self._pool.submit(fire)


class Fence:
    """One agent's :class:`bpleader.agent.Fencer` on a shared :class:`FenceClock`."""

    def __init__(self, clock: FenceClock, pause: Callable[[], tuple[bool, str]],
                 describe: str) -> None:
        self._clock, self._pause, self._describe = clock, pause, describe
        self.fired = 0

    def arm(self, pause_at: float) -> None:
        self._clock.arm(id(self), pause_at, self._fire)

    def disarm(self) -> None:
        self._clock.disarm(id(self))

    def _fire(self) -> None:
        self.fired += 1
        ok, reason = self._pause()
        log.warning("%s event=fence_fired source=thread confirmed=%s reason=%r",
                    self._describe, ok, reason)


# --------------------------------------------------------------------------- agents


def shared_pool_store(pool: ThreadPoolExecutor) -> type:
    """An :class:`EtcdStore` whose calls run on ``pool``, shared by every agent here.

    Each EtcdStore starts its own 4-thread pool: 1,000 agents would keep up to 4,000
    threads for calls that take a millisecond on loopback. Only the pool is shared: each
    store keeps its own gRPC client, lease, keepalive stream and watch. (A hook wanted
    in the store: ``EtcdStore(..., pool=...)``; until then this subclass swaps the pool
    and keeps ``close()`` from shutting the shared one down.)
    """
    from bpleader.store import EtcdStore

    class SharedPoolStore(EtcdStore):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pool.shutdown(wait=False)  # started no thread yet
            self._pool = pool

        def close(self) -> None:
            self._drop_client()

    return SharedPoolStore


class Hosted:
    """One agent of this host and what it owns."""

    def __init__(self, node: str, agent: Any, store: Any, nodeos: Any, fence: Any) -> None:
        self.node, self.agent, self.store, self.nodeos, self.fence = \
            node, agent, store, nodeos, fence
        self.stop = asyncio.Event()
        self.task: asyncio.Task[bool] | None = None
        self.crashed = False


class AgentHost:
    """Many agents on this process's event loop, driven by the benchmark's commands."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.agents: dict[str, Hosted] = {}
        self.lags: list[float] = []
        self.fences = FenceClock() if spec["fence"] == "shared" else None
        self.pool = ThreadPoolExecutor(spec["pool"], thread_name_prefix="etcd") \
            if spec["pool"] > 0 else None

    def build(self, entry: dict[str, str]) -> Hosted:
        """One agent, wired as :func:`bpleader.service.run_agent` wires it."""
        from bpleader.agent import Agent
        from bpleader.clock import SystemClock, boottime
        from bpleader.config import parse_config
        from bpleader.fence import ThreadFence
        from bpleader.guard import pause_confirmed
        from bpleader.nodeos import NodeosClient
        from bpleader.service import agent_settings, etcd_timeout, make_store, sync_evaluator
        from bpleader.store import EtcdSettings, Keys

        node, url = entry["node"], entry["url"]
        cfg = parse_config({
            "node": {"name": node, "producer": entry["producer"]},
            "etcd": {"endpoints": self.spec["endpoints"], "prefix": self.spec["prefix"],
                     "election_timeout": self.spec["election_timeout"]},
            "nodeos": {"url": url, "timeout": 0.5, "max_head_lag": 3.0},
            "timing": self.spec["timing"],
            "metrics": {"listen": "127.0.0.1:0"},
        }, env={})
        if self.pool is None:
            store = make_store(cfg)
        else:
            e = cfg.etcd
            # The arguments of service.make_store, on the shared pool.
            store = shared_pool_store(self.pool)(
                EtcdSettings(tuple(e.endpoints), etcd_timeout(cfg), e.ca_cert, e.cert, e.key,
                             e.username, e.password), Keys(e.prefix, cfg.node.producer))
        timeout, guard = cfg.nodeos.timeout, cfg.timing.fence_guard

        def pause() -> tuple[bool, str]:
            return pause_confirmed(url, timeout, guard)

        fence: Any
        if self.fences is not None:
            fence = self.fences.fence(pause, f"node={node} role=fence")
        else:
            fence = ThreadFence(pause, boottime, lambda: f"node={node} role=fence")
        nodeos = NodeosClient(url, timeout)
        agent = Agent(agent_settings(cfg), SystemClock(), store, nodeos, fence,
                      sync_evaluator(cfg), None)
        return Hosted(node, agent, store, nodeos, fence)

    async def start(self) -> None:
        """Start every agent, a batch per 50 ms: a thousand lease grants and connections
        at the same instant measure a thundering herd, not the steady state."""
        batch = int(self.spec.get("batch", 50))
        for i, entry in enumerate(self.spec["agents"]):
            hosted = self.build(entry)
            self.agents[hosted.node] = hosted
            hosted.task = asyncio.create_task(hosted.agent.run(hosted.stop))
            if (i + 1) % batch == 0:
                await asyncio.sleep(0.05)

    async def crash(self, nodes: list[str]) -> list[str]:
        """Kill as SIGKILL would: no pause, no resign, no revoke; the fence stays armed."""
        gone = []
        for node in nodes:
            hosted = self.agents.get(node)
            if hosted is None or hosted.task is None or hosted.crashed:
                continue
            hosted.crashed = True
            hosted.task.cancel()
            gone.append(node)
        for node in gone:
            hosted = self.agents[node]
            assert hosted.task is not None
            # Cancelled again until it is done: Python 3.11's wait_for (around every etcd
            # call) loses a cancellation that arrives as its call completes (CPython
            # gh-86296), and a lost one left a "crashed" leader running on (seen at 100
            # pairs on a loaded machine). A SIGKILL cannot be lost; this must not be either.
            for _ in range(100):
                if hosted.task.done():
                    break
                hosted.task.cancel()
                await asyncio.wait({hosted.task}, timeout=0.05)
            hosted.store.close()  # the TCP connection of a dead process closes too
            await hosted.nodeos.aclose()
        return [n for n in gone if (t := self.agents[n].task) is not None and t.done()]

    async def stop(self, budget: float) -> dict[str, Any]:
        """Graceful stop of every live agent (pause, confirm, resign, revoke), bounded."""
        live = [h for h in self.agents.values() if not h.crashed and h.task is not None]
        for h in live:
            h.stop.set()
        tasks = [h.task for h in live if h.task is not None]
        done, pending = await asyncio.wait(tasks, timeout=budget) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        unclean = sum(1 for t in done if t.cancelled() or t.exception() is not None
                      or not t.result())
        for h in live:
            h.store.close()
            await h.nodeos.aclose()
        return {"stopped": len(done), "timed_out": len(pending), "unclean": unclean}

    def stats(self) -> dict[str, Any]:
        """Roles, counters summed over live agents, and the event loop's lag since the
        last call (a loop that lags by a check interval is a CPU-bound agent process)."""
        live = [h for h in self.agents.values() if not h.crashed]
        lags, self.lags = sorted(self.lags), []
        roles = Counter(h.agent.role.value for h in live)
        # Counters of crashed agents too: the benchmark subtracts two calls' sums.
        s = [h.agent.stats for h in self.agents.values()]
        sess = [h.agent.session.stats for h in self.agents.values()]
        died = [h.node for h in live if h.task is not None and h.task.done()]
        return {
            "agents": len(live), "roles": dict(roles), "died": died[:10], "dead": len(died),
            "leader_changes": sum(x.leader_changes for x in s),
            "etcd_errors": sum(x.etcd_errors for x in s),
            "nodeos_errors": sum(x.nodeos_errors for x in s),
            "lease_losses": sum(x.losses for x in sess),
            "renewal_failures": sum(x.renewal_failures for x in sess),
            "fences_fired": sum(getattr(h.fence, "fired", 0) for h in self.agents.values()),
            "loop_lag": {"median": round(statistics.median(lags), 4) if lags else None,
                         "p99": round(lags[int(len(lags) * 0.99)], 4) if lags else None,
                         "max": round(lags[-1], 4) if lags else None},
        }

    async def watch_lag(self) -> None:
        """How late a 100 ms sleep wakes up: the event loop's backlog."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.1)
            self.lags.append(loop.time() - t - 0.1)


async def agents_async(spec: dict[str, Any]) -> int:
    host = AgentHost(spec)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "stop")

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    lag = asyncio.create_task(host.watch_lag())
    # Answered at once, the agents started meanwhile: on an overloaded machine starting
    # them takes long, and the benchmark's own bound on startup is what should say so.
    reply({"starting": len(spec["agents"])})
    starter = asyncio.create_task(host.start())
    while True:
        cmd = (await lines.get()).split()
        if not cmd:
            continue
        if cmd[0] == "kill":
            reply({"killed": await host.crash(cmd[1].split(",") if len(cmd) > 1 else [])})
        elif cmd[0] == "stats":
            reply(host.stats())
        elif cmd[0] == "stop":
            starter.cancel()
            result = await host.stop(float(cmd[1]) if len(cmd) > 1 else 30.0)
            lag.cancel()
            reply(result)
            return 0
        else:
            reply({"error": f"unknown command {cmd[0]!r}"})


def agents_main(spec_path: Path, log_level: str) -> int:
    from bpleader.service import setup_logging

    setup_logging(log_level)
    threading.stack_size(THREAD_STACK)
    spec = json.loads(spec_path.read_text())
    return asyncio.run(agents_async(spec))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos.scale_hosts",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("sim", help="the simulator host")
    s.add_argument("--first", type=int, default=0)
    s.add_argument("--pairs", type=int, required=True)
    a = sub.add_parser("agents", help="an agent host")
    a.add_argument("--spec", type=Path, required=True)
    a.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.kind == "sim":
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return sim_main(args.first, args.pairs)
    return agents_main(args.spec, args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())
