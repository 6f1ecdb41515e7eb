#!/usr/bin/env bash
# Benchmark for the streaming compaction (issue #20): `strata archive compact` of a ROWS-row
# archived table against a same-run baseline, DuckDB `COPY (SELECT * FROM read_parquet(...)
# ORDER BY patient) TO ... (zstd)` over unencrypted copies of the same files (decrypted by
# pyarrow through its KMS interface). Both read every file of the table and write it sorted by
# patient; Strata also decrypts, leaves out superseded copies, re-encrypts and publishes a
# manifest. Prints rows/s, the ratio, and each side's peak RSS (the goal: Strata under
# 512 MiB whatever the table's size, and at least 0.8x DuckDB's rows/s).
# The table is archived by `strata migrate` from PostgreSQL (its ranges write many sorted
# files: the compaction merges them in passes of at most 16 open files). Between rounds the
# compaction's manifest and files are removed, so each round compacts the same files. The two
# take turns first; medians of RUNS rounds. Not a test: run it by hand.
#   ROWS=20000000 RUNS=3 bench/compact.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROWS=${ROWS:-20000000}
PATIENTS=${PATIENTS:-200000}
RUNS=${RUNS:-3}
cargo build --release --quiet
STRATA=$PWD/target/release/strata
PY=$PWD/target/pyenv/bin/python
if ! "$PY" -c 'import pyarrow, cryptography, duckdb' 2>/dev/null; then
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install --quiet "pyarrow==26.0.1" "cryptography>=42" "duckdb==1.1.3"
fi
. scripts/lib/pg.sh
WORK=$(mktemp -d /tmp/strata-bench-compact.XXXXXX)
trap 'stop_pg; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
psql() { command psql -q -X -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$PGPORT/$1" "${@:2}"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
psql postgres -c "CREATE DATABASE source" -c "CREATE DATABASE target"

echo "creating $ROWS observations over $PATIENTS patients ..."
psql source <<SQL
CREATE TABLE observations (id bigint PRIMARY KEY, patient_id bigint NOT NULL, code text,
  value_num double precision, unit text, observed_at date, status text);
INSERT INTO observations SELECT g, 1 + (g * 7919) % $PATIENTS, lpad((g % 2000)::text, 5, '0') || '-' || (g % 10),
  (g % 3000) / 10.0, (ARRAY['mg/dL','mmol/L','g/dL','%','kg','mm[Hg]','10*3/uL','U/L'])[1 + g % 8],
  date '2000-01-01' + (g % 6000)::int, (ARRAY['final','final','final','amended','preliminary'])[1 + g % 5]
FROM generate_series(1::bigint, $ROWS) g;
VACUUM (FREEZE, ANALYZE);
SQL
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/kek.hex"
cat > "$WORK/strata.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PGPORT/source"
allow_writable_role = true  # the benchmark connects as the cluster superuser
[operational]
url = "postgres://postgres@127.0.0.1:$PGPORT/target"
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
printf 'version = "bench-compact"\nas_of = "2026-11-25"\n[defaults]\narchive_after = "1y"\npatient_inactive_after = "1y"\n[tables.observations]\ntier = "archive"\n' > "$WORK/policy.toml"

cd "$WORK"
echo "migrating ..."
"$STRATA" migrate --config strata.toml > migrate.txt
FILES=$(ls archive/tables/observations/*.parquet | wc -l)
echo "  $FILES archived files, $(du -sh archive | cut -f1)"

echo "decrypting copies for DuckDB ..."
STRATA_KEK=$(cat kek.hex) "$PY" - "$WORK" "$REPO/tests/python" <<'PY'
import json, os, sys
sys.path.insert(0, sys.argv[2])
from read_archive import StrataKmsClient
import pyarrow.fs as pafs, pyarrow.parquet as pq, pyarrow.parquet.encryption as pe
work = sys.argv[1]
keks = {"bench": bytes.fromhex(os.environ["STRATA_KEK"])}
factory = pe.CryptoFactory(lambda c: StrataKmsClient(keks))
archive = os.path.join(work, "archive")
os.makedirs(os.path.join(work, "plain"), exist_ok=True)
for name in sorted(os.listdir(os.path.join(archive, "manifests", "observations"))):
    manifest = json.load(open(os.path.join(archive, "manifests", "observations", name)))
    for entry in manifest["files"]:
        path = os.path.join(archive, entry["path"])
        d = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration(), path, pafs.LocalFileSystem())
        src = pq.ParquetFile(path, decryption_properties=d)
        with pq.ParquetWriter(os.path.join(work, "plain", os.path.basename(path)), src.schema_arrow, compression="zstd") as w:
            for i in range(src.num_row_groups):
                w.write_table(src.read_row_group(i))
PY

strata_round() {
  local start end
  rm -f archive/manifests/observations/compact-*.json archive/tables/observations/compact-*
  sync; echo 3 > /proc/sys/vm/drop_caches 2> /dev/null || true
  start=$(date +%s.%N)
  /usr/bin/time -f "%M" -o strata-rss.txt "$STRATA" archive compact --config strata.toml --table observations > compact.txt
  end=$(date +%s.%N)
  echo "$ROWS / ($end - $start)" | bc -l > strata-rate.txt
}
duckdb_round() {
  rm -f duck.parquet
  sync; echo 3 > /proc/sys/vm/drop_caches 2> /dev/null || true
  /usr/bin/time -f "%M" -o duck-rss.txt "$PY" - "$ROWS" <<'PY' > duck-rate.txt
import sys, time, duckdb
start = time.time()
con = duckdb.connect()
con.execute("COPY (SELECT * FROM read_parquet('plain/*.parquet') ORDER BY _strata_patient, _strata_record_date, _strata_key) TO 'duck.parquet' (FORMAT parquet, COMPRESSION zstd)")
print(int(sys.argv[1]) / (time.time() - start))
PY
}
: > strata-rates; : > duck-rates; : > strata-rsss; : > duck-rsss
for round in $(seq 1 "$RUNS"); do
  if [ $((round % 2)) = 1 ]; then order="strata duckdb"; else order="duckdb strata"; fi
  for tool in $order; do
    "${tool}_round"
    if [ "$tool" = strata ]; then
      cat strata-rate.txt >> strata-rates; cat strata-rss.txt >> strata-rsss
    else
      cat duck-rate.txt >> duck-rates; cat duck-rss.txt >> duck-rsss
    fi
  done
  printf 'round %d: strata %.0f rows/s (peak RSS %d MiB), duckdb %.0f rows/s (peak RSS %d MiB)\n' "$round" \
    "$(tail -1 strata-rates)" $(( $(tail -1 strata-rsss) / 1024 )) "$(tail -1 duck-rates)" $(( $(tail -1 duck-rsss) / 1024 ))
done
S=$(median < strata-rates); D=$(median < duck-rates)
echo "compaction of $ROWS rows in $FILES files, medians of $RUNS:"
printf '  strata archive compact  %.0f rows/s, peak RSS %d MiB (max over rounds)\n' "$S" $(( $(sort -n strata-rsss | tail -1) / 1024 ))
printf '  duckdb COPY ORDER BY    %.0f rows/s, peak RSS %d MiB\n' "$D" $(( $(sort -n duck-rsss | tail -1) / 1024 ))
printf '  strata / duckdb: %.2fx\n' "$(echo "$S / $D" | bc -l)"
cat compact.txt
