//! The archive viewer's browser sessions, and its sign-ins under way (an OpenID Connect
//! authorization request waiting for its callback), kept in the control database: they survive
//! a restart and are shared by every replica of `strata serve`.
//!
//! Only the SHA-256 of a session's id is stored (the caller hashes it): whoever reads the
//! control database cannot take a session over. A session ends when it has been idle longer
//! than the caller's timeout (its last use is `seen_at`), when its user signs out, or when it is
//! swept; what it holds (`data`) is the caller's JSON.

use crate::control::Control;
use crate::db::{Col, Param};
use crate::error::Result;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_sessions (
    id_hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL
);
";

/// A session (or sign-in under way) as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// What the caller keeps in it.
    pub data: serde_json::Value,
    /// When it began (seconds since the epoch).
    pub created_at: i64,
    /// When it was last used, before this use (seconds since the epoch).
    pub seen_at: i64,
}

impl Control {
    /// Stores a new session of `kind` (`session`, `sign-in`) under `id_hash`, begun at `now`.
    pub async fn put_session(
        &self,
        id_hash: &str,
        kind: &str,
        data: &serde_json::Value,
        now: i64,
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_sessions (id_hash, kind, data, created_at, seen_at) VALUES ({})",
            self.db.ps(5)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    id_hash.into(),
                    kind.into(),
                    data.to_string().into(),
                    Param::Int(now),
                    Param::Int(now),
                ],
            )
            .await?;
        Ok(())
    }

    /// The session of `kind` under `id_hash` if it was used at or after `idle_since`, marked
    /// used at `now`. A session idle for longer is ended (deleted) and None returned.
    pub async fn use_session(
        &self,
        id_hash: &str,
        kind: &str,
        idle_since: i64,
        now: i64,
    ) -> Result<Option<StoredSession>> {
        let sql = format!(
            "SELECT data, created_at, seen_at FROM strata_sessions WHERE id_hash = {} AND kind = {}",
            self.db.p(1),
            self.db.p(2)
        );
        let rows = self
            .db
            .fetch(
                &sql,
                &[id_hash.into(), kind.into()],
                &[Col::Text, Col::Int, Col::Int],
            )
            .await?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let seen_at = row[2].int().unwrap_or(0);
        if seen_at < idle_since {
            self.end_session(id_hash).await?;
            return Ok(None);
        }
        let sql = format!(
            "UPDATE strata_sessions SET seen_at = {} WHERE id_hash = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[Param::Int(now), id_hash.into()])
            .await?;
        Ok(Some(StoredSession {
            data: serde_json::from_str(&row[0].text()).unwrap_or(serde_json::Value::Null),
            created_at: row[1].int().unwrap_or(0),
            seen_at,
        }))
    }

    /// Replaces what the session under `id_hash` holds.
    pub async fn update_session(&self, id_hash: &str, data: &serde_json::Value) -> Result<()> {
        let sql = format!(
            "UPDATE strata_sessions SET data = {} WHERE id_hash = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[data.to_string().into(), id_hash.into()])
            .await?;
        Ok(())
    }

    /// Ends the session under `id_hash`; true if there was one.
    pub async fn end_session(&self, id_hash: &str) -> Result<bool> {
        let sql = format!(
            "DELETE FROM strata_sessions WHERE id_hash = {}",
            self.db.p(1)
        );
        Ok(self.db.execute_with(&sql, &[id_hash.into()]).await? > 0)
    }

    /// Ends every session last used before `idle_since`; returns how many.
    pub async fn end_idle_sessions(&self, idle_since: i64) -> Result<u64> {
        let sql = format!(
            "DELETE FROM strata_sessions WHERE seen_at < {}",
            self.db.p(1)
        );
        self.db.execute_with(&sql, &[Param::Int(idle_since)]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_is_found_by_kind_until_it_idles_out() {
        let dir = tempfile::tempdir().unwrap();
        let control = Control::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
        let data = serde_json::json!({ "user": "u1" });
        control
            .put_session("h1", "session", &data, 1000)
            .await
            .unwrap();
        assert_eq!(
            control.use_session("h1", "sign-in", 0, 1001).await.unwrap(),
            None,
            "another kind"
        );
        let s = control
            .use_session("h1", "session", 900, 1010)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((s.data, s.created_at, s.seen_at), (data, 1000, 1000));
        // Used at 1010: idle since 1005 still finds it; since 1011 ends it.
        assert!(control
            .use_session("h1", "session", 1005, 1020)
            .await
            .unwrap()
            .is_some());
        assert_eq!(
            control
                .use_session("h1", "session", 1021, 1030)
                .await
                .unwrap(),
            None
        );
        assert!(!control.end_session("h1").await.unwrap(), "ended already");
        control
            .put_session("h2", "session", &serde_json::json!({}), 50)
            .await
            .unwrap();
        control
            .put_session("h3", "session", &serde_json::json!({}), 500)
            .await
            .unwrap();
        assert_eq!(control.end_idle_sessions(100).await.unwrap(), 1);
        assert!(control
            .use_session("h3", "session", 0, 600)
            .await
            .unwrap()
            .is_some());
    }
}
