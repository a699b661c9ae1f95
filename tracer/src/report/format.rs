//! The report formats and the one entry point that writes any of them.
//!
//! Input: a [`Format`] (from `--format`, or from an output file's name),
//! a [`Report`], the build ids of its modules (only pprof uses them) and
//! a writer. Output: the report in that format, flushed.
//!
//! Invariants: [`Format::ALL`] lists every variant, and each has a file
//! name that [`Format::from_file_name`] maps back to it; a closed reader
//! (`leaktrace ... | head`) is not an error. Adding a format means a
//! variant here, its names, its arm in [`write`] and its writer module:
//! the CLI's value list is derived from this enum.

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::{folded, json, pprof, svg, text, Report};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For a terminal.
    Text,
    /// JSON: the `leaktrace.report/v1` schema (`leaktrace.node/v1` from
    /// `leaktrace node`).
    Json,
    /// Collapsed stacks (`frame;frame bytes`, root first) for flamegraph.pl
    /// and inferno.
    Folded,
    /// What grew: `frames before after` (differential folded).
    GrowthFolded,
    /// A flamegraph of outstanding bytes.
    Svg,
    /// A differential flamegraph of what grew between the first and last
    /// sample.
    GrowthSvg,
    /// gzipped profile.proto for `go tool pprof`, Pyroscope, Parca.
    Pprof,
}

impl Format {
    /// Every format, as written into an output directory.
    pub const ALL: [Format; 7] = [
        Format::Text,
        Format::Json,
        Format::Folded,
        Format::GrowthFolded,
        Format::Svg,
        Format::GrowthSvg,
        Format::Pprof,
    ];

    /// File name used in an output directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Format::Text => "report.txt",
            Format::Json => "report.json",
            Format::Folded => "report.folded",
            Format::GrowthFolded => "report.growth.folded",
            Format::Svg => "report.svg",
            Format::GrowthSvg => "report.growth.svg",
            Format::Pprof => "report.pb.gz",
        }
    }

    /// The format a file name asks for, by its ending.
    pub fn from_file_name(name: &str) -> Option<Format> {
        let n = name.to_ascii_lowercase();
        Some(if n.ends_with(".growth.svg") {
            Format::GrowthSvg
        } else if n.ends_with(".growth.folded") {
            Format::GrowthFolded
        } else if n.ends_with(".svg") {
            Format::Svg
        } else if n.ends_with(".folded") || n.ends_with(".collapsed") {
            Format::Folded
        } else if n.ends_with(".json") {
            Format::Json
        } else if n.ends_with(".pb.gz") || n.ends_with(".pprof") || n.ends_with(".pb") {
            Format::Pprof
        } else if n.ends_with(".txt") {
            Format::Text
        } else {
            return None;
        })
    }

    /// Whether the format wants every stack rather than the `--top` ones:
    /// flamegraphs and profiles are read by zooming in, so a cut would
    /// only hide memory.
    pub fn shows_every_stack(self) -> bool {
        !matches!(self, Format::Text | Format::Json)
    }
}

/// Write `report` in `format` and flush. `build_ids` (module path as in
/// the report -> hex build id) go on pprof's mappings. A broken pipe is
/// success: the reader has seen what it wanted.
pub fn write(
    format: Format,
    report: &Report,
    build_ids: &BTreeMap<String, String>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let res = match format {
        Format::Text => text::write(report, out),
        Format::Json => json::write(report, out),
        Format::Folded => folded::write(report, out),
        Format::GrowthFolded => folded::write_growth(report, out),
        Format::Svg => svg::write(report, out),
        Format::GrowthSvg => svg::write_growth_svg(report, out),
        Format::Pprof => pprof::write_with_build_ids(report, build_ids, out),
    }
    .and_then(|()| out.flush());
    match res {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::test_support::{sample_report, ClosedPipe};

    #[test]
    fn every_file_name_maps_back_to_its_format() {
        for f in Format::ALL {
            assert_eq!(Format::from_file_name(f.file_name()), Some(f), "{f:?}");
        }
        assert_eq!(
            Format::from_file_name("out/Leaks.COLLAPSED"),
            Some(Format::Folded)
        );
        assert_eq!(Format::from_file_name("heap.pprof"), Some(Format::Pprof));
        assert_eq!(Format::from_file_name("report.html"), None);
    }

    #[test]
    fn every_value_the_cli_accepts_is_in_all() {
        use clap::ValueEnum as _;
        assert_eq!(Format::value_variants(), Format::ALL.as_slice());
    }

    #[test]
    fn a_closed_reader_is_not_an_error_and_others_are() {
        let r = sample_report();
        for f in Format::ALL {
            write(f, &r, &BTreeMap::new(), &mut ClosedPipe)
                .unwrap_or_else(|e| panic!("{f:?} into a closed pipe: {e}"));
        }
        let mut full = [0u8; 4];
        let e = write(Format::Text, &r, &BTreeMap::new(), &mut full.as_mut_slice())
            .expect_err("a full buffer is an error");
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
    }

    #[test]
    fn each_format_writes_what_its_writer_does() {
        let r = sample_report();
        let mut direct = Vec::new();
        folded::write_growth(&r, &mut direct).expect("writing to a Vec cannot fail");
        let mut through = Vec::new();
        write(Format::GrowthFolded, &r, &BTreeMap::new(), &mut through)
            .expect("writing to a Vec cannot fail");
        assert_eq!(through, direct);
    }
}
