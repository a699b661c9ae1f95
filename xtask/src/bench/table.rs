//! Markdown tables and their cells: a row per measured configuration, a
//! "not measured: why" row for one that failed, marks (`†`, `‡`, ...) on
//! rows measured while other eBPF tracers ran, and the note naming them.
//!
//! Imports: `super` (`Row`, `one_line`), `harness` (the report type).
//! Formats only.

use std::fmt::Write as _;

use anyhow::Result;

use super::{harness::LeaktraceReport, one_line, Row};

/// A table being written into `s`: its width, and the marks given so far.
pub(super) struct Table<'a> {
    s: &'a mut String,
    width: usize,
    crowded: Vec<(String, String)>,
}

impl<'a> Table<'a> {
    /// Writes the header.
    pub(super) fn new(s: &'a mut String, header: &[&str]) -> Result<Table<'a>> {
        writeln!(s, "| {} |", header.join(" | "))?;
        writeln!(s, "|{}", "---|".repeat(header.len()))?;
        Ok(Table {
            s,
            width: header.len(),
            crowded: Vec::new(),
        })
    }

    /// A row labelled `label`: `cells` (after the label) of what was
    /// measured, or why it was not.
    pub(super) fn row<T>(
        &mut self,
        label: &str,
        others: &[String],
        result: &Result<T, String>,
        cells: impl FnOnce(&T) -> Vec<String>,
    ) -> Result<()> {
        let label = mark(label, others, &mut self.crowded);
        let row = match result {
            Ok(m) => std::iter::once(label).chain(cells(m)).collect(),
            Err(e) => failed_row(&label, e, self.width),
        };
        writeln!(self.s, "| {} |", row.join(" | "))?;
        Ok(())
    }

    /// A row labelled as measured.
    pub(super) fn measured<T>(
        &mut self,
        row: &Row<T>,
        cells: impl FnOnce(&T) -> Vec<String>,
    ) -> Result<()> {
        self.row(&row.label, &row.others, &row.result, cells)
    }

    /// Ends the table (a blank line); the rows that were marked, for
    /// [`crowded_note`] under the table's other notes.
    pub(super) fn finish(self) -> Result<Vec<(String, String)>> {
        writeln!(self.s)?;
        Ok(self.crowded)
    }
}

/// Marks a row during which other eBPF tracers ran (`†`, `‡`, ...) and
/// remembers which, for the note under the table.
fn mark(label: &str, others: &[String], crowded: &mut Vec<(String, String)>) -> String {
    const MARKS: [&str; 6] = ["†", "‡", "§", "¶", "‖", "#"];
    if others.is_empty() {
        return label.to_string();
    }
    let list = others.join(", ");
    let idx = match crowded.iter().position(|(_, l)| *l == list) {
        Some(i) => i,
        None => {
            let m = MARKS
                .get(crowded.len())
                .map_or_else(|| format!("[{}]", crowded.len() + 1), |m| m.to_string());
            crowded.push((m, list));
            crowded.len() - 1
        }
    };
    format!("{} {}", label, crowded[idx].0)
}

pub(super) fn crowded_note(s: &mut String, crowded: &[(String, String)]) -> Result<()> {
    if crowded.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = crowded.iter().map(|(m, l)| format!("{m} {l}")).collect();
    writeln!(
        s,
        "- other eBPF tracers were running on this machine during the marked rows (name, pid): \
         {}. Probes on the same libc function are shared by every tracer (each trap runs every \
         consumer's filter), and their targets compete for the cores, so those rows are less \
         trustworthy.",
        list.join("; ")
    )?;
    Ok(())
}

pub(super) fn lost_cell(r: &LeaktraceReport) -> String {
    match (r.lost_events, r.allocs) {
        (Some(l), Some(a)) => format!("{} of {} allocs", thousands(l), thousands(a)),
        (Some(l), None) => thousands(l),
        _ => "not in report".into(),
    }
}

fn failed_row(label: &str, e: &str, width: usize) -> Vec<String> {
    let mut row = vec![label.to_string(), format!("not measured: {}", one_line(e))];
    row.resize(width, "—".into());
    row
}

pub(super) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub(super) fn thousands(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits() {
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn rows_with_the_same_company_share_a_mark() {
        let mut crowded = Vec::new();
        assert_eq!(mark("a", &[], &mut crowded), "a");
        let x = vec!["leaktrace (7)".to_string()];
        assert_eq!(mark("b", &x, &mut crowded), "b †");
        assert_eq!(mark("c", &x, &mut crowded), "c †");
        assert_eq!(mark("d", &["bpftrace (9)".into()], &mut crowded), "d ‡");
        assert_eq!(crowded.len(), 2);
    }
}
