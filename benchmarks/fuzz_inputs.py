"""Longer fuzzing run of every input the agent parses (hypothesis, many examples).

    PYTHONPATH=src:tests python benchmarks/fuzz_inputs.py [--examples N]

Runs the properties of tests/test_sec_fuzz.py with N examples each (default 2000) and
prints, per input class, how many bad inputs were tried and what the agent did: every
run must end with 0 unhandled exceptions and 0 resumes caused by bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzkit as fk
from bpleader.agent import Role

TICKS = 10
tried: Counter[str] = Counter()
errors: Counter[str] = Counter()
resumes: Counter[str] = Counter()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=2000)
    args = p.parse_args()
    logging.disable(logging.CRITICAL)
    cfg = settings(max_examples=args.examples, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

    @cfg
    @given(st.lists(fk.bad_info_reply(), min_size=1, max_size=TICKS))
    def info(replies: list[fk.Reply]) -> None:
        run = asyncio.run(fk.drive(TICKS, info=list(replies) * (4 * TICKS)))
        for why in set(run.nodeos.served_bad):
            tried[f"get_info/{why}"] += 1
        errors["get_info"] += run.agent.stats.nodeos_errors
        resumes["get_info"] += run.nodeos.resumes
        assert run.nodeos.resumes == 0 and Role.LEADER not in run.roles

    @cfg
    @given(st.lists(fk.bad_paused_reply(), min_size=1, max_size=TICKS))
    def paused(replies: list[fk.Reply]) -> None:
        run = asyncio.run(fk.drive(TICKS, paused=list(replies) * (8 * TICKS)))
        for why in set(run.nodeos.served_bad):
            tried[f"paused/{why}"] += 1
        errors["paused"] += run.agent.stats.nodeos_errors
        resumes["paused"] += run.nodeos.resumes
        assert run.nodeos.resumes == 0 and Role.LEADER not in run.roles

    @cfg
    @given(st.lists(fk.foreign_kv(), min_size=1, max_size=6))
    def etcd(foreign: list[fk.ForeignKV]) -> None:
        run = asyncio.run(fk.drive(TICKS, foreign=foreign))
        for why in {f.why for f in foreign}:
            tried[f"etcd/{why}"] += 1
        errors["etcd rejected"] += len(run.store.snapshots[-1].rejected)
        blocking = any(f.key.startswith(fk.KEYS.election)
                       and f.create_revision < fk.OUR_REVISION for f in foreign) \
            or any(f.why == "maintenance" for f in foreign)
        if blocking:
            resumes["etcd (lower foreign key or maintenance)"] += run.nodeos.resumes
            assert run.nodeos.resumes == 0

    failed = 0
    for name, prop in (("get_info", info), ("paused", paused), ("etcd", etcd)):
        t0 = time.monotonic()
        try:
            prop()
            status = "ok"
        except Exception as exc:  # a falsified property: report it and go on
            failed += 1
            status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"{name:<9} {args.examples} examples in {time.monotonic() - t0:.1f} s: {status}")
    print("\nbad inputs tried (examples containing the class):")
    for key, n in sorted(tried.items()):
        print(f"  {key:<34} {n}")
    print("\ncounted errors:", dict(errors))
    print("resumes caused by bad input:", dict(resumes) or 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
