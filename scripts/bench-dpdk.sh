#!/usr/bin/env bash
# Throughput of svq-relay between two DPDK testpmds, against the same two
# testpmds connected directly, interleaved in one run.
#
#   guest: testpmd virtio-user, txonly --txpkts=SIZE   (CPU 1: --lcores 0@1,1@1)
#   device: testpmd net_vhost, rxonly                    (CPU 0: --lcores 0@0,1@0)
#   direct:      guest -> device socket
#   direct-no-in-order: the same with virtio-user in_order=0 (what the relay negotiates)
#   passthrough: guest -> svq-relay --shadow off --backend vhost-user:DEV -> device
#   shadow:      guest -> svq-relay --shadow on  --backend vhost-user:DEV -> device
#
# Measure: the device's RX rate ("Rx-pps" of testpmd's 1 s statistics),
# averaged over WINDOW seconds after WARMUP seconds of traffic. Every round
# runs every configuration once, so slow drifts of a shared machine hit all
# of them alike; the table shows the median over the rounds and its ratio to
# direct at the same packet size.
#
# Usage: scripts/bench-dpdk.sh            (env: ROUNDS=3 WINDOW=5 WARMUP=2
#        SIZES="64 1500" MODES="direct direct-no-in-order passthrough shadow"
#        RELAY=target/release/svq-relay)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
WINDOW=${WINDOW:-5}
WARMUP=${WARMUP:-2}
SIZES=${SIZES:-"64 1500"}
# direct-no-in-order: direct with virtio-user's in_order=0, the feature set
# the relay negotiates (it never offers IN_ORDER), to tell the cost of the
# features from the cost of the relay.
MODES=${MODES:-"direct direct-no-in-order passthrough shadow"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RELAY=${RELAY:-${CARGO_TARGET_DIR:-$ROOT/target}/release/svq-relay}

command -v dpdk-testpmd >/dev/null || { echo "bench-dpdk: dpdk-testpmd not installed (apt-get install dpdk-dev)" >&2; exit 2; }
[ -x "$RELAY" ] || { echo "bench-dpdk: $RELAY not found; run: cargo build --release (or set RELAY=)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/svq-bench.XXXXXX)
PIDS=()
PREFIXES=()
cleanup() {
    # testpmd runs under `timeout`: kill the child first, or it outlives it.
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] || continue
        pkill -KILL -P "$p" 2>/dev/null || true
        kill -KILL "$p" 2>/dev/null || true
    done
    for p in "${PREFIXES[@]:-}"; do [ -n "$p" ] && rm -rf "/var/run/dpdk/$p"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { # FILE PATTERN SECONDS
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench-dpdk: timeout waiting for '$2' in $1" >&2
    tail -20 "$1" >&2
    return 1
}

stop() { # PID (SIGINT, bounded wait, then KILL)
    local i
    kill -INT "$1" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    pkill -KILL -P "$1" 2>/dev/null || true
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

testpmd() { # PREFIX LCORES VDEV MODE LOG EXTRA...
    local prefix=$1 lcores=$2 vdev=$3 mode=$4 log=$5
    shift 5
    PREFIXES+=("$prefix")
    rm -rf "/var/run/dpdk/$prefix"
    timeout -s KILL 120 dpdk-testpmd --lcores "$lcores" --no-huge -m 256 --no-pci \
        --file-prefix "$prefix" --vdev "$vdev" -- --total-num-mbufs=16384 \
        --stats-period 1 --auto-start --forward-mode="$mode" "$@" </dev/null >"$log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# Mean of the device's "Rx-pps" samples printed after the warm-up.
mean_rx_pps() { # LOG SKIP
    grep -o 'Rx-pps: *[0-9]*' "$1" | awk -v skip="$2" '
        { n++; if (n > skip) { s += $2; m++ } }
        END { if (m > 0) printf "%d\n", s / m; else print 0 }'
}

one() { # MODE SIZE -> sets RESULT (pps); not in a subshell, so the EXIT trap sees every pid
    local mode=$1 size=$2 tag="$$-$mode-$size-$RANDOM"
    local dir="$WORK/$tag"
    mkdir -p "$dir"
    local dev_sock="$dir/dev.sock" vm_sock="$dir/vm.sock" relay_pid=""
    testpmd "svqb-d-$tag" 0@0,1@0 "net_vhost0,iface=$dev_sock,queues=1" rxonly "$dir/device.log"
    local dev_pid=$LAST_PID
    wait_for "$dir/device.log" "forwards packets on" 30
    local guest_sock=$dev_sock vdev_opts=""
    [ "$mode" = direct-no-in-order ] && vdev_opts=",in_order=0"
    if [ "${mode#direct}" = "$mode" ]; then
        local shadow=off
        [ "$mode" = shadow ] && shadow=on
        "$RELAY" --socket-path "$vm_sock" --backend "vhost-user:$dev_sock" --shadow "$shadow" \
            --log-level warn 2>"$dir/relay.log" &
        relay_pid=$!
        PIDS+=("$relay_pid")
        for ((i = 0; i < 100; i++)); do [ -S "$vm_sock" ] && break; sleep 0.1; done
        [ -S "$vm_sock" ] || { echo "bench-dpdk: relay did not start:" >&2; cat "$dir/relay.log" >&2; return 1; }
        guest_sock=$vm_sock
    fi
    testpmd "svqb-g-$tag" 0@1,1@1 "net_virtio_user0,path=$guest_sock,queues=1$vdev_opts" txonly \
        "$dir/guest.log" --txpkts="$size"
    local guest_pid=$LAST_PID
    wait_for "$dir/guest.log" "forwards packets on" 30
    # Samples printed so far belong to the start-up; skip them and the warm-up.
    sleep "$WARMUP"
    local skip
    skip=$(grep -c 'Rx-pps' "$dir/device.log" || true)
    sleep "$WINDOW"
    local pps
    pps=$(mean_rx_pps "$dir/device.log" "$skip")
    stop "$guest_pid"
    [ -n "$relay_pid" ] && stop "$relay_pid"
    stop "$dev_pid"
    rm -rf "/var/run/dpdk/svqb-d-$tag" "/var/run/dpdk/svqb-g-$tag"
    if [ -s "$dir/relay.log" ]; then
        echo "bench-dpdk: relay ($mode, $size B) logged:" >&2
        head -5 "$dir/relay.log" >&2
    fi
    RESULT=$pps
}

declare -A RESULTS
echo "svq-relay DPDK benchmark: $ROUNDS rounds x sizes [$SIZES] x [$MODES], ${WINDOW}s windows after ${WARMUP}s warm-up" >&2
for ((r = 1; r <= ROUNDS; r++)); do
    for size in $SIZES; do
        for mode in $MODES; do
            one "$mode" "$size"
            pps=$RESULT
            RESULTS[$mode,$size]="${RESULTS[$mode,$size]:-} $pps"
            printf "round %d  %5s B  %-18s %12s pps\n" "$r" "$size" "$mode" "$pps" >&2
        done
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%d\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "n/a" }'; }

printf "\n| size | mode | pps per round | median pps | vs direct | vs direct-no-in-order |\n|---|---|---|---|---|---|\n"
for size in $SIZES; do
    direct=$(echo "${RESULTS[direct,$size]:-}" | median)
    noio=$(echo "${RESULTS[direct-no-in-order,$size]:-}" | median)
    for mode in $MODES; do
        m=$(echo "${RESULTS[$mode,$size]}" | median)
        printf "| %s B | %s | %s | %s | %s | %s |\n" "$size" "$mode" \
            "$(echo ${RESULTS[$mode,$size]} | sed 's/ / \/ /g')" "$m" "$(ratio "$m" "$direct")" "$(ratio "$m" "$noio")"
    done
done
