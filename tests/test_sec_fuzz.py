"""Property tests over every input the agent parses: nodeos replies, values others wrote
under the etcd prefix, the configuration file and its environment overrides.

The property, for each: never an unhandled exception, never a resume caused by bad input,
always a clear, counted error. A control run with good input resumes, so the "never a
resume" properties are able to fail. benchmarks/fuzz_inputs.py runs the same with many
more examples.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpleader.agent import Agent, Role
from bpleader.config import SECRETS, SECTIONS, ConfigError, load_config, parse_config
from bpleader.nodeos import NodeosError, parse_info, parse_response
from bpleader.store import parse_snapshot
from fuzzkit import (
    KEYS,
    OUR_REVISION,
    ForeignKV,
    Reply,
    bad_info_reply,
    bad_paused_reply,
    drive,
    foreign_kv,
    json_values,
)

TICKS = 10
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NEVER_PAST_FOLLOWER = {Role.CANDIDATE, Role.TAKING_OVER, Role.LEADER}


def test_control_good_input_resumes() -> None:
    run = asyncio.run(drive(TICKS))
    assert run.nodeos.resumes == 1 and run.agent.role == Role.LEADER
    assert run.agent.stats.nodeos_errors == 0 and run.agent.stats.etcd_errors == 0


@FAST
@given(st.lists(bad_info_reply(), min_size=1, max_size=TICKS))
def test_bad_get_info_never_resumes(replies: list[Reply]) -> None:
    # Cycled, so that every get_info of the run (retries included) is bad.
    run = asyncio.run(drive(TICKS, info=list(replies) * (4 * TICKS)))
    assert run.nodeos.resumes == 0
    assert not NEVER_PAST_FOLLOWER & set(run.roles), run.roles
    assert run.agent.stats.nodeos_errors >= TICKS  # one counted error per tick at least
    assert run.agent.last is not None and not run.agent.last.sync.in_sync
    assert "\n" not in run.agent.last.sync.reason


@FAST
@given(st.lists(bad_paused_reply(), min_size=1, max_size=TICKS))
def test_bad_paused_never_resumes(replies: list[Reply]) -> None:
    run = asyncio.run(drive(TICKS, paused=list(replies) * (8 * TICKS)))
    assert run.nodeos.resumes == 0
    assert not NEVER_PAST_FOLLOWER & set(run.roles), run.roles
    assert not any(k.startswith(KEYS.election) for k in run.store.kv)  # never campaigned
    assert run.agent.stats.nodeos_errors >= TICKS


@FAST
@given(st.lists(st.none() | bad_info_reply(), min_size=TICKS, max_size=3 * TICKS),
       st.lists(st.none() | bad_paused_reply(), min_size=TICKS, max_size=3 * TICKS))
def test_mixed_nodeos_garbage_is_survived_and_counted(info: list[Reply | None],
                                                      paused: list[Reply | None]) -> None:
    seen: list[tuple[int, bool]] = []

    def record(agent: Agent) -> None:
        assert agent.last is not None
        seen.append((agent.stats.resumes, agent.last.sync.in_sync))

    run = asyncio.run(drive(TICKS, info=info, paused=paused, on_tick=record))
    if run.nodeos.served_bad:
        assert run.agent.stats.nodeos_errors >= 1
    resumes_before = 0
    for resumes, in_sync in seen:
        # A tick that resumed had observed a good, in-sync get_info.
        assert resumes == resumes_before or in_sync
        resumes_before = resumes


@FAST
@given(st.lists(foreign_kv(), min_size=1, max_size=6))
def test_etcd_garbage_never_raises_and_never_lets_us_jump_the_queue(
        foreign: list[ForeignKV]) -> None:
    run = asyncio.run(drive(TICKS, foreign=foreign))
    kinds = {f.why for f in foreign}
    lower_election = any(f.key.startswith(KEYS.election) and f.create_revision < OUR_REVISION
                         for f in foreign)
    if lower_election or "maintenance" in kinds:
        assert run.nodeos.resumes == 0, kinds
        assert Role.LEADER not in run.roles
    if "switchover" in kinds and run.nodeos.resumes:
        # Only a switchover that names us (or any node) allows us to lead.
        snap = run.store.snapshots[-1]
        assert snap.switchover in ("", "bp-a"), snap.switchover
    snap = run.store.snapshots[-1]
    for f in foreign:
        if f.why in ("unknown-key", "huge"):
            shown = f.key[len(KEYS.root):][:80]
            assert any(r.startswith(shown) for r in snap.rejected), (shown, snap.rejected)
    assert run.agent.stats.etcd_errors == 0  # garbage is not an etcd failure


keys = st.one_of(st.text(max_size=30).map(lambda t: KEYS.root + t),
                 st.text(max_size=20).map(lambda t: KEYS.election + t),
                 st.text(max_size=20).map(lambda t: KEYS.root + "nodes/" + t),
                 st.sampled_from([KEYS.switchover, KEYS.maintenance]))
values = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                   st.integers(4090, 9000).map(lambda n: b"x" * n))


@FAST
@given(st.lists(st.tuples(keys, values, st.integers(-2**63, 2**63), st.integers(0, 2**63)),
                max_size=12), st.integers(0, 2**63))
def test_parse_snapshot_is_total(kvs: list[tuple[str, bytes, int, int]], rev: int) -> None:
    snap = parse_snapshot(KEYS, rev, kvs)
    revs = [c.create_revision for c in snap.candidates]
    assert revs == sorted(revs)
    assert len(snap.candidates) == sum(1 for k, *_ in kvs if k.startswith(KEYS.election))
    for rec in snap.records.values():
        assert rec.head_block_num >= 0 and len(rec.version) <= 64
        json.loads(rec.to_json())  # what we republish is always valid


@FAST
@given(st.sampled_from(["get_info", "pause", "resume", "paused"]),
       st.integers(100, 599), st.binary(max_size=200) | json_values.map(
           lambda v: json.dumps(v).encode()))
def test_nodeos_parsers_raise_only_nodeos_errors(call: str, status: int, body: bytes) -> None:
    try:
        data = parse_response(call, status, body)
    except NodeosError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 400
        return
    if call == "get_info":
        try:
            parse_info(data)
        except NodeosError as exc:
            assert "\n" not in str(exc)


# ---------------------------------------------------------------------- configuration

FIELDS = [(s, f) for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__]
MARK = "SeCrEt"
env_text = st.one_of(st.text(max_size=20), st.sampled_from(
    ["nan", "inf", "-inf", "1e309", "²", "0x10", "", " ", "1,2", "http://a:99999"]))


@st.composite
def config_input(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str]]:
    data: dict[str, Any] = {"node": {"name": "bp-a", "producer": "mybp"},
                            "etcd": {"endpoints": ["http://127.0.0.1:2379"]}}
    for section, name in draw(st.lists(st.sampled_from(FIELDS), max_size=6)):
        data.setdefault(section, {})[name] = draw(json_values | st.floats())
    if draw(st.booleans()):
        data[draw(st.text(max_size=8))] = draw(json_values)
    env = {f"BPLEADER_{s.upper()}_{f.upper()}": draw(env_text)
           for s, f in draw(st.lists(st.sampled_from(FIELDS), max_size=4))}
    if draw(st.booleans()):
        env["BPLEADER_" + draw(st.text(max_size=10))] = draw(env_text)
    for section, name in SECRETS:  # a recognisable secret, to check it is never echoed
        if draw(st.booleans()):
            data.setdefault(section, {})[name] = MARK + draw(st.text(max_size=8))
    return data, env


def names_a_field(line: str) -> bool:
    """Every error starts with the section, the section.field, or the variable."""
    return line.startswith(("[", "BPLEADER_", "'BPLEADER_")) or \
        line.split(".", 1)[0] in SECTIONS


@FAST
@given(config_input())
def test_config_raises_only_config_errors_naming_the_field(
        case: tuple[dict[str, Any], dict[str, str]]) -> None:
    data, env = case
    try:
        parse_config(data, env)
    except ConfigError as exc:
        assert exc.errors
        for line in exc.errors:
            assert names_a_field(line), line
            assert MARK not in line, line
            assert "\n" not in line


@FAST
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_config_file_bytes_raise_only_config_errors(tmp_path_factory: pytest.TempPathFactory,
                                                    raw: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "c.toml"
    path.write_bytes(raw)
    path.chmod(0o600)
    try:
        load_config(path, env={})
    except ConfigError as exc:
        assert all("\n" not in e or "TOML" in e for e in exc.errors)
