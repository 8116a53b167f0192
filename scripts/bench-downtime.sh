#!/usr/bin/env bash
# Live-migration downtime of a QEMU guest (Linux 6.1, TCG) pinging DPDK
# testpmd icmpecho every 50 ms, migrated with testpmd as QEMU's vhost-user
# back-end directly and through svq-relay (passthrough with the dirty log
# forwarded, and shadow), interleaved in one run. Prints QEMU's downtime and
# total-time medians as a markdown table.
#
# Usage: scripts/bench-downtime.sh   (env: ROUNDS=3, QEMU=7|10)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/qemu-assets.sh >/dev/null
cargo build --release -q
cargo test --release -q --test qemu -- --ignored --exact downtime_table --nocapture 2>&1 \
  | grep -E '^(\||round )'
