//! A restore stopped by a signal: SIGINT, SIGTERM or SIGHUP set a flag that every long step looks
//! at (the extractor at each read, the wait for pg_combinebackup at each poll), so that base-fetch
//! stops at once, removes what it restored and its scratch space, and exits 11, rather than dying
//! with files (and a chain's scratch copies) left behind.

use std::sync::{Arc, OnceLock};

use super::signals::Signals;
use crate::error::Error;

/// Set once a signal has arrived: the signal's name.
#[derive(Clone, Default)]
pub(super) struct CancelToken(Arc<OnceLock<&'static str>>);

impl CancelToken {
    /// The signal that arrived, if one did.
    pub(super) fn signal(&self) -> Option<&'static str> {
        self.0.get().copied()
    }

    /// `Err(Interrupted)` once a signal has arrived.
    pub(super) fn check(&self) -> Result<(), Error> {
        match self.signal() {
            Some(signal) => Err(Error::Interrupted { signal }),
            None => Ok(()),
        }
    }
}

/// Catches the signals for as long as it lives, setting its token's flag.
pub(super) struct Cancel {
    token: CancelToken,
    watcher: tokio::task::JoinHandle<()>,
}

impl Cancel {
    /// Starts catching SIGINT, SIGTERM and SIGHUP.
    pub(super) fn watch() -> Result<Cancel, Error> {
        let mut signals = Signals::new()?;
        let token = CancelToken::default();
        let flag = Arc::clone(&token.0);
        let watcher = tokio::spawn(async move {
            let _ = flag.set(signals.recv().await);
        });
        Ok(Cancel { token, watcher })
    }

    /// The flag the steps look at.
    pub(super) fn token(&self) -> &CancelToken {
        &self.token
    }
}

impl Drop for Cancel {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}
