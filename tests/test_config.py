from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpleader.config import (
    ConfigError,
    check_config_main,
    load_config,
    parse_config,
    redact_url,
)

EXAMPLE = Path(__file__).parent.parent / "deploy" / "bpleader.example.toml"
BASE: dict[str, Any] = {"node": {"name": "bp-a", "producer": "mybp"},
                        "etcd": {"endpoints": ["http://127.0.0.1:2379"]}}


def errors_for(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, env or {})
    return exc.value.errors


def with_(section: str, **values: Any) -> dict[str, Any]:
    data = {k: dict(v) for k, v in BASE.items()}
    data.setdefault(section, {}).update(values)
    return data


def test_example_loads() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.timing.lease_ttl == 5 and cfg.timing.keepalive_interval == 1.0


def test_keepalive_defaults_to_a_fifth_of_the_ttl() -> None:
    assert parse_config(BASE, {}).timing.keepalive_interval == 1.0


@pytest.mark.parametrize("section,values,field", [
    ("timing", {"fence_guard": 2.5}, "timing.fence_guard"),
    ("timing", {"takeover_delay": 0.2}, "timing.takeover_delay"),
    ("timing", {"lease_ttl": 2.5}, "timing.lease_ttl"),
    ("timing", {"lease_ttl": 1}, "timing.lease_ttl"),
    ("timing", {"keepalive_interval": 2.0}, "timing.keepalive_interval"),
    ("timing", {"check_interval": 2.0}, "timing.check_interval"),
    ("timing", {"lease_ttl": True}, "timing.lease_ttl"),
    ("nodeos", {"timeout": 2.0}, "timing.fence_guard"),
    ("nodeos", {"url": "ftp://x"}, "nodeos.url"),
    ("nodeos", {"chain_id": "xyz"}, "nodeos.chain_id"),
    ("node", {"producer": "BadName"}, "node.producer"),
    ("node", {"name": "a/b"}, "node.name"),
    ("etcd", {"endpoints": []}, "etcd.endpoints"),
    ("etcd", {"prefix": "bpleader/"}, "etcd.prefix"),
    ("etcd", {"username": "u"}, "etcd.username"),
    ("etcd", {"ca_cert": "/nonexistent"}, "etcd.ca_cert"),
    ("etcd", {"colour": "blue"}, "etcd.colour"),
    ("etcd", {"election_timeout": 0}, "etcd.election_timeout"),
    ("etcd", {"election_timeout": 1.5}, "etcd.election_timeout"),
    ("metrics", {"listen": "nope"}, "metrics.listen"),
    ("notify", {"timeout": 0}, "notify.timeout"),
    ("notify", {"max_time": 1.0}, "notify.max_time"),
    ("bogus", {"x": 1}, "[bogus]"),
])
def test_each_rule_names_the_field(section: str, values: dict[str, Any], field: str) -> None:
    errors = errors_for(with_(section, **values))
    assert any(e.startswith(field) for e in errors), errors


FAST = {"lease_ttl": 2, "keepalive_interval": 0.3, "fence_guard": 0.9, "takeover_delay": 0.5,
        "check_interval": 0.25}


def test_the_lease_leaves_room_for_an_etcd_leader_election() -> None:
    """The fast profile on etcd's default election timeout would be fenced by every raft
    leader change: refused, with the etcd setting that fits."""
    data = with_("timing", **FAST)
    errors = errors_for(data)
    assert len(errors) == 1 and errors[0].startswith("etcd.election_timeout = 1:"), errors
    assert "--election-timeout <= 400" in errors[0], errors
    data["etcd"]["election_timeout"] = 0.25
    assert parse_config(data, {}).etcd.election_timeout == 0.25
    # The default profile fits etcd's defaults.
    assert parse_config(BASE, {}).etcd.election_timeout == 1.0


def test_every_error_at_once() -> None:
    errors = errors_for(with_("timing", fence_guard=9.0, takeover_delay=0.1))
    assert len(errors) >= 2


def test_env_overrides() -> None:
    cfg = parse_config(BASE, {"BPLEADER_ETCD_ENDPOINTS": "http://a:2379, http://b:2379",
                              "BPLEADER_NODE_NAME": "bp-b", "BPLEADER_TIMING_LEASE_TTL": "6",
                              "BPLEADER_OTHER_THING": "ignored"})
    assert cfg.etcd.endpoints == ("http://a:2379", "http://b:2379")
    assert cfg.node.name == "bp-b" and cfg.timing.lease_ttl == 6.0
    assert any("BPLEADER_TIMING_COLOUR" in e for e in errors_for(
        BASE, {"BPLEADER_TIMING_COLOUR": "1"}))
    assert any("timing.lease_ttl" in e for e in errors_for(
        BASE, {"BPLEADER_TIMING_LEASE_TTL": "soon"}))


def test_secrets_are_redacted(tmp_path: Path) -> None:
    secret = "s3cr3t-value-123"
    path = tmp_path / "a.toml"
    path.write_text(f'[node]\nname="bp-a"\nproducer="mybp"\n[etcd]\nendpoints=["http://x:1"]\n'
                    f'username="u"\npassword="{secret}"\n[notify]\n'
                    f'pagerduty_routing_key="{secret}"\n')
    path.chmod(0o640)  # world-readable secrets are refused (tests/test_sec_exposure.py)
    out, err = io.StringIO(), io.StringIO()
    assert check_config_main(str(path), out, err) == 0
    assert secret not in out.getvalue() + err.getvalue()
    assert "***" in out.getvalue()
    assert "readable or writable by its group" in err.getvalue()


def test_check_config_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    err = io.StringIO()
    assert check_config_main(str(bad), io.StringIO(), err) == 2
    assert "not valid TOML" in err.getvalue()
    assert check_config_main(str(tmp_path / "missing.toml"), io.StringIO(), io.StringIO()) == 2


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c,
                                                                          max_size=3),
                      max_leaves=5)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(st.dictionaries(st.sampled_from(["node", "etcd", "nodeos", "timing", "x"]),
                       values, max_size=5))
def test_arbitrary_input_only_raises_config_error(data: dict[str, Any]) -> None:
    try:
        parse_config(data, {})
    except ConfigError:
        pass


@pytest.mark.parametrize("etcd, nodeos, shown", [
    # Valid: the warning about a nodeos API beyond localhost, and the effective config.
    ('"http://u:{secret}@x:1"', "http://op:{secret}@10.0.0.5:8888", "op:***@10.0.0.5:8888"),
    # Invalid: the error naming the endpoint.
    ('"ftp://u:{secret}@y"', "http://127.0.0.1:8888", "ftp://u:***@y"),
])
def test_a_password_in_a_url_is_never_shown(tmp_path: Path, etcd: str, nodeos: str,
                                             shown: str) -> None:
    secret = "pa55w0rd-in-url"
    path = tmp_path / "a.toml"
    path.write_text(f'[node]\nname="bp-a"\nproducer="mybp"\n[etcd]\n'
                    f'endpoints=[{etcd.format(secret=secret)}]\n'
                    f'[nodeos]\nurl="{nodeos.format(secret=secret)}"\n')
    path.chmod(0o600)
    out, err = io.StringIO(), io.StringIO()
    check_config_main(str(path), out, err)
    text = out.getvalue() + err.getvalue()
    assert secret not in text
    assert shown in text  # the rest of the URL is still there to read
    assert redact_url("unix:///run/nodeos.sock") == "unix:///run/nodeos.sock"
