"""A long run's running total, kept in a JSON file so that it can be stopped and resumed.

A million simulated node-hours is weeks of this machine: no single run gets there. The
summary lets many runs add up to one figure, and keeps that figure honest: it is bound to
the run's parameters and to a digest of the package's source, so seeds simulated by other
code, another agent or another seed length are never counted together. It is rewritten
(atomically) after every seed, so a killed run loses only the seeds it was running.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bpleader
from bpleader.simworld.world import Result

FORMAT = 1


def code_digest() -> str:
    """SHA-256 over every Python source of the package (path and content), 16 hex digits:
    any edit to the agent or the simulation changes it."""
    root = Path(bpleader.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RunParams:
    """What makes two seeds' results comparable."""

    seconds_per_seed: float
    agent: str
    savanna: bool
    kill_fence: bool


class SummaryError(Exception):
    """The summary file cannot be used for this run (the message says why)."""


@dataclass
class Summary:
    params: RunParams
    code: str
    done: list[list[int]] = field(default_factory=list)  # merged [first, last] ranges
    seeds: int = 0
    sim_hours: float = 0.0
    node_hours: float = 0.0
    wall_seconds: float = 0.0
    violations: dict[str, int] = field(default_factory=dict)
    failing: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, params: RunParams, code: str) -> Summary:
        """The summary at ``path`` if it exists and matches, else a new empty one."""
        if not path.exists():
            return cls(params, code)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise SummaryError(f"{path}: format {data.get('format')!r}, "
                                   f"this version reads {FORMAT}")
            found = RunParams(**data["params"])
            summary = cls(found, data["code"], data["done"], data["seeds"],
                          data["sim_hours"], data["node_hours"], data["wall_seconds"],
                          data["violations"], data["failing"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SummaryError(f"{path}: not a simulation summary ({e})") from e
        if found != params:
            differ = ", ".join(f"{k} {v!r} there, {getattr(params, k)!r} here"
                               for k, v in asdict(found).items() if getattr(params, k) != v)
            raise SummaryError(f"{path} was written with other parameters ({differ}): "
                               "use another file")
        if summary.code != code:
            raise SummaryError(f"{path} was written by other code (source digest "
                               f"{summary.code}, this tree {code}): its seeds do not count "
                               "for this code; start another file")
        return summary

    def is_done(self, seed: int) -> bool:
        return any(first <= seed <= last for first, last in self.done)

    def add(self, result: Result) -> None:
        self.seeds += 1
        self.sim_hours += result.sim_seconds / 3600.0
        self.node_hours += result.node_hours
        kinds = Counter(v.kind for v in result.violations)
        for kind, n in kinds.items():
            self.violations[kind] = self.violations.get(kind, 0) + n
        if result.violations:
            first = result.violations[0]
            self.failing.append({"seed": result.seed, "kind": first.kind,
                                 "time": round(first.time, 3)})
        self._mark(result.seed)

    def _mark(self, seed: int) -> None:
        ranges = sorted([*self.done, [seed, seed]])
        merged: list[list[int]] = []
        for first, last in ranges:
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        self.done = merged

    def save(self, path: Path) -> None:
        data = {"format": FORMAT, **asdict(self)}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)

    def describe(self) -> str:
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.violations.items()))
        spans = " ".join(f"{a}-{b}" if a != b else str(a) for a, b in self.done)
        total = sum(self.violations.values())
        return (f"summary (code {self.code}): seeds {spans or 'none'}; {self.seeds} seeds, "
                f"{self.sim_hours:.2f} simulated hours, {self.node_hours:.2f} node-hours, "
                f"{self.wall_seconds:.0f} wall s "
                f"({self.node_hours / max(self.wall_seconds, 1e-9):.3f} node-hours per wall "
                f"second); violations: {total}{' (' + kinds + ')' if kinds else ''}")
