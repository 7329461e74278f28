"""Moving our producer's BLS finalizer key to the node that produces (Savanna).

On a Savanna chain a producer has one BLS finalizer key per node, exactly one of them
*active* on-chain, switched with ``eosio::actfinkey``. Production failover is complete only
when the new leader's own key is active: otherwise nodeos's implicit pause stops it about
six seconds after the old key's votes stopped. Sharing one key between nodes instead would
let two nodes sign conflicting votes, so each node keeps its own key and the leader moves
the active one to itself.

* :class:`KeyFailover` is the agent core's part: when to submit, when the switch is
  confirmed (from ``get_finalizer_info``'s active policy, never from the submission), and
  when to raise an alarm. It does no I/O of its own: it talks to a :class:`ChainReader`
  and a :class:`KeySwitcher`, so the deterministic simulation runs it unchanged.
* :class:`TransactionSwitcher` signs ``actfinkey`` with the key of a permission linked only
  to that action and sends it to the local nodeos; :class:`CommandSwitcher` runs an
  operator's command instead (``cleos`` with a wallet).

The switch is sent once the new leader has resumed, not before: only a node that holds the
lock and produces moves the key to itself, so a candidate that fails its last checks never
takes the key. That leaves time: ``resume`` resets nodeos's implicit-pause tracking, and
the new key is voting within about four blocks (proposed, then pending once final), well
inside the default ``production-pause-vote-timeout-ms`` of 6 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bpleader.nodeos import ChainInfo, FinalizerInfo, NodeosError

log = logging.getLogger(__name__)

RECHECK = 5.0  # seconds between checks while our key is confirmed active
RESUBMIT = 6.0  # a switch not visible as pending by then is submitted again
PROBE = 30.0  # seconds between get_finalizer_info probes on a legacy chain (auto mode)


class SwitchError(Exception):
    """A switch that could not be submitted; ``reason`` is the chain's (or command's) word."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChainReader(Protocol):
    """The read calls of nodeos the key failover needs."""

    async def finalizer_info(self, budget: float | None = None) -> FinalizerInfo: ...

    async def table_rows(self, table: str, budget: float | None = None) -> list[Any]: ...

    async def account(self, name: str, budget: float | None = None) -> dict[str, Any]: ...


class TransactionSender(Protocol):
    async def get_info(self, budget: float | None = None) -> ChainInfo: ...

    async def send_transaction(self, packed: dict[str, Any], timeout: float) -> str: ...


class KeySwitcher(Protocol):
    """Submits ``actfinkey(producer, key)``; how it is signed is the implementation's."""

    key: str
    method: str  # for log lines: "transaction" or "command"
    permission: tuple[str, str] | None  # (account, permission) it signs with, if known
    signing_public_key: str | None

    async def submit(self, budget: float) -> str: ...


@dataclass
class FinalizerStats:
    switches: int = 0  # switches confirmed from the chain
    submissions: int = 0
    failures: int = 0  # submissions refused or failed
    alarms: int = 0  # switches not confirmed within finalizer.switch_timeout
    last_switch_seconds: float = float("nan")


def cleos_register(producer: str, key: str) -> str:
    return (f"cleos push action eosio regfinkey '[\"{producer}\", \"{key}\", "
            f"\"SIG_BLS_<proof of possession>\"]' -p {producer}@active   # the proof: "
            f"spring-util bls create pop --private-key PVT_BLS_<this node's key>")


def cleos_permission(account: str, permission: str, public_key: str) -> str:
    return (f"cleos set account permission {account} {permission} '{{\"threshold\":1,"
            f"\"keys\":[{{\"key\":\"{public_key}\",\"weight\":1}}]}}' active "
            f"-p {account}@active")


def cleos_link(account: str, permission: str) -> str:
    return f"cleos set action permission {account} eosio actfinkey {permission} " \
           f"-p {account}@active"


class KeyFailover:
    """Keeps our producer's active finalizer key on this node while it leads."""

    def __init__(self, switcher: KeySwitcher, chain: ChainReader, producer: str,
                 switch_timeout: float, budget: float,
                 emit: Callable[[str, str, int], None],
                 owner_of: Callable[[str], str | None] = lambda key: None) -> None:
        self.switcher = switcher
        self.chain = chain
        self.producer = producer
        self.key = switcher.key
        self.switch_timeout = switch_timeout
        self.budget = budget
        self.emit = emit
        self.owner_of = owner_of
        self.stats = FinalizerStats()
        self.info: FinalizerInfo | None = None  # the last get_finalizer_info that answered
        self.since: float | None = None  # switching since (clock.now())
        self.confirmed_at = float("-inf")
        self._next_check = float("-inf")
        self._next_submit = float("-inf")
        self._alarmed = False
        self._last_reason = ""

    @property
    def ours(self) -> bool:
        return self.info is not None and self.info.active_key(self.producer) == self.key

    @property
    def active_key(self) -> str | None:
        return self.info.active_key(self.producer) if self.info else None

    def switching_for(self, now: float) -> float:
        return now - self.since if self.since is not None else 0.0

    async def preflight(self) -> list[str]:
        """What is missing on-chain for a switch to work, each with the cleos command
        that fixes it (empty when all is set up, or when nodeos cannot tell)."""
        problems: list[str] = []
        try:
            rows = await self.chain.table_rows("finkeys", self.budget)
        except NodeosError as exc:
            return [f"cannot read eosio finkeys: {exc.reason}"]
        mine = [r for r in rows if isinstance(r, dict) and r.get("finalizer_key") == self.key]
        if not mine:
            problems.append(f"finalizer.key is not registered on-chain; register it: "
                            f"{cleos_register(self.producer, self.key)}")
        elif mine[0].get("finalizer_name") != self.producer:
            problems.append(f"finalizer.key is registered by {mine[0].get('finalizer_name')}"
                            f", not {self.producer}: each node needs its own key")
        perm = self.switcher.permission
        if perm is None or self.switcher.signing_public_key is None:
            return problems
        account, name = perm
        pub = self.switcher.signing_public_key
        try:
            data = await self.chain.account(account, self.budget)
        except NodeosError as exc:
            return [*problems, f"cannot read account {account}: {exc.reason}"]
        found = next((p for p in data.get("permissions", []) if isinstance(p, dict)
                      and p.get("perm_name") == name), None)
        if found is None:
            return [*problems, f"permission {account}@{name} does not exist; create and link "
                    f"it: {cleos_permission(account, name, pub)} && {cleos_link(account, name)}"]
        keys = [k.get("key") for k in found.get("required_auth", {}).get("keys", [])
                if isinstance(k, dict)]
        if not _key_in(pub, keys):
            problems.append(f"{account}@{name} does not hold the key of "
                            f"finalizer.signing_key_file ({pub}); set it: "
                            f"{cleos_permission(account, name, pub)}")
        links = found.get("linked_actions") or []
        if not any(isinstance(x, dict) and x.get("account") == "eosio"
                   and x.get("action") == "actfinkey" for x in links):
            problems.append(f"{account}@{name} is not linked to eosio::actfinkey; link it: "
                            f"{cleos_link(account, name)}")
        return problems

    async def observe(self, now: float, leading: bool) -> FinalizerInfo | None:
        """Refresh what the chain says when due; None when nodeos did not answer."""
        if now < self._next_check:
            return self.info
        try:
            info = await self.chain.finalizer_info(self.budget)
        except NodeosError as exc:
            self._next_check = now + 1.0
            self.emit("nodeos_error", str(exc), logging.WARNING)
            return None
        self.info = info
        self._next_check = now + (RECHECK if not leading or self.ours else 0.0)
        return info

    async def lead(self, now: float) -> None:
        """As leader: confirm our key is the active one, or move it to us."""
        info = await self.observe(now, leading=True)
        if info is None or not info.savanna:
            return
        active = info.active_key(self.producer)
        if active == self.key:
            if self.since is not None:
                took = now - self.since
                self.stats.switches += 1
                self.stats.last_switch_seconds = took
                self.emit("finalizer_active", f"own finalizer key active after {took:.1f} s "
                          f"(policy generation {info.generation})", logging.INFO)
            self.since, self._alarmed = None, False
            self.confirmed_at = now
            return
        if self.since is None:
            self.since = now
            owner = self.owner_of(active) if active else None
            self.emit("finalizer_switch", f"active finalizer key is {_short(active)}"
                      f"{f' ({owner})' if owner else ''}; moving it to this node by "
                      f"{self.switcher.method}", logging.WARNING)
        if info.pending_key(self.producer) != self.key and now >= self._next_submit:
            await self._submit(now)
        if not self._alarmed and now - self.since > self.switch_timeout:
            self._alarmed = True
            self.stats.alarms += 1
            self.emit("finalizer_switch_timeout", f"own finalizer key not active "
                      f"{now - self.since:.0f} s after the switch began (bound "
                      f"{self.switch_timeout:g} s); last reason: "
                      f"{self._last_reason or 'none given'}", logging.CRITICAL)

    async def _submit(self, now: float) -> None:
        self._next_submit = now + RESUBMIT
        self.stats.submissions += 1
        try:
            what = await self.switcher.submit(self.budget)
        except SwitchError as exc:
            if "already active" in exc.reason:
                return  # our earlier actfinkey is in a block; its policy is on its way
            self.stats.failures += 1
            self._last_reason = exc.reason
            self.emit("finalizer_switch_failed", exc.reason, logging.ERROR)
            return
        self.emit("finalizer_submitted", what, logging.INFO)

    def stand_down(self) -> None:
        """No longer leader: forget the switch in progress (the next leader moves it)."""
        self.since, self._alarmed = None, False
        self._next_submit = float("-inf")


def _short(key: str | None) -> str:
    if not key:
        return "none"
    return key[:16] + "…"


def _key_in(key: str, keys: list[Any]) -> bool:
    from bpleader.antelope import TransactionError, normalize_public_key

    try:
        wanted = normalize_public_key(key)
        return any(isinstance(k, str) and normalize_public_key(k) == wanted for k in keys)
    except TransactionError:
        return False


class TransactionSwitcher:
    """Signs ``eosio::actfinkey`` with the K1 key of ``account@permission`` and sends it to
    the local nodeos (which relays it to the producers, or includes it itself)."""

    method = "transaction"

    def __init__(self, nodeos: TransactionSender, key: str, account: str, permission: str,
                 private_key: str, expiration: int = 60) -> None:
        from bpleader.antelope import public_key_of

        self.nodeos = nodeos
        self.key = key
        self.permission: tuple[str, str] | None = (account, permission)
        self._private_key = private_key
        self.signing_public_key: str | None = public_key_of(private_key)
        self.expiration = expiration

    def __repr__(self) -> str:  # never show the private key
        return f"TransactionSwitcher({self.permission}, {self.key[:16]}…)"

    async def submit(self, budget: float) -> str:
        from bpleader.antelope import TransactionError, sign_actfinkey

        assert self.permission is not None
        account, permission = self.permission
        try:
            info = await self.nodeos.get_info(budget=budget)
            ref = info.last_irreversible_block_id or info.head_block_id
            body = sign_actfinkey(info.chain_id, ref, int(info.head_block_time) +
                                  self.expiration, self._private_key, account, permission,
                                  self.key)
            tx_id = await self.nodeos.send_transaction(body, budget)
        except TransactionError as exc:
            raise SwitchError(f"cannot sign actfinkey: {exc}") from None
        except NodeosError as exc:
            raise SwitchError(exc.reason) from None
        return f"actfinkey sent as {account}@{permission}, transaction {tx_id[:16]}"


class CommandSwitcher:
    """Runs ``finalizer.switch_command`` with ``sh -c``; exit 0 means submitted."""

    method = "command"
    permission: tuple[str, str] | None = None
    signing_public_key: str | None = None

    def __init__(self, command: str, key: str, producer: str) -> None:
        self.command = command
        self.key = key
        self.producer = producer

    async def submit(self, budget: float) -> str:
        env = {**os.environ, "BPLEADER_FINALIZER_KEY": self.key,
               "BPLEADER_PRODUCER": self.producer}
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", self.command, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=max(budget, 5.0))
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SwitchError(f"switch_command did not finish within {max(budget, 5.0):g} s"
                              ) from None
        tail = out.decode("utf-8", "replace").strip().splitlines()[-3:]
        if proc.returncode != 0:
            raise SwitchError(f"switch_command exited {proc.returncode}: "
                              f"{' | '.join(tail)[:300] or 'no output'}")
        return f"switch_command exited 0 in {time.monotonic() - started:.1f} s"


def read_signing_key(path: str) -> str:
    """The K1 private key in ``path`` (first non-empty line); never logged."""
    text = Path(path).read_text()
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
