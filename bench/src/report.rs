//! What a benchmark row reports: table lines (result, what it is measured beside, targets) and
//! the raw numbers for the JSON file; the machine the run happened on.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// One line of the markdown table.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// The issue's row number (1–6).
    pub row: u8,
    /// What is measured.
    pub measurement: String,
    /// The result.
    pub result: String,
    /// Ceilings and baselines measured in the same run, with the result's share of them.
    pub beside: String,
    /// The targets this line is held to.
    pub targets: Vec<Target>,
}

/// A target and whether the result meets it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The target, e.g. `p99 ≤ 10 ms`.
    pub text: String,
    /// Whether this run met it.
    pub met: bool,
}

impl Target {
    /// A target `text` met when `met`.
    pub fn new(text: impl Into<String>, met: bool) -> Target {
        Target {
            text: text.into(),
            met,
        }
    }
}

/// What one row of the benchmark produced.
#[derive(Debug, Serialize)]
pub struct RowReport {
    /// Short name (`throughput`, `latency`, …).
    pub name: &'static str,
    /// Lines of the table.
    pub lines: Vec<Line>,
    /// The row's raw numbers.
    pub data: serde_json::Value,
    /// How busy the machine's CPUs were while the row ran (every process, percent).
    pub machine_busy_percent: f64,
}

/// The markdown table of all lines: result, the ceilings beside it, targets and whether each
/// is met.
pub fn table(lines: &[Line]) -> String {
    let mut out = String::new();
    out.push_str("| # | measurement | result | beside it, same run | target | met |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for l in lines {
        let target = if l.targets.is_empty() {
            "–".to_owned()
        } else {
            l.targets
                .iter()
                .map(|t| t.text.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let met = if l.targets.is_empty() {
            "–".to_owned()
        } else {
            l.targets
                .iter()
                .map(|t| if t.met { "yes" } else { "**no**" })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            l.row, l.measurement, l.result, l.beside, target, met
        );
    }
    out
}

/// A rate with thousands separators: `72,208`.
pub fn rate(per_sec: f64) -> String {
    thousands(per_sec.round() as u64)
}

/// An integer with thousands separators.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A percentage of `of`: `62%`.
pub fn percent(part: f64, of: f64) -> String {
    if of > 0.0 {
        format!("{:.0}%", 100.0 * part / of)
    } else {
        "–".to_owned()
    }
}

/// Microseconds per unit of CPU time over `n` units.
pub fn micros_per(cpu: Duration, n: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / n.max(1) as f64
}

/// The rate `cores` CPUs would allow if a job cost no more than its parts measured beside it
/// (µs of CPU per item each) and the parts overlapped perfectly: what the machine allows, not
/// what any one part could do alone.
pub fn cpu_bound(cores: usize, parts_us_per_item: &[f64]) -> f64 {
    let per_item: f64 = parts_us_per_item.iter().sum();
    if per_item > 0.0 {
        cores as f64 * 1e6 / per_item
    } else {
        f64::INFINITY
    }
}

/// The CPUs of this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Milliseconds with a precision that suits the size.
pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Machine {
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// OS (`/etc/os-release` PRETTY_NAME) and kernel.
    pub os: String,
    /// `postgres --version`.
    pub postgres: String,
    /// `nats-server --version`.
    pub nats_server: String,
    /// Load averages (1, 5, 15 min) when the run started.
    pub load_start: [f64; 3],
    /// Load averages when it ended.
    pub load_end: [f64; 3],
}

impl Machine {
    /// Reads what the machine says about itself; unknown parts read `unknown`.
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_gib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        let os = os_release
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map_or("unknown".to_owned(), |v| v.trim_matches('"').to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("unknown".to_owned(), |v| v.trim().to_owned());
        Machine {
            cpu,
            cpus,
            memory_gib,
            os: format!("{os}, Linux {kernel}"),
            postgres: version_of("postgres"),
            nats_server: version_of("nats-server"),
            load_start: load_average(),
            load_end: [0.0; 3],
        }
    }

    /// One line for the report's header.
    pub fn summary(&self) -> String {
        format!(
            "{} × {} ({:.0} GiB), {}; {}; {}; load average {:.2} at the start, {:.2} at the end",
            self.cpus,
            self.cpu,
            self.memory_gib,
            self.os,
            self.postgres,
            self.nats_server,
            self.load_start[0],
            self.load_end[0],
        )
    }
}

/// The load averages of `/proc/loadavg`.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
    ]
}

fn version_of(binary: &str) -> String {
    testkit::find_binary(binary)
        .ok()
        .and_then(|path| {
            std::process::Command::new(path)
                .arg("--version")
                .output()
                .ok()
        })
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn table_marks_missed_targets() {
        let lines = [Line {
            row: 1,
            measurement: "m".into(),
            result: "r".into(),
            beside: "b".into(),
            targets: vec![Target::new("t1", true), Target::new("t2", false)],
        }];
        let t = table(&lines);
        assert!(
            t.contains("| 1 | m | r | b | t1; t2 | yes; **no** |"),
            "{t}"
        );
    }
}
