//! Change sync from a PostgreSQL source (issue #18): after a bulk copy at a snapshot, every
//! change committed since is read from a logical replication slot (`pgoutput`) and applied
//! through the same route stage as the copy.
//!
//! Where it stands: the slot is created before the bulk copy's snapshot and the two meet
//! exactly ([`snapshot`]); messages decode ([`pgoutput`]); [`stream`] reads a slot's
//! transactions. Applying them to the tiers comes next.

pub mod pgoutput;
pub mod prepare;
pub mod snapshot;
pub mod stream;
