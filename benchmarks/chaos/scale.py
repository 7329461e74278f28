"""Scale run: many producers, two agents each, against one 3-member etcd cluster.

Loopback only (no namespaces): the point is etcd's load and failover time as the number
of agents grows, not the network. Agents use DESIGN.md's default timing (lease_ttl 5 s,
keepalive 1 s, check 0.5 s), as an operator running many producers would. For each size:
start every agent, wait until each producer has one producing node, count etcd's gRPC
requests for ``--measure`` seconds, then SIGKILL the leader agent of ``--kills``
producers at once and time each failover (the guard process fences the old nodeos).

    python -m benchmarks.chaos.scale --sizes 10,50 --out benchmarks/chaos/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from benchmarks.chaos.world import DEFAULT_TIMING, PYTHON, SRC, write_toml

from bpleader.fence import kill_guards
from bpleader.localetcd import ELECTION_TIMEOUT

if TYPE_CHECKING:
    from bpleader.sim import SimCluster


def _account(i: int) -> str:
    """An EOSIO account name for producer ``i`` (digits 1-5 only): prod + base-5 letters."""
    digits = ""
    while True:
        digits = "abcde"[i % 5] + digits
        i //= 5
        if i == 0:
            return "prod" + digits


def etcd_requests(endpoints: list[str]) -> float:
    total = 0.0
    for url in endpoints:
        with contextlib.suppress(httpx.HTTPError):
            for line in httpx.get(f"{url}/metrics", timeout=3).text.splitlines():
                if line.startswith("grpc_server_handled_total{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def producing(sim: SimCluster) -> list[str]:
    return [n for n in sim.node_names if sim.node(n).producing]


def run_size(agents: int, measure: float, kills: int, work: Path) -> dict[str, Any]:
    # This checkout's simulator, not whichever bpleader the interpreter has installed.
    sys.path.insert(0, str(SRC))
    from bpleader.localetcd import EtcdCluster
    from bpleader.sim import SimCluster

    pairs = agents // 2
    work.mkdir(parents=True, exist_ok=True)
    etcd = EtcdCluster(work / f"etcd-{agents}", size=3)
    etcd.start()
    sims = [SimCluster(_account(i), [f"p{i}-a", f"p{i}-b"], other_producers=["otherbp"],
                       slots_per_producer=4, pause_on_startup=True) for i in range(pairs)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: set[str] = set()
    try:
        for sim in sims:
            sim.start()
        for i, sim in enumerate(sims):
            for node in sim.node_names:
                url = sim.node(node).url
                urls.add(url)
                cfg = write_toml(work / f"{node}.toml", {
                    "node": {"name": node, "producer": _account(i)},
                    "etcd": {"endpoints": etcd.endpoints, "prefix": "/bpl-scale",
                             "election_timeout": ELECTION_TIMEOUT},
                    "nodeos": {"url": url, "timeout": 0.5, "max_head_lag": 3.0},
                    "timing": dict(DEFAULT_TIMING),
                    "metrics": {"listen": "127.0.0.1:0"},
                })
                log = open(work / f"{node}.log", "ab")
                procs[node] = subprocess.Popen(
                    [PYTHON, "-m", "bpleader.cli", "agent", "--config", str(cfg)],
                    stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(SRC)})
                log.close()
        t_start = time.monotonic()
        deadline = t_start + 60 + 3 * agents
        while any(len(producing(s)) != 1 for s in sims):
            if time.monotonic() > deadline:
                raise RuntimeError("not every producer got one producing node")
            time.sleep(0.5)
        startup = time.monotonic() - t_start
        time.sleep(5)
        r0, t0 = etcd_requests(etcd.endpoints), time.monotonic()
        time.sleep(measure)
        rps = (etcd_requests(etcd.endpoints) - r0) / (time.monotonic() - t0)
        victims = sims[:kills]
        old = {s.engine.producer: producing(s)[0] for s in victims}
        t_kill = time.monotonic()
        for s in victims:
            procs[old[s.engine.producer]].kill()
        failover: dict[str, float] = {}
        while len(failover) < len(victims) and time.monotonic() - t_kill < 60:
            for s in victims:
                now = producing(s)
                if s.engine.producer not in failover and now and \
                        old[s.engine.producer] not in now:
                    failover[s.engine.producer] = time.monotonic() - t_kill
            time.sleep(0.05)
        time.sleep(3)
        doubles = sum(s.ledger_summary()["double_produced_slots"] for s in sims)
        times = sorted(failover.values())
        return {
            "agents": 2 * pairs, "producers": pairs, "timing": DEFAULT_TIMING,
            "startup_s": round(startup, 1),
            "etcd_rps": round(rps, 1), "etcd_rps_per_agent": round(rps / (2 * pairs), 2),
            "kills": len(victims), "failed_over": len(times),
            "failover": {"median": round(statistics.median(times), 2) if times else None,
                         "max": round(times[-1], 2) if times else None},
            "double_produced_slots": doubles,
        }
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        kill_guards(urls)
        for sim in sims:
            with contextlib.suppress(Exception):
                sim.stop()
        etcd.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,50", help="numbers of agents (pairs)")
    p.add_argument("--measure", type=float, default=30.0)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/chaos/results"))
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bpl-scale-"))
    try:
        for size in (int(s) for s in args.sizes.split(",") if s):
            row = run_size(size, args.measure, min(args.kills, size // 2), tmp / str(size))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
