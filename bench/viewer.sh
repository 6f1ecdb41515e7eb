#!/usr/bin/env bash
# Benchmark of the archive viewer's chart page against the JSON history of the same patient,
# both measured in the same run on the same server:
#  - the demo's synthetic EHR (SCALE, default 0.2), with RECORDS (default 1,000) lab results
#    planted in the last encounter (2019-2022) of a patient whose chart is archived, then
#    migrated;
#  - `strata serve` over HTTPS; one client (Python, keep-alive) asks for
#    `GET /v1/patients/P/history?limit=1000` (bearer token) and `GET /ui/patients/P` (a session
#    signed in with the development sign-in), alternately, REQUESTS times each (default 300)
#    after a warm-up, the history cache on for both (as served);
#  - prints the records on the page, the median and p90 of each, and the chart's median over
#    the history's: the goal is at most 2x.
# The times are request latencies on loopback: the server's time plus one TLS round trip over
# a kept-alive connection, the same for both.
# Not a test: run it by hand.   SCALE=0.2 RECORDS=1000 REQUESTS=300 bench/viewer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-0.2}
RECORDS=${RECORDS:-1000}
REQUESTS=${REQUESTS:-300}
cargo build --release --quiet
STRATA=$PWD/target/release/strata
WORK=$(mktemp -d /tmp/strata-bench-viewer.XXXXXX)
SERVER=
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "generating (scale $SCALE), planting $RECORDS lab results in one archived patient, migrating ..."
"$STRATA" demo --dir "$WORK/demo" --scale "$SCALE" --no-serve > "$WORK/demo.txt"
cd "$WORK/demo"
rm -rf archive operational.db strata-control.db*
PATIENT=$(python3 - "$RECORDS" <<'PY'
import sqlite3, sys
n = int(sys.argv[1])
db = sqlite3.connect("legacy.db")
# A patient last seen years ago but within retention (their chart is archived, not destroyed),
# and their last encounter.
enc, patient, started = db.execute("""
    SELECT e.id, e.patient_id, e.started_at FROM encounters e
    WHERE e.started_at = (SELECT MAX(started_at) FROM encounters WHERE patient_id = e.patient_id)
      AND e.started_at BETWEEN '2019-01-01' AND '2022-12-31'
    ORDER BY e.id LIMIT 1""").fetchone()
first = db.execute("SELECT MAX(id) FROM lab_results").fetchone()[0] + 1
db.executemany(
    "INSERT INTO lab_results (id, encounter_id, loinc_code, test_name, value_num, unit, observed_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, 'final')",
    [(first + i, enc, ["2345-7", "718-7", "2160-0"][i % 3], ["Glucose", "Hemoglobin", "Creatinine"][i % 3],
      80 + (i * 7) % 40, ["mg/dL", "g/dL", "mg/dL"][i % 3], started) for i in range(n)])
db.commit()
print(patient)
PY
)
PORT=$(free_port)
sed -i "s/^listen = \"127.0.0.1:8443\"/listen = \"127.0.0.1:$PORT\"/" strata.toml
python3 - <<'PY'
s = open("strata.toml").read()
# Limits out of the way: this measures pages, not the rate limiter.
s = s.replace("[api.audit]\n", "[api.limits]\nrequests_per_minute = 100000000\nburst = 10000000\n\n[api.audit]\n", 1)
open("strata.toml", "w").write(s)
PY
"$STRATA" migrate --config strata.toml > migrate.txt 2>&1
TOKEN=$("$STRATA" token --config strata.toml --user bench --role clinician --patient "$PATIENT" --ttl-secs 7200 2>/dev/null)
"$STRATA" serve --config strata.toml 2> serve.log &
SERVER=$!
for _ in $(seq 100); do grep -q "listening on" serve.log && break; sleep 0.1; done

python3 - "$PORT" "$PATIENT" "$TOKEN" "$REQUESTS" <<'PY'
import http.client, json, re, ssl, statistics, sys, time, urllib.parse
port, patient, token, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.create_default_context(cafile="tls/cert.pem")
ctx.check_hostname = False
def conn():
    return http.client.HTTPSConnection("127.0.0.1", int(port), context=ctx)
origin = f"https://127.0.0.1:{port}"
# A browser's session: development sign-in, purpose of use.
c, cookies = conn(), {}
def call(method, path, body=None, headers=None):
    h = dict(headers or {})
    if cookies:
        h["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    if body is not None:
        h["Content-Type"] = "application/x-www-form-urlencoded"
        h["Origin"] = origin
        body = urllib.parse.urlencode(body)
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    for k, v in r.getheaders():
        if k.lower() == "set-cookie":
            name, value = v.split(";")[0].split("=", 1)
            if "Max-Age=0" in v:
                cookies.pop(name, None)
            else:
                cookies[name] = value
    return r.status, data
_, page = call("GET", "/ui/sign-in")
csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
status, _ = call("POST", "/ui/dev-sign-in", {"csrf": csrf, "user": "bench", "role": "clinician", "patients": patient, "next": "/ui/"})
assert status == 303, status
_, page = call("GET", "/ui/purpose")
csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
status, _ = call("POST", "/ui/purpose", {"csrf": csrf, "purpose": "TREAT", "next": "/ui/"})
assert status == 303, status
chart = f"/ui/patients/{urllib.parse.quote(patient)}"
history = f"/v1/patients/{urllib.parse.quote(patient)}/history?limit=1000"
api = conn()
def json_history():
    api.request("GET", history, headers={"Authorization": f"Bearer {token}", "X-Purpose-Of-Use": "TREAT"})
    r = api.getresponse(); body = r.read(); assert r.status == 200, r.status
    return body
def chart_page():
    status, body = call("GET", chart); assert status == 200, status
    return body
body = json_history()
records = json.loads(body)["total"]
page = chart_page()
shown = re.search(rb"(\d+) of (\d+) archived records shown", page)
for _ in range(20):
    json_history(); chart_page()
times = {"json": [], "chart": []}
for _ in range(n):
    for name, f in (("json", json_history), ("chart", chart_page)):
        t = time.perf_counter(); f(); times[name].append(time.perf_counter() - t)
def p(xs, q): xs = sorted(xs); return xs[min(len(xs) - 1, int(q * len(xs)))]
print(f"patient {patient}: {records} archived records; the chart shows {shown.group(1).decode()} of {shown.group(2).decode()}")
print(f"JSON history (limit 1000): {len(body)} bytes; chart page: {len(page)} bytes")
for name in ("json", "chart"):
    xs = times[name]
    print(f"  {name:5}  median {statistics.median(xs)*1000:7.2f} ms   p90 {p(xs, 0.9)*1000:7.2f} ms   ({len(xs)} requests)")
print(f"chart / JSON history (medians): {statistics.median(times['chart']) / statistics.median(times['json']):.2f}x  (goal: at most 2x)")
PY
