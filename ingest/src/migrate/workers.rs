//! Running jobs side by side on threads of their own: a run's ranges, and verify's reads of
//! the source, the operational table and the archive. Futures polled by one task share one
//! thread; decoding, routing and hashing rows need every core.

use crate::error::Result;
use futures::future::LocalBoxFuture;
use futures::{StreamExt, TryStreamExt};

/// One job: makes its future on the thread that runs it (so the future need not be `Send`,
/// only what it borrows `Sync`).
pub(super) type Job<'a, T> = Box<dyn FnOnce() -> LocalBoxFuture<'a, Result<T>> + Send + 'a>;

/// Runs `jobs` with at most `threads` at a time and returns their results in the jobs' order.
///
/// Under a multi-threaded runtime each of `threads` threads takes the next job and drives it
/// on the runtime's reactor (`Handle::block_on`); after a job fails no new job starts, and the
/// first error is returned. On a current-thread runtime (some tests) the jobs interleave on
/// this task instead.
pub(super) async fn run_jobs<'a, T: Send + 'a>(
    jobs: Vec<Job<'a, T>>,
    threads: usize,
) -> Result<Vec<T>> {
    let threads = threads.max(1);
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        return futures::stream::iter(jobs)
            .map(|job| job())
            .buffered(threads)
            .try_collect()
            .await;
    }
    let count = jobs.len();
    let queue = std::sync::Mutex::new(jobs.into_iter().enumerate());
    let results = std::sync::Mutex::new((0..count).map(|_| None).collect::<Vec<Option<T>>>());
    let failed = std::sync::atomic::AtomicBool::new(false);
    let worker = || -> Result<()> {
        use std::sync::atomic::Ordering;
        while !failed.load(Ordering::Relaxed) {
            let Some((i, job)) = queue.lock().expect("job queue").next() else {
                break;
            };
            match handle.block_on(job()) {
                Ok(t) => results.lock().expect("job results")[i] = Some(t),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(())
    };
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let spawned: Vec<_> = (0..threads.min(count.max(1)))
                .map(|i| {
                    std::thread::Builder::new()
                        .name(format!("strata-worker-{i}"))
                        .spawn_scoped(scope, worker)
                        .expect("a worker thread starts")
                })
                .collect();
            let mut outcome = Ok(());
            for t in spawned {
                match t.join() {
                    Ok(Err(e)) if outcome.is_ok() => outcome = Err(e),
                    Ok(_) => {}
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            outcome
        })
    })?;
    Ok(results
        .into_inner()
        .expect("job results")
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect())
}
