#!/usr/bin/env bash
# Throughput and round-trip latency of svq-relay between two DPDK testpmds,
# against the same two testpmds connected directly, interleaved in one run.
#
#   guest:  testpmd virtio-user (the VMM side)
#   device: testpmd net_vhost   (the device side)
#
# Modes (MODES):
#   direct              guest -> device socket
#   direct-no-in-order  the same with virtio-user in_order=0 (what the relay negotiates)
#   passthrough         guest -> svq-relay --shadow off -> device
#   passthrough-in-order  the same with --in-order (virtio-user negotiates IN_ORDER)
#   direct-packed       direct with virtio-user packed_vq=1 (packed rings, in order)
#   passthrough-packed  passthrough with --packed --in-order, virtio-user packed_vq=1
#   shadow-event        guest -> svq-relay --shadow on --poll off       (the default: epoll, woken per burst)
#   shadow-poll         guest -> svq-relay --shadow on --poll adaptive
#   shadow-always       guest -> svq-relay --shadow on --poll always
#   direct-packed-no-in-order  direct with packed_vq=1,in_order=0 (what shadow-packed negotiates)
#   shadow-packed       shadow-event with --packed, virtio-user packed_vq=1 (packed guest and shadow rings)
#   shadow-packed-poll  shadow-poll with --packed, virtio-user packed_vq=1
#   shadow-in-order     shadow-event with --in-order (virtio-user negotiates IN_ORDER)
#
# Directions (DIRS):
#   tx  guest txonly -> device rxonly; the device's Rx-pps is measured
#   rx  device txonly -> guest rxonly; the guest's Rx-pps is measured
#
# CPU placement (PLACES), printed with every result:
#   split     device on CPU 0, guest on CPU 1, relay unpinned (it competes
#             with two busy-polling testpmds for two CPUs)
#   own-core  device and guest share CPU 0, the relay's workers are pinned
#             to CPU 1 (--cpu-affinity 1); direct runs with the same two
#             testpmds on CPU 0, so the ratio shows what the relay costs
#             when it is not starved. Not in the default set: on a 2-CPU
#             machine the two busy-polling testpmds then take turns on CPU 0
#             in scheduler time slices, and every mode, direct included,
#             measures the time slice (about 32 K pps, 124 round trips/s).
#             Meaningful with 3 or more CPUs.
#
# Latency (LATENCY=1): both testpmds in io forwarding, the guest sends one
# 64-byte packet (--tx-first --burst=1) and the two bounce it back and forth;
# the device's Rx-pps is then round trips per second and 1e6/pps the
# round-trip time in microseconds.
#
# Measure: the mean of testpmd's 1 s "Rx-pps" samples over WINDOW seconds
# after WARMUP seconds of traffic. Every round runs every configuration once,
# so slow drifts of a shared machine hit all of them alike; the tables show
# the median over the rounds and its ratio to direct in the same placement,
# direction and size.
#
# Usage: scripts/bench-dpdk.sh   (env: ROUNDS=3 WINDOW=5 WARMUP=2 SIZES="64 1500"
#        DIRS="tx rx" PLACES="split" (or "split own-core") MODES="..." LATENCY=1
#        RELAY=target/release/svq-relay)
set -euo pipefail

ROUNDS=${ROUNDS:-3}
WINDOW=${WINDOW:-5}
WARMUP=${WARMUP:-2}
SIZES=${SIZES:-"64 1500"}
DIRS=${DIRS:-"tx rx"}
PLACES=${PLACES:-"split"}
MODES=${MODES:-"direct direct-no-in-order passthrough passthrough-in-order shadow-event shadow-poll shadow-always"}
LATENCY=${LATENCY:-1}
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

# Mean of the "Rx-pps" samples printed after the warm-up.
mean_rx_pps() { # LOG SKIP
    grep -o 'Rx-pps: *[0-9]*' "$1" | awk -v skip="$2" '
        { n++; if (n > skip) { s += $2; m++ } }
        END { if (m > 0) printf "%d\n", s / m; else print 0 }'
}

relay_args() { # MODE -> RELAY_ARGS (empty for direct modes)
    case $1 in
        passthrough) RELAY_ARGS="--shadow off" ;;
        passthrough-in-order) RELAY_ARGS="--shadow off --in-order" ;;
        passthrough-packed) RELAY_ARGS="--shadow off --in-order --packed" ;;
        shadow-event) RELAY_ARGS="--shadow on --poll off" ;;
        shadow-poll) RELAY_ARGS="--shadow on --poll adaptive" ;;
        shadow-always) RELAY_ARGS="--shadow on --poll always" ;;
        shadow-packed) RELAY_ARGS="--shadow on --poll off --packed" ;;
        shadow-in-order) RELAY_ARGS="--shadow on --poll off --in-order" ;;
        shadow-packed-poll) RELAY_ARGS="--shadow on --poll adaptive --packed" ;;
        direct | direct-no-in-order | direct-packed | direct-packed-no-in-order) RELAY_ARGS="" ;;
        *) echo "bench-dpdk: unknown mode $1" >&2; exit 2 ;;
    esac
}

# MODE SIZE DIR PLACE -> sets RESULT (pps). DIR is tx, rx or pingpong. Not
# in a subshell, so the EXIT trap sees every pid.
one() {
    local mode=$1 size=$2 direction=$3 place=$4 tag="$$-$RANDOM$RANDOM"
    local dir="$WORK/$tag"
    mkdir -p "$dir"
    local dev_sock="$dir/dev.sock" vm_sock="$dir/vm.sock" relay_pid=""
    local dev_lcores=0@0,1@0 guest_lcores=0@1,1@1 pin=""
    if [ "$place" = own-core ]; then
        guest_lcores=0@0,1@0
        pin="--cpu-affinity 1"
    fi
    local dev_fwd=rxonly guest_fwd=txonly dev_extra=() guest_extra=(--txpkts="$size")
    case $direction in
        rx) dev_fwd=txonly guest_fwd=rxonly dev_extra=(--txpkts="$size") guest_extra=() ;;
        pingpong) dev_fwd=io guest_fwd=io guest_extra=(--tx-first --burst=1 --txpkts="$size") dev_extra=(--burst=1) ;;
    esac
    testpmd "svqb-d-$tag" "$dev_lcores" "net_vhost0,iface=$dev_sock,queues=1" "$dev_fwd" \
        "$dir/device.log" "${dev_extra[@]}"
    local dev_pid=$LAST_PID
    wait_for "$dir/device.log" "forwards packets on" 30
    local guest_sock=$dev_sock vdev_opts=""
    [ "$mode" = direct-no-in-order ] && vdev_opts=",in_order=0"
    case $mode in
        *-packed | shadow-packed-poll) vdev_opts=",packed_vq=1" ;;
        direct-packed-no-in-order) vdev_opts=",packed_vq=1,in_order=0" ;;
    esac
    relay_args "$mode"
    if [ -n "$RELAY_ARGS" ]; then
        # shellcheck disable=SC2086
        "$RELAY" --socket-path "$vm_sock" --backend "vhost-user:$dev_sock" $RELAY_ARGS $pin \
            --log-level warn 2>"$dir/relay.log" &
        relay_pid=$!
        PIDS+=("$relay_pid")
        for ((i = 0; i < 100; i++)); do [ -S "$vm_sock" ] && break; sleep 0.1; done
        [ -S "$vm_sock" ] || { echo "bench-dpdk: relay did not start:" >&2; cat "$dir/relay.log" >&2; return 1; }
        guest_sock=$vm_sock
    fi
    testpmd "svqb-g-$tag" "$guest_lcores" "net_virtio_user0,path=$guest_sock,queues=1$vdev_opts" \
        "$guest_fwd" "$dir/guest.log" "${guest_extra[@]}"
    local guest_pid=$LAST_PID
    wait_for "$dir/guest.log" "forwards packets on" 30
    local measured=$dir/device.log
    [ "$direction" = rx ] && measured=$dir/guest.log
    # Samples printed so far belong to the start-up; skip them and the warm-up.
    sleep "$WARMUP"
    local skip
    skip=$(grep -c 'Rx-pps' "$measured" || true)
    sleep "$WINDOW"
    local pps
    pps=$(mean_rx_pps "$measured" "$skip")
    stop "$guest_pid"
    [ -n "$relay_pid" ] && stop "$relay_pid"
    stop "$dev_pid"
    rm -rf "/var/run/dpdk/svqb-d-$tag" "/var/run/dpdk/svqb-g-$tag"
    if [ -s "$dir/relay.log" ]; then
        echo "bench-dpdk: relay ($mode, $size B, $direction, $place) logged:" >&2
        head -5 "$dir/relay.log" >&2
    fi
    RESULT=$pps
}

declare -A RESULTS
echo "svq-relay DPDK benchmark: $ROUNDS rounds x sizes [$SIZES] x directions [$DIRS] x placements [$PLACES] x [$MODES], latency $LATENCY, ${WINDOW}s windows after ${WARMUP}s warm-up, $(nproc) CPUs" >&2
for ((r = 1; r <= ROUNDS; r++)); do
    for place in $PLACES; do
        for direction in $DIRS; do
            for size in $SIZES; do
                for mode in $MODES; do
                    one "$mode" "$size" "$direction" "$place"
                    RESULTS[$place,$direction,$size,$mode]="${RESULTS[$place,$direction,$size,$mode]:-} $RESULT"
                    printf "round %d  %-8s %-3s %5s B  %-18s %12s pps\n" "$r" "$place" "$direction" "$size" "$mode" "$RESULT" >&2
                done
            done
        done
        if [ "$LATENCY" = 1 ]; then
            for mode in $MODES; do
                one "$mode" 64 pingpong "$place"
                RESULTS[$place,pingpong,64,$mode]="${RESULTS[$place,pingpong,64,$mode]:-} $RESULT"
                printf "round %d  %-8s ping-pong  %-18s %12s round trips/s\n" "$r" "$place" "$mode" "$RESULT" >&2
            done
        fi
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%d\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else print "n/a" }'; }

usec() { awk -v p="$1" 'BEGIN { if (p > 0) printf "%.1f", 1e6 / p; else print "n/a" }'; }

placement() {
    case $1 in
        split) echo "device CPU 0, guest CPU 1, relay unpinned" ;;
        own-core) echo "device + guest CPU 0, relay CPU 1" ;;
    esac
}

printf "\n| placement | direction | size | mode | pps per round | median pps | vs direct |\n|---|---|---|---|---|---|---|\n"
for place in $PLACES; do
    for direction in $DIRS; do
        for size in $SIZES; do
            direct=$(echo "${RESULTS[$place,$direction,$size,direct]:-}" | median)
            for mode in $MODES; do
                all=${RESULTS[$place,$direction,$size,$mode]}
                m=$(echo "$all" | median)
                printf "| %s | %s | %s B | %s | %s | %s | %s |\n" "$(placement "$place")" \
                    "$direction" "$size" "$mode" "$(echo $all | sed 's/ / \/ /g')" "$m" "$(ratio "$m" "$direct")"
            done
        done
    done
done

if [ "$LATENCY" = 1 ]; then
    printf "\n| placement | mode | round trips/s per round | median | round trip | vs direct |\n|---|---|---|---|---|---|\n"
    for place in $PLACES; do
        direct=$(echo "${RESULTS[$place,pingpong,64,direct]:-}" | median)
        for mode in $MODES; do
            all=${RESULTS[$place,pingpong,64,$mode]}
            m=$(echo "$all" | median)
            printf "| %s | %s | %s | %s | %s us | %s |\n" "$(placement "$place")" "$mode" \
                "$(echo $all | sed 's/ / \/ /g')" "$m" "$(usec "$m")" "$(ratio "$m" "$direct")"
        done
    done
fi
