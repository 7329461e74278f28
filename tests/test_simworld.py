"""The deterministic simulation (issue 7): the production Agent on virtual time.

Three things are checked: the real agent keeps every invariant on a fixed set of seeds;
a seed replays exactly; and the simulation is sharp enough to matter, because each copy
of the agent with one safety layer removed is caught double-producing within a bounded
number of seeds.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bpleader.agent import Role
from bpleader.simworld import Faults, Scenario, simulate
from bpleader.simworld.runner import Job, explore, run_jobs
from bpleader.simworld.runner import main as runner_main
from bpleader.simworld.scenario import FAST_TIMING, Rounds
from bpleader.simworld.variants import AGENTS
from bpleader.simworld.world import World

SUITE_SEEDS = range(0, 40)  # about 30 s on two cores
JOBS = 2  # the CI machine's cores: seeds are independent processes
SECONDS = 180.0
# Each weakened agent must be caught within this many seeds. The figures measured when
# this was written (first failing seed) are far below it; see the README.
CATCH_WITHIN = 80


def test_real_agent_keeps_every_invariant_on_the_suite_seeds() -> None:
    kinds: Counter[str] = Counter()
    failing = []
    simulated = 0.0
    for result in explore(SUITE_SEEDS, SECONDS, "real", jobs=JOBS):
        simulated += result.node_hours
        kinds.update(v.kind for v in result.violations)
        if result.violations:
            failing.append((result.seed, result.violations[0].text))
        assert result.stats["blocks"] > 0, f"seed {result.seed}: nothing was ever produced"
    assert not failing, f"{dict(kinds)}; first: {failing[:3]} (replay: python -m " \
                        f"bpleader.simworld --replay SEED --hours {SECONDS / 3600:g} --trace)"
    assert simulated > 5.0  # node-hours: the seeds really ran their full length


def test_a_seed_replays_exactly() -> None:
    scenario = Scenario.explore(7, 120.0, keep_trace=None)
    first, second = simulate(scenario), simulate(scenario)
    assert first.trace == second.trace
    assert first.stats == second.stats
    assert "storm begins" in first.trace  # faults were injected, not a quiet run


def test_without_faults_one_leader_produces_every_slot_of_ours() -> None:
    result = simulate(Scenario(seed=3, duration=60.0, faults=None, keep_trace=None))
    assert not result.violations
    assert result.stats["double_productions"] == 0
    resumes = sum(v for k, v in result.stats.items() if k.endswith(".resumes"))
    assert resumes == 1, result.trace  # elected once, never handed over


# Some layers guard the same case, and removing one alone is not caught within CATCH_WITHIN
# seeds because the others cover it (see the README):
# * a node still producing after it lost the lock without a confirmed pause: the
#   doppelganger check (7), the unfenced mark (11) and the guard's kill command (8, when
#   nodeos.kill_command is configured); "no-doppelganger-no-mark" in a deployment without a
#   kill command removes all three and is caught;
# * the old leader's in-flight block: the takeover delay (5) and the old leader's wait for
#   the slot to end before it hands its head over (10); "no-takeover-delay-no-slot-wait"
#   removes both and is caught.
COVERED_BY_OTHER_LAYERS = {"no-doppelganger", "no-unfenced-mark", "no-takeover-delay"}
WITHOUT_KILL_FENCE = {"no-doppelganger-no-mark"}
SAFETY = {"double-production", "lock", "equivocation", "shared-key"}
# What catches a weakened agent: a safety violation; for the agent that never moves the
# finalizer key, a leader that is not producing with its own key active after a heal.
CAUGHT_BY = {"no-key-switch": {"liveness"}}


# Not in the catch-within-N-seeds test: the shared key (its own test below), the fixes
# the long runs called for (checked on their seeds, REGRESSIONS), two of them made on
# purpose instead (uncounted-resume, unblocked-at-once: tests/test_agent_core.py), and
# six no seed reaches any more and no test checks (left-branch, left-branch-to-now,
# uncounted-gap, lib-three-behind, lowered-handover, any-lease-fence: see REGRESSIONS).
ON_THEIR_OWN_SEED = {"shared-bls-key", "nodeos-head-record", "unfenced-record",
                     "head-is-exact", "slow-kill", "maintenance-unbounded",
                     "uncounted-resume", "uncounted-gap", "unfinalized-branch",
                     "trusted-bound", "unblocked-at-once", "unsent-handover", "skipped-slots",
                     "lib-three-behind", "lowered-handover", "left-branch", "any-lease-fence",
                     "left-branch-to-now", "old-record-skipped", "seen-block-only",
                     "unowed-lost-handover"}


@pytest.mark.parametrize("agent", sorted(set(AGENTS) - {"real"} - ON_THEIR_OWN_SEED
                                          - COVERED_BY_OTHER_LAYERS))
def test_each_weakened_safety_layer_is_caught(agent: str) -> None:
    kill_fence = agent not in WITHOUT_KILL_FENCE
    kinds = CAUGHT_BY.get(agent, SAFETY)
    # explore() applies the variant's scenario overrides (SCENARIOS), as the runner does.
    for result in explore(range(CATCH_WITHIN), SECONDS, agent, jobs=JOBS,
                          kill_fence=kill_fence):
        if any(v.kind in kinds for v in result.violations):
            return
    pytest.fail(f"{agent}: no {'/'.join(sorted(kinds))} violation in {CATCH_WITHIN} seeds")


def test_the_same_seeds_under_a_gentler_fault_mix_stay_live() -> None:
    """Liveness is checked too: a run whose faults all heal ends with one producer."""
    faults = Faults(mean_gap=10.0, storm=(10.0, 20.0))
    for seed in range(6):
        result = simulate(Scenario.explore(seed, 150.0, faults=faults))
        assert not result.violations, (seed, result.violations[0].text)


def test_virtual_time_never_stalls_on_clock_rounding() -> None:
    """Seed 2190 once hung the runner: a guard due at a host-clock instant that rounded
    to just before it rescheduled itself at the same virtual instant forever."""
    result = simulate(Scenario.explore(2190, 900.0))
    assert result.sim_seconds >= 900.0 or result.violations


def _switchover_at(seed: int, savanna: bool, boundary: int, offset: float) -> tuple[int, bool]:
    """A `--now` switchover requested ``offset`` s from the ``boundary``-th slot boundary
    after the first leader's resume; returns our slots missed in the 6 s after it, and
    whether the node asked for leads then."""
    world = World(Scenario(seed=seed, duration=60.0, nodes=2, timing=FAST_TIMING,
                           schedule=Rounds(4, 4), savanna=savanna, faults=None))
    try:
        def leader() -> str:
            return next((n.name for n in world.nodes.values()
                         if n.agent is not None and n.role == Role.LEADER), "")

        while not leader():
            world.run_until(world.loop.time() + 0.05)
        first = int(world.loop.time() / 0.5) + 4  # a few slots after its first block
        world.run_until((first + boundary) * 0.5 + offset)
        missed, target = world.ledger.missed_slots, next(n for n in world.nodes if n != leader())
        world.etcd.request_switchover(target, 10)
        world.run_until(world.loop.time() + 6.0)
        return world.ledger.missed_slots - missed, leader() == target
    finally:
        world.close()


@pytest.mark.parametrize("savanna", [True, False], ids=["savanna", "legacy"])
def test_a_switchover_now_near_a_slot_boundary_misses_no_slot_of_ours(savanna: bool) -> None:
    """Paused within the clock margin of a slot boundary, nodeos may have begun that
    slot's block, so the handover counts it. When the slot was ours and the block never
    came, the successor waited for a height only the other producer's next round signs:
    our whole round was lost (1 trial in 10 of the chaos benchmark's switchover), or one
    slot inside our round. The leader now pauses clear of every boundary. Seed 12 runs
    bp-a's wall clock 44 ms ahead of the chain's."""
    lost = []
    for seed in (11, 12):
        for boundary in range(8):  # each boundary of a round: 4 slots ours, 4 others'
            for offset in (-0.12, -0.06, 0.0, 0.04):
                missed, moved = _switchover_at(seed, savanna, boundary, offset)
                if missed or not moved:
                    lost.append((seed, boundary, offset, missed, moved))
    assert not lost, lost


def test_a_leader_killed_right_after_resuming_is_bounded_by_its_last_record() -> None:
    """Seed 5041: a new leader, cut from etcd right after its resume and killed 0.4 s
    later, never published a record of that term; the next leader resumed on a head
    below the blocks it had signed. The record now goes in with the fencing check."""
    result = simulate(Scenario.explore(5041, 900.0))
    assert not result.violations, result.violations[0].text


# Each fix the long runs called for, with the weakened agent that undoes it (it must
# still fail on its seed) and the real agent (it must not, in the same fault mix). The
# seeds come from searches in each variant's fault mix (variants.SCENARIOS), made again
# whenever the model or the agent moves the paths (the Spring-faithful resume in the
# middle of a slot and the takeover on evidence did); the fixes, in the order found:
# * nodeos-head-record (5721): a leader cut from p2p signed on a private branch; its
#   guard killed nodeos and its next record, kept as its last, showed head 0, so the
#   successor re-signed a height of that branch. A record never shows less than the
#   leader may have signed.
# * unfenced-record (5212): the first form of that fix counted every slot of a long
#   agent freeze as signed, though the guard had paused nodeos at once; the successor
#   waited for heights the chain never reached. The count stops where the fences paused.
#   Searched again as 40501 when planned pauses began to keep clear of slot boundaries.
# * head-is-exact (6412): a leader's nodeos switched to the network's branch and re-signed
#   a height below its own lost blocks, unseen by its agent; the handover read the head,
#   ours, as exact. It is exact only when it extends the newest block we saw.
#   Searched again as 41534 when planned pauses began to keep clear of slot boundaries.
# * slow-kill (6889): a hung nodeos API with production going on; the guard retried the
#   pause for 2 s before its kill command, and nodeos signed past the successor's bound.
#   The guard kills after one pause call's timeout ("slow-kill" runs the old guard).
# * maintenance-unbounded (5334): leaving maintenance elected skipped the bound of a
#   leader that had vanished meanwhile after signing on a private branch.
# * uncounted-resume (5629): a leader's API hung right after its resume, before it saw a
#   block of its own, so its records showed head 0. Possible blocks count from the head
#   it resumed on. No seed of its fault mix reaches that path since the later fixes
#   (1,800 searched); tests/test_agent_core.py makes it on purpose instead.
# * uncounted-gap (20101): a leader frozen while cut from p2p; thawed, its agent recorded
#   the network's head below its own branch's blocks, and its successor trusted that
#   record. A gap between two looks at nodeos counts a block per slot to the fences' stop.
# * unfinalized-branch (21296): a successor resumed on the old leader's private branch,
#   high enough but voted for by nobody, and re-signed its heights after the network
#   reorganised onto a shorter branch with a newer QC. It waits for the LIB to follow.
# * trusted-bound (22048): a winner whose chain had the vanished leader's blocks left
#   that leader's (stale) record head as its bound; a later winner, cut from p2p a moment
#   before, took the bound as exact and re-signed a height. The bound left is the first
#   winner's head, any node's bound is only a floor for the next, and a winner trusts its
#   own view only when its chain is current to the vanished leader's stop (and, seed
#   24298, never below that leader's newest block it saw, which a reorg may have taken
#   off its head). Searched again as 25220 after the fix of 28888 closed the old seed's
#   path too.
# * unblocked-at-once (24377): a winner blocked by an unfenced node resumed the moment
#   that node confirmed its pause, and signed the slot whose block it was finishing.
#   No seed of its fault mix reaches that path since the fixes of 5149 and 5754 (750
#   searched); tests/test_agent_core.py makes it on purpose instead.
# * unsent-handover (28069, searched again as 28834 after the fixes of 28888 and 31019
#   moved its path): a resign lost on the wire carried head #303; still holding its key,
#   the leader was re-elected and resigned again with its nodeos's head, #302 after a
#   reorg. A handover never leaves less than a failed one tried to.
# * left-branch (5149, 15 minutes): a leader's nodeos, cut from p2p, signed #768 and #769
#   (unseen); back on the network's branch at #766 it signed #767 and #768 there, and the
#   newest block seen (#768) stood at the head again: an exact handover of #768. A head
#   that cannot follow our newest block seen counts the slots since it as signed. No seed
#   reaches that path since the fixes of 28888 and 31019 moved the traces (2,500 searched
#   in a mix of more p2p cuts, stalls and slow APIs); not checked on a seed any more.
# * any-lease-fence (5754, 15 minutes, liveness): thawed after its guard had paused
#   nodeos, a leader whose lease had gone re-armed its fences on its session's new
#   lease, so its records counted the whole freeze as signed. Only the election key's
#   lease moves the fences.
# * left-branch-to-now (5379, 15 minutes, liveness): the first form of the left-branch
#   count ran to the look that showed the change; a nodeos restarted after the guard's
#   kill comes back lower, long after it stopped signing, and the count ran on through
#   the restart. It stops where nodeos stopped, or where our fences paused it. Like
#   left-branch, no seed reaches it since (1,100 of the default mix searched, 5 minutes
#   each); not checked on a seed any more.
# * skipped-slots (28888, found by the search for unsent-handover's new seed): a leader
#   cut from p2p signed #213 and #214 on its own before its guard paused it; the winner's
#   head was another producer's #213 on the leader's #212, seen 1.9 s before the leader
#   had to stop, within the slack for the winner's looks, so it trusted its chain and
#   re-signed #214. Its chain is trusted only without an empty slot after that block.
# * lib-three-behind (31019, found by the same search): a leader's two private blocks
#   (#273-#274, LIB #271) reached its successor just before the network's #273 of a later
#   slot with the same QC claim, which Spring prefers; the successor resumed on #274,
#   moved to the network's #273 and re-signed #274. A head whose LIB is more than two
#   blocks behind claims an old QC: no resume on it.
# * lowered-handover (7271, 15 minutes, found by the long run on the code with the three
#   fixes above): a leader resigned leaving #1356, was elected again, and its resume's
#   fencing check deleted that handover, as it must (a resumed node is bounded by its
#   last record); its nodeos had moved to the network's lower branch, so its next resign
#   left #1353 and the successor re-signed #1355 and #1356. What the resume drops is
#   owed to the node's records and its next handover.
#   Searched again as 43245 (5 minutes, in a mix of more switchovers and p2p faults,
#   variants.SCENARIOS) when planned pauses began to keep clear of slot boundaries.
# * old-record-skipped (60160, found by the real agent in the search for
#   maintenance-unbounded's new seed, with 60291): a leader went into maintenance, was cut
#   from p2p and killed; its nodeos signed #399 and #400 on its own branch before the
#   guard paused it. No node of ours led after it; the first winner came 10.8 s after its
#   last record, more than the 2 TTLs + 5 s after which a record counted as an older
#   term's and was skipped, and re-signed #399 and #400. A record with a fence promise is
#   bounded however old it is (its bound stops growing at the promise).
# * seen-block-only (66177, found by the real agent in the search for uncounted-gap's new
#   seed): a leader cut from p2p, its agent frozen, signed up to #364 alone; back on the
#   network's branch at #358 its nodeos signed #359 to #361 there (a Savanna nodeos keeps
#   no watermark). Counting from #361, the newest block of it seen, its successor
#   resumed above #362 and re-signed #364. The count from the newest block seen never
#   goes below what the last record allows up to that block's time.
# * unowed-lost-handover (76007, found by the real agent in the search for
#   lib-three-behind's new seed): a leader cut from p2p was killed; its nodeos signed up
#   to #128 on its own branch before the guard paused it. The restarted agent counted
#   #131 for its previous incarnation, but etcd was cut off; the count was spent, and the
#   next try left its nodeos's head, #126 on the network's branch by then. A handover
#   left after a lost lease now owes what a failed write tried to leave, as a resign
#   does (the agent of unsent-handover, which forgets both, on this seed's fault mix).
# When the lease session began to renew on a cadence counted from each send (d08c2ca),
# every renewal moved by the answer's time, and with it every trace: eleven of the seeds
# above no longer reached their paths, and each was searched again (the numbers below
# from 44073 on). Those searches ran the real agent on each weakened agent's failing
# seeds, and it failed itself on three paths no seed had reached before (60160, 66177,
# 76007): fixed, each kept as a pair with a variant of its own. Four searches found
# nothing on the final code, in their own fault mixes: uncounted-gap, lib-three-behind
# and lowered-handover in about 840 seeds of 5 minutes each, any-lease-fence in 7
# minutes of 15-minute seeds (its first seed failed liveness with the real agent too:
# no pair). They are not checked on a seed any more (like left-branch); their layers
# stand, and the long runs still exercise them.
REGRESSIONS = [(44073, 300.0, "nodeos-head-record", "double-production"),
               (100046, 300.0, "unfenced-record", "liveness"),
               (52655, 300.0, "head-is-exact", "double-production"),
               (56062, 300.0, "slow-kill", "double-production"),
               (60372, 300.0, "maintenance-unbounded", "double-production"),
               (21296, 300.0, "unfinalized-branch", "double-production"),
               (68145, 300.0, "trusted-bound", "double-production"),
               (72424, 300.0, "unsent-handover", "double-production"),
               (28888, 300.0, "skipped-slots", "double-production"),
               (60160, 300.0, "old-record-skipped", "double-production"),
               (66177, 300.0, "seen-block-only", "double-production"),
               (76007, 300.0, "unowed-lost-handover", "double-production")]


def test_the_seeds_the_long_runs_found_stay_fixed() -> None:
    jobs = [Job(seed, seconds, agent, 400, faults_of=weakened)
            for seed, seconds, weakened, _ in REGRESSIONS for agent in (weakened, "real")]
    kinds = {(job.seed, job.agent): {v.kind for v in r.violations}
             for job, r in zip(jobs, run_jobs(jobs, JOBS), strict=True)}
    for seed, _, weakened, kind in REGRESSIONS:
        assert kind in kinds[seed, weakened], f"seed {seed}: {weakened} no longer fails"
        assert not kinds[seed, "real"], f"seed {seed}: {kinds[seed, 'real']}"


def _resumes(result: object) -> int:
    stats = result.stats  # type: ignore[attr-defined]
    return sum(v for k, v in stats.items() if k.endswith(".resumes"))


def test_one_bls_key_on_two_nodes_is_refused_and_the_weakened_agent_is_caught() -> None:
    """The naive fix (one BLS key copied to every node). A shared key's votes conflict
    only across a fork, which the other layers prevent: in 80 seeds the weakened agent
    produced no equivocation, so what is checked is the layer itself. The ledger flags
    the deployment on every seed; the real agent refuses to start on it (no node ever
    resumes), the agent without the start-up check leads on it within 80 seeds."""
    real = simulate(Scenario.explore(0, SECONDS, shared_key=True))
    assert any(v.kind == "shared-key" for v in real.violations)
    assert _resumes(real) == 0, "the real agent produced with a BLS key another node has"
    for result in explore(range(CATCH_WITHIN), SECONDS, "shared-bls-key", jobs=JOBS):
        if any(v.kind == "shared-key" for v in result.violations) and _resumes(result):
            return
    pytest.fail("shared-bls-key: no node ever led with a shared BLS key")


def test_a_long_run_resumes_from_its_summary_and_never_mixes_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The million node-hours are reached across many runs: each run adds to one summary
    file, skips the seeds already in it, and refuses a file other code or other
    parameters wrote (their seeds would not count for this code)."""
    path = tmp_path / "run.json"
    args = ["--hours", "0.005", "--summary", str(path)]
    assert runner_main(["--seeds", "2", *args]) == 0
    assert runner_main(["--seeds", "3", *args]) == 0  # resumes: only seed 2 is new
    out = capsys.readouterr().out
    assert out.count("\nseeds: 1\n") == 1, out
    data = json.loads(path.read_text())
    assert data["done"] == [[0, 2]] and data["seeds"] == 3
    assert data["sim_hours"] == pytest.approx(3 * 18.0 / 3600) and data["node_hours"] > 0
    assert runner_main(["--seeds", "3", "--hours", "0.01", "--summary", str(path)]) == 2
    assert "seconds_per_seed 18.0 there, 36.0 here" in capsys.readouterr().err
    path.write_text(path.read_text().replace(data["code"], "0" * 16))
    assert runner_main(["--seeds", "4", *args]) == 2
    assert "written by other code" in capsys.readouterr().err
    # A failing seed is kept with its kind, so a resumed run still reports it.
    failing = tmp_path / "variant.json"
    assert runner_main(["--seeds", "1", "--hours", "0.005", "--agent", "shared-bls-key",
                        "--summary", str(failing)]) == 1
    assert json.loads(failing.read_text())["failing"][0] == {
        "seed": 0, "kind": "shared-key", "time": 0.0}
