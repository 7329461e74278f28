#!/bin/bash
# notify script of the baseline, as check_nodeos.sh: keepalived calls it with
# NODEOS_URL LOG TYPE NAME STATE PRIORITY (the first two are our additions to the
# script line). MASTER -> resume, BACKUP -> pause; success only when the reply is
# exactly {"result":"ok"}, otherwise the original sent a Slack message (here: a log
# line). The original has no FAULT branch; this benchmark gives FAULT -> pause to be
# fair to the baseline. Always exits 0, as the original.
URL="$1"; LOG="$2"; STATE="$5"
case "$STATE" in
    MASTER) action=resume ;;
    BACKUP|FAULT) action=pause ;;
    *) echo "$(date +%s.%N) state=$STATE action=none" >> "$LOG"; exit 0 ;;
esac
reply=$(curl -s --max-time 2 "$URL/v1/producer/$action")
if [ "$reply" = '{"result":"ok"}' ]; then
    echo "$(date +%s.%N) state=$STATE action=$action ok" >> "$LOG"
else
    echo "$(date +%s.%N) state=$STATE action=$action failed to $action, investigate immediately: $reply" >> "$LOG"
fi
exit 0
