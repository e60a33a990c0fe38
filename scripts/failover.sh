#!/usr/bin/env bash
# Repeats the leader-kill failover test (tests/nats.rs) N times and summarises takeover times.
# Each run starts its own 3-node NATS cluster, a leader and a standby, kills -9 the leader
# under load from 4 clients, and checks that every acknowledged push is in the log exactly once
# and that a serial replay of the log gives the final model bit for bit.
#
#   scripts/failover.sh [RUNS]        (default 20; needs nats-server: SPARSYNC_NATS_SERVER or PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
export SPARSYNC_REQUIRE_NATS=1
cargo test -q --test nats --no-run
log=$(mktemp)
pass=0
for i in $(seq 1 "$runs"); do
    if cargo test -q --test nats leader_killed -- --nocapture >"$log" 2>&1; then
        pass=$((pass + 1))
        t=$(grep -o 'takeover after [0-9.]*m\?s' "$log" | head -1)
        echo "run $i: ok, $t"
    else
        echo "run $i: FAILED"
        grep -A5 panicked "$log" | head -20
    fi
done
rm -f "$log"
echo "$pass of $runs runs passed"
[ "$pass" = "$runs" ]
