//! `--format json`: the `leaktrace.report/v1` schema.
//!
//! Input: a [`Report`]. Output: the report serialized by serde, pretty
//! printed, one trailing newline.
//!
//! Invariants: the same report gives the same bytes. Fields come out in
//! declaration order, `counters` is a `BTreeMap` (sorted by name), and the
//! stacks come in the report's order, which `report::build` fixes
//! whatever order the ledger's and the counters' hash maps iterate in.

use std::io::{self, Write};

use super::Report;

pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    // From keeps the kind of a write error, so a closed reader is still a
    // BrokenPipe to the caller.
    serde_json::to_writer_pretty(&mut *out, report).map_err(io::Error::from)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::events::Counters;
    use crate::ingest::ledger::{Ledger, Row};
    use crate::report::test_support::{check_golden, sample_report, ClosedPipe};
    use crate::report::{build, Inputs, SortBy};

    fn render(report: &Report) -> String {
        let mut buf = Vec::new();
        write(report, &mut buf).expect("writing to a Vec cannot fail");
        String::from_utf8(buf).expect("JSON is UTF-8")
    }

    #[test]
    fn json_matches_golden() {
        check_golden("json/report.json", &render(&sample_report()));
    }

    #[test]
    fn a_closed_reader_is_reported_as_such() {
        let e = write(&sample_report(), &mut ClosedPipe).expect_err("the pipe is closed");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    /// A report built from a ledger and counters filled in `order`; many
    /// stacks tie on every sort key, so only the tie-break orders them.
    fn built(order: &[u32]) -> Report {
        let mut ledger = Ledger::default();
        let rows: Vec<Row> = order
            .iter()
            .map(|&i| Row {
                stack: i,
                pid: 100 + i % 3,
                totals: tracer_common::StackTotals {
                    outstanding_bytes: 4096 * i64::from(1 + i % 2),
                    outstanding_allocs: 1,
                    total_bytes: 8192,
                    total_allocs: 2,
                },
            })
            .collect();
        ledger.ingest(1.0, &rows);
        ledger.ingest(2.0, &rows);
        let mut names: Vec<&'static str> = tracer_common::Counter::ALL
            .iter()
            .map(|c| c.name())
            .collect();
        if order.first() > order.last() {
            names.reverse();
        }
        let counters = Counters(names.iter().map(|n| (*n, n.len() as u64)).collect());
        build(
            Inputs {
                duration_s: 2.0,
                targets: vec![],
                counters: &counters,
                ledger: &ledger,
                top: 40,
                sort: SortBy::Growth,
                notes: vec![],
                sample_bytes: 0,
                figures: vec![],
            },
            &mut |idxs| {
                idxs.iter()
                    .map(|i| vec![crate::report::Frame::marker(format!("stack {i}"), None)])
                    .collect()
            },
        )
    }

    #[test]
    fn hash_map_order_does_not_reach_the_json() {
        let forward: Vec<u32> = (1..=64).collect();
        let backward: Vec<u32> = forward.iter().rev().copied().collect();
        let (a, b) = (render(&built(&forward)), render(&built(&backward)));
        assert_eq!(
            a, b,
            "the same report twice, hash maps filled in other orders"
        );
        assert_eq!(render(&built(&forward)), a, "the same report again");
        assert!(a.contains("\"stack 2\""), "{a}");
    }
}
