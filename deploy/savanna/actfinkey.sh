#!/bin/sh
# finalizer.switch_command for operators who sign with cleos and a wallet instead of
# bpleader's own signing (finalizer.permission + signing_key_file). bpleader runs it with
# sh -c when this node becomes leader, with BPLEADER_FINALIZER_KEY (this node's BLS key)
# and BPLEADER_PRODUCER in the environment; exit 0 means "submitted". bpleader confirms the
# switch itself from get_finalizer_info, never from this exit status.
set -eu
: "${BPLEADER_FINALIZER_KEY:?}" "${BPLEADER_PRODUCER:?}"
NODEOS_URL=${NODEOS_URL:-http://127.0.0.1:8888}
PERMISSION=${PERMISSION:-finkey}
# The wallet must be unlocked (or keosd started with --unlock-timeout) for this to work.
exec cleos -u "$NODEOS_URL" push action eosio actfinkey \
    "[\"$BPLEADER_PRODUCER\", \"$BPLEADER_FINALIZER_KEY\"]" \
    -p "$BPLEADER_PRODUCER@$PERMISSION"
