//! A command started in the background with its output collected on the side, so that a test can act
//! while it runs (kill a server, freeze it, watch a temporary file grow) and still wait for it with a
//! bound: a hang must fail the test, never stall the suite.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Output;

/// A command started with its output collected on the side.
pub struct Running {
    child: Child,
    what: String,
    /// The program's name as /proc shows it once it has been exec'd.
    program: String,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
    started: Instant,
}

/// What a finished command did, and what it cost.
pub struct Finished {
    /// Exit code and output.
    pub output: Output,
    /// From the spawn to the exit.
    pub elapsed: Duration,
    /// Peak resident memory (VmHWM) last seen while it ran; 0 if it ran too briefly to be seen.
    pub peak_rss_bytes: u64,
}

/// Starts `cmd` with no standard input and its output piped into threads that collect it.
pub fn spawn(cmd: &mut Command) -> Running {
    let what = format!("{:?} {:?}", cmd.get_program(), cmd.get_args().collect::<Vec<_>>());
    let program = Path::new(cmd.get_program()).file_name().unwrap().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    Running { child, what, program, stdout, stderr, started: Instant::now() }
}

impl Running {
    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident memory so far, once it runs our program (before the exec it is a
    /// copy of the test process, whose memory says nothing about the command).
    fn peak_rss_bytes(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?.trim();
        if name != self.program {
            return None;
        }
        let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().strip_suffix("kB")?.trim();
        kib.parse::<u64>().ok().map(|k| k * 1024)
    }

    /// Whether the command has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits, at most `limit`, until `ready` holds or the command exits; says whether `ready` held
    /// first. Polls often: the moments it catches (a temporary file growing) are short.
    ///
    /// `ready` is asked before each check for an exit, and the loop only yields between rounds: a
    /// local push publishes and exits within a millisecond or two, and a sleep between polls (or a
    /// check for the exit first) let the kill at publication miss that moment.
    pub fn wait_for(&mut self, limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if ready() {
                return true;
            }
            if self.has_exited() {
                return false;
            }
            std::thread::yield_now();
        }
        false
    }

    /// Sends SIGKILL (if it still runs) and reaps it, as the OOM killer or a power cut would end it.
    pub fn kill(mut self) -> std::process::ExitStatus {
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }
}

/// Waits for `running` to exit, watching its memory; kills it and fails the test if it takes longer
/// than `limit`.
#[track_caller]
pub fn finish(mut running: Running, limit: Duration) -> Finished {
    let mut peak_rss_bytes = 0;
    loop {
        if let Some(peak) = running.peak_rss_bytes() {
            peak_rss_bytes = peak_rss_bytes.max(peak);
        }
        if let Some(status) = running.child.try_wait().unwrap() {
            let elapsed = running.started.elapsed();
            let text = |h: JoinHandle<Vec<u8>>| String::from_utf8_lossy(&h.join().unwrap()).into_owned();
            let output = Output { code: status.code(), stdout: text(running.stdout), stderr: text(running.stderr) };
            return Finished { output, elapsed, peak_rss_bytes };
        }
        if running.started.elapsed() > limit {
            let _ = running.child.kill();
            let _ = running.child.wait();
            panic!("{} hung: still running after {} s", running.what, limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
