//! Watching a run: a progress bar per table on a terminal, a structured log line per table
//! every few seconds otherwise, and Prometheus metrics over HTTP while the run lasts.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use strata_ingest::RunProgress;

/// Shows `progress` until the returned handle is dropped (or aborted).
pub fn show(progress: RunProgress) -> tokio::task::JoinHandle<()> {
    if std::io::stderr().is_terminal() {
        tokio::spawn(bars(progress))
    } else {
        tokio::spawn(log_lines(progress))
    }
}

async fn bars(progress: RunProgress) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
    let style = ProgressStyle::with_template(
        "{prefix:>18} {bar:30} {pos:>10}/{len:<10} rows  {msg}  ETA {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut bars: HashMap<String, (ProgressBar, Instant)> = HashMap::new();
    loop {
        for s in progress.snapshot() {
            let (bar, started) = bars.entry(s.table.clone()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(s.expected_rows.max(1)));
                bar.set_style(style.clone());
                bar.set_prefix(s.table.clone());
                (bar, Instant::now())
            });
            if bar.is_finished() {
                continue;
            }
            bar.set_length(s.expected_rows.max(s.rows).max(1));
            bar.set_position(s.rows);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "{:>7.1} MB/s  ranges {}/{}  quarantined {}",
                s.bytes as f64 / 1e6 / secs,
                s.ranges_done,
                s.ranges,
                s.quarantined
            ));
            if s.done {
                bar.finish();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn log_lines(progress: RunProgress) {
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let secs = started.elapsed().as_secs_f64();
        for s in progress.snapshot().into_iter().filter(|s| !s.done) {
            let rate = s.rows as f64 / secs;
            let eta = (s.expected_rows > s.rows && rate > 0.0)
                .then(|| ((s.expected_rows - s.rows) as f64 / rate).round() as u64);
            tracing::info!(
                table = %s.table,
                rows = s.rows,
                expected_rows = s.expected_rows,
                mb_per_s = s.bytes as f64 / 1e6 / secs,
                ranges_done = s.ranges_done,
                ranges = s.ranges,
                quarantined = s.quarantined,
                eta_seconds = eta,
                "progress"
            );
        }
    }
}

/// Serves `GET /metrics` (Prometheus text format) on `listen` while the run lasts.
pub async fn serve_metrics(
    listen: &str,
    progress: RunProgress,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics endpoint {listen}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let progress = progress.clone();
            async move {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    progress.prometheus(),
                )
            }
        }),
    );
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}
