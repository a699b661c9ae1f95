//! `--format folded`: Brendan Gregg's collapsed stacks, the input of
//! flamegraph tools (inferno, `flamegraph.pl`, speedscope).
//!
//! Input: a [`Report`]. Output: one line per distinct stack, frames root
//! first joined by `;`, a space, then a count:
//! - [`write`]: outstanding bytes at the end of the trace;
//! - [`write_growth`]: the differential form `frames before after` (bytes at
//!   the first sample, bytes at the last), which inferno and
//!   `difffolded.pl` draw as a growth flamegraph.
//!
//! Invariants: lines are sorted and unique (stacks that render the same
//! are summed); inlined frames are kept as frames of their own; a frame
//! name never holds `;`, a line break or a tab, and never ends in a space
//! followed by a number (a folded reader would take it for a count).
//! Stacks with nothing to count are left out.

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::{Frame, Report, StackReport};

/// The name a frame has in folded stacks and flamegraphs: the function, or
/// `[module+0xoffset]` (module as a base name) when it is unknown.
pub fn frame_name(f: &Frame) -> String {
    let raw = match (&f.function, &f.module, f.offset) {
        (Some(func), _, _) => func.clone(),
        (None, Some(m), Some(off)) => format!("[{}+{off:#x}]", basename(m)),
        (None, Some(m), None) => format!("[{}]", basename(m)),
        (None, None, Some(off)) => format!("[{off:#x}]"),
        (None, None, None) => "[unknown]".to_string(),
    };
    sanitize(&raw)
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Make a name safe for one field of a folded line.
fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| match c {
            // `;` is the separator (Rust types such as `[u8; 8]` hold one).
            ';' => ':',
            '\n' | '\r' | '\t' => ' ',
            c => c,
        })
        .collect::<String>()
        .trim()
        .to_string();
    // Readers find the count after the last space; a name ending in
    // " 123" or " 1.5" would be read as a count (or two).
    if let Some(sp) = s.rfind(' ') {
        let tail = &s[sp + 1..];
        if !tail.is_empty() && tail.chars().all(|c| c.is_ascii_digit() || c == '.') {
            s.replace_range(sp..sp + 1, "_");
        }
    }
    if s.is_empty() {
        s.push_str("[unknown]");
    }
    s
}

/// The frames of a stack, root first, joined by `;`.
pub fn stack_line(stack: &StackReport) -> String {
    if stack.frames.is_empty() {
        return "[no frames]".to_string();
    }
    let names: Vec<String> = stack.frames.iter().rev().map(frame_name).collect();
    names.join(";")
}

/// Outstanding bytes per stack, as collapsed stacks.
pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for s in &report.stacks {
        let bytes = s.outstanding_bytes;
        if bytes > 0 {
            *lines.entry(stack_line(s)).or_default() += bytes as u64;
        }
    }
    for (stack, bytes) in &lines {
        writeln!(out, "{stack} {bytes}")?;
    }
    Ok(())
}

/// One differential line per stack: `frames before after`.
pub struct GrowthLine {
    pub stack: String,
    /// Outstanding bytes at the first sample of the trace.
    pub before: u64,
    /// Outstanding bytes at the last sample.
    pub after: u64,
}

/// The rows of [`write_growth`], sorted by stack.
pub fn growth_lines(report: &Report) -> Vec<GrowthLine> {
    let mut lines: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in &report.stacks {
        let before = s.first_sample_bytes.max(0) as u64;
        let after = s.last_sample_bytes().max(0) as u64;
        if before == 0 && after == 0 {
            continue;
        }
        let e = lines.entry(stack_line(s)).or_default();
        e.0 += before;
        e.1 += after;
    }
    lines
        .into_iter()
        .map(|(stack, (before, after))| GrowthLine {
            stack,
            before,
            after,
        })
        .collect()
}

/// Bytes at the first and at the last sample per stack, in inferno's
/// differential folded form (`inferno-flamegraph` draws it directly; the
/// colour is the change, the width the bytes at the end).
pub fn write_growth(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    for l in growth_lines(report) {
        writeln!(out, "{} {} {}", l.stack, l.before, l.after)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::test_support::{check_golden, sample_report};
    use crate::report::FrameKind;

    fn render(f: fn(&Report, &mut dyn Write) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&sample_report(), &mut buf).expect("writing to a Vec cannot fail");
        String::from_utf8(buf).expect("folded output is UTF-8")
    }

    #[test]
    fn folded_matches_golden() {
        check_golden("folded/report.folded", &render(write));
    }

    #[test]
    fn growth_folded_matches_golden() {
        check_golden("folded/report.growth.folded", &render(write_growth));
    }

    #[test]
    fn frames_are_root_first_with_inlined_and_unknown_frames() {
        let out = render(write);
        assert!(
            out.contains("__libc_start_call_main;main;list_push;make_node 409600\n"),
            "{out}"
        );
        assert!(
            out.contains("<module>;Cache.put;[libpython3.11.so.1.0+0x1a2b3c] 65536\n"),
            "{out}"
        );
    }

    #[test]
    fn growth_uses_first_and_last_sample() {
        let out = render(write_growth);
        assert!(out.contains(";make_node 102400 409600\n"), "{out}");
        // First seen after the first sample: it starts from nothing.
        assert!(
            out.contains("[libpython3.11.so.1.0+0x1a2b3c] 0 65536\n"),
            "{out}"
        );
        assert!(out.contains(";luaM_malloc_ 3000 1000\n"), "{out}");
    }

    #[test]
    fn names_cannot_break_the_format() {
        let f = |name: &str| Frame {
            function: Some(name.to_string()),
            module: None,
            file: None,
            line: None,
            kind: FrameKind::Native,
            inlined: false,
            offset: None,
        };
        assert_eq!(
            frame_name(&f("<[u8; 8] as Foo>::bar")),
            "<[u8: 8] as Foo>::bar"
        );
        assert_eq!(frame_name(&f("two\nlines\there")), "two lines here");
        assert_eq!(frame_name(&f("lambda 12")), "lambda_12");
        assert_eq!(frame_name(&f("operator new")), "operator new");
        assert_eq!(frame_name(&f("  ")), "[unknown]");
        let mut unknown = f("");
        unknown.function = None;
        assert_eq!(frame_name(&unknown), "[unknown]");
        unknown.offset = Some(0x10);
        assert_eq!(frame_name(&unknown), "[0x10]");
    }

    #[test]
    fn identical_stacks_are_summed() {
        let mut r = sample_report();
        let dup = r.stacks[0].clone();
        r.stacks.push(dup);
        let mut buf = Vec::new();
        write(&r, &mut buf).expect("write to Vec");
        let out = String::from_utf8(buf).expect("utf-8");
        assert!(out.contains(";make_node 819200\n"), "{out}");
        assert_eq!(out.matches("make_node").count(), 1, "{out}");
    }
}
