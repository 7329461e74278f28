"""The ``bpleader`` command line: one subcommand per job, each a thin call into a module."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from bpleader import __version__

if TYPE_CHECKING:
    from bpleader.config import Config

DESCRIPTION = """\
bpleader keeps exactly one nodeos of a block producer producing. Every producer node
runs `bpleader agent`; the agents elect a leader through an etcd lease, only the leader's
nodeos is resumed, and every other nodeos is kept paused. See README.md.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpleader", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"bpleader {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--config", "-c", required=True, metavar="FILE",
                        help="the agent's TOML configuration (BPLEADER_* variables override)")
        return sp

    a = with_config("agent", "run the agent on this producer node (foreground, for systemd)")
    a.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    st = with_config("status", "show the leader, candidates and node records; exit 0 with "
                               "one leader, 1 with none, 2 when etcd cannot be read")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    sw = with_config("switchover", "planned handover: the leader pauses and resigns, the "
                                   "target (or any in-sync node) takes over; by default "
                                   "in the gap after the producer's round, so that no slot "
                                   "of ours goes unsigned")
    sw.add_argument("--to", metavar="NODE", help="the node that should take over")
    sw.add_argument("--now", action="store_true",
                    help="hand over at once, not in the gap after our round (slots of ours "
                         "that fall in the handover go unsigned)")
    sw.add_argument("--gap-wait", type=float, default=30.0, metavar="SECONDS",
                    help="how long to wait for the gap before switching anyway (default 30; "
                         "a round of 12 slots is 6 s)")
    sw.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                    help="how long to wait for the new leader (default 30)")

    m = with_config("maintenance", "freeze (on) or unfreeze (off) every agent of the "
                                   "producer: no agent changes nodeos state while on")
    m.add_argument("state", choices=["on", "off"])
    m.add_argument("--reason", help="shown by status and in the agents' logs")

    f = with_config("fence", "pause the local nodeos and exit 0 only when it confirms "
                             "(for systemd's ExecStopPost)")
    f.add_argument("--budget", type=float, default=10.0, metavar="SECONDS",
                   help="keep retrying this long (default 10)")

    cc = sub.add_parser("check-config", help="validate a configuration file; exit 0, or 2 "
                                             "listing every error",
                        description="Validate FILE (with BPLEADER_* overrides) and print the "
                                    "effective configuration, secrets redacted.")
    cc.add_argument("file", nargs="?", help="the configuration file to check")
    cc.add_argument("--reference", action="store_true",
                    help="print the reference of every field (Markdown) and exit")

    sub.add_parser("demo", help="a local cluster with live failovers (see `bpleader demo "
                                "--help`)", add_help=False)
    sub.add_parser("sim", help="simulated nodeos nodes on one simulated chain, for tests "
                               "and demos (see `bpleader sim --help`)", add_help=False)
    return p


def _load(path: str) -> Config:
    from bpleader.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"config error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from bpleader.demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["sim"]:
        from bpleader.sim.cli import main as sim_main

        return sim_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        from bpleader.config import check_config_main, reference_markdown

        if args.reference:
            print(reference_markdown())
            return 0
        if args.file is None:
            print("bpleader check-config: error: FILE or --reference is required",
                  file=sys.stderr)
            return 2
        return check_config_main(args.file)
    cfg = _load(args.config)
    if args.command == "agent":
        from bpleader.config import warnings
        from bpleader.service import run_agent, setup_logging

        setup_logging(args.log_level)
        for w in warnings(cfg):
            print(f"warning: {w}", file=sys.stderr)
        return asyncio.run(run_agent(cfg))
    if args.command == "fence":
        from bpleader.fence import fence_command

        return fence_command(cfg.nodeos.url, cfg.nodeos.timeout, args.budget)
    from bpleader import ops

    if args.command == "status":
        return ops.status_command(cfg, args.json)
    if args.command == "switchover":
        return ops.switchover_command(cfg, args.to, args.wait,
                                      0.0 if args.now else args.gap_wait)
    return ops.maintenance_command(cfg, args.state == "on", args.reason)


if __name__ == "__main__":
    sys.exit(main())
