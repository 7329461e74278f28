"""The faults a simulated nodeos can be given, and the checking of their parameters.

One table, shared by the Python API, the control API and the command line, so a fault
is spelled and validated the same way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# kind -> (parameter names, what it stands for)
FAULTS: dict[str, tuple[tuple[str, ...], str]] = {
    "desync": ((), "the head stops where it is; the node does not sign"),
    "isolate": ((), "cut from the p2p network both ways: no blocks or votes in or out; "
                    "a producing node builds a fork of its own"),
    "lag": (("seconds",), "blocks and votes reach the node this many seconds late"),
    "freeze_api": ((), "connections are accepted and never answered until cleared"),
    "slow_api": (("seconds",), "every answer is delayed this many seconds"),
    "http_500": ((), "every call answers 500 with nodeos's error body"),
    "garbage": ((), "every call answers 200 with an HTML page instead of JSON"),
    "no_producer_api": ((), "/v1/producer/* answers 404 (producer_api_plugin not loaded)"),
    "restart": (("down",), "the process is down this many seconds, then starts again"),
    "kill": ((), "the process is down until started"),
}
# Faults that take the process down rather than change how a running one behaves.
DOWN_FAULTS = frozenset({"restart", "kill"})


class FaultError(ValueError):
    """A fault kind or parameter that does not exist or is out of range."""


def check_fault(kind: str, params: Mapping[str, object]) -> dict[str, float]:
    """The parameters of ``kind`` as floats, or FaultError naming what is wrong."""
    if kind not in FAULTS:
        raise FaultError(f"unknown fault kind {kind!r} (known: {', '.join(FAULTS)})")
    names = FAULTS[kind][0]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise FaultError(f"fault {kind!r} takes {list(names) or 'no parameters'}, "
                         f"not {unknown}")
    checked: dict[str, float] = {}
    for name in names:
        if name not in params:
            raise FaultError(f"fault {kind!r} needs {name!r} (seconds)")
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise FaultError(f"{kind}.{name} must be a number of seconds >= 0, not {value!r}")
        checked[name] = float(value)
    return checked
