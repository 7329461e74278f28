#!/usr/bin/env bash
# Creates the etcd user of one producer's bpleader agents, allowed read/write on
# {prefix}/{producer}/ and nothing else, then turns authentication on.
#
#   ETCDCTL_ENDPOINTS=https://10.0.0.11:2379,... ETCDCTL_CACERT=... ETCDCTL_CERT=... \
#   ETCDCTL_KEY=... ROOT_PASSWORD=... AGENT_PASSWORD=... rbac.sh mybpaccount [/bpleader]
#
# Passwords come from the environment and go to etcdctl on stdin (--interactive=false),
# so they appear neither in argv (ps) nor in shell history. Run once per cluster for
# root, then once per producer; it prints the commands it runs, never the passwords.
set -euo pipefail
producer=${1:?usage: rbac.sh PRODUCER [PREFIX]}
prefix=${2:-/bpleader}
user=${AGENT_USER:-bpleader-$producer}
: "${AGENT_PASSWORD:?set AGENT_PASSWORD}"
export ETCDCTL_API=3
auth_on=0

# As root once auth is on; the credentials travel in etcdctl's environment, not argv.
run() {
    echo "+ etcdctl $*" >&2
    if [ "$auth_on" = 1 ]; then
        ETCDCTL_USER=root ETCDCTL_PASSWORD="$ROOT_PASSWORD" etcdctl "$@"
    else
        etcdctl "$@"
    fi
}

# Without credentials, listing users works only while authentication is off
# (etcdctl 3.4 has no `auth status`).
if ! etcdctl user list >/dev/null 2>&1; then
    : "${ROOT_PASSWORD:?auth is on: set ROOT_PASSWORD}"
    auth_on=1
else
    : "${ROOT_PASSWORD:?set ROOT_PASSWORD (the root user is created before auth enable)}"
    if ! etcdctl user get root >/dev/null 2>&1; then
        echo "+ etcdctl user add root --interactive=false" >&2
        printf '%s\n' "$ROOT_PASSWORD" | etcdctl user add root --interactive=false
    fi
    run user grant-role root root
fi
run role add "$user"
run role grant-permission "$user" readwrite "$prefix/$producer/" --prefix=true
printf '%s\n' "$AGENT_PASSWORD" | run user add "$user" --interactive=false
run user grant-role "$user" "$user"
if [ "$auth_on" = 0 ]; then
    run auth enable
fi
