//! Command-line flags, parsed by clap into [`Args`], then validated into a
//! [`Config`] the daemon runs from.

use std::{path::PathBuf, time::Duration};

use clap::Parser;

use crate::report::SortBy;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Find the call stacks that hold growing memory in live processes.
///
/// Attaches eBPF uprobes to the allocator of each target (no restart, no
/// LD_PRELOAD), pairs allocations with frees per stack in the kernel, and
/// reports the stacks whose outstanding bytes grow. Without a target it
/// runs a built-in demo. Exit codes: 0 done, 2 error.
#[derive(Debug, Parser)]
#[command(name = "leaktrace", version, about, long_about)]
pub struct Args {
    /// Process to trace (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Seconds between periodic reports (0: only the final report)
    /// [default: 10; 2 in the demo].
    #[arg(short = 'i', long, value_name = "SECS")]
    pub interval: Option<f64>,
    /// Stop after this many seconds (default: until Ctrl-C, SIGTERM or all
    /// targets exit).
    #[arg(short = 'd', long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Stacks to show in each report.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Format of the final report.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write the final report to this file instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Order stacks by growth rate or by outstanding bytes.
    #[arg(long, value_enum, default_value_t = SortBy::Growth)]
    pub sort: SortBy,
    /// Seconds between readings of the kernel ledger (the growth series).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub sample_every: f64,
    /// Most live allocations tracked at once (kernel map size).
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    pub max_allocs: u32,
    /// Most distinct stacks tracked (kernel map size).
    #[arg(long, value_name = "N", default_value_t = 1 << 16)]
    pub max_stacks: u32,
    /// Run the built-in demo (also what happens with no --pid).
    #[arg(long)]
    pub demo: bool,
    /// Benchmarking only: probe `free` at its first instruction instead of
    /// the cheaper point the prologue decoder picks.
    #[arg(long, hide = true)]
    pub free_probe_at_entry: bool,
    /// Internal: be the demo's leaking program.
    #[arg(long, hide = true)]
    pub demo_target: bool,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub pids: Vec<u32>,
    pub demo: bool,
    pub interval: Option<Duration>,
    pub duration: Option<Duration>,
    pub top: usize,
    pub format: Format,
    pub output: Option<PathBuf>,
    pub sort: SortBy,
    pub sample_every: Duration,
    pub max_allocs: u32,
    pub max_stacks: u32,
    pub free_probe_at_entry: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag} must be a finite number of seconds >= {min}, not {value}")]
    BadSeconds {
        flag: &'static str,
        min: f64,
        value: f64,
    },
    #[error("--{flag} must be at least {min}")]
    TooSmall { flag: &'static str, min: u64 },
}

fn secs(flag: &'static str, value: f64, min: f64) -> Result<Duration, ConfigError> {
    if !value.is_finite() || value < min {
        return Err(ConfigError::BadSeconds { flag, min, value });
    }
    Ok(Duration::from_secs_f64(value))
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let demo = self.demo || self.pids.is_empty();
        let interval = secs(
            "interval",
            self.interval.unwrap_or(if demo { 2.0 } else { 10.0 }),
            0.0,
        )?;
        let duration = match self.duration {
            Some(d) => Some(secs("duration", d, 0.0)?),
            // The demo shows a few seconds of a leak, then its report.
            None if demo => Some(Duration::from_secs(6)),
            None => None,
        };
        let sample_every = secs("sample-every", self.sample_every, 0.05)?;
        if self.top == 0 {
            return Err(ConfigError::TooSmall {
                flag: "top",
                min: 1,
            });
        }
        if self.max_allocs < 1024 {
            return Err(ConfigError::TooSmall {
                flag: "max-allocs",
                min: 1024,
            });
        }
        if self.max_stacks < 64 {
            return Err(ConfigError::TooSmall {
                flag: "max-stacks",
                min: 64,
            });
        }
        Ok(Config {
            pids: self.pids,
            demo,
            interval: (!interval.is_zero()).then_some(interval),
            duration,
            top: self.top,
            format: self.format,
            output: self.output,
            sort: self.sort,
            sample_every,
            max_allocs: self.max_allocs,
            max_stacks: self.max_stacks,
            free_probe_at_entry: self.free_probe_at_entry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["leaktrace"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn no_pid_means_demo() {
        let c = parse(&[]).expect("valid");
        assert!(c.demo);
        assert!(c.duration.is_some());
    }

    #[test]
    fn pids_repeat_and_zero_interval_disables() {
        let c = parse(&["-p", "1", "-p", "2", "-i", "0"]).expect("valid");
        assert_eq!(c.pids, vec![1, 2]);
        assert!(!c.demo);
        assert!(c.interval.is_none());
        assert!(c.duration.is_none());
    }

    #[test]
    fn bad_numbers_are_rejected() {
        assert!(parse(&["-p", "1", "-i=-1"]).is_err());
        assert!(parse(&["-p", "1", "-d", "nan"]).is_err());
        assert!(parse(&["-p", "1", "-n", "0"]).is_err());
    }
}
