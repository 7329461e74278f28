"""Issue 6: the README's first command, ``bpleader demo --script``, end to end.

It starts real etcd members, the simulator and real agents, plays the fixed fault
sequence and prints a summary; this test reads that summary as a user would.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_script_fails_over_without_double_production() -> None:
    res = subprocess.run([sys.executable, "-m", "bpleader.cli", "demo", "--script"],
                         capture_output=True, text=True, timeout=240)
    out = res.stdout
    assert res.returncode == 0, res.stderr[-3000:]
    summary = out[out.index("== summary"):]
    m = re.search(r"our slots: (\d+)\s+missed: (\d+)\s+double-produced slots: (\d+)\s+"
                  r"double-produced heights: (\d+)\s+vote equivocations: (\d+)", summary)
    assert m, summary
    our, missed, double_slots, double_heights, equivocations = map(int, m.groups())
    assert double_slots == 0 and double_heights == 0 and equivocations == 0, summary
    # The demo runs a Savanna chain: a failover is timed until the new leader's own
    # finalizer key is active.
    assert "own finalizer key active" in summary, summary
    assert our > missed > 0  # failovers cost some slots; most were produced
    failovers = re.findall(r"failover\s+([\d.]+)s\s+(.+)", summary)
    kinds = " ".join(what for _, what in failovers)
    for expected in ("SIGKILL", "SIGSTOP", "out of sync", "switchover"):
        assert expected in kinds, summary
    assert all(float(took) < 15 for took, _ in failovers), summary
    # Quorum loss pauses everyone; quorum back elects one leader again.
    assert re.search(r"producing after quorum loss: nobody", out), out
    tail = out[out.index("restore etcd quorum"):]
    assert "is the leader and producing" in tail, tail
