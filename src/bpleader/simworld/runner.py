"""Explore seeds in parallel, report violations with their traces, and replay one seed."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import TextIO

from bpleader.simworld.faults import FaultScheduler
from bpleader.simworld.scenario import Scenario
from bpleader.simworld.summary import RunParams, Summary, SummaryError, code_digest
from bpleader.simworld.variants import AGENTS, SCENARIOS
from bpleader.simworld.world import Result, World


def simulate(scenario: Scenario) -> Result:
    """Run one scenario to its end (or shortly after its first safety violation)."""
    world = World(scenario, AGENTS[scenario.agent])
    return world.run(FaultScheduler.install)


@dataclass(frozen=True)
class Job:
    seed: int
    duration: float
    agent: str
    keep_trace: int | None
    kill_fence: bool = True
    savanna: bool = True
    # Run in the fault mix of this weakened agent's scenario (the real agent is checked
    # in the very world where a weakened one fails).
    faults_of: str = ""


def run_job(job: Job) -> Result:
    overrides = dict(SCENARIOS.get(job.agent, {}))
    if job.faults_of and "faults" in SCENARIOS.get(job.faults_of, {}):
        overrides["faults"] = SCENARIOS[job.faults_of]["faults"]
    scenario = Scenario.explore(job.seed, job.duration, agent=job.agent,
                                keep_trace=job.keep_trace, kill_fence=job.kill_fence,
                                savanna=job.savanna, **overrides)
    return simulate(scenario)


def explore(seeds: Iterable[int], duration: float, agent: str = "real", jobs: int = 1,
            keep_trace: int | None = 400, deadline: float = math.inf,
            kill_fence: bool = True, savanna: bool = True) -> Iterator[Result]:
    """Results in the order of the seeds, ``jobs`` seeds at a time; no seed is started
    after ``deadline`` (time.monotonic()), the ones running are finished."""
    work = (Job(seed, duration, agent, keep_trace, kill_fence, savanna) for seed in seeds)
    return run_jobs(work, jobs, deadline)


def run_jobs(work: Iterable[Job], jobs: int = 1,
             deadline: float = math.inf) -> Iterator[Result]:
    """:func:`explore` for any mix of seeds and agents."""
    if jobs <= 1:
        for job in work:
            if time.monotonic() >= deadline:
                return
            yield run_job(job)
        return
    # Submitted a few at a time: Pool.imap would drain the whole seed range at once,
    # and the deadline could not stop it.
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        running: deque[AsyncResult[Result]] = deque()
        for job in work:
            if time.monotonic() >= deadline:
                break
            running.append(pool.apply_async(run_job, (job,)))
            while len(running) >= 2 * jobs:
                yield running.popleft().get()
        while running:
            yield running.popleft().get()


@dataclass
class Totals:
    seeds: int = 0
    node_hours: float = 0.0
    sim_hours: float = 0.0
    violations: Counter[str] | None = None
    failing: list[int] | None = None

    def add(self, result: Result) -> None:
        self.seeds += 1
        self.node_hours += result.node_hours
        self.sim_hours += result.sim_seconds / 3600.0
        if self.violations is None:
            self.violations, self.failing = Counter(), []
        for v in result.violations:
            self.violations[v.kind] += 1
        if result.violations and self.failing is not None:
            self.failing.append(result.seed)


def print_result(result: Result, out: TextIO, full_trace: bool) -> None:
    for v in result.violations:
        out.write(f"\n=== VIOLATION seed={result.seed} t={v.time:.3f}s {v.kind}\n"
                  f"{v.text}\nscenario: {result.scenario}\n")
        if not full_trace:
            out.write("--- trace leading to it (virtual seconds, node, event):\n")
            out.write(v.trace + "\n")
    if full_trace:
        out.write(result.trace + "\n")


def print_totals(totals: Totals, wall: float, out: TextIO) -> None:
    kinds = ", ".join(f"{k}={n}" for k, n in sorted((totals.violations or {}).items()))
    out.write(f"\nseeds: {totals.seeds}\nsimulated hours: {totals.sim_hours:.2f}\n"
              f"simulated node-hours: {totals.node_hours:.2f}\nwall time: {wall:.1f} s\n"
              f"node-hours per wall second: {totals.node_hours / max(wall, 1e-9):.3f}\n"
              f"violations: {sum((totals.violations or {}).values())}"
              f"{' (' + kinds + ')' if kinds else ''}\n")
    if totals.failing:
        out.write(f"failing seeds: {' '.join(map(str, sorted(totals.failing)))}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bpleader.simworld",
                                description="Deterministic simulation of bpleader agents.")
    p.add_argument("--seeds", type=int, default=20, help="number of seeds to explore")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--hours", type=float, default=10 / 60,
                   help="simulated hours per seed (default 10 minutes)")
    p.add_argument("--agent", choices=sorted(AGENTS), default="real",
                   help="the real agent, or one with a safety layer removed")
    p.add_argument("--no-kill-fence", action="store_true",
                   help="model a deployment without nodeos.kill_command")
    p.add_argument("--legacy", action="store_true",
                   help="a pre-Savanna chain (no votes, no finalizer keys)")
    p.add_argument("--replay", type=int, metavar="SEED", help="replay one seed exactly")
    p.add_argument("--trace", action="store_true", help="print the whole trace (replay)")
    p.add_argument("--wall-limit", type=float, default=0.0,
                   help="stop starting seeds after this many wall seconds")
    p.add_argument("--summary", type=Path, metavar="FILE",
                   help="keep a running total in FILE (JSON, rewritten after each seed): "
                        "seeds already in it are skipped, so the same command resumes a "
                        "stopped run and a larger --seeds extends it; refused when FILE was "
                        "written by other code or other parameters")
    args = p.parse_args(argv)
    duration = args.hours * 3600.0
    out = sys.stdout
    started = time.monotonic()
    totals = Totals()
    if args.replay is not None:
        job = Job(args.replay, duration, args.agent, None if args.trace else 400,
                  not args.no_kill_fence, not args.legacy)
        result = run_job(job)
        out.write(f"scenario: {result.scenario}\n")
        print_result(result, out, args.trace)
        totals.add(result)
    else:
        summary = None
        if args.summary is not None:
            params = RunParams(duration, args.agent, not args.legacy, not args.no_kill_fence)
            try:
                summary = Summary.open(args.summary, params, code_digest())
            except SummaryError as e:
                sys.stderr.write(f"error: --summary: {e}\n")
                return 2
        seeds = [s for s in range(args.first_seed, args.first_seed + args.seeds)
                 if summary is None or not summary.is_done(s)]
        deadline = started + args.wall_limit if args.wall_limit else math.inf
        last = started
        for result in explore(seeds, duration, args.agent, args.jobs, deadline=deadline,
                              kill_fence=not args.no_kill_fence, savanna=not args.legacy):
            totals.add(result)
            print_result(result, out, False)
            if summary is not None:
                now = time.monotonic()
                summary.wall_seconds += now - last
                last = now
                summary.add(result)
                summary.save(args.summary)
            out.flush()
        if summary is not None:
            out.write("\n" + summary.describe() + "\n")
    print_totals(totals, time.monotonic() - started, out)
    return 1 if totals.violations else 0



