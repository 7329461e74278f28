"""How long the agent's lease goes unrenewed when etcd's raft leader fails.

Runs the agent's own :class:`bpleader.election.Session` (fast profile: lease 2 s,
renewals every 0.3 s) against a real 3-member etcd on loopback, freezes the raft leader
(SIGSTOP: its connections hang, as on a cut link) and reports the longest time between
two answered renewals after the freeze. The agent fences ``lease_ttl - fence_guard``
(1.1 s) after its last answered renewal, so a longer gap pauses production. One row per
raft timing given on the command line:

    .venv/bin/python benchmarks/raft_gap.py --trials 10 100/1000 25/250
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bpleader.clock import SystemClock
from bpleader.election import Session
from bpleader.localetcd import EtcdCluster
from bpleader.store import EtcdSettings, EtcdStore, Keys

TTL, INTERVAL, FENCE_GUARD = 2, 0.3, 0.9


async def trial(heartbeat_ms: int, election_ms: int) -> float:
    """Longest gap (seconds) between answered renewals' send times after the freeze."""
    cluster = EtcdCluster(Path(tempfile.mkdtemp(prefix="raftgap-")), 3, extra_args=[
        "--heartbeat-interval", str(heartbeat_ms), "--election-timeout", str(election_ms)])
    cluster.start()
    sends: list[float] = []
    try:
        store = EtcdStore(EtcdSettings(tuple(cluster.endpoints), INTERVAL), Keys("/gap", "p"))
        # on_renew gets the new deadline, which is the renewal's send time plus the TTL.
        session = Session(store, SystemClock(), TTL, INTERVAL,
                          on_renew=lambda deadline: sends.append(deadline - TTL))
        task = asyncio.create_task(session.run())
        await asyncio.sleep(2.0)
        leader = cluster.leader()
        assert leader.proc is not None
        leader.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        await asyncio.sleep(4.0)
        leader.proc.send_signal(signal.SIGCONT)
        task.cancel()
        before = [s for s in sends if s <= frozen]
        after = [s for s in sends if s > frozen]
        if not before or not after:
            return float("inf")
        return after[0] - before[-1]
    finally:
        cluster.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("timings", nargs="+", metavar="HEARTBEAT/ELECTION",
                    help="etcd raft timing in ms, e.g. 100/1000 (etcd's defaults)")
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    logging.getLogger("bpleader").setLevel(logging.ERROR)  # one renewal failure a trial
    room = TTL - FENCE_GUARD
    print(f"lease {TTL} s, renewals every {INTERVAL} s, fence {room:g} s after the last "
          f"answered renewal; raft leader frozen; {args.trials} trials per row")
    print("| heartbeat / election | longest gap: median | max | trials fenced |")
    print("|---|---|---|---|")
    for spec in args.timings:
        hb, el = (int(x) for x in spec.split("/"))
        gaps = [await trial(hb, el) for _ in range(args.trials)]
        fenced = sum(g > room for g in gaps)
        print(f"| {hb} / {el} ms | {statistics.median(gaps):.2f} s | {max(gaps):.2f} s "
              f"| {fenced} of {len(gaps)} |")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
