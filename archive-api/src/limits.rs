//! Per-user rate limits: a token bucket per token subject, refilled at the configured rate.
//! A spent bucket answers 429 with `Retry-After`; the request is still audited (as denied).

use crate::auth::Principal;
use crate::config::LimitsConfig;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Buckets kept before idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

/// The per-user buckets.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<String, (f64, Instant)>>>,
}

impl RateLimiter {
    /// A limiter of users' requests for `config`.
    pub fn new(config: &LimitsConfig) -> Self {
        Self::per_minute(config.requests_per_minute, config.burst)
    }

    /// A limiter of `per_minute` requests a key, `burst` at once.
    pub fn per_minute(per_minute: u32, burst: u32) -> Self {
        RateLimiter {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Arc::default(),
        }
    }

    /// Takes a token from `user`'s bucket; Err(seconds to wait) when it is empty.
    pub fn take(&self, user: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(user) {
            // Full buckets belong to users idle long enough to have refilled: forget them.
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(user.to_string()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_second).ceil() as u64)
        }
    }
}

/// The rate-limit layer (after authentication: it keys buckets by the caller).
pub async fn limit(
    State(limiter): State<RateLimiter>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(p) = request.extensions().get::<Principal>() {
        limiter.take(&p.user).map_err(ApiError::TooManyRequests)?;
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_per_user() {
        let l = RateLimiter::new(&LimitsConfig {
            requests_per_minute: 60,
            burst: 3,
            ..LimitsConfig::default()
        });
        assert!((0..3).all(|_| l.take("a").is_ok()));
        assert_eq!(l.take("a"), Err(1));
        assert!(l.take("b").is_ok(), "buckets are per user");
    }
}
