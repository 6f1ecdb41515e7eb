//! What the control database keeps of `strata verify`: each verification's report (the
//! evidence records managers and auditors list), and the tables a verification in progress
//! has proven so far, so that `strata verify --resume` goes on after a stop instead of reading
//! a terabyte again.

use crate::control::{now, Control};
use crate::db::Col;
use crate::error::Result;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_verifications (
    run_id TEXT NOT NULL,
    verified_at TEXT NOT NULL,
    proven BIGINT NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS strata_verify_progress (
    run_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    options TEXT NOT NULL,
    proof TEXT NOT NULL,
    PRIMARY KEY (run_id, table_name)
);
";

/// A `strata verify` of a run, as kept: when, whether everything was proven, and the report
/// (signed when a signing key is configured).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct VerificationRecord {
    /// The run verified.
    pub run_id: String,
    /// When (RFC 3339).
    pub verified_at: String,
    /// Whether every table was proven.
    pub proven: bool,
    /// The report, as written.
    #[schema(value_type = Object)]
    pub report: serde_json::Value,
}

impl Control {
    /// Keeps a verification's report.
    pub async fn record_verification(
        &self,
        run_id: &str,
        proven: bool,
        report: &str,
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_verifications (run_id, verified_at, proven, report) VALUES ({})",
            self.db.ps(4)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    run_id.into(),
                    now().into(),
                    (proven as i64).into(),
                    report.into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Every verification kept, newest first.
    pub async fn verifications(&self) -> Result<Vec<VerificationRecord>> {
        let rows = self
            .db
            .fetch(
                "SELECT run_id, verified_at, proven, report FROM strata_verifications ORDER BY verified_at DESC",
                &[],
                &[Col::Text, Col::Text, Col::Int, Col::Text],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| VerificationRecord {
                run_id: r[0].text(),
                verified_at: r[1].text(),
                proven: r[2].int() == Some(1),
                report: serde_json::from_str(&r[3].text()).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }

    /// Keeps the proof (JSON) of one table of a verification of `run_id` in progress, made
    /// with `options` (a resumed verification takes only proofs made as it is asked).
    pub async fn save_table_proof(
        &self,
        run_id: &str,
        table: &str,
        options: &str,
        proof: &str,
    ) -> Result<()> {
        self.put_run_table_row(
            "strata_verify_progress",
            run_id,
            table,
            &["options", "proof"],
            &[options, proof],
        )
        .await
    }

    /// The proofs (JSON) by table that a verification of `run_id` with `options` kept before it
    /// stopped.
    pub async fn table_proofs(
        &self,
        run_id: &str,
        options: &str,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let sql = format!(
            "SELECT table_name, proof FROM strata_verify_progress WHERE run_id = {} AND options = {}",
            self.db.p(1),
            self.db.p(2)
        );
        let rows = self
            .db
            .fetch(&sql, &[run_id.into(), options.into()], &[Col::Text; 2])
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r[0].text(), r[1].text()))
            .collect())
    }

    /// Forgets the tables proven by verifications in progress (a verification that starts
    /// afresh, or that ended).
    pub async fn forget_table_proofs(&self) -> Result<()> {
        self.db
            .execute("DELETE FROM strata_verify_progress")
            .await
            .map(|_| ())
    }
}
