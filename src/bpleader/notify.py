"""Notifications: Slack incoming webhook, a generic JSON webhook, PagerDuty Events v2.

Why it is built this way:

- **Never in the way of a pause.** :meth:`Notifier.event` only appends to a bounded
  in-memory queue under a lock (O(1), no I/O), so the agent loop, the fence and the
  shutdown path cost nothing when a webhook hangs. Each destination has its own worker
  thread and queue: a hung Slack does not hold back the PagerDuty page.
- **Bounded.** Every request has a timeout, retries are bounded by tenacity (attempts
  and total time), and a full queue drops its *oldest* entry and counts it: the newest
  state is what an operator needs.
- **Secrets stay secret.** Webhook URLs and routing keys are never logged, never part of
  a ``repr`` and never part of an error message we write (httpx's own error texts can
  contain the URL, so only the exception class and the HTTP status are logged).

Events come from the agent through :class:`AgentEvents`, a listener the agent calls
with every event it logs, plus :meth:`AgentEvents.on_tick` for the state alarms (etcd
unreachable, no in-sync node), which raise a PagerDuty incident and resolve it with the
same ``dedup_key``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from bpleader import __version__

if TYPE_CHECKING:
    import httpx

    from bpleader.agent import Agent, AgentEvent
    from bpleader.config import NotifyConfig

log = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "error", "critical")
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
_ICONS = {"info": ":information_source:", "warning": ":warning:", "error": ":x:",
          "critical": ":rotating_light:"}


@dataclass(frozen=True)
class Event:
    """One thing an operator should hear about.

    ``action`` is ``"trigger"`` or ``"resolve"`` for alarms (they page through
    PagerDuty and are resolved with the same ``dedup_key``), ``None`` for notices.
    """

    kind: str
    node: str
    producer: str
    role: str
    reason: str
    severity: str = "info"
    action: str | None = None
    dedup_key: str | None = None
    time: float = field(default_factory=time.time)

    def summary(self) -> str:
        verb = "resolved: " if self.action == "resolve" else ""
        return (f"{verb}{self.producer}/{self.node} {self.kind} "
                f"(role={self.role}): {self.reason}")[:1000]


@dataclass(frozen=True)
class Request:
    url: str
    body: dict[str, Any]


class Sink(Protocol):
    """A destination: turns an event into an HTTP request, or ``None`` to skip it."""

    name: str

    def request(self, event: Event) -> Request | None: ...

    def secrets(self) -> list[str]:
        """Strings that must never appear in a log line."""
        ...


class SlackSink:
    """Slack incoming webhook: every event, one line of text."""

    name = "slack"

    def __init__(self, url: str) -> None:
        self._url = url

    def secrets(self) -> list[str]:
        return url_secrets(self._url)

    def __repr__(self) -> str:
        return "SlackSink(url=***)"

    def request(self, event: Event) -> Request:
        icon = ":white_check_mark:" if event.action == "resolve" else _ICONS[event.severity]
        text = f"{icon} *bpleader* [{event.severity}] {event.summary()}"
        return Request(self._url, {"text": text})


class WebhookSink:
    """A generic JSON webhook: every event, as its fields plus the agent version."""

    name = "webhook"

    def __init__(self, url: str) -> None:
        self._url = url

    def secrets(self) -> list[str]:
        return url_secrets(self._url)

    def __repr__(self) -> str:
        return "WebhookSink(url=***)"

    def request(self, event: Event) -> Request:
        return Request(self._url, {**asdict(event), "summary": event.summary(),
                                   "source": "bpleader", "version": __version__})


class PagerDutySink:
    """PagerDuty Events API v2: only alarms (trigger and resolve, by ``dedup_key``).

    Notices such as role changes would page someone for normal operation; they go to
    Slack and the webhook only.
    """

    name = "pagerduty"

    def __init__(self, routing_key: str, url: str = PAGERDUTY_URL) -> None:
        self._key = routing_key
        self._url = url

    def secrets(self) -> list[str]:
        return [self._key]

    def __repr__(self) -> str:
        return "PagerDutySink(routing_key=***)"

    def request(self, event: Event) -> Request | None:
        if event.action not in ("trigger", "resolve") or event.dedup_key is None:
            return None
        body: dict[str, Any] = {"routing_key": self._key, "event_action": event.action,
                                "dedup_key": event.dedup_key}
        if event.action == "trigger":
            body["payload"] = {
                "summary": event.summary(), "source": event.node,
                "severity": event.severity, "component": event.producer,
                "group": "bpleader", "class": event.kind,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.time)),
                "custom_details": {"role": event.role, "reason": event.reason,
                                   "version": __version__}}
        return Request(self._url, body)


@dataclass
class NotifyStats:
    """Per-destination counters, exported as metrics (``bpleader_notifications_*``)."""

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    retries: int = 0


class _Retryable(Exception):
    """A failure worth another try (transport error, 429, 5xx); carries no URL."""


class _Worker:
    """One destination's queue and thread."""

    def __init__(self, sink: Sink, notifier: Notifier) -> None:
        self.sink = sink
        self.stats = NotifyStats()
        self._n = notifier
        self._queue: deque[Event] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._drain_until = 0.0
        self._thread = threading.Thread(target=self._run, name=f"notify-{sink.name}",
                                        daemon=True)

    def put(self, event: Event) -> None:
        with self._cond:
            if len(self._queue) >= self._n.max_queue:
                self._queue.popleft()
                self.stats.dropped += 1
            self._queue.append(event)
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: float) -> None:
        with self._cond:
            self._stopping = True
            self._drain_until = time.monotonic() + drain
            self._cond.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(max(0.0, timeout))

    def _next(self) -> Event | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue or (self._stopping and time.monotonic() > self._drain_until):
                return None
            return self._queue.popleft()

    def _run(self) -> None:
        import httpx  # here: an agent without notifications never loads the HTTP stack

        with httpx.Client(timeout=self._n.timeout, follow_redirects=False,
                          headers={"User-Agent": f"bpleader/{__version__}"}) as client:
            while (event := self._next()) is not None:
                self._deliver(client, event)

    def _deliver(self, client: httpx.Client, event: Event) -> None:
        import httpx

        req = self.sink.request(event)
        if req is None:
            return
        attempts = 0

        def once() -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                self.stats.retries += 1
            try:
                resp = client.post(req.url, json=req.body)
            except httpx.HTTPError as exc:
                raise _Retryable(type(exc).__name__) from None
            if resp.status_code == 429 or resp.status_code >= 500:
                raise _Retryable(f"HTTP {resp.status_code}")
            if resp.status_code >= 300:
                raise ValueError(f"HTTP {resp.status_code}")

        retrying = Retrying(
            stop=stop_after_attempt(self._n.attempts) | stop_after_delay(self._n.max_time),
            wait=wait_exponential(multiplier=self._n.backoff, max=self._n.backoff * 8),
            retry=retry_if_exception_type(_Retryable), reraise=True,
            sleep=self._n.sleep)
        try:
            retrying(once)
        except (_Retryable, ValueError) as exc:
            self.stats.failed += 1
            log.warning("node=%s role=notify event=notify_failed reason=%r", self._n.node,
                        f"sink={self.sink.name} kind={event.kind} error={exc} "
                        f"attempts={attempts}")
            return
        self.stats.sent += 1
        log.debug("node=%s role=notify event=notify_sent reason=%r", self._n.node,
                  f"sink={self.sink.name} kind={event.kind}")


# Loggers of the HTTP stack that may write a request URL (httpx logs every request at
# INFO with its full URL; a Slack webhook's path is its secret).
HTTP_LOGGERS = ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2",
                "httpcore.proxy")


class SecretFilter(logging.Filter):
    """Rewrites any log record that contains a secret, whoever logs it."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a URL is replaced before its own path.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        text = record.getMessage()
        if any(s in text for s in self.secrets):
            for s in self.secrets:
                text = text.replace(s, "***")
            record.msg, record.args = text, None
        return True


def url_secrets(url: str) -> list[str]:
    """The parts of a webhook URL that authorise: the whole URL, its path and query."""
    parts = urlsplit(url)
    out = [url]
    if len(parts.path) > 1:
        out.append(parts.path)
    if parts.query:
        out.append(parts.query)
    return out


class Notifier:
    """Sends events to every configured destination in the background.

    ``event`` and ``submit`` never block and never raise for delivery problems; without
    destinations they do nothing at all.
    """

    def __init__(self, sinks: Iterable[Sink], *, node: str = "", producer: str = "",
                 timeout: float = 5.0, attempts: int = 3, backoff: float = 0.5,
                 max_time: float = 30.0, max_queue: int = 100,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_queue < 1 or attempts < 1 or timeout <= 0:
            raise ValueError("max_queue and attempts must be >= 1, timeout > 0")
        self.node, self.producer = node, producer
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.max_time, self.max_queue, self.sleep = max_time, max_queue, sleep
        self.workers = [_Worker(s, self) for s in sinks]
        self._started = False
        self._filter = SecretFilter(x for w in self.workers for x in w.sink.secrets())

    @classmethod
    def from_config(cls, cfg: NotifyConfig, node: str, producer: str,
                    **kwargs: Any) -> Notifier:
        sinks: list[Sink] = []
        if cfg.slack_webhook:
            sinks.append(SlackSink(cfg.slack_webhook))
        if cfg.webhook_url:
            sinks.append(WebhookSink(cfg.webhook_url))
        if cfg.pagerduty_routing_key:
            sinks.append(PagerDutySink(cfg.pagerduty_routing_key))
        return cls(sinks, node=node, producer=producer, timeout=cfg.timeout,
                   max_time=cfg.max_time, **kwargs)

    @property
    def sink_names(self) -> list[str]:
        return [w.sink.name for w in self.workers]

    def stats(self) -> dict[str, NotifyStats]:
        return {w.sink.name: w.stats for w in self.workers}

    def start(self) -> None:
        if not self._started:
            self._started = True
            if self.workers:
                # Loaded here, before any event: an import in a worker thread would hold
                # the interpreter for tens of ms just when the agent reports its first.
                import httpx  # noqa: F401
            for name in HTTP_LOGGERS:
                logging.getLogger(name).addFilter(self._filter)
            for w in self.workers:
                w.start()

    def stop(self, drain: float = 2.0) -> None:
        """Send what is queued for up to ``drain`` seconds, then let the threads go.

        The threads are daemons: a request hanging past ``drain`` does not hold the
        process (systemd's ExecStopPost fence must run promptly).
        """
        for w in self.workers:
            w.stop(drain)
        if self._started:
            deadline = time.monotonic() + drain + 0.1
            for w in self.workers:
                w.join(deadline - time.monotonic())
            # A thread still hanging in a request may log later: keep the filter then.
            if not any(w.alive for w in self.workers):
                for name in HTTP_LOGGERS:
                    logging.getLogger(name).removeFilter(self._filter)

    def submit(self, event: Event) -> None:
        for w in self.workers:
            w.put(event)

    def event(self, kind: str, node: str, role: str, reason: str, severity: str = "info",
              *, action: str | None = None, dedup_key: str | None = None) -> None:
        """Queue one event for every destination; returns at once."""
        if severity not in SEVERITIES:
            severity = "error"
        self.submit(Event(kind, node, self.producer, role, reason, severity, action,
                          dedup_key))


# ------------------------------------------------------------------ agent bridge

# Roles whose entry or exit is news to an operator; candidate/taking_over churn is not.
NOTABLE_ROLES = frozenset({"leader", "fenced", "maintenance", "stopped"})
# Agent log events (other than transitions) that are notified, with their severity.
AGENT_EVENTS = {"fence": "warning", "pause_unconfirmed": "error",
                "continuity_timeout": "error", "abandon_lease": "error",
                "finalizer_switch_failed": "error", "finalizer_setup": "error"}
# Savanna alarms: they page, and resolve once our own finalizer key is active.
FINALIZER_ALARMS = {"finalizer_switch_timeout": "critical", "implicit_pause": "error",
                    "duplicate_finalizer_key": "critical"}


@dataclass
class _Alarm:
    since: float | None = None  # monotonic time the condition was first seen
    raised: bool = False


class AgentEvents:
    """Turns the agent's events and state into notifications.

    Registered in :attr:`Agent.listeners`, so it gets every event the agent logs, as
    data. It only queues (see :meth:`Notifier.event`), so it is safe inside the agent
    loop, including its fence path.
    """

    def __init__(self, notifier: Notifier, node: str, producer: str,
                 alarm_after: float) -> None:
        self.notifier = notifier
        self.node, self.producer = node, producer
        self.alarm_after = alarm_after
        self._alarms: dict[str, _Alarm] = {"etcd_unreachable": _Alarm(),
                                           "no_in_sync_node": _Alarm()}
        self._finalizer_alarms: set[str] = set()  # raised, not resolved yet

    def __call__(self, ev: AgentEvent) -> None:
        role = ev.role.value
        if ev.event == "transition" and ev.previous is not None:
            self._transition(ev.previous.value, role, ev.reason)
        elif ev.event == "doppelganger":
            self.notifier.event("doppelganger", self.node, role, ev.reason, "critical",
                                action="trigger", dedup_key=self._key("doppelganger"))
        elif ev.event in FINALIZER_ALARMS:
            self._finalizer_alarms.add(ev.event)
            self.notifier.event(ev.event, self.node, role, ev.reason,
                                FINALIZER_ALARMS[ev.event], action="trigger",
                                dedup_key=self._key(ev.event))
        elif ev.event == "finalizer_active":
            for kind in sorted(self._finalizer_alarms - {"duplicate_finalizer_key"}):
                self.notifier.event(kind, self.node, role, f"cleared: {ev.reason}", "info",
                                    action="resolve", dedup_key=self._key(kind))
            self._finalizer_alarms &= {"duplicate_finalizer_key"}
        elif ev.event in AGENT_EVENTS:
            self.notifier.event(ev.event, self.node, role, ev.reason, AGENT_EVENTS[ev.event])

    def _transition(self, old: str, new: str, reason: str) -> None:
        if old not in NOTABLE_ROLES and new not in NOTABLE_ROLES:
            return
        severity = "warning" if old == "leader" or new == "fenced" else "info"
        self.notifier.event("role_change", self.node, new, reason, severity)

    def on_tick(self, agent: Agent) -> None:
        """State alarms from the agent's last observation; call after every tick."""
        last = agent.last
        if last is None:
            return
        role = agent.role.value
        snap = last.snap
        self._check("etcd_unreachable", snap is None, last.now, role,
                    "etcd unreachable: no linearizable read succeeded", "error")
        if snap is not None:
            no_sync = not any(r.valid and r.in_sync for r in snap.records.values())
            self._check("no_in_sync_node", no_sync, last.now, role,
                        "no node of the producer reports in sync", "critical")

    def _check(self, kind: str, bad: bool, now: float, role: str, reason: str,
               severity: str) -> None:
        alarm = self._alarms[kind]
        if not bad:
            if alarm.raised:
                self.notifier.event(kind, self.node, role, f"cleared: {reason}", "info",
                                    action="resolve", dedup_key=self._key(kind))
            alarm.since, alarm.raised = None, False
            return
        if alarm.since is None:
            alarm.since = now
        if not alarm.raised and now - alarm.since >= self.alarm_after:
            alarm.raised = True
            self.notifier.event(kind, self.node, role,
                                f"{reason} for {now - alarm.since:.1f} s", severity,
                                action="trigger", dedup_key=self._key(kind))

    def _key(self, kind: str) -> str:
        # Cluster-wide conditions share one incident per producer across all agents;
        # etcd reachability and a node's own finalizer trouble are per node.
        if kind in ("etcd_unreachable", *FINALIZER_ALARMS):
            return f"bpleader/{self.producer}/{self.node}/{kind}"
        return f"bpleader/{self.producer}/{kind}"


class NotifierCollector:
    """``bpleader_notifications_{sent,failed,dropped,retries}_total{sink}`` at scrape time,
    so a webhook that silently stopped working is visible (and alertable)."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        stats = self._notifier.stats()
        for name, text in (("sent", "Notifications delivered."),
                           ("failed", "Notifications given up after retries."),
                           ("dropped", "Notifications dropped from a full queue (oldest "
                                       "first)."),
                           ("retries", "Notification delivery retries.")):
            family = CounterMetricFamily(f"bpleader_notifications_{name}", text,
                                         labels=["sink"])
            for sink, s in sorted(stats.items()):
                family.add_metric([sink], getattr(s, name))
            yield family
