#!/usr/bin/env bash
# Benchmark of researchers' exports, against DuckDB in the same run:
#  - an archive of ROWS lab results (default 5M) over PATIENTS patients (default 100k), migrated
#    from PostgreSQL by `strata migrate` and compacted, on local disk;
#  - `strata serve` (HTTPS) runs a `safe_harbor` export of the table (a) as Parquet
#    (`POST /v1/exports`) and (b) as FHIR NDJSON (`GET /fhir/$export?_type=Observation`): the
#    time is the job's, from the control database (created_at to finished_at); the server is
#    started afresh for each export and its peak RSS (VmHWM) read when the export is done;
#  - DuckDB (PyPI) `COPY (SELECT ...) TO` the same rows, from unencrypted copies of the same
#    Parquet files (decrypted by pyarrow through its KMS client), (a) to zstd Parquet and (b)
#    to JSON lines; the SELECT does comparable work: md5 of the keys, the years of the dates.
# RUNS rounds (default 3), the two sides alternating which goes first; medians and ratios.
# Not a test: run it by hand.   ROWS=5000000 RUNS=3 bench/export.sh   (KEEP=1 keeps the work
# directory, with the server's log)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROWS=${ROWS:-5000000}
PATIENTS=${PATIENTS:-100000}
RUNS=${RUNS:-3}
cargo build --release --quiet
STRATA=$PWD/target/release/strata
PY=$PWD/target/pyenv/bin/python
if ! "$PY" -c 'import pyarrow, cryptography, duckdb' 2>/dev/null; then
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install --quiet "pyarrow==26.0.1" "cryptography>=42" "duckdb==1.1.3"
fi
. scripts/lib/pg.sh
WORK=$(mktemp -d /tmp/strata-bench-export.XXXXXX)
SERVER=
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null; stop_pg; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
psql() { command psql -q -X -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$PGPORT/$1" "${@:2}"; }
psql postgres -c "CREATE DATABASE source" -c "CREATE DATABASE target"

echo "creating $ROWS lab results over $PATIENTS patients ..."
psql source <<SQL
SELECT setseed(0.42) \gset
CREATE TABLE lab_results (id bigint PRIMARY KEY, patient_id bigint NOT NULL, encounter_id bigint,
  loinc_code text, value_num double precision, unit text, observed_at timestamptz, status text);
INSERT INTO lab_results SELECT g, 1 + (g * 7919) % $PATIENTS, g / 8,
  lpad((g % 2000)::text, 5, '0') || '-' || (g % 10), round((random() * 300)::numeric, 2)::float8,
  (ARRAY['mg/dL','mmol/L','g/dL','%','kg','mm[Hg]','10*3/uL','U/L'])[1 + g % 8],
  timestamptz '2000-01-01' + (g::float / $ROWS) * interval '8000 days',
  (ARRAY['final','final','final','amended','preliminary'])[1 + g % 5]
FROM generate_series(1::bigint, $ROWS) g;
VACUUM (FREEZE, ANALYZE);
SQL

for f in kek.hex jwt-secret audit.key pseudonym.key; do
  python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/$f"
done
"$PY" - "$WORK" <<'PY'
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
work = sys.argv[1]
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256()))
open(f"{work}/cert.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(f"{work}/key.pem", "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
PY
PORT=$(free_port)
cat > "$WORK/strata.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PGPORT/source"
allow_writable_role = true  # the benchmark connects as the cluster superuser
[operational]
url = "postgres://postgres@127.0.0.1:$PGPORT/target"
[control]
url = "sqlite://control.db"
[archive]
location = "archive"
kek_id = "bench"
kek_file = "kek.hex"
[policy]
file = "policy.toml"
[tables.lab_results]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "observed_at"
columns.encounter_id = { class = "record_key" }
columns.loinc_code.class = "code"
columns.value_num.class = "value"
columns.unit.class = "unit"
columns.status.class = "category"
[api]
listen = "127.0.0.1:$PORT"
tls_cert_file = "cert.pem"
tls_key_file = "key.pem"
[api.auth]
issuer = "bench"
audience = "strata"
hs256_secret_file = "jwt-secret"
[api.audit]
key_file = "audit.key"
[api.exports]
location = "exports"
pseudonym_key_file = "pseudonym.key"
[api.fhir.lab_results]
resource = "Observation"
code = "loinc_code"
system = "http://loinc.org"
value = "value_num"
unit = "unit"
status = "status"
TOML
printf 'version = "bench-export"\nas_of = "2026-11-25"\n[defaults]\narchive_after = "1y"\npatient_inactive_after = "1y"\n[tables.lab_results]\ntier = "archive"\n' > "$WORK/policy.toml"

cd "$WORK"
echo "migrating and compacting ..."
"$STRATA" migrate --config strata.toml > migrate.txt
"$STRATA" archive compact --config strata.toml > /dev/null
"$STRATA" archive gc --config strata.toml --grace-hours 0 > /dev/null
echo "  $(du -sh archive | cut -f1) archived in $(ls archive/tables/lab_results/*.parquet | wc -l) files"

echo "decrypting copies for DuckDB ..."
STRATA_KEK=$(cat kek.hex) "$PY" - "$WORK" "$REPO/tests/python" <<'PY'
import json, os, sys
sys.path.insert(0, sys.argv[2])
from read_archive import StrataKmsClient
import pyarrow.fs as pafs, pyarrow.parquet as pq, pyarrow.parquet.encryption as pe
work = sys.argv[1]
factory = pe.CryptoFactory(lambda c: StrataKmsClient({"bench": bytes.fromhex(os.environ["STRATA_KEK"])}))
archive = os.path.join(work, "archive")
os.makedirs(os.path.join(work, "plain"), exist_ok=True)
for name in sorted(os.listdir(os.path.join(archive, "manifests", "lab_results"))):
    for entry in json.load(open(os.path.join(archive, "manifests", "lab_results", name)))["files"]:
        path = os.path.join(archive, entry["path"])
        d = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration(), path, pafs.LocalFileSystem())
        src = pq.ParquetFile(path, decryption_properties=d)
        with pq.ParquetWriter(os.path.join(work, "plain", os.path.basename(path)), src.schema_arrow, compression="zstd") as w:
            for i in range(src.num_row_groups):
                w.write_table(src.read_row_group(i))
PY

RESEARCHER=$("$STRATA" token --config strata.toml --user bench-researcher --role researcher --ttl-secs 14400)
BASE="https://127.0.0.1:$PORT"
CURL=(curl -s --cacert cert.pem -H "Authorization: Bearer $RESEARCHER")

# One Strata export ($1: parquet or fhir) on a fresh server: prints "seconds peak_rss_kib rows".
strata_export() {
  log=serve-$1-$(date +%s%N).log
  STRATA_LOG=${STRATA_LOG:-warn} "$STRATA" serve --config strata.toml 2> "$log" &
  SERVER=$!
  for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
  if [ "$1" = parquet ]; then
    id=$("${CURL[@]}" -H 'Content-Type: application/json' \
      -d '{"profile": "safe_harbor", "tables": ["lab_results"]}' "$BASE/v1/exports" |
      "$PY" -c 'import json, sys; print(json.load(sys.stdin)["export_id"])')
  else
    id=$("${CURL[@]}" -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
      "$BASE/fhir/\$export?_type=Observation" | tr -d '\r' | awk -F/ 'tolower($0) ~ /^content-location:/ {print $NF}')
  fi
  while [ "$("$PY" - "$id" <<'PY'
import sqlite3, sys
print(sqlite3.connect("control.db").execute("SELECT status FROM strata_exports WHERE export_id = ?", (sys.argv[1],)).fetchone()[0])
PY
)" = running ]; do sleep 0.2; done
  rss=$(awk '/VmHWM/ {print $2}' /proc/$SERVER/status)
  kill $SERVER; wait $SERVER 2>/dev/null || true; SERVER=
  "$PY" - "$id" "$rss" <<'PY'
import datetime, json, sqlite3, sys
status, created, finished, manifest, error = sqlite3.connect("control.db").execute(
    "SELECT status, created_at, finished_at, manifest, error FROM strata_exports WHERE export_id = ?", (sys.argv[1],)).fetchone()
assert status == "done", error
t = lambda s: datetime.datetime.fromisoformat(s)
files = json.loads(manifest)["files"]
rows = sum(f.get("rows", f.get("count", 0)) for f in files)
print(f"{(t(finished) - t(created)).total_seconds():.3f} {sys.argv[2]} {rows}")
PY
  rm -rf exports/export-*
}

# One DuckDB export ($1: parquet or json): prints "seconds peak_rss_kib rows".
duck_export() {
  /usr/bin/time -f "%M" -o duck.rss "$PY" - "$1" <<'PY'
import sys, time, duckdb
con = duckdb.connect()
select = """SELECT md5('patient:' || _strata_patient) AS patient_pseudonym, year(_strata_record_date) AS record_year,
  md5('lab_results:' || id) AS id, md5('patient:' || patient_id) AS patient_id,
  md5('record_key:' || encounter_id) AS encounter_id, loinc_code, value_num, unit,
  year(observed_at) AS observed_at_year, status FROM read_parquet('plain/*.parquet')"""
out, options = ("out.parquet", "FORMAT parquet, COMPRESSION zstd") if sys.argv[1] == "parquet" else ("out.ndjson", "FORMAT json")
t0 = time.perf_counter()
con.execute(f"COPY ({select}) TO '{out}' ({options})")
dt = time.perf_counter() - t0
rows = con.execute("SELECT COUNT(*) FROM read_parquet('plain/*.parquet')").fetchone()[0]
print(f"{dt:.3f}", rows)
PY
}

declare -A T
for round in $(seq "$RUNS"); do
  for kind in parquet fhir; do
    duck_kind=$([ "$kind" = parquet ] && echo parquet || echo json)
    order=(strata duck); [ $((round % 2)) = 0 ] && order=(duck strata)
    for side in "${order[@]}"; do
      if [ "$side" = strata ]; then
        line=$(strata_export "$kind")
      else
        out=$(duck_export "$duck_kind"); line="$(echo "$out" | awk '{print $1}') $(cat duck.rss) $(echo "$out" | awk '{print $2}')"
        rm -f out.parquet out.ndjson
      fi
      echo "  round $round $kind $side: $line (seconds, peak RSS KiB, rows)"
      T[$kind-$side]="${T[$kind-$side]:-} $line"
    done
  done
done

echo
echo "$ROWS archived rows, safe_harbor profile; medians of $RUNS rounds"
"$PY" - "${T[parquet-strata]}" "${T[parquet-duck]}" "${T[fhir-strata]}" "${T[fhir-duck]}" <<'PY'
import statistics, sys
def parse(s):
    v = s.split()
    runs = [v[i:i + 3] for i in range(0, len(v), 3)]
    return statistics.median(float(r[0]) for r in runs), max(int(r[1]) for r in runs), int(runs[0][2])
for name, (s, d) in (("Parquet", (sys.argv[1], sys.argv[2])), ("FHIR NDJSON vs JSON lines", (sys.argv[3], sys.argv[4]))):
    (ss, srss, srows), (ds, drss, drows) = parse(s), parse(d)
    print(f"{name}: strata {srows / ss:,.0f} rows/s ({ss:.2f} s, peak RSS {srss / 1024:.0f} MiB) | "
          f"duckdb {drows / ds:,.0f} rows/s ({ds:.2f} s, peak RSS {drss / 1024:.0f} MiB) | ratio {(srows / ss) / (drows / ds):.2f}")
PY
