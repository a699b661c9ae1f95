//! `--format pprof`: a gzipped `profile.proto` for `go tool pprof`,
//! Pyroscope, Parca and the other pprof readers.
//!
//! Input: a [`Report`] (and, optionally, the build ids of its modules).
//! Output: one Sample per stack with four values, in this order:
//! `inuse_space/bytes` (the default), `inuse_objects/count`,
//! `alloc_space/bytes` and `growth/bytes` (bytes at the last sample minus
//! bytes at the first). Each sample is labelled with its `trend` and its
//! `pid`s.
//!
//! Invariants, as pprof expects: string 0 is `""`; ids start at 1; a
//! Location is one machine address, its Lines innermost first (inlined
//! calls, then the function that holds the code); a sample's locations
//! are leaf first. A frame whose function is unknown becomes a Line of a
//! placeholder function `[module+0xoffset]` with the file offset as the
//! Location's address in a Mapping that starts at 0 (so address == file
//! offset and pprof can symbolize it from the binary later). Mappings are
//! one per module path, the traced program's own binary first.
//!
//! The encoder is hand-written: profile.proto uses only varints and
//! length-delimited fields.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::Path;

use flate2::{write::GzEncoder, Compression};

use super::{folded, Frame, Report};

/// `(type, unit)` of each sample value, in order.
pub const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("inuse_space", "bytes"),
    ("inuse_objects", "count"),
    ("alloc_space", "bytes"),
    ("growth", "bytes"),
];

/// The profile without build ids; see [`write_with_build_ids`].
pub fn write(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    write_with_build_ids(report, &BTreeMap::new(), out)
}

/// The profile, with `build_ids` (module path as in the report -> hex build
/// id, e.g. from [`build_id`]) set on the matching Mappings.
pub fn write_with_build_ids(
    report: &Report,
    build_ids: &BTreeMap<String, String>,
    out: &mut dyn Write,
) -> io::Result<()> {
    let bytes = encode(report, build_ids);
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&bytes)?;
    gz.finish()?;
    Ok(())
}

/// The GNU build id of an ELF file, in hex; `None` when the file cannot be
/// read or has none. Reads only the headers and the note.
pub fn build_id(path: &Path) -> Option<String> {
    use object::Object as _;
    let file = std::fs::File::open(path).ok()?;
    let cache = object::ReadCache::new(file);
    let obj = object::File::parse(&cache).ok()?;
    let id = obj.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// Protobuf wire format: just what profile.proto needs.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    const VARINT: u8 = 0;
    const LEN: u8 = 2;

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// A `uint64` field; proto3 leaves zero out.
    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.key(field, Self::VARINT);
            self.varint(v);
        }
    }

    /// An `int64` field: negative numbers are ten-byte varints.
    fn int(&mut self, field: u32, v: i64) {
        self.uint(field, v as u64);
    }

    fn flag(&mut self, field: u32, v: bool) {
        self.uint(field, u64::from(v));
    }

    /// A string, bytes or embedded message; always written (an empty
    /// string is still an entry of a repeated field).
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, Self::LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn msg(&mut self, field: u32, build: impl FnOnce(&mut Enc)) {
        let mut m = Enc::default();
        build(&mut m);
        self.bytes(field, &m.0);
    }

    /// A packed repeated varint field (proto3's default encoding).
    fn packed(&mut self, field: u32, vals: impl IntoIterator<Item = u64>) {
        let mut m = Enc::default();
        for v in vals {
            m.varint(v);
        }
        if !m.0.is_empty() {
            self.bytes(field, &m.0);
        }
    }
}

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.id("");
        s
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

struct Mapping {
    path: String,
    /// Highest address (file offset) seen in it.
    max_address: u64,
    all_functions: bool,
    all_files: bool,
    all_lines: bool,
}

struct Function {
    name: i64,
    filename: i64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Location {
    mapping_id: u64,
    address: u64,
    /// `(function id, line)`, innermost first.
    lines: Vec<(u64, i64)>,
}

struct Sample {
    location_ids: Vec<u64>,
    values: [i64; 4],
    labels: Vec<(i64, Label)>,
}

enum Label {
    Str(i64),
    Num(i64),
}

/// Frames of one stack grouped by machine address: each group is the
/// inlined calls (innermost first) followed by the function that holds
/// them. Inlined frames with nothing after them form a group of their own.
fn locations_of(frames: &[Frame]) -> Vec<&[Frame]> {
    let mut groups = Vec::new();
    let mut start = 0;
    for (i, f) in frames.iter().enumerate() {
        if !f.inlined {
            groups.push(&frames[start..=i]);
            start = i + 1;
        }
    }
    if start < frames.len() {
        groups.push(&frames[start..]);
    }
    groups
}

/// Module paths in first-seen order, those named like a target first (the
/// main binary leads the mapping table by pprof's convention).
fn mapping_order(report: &Report) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for m in report
        .stacks
        .iter()
        .flat_map(|s| s.frames.iter())
        .filter_map(|f| f.module.as_ref())
    {
        if !paths.contains(m) {
            paths.push(m.clone());
        }
    }
    // The kernel cuts comm to 15 bytes.
    let is_target = |p: &String| {
        let base = p.rsplit('/').next().unwrap_or(p).as_bytes();
        report
            .targets
            .iter()
            .any(|t| !t.comm.is_empty() && base.starts_with(t.comm.as_bytes()))
    };
    paths.sort_by_key(|p| !is_target(p));
    paths
}

/// The uncompressed `Profile` message.
fn encode(report: &Report, build_ids: &BTreeMap<String, String>) -> Vec<u8> {
    let mut strings = Strings::new();
    let sample_types: Vec<(i64, i64)> = SAMPLE_TYPES
        .iter()
        .map(|(t, u)| (strings.id(t), strings.id(u)))
        .collect();

    let mut mappings: Vec<Mapping> = mapping_order(report)
        .into_iter()
        .map(|path| Mapping {
            path,
            max_address: 0,
            all_functions: true,
            all_files: true,
            all_lines: true,
        })
        .collect();
    let mapping_ids: HashMap<String, u64> = mappings
        .iter()
        .enumerate()
        .map(|(i, m)| (m.path.clone(), i as u64 + 1))
        .collect();

    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<(i64, i64), u64> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut location_ids: HashMap<Location, u64> = HashMap::new();
    let mut samples = Vec::new();
    let (trend_key, pid_key) = (strings.id("trend"), strings.id("pid"));

    for stack in &report.stacks {
        let mut ids = Vec::new();
        for group in locations_of(&stack.frames) {
            let Some(holder) = group.last() else {
                continue;
            };
            let mapping_id = holder
                .module
                .as_ref()
                .and_then(|m| mapping_ids.get(m))
                .copied()
                .unwrap_or(0);
            let address = holder.offset.unwrap_or(0);
            let mut lines = Vec::with_capacity(group.len());
            for f in group {
                let name = match &f.function {
                    Some(name) => name.clone(),
                    None => folded::frame_name(f),
                };
                let key = (
                    strings.id(&name),
                    strings.id(f.file.as_deref().unwrap_or("")),
                );
                let next_id = functions.len() as u64 + 1;
                let function_id = *function_ids.entry(key).or_insert(next_id);
                if function_id == next_id {
                    functions.push(Function {
                        name: key.0,
                        filename: key.1,
                    });
                }
                lines.push((function_id, f.line.map_or(0, i64::from)));
                if let Some(m) = mapping_id
                    .checked_sub(1)
                    .and_then(|i| mappings.get_mut(i as usize))
                {
                    m.all_functions &= f.function.is_some();
                    m.all_files &= f.file.is_some();
                    m.all_lines &= f.line.is_some();
                    m.max_address = m.max_address.max(address);
                }
            }
            let loc = Location {
                mapping_id,
                address,
                lines,
            };
            let next_id = locations.len() as u64 + 1;
            let id = *location_ids.entry(loc.clone()).or_insert(next_id);
            if id == next_id {
                locations.push(loc);
            }
            ids.push(id);
        }
        let mut labels = vec![(trend_key, Label::Str(strings.id(stack.trend.as_str())))];
        labels.extend(
            stack
                .pids
                .iter()
                .map(|p| (pid_key, Label::Num(i64::from(*p)))),
        );
        samples.push(Sample {
            location_ids: ids,
            values: [
                stack.outstanding_bytes,
                stack.outstanding_allocs,
                i64::try_from(stack.allocated_bytes).unwrap_or(i64::MAX),
                stack.growth_bytes(),
            ],
            labels,
        });
    }

    let mut comments = Vec::new();
    let targets: Vec<String> = report
        .targets
        .iter()
        .map(|t| format!("{} ({}, {})", t.comm, t.pid, t.status))
        .collect();
    comments.push(format!("leaktrace: targets {}", targets.join(", ")));
    comments.push(format!(
        "events lost: {}; stacks not shown: {}",
        report.totals.lost_events, report.stacks_omitted
    ));
    comments.extend(report.notes.iter().map(|n| format!("note: {n}")));
    let comment_ids: Vec<i64> = comments.iter().map(|c| strings.id(c)).collect();
    let mapping_names: Vec<(i64, i64)> = mappings
        .iter()
        .map(|m| {
            let build_id = build_ids.get(&m.path).map_or(0, |b| strings.id(b));
            (strings.id(&m.path), build_id)
        })
        .collect();
    let (space, bytes) = (strings.id("space"), strings.id("bytes"));
    let default_type = strings.id(SAMPLE_TYPES[0].0);

    let mut p = Enc::default();
    for (t, u) in &sample_types {
        p.msg(1, |m| {
            m.int(1, *t);
            m.int(2, *u);
        });
    }
    for s in &samples {
        p.msg(2, |m| {
            m.packed(1, s.location_ids.iter().copied());
            m.packed(2, s.values.iter().map(|v| *v as u64));
            for (key, label) in &s.labels {
                m.msg(3, |l| {
                    l.int(1, *key);
                    match label {
                        Label::Str(s) => l.int(2, *s),
                        Label::Num(n) => l.int(3, *n),
                    }
                });
            }
        });
    }
    for (i, (m, (filename, build_id))) in mappings.iter().zip(&mapping_names).enumerate() {
        p.msg(3, |e| {
            e.uint(1, i as u64 + 1);
            e.uint(2, 0);
            // The addresses are file offsets: the file as if mapped at 0.
            e.uint(
                3,
                if m.max_address > 0 {
                    m.max_address + 1
                } else {
                    0
                },
            );
            e.uint(4, 0);
            e.int(5, *filename);
            e.int(6, *build_id);
            e.flag(7, m.all_functions);
            e.flag(8, m.all_files);
            e.flag(9, m.all_lines);
            // The symbolizer expands inlined calls wherever it has lines.
            e.flag(10, m.all_functions && m.all_lines);
        });
    }
    for (i, loc) in locations.iter().enumerate() {
        p.msg(4, |e| {
            e.uint(1, i as u64 + 1);
            e.uint(2, loc.mapping_id);
            e.uint(3, loc.address);
            for (function_id, line) in &loc.lines {
                e.msg(4, |l| {
                    l.uint(1, *function_id);
                    l.int(2, *line);
                });
            }
        });
    }
    for (i, f) in functions.iter().enumerate() {
        p.msg(5, |e| {
            e.uint(1, i as u64 + 1);
            e.int(2, f.name);
            e.int(3, f.name);
            e.int(4, f.filename);
        });
    }
    for s in &strings.table {
        p.bytes(6, s.as_bytes());
    }
    p.int(10, (report.duration_s * 1e9) as i64);
    p.msg(11, |m| {
        m.int(1, space);
        m.int(2, bytes);
    });
    p.int(12, 1);
    p.packed(13, comment_ids.iter().map(|c| *c as u64));
    p.int(14, default_type);
    p.0
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read as _;
    use std::process::Command;

    use super::*;
    use crate::report::test_support::{check_golden, sample_report};

    /// One decoded field: a varint or a length-delimited payload.
    #[derive(Clone, Debug)]
    enum Val {
        Int(u64),
        Bytes(Vec<u8>),
    }

    type Fields = Vec<(u32, Val)>;

    fn read_varint(b: &[u8], pos: &mut usize) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*pos).expect("varint runs past the end");
            *pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
        }
        panic!("varint longer than ten bytes");
    }

    fn decode(b: &[u8]) -> Fields {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < b.len() {
            let key = read_varint(b, &mut pos);
            let field = u32::try_from(key >> 3).expect("field number fits u32");
            match key & 7 {
                0 => out.push((field, Val::Int(read_varint(b, &mut pos)))),
                2 => {
                    let len = read_varint(b, &mut pos) as usize;
                    let end = pos + len;
                    assert!(end <= b.len(), "field {field} runs past the end");
                    out.push((field, Val::Bytes(b[pos..end].to_vec())));
                    pos = end;
                }
                w => panic!("field {field}: wire type {w} is not used by profile.proto"),
            }
        }
        out
    }

    fn int(f: &Fields, n: u32) -> u64 {
        f.iter()
            .filter(|(k, _)| *k == n)
            .map(|(_, v)| match v {
                Val::Int(i) => *i,
                Val::Bytes(_) => panic!("field {n} is not a varint"),
            })
            .next_back()
            .unwrap_or(0)
    }

    fn msgs(f: &Fields, n: u32) -> Vec<Fields> {
        bytes(f, n).iter().map(|b| decode(b)).collect()
    }

    fn bytes(f: &Fields, n: u32) -> Vec<Vec<u8>> {
        f.iter()
            .filter(|(k, _)| *k == n)
            .map(|(_, v)| match v {
                Val::Bytes(b) => b.clone(),
                Val::Int(_) => panic!("field {n} is not length-delimited"),
            })
            .collect()
    }

    /// A repeated varint field, packed or not.
    fn ints(f: &Fields, n: u32) -> Vec<u64> {
        let mut out = Vec::new();
        for (_, v) in f.iter().filter(|(k, _)| *k == n) {
            match v {
                Val::Int(i) => out.push(*i),
                Val::Bytes(b) => {
                    let mut pos = 0;
                    while pos < b.len() {
                        out.push(read_varint(b, &mut pos));
                    }
                }
            }
        }
        out
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .expect("profile is gzipped");
        raw
    }

    /// The profile as text, every reference resolved and checked.
    fn dump(gz: &[u8]) -> String {
        let p = decode(&gunzip(gz));
        let strings: Vec<String> = bytes(&p, 6)
            .into_iter()
            .map(|b| String::from_utf8(b).expect("strings are UTF-8"))
            .collect();
        assert_eq!(strings.first().map(String::as_str), Some(""), "string 0");
        let s = |i: u64| -> &str {
            strings
                .get(i as usize)
                .unwrap_or_else(|| panic!("string index {i} out of range"))
        };
        let mut out = String::new();
        let vt = |m: &Fields| format!("{}/{}", s(int(m, 1)), s(int(m, 2)));
        let types: Vec<String> = msgs(&p, 1).iter().map(vt).collect();
        out.push_str(&format!("sample_type: {}\n", types.join(", ")));
        out.push_str(&format!("default_sample_type: {}\n", s(int(&p, 14))));
        let period_type = msgs(&p, 11);
        assert_eq!(period_type.len(), 1, "one period_type");
        out.push_str(&format!("period_type: {}\n", vt(&period_type[0])));
        out.push_str(&format!("period: {}\n", int(&p, 12)));
        out.push_str(&format!("time_nanos: {}\n", int(&p, 9)));
        out.push_str(&format!("duration_nanos: {}\n", int(&p, 10)));
        for c in ints(&p, 13) {
            out.push_str(&format!("comment: {}\n", s(c)));
        }

        let mut mappings = BTreeMap::new();
        for m in msgs(&p, 3) {
            let id = int(&m, 1);
            assert!(id != 0 && mappings.insert(id, s(int(&m, 5))).is_none());
            out.push_str(&format!(
                "mapping {id}: {} build_id={:?} start={:#x} limit={:#x} offset={:#x} \
                 functions={} filenames={} lines={} inline={}\n",
                s(int(&m, 5)),
                s(int(&m, 6)),
                int(&m, 2),
                int(&m, 3),
                int(&m, 4),
                int(&m, 7) != 0,
                int(&m, 8) != 0,
                int(&m, 9) != 0,
                int(&m, 10) != 0,
            ));
        }
        let mut functions = BTreeMap::new();
        for f in msgs(&p, 5) {
            let id = int(&f, 1);
            assert!(id != 0 && functions.insert(id, s(int(&f, 2))).is_none());
            out.push_str(&format!(
                "function {id}: {} system_name={} file={:?} start_line={}\n",
                s(int(&f, 2)),
                s(int(&f, 3)),
                s(int(&f, 4)),
                int(&f, 5)
            ));
        }
        let mut locations = BTreeMap::new();
        for l in msgs(&p, 4) {
            let id = int(&l, 1);
            let mapping = int(&l, 2);
            assert!(
                mapping == 0 || mappings.contains_key(&mapping),
                "mapping {mapping}"
            );
            out.push_str(&format!(
                "location {id}: mapping={mapping} address={:#x}\n",
                int(&l, 3)
            ));
            let mut names = Vec::new();
            for line in msgs(&l, 4) {
                let f = int(&line, 1);
                let name = functions
                    .get(&f)
                    .unwrap_or_else(|| panic!("location {id}: no function {f}"));
                out.push_str(&format!(
                    "  line: {name} (function {f}) line {}\n",
                    int(&line, 2)
                ));
                names.push(*name);
            }
            assert!(id != 0 && locations.insert(id, names).is_none());
        }
        for sample in msgs(&p, 2) {
            let values: Vec<i64> = ints(&sample, 2).iter().map(|v| *v as i64).collect();
            assert_eq!(values.len(), types.len(), "one value per sample type");
            let labels: Vec<String> = msgs(&sample, 3)
                .iter()
                .map(|l| match (int(l, 2), int(l, 3)) {
                    (0, n) => format!("{}={n}", s(int(l, 1))),
                    (st, _) => format!("{}={}", s(int(l, 1)), s(st)),
                })
                .collect();
            let loc_ids = ints(&sample, 1);
            out.push_str(&format!(
                "sample: values={values:?} locations={loc_ids:?} labels=[{}]\n",
                labels.join(", ")
            ));
            let frames: Vec<&str> = loc_ids
                .iter()
                .flat_map(|id| {
                    locations
                        .get(id)
                        .unwrap_or_else(|| panic!("sample: no location {id}"))
                        .iter()
                        .copied()
                })
                .collect();
            out.push_str(&format!("  stack, leaf first: {}\n", frames.join(" < ")));
        }
        out
    }

    fn render(report: &Report) -> Vec<u8> {
        let mut buf = Vec::new();
        write(report, &mut buf).expect("writing to a Vec cannot fail");
        buf
    }

    #[test]
    fn pprof_matches_golden() {
        check_golden("pprof/report.pprof.txt", &dump(&render(&sample_report())));
    }

    #[test]
    fn varints_and_negative_ints_encode_like_protobuf() {
        let mut e = Enc::default();
        e.uint(1, 150);
        e.int(2, -1);
        e.uint(3, 0);
        e.bytes(4, b"");
        assert_eq!(
            e.0,
            [
                0x08, 0x96, 0x01, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                0x22, 0x00
            ]
        );
    }

    #[test]
    fn inlined_frames_share_a_location_innermost_first() {
        let text = dump(&render(&sample_report()));
        assert!(
            text.contains(
                "  line: make_node (function 1) line 12\n  line: list_push (function 2) line 30\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "stack, leaf first: make_node < list_push < main < __libc_start_call_main\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn build_ids_land_on_their_mapping() {
        let r = sample_report();
        let mut ids = BTreeMap::new();
        ids.insert("/opt/leaky/bin/leaky".to_string(), "00ff".to_string());
        let mut buf = Vec::new();
        write_with_build_ids(&r, &ids, &mut buf).expect("write");
        let text = dump(&buf);
        assert!(
            text.contains("mapping 1: /opt/leaky/bin/leaky build_id=\"00ff\""),
            "{text}"
        );
    }

    #[test]
    fn build_id_reads_an_elf_note() {
        // Debian links everything with --build-id; if this binary has
        // none, there is nothing to compare.
        let exe = std::env::current_exe().expect("test binary path");
        let Ok(out) = Command::new("readelf").arg("-n").arg(&exe).output() else {
            eprintln!("skipping build_id_reads_an_elf_note: readelf not found");
            return;
        };
        let notes = String::from_utf8_lossy(&out.stdout);
        let expected = notes
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .map(str::to_string);
        assert_eq!(build_id(&exe), expected);
        assert_eq!(build_id(Path::new("/nonexistent/leaktrace")), None);
    }

    /// Removes the file when the test ends, pass or fail.
    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn go_tool_pprof(args: &[&str], file: &Path) -> String {
        let out = Command::new("go")
            .args(["tool", "pprof"])
            .args(args)
            .arg(file)
            .env("PPROF_TMPDIR", std::env::temp_dir())
            .output()
            .expect("running go tool pprof");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "go tool pprof {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("$ go tool pprof {} <file>\n{stdout}", args.join(" "));
        stdout
    }

    /// The `-top` row of a function (pprof marks inlined ones).
    fn top_row<'a>(top: &'a str, function: &str) -> &'a str {
        top.lines()
            .find(|l| {
                l.trim_end()
                    .trim_end_matches(" (inline)")
                    .ends_with(&format!(" {function}"))
            })
            .unwrap_or_else(|| panic!("no {function} in\n{top}"))
    }

    #[test]
    fn go_tool_pprof_reads_the_profile() {
        if Command::new("go").arg("version").output().is_err() {
            let why = "go not found; install golang-go (cargo xtask setup does)";
            if std::env::var_os("LEAKTRACE_REQUIRE_BPF").is_some_and(|v| v == "1") {
                panic!("go_tool_pprof_reads_the_profile: {why}");
            }
            eprintln!("skipping go_tool_pprof_reads_the_profile: {why}");
            return;
        }
        let file = TempFile(
            std::env::temp_dir().join(format!("leaktrace-pprof-test-{}.pb.gz", std::process::id())),
        );
        std::fs::write(&file.0, render(&sample_report())).expect("writing the profile");

        let top = go_tool_pprof(&["-top", "-sample_index=inuse_space"], &file.0);
        assert!(top.contains("Type: inuse_space"), "{top}");
        // 409600 bytes, flat, in the inlined leaf; list_push holds it.
        let leak = top_row(&top, "make_node");
        assert!(leak.trim_start().starts_with("400kB "), "{leak}");
        assert!(leak.ends_with("(inline)"), "{leak}");
        let caller = top_row(&top, "list_push");
        assert!(caller.trim_start().starts_with("0 "), "{caller}");
        assert!(caller.contains(" 400kB "), "{caller}");

        let growth = go_tool_pprof(&["-top", "-sample_index=growth"], &file.0);
        let leak = top_row(&growth, "make_node");
        assert!(leak.trim_start().starts_with("300kB "), "{leak}");

        let traces = go_tool_pprof(&["-traces", "-sample_index=inuse_space"], &file.0);
        let block = traces
            .split("-----------+-------------------------------------------------------")
            .find(|b| b.contains("make_node"))
            .unwrap_or_else(|| panic!("no make_node trace in\n{traces}"));
        // Rows are `value | frame`, split at column 13 like the rule;
        // labels have their `key:` left of it.
        let mut value = "";
        let mut frames = Vec::new();
        let mut labels = Vec::new();
        for l in block.lines().filter(|l| l.len() > 13) {
            let (left, right) = l.split_at(13);
            if left.contains(':') {
                labels.push(format!("{}{}", left.trim(), right.trim()));
                continue;
            }
            if frames.is_empty() {
                value = left.trim();
            }
            frames.push(right.trim());
        }
        assert_eq!(labels, ["trend:growing", "pid:4242"], "{block}");
        assert_eq!(value, "400kB", "{block}");
        assert_eq!(
            frames,
            [
                "make_node (inline)",
                "list_push",
                "main",
                "__libc_start_call_main"
            ],
            "{block}"
        );
    }
}
