//! The clock the engine records time with: event timestamps, retry and backoff timers,
//! deletion windows, command deadlines. The core reads no clock; the engine reads this one, so
//! a simulation (virtual time) or a test can give it its own and a run replays exactly.

use mageflow_core::Timestamp;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The current time as the engine records it, from the system clock (UTC microseconds).
pub fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    Timestamp::from_micros(micros)
}

/// Where an engine reads the time ([`crate::Config::clock`]). The default is the system clock;
/// [`Clock::from_fn`] gives it another source, such as tokio's paused time in a simulation.
///
/// ```
/// use mageflow_engine::Clock;
/// use mageflow_core::Timestamp;
///
/// let fixed = Clock::from_fn(|| Timestamp::from_micros(1_700_000_000_000_000));
/// assert_eq!(fixed.now().as_micros(), 1_700_000_000_000_000);
/// ```
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<dyn Fn() -> Timestamp + Send + Sync>>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self(None)
    }

    /// A clock that reads `f`. It should not go backwards: timers compare its readings.
    pub fn from_fn(f: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// The current time on this clock.
    pub fn now(&self) -> Timestamp {
        match &self.0 {
            None => now(),
            Some(f) => f(),
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_none() {
            "Clock(system)"
        } else {
            "Clock(custom)"
        })
    }
}
