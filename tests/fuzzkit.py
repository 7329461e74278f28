"""Bad inputs by construction, and an in-memory world in which to feed them to the agent.

Shared by the property tests (tests/test_sec_fuzz.py) and the longer run
(benchmarks/fuzz_inputs.py). Every strategy here yields input that is *wrong*, never
input that merely looks unusual: so "never a resume" is the right expectation for all of
it, and a resume would be a bug. A control with good input shows the same world does
reach a resume, so the properties can fail.

The agent runs its real code end to end: :class:`bpleader.nodeos.NodeosClient` parses
the fuzzed HTTP bodies (answered in place of its connections), :func:`parse_snapshot` parses
the fuzzed etcd values, and :meth:`Agent.tick` decides. Only time, etcd's storage and
the fences are in-memory fakes of the agent's protocols.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st

from bpleader.agent import Agent, AgentSettings, Role
from bpleader.nodeos import NodeosClient, SyncEvaluator
from bpleader.store import (
    Candidate,
    Keys,
    Lease,
    NodeRecord,
    Snapshot,
    handover_value,
    parse_snapshot,
)

PRODUCER = "mybp"
NODE = "bp-a"
KEYS = Keys("/bpleader", PRODUCER)
CHAIN_ID = "ab" * 32
OUR_REVISION = 1_000_000  # our election key; fuzzed foreign keys below it lead

SETTINGS = AgentSettings(node=NODE, producer=PRODUCER, lease_ttl=5, keepalive_interval=1.0,
                         fence_guard=1.5, takeover_delay=1.0, check_interval=0.5,
                         nodeos_timeout=0.05, continuity_timeout=5.0, doppelganger_quiet=60.0)


def block_time(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def good_info(head: int, wall: float) -> dict[str, Any]:
    return {"server_version": "d133c641", "chain_id": CHAIN_ID, "head_block_num": head,
            "last_irreversible_block_num": max(1, head - 300),
            "head_block_id": f"{head:08x}" + "0" * 56, "head_block_time": block_time(wall),
            "head_block_producer": "otherbp", "server_version_string": "v5.0.3"}


# ------------------------------------------------------------------ nodeos replies

@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    why: str  # the bad-input class, for the counts


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=10), c, max_size=4), max_leaves=8)

INT_FIELDS = ("head_block_num", "last_irreversible_block_num")
STR_FIELDS = ("head_block_producer", "chain_id", "head_block_time")
not_int = (st.text(max_size=12) | st.floats() | st.booleans() | st.none()
           | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3),
                                                                   st.integers(), max_size=2))
not_str = (st.integers() | st.floats() | st.booleans() | st.none()
           | st.lists(st.text(max_size=3), max_size=2))
# Never a valid ISO date: fromisoformat rejects anything starting with a letter.
bad_time = st.text(max_size=30).map(lambda t: "x" + t)


def _dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def bad_info_reply(draw: st.DrawFn) -> Reply:
    """A get_info reply the agent must not accept as chain state."""
    kind = draw(st.sampled_from(["non-json", "html", "not-object", "missing-field",
                                 "wrong-type-int", "wrong-type-str", "bad-time", "deep",
                                 "huge", "error-status", "truncated"]))
    base = good_info(draw(st.integers(1, 10**9)), time.time())
    if kind == "non-json":
        return Reply(200, b"\xff" + draw(st.binary(max_size=64)), kind)
    if kind == "html":
        return Reply(200, b"<html>" + draw(st.text(max_size=64)).encode(), kind)
    if kind == "not-object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return Reply(200, _dump(value), kind)
    if kind == "missing-field":
        del base[draw(st.sampled_from(INT_FIELDS + STR_FIELDS))]
    elif kind == "wrong-type-int":
        base[draw(st.sampled_from(INT_FIELDS))] = draw(not_int)
    elif kind == "wrong-type-str":
        base[draw(st.sampled_from(STR_FIELDS))] = draw(not_str)
    elif kind == "bad-time":
        base["head_block_time"] = draw(bad_time)
    elif kind == "deep":
        depth = draw(st.integers(1_000, 200_000))
        return Reply(200, b"[" * depth + b"]" * depth, kind)
    elif kind == "huge":
        # A valid object buried in megabytes of padding is still a broken nodeos.
        return Reply(200, b'{"pad":"' + b"a" * draw(st.integers(1 << 16, 1 << 21)) + b'"}',
                     kind)
    elif kind == "error-status":
        return draw(error_reply())
    elif kind == "truncated":
        raw = _dump(base)
        return Reply(200, raw[:draw(st.integers(0, len(raw) - 1))], kind)
    # A few extra random fields never make a broken object right.
    base.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in base),
                                     json_values, max_size=3)))
    return Reply(200, _dump(base), kind)


@st.composite
def error_reply(draw: st.DrawFn) -> Reply:
    status = draw(st.sampled_from([400, 401, 403, 404, 409, 500, 502, 503]))
    body = draw(st.one_of(
        st.builds(lambda c, m, n, w, d: _dump({"code": c, "message": m, "error": {
            "code": n, "name": "x", "what": w, "details": d}}),
            json_values, json_values, json_values, json_values, json_values),
        st.binary(max_size=80), st.just(b"")))
    return Reply(status, body, "error-status")


@st.composite
def bad_paused_reply(draw: st.DrawFn) -> Reply:
    """Anything but a bare JSON true or false."""
    kind = draw(st.sampled_from(["not-bool", "non-json", "error-status", "string-bool"]))
    if kind == "not-bool":
        value = draw(json_values.filter(lambda v: not isinstance(v, bool)))
        return Reply(201, _dump(value), kind)
    if kind == "string-bool":
        return Reply(201, _dump(draw(st.sampled_from(["true", "false", "True", "1"]))), kind)
    if kind == "non-json":
        return Reply(201, b"\xff" + draw(st.binary(max_size=40)), kind)
    return draw(error_reply())


# --------------------------------------------------------------------- etcd values

@dataclass(frozen=True)
class ForeignKV:
    key: str
    value: bytes
    create_revision: int
    why: str


garbage_bytes = st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode),
                          json_values.map(_dump))


@st.composite
def foreign_kv(draw: st.DrawFn) -> ForeignKV:
    """A value someone else wrote under the producer's prefix."""
    kind = draw(st.sampled_from(["election-lower", "election-higher", "record-garbage",
                                 "record-fake-leader", "huge", "unknown-key", "bad-utf8-key",
                                 "switchover", "maintenance"]))
    rev = draw(st.integers(1, OUR_REVISION - 1))
    suffix = draw(st.text(min_size=1, max_size=20))
    if kind == "election-lower":
        return ForeignKV(KEYS.election + suffix, draw(garbage_bytes), rev, kind)
    if kind == "election-higher":
        return ForeignKV(KEYS.election + suffix, draw(garbage_bytes),
                         OUR_REVISION + draw(st.integers(1, 10**6)), kind)
    if kind == "record-garbage":
        return ForeignKV(KEYS.root + "nodes/" + suffix, draw(garbage_bytes), rev, kind)
    if kind == "record-fake-leader":
        value = {"role": "leader", "in_sync": True, "paused": False,
                 "head_block_num": draw(st.integers(-2**70, 2**70) | not_int)}
        return ForeignKV(KEYS.root + "nodes/" + suffix, _dump(value), rev, kind)
    if kind == "huge":
        where = draw(st.sampled_from(["nodes/", "election/", "", "switchover"]))
        size = draw(st.integers(4097, 1 << 20))
        return ForeignKV(KEYS.root + where + (suffix if where.endswith("/") else ""),
                         b"{" + b" " * size, rev, kind)
    if kind == "unknown-key":
        return ForeignKV(KEYS.root + "x" + suffix, draw(garbage_bytes), rev, kind)
    if kind == "bad-utf8-key":
        return ForeignKV((KEYS.root + "nodes/").encode().decode() + "\udcff".encode(
            "utf-8", "surrogatepass").decode("utf-8", "replace"), draw(garbage_bytes), rev,
            kind)
    if kind == "switchover":
        return ForeignKV(KEYS.switchover, draw(garbage_bytes), rev, kind)
    return ForeignKV(KEYS.maintenance, draw(garbage_bytes), rev, kind)


# ------------------------------------------------------------------- the fake world

class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall0 = time.time()

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.wall0 + (self.t - 1000.0)

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


class FakeFencer:
    def __init__(self) -> None:
        self.armed: float | None = None

    def arm(self, pause_at: float) -> None:
        self.armed = pause_at

    def disarm(self) -> None:
        self.armed = None


@dataclass
class FakeStore:
    """etcd's semantics for the agent's operations, over an in-memory key space."""

    keys: Keys = KEYS
    foreign: list[ForeignKV] = field(default_factory=list)
    kv: dict[str, tuple[bytes, int, int]] = field(default_factory=dict)  # value, rev, lease
    revision: int = OUR_REVISION
    snapshots: list[Snapshot] = field(default_factory=list)

    def _all(self) -> list[tuple[str, bytes, int, int]]:
        own = [(k, v, r, lease) for k, (v, r, lease) in self.kv.items()]
        return own + [(f.key, f.value, f.create_revision, 0) for f in self.foreign]

    async def grant(self, ttl: int) -> Lease:
        return Lease(0x1234, ttl)

    async def keepalive(self, lease_id: int) -> int:
        return SETTINGS.lease_ttl

    async def revoke(self, lease_id: int) -> None:
        self.kv = {k: v for k, v in self.kv.items() if v[2] != lease_id}

    def watch(self, on_change: Callable[[], None]) -> None:
        return None  # the fuzz tests read on every tick

    async def snapshot(self) -> Snapshot:
        snap = parse_snapshot(self.keys, self.revision, self._all())
        self.snapshots.append(snap)
        return snap

    async def campaign(self, lease_id: int, node: str) -> Candidate:
        key = self.keys.candidate(lease_id)
        if key not in self.kv:
            self.kv[key] = (node.encode(), OUR_REVISION, lease_id)
        return Candidate(key, node, lease_id, self.kv[key][1])

    async def confirm_leader(self, me: Candidate, last: NodeRecord | None = None) -> bool:
        if key_rev := self.kv.get(me.key):
            revs = [r for k, _v, r, _l in self._all() if k.startswith(self.keys.election)]
            return key_rev[1] == me.create_revision and min(revs) == me.create_revision
        return False

    async def resign(self, me: Candidate, last_head: int = 0, stopped: float = 0.0) -> None:
        self.kv.pop(me.key, None)
        if last_head > 0:
            self.kv[self.keys.handover(me.node)] = (
                handover_value(me.node, last_head, me.create_revision, stopped).encode(), 1,
                0)

    async def publish(self, record: NodeRecord, lease_id: int, keep: bool = False) -> None:
        self.kv[self.keys.node(record.node)] = (record.to_json().encode(), 1, lease_id)
        if keep:
            self.kv[self.keys.last(record.node)] = (record.to_json().encode(), 1, 0)

    async def clear_switchover(self, target: str) -> None:
        pass

    async def mark_unfenced(self, node: str, reason: str) -> None:
        self.kv[self.keys.unfenced_node(node)] = (reason.encode(), 1, 0)

    async def clear_unfenced(self, node: str) -> None:
        self.kv.pop(self.keys.unfenced_node(node), None)

    async def leave_handover(self, node: str, head: int, by: str = "") -> None:
        self.kv[self.keys.handover(node)] = (handover_value(node, head, by=by).encode(), 1,
                                             0)


@dataclass
class FakeNodeos:
    """nodeos's HTTP answers: good ones from a chain that advances with the clock, or the
    next fuzzed reply of each script."""

    clock: FakeClock
    info_script: list[Reply | None] = field(default_factory=list)  # None: a good reply
    paused_script: list[Reply | None] = field(default_factory=list)
    paused: bool = False  # nodeos restarted unpaused: the agent must pause it first
    calls: list[str] = field(default_factory=list)
    served_bad: list[str] = field(default_factory=list)

    async def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """In place of :class:`bpleader.nodeos.Connections`: status and body."""
        self.calls.append(path)
        if path.endswith("/get_info"):
            reply = self.info_script.pop(0) if self.info_script else None
            if reply is None:
                head = int(self.clock.now() * 2)
                return 200, _dump(good_info(head, self.clock.wall()))
        elif path.endswith("/paused"):
            reply = self.paused_script.pop(0) if self.paused_script else None
            if reply is None:
                return 201, _dump(self.paused)
        else:
            if path.endswith("/pause"):
                self.paused = True
            elif path.endswith("/resume"):
                self.paused = False
            return 201, b'{"result":"ok"}'
        self.served_bad.append(reply.why)
        return reply.status, reply.body

    async def aclose(self) -> None:
        return None

    @property
    def resumes(self) -> int:
        return sum(1 for c in self.calls if c.endswith("/resume"))


@dataclass
class Run:
    agent: Agent
    nodeos: FakeNodeos
    store: FakeStore
    roles: list[Role]


async def drive(ticks: int, info: list[Reply | None] | None = None,
                paused: list[Reply | None] | None = None,
                foreign: list[ForeignKV] | None = None,
                on_tick: Callable[[Agent], None] = lambda a: None) -> Run:
    """Run ``ticks`` agent ticks (with a lease renewal before each) in the fake world."""
    clock = FakeClock()
    fake = FakeNodeos(clock, list(info or []), list(paused or []))
    store = FakeStore(foreign=list(foreign or []))
    client = NodeosClient("http://127.0.0.1:8888", SETTINGS.nodeos_timeout)
    await client.aclose()
    client._http = fake  # type: ignore[assignment]
    agent = Agent(SETTINGS, clock, store, client, FakeFencer(),
                  SyncEvaluator(3.0, CHAIN_ID))
    roles: list[Role] = []
    try:
        for _ in range(ticks):
            await agent.session.step()
            await agent.tick()
            roles.append(agent.role)
            on_tick(agent)
            clock.t += SETTINGS.check_interval
    finally:
        await client.aclose()
    return Run(agent, fake, store, roles)
