"""What one simulated run is made of: timing, cluster shape, world limits, fault mix.

Everything is derived from the seed (:meth:`Scenario.explore`), so a seed alone replays a
run; the fields are plain values so a scenario crosses process boundaries (the runner's
worker pool) unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from bpleader.agent import AgentSettings
from bpleader.sim.chain import Schedule
from bpleader.sim.finality import DEFAULT_VOTE_TIMEOUT

PRODUCER = "mybp"
PERMISSION = "finkey"  # linked to eosio::actfinkey; the agents sign with its key
SLOT = 0.5


@dataclass(frozen=True)
class Rounds:
    """Rounds of ``ours`` slots for our producer, then ``others`` for the rest."""

    ours: int = 2
    others: int = 1

    def schedule(self) -> Schedule:
        return Schedule(((PRODUCER, self.ours), ("other", self.others)))


@dataclass(frozen=True)
class Timing:
    """The agent's timing settings (config.py's names and rules) and nodeos's limits."""

    lease_ttl: int = 5
    keepalive_interval: float = 1.0
    fence_guard: float = 1.5
    takeover_delay: float = 1.0
    check_interval: float = 0.5
    nodeos_timeout: float = 0.5
    max_head_lag: float = 3.0
    continuity_timeout: float = 5.0
    doppelganger_quiet: float = 60.0
    max_lib_lag: int = 10
    max_lib_age: float = 4.5

    @property
    def etcd_timeout(self) -> float:
        """As :func:`bpleader.service.etcd_timeout`."""
        return max(0.2, min(1.0, self.keepalive_interval))

    def settings(self, node: str, finality: str = "auto") -> AgentSettings:
        return AgentSettings(
            node=node, producer=PRODUCER, lease_ttl=self.lease_ttl,
            keepalive_interval=self.keepalive_interval, fence_guard=self.fence_guard,
            takeover_delay=self.takeover_delay, check_interval=self.check_interval,
            nodeos_timeout=self.nodeos_timeout, continuity_timeout=self.continuity_timeout,
            doppelganger_quiet=self.doppelganger_quiet, finality=finality)

    @classmethod
    def random(cls, rng: random.Random) -> Timing:
        """Any timing that config.py accepts, within realistic ranges."""
        nodeos_timeout = rng.choice((0.3, 0.5))
        ttl = rng.choice((2, 3, 5, 8))
        guard = round(rng.uniform(nodeos_timeout + 0.1, ttl / 2 - 0.05), 2)
        interval = round(rng.uniform(0.1, (ttl - guard) / 3), 2)
        takeover = round(rng.uniform(0.5, 2.0), 2)
        check = round(rng.uniform(0.1, min(takeover, 1.0)), 2)
        return cls(ttl, interval, guard, takeover, check, nodeos_timeout,
                   continuity_timeout=rng.choice((3.0, 5.0, 10.0)),
                   doppelganger_quiet=rng.choice((10.0, 30.0, 60.0)))

    def short(self) -> str:
        return (f"ttl={self.lease_ttl} ka={self.keepalive_interval:g} "
                f"guard={self.fence_guard:g} takeover={self.takeover_delay:g} "
                f"check={self.check_interval:g} nodeos_timeout={self.nodeos_timeout:g}")


DEFAULT_TIMING = Timing()
FAST_TIMING = Timing(lease_ttl=2, keepalive_interval=0.3, fence_guard=0.9, takeover_delay=0.5,
                     check_interval=0.25, nodeos_timeout=0.3)

# Fault kinds and how often each is picked (see faults.py for what each does).
DEFAULT_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("agent_crash", 1.0),
    ("agent_stop", 0.5),
    ("agent_freeze", 1.5),
    ("store_partition", 1.5),
    ("store_loss", 1.0),
    ("store_slow", 1.0),
    ("store_leader_change", 0.7),
    ("store_watch_hang", 0.6),
    ("nodeos_restart", 0.8),
    ("nodeos_hang", 0.8),
    ("nodeos_slow_api", 0.6),
    ("nodeos_slow_p2p", 0.6),
    ("clock_rate", 0.3),
    ("switchover", 0.6),
    ("maintenance", 0.2),
    ("nodeos_desync", 1.0),
    ("p2p_isolation", 0.8),
    ("nodeos_api_hang", 0.6),
    ("nodeos_implicit_pause", 0.3),
)


@dataclass(frozen=True)
class Faults:
    """The fault mix: storms of faults separated by calm periods (for liveness)."""

    weights: tuple[tuple[str, float], ...] = DEFAULT_WEIGHTS
    mean_gap: float = 3.0  # mean seconds between two faults of a storm
    storm: tuple[float, float] = (10.0, 60.0)  # storm length bounds
    calm: float = 8.0  # calm seconds after the liveness check
    leader_bias: float = 0.6  # share of node faults aimed at the current leader
    max_freeze: float = 20.0
    max_down: float = 15.0
    buggify: float = 1.0  # scales the targeted faults at the agent's I/O points
    # True: a slow request may be applied by etcd after its client gave up on it (a
    # proposal stuck in raft); False: only answers are late or lost.
    late_requests: bool = False


@dataclass(frozen=True)
class Scenario:
    seed: int = 0
    duration: float = 600.0
    nodes: int = 3
    timing: Timing = DEFAULT_TIMING
    schedule: Rounds = field(default_factory=Rounds)
    # Savanna (Spring): votes, finality, the implicit pause; False: a legacy chain.
    savanna: bool = True
    finalizer: bool = True  # agents have a [finalizer] section (each node its own key)
    shared_key: bool = False  # a broken deployment: one BLS key on every node
    finality: str = "auto"  # the agents' nodeos.finality
    vote_timeout: float = DEFAULT_VOTE_TIMEOUT  # production-pause-vote-timeout-ms / 1000
    pause_on_startup: bool = True
    # nodeos.kill_command configured (recommended): the guard stops a nodeos that will
    # not confirm a pause. False models a deployment without it.
    kill_fence: bool = True
    # The guard tries to confirm its pause for max(4 x nodeos timeout, 1 s) before the
    # kill, as it did before seed 6889, instead of bpleader.guard.kill_after (a test).
    slow_kill: bool = False
    max_drift: float = 0.001  # host clock rate error bound (0.1 %)
    max_wall_skew: float = 0.05  # wall clock error bound (NTP)
    max_block_delay: float = 0.3  # p2p propagation bound between our nodes
    faults: Faults | None = field(default_factory=Faults)
    agent: str = "real"  # a name in bpleader.simworld.variants.AGENTS
    keep_trace: int | None = 400  # None: keep the whole trace
    stop_after_violation: float = 3.0

    @classmethod
    def explore(cls, seed: int, duration: float = 600.0, **overrides: object) -> Scenario:
        """The scenario of ``seed``: cluster size, timing profile and schedule vary."""
        rng = random.Random(f"{seed}/scenario")
        timing = rng.choice((DEFAULT_TIMING, FAST_TIMING, Timing.random(rng)))
        schedule = rng.choice((Rounds(2, 1), Rounds(1, 1), Rounds(3, 1)))
        base = cls(seed=seed, duration=duration, nodes=rng.choice((2, 3, 3)), timing=timing,
                   schedule=schedule)
        return replace(base, **overrides)  # type: ignore[arg-type]

    def chain_schedule(self) -> Schedule:
        return self.schedule.schedule()

    def describe(self) -> str:
        faults = "none" if self.faults is None else f"gap={self.faults.mean_gap:g}s"
        return (f"seed={self.seed} agent={self.agent} nodes={self.nodes} "
                f"duration={self.duration:g}s {self.timing.short()} schedule="
                f"{self.schedule.ours}/{self.schedule.others} faults={faults}"
                f"{'' if self.kill_fence else ' kill_fence=off'}"
                f"{' savanna' if self.savanna else ' legacy'}"
                f"{' shared_key' if self.shared_key else ''}"
                f"{' slow_kill' if self.slow_kill else ''}"
                f"{'' if self.finalizer or not self.savanna else ' no_finalizer'}")
