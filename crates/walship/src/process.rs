//! Questions about other processes on this host: is one alive, and is it still the same one.
//!
//! A pid alone may be reused; temporary files ([`crate::fs`]) and owner records of base backups carry
//! one, and these answers tell a leftover of a dead writer from work going on right now.

/// Whether a process with this id exists (ours or another user's).
pub fn exists(pid: libc::pid_t) -> bool {
    // Zero or negative would address process groups in kill(2).
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 delivers nothing; it only asks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat`): with the pid, it names one
/// process for good, since a pid may be reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may contain spaces; fields are counted after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}
