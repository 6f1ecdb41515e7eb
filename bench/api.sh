#!/usr/bin/env bash
# Benchmark of the archive API's patient lookups, against DuckDB in the same run:
#  - an archive of ROWS rows (default 20M) over PATIENTS patients (default 100k) in three tables
#    (encounters 10 %, observations 75 %, diagnoses 15 %), migrated from PostgreSQL by
#    `strata migrate` and compacted by `strata archive compact` (sorted, disjoint patient
#    ranges), on local disk;
#  - `strata serve` over HTTPS; `examples/api_load.rs` asks for the history of random patients:
#    REQUESTS requests (default 1000) with 1 client, then with 32 clients; p50 and p99 of each;
#  - DuckDB (PyPI) answers the same question (every table's rows of the patient) over
#    unencrypted copies of the same Parquet files (decrypted by pyarrow through its KMS
#    client), for the same patients, with 1 and with 32 threads.
# Prints the figures and the ratios. Not a test: run it by hand. (Many users against a
# PostgreSQL control database, with a same-run ceiling: bench/api-users.sh.)
#   ROWS=20000000 PATIENTS=100000 REQUESTS=1000 bench/api.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROWS=${ROWS:-20000000}
PATIENTS=${PATIENTS:-100000}
REQUESTS=${REQUESTS:-1000}
cargo build --release --quiet
cargo build --release --quiet --example api_load
STRATA=$PWD/target/release/strata
LOAD=$PWD/target/release/examples/api_load
PY=$PWD/target/pyenv/bin/python
if ! "$PY" -c 'import pyarrow, cryptography, duckdb' 2>/dev/null; then
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install --quiet "pyarrow==26.0.1" "cryptography>=42" "duckdb==1.1.3"
fi
. scripts/lib/pg.sh
WORK=$(mktemp -d /tmp/strata-bench-api.XXXXXX)
SERVER=
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null; stop_pg; rm -rf "$WORK"' EXIT
psql() { command psql -q -X -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$PGPORT/$1" "${@:2}"; }
psql postgres -c "CREATE DATABASE source" -c "CREATE DATABASE target"
ENC=$((ROWS / 10)); OBS=$((ROWS * 3 / 4)); DX=$((ROWS - ENC - OBS))

echo "creating $ROWS rows over $PATIENTS patients ..."
t0=$(date +%s)
psql source <<SQL
SELECT setseed(0.42) \gset
CREATE TABLE encounters (id bigint PRIMARY KEY, patient_id bigint NOT NULL, started_at timestamptz,
  encounter_class text, reason_icd10 text, provider_npi text);
INSERT INTO encounters SELECT g, 1 + (g * 7919) % $PATIENTS,
  timestamptz '2000-01-01' + (g::float / $ENC) * interval '8000 days',
  (ARRAY['AMB','EMER','IMP','HH','VR'])[1 + g % 5], 'E11.' || (g % 10), lpad((g % 99991)::text, 10, '1')
FROM generate_series(1::bigint, $ENC) g;
CREATE TABLE observations (id bigint PRIMARY KEY, patient_id bigint NOT NULL, encounter_id bigint,
  code text, value_num numeric(12,4), unit text, observed_at timestamptz, status text);
INSERT INTO observations SELECT g, 1 + (g * 7919) % $PATIENTS, g / 8, lpad((g % 2000)::text, 5, '0') || '-' || (g % 10),
  round((random() * 300)::numeric, 4),
  (ARRAY['mg/dL','mmol/L','g/dL','%','kg','mm[Hg]','10*3/uL','U/L'])[1 + g % 8],
  timestamptz '2000-01-01' + (g::float / $OBS) * interval '8000 days',
  (ARRAY['final','final','final','amended','preliminary'])[1 + g % 5]
FROM generate_series(1::bigint, $OBS) g;
CREATE TABLE diagnoses (id bigint PRIMARY KEY, patient_id bigint NOT NULL, icd10_code text,
  description text, status text, recorded_at date);
INSERT INTO diagnoses SELECT g, 1 + (g * 7919) % $PATIENTS, 'I' || (10 + g % 80) || '.' || (g % 9),
  'diagnosis text ' || (g % 500), (ARRAY['active','resolved','inactive'])[1 + g % 3],
  date '2000-01-01' + (g * 8000 / $DX)::int
FROM generate_series(1::bigint, $DX) g;
VACUUM (FREEZE, ANALYZE);
SQL
echo "  $(( $(date +%s) - t0 )) s"

# Config: every table archived; the API over HTTPS with a self-signed certificate; HS256
# development tokens (a token per client, naming the patients it asks for as in its care).
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/kek.hex"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/jwt-secret"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/audit.key"
"$PY" - "$WORK" <<'PY'
import datetime, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import ipaddress
work = sys.argv[1]
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
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
[archive]
location = "archive"
kek_id = "bench"
kek_file = "kek.hex"
[policy]
file = "policy.toml"
[tables.encounters]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "started_at"
[tables.observations]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "observed_at"
[tables.diagnoses]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "recorded_at"
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
[api.limits]
requests_per_minute = 1000000
burst = 100000
TOML
printf 'version = "bench-api"\nas_of = "2026-11-25"\n[defaults]\narchive_after = "1y"\npatient_inactive_after = "1y"\n[tables.encounters]\ntier = "archive"\n[tables.observations]\ntier = "archive"\n[tables.diagnoses]\ntier = "archive"\n' > "$WORK/policy.toml"

cd "$WORK"
echo "migrating and compacting ..."
t0=$(date +%s)
"$STRATA" migrate --config strata.toml > migrate.txt
t1=$(date +%s)
/usr/bin/time -f "  compaction peak RSS %M KB" "$STRATA" archive compact --config strata.toml
"$STRATA" archive gc --config strata.toml --grace-hours 0 > /dev/null
echo "  migrate $(( t1 - t0 )) s, compact $(( $(date +%s) - t1 )) s; $(du -sh archive | cut -f1) archived"

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
for table in sorted(os.listdir(os.path.join(archive, "manifests"))):
    os.makedirs(os.path.join(work, "plain", table), exist_ok=True)
    for name in sorted(os.listdir(os.path.join(archive, "manifests", table))):
        manifest = json.load(open(os.path.join(archive, "manifests", table, name)))
        for entry in manifest["files"]:
            path = os.path.join(archive, entry["path"])
            d = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration(), path, pafs.LocalFileSystem())
            src = pq.ParquetFile(path, decryption_properties=d)
            rg_rows = src.metadata.row_group(0).num_rows
            with pq.ParquetWriter(os.path.join(work, "plain", table, os.path.basename(path)), src.schema_arrow,
                                  compression="zstd", write_page_index=True) as w:
                for i in range(src.num_row_groups):
                    w.write_table(src.read_row_group(i), row_group_size=rg_rows)
PY

"$PY" - "$PATIENTS" "$REQUESTS" <<'PY'
import random, sys
patients, requests = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(7)
sample = [str(rng.randint(1, patients)) for _ in range(requests)]
open("patients-1.txt", "w").write(" ".join(sample) + "\n")
# 32 clients: the same patients, dealt round-robin.
open("patients-32.txt", "w").write("\n".join(" ".join(sample[c::32]) for c in range(32)) + "\n")
PY
tokens() {  # tokens for the clients of patients file $1
  while read -r line; do
    args=(); for p in $line; do args+=(--patient "$p"); done
    "$STRATA" token --config strata.toml --user "bench-$RANDOM" --role clinician --ttl-secs 7200 "${args[@]}"
  done < "$1"
}
tokens patients-1.txt > tokens-1.txt
tokens patients-32.txt > tokens-32.txt

if [ -n "${PREPARE_ONLY:-}" ]; then  # leave the archive, tokens and PostgreSQL for profiling
  trap - EXIT
  echo "prepared in $WORK (PostgreSQL on port $PGPORT, data in $PGROOT); stop it with pg_ctl"
  exit 0
fi
"$STRATA" serve --config strata.toml 2> serve.log &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" serve.log && break; sleep 0.1; done
BASE="https://127.0.0.1:$PORT"
echo "warming up (every file opened once) ..."
"$LOAD" --base "$BASE" --cacert cert.pem --tokens tokens-32.txt --patients patients-32.txt --clients 32 --requests "$REQUESTS" > /dev/null
S1=$("$LOAD" --base "$BASE" --cacert cert.pem --tokens tokens-1.txt --patients patients-1.txt --clients 1 --requests "$REQUESTS")
S32=$("$LOAD" --base "$BASE" --cacert cert.pem --tokens tokens-32.txt --patients patients-32.txt --clients 32 --requests "$REQUESTS")
kill $SERVER; SERVER=

DUCK=$("$PY" - <<'PY'
import json, os, threading, time, duckdb
tables = sorted(os.listdir("plain"))
sample = open("patients-1.txt").read().split()
con = duckdb.connect()
def history(cur, p):
    rows = 0
    for t in tables:
        rows += cur.execute(f"SELECT * FROM read_parquet('plain/{t}/*.parquet') WHERE _strata_patient = ?", [p]).fetch_arrow_table().num_rows
    return rows
for p in sample[:50]:
    history(con, p)  # warm-up: files in the page cache, as for Strata
def run(clients):
    latencies, lock = [], threading.Lock()
    def worker(c):
        cur = con.cursor()
        for p in sample[c::clients]:
            t0 = time.perf_counter(); history(cur, p); dt = time.perf_counter() - t0
            with lock: latencies.append(dt * 1000)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    [t.start() for t in threads]; [t.join() for t in threads]
    elapsed = time.perf_counter() - t0
    latencies.sort()
    pct = lambda q: latencies[max(0, int(len(latencies) * q + 0.999999) - 1)]
    return {"clients": clients, "ok": len(latencies), "per_second": len(latencies) / elapsed,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99)}
print(json.dumps([run(1), run(32)]))
PY
)
echo
echo "archive: $ROWS rows, $PATIENTS patients, $(ls archive/tables/*/*.parquet | wc -l) files; $REQUESTS requests per run"
"$PY" - "$S1" "$S32" "$DUCK" <<'PY'
import json, sys
s1, s32, (d1, d32) = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
for s, d in ((s1, d1), (s32, d32)):
    print(f"{s['clients']:>2} client(s): strata p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, {s['per_second']:.0f}/s, errors {s['errors']}"
          f" | duckdb p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, {d['per_second']:.0f}/s"
          f" | duckdb/strata p50 {d['p50_ms'] / s['p50_ms']:.1f}x, p99 {d['p99_ms'] / s['p99_ms']:.1f}x")
PY
