//! Per-stack totals over time, merged across processes.
//!
//! Input: readings of the kernel ledger whose rows were already mapped to
//! process-independent stacks ([`StackIdx`], from `symbolize::Normalizer`).
//! Output: per stack, the current totals per process and a time series of
//! the combined outstanding bytes. Each reading is absolute (the kernel
//! keeps running totals), so a reading replaces the previous one; a stack
//! missing from a reading has nothing outstanding.

use std::collections::{BTreeMap, HashMap};

use tracer_common::StackTotals;

/// Index of a normalized stack in the normalizer's table.
pub type StackIdx = u32;

/// One row of a reading, after normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub stack: StackIdx,
    pub pid: u32,
    pub totals: StackTotals,
}

/// What the ledger knows of one stack.
#[derive(Clone, Debug, Default)]
pub struct StackState {
    /// Current totals per process.
    pub per_pid: BTreeMap<u32, StackTotals>,
    /// `(seconds since start, outstanding bytes over all processes)`.
    pub series: Vec<(f64, i64)>,
}

impl StackState {
    pub fn outstanding_bytes(&self) -> i64 {
        self.per_pid.values().map(|t| t.outstanding_bytes).sum()
    }
    pub fn outstanding_allocs(&self) -> i64 {
        self.per_pid.values().map(|t| t.outstanding_allocs).sum()
    }
    pub fn total_bytes(&self) -> u64 {
        self.per_pid.values().map(|t| t.total_bytes).sum()
    }
    pub fn total_allocs(&self) -> u64 {
        self.per_pid.values().map(|t| t.total_allocs).sum()
    }
    /// Pids with something outstanding on this stack.
    pub fn pids(&self) -> Vec<u32> {
        self.per_pid
            .iter()
            .filter(|(_, t)| t.outstanding_allocs > 0)
            .map(|(p, _)| *p)
            .collect()
    }
}

/// Bound on samples kept per stack; older samples are thinned by half.
const MAX_SERIES: usize = 512;

#[derive(Debug, Default)]
pub struct Ledger {
    pub stacks: HashMap<StackIdx, StackState>,
    pub samples: usize,
}

impl Ledger {
    /// The part of the ledger that belongs to one process (its rows; the
    /// series stay the combined ones).
    pub fn only_pid(&self, pid: u32) -> Ledger {
        let stacks = self
            .stacks
            .iter()
            .filter_map(|(idx, s)| {
                let t = s.per_pid.get(&pid)?;
                let mut per_pid = BTreeMap::new();
                per_pid.insert(pid, *t);
                Some((
                    *idx,
                    StackState {
                        per_pid,
                        series: s.series.clone(),
                    },
                ))
            })
            .collect();
        Ledger {
            stacks,
            samples: self.samples,
        }
    }

    /// Take a reading made at `t_s` seconds since the trace started.
    pub fn ingest(&mut self, t_s: f64, rows: &[Row]) {
        for state in self.stacks.values_mut() {
            state.per_pid.clear();
        }
        for row in rows {
            let state = self.stacks.entry(row.stack).or_default();
            let slot = state.per_pid.entry(row.pid).or_default();
            // Several kernel rows can map to one stack in one process (the
            // same code reached through different raw addresses).
            slot.outstanding_bytes += row.totals.outstanding_bytes;
            slot.outstanding_allocs += row.totals.outstanding_allocs;
            slot.total_bytes += row.totals.total_bytes;
            slot.total_allocs += row.totals.total_allocs;
        }
        for state in self.stacks.values_mut() {
            let bytes = state.outstanding_bytes();
            if state.series.is_empty() && self.samples > 0 {
                // A stack first seen now had nothing outstanding before.
                state.series.push((0.0, 0));
            }
            state.series.push((t_s, bytes));
            if state.series.len() > MAX_SERIES {
                let thinned = state.series.iter().step_by(2).copied().collect();
                state.series = thinned;
            }
        }
        self.samples += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(bytes: i64, allocs: i64, total: u64) -> StackTotals {
        StackTotals {
            outstanding_bytes: bytes,
            outstanding_allocs: allocs,
            total_bytes: total,
            total_allocs: allocs.max(0) as u64,
        }
    }

    #[test]
    fn same_stack_in_many_processes_is_one_row() {
        let mut l = Ledger::default();
        let rows: Vec<Row> = (100..110)
            .map(|pid| Row {
                stack: 7,
                pid,
                totals: totals(4096, 1, 4096),
            })
            .collect();
        l.ingest(1.0, &rows);
        let s = &l.stacks[&7];
        assert_eq!(s.outstanding_bytes(), 40960);
        assert_eq!(s.outstanding_allocs(), 10);
        assert_eq!(s.pids().len(), 10);
    }

    #[test]
    fn a_reading_replaces_the_last_and_freed_stacks_drop_to_zero() {
        let mut l = Ledger::default();
        l.ingest(
            1.0,
            &[Row {
                stack: 1,
                pid: 5,
                totals: totals(100, 1, 100),
            }],
        );
        l.ingest(
            2.0,
            &[Row {
                stack: 1,
                pid: 5,
                totals: totals(0, 0, 100),
            }],
        );
        let s = &l.stacks[&1];
        assert_eq!(s.outstanding_bytes(), 0);
        assert!(s.pids().is_empty());
        assert_eq!(s.series, vec![(1.0, 100), (2.0, 0)]);
    }

    #[test]
    fn stacks_first_seen_later_start_from_zero() {
        let mut l = Ledger::default();
        l.ingest(1.0, &[]);
        l.ingest(
            2.0,
            &[Row {
                stack: 3,
                pid: 1,
                totals: totals(10, 1, 10),
            }],
        );
        assert_eq!(l.stacks[&3].series, vec![(0.0, 0), (2.0, 10)]);
    }

    #[test]
    fn series_stays_bounded() {
        let mut l = Ledger::default();
        for i in 0..2000 {
            l.ingest(
                i as f64,
                &[Row {
                    stack: 1,
                    pid: 1,
                    totals: totals(i, 1, 0),
                }],
            );
        }
        assert!(l.stacks[&1].series.len() <= MAX_SERIES);
    }
}
