//! `--format json`: the `leaktrace.report/v1` schema.

use std::io::{self, Write};

use super::Report;

pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, report).map_err(io::Error::other)?;
    writeln!(out)
}
