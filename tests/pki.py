"""A throw-away PKI made with the ``openssl`` command line, for the TLS tests.

The ``cryptography`` package is not a dependency, and every Debian-like host has
``openssl``. Two CAs are made: the cluster's own (server and client certificates, one of
them already expired) and a stranger's (a client certificate etcd must not accept, and a
CA the agent must not trust the server with).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

KEY_ALG = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed the server and the good client certificates
    server: Pair  # SAN 127.0.0.1 and localhost
    client: Pair  # valid for a year
    expired: Pair  # signed by ``ca``, validity ended in 2021
    stranger_ca: Path  # a CA that signed nothing etcd knows
    stranger: Pair  # client certificate signed by ``stranger_ca``


def _run(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {r.stderr.strip()}")


def _ca(d: Path, name: str) -> Pair:
    pair = Pair(d / f"{name}.pem", d / f"{name}-key.pem")
    _run("req", "-x509", *KEY_ALG, "-nodes", "-days", "365", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-keyout", str(pair.key), "-out", str(pair.cert), cwd=d)
    return pair


def _csr(d: Path, name: str, cn: str) -> tuple[Path, Path]:
    key, csr = d / f"{name}-key.pem", d / f"{name}.csr"
    _run("req", "-new", *KEY_ALG, "-nodes", "-subj", f"/CN={cn}", "-keyout", str(key),
         "-out", str(csr), cwd=d)
    return key, csr


def _ext(d: Path, name: str, server: bool) -> Path:
    path = d / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if server:
        lines += ["extendedKeyUsage=serverAuth,clientAuth",
                  "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    else:
        lines += ["extendedKeyUsage=clientAuth"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sign(d: Path, ca: Pair, name: str, cn: str, server: bool = False) -> Pair:
    key, csr = _csr(d, name, cn)
    cert = d / f"{name}.pem"
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
         "-CAcreateserial", "-days", "365", "-extfile", str(_ext(d, name, server)),
         "-out", str(cert), cwd=d)
    return Pair(cert, key)


def _sign_expired(d: Path, ca: Pair, name: str, cn: str) -> Pair:
    """``openssl x509`` cannot backdate before OpenSSL 3.4; ``openssl ca`` can."""
    key, csr = _csr(d, name, cn)
    db = d / "ca-db"
    db.mkdir(exist_ok=True)
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    conf = d / "ca.cnf"
    conf.write_text(
        "[ca]\ndefault_ca = test\n[test]\n"
        f"dir = {db}\ndatabase = $dir/index.txt\nserial = $dir/serial\n"
        f"new_certs_dir = {db}\ndefault_md = sha256\npolicy = any\n"
        "copy_extensions = none\nx509_extensions = client\nunique_subject = no\n"
        "[any]\ncommonName = supplied\n"
        "[client]\nbasicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n")
    cert = d / f"{name}.pem"
    _run("ca", "-batch", "-config", str(conf), "-cert", str(ca.cert), "-keyfile",
         str(ca.key), "-startdate", "20200101000000Z", "-enddate", "20210101000000Z",
         "-in", str(csr), "-out", str(cert), "-notext", cwd=d)
    return Pair(cert, key)


def make_pki(d: Path) -> Pki:
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl command line")
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d, "ca")
    stranger_ca = _ca(d, "stranger-ca")
    pki = Pki(
        ca=ca.cert,
        server=_sign(d, ca, "server", "etcd", server=True),
        client=_sign(d, ca, "client", "bpleader"),
        expired=_sign_expired(d, ca, "expired", "bpleader"),
        stranger_ca=stranger_ca.cert,
        stranger=_sign(d, stranger_ca, "stranger", "bpleader"),
    )
    for path in d.glob("*-key.pem"):
        path.chmod(0o600)
    return pki
