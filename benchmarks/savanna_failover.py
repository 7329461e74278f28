"""Failovers on a Savanna chain against a legacy one: time and missed slots of ours.

Real etcd (3 members), the nodeos simulator (0.5 s slots, another producer filling half
of each round, Spring's 6 s implicit-pause timeout), two real agents with the fast
profile, as ``bpleader demo`` starts them. Each trial injects one fault and measures:

* fault to a new producer (nodeos resumed), and on Savanna to that producer with its own
  finalizer key active (the failover is complete only then: until it is, the new leader
  stops at the implicit pause about 6 s after the old key's last vote);
* our producer's missed slots from the fault until then, and in the two full rounds
  after (the goal: none);
* implicit pauses of the new leader in that time.

    .venv/bin/python benchmarks/savanna_failover.py --trials 5

Prints a table per mode (median and max of the trials) and, with ``--json FILE``, the raw
trials. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bpleader.demo import Demo, _cluster

SCENARIOS: dict[str, Callable[[Demo], None]] = {
    "host crash (agent + nodeos)": lambda d: d.crash_leader_host(wait=True),
    "agent frozen 3 x TTL": lambda d: d.freeze_leader(wait=True),
    "planned switchover": lambda d: d.switchover(wait=True),
}


def _leader(demo: Demo, timeout: float = 40.0) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        leader = demo.leader()
        if leader and (not demo.sim.savanna or demo.active_key_node() == leader):
            return leader
        demo.thaw_due()
        time.sleep(0.1)
    raise RuntimeError("no leader with its own key active")


def trial(demo: Demo, name: str) -> dict[str, Any]:
    _leader(demo)
    demo.restart_stopped()
    time.sleep(2.0)
    ledger = demo.sim.ledger_summary()
    missed0, slots0 = ledger["missed_slots"], ledger["slots"]
    pauses0 = _implicit_pauses(demo)
    t0 = time.monotonic()
    SCENARIOS[name](demo)
    # Timed here, the same way for every fault: until a new leader produces (on Savanna
    # with its own key active), whatever the demo or the switchover command waited for.
    new = _leader(demo)
    took = time.monotonic() - t0
    # The slot in which it resumed had begun without it: it counts to the failover.
    demo.sim.wait_slots(2)
    settled = demo.sim.ledger_summary()
    rounds = settled["round_slots"]
    demo.sim.wait_slots(2 * rounds, timeout=60)
    demo.thaw_due()
    ledger = demo.sim.ledger_summary()
    return {"scenario": name, "savanna": demo.sim.savanna, "leader": new,
            "seconds": round(took, 2),
            "missed_slots": settled["missed_slots"] - missed0,
            "missed_after": ledger["missed_slots"] - settled["missed_slots"],
            "slots": ledger["slots"] - slots0,
            "implicit_pauses": _implicit_pauses(demo) - pauses0,
            "double_produced_slots": ledger["double_produced_slots"],
            "double_produced_heights": ledger["double_produced_heights"],
            "vote_equivocations": ledger["vote_equivocations"]}


def _implicit_pauses(demo: Demo) -> int:
    total = 0
    for n in demo.nodes:
        log = demo.root / f"{n}.log"
        if log.exists():
            total += log.read_text(errors="replace").count("event=implicit_pause ")
    return total


def report(results: list[dict[str, Any]], out: Any) -> None:
    out.write("| chain | scenario | fault to done, median (max) | missed slots of ours "
              "in the failover, median (max) | missed in the 2 rounds after | implicit "
              "pauses | double slots / heights / equivocations |\n"
              "|---|---|---|---|---|---|---|\n")
    for savanna in (True, False):
        for name in SCENARIOS:
            rows = [r for r in results if r["savanna"] == savanna and r["scenario"] == name]
            if not rows:
                continue
            secs = [r["seconds"] for r in rows]
            missed = [r["missed_slots"] for r in rows]
            bad = (max(r["double_produced_slots"] for r in rows),
                   max(r["double_produced_heights"] for r in rows),
                   max(r["vote_equivocations"] for r in rows))
            out.write(f"| {'Savanna' if savanna else 'legacy'} | {name} | "
                      f"{statistics.median(secs):.2f} s ({max(secs):.2f} s) | "
                      f"{statistics.median(missed):g} ({max(missed)}) | "
                      f"{sum(r['missed_after'] for r in rows)} | "
                      f"{sum(r['implicit_pauses'] for r in rows)} | "
                      f"{bad[0]} / {bad[1]} / {bad[2]} |\n")
    modes = len({r["savanna"] for r in results})
    out.write(f"\n{len(results) // max(1, len(SCENARIOS) * modes)} trials per row; Savanna: "
              "until the new leader produces with its own finalizer key active; legacy: "
              "until it produces. Missed slots: from the fault until then, and (summed over the "
              "trials) in the two full rounds after.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the raw trials here")
    p.add_argument("--modes", default="savanna,legacy")
    args = p.parse_args(argv)
    results: list[dict[str, Any]] = []
    for mode in args.modes.split(","):
        with _cluster(["bp-a", "bp-b"], None, mode == "savanna") as demo:
            for i in range(args.trials):
                for name in SCENARIOS:
                    r = trial(demo, name)
                    results.append(r)
                    print(f"{mode} trial {i + 1} {name}: {r}", file=sys.stderr, flush=True)
    report(results, sys.stdout)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
