"""Run the chaos benchmark: every scenario against both designs, N trials each.

    python -m benchmarks.chaos [--trials 3] [--quick] [--scenarios a,b] [--out DIR]

Needs root (network namespaces), keepalived, etcd and etcdctl. Writes ``results.json``,
``results.md`` and ``timeline-<scenario>-<design>.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from benchmarks.chaos import report
from benchmarks.chaos.net import Network, netns_usable
from benchmarks.chaos.scenarios import QUICK, SCENARIOS, Ctx, Scenario
from benchmarks.chaos.world import (
    BASELINE_MAX_AGE,
    DESIGNS,
    NODES,
    PROFILES,
    Sim,
    Testbed,
    proc_usage,
)

WARMUP = 2.0
POLL = 0.05


class Poller(threading.Thread):
    """Samples which simulated nodes are up and unpaused, every 50 ms."""

    def __init__(self, control: str) -> None:
        super().__init__(daemon=True)
        self.http = httpx.Client(base_url=control, timeout=2.0)
        self.samples: list[tuple[float, dict[str, bool]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                nodes = self.http.get("/nodes").json()["nodes"]
                self.samples.append((time.time(), {n["name"]: bool(n["producing"])
                                                   for n in nodes}))
            except httpx.HTTPError:
                pass
            self.halt.wait(POLL)
        self.http.close()


def _producing_now(sim: Sim) -> str:
    now = [n for n, p in sim.producing().items() if p]
    if len(now) != 1:
        raise RuntimeError(f"expected one producing node before the fault, got {now}")
    return now[0]


def run_trial(bed: Testbed, design_name: str, scenario: Scenario, index: int,
              settle: float, max_hold: float | None = None) -> dict[str, Any]:
    tdir = bed.workdir / f"{scenario.name}-{design_name}-{index}"
    tdir.mkdir(parents=True, exist_ok=True)
    sim = Sim(bed.net, tdir, bed.finkey, list(scenario.chain))
    design = DESIGNS[design_name](bed, sim, tdir)
    poller = Poller(sim.control)
    try:
        design.start()
        time.sleep(WARMUP)
        leader = _producing_now(sim)
        other = next(n for n in NODES if n != leader)
        ctx = Ctx(design, bed.net, sim, bed, leader, other, {})
        before = sim.ledger()
        first_slot = int(before["last_slot"] or 0) + 1
        poller.start()
        time.sleep(0.3)
        t_fault = time.time()
        scenario.fault(ctx)
        held = scenario.held(bed.lease_ttl)
        scenario.hold(ctx, min(held, max_hold or held))
        t_heal = time.time()
        if scenario.name == "switchover" and ctx.state.get("effective"):
            t_fault = ctx.state["effective"][0]  # the request in etcd, not the command
        scenario.heal(ctx)
        time.sleep(settle)
        poller.halt.set()
        poller.join()
        after = sim.ledger()
        slots = sim.slots(first_slot)
    finally:
        poller.halt.set()
        try:
            design.stop()
        finally:
            sim.close()
    return _figures(design_name, scenario, index, leader, t_fault, t_heal, before, after,
                    slots, poller.samples)


def _figures(design: str, scenario: Scenario, index: int, leader: str, t_fault: float,
             t_heal: float, before: dict[str, Any], after: dict[str, Any],
             slots: list[dict[str, Any]],
             samples: list[tuple[float, dict[str, bool]]]) -> dict[str, Any]:
    new_at = next((t for t, p in samples if t >= t_fault
                   and any(v for n, v in p.items() if n != leader)), None)
    starts = 0
    prev: dict[str, bool] | None = None
    for t, p in samples:
        if prev is not None and t_fault <= t <= t_heal:
            starts += sum(1 for n, v in p.items() if v and not prev.get(n, False))
        prev = p
    both = sum(1 for t, p in samples if sum(p.values()) >= 2)

    def delta(key: str) -> int:
        return int(after[key]) - int(before[key])

    return {
        "scenario": scenario.name, "design": design, "trial": index, "leader": leader,
        "t_fault": t_fault, "t_heal": t_heal,
        "double_produced_slots": delta("double_produced_slots"),
        "double_produced_heights": delta("double_produced_heights"),
        "missed_slots": delta("missed_slots"),
        "our_slots": delta("our_slots"),
        "time_to_new_producer": None if new_at is None else round(new_at - t_fault, 3),
        "failovers_during_fault": starts,
        "spurious_failovers": max(0, starts - scenario.expect_failover),
        "both_unpaused_seconds": round(both * POLL, 2),
        "timeline": {
            "slots": [{"slot": s["slot"], "start": s["start"], "ours": s["ours"],
                       "signers": [b["node"] for b in s["blocks"]]} for s in slots],
            "samples": [[round(t - t_fault, 3), [n for n, v in p.items() if v]]
                        for t, p in samples],
        },
    }


def steady(bed: Testbed, design_name: str, seconds: float) -> dict[str, Any]:
    """Resource use of a design at rest: CPU and RSS of its processes, etcd load."""
    tdir = bed.workdir / f"steady-{design_name}"
    tdir.mkdir(parents=True, exist_ok=True)
    sim = Sim(bed.net, tdir, bed.finkey)
    design = DESIGNS[design_name](bed, sim, tdir)
    try:
        design.start()
        time.sleep(WARMUP)
        pids = {n: design.pids(n) for n in NODES}
        cpu0 = {n: proc_usage(p)[0] for n, p in pids.items()}
        req0, msg0, t0 = bed.etcd_requests(), bed.etcd_messages(), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        req1, msg1 = bed.etcd_requests(), bed.etcd_messages()
        usage = {n: proc_usage(p) for n, p in pids.items()}
    finally:
        try:
            design.stop()
        finally:
            sim.close()
    return {
        "design": design_name, "seconds": round(elapsed, 1),
        "processes_per_host": {n: len(p) for n, p in pids.items()},
        "cpu_seconds_per_hour": {n: round((usage[n][0] - cpu0[n]) / elapsed * 3600, 1)
                                 for n in NODES},
        "rss_mib": {n: round(usage[n][1], 1) for n in NODES},
        "etcd_requests_per_second_per_agent": round((req1 - req0) / elapsed / len(NODES), 1)
        if design_name == "bpleader" else None,
        "etcd_messages_per_second_per_agent": round((msg1 - msg0) / elapsed / len(NODES), 1)
        if design_name == "bpleader" else None,
    }


def _stat(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p95": None, "max": None}
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, -(-95 * len(ordered) // 100) - 1))
    return {"median": round(statistics.median(ordered), 2), "p95": round(ordered[rank], 2),
            "max": round(ordered[-1], 2)}


def summarise(trials: list[dict[str, Any]], names: list[str],
              designs: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in names:
        sc = SCENARIOS[name]
        for design in designs:
            ts = [t for t in trials if t["scenario"] == name and t["design"] == design]
            if design not in sc.designs:
                rows.append({"scenario": name, "design": design, "applicable": False})
                continue
            if not ts:
                continue
            times = [t["time_to_new_producer"] for t in ts
                     if t["time_to_new_producer"] is not None]
            rows.append({
                "scenario": name, "title": sc.title, "design": design, "applicable": True,
                "trials": len(ts), "expect_failover": sc.expect_failover,
                "double_produced_slots": [t["double_produced_slots"] for t in ts],
                "double_produced_heights": [t["double_produced_heights"] for t in ts],
                "missed_slots": [t["missed_slots"] for t in ts],
                "time_to_new_producer": _stat(times),
                "trials_without_new_producer": len(ts) - len(times),
                "spurious_failovers": sum(t["spurious_failovers"] for t in ts),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help=f"1 trial of {', '.join(QUICK)}, short settle, short steady run")
    p.add_argument("--scenarios", default="",
                   help="comma-separated subset; 'none' for the steady run alone")
    p.add_argument("--profile", choices=sorted(PROFILES), default="fast",
                   help="the agents' timing: fast (lease 2 s) or default (lease 5 s)")
    p.add_argument("--designs", default="bpleader,keepalived")
    p.add_argument("--chain", choices=("savanna", "legacy"), default="savanna",
                   help="a Savanna chain (each agent moves its node's finalizer key; the "
                        "baseline cannot) or a pre-Savanna one")
    p.add_argument("--etcd-rtt", type=float, default=0.0, metavar="MS",
                   help="round trip added between the agents and etcd, through a user-space "
                        "proxy on each producer host (etcd across regions; 0: none)")
    p.add_argument("--steady", type=float, default=60.0,
                   help="seconds of the resource measurement at rest (0: skip)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/chaos/results"))
    p.add_argument("--keep-logs", action="store_true", help="keep the trial directories")
    args = p.parse_args(argv)
    ok, why = netns_usable()
    if not ok:
        print(f"chaos benchmark cannot run: {why}", file=sys.stderr)
        return 2
    names = [] if args.scenarios == "none" else [s for s in args.scenarios.split(",") if s] or (
        list(QUICK) if args.quick else list(SCENARIOS))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    trials_n = 1 if args.quick and args.trials == 3 else args.trials
    settle = 3.0 if args.quick else 5.0
    steady_s = min(args.steady, 10.0) if args.quick else args.steady
    designs = [d for d in args.designs.split(",") if d]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bpl-chaos-"))
    trials: list[dict[str, Any]] = []
    resources: list[dict[str, Any]] = []
    started = time.time()
    try:
        with Network(work) as net:
            bed = Testbed.create(net, work, savanna=args.chain == "savanna",
                                 etcd_delay=args.etcd_rtt / 2000.0, profile=args.profile)
            for name in names:
                sc = SCENARIOS[name]
                for design in designs:
                    if design not in sc.designs:
                        continue
                    for i in range(trials_n):
                        t = run_trial(bed, design, sc, i, settle,
                                      7.0 if args.quick else None)
                        trials.append(t)
                        print(f"{name:<14} {design:<10} #{i} double={t['double_produced_slots']}"
                              f" missed={t['missed_slots']} new_producer_s="
                              f"{t['time_to_new_producer']} spurious={t['spurious_failovers']}",
                              flush=True)
            if steady_s > 0:
                for design in designs:
                    resources.append(steady(bed, design, steady_s))
                    print(json.dumps(resources[-1]), flush=True)
    finally:
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "meta": {"started": started, "seconds": round(time.time() - started, 1),
                 "trials": trials_n, "quick": args.quick, "scenarios": names,
                 "chain": args.chain, "etcd_rtt_ms": args.etcd_rtt,
                 "profile": args.profile, "timing": PROFILES[args.profile],
                 "baseline_max_age": BASELINE_MAX_AGE,
                 "scenario_defs": {n: {k: v for k, v in asdict(SCENARIOS[n]).items()
                                       if k in ("title", "duration", "expect_failover",
                                                "designs")} for n in names}},
        "summary": summarise(trials, names, designs), "resources": resources, "trials": trials,
    }
    (args.out / "results.json").write_text(json.dumps(result, separators=(",", ":")))
    (args.out / "results.md").write_text(report.markdown(result))
    report.timelines(result, args.out)
    print(report.markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
