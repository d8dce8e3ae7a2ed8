//! CPU time and peak memory, read from `/proc` (Linux; `None` elsewhere).
//!
//! The crate forbids `unsafe`, so there is no `getrusage` or `sysconf`:
//! the figures come from the text files the kernel already keeps.

use std::time::Duration;

/// Clock ticks per second in `/proc/*/stat` (`getconf CLK_TCK`). The kernel
/// reports in USER_HZ, which is 100 on every Linux architecture idemq
/// builds for; reading it at run time would need `libc::sysconf`.
const CLOCK_TICKS_PER_SEC: u64 = 100;

/// User plus system CPU time of this process, all threads.
pub(super) fn process_cpu() -> Option<Duration> {
    cpu_time("/proc/self/stat")
}

/// User plus system CPU time of the calling thread.
pub(super) fn thread_cpu() -> Option<Duration> {
    cpu_time("/proc/thread-self/stat")
}

/// User plus system CPU time of another process.
pub(super) fn pid_cpu(pid: u32) -> Option<Duration> {
    cpu_time(&format!("/proc/{pid}/stat"))
}

fn cpu_time(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Field 2, the command name, may hold spaces and parentheses: count
    // the fields after its closing parenthesis. There, index 0 is field 3
    // (state), so utime (field 14) and stime (field 15) are 11 and 12.
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / CLOCK_TICKS_PER_SEC,
    ))
}

/// The peak resident set size (`VmHWM`) of this process, or of `pid`, in bytes.
pub(super) fn peak_rss(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Resets the peak RSS of this process, or of `pid`, to its current RSS,
/// so the next [`peak_rss`] covers one pass only. Returns false where the
/// kernel does not allow it (before Linux 4.0, another user's process, no
/// `/proc`).
pub(super) fn reset_peak_rss(pid: Option<u32>) -> bool {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/clear_refs"),
        None => "/proc/self/clear_refs".to_owned(),
    };
    std::fs::write(path, "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        assert!(process_cpu().is_some());
        assert!(thread_cpu().is_some());
        assert!(peak_rss(None).is_some_and(|bytes| bytes > 0));
    }
}
