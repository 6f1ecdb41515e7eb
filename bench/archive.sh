#!/usr/bin/env bash
# Benchmark for the encrypted archive, measured against baselines in the same run:
#  1. rows: `strata migrate` archiving a ROWS-row observations table from PostgreSQL to encrypted,
#     zstd Parquet, vs `COPY ... (FORMAT csv)` | pyarrow streaming CSV reader | ParquetWriter
#     (zstd, unencrypted);
#  2. BLOBs: `strata migrate` archiving DOCS documents (~512 KiB mean, 1 GiB in all) as
#     encrypted objects, vs two unencrypted copies of the same bytes: (a) `COPY ... (FORMAT
#     binary)` into one file (the read ceiling), (b) the same stream split into one plain file
#     per document, laid out as Strata lays out objects (the same job without hashing and
#     encryption: what the encryption costs).
# Each part is its own `strata migrate` (wall time from process start to end, so start-up
# counts against Strata). No measurement pays for another's files: outputs are kept until the
# end (on ext4 without a journal, creating a file walks past every inode deleted in the last
# minutes; with the previous output deleted just before it, a third of Strata's BLOB run went
# there), and each is written back and evicted from the page cache before the next
# measurement (kept in the cache, they slowed later writers by up to 3x). The BLOB part runs
# twice: on disk, and on tmpfs (/dev/shm), where neither side pays for a file system or a disk
# and the ratio is the software's cost alone (outputs there are deleted after each
# measurement). Prints rows/s or MB/s, the ratios, and each part's peak RSS. Not a test: run
# it by hand.
#   ROWS=5000000 DOCS=2000 RUNS=3 bench/archive.sh   (medians of RUNS rounds)
# PARENT=path/to/another/strata: each round also runs the rows and BLOB (disk) parts with that
# build, alternating with this one, and prints this build's speed against it (for a change that
# must cost nothing: build the parent commit's binary first and pass it here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${ROWS:-5000000}
DOCS=${DOCS:-2000}
cargo build --release --quiet
STRATA=$PWD/target/release/strata
PY=target/pyenv/bin/python
if ! "$PY" -c 'import pyarrow' 2>/dev/null; then
  python3 -m venv target/pyenv && target/pyenv/bin/pip install --quiet "pyarrow==26.0.1" "cryptography>=42"
fi
. scripts/lib/pg.sh
WORK=$(mktemp -d /tmp/strata-bench-archive.XXXXXX)
SHM=$(mktemp -d /dev/shm/strata-bench-archive.XXXXXX)
mkdir "$WORK/kept"
trap 'stop_pg; rm -rf "$WORK" "$SHM"' EXIT
psql() { command psql -q -X -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$PGPORT/$1" "${@:2}"; }
psql postgres -c "CREATE DATABASE source" -c "CREATE DATABASE target"

echo "creating $ROWS observations and $DOCS documents ..."
psql source <<SQL
SELECT setseed(0.42) \gset
CREATE TABLE observations (id bigint PRIMARY KEY, patient_id bigint NOT NULL, encounter_id bigint,
  code text, value_num numeric(12,4), unit text, value_text text, observed_at timestamptz, status text);
INSERT INTO observations SELECT g, 1 + (g * 7919) % 200000, g / 3, lpad((g % 2000)::text, 5, '0') || '-' || (g % 10),
  CASE WHEN g % 10 = 0 THEN NULL ELSE round((random() * 300)::numeric, 4) END,
  (ARRAY['mg/dL','mmol/L','g/dL','%','kg','mm[Hg]','10*3/uL','U/L','ng/mL','pg/mL','fL','s'])[1 + g % 12],
  CASE WHEN g % 20 = 0 THEN 'specimen hemolyzed; repeat requested' END,
  timestamptz '2005-01-01' + (g::float / $ROWS) * interval '7990 days',
  (ARRAY['final','final','final','amended','preliminary','cancelled'])[1 + g % 6]
FROM generate_series(1::bigint, $ROWS) g;
CREATE TABLE documents (id bigint PRIMARY KEY, patient_id bigint NOT NULL, created_at timestamptz, mime_type text, content bytea);
INSERT INTO documents SELECT g, 1 + g % 2000, timestamptz '2008-01-01' + g * interval '1 day', 'application/pdf',
  (SELECT string_agg(decode(md5(g::text || ':' || i), 'hex'), ''::bytea) FROM generate_series(1, (4096 + 32768 * (g % 32)) / 16) i)
FROM generate_series(1, $DOCS) g;
VACUUM (FREEZE, ANALYZE);
CHECKPOINT;
SQL
DOC_BYTES=$(psql source -At -c "SELECT sum(length(content)) FROM documents")

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
TOML
# One migrate per part, so that each has its own wall time and peak RSS.
{ cat "$WORK/strata.toml"; printf '[policy]\nfile = "rows-policy.toml"\n[tables.observations]\nprimary_key = ["id"]\npatient_key = "patient_id"\nrecord_date = "observed_at"\n'; } > "$WORK/rows.toml"
{ cat "$WORK/strata.toml"; printf '[policy]\nfile = "blobs-policy.toml"\n[tables.documents]\nprimary_key = ["id"]\npatient_key = "patient_id"\nrecord_date = "created_at"\nblobs = [{ column = "content", content_type_column = "mime_type" }]\n'; } > "$WORK/blobs.toml"
sed "s|^location = .*|location = \"$SHM/archive\"|" "$WORK/blobs.toml" > "$WORK/blobs-tmpfs.toml"
printf 'version = "bench-rows"\nas_of = "2026-11-25"\n[defaults]\narchive_after = "1y"\npatient_inactive_after = "1y"\n[tables.observations]\ntier = "archive"\n' > "$WORK/rows-policy.toml"
printf 'version = "bench-blobs"\nas_of = "2026-11-25"\n[defaults]\narchive_after = "1y"\npatient_inactive_after = "1y"\n[tables.documents]\ntier = "archive"\n' > "$WORK/blobs-policy.toml"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/kek.hex"

now() { date +%s.%N; }
# Moves a measurement's output aside (deleted with $WORK at the end), writes it back and
# evicts it from the page cache, so that the next measurement starts from the same state: no
# deleted inodes to walk past, no memory filled by earlier outputs. Outputs on tmpfs are
# deleted instead (there they are the memory; tmpfs has no inodes to remember).
keep() {
  case "$1" in
    "$SHM"/*) rm -rf "$1"; return ;;
  esac
  local to; to=$(mktemp -d "$WORK/kept/XXXXXX")
  mv "$1" "$to/"
  sync
  python3 -c '
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
' "$to"
}
# Each timer runs one measurement and prints its wall seconds.
rows_baseline() {
  local t0; t0=$(now)
  psql source -c "COPY observations TO STDOUT (FORMAT csv)" | "$PY" -c '
import sys, pyarrow as pa, pyarrow.csv as pc, pyarrow.parquet as pq
names = ["id","patient_id","encounter_id","code","value_num","unit","value_text","observed_at","status"]
reader = pc.open_csv(sys.stdin.buffer, read_options=pc.ReadOptions(column_names=names, block_size=1 << 24))
with pq.ParquetWriter(sys.argv[1], reader.schema, compression="zstd", compression_level=3) as w:
    for batch in reader:
        w.write_batch(batch)
' "$WORK/baseline.parquet"
  echo "$(now) - $t0" | bc
  keep "$WORK/baseline.parquet"
}
# The BLOB timers write into the directory $1 ($WORK: disk, $SHM: tmpfs).
blobs_one_file() {
  local t0; t0=$(now)
  psql source -c "COPY documents TO STDOUT (FORMAT binary)" > "$1/documents.copy"
  echo "$(now) - $t0" | bc
  keep "$1/documents.copy"
}
blobs_per_document() {
  local t0; t0=$(now)
  psql source -c "COPY documents (id, content) TO STDOUT (FORMAT binary)" | "$PY" -c '
import os, struct, sys
src, out = sys.stdin.buffer, sys.argv[1]
src.read(19)  # signature, flags, header extension length
made = set()
while True:
    (fields,) = struct.unpack(">h", src.read(2))
    if fields == -1:
        break
    (n,) = struct.unpack(">i", src.read(4))
    doc_id = src.read(n).hex()
    (n,) = struct.unpack(">i", src.read(4))
    content = src.read(n) if n >= 0 else b""
    d = os.path.join(out, doc_id[-2:])
    if d not in made:
        os.makedirs(d, exist_ok=True)
        made.add(d)
    with open(os.path.join(d, doc_id), "wb") as f:
        f.write(content)
' "$1/plain"
  echo "$(now) - $t0" | bc
  keep "$1/plain"
}
# `strata migrate --config $1` on a fresh archive (in the directory $2) and control database,
# with the binary $3 (default: this build); prints wall seconds (process start to end) and peak
# RSS in KiB.
strata_migrate() {
  local t0 t1
  rm -f "$WORK"/strata-control.db*
  t0=$(now)
  (cd "$WORK" && /usr/bin/time -v "${3:-$STRATA}" migrate --config "$1" > migrate.txt 2> time.txt) || { cat "$WORK/time.txt" >&2; exit 1; }
  t1=$(now)
  grep -q "archive" "$WORK/migrate.txt" || { cat "$WORK/migrate.txt" >&2; exit 1; }
  keep "$2/archive"
  echo "$(echo "$t1 - $t0" | bc) $(awk -F: '/Maximum resident/ {gsub(/ /, "", $2); print $2}' "$WORK/time.txt")"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

RUNS=${RUNS:-3}
declare -a BR BA BB SR SB RR RB TA TB TS PR PB
sync
for run in $(seq 1 "$RUNS"); do
  echo "round $run of $RUNS: baselines, then strata (rows, then BLOBs); BLOBs again on tmpfs ..."
  BR+=("$(rows_baseline)")
  BA+=("$(blobs_one_file "$WORK")")
  BB+=("$(blobs_per_document "$WORK")")
  if [ -n "${PARENT:-}" ] && [ $((run % 2)) = 1 ]; then
    read -r t _ < <(strata_migrate rows.toml "$WORK" "$PARENT"); PR+=("$t")
  fi
  read -r t rss < <(strata_migrate rows.toml "$WORK"); SR+=("$t"); RR+=("$rss")
  if [ -n "${PARENT:-}" ] && [ $((run % 2)) = 0 ]; then
    read -r t _ < <(strata_migrate rows.toml "$WORK" "$PARENT"); PR+=("$t")
  fi
  read -r t rss < <(strata_migrate blobs.toml "$WORK"); SB+=("$t"); RB+=("$rss")
  if [ -n "${PARENT:-}" ]; then
    read -r t _ < <(strata_migrate blobs.toml "$WORK" "$PARENT"); PB+=("$t")
    echo "  parent build: rows ${PR[-1]} s, BLOBs ${PB[-1]} s"
  fi
  TA+=("$(blobs_one_file "$SHM")")
  TB+=("$(blobs_per_document "$SHM")")
  read -r t rss < <(strata_migrate blobs-tmpfs.toml "$SHM"); TS+=("$t"); RB+=("$rss")
  echo "  pyarrow ${BR[-1]} s, strata rows ${SR[-1]} s | disk: COPY one file ${BA[-1]} s, per document ${BB[-1]} s, strata BLOBs ${SB[-1]} s | tmpfs: ${TA[-1]} s, ${TB[-1]} s, strata ${TS[-1]} s"
done
BASE_ROWS_S=$(median "${BR[@]}"); OBS_S=$(median "${SR[@]}")
OBS_RSS=$(printf '%s\n' "${RR[@]}" | sort -n | tail -1); DOC_RSS=$(printf '%s\n' "${RB[@]}" | sort -n | tail -1)
echo
echo "medians of $RUNS runs (peak RSS: the largest)"
printf 'rows:  strata %.0f rows/s (%.1f s) | baseline pyarrow %.0f rows/s (%.1f s) | ratio %.2f\n' \
  "$(echo "$ROWS / $OBS_S" | bc -l)" "$OBS_S" "$(echo "$ROWS / $BASE_ROWS_S" | bc -l)" "$BASE_ROWS_S" "$(echo "$BASE_ROWS_S / $OBS_S" | bc -l)"
# blobs_line LABEL STRATA_S ONE_FILE_S PER_DOCUMENT_S
blobs_line() {
  printf 'BLOBs, %s: strata %.1f MB/s (%.1f s) | (a) COPY to one file %.1f MB/s (%.1f s), ratio %.2f | (b) one plain file per document %.1f MB/s (%.1f s), ratio %.2f\n' "$1" \
    "$(echo "$DOC_BYTES / $2 / 1000000" | bc -l)" "$2" \
    "$(echo "$DOC_BYTES / $3 / 1000000" | bc -l)" "$3" "$(echo "$3 / $2" | bc -l)" \
    "$(echo "$DOC_BYTES / $4 / 1000000" | bc -l)" "$4" "$(echo "$4 / $2" | bc -l)"
}
blobs_line "disk " "$(median "${SB[@]}")" "$(median "${BA[@]}")" "$(median "${BB[@]}")"
blobs_line "tmpfs" "$(median "${TS[@]}")" "$(median "${TA[@]}")" "$(median "${TB[@]}")"
echo "($DOC_BYTES bytes of BLOBs)"
printf 'peak RSS of strata migrate: rows %d MiB, BLOBs %d MiB\n' $((OBS_RSS / 1024)) $((DOC_RSS / 1024))
if [ -n "${PARENT:-}" ]; then
  printf 'against the parent build (%s): rows %.2f (%.1f s against %.1f s), BLOBs on disk %.2f (%.1f s against %.1f s): above 1 is faster\n' "$PARENT" \
    "$(echo "$(median "${PR[@]}") / $OBS_S" | bc -l)" "$OBS_S" "$(median "${PR[@]}")" \
    "$(echo "$(median "${PB[@]}") / $(median "${SB[@]}")" | bc -l)" "$(median "${SB[@]}")" "$(median "${PB[@]}")"
fi
