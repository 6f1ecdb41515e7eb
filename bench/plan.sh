#!/usr/bin/env bash
# Benchmark for issue "cutoff policies": `strata plan` over a generated legacy EHR of about
# 5 million rows (SQLite, the embedded default). Prints the plan's time and rows/s, and, measured
# in the same run, a plain full scan of the same tables (Python's sqlite3 reading every row) as
# the baseline, with the ratio. Not a test: run it by hand.
#   SCALE=53 bench/plan.sh      # ~5M rows (the default); SCALE=5 for a quick look
#   PARENT=path/to/another/strata RUNS=3 bench/plan.sh   # also that build's plan, the two
#                                # taking turns at going first; medians of RUNS
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-53}
RUNS=${RUNS:-1}
AS_OF=2026-11-25
cargo build --release --quiet
STRATA=$PWD/target/release/strata
WORK=$(mktemp -d /tmp/strata-bench-plan.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "generating scale $SCALE ..."
t0=$(date +%s.%N)
"$STRATA" generate --url "sqlite://$WORK/legacy.db" --scale "$SCALE" --as-of "$AS_OF" --max-document-bytes 2048 > "$WORK/counts.txt"
t1=$(date +%s.%N)
ROWS=$(awk '{s += $2} END {print s}' "$WORK/counts.txt")
echo "  $ROWS rows in $(echo "$t1 - $t0" | bc) s"

{
  printf '[source]\nurl = "sqlite://legacy.db"\n[operational]\nurl = "sqlite://operational.db"\n'
  printf '[archive]\nlocation = "archive"\nkek_id = "bench"\nkek_env = "STRATA_BENCH_KEK"\n[policy]\nfile = "policy.toml"\n\n'
  sed -n '/^\[tables\.patients\]/,$p' deploy/strata.toml
} > "$WORK/strata.toml"
sed "s/^# as_of = .*/as_of = \"$AS_OF\"/" deploy/policy.toml > "$WORK/policy.toml"

python3 - "$WORK/legacy.db" > "$WORK/baseline.txt" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
t = time.perf_counter()
n = 0
for table in tables:
    for _ in db.execute(f'SELECT * FROM "{table}"'):
        n += 1
print(n, time.perf_counter() - t)
PY
read -r BASE_ROWS BASE_S < "$WORK/baseline.txt"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
TIMES=""; PARENT_TIMES=""; RSS=0
for run in $(seq "$RUNS"); do
  builds=(new); [ -n "${PARENT:-}" ] && { [ $((run % 2)) = 1 ] && builds=(new parent) || builds=(parent new); }
  for b in "${builds[@]}"; do
    bin=$STRATA; [ "$b" = parent ] && bin=$PARENT
    rm -f "$WORK"/strata-control.db*
    t0=$(date +%s.%N)
    (cd "$WORK" && /usr/bin/time -v "$bin" plan --config strata.toml > plan-$b.txt 2> time.txt)
    t1=$(date +%s.%N)
    if [ "$b" = new ]; then
      TIMES+="$(echo "$t1 - $t0" | bc) "
      r=$(awk -F: '/Maximum resident/ {gsub(/ /, "", $2); print $2}' "$WORK/time.txt")
      RSS=$(( RSS > r ? RSS : r ))
    else
      PARENT_TIMES+="$(echo "$t1 - $t0" | bc) "
    fi
  done
done
PLAN_S=$(echo "$TIMES" | tr ' ' '\n' | grep . | median)
mv "$WORK/plan-new.txt" "$WORK/plan.txt"
cat "$WORK/plan.txt"
echo
printf 'plan:      %d rows in %.2f s = %.0f rows/s, peak RSS %d MiB\n' "$ROWS" "$PLAN_S" "$(echo "$ROWS / $PLAN_S" | bc -l)" $((RSS / 1024))
printf 'baseline:  %d rows in %.2f s = %.0f rows/s (python sqlite3 full scan, same run)\n' "$BASE_ROWS" "$BASE_S" "$(echo "$BASE_ROWS / $BASE_S" | bc -l)"
printf 'ratio:     plan rows/s / full-scan rows/s = %.2f\n' "$(echo "($ROWS / $PLAN_S) / ($BASE_ROWS / $BASE_S)" | bc -l)"
if [ -n "${PARENT:-}" ]; then
  P=$(echo "$PARENT_TIMES" | tr ' ' '\n' | grep . | median)
  printf 'parent:    %.2f s median (%s); this build %.2f s (%s): ratio %.2f (above 1 is faster)\n' "$P" "${PARENT_TIMES% }" "$PLAN_S" "${TIMES% }" "$(echo "$P / $PLAN_S" | bc -l)"
  diff <(grep -v "^plan under" "$WORK/plan.txt") <(grep -v "^plan under" "$WORK/plan-parent.txt") > "$WORK/plans.diff" || { echo "the two builds' plans differ:"; cat "$WORK/plans.diff"; }
fi
