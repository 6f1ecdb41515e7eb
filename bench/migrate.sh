#!/usr/bin/env bash
# Benchmark for bulk migration to the operational tier (issue #4), measured against baselines in
# the same run on one throw-away PostgreSQL 15 (fsync on, as in ../shared/bench/LIMITS.md):
#  (a) COPY ... TO STDOUT (FORMAT binary) | COPY ... FROM STDIN (FORMAT binary) into a table
#      with a primary key;
#  (b) the same into a table without one, then ADD PRIMARY KEY;
#  (c) pgloader, if installed;
#  (d) strata migrate of the same table to the operational tier (policy pins it there).
#  (e) with PARENT=<another strata binary>, that build's strata migrate too, in the same runs,
#      the two builds taking turns at going first (a change measured against its parent).
# Prints rows/s per method (median of RUNS), Strata's ratios to (a), (b), (c), (e), and its peak
# RSS. Not a test: run it by hand.
#   ROWS=5000000 RUNS=3 [RANGE_ROWS=1000000] [PARENT=/path/to/strata] bench/migrate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-5000000}
RUNS=${RUNS:-3}
cargo build --release --quiet
STRATA=$PWD/target/release/strata
PG_FSYNC=on PG_EXTRA="-c shared_buffers=1GB -c maintenance_work_mem=1GB -c max_wal_size=16GB -c min_wal_size=1GB -c checkpoint_timeout=30min -c autovacuum=off" \
  . scripts/lib/pg.sh
WORK=$(mktemp -d /tmp/strata-bench-migrate.XXXXXX)
trap 'stop_pg; rm -rf "$WORK"' EXIT
URL="postgres://postgres@127.0.0.1:$PGPORT"
psql() { command psql -q -X -v ON_ERROR_STOP=1 "$URL/$1" "${@:2}"; }
psql postgres -c "CREATE DATABASE source" -c "CREATE DATABASE target"

echo "creating $ROWS observations ..."
psql source <<SQL
SELECT setseed(0.42);
CREATE TABLE observations (id bigint PRIMARY KEY, patient_id bigint NOT NULL, encounter_id bigint NOT NULL,
  code text NOT NULL, value_num numeric(12,4), unit text, value_text text, observed_at timestamptz NOT NULL,
  status text NOT NULL);
INSERT INTO observations SELECT g, 1 + (g * 7919) % 200000, g / 3,
  lpad(((g * 31) % 2000)::text, 5, '0') || '-' || (g % 10),
  CASE WHEN g % 10 = 0 THEN NULL ELSE round((random() * 300)::numeric, 4) END,
  (ARRAY['mg/dL','mmol/L','g/dL','%','kg','mm[Hg]','10*3/uL','U/L','ng/mL','pg/mL','fL','s'])[1 + g % 12],
  CASE WHEN g % 20 = 0 THEN 'specimen hemolyzed; repeat requested' WHEN g % 19 = 0 THEN 'note ' || md5(g::text) END,
  timestamptz '2005-01-01' + (g::float / $ROWS) * interval '7990 days',
  (ARRAY['final','final','final','final','final','final','amended','preliminary','cancelled','entered-in-error'])[1 + g % 10]
FROM generate_series(1::bigint, $ROWS) g;
VACUUM (FREEZE, ANALYZE);
CHECKPOINT;
SQL
DDL="CREATE TABLE observations (id bigint NOT NULL, patient_id bigint NOT NULL, encounter_id bigint NOT NULL,
  code text NOT NULL, value_num numeric(12,4), unit text, value_text text, observed_at timestamptz NOT NULL, status text NOT NULL)"
reset_target() { psql target -c "DROP TABLE IF EXISTS observations, _strata_quarantine, _strata_checkpoints" -c "CHECKPOINT"; }
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
copy_pipe() { psql source -c "COPY observations TO STDOUT (FORMAT binary)" | psql target -c "COPY observations FROM STDIN (FORMAT binary)"; }

cat > "$WORK/strata.toml" <<TOML
[source]
url = "$URL/source"
allow_writable_role = true  # the benchmark connects as the cluster superuser
[operational]
url = "$URL/target"
[archive]
location = "archive"
kek_id = "bench"
kek_file = "kek.hex"
[policy]
file = "policy.toml"
[run]
rows_per_range = ${RANGE_ROWS:-1000000}
[tables.observations]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "observed_at"
TOML
printf 'version = "bench"\nas_of = "2026-11-25"\n[defaults]\narchive_after = "1y"\npatient_inactive_after = "1y"\n[tables.observations]\ntier = "operational"\n' > "$WORK/policy.toml"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/kek.hex"

declare -A TIMES
for run in $(seq "$RUNS"); do
  echo "run $run/$RUNS"
  reset_target; psql target -c "$DDL" -c "ALTER TABLE observations ADD PRIMARY KEY (id)"
  t0=$(now); copy_pipe; t1=$(now); TIMES[a]+="$(echo "$t1 - $t0" | bc) "
  reset_target; psql target -c "$DDL"
  t0=$(now); copy_pipe; psql target -c "ALTER TABLE observations ADD PRIMARY KEY (id)"; t1=$(now); TIMES[b]+="$(echo "$t1 - $t0" | bc) "
  if command -v pgloader >/dev/null; then
    reset_target
    PGL="postgresql://postgres@127.0.0.1:$PGPORT"
    printf "LOAD DATABASE FROM %s/source INTO %s/target INCLUDING ONLY TABLE NAMES MATCHING 'observations' IN SCHEMA 'public';\n" "$PGL" "$PGL" > "$WORK/pg.load"
    t0=$(now)
    if pgloader --dynamic-space-size 4096 --root-dir "$WORK/pgloader" "$WORK/pg.load" > "$WORK/pgloader.log" 2>&1 \
      && test "$(psql target -At -c 'SELECT count(*) FROM observations')" = "$ROWS"; then
      t1=$(now); TIMES[c]+="$(echo "$t1 - $t0" | bc) "
    else
      echo "pgloader failed:"; tail -5 "$WORK/pgloader.log"
    fi
  fi
  builds=(d); [ -n "${PARENT:-}" ] && { [ $((run % 2)) = 1 ] && builds=(d e) || builds=(e d); }
  for k in "${builds[@]}"; do
    bin=$STRATA; [ "$k" = e ] && bin=$PARENT
    reset_target; rm -rf "$WORK/archive" "$WORK"/strata-control.db*
    t0=$(now)
    (cd "$WORK" && /usr/bin/time -v "$bin" migrate --config strata.toml > migrate.txt 2> time.txt) || { cat "$WORK/time.txt"; exit 1; }
    t1=$(now); TIMES[$k]+="$(echo "$t1 - $t0" | bc) "
    test "$(psql target -At -c 'SELECT count(*) FROM observations')" = "$ROWS" || { echo "$bin moved the wrong number of rows"; exit 1; }
    [ "$k" = d ] || continue
    RSS=$(awk -F: '/Maximum resident/ {gsub(/ /, "", $2); print $2}' "$WORK/time.txt")
    RSS_MAX=$(( ${RSS_MAX:-0} > RSS ? ${RSS_MAX:-0} : RSS ))
  done
done
cat "$WORK/migrate.txt" | tail -4
echo
label() { case $1 in a) echo "(a) COPY binary pipe, PK present";; b) echo "(b) COPY binary pipe, then ADD PRIMARY KEY";; c) echo "(c) pgloader";; d) echo "(d) strata migrate";; e) echo "(e) PARENT's strata migrate";; esac; }
S=$(echo "${TIMES[d]}" | tr ' ' '\n' | grep . | median)
for k in a b c d e; do
  [ -n "${TIMES[$k]:-}" ] || continue
  m=$(echo "${TIMES[$k]}" | tr ' ' '\n' | grep . | median)
  printf '%-44s %10.0f rows/s  (%.1f s median of %d: %s)' "$(label $k)" "$(echo "$ROWS / $m" | bc -l)" "$m" "$RUNS" "${TIMES[$k]% }"
  [ "$k" != d ] && printf '  strata ratio %.2f' "$(echo "$m / $S" | bc -l)"
  echo
done
printf 'peak RSS of strata migrate: %d MiB\n' $((RSS_MAX / 1024))
