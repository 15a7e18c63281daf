//! The signals that stop a base-push (SIGINT, SIGTERM, SIGHUP), caught so that it removes what it
//! wrote before it exits, instead of leaving the next run's sweep to do it.

use std::path::Path;

use crate::error::Error;

/// SIGINT, SIGTERM and SIGHUP: stop, remove what was written, exit.
pub(crate) struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching the three signals (until dropped).
    pub(crate) fn new() -> Result<Self, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind| signal(kind).map_err(|e| Error::local_io(Path::new("signal handler"), "install", e));
        Ok(Signals {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// Waits for one of them; returns its name.
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}
