"""How fast and how punctual the nodeos simulator is.

Two figures matter to the tests and the demo that rely on it:

* throughput of the chain logic alone (slots per second, no sleeping), which bounds how
  short a block interval could ever be;
* punctuality in real time under load like the agents': for each block interval, a
  cluster of N nodes (one producing) while every node is polled with get_info and
  paused at R requests per second, measuring how late each slot ran after its boundary
  (mean, p99, max), whether any slot was skipped, and the latency of the polled calls.
  The pollers run in other processes, as the agents do.

The smallest interval whose p99 lateness stays within a tenth of a slot "keeps up".

Run: ``.venv/bin/python benchmarks/sim_throughput.py [--nodes 4] [--rate 10] [--seconds 4]``
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import httpx

from bpleader.sim import SimCluster
from bpleader.sim.chain import Schedule
from bpleader.sim.engine import Engine
from bpleader.sim.model import ChainConfig
from bpleader.sim.nodeos_api import Identity
from bpleader.sim.system import SystemContract

INTERVALS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


@dataclass
class Run:
    interval: float
    slots: int
    expected: int
    late_mean_ms: float
    late_p99_ms: float
    late_max_ms: float
    late_ticks: int
    requests: int
    errors: int
    req_p50_ms: float
    req_p99_ms: float

    @property
    def keeps_up(self) -> bool:
        return self.late_p99_ms <= 100 * self.interval and self.slots == self.expected


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else max(values or [0])


def engine_throughput(nodes: int, slots: int, savanna: bool = True) -> float:
    """Slots per second of the chain logic alone: every node signs (worst case), and on
    Savanna the active finalizer and the rest of the network vote on every block."""
    clock_t = [1_800_000_000.0]
    names = tuple(f"n{i}" for i in range(nodes))
    config = ChainConfig("mybp", names, Schedule.round_robin(("mybp", "other"), 12),
                         interval_ms=500, savanna=savanna,
                         pause_on_startup={n: False for n in names})
    contract = SystemContract.for_chain(config) if savanna else None
    engine = Engine(config, Identity("ab" * 32), contract, lambda: clock_t[0])
    started = time.perf_counter()
    clock_t[0] += slots * 0.5
    engine.tick()
    return slots / (time.perf_counter() - started)


def poll(url: str, rate: float, start_at: float, seconds: float) -> tuple[list[float], int]:
    """One agent's polling, in its own process: get_info and paused alternately.

    Runs from ``start_at`` for ``seconds`` at ``rate`` calls per second and returns the
    latencies (ms) and the number of failed calls.
    """
    paths = ("/v1/chain/get_info", "/v1/producer/paused")
    latencies: list[float] = []
    errors = 0
    with httpx.Client(base_url=url, timeout=2.0) as client:
        time.sleep(max(0.0, start_at - time.time()))
        n = 0
        while time.time() < start_at + seconds:
            started = time.perf_counter()
            try:
                client.post(paths[n % 2], content=b"").raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
            except httpx.HTTPError:
                errors += 1
            n += 1
            time.sleep(max(0.0, start_at + n / rate - time.time()))
    return latencies, errors


def realtime(interval: float, nodes: int, rate: float, seconds: float,
             pool: ProcessPoolExecutor) -> Run:
    names = [f"bp-{i}" for i in range(nodes)]
    with SimCluster("mybp", names, block_interval=interval,
                    pause_on_startup={n: n != names[0] for n in names}) as sim:
        start_at = time.time() + 0.5
        jobs = [pool.submit(poll, sim.node(n).url, rate, start_at, seconds) for n in names]
        results = [j.result() for j in jobs]
        sim.wait_slots(1)  # every slot of the window has run
        window = range(math.ceil(start_at / interval), math.floor((start_at + seconds) /
                                                                  interval) + 1)
        records = [r for r in sim.slot_records(0, 100_000) if r["slot"] in window]
    lateness = [r["lateness_ms"] for r in records]
    latencies = [ms for lat, _ in results for ms in lat]
    return Run(interval, len(records), len(window), statistics.fmean(lateness), p99(lateness),
               max(lateness), sum(1 for x in lateness if x > 100 * interval), len(latencies),
               sum(e for _, e in results), statistics.median(latencies), p99(latencies))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rate", type=float, default=10.0, help="calls per second per node")
    ap.add_argument("--seconds", type=float, default=4.0, help="per block interval")
    ap.add_argument("--slots", type=int, default=200_000,
                    help="slots of the chain-logic throughput run")
    args = ap.parse_args()
    # The throughput run double-produces in every slot on purpose: keep its warnings quiet.
    logging.getLogger("bpleader.sim").setLevel(logging.ERROR)

    for savanna in (True, False):
        tps = engine_throughput(args.nodes, args.slots, savanna)
        print(f"chain logic alone ({'Savanna' if savanna else 'legacy'}): {tps:,.0f} slots/s "
              f"({args.nodes} nodes all signing, no I/O)")
    print(f"\nreal time: {args.nodes} nodes, 1 producing, each polled at {args.rate:g} "
          f"calls/s (get_info, paused), {args.seconds:g} s per interval")
    print(f"{'interval':>8} {'slots':>6} {'expect':>6} {'late mean':>9} {'p99':>7} "
          f"{'max':>7} {'late':>5} {'calls':>6} {'errs':>4} {'call p50':>8} {'p99':>7}  ok")
    best = None
    with ProcessPoolExecutor(args.nodes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for interval in INTERVALS:
            r = realtime(interval, args.nodes, args.rate, args.seconds, pool)
            print(f"{r.interval:>7g}s {r.slots:>6} {r.expected:>6} {r.late_mean_ms:>7.2f}ms "
                  f"{r.late_p99_ms:>5.2f}ms {r.late_max_ms:>5.1f}ms {r.late_ticks:>5} "
                  f"{r.requests:>6} {r.errors:>4} {r.req_p50_ms:>6.2f}ms "
                  f"{r.req_p99_ms:>5.2f}ms  {'yes' if r.keeps_up else 'NO'}")
            if r.keeps_up:
                best = r
    if best is not None:
        print(f"\nsmallest interval that keeps up: {best.interval:g} s "
              f"= {1 / best.interval:g} slots/s in real time")


if __name__ == "__main__":
    main()
