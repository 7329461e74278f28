"""Least exposure by default: loopback listeners, local nodeos, secret files kept private,
secret values never echoed (the full-run grep is in test_sec_tls.py)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bpleader.config import (
    ConfigError,
    MetricsConfig,
    check_config_main,
    is_local_host,
    load_config,
    parse_config,
    warnings,
)

BASE: dict[str, Any] = {"node": {"name": "bp-a", "producer": "mybp"},
                        "etcd": {"endpoints": ["http://127.0.0.1:2379"]}}
SECRET = "hunter2-Zq9-secret"


def config(**sections: dict[str, Any]) -> Any:
    data = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, {})


def test_metrics_listen_on_loopback_by_default() -> None:
    host = MetricsConfig().listen.rpartition(":")[0]
    assert is_local_host(host)
    assert warnings(config()) == []
    assert any("beyond loopback" in w for w in warnings(config(metrics={"listen":
                                                                        "0.0.0.0:9750"})))


@pytest.mark.parametrize("url,local", [
    ("http://127.0.0.1:8888", True), ("http://127.0.0.2:8888", True),
    ("http://localhost:8888", True), ("http://[::1]:8888", True),
    ("unix:///run/nodeos/http.sock", True), ("http://10.0.0.5:8888", False),
    ("https://bp.example.com", False), ("http://0.0.0.0:8888", False),
])
def test_warning_when_nodeos_is_not_local(url: str, local: bool) -> None:
    found = [w for w in warnings(config(nodeos={"url": url})) if "nodeos.url" in w]
    assert (found == []) == local, found


def write(path: Path, mode: int, secret_in_file: bool = True) -> Path:
    text = '[node]\nname = "bp-a"\nproducer = "mybp"\n[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n'
    if secret_in_file:
        text += f'username = "bp"\npassword = "{SECRET}"\n'
    path.write_text(text)
    path.chmod(mode)
    return path


def test_world_readable_file_with_secrets_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", 0o644)
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    (line,) = exc.value.errors
    assert "etcd.password" in line and "chmod 600" in line and "0644" in line
    assert SECRET not in line
    out, err = io.StringIO(), io.StringIO()
    assert check_config_main(str(path), out, err) == 2
    assert SECRET not in out.getvalue() + err.getvalue()


def test_group_readable_is_a_warning_and_private_is_silent(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", 0o640)
    assert any("group" in w and "etcd.password" in w for w in warnings(load_config(path, {})))
    path.chmod(0o600)
    assert warnings(load_config(path, {})) == []


def test_secret_from_the_environment_leaves_the_file_free(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", 0o644, secret_in_file=False)
    cfg = load_config(path, {"BPLEADER_ETCD_USERNAME": "bp", "BPLEADER_ETCD_PASSWORD": SECRET})
    assert cfg.etcd.password == SECRET
    assert warnings(cfg) == []
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.redacted())


@pytest.mark.parametrize("value", [12345678, 3.5, ["a", SECRET], {"x": SECRET}, True])
def test_a_mistyped_secret_is_not_echoed(value: Any) -> None:
    for section, field in (("etcd", "password"), ("notify", "webhook_url"),
                           ("notify", "slack_webhook"), ("notify", "pagerduty_routing_key")):
        data = {k: dict(v) for k, v in BASE.items()}
        data.setdefault(section, {})[field] = value
        if section == "etcd":
            data["etcd"]["username"] = "bp"
        with pytest.raises(ConfigError) as exc:
            parse_config(data, {})
        text = str(exc.value)
        assert f"{section}.{field}" in text
        assert repr(value) not in text and SECRET not in text and "12345678" not in text


def test_agent_refuses_to_start_on_an_exposed_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.toml", 0o644)
    r = subprocess.run([sys.executable, "-m", "bpleader.cli", "agent", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert r.returncode == 2
    assert "readable by every local user" in r.stderr
    assert SECRET not in r.stdout + r.stderr and "Traceback" not in r.stderr
