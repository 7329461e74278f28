"""One real etcd member serving clients over TLS with ``--client-cert-auth``, and the
``etcdctl`` steps that turn on authentication and a per-producer role (the same commands
as deploy/etcd-rbac.md, so the document is exercised by the tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bpleader.localetcd import RAFT_FLAGS, free_ports
from pki import Pair, Pki


@dataclass
class SecureEtcd:
    root: Path
    pki: Pki
    proc: subprocess.Popen[bytes] | None = None
    root_password: str | None = None  # set once auth is enabled
    client_port: int = 0
    peer_port: int = 0
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.client_port, self.peer_port = free_ports(2)
        self.log_path = self.root / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            shutil.which("etcd") or "etcd", "--name", "sec0",
            "--data-dir", str(self.root / "data"),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"sec0={peer}", "--initial-cluster-state", "new",
            "--client-cert-auth", "--trusted-ca-file", str(self.pki.ca),
            "--cert-file", str(self.pki.server.cert), "--key-file", str(self.pki.server.key),
            *RAFT_FLAGS,
            "--logger", "zap", "--log-level", "warn",
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log,
                                     env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "arm64"})
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            r = self.etcdctl("endpoint", "health")
            if r.returncode == 0:
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"TLS etcd not healthy: {r.stderr.strip()}")
            time.sleep(0.2)

    def etcdctl(self, *args: str, user: str | None = None,
                client: Pair | None = None) -> subprocess.CompletedProcess[str]:
        c = client or self.pki.client
        auth: list[str] = []
        if user is not None:
            auth = [f"--user={user}"]
        elif self.root_password is not None:
            auth = [f"--user=root:{self.root_password}"]
        return subprocess.run(
            ["etcdctl", f"--endpoints={self.endpoint}", f"--cacert={self.pki.ca}",
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
