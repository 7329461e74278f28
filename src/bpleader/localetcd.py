"""A local etcd cluster on loopback ports, for the demo, the tests and the benchmarks.

Each member is the real ``etcd`` binary (Debian's ``etcd-server``) in its own data
directory; members can be killed and restarted to show failover and quorum loss.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Raft timing for the fast profile (lease 2 s, fence 0.9 s before its end, renewals
#: every 0.3 s): an election must fit in the 1.1 s between the last renewal and the
#: fence, and etcd may take up to twice --election-timeout (config's check). On a LAN
#: or loopback a 25 ms heartbeat is still many round trips.
HEARTBEAT_MS, ELECTION_MS = 25, 250
RAFT_FLAGS = ["--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS)]
ELECTION_TIMEOUT = ELECTION_MS / 1000  # etcd.election_timeout of agents on these clusters


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    root: Path
    size: int = 3
    members: list[Member] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size)
        for i in range(self.size):
            name = f"etcd{i}"
            self.members.append(Member(name, ports[2 * i], ports[2 * i + 1],
                                       self.root / name, self.root / f"{name}.log"))

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _cmd(self, m: Member, state: str) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            shutil.which("etcd") or "etcd", "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", f"bpl-{self.root.name}",
            *RAFT_FLAGS, "--logger", "zap", "--log-level", "warn", *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            self.start_member(m, "new")
        self.wait_healthy(timeout)

    def start_member(self, m: Member, state: str = "existing") -> None:
        log = open(m.log_path, "ab")
        m.proc = subprocess.Popen(self._cmd(m, state), stdout=log, stderr=log,
                                  env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "arm64"})
        log.close()

    def etcdctl(self, *args: str, endpoints: list[str] | None = None,
                timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        eps = ",".join(endpoints or [m.client_url for m in self.members if self.alive(m)])
        return subprocess.run(
            ["etcdctl", f"--endpoints={eps}", "--dial-timeout=2s", "--command-timeout=3s",
             *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "ETCDCTL_API": "3"})

    def elect_leader(self, election_prefix: str, timeout: float = 5.0) -> str | None:
        """What `etcdctl elect -l` prints first (the leader's value); it keeps observing,
        so read one answer and stop it."""
        eps = ",".join(m.client_url for m in self.members if self.alive(m))
        proc = subprocess.Popen(["etcdctl", f"--endpoints={eps}", "elect", "-l", election_prefix],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, "ETCDCTL_API": "3"})
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.strip())
                if len(lines) == 2:
                    return

        reader = threading.Thread(target=read, daemon=True)
        try:
            reader.start()
            reader.join(timeout)
            # Output is the election key, then the leader's value.
            return lines[1] if len(lines) >= 2 else None
        finally:
            proc.kill()
            proc.wait()

    def alive(self, m: Member) -> bool:
        return m.proc is not None and m.proc.poll() is None

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.etcdctl("endpoint", "health")
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"etcd cluster not healthy: {r.stdout} {r.stderr}")

    def leader(self) -> Member:
        for m in self.members:
            if not self.alive(m):
                continue
            r = self.etcdctl("endpoint", "status", "-w", "json", endpoints=[m.client_url])
            if r.returncode == 0 and '"leader"' in r.stdout:
                st = json.loads(r.stdout)[0]["Status"]
                if st["header"]["member_id"] == st["leader"]:
                    return m
        raise RuntimeError("no etcd leader")

    def kill(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait()

    def restart(self, m: Member) -> None:
        self.kill(m)
        self.start_member(m, "existing")

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                try:
                    m.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                m.proc.kill()
                m.proc.wait()
