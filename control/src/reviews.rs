//! Compliance's review of break-the-glass reads: which flagged audit entries were reviewed,
//! by whom, when, with what note. The audit log itself is never changed (its chain would
//! break); a review is a record beside it, and the request that made it is itself audited.

use crate::control::{now, Control};
use crate::db::{Col, Param};
use crate::error::{ControlError, Result};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_break_glass_reviews (
    seq BIGINT PRIMARY KEY,
    reviewed_by TEXT NOT NULL,
    reviewed_at TEXT NOT NULL,
    note TEXT NOT NULL
);
";

/// A review of a break-the-glass read.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BreakGlassReview {
    /// The audit entry reviewed.
    pub seq: i64,
    /// Who reviewed it.
    pub reviewed_by: String,
    /// When (RFC 3339).
    pub reviewed_at: String,
    /// Their note.
    pub note: String,
}

impl Control {
    /// Records the review of audit entry `seq` by `by`; false if it was reviewed already (the
    /// first review stands).
    pub async fn review_break_glass(&self, seq: i64, by: &str, note: &str) -> Result<bool> {
        if by.trim().is_empty() || note.trim().is_empty() {
            return Err(ControlError::Invalid(
                "a review needs who made it and a note".into(),
            ));
        }
        let sql = format!(
            "INSERT INTO strata_break_glass_reviews (seq, reviewed_by, reviewed_at, note) VALUES ({}) ON CONFLICT (seq) DO NOTHING",
            self.db.ps(4)
        );
        let n = self
            .db
            .execute_with(
                &sql,
                &[Param::Int(seq), by.into(), now().into(), note.into()],
            )
            .await?;
        Ok(n == 1)
    }

    /// The reviews of the entries numbered `seqs`.
    pub async fn break_glass_reviews(&self, seqs: &[i64]) -> Result<Vec<BreakGlassReview>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let list = seqs
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT seq, reviewed_by, reviewed_at, note FROM strata_break_glass_reviews WHERE seq IN ({list}) ORDER BY seq"
        );
        Ok(self
            .db
            .fetch(&sql, &[], &[Col::Int, Col::Text, Col::Text, Col::Text])
            .await?
            .into_iter()
            .map(|r| BreakGlassReview {
                seq: r[0].int().unwrap_or(0),
                reviewed_by: r[1].text(),
                reviewed_at: r[2].text(),
                note: r[3].text(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_review_of_an_entry_stands() {
        let dir = tempfile::tempdir().unwrap();
        let control = Control::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
        assert!(control
            .review_break_glass(7, "aud", "justified: ED")
            .await
            .unwrap());
        assert!(!control
            .review_break_glass(7, "other", "again")
            .await
            .unwrap());
        assert!(control.review_break_glass(8, "aud", " ").await.is_err());
        let reviews = control.break_glass_reviews(&[7, 8, 9]).await.unwrap();
        assert_eq!(reviews.len(), 1);
        assert_eq!(
            (
                reviews[0].seq,
                reviews[0].reviewed_by.as_str(),
                reviews[0].note.as_str()
            ),
            (7, "aud", "justified: ED")
        );
    }
}
