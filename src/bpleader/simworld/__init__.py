"""Deterministic simulation of bpleader agents on virtual time (issue 7).

The real :class:`bpleader.agent.Agent` runs unchanged against models of etcd, nodeos, the
chain, host clocks and the guard process, on an asyncio loop whose clock is virtual; a
seed fixes every fault and every latency, so a failing seed replays exactly::

    python -m bpleader.simworld --seeds 200 --jobs 2
    python -m bpleader.simworld --replay 17 --trace
"""

from bpleader.simworld.runner import explore, simulate
from bpleader.simworld.scenario import DEFAULT_TIMING, FAST_TIMING, Faults, Scenario, Timing
from bpleader.simworld.world import Result, Violation, World

__all__ = ["DEFAULT_TIMING", "FAST_TIMING", "Faults", "Result", "Scenario", "Timing",
           "Violation", "World", "explore", "simulate"]
