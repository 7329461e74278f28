"""Operator commands: ``status``, ``switchover`` and ``maintenance``.

They read and write the same keys the agents use (see :class:`bpleader.store.Keys`), so
anything they show can be checked with ``etcdctl get --prefix``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from bpleader.config import Config
from bpleader.nodeos import BLOCK_INTERVAL, ChainInfo, NodeosClient, NodeosError
from bpleader.rounds import count_unsigned, wait_for_gap
from bpleader.service import make_store
from bpleader.store import EtcdStore, Snapshot, StoreError


async def _lease_left(store: EtcdStore, lease_id: int) -> int | None:
    try:
        return await store.lease_remaining(lease_id)
    except StoreError:
        return None


async def status_data(store: EtcdStore) -> dict[str, Any]:
    snap = await store.snapshot()
    leader = snap.leader
    nodes = []
    for name, rec in sorted(snap.records.items()):
        nodes.append({
            "node": name, "valid": rec.valid, "role": rec.role, "in_sync": rec.in_sync,
            "head_block_num": rec.head_block_num, "lag": rec.lag, "paused": rec.paused,
            "version": rec.version, "updated": rec.updated,
            "lease_left": await _lease_left(store, rec.lease_id) if rec.lease_id else None,
            "finalizer_key": rec.finalizer_key, "lib_lag": rec.lib_lag,
        })
    return {
        "producer": store.keys.producer,
        "leader": leader.node if leader else None,
        "candidates": [{"node": c.node, "key": c.key, "create_revision": c.create_revision,
                        "lease": f"{c.lease_id:x}"} for c in snap.candidates],
        "nodes": nodes,
        "switchover": snap.switchover,
        "maintenance": snap.maintenance,
        "unfenced": dict(snap.unfenced),
        "finalizer": _finalizer_status(snap),
        "revision": snap.revision,
    }


def _finalizer_status(snap: Snapshot) -> dict[str, Any] | None:
    """The producer's active finalizer key as the agents see it on-chain (the leader's
    view first), the node whose key it is, and its last vote seen; None without keys."""
    records = [r for r in snap.records.values() if r.valid and r.finalizer_key]
    if not records:
        return None
    leader = snap.leader.node if snap.leader else None
    seen = sorted(records, key=lambda r: (r.node != leader, -r.updated))
    view = next((r for r in seen if r.finalizer_active), seen[0])
    owner = next((r.node for r in records if r.finalizer_key == view.finalizer_active), None)
    return {"active_key": view.finalizer_active, "node": owner, "last_vote": view.last_vote,
            "seen_by": view.node,
            "keys": {r.node: r.finalizer_key for r in sorted(records, key=lambda r: r.node)}}


def _print_status(data: dict[str, Any], out: TextIO) -> None:
    out.write(f"producer:    {data['producer']}\n")
    out.write(f"leader:      {data['leader'] or 'NONE'}\n")
    if data["maintenance"] is not None:
        out.write(f"maintenance: ON ({data['maintenance']})\n")
    if data["switchover"] is not None:
        out.write(f"switchover:  requested to {data['switchover'] or 'any node'}\n")
    for node, why in sorted(data["unfenced"].items()):
        # No node resumes while this is shown; see README "Troubleshooting".
        out.write(f"UNFENCED:    {node} may still be producing: {why}\n")
    fin = data.get("finalizer")
    if fin is not None:
        key = fin["active_key"] or "unknown"
        short = key[:20] + "…" if len(key) > 20 else key
        vote = f", last vote seen in block #{fin['last_vote']}" if fin["last_vote"] else ""
        warn = "" if fin["node"] == data["leader"] else "  <- not the leader's key"
        out.write(f"finalizer:   active key {short} ({fin['node'] or 'no agent of ours'})"
                  f"{vote}{warn}\n")
    out.write("candidates:  " + (", ".join(
        f"{c['node']} (rev {c['create_revision']})" for c in data["candidates"]) or "none") + "\n")
    out.write(f"\n{'NODE':<16} {'ROLE':<12} {'IN SYNC':<8} {'HEAD':>10} {'LAG':>7} "
              f"{'PAUSED':<7} {'LEASE':>6}\n")
    for n in data["nodes"]:
        if not n["valid"]:
            out.write(f"{n['node']:<16} (unreadable record)\n")
            continue
        lag = f"{n['lag']:.1f}s" if n["lag"] is not None else "-"
        lease = f"{n['lease_left']}s" if n["lease_left"] is not None else "-"
        out.write(f"{n['node']:<16} {n['role']:<12} {str(n['in_sync']).lower():<8} "
                  f"{n['head_block_num']:>10} {lag:>7} {str(n['paused']).lower():<7} "
                  f"{lease:>6}\n")


def status_command(cfg: Config, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Exit 0 when exactly one leader holds the election, 1 when none, 2 on etcd errors."""
    store = make_store(cfg)
    try:
        data = asyncio.run(status_data(store))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if as_json:
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_status(data, out)
    return 0 if data["leader"] else 1


def _switchover_refusal(snap: Snapshot, target: str | None) -> str:
    """Why a switchover cannot work now; empty when it can."""
    if snap.maintenance is not None:
        return f"maintenance is on ({snap.maintenance})"
    leader = snap.leader
    if leader is None:
        return "there is no leader to hand over from"
    in_sync = {n for n, r in snap.records.items() if r.valid and r.in_sync}
    if target is not None:
        if target == leader.node:
            return f"{target} is already the leader"
        if target not in snap.records:
            return f"no agent named {target} is running"
        if target not in in_sync:
            return f"{target} is not in sync"
        return ""
    if not in_sync - {leader.node}:
        return "no other node is in sync"
    return ""


async def _switchover(store: EtcdStore, target: str | None, ttl: int, wait: float,
                      chain: NodeosClient, producer: str, gap_wait: float,
                      say: Callable[[str], None]) -> tuple[int, str]:
    snap = await store.snapshot()
    why = _switchover_refusal(snap, target)
    if why:
        return 1, f"switchover refused: {why}"
    if gap_wait > 0:
        say(f"waiting for the gap after {producer}'s round (at most {gap_wait:g} s; "
            "--now switches at once)")
        gap = await wait_for_gap(chain, producer, gap_wait)
        say(f"{'switching' if gap.timed else 'switching anyway'} after {gap.waited:.1f} s: "
            f"{gap.why}")
        start = gap.head
        snap = await store.snapshot()  # the wait may have seen a failover
        why = _switchover_refusal(snap, target)
        if why:
            return 1, f"switchover refused: {why}"
    else:
        start = await _head(chain)
    old = snap.leader
    assert old is not None
    await store.request_switchover(target or "", ttl)
    say(f"switchover requested: {old.node} -> {target or 'any in-sync node'}")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = await store.snapshot()
        new = now.leader
        rec = now.records.get(new.node) if new else None
        if new and new.node != old.node and rec is not None and rec.role == "leader" \
                and rec.paused is False:
            done = f"switchover done: {old.node} -> {new.node}"
            return 0, done + await _unsigned_since(chain, start)
    return 1, f"switchover requested, but no new leader producing within {wait:.0f} s"


async def _head(chain: NodeosClient) -> ChainInfo | None:
    try:
        return await chain.get_info(budget=1.0)
    except NodeosError:
        return None


async def _unsigned_since(chain: NodeosClient, start: ChainInfo | None) -> str:
    """How many slots went without a block from the switchover's start until the first
    slot after the new leader resumed (the head past it tells, within 3 s)."""
    if start is None:
        return ""  # nodeos did not answer when the switchover started
    first = time.time() + BLOCK_INTERVAL
    end = None
    for _ in range(30):
        end = await _head(chain)
        if end is not None and end.head_block_time >= first:
            break
        await asyncio.sleep(0.1)
    if end is None:
        return "; nodeos did not answer: slots without a block not counted"
    return (f"; {count_unsigned(start, end)} slot(s) without a block between #"
            f"{start.head_block_num} and #{end.head_block_num}")


def switchover_command(cfg: Config, target: str | None, wait: float = 30.0,
                       gap_wait: float = 30.0) -> int:
    """``gap_wait`` > 0: hand over in the gap after our round (see :mod:`bpleader.rounds`);
    0 (``--now``): at once."""
    store = make_store(cfg)
    ttl = max(10, int(cfg.timing.lease_ttl) * 3)

    async def run() -> tuple[int, str]:
        async with NodeosClient(cfg.nodeos.url, cfg.nodeos.timeout) as chain:
            return await _switchover(store, target, ttl, wait, chain, cfg.node.producer,
                                     gap_wait, lambda line: print(line, flush=True))

    try:
        code, message = asyncio.run(run())
    except StoreError as exc:
        code, message = 2, f"error: {exc}"
    finally:
        store.close()
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


def maintenance_command(cfg: Config, on: bool, reason: str | None) -> int:
    store = make_store(cfg)
    try:
        asyncio.run(store.set_maintenance((reason or "maintenance") if on else None))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"maintenance {'on' if on else 'off'} for {cfg.node.producer}")
    return 0
