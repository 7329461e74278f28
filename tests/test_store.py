"""The etcd store and the lease session against a real etcd member."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from bpleader.clock import SystemClock
from bpleader.election import Session
from bpleader.lease_stream import EAGER_FOR, Renewals
from bpleader.localetcd import EtcdCluster
from bpleader.simworld.loop import SimLoop
from bpleader.store import (
    EtcdSettings,
    EtcdStore,
    Keys,
    Lease,
    NodeRecord,
    StoreError,
    parse_snapshot,
)
from harness import delay_proxies

KEYS = Keys("/bpleader", "mybp")


def store_for(cluster: EtcdCluster) -> EtcdStore:
    return EtcdStore(EtcdSettings(tuple(cluster.endpoints), 1.0), KEYS)


def test_election_by_create_revision(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        store = store_for(etcd1)
        try:
            a = await store.grant(5)
            b = await store.grant(5)
            # Campaign in the order b, a: lease ids are not ordered, revisions are.
            cb = await store.campaign(b.id, "bp-b")
            ca = await store.campaign(a.id, "bp-a")
            assert await store.campaign(b.id, "bp-b") == cb  # idempotent
            assert await store.confirm_leader(cb)
            assert not await store.confirm_leader(ca)
            snap = await store.snapshot()
            assert [c.node for c in snap.candidates] == ["bp-b", "bp-a"]
            assert etcd1.elect_leader(KEYS.election.rstrip("/")) == "bp-b"
            await store.resign(cb)
            assert await store.confirm_leader(ca)
            await store.revoke(a.id)
            assert await store.keepalive(a.id) == 0  # TTL 0, not an error
            assert (await store.snapshot()).candidates == ()
            await store.revoke(a.id)  # revoking a gone lease is not an error
        finally:
            store.close()

    asyncio.run(scenario())


def test_records_switchover_and_maintenance(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        store = store_for(etcd1)
        try:
            lease = await store.grant(5)
            await store.publish(NodeRecord("bp-a", role="leader", in_sync=True,
                                           head_block_num=42, paused=False), lease.id)
            await store.request_switchover("bp-b", 10)
            await store.set_maintenance("upgrade")
            snap = await store.snapshot()
            assert snap.records["bp-a"].head_block_num == 42
            assert snap.records["bp-a"].role == "leader"
            assert snap.switchover == "bp-b" and snap.maintenance == "upgrade"
            await store.clear_switchover("bp-c")  # names another target: kept
            assert (await store.snapshot()).switchover == "bp-b"
            await store.clear_switchover("bp-b")
            await store.set_maintenance(None)
            snap = await store.snapshot()
            assert snap.switchover is None and snap.maintenance is None
        finally:
            store.close()

    asyncio.run(scenario())


def test_the_fencing_check_keeps_a_last_record_and_drops_the_old_handover(
        etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        store = store_for(etcd1)
        try:
            lease = await store.grant(5)
            me = await store.campaign(lease.id, "bp-a")
            await store.leave_handover("bp-a", 40)  # an earlier term's final head
            rec = NodeRecord("bp-a", role="taking_over", in_sync=True, head_block_num=42,
                             paused=True, updated=1000.0)
            assert await store.confirm_leader(me)  # without a record: nothing written
            snap = await store.snapshot()
            assert snap.handovers == {"bp-a": 40} and "bp-a" not in snap.lasts
            assert await store.confirm_leader(me, rec)
            snap = await store.snapshot()
            assert snap.lasts["bp-a"].head_block_num == 42 and "bp-a" not in snap.handovers
            await store.revoke(lease.id)  # the last record outlives the lease
            assert (await store.snapshot()).lasts["bp-a"].updated == 1000.0
        finally:
            store.close()

    asyncio.run(scenario())


def test_unreachable_etcd_is_a_store_error(etcd1: EtcdCluster) -> None:
    store = store_for(etcd1)
    etcd1.stop()
    try:
        with pytest.raises(StoreError):
            asyncio.run(store.snapshot())
    finally:
        store.close()


@pytest.mark.parametrize("raw", [b"", b"null", b"[1]", b"{\"head_block_num\": \"x\"}",
                                 b"\xff\xfe", b"{" * 5000, b"{\"role\": 7, \"lag\": true}"])
def test_garbage_node_records_never_raise(raw: bytes) -> None:
    rec = NodeRecord.parse("bp-x", raw)
    assert rec.node == "bp-x"
    assert rec.head_block_num >= 0
    assert rec.role == "unknown" or rec.valid


def test_foreign_election_key_counts_as_candidate() -> None:
    snap = parse_snapshot(KEYS, 9, [
        (KEYS.election + "zz", b"intruder", 3, 0),
        (KEYS.election + "1a", b"bp-a", 5, 26),
    ])
    assert snap.leader is not None and snap.leader.node == "intruder"


def test_session_renews_and_notices_a_revoked_lease(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        store = store_for(etcd1)
        clock = SystemClock()
        deadlines: list[float] = []
        session = Session(store, clock, ttl=2, interval=0.3, on_renew=deadlines.append)
        try:
            await session.step()  # grant
            assert session.lease is not None and session.lease.ttl == 2
            first = session.lease
            await session.step()  # renew
            assert deadlines and deadlines[-1] <= clock.now() + 2
            assert 0 < session.remaining(clock.now()) <= 2
            await store.revoke(first.id)
            await session.step()  # keepalive answers TTL 0: lost at once
            assert session.lease is None and session.stats.losses == 1
            await session.step()  # a fresh lease
            assert session.lease is not None and session.lease.id != first.id
        finally:
            store.close()

    asyncio.run(scenario())


class _ScriptedRenewals:
    """The part of a store a :class:`Session` uses, on virtual time: each renewal takes
    the next of ``script`` (seconds, then answered; or negative: fails after that long,
    as a renewal lost on every member fails at its timeout)."""

    def __init__(self, script: list[float]) -> None:
        self.script = script
        self.sent: list[float] = []

    async def grant(self, ttl: int) -> Lease:
        return Lease(1, ttl)

    async def keepalive(self, lease_id: int) -> int:
        self.sent.append(asyncio.get_running_loop().time())
        took = self.script.pop(0) if self.script else 0.001
        await asyncio.sleep(abs(took))
        if took < 0:
            raise StoreError("keepalive", "no keepalive reply within 0.3 s")
        return 2


class _LoopClock:
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    wall = now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _renewal_sends(script: list[float], until: float) -> list[float]:
    store = _ScriptedRenewals(script)
    session = Session(store, _LoopClock(), ttl=2, interval=0.3,  # type: ignore[arg-type]
                      on_renew=lambda _: None)

    async def run() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.run(), until)

    loop = SimLoop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return [round(t, 3) for t in store.sent]


def test_renewals_keep_their_cadence_from_the_send_through_slow_and_lost_answers() -> None:
    """Fast profile: renewals every 0.3 s with a 0.3 s call timeout, and the fence 1.1 s
    after the last answered send. A late answer (0.25 s) then two renewals lost on every
    member: counted from each answer, the next try went out 0.55 s and 0.6 s later, and
    the third came after the fence (at 30 % loss in the chaos benchmark, 2 spurious
    moves in 10 trials); counted from the send, it goes out 0.9 s after the last
    answered send, inside the fence, and answers cost nothing at rest."""
    sends = _renewal_sends([0.25, -0.3, -0.3, 0.001], until=2.0)
    assert sends[:4] == [0.3, 0.6, 0.9, 1.2]
    answered = sends[0]
    assert sends[3] - answered < 2 - 0.9  # the fourth try is sent before the fence
    # A renewal that fails at once is not retried in a loop: the next still waits.
    quick_failures = _renewal_sends([-0.001] * 10, until=1.0)
    assert quick_failures == [0.3, 0.6, 0.9]


def test_a_call_moves_on_to_a_member_that_answers(etcd1: EtcdCluster) -> None:
    """pyetcd draws a member at random and does not retry when it is down: a one-shot
    command (status, switchover) failed whenever it drew a dead member."""
    from bpleader.localetcd import free_ports

    dead = [f"http://127.0.0.1:{p}" for p in free_ports(2)]

    async def first_call() -> int:
        store = EtcdStore(EtcdSettings((*dead, *etcd1.endpoints), 0.5), KEYS)
        try:
            return (await store.snapshot()).revision
        finally:
            store.close()

    # Ten fresh clients: without the retry each draws a dead member with p = 2/3.
    for _ in range(10):
        assert asyncio.run(first_call()) > 0


def _lease_counters(url: str) -> tuple[float, float]:
    """etcd's own count of LeaseKeepAlive calls handled and messages received."""
    import httpx

    handled = received = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=2).text.splitlines():
        if 'grpc_method="LeaseKeepAlive"' not in line:
            continue
        if line.startswith("grpc_server_handled_total{"):
            handled += float(line.rsplit(" ", 1)[1])
        elif line.startswith("grpc_server_msg_received_total{"):
            received += float(line.rsplit(" ", 1)[1])
    return handled, received


def test_renewals_are_messages_on_one_kept_stream(etcd1: EtcdCluster) -> None:
    """Each renewal used to be a gRPC call of its own (3.3 calls a second per agent at the
    fast profile); etcd now sees one open stream and a message per renewal."""
    async def scenario() -> tuple[float, float]:
        store = store_for(etcd1)
        try:
            lease = await store.grant(5)
            before = _lease_counters(etcd1.endpoints[0])
            for _ in range(20):
                assert await store.keepalive(lease.id) == 5
            after = _lease_counters(etcd1.endpoints[0])
            return after[0] - before[0], after[1] - before[1]
        finally:
            store.close()

    handled, received = asyncio.run(scenario())
    assert received == 20
    assert handled <= 1  # the stream of a first renewal counts once when it ends


async def _renewing(store: EtcdStore, ttl: int) -> tuple[Lease, Renewals]:
    """A lease with one answered renewal, and the store's renewals of it."""
    lease = await store.grant(ttl)
    assert await store.keepalive(lease.id) == ttl
    assert store._renewals is not None
    return lease, store._renewals


def test_a_renewal_that_times_out_never_answers_the_next(etcd1: EtcdCluster) -> None:
    """Replies on a stream come in order: had the timed-out renewal's late reply been read
    as the next renewal's, its deadline would count from the later send. The stream is
    kept (no new call and threads per lost reply), its late reply is skipped, and the
    next renewal is answered by a reply of its own."""
    import os
    import signal

    member = etcd1.members[0]
    assert member.proc is not None

    async def scenario() -> None:
        store = store_for(etcd1)
        try:
            lease, renewals = await _renewing(store, 10)
            first = list(renewals._streams.values())
            assert len(first) == 1
            os.kill(member.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(StoreError, match="deadline_exceeded"):
                    await store.keepalive(lease.id)
                assert first[0].pending == 1
            finally:
                os.kill(member.proc.pid, signal.SIGCONT)
            # pyetcd retries the member it marked failed after retry_member_after (2 s);
            # meanwhile the late reply has come back on the kept stream.
            await asyncio.sleep(2.5)
            assert renewals.late == 0
            assert await store.keepalive(lease.id) == 10
            assert renewals.late == 1  # the late reply, skipped: not this renewal's
            assert store._renewals is renewals
            assert list(renewals._streams.values()) == first and first[0].pending == 0
            # Two renewals unanswered on a stream: it is replaced by a fresh one.
            os.kill(member.proc.pid, signal.SIGSTOP)
            try:
                for _ in range(2):
                    with pytest.raises(StoreError):
                        await store.keepalive(lease.id)
                    await asyncio.sleep(2.1)  # past pyetcd's retry_member_after
            finally:
                os.kill(member.proc.pid, signal.SIGCONT)
            await asyncio.sleep(2.1)
            assert await store.keepalive(lease.id) == 10
            assert first[0].closed and first[0] not in renewals._streams.values()
        finally:
            store.close()

    asyncio.run(scenario())


def test_renewals_move_to_another_member_when_theirs_dies(etcd3: EtcdCluster) -> None:
    async def scenario() -> None:
        store = store_for(etcd3)
        try:
            lease = await store.grant(10)
            assert await store.keepalive(lease.id) == 10
            renewals = store._renewals
            assert renewals is not None and renewals.hedges == 0
            serving = next(m for m in etcd3.members if f":{m.client_port}"
                           in store._client.endpoint_in_use.netloc)
            etcd3.kill(serving)
            assert await store.keepalive(lease.id) == 10  # one call: answered by another
            assert renewals.hedges == 1
            await store.snapshot()  # pyetcd has set the dead member aside
            assert f":{serving.client_port}" not in store._client.endpoint_in_use.netloc
        finally:
            store.close()

    asyncio.run(scenario())


def test_a_far_etcd_is_used_though_connecting_outlasts_the_call_timeout(
        etcd1: EtcdCluster) -> None:
    """etcd 150 ms away, a 0.3 s call timeout (the fast profile's): a call on a channel
    that must connect first takes two round trips and times out. The store used to
    replace its client after every member had failed, throwing the connections being
    made away, and so failed call after call for seconds (the chaos benchmark at 150 ms
    lost leases that way); it now keeps them, connecting every member at once."""
    import time

    failures: list[tuple[float, str]] = []

    async def run(endpoints: tuple[str, ...]) -> float:
        store = EtcdStore(EtcdSettings(endpoints, 0.3), KEYS)
        store.watch(lambda: None)
        start = time.monotonic()
        first_ok = float("inf")
        lease = None
        try:
            while time.monotonic() - start < 4.0:
                try:
                    if lease is None:
                        lease = await store.grant(2)
                    else:
                        assert await store.keepalive(lease.id) > 0
                    await store.snapshot()
                    first_ok = min(first_ok, time.monotonic() - start)
                except StoreError as exc:
                    failures.append((time.monotonic() - start, exc.reason))
                await asyncio.sleep(0.25)
        finally:
            store.close()
        return first_ok

    with delay_proxies(etcd1.endpoints[0].removeprefix("http://"), [0.075] * 3) as ports:
        first_ok = asyncio.run(run(tuple(f"http://127.0.0.1:{port}" for port in ports)))
    assert first_ok < 1.5, failures
    assert not [f for f in failures if f[0] > first_ok], failures


def test_connecting_every_member_leaves_no_thread_behind(etcd1: EtcdCluster) -> None:
    """The store connects to every member at once by watching each channel's state;
    gRPC polls a watched channel from a thread every 0.2 s for as long as the watch
    lasts, so the watch must end once the channel is up (a run of the chaos benchmark
    measured the CPU of pollers kept for good)."""
    import threading

    async def run() -> list[str]:
        before = {t.ident for t in threading.enumerate()}
        store = EtcdStore(EtcdSettings(tuple(etcd1.endpoints), 1.0), KEYS)
        try:
            await store.snapshot()
            await asyncio.sleep(1.0)  # five polling periods
            return [t.name for t in threading.enumerate()
                    if t.ident not in before and not t.name.startswith("etcd")]
        finally:
            store.close()

    assert asyncio.run(run()) == []


def test_a_renewal_the_member_in_use_leaves_unanswered_is_answered_by_another(
        etcd1: EtcdCluster) -> None:
    """On a lossy link one lost segment holds a reply for a TCP retransmission timeout,
    longer than the fast profile's whole call timeout; renewals on the member in use
    timed out one after another and the fences fired (the chaos benchmark's 30 % loss).
    A renewal not answered within a share of the timeout now goes to every member, and
    the first reply counts. Here the member in use answers 1.5 s late, every time."""
    async def run(ports: list[int]) -> int:
        endpoints = tuple(f"http://127.0.0.1:{port}" for port in ports)
        slow = {f"127.0.0.1:{port}" for port in ports[1:]}
        store = EtcdStore(EtcdSettings(endpoints, 0.6), KEYS, retry_member_after=0.0)
        try:
            client = store._client = store._connect()
            # pyetcd asks the member in use first: the quick one for the grant, then a slow one.
            client._current_endpoint_label = next(m for m in client.endpoints if m not in slow)
            lease = await store.grant(5)
            client._current_endpoint_label = next(m for m in client.endpoints if m in slow)
            for _ in range(5):  # each raises if no reply came within the 0.6 s timeout
                assert await store.keepalive(lease.id) > 0
            assert store._renewals is not None
            # Still slow: the next renewals go to every member at once.
            assert store._renewals._eager == EAGER_FOR
            return store._renewals.hedges
        finally:
            store.close()

    with delay_proxies(etcd1.endpoints[0].removeprefix("http://"), [0.0, 1.5, 1.5]) as ports:
        hedges = asyncio.run(run(ports))
    assert hedges == 5


def test_renewals_sent_to_every_member_keep_their_streams(etcd3: EtcdCluster) -> None:
    """Sent to every member at once (after a slow or failed renewal), a renewal is
    answered by the quickest; the other copies are answered a moment later. Their
    streams used to be closed and opened again for every renewal (a gRPC call and two
    threads each, and one more call handled by etcd): in the scale run, 200 agents in
    one starved process sent copies, and the churn raised etcd's calls per agent at
    rest from 0.6 to 1.5 per second. The streams are now kept; each late reply is
    read, and skipped, at the next renewal."""
    async def run() -> tuple[list[set[int]], int]:
        store = store_for(etcd3)
        try:
            lease, renewals = await _renewing(store, 5)
            renewals._eager = EAGER_FOR
            seen: list[set[int]] = []
            for _ in range(5):
                assert await store.keepalive(lease.id) == 5
                seen.append({id(s) for s in renewals._streams.values()})
                await asyncio.sleep(0.1)
            return seen, renewals.late
        finally:
            store.close()

    seen, late = asyncio.run(run())
    assert len(seen[0]) == 3 and all(streams == seen[0] for streams in seen)  # the same 3
    assert late >= 2 * 4  # each renewal after the first skipped the copies' late replies


def test_a_renewal_goes_out_when_pyetcd_has_set_every_member_aside(etcd3: EtcdCluster) -> None:
    """pyetcd sets a member that failed a call aside for retry_member_after. At 30 % loss
    all three were at times, and renewals then failed at once without being sent ("No
    endpoint available") until the fences fired. A renewal now goes out anyway."""
    async def scenario() -> None:
        store = store_for(etcd3)
        try:
            lease = await store.grant(10)
            for endpoint in store._client.endpoints.values():
                endpoint.fail()
            assert await store.keepalive(lease.id) == 10
        finally:
            store.close()

    asyncio.run(scenario())
