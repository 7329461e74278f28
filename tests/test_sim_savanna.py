"""The simulator's Savanna (Spring 1.x) chain: votes, the last irreversible block, the
implicit production pause, finalizer key switches with eosio::actfinkey, and what the
ledger counts of finalizers (vote equivocation, shared BLS keys).

Model and engine tests run on a fake clock (no sleeping); the HTTP tests use a 0.1 s
block interval and short vote timeouts. Each stands for Spring 1.2 behaviour: the vote
tracker of the producer plugin (production-pause-vote-timeout-ms, its fixed 1 s block
tolerance, resume's force_unpause), the 2-chain finality rule, set_finalizers' proposed ->
pending -> active, and the error names and codes of nodeos's exceptions.hpp.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx
import pytest

from bpleader.antelope import (
    decode_bls_public_key,
    new_private_key,
    public_key_of,
    sign_actfinkey,
)
from bpleader.sim import SimCluster
from bpleader.sim.chain import Schedule
from bpleader.sim.engine import Engine
from bpleader.sim.finality import BLOCK_TOLERANCE, simulated_bls_key
from bpleader.sim.model import ChainConfig, ChainModel
from bpleader.sim.nodeos_api import (
    GET_FINALIZER_INFO,
    GET_INFO,
    PAUSED,
    SEND_TRANSACTION2,
    Identity,
)
from bpleader.sim.system import SystemContract
from harness import wait_for

T = TypeVar("T")
CHAIN_ID = "cd" * 32
T0 = 1_800_000_000.05
INTERVAL = 0.1
PRODUCER = "mybp"
FINKEY = new_private_key(b"test_sim_savanna finkey")
OTHER_KEY = new_private_key(b"test_sim_savanna someone else")


# ---------------------------------------------------------------------- helpers

@dataclass
class FakeClock:
    t: float

    def __call__(self) -> float:
        return self.t


def make_engine(nodes: dict[str, bool], *, others: tuple[str, ...] = (), spp: int = 12,
                interval_ms: int = 100, vote_timeout: float = 1.0, savanna: bool = True,
                permission_key: str | None = None) -> tuple[Engine, FakeClock]:
    """An engine of ``nodes`` (name -> pause-on-startup) on a fake clock; the first node's
    BLS key is the active one."""
    clock = FakeClock(T0)
    config = ChainConfig(PRODUCER, tuple(nodes),
                         Schedule.round_robin((PRODUCER, *others), spp),
                         interval_ms=interval_ms, savanna=savanna, vote_timeout=vote_timeout,
                         pause_on_startup=nodes)
    contract = SystemContract.for_chain(config, "finkey", permission_key) if savanna \
        else None
    return Engine(config, Identity(CHAIN_ID), contract, clock), clock


def tick(engine: Engine, clock: FakeClock, n: int = 1, into_slot: float = 0.05) -> None:
    for _ in range(n):
        clock.t = engine.next_boundary()
        assert engine.tick() == 1
        clock.t += into_slot


def until(engine: Engine, clock: FakeClock, pred: Callable[[], bool],
          limit: float) -> float | None:
    """Tick until ``pred`` holds; the seconds it took (None if not within ``limit``)."""
    start = clock.t
    while clock.t - start <= limit:
        if pred():
            return clock.t - start
        tick(engine, clock)
    return None


def seconds_of(block_time: str) -> int:
    return int(datetime.fromisoformat(block_time + "+00:00").timestamp())


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=3.0)


def post(url: str, path: str, body: Any = None) -> httpx.Response:
    with client(url) as c:
        return c.post(path, content=b"" if body is None else json.dumps(body).encode())


def get_info(url: str) -> dict[str, Any]:
    resp = post(url, GET_INFO)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def finalizer_info(url: str) -> dict[str, Any]:
    resp = post(url, GET_FINALIZER_INFO)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()
    return result


def policy_key(policy: dict[str, Any] | None, description: str = PRODUCER) -> str | None:
    if policy is None:
        return None
    return next((f["public_key"] for f in policy["finalizers"]
                 if f["description"] == description), None)


def actfinkey(url: str, bls_key: str, *, signing_key: str = FINKEY,
              permission: str = "finkey", expires_in: int = 60,
              ref_block_id: str | None = None) -> dict[str, Any]:
    """The packed transaction an agent builds: TaPoS on the node's LIB, expiring
    ``expires_in`` seconds after its head."""
    info = get_info(url)
    return sign_actfinkey(info["chain_id"], ref_block_id or info["last_irreversible_block_id"],
                          seconds_of(info["head_block_time"]) + expires_in, signing_key,
                          PRODUCER, permission, bls_key)


def send2(url: str, body: dict[str, Any]) -> httpx.Response:
    return post(url, SEND_TRANSACTION2, {"return_failure_trace": True, "retry_trx": False,
                                         "transaction": body})


def error_of(resp: httpx.Response, status: int = 500) -> dict[str, Any]:
    """nodeos's error body: ``{"code", "message", "error": {code, name, what, details}}``."""
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["code"] == status and body["message"] == "Internal Service Error"
    err: dict[str, Any] = body["error"]
    assert set(err) == {"code", "name", "what", "details"} and err["details"]
    return err


def wait(pred: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    return wait_for(pred, timeout, interval=0.01, what=what)


# ---------------------------------------------------------------------- (a) finality

def drive(model: ChainModel, slots: range) -> None:
    """Slot by slot on virtual time: begun at its start, signed at its end."""
    step = model.interval_ms / 1000
    for k in slots:
        model.begin_slot(k, k * step)
        model.finish_slot(k, (k + 1) * step)


def test_lib_trails_the_head_by_two_blocks_on_every_node() -> None:
    config = ChainConfig(PRODUCER, ("bp-a", "bp-b"),
                         Schedule((("mybp", 4), ("zz", 2))), pause_on_startup={"bp-b": True})
    model = ChainModel(config)
    drive(model, range(30))
    for name in ("bp-a", "bp-b"):  # the producing node and the paused one alike
        view = model.view(name, 15.0)
        assert 2 <= view.head.height - view.lib.height <= 3
        assert model.canonical.is_canonical(view.lib) and view.head.extends(view.lib)
    assert model.view("bp-a", 15.0).lib is model.canonical.head.final
    assert model.ledger.votes == model.ledger.our_blocks + 10  # its own and zz's 10
    assert model.ledger.equivocations == 0


def test_lib_stops_on_a_node_cut_from_p2p_while_its_own_blocks_keep_its_head_fresh() -> None:
    config = ChainConfig(PRODUCER, ("bp-a", "bp-b"),
                         Schedule((("mybp", 4), ("zz", 2))), pause_on_startup={"bp-b": True},
                         vote_timeout=0.0)  # (the pause is another test's subject)
    model = ChainModel(config)
    drive(model, range(12))
    a = model.node("bp-a")
    before = model.view("bp-a", 6.0).lib.height
    a.receiving = a.sending = False  # cut from p2p: its own vote alone makes no quorum
    libs = []
    for k in range(12, 40):
        drive(model, range(k, k + 1))
        now = (k + 1) * 0.5
        view = model.view("bp-a", now)
        libs.append(view.lib.height)
        if config.schedule.producer_at(k) == PRODUCER:
            assert view.head.timestamp_ms == now * 1000  # its head is fresh...
    # ...but its LIB stands still (one more block, at most, from votes it had already).
    assert max(libs) - min(libs) <= 1 and max(libs) <= before + 1
    network = model.canonical.head
    assert not model.canonical.is_canonical(model.view("bp-a", 20.0).head)  # its own fork
    assert network.final.height >= max(libs) + 5  # the rest of the network finalizes on
    assert model.view("bp-b", 20.0).lib is network.final
    forks = model.ledger.our_blocks - model.ledger.our_canonical
    assert forks == sum(1 for k in range(12, 40) if config.schedule.producer_at(k) == PRODUCER)
    # Back on the network, it takes the branch with the newer QC claim, and its LIB.
    model.rejoin("bp-a", 20.0, 0.0)
    drive(model, range(40, 46))
    view = model.view("bp-a", 23.0)
    assert view.head is model.canonical.head and view.lib is model.canonical.head.final
    assert view.lib.height > max(libs) + 5


def test_a_node_cut_from_p2p_pauses_itself_for_lack_of_the_others_votes() -> None:
    config = ChainConfig(PRODUCER, ("bp-a",), Schedule.round_robin((PRODUCER,), 12),
                         vote_timeout=2.0)
    model = ChainModel(config)
    drive(model, range(10))
    a = model.node("bp-a")
    a.receiving = a.sending = False  # its own votes still count as its producer's
    drive(model, range(10, 30))
    assert model.is_paused("bp-a", 15.0) and not a.paused  # implicitly, not explicitly
    assert a.tracker.reason(15.0) == "no recent votes received from others"
    # Cut at 5 s (the last of the others' votes it got was at 4.5 s): blocks count from
    # 1 s (the tolerance) after the last vote, and the pause starts a timeout after the
    # first of them, at the next slot start.
    first_missed = next(r["slot"] for r in model.ledger.records(0, 100) if not r["blocks"])
    assert 4.5 + BLOCK_TOLERANCE + 2.0 <= first_missed * 0.5 <= 5.0 + BLOCK_TOLERANCE + 3.0


# ---------------------------------------------------------------------- (b) implicit pause

@pytest.mark.parametrize("vote_timeout", [1.0, 6.0])
def test_the_resumed_standby_pauses_itself_a_vote_timeout_after_the_active_node_dies(
        vote_timeout: float) -> None:
    engine, clock = make_engine({"bp-a": False, "bp-b": True}, vote_timeout=vote_timeout)
    tick(engine, clock, 100)  # 10 s: the active node votes on its own blocks
    assert not engine.is_paused("bp-a") and engine.summary()["votes"] >= 99
    engine.go_down("bp-a", None)  # the node with the active BLS key dies
    engine.resume("bp-b")
    took = until(engine, clock, lambda: engine.is_paused("bp-b"), vote_timeout + 3)
    assert took is not None, "the standby never paused"
    # The first block a second (Spring's fixed tolerance) after the last vote starts the
    # clock; the pause shows a vote timeout later.
    assert vote_timeout + BLOCK_TOLERANCE <= took <= vote_timeout + BLOCK_TOLERANCE + 0.3
    assert engine.answer("bp-b", PAUSED, b"").body == b"true"
    status = engine.node_status("bp-b")
    assert status["implicitly_paused"] and status["paused"]
    fins = engine.finalizers()["nodes"]["bp-b"]
    assert fins["implicitly_paused"]
    assert fins["pause_reason"] == "no recent votes received from configured producer"
    tick(engine, clock)  # (the block begun before the pause showed is still signed)
    produced = engine.summary()["blocks_by_node"]["bp-b"]
    assert produced >= 10 * (vote_timeout + BLOCK_TOLERANCE) - 1  # it did produce first
    tick(engine, clock, 20)
    assert engine.summary()["blocks_by_node"]["bp-b"] == produced  # and stopped
    # The chain itself is fine: the other finalizers still make quorum.
    assert engine.summary()["last_irreversible_block_num"] == engine.summary()[
        "head_block_num"] - 2

    # resume clears the blocks it remembers, not the votes: production comes back until
    # the first new block is a vote timeout old (no tolerance this time).
    engine.resume("bp-b")
    assert not engine.is_paused("bp-b")
    again = until(engine, clock, lambda: engine.is_paused("bp-b"), vote_timeout + 2)
    assert again is not None and vote_timeout <= again <= vote_timeout + 0.3
    assert engine.summary()["blocks_by_node"]["bp-b"] >= produced + 10 * vote_timeout - 1


def test_a_vote_timeout_of_zero_disables_the_implicit_pause() -> None:
    engine, clock = make_engine({"bp-a": False, "bp-b": True}, vote_timeout=0.0)
    tick(engine, clock, 5)
    engine.go_down("bp-a", None)
    engine.resume("bp-b")
    assert until(engine, clock, lambda: engine.is_paused("bp-b"), 15.0) is None
    s = engine.summary()
    assert s["blocks_by_node"]["bp-b"] >= 149 and s["missed_slots"] <= 1


def test_the_active_finalizer_votes_while_paused_so_the_other_node_never_pauses() -> None:
    engine, clock = make_engine({"bp-a": False, "bp-b": True}, vote_timeout=1.0)
    tick(engine, clock, 5)
    engine.pause("bp-a")  # paused, not dead: its finalizer still votes on every block
    tick(engine, clock)  # its last block is out (a resume before would sign that slot too)
    engine.resume("bp-b")
    votes = engine.summary()["votes"]
    assert until(engine, clock, lambda: engine.is_paused("bp-b"), 8.0) is None
    s = engine.summary()
    assert s["blocks_by_node"]["bp-b"] >= 79
    assert s["votes"] - votes >= s["blocks_by_node"]["bp-b"]  # bp-a's, on bp-b's blocks
    assert s["double_produced_heights"] == s["vote_equivocations"] == 0


def test_the_pause_lifts_by_itself_when_the_active_finalizer_votes_again() -> None:
    engine, clock = make_engine({"bp-a": True, "bp-b": True}, others=("zz",), spp=6,
                                vote_timeout=1.0)
    engine.resume("bp-a")
    tick(engine, clock, 24)
    engine.go_down("bp-a", None)
    engine.resume("bp-b")
    assert until(engine, clock, lambda: engine.is_paused("bp-b"), 5.0) is not None
    engine.come_up("bp-a")  # pause-on-startup: it votes on zz's blocks, does not produce
    assert engine.is_paused("bp-a") and not engine.model.node("bp-a").tracker.paused(clock.t)
    took = until(engine, clock, lambda: not engine.is_paused("bp-b"), 3.0)
    assert took is not None  # at zz's next block at the latest
    assert engine.summary()["double_produced_heights"] == 0


def test_a_legacy_chain_has_no_votes_and_never_pauses_implicitly() -> None:
    engine, clock = make_engine({"bp-a": False, "bp-b": True}, savanna=False,
                                vote_timeout=1.0)
    tick(engine, clock, 10)
    engine.go_down("bp-a", None)
    engine.resume("bp-b")
    assert until(engine, clock, lambda: engine.is_paused("bp-b"), 10.0) is None
    s = engine.summary()
    assert s["votes"] == 0 and s["savanna"] is False
    assert s["active_finalizer_key"] is None and s["last_irreversible_block_num"] is None
    info = engine.get_info("bp-b")
    assert info.lib.height == info.head.height - 8  # 2/3 of a 12-slot round
    assert engine.finalizers()["active_finalizer_node"] is None
    assert engine.finalizer_keys() == {}


# ---------------------------------------------------------------------- key switch (engine)

def test_actfinkey_is_proposed_then_pending_then_active_as_blocks_become_final() -> None:
    engine, clock = make_engine({"bp-a": False, "bp-b": True},
                                permission_key=public_key_of(FINKEY))
    tick(engine, clock, 10)
    new_key = engine.model.config.key_of("bp-b")
    assert new_key is not None
    info = json.loads(engine.answer("bp-b", GET_INFO, b"").body)
    body = sign_actfinkey(CHAIN_ID, info["last_irreversible_block_id"],
                          seconds_of(info["head_block_time"]) + 60, FINKEY, PRODUCER,
                          "finkey", new_key)
    resp = engine.answer("bp-b", SEND_TRANSACTION2, json.dumps({"transaction": body}).encode())
    assert resp.status == 202, resp.body
    tx_id = json.loads(resp.body)["transaction_id"]
    tick(engine, clock)  # the block in progress carries it
    head = engine.model.canonical.head
    assert head.txs == (tx_id,) and head.signer == "bp-a"
    proposed_at = head.height
    assert head.policies is not None and head.policies.proposed[0][1] == proposed_at
    assert engine.finalizers()["proposed_finalizer_key"] == new_key
    states = []
    for _ in range(6):
        tick(engine, clock)
        h = engine.model.canonical.head
        assert h.policies is not None
        states.append((h.height, h.final.height, h.policies.active.key_of(PRODUCER) == new_key,
                       h.policies.pending is not None))
    # Pending in the first block whose final block is the proposing one, active in the
    # first whose final block is where it became pending (2 blocks each: the 2-chain).
    pending_at = next(height for height, _, _, pending in states if pending)
    active_at = next(height for height, _, active, _ in states if active)
    assert pending_at == proposed_at + 2 and active_at == pending_at + 2
    assert [final for height, final, _, _ in states if height == pending_at] == [proposed_at]
    f = engine.finalizers()
    assert f["active_finalizer_node"] == "bp-b" and f["finalizer_policy_generation"] == 2
    assert f["pending_finalizer_key"] is None and f["proposed_finalizer_key"] is None
    assert f["nodes"]["bp-b"]["active"] and not f["nodes"]["bp-a"]["active"]
    # The same transaction again is a duplicate while it is on the chain.
    resp = engine.answer("bp-b", SEND_TRANSACTION2, json.dumps({"transaction": body}).encode())
    assert resp.status == 500 and json.loads(resp.body)["error"]["name"] == "tx_duplicate"


# ---------------------------------------------------------------------- (c) actfinkey over HTTP

def test_failover_of_the_finalizer_key_with_actfinkey_over_http() -> None:
    keys = {"bp-a": simulated_bls_key("savanna-test/bp-a"),
            "bp-b": simulated_bls_key("savanna-test/bp-b")}
    with SimCluster(PRODUCER, ["bp-a", "bp-b"], block_interval=INTERVAL, bls_keys=keys,
                    pause_on_startup={"bp-b": True}, vote_timeout=0.5,
                    finalizer_permission="finkey",
                    finalizer_permission_key=public_key_of(FINKEY)) as sim:
        a, b = sim.node("bp-a"), sim.node("bp-b")
        sim.wait_slots(3)
        before = finalizer_info(b.url)
        assert policy_key(before["active_finalizer_policy"]) == keys["bp-a"]
        assert before["pending_finalizer_policy"] is None
        generation = before["active_finalizer_policy"]["generation"]

        # The active node dies; the standby takes over and pauses itself.
        a.kill()
        assert post(b.url, "/v1/producer/resume").status_code == 201
        started = time.monotonic()
        wait(lambda: post(b.url, PAUSED).text == "true", 5, "the implicit pause")
        # Not before the tolerance and the vote timeout after bp-a's last vote.
        assert time.monotonic() - started >= 1.0
        status = b.status()
        assert status["paused"] and status["implicitly_paused"]

        # The switch, as the agent sends it.
        body = actfinkey(b.url, keys["bp-b"])
        resp = send2(b.url, body)
        assert resp.status_code == 202, resp.text
        result = resp.json()
        assert result["transaction_id"] == hashlib.sha256(
            bytes.fromhex(body["packed_trx"])).hexdigest()
        trace = result["processed"]
        assert trace["id"] == result["transaction_id"] and trace["except"] is None
        assert trace["receipt"]["status"] == "executed" and trace["error_code"] is None
        act = trace["action_traces"][0]["act"]
        assert (act["account"], act["name"]) == ("eosio", "actfinkey")
        assert act["authorization"] == [{"actor": PRODUCER, "permission": "finkey"}]
        # Paused, bp-b would never include it: resume it for a vote timeout.
        assert post(b.url, "/v1/producer/resume").status_code == 201

        seen: list[tuple[str | None, str | None]] = []

        def switched() -> bool:
            fi = finalizer_info(b.url)
            state = (policy_key(fi["active_finalizer_policy"]),
                     policy_key(fi["pending_finalizer_policy"]))
            if not seen or seen[-1] != state:
                seen.append(state)
            return state[0] == keys["bp-b"]

        wait(switched, 3, "the new key active")
        # Proposed (not shown by get_finalizer_info), then pending, then active.
        assert seen == [(keys["bp-a"], None), (keys["bp-a"], keys["bp-b"]),
                        (keys["bp-b"], None)]
        after = finalizer_info(b.url)["active_finalizer_policy"]
        assert after["generation"] == generation + 1
        assert keys["bp-a"] not in {f["public_key"] for f in after["finalizers"]}
        assert len(after["finalizers"]) == len(before["active_finalizer_policy"]["finalizers"])

        # Its own votes now count as the producer's: it produces on, well past the timeout.
        produced = sim.ledger_summary()["blocks_by_node"]["bp-b"]
        time.sleep(2.0)
        assert post(b.url, PAUSED).text == "false"
        assert sim.ledger_summary()["blocks_by_node"]["bp-b"] >= produced + 15
        assert sim.ledger_summary()["active_finalizer_node"] == "bp-b"
        votes = finalizer_info(b.url)["last_tracked_votes"]
        ours = [v for v in votes if v["description"] == PRODUCER]
        assert ours and ours[0]["public_key"] == keys["bp-b"]
        assert ours[0]["finalizer_policy_generation"] == generation + 1
        assert [v["description"] for v in votes] == sorted(v["description"] for v in votes)

        # The system contract's tables.
        resp = post(b.url, "/v1/chain/get_table_rows",
                    {"code": "eosio", "scope": "eosio", "table": "finkeys", "json": True,
                     "limit": 100})
        finkeys = resp.json()
        assert resp.status_code == 200 and finkeys["more"] is False
        assert finkeys["next_key"] == ""
        for row in finkeys["rows"]:
            assert set(row) == {"id", "finalizer_name", "finalizer_key",
                                "finalizer_key_binary"}
            assert row["finalizer_key_binary"] == decode_bls_public_key(
                row["finalizer_key"]).hex()
            assert len(row["finalizer_key_binary"]) == 192
        ours_rows = {r["finalizer_key"]: r for r in finkeys["rows"]
                     if r["finalizer_name"] == PRODUCER}
        assert set(ours_rows) == set(keys.values())
        resp = post(b.url, "/v1/chain/get_table_rows",
                    {"code": "eosio", "scope": "eosio", "table": "finalizers", "json": True,
                     "lower_bound": PRODUCER, "limit": 1})
        rows = resp.json()["rows"]
        assert rows == [{"finalizer_name": PRODUCER,
                         "active_key_id": ours_rows[keys["bp-b"]]["id"],
                         "active_key_binary": decode_bls_public_key(keys["bp-b"]).hex(),
                         "finalizer_key_count": 2}]

        # The agent retrying the same transaction, and switching to a key already active.
        for resp in (send2(b.url, body), post(b.url, "/v1/chain/push_transaction", body)):
            err = error_of(resp)  # an error body, even with return_failure_trace
            assert (err["name"], err["code"]) == ("tx_duplicate", 3040008)
            assert err["details"][0]["message"] == f"duplicate transaction {trace['id']}"
        resp = send2(b.url, actfinkey(b.url, keys["bp-b"]))
        exc = resp.json()["processed"]["except"]
        assert resp.status_code == 202 and exc["name"] == "eosio_assert_message_exception"
        assert "already active" in exc["stack"][0]["format"]
        s = sim.ledger_summary()
    assert s["double_produced_heights"] == s["vote_equivocations"] == 0


# ---------------------------------------------------------------------- (d) refusals

@pytest.fixture(scope="module")
def chain() -> Iterator[SimCluster]:
    """bp-a produces with the active key; bp-c's key was never registered (regfinkey)."""
    with SimCluster(PRODUCER, ["bp-a", "bp-b", "bp-c"], block_interval=INTERVAL,
                    pause_on_startup={"bp-b": True, "bp-c": True},
                    finalizer_permission="finkey",
                    finalizer_permission_key=public_key_of(FINKEY),
                    unregistered_keys=["bp-c"]) as sim:
        sim.wait_slots(3)
        yield sim


def _bad_tapos(url: str) -> str:
    lib_id = get_info(url)["last_irreversible_block_id"]
    return lib_id[:16] + ("00000000" if lib_id[16:24] != "00000000" else "ffffffff") + \
        lib_id[24:]


REFUSALS: list[tuple[str, dict[str, Any], str, int, str]] = [
    ("wrong signing key", {"signing_key": OTHER_KEY}, "unsatisfied_authorization", 3090003,
     "does not have signatures for it"),
    ("unknown permission", {"permission": "nope"}, "permission_query_exception", 3060001,
     "Failed to retrieve permission"),
    ("key never registered", {"node": "bp-c"}, "eosio_assert_message_exception", 3050003,
     "finalizer key was not registered"),
    ("key of another finalizer", {"bls": simulated_bls_key("finalizer1")},
     "eosio_assert_message_exception", 3050003, "not registered by the finalizer"),
    ("key already active", {"node": "bp-a"}, "eosio_assert_message_exception", 3050003,
     "already active"),
    ("bad TaPoS", {"tapos": True}, "invalid_ref_block_exception", 3040007,
     "reference block"),
    ("expiration too far", {"expires_in": 7200}, "tx_exp_too_far_exception", 3040006,
     "too far"),
]


@pytest.mark.parametrize(("case", "how", "name", "code", "message"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refused_actfinkey_answers_nodeos_errors(chain: SimCluster, case: str,
                                                 how: dict[str, Any], name: str, code: int,
                                                 message: str) -> None:
    url = chain.node("bp-b").url
    bls = how.get("bls") or chain.finalizer_keys()[how.get("node", "bp-b")]
    assert bls is not None
    body = actfinkey(url, bls, signing_key=how.get("signing_key", FINKEY),
                     permission=how.get("permission", "finkey"),
                     expires_in=how.get("expires_in", 60),
                     ref_block_id=_bad_tapos(url) if how.get("tapos") else None)
    # send_transaction2 with return_failure_trace: 202 and the error in the trace.
    resp = send2(url, body)
    assert resp.status_code == 202, resp.text
    trace = resp.json()["processed"]
    assert (trace["except"]["name"], trace["except"]["code"]) == (name, code)
    assert trace["error_code"] == str(code) and trace["receipt"] is None
    assert message in trace["except"]["stack"][0]["format"]
    # push_transaction (and send_transaction) never return failure traces: an error body.
    for path in ("/v1/chain/push_transaction", "/v1/chain/send_transaction"):
        err = error_of(post(url, path, body))
        assert (err["name"], err["code"]) == (name, code)
        assert message in err["details"][0]["message"]
    # Nothing was accepted: the policy is untouched, and a refused transaction is no
    # duplicate when it comes again.
    assert error_of(post(url, "/v1/chain/push_transaction", body))["name"] == name
    fi = finalizer_info(url)
    assert policy_key(fi["active_finalizer_policy"]) == chain.finalizer_keys()["bp-a"]
    assert fi["pending_finalizer_policy"] is None


@pytest.mark.parametrize("path", ["/v1/chain/send_transaction2", "/v1/chain/push_transaction",
                                  "/v1/chain/send_transaction"])
def test_an_expired_transaction_is_an_error_body_even_with_failure_traces(
        chain: SimCluster, path: str) -> None:
    url = chain.node("bp-b").url
    body = actfinkey(url, str(chain.finalizer_keys()["bp-b"]), expires_in=0)
    params = {"return_failure_trace": True, "transaction": body} if path.endswith("2") \
        else body
    err = error_of(post(url, path, params))
    assert (err["name"], err["code"]) == ("expired_tx_exception", 3040005)
    assert err["details"][0]["message"].startswith("expired transaction ")


def test_malformed_transactions_are_refused(chain: SimCluster) -> None:
    url = chain.node("bp-b").url
    body = actfinkey(url, str(chain.finalizer_keys()["bp-b"]))
    err = error_of(post(url, "/v1/chain/push_transaction", {**body, "packed_trx": "00ff"}))
    assert (err["name"], err["code"]) == ("packed_transaction_type_exception", 3010010)
    resp = post(url, "/v1/chain/push_transaction", {"packed_trx": body["packed_trx"],
                                                    "compression": "none"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == 3200006
    resp = post(url, SEND_TRANSACTION2, {"return_failure_trace": True})
    assert resp.status_code == 400


def test_without_linkauth_the_finkey_permission_is_irrelevant_for_actfinkey() -> None:
    with SimCluster(PRODUCER, ["bp-a", "bp-b"], block_interval=INTERVAL,
                    pause_on_startup={"bp-b": True}, finalizer_permission="finkey",
                    finalizer_permission_key=public_key_of(FINKEY),
                    link_finalizer_permission=False) as sim:
        url = sim.node("bp-a").url
        sim.wait_slots(2)
        perms = {p["perm_name"]: p for p in post(
            url, "/v1/chain/get_account", {"account_name": PRODUCER}).json()["permissions"]}
        assert perms["finkey"]["linked_actions"] == []
        body = actfinkey(url, str(sim.finalizer_keys()["bp-b"]))
        trace = send2(url, body).json()["processed"]
        assert (trace["except"]["name"], trace["except"]["code"]) == (
            "irrelevant_auth_exception", 3090005)
        assert "minimum authority is" in trace["except"]["stack"][0]["format"]
        err = error_of(post(url, "/v1/chain/push_transaction", body))
        assert (err["name"], err["code"]) == ("irrelevant_auth_exception", 3090005)


# ---------------------------------------------------------------------- (f) get_account

def test_get_account_shows_the_finkey_permission_linked_to_actfinkey(
        chain: SimCluster) -> None:
    url = chain.node("bp-a").url
    resp = post(url, "/v1/chain/get_account", {"account_name": PRODUCER})
    assert resp.status_code == 200
    account = resp.json()
    assert account["account_name"] == PRODUCER
    perms = {p["perm_name"]: p for p in account["permissions"]}
    assert set(perms) == {"owner", "active", "finkey"}
    finkey = perms["finkey"]
    assert finkey["parent"] == "active"
    assert finkey["required_auth"] == {"threshold": 1, "keys": [
        {"key": public_key_of(FINKEY), "weight": 1}], "accounts": [], "waits": []}
    assert finkey["linked_actions"] == [{"account": "eosio", "action": "actfinkey"}]
    assert perms["active"]["linked_actions"] == [] and perms["owner"]["parent"] == ""
    err = error_of(post(url, "/v1/chain/get_account", {"account_name": "nobody"}))
    assert err["name"] == "account_query_exception"


# ---------------------------------------------------------------------- (e) the ledger

def test_a_shared_bls_key_is_counted_and_two_producers_with_it_equivocate() -> None:
    shared = simulated_bls_key("savanna-test/shared")
    with SimCluster(PRODUCER, ["bp-a", "bp-b"], block_interval=INTERVAL,
                    bls_keys={"bp-a": shared, "bp-b": shared},
                    pause_on_startup={"bp-b": True}) as sim:
        sim.wait_slots(5)
        s = sim.ledger_summary()
        assert s["shared_bls_keys"] == 1
        assert any("configured on bp-a, bp-b" in e for e in s["finality_events"])
        # One producer: both nodes vote with the key, but for the same blocks.
        assert s["vote_equivocations"] == 0 and s["votes"] > 0
        assert sim.finalizers()["nodes"]["bp-b"]["active"]  # both hold the active key
        post(sim.node("bp-b").url, "/v1/producer/resume")
        sim.wait_slots(4)
        s = sim.ledger_summary()
    # Both resumed in the same slots: each votes for its own block of one timestamp.
    assert s["vote_equivocations"] > 0 and s["double_produced_slots"] > 0
    assert any(e.startswith("vote equivocation") for e in s["finality_events"])


def test_per_node_keys_never_equivocate_even_when_two_nodes_produce() -> None:
    with SimCluster(PRODUCER, ["bp-a", "bp-b"], block_interval=INTERVAL,
                    pause_on_startup={"bp-b": True}) as sim:
        sim.wait_slots(5)
        s = sim.ledger_summary()
        assert s["votes"] >= 4 and s["vote_equivocations"] == s["shared_bls_keys"] == 0
        keys = sim.finalizer_keys()
        assert len(set(keys.values())) == 2
        post(sim.node("bp-b").url, "/v1/producer/resume")
        sim.wait_slots(4)
        s = sim.ledger_summary()
    # A double production, but only bp-a's key is in the policy, and its safety file
    # keeps it from voting twice for one timestamp.
    assert s["double_produced_slots"] > 0
    assert s["vote_equivocations"] == 0 and s["finality_events"] == []


# ---------------------------------------------------------------------- (g) legacy

def test_legacy_chain_over_http_has_no_finalizers() -> None:
    with SimCluster(PRODUCER, ["bp-a", "bp-b"], block_interval=INTERVAL, savanna=False,
                    pause_on_startup={"bp-b": True}) as sim, \
            SimCluster(PRODUCER, ["bp-a"], block_interval=INTERVAL) as savanna:
        url = sim.node("bp-a").url
        sim.wait_slots(12)
        info = get_info(url)
        assert info["server_version_string"] == "v5.0.3"
        assert info["server_full_version_string"].startswith("v5.0.3-")
        assert info["last_irreversible_block_num"] == info["head_block_num"] - 8
        assert finalizer_info(url) == {"active_finalizer_policy": None,
                                       "pending_finalizer_policy": None,
                                       "last_tracked_votes": []}
        err = error_of(post(url, "/v1/chain/get_table_rows",
                            {"code": "eosio", "scope": "eosio", "table": "finkeys"}))
        assert err["name"] == "contract_table_query_exception"
        body = actfinkey(url, simulated_bls_key("bp-b"))
        assert error_of(send2(url, body))["code"] == 3000000
        s = sim.ledger_summary()
        assert s["votes"] == 0 and s["savanna"] is False and s["active_finalizer_key"] is None
        assert sim.finalizer_keys() == {} and sim.finalizers()["savanna"] is False

        # The same on a Savanna chain (the default): Spring's version, LIB 2 behind.
        s_url = savanna.node("bp-a").url
        savanna.wait_slots(5)
        s_info = get_info(s_url)
        assert s_info["server_version_string"] == "v1.2.2"
        assert 2 <= s_info["head_block_num"] - s_info["last_irreversible_block_num"] <= 3
        policy = finalizer_info(s_url)["active_finalizer_policy"]
        assert policy["generation"] == 1 and policy["threshold"] == 3
        assert [f["description"] for f in policy["finalizers"]] == [
            "finalizer1", "finalizer2", "finalizer3", PRODUCER]
        assert {f["weight"] for f in policy["finalizers"]} == {1}
        assert policy_key(policy) == savanna.finalizer_keys()["bp-a"]
        schedule = post(s_url, "/v1/chain/get_producer_schedule").json()
        assert schedule["active"]["producers"][0]["producer_name"] == PRODUCER
        assert schedule["pending"] is None and schedule["proposed"] is None
