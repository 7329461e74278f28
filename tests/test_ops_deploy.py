"""Every artefact in deploy/ (and docker-compose.test.yml) checked by its own real tool:
promtool, keepalived -t, systemd-analyze verify, docker-compose config, etcdctl; plus the
cross-checks no tool does (the dashboard and rules name metrics the agent exports)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bpleader.config import parse_config
from bpleader.localetcd import EtcdCluster
from bpleader.metrics import AgentCollector
from bpleader.notify import NotifierCollector

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is required: scripts/bootstrap.sh installs Debian's {package!r}")
    return path


def run(*argv: str, cwd: Path = ROOT, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          **kw)  # type: ignore[call-overload, no-any-return]


def exported_names() -> set[str]:
    """Metric family names the agent exports (from the collectors' source, as exposed)."""
    import inspect

    names = set()
    from bpleader import metrics

    for src in (inspect.getsource(AgentCollector), inspect.getsource(NotifierCollector),
                inspect.getsource(metrics._finalizer_metrics)):
        names |= set(re.findall(r'"(bpleader_[a-z_]+)"', src))
    names |= {"bpleader_notifications_sent", "bpleader_notifications_failed",
              "bpleader_notifications_dropped", "bpleader_notifications_retries"}
    counters = {n for n in names if not n.endswith(("_seconds", "_info", "_leader", "_sync",
                                                     "_producing", "_role"))}
    exposed = set(names) | {n + "_total" for n in counters}
    metrics_src = (ROOT / "src/bpleader/metrics.py").read_text()
    for h in re.findall(r'Histogram\(\s*"(bpleader_[a-z_]+)"', metrics_src):
        exposed |= {h, h + "_bucket", h + "_count", h + "_sum"}
    return exposed


# ----------------------------------------------------------------- Prometheus


def test_promtool_checks_rules_and_config() -> None:
    promtool = tool("promtool", "prometheus")
    r = run(promtool, "check", "rules", "bpleader.rules.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(promtool, "check", "config", "prometheus.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr



def test_promtool_checks_the_compose_prometheus_config(tmp_path: Path) -> None:
    """The compose file mounts the shipped rules at /etc/prometheus/: check the config
    with that path pointed at them."""
    promtool = tool("promtool", "prometheus")
    text = (DEPLOY / "docker/prometheus.yml").read_text()
    assert "/etc/prometheus/bpleader.rules.yml" in text
    local = tmp_path / "prometheus.yml"
    local.write_text(text.replace("/etc/prometheus/bpleader.rules.yml",
                                  str(PROM / "bpleader.rules.yml")))
    r = run(promtool, "check", "config", str(local))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_for_every_alert() -> None:
    promtool = tool("promtool", "prometheus")
    r = run(promtool, "test", "rules", "bpleader.rules.test.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    rules = yaml.safe_load((PROM / "bpleader.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"BpleaderNoLeader", "BpleaderMultipleProducing", "BpleaderAgentDown",
            "BpleaderLeaseRenewalsFailing", "BpleaderDoppelgangerDetected",
            "BpleaderLeaderOutOfSync"} <= alerts
    tests = yaml.safe_load((PROM / "bpleader.rules.test.yml").read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
             if t.get("exp_alerts")}
    assert alerts - {"BpleaderNotificationsFailing"} <= fired, alerts - fired


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """Control: a rule that never fires makes the shipped unit tests fail."""
    promtool = tool("promtool", "prometheus")
    text = (PROM / "bpleader.rules.yml").read_text().replace(
        "producer:bpleader_producing_nodes:sum > 1", "producer:bpleader_producing_nodes:sum > 2")
    (tmp_path / "bpleader.rules.yml").write_text(text)
    shutil.copy(PROM / "bpleader.rules.test.yml", tmp_path)
    r = run(promtool, "test", "rules", "bpleader.rules.test.yml", cwd=tmp_path)
    assert r.returncode != 0 and "BpleaderMultipleProducing" in r.stdout + r.stderr


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = exported_names()
    rules_text = (PROM / "bpleader.rules.yml").read_text()
    dash = json.loads((DEPLOY / "grafana/bpleader-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and dash["uid"] == "bpleader"
    # (recording rules such as producer:bpleader_leaders:sum are not agent metrics)
    used = set(re.findall(r"(?<![:\w])(bpleader_[a-z_]+)", rules_text + "\n".join(exprs)))
    assert used, "no bpleader metric referenced"
    assert used <= exported, used - exported
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["w"] <= 24


# ------------------------------------------------------------------ keepalived


def test_keepalived_config_is_valid_and_only_moves_the_vip(tmp_path: Path) -> None:
    keepalived = tool("keepalived", "keepalived")
    conf = DEPLOY / "keepalived/keepalived.conf"
    text = conf.read_text()
    example = tomllib.loads((DEPLOY / "bpleader.example.toml").read_text())
    port = example["metrics"]["listen"].rsplit(":", 1)[1]
    assert f"curl -fs -o /dev/null --max-time 1 http://127.0.0.1:{port}/leader" in text
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for forbidden in ("notify", "pause", "resume", "/v1/producer"):
        assert forbidden not in body, forbidden
    assert re.search(r"^\s*script_user\s+(?!root)\S+", body, re.M)
    r = run(keepalived, "-t", "-l", "-f", str(conf))
    if r.returncode == 128 + 15 or r.returncode == -15:
        # keepalived 2.2.7 (Debian 12) kills itself during -t when script_user is not
        # root (acassen/keepalived#2617, fixed upstream by PR #2182): check the same file
        # with only that line changed, so every other statement is still validated.
        patched = tmp_path / "keepalived.conf"
        patched.write_text(re.sub(r"(?m)^(\s*script_user)\s+\S+", r"\1 root", text))
        r = run(keepalived, "-t", "-l", "-f", str(patched))
    assert r.returncode == 0, r.stdout + r.stderr


def test_keepalived_check_can_fail(tmp_path: Path) -> None:
    keepalived = tool("keepalived", "keepalived")
    broken = tmp_path / "broken.conf"
    broken.write_text((DEPLOY / "keepalived/keepalived.conf").read_text()
                      .replace("script_user nobody", "script_user root")
                      .replace("advert_int 1", "advert_int banana"))
    r = run(keepalived, "-t", "-l", "-f", str(broken))
    assert r.returncode != 0


# --------------------------------------------------------------------- systemd


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "bpleader.service").read_text()
    assert re.search(r"^ExecStopPost=\S+bpleader fence --config ", unit, re.M)
    for key in ("Type=notify", "WatchdogSec=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                "CapabilityBoundingSet=", "SystemCallFilter=@system-service"):
        assert key in unit, key
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package 'systemd')")
    # The unit names /opt/bpleader/venv/bin/bpleader; verify checks that it exists.
    exe = Path(sys.executable).with_name("bpleader")
    if not exe.exists():
        pytest.skip(f"no bpleader executable beside {sys.executable} to stand in for "
                    "/opt/bpleader/venv/bin/bpleader")
    local = tmp_path / "bpleader.service"
    local.write_text(unit.replace("/opt/bpleader/venv/bin/bpleader", str(exe)))
    r = run(analyze, "verify", str(local))
    if "Failed to" in r.stderr and "bus" in r.stderr.lower():
        pytest.skip(f"systemd-analyze verify cannot run here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # --threshold=20: fail when systemd's exposure score rises above 2.0 (of 10).
    sec = run(analyze, "security", "--offline=yes", "--threshold=20", str(local))
    assert sec.returncode == 0, sec.stdout[-1500:] + sec.stderr


# ------------------------------------------------------------------------ etcd


def test_etcd_rbac_script_limits_the_user_to_the_prefix(etcd1: EtcdCluster) -> None:
    script = DEPLOY / "etcd/rbac.sh"
    env = {**os.environ, "ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": etcd1.endpoints[0],
           "ROOT_PASSWORD": "r00t-Secret", "AGENT_PASSWORD": "ag3nt-Secret"}
    r = run("bash", str(script), "mybp", "/bpleader", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Secret" not in r.stdout + r.stderr

    def ctl(user: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run("etcdctl", f"--endpoints={etcd1.endpoints[0]}", f"--user={user}", *args,
                   env={**os.environ, "ETCDCTL_API": "3"}, input=stdin)

    agent = "bpleader-mybp:ag3nt-Secret"
    assert ctl(agent, "put", "/bpleader/mybp/nodes/bp-a", "{}").returncode == 0
    lease = ctl(agent, "lease", "grant", "5")
    assert lease.returncode == 0, lease.stderr
    lease_id = lease.stdout.split()[1]
    assert ctl(agent, "put", "--lease", lease_id, "/bpleader/mybp/election/x", "bp-a"
               ).returncode == 0
    assert ctl(agent, "get", "--prefix", "/bpleader/mybp/").returncode == 0
    assert ctl(agent, "lease", "revoke", lease_id).returncode == 0
    for key in ("/bpleader/otherbp/election/x", "/bpleader/mybpx/y", "/elsewhere"):
        denied = ctl(agent, "put", key, "v")
        assert denied.returncode != 0 and "permission denied" in denied.stderr, key
    assert ctl("nobody:x", "get", "/bpleader/mybp/").returncode != 0
    # Running it again (another producer) works with auth already on.
    r = run("bash", str(script), "otherbp", env=env)
    assert r.returncode == 0, r.stderr


# -------------------------------------------------------------- docker-compose


def test_docker_compose_test_bed_config() -> None:
    compose_file = ROOT / "docker-compose.test.yml"
    data = yaml.safe_load(compose_file.read_text())
    services = data["services"]
    etcds = [n for n, s in services.items() if "etcd" in str(s.get("image", ""))]
    assert len(etcds) == 3
    agents = {n: s for n, s in services.items() if s.get("command", [None])[0] == "agent"}
    assert len(agents) == 2
    sim = services["sim"]
    assert sim["command"][0] == "sim" and "bp-a,bp-b" in sim["command"]
    assert "prometheus" in services
    # Each agent's effective configuration is valid for bpleader itself.
    base = tomllib.loads((DEPLOY / "docker/agent.toml").read_text())
    names = set()
    for s in agents.values():
        cfg = parse_config(base, s["environment"])
        names.add(cfg.node.name)
        assert cfg.nodeos.url.startswith("http://sim:")
        assert [e.split("//")[1].split(":")[0] for e in cfg.etcd.endpoints] == etcds
    assert names == {"bp-a", "bp-b"}

    exe = shutil.which("docker-compose")
    if exe is not None:
        r = run(exe, "-f", str(compose_file), "config", "-q")
        assert r.returncode == 0, r.stderr
        listed = run(exe, "-f", str(compose_file), "config", "--services").stdout.split()
        assert sorted(listed) == sorted(services)
        return
    docker = shutil.which("docker")
    if docker is not None and run(docker, "compose", "version").returncode == 0:
        r = run(docker, "compose", "-f", str(compose_file), "config", "-q")
        assert r.returncode == 0, r.stderr
        return
    pytest.skip("neither docker-compose nor `docker compose` is installed (scripts/"
                "bootstrap.sh installs Debian's 'docker-compose'); structure checked above")


# ------------------------------------------------------------------ nodeos, docs


def test_nodeos_fragment_keeps_the_producer_api_local() -> None:
    text = (DEPLOY / "nodeos/config.ini").read_text()
    settings = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    settings = [s for s in settings if s]
    assert "pause-on-startup = true" in settings
    assert "plugin = eosio::producer_api_plugin" in settings
    http = [s for s in settings if s.startswith("http-server-address")]
    assert http == ["http-server-address = 127.0.0.1:8888"]


def test_etcd_readme_shows_tls_cluster_and_rbac() -> None:
    text = (DEPLOY / "etcd/README.md").read_text()
    assert text.count("ETCD_CLIENT_CERT_AUTH=true") == 1
    assert "etcd1=https://" in text and "etcd3=https://" in text
    for cmd in ("etcdctl role add", "etcdctl role grant-permission", "--prefix=true",
                "etcdctl user add", "etcdctl user grant-role", "etcdctl auth enable"):
        assert cmd in text, cmd


def test_savanna_setup_script_prints_the_permission_link_and_registrations() -> None:
    script = DEPLOY / "savanna/setup-finalizer-keys.sh"
    r = run("sh", str(script), "mybp", "PUB_K1_6MRyAjQq8ud7hVNYcfnVPJqcVpscN5So8BhtHuGYqET5BoDq63",
            "PUB_BLS_a:SIG_BLS_a", "PUB_BLS_b:SIG_BLS_b")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("set account permission mybp finkey" in line for line in lines)
    assert any("set action permission mybp eosio actfinkey finkey" in line for line in lines)
    assert sum("regfinkey" in line for line in lines) == 2
    usage = run("sh", str(script))
    assert usage.returncode == 2 and "spring-util bls create key" in usage.stderr
    for name in ("setup-finalizer-keys.sh", "actfinkey.sh"):
        assert run("sh", "-n", str(DEPLOY / "savanna" / name)).returncode == 0

