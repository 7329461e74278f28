"""The HA loop: one small state machine that decides when this node's nodeos may produce.

Every tick the agent observes (nodeos sync and paused state, one linearizable read of
the producer's etcd prefix), publishes its node record, then runs the handler of its
current role, which returns the next role and why. All roles and their transitions are
in :meth:`Agent._step` and the ``_as_*`` handlers below; I/O lives behind the
:class:`~bpleader.clock.Clock`, :class:`~bpleader.store.Store`, :class:`Nodeos` and
:class:`Fencer` interfaces, so the deterministic simulation runs this same code.

Roles::

    STARTING --pause--> FOLLOWER --in sync, campaign--> CANDIDATE --lowest key--> TAKING_OVER
    TAKING_OVER --delay, doppelganger, continuity, fencing check, resume--> LEADER
    LEADER --out of sync / switchover / lost key--> FOLLOWER (pause, confirm, then resign)
    any --lease about to run out while we may produce--> FOLLOWER (fence: pause now)
    TAKING_OVER --own producer seen signing--> FENCED --quiet period--> FOLLOWER
    any --maintenance key--> MAINTENANCE --key removed--> role matching etcd and nodeos
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol, TypeVar

from bpleader import __version__
from bpleader.clock import Clock
from bpleader.election import Session
from bpleader.finalizer import PROBE, KeyFailover, KeySwitcher
from bpleader.nodeos import (
    BLOCK_INTERVAL,
    ChainInfo,
    FinalizerInfo,
    NodeosApiMissing,
    NodeosError,
    NodeosUnavailable,
    SyncEvaluator,
    SyncState,
)
from bpleader.store import Candidate, NodeRecord, Snapshot, Store, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOCK_MARGIN = 0.1  # how far this host's wall clock may be from the block producers'
# How long a block takes to reach us once it is out: the doppelganger watch lasts until
# the first block stamped after the previous leader's last could have arrived.
PROPAGATION = 0.1
# The old leader polls its head this often while it waits for its last block to be out,
# from this long before the slot ends (nodeos sends a block ahead of its slot's end).
SLOT_END_POLL = 0.02
SLOT_END_EARLY = 0.1
# A planned pause is not sent closer than this before a slot boundary (see
# _clear_of_slot_start): CLOCK_MARGIN, plus the time a pause call takes to be confirmed.
PAUSE_SLACK = CLOCK_MARGIN + 0.05
# A node taking over looks again this soon, for a second, when it waits for its head to
# reach the previous leader's: that block is the last thing between it and its resume.
TAKEOVER_POLL = 0.05
# Savanna: a leader whose last record shows its LIB this far behind its head was losing
# the network's votes (cut from p2p?) and may have gone on signing blocks nobody saw.
LIB_LAG_NORMAL = 1.5
# Savanna: blocks between a head and its LIB while the network votes for the head's branch.
# Spring's assemble_block claims the newest QC of the branch when it signs, so with the
# votes on its parent in (they come within the slot) a head claims its parent and its LIB
# is two behind. A head three behind claims an older QC: a late round of votes, or a
# branch the finalizers never voted for. Such a branch loses to any later block of the
# network with the same claim, whatever its height (Spring's best branch: newest QC, then
# newest timestamp). Seed 31019: a leader's two private blocks #273-#274 (LIB #271)
# reached its successor just before the network's #273 of a later slot; the successor
# resumed on #274, moved to the network's #273 and signed #274 again. Counted in blocks,
# not seconds: slots nobody signs (ours, during a failover) stretch the time.
LIB_BLOCKS_NORMAL = 2
# A producing node's record promises a fence time this many lease TTLs ahead; its fences
# never pause later than the promise of its last record in etcd (see _fence_time).
PROMISE_TTLS = 2.0


class Role(str, Enum):
    STARTING = "starting"
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    TAKING_OVER = "taking_over"
    LEADER = "leader"
    FENCED = "fenced"
    MAINTENANCE = "maintenance"
    STOPPED = "stopped"


class Nodeos(Protocol):
    """The producer API calls the agent makes; ``budget`` bounds a call with its retries."""

    async def get_info(self, budget: float | None = None) -> ChainInfo: ...

    async def pause(self, budget: float | None = None) -> None: ...

    async def resume(self, budget: float | None = None) -> None: ...

    async def paused(self, budget: float | None = None) -> bool: ...

    async def finalizer_info(self, budget: float | None = None) -> FinalizerInfo: ...

    async def table_rows(self, table: str, budget: float | None = None) -> list[Any]: ...

    async def account(self, name: str, budget: float | None = None) -> dict[str, Any]: ...


class Fencer(Protocol):
    """Pauses nodeos at ``pause_at`` (on the agent's clock) unless re-armed or disarmed.

    It must act even when the agent's own calls are blocked: production runs it in a
    thread and in a guard process; the simulation on its virtual clock.
    """

    def arm(self, pause_at: float) -> None: ...

    def disarm(self) -> None: ...


@dataclass(frozen=True)
class AgentSettings:
    node: str
    producer: str
    lease_ttl: int
    keepalive_interval: float
    fence_guard: float
    takeover_delay: float
    check_interval: float
    nodeos_timeout: float
    continuity_timeout: float
    doppelganger_quiet: float
    # A resume that keeps reading paused=true (Spring's implicit pause) is retried this
    # often at most, so the agent reports it instead of looping on resume.
    resume_retry: float = 10.0
    shutdown_budget: float = 5.0
    # "savanna", "legacy", or "auto": Savanna once get_finalizer_info shows a policy.
    finality: str = "auto"
    finalizer_timeout: float = 30.0  # a key switch not confirmed by then is an alarm

    @property
    def resync_interval(self) -> float:
        """etcd is re-read this often without a watch event: a watch may hang unnoticed
        on a dead member. What must be fresh is checked in transactions instead."""
        return float(self.lease_ttl)

    @property
    def record_interval(self) -> float:
        """Our node record is rewritten this often when nothing in it changed but its
        head and times (and a producing node's fence promise, see PROMISE_TTLS)."""
        return self.lease_ttl / 2


@dataclass(frozen=True)
class Observation:
    now: float
    wall: float
    info: ChainInfo | None
    sync: SyncState
    paused: bool | None  # None: nodeos did not answer
    snap: Snapshot | None  # None: etcd did not answer


class _Repeats:
    """One log line per distinct error, then a reminder with a count every ``every``
    seconds: an etcd or nodeos outage must not bury the log under one line per tick.
    Numbers are ignored when comparing, so "next try in 2.0 s" repeats "... in 1.0 s"."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._key = ""
        self._since = 0.0
        self._count = 0

    def check(self, text: str, now: float) -> tuple[bool, int]:
        """Whether to log ``text`` now, and how many were held back before it."""
        key = re.sub(r"\d+(\.\d+)?", "#", text)
        if key != self._key or now - self._since >= self.every:
            held, self._count = self._count, 0
            self._key, self._since = key, now
            return True, held
        self._count += 1
        return False, 0


@dataclass(frozen=True)
class AgentEvent:
    """One event of the agent's log as data, for listeners (notifications): they get
    the same facts as the log line without parsing it."""

    event: str
    node: str
    role: Role  # the role after the event (the new one, for a transition)
    reason: str
    level: int
    previous: Role | None = None  # for transitions: the role left


@dataclass
class AgentStats:
    """Counters the metrics module exports and the tests assert on."""

    transitions: int = 0
    leader_changes: int = 0
    corrections: int = 0
    fences: Counter[str] = field(default_factory=Counter)
    doppelgangers: int = 0
    etcd_errors: int = 0
    nodeos_errors: int = 0
    resumes: int = 0
    continuity_waits: int = 0
    implicit_pauses: int = 0


class Agent:
    def __init__(self, settings: AgentSettings, clock: Clock, store: Store, nodeos: Nodeos,
                 fencer: Fencer, sync: SyncEvaluator,
                 switcher: KeySwitcher | None = None) -> None:
        self.cfg = settings
        self.clock = clock
        self.store = store
        self.nodeos = nodeos
        self.fencer = fencer
        self.sync = sync
        self.session = Session(store, clock, settings.lease_ttl, settings.keepalive_interval,
                               self._on_renew, self._context, self._wake)
        self.role = Role.STARTING
        self.stats = AgentStats()
        self.last: Observation | None = None
        self._record: NodeRecord | None = None  # this tick's record, for confirm_leader
        self._record_promise = 0.0  # the fence time it promises (Clock.now), if producing
        self._published: NodeRecord | None = None  # the last record etcd took
        self._published_at = float("-inf")
        self._published_lease = 0
        # The fence time our last record in etcd promises, while we may produce.
        self._promise: float | None = None
        # etcd is read only when it may have changed: a watch event, a write of ours,
        # or the resync timer (see AgentSettings.resync_interval).
        self._snap: Snapshot | None = None
        self._stale = True
        self._next_read = float("-inf")
        self._wakeup = asyncio.Event()
        self._tick_by: float | None = None  # run the next tick by then (Clock.now)
        # Called with every logged event; each must only queue work (it runs in the loop).
        self.listeners: list[Callable[[AgentEvent], None]] = []
        self._me: Candidate | None = None  # our election key, while we hold one
        self._armed = False  # True while our nodeos may be unpaused by our doing
        self._produced = False  # armed since our last release: hand our head over
        self._won_at = 0.0  # clock.now() when we became the lowest key
        self._won_wall = 0.0
        # The keys below ours since our campaign (the leaders before us), and when we
        # first looked after campaigning: a key made and gone before that went unseen.
        self._ahead: dict[str, Candidate] = {}
        self._first_look: float | None = None
        # At the win: the wall time after which no earlier leader signs a block, and
        # whether each one we saw handed over (confirmed pause, last block out, in etcd).
        self._quiet_from = 0.0
        self._unseen_until = 0.0  # the same for leaders whose keys we never saw
        self._handed_over = False
        self._stopped_wall = 0.0  # when our last block was out (for our handover)
        # When a block our own nodeos may have begun before it last read paused is out:
        # the doppelganger check must not take it for another node's.
        self._own_quiet = 0.0
        self._paused_before: bool | None = None
        self._continuity_reported = False
        self._quiet_until = 0.0
        self._next_resume = 0.0
        self._resigned_for_switchover = False
        # For a switchover to "any node": were we the leader when the request appeared?
        # Only that leader hands over; whoever leads next clears the request.
        self._last_switchover: str | None = None
        self._rejected: tuple[str, ...] = ()  # entries of the last snapshot we ignored
        self._switchover_from_me = False
        self._prev_leader_head = 0
        self._peer_head = 0  # highest head another live, in-sync node reports right now
        # The newest block of our producer seen while we did not lead: with the last
        # records leaders leave, what bounds the heights a vanished leader may have signed.
        self._seen_ours: tuple[int, float] = (0, 0.0)  # (height, block time)
        self._own_high: tuple[int, float] = (0, 0.0)  # our newest block while we may sign
        # While we may sign: the head we last saw (height, block time, Clock.now), and the
        # highest height nodeos may have signed unseen in a gap between two looks.
        self._looked: tuple[int, float, float] | None = None
        self._gap_high = 0
        # While we may sign: the block of ours we saw last, and the highest height a
        # branch our nodeos left since (a reorg) may have reached with blocks we never saw.
        self._own_seen: tuple[int, float] = (0, 0.0)
        self._left_high = 0
        # While we may sign: the head of our last look at nodeos (height, wall time), and
        # the highest height it may have signed between two looks (see _note_look).
        self._last_look: tuple[int, float] | None = None
        self._look_high = 0
        # A handover head etcd does not hold: one a failed resign could not write, or one
        # of ours our resume dropped (its fencing check deletes it, see _etcd_confirms).
        # The next handover, and our records while we may sign, never go below it.
        self._owed_handover = 0
        self._resume_sent = False  # a resume went out since we were last confirmed paused
        self._adopted = False  # looked for a previous incarnation's last record
        # When nodeos was last known to have stopped signing (a confirmed pause, or
        # connections refused) since our newest block: nothing signed after that.
        self._own_stopped_at: float | None = None
        self._pause_at: float | None = None  # when our fences pause nodeos (Clock.now)
        self._unconfirmed_since: float | None = None
        self._pause_error: NodeosError | None = None  # why the last pause went unconfirmed
        self._blocked_by = ""  # the unfenced node we last reported waiting for
        self._takeover_wait_why = ""  # what a takeover last said it was waiting for
        self._etcd_repeats = _Repeats()
        self._nodeos_repeats = _Repeats()
        # Savanna: the finalizer key follows the leader (None: no [finalizer] section).
        self.keys = KeyFailover(switcher, nodeos, settings.producer,
                                settings.finalizer_timeout, settings.nodeos_timeout,
                                self._emit, self.owner_of) if switcher else None
        self.refusal = ""  # why the agent refused to run (it then stops)
        self._preflight_done = False
        self._next_probe = float("-inf")
        self._resumed_at = float("-inf")
        sync.savanna = settings.finality == "savanna"

    # ----------------------------------------------------------------- main loop

    async def run(self, stop: asyncio.Event, on_tick: Callable[[], None] = lambda: None) -> bool:
        """Run until ``stop`` is set; returns False when shutdown could not confirm a pause."""
        keeper = asyncio.create_task(self.session.run())
        stopper = asyncio.create_task(stop.wait())
        self.store.watch(self._on_change)
        try:
            while not stop.is_set() and self.role != Role.STOPPED:
                started = self.clock.now()
                self._wakeup.clear()
                self._tick_by = None
                await self.tick()
                on_tick()  # systemd's watchdog: only a loop that completes ticks is alive
                wait = self.cfg.check_interval - (self.clock.now() - started)
                if self._tick_by is not None:
                    wait = min(wait, self._tick_by - self.clock.now())
                if wait > 0 and not self._wakeup.is_set():
                    # The next tick comes at the check interval, or at once when etcd
                    # changed: a successor learns of a handover within one round trip.
                    sleeper = asyncio.create_task(self.clock.sleep(wait))
                    waker = asyncio.create_task(self._wakeup.wait())
                    await asyncio.wait({sleeper, stopper, waker},
                                       return_when=asyncio.FIRST_COMPLETED)
                    sleeper.cancel()
                    waker.cancel()
        finally:
            keeper.cancel()
            stopper.cancel()
        return await self.shutdown()

    def _on_change(self) -> None:
        """The store's watch saw a key change under our prefix (not a node record)."""
        self._stale = True
        self._wakeup.set()

    def _wake(self) -> None:
        """Run the next tick now (the lease was lost: a producing node fences)."""
        self._wakeup.set()

    async def tick(self) -> None:
        obs = await self._observe()
        self.last = obs
        await self._watch_finality(obs)
        await self._publish(obs)
        await self._hand_over_if_lost(obs)
        await self._clear_own_unfenced(obs)
        role, reason = await self._step(obs)
        self._transition(role, reason)

    # ------------------------------------------------------------ state machine

    async def _step(self, o: Observation) -> tuple[Role, str]:
        """Transitions that hold in every role first, then the current role's handler."""
        if self._armed and self._me is not None and not self.session.holds(
                self._me.lease_id, o.now, self.cfg.fence_guard):
            await self._fence("lease ends within the fence guard")
            return Role.FOLLOWER, "fenced: lease about to run out"
        if self._armed and self._promise is not None and o.now >= self._promise:
            await self._fence("our record's fence time came before etcd took a new one")
            return Role.FOLLOWER, "fenced: record not renewed"
        if o.snap is not None and o.snap.maintenance is not None and self.role != Role.MAINTENANCE:
            return Role.MAINTENANCE, f"maintenance on: {o.snap.maintenance}"
        handler = {
            Role.STARTING: self._as_starting,
            Role.FOLLOWER: self._as_follower,
            Role.CANDIDATE: self._as_candidate,
            Role.TAKING_OVER: self._as_taking_over,
            Role.LEADER: self._as_leader,
            Role.FENCED: self._as_fenced,
            Role.MAINTENANCE: self._as_maintenance,
        }[self.role]
        return await handler(o)

    async def _as_starting(self, o: Observation) -> tuple[Role, str]:
        """Whatever nodeos was doing before we started, it is paused before we campaign.

        A nodeos that answers but will not confirm a pause may be producing for a previous
        incarnation of this agent: mark it unfenced (layer 11) until it confirms.
        """
        if await self._pause_confirmed("start-up", self.cfg.nodeos_timeout * 2):
            self._adopt_previous_term(o)
            if self.keys is not None:
                return await self._check_finalizer_setup(o)
            return Role.FOLLOWER, "started, nodeos paused"
        if not isinstance(self._pause_error, NodeosUnavailable) and o.snap is not None \
                and self.cfg.node not in o.snap.unfenced:
            await self._mark_unfenced(o)
        return Role.STARTING, "start-up pause not confirmed yet"

    async def _as_follower(self, o: Observation) -> tuple[Role, str]:
        await self._reconcile_paused(o)
        if self._me is not None:
            return await self._release_when_paused(o)
        if o.paused is True:
            self._disarm()  # after an abandoned lease: the pause is confirmed at last
        why_not = self._why_not_campaign(o)
        if why_not:
            return Role.FOLLOWER, why_not
        assert self.session.lease is not None
        try:
            self._me = await self.store.campaign(self.session.lease.id, self.cfg.node)
        except StoreError as exc:
            self._etcd_error(exc)
            return Role.FOLLOWER, "campaign failed"
        self._wrote()
        self._ahead, self._first_look = {}, None
        self._track_ahead(o.snap, o.wall, first=False)
        return Role.CANDIDATE, f"in sync, campaigning (revision {self._me.create_revision})"

    async def _release_when_paused(self, o: Observation) -> tuple[Role, str]:
        """Pause before release: an earlier step-down could not confirm the pause.

        If nodeos stays unreachable (hung or dead) for a whole lease TTL, keeping the key
        would block every other node forever. We stop renewing instead and let the lease
        expire. A nodeos that refuses connections is down and cannot produce; one that
        accepts and never answers (or answers errors) may still be signing blocks, and the
        doppelganger check alone would miss it whenever our producer's slots do not fall
        within the takeover delay. So before letting go we leave an ``unfenced`` mark
        without a lease: no node resumes while it exists, and we delete it ourselves once
        nodeos confirms a pause. The fences stay armed.
        """
        if o.paused is True:
            await self._release("paused now confirmed")
            return Role.FOLLOWER, "released the election key"
        if self._produced and not isinstance(self._pause_error, NodeosUnavailable) \
                and o.snap is not None and self.cfg.node not in o.snap.unfenced:
            # Our lease may run out before nodeos listens (our own etcd trouble, or the
            # fence's pause stuck behind a slow nodeos): mark now, while we can.
            await self._mark_unfenced(o)
        if self._unconfirmed_since is None:
            self._unconfirmed_since = o.now
        elif o.now - self._unconfirmed_since > self.cfg.lease_ttl:
            self._log("abandon_lease", "pause unconfirmed for a whole lease TTL; letting the "
                      "lease expire", logging.ERROR)
            self.session.abandon()
            self._me = None
            self._unconfirmed_since = None
        return Role.FOLLOWER, "waiting for a confirmed pause to release the election key"

    async def _as_candidate(self, o: Observation) -> tuple[Role, str]:
        await self._reconcile_paused(o)
        if not o.sync.in_sync:
            await self._release(f"out of sync: {o.sync.reason}")
            return Role.FOLLOWER, f"withdrew: {o.sync.reason}"
        if o.snap is None:
            return Role.CANDIDATE, "etcd unreachable"
        if self._switchover_excludes_me(o.snap):
            await self._release("switchover to another node")
            return Role.FOLLOWER, f"withdrew for switchover to {o.snap.switchover or 'any'}"
        assert self._me is not None
        if o.snap.candidate(self._me.key) is None:
            self._me = None
            return Role.FOLLOWER, "election key gone"
        if self._elected(o):
            await self._begin_takeover(o)
            self._tick_by = o.now  # look again at once: a handover needs no wait
            return Role.TAKING_OVER, "elected: lowest create revision"
        return Role.CANDIDATE, "waiting behind a lower key"

    async def _as_taking_over(self, o: Observation) -> tuple[Role, str]:
        self._arm()
        if o.snap is not None and not self._elected(o):
            return await self._step_down("lost the election key before resuming")
        if not o.sync.in_sync:
            return await self._step_down(f"out of sync: {o.sync.reason}")
        await self._reconcile_paused(o)
        if o.info is not None and self._doppelganger(o):
            return await self._doppelganger_alarm(o.info)
        blocker = self._unfenced_other(o)
        if blocker:
            return Role.TAKING_OVER, blocker
        if o.now < self._won_at + self._takeover_wait():
            self._tick_by = self._won_at + self._takeover_wait()
            return Role.TAKING_OVER, "takeover delay"
        if not self._continuity_ok(o):
            if o.now < self._won_at + self._takeover_wait() + 1.0:
                self._tick_by = o.now + TAKEOVER_POLL  # the block is due any moment
            return Role.TAKING_OVER, self._continuity_wait(o)
        fresh = await self._fresh_info()
        if fresh is None:
            return Role.TAKING_OVER, "no fresh chain state before resuming"
        if self._signed_by_another(fresh):
            return await self._doppelganger_alarm(fresh)
        if not self._after_predecessors(fresh):
            self._tick_by = self.clock.now() + TAKEOVER_POLL
            return Role.TAKING_OVER, "waiting for the previous leader's last slot to end"
        if not self._finality_flows(fresh):
            self._tick_by = self.clock.now() + TAKEOVER_POLL
            return Role.TAKING_OVER, "waiting for the LIB to follow our head"
        if await self._resume_checked("takeover"):
            return Role.LEADER, "resumed production"
        return Role.TAKING_OVER, "resume not possible yet"

    async def _as_leader(self, o: Observation) -> tuple[Role, str]:
        if o.snap is not None and not self._elected(o):
            return await self._step_down("no longer holds the lowest election key")
        if not o.sync.in_sync:
            return await self._step_down(f"out of sync: {o.sync.reason}")
        if o.snap is not None and self._switchover_excludes_me(o.snap):
            self._resigned_for_switchover = True
            await self._clear_of_slot_start()
            return await self._step_down(f"switchover to {o.snap.switchover or 'any node'}")
        if o.snap is not None and o.snap.switchover in (self.cfg.node, ""):
            await self._clear_switchover(o.snap.switchover)  # we are its new leader
        if self.keys is not None:
            await self.keys.lead(o.now)
        # Our key became active since the last resume: votes flow again, resume at once.
        key_came = self.keys is not None and self.keys.confirmed_at > self._resumed_at
        if o.paused is True and (o.now >= self._next_resume or key_came):
            # Restarted nodeos, a manual pause, or Spring's implicit pause: resume once,
            # then only every resume_retry seconds, and say so.
            self.stats.corrections += 1
            if self.stats.resumes:
                self.stats.implicit_pauses += 1
                self._log("implicit_pause", f"nodeos reads paused while leader (Spring's "
                          f"implicit pause: votes of {self._whose_key()} missing?); resuming",
                          logging.ERROR)
            else:
                self._log("leader_paused", "nodeos reads paused while leader; resuming",
                          logging.WARNING)
            await self._resume_checked("reconcile")
            self._next_resume = self.clock.now() + self.cfg.resume_retry
        return Role.LEADER, "producing"

    async def _as_fenced(self, o: Observation) -> tuple[Role, str]:
        await self._reconcile_paused(o)
        if o.now >= self._quiet_until:
            return Role.FOLLOWER, "doppelganger quiet period over"
        return Role.FENCED, "doppelganger quiet period"

    async def _as_maintenance(self, o: Observation) -> tuple[Role, str]:
        """Hands off nodeos: no reconcile, no resume, no pause (the fence stays armed)."""
        if o.snap is None or o.snap.maintenance is not None:
            return Role.MAINTENANCE, "maintenance"
        if self._me is None or o.snap.candidate(self._me.key) is None:
            self._me = None
            return Role.FOLLOWER, "maintenance over"
        if not self._elected(o):
            return Role.CANDIDATE, "maintenance over"
        if o.paused is False and self._armed:
            return Role.LEADER, "maintenance over, still producing"
        await self._begin_takeover(o)
        return Role.TAKING_OVER, "maintenance over, elected"

    # ----------------------------------------------------------------- helpers

    async def _begin_takeover(self, o: Observation) -> None:
        """Won the election, from a candidacy or from maintenance: the takeover delay
        counts from now, and a leader that vanished meanwhile is bounded (layer 10). A
        leader lost while we sat in maintenance needs that bound as much as any (seed
        5334: leaving maintenance elected skipped it, and we re-signed two heights of
        the vanished leader's private branch)."""
        self._won_at, self._won_wall = o.now, o.wall
        self._continuity_reported = False
        self._predecessors_stop(o)
        await self._bound_vanished_leader(o)

    def _track_ahead(self, snap: Snapshot | None, wall: float, first: bool = True) -> None:
        """Remember every key below ours: the leaders that may come before us."""
        me = self._me
        if snap is None or me is None:
            return
        for c in snap.candidates:
            if c.create_revision < me.create_revision:
                self._ahead[c.key] = c
        if first and self._first_look is None:
            self._first_look = wall

    def _predecessors_stop(self, o: Observation) -> None:
        """When the leaders before us stopped signing, and whether each one told us.

        A leader that resigned left, in the transaction that deleted its key, its term
        and the time its last block was out (it waited for that after its confirmed
        pause). One whose key went with its lease was paused by its fences by the lease's
        end minus the fence guard, which is before etcd dropped the key, so before now;
        its pause call may take the nodeos timeout to land, and the block begun then one
        more slot. A key made and gone before our first look is bounded the same way
        from that look.
        """
        t = self.cfg
        late = max(0.0, t.nodeos_timeout + BLOCK_INTERVAL - t.fence_guard)
        first = self._first_look if self._first_look is not None else o.wall
        self._unseen_until = first + late
        # Our own nodeos, paused by us not long ago, may still sign the block it had begun.
        bounds = [self._unseen_until, self._own_quiet]
        terms = o.snap.handover_terms if o.snap is not None else {}
        self._handed_over = bool(self._ahead)
        for c in self._ahead.values():
            term = terms.get(c.node)
            if term is not None and term[0] == c.create_revision:
                bounds.append(term[1])
            else:
                self._handed_over = False
                bounds.append(o.wall + late)
        self._quiet_from = max(bounds)

    def _why_not_campaign(self, o: Observation) -> str:
        """Empty when this node may seek the lock (layer 1: only while in sync)."""
        if not o.sync.in_sync:
            return f"not campaigning: {o.sync.reason}"
        if o.paused is not True:
            return "not campaigning: nodeos pause not confirmed"
        if o.snap is None:
            return "not campaigning: etcd unreachable"
        if self.session.lease is None or \
                self.session.remaining(o.now) <= self.cfg.fence_guard:
            return "not campaigning: no lease"
        if o.now < self._quiet_until:
            return "not campaigning: doppelganger quiet period"
        if self._switchover_excludes_me(o.snap):
            return "not campaigning: switchover in progress"
        self._resigned_for_switchover = False
        return ""

    def _switchover_excludes_me(self, snap: Snapshot) -> bool:
        target = snap.switchover
        if target is None or target == self.cfg.node:
            return False
        # "" means any node but the leader that is handing over.
        return target != "" or self._resigned_for_switchover or self._switchover_from_me

    def _elected(self, o: Observation) -> bool:
        """We hold the lowest create revision, on our live lease."""
        me = self._me
        return (me is not None and o.snap is not None and o.snap.leader is not None
                and o.snap.leader.key == me.key
                and o.snap.leader.create_revision == me.create_revision
                and self.session.holds(me.lease_id, o.now, self.cfg.fence_guard))

    def _takeover_wait(self) -> float:
        """Layers 5 and 7: seconds from the win to the first resume.

        After a handover the evidence is in etcd: each leader before us confirmed its
        pause and waited for its last block before resigning, and layer 10 waits until
        that block is in our head; only a key that went unseen still calls for a wait.
        Otherwise the previous leader's pause may have landed as late as our bound
        allows: wait one takeover delay after its fence time (layer 5), and until the
        first block stamped after its last could have reached us, so that the
        doppelganger check can see it (layer 7).
        """
        if self._handed_over:
            return max(0.0, self._unseen_until + CLOCK_MARGIN - self._won_wall)
        t = self.cfg
        blind = t.takeover_delay + t.nodeos_timeout - t.fence_guard
        threshold = self._quiet_from + CLOCK_MARGIN
        first_block = (math.floor(threshold / BLOCK_INTERVAL) + 1) * BLOCK_INTERVAL
        return max(0.0, blind, first_block + PROPAGATION - self._won_wall)

    def _after_predecessors(self, info: ChainInfo) -> bool:
        """Whether the block our nodeos would sign now comes after every slot an earlier
        leader may have signed. Spring stamps a resumed producer's block with the next
        slot after the later of now and its head's time: a head stamped at that end
        (the old leader's last block, or the next producer's) or the end passed on every
        clock will do. A predecessor sees its own last block before its slot ends; a
        successor that lacks it would sign that slot a second time."""
        return info.head_block_time >= self._quiet_from \
            or self.clock.wall() >= self._quiet_from + CLOCK_MARGIN

    def _doppelganger(self, o: Observation) -> bool:
        """Layer 7: a block by our producer stamped after every earlier leader stopped,
        while we are paused."""
        return o.info is not None and self._signed_by_another(o.info)

    def _signed_by_another(self, info: ChainInfo) -> bool:
        return (info.head_block_producer == self.cfg.producer
                and info.head_block_time > self._quiet_from + CLOCK_MARGIN)

    async def _fresh_info(self) -> ChainInfo | None:
        """The chain as nodeos sees it right now: the tick's view may be a check interval
        old, and the block that betrays a doppelganger may have arrived since."""
        try:
            return await self.nodeos.get_info(budget=self.cfg.nodeos_timeout)
        except NodeosError as exc:
            self._nodeos_error(exc)
            return None

    def _unfenced_other(self, o: Observation) -> str:
        """Why we may not resume because another node may still produce, or empty."""
        if o.snap is None:
            return self._blocked_by and f"waiting for {self._blocked_by} to confirm a pause"
        others = {n: why for n, why in o.snap.unfenced.items() if n != self.cfg.node}
        if not others:
            if self._blocked_by:
                self._log("unblocked", f"{self._blocked_by} confirmed its pause")
                self._unfenced_paused(o)
            self._blocked_by = ""
            return ""
        node = sorted(others)[0]
        reason = f"not resuming: {node} could not confirm its nodeos paused ({others[node]})"
        if node != self._blocked_by:
            self._blocked_by = node
            self._log("blocked", reason, logging.ERROR)
        return reason

    def _unfenced_paused(self, o: Observation) -> None:
        """An unfenced node confirmed its pause no later than now, and the block it had
        begun is signed still: it stops like a predecessor (seed 24377: resumed at once,
        we signed that slot too)."""
        self._quiet_from = max(self._quiet_from, o.wall + BLOCK_INTERVAL + CLOCK_MARGIN)

    async def _mark_unfenced(self, o: Observation) -> None:
        why = f"pause unconfirmed since {o.wall:.0f}: {self._pause_error}"
        try:
            await self.store.mark_unfenced(self.cfg.node, why)
        except StoreError as exc:
            self._etcd_error(exc)
            return
        finally:
            self._wrote()
        self._log("unfenced", why, logging.CRITICAL)

    async def _hand_over_if_lost(self, o: Observation) -> None:
        """Layer 10 after a lost lease: a node that may have produced and let its lease go
        without resigning (its pause was confirmed only later) still leaves its final
        head for the next leader, before it clears its unfenced mark."""
        if not self._produced or self._me is not None or self._armed \
                or o.paused is not True or o.snap is None:
            return
        head = await self._handover_head()
        try:
            await self.store.leave_handover(self.cfg.node, head)
        except StoreError as exc:
            # The count is spent: the next try must leave no less (seed 76007: a restarted
            # agent counted #131 for its previous incarnation, etcd was cut off, and the
            # next try left its nodeos's head #126, back on the network's branch after
            # signing #128 on its own; the successor re-signed #128).
            self._owed_handover = max(self._owed_handover, head)
            self._etcd_error(exc)
            return
        finally:
            self._wrote()
        self._produced, self._owed_handover = False, 0
        self._log("handover", f"left head #{head} for the next leader")

    async def _clear_own_unfenced(self, o: Observation) -> None:
        """Our mark goes once nodeos confirms paused and nothing of ours may resume it."""
        if o.snap is None or self.cfg.node not in o.snap.unfenced or o.paused is not True \
                or self._armed:
            return
        try:
            await self.store.clear_unfenced(self.cfg.node)
        except StoreError as exc:
            self._etcd_error(exc)
            return
        finally:
            self._wrote()
        self._log("unfenced_cleared", "nodeos confirms paused")

    def _continuity_ok(self, o: Observation) -> bool:
        """Layer 10: build on the newest head the previous leader published, and on no
        head older than one another live node already has: a node cut from the p2p
        network looks in sync for max_head_lag, and would sign on a stale head (a fork)."""
        head = o.info.head_block_num if o.info else 0
        above = head >= max(self._prev_leader_head, self._peer_head)
        if above and o.info is not None and self._finality_flows(o.info):
            return True
        if not self._continuity_reported and \
                o.now > self._won_at + self.cfg.takeover_delay + self.cfg.continuity_timeout:
            self._continuity_reported = True
            self.stats.continuity_waits += 1
            self._log("continuity_timeout", f"{self._continuity_wait(o)} (our head #{head});"
                      " not resuming", logging.ERROR)
        return False

    def _continuity_wait(self, o: Observation) -> str:
        """Which part of layer 10 holds the takeover, in words that stay the same while
        it does (the `waiting` line is logged once per change)."""
        head = o.info.head_block_num if o.info else 0
        if head < self._prev_leader_head:
            return f"waiting for our head to reach the previous leader's #{self._prev_leader_head}"
        if head < self._peer_head:
            return f"waiting for our head to reach another node's #{self._peer_head}"
        return "waiting for the LIB to follow our head"

    def _finality_flows(self, info: ChainInfo) -> bool:
        """Savanna: build only on a head whose branch the network is voting for (its LIB
        close behind). A branch without votes, such as an old leader's private one after
        a p2p cut, can lose to a shorter branch with a newer QC at any moment, and we
        would then sign heights it had signed (seed 21296: resumed on the old leader's
        #329, reorganised onto the network's #326 a slot later, signed #327 again)."""
        return not self.sync.savanna or info.last_irreversible_block_num <= 0 or \
            info.head_block_num - info.last_irreversible_block_num <= LIB_BLOCKS_NORMAL

    async def _resume_checked(self, why: str) -> bool:
        """Layer 6: re-check etcd in this step, with enough lease left for the resume."""
        me = self._me
        if me is None or not self._lease_covers_resume(me):
            return False
        self._arm()
        self._owe_dropped_handover()
        if not await self._etcd_confirms(me) or not self._lease_covers_resume(me):
            return False
        self._count_from_resume()
        self._resume_sent, self._own_stopped_at = True, None
        try:
            await self.nodeos.resume(budget=self.cfg.nodeos_timeout)
        except NodeosError as exc:
            self._nodeos_error(exc)
            return False
        self.stats.resumes += 1
        self._resumed_at = self.clock.now()
        self._log("resumed", why)
        if not self._lease_covers_resume(me, after=True):
            # We stalled between the check and the resume (a freeze): undo it at once.
            await self._fence("stalled while resuming")
            return False
        return True

    def _owe_dropped_handover(self) -> None:
        """The fencing check deletes our handover (a node that resumes is bounded by its
        last record, not by a head it left when it last stopped): what it said is owed to
        our records and our next handover, which the record in that check carries."""
        left = self._snap.handovers.get(self.cfg.node, 0) if self._snap is not None else 0
        self._owed_handover = max(self._owed_handover, left)
        if self._record is not None and self._record.head_block_num < self._owed_handover:
            self._record = replace(self._record, head_block_num=self._owed_handover)

    def _lease_covers_resume(self, me: Candidate, after: bool = False) -> bool:
        """Enough lease left for the resume call (before it) or for the fence (after)."""
        needed = self.cfg.fence_guard + (0.0 if after else self.cfg.nodeos_timeout)
        return self.session.holds(me.lease_id, self.clock.now(), needed)

    async def _etcd_confirms(self, me: Candidate) -> bool:
        """One transaction: our key still exists, with its revision, and is the lowest;
        in it, our last record is kept and our older handover dropped (store.py)."""
        try:
            # Our newest record goes in with the check: a node that resumes always has a
            # last record as new as its head at the resume, even if it dies or is cut
            # off before its next tick (seed 5041: killed 0.4 s after resuming).
            still_leader = await self.store.confirm_leader(me, self._record)
        except StoreError as exc:
            self._etcd_error(exc)
            return False
        finally:
            self._wrote()
        if not still_leader:
            self._log("fencing_check", "etcd no longer names us leader; not resuming")
        elif self._record is not None and self._record.fence_at is not None:
            self._promised(self._record_promise)
        return still_leader

    async def _step_down(self, reason: str) -> tuple[Role, str]:
        """Layer 4: pause, confirm, and only then delete the election key."""
        if await self._pause_confirmed(reason, self.cfg.fence_guard):
            await self._release(reason)
        return Role.FOLLOWER, f"stepped down: {reason}"

    async def _clear_of_slot_start(self) -> None:
        """Before a planned pause: keep producing until no clock can be at a slot boundary.

        Paused within CLOCK_MARGIN of a boundary, nodeos (whose clock may be that far from
        ours either way) may have begun the new slot's block, so the handover has to count
        it as signed. When that slot is ours and its block was never signed, the successor
        waits for a height the chain reaches only when another producer signs it: the rest
        of our round is lost (or, inside our round, that one slot). Once the boundary is
        CLOCK_MARGIN behind us, the slot has begun on every clock: its block is ours,
        signed, and the exact head we hand over. The pause is also kept PAUSE_SLACK clear
        of the next boundary. Safe: we hold the lock and stay fenced while we wait (at
        most 0.25 s), and the pause and the handover that follow are the same as ever.
        """
        into = self.clock.wall() % BLOCK_INTERVAL  # since the slot began, on our clock
        if into < CLOCK_MARGIN:
            await self.clock.sleep(CLOCK_MARGIN - into)
        elif BLOCK_INTERVAL - into < PAUSE_SLACK:
            await self.clock.sleep(BLOCK_INTERVAL - into + CLOCK_MARGIN)

    async def _doppelganger_alarm(self, info: ChainInfo) -> tuple[Role, str]:
        self.stats.doppelgangers += 1
        self._quiet_until = self.clock.now() + self.cfg.doppelganger_quiet
        self._log("doppelganger", f"block {info.head_block_num} signed by "
                  f"{self.cfg.producer} at {info.head_block_time:.1f}, after every earlier "
                  f"leader had stopped ({self._quiet_from:.1f}): another node produces "
                  f"with our key", logging.CRITICAL)
        await self._step_down("doppelganger detected")
        return Role.FENCED, "doppelganger detected; quiet period"

    async def _fence(self, reason: str) -> None:
        """Pause now, whatever etcd says; the key is released once the pause is confirmed."""
        self.stats.fences[reason] += 1
        self._log("fence", reason, logging.WARNING)
        if await self._pause_confirmed(reason, self.cfg.nodeos_timeout):
            await self._release(reason)

    async def _release(self, reason: str) -> None:
        """Delete our election key; only ever called with nodeos confirmed paused.

        If we may have produced, the same transaction leaves our final head for the next
        leader (layer 10): our nodes/ record dies with the lease and may be a few blocks
        old, and a successor that signs below our last block forks the chain.
        """
        self._disarm()
        self._unconfirmed_since = None
        me, self._me = self._me, None
        if me is None:
            return
        last_head = await self._handover_head() if self._produced else 0
        self._wrote()
        try:
            await self.store.resign(me, last_head, self._stopped_wall)
            self._produced, self._owed_handover = False, 0
        except StoreError as exc:
            # The key goes with the lease in the worst case; the head is left later.
            self._etcd_error(exc)
            self._owed_handover = max(self._owed_handover, last_head)
        self._log("resigned", reason)

    async def _handover_head(self) -> int:
        """The head a handover leaves: our final head, and never below one a failed write
        could not leave, or one our resume dropped from etcd. Our newest-block
        marks are spent by the first count, and a reorg may since have put our nodeos on a
        lower branch: seed 28069, a resign lost on the wire with head #303; re-elected on
        the same key, the leader resigned again with its nodeos's head #302, and its
        successor re-signed #303. Seed 7271, the same with the first resign written: the
        leader left #1356, was elected again, and its resume's fencing check dropped that
        handover; its nodeos had moved to the network's lower branch, the second resign
        left #1353, and the successor re-signed #1355 and #1356."""
        return max(await self._final_head(), self._owed_handover)

    async def _final_head(self) -> int:
        """The head to hand over once paused: every height we may have signed.

        A pause takes effect at the next slot start: a block begun before it is still
        signed. So the head is read once that slot has ended, or the successor would sign
        at the height of our last, in-flight block. If that head is not ours, a reorg may
        have taken our newest blocks off our chain (we were cut from the network and its
        branch won): count every slot since our newest block we saw, as we may have
        signed in each.
        """
        end = self._stopped_wall = await self._wait_slot_end()
        own_h, own_t = self._own_high
        stop = min(end, self._own_stopped_at) if self._own_stopped_at is not None else end
        self._own_high, self._own_stopped_at, self._resume_sent = (0, 0.0), None, False
        own_bound, self._gap_high, self._looked = self._gap_high, 0, None
        left, self._left_high, self._own_seen = self._left_high, 0, (0, 0.0)
        by_looks = max(self._look_high, self._look_count(stop)) if self._last_look else 0
        self._last_look, self._look_high = None, 0
        if own_h and end - own_t <= 2 * self.cfg.lease_ttl + 2.0:
            # A sample older than a lease TTL says nothing of the last blocks: nodeos did
            # not answer us for that long, and our unfenced mark covered the gap. Both
            # counts bound what we signed; the looks since our resume are the tighter
            # one when our head stopped moving.
            counted = own_h + math.floor(max(0.0, stop - own_t) / BLOCK_INTERVAL)
            own_bound = max(own_bound, min(counted, by_looks) if by_looks else counted)
        try:
            info = await self.nodeos.get_info(budget=self.cfg.nodeos_timeout)
        except NodeosError as exc:
            self._nodeos_error(exc)
            last = self.last.info.head_block_num if self.last and self.last.info else 0
            return max(last, own_bound, left)
        if info.head_block_producer == self.cfg.producer and info.head_block_num >= own_h \
                and self._extends(info, own_h, own_t):
            # Our last block is our head: exact, but for a branch nodeos left before it.
            return max(info.head_block_num, left)
        return max(info.head_block_num, own_bound, left)

    @staticmethod
    def _extends(info: ChainInfo, own_h: int, own_t: float) -> bool:
        """Whether the head is our newest block seen, or one block per slot after it.

        Anything else may be a reorg: our nodeos switched to the network's branch and
        signed again at heights it had signed on its own branch, in blocks we never saw
        (seed 6412: #922 and #923 lost, then #921 re-signed, read as an exact head #921).
        """
        slots = round((info.head_block_time - own_t) / BLOCK_INTERVAL)
        return not own_h or slots == info.head_block_num - own_h

    async def _wait_slot_end(self) -> float:
        """Wait until the slot now running has ended on every clock; returns that end.

        Its block, if we were signing one, is out once our head is stamped at that end
        or later: from shortly before the end we ask for it, and stop asking when the
        end has passed on every clock. A successor waits for the head we then hand over.
        """
        wall = self.clock.wall()
        # The next slot boundary after now, with CLOCK_MARGIN for our clock's error.
        end = math.ceil((wall + CLOCK_MARGIN) / BLOCK_INTERVAL) * BLOCK_INTERVAL
        await self.clock.sleep(end - SLOT_END_EARLY - wall)
        while self.clock.wall() < end + CLOCK_MARGIN:
            try:
                info = await self.nodeos.get_info(budget=self.cfg.nodeos_timeout)
                if info.head_block_time >= end:
                    break
            except NodeosError as exc:
                self._nodeos_error(exc)
            left = end + CLOCK_MARGIN - self.clock.wall()
            await self.clock.sleep(min(SLOT_END_POLL, max(0.0, left)))
        return end

    async def _pause_confirmed(self, reason: str, budget: float) -> bool:
        """Pause and read back ``paused``; True only when nodeos confirms."""
        deadline = self.clock.now() + max(budget, self.cfg.nodeos_timeout)
        while True:
            left = deadline - self.clock.now()
            try:
                await self.nodeos.pause(budget=max(left, 0.05))
                if await self.nodeos.paused(budget=max(deadline - self.clock.now(), 0.05)):
                    if self._own_high[0] and self._own_stopped_at is None:
                        # The block begun in this slot may still be signed.
                        self._own_stopped_at = self.clock.wall() + BLOCK_INTERVAL \
                            + CLOCK_MARGIN
                    self._disarm()
                    self._pause_error = None
                    self._own_quiet = self.clock.wall() + BLOCK_INTERVAL + CLOCK_MARGIN
                    return True
            except NodeosError as exc:
                self._pause_error = exc
                self._nodeos_error(exc)
            if self.clock.now() >= deadline:
                self._log("pause_unconfirmed", reason, logging.ERROR)
                return False
            await self.clock.sleep(min(0.1, max(0.0, deadline - self.clock.now())))

    async def _reconcile_paused(self, o: Observation) -> None:
        """Layer 9: a node that is not leader must read paused; correct and count it."""
        if o.paused is False:
            self.stats.corrections += 1
            self._log("correction", "nodeos unpaused while not leader; pausing",
                      logging.WARNING)
            await self._pause_confirmed("reconcile", self.cfg.nodeos_timeout)

    async def _clear_switchover(self, target: str) -> None:
        self._wrote()
        try:
            await self.store.clear_switchover(target)
        except StoreError as exc:
            self._etcd_error(exc)

    async def shutdown(self) -> bool:
        """Pause, confirm, then resign and revoke. Without confirmation, release nothing:
        the fence and the guard process act at the lease deadline instead."""
        if self.role == Role.LEADER:
            await self._clear_of_slot_start()
        if not await self._pause_confirmed("shutdown", self.cfg.shutdown_budget):
            self._log("shutdown", "pause not confirmed: leaving the lease to expire",
                      logging.ERROR)
            self._transition(Role.STOPPED, "stopped without confirmed pause")
            return False
        await self._release("shutdown")
        lease = self.session.abandon()
        if lease is not None:
            try:
                await self.store.revoke(lease.id)
            except StoreError as exc:
                self._etcd_error(exc)
        self._transition(Role.STOPPED, "stopped, nodeos paused")
        return True

    # ------------------------------------------------------ observation & record

    async def _observe(self) -> Observation:
        read = self._read_due()
        if read:
            self._stale = False  # a change from here on calls for another read
        info_r, paused_r, snap_r = await asyncio.gather(
            self.nodeos.get_info(budget=self.cfg.nodeos_timeout),
            self.nodeos.paused(budget=self.cfg.nodeos_timeout),
            self.store.snapshot() if read else self._cached(), return_exceptions=True)
        now, wall = self.clock.now(), self.clock.wall()
        info = self._ok(info_r, ChainInfo)
        paused = self._ok(paused_r, bool)
        snap = self._ok(snap_r, Snapshot)
        if read:
            if snap is None:
                self._stale = True
            else:
                self._snap, self._next_read = snap, now + self.cfg.resync_interval
        sync = self.sync.observe(wall, now, info,
                                 info_r if isinstance(info_r, NodeosError) else None)
        if snap is not None and snap.rejected != self._rejected:
            self._rejected = snap.rejected
            if snap.rejected:
                self._log("etcd_rejected", f"{len(snap.rejected)} entries under the prefix "
                          f"ignored: {'; '.join(snap.rejected)[:300]}", logging.WARNING)
        if snap is not None and snap.switchover != self._last_switchover:
            self._last_switchover = snap.switchover
            self._switchover_from_me = snap.switchover == "" and self.role == Role.LEADER
        if paused is not True or self._paused_before is not True:
            # Our nodeos may be signing (unpaused, or not answering), or has just been
            # paused: a block it has begun is ours, not another node's, until it is out.
            self._own_quiet = wall + BLOCK_INTERVAL + CLOCK_MARGIN
        self._paused_before = paused
        if self._own_high[0]:
            # A nodeos that refuses connections, or reads paused (explicitly or not),
            # signs nothing more; one that reads unpaused may sign again.
            if paused is False:
                self._own_stopped_at = None
            elif self._own_stopped_at is None and (paused is True or isinstance(
                    info_r, NodeosUnavailable)):
                self._own_stopped_at = wall + BLOCK_INTERVAL + CLOCK_MARGIN
        if info is not None and info.head_block_producer == self.cfg.producer:
            mark = (info.head_block_num, info.head_block_time)
            if self._armed and self._resume_sent:
                self._own_high = max(self._own_high, mark)
            elif mark[1] > self._seen_ours[1]:
                self._seen_ours = mark
        if self._me is not None and self.role not in (Role.TAKING_OVER, Role.LEADER):
            self._track_ahead(snap, wall)
        if snap is not None:
            for rec in snap.records.values():
                if rec.valid and rec.role == Role.LEADER.value and rec.node != self.cfg.node:
                    self._prev_leader_head = max(self._prev_leader_head, rec.head_block_num)
            for node, head in snap.handovers.items():
                if node != self.cfg.node:
                    self._prev_leader_head = max(self._prev_leader_head, head)
            self._peer_head = max((r.head_block_num for r in snap.records.values()
                                   if r.valid and r.in_sync and r.lease_id
                                   and r.node != self.cfg.node), default=0)
        o = Observation(now, wall, info, sync, paused, snap)
        if self._armed and self._resume_sent and info is not None:
            self._note_left_branch(info, self._signing_stop(o))
            self._note_gap(o, info)
            self._note_look(o, info)
        return o

    def _note_look(self, o: Observation, info: ChainInfo) -> None:
        """What nodeos may have signed since our last look, unseen: the block it had in
        flight then, and one more for each slot begun since, above the head it showed
        then (a block signed there and reorganised away before this look is one of them).
        Unlike the count from our newest block, this does not count the slots of a head
        that stopped moving: a leader whose nodeos fell out of sync hands over the head it
        is stuck at (and the block that may have been in flight), not a block for every
        slot since its newest one, which its successor's chain reaches only after our
        round."""
        if self._last_look is not None:
            self._look_high = max(self._look_high, self._look_count(self._signing_stop(o)))
            self._last_look = (info.head_block_num, o.wall)

    def _look_count(self, stop: float) -> int:
        """The highest height nodeos may have signed from our last look until ``stop``."""
        if self._last_look is None:
            return 0
        head, at = self._last_look
        begun = math.floor(stop / BLOCK_INTERVAL) - math.floor(at / BLOCK_INTERVAL)
        return head + 1 + max(0, begun)

    def _note_left_branch(self, info: ChainInfo, stop: float) -> None:
        """A head that cannot be the block of ours we saw last, or a block after it, means
        nodeos left that block's branch; on it, it may have begun one block per slot
        since, which we never saw and which may stand higher than its new branch, up to
        ``stop`` (now, or when it stopped signing: a nodeos restarted after the guard's
        kill comes back lower without a reorganisation, seed 5379).
        Seed 5149: a leader's nodeos, cut from p2p, signed #768 then #769 unseen; the
        network's branch came back at #766, nodeos signed #767 and #768 on it, and the
        newest block seen, #768, now stood at the head, so the handover read #768 as
        exact and the successor re-signed #769."""
        own_h, own_t = self._own_seen
        if own_h and not self._may_follow(info, own_h, own_t):
            self._left_high = max(self._left_high, own_h + math.ceil(
                max(0.0, stop - own_t) / BLOCK_INTERVAL))
            self._own_seen = (0, 0.0)  # counted: from here on, the branch we are on
        if info.head_block_producer == self.cfg.producer:
            self._own_seen = (info.head_block_num, info.head_block_time)

    @staticmethod
    def _may_follow(info: ChainInfo, own_h: int, own_t: float) -> bool:
        """Whether the head may be the block (own_h, own_t) or one of its descendants:
        at most one block per slot after it, and at least one."""
        slots = round((info.head_block_time - own_t) / BLOCK_INTERVAL)
        if slots == 0:
            return info.head_block_num == own_h
        return 0 < info.head_block_num - own_h <= slots

    def _note_gap(self, o: Observation, info: ChainInfo) -> None:
        """Between two looks at nodeos more than a couple of ticks apart (our agent
        frozen or stalled), it may have signed one block per slot on the head we saw
        last, on a branch a reorg has taken off its head since: seed 20101, a leader
        frozen while cut from p2p, whose thawed agent recorded the network's head #166
        while its nodeos had signed up to #169 on its own branch."""
        prev, self._looked = self._looked, (info.head_block_num, info.head_block_time, o.now)
        if prev is None:
            return
        height, block_time, at = prev
        if o.now - at <= 2 * max(self.cfg.check_interval, BLOCK_INTERVAL):
            return
        stop = self._signing_stop(o)
        self._gap_high = max(self._gap_high, height + math.floor(
            max(0.0, stop - block_time) / BLOCK_INTERVAL))

    def _read_due(self) -> bool:
        """Whether this tick reads etcd, or goes on with the last snapshot read.

        The last snapshot is a state of etcd at one revision, only older. What a stale
        one could get wrong is checked again where it matters: the fencing check before
        a resume is a transaction, and a node taking over reads every tick. The watch
        makes the rest timely; the resync timer bounds a watch that hangs.
        """
        return self._stale or self._snap is None or self.clock.now() >= self._next_read \
            or self.role in (Role.STARTING, Role.TAKING_OVER)

    async def _cached(self) -> Snapshot | None:
        return self._snap

    def _wrote(self) -> None:
        """We changed a key the snapshot holds: read it again next tick."""
        self._stale = True

    def _ok(self, result: object, kind: type[T]) -> T | None:
        if isinstance(result, kind):
            return result
        if isinstance(result, NodeosError):
            self._nodeos_error(result)
        elif isinstance(result, StoreError):
            self._etcd_error(result)
        elif isinstance(result, BaseException):
            raise result
        return None

    async def _publish(self, o: Observation) -> None:
        """Write our record when it says something new, or every record_interval.

        Only a node that may have signed keeps a last record (see _bound_vanished_leader),
        and each one it writes promises a fence time: the fences are moved out to it only
        once etcd has taken it, so they never pause later than the last record says.
        """
        record = self._record = self._node_record(o)
        lease = self.session.lease
        keep = self._armed and self._resume_sent
        if lease is None or o.snap is None or not self._record_due(record, lease.id, o.now):
            return
        try:
            await self.store.publish(record, lease.id, keep=keep)
        except StoreError as exc:
            self._etcd_error(exc)
            return
        self._published, self._published_at, self._published_lease = record, o.now, lease.id
        if keep:
            self._promised(self._record_promise)

    def _record_due(self, record: NodeRecord, lease_id: int, now: float) -> bool:
        last = self._published
        return (last is None or lease_id != self._published_lease
                or now >= self._published_at + self.cfg.record_interval
                or (self._promise is not None
                    and self._promise - now < self.cfg.lease_ttl)
                or (record.role, record.in_sync, record.paused, record.finalizer_key,
                    record.finalizer_active) != (last.role, last.in_sync, last.paused,
                                                 last.finalizer_key, last.finalizer_active))

    def _promised(self, promise: float) -> None:
        """etcd holds a last record of ours promising ``promise``: the fences may wait
        until then (and no longer than the lease allows)."""
        self._promise = promise
        if self._armed and self._on_election_lease():
            self._arm_fences()

    def _node_record(self, o: Observation) -> NodeRecord:
        return NodeRecord(
            node=self.cfg.node, role=self.role.value, in_sync=o.sync.in_sync,
            head_block_num=self._record_head(o),
            lag=round(o.sync.lag, 3) if o.sync.lag is not None else None,
            lib_lag=self._lib_lag(o.info), fence_at=self._promise_at(o),
            paused=o.paused, version=__version__, updated=round(o.wall, 3),
            **self._finalizer_fields())

    def _count_from_resume(self) -> None:
        """Until we see a block of ours, our newest possible block counts from the head we
        resume on: nodeos may sign one block per slot from the next slot boundary. Seed
        5629: a leader's nodeos API hung right after its resume, before it saw any block
        of its own; its records showed head 0, and its successor's bound, counted from
        that record, let it re-sign a height of the leader's private branch."""
        head = self._record.head_block_num if self._record is not None else 0
        if head:
            boundary = math.floor(self.clock.wall() / BLOCK_INTERVAL) * BLOCK_INTERVAL
            self._own_high = max(self._own_high, (head, boundary))
        if not self._resume_sent:
            # The looks count from here, or not at all this term (no head to count from).
            self._last_look = (head, self.clock.wall()) if head else None

    def _record_head(self, o: Observation) -> int:
        """The head our record shows: nodeos's, and while we may sign (the record is
        also our last record) never below a height we may have signed by now.

        A successor bounds a vanished leader from its last record: a head of 0 written
        while nodeos did not answer (hung, or killed by the guard), or a head a reorg
        took our newest blocks off, would let it resume below our private branch.
        """
        head = o.info.head_block_num if o.info else 0
        own_h, own_t = self._own_high
        if not (self._armed and self._resume_sent and own_h):
            return head
        if o.info is not None:
            return max(head, own_h, self._gap_high, self._left_high, self._owed_handover)
        # Unobserved since our newest block: count every slot until it stopped, or our
        # fences paused it, or now.
        stop = self._signing_stop(o)
        unseen = own_h + math.floor(max(0.0, stop - own_t) / BLOCK_INTERVAL)
        return max(unseen, self._gap_high, self._left_high, self._owed_handover,
                   self._record.head_block_num if self._record else 0)

    def _fenced_by(self, o: Observation) -> float:
        """The wall time our fences have paused nodeos by, with the block begun then.

        The same trust a successor puts in our record's ``fence_at``: a pause the fences
        cannot confirm is marked unfenced, or ends in the guard's kill command. Without
        this bound an agent thawed after a long freeze counts every slot of the freeze
        as signed, and its successor waits for heights the chain never reaches in our
        round (seed 5212).
        """
        if self._pause_at is None:
            return math.inf
        return o.wall + self._pause_at - o.now + self.cfg.nodeos_timeout + BLOCK_INTERVAL \
            + CLOCK_MARGIN

    def _signing_stop(self, o: Observation) -> float:
        """The wall time after which our nodeos signs nothing more, as far as we know:
        now, or when we saw it stop, or when our fences paused it."""
        return min(o.wall, self._own_stopped_at or math.inf, self._fenced_by(o))

    # ------------------------------------------------------------- continuity

    async def _bound_vanished_leader(self, o: Observation) -> None:
        """Layer 10 when a previous leader left no handover: it was frozen, killed or cut
        off, and its last record (kept in etcd without a lease) may be older than its last
        block. Its fence pauses it by its lease deadline - fence_guard, which is before
        etcd dropped its key (so before now); the block then begun is still signed. If
        its blocks reached us until about then, our head has them all. If they stopped
        reaching us earlier (cut from the p2p network; on Savanna its last record may also
        show its LIB falling behind), it may have gone on signing on a branch of its own:
        from any height it had at a known time it adds at most one block per slot, and we
        wait for a head past all of them. That bound is left in etcd as the vanished
        leader's handover, so later winners need not know when its key went.
        """
        if o.snap is None:
            return
        for rec in o.snap.lasts.values():
            # Only an agent that may produce keeps a last record (leading, taking over,
            # or in maintenance as leader), whatever role it names.
            if rec.node == self.cfg.node or not rec.valid or self._unboundable(o, rec):
                continue
            left = o.snap.handovers.get(rec.node, 0)
            if self._exact_handover(o.snap, rec.node) and left >= rec.head_block_num:
                continue  # it resigned with nodeos paused: its handover head is exact
            # A bound an earlier winner left was right for that winner's view of the chain
            # only (seed 22048: a winner cut from p2p trusted one): ours is at least it.
            bound = max(left, self._bound_one(o, rec))
            self._wrote()
            try:
                await self.store.leave_handover(rec.node, bound, by=self.cfg.node)
            except StoreError as exc:
                self._etcd_error(exc)

    def _unboundable(self, o: Observation, rec: NodeRecord) -> bool:
        """A last record with no fence promise, older than a few TTLs: of an older term,
        or from older code; its bound would grow with its age for ever.

        However old, a record that promises a fence time is bounded: its bound stops
        growing at that promise, and one a later leader of ours superseded lies below
        the blocks we saw of that leader, so it costs no wait. Skipping every record
        older than a few TTLs re-signed a private branch (seeds 60160, 60291): a leader
        cut from p2p went into maintenance and was killed; no node of ours led after
        it, and the first winner came 11 s and 16 s after its last record.
        """
        return rec.fence_at is None and o.wall - rec.updated > 2 * self.cfg.lease_ttl + 5

    @staticmethod
    def _exact_handover(snap: Snapshot, node: str) -> bool:
        """Whether ``node``'s handover is the head it read itself with nodeos paused."""
        return node not in snap.bounded

    def _trusted_bound(self, o: Observation, rec: NodeRecord) -> int:
        """When its blocks reached us: our head, which has them, or its newest block we
        saw, if a reorganisation has taken that off our head since (seed 24298). Its last
        record may be a record interval old, and this bound is left for later winners,
        whose own view of the chain may lack its last blocks (seed 22048)."""
        return max(rec.head_block_num, self._seen_ours[0],
                   o.info.head_block_num if o.info is not None else 0)

    @staticmethod
    def _unbroken(o: Observation, seen_h: int, seen_t: float) -> bool:
        """Whether our chain has a block in every slot from its newest block we saw to our
        head. A slot left empty may hold a block it signed that never reached us: seed
        28888, a leader cut from p2p signed #213 and #214 on its own; our head was
        another producer's #213 built on its #212, the newest block of its we had seen,
        1.9 s before it had to stop (within the slack for our looks), and we re-signed #214.
        """
        return o.info is not None and o.info.head_block_num - seen_h == round(
            (o.info.head_block_time - seen_t) / BLOCK_INTERVAL)

    @staticmethod
    def _current(o: Observation, last: float) -> bool:
        """Whether our chain has every block stamped up to a slot before ``last``: a
        node cut from p2p a moment ago still looks in sync, and has not."""
        return o.info is not None and o.info.head_block_time >= last - BLOCK_INTERVAL

    def _adopt_previous_term(self, o: Observation) -> None:
        """A previous incarnation of this agent led and left no handover (it was killed):
        hand over for it, from its last record to now that nodeos is confirmed paused."""
        if self._adopted or o.snap is None:
            return
        self._adopted = True
        rec = o.snap.lasts.get(self.cfg.node)
        if rec is None or not rec.valid or o.snap is None \
                or o.snap.handovers.get(self.cfg.node, 0) >= rec.head_block_num:
            return
        # From a record's time, the next block comes at the next slot boundary.
        boundary = math.floor(rec.updated / BLOCK_INTERVAL) * BLOCK_INTERVAL
        self._own_high, self._produced = (rec.head_block_num, boundary), True
        self._own_stopped_at = o.wall + BLOCK_INTERVAL + CLOCK_MARGIN

    def _bound_one(self, o: Observation, rec: NodeRecord) -> int:
        # The newest block it may have begun: before its fence fired (by the time etcd
        # dropped its key, and by the fence time its last record gave, plus the renewals
        # until its next record), with the pause call's time.
        stop = o.wall - self.cfg.fence_guard
        if rec.fence_at is not None:
            stop = min(stop, rec.fence_at)  # its fences never pause later than this
        last = stop + self.cfg.nodeos_timeout + BLOCK_INTERVAL
        seen_h, seen_t = self._seen_ours
        slack = self.cfg.nodeos_timeout + BLOCK_INTERVAL + self.cfg.check_interval + 0.3
        losing_votes = self.sync.savanna and rec.lib_lag is not None \
            and rec.lib_lag > LIB_LAG_NORMAL
        if not losing_votes and seen_h and last - seen_t <= slack and self._current(o, last) \
                and self._unbroken(o, seen_h, seen_t) \
                and not self._left_branch_possible(rec, seen_h, seen_t):
            # Its blocks reached us until it must have stopped, and our chain is current
            # to then: our head has them all (or will by our resume, a slot later).
            return self._trusted_bound(o, rec)
        # Blocks after a block time come every slot; after a record's time, from the next
        # slot boundary on.
        bounds = [self._from_record(rec, last)]
        if seen_h:
            bounds.append(self._from_seen(rec, seen_h, seen_t, last))
        bound = min(bounds)
        if bound > self._prev_leader_head:
            self._prev_leader_head = bound
            why = f"LIB {rec.lib_lag} s behind its head" if losing_votes else \
                f"no block of ours seen in the {last - seen_t:.1f} s before it had to stop"
            self._log("continuity", f"{rec.node} left no handover ({why}); it may have "
                      f"signed up to #{bound} unseen: resuming above it")
        return bound

    @staticmethod
    def _from_record(rec: NodeRecord, until: float) -> int:
        """The highest height it may have signed by ``until``, from its last record: its
        head then, and one block per slot from the next slot boundary on."""
        return rec.head_block_num + math.ceil(max(0.0, until - rec.updated) / BLOCK_INTERVAL)

    def _left_branch_possible(self, rec: NodeRecord, seen_h: int, seen_t: float) -> bool:
        """Whether it may have signed, between its last record and its newest block we saw,
        on a branch higher than that block's (see _from_seen). Not when the record is the
        newer (its head holds all it signed by then), nor when our chain grew by a block
        in every slot between (the record's head may already hold the block stamped at
        the next boundary: one more is allowed): for such a branch to top the block
        seen, it needs two slots more than the network got meanwhile."""
        return seen_t > rec.updated and self._from_record(rec, seen_t) > seen_h + 1

    def _from_seen(self, rec: NodeRecord, seen_h: int, seen_t: float, last: float) -> int:
        """The same from its newest block we saw: one block per slot after it, and never
        below what its record allows up to that block's time. A Savanna nodeos keeps no
        watermark (Spring updates it for pre-Savanna blocks only): back on the network's
        lower branch after signing on its own, it signs heights below those it signed
        before. Seed 66177: a leader cut from p2p, its agent frozen, signed up to #364
        alone, rejoined the network at #358 and signed #359 to #361 there; counted from
        #361, its successor resumed above #362 and re-signed #364."""
        return max(seen_h + math.floor(max(0.0, last - seen_t) / BLOCK_INTERVAL),
                   self._from_record(rec, seen_t))

    def _promise_at(self, o: Observation) -> float | None:
        """While we may produce, the fence time this record promises (wall time)."""
        if not self._armed:
            return None
        self._record_promise = o.now + PROMISE_TTLS * self.cfg.lease_ttl
        return round(o.wall + self._record_promise - o.now, 3)

    @staticmethod
    def _lib_lag(info: ChainInfo | None) -> float | None:
        if info is None or info.last_irreversible_block_time is None:
            return None
        return round(info.head_block_time - info.last_irreversible_block_time, 3)

    # ---------------------------------------------------------------- Savanna

    async def _check_finalizer_setup(self, o: Observation) -> tuple[Role, str]:
        """Before campaigning with a finalizer key: refuse a key another node has too,
        and report, with the commands that fix it, what the chain still lacks."""
        assert self.keys is not None
        if o.snap is None or self.cfg.node not in o.snap.records:
            return Role.STARTING, "waiting to see our own node record"
        twins = sorted(n for n, r in o.snap.records.items() if n != self.cfg.node
                       and r.valid and r.finalizer_key == self.keys.key)
        if twins:
            self.refusal = (f"finalizer.key {self.keys.key[:20]}… is also configured on "
                            f"{', '.join(twins)}: two nodes with one BLS key can sign "
                            "conflicting votes; give each node its own key (regfinkey)")
            self._log("duplicate_finalizer_key", self.refusal, logging.CRITICAL)
            return Role.STOPPED, "refused to run: finalizer key shared with another node"
        if not self._preflight_done:
            self._preflight_done = True
            for problem in await self.keys.preflight():
                self._log("finalizer_setup", problem, logging.ERROR)
        return Role.FOLLOWER, "started, nodeos paused"

    async def _watch_finality(self, o: Observation) -> None:
        """Follow what the chain says of finality: the active key (for our record and
        status), and, in ``auto`` mode, whether the chain runs Savanna yet."""
        info: FinalizerInfo | None = None
        if self.keys is not None:
            if self.role != Role.LEADER:  # the leader's handler checks on its own
                info = await self.keys.observe(o.now, leading=False)
            else:
                info = self.keys.info
        elif self.cfg.finality == "auto" and not self.sync.savanna and o.now >= self._next_probe:
            self._next_probe = o.now + PROBE
            try:
                info = await self.nodeos.finalizer_info(budget=self.cfg.nodeos_timeout)
            except NodeosApiMissing:
                info = None  # Leap: no Savanna at all
            except NodeosError as exc:
                self._nodeos_error(exc)
        if info is not None and info.savanna and not self.sync.savanna \
                and self.cfg.finality == "auto":
            self.sync.savanna = True
            self._log("finality", "Savanna chain: a close, fresh last irreversible block is "
                      "now required to be in sync")

    def _finalizer_fields(self) -> dict[str, Any]:
        if self.keys is None:
            return {}
        info = self.keys.info
        vote = info.last_vote(info.active_key(self.cfg.producer) or "") if info else None
        return {"finalizer_key": self.keys.key, "finalizer_active": self.keys.active_key,
                "last_vote": vote.block_num if vote else None}

    def owner_of(self, key: str) -> str | None:
        """The node whose record carries ``key`` (ours included), if any."""
        snap = self.last.snap if self.last else None
        if snap is None:
            return None
        if self.keys is not None and key == self.keys.key:
            return self.cfg.node
        return next((n for n, r in snap.records.items() if r.finalizer_key == key), None)

    def _whose_key(self) -> str:
        if self.keys is None or self.keys.active_key is None:
            return "our producer's finalizer"
        if self.keys.ours:
            return "our own finalizer key"
        owner = self.owner_of(self.keys.active_key)
        return f"the active key ({owner or 'unknown node'})"

    def _emit(self, event: str, reason: str, level: int) -> None:
        if event == "nodeos_error":
            self.stats.nodeos_errors += 1
            self._error(event, reason, self._nodeos_repeats)
        else:
            self._log(event, reason, level)

    # ---------------------------------------------------------- fence plumbing

    def _arm(self) -> None:
        self._armed = self._produced = True
        self._arm_fences()

    def _arm_fences(self) -> None:
        """Fences at the lease deadline minus the guard (layer 3), or at the fence time
        our last record promises if that comes first (a successor counts on it)."""
        deadline = self.session.deadline
        if deadline is None:
            return
        pause_at = deadline - self.cfg.fence_guard
        if self._promise is not None:
            pause_at = min(pause_at, self._promise)
        self._pause_at = pause_at
        self.fencer.arm(pause_at)

    def _on_election_lease(self) -> bool:
        """Whether our session's lease is the one our election key hangs on: only that
        lease may push our fences out. A session that lost our lease grants itself
        another, and a record written on it must not move the fence of the term that
        ended (seed 5754: thawed after its guard had paused nodeos, a leader re-armed on
        its new lease, counted every slot of its freeze as signed, and its successor
        waited for heights the chain never reached)."""
        lease = self.session.lease
        return self._me is not None and lease is not None and lease.id == self._me.lease_id

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            self._promise = None
            self.fencer.disarm()

    def _on_renew(self, deadline: float) -> None:
        if self._armed and self._on_election_lease():
            self._arm_fences()

    # ---------------------------------------------------------------- logging

    def _transition(self, role: Role, reason: str) -> None:
        if role != self.role:
            self.stats.transitions += 1
            old, self.role = self.role, role
            if old == Role.LEADER and self.keys is not None:
                self.keys.stand_down()
            if Role.LEADER in (old, role):
                self.stats.leader_changes += 1
            self._log("transition", f"{old.value} -> {role.value}: {reason}", previous=old)
        elif role == Role.TAKING_OVER and reason != self._takeover_wait_why:
            # A takeover waits on several checks in turn; an operator asking why a node
            # elected a while ago does not produce yet reads it here, once per change.
            self._log("waiting", reason)
        self._takeover_wait_why = reason if role == Role.TAKING_OVER else ""

    def _context(self) -> str:
        lease = self.session.lease
        lease_text = f"{lease.id:x}" if lease else "none"
        return f"node={self.cfg.node} role={self.role.value} lease={lease_text}"

    def _log(self, event: str, reason: str, level: int = logging.INFO,
             previous: Role | None = None) -> None:
        log.log(level, "%s event=%s reason=%r", self._context(), event, reason)
        if self.listeners:
            ev = AgentEvent(event, self.cfg.node, self.role, reason, level, previous)
            for listener in self.listeners:
                try:
                    listener(ev)
                except Exception:  # a listener's bug must never stop a pause
                    log.exception("%s event=listener_failed", self._context())

    def _etcd_error(self, exc: StoreError) -> None:
        self.stats.etcd_errors += 1
        self._error("etcd_error", exc.reason if exc.op == "" else f"{exc.op}: {exc.reason}",
                    self._etcd_repeats)

    def _nodeos_error(self, exc: NodeosError) -> None:
        self.stats.nodeos_errors += 1
        self._error("nodeos_error", str(exc), self._nodeos_repeats)

    def _error(self, event: str, text: str, repeats: _Repeats) -> None:
        """Every error is counted (metrics); repeats of the same one are logged sparsely."""
        show, held = repeats.check(text, self.clock.now())
        if show:
            more = f" (repeated {held} times since the last line)" if held else ""
            self._log(event, text + more, logging.WARNING)
