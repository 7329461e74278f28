"""Production wiring of ``bpleader agent``: real clocks, etcd, nodeos, fences, signals.

The decision core (:mod:`bpleader.agent`) knows none of this; this module builds its
collaborators from the configuration and runs it as a daemon under systemd.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from bpleader.agent import Agent, AgentSettings
from bpleader.clock import SystemClock, boottime
from bpleader.config import Config
from bpleader.fence import Fences, GuardProcess, ThreadFence
from bpleader.finalizer import CommandSwitcher, KeySwitcher, TransactionSwitcher, read_signing_key
from bpleader.guard import pause_confirmed
from bpleader.metrics import Metrics
from bpleader.nodeos import FinalityRule, NodeosClient, SyncEvaluator
from bpleader.notify import AgentEvents, Notifier, NotifierCollector
from bpleader.store import EtcdSettings, EtcdStore, Keys

log = logging.getLogger(__name__)


def setup_logging(level: str = "INFO") -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=numeric, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The level also sits on the console handler: the notifier listens to the agent's
    # INFO events (role changes) even when the console shows only warnings.
    for handler in logging.getLogger().handlers:
        handler.setLevel(numeric)
    # gRPC and httpx chatter is not what an operator needs at 3 a.m.
    for noisy in ("httpx", "httpcore", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def sd_notify(message: str) -> None:
    """systemd's notify protocol (READY=1, WATCHDOG=1, ...); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("event=sd_notify_failed reason=%r", str(exc))


def etcd_timeout(cfg: Config) -> float:
    """Per-request etcd timeout: short enough for several renewals before the fence."""
    return max(0.2, min(1.0, cfg.timing.keepalive_interval))


def make_store(cfg: Config) -> EtcdStore:
    e = cfg.etcd
    settings = EtcdSettings(tuple(e.endpoints), etcd_timeout(cfg), e.ca_cert, e.cert, e.key,
                            e.username, e.password)
    return EtcdStore(settings, Keys(e.prefix, cfg.node.producer))


def agent_settings(cfg: Config) -> AgentSettings:
    t = cfg.timing
    return AgentSettings(
        node=cfg.node.name, producer=cfg.node.producer, lease_ttl=int(t.lease_ttl),
        keepalive_interval=t.keepalive_interval, fence_guard=t.fence_guard,
        takeover_delay=t.takeover_delay, check_interval=t.check_interval,
        nodeos_timeout=cfg.nodeos.timeout, continuity_timeout=t.continuity_timeout,
        doppelganger_quiet=t.doppelganger_quiet, finality=cfg.nodeos.finality,
        finalizer_timeout=cfg.finalizer.switch_timeout)


def sync_evaluator(cfg: Config) -> SyncEvaluator:
    no = cfg.nodeos
    return SyncEvaluator(no.max_head_lag, no.chain_id,
                         FinalityRule(int(no.max_lib_lag), no.max_lib_age))


def key_switcher(cfg: Config, nodeos: NodeosClient) -> KeySwitcher | None:
    """How this node moves the producer's finalizer key to itself (None: it does not)."""
    f = cfg.finalizer
    if f.key is None:
        return None
    if f.switch_command is not None:
        return CommandSwitcher(f.switch_command, f.key, cfg.node.producer)
    assert f.permission is not None and f.signing_key_file is not None  # validated
    account, _, permission = f.permission.partition("@")
    return TransactionSwitcher(nodeos, f.key, account, permission,
                               read_signing_key(f.signing_key_file))


def on_tick(agent: Agent, events: AgentEvents) -> None:
    """After every completed tick: systemd's watchdog, then the state alarms (queue only)."""
    sd_notify("WATCHDOG=1")
    events.on_tick(agent)


async def run_agent(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT; exit status 0 only when nodeos was left confirmed paused."""
    settings = agent_settings(cfg)
    node = cfg.node.name
    url, timeout = cfg.nodeos.url, cfg.nodeos.timeout
    guard = GuardProcess(url, timeout, cfg.timing.check_interval, node,
                         cfg.nodeos.kill_command)
    guard.start()
    # The thread's pause must finish before the lease ends: the fence guard bounds it.
    thread = ThreadFence(lambda: pause_confirmed(url, timeout, cfg.timing.fence_guard),
                         boottime, lambda: f"node={node} role=fence")
    store = make_store(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics: Metrics | None = None

    def observe(call: str, seconds: float, error: str | None) -> None:
        if metrics is not None:
            metrics.observe_nodeos(call, seconds, error)

    async with NodeosClient(url, timeout, on_request=observe) as nodeos:
        agent = Agent(settings, SystemClock(), store, nodeos, Fences(thread, guard),
                      sync_evaluator(cfg), key_switcher(cfg, nodeos))
        metrics = Metrics(agent, cfg.metrics.listen)
        notifier = Notifier.from_config(cfg.notify, node, cfg.node.producer)
        events = AgentEvents(notifier, node, cfg.node.producer, alarm_after=cfg.timing.lease_ttl)
        if notifier.workers:
            metrics.registry.register(NotifierCollector(notifier))
            notifier.start()
            agent.listeners.append(events)
        metrics.start()
        log.info("node=%s role=starting event=metrics_listening port=%d", node, metrics.port)
        log.info("node=%s role=starting event=notify_destinations reason=%r", node,
                 ",".join(notifier.sink_names) or "none")
        log.info("node=%s role=starting event=start producer=%s etcd=%s nodeos=%s",
                 node, cfg.node.producer, ",".join(cfg.etcd.endpoints), url)
        sd_notify("READY=1")
        try:
            clean = await agent.run(stop, on_tick=lambda: on_tick(agent, events))
        finally:
            sd_notify("STOPPING=1")
            metrics.stop()
            store.close()
            notifier.stop(drain=2.0)  # after the pause: nothing here can delay it
    guard.stop()
    if agent.refusal:
        log.critical("node=%s role=stopped event=refused reason=%r", node, agent.refusal)
        return 2
    return 0 if clean else 1
