//! `--format svg`: flamegraphs drawn by inferno from the folded stacks.
//!
//! Input: a [`Report`]. Output: a self-contained interactive SVG (zoom,
//! search and a tooltip per frame come from inferno's embedded script).
//! - [`write`]: width is the bytes outstanding at the end of the trace;
//!   each frame is coloured by its kind (native red, kernel orange,
//!   Python green, Lua blue, Go aqua), with a shade picked from a
//!   hash of the name so the output is the same on every run, and carries
//!   `class="kind-<kind>"` so a stylesheet can restyle one kind.
//! - [`write_growth_svg`]: the differential flamegraph of
//!   [`folded::write_growth`]'s data: width is the bytes at the end, red
//!   frames grew since the first sample, blue ones shrank.
//!
//! A report with nothing outstanding gives a small SVG that says so
//! (inferno would give an error).

use std::io::{self, Write};

use inferno::flamegraph::{
    self,
    color::{Color, PaletteMap},
    FuncFrameAttrsMap, Options,
};

use super::{folded, FrameKind, Report};

/// The CSS class of a frame of this kind.
fn kind_name(kind: FrameKind) -> &'static str {
    match kind {
        FrameKind::Native => "native",
        FrameKind::Python => "python",
        FrameKind::Lua => "lua",
        FrameKind::Go => "go",
        FrameKind::Kernel => "kernel",
    }
}

/// FNV-1a of the name, as two numbers in `0..1` (inferno's
/// `deterministic` option does the same; its palettes are not per frame).
fn name_hash(name: &str) -> [f32; 2] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = [0.0; 2];
    for byte in name.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    for v in &mut out {
        *v = (h >> 40) as f32 / (1u64 << 24) as f32;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    out
}

/// A colour of the kind's hue, varied by the name.
fn color_for(kind: FrameKind, name: &str) -> Color {
    let [v1, v2] = name_hash(name);
    let t = |base: u8, span: f32, v: f32| base.saturating_add((span * v) as u8);
    let (r, g, b) = match kind {
        // FlameGraph's convention: user native code red, kernel orange;
        // the interpreters and Go get hues of their own.
        FrameKind::Native => (t(200, 55.0, v1), t(50, 80.0, v2), t(50, 80.0, v2)),
        FrameKind::Kernel => (t(190, 65.0, v1), t(90, 65.0, v2), 0),
        FrameKind::Python => (t(50, 60.0, v1), t(185, 60.0, v1), t(50, 60.0, v2)),
        FrameKind::Lua => (t(80, 60.0, v1), t(80, 60.0, v1), t(205, 50.0, v2)),
        FrameKind::Go => (t(40, 50.0, v1), t(170, 55.0, v2), t(170, 55.0, v2)),
    };
    Color { r, g, b }
}

/// Fill and CSS class per frame name. A name seen with several kinds keeps
/// the first (innermost-first order of the report).
fn frame_styles(report: &Report) -> io::Result<(PaletteMap, FuncFrameAttrsMap)> {
    let mut palette = PaletteMap::default();
    let mut attrs = String::new();
    for f in report.stacks.iter().flat_map(|s| s.frames.iter()) {
        let name = folded::frame_name(f);
        if palette.get(&name).is_none() {
            palette.insert(&name, color_for(f.kind, &name));
            attrs.push_str(&format!("{name}\tclass=kind-{}\n", kind_name(f.kind)));
        }
    }
    Ok((palette, FuncFrameAttrsMap::from_reader(attrs.as_bytes())?))
}

/// "leaky (4242), python3 (4243)".
fn target_names(report: &Report) -> String {
    report
        .targets
        .iter()
        .map(|t| format!("{} ({})", t.comm, t.pid))
        .collect::<Vec<_>>()
        .join(", ")
}

fn title(report: &Report, what: &str) -> String {
    let targets = target_names(report);
    if targets.is_empty() {
        format!("leaktrace: {what}")
    } else {
        format!("leaktrace: {what} in {targets}")
    }
}

fn base_options<'a>(report: &Report, what: &str) -> Options<'a> {
    let mut opt = Options::default();
    opt.title = title(report, what);
    opt.count_name = "bytes".to_string();
    opt.deterministic = true;
    opt.notes = report.notes.join("; ");
    opt
}

/// What a report with no stacks draws.
fn write_empty(report: &Report, what: &str, out: &mut dyn Write) -> io::Result<()> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    writeln!(
        out,
        r#"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="1200" height="80" viewBox="0 0 1200 80" xmlns="http://www.w3.org/2000/svg">
<title>{title}</title>
<text x="600" y="30" text-anchor="middle" font-family="Verdana" font-size="17">{title}</text>
<text x="600" y="60" text-anchor="middle" font-family="Verdana" font-size="12">no memory allocated since attach is outstanding</text>
</svg>"#,
        title = esc(&title(report, what))
    )
}

fn draw(opt: &mut Options<'_>, folded_text: &[u8], out: &mut dyn Write) -> io::Result<()> {
    let text = std::str::from_utf8(folded_text).map_err(io::Error::other)?;
    flamegraph::from_lines(opt, text.lines(), out)
}

/// The flamegraph of outstanding bytes, coloured by frame kind.
pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    const WHAT: &str = "outstanding memory";
    let mut lines = Vec::new();
    folded::write(report, &mut lines)?;
    if lines.is_empty() {
        return write_empty(report, WHAT, out);
    }
    let (mut palette, attrs) = frame_styles(report)?;
    let mut opt = base_options(report, WHAT);
    opt.subtitle = Some(format!(
        "width: bytes outstanding after {:.1} s; colour: native red, kernel orange, \
         python green, lua blue, go aqua",
        report.duration_s
    ));
    opt.func_frameattrs = attrs;
    opt.palette_map = Some(&mut palette);
    draw(&mut opt, &lines, out)
}

/// The differential flamegraph: growth between the first and the last
/// sample.
pub fn write_growth_svg(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    const WHAT: &str = "memory growth";
    let mut lines = Vec::new();
    folded::write_growth(report, &mut lines)?;
    if folded::growth_lines(report).iter().all(|l| l.after == 0) {
        return write_empty(report, WHAT, out);
    }
    let (_, attrs) = frame_styles(report)?;
    let mut opt = base_options(report, WHAT);
    opt.subtitle = Some(format!(
        "width: bytes outstanding after {:.1} s; red: grew since the first sample, \
         blue: shrank",
        report.duration_s
    ));
    opt.func_frameattrs = attrs;
    draw(&mut opt, &lines, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::test_support::{bless, blessing, check_golden, golden_path, sample_report};

    fn render(f: fn(&Report, &mut dyn Write) -> io::Result<()>, report: &Report) -> String {
        let mut buf = Vec::new();
        f(report, &mut buf).expect("writing to a Vec cannot fail");
        String::from_utf8(buf).expect("svg is UTF-8")
    }

    /// Text between `open` and the next `close` after `from`.
    fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
        let start = s.find(open)? + open.len();
        let len = s[start..].find(close)?;
        Some(&s[start..start + len])
    }

    fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
        between(tag, &format!(" {name}=\""), "\"").unwrap_or("-")
    }

    /// What a person sees, one line per frame: class, fill, tooltip, and
    /// position (in bytes, so no float formatting is compared). The
    /// script, stylesheet and pixel layout are inferno's business.
    fn structure(svg: &str) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "title: {}\n",
            between(svg, "<text id=\"title\"", "</text>")
                .and_then(|t| t.split_once('>'))
                .map_or("-", |t| t.1)
        ));
        out.push_str(&format!(
            "subtitle: {}\n",
            between(svg, "<text id=\"subtitle\"", "</text>")
                .and_then(|t| t.split_once('>'))
                .map_or("-", |t| t.1)
        ));
        for (what, needle) in [
            ("search", "id=\"search\""),
            ("script", "<script"),
            ("details", "id=\"details\""),
        ] {
            out.push_str(&format!("{what}: {}\n", svg.contains(needle)));
        }
        let frames = between(svg, "<svg id=\"frames\"", "</svg>").unwrap_or("");
        out.push_str(&format!(
            "total_samples: {}\n",
            attr(
                &format!(" {}", frames.split('>').next().unwrap_or("")),
                "total_samples"
            )
        ));
        for g in frames.split("<g").skip(1) {
            let head = g.split('>').next().unwrap_or("");
            let title = between(g, "<title>", "</title>").unwrap_or("-");
            let rect = between(g, "<rect", "/>").unwrap_or("");
            out.push_str(&format!(
                "frame class={} fill={} x={} w={} | {}\n",
                attr(head, "class"),
                attr(rect, "fill"),
                attr(rect, "fg:x"),
                attr(rect, "fg:w"),
                title
            ));
        }
        out
    }

    fn check(rel: &str, svg: &str) {
        if blessing() {
            // Kept for people to open in a browser; only the structure is
            // compared.
            bless(&golden_path(rel), svg.as_bytes());
        }
        check_golden(&format!("{rel}.txt"), &structure(svg));
    }

    #[test]
    fn svg_matches_golden() {
        let svg = render(write, &sample_report());
        check("svg/report.svg", &svg);
    }

    #[test]
    fn growth_svg_matches_golden() {
        let svg = render(write_growth_svg, &sample_report());
        check("svg/report.growth.svg", &svg);
    }

    #[test]
    fn output_is_the_same_every_time() {
        let r = sample_report();
        assert_eq!(render(write, &r), render(write, &r));
        assert_eq!(render(write_growth_svg, &r), render(write_growth_svg, &r));
    }

    #[test]
    fn frames_are_coloured_by_kind() {
        let svg = structure(&render(write, &sample_report()));
        for (name, class) in [
            ("make_node", "native"),
            ("Cache.put", "python"),
            ("grow", "lua"),
            ("runtime.sysAlloc", "go"),
            ("__x64_sys_mmap", "kernel"),
        ] {
            let line = svg
                .lines()
                .find(|l| l.contains(&format!("| {name} (")))
                .unwrap_or_else(|| panic!("no frame {name} in\n{svg}"));
            assert!(line.contains(&format!("class=kind-{class} ")), "{line}");
        }
        let fill = |k| color_for(k, "x");
        let kinds = [
            FrameKind::Native,
            FrameKind::Python,
            FrameKind::Lua,
            FrameKind::Go,
            FrameKind::Kernel,
        ];
        for (i, a) in kinds.iter().enumerate() {
            for b in &kinds[i + 1..] {
                assert_ne!(fill(*a), fill(*b), "{a:?} and {b:?} look the same");
            }
        }
    }

    #[test]
    fn empty_report_is_a_valid_svg() {
        let mut r = sample_report();
        r.stacks.clear();
        for f in [write, write_growth_svg] {
            let svg = render(f, &r);
            assert!(svg.contains("no memory allocated since attach is outstanding"));
            assert!(svg.trim_end().ends_with("</svg>"));
        }
    }
}
