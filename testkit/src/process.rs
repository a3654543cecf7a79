//! Binaries under test (`cdc`, `view-agent`) as child processes with their output captured to
//! files, signals, bounded waits and memory readings.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::sys::{self, Signal};
use crate::{read_log, tail, temp_dir};

/// Output lines shown by [`ChildProcess::describe`] and on panic.
const OUTPUT_TAIL_LINES: usize = 60;

/// A process started by [`spawn_logged`]: stdout and stderr go to files in its own temp dir,
/// stdin is `/dev/null`, and it leads its own process group. SIGKILLed (with its group) on drop.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    /// Holds the output files; removed on drop (after `Drop::drop` ran).
    _dir: tempfile::TempDir,
}

/// Spawns `cmd` (a `std::process::Command`; build it with e.g.
/// `Command::new(env!("CARGO_BIN_EXE_cdc"))`) with output captured to files. `name` labels the
/// process in messages.
pub fn spawn_logged(mut cmd: Command, name: &str) -> Result<ChildProcess> {
    let dir = temp_dir(&sanitize(name))?;
    let stdout_path = dir.path().join("stdout.log");
    let stderr_path = dir.path().join("stderr.log");
    let stdout = File::create(&stdout_path).context("creating the stdout file")?;
    let stderr = File::create(&stderr_path).context("creating the stderr file")?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {name} ({:?})", cmd.get_program()))?;
    Ok(ChildProcess {
        name: name.to_owned(),
        child,
        status: None,
        stdout_path,
        stderr_path,
        _dir: dir,
    })
}

impl ChildProcess {
    /// The label given to [`spawn_logged`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process (not its group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        sys::send(self.pid(), signal)
            .with_context(|| format!("sending {signal:?} to {} (pid {})", self.name, self.pid()))
    }

    /// SIGKILLs the process and everything in its process group, then reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        if self.status.is_some() {
            bail!("{} has already exited", self.name);
        }
        let _ = sys::send_group(self.pid(), Signal::Kill);
        let status = self
            .child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        self.status = Some(status);
        Ok(())
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("checking {}", self.name))?;
        }
        Ok(self.status)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; the error includes its output tails.
    pub async fn wait_with_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {} to exit\n{}",
                    self.name,
                    self.describe()
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` until stdout or stderr contains `needle` (e.g. a "ready" log line);
    /// fails early if the process exits first.
    pub async fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                bail!(
                    "{} exited ({status}) before printing {needle:?}\n{}",
                    self.name,
                    self.describe()
                );
            }
            if start.elapsed() >= timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {} to print {needle:?}\n{}",
                    self.name,
                    self.describe()
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        read_log(&self.stdout_path)
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        read_log(&self.stderr_path)
    }

    /// Path of the captured stdout file.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// Path of the captured stderr file.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Name, pid, state and the tails of stdout and stderr, for failure messages.
    pub fn describe(&self) -> String {
        let state = match self.status {
            Some(status) => format!("exited: {status}"),
            None => "running".to_owned(),
        };
        format!(
            "== {} (pid {}, {state}) stdout ==\n{}\n== {} stderr ==\n{}",
            self.name,
            self.pid(),
            tail(&self.stdout(), OUTPUT_TAIL_LINES),
            self.name,
            tail(&self.stderr(), OUTPUT_TAIL_LINES)
        )
    }

    /// Current resident memory in KiB (`VmRSS`), `None` once the process is gone.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid())
    }

    /// Peak resident memory in KiB (`VmHWM`), `None` once the process is gone.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(self.pid())
    }

    /// CPU time used so far, `None` once the process is gone.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(self.pid())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
        if self.status.is_none() {
            let _ = sys::send_group(self.pid(), Signal::Kill);
            let _ = self.child.wait();
        }
    }
}

/// CPU time (user + system) a process has used so far, `None` once it is gone. Benchmarks
/// print it beside their rates: it is steadier than wall time on a shared machine.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_time(&stat)
}

/// The CPU time (user + system) in one `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`
/// line; `None` when the line does not have the fields.
pub fn stat_cpu_time(stat: &str) -> Option<Duration> {
    // The fields after the parenthesised command name; utime and stime are fields 14 and 15
    // of the whole line, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Current resident memory of any process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    sys::status_kib(pid, "VmRSS")
}

/// Peak resident memory of any process in KiB (`VmHWM` of `/proc/<pid>/status`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    sys::status_kib(pid, "VmHWM")
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::ensure;

    #[tokio::test]
    async fn captures_output_and_exit_status() -> Result<()> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let mut child = spawn_logged(cmd, "sh")?;
        let status = child.wait_with_timeout(Duration::from_secs(10)).await?;
        ensure!(status.code() == Some(3), "{status}");
        ensure!(child.stdout() == "out\n", "{}", child.describe());
        ensure!(child.stderr() == "err\n", "{}", child.describe());
        Ok(())
    }

    #[tokio::test]
    async fn signals_and_memory() -> Result<()> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready; exec sleep 60"]);
        let mut child = spawn_logged(cmd, "sleeper")?;
        child
            .wait_for_output("ready", Duration::from_secs(10))
            .await?;
        ensure!(child.rss_kib().is_some_and(|kib| kib > 0));
        ensure!(child.peak_rss_kib().is_some_and(|kib| kib > 0));
        child.signal(Signal::Term)?;
        let status = child.wait_with_timeout(Duration::from_secs(10)).await?;
        ensure!(!status.success());
        ensure!(child.kill9().is_err(), "kill9 after exit must fail");
        Ok(())
    }
}
