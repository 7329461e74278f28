"""A real etcd cluster (3 members by default) serving clients over TLS with
``--client-cert-auth``, members that can be killed and restarted, and the
``etcdctl`` steps that turn on authentication and a per-producer role (the same commands
as deploy/etcd-rbac.md, so the document is exercised by the tests).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bpleader.localetcd import RAFT_FLAGS, free_ports
from pki import Pair, Pki


@dataclass
class SecureMember:
    name: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    @property
    def peer(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class SecureEtcd:
    root: Path
    pki: Pki
    size: int = 3
    root_password: str | None = None  # set once auth is enabled
    members: list[SecureMember] = field(init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.size)
        self.members = [SecureMember(f"sec{i}", ports[2 * i], ports[2 * i + 1])
                        for i in range(self.size)]
        self.log_path = self.root / "etcd.log"

    @property
    def endpoint(self) -> str:
        """The first member's client URL (enough for a test that needs one)."""
        return self.members[0].endpoint

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            self.start_member(m, "new")
        deadline = time.monotonic() + timeout
        while True:
            r = self.etcdctl("endpoint", "health")
            if r.returncode == 0:
                return
            if time.monotonic() > deadline or not all(m.alive() for m in self.members):
                raise RuntimeError(f"TLS etcd not healthy: {r.stderr.strip()}")
            time.sleep(0.2)

    def start_member(self, m: SecureMember, state: str = "existing") -> None:
        cluster = ",".join(f"{x.name}={x.peer}" for x in self.members)
        cmd = [
            shutil.which("etcd") or "etcd", "--name", m.name,
            "--data-dir", str(self.root / m.name),
            "--listen-client-urls", m.endpoint, "--advertise-client-urls", m.endpoint,
            "--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
            "--initial-cluster", cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", f"sec-{self.root.name}",
            "--client-cert-auth", "--trusted-ca-file", str(self.pki.ca),
            "--cert-file", str(self.pki.server.cert), "--key-file", str(self.pki.server.key),
            *RAFT_FLAGS,
            "--logger", "zap", "--log-level", "warn",
        ]
        log = open(self.log_path, "ab")
        m.proc = subprocess.Popen(cmd, stdout=log, stderr=log,
                                  env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "arm64"})
        log.close()

    def leader(self) -> SecureMember:
        """The member that is raft leader now."""
        for m in self.members:
            if not m.alive():
                continue
            r = self.etcdctl("endpoint", "status", "-w", "json", endpoints=[m.endpoint])
            if r.returncode == 0:
                status = json.loads(r.stdout)[0]["Status"]
                if status["leader"] == status["header"]["member_id"]:
                    return m
        raise RuntimeError("no raft leader")

    def kill_member(self, m: SecureMember) -> None:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait()

    def etcdctl(self, *args: str, user: str | None = None, client: Pair | None = None,
                endpoints: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        c = client or self.pki.client
        auth: list[str] = []
        if user is not None:
            auth = [f"--user={user}"]
        elif self.root_password is not None:
            auth = [f"--user=root:{self.root_password}"]
        return subprocess.run(
            ["etcdctl", "--endpoints=" + ",".join(
                endpoints or [m.endpoint for m in self.members if m.alive()]),
             f"--cacert={self.pki.ca}",
             f"--cert={c.cert}", f"--key={c.key}", "--dial-timeout=2s",
             "--command-timeout=3s", *auth, *args],
            capture_output=True, text=True, timeout=15, env={**os.environ, "ETCDCTL_API": "3"})

    def must(self, *args: str) -> str:
        r = self.etcdctl(*args)
        if r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def enable_auth(self, root_password: str) -> None:
        """deploy/etcd-rbac.md, step 1: a root user, then auth on."""
        self.must("user", "add", f"root:{root_password}")
        self.must("auth", "enable")
        self.root_password = root_password

    def add_agent_user(self, prefix: str, producer: str, user: str, password: str,
                       grant: bool = True) -> str:
        """deploy/etcd-rbac.md, step 2: a role limited to ``{prefix}/{producer}/``."""
        role = f"bpleader-{producer}"
        if grant:
            self.must("role", "add", role)
            self.must("role", "grant-permission", "--prefix=true", role, "readwrite",
                      f"{prefix}/{producer}/")
        else:
            role = f"{role}-norights"
            self.must("role", "add", role)
        self.must("user", "add", f"{user}:{password}")
        self.must("user", "grant-role", user, role)
        return role

    def stop(self) -> None:
        for m in self.members:
            self.kill_member(m)
