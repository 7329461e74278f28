#!/bin/bash
# vrrp_script of the baseline, as the isInSync.sh fork: nodeos is healthy when its head
# block is at most MAX_AGE seconds older than the local clock. head_block_time is UTC
# without a zone suffix, so 'Z' is appended before parsing.
# Usage: isInSync.sh NODEOS_URL [MAX_AGE_SECONDS]
URL="${1:-http://127.0.0.1:8888}"
MAX_AGE="${2:-10}"
info=$(curl -s --max-time 1 "$URL/v1/chain/get_info") || exit 1
head_time=$(printf '%s' "$info" | sed -n 's/.*"head_block_time": *"\([^"]*\)".*/\1/p')
[ -n "$head_time" ] || exit 1
head_epoch=$(date -u -d "${head_time}Z" +%s) || exit 1
now=$(date -u +%s)
if [ $((now - head_epoch)) -gt "$MAX_AGE" ]; then
    exit 1
fi
exit 0
