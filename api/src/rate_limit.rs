//! Per-caller token buckets for command endpoints: `per_sec` tokens a second,
//! at most `burst` saved up. Kept in memory per process, so N instances allow
//! N times the rate; that bounds abuse, which is all it is for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;
use uuid::Uuid;

/// Whom a bucket belongs to: a user's sessions share one, each API key has its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    User(Uuid),
    ApiKey(Uuid),
    /// Unauthenticated routes (register, login, refresh), by client address.
    Address(std::net::IpAddr),
}

pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<Caller, (f64, Instant)>>,
}

/// Buckets kept before idle, full ones are dropped.
const PRUNE_ABOVE: usize = 10_000;

impl RateLimiter {
    /// `per_sec == 0` turns the limit off.
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter { per_sec: f64::from(per_sec), burst: f64::from(burst.max(1)), buckets: Mutex::new(HashMap::new()) }
    }

    pub fn enabled(&self) -> bool {
        self.per_sec > 0.0
    }

    /// Takes a token, or says how many whole seconds until one is available.
    pub fn check(&self, caller: Caller) -> Result<(), u64> {
        self.check_at(caller, Instant::now())
    }

    fn check_at(&self, caller: Caller, now: Instant) -> Result<(), u64> {
        if !self.enabled() {
            return Ok(());
        }
        // A poisoned lock only means another request panicked mid-update; the map is still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * per_sec < burst);
        }
        let (tokens, at) = buckets.entry(caller).or_insert((self.burst, now));
        let refilled = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_sec).min(self.burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            Err(((1.0 - refilled) / self.per_sec).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let limiter = RateLimiter::new(2, 3);
        let ann = Caller::User(Uuid::new_v4());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check_at(ann, t0), Ok(()));
        }
        assert_eq!(limiter.check_at(ann, t0), Err(1));
        assert_eq!(limiter.check_at(Caller::User(Uuid::new_v4()), t0), Ok(()), "others have their own bucket");
        assert_eq!(limiter.check_at(ann, t0 + Duration::from_millis(500)), Ok(()), "2/s refills one in 0.5 s");
        assert!(limiter.check_at(ann, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn zero_turns_it_off() {
        let limiter = RateLimiter::new(0, 0);
        let ann = Caller::User(Uuid::new_v4());
        assert!((0..1000).all(|_| limiter.check(ann).is_ok()));
    }
}
