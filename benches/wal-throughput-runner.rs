//! The process that runs every archive_command / restore_command call for benches/archiver.py, and
//! measures it: wall time per call, and the peak resident set size of everything the calls started,
//! detached helpers included (pgbackrest's async processes, wal-fetch's prefetch worker).
//!
//! Why not Python itself: a child forked by Python inherits Python's own peak RSS (about 14 MiB)
//! as its starting ru_maxrss (the kernel records the old address space's high-water mark at exec),
//! which would swamp `cp` or a small tool. This process is small, so what it reports is the calls'.
//!
//! Build: rustc -O --edition 2021 benches/wal-throughput-runner.rs -o runner  (std only)
//! Usage: runner [REAP_SECS]
//! stdin, one call per line:  CWD <TAB> OUTPUT_FILE <TAB> SHELL COMMAND
//!   runs `/bin/sh -c COMMAND` in CWD (stdin /dev/null, stdout and stderr to OUTPUT_FILE, truncated)
//!   and answers `EXIT_CODE NANOSECONDS` (exit code 128+N for a signal N).
//! At end of input: waits up to REAP_SECS (default 120) for the detached descendants still running
//! (this process is their subreaper), terminates those left after that, and prints
//! `peak KIB STRAGGLERS`: the largest maximum RSS of any call or descendant (getrusage
//! RUSAGE_CHILDREN), and how many descendants had to be terminated.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[repr(C)]
struct Timeval {
    sec: i64,
    usec: i64,
}

#[repr(C)]
struct Rusage {
    utime: Timeval,
    stime: Timeval,
    maxrss: i64,
    rest: [i64; 13],
}

unsafe extern "C" {
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}

const PR_SET_CHILD_SUBREAPER: i32 = 36;
const RUSAGE_CHILDREN: i32 = -1;
const WNOHANG: i32 = 1;
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

/// Reaps every exited descendant; true once none is left at all.
fn reap() -> bool {
    loop {
        let mut status = 0;
        let pid = unsafe { waitpid(-1, &mut status, WNOHANG) };
        if pid > 0 {
            continue;
        }
        return pid < 0; // ECHILD: no children at all; 0: some still running
    }
}

/// Our direct children by /proc (the orphans re-parented to us).
fn children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so parse after the last ')'.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else { continue };
        if after.split_whitespace().nth(1) == Some(me.as_str()) {
            found.push(pid);
        }
    }
    found
}

fn main() {
    let reap_secs: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(120);
    if unsafe { prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!("runner: cannot become a subreaper; detached helpers would go unmeasured");
        std::process::exit(1);
    }
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let mut parts = line.splitn(3, '\t');
        let (Some(cwd), Some(output), Some(command)) = (parts.next(), parts.next(), parts.next()) else {
            eprintln!("runner: bad request line: {line}");
            std::process::exit(2);
        };
        reap();
        let log = File::create(output).expect("output file");
        let started = Instant::now();
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .status();
        let nanos = started.elapsed().as_nanos();
        let code = match status {
            Ok(status) => status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            Err(e) => {
                eprintln!("runner: cannot run /bin/sh: {e}");
                255
            }
        };
        writeln!(out, "{code} {nanos}").expect("stdout");
        out.flush().expect("stdout");
    }
    let deadline = Instant::now() + Duration::from_secs(reap_secs);
    while !reap() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut stragglers = 0;
    for signal in [SIGTERM, SIGKILL] {
        let left = children();
        if left.is_empty() {
            break;
        }
        if signal == SIGTERM {
            stragglers = left.len();
        }
        for pid in left {
            unsafe { kill(pid, signal) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !reap() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut usage: Rusage = unsafe { std::mem::zeroed() };
    unsafe { getrusage(RUSAGE_CHILDREN, &mut usage) };
    writeln!(out, "peak {} {stragglers}", usage.maxrss).expect("stdout");
}
