#!/usr/bin/env bash
# Benchmark for `strata verify` (issue #17), against baselines in the same run on one
# throw-away PostgreSQL 15: ROWS observations migrated PostgreSQL to PostgreSQL, split by
# their dates over the operational database and the archive, then
#  (a) strata verify: every source row checked against its tier, values included (archive
#      read back and decrypted, operational table read back);
#  (b) reladiff (PyPI; checksummed key segments, bisection) comparing the operational table
#      with the source rows of that tier (--where on the source): strictly less checked;
#  (c) md5(string_agg(row ORDER BY id)) over the same source rows and the operational table.
# Rows/s counts source rows checked (all of them for Strata, the operational ones for (b) and
# (c)); medians of RUNS; Strata's peak RSS. Not a test: run it by hand.
#   ROWS=5000000 RUNS=3 bench/verify.sh
#   PARENT=/path/to/another/strata ...   also that build's verify, the two taking turns first
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-5000000}
RUNS=${RUNS:-3}
cargo build --release --quiet
STRATA=$PWD/target/release/strata
VENV=$PWD/target/bench-venv
if [ ! -x "$VENV/bin/reladiff" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet 'reladiff[postgresql]'
fi
PG_FSYNC=on PG_EXTRA="-c shared_buffers=1GB -c maintenance_work_mem=1GB -c max_wal_size=16GB -c autovacuum=off" \
  . scripts/lib/pg.sh
WORK=$(mktemp -d /tmp/strata-bench-verify.XXXXXX)
trap 'stop_pg; rm -rf "$WORK"' EXIT
URL="postgres://postgres@127.0.0.1:$PGPORT"
psql() { command psql -q -X -v ON_ERROR_STOP=1 "$URL/$1" "${@:2}"; }
psql postgres -c "CREATE DATABASE source" -c "CREATE DATABASE target"
# as_of 2026-11-25 minus archive_after 10y: rows dated up to 2016-11-25 (UTC) are archived.
OPERATIONAL_FROM=2016-11-26

echo "creating $ROWS observations ..."
psql source <<SQL
SELECT setseed(0.42);
CREATE TABLE observations (id bigint PRIMARY KEY, patient_id bigint NOT NULL, code text NOT NULL,
  value_num numeric(12,4), unit text, observed_at timestamptz NOT NULL, status text NOT NULL);
INSERT INTO observations SELECT g, 1 + (g * 7919) % 200000,
  lpad(((g * 31) % 2000)::text, 5, '0') || '-' || (g % 10),
  CASE WHEN g % 10 = 0 THEN NULL ELSE round((random() * 300)::numeric, 4) END,
  (ARRAY['mg/dL','mmol/L','g/dL','%','kg'])[1 + g % 5],
  timestamptz '2005-01-01' + (g::float / $ROWS) * interval '7990 days',
  (ARRAY['final','final','amended','preliminary'])[1 + g % 4]
FROM generate_series(1::bigint, $ROWS) g;
VACUUM (FREEZE, ANALYZE);
SQL
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
[tables.observations]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "observed_at"
TOML
# Every patient is inactive (no patient_inactive_after reached): the date alone decides.
printf 'version = "bench"\nas_of = "2026-11-25"\n[defaults]\narchive_after = "10y"\npatient_inactive_after = "1d"\n' > "$WORK/policy.toml"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/kek.hex"
echo "migrating ..."
(cd "$WORK" && "$STRATA" migrate --config strata.toml > /dev/null)
OP_ROWS=$(psql target -At -c "SELECT COUNT(*) FROM observations")
echo "  $ROWS source rows: $OP_ROWS operational, $((ROWS - OP_ROWS)) archived"

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
WHERE="observed_at >= '$OPERATIONAL_FROM'"
COLS="id, patient_id, code, value_num, unit, observed_at, status"
declare -A TIMES; RSS=0
for run in $(seq "$RUNS"); do
  echo "run $run/$RUNS"
  builds=(new); [ -n "${PARENT:-}" ] && { [ $((run % 2)) = 1 ] && builds=(new parent) || builds=(parent new); }
  for b in "${builds[@]}"; do
    bin=$STRATA; [ "$b" = parent ] && bin=$PARENT
    t0=$(now)
    (cd "$WORK" && /usr/bin/time -v "$bin" verify --config strata.toml > verify.txt 2> time.txt) \
      || { cat "$WORK/verify.txt"; exit 1; }
    t1=$(now)
    if [ "$b" = new ]; then
      TIMES[a]+="$(echo "$t1 - $t0" | bc) "
      r=$(awk -F: '/Maximum resident/ {gsub(/ /, "", $2); print $2}' "$WORK/time.txt"); RSS=$(( RSS > r ? RSS : r ))
    else
      TIMES[p]+="$(echo "$t1 - $t0" | bc) "
    fi
  done
  t0=$(now)
  "$VENV/bin/reladiff" "${URL/postgres:/postgresql:}/source" observations \
    "${URL/postgres:/postgresql:}/target" observations -k id \
    -c patient_id -c code -c value_num -c unit -c observed_at -c status --where "$WHERE" > "$WORK/reladiff.txt"
  t1=$(now); TIMES[b]+="$(echo "$t1 - $t0" | bc) "
  t0=$(now)
  a=$(psql source -At -c "SELECT md5(string_agg(($COLS)::text, '' ORDER BY id)) FROM observations WHERE $WHERE")
  b=$(psql target -At -c "SELECT md5(string_agg(($COLS)::text, '' ORDER BY id)) FROM observations")
  t1=$(now); TIMES[c]+="$(echo "$t1 - $t0" | bc) "
  [ "$a" = "$b" ] || echo "  md5 baseline differs"
done
[ -s "$WORK/reladiff.txt" ] && { echo "reladiff found differences:"; head "$WORK/reladiff.txt"; }
rate() { echo "$1 / $2" | bc; }
A=$(echo ${TIMES[a]} | tr ' ' '\n' | median); B=$(echo ${TIMES[b]} | tr ' ' '\n' | median); C=$(echo ${TIMES[c]} | tr ' ' '\n' | median)
RA=$(rate "$ROWS" "$A"); RB=$(rate "$OP_ROWS" "$B"); RC=$(rate "$OP_ROWS" "$C")
printf '(a) strata verify     %8.1f s  %9d rows/s (all %d source rows, both tiers)\n' "$A" "$RA" "$ROWS"
printf '(b) reladiff          %8.1f s  %9d rows/s (the %d operational rows)\n' "$B" "$RB" "$OP_ROWS"
printf '(c) md5(string_agg)   %8.1f s  %9d rows/s (the %d operational rows)\n' "$C" "$RC" "$OP_ROWS"
if [ -n "${PARENT:-}" ]; then
  P=$(echo ${TIMES[p]} | tr ' ' '\n' | median)
  printf '(e) parent verify     %8.1f s  %9d rows/s: this build %.2fx the parent\n' "$P" "$(rate "$ROWS" "$P")" "$(echo "$P / $A" | bc -l)"
fi
printf 'strata / reladiff: %.2fx rows/s; strata / md5: %.2fx; strata peak RSS %d MiB\n' \
  "$(echo "$RA / $RB" | bc -l)" "$(echo "$RA / $RC" | bc -l)" "$((RSS / 1024))"
