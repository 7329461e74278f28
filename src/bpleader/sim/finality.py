"""Savanna finality as the chain model needs it: finalizer policies, votes, quorum
certificates, the last irreversible block, and nodeos's implicit production pause.

Pure logic, no clock: times are passed in (seconds on the chain's wall clock). The rules
follow Spring 1.x (see the README's "Savanna" section for what is simplified):

* a policy lists finalizers (description, weight, BLS key) and a threshold; the system
  contract gives every finalizer weight 1 and sets ``threshold = 2n/3 + 1``;
* a finalizer votes on every recent block it learns of while its key is in the block's
  active or pending policy, never twice for one block timestamp (its safety file);
* a quorum certificate (QC) on a block needs the threshold in the active policy and, while
  one is pending, in the pending policy too;
* a block claims the best QC its producer holds on its branch when the block is finished;
  a block claiming a strong QC on ``M`` makes final the block ``M`` itself claims
  (the 2-chain rule), so the last irreversible block trails the head by about 2;
* ``set_finalizers`` in block ``B`` proposes a policy; it becomes pending in the first
  block whose final block is at or past ``B``, and active in the first block whose final
  block is at or past the block where it became pending.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from bpleader.antelope import BLS_PREFIX, encode_bls_public_key

DEFAULT_VOTE_TIMEOUT = 6.0  # production-pause-vote-timeout-ms, in seconds
RECENT_BLOCK = 30.0  # nodeos votes only on blocks younger than this
# A block only starts the implicit-pause clock when it is this much newer than the last
# vote (Spring's fixed acceptance tolerance).
BLOCK_TOLERANCE = 1.0


def simulated_bls_key(owner: str) -> str:
    """A well-formed, deterministic BLS public key for a simulated finalizer.

    Only its encoding is real: the simulator checks no BLS signature, so the bytes need
    not be a curve point.
    """
    seed = hashlib.sha512(f"bpleader-sim-bls:{owner}".encode()).digest()
    return encode_bls_public_key(seed + hashlib.sha256(seed).digest())


def short_key(key: str) -> str:
    """A BLS key shortened for logs and tables (its prefix and first 8 characters)."""
    return key[:len(BLS_PREFIX) + 8] + "…" if key.startswith(BLS_PREFIX) else key[:16]


@dataclass(frozen=True)
class Finalizer:
    description: str  # the producer account, as the system contract sets it
    weight: int
    key: str


@dataclass(frozen=True)
class Policy:
    generation: int
    threshold: int
    finalizers: tuple[Finalizer, ...]

    @classmethod
    def of(cls, generation: int, finalizers: Iterable[tuple[str, str]]) -> Policy:
        """Weight 1 each and ``threshold = 2n/3 + 1``, as eosio.system builds policies."""
        fins = tuple(Finalizer(d, 1, k) for d, k in finalizers)
        return cls(generation, len(fins) * 2 // 3 + 1, fins)

    def weight(self, keys: set[str] | frozenset[str]) -> int:
        return sum(f.weight for f in self.finalizers if f.key in keys)

    def has_key(self, key: str) -> bool:
        return any(f.key == key for f in self.finalizers)

    def key_of(self, description: str) -> str | None:
        return next((f.key for f in self.finalizers if f.description == description), None)

    def with_key(self, description: str, key: str, generation: int) -> Policy:
        fins = tuple(replace(f, key=key) if f.description == description else f
                     for f in self.finalizers)
        return replace(self, generation=generation, finalizers=fins)

    def to_json(self) -> dict[str, object]:
        return {"generation": self.generation, "threshold": self.threshold,
                "finalizers": [{"description": f.description, "weight": f.weight,
                                "public_key": f.key} for f in self.finalizers]}


@dataclass(frozen=True)
class PolicyState:
    """The finalizer policies in force after one block."""

    active: Policy
    pending: tuple[Policy, int] | None = None  # (policy, height where it became pending)
    proposed: tuple[tuple[Policy, int], ...] = ()  # (policy, height where proposed)

    @property
    def latest(self) -> Policy:
        """The newest policy, proposed, pending or active: the base of a new proposal."""
        if self.proposed:
            return self.proposed[-1][0]
        return self.pending[0] if self.pending else self.active

    def voting(self) -> tuple[Policy, ...]:
        return (self.active,) if self.pending is None else (self.active, self.pending[0])

    def may_vote(self, key: str) -> bool:
        return self.active.has_key(key) or (self.pending is not None
                                            and self.pending[0].has_key(key))

    def quorum(self, keys: set[str]) -> bool:
        return all(p.weight(keys) >= p.threshold for p in self.voting())

    def next(self, height: int, final_height: int,
             proposals: tuple[Policy, ...]) -> PolicyState:
        """The state after block ``height`` whose final block is ``final_height``."""
        active, pending, proposed = self.active, self.pending, self.proposed
        if pending is not None and final_height >= pending[1]:
            active, pending = pending[0], None
        if pending is None:
            ready = [p for p in proposed if final_height >= p[1]]
            if ready:
                pending = (ready[-1][0], height)  # the newest wins; older ones are dropped
                proposed = tuple(p for p in proposed if final_height < p[1])
        if proposals:
            proposed = (*proposed, *((p, height) for p in proposals))
        if (active, pending, proposed) == (self.active, self.pending, self.proposed):
            return self
        return PolicyState(active, pending, proposed)


class VoteTiming:
    """One category of votes (our producer's finalizer, or the others') for the tracker."""

    __slots__ = ("first_block_after_vote", "latest_vote")

    def __init__(self) -> None:
        self.latest_vote = -math.inf
        self.first_block_after_vote: float | None = None

    def block(self, rt: float) -> None:
        if rt - BLOCK_TOLERANCE > self.latest_vote and (
                self.first_block_after_vote is None
                or self.first_block_after_vote <= self.latest_vote):
            self.first_block_after_vote = rt

    def vote(self, now: float) -> None:
        self.latest_vote = max(self.latest_vote, now)

    def stale(self, now: float, timeout: float) -> bool:
        first = self.first_block_after_vote
        return first is not None and first > self.latest_vote and first < now - timeout


class PauseTracker:
    """Spring's implicit production pause (``production-pause-vote-timeout-ms``).

    A block seen more than ``timeout`` ago with no vote of a category since pauses
    production, for our producer's finalizer and for the others separately; ``paused``
    then reads true. ``resume`` forgets the blocks, not the votes: the pause comes back a
    block plus the timeout later if votes still miss. A timeout of 0 disables it.
    """

    __slots__ = ("other", "ours", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.ours = VoteTiming()
        self.other = VoteTiming()

    def on_block(self, now: float, block_time: float) -> None:
        rt = min(now, block_time)
        self.ours.block(rt)
        self.other.block(rt)

    def on_vote(self, now: float, ours: bool) -> None:
        (self.ours if ours else self.other).vote(now)

    def reset(self) -> None:
        self.ours.first_block_after_vote = None
        self.other.first_block_after_vote = None

    def paused(self, now: float) -> bool:
        if self.timeout <= 0:
            return False
        return self.ours.stale(now, self.timeout) or self.other.stale(now, self.timeout)

    def reason(self, now: float) -> str:
        ours = self.ours.stale(now, self.timeout)
        other = self.other.stale(now, self.timeout)
        if ours and other:
            return "no recent votes"
        if ours:
            return "no recent votes received from configured producer"
        return "no recent votes received from others" if other else ""
