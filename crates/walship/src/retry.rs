//! Retrying transient failures within one overall deadline.
//!
//! Every command has a deadline (`deadline_secs`): PostgreSQL's archiver and startup process wait
//! for us, so a hung call stalls archiving or recovery. Within it, failures marked retryable are tried
//! again with exponential backoff and jitter; the deadline also cuts off an attempt that hangs.
//!
//! One policy for every command: `walship_cli::on_repository` fixes the deadline, opens the
//! repository within it and cleans up afterwards; whatever waits on the repository, in a binary or
//! in the library (the prefetch worker's downloads, a base backup's catalog reads and parts), goes
//! through [`until`] or [`with_deadline`]. A timer can only cut off an attempt that yields, so an
//! attempt's blocking file work runs on the blocking pool (`off_runtime`).

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::log::Log;

const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds, fails for good, or `deadline` passes. `what` names the object
/// worked on (location, bucket, key, endpoint) for the message when the deadline ends it.
pub async fn with_deadline<T, F, Fut>(deadline: Duration, log: &Log, what: &str, attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    until(Deadline::starting_now(deadline), log, what, attempt).await
}

/// One command's deadline: the instant it ends, fixed once, and its length for messages. Work that
/// shares it (a wal-push call's uploads, ahead and requested) ends together, however long each part
/// waited for its turn.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// tokio's clock, which is the system's monotonic clock except in tests that pause time.
    pub end: tokio::time::Instant,
    /// How long it was when it started (`deadline_secs`), for messages.
    pub length: Duration,
}

impl Deadline {
    /// A deadline `length` from now.
    pub fn starting_now(length: Duration) -> Deadline {
        Deadline { end: tokio::time::Instant::now() + length, length }
    }

    /// The time left; zero once it passed.
    pub fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(tokio::time::Instant::now())
    }

    fn exceeded(&self, what: &str, last: String) -> Error {
        Error::DeadlineExceeded { what: what.to_owned(), seconds: self.length.as_secs(), last }
    }
}

/// Like [`with_deadline`], ending at `deadline.end` whenever the work started.
pub async fn until<T, F, Fut>(deadline: Deadline, log: &Log, what: &str, mut attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut delay = FIRST_DELAY;
    let mut last_error: Option<String> = None;
    loop {
        let error = match tokio::time::timeout(deadline.remaining(), attempt()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if e.is_retryable() => e,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let last = match last_error {
                    Some(previous) => format!("the last attempt did not finish in time; before it: {previous}"),
                    None => "the operation did not finish in time".into(),
                };
                return Err(deadline.exceeded(what, last));
            }
        };
        let remaining = deadline.remaining();
        if remaining.is_zero() {
            return Err(deadline.exceeded(what, error.to_string()));
        }
        let pause = jittered(delay).min(remaining);
        log.debug(format_args!("{error}; retrying in {} ms", pause.as_millis()));
        last_error = Some(error.to_string());
        tokio::time::sleep(pause).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// Starts blocking file work (`std::fs`) on tokio's blocking pool at once, and returns its answer
/// to await. A deadline can only cut off an attempt that yields: a read stuck on a hung file system,
/// run inline, would hold the thread the timer runs on and the deadline would never fire. Cut off,
/// the work goes on in its thread until the kernel returns; the runtime is shut down without
/// waiting for it (`walship_cli::block_on`).
pub(crate) fn off_runtime<T, W>(path: &Path, work: W) -> impl Future<Output = Result<T, Error>> + use<T, W>
where
    T: Send + 'static,
    W: FnOnce() -> Result<T, Error> + Send + 'static,
{
    let handle = tokio::task::spawn_blocking(work);
    let path = path.to_owned();
    async move {
        match handle.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only a runtime shutting down cancels it, and then nobody waits for this answer.
            Err(e) => Err(Error::local_io(&path, "run a file operation", std::io::Error::other(e.to_string()))),
        }
    }
}

/// A delay between half and all of `delay`, so that many clients do not retry in step.
fn jittered(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let random = RandomState::new().hash_one(Instant::now());
    let fraction = 0.5 + (random % 1000) as f64 / 2000.0;
    delay.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageError;
    use std::cell::Cell;
    use std::io;

    fn transient() -> Error {
        StorageError::io("x", "read", io::Error::from(io::ErrorKind::TimedOut)).into()
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success() {
        let calls = Cell::new(0);
        let result = with_deadline(Duration::from_secs(10), &Log::quiet(), "x", || async {
            calls.set(calls.get() + 1);
            if calls.get() < 3 { Err(transient()) } else { Ok(7) }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = Cell::new(0);
        let result: Result<(), _> = with_deadline(Duration::from_secs(10), &Log::quiet(), "x", || async {
            calls.set(calls.get() + 1);
            Err(Error::Usage("no".into()))
        })
        .await;
        assert!(matches!(result, Err(Error::Usage(_))));
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_retries_and_hangs() {
        let result: Result<(), _> =
            with_deadline(Duration::from_secs(3), &Log::quiet(), "x", || async { Err(transient()) }).await;
        let err = result.unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err}");
        assert!(err.to_string().contains("TimedOut") || err.to_string().contains("timed out"), "{err}");
        let hang: Result<(), _> =
            with_deadline(Duration::from_secs(3), &Log::quiet(), "s3://b/k", std::future::pending::<Result<(), Error>>)
                .await;
        let hang = hang.unwrap_err();
        assert!(hang.to_string().starts_with("s3://b/k: gave up after 3 s"), "names what hung: {hang}");
    }

    #[tokio::test(start_paused = true)]
    async fn work_sharing_a_deadline_ends_at_its_instant_however_late_it_started() {
        let deadline = Deadline::starting_now(Duration::from_secs(3));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = tokio::time::Instant::now();
        let late: Result<(), _> = until(deadline, &Log::quiet(), "x", || async { Err(transient()) }).await;
        assert!(matches!(late, Err(Error::DeadlineExceeded { seconds: 3, .. })), "{late:?}");
        assert!(started.elapsed() <= Duration::from_secs(1), "ran {:?} past the shared end", started.elapsed());
        let after: Result<(), _> = until(deadline, &Log::quiet(), "x", std::future::pending::<Result<(), Error>>).await;
        assert!(matches!(after, Err(Error::DeadlineExceeded { .. })), "{after:?}");
    }
}
