"""The nodeos simulator: real HTTP servers with nodeos's API over one simulated chain.

Every test, demo and benchmark of bpleader uses it in place of nodeos. Start a
:class:`SimCluster` in-process, or ``bpleader sim`` as a process driven with
:class:`SimControl`; either way the ledger says whether our producer ever signed one slot
or one height twice.
"""

from bpleader.sim.client import SimControl, SimControlError
from bpleader.sim.cluster import DEFAULT_CHAIN_ID, SimCluster, SimNode
from bpleader.sim.faults import FAULTS, FaultError
from bpleader.sim.node import ApiCall

__all__ = ["DEFAULT_CHAIN_ID", "FAULTS", "ApiCall", "FaultError", "SimCluster", "SimControl",
           "SimControlError", "SimNode"]
