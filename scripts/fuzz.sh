#!/usr/bin/env bash
# Long fuzz runs: every svq-fuzz target at CASES cases (default 10^6) with a
# fresh seed, built with the `fuzz` profile (optimized, overflow checks and
# debug assertions on). Prints a table (target, cases, seed, seconds,
# failures) and, with --readme, writes it into README.md between the
# fuzz-table markers. Failing inputs land in OUT (default target/fuzz-out);
# replay one with `svq-fuzz TARGET --replay FILE`.
#
# Usage: scripts/fuzz.sh [--readme]   (env: CASES=1000000 SEED=<clock>
#        TARGETS="iova guest-ring device-used vhost-user qmp device-state"
#        OUT=target/fuzz-out)
# Exit status: 1 if any target had a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

CASES=${CASES:-1000000}
SEED=${SEED:-$(date +%s)}
TARGETS=${TARGETS:-"iova guest-ring device-used vhost-user qmp device-state"}
OUT=${OUT:-target/fuzz-out}
README=0
[ "${1:-}" = "--readme" ] && README=1

cargo build --profile fuzz -p svq-fuzz
# The commit the binary was built from (HEAD may move during a long run).
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!README.md' || echo +changes)
BIN=target/fuzz/svq-fuzz
mkdir -p "$OUT"

table="| target | cases | seed | seconds | failures |
|---|---:|---:|---:|---:|"
bad=0
for t in $TARGETS; do
  start=$(date +%s%N)
  set +e
  "$BIN" "$t" --cases "$CASES" --seed "$SEED" --out "$OUT" >"$OUT/$t.log" 2>&1
  rc=$?
  set -e
  secs=$(( ($(date +%s%N) - start + 500000000) / 1000000000 ))
  last=$(grep -E "^$t: [0-9]+ cases, [0-9]+ failures" "$OUT/$t.log" | tail -1 || true)
  if [ -z "$last" ]; then
    echo "$t: no summary line (exit $rc); see $OUT/$t.log" >&2
    failures="crashed"
    bad=1
  else
    failures=$(echo "$last" | sed -E 's/.* ([0-9]+) failures/\1/')
    [ "$failures" = 0 ] && [ $rc -eq 0 ] || bad=1
  fi
  row=$(printf '| %s | %s | %s | %s | %s |' "$t" "$CASES" "$SEED" "$secs" "$failures")
  echo "$row"
  table="$table
$row"
done

if [ $README -eq 1 ]; then
  stamp="$(date -u +%Y-%m-%d), $(nproc) cores, commit $COMMIT"
  grep -q '<!-- fuzz-table:begin -->' README.md || { echo "README.md has no fuzz-table markers" >&2; exit 2; }
  TABLE="$table" STAMP="$stamp" awk '
    /<!-- fuzz-table:begin -->/ {
      print; print ENVIRON["TABLE"]; print ""
      print "(" ENVIRON["STAMP"] ": `scripts/fuzz.sh --readme`)"; skip = 1; next
    }
    /<!-- fuzz-table:end -->/ { skip = 0 }
    !skip { print }
  ' README.md >README.md.new
  mv README.md.new README.md
fi
exit $bad
