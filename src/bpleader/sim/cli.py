"""``bpleader sim``: run the simulator as a process until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from bpleader.antelope import TransactionError, normalize_public_key
from bpleader.sim.cluster import DEFAULT_CHAIN_ID, PERMISSION_NAME, SimCluster
from bpleader.sim.faults import FAULTS
from bpleader.sim.finality import DEFAULT_VOTE_TIMEOUT

DESCRIPTION = """\
Simulated nodeos nodes of one block producer, on one simulated chain, for testing
bpleader without nodeos. Each node is a real HTTP server (TCP or unix socket) answering
nodeos's get_info and producer API (pause, resume, paused, pause_at_block) with nodeos's
JSON shapes. Blocks are signed slot by slot on the wall clock: in our producer's slots
every node that is up and unpaused signs, so two resumed nodes double-produce, and the
ledger counts it. Faults (below) can be injected through the control API.

The chain is a Savanna chain (Spring 1.x) unless --legacy: every node has its own BLS
finalizer key, the one in the finalizer policy votes on every block (paused or not), the
last irreversible block trails the head by about 2 blocks, and a resumed node stops
producing (nodeos's implicit pause, /v1/producer/paused reads true) when no vote of our
producer's finalizer (or of the others) arrived for --vote-timeout seconds after a block;
/v1/producer/resume lifts it for that long again. The active key is switched with
an eosio::actfinkey transaction (send_transaction2, push_transaction), authorised by the
--finalizer-permission; get_finalizer_info and get_table_rows (eosio finkeys, finalizers)
show the result.

Once listening, one JSON line is printed:
{"control": URL, "nodes": {NAME: URL}, "finalizer_keys": {NAME: PUB_BLS_...}}
(finalizer_keys is empty with --legacy). On SIGTERM or SIGINT the ledger summary is
printed as JSON and the exit code is 0.
"""


def _faults_help() -> str:
    lines = ["faults (POST /nodes/NAME/fault {\"kind\": ..., PARAMS}):"]
    lines += [f"  {kind:<16} {', '.join(params) or '-':<8} {what}"
              for kind, (params, what) in FAULTS.items()]
    lines += ["", "control API: GET /ledger, GET /ledger/slots?since=K, GET /nodes,",
              "  GET /finalizers (the active finalizer key, the node holding it, the policy",
              "  generation, each node's implicit pause),",
              "  POST /nodes/NAME/{fault,clear,restart,kill,start}"]
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


def _permission(text: str) -> tuple[str, str]:
    """``NAME=PUB_K1_...`` (or ``NAME=EOS...``): a permission and its public key."""
    name, sep, key = text.partition("=")
    name, key = name.strip(), key.strip()
    if not sep or not PERMISSION_NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"expected NAME=PUB_K1_... with an Antelope name (a-z, 1-5, '.', up to 12), "
            f"not {text!r}")
    try:
        key = normalize_public_key(key)
    except TransactionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, key


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpleader sim", description=DESCRIPTION,
                                epilog=_faults_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--producer", required=True, help="our producer account, e.g. mybp")
    p.add_argument("--nodes", required=True, type=_names, metavar="A,B",
                   help="names of our simulated nodeos nodes (they share the signing key)")
    p.add_argument("--other-producers", type=_names, default=[], metavar="X,Y",
                   help="the rest of the schedule; their slots are always filled "
                        "(default: none, so the head only advances while we produce)")
    p.add_argument("--slots-per-producer", type=int, default=12, metavar="N",
                   help="consecutive slots of each producer (default 12)")
    p.add_argument("--block-interval", type=float, default=0.5, metavar="SECONDS",
                   help="slot length (default 0.5, as the chain; smaller speeds tests up)")
    startup = p.add_mutually_exclusive_group()
    startup.add_argument("--pause-on-startup", type=_names, default=[], metavar="A,B",
                         help="nodes that start and restart paused (nodeos's "
                              "pause-on-startup); the others start producing, as nodeos")
    startup.add_argument("--pause-on-startup-all", action="store_true",
                         help="every node starts and restarts paused")
    p.add_argument("--legacy", action="store_true",
                   help="a pre-Savanna chain (Leap 5): no finalizers and no votes, the last "
                        "irreversible block 2/3 of a round behind, no implicit pause")
    p.add_argument("--vote-timeout", type=_seconds, metavar="SECONDS",
                   help="nodeos's production-pause-vote-timeout-ms, in seconds: a resumed "
                        f"node stops producing when no vote of our finalizer arrived for "
                        f"this long (default {DEFAULT_VOTE_TIMEOUT:g}; 0 disables)")
    p.add_argument("--finalizer-permission", type=_permission, metavar="NAME=PUB_K1_...",
                   help="a permission of the producer account with this key, linked to "
                        "eosio::actfinkey (linkauth), to switch the active finalizer key")
    p.add_argument("--unix-dir", type=Path, metavar="DIR",
                   help="listen on DIR/NAME.sock instead of TCP")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                                                      "127.0.0.1: the producer API must "
                                                      "stay local)")
    p.add_argument("--base-port", type=int, default=0, metavar="P",
                   help="first node on P, the next on P+1, ... (default 0: ephemeral)")
    p.add_argument("--control-port", type=int, default=0, metavar="P",
                   help="port of the control API (default 0: ephemeral)")
    p.add_argument("--chain-id", default=DEFAULT_CHAIN_ID, help="64 hex digits")
    p.add_argument("--ready-file", type=Path, metavar="FILE",
                   help="also write the ready JSON here (atomically) once listening")
    p.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _write_atomically(path: Path, text: str) -> None:
    """Readers polling for the file never see half of it: write aside, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.legacy and (args.vote_timeout is not None
                        or args.finalizer_permission is not None):
        parser.print_usage(sys.stderr)
        print("bpleader sim: error: --vote-timeout and --finalizer-permission need a "
              "Savanna chain (not --legacy)", file=sys.stderr)
        return 2
    pause: dict[str, bool] | bool = True if args.pause_on_startup_all else {
        n: True for n in args.pause_on_startup}
    permission, permission_key = args.finalizer_permission or (None, None)
    vote_timeout = DEFAULT_VOTE_TIMEOUT if args.vote_timeout is None else args.vote_timeout
    try:
        cluster = SimCluster(args.producer, args.nodes, other_producers=args.other_producers,
                             slots_per_producer=args.slots_per_producer,
                             block_interval=args.block_interval, pause_on_startup=pause,
                             unix_dir=args.unix_dir, host=args.host, base_port=args.base_port,
                             control_port=args.control_port, chain_id=args.chain_id,
                             savanna=not args.legacy, vote_timeout=vote_timeout,
                             finalizer_permission=permission,
                             finalizer_permission_key=permission_key)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"bpleader sim: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
    except OSError as exc:
        print(f"bpleader sim: cannot listen: {exc}", file=sys.stderr)
        return 1
    try:
        ready = json.dumps({"control": cluster.control_url, "nodes": cluster.urls(),
                            "finalizer_keys": cluster.finalizer_keys()})
        print(ready, flush=True)
        if args.ready_file is not None:
            _write_atomically(args.ready_file, ready + "\n")
        while not stop.wait(1.0):
            pass
    finally:
        cluster.stop()
    print(json.dumps(cluster.ledger_summary()), flush=True)
    return 0
