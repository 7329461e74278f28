"""The benchmark's Markdown table and PNG timelines (matplotlib, optional: ``bench`` extra)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"Trials per scenario and design: {meta['trials']}. Slots are 0.5 s; our producer "
        "has 4 of every 8 slots. *double* = slots of our producer signed by both nodes "
        "(summed over trials, max of one trial in brackets); *missed* = our slots nobody "
        "signed (mean per trial); *new producer* = seconds from the fault to another node "
        "being unpaused (median / p95 / max; — = never, the right answer where 0 failovers "
        "are expected); *spurious* = moves of production beyond the expected number "
        "during the fault (summed).",
        "",
        "| scenario | design | double | missed | new producer s (med / p95 / max) "
        "| no new producer | spurious |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        if not row["applicable"]:
            lines.append(f"| {row['scenario']} | {row['design']} | n/a | n/a | n/a | n/a "
                         "| n/a |")
            continue
        d = row["double_produced_slots"]
        m = row["missed_slots"]
        t = row["time_to_new_producer"]
        exp = "expected" if row["expect_failover"] else "correct: none"
        lines.append(
            f"| {row['scenario']} | {row['design']} | {sum(d)} ({max(d)}) "
            f"| {sum(m) / len(m):.1f} | {_fmt(t['median'])} / {_fmt(t['p95'])} / "
            f"{_fmt(t['max'])} | {row['trials_without_new_producer']}/{row['trials']} "
            f"({exp}) | {row['spurious_failovers']} |")
    if result.get("resources"):
        lines += ["", "| design | processes per host | CPU s per hour per host | RSS MiB per "
                  "host | etcd requests/s per agent | etcd messages/s per agent |",
                  "|---|---|---|---|---|---|"]
        for r in result["resources"]:
            procs = max(r["processes_per_host"].values())
            cpu = sum(r["cpu_seconds_per_hour"].values()) / len(r["cpu_seconds_per_hour"])
            rss = sum(r["rss_mib"].values()) / len(r["rss_mib"])
            req = r["etcd_requests_per_second_per_agent"]
            msg = r.get("etcd_messages_per_second_per_agent")
            lines.append(f"| {r['design']} | {procs} | {cpu:.0f} | {rss:.0f} | "
                         f"{'—' if req is None else req} | {'—' if msg is None else msg} |")
    if result.get("scale"):
        lines += ["", "Scale run (loopback, no namespaces):", "",
                  "| agents | producers | etcd requests/s | per agent | failover s "
                  "(med / max) | double |", "|---|---|---|---|---|---|"]
        for s in result["scale"]:
            lines.append(f"| {s['agents']} | {s['producers']} | {s['etcd_rps']} | "
                         f"{s['etcd_rps_per_agent']} | {_fmt(s['failover']['median'])} / "
                         f"{_fmt(s['failover']['max'])} | {s['double_produced_slots']} |")
    lines += ["", f"Against the goals of issues 12 and 13 ({meta.get('chain', 'legacy')} chain, "
              f"{meta.get('profile', 'fast')} profile, etcd round trip "
              f"+{meta.get('etcd_rtt_ms', 0):g} ms):", "", goals(result)]
    return "\n".join(lines)


# The goals of issues 12 and 13 that this benchmark measures: (what, scenario, figure,
# goal text, test of the figure). Figures: "median" / "p95" time to a new producer,
# "missed" (mean per trial), "spurious" (sum), "heights" (double-produced, sum). An
# unplanned failover's goal depends on the profile's lease (FAILOVER_GOAL).
FAILOVER = -1.0
FAILOVER_GOAL = {"fast": 2.5, "default": 5.7}
GOALS: tuple[tuple[str, str, str, str, float], ...] = (
    ("planned switchover, fault to new producer", "switchover", "median", "<= 0.4 s", 0.4),
    ("planned switchover, missed slots of ours", "switchover", "missed", "0", 0.0),
    ("switchover on a chain with a gap, missed slots of ours", "switchover_gap", "missed",
     "0", 0.0),
    ("the same with --now, missed slots of ours", "switchover_gap_now", "missed", "0", 0.0),
    ("graceful stop (SIGTERM), fault to new producer", "graceful_stop", "median", "<= 0.4 s",
     0.4),
    ("agent killed, fault to new producer", "leader_killed", "median", "", FAILOVER),
    ("agent frozen, fault to new producer", "leader_frozen", "median", "", FAILOVER),
    ("control link cut, fault to new producer", "split_brain", "median", "", FAILOVER),
    ("30 % loss, missed slots per trial", "loss30", "missed", "0", 0.0),
    ("30 % loss, spurious moves", "loss30", "spurious", "0", 0.0),
    ("etcd raft leader cut, missed slots per trial", "etcd_minority", "missed", "<= 1", 1.0),
    ("leader cut from p2p, double-produced heights", "p2p_cut", "heights", "0", 0.0),
)
RESOURCE_GOALS = (("RSS per host (MiB)", "rss", 40.0), ("CPU s per hour per host", "cpu", 30.0),
                  ("etcd requests/s per agent", "req", 2.0))


def _figure(row: dict[str, Any], figure: str) -> float | None:
    if figure in ("median", "p95"):
        value: float | None = row["time_to_new_producer"][figure]
        return value
    if figure == "missed":
        return sum(row["missed_slots"]) / len(row["missed_slots"])
    if figure == "spurious":
        return float(row["spurious_failovers"])
    return float(sum(row["double_produced_heights"]))


def goals(result: dict[str, Any]) -> str:
    """Each goal of issues 12 and 13 this run measures, with bpleader's and the baseline's
    figures beside it; a goal whose scenario was not run says so."""
    rows = {(r["scenario"], r["design"]): r for r in result["summary"] if r["applicable"]}
    lines = ["| goal | bpleader | keepalived | goal | met |", "|---|---|---|---|---|"]
    for what, scenario, figure, text, limit in GOALS:
        if limit == FAILOVER:
            limit = FAILOVER_GOAL[result["meta"].get("profile", "fast")]
            text = f"<= {limit:g} s"
        ours, base = rows.get((scenario, "bpleader")), rows.get((scenario, "keepalived"))
        if ours is None:
            lines.append(f"| {what} | not in this run | | {text} | |")
            continue
        value = _figure(ours, figure)
        shown = "never" if value is None else f"{value:.2f}"
        other = "n/a" if base is None else (lambda v: "never" if v is None else f"{v:.2f}")(
            _figure(base, figure))
        met = "yes" if value is not None and value <= limit else "**no**"
        lines.append(f"| {what} | {shown} | {other} | {text} | {met} |")
    per_design = {r["design"]: r for r in result.get("resources", [])}
    for what, key, limit in RESOURCE_GOALS:
        values = {d: _resource(r, key) for d, r in per_design.items()}
        ours = values.get("bpleader")
        if ours is None:
            lines.append(f"| {what} | not in this run | | <= {limit:g} | |")
            continue
        base = values.get("keepalived")
        lines.append(f"| {what} | {ours:.1f} | {'—' if base is None else f'{base:.1f}'} "
                     f"| <= {limit:g} | {'yes' if ours <= limit else '**no**'} |")
    return "\n".join(lines) + "\n"


def _resource(r: dict[str, Any], key: str) -> float | None:
    if key == "rss":
        return float(sum(r["rss_mib"].values()) / len(r["rss_mib"]))
    if key == "cpu":
        return float(sum(r["cpu_seconds_per_hour"].values()) / len(r["cpu_seconds_per_hour"]))
    req = r["etcd_requests_per_second_per_agent"]
    return None if req is None else float(req)


def _epoch(block_time: str) -> float:
    return datetime.strptime(block_time, "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=UTC).timestamp()


def timelines(result: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per scenario and design (its first trial); nothing without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    firsts = [t for t in result["trials"] if t["trial"] == 0]
    for t in firsts:
        fig, ax = plt.subplots(figsize=(10, 2.6))
        nodes = ["bp-a", "bp-b"]
        t0 = t["t_fault"]
        for row, node in enumerate(nodes):
            # unpaused intervals from the 50 ms samples
            spans: list[tuple[float, float]] = []
            start: float | None = None
            samples = t["timeline"]["samples"]
            for at, producing in samples:
                if node in producing and start is None:
                    start = at
                elif node not in producing and start is not None:
                    spans.append((start, at - start))
                    start = None
            if start is not None and samples:
                spans.append((start, samples[-1][0] - start))
            ax.broken_barh(spans, (row - 0.35, 0.15), color="#bbbbbb")
            for s in t["timeline"]["slots"]:
                if not s["ours"] or node not in s["signers"]:
                    continue
                x = _epoch(s["start"]) - t0
                double = len(s["signers"]) > 1
                ax.broken_barh([(x, 0.45)], (row - 0.15, 0.5),
                               color="#d62728" if double else "#1f77b4")
        for s in t["timeline"]["slots"]:
            if s["ours"] and not s["signers"]:
                ax.plot(_epoch(s["start"]) - t0 + 0.25, -0.8, "x", color="#ff7f0e", ms=4)
        ax.axvspan(0, t["t_heal"] - t0, color="#ffdd99", alpha=0.5, lw=0, zorder=0)
        ax.set_yticks([-0.8, 0, 1], ["missed", *nodes])
        ax.set_ylim(-1.2, 1.6)
        ax.set_xlabel("seconds from fault start (shaded: fault; blue: block signed; red: "
                      "double-produced slot; grey: unpaused)")
        ax.set_title(f"{t['scenario']} — {t['design']}: double={t['double_produced_slots']} "
                     f"missed={t['missed_slots']} new producer after "
                     f"{_fmt(t['time_to_new_producer'])} s", fontsize=10)
        fig.tight_layout()
        path = out / f"timeline-{t['scenario']}-{t['design']}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
