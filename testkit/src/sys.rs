//! Thin wrappers over the few libc calls the harness needs (signals, user lookup, SysV shared
//! memory) plus `/proc` readers. This is the only module allowed to use `unsafe`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// A signal the harness can send to a process it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `SIGTERM`: polite shutdown request.
    Term,
    /// `SIGINT`: what Ctrl-C sends; Postgres treats it as "fast shutdown".
    Int,
    /// `SIGQUIT`: Postgres treats it as "immediate shutdown".
    Quit,
    /// `SIGHUP`: reload configuration.
    Hup,
    /// `SIGKILL`: cannot be caught; the process dies at once.
    Kill,
    /// `SIGSTOP`: freeze the process (cannot be caught).
    Stop,
    /// `SIGCONT`: resume a process frozen by [`Signal::Stop`].
    Cont,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Quit => libc::SIGQUIT,
            Signal::Hup => libc::SIGHUP,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        }
    }
}

/// Sends `signal` to the process `pid`.
pub(crate) fn send(pid: u32, signal: Signal) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, signal.number()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to every process of the process group `pgid`.
pub(crate) fn send_group(pgid: u32, signal: Signal) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pgid out of range"))?;
    // SAFETY: killpg(2) takes plain integers and has no memory-safety preconditions.
    let rc = unsafe { libc::killpg(pgid, signal.number()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The effective user id of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Looks up a user's uid and primary gid by name.
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero `passwd` is a valid value (null pointers, zero ids); getpwnam_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and `buf.len()` is the true
    // length of `buf`; getpwnam_r is the thread-safe variant.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return Ok(None);
    }
    Ok(Some((pwd.pw_uid, pwd.pw_gid)))
}

/// Removes a SysV shared memory segment by id (ignoring "already gone").
pub(crate) fn remove_shm_segment(shmid: i32) {
    // SAFETY: IPC_RMID does not read or write the buffer argument, so null is allowed.
    unsafe {
        libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
    }
}

/// State letter and parent pid of a process from `/proc/<pid>/stat`, or `None` if it is gone.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while `pid` exists and is not a zombie.
pub(crate) fn is_alive(pid: u32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Waits (blocking, bounded) until `pid` has stopped after a `SIGSTOP`.
pub(crate) fn wait_stopped(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match stat(pid) {
            Some(('T', _)) | Some(('t', _)) | None | Some(('Z', _)) => return true,
            _ if Instant::now() >= deadline => return false,
            _ => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Pids of the live processes whose parent is `parent`.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| matches!(stat(pid), Some((state, ppid)) if ppid == parent && state != 'Z'))
        .collect()
}

/// Waits (blocking, bounded) until none of `pids` is alive; returns the ones still alive.
pub(crate) fn wait_all_dead(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Reads a `kB` field (e.g. `VmRSS`) of `/proc/<pid>/status`.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}
