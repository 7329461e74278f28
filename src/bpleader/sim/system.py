"""The simulated system contract: accounts and permissions, the finalizer key tables, and
the checks nodeos and ``eosio.system`` apply to an ``eosio::actfinkey`` transaction.

Pure state and rules; the chain model calls :meth:`SystemContract.execute` when a block
includes a transaction, and the API layers call :meth:`SystemContract.check` when one
arrives. Failures are :class:`ChainError` with nodeos's exception names and codes, so the
HTTP layer can answer with nodeos's error bodies. What nodeos checks, in its order:
expiration, duplicates, the reference block (TaPoS), then per declared authority: that the
permission exists, that it satisfies the action's minimum permission (``linkauth``), that
the signatures satisfy it and carry no irrelevant key, and last the contract's own asserts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bpleader.antelope import (
    ACTFINKEY,
    SYSTEM,
    SignedTransaction,
    decode_bls_public_key,
    normalize_public_key,
)
from bpleader.sim.chain import Block
from bpleader.sim.finality import Policy, PolicyState, simulated_bls_key
from bpleader.sim.model import ChainConfig

MAX_EXPIRATION = 3600  # seconds: nodeos's max-transaction-lifetime default


class ChainError(Exception):
    """A transaction nodeos refuses: ``name`` and ``code`` as in Spring's exceptions.hpp.

    ``early`` marks the checks the producer plugin makes before execution (expired,
    duplicate): send_transaction2 answers those with an error body even when it returns
    failure traces for the rest.
    """

    def __init__(self, name: str, code: int, what: str, message: str, early: bool = False,
                 file: str = "") -> None:
        super().__init__(message)
        self.name, self.code, self.what, self.message = name, code, what, message
        self.early = early
        self.file = file

    def as_except(self) -> dict[str, Any]:
        """The ``except`` object of a failure trace."""
        return {"code": self.code, "name": self.name, "message": self.what,
                "stack": [{"context": {"level": "error", "file": self.file, "line": 0,
                                       "method": "", "hostname": "", "thread_name":
                                       "nodeos", "timestamp": ""},
                           "format": self.message, "data": {}}]}


def _assert(message: str) -> ChainError:
    return ChainError("eosio_assert_message_exception", 3050003,
                      "eosio_assert_message assertion failure",
                      f"assertion failure with message: {message}", file="cf_system.cpp")


@dataclass
class Permission:
    name: str
    parent: str  # "" for owner
    threshold: int
    keys: dict[str, int]  # PUB_K1_ key -> weight

    def to_json(self, account: str, links: Iterable[tuple[str, str]]) -> dict[str, Any]:
        return {"perm_name": self.name, "parent": self.parent, "required_auth": {
            "threshold": self.threshold,
            "keys": [{"key": k, "weight": w} for k, w in sorted(self.keys.items())],
            "accounts": [], "waits": []},
            "linked_actions": [{"account": c, "action": a} for c, a in sorted(links)]}


@dataclass
class FinKey:
    id: int
    finalizer_name: str
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "finalizer_name": self.finalizer_name,
                "finalizer_key": self.key,
                "finalizer_key_binary": decode_bls_public_key(self.key).hex()}


@dataclass
class SystemContract:
    """The accounts and finalizer tables of one simulated chain."""

    permissions: dict[str, dict[str, Permission]] = field(default_factory=dict)
    links: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (acct, code, act)
    finkeys: list[FinKey] = field(default_factory=list)
    active: dict[str, int] = field(default_factory=dict)  # finalizer -> active key id

    @classmethod
    def for_chain(cls, config: ChainConfig, permission: str | None = None,
                  permission_key: str | None = None, linked: bool = True,
                  unregistered: Iterable[str] = ()) -> SystemContract:
        """The contract state of a simulated chain: every finalizer's keys registered
        (our producer's nodes' keys except ``unregistered`` nodes'), the genesis policy's
        keys active, and optionally ``producer@permission`` with ``permission_key``,
        linked to ``eosio::actfinkey`` unless ``linked`` is False."""
        contract = cls()
        skip = set(unregistered)
        for node in config.nodes:
            key = config.key_of(node)
            if key and node not in skip and contract._key(key) is None:
                contract.register(config.producer, key)
        contract.ensure_account(config.producer)
        for other in config.other_finalizers():
            contract.register(other, simulated_bls_key(other))
        active = config.key_of(config.active_node or config.nodes[0])
        row = contract._key(active) if active else None
        if row is not None:
            contract.active[config.producer] = row.id
        if permission and permission_key:
            contract.add_permission(config.producer, permission, "active", permission_key)
            if linked:
                contract.links[(config.producer, SYSTEM, ACTFINKEY)] = permission
        return contract

    # ------------------------------------------------------------------ state

    def ensure_account(self, account: str) -> dict[str, Permission]:
        return self.permissions.setdefault(account, {
            "owner": Permission("owner", "", 1, {}), "active": Permission("active", "owner", 1,
                                                                        {})})

    def add_permission(self, account: str, name: str, parent: str, key: str) -> None:
        self.ensure_account(account)[name] = Permission(name, parent, 1,
                                                        {normalize_public_key(key): 1})

    def register(self, finalizer: str, key: str) -> FinKey:
        """regfinkey (the proof of possession is not simulated)."""
        row = FinKey(len(self.finkeys) + 1, finalizer, key)
        self.finkeys.append(row)
        self.active.setdefault(finalizer, row.id)
        self.ensure_account(finalizer)
        return row

    def _key(self, key: str) -> FinKey | None:
        return next((r for r in self.finkeys if r.key == key), None)

    def _active_on(self, finalizer: str, state: PolicyState | None) -> str | None:
        in_policy = state.latest.key_of(finalizer) if state is not None else None
        return in_policy if in_policy is not None else self.active_key(finalizer)

    def active_key(self, finalizer: str) -> str | None:
        row = next((r for r in self.finkeys if r.id == self.active.get(finalizer)), None)
        return row.key if row else None

    # ------------------------------------------------------------------ checks

    def check(self, tx: SignedTransaction, head: Block, seen: bool) -> None:
        """Everything nodeos checks when a transaction arrives on a node whose head is
        ``head``; ``seen``: the node has it already. Raises ChainError."""
        head_s = head.timestamp_ms // 1000
        if tx.expiration <= head_s:
            raise ChainError("expired_tx_exception", 3040005, "Expired Transaction",
                             f"expired transaction {tx.id}, expiration {_iso(tx.expiration)},"
                             f" block time {_iso(head_s)}", early=True,
                             file="producer_plugin.cpp")
        if tx.expiration > head_s + MAX_EXPIRATION:
            raise ChainError("tx_exp_too_far_exception", 3040006,
                             "Transaction Expiration Too Far",
                             f"Transaction expiration is too far in the future relative to the"
                             f" reference time of {_iso(head_s)}, expiration is "
                             f"{_iso(tx.expiration)} and the maximum transaction lifetime is "
                             f"{MAX_EXPIRATION} seconds", file="transaction_context.cpp")
        if seen:
            raise ChainError("tx_duplicate", 3040008, "Duplicate transaction",
                             f"duplicate transaction {tx.id}", early=True,
                             file="producer_plugin.cpp")
        self._check_tapos(tx, head)
        for action in tx.actions:
            self._check_authority(tx, action)
        for action in tx.actions:
            self._check_action(action, head.policies)

    @staticmethod
    def _check_tapos(tx: SignedTransaction, head: Block) -> None:
        height = head.height - ((head.height - tx.ref_block_num) % 0x10000)
        ref = head.ancestor(height) if height >= 1 else None
        ok = ref is not None and ref.height == height and \
            int.from_bytes(bytes.fromhex(ref.block_id)[8:12], "little") == tx.ref_block_prefix
        if not ok:
            raise ChainError("invalid_ref_block_exception", 3040007, "Invalid Reference Block",
                             f"Transaction's reference block {tx.ref_block_num} did not match."
                             " Is this transaction from a different fork?",
                             file="controller.cpp")

    def _satisfies(self, account: str, declared: str, minimum: str) -> bool:
        """A permission satisfies ``minimum`` when it is it or one of its parents."""
        perms = self.permissions.get(account, {})
        cursor: str = minimum
        while cursor:
            if cursor == declared:
                return True
            parent = perms.get(cursor)
            cursor = parent.parent if parent else ""
        return False

    def _check_authority(self, tx: SignedTransaction, action: Any) -> None:
        if not action.authorization:
            raise ChainError("tx_no_auths", 3040003,
                             "Transaction should have at least one required authority",
                             "transaction must have at least one authorization")
        used: set[str] = set()
        for actor, perm_name in action.authorization:
            level = json.dumps({"actor": actor, "permission": perm_name},
                               separators=(",", ":"))
            perm = self.permissions.get(actor, {}).get(perm_name)
            if perm is None:
                raise ChainError("permission_query_exception", 3060001,
                                 "Permission Query Exception",
                                 f"Failed to retrieve permission: {level}",
                                 file="authorization_manager.cpp")
            minimum = self.links.get((actor, action.account, action.name), "active")
            if not self._satisfies(actor, perm_name, minimum):
                min_level = json.dumps({"actor": actor, "permission": minimum},
                                       separators=(",", ":"))
                raise ChainError("irrelevant_auth_exception", 3090005,
                                 "Irrelevant authority included",
                                 f"action declares irrelevant authority '{level}'; "
                                 f"minimum authority is {min_level}",
                                 file="authorization_manager.cpp")
            weight = sum(w for k, w in perm.keys.items() if k in tx.signing_keys)
            if weight < perm.threshold:
                keys = json.dumps(sorted(set(tx.signing_keys)))
                raise ChainError("unsatisfied_authorization", 3090003,
                                 "Provided keys, permissions, and delays do not satisfy "
                                 "declared authorizations",
                                 f"transaction declares authority '{level}', but does not "
                                 "have signatures for it under a provided delay of 0 ms, "
                                 f"provided permissions [], provided keys {keys}, and a delay "
                                 "max limit of 3888000000 ms", file="authorization_manager.cpp")
            used |= {k for k in perm.keys if k in tx.signing_keys}
        extra = sorted(set(tx.signing_keys) - used)
        if extra:
            raise ChainError("tx_irrelevant_sig", 3090002, "Irrelevant signature included",
                             f"transaction bears irrelevant signatures from these keys: "
                             f"{json.dumps(extra)}", file="authorization_manager.cpp")

    def _check_action(self, action: Any, state: PolicyState | None) -> None:
        """The contract's asserts, against the state of the branch the transaction runs
        on: for a finalizer in the policies, its key in the newest of them (the table
        row moves with the branch: a switch on an orphaned fork never happened)."""
        if (action.account, action.name) != (SYSTEM, ACTFINKEY) or action.data is None:
            raise ChainError("action_validate_exception", 3050000, "Action validate exception",
                             f"the simulated chain only runs {SYSTEM}::{ACTFINKEY}, not "
                             f"{action.account}::{action.name}")
        name, key = action.data["finalizer_name"], action.data["finalizer_key"]
        if name not in {actor for actor, _ in action.authorization}:  # require_auth
            raise ChainError("missing_auth_exception", 3090004, "Missing required authority",
                             f"missing authority of {name}", file="apply_context.cpp")
        row = self._key(key)
        if row is None:
            raise _assert(f"finalizer key was not registered: {key}")
        if row.finalizer_name != name:
            raise _assert(f"finalizer key was not registered by the finalizer: {key}")
        if self._active_on(name, state) == key:
            raise _assert(f"finalizer key was already active: {key}")

    # ------------------------------------------------------------------ execution

    def execute(self, tx: SignedTransaction, state: PolicyState,
                generation: int) -> Policy | None:
        """Run the transaction in a block: the active key changes in the table at once,
        and set_finalizers proposes the new policy (None when it changes nothing)."""
        proposal: Policy | None = None
        for action in tx.actions:
            try:
                self._check_action(action, state)
            except ChainError:
                continue  # became invalid since it was accepted (another switch won)
            assert action.data is not None
            name, key = action.data["finalizer_name"], action.data["finalizer_key"]
            row = self._key(key)
            assert row is not None
            self.active[name] = row.id
            base = proposal or state.latest
            if base.key_of(name) is not None:
                proposal = base.with_key(name, key, generation)
        return proposal

    # ------------------------------------------------------------------ tables

    def table_rows(self, table: str) -> list[dict[str, Any]]:
        if table == "finkeys":
            return [r.to_json() for r in self.finkeys]
        if table == "finalizers":
            rows = []
            for name in sorted(self.active):
                key = self.active_key(name)
                count = sum(1 for r in self.finkeys if r.finalizer_name == name)
                rows.append({"finalizer_name": name, "active_key_id": self.active[name],
                             "active_key_binary": decode_bls_public_key(key).hex()
                             if key else "", "finalizer_key_count": count})
            return rows
        raise KeyError(table)

    def account_json(self, account: str) -> dict[str, Any] | None:
        perms = self.permissions.get(account)
        if perms is None:
            return None
        return {"account_name": account, "privileged": False, "permissions": [
            p.to_json(account, [(c, a) for (acct, c, a), n in self.links.items()
                                if acct == account and n == p.name])
            for p in perms.values()]}


def _iso(seconds: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".000"
