//! The archive writer beside the apply: `strata sync` hands it a pass at a time (the outbox
//! up to the position applied, then the patients noted by then: [`Migration::writer_pass`])
//! and goes on applying changes while it reads, folds, encrypts and uploads. Only what
//! puts records back in the operational database waits for a moment between batches
//! ([`Exclusive`]), so a pass holds the apply for that moment, not for the whole write.
//!
//! Both run in sync's task, each making progress while the other waits on a database or the
//! object store. A pass dropped half-way (a stop, an error, the end of a catch-up) is left as
//! a crash leaves it: a batch it marked, or patients it was putting back, are finished by the
//! next sync before it applies anything ([`super::outbox::left_behind`]), or by the write that
//! ends a catch-up; what it had not started waits for the next pass.

use super::outbox::{Exclusive, OutboxReport};
use super::Migration;
use crate::db::Db;
use crate::error::{IngestError, Result};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use strata_cutoff_policies::PatientFacts;
use tokio::sync::mpsc;

/// One pass: the outbox entries at or before `cut`, and the patients noted by then, routed by
/// `facts` (a copy: the apply goes on noting).
#[derive(Clone)]
struct Pass {
    cut: u64,
    facts: Arc<HashMap<String, PatientFacts>>,
}

type Outcome<'a> = Result<(OutboxReport, Option<Exclusive<'a>>)>;

/// Sync's side of the archive writer.
pub(super) struct Writer<'a> {
    migration: &'a Migration,
    run_id: &'a str,
    target: &'a Db,
    passes: mpsc::Sender<Pass>,
    outcomes: mpsc::Receiver<Outcome<'a>>,
    /// The pass under way: handed over, its outcome not taken yet.
    running: Option<Pass>,
    /// What the pass left for a moment between batches, and the pass, to go on with after.
    left: Option<(Exclusive<'a>, Pass)>,
}

/// The writer's side: runs the passes it is handed, one at a time, until sync drops its side.
async fn serve<'a>(
    migration: &'a Migration,
    run_id: &'a str,
    target: &'a Db,
    mut passes: mpsc::Receiver<Pass>,
    outcomes: mpsc::Sender<Outcome<'a>>,
) -> Infallible {
    while let Some(pass) = passes.recv().await {
        let outcome = migration
            .writer_pass(run_id, target, &pass.facts, Some(pass.cut))
            .await;
        if outcomes.send(outcome).await.is_err() {
            break;
        }
    }
    std::future::pending().await
}

impl<'a> Writer<'a> {
    /// The archive writer of run `run_id`: sync's side, and the writer's, to be run beside
    /// the apply.
    pub(super) fn new(
        migration: &'a Migration,
        run_id: &'a str,
        target: &'a Db,
    ) -> (Self, impl std::future::Future<Output = Infallible> + 'a) {
        let (passes, to_serve) = mpsc::channel(1);
        let (done, outcomes) = mpsc::channel(1);
        let writer = Writer {
            migration,
            run_id,
            target,
            passes,
            outcomes,
            running: None,
            left: None,
        };
        (writer, serve(migration, run_id, target, to_serve, done))
    }

    /// Whether a pass is under way (or waits for a moment between batches).
    pub(super) fn busy(&self) -> bool {
        self.running.is_some() || self.left.is_some()
    }

    /// Whether the pass under way waits for the apply to stop between batches.
    pub(super) fn waits(&self) -> bool {
        self.left.is_some()
    }

    /// Starts a pass over the outbox entries at or before `cut` (everything applied), and the
    /// patients noted by then, routed by `facts`.
    pub(super) fn start(&mut self, cut: u64, facts: &HashMap<String, PatientFacts>) -> Result<()> {
        let pass = Pass {
            cut,
            facts: Arc::new(facts.clone()),
        };
        self.hand_over(pass)
    }

    fn hand_over(&mut self, pass: Pass) -> Result<()> {
        self.passes
            .try_send(pass.clone())
            .map_err(|_| IngestError::Run("the archive writer stopped".into()))?;
        self.running = Some(pass);
        Ok(())
    }

    /// The outcome of the pass under way, once it comes (pending when none is under way;
    /// safe to drop unfinished).
    pub(super) async fn outcome(&mut self) -> Option<Outcome<'a>> {
        match self.running {
            Some(_) => self.outcomes.recv().await,
            None => std::future::pending().await,
        }
    }

    /// The outcome of the pass under way, if it has come.
    pub(super) fn outcome_now(&mut self) -> Option<Option<Outcome<'a>>> {
        match self.running {
            Some(_) => match self.outcomes.try_recv() {
                Ok(outcome) => Some(Some(outcome)),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
            },
            None => None,
        }
    }

    /// Takes a pass's outcome (from [`Writer::outcome`]): what it wrote joins `report`; what
    /// it left for between batches waits for [`Writer::finish`].
    pub(super) fn took(
        &mut self,
        outcome: Option<Outcome<'a>>,
        report: &mut OutboxReport,
    ) -> Result<()> {
        let pass = self.running.take();
        let (written, left) =
            outcome.ok_or_else(|| IngestError::Run("the archive writer stopped".into()))??;
        report.add(written);
        if let (Some(left), Some(pass)) = (left, pass) {
            self.left = Some((left, pass));
        }
        Ok(())
    }

    /// Does, while no change is applied, what the pass left for between batches; then the
    /// pass goes on with the rest (after a reactivation, the pass's last step, it is over).
    pub(super) async fn finish(&mut self, report: &mut OutboxReport) -> Result<()> {
        let Some((left, pass)) = self.left.take() else {
            return Ok(());
        };
        let last = matches!(left, Exclusive::Reactivation { .. });
        self.migration
            .finish_exclusive(self.run_id, self.target, left, Some(pass.cut), report)
            .await?;
        if !last {
            self.hand_over(pass)?;
        }
        Ok(())
    }
}
