#!/usr/bin/env bash
# Runs the `tidings bench` scenarios behind BENCHMARKS.md, each against a fresh release broker
# on loopback, and prints one JSON report per line (prefixed with the run's label).
#
#   cargo build --release && benches/load.sh > load.jsonl           # everything (~15 min)
#   benches/load.sh broadcast                                        # only runs whose label starts so
#
# BROKER_ARGS (word-split) adds flags to every broker a `run` starts.
#
# Needs `ulimit -n` ≥ 20000 for the 19,000-connection run. Cluster runs need Redis on
# 127.0.0.1:6379 and NATS (JetStream) on 127.0.0.1:4222. Only processes this script started
# are stopped, by PID.
set -euo pipefail

BIN=${BIN:-target/release/tidings}
ONLY=${1:-}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
PIDS=()

cleanup() {
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# start_node LOGFILE ARGS... : starts a broker on a free port; sets NODE_PID and NODE_URL.
start_node() {
    local log=$1
    shift
    "$BIN" serve --listen 127.0.0.1:0 --max-connections 20000 "$@" >"$log" 2>&1 &
    NODE_PID=$!
    PIDS+=("$NODE_PID")
    for _ in $(seq 1 100); do
        if grep -q "tidings listening on" "$log"; then
            NODE_URL=$(sed -n 's/^tidings listening on \(http:\/\/[^ ]*\).*/\1/p' "$log" | head -1)
            # Wait for readiness (shared engines restore their history first).
            for _ in $(seq 1 100); do
                curl -fs "$NODE_URL/readyz" >/dev/null 2>&1 && return 0
                sleep 0.1
            done
            echo "node on $NODE_URL never became ready" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "broker did not start: $(cat "$log")" >&2
    return 1
}

stop_node() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# run LABEL SCENARIO BENCH-ARGS... : one scenario against one fresh memory broker.
run() {
    local label=$1 scenario=$2
    shift 2
    [[ -n "$ONLY" && "$label" != "$ONLY"* ]] && return 0
    # shellcheck disable=SC2086 # BROKER_ARGS is a list of flags
    start_node /tmp/tidings-bench-broker.log ${BROKER_ARGS:-}
    local out
    out=$("$BIN" bench "$scenario" --url "$NODE_URL" --broker-pid "$NODE_PID" --json "$@")
    echo "$label $out"
    stop_node "$NODE_PID"
}

# cluster LABEL ENGINE BENCH-ARGS... : publisher on node A, subscribers on node B (memory:
# one node does both, as the single-node baseline).
cluster() {
    local label=$1 engine=$2
    shift 2
    [[ -n "$ONLY" && "$label" != "$ONLY"* ]] && return 0
    if [ "$engine" = memory ]; then
        run "$label" "$@"
        return 0
    fi
    local prefix="bench$$_$RANDOM"
    local engine_args=(--engine "$engine" --key-prefix "$prefix" --redis-url "$REDIS_URL" --nats-url "$NATS_URL")
    start_node /tmp/tidings-bench-a.log "${engine_args[@]}"
    local a_pid=$NODE_PID a_url=$NODE_URL
    start_node /tmp/tidings-bench-b.log "${engine_args[@]}"
    local out
    out=$("$BIN" bench "$@" --url "$NODE_URL" --publish-url "$a_url" --broker-pid "$NODE_PID" --json)
    echo "$label $out"
    stop_node "$NODE_PID"
    stop_node "$a_pid"
}

# Fan-out throughput: ~20M deliveries per run where the machine allows.
run broadcast-100 broadcast -s 100 -n 100000
run broadcast-1000 broadcast -s 1000 -n 20000
run broadcast-10000 broadcast -s 10000 -n 2000 --source-addrs 2
run filtered-100 filtered -s 100 -k 10 -n 100000
run filtered-1000 filtered -s 1000 -k 10 -n 100000
run filtered-10000 filtered -s 10000 -k 10 -n 20000 --source-addrs 2
run projection-100 projection -s 100 -n 100000
run projection-1000 projection -s 1000 -n 20000
run projection-10000 projection -s 10000 -n 2000 --source-addrs 2
# Latency at a fixed rate.
run latency-100 latency -s 100 --rate 400 --duration 10
run latency-1000 latency -s 1000 --rate 400 --duration 10
run latency-10000 latency -s 10000 --rate 40 --duration 10 --source-addrs 2
# Idle connections: broker memory per connection.
run connections-100 connections -s 100
run connections-1000 connections -s 1000
run connections-10000 connections -s 10000 --source-addrs 2
run connections-19000 connections -s 19000 --source-addrs 4
# One node vs two over each shared engine, same load.
cluster cluster-memory-broadcast memory broadcast -s 1000 -n 10000
cluster cluster-redis-broadcast redis broadcast -s 1000 -n 10000
cluster cluster-nats-broadcast nats broadcast -s 1000 -n 10000
cluster cluster-memory-latency memory latency -s 1000 --rate 400 --duration 10
cluster cluster-redis-latency redis latency -s 1000 --rate 400 --duration 10
cluster cluster-nats-latency nats latency -s 1000 --rate 400 --duration 10
# Conflation's cost for subscribers that keep up (issue 16): state on, close vs conflate,
# alternating, so that each pair shares the machine's mood.
for round in 1 2; do
    for policy in close conflate; do
        BROKER_ARGS="--state bench --slow-consumer-policy $policy" \
            run "conflation-$policy-$round" broadcast -s 1000 -n 20000
    done
done
