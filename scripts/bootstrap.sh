#!/usr/bin/env bash
# Installs everything bpleader needs on a fresh Debian-like machine: the etcd server and
# client from the distribution, and a virtual environment (.venv) holding the package and
# its development tools. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need_apt+=(etcd-client)
# The tools the operations tests check deploy/ with (tests/test_ops_deploy.py):
# promtool (Prometheus rules and metrics), keepalived -t, docker-compose config,
# systemd-analyze verify.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v keepalived >/dev/null 2>&1 || need_apt+=(keepalived)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The security tests make their own CA and certificates with openssl.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The chaos benchmark's network of hosts: namespaces, veth, bridges, nftables rules.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
if [ ${#need_apt[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    echo "bootstrap: installing ${need_apt[*]} with apt-get" >&2
    "${sudo_cmd[@]}" apt-get update -qq
    # Only the tools are wanted: keep the packages' services (a Prometheus server on
    # 9090, keepalived) from starting, with Debian's policy-rc.d convention.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
        "${sudo_cmd[@]}" chmod 755 "$policy"
        added_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq \
        --no-install-recommends "${need_apt[@]}" >/dev/null || status=$?
    [ "$added_policy" = 0 ] || "${sudo_cmd[@]}" rm -f "$policy"
    [ "${status:-0}" = 0 ] || exit "$status"
fi
# The Debian package starts a system etcd on 2379; bpleader's tests and demo use their own
# members on other ports, so the system one is left alone.

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.bpleader-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
