#!/bin/sh
# Run one long install step of the Makefile: say what it does and how long it usually
# takes, print a heartbeat every 10 s (AURORA_HEARTBEAT_S) since pip can be silent for a
# while (unpacking torch), and say how long it took. Exit status is the command's.
#   usage: scripts/long_step.sh "installing torch" "~1 min" pip install torch
what=$1; usual=$2; shift 2
every=${AURORA_HEARTBEAT_S:-10}
echo "[aurora] $what (usually $usual) ..."
start=$(date +%s)
(
    i=0
    while sleep 1; do
        i=$((i + 1))
        if [ $((i % every)) -eq 0 ]; then echo "[aurora]   ... still $what: $(( $(date +%s) - start )) s"; fi
    done
) &
beat=$!
"$@"
rc=$?
kill "$beat" 2>/dev/null
wait "$beat" 2>/dev/null
if [ "$rc" -eq 0 ]; then
    echo "[aurora] done $what in $(( $(date +%s) - start )) s"
else
    echo "[aurora] FAILED $what (exit $rc)" >&2
fi
exit "$rc"
