"""Agent configuration: one TOML file, ``BPLEADER_<SECTION>_<FIELD>`` overrides, strict checks.

Validation collects every problem, each naming ``section.field``, the value and the rule,
because an operator fixing a file at 3 a.m. should not have to run the check five times.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

SECRETS = {("etcd", "password"), ("notify", "slack_webhook"), ("notify", "webhook_url"),
           ("notify", "pagerduty_routing_key")}


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def _doc(default: Any, doc: str, secret: bool = False) -> Any:
    """A field with its documentation: the README's reference is generated from these."""
    return field(default=default, repr=not secret, metadata={"doc": doc})


@dataclass(frozen=True)
class NodeConfig:
    name: str = _doc("", "this agent's node, unique per producer (letters, digits, `.`, `_`, "
                         "`-`); required")
    producer: str = _doc("", "the producer account; one election per producer; required")


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...] = _doc((), "etcd client URLs (`http://` or `https://`), all "
                                          "members; comma-separated in the variable; required")
    prefix: str = _doc("/bpleader", "keys live under `{prefix}/{producer}/`")
    election_timeout: float = _doc(1.0, "the cluster's `--election-timeout` in seconds "
                                        "(etcd's default 1000 ms is 1.0); the lease timing "
                                        "must leave room for a raft leader election")
    ca_cert: str | None = _doc(None, "CA bundle for `https://` endpoints")
    cert: str | None = _doc(None, "client certificate (with `key`)")
    key: str | None = _doc(None, "client certificate's private key")
    username: str | None = _doc(None, "etcd user (with `password`)")
    password: str | None = _doc(None, "etcd password; secret: never logged, redacted",
                                secret=True)


@dataclass(frozen=True)
class NodeosConfig:
    url: str = _doc("http://127.0.0.1:8888", "nodeos HTTP API, `http://` or "
                                             "`unix:///path`; keep it local")
    timeout: float = _doc(0.5, "seconds for each nodeos call")
    max_head_lag: float = _doc(3.0, "in sync while now - head_block_time is at most this")
    chain_id: str | None = _doc(None, "64 hex digits: refuse a nodeos on another chain")
    kill_command: str | None = _doc(None, "last-resort fence: the guard runs this (e.g. "
                                          "`systemctl kill -s KILL nodeos`) when nodeos "
                                          "does not confirm a pause within `timeout` of "
                                          "the deadline; recommended")
    finality: str = _doc("auto", "`savanna`, `legacy` or `auto` (Savanna as soon as "
                                 "get_finalizer_info shows a finalizer policy): on Savanna "
                                 "a close, fresh last irreversible block is part of being "
                                 "in sync")
    max_lib_lag: float = _doc(10.0, "Savanna: in sync only while head - LIB is at most this "
                                    "many blocks (about 2 while votes flow)")
    max_lib_age: float = _doc(4.5, "Savanna: in sync only while the LIB's timestamp trails "
                                   "the head's by at most this many seconds (about 1 while "
                                   "votes flow); a leader cut from the p2p network steps "
                                   "down within it")


@dataclass(frozen=True)
class TimingConfig:
    lease_ttl: float = _doc(5.0, "etcd lease TTL, whole seconds >= 2")
    keepalive_interval: float = _doc(0.0, "lease renewal period; 0 means lease_ttl / 5; at "
                                          "least 3 renewals must fit in lease_ttl - fence_guard")
    fence_guard: float = _doc(1.5, "pause this long before the local lease deadline; more "
                                   "than nodeos.timeout, less than lease_ttl / 2")
    takeover_delay: float = _doc(1.0, "wait after winning before the first resume; >= 0.5")
    check_interval: float = _doc(0.5, "agent loop period; at most takeover_delay")
    continuity_timeout: float = _doc(5.0, "report when a new leader's head stays below the "
                                          "previous leader's this long")
    doppelganger_quiet: float = _doc(60.0, "no campaigning for this long after a "
                                           "doppelganger alarm")


@dataclass(frozen=True)
class FinalizerConfig:
    key: str | None = _doc(None, "this node's BLS finalizer public key (`PUB_BLS_...`, "
                                 "registered with regfinkey); setting it moves the "
                                 "producer's active finalizer key to the leader")
    permission: str | None = _doc(None, "`account@permission` that may call "
                                        "eosio::actfinkey (linked to it only), e.g. "
                                        "`mybp@finkey`; with signing_key_file")
    signing_key_file: str | None = _doc(None, "file holding that permission's K1 private "
                                              "key; a secret: never logged, refused when "
                                              "readable by every local user")
    switch_command: str | None = _doc(None, "instead of permission and signing_key_file: "
                                            "a command run with `sh -c` that submits the "
                                            "switch (`BPLEADER_FINALIZER_KEY`, "
                                            "`BPLEADER_PRODUCER` in its environment); exit "
                                            "0 means submitted")
    switch_timeout: float = _doc(30.0, "seconds: a switch the chain does not show active "
                                       "by then raises an alarm")

    @property
    def enabled(self) -> bool:
        return self.key is not None


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = _doc("127.0.0.1:9750", "`host:port` of /metrics, /health and /leader")


@dataclass(frozen=True)
class NotifyConfig:
    slack_webhook: str | None = _doc(None, "Slack incoming webhook URL; secret", secret=True)
    webhook_url: str | None = _doc(None, "generic JSON webhook URL; secret", secret=True)
    pagerduty_routing_key: str | None = _doc(None, "PagerDuty Events v2 routing key; "
                                                   "secret", secret=True)
    timeout: float = _doc(5.0, "seconds per delivery attempt (connect and reply)")
    max_time: float = _doc(30.0, "seconds one event may take over all its attempts before "
                                 "it is dropped (and counted); at least notify.timeout")


SECTIONS: dict[str, type[Any]] = {
    "node": NodeConfig, "etcd": EtcdConfig, "nodeos": NodeosConfig, "timing": TimingConfig,
    "finalizer": FinalizerConfig, "metrics": MetricsConfig, "notify": NotifyConfig,
}


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    etcd: EtcdConfig
    nodeos: NodeosConfig
    timing: TimingConfig
    finalizer: FinalizerConfig
    metrics: MetricsConfig
    notify: NotifyConfig
    source: str = ""

    def redacted(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            for name in values:
                if (section, name) in SECRETS and values[name] is not None:
                    values[name] = "***"
                elif (section, name) == ("nodeos", "url"):
                    values[name] = redact_url(values[name])
                elif (section, name) == ("etcd", "endpoints"):
                    values[name] = [redact_url(u) for u in values[name]]
                elif isinstance(values[name], tuple):
                    values[name] = list(values[name])
            out[section] = values
        return out


def _kind(section: str, name: str) -> str:
    f = next(f for f in fields(SECTIONS[section]) if f.name == name)
    return str(f.type)


def _coerce(where: str, kind: str, value: Any, errors: list[str]) -> Any:
    """Check a TOML value against the field's declared type.

    A secret's value is never echoed, even a wrongly typed one: it may still be the
    real password with quotes forgotten.
    """
    shown = "(value not shown: secret)" if tuple(where.split(".", 1)) in SECRETS \
        else f"= {value!r}"[:200]
    if "tuple" in kind:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        errors.append(f"{where} {shown}: must be a list of strings")
    elif "float" in kind:
        # TOML and float() accept nan and inf; no timing rule can hold for them.
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            return float(value)
        errors.append(f"{where} {shown}: must be a finite number")
    elif isinstance(value, str):
        return value
    else:
        errors.append(f"{where} {shown}: must be a string")
    return None


def _from_env(kind: str, text: str) -> Any:
    if "tuple" in kind:
        return [p.strip() for p in text.split(",") if p.strip()]
    if "float" in kind:
        try:
            return float(text)
        except ValueError:
            return text  # reported by _coerce as "must be a number"
    return text


def _name(name: str) -> str:
    """A name from the input, quoted when it could break the one-line error format."""
    return name if name.isprintable() and name.strip() == name and name else repr(name)


def parse_config(data: Mapping[str, Any], env: Mapping[str, str], source: str = "") -> Config:
    errors: list[str] = []
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, values in data.items():
        if section not in SECTIONS:
            errors.append(f"[{_name(section)}]: unknown section (known: {', '.join(SECTIONS)})")
        elif not isinstance(values, dict):
            errors.append(f"[{section}]: must be a table")
        else:
            merged[section].update(values)
    for var, text in env.items():
        if not var.startswith("BPLEADER_"):
            continue
        rest = var[len("BPLEADER_"):].lower()
        target = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if target is None:
            continue
        name = rest[len(target) + 1:]
        if name not in {f.name for f in fields(SECTIONS[target])}:
            errors.append(f"{_name(var)}: {target} has no field {name!r}")
            continue
        merged[target][name] = _from_env(_kind(target, name), text)
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in merged[section].items():
            if name not in known:
                errors.append(f"{section}.{_name(name)}: unknown field "
                              f"(known: {', '.join(sorted(known))})")
                continue
            coerced = _coerce(f"{section}.{name}", _kind(section, name), value, errors)
            if coerced is not None:
                kwargs[name] = coerced
        built[section] = cls(**kwargs)
    t = built["timing"]
    if t.keepalive_interval == 0.0:
        built["timing"] = dataclasses.replace(t, keepalive_interval=t.lease_ttl / 5)
    cfg = Config(source=source, **built)
    errors += _validate(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def _election_room(et: EtcdConfig, t: TimingConfig) -> list[str]:
    """A raft leader change fails every request until a follower wins an election, up to
    twice ``--election-timeout`` after the leader's last heartbeat (etcd randomises each
    member's timeout between one and two times the setting). The leader's last renewal
    may have been sent up to one keepalive interval before that, and the fence fires
    ``lease_ttl - fence_guard`` after it: without room for both, every raft leader loss
    pauses production (etcd itself keeps the lease: a new raft leader extends them)."""
    if et.election_timeout <= 0:
        return [f"etcd.election_timeout = {et.election_timeout}: must be > 0 (seconds)"]
    need = 2 * et.election_timeout + t.keepalive_interval
    room = t.lease_ttl - t.fence_guard
    if need <= room:
        return []
    return [f"etcd.election_timeout = {et.election_timeout:g}: a raft leader election can "
            f"take {2 * et.election_timeout:g} s, which with a keepalive interval "
            f"({t.keepalive_interval:g} s) needs {need:g} s, more than lease_ttl - "
            f"fence_guard ({room:g} s): every etcd leader change would pause production. "
            f"Run etcd with --election-timeout <= "
            f"{max(0.0, (room - t.keepalive_interval) / 2) * 1000:.0f} (ms, and "
            "--heartbeat-interval a tenth of it), or lengthen timing.lease_ttl"]


ACCOUNT = re.compile(r"^[a-z1-5.]{1,12}$")
NODE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def redact_url(url: str) -> str:
    """``url`` with the password in it, if any, shown as ``***``: URLs are logged and
    printed (and appear in process lists), their credentials must not be."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "(unparsable URL not shown)"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _url_ok(url: str, schemes: tuple[str, ...]) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname)


def _validate(c: Config) -> list[str]:
    e: list[str] = []
    n, et, no, t = c.node, c.etcd, c.nodeos, c.timing
    if not n.name:
        e.append("node.name: required")
    elif not NODE_NAME.fullmatch(n.name):
        e.append(f"node.name = {n.name!r}: only letters, digits, '.', '_', '-' (max 64)")
    if not n.producer:
        e.append("node.producer: required")
    elif not ACCOUNT.fullmatch(n.producer) or n.producer.endswith("."):
        e.append(f"node.producer = {n.producer!r}: must be an account name (1-12 of a-z, "
                 "1-5, '.', not ending in '.')")
    if not et.endpoints:
        e.append("etcd.endpoints: required, a non-empty list of http(s)://host:port")
    for ep in et.endpoints:
        if not _url_ok(ep, ("http", "https")):
            e.append(f"etcd.endpoints: {redact_url(ep)!r} is not an http(s)://host:port URL")
    if not et.prefix.startswith("/") or et.prefix.endswith("/"):
        e.append(f"etcd.prefix = {et.prefix!r}: must start with '/' and not end with '/'")
    if (et.username is None) != (et.password is None):
        e.append("etcd.username/etcd.password: give both or neither")
    if (et.cert is None) != (et.key is None):
        e.append("etcd.cert/etcd.key: give both or neither")
    if (et.ca_cert or et.cert) and any(ep.startswith("http://") for ep in et.endpoints):
        e.append("etcd.ca_cert: TLS files given but endpoints use http://")
    for name in ("ca_cert", "cert", "key"):
        path = getattr(et, name)
        if path is not None and not _readable(path):
            e.append(f"etcd.{name} = {path!r}: file missing or unreadable")
    if not (no.url.startswith("unix:///") or _url_ok(no.url, ("http", "https"))):
        e.append(f"nodeos.url = {redact_url(no.url)!r}: must be http(s)://host[:port] or "
                 "unix:///path")
    if no.timeout <= 0:
        e.append(f"nodeos.timeout = {no.timeout}: must be > 0")
    if no.max_head_lag <= 0:
        e.append(f"nodeos.max_head_lag = {no.max_head_lag}: must be > 0")
    if no.chain_id is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", no.chain_id):
        e.append(f"nodeos.chain_id = {no.chain_id!r}: must be 64 hex characters")
    if t.lease_ttl != int(t.lease_ttl) or t.lease_ttl < 2:
        e.append(f"timing.lease_ttl = {t.lease_ttl}: must be a whole number of seconds >= 2 "
                 "(etcd leases are whole seconds; 2 s is etcd's minimum)")
    if t.keepalive_interval <= 0:
        e.append(f"timing.keepalive_interval = {t.keepalive_interval}: must be > 0")
    if t.fence_guard <= 0 or t.fence_guard >= t.lease_ttl / 2:
        e.append(f"timing.fence_guard = {t.fence_guard}: must be > 0 and < lease_ttl / 2 "
                 f"({t.lease_ttl / 2:g})")
    if t.fence_guard <= no.timeout:
        e.append(f"timing.fence_guard = {t.fence_guard}: must be > nodeos.timeout "
                 f"({no.timeout:g}) so the pause call fits before the lease ends")
    if t.keepalive_interval > 0 and (t.lease_ttl - t.fence_guard) / t.keepalive_interval < 3:
        e.append(f"timing.keepalive_interval = {t.keepalive_interval}: (lease_ttl - "
                 "fence_guard) / keepalive_interval must be >= 3 (three renewal tries "
                 "before the fence fires)")
    e += _election_room(et, t)
    if t.takeover_delay < 0.5:
        e.append(f"timing.takeover_delay = {t.takeover_delay}: must be >= 0.5 (one block)")
    if t.check_interval <= 0 or t.check_interval > t.takeover_delay:
        e.append(f"timing.check_interval = {t.check_interval}: must be > 0 and <= "
                 f"takeover_delay ({t.takeover_delay:g})")
    if t.continuity_timeout <= 0:
        e.append(f"timing.continuity_timeout = {t.continuity_timeout}: must be > 0")
    if t.doppelganger_quiet < 0:
        e.append(f"timing.doppelganger_quiet = {t.doppelganger_quiet}: must be >= 0")
    if no.finality not in ("auto", "savanna", "legacy"):
        e.append(f"nodeos.finality = {no.finality!r}: must be auto, savanna or legacy")
    if no.max_lib_lag != int(no.max_lib_lag) or no.max_lib_lag < 4:
        e.append(f"nodeos.max_lib_lag = {no.max_lib_lag}: must be a whole number of blocks "
                 ">= 4 (the LIB trails the head by 2 to 3 while votes flow)")
    if no.max_lib_age < 2.0:
        e.append(f"nodeos.max_lib_age = {no.max_lib_age}: must be >= 2 s (the LIB trails "
                 "the head by about 1 s while votes flow)")
    e += _validate_finalizer(c)
    host, _, port = c.metrics.listen.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        e.append(f"metrics.listen = {c.metrics.listen!r}: must be host:port")
    for name in ("slack_webhook", "webhook_url"):
        value = getattr(c.notify, name)
        if value is not None and not _url_ok(value, ("http", "https")):
            e.append(f"notify.{name}: must be an http(s) URL (value not shown: secret)")
    if not 0 < c.notify.timeout <= 60:
        e.append(f"notify.timeout = {c.notify.timeout}: must be > 0 and <= 60 seconds")
    if c.notify.max_time < c.notify.timeout or c.notify.max_time > 3600:
        e.append(f"notify.max_time = {c.notify.max_time}: must be at least notify.timeout "
                 f"({c.notify.timeout:g}) and at most 3600 seconds")
    return e


def _validate_finalizer(c: Config) -> list[str]:
    f = c.finalizer
    e: list[str] = []
    set_fields = [n for n in ("permission", "signing_key_file", "switch_command")
                  if getattr(f, n) is not None]
    if f.key is None:
        if set_fields:
            e.append(f"finalizer.key: required with finalizer.{set_fields[0]}")
        return e
    from bpleader.antelope import decode_bls_public_key

    try:
        decode_bls_public_key(f.key)
    except ValueError as exc:
        e.append(f"finalizer.key = {f.key[:24]!r}…: not a BLS public key: {exc}")
    if c.nodeos.finality == "legacy":
        e.append("finalizer.key: set, but nodeos.finality = 'legacy' (a pre-Savanna chain "
                 "has no finalizer keys)")
    if f.switch_timeout <= 0:
        e.append(f"finalizer.switch_timeout = {f.switch_timeout}: must be > 0")
    if f.switch_command is not None:
        if not f.switch_command.strip():
            e.append("finalizer.switch_command: must not be empty")
        if f.permission is not None or f.signing_key_file is not None:
            e.append("finalizer.switch_command: give it, or permission with "
                     "signing_key_file, not both")
        return e
    if f.permission is None or f.signing_key_file is None:
        e.append("finalizer.permission/finalizer.signing_key_file: give both (or "
                 "finalizer.switch_command instead)")
        return e
    account, _, perm = f.permission.partition("@")
    if not ACCOUNT.fullmatch(account) or not ACCOUNT.fullmatch(perm):
        e.append(f"finalizer.permission = {f.permission!r}: must be account@permission, "
                 "e.g. mybp@finkey")
    elif account != c.node.producer:
        e.append(f"finalizer.permission = {f.permission!r}: the account must be the "
                 f"producer {c.node.producer!r} (actfinkey requires its authority)")
    e += _signing_key_problems(f.signing_key_file)
    return e


def _signing_key_problems(path: str) -> list[str]:
    """The key file's problems, never its content."""
    where = f"finalizer.signing_key_file = {path!r}"
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return [f"{where}: file missing or unreadable"]
    if mode & stat.S_IROTH:
        return [f"{where}: readable by every local user (mode {stat.S_IMODE(mode):04o}); "
                "run chmod 600 (or 640 for the agent's group)"]
    try:
        from bpleader.antelope import TransactionError, public_key_of
        from bpleader.finalizer import read_signing_key
    except ImportError:  # pragma: no cover - the optional extra is missing
        return [f"{where}: signing needs pyo3-antelope-rs (pip install 'bpleader[savanna]'),"
                " or use finalizer.switch_command"]
    try:
        public_key_of(read_signing_key(path))
    except (OSError, UnicodeDecodeError):
        return [f"{where}: file missing or unreadable"]
    except ImportError:
        return [f"{where}: signing needs pyo3-antelope-rs (pip install 'bpleader[savanna]'),"
                " or use finalizer.switch_command"]
    except TransactionError:
        return [f"{where}: does not hold a K1 private key (PVT_K1_... or 5...)"]
    return []


def _readable(path: str) -> bool:
    try:
        return os.access(path, os.R_OK)
    except ValueError:  # an embedded NUL byte
        return False


def secrets_in_file(data: Mapping[str, Any]) -> list[str]:
    """The secret fields a parsed TOML file itself holds (env overrides do not count)."""
    return [f"{s}.{f}" for s, f in sorted(SECRETS)
            if isinstance(data.get(s), dict) and data[s].get(f) not in (None, "")]


def exposure_error(path: str | Path, data: Mapping[str, Any]) -> str | None:
    """Refuse a file whose secrets any local account can read.

    World-readable secrets give every local user (nodeos's own account, an exporter)
    the etcd credentials, and with them the election keys: there is no deployment
    that needs it. Group-readable is only warned about (``warnings``): ``root:bpleader
    0640`` is a common and deliberate layout.
    """
    secrets = secrets_in_file(data)
    if not secrets:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & stat.S_IROTH:
        return (f"{path}: holds secrets ({', '.join(secrets)}) and is readable by every "
                f"local user (mode {stat.S_IMODE(mode):04o}); run chmod 600 or 640, or "
                "pass them as BPLEADER_* environment variables")
    return None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    exposed = exposure_error(path, data)
    if exposed:
        raise ConfigError([exposed])
    return parse_config(data, os.environ if env is None else env, str(path))


def is_local_host(host: str | None) -> bool:
    """Loopback by name or address (all of 127.0.0.0/8 and ::1)."""
    if host is None:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warnings(c: Config) -> list[str]:
    out = []
    if not (c.nodeos.url.startswith("unix://") or is_local_host(urlsplit(c.nodeos.url).hostname)):
        out.append(f"nodeos.url {redact_url(c.nodeos.url)} is not local: the producer API "
                   "must never be exposed beyond localhost")
    if not is_local_host(c.metrics.listen.rpartition(":")[0]):
        out.append(f"metrics listen on {c.metrics.listen}, beyond loopback")
    if c.source:
        try:
            secrets = secrets_in_file(tomllib.loads(Path(c.source).read_text()))
            mode = os.stat(c.source).st_mode
        except (OSError, ValueError):
            secrets, mode = [], 0
        if secrets and mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IWOTH):
            out.append(f"{c.source} holds secrets ({', '.join(secrets)}) and is readable or "
                       f"writable by its group (mode {stat.S_IMODE(mode):04o}); chmod 600 "
                       "unless the group is meant to read them")
    return out


def check_config_main(path: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"error: {line}", file=err)
        return 2
    for w in warnings(cfg):
        print(f"warning: {w}", file=err)
    print(json.dumps(cfg.redacted(), indent=2), file=out)
    return 0


def reference_markdown() -> str:
    """The configuration reference as a Markdown table, from the dataclasses themselves,
    so the README (which embeds it, checked by a test) cannot drift from the code."""
    rows = ["| field | environment variable | default | meaning |", "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            shown = "-" if f.default in (None, "", ()) else f"`{f.default}`"
            env = f"`BPLEADER_{section.upper()}_{f.name.upper()}`"
            rows.append(f"| `{section}.{f.name}` | {env} | {shown} | {f.metadata['doc']} |")
    return "\n".join(rows)
