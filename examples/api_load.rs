//! Load generator for the archive API (used by `bench/api.sh` and the load test): N concurrent
//! clients, each with its own token and keep-alive connection, ask for patients' histories
//! over HTTPS for a number of requests or seconds; prints one JSON line with the count, errors
//! (anything but 200, and transport failures), throughput and latency percentiles.
//!
//!   api_load --base https://127.0.0.1:8443 --cacert cert.pem --tokens tokens.txt \
//!            --patients patients.txt --clients 32 (--requests 1000 | --seconds 60)
//!
//! `tokens.txt`: one bearer token per client (line i for client i); `patients.txt`: one line
//! per client, the patient keys it asks for (space-separated, asked in turn).

use std::time::{Duration, Instant};

struct Args {
    base: String,
    cacert: String,
    tokens: Vec<String>,
    patients: Vec<Vec<String>>,
    clients: usize,
    requests: Option<usize>,
    seconds: Option<u64>,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut base, mut cacert, mut tokens, mut patients) = (None, None, None, None);
    let (mut clients, mut requests, mut seconds) = (1, None, None);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--base" => base = Some(value),
            "--cacert" => cacert = Some(value),
            "--tokens" => tokens = Some(value),
            "--patients" => patients = Some(value),
            "--clients" => clients = value.parse().expect("--clients N"),
            "--requests" => requests = Some(value.parse().expect("--requests N")),
            "--seconds" => seconds = Some(value.parse().expect("--seconds N")),
            other => panic!("unknown flag {other}"),
        }
    }
    let read = |p: Option<String>, what: &str| {
        std::fs::read_to_string(p.unwrap_or_else(|| panic!("{what} is required")))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    Args {
        base: base.expect("--base is required"),
        cacert: cacert.expect("--cacert is required"),
        tokens: read(tokens, "--tokens")
            .lines()
            .map(str::to_string)
            .collect(),
        patients: read(patients, "--patients")
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect(),
        clients,
        requests,
        seconds,
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    assert!(
        a.tokens.len() >= a.clients && a.patients.len() >= a.clients,
        "a token and a patient line per client"
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&a.cacert).expect("--cacert"))
        .expect("a PEM certificate");
    let deadline = a.seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let per_client = a.requests.map(|r| r.div_ceil(a.clients));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let client = reqwest::Client::builder()
            .tls_certs_merge([ca.clone()])
            .pool_max_idle_per_host(1)
            .build()
            .expect("an HTTPS client");
        let (base, token, patients) = (a.base.clone(), a.tokens[c].clone(), a.patients[c].clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            let mut i = 0;
            loop {
                if per_client.is_some_and(|n| i >= n)
                    || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    break;
                }
                let patient = &patients[i % patients.len()];
                let t0 = Instant::now();
                let result = client
                    .get(format!("{base}/v1/patients/{patient}/history"))
                    .bearer_auth(&token)
                    .header("x-purpose-of-use", "TREAT")
                    .send()
                    .await;
                match result {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.bytes().await {
                            Ok(_) if status == 200 => latencies.push(t0.elapsed()),
                            Ok(_) => errors.push(format!("status {status}")),
                            Err(e) => errors.push(format!("body: {e}")),
                        }
                    }
                    Err(e) => errors.push(format!("request: {e}")),
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        let (l, e) = t.await.expect("a client task");
        latencies.extend(l);
        errors.extend(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &errors {
        *kinds.entry(e.as_str()).or_default() += 1;
    }
    println!(
        "{{\"clients\": {}, \"ok\": {}, \"errors\": {}, \"error_kinds\": {:?}, \"seconds\": {:.2}, \"per_second\": {:.1}, \"p50_ms\": {:.2}, \"p90_ms\": {:.2}, \"p99_ms\": {:.2}, \"max_ms\": {:.2}}}",
        a.clients,
        latencies.len(),
        errors.len(),
        format!("{kinds:?}"),
        elapsed,
        latencies.len() as f64 / elapsed,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
    );
}
