#!/bin/sh
# One-time set-up of a producer for bpleader's finalizer key failover (Savanna).
# Prints the cleos commands; run them yourself, from a machine holding the producer's
# active key. Each producer node has its OWN BLS key: never copy one key to two nodes.
#
#   deploy/savanna/setup-finalizer-keys.sh mybpaccount PUB_K1_...(finkey permission key) \
#       PUB_BLS_a:SIG_BLS_a PUB_BLS_b:SIG_BLS_b ...
#
# Make each BLS key and its proof of possession on its node:
#   spring-util bls create key --to-console
# and the K1 key of the permission with: cleos create key --to-console
# (its private key goes into finalizer.signing_key_file, mode 600, on every node).
set -eu
if [ $# -lt 3 ]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
producer=$1; permission_key=$2; shift 2
url=${NODEOS_URL:-http://127.0.0.1:8888}
echo "# 1. A permission that can do one thing only: eosio::actfinkey"
echo "cleos -u $url set account permission $producer finkey '{\"threshold\":1,\"keys\":[{\"key\":\"$permission_key\",\"weight\":1}]}' active -p $producer@active"
echo "cleos -u $url set action permission $producer eosio actfinkey finkey -p $producer@active"
echo "# 2. Register every node's BLS key (the first one registered becomes active)"
for pair in "$@"; do
    key=${pair%%:*}; pop=${pair#*:}
    echo "cleos -u $url push action eosio regfinkey '[\"$producer\", \"$key\", \"$pop\"]' -p $producer@active"
done
echo "# 3. Check: the permission and its link, and the registered keys"
echo "cleos -u $url get account $producer --json | jq '.permissions[] | select(.perm_name==\"finkey\")'"
echo "cleos -u $url get table eosio eosio finkeys --limit 100"
