#!/usr/bin/env bash
# Benchmark of the archive API under many users, against a ceiling measured in the same run:
#  - the demo's synthetic EHR (SCALE, default 1: 2,000 patients, ~50 archived records each),
#    migrated with a PostgreSQL control database (runs, ledger and the audit log there);
#  - `strata serve` over HTTPS; `examples/api_load.rs` runs USERS clients (default 100), each
#    with a token and a connection of its own, asking for the histories of random patients
#    for DURATION seconds (default 20); requests/s, p50 and p99, and the server's RSS at start,
#    peak and end;
#  - Strata as configured (its history cache on: after the first round of patients, a
#    patient's history is read from memory), and Strata with the cache off
#    (`history_cache_mib = 0`: every request reads and decrypts the archive);
#  - the ceiling: `strata serve --benchmark-ceiling BYTES`, the same TLS, HTTP, token check,
#    rate limit and audit append, answering a precomputed body of the histories' mean size
#    without reading the archive;
#  - the three alternate ROUNDS times (default 3; the machine is noisy), medians printed; then
#    one run at MANY users (default 500) for the peak RSS.
# Not a test: run it by hand.   SCALE=1 USERS=100 DURATION=20 ROUNDS=3 bench/api-users.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-1}
USERS=${USERS:-100}
MANY=${MANY:-500}
SECONDS_EACH=${DURATION:-20}
ROUNDS=${ROUNDS:-3}
cargo build --release --quiet
cargo build --release --quiet --example api_load
STRATA=$PWD/target/release/strata
LOAD=$PWD/target/release/examples/api_load
. scripts/lib/pg.sh
WORK=$(mktemp -d /tmp/strata-bench-users.XXXXXX)
SERVER=
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null; stop_pg; rm -rf "$WORK"' EXIT
psql() { command psql -q -X -v ON_ERROR_STOP=1 "postgres://postgres@127.0.0.1:$PGPORT/$1" "${@:2}"; }
psql postgres -c "CREATE DATABASE control"

echo "generating (scale $SCALE) and migrating, with the control database in PostgreSQL ..."
"$STRATA" demo --dir "$WORK/demo" --scale "$SCALE" --no-serve > "$WORK/demo.txt"
cd "$WORK/demo"
rm -rf archive operational.db strata-control.db*
PORT=$(free_port)
python3 - "$PGPORT" "$PORT" "$MANY" <<'PY'
import re, sys
pg, port, many = sys.argv[1:]
s = open("strata.toml").read()
s = s.replace('url = "sqlite://strata-control.db"', f'url = "postgres://postgres@127.0.0.1:{pg}/control"')
s = re.sub(r'listen = "[^"]*"', f'listen = "127.0.0.1:{port}"', s, count=1)
# Limits out of the way: this measures the server, not the rate limiter.
limits = f"[api.limits]\nrequests_per_minute = 100000000\nburst = 10000000\nconnections_per_client = {int(many) * 2}\n\n"
s = s.replace("[api.audit]\n", limits + "[api.audit]\n", 1)
open("strata.toml", "w").write(s)
PY
sed 's/^\[api.limits\]$/[api.limits]\nhistory_cache_mib = 0/' strata.toml > uncached.toml
"$STRATA" migrate --config strata.toml > migrate.txt 2>&1

# Clients: random patients, a token each naming its patients as in its care.
python3 - "$MANY" > patients.txt <<'PY'
import random, sys
many = int(sys.argv[1])
rng = random.Random(7)
for c in range(many):
    print(" ".join(str(rng.randint(1, 2000)) for _ in range(20)))
PY
while read -r line; do
  args=(); for p in $line; do args+=(--patient "$p"); done
  "$STRATA" token --config strata.toml --user "bench-$RANDOM$RANDOM" --role clinician --ttl-secs 7200 "${args[@]}" 2>/dev/null
done < patients.txt > tokens.txt

BASE="https://127.0.0.1:$PORT"
start_server() {  # config file, then extra arguments for `strata serve`
  "$STRATA" serve --config "$@" 2> serve.log &
  SERVER=$!
  for _ in $(seq 100); do grep -q "listening on" serve.log && break; sleep 0.1; done
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=; }
kib() { awk -v f="$1:" '$1 == f { print $2 }' "/proc/$SERVER/status"; }
# One run of $1 clients: the load generator's JSON line plus the server's RSS (KiB).
run() {
  local start out
  start=$(kib VmRSS)
  out=$("$LOAD" --base "$BASE" --cacert tls/cert.pem --tokens tokens.txt --patients patients.txt --clients "$1" --seconds "$SECONDS_EACH")
  echo "${out%\}}, \"rss_start_kib\": $start, \"rss_peak_kib\": $(kib VmHWM), \"rss_end_kib\": $(kib VmRSS)}"
}

# The mean size of a history: the ceiling answers bodies of that size.
start_server strata.toml
BYTES=$(python3 - "$BASE" <<'PY'
import ssl, sys, urllib.request
base = sys.argv[1]
ctx = ssl.create_default_context(cafile="tls/cert.pem")
tokens = open("tokens.txt").read().split()
patients = [l.split() for l in open("patients.txt")]
sizes = []
for t, ps in list(zip(tokens, patients))[:20]:
    req = urllib.request.Request(f"{base}/v1/patients/{ps[0]}/history",
                                 headers={"Authorization": f"Bearer {t}", "X-Purpose-Of-Use": "TREAT"})
    body = urllib.request.urlopen(req, context=ctx).read()
    sizes.append(len(body))
print(sum(sizes) // len(sizes))
PY
)
echo "histories: $BYTES bytes on average; warming up ..."
"$LOAD" --base "$BASE" --cacert tls/cert.pem --tokens tokens.txt --patients patients.txt --clients "$USERS" --requests 2000 > /dev/null
stop_server

: > strata.jsonl; : > uncached.jsonl; : > ceiling.jsonl
for r in $(seq "$ROUNDS"); do
  start_server strata.toml; run "$USERS" >> strata.jsonl; stop_server
  start_server uncached.toml; run "$USERS" >> uncached.jsonl; stop_server
  start_server strata.toml --benchmark-ceiling "$BYTES"; run "$USERS" >> ceiling.jsonl; stop_server
  echo "  round $r of $ROUNDS done"
done
start_server uncached.toml; run "$MANY" > many.jsonl; stop_server

python3 - "$USERS" "$MANY" "$BYTES" <<'PY'
import json, statistics, sys
users, many, size = sys.argv[1:]
def load(f): return [json.loads(l) for l in open(f)]
def med(rows, k): return statistics.median(r[k] for r in rows)
s, u, c, m = load("strata.jsonl"), load("uncached.jsonl"), load("ceiling.jsonl"), load("many.jsonl")
print(f"\n{users} users, histories of {size} bytes, control database in PostgreSQL (medians of {len(s)} runs):")
print(f"{'':10s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'RSS start':>10s} {'peak':>6s} {'end':>6s} (MiB)")
for name, rows in (("strata", s), ("uncached", u), ("ceiling", c)):
    print(f"{name:10s} {med(rows,'per_second'):8.0f} {med(rows,'p50_ms'):8.1f} {med(rows,'p99_ms'):8.1f} "
          f"{sum(r['errors'] for r in rows):7d} {med(rows,'rss_start_kib')/1024:10.0f} {med(rows,'rss_peak_kib')/1024:6.0f} {med(rows,'rss_end_kib')/1024:6.0f}")
print(f"strata / ceiling: {med(s,'per_second') / med(c,'per_second'):.2f}x requests/s; uncached / ceiling: {med(u,'per_second') / med(c,'per_second'):.2f}x")
r = m[0]
print(f"\n{many} users, cache off: {r['per_second']:.0f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
      f"{r['errors']} errors; RSS start {r['rss_start_kib']/1024:.0f}, peak {r['rss_peak_kib']/1024:.0f}, end {r['rss_end_kib']/1024:.0f} MiB")
PY
