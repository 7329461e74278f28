"""``bpleader sim``: run the simulator as a process until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from bpleader.sim.cluster import DEFAULT_CHAIN_ID, SimCluster
from bpleader.sim.faults import FAULTS

DESCRIPTION = """\
Simulated nodeos nodes of one block producer, on one simulated chain, for testing
bpleader without nodeos. Each node is a real HTTP server (TCP or unix socket) answering
nodeos's get_info and producer API (pause, resume, paused, pause_at_block) with nodeos's
JSON shapes. Blocks are signed slot by slot on the wall clock: in our producer's slots
every node that is up and unpaused signs, so two resumed nodes double-produce, and the
ledger counts it. Faults (below) can be injected through the control API.

Once listening, one JSON line is printed: {"control": URL, "nodes": {NAME: URL}}.
On SIGTERM or SIGINT the ledger summary is printed as JSON and the exit code is 0.
"""


def _faults_help() -> str:
    lines = ["faults (POST /nodes/NAME/fault {\"kind\": ..., PARAMS}):"]
    lines += [f"  {kind:<16} {', '.join(params) or '-':<8} {what}"
              for kind, (params, what) in FAULTS.items()]
    lines += ["", "control API: GET /ledger, GET /ledger/slots?since=K, GET /nodes,",
              "  POST /nodes/NAME/{fault,clear,restart,kill,start}"]
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


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
    pause: dict[str, bool] | bool = True if args.pause_on_startup_all else {
        n: True for n in args.pause_on_startup}
    try:
        cluster = SimCluster(args.producer, args.nodes, other_producers=args.other_producers,
                             slots_per_producer=args.slots_per_producer,
                             block_interval=args.block_interval, pause_on_startup=pause,
                             unix_dir=args.unix_dir, host=args.host, base_port=args.base_port,
                             control_port=args.control_port, chain_id=args.chain_id)
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
        ready = json.dumps({"control": cluster.control_url, "nodes": cluster.urls()})
        print(ready, flush=True)
        if args.ready_file is not None:
            _write_atomically(args.ready_file, ready + "\n")
        while not stop.wait(1.0):
            pass
    finally:
        cluster.stop()
    print(json.dumps(cluster.ledger_summary()), flush=True)
    return 0
