//! Waiting for a condition: [`eventually`] asks a condition again and
//! again until it holds, and fails the test naming what it waited for
//! once its bound has passed.
//!
//! A condition is a closure that returns a future, most simply an async
//! closure that reads what it captures (`async || upstream.total() >= 2`;
//! one that must change what it captures: `|| std::future::ready(..)`, or
//! a cell). Its future answers one of
//!
//! * `bool`: holds when `true`;
//! * `Option<T>`: holds with `Some(value)`, and `eventually` returns the value;
//! * `Result<T, E>`: holds with `Ok(value)`; the last `Err` is shown if the
//!   bound passes (say why it does not hold yet: the last error, a count).
//!
//! (A closure returning a future, not `AsyncFnMut`: the wait's own future
//! is then `Send` when the condition's is, and runs in a spawned task.)

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

/// The shortest pause between two looks.
pub const MIN_STEP: Duration = Duration::from_millis(10);
/// The longest pause between two looks.
pub const MAX_STEP: Duration = Duration::from_millis(500);

/// What a condition answers: whether it holds, and with what.
pub trait Check {
    /// What `eventually` returns once the condition holds.
    type Value;
    /// `Ok(value)` when it holds, else why not (if the condition says).
    fn check(self) -> Result<Self::Value, Option<String>>;
}

impl Check for bool {
    type Value = ();
    fn check(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Check for Option<T> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Check for Result<T, E> {
    type Value = T;
    fn check(self) -> Result<T, Option<String>> {
        self.map_err(|why| Some(why.to_string()))
    }
}

/// Asks `condition` until it holds and returns what it held with; panics
/// naming `what` and `bound` once `bound` has passed (the condition is
/// always asked once more at the end). It looks about a hundred times
/// within the bound: every `bound / 100`, kept within [`MIN_STEP`] and
/// [`MAX_STEP`].
pub async fn eventually<C: Check, F: Future<Output = C>>(
    bound: Duration,
    what: impl Display,
    mut condition: impl FnMut() -> F,
) -> C::Value {
    let step = (bound / 100).clamp(MIN_STEP, MAX_STEP);
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let why = match condition().await.check() {
            Ok(value) => return value,
            Err(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            match why {
                Some(why) => panic!("not within {bound:?}: {what} (last: {why})"),
                None => panic!("not within {bound:?}: {what}"),
            }
        }
        tokio::time::sleep(step).await;
    }
}
