//! Rotating report files with a disk bound, for `leaktrace node --out DIR`.
//!
//! Input: one interval's rendered files at a time (`[("json", bytes),
//! ("pb.gz", bytes)]`) and the interval's end in Unix seconds. Output:
//! files named `leaktrace-node-<UTC yyyymmddThhmmssZ>-<seq>.<ext>` in the
//! directory, all files of one interval sharing the stem up to the `.`.
//!
//! Invariants:
//! - A file appears whole or not at all: each is written under a `.tmp`
//!   name and renamed. No fsync: a report lost in a power cut is not worth
//!   a disk flush every interval on every node.
//! - The files of this naming never total more than `max_bytes`, except
//!   that the newest interval's set is always kept, even when it alone is
//!   larger (an empty directory would tell an operator nothing).
//! - Intervals are ordered by `seq`, never by the timestamp, so a clock
//!   stepped backwards cannot make the newest set look oldest. `seq`
//!   carries on from the largest one already in the directory, so a
//!   restarted daemon keeps both the order and the bound.
//! - Files of any other name are never counted, read or removed.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

const PREFIX: &str = "leaktrace-node-";
const TMP_SUFFIX: &str = ".tmp";
/// `yyyymmddThhmmssZ`.
const STAMP_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create report directory {}: {}; pick a writable directory with --out",
        dir.display(),
        reason(err)
    )]
    Create { dir: PathBuf, err: io::Error },
    #[error(
        "cannot write reports to {}: {}; pick a writable directory with --out",
        dir.display(),
        reason(err)
    )]
    NotWritable { dir: PathBuf, err: io::Error },
    #[error(
        "cannot list report directory {}: {}; pick a readable directory with --out",
        dir.display(),
        reason(err)
    )]
    List { dir: PathBuf, err: io::Error },
    #[error(
        "cannot write report {}: {}; free space there or pick another directory with --out",
        path.display(),
        reason(err)
    )]
    Write { path: PathBuf, err: io::Error },
    #[error(
        "cannot remove old report {}: {}; the disk bound holds only if leaktrace may delete \
         its own files there",
        path.display(),
        reason(err)
    )]
    Remove { path: PathBuf, err: io::Error },
    #[error(
        "report file extension {ext:?} is not a plain name like \"json\" or \"pb.gz\", or is \
         given twice"
    )]
    BadExtension { ext: String },
}

/// An io::Error as a lowercase reason without the `(os error N)` tail,
/// so that the message reads as one sentence.
fn reason(err: &io::Error) -> String {
    let text = err.to_string();
    let text = match text.find(" (os error ") {
        Some(at) => &text[..at],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// One interval's files on disk.
#[derive(Debug, Default)]
struct Interval {
    files: Vec<(PathBuf, u64)>,
}

impl Interval {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }
}

pub struct Store {
    dir: PathBuf,
    max_bytes: u64,
    /// Keyed by `seq`: the first entry is the oldest interval.
    intervals: BTreeMap<u64, Interval>,
    total_bytes: u64,
    next_seq: u64,
}

impl Store {
    /// Create `dir` if needed and check it is writable (write+remove a
    /// probe file); keep at most `max_bytes` of files this store wrote
    /// (file names `leaktrace-node-<UTC yyyymmddThhmmssZ>-<seq>.<ext>`),
    /// and at least the newest interval's set.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(|err| StoreError::Create {
            dir: dir.to_path_buf(),
            err,
        })?;
        probe_writable(dir)?;
        let mut store = Store {
            dir: dir.to_path_buf(),
            max_bytes,
            intervals: BTreeMap::new(),
            total_bytes: 0,
            next_seq: 1,
        };
        store.scan()?;
        // A restart with a smaller bound takes effect now, not one interval
        // later.
        store.prune()?;
        Ok(store)
    }

    /// Write one interval's files atomically (write to a `.tmp` name,
    /// fsync-less rename) — e.g. `[("json", bytes), ("pb.gz", bytes)]` —
    /// then delete the oldest intervals' files until the total is under
    /// the bound. Returns the paths written.
    pub fn write_interval(
        &mut self,
        unix_s: u64,
        files: &[(&str, &[u8])],
    ) -> Result<Vec<PathBuf>, StoreError> {
        for (i, (ext, _)) in files.iter().enumerate() {
            if !valid_ext(ext) || files[..i].iter().any(|(e, _)| e == ext) {
                return Err(StoreError::BadExtension {
                    ext: (*ext).to_string(),
                });
            }
        }
        let seq = self.next_seq;
        let stem = format!("{PREFIX}{}-{seq:06}", utc_stamp(unix_s));
        let finals: Vec<PathBuf> = files
            .iter()
            .map(|(ext, _)| self.dir.join(format!("{stem}.{ext}")))
            .collect();
        let tmps: Vec<PathBuf> = finals.iter().map(|p| tmp_path(p)).collect();
        // Every file is written before any is renamed, so a full disk
        // leaves no half set behind under the final names.
        for (tmp, (_, bytes)) in tmps.iter().zip(files) {
            if let Err(err) = fs::write(tmp, bytes) {
                remove_quietly(&tmps);
                return Err(StoreError::Write {
                    path: tmp.clone(),
                    err,
                });
            }
        }
        for (i, (tmp, path)) in tmps.iter().zip(&finals).enumerate() {
            if let Err(err) = fs::rename(tmp, path) {
                remove_quietly(&tmps[i..]);
                remove_quietly(&finals[..i]);
                return Err(StoreError::Write {
                    path: path.clone(),
                    err,
                });
            }
        }
        self.next_seq = seq + 1;
        let interval = Interval {
            files: finals
                .iter()
                .zip(files)
                .map(|(p, (_, bytes))| (p.clone(), bytes.len() as u64))
                .collect(),
        };
        self.total_bytes += interval.bytes();
        self.intervals.insert(seq, interval);
        self.prune()?;
        Ok(finals)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Count the files a previous run left; remove its unfinished `.tmp`
    /// files, which no reader can use.
    fn scan(&mut self) -> Result<(), StoreError> {
        let list_err = |err| StoreError::List {
            dir: self.dir.clone(),
            err,
        };
        for entry in fs::read_dir(&self.dir).map_err(list_err)? {
            let entry = entry.map_err(list_err)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (seq, tmp) = match name.strip_suffix(TMP_SUFFIX) {
                Some(base) => match parse_name(base) {
                    Some(seq) => (seq, true),
                    None => continue,
                },
                None => match parse_name(name) {
                    Some(seq) => (seq, false),
                    None => continue,
                },
            };
            // A crash between write and rename leaves `.tmp` names whose
            // seq was never taken; skipping them keeps them from being
            // reused under a different stamp.
            self.next_seq = self.next_seq.max(seq + 1);
            if tmp {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            self.total_bytes += meta.len();
            self.intervals
                .entry(seq)
                .or_default()
                .files
                .push((entry.path(), meta.len()));
        }
        Ok(())
    }

    /// Delete the oldest intervals until the total is within the bound,
    /// always keeping the newest.
    fn prune(&mut self) -> Result<(), StoreError> {
        while self.total_bytes > self.max_bytes && self.intervals.len() > 1 {
            let Some((_, oldest)) = self.intervals.pop_first() else {
                break;
            };
            for (path, bytes) in oldest.files {
                match fs::remove_file(&path) {
                    // Someone else removed it: the bytes are gone either way.
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(StoreError::Remove { path, err }),
                }
                self.total_bytes = self.total_bytes.saturating_sub(bytes);
            }
        }
        Ok(())
    }
}

/// Write and remove a probe file: `create_dir_all` succeeds on an existing
/// read-only directory, and the first report is too late to find out.
fn probe_writable(dir: &Path) -> Result<(), StoreError> {
    let probe = dir.join(format!(".leaktrace-probe-{}", std::process::id()));
    let result = fs::write(&probe, b"").and_then(|()| fs::remove_file(&probe));
    result.map_err(|err| StoreError::NotWritable {
        dir: dir.to_path_buf(),
        err,
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(TMP_SUFFIX);
    PathBuf::from(s)
}

fn remove_quietly(paths: &[PathBuf]) {
    for p in paths {
        let _ = fs::remove_file(p);
    }
}

/// Letters and digits in dot-separated parts (`json`, `pb.gz`); never the
/// temporary suffix, which the scan would take for a leftover.
fn valid_ext(ext: &str) -> bool {
    !ext.is_empty()
        && ext
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()))
        && ext.rsplit('.').next() != Some("tmp")
}

/// The `seq` of a file of this store's naming, or `None` for any other.
fn parse_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PREFIX)?;
    let stamp = rest.get(..STAMP_LEN)?;
    let ok_stamp = stamp.char_indices().all(|(i, c)| match i {
        8 => c == 'T',
        15 => c == 'Z',
        _ => c.is_ascii_digit(),
    });
    if !ok_stamp {
        return None;
    }
    let rest = rest.get(STAMP_LEN..)?.strip_prefix('-')?;
    let (seq, ext) = rest.split_once('.')?;
    if seq.is_empty() || !seq.chars().all(|c| c.is_ascii_digit()) || !valid_ext(ext) {
        return None;
    }
    seq.parse().ok()
}

/// `yyyymmddThhmmssZ` for a Unix time, in UTC.
fn utc_stamp(unix_s: u64) -> String {
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`, for non-negative days), so that std suffices.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "leaktrace-store-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create the test directory");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The directory's file names, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("list the test directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn used_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry"))
            .filter(|e| parse_name(&e.file_name().to_string_lossy()).is_some())
            .map(|e| e.metadata().expect("metadata").len())
            .sum()
    }

    const T0: u64 = 1_700_000_000; // 2023-11-14T22:13:20Z

    fn write(store: &mut Store, unix_s: u64, json: usize, pb: usize) -> Vec<PathBuf> {
        let j = vec![b'j'; json];
        let p = vec![b'p'; pb];
        store
            .write_interval(unix_s, &[("json", &j), ("pb.gz", &p)])
            .expect("write an interval")
    }

    #[test]
    fn stamps_are_utc() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(T0), "20231114T221320Z");
        // A leap day, and the last second of a leap year.
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_735_689_599), "20241231T235959Z");
    }

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        assert_eq!(
            parse_name("leaktrace-node-20231114T221320Z-000042.pb.gz"),
            Some(42)
        );
        assert_eq!(
            parse_name("leaktrace-node-20231114T221320Z-1234567.json"),
            Some(1_234_567)
        );
        for stranger in [
            "notes.txt",
            "leaktrace-node-20231114T221320Z-000001",
            "leaktrace-node-20231114T221320Z-.json",
            "leaktrace-node-2023111T221320Z-000001.json",
            "leaktrace-node-20231114T221320Z-000001.json.tmp",
            "leaktrace-node-20231114T221320Z-000001..json",
            "leaktrace-oom-20231114T221320Z-000001.json",
        ] {
            assert_eq!(parse_name(stranger), None, "{stranger}");
        }
    }

    #[test]
    fn writes_whole_files_under_the_naming() {
        let tmp = TempDir::new("write");
        let mut store = Store::open(&tmp.0, 1 << 20).expect("open");
        assert_eq!(store.dir(), tmp.0);
        let paths = store
            .write_interval(T0, &[("json", b"{}"), ("pb.gz", b"\x1f\x8b")])
            .expect("write");
        assert_eq!(
            paths,
            vec![
                tmp.0.join("leaktrace-node-20231114T221320Z-000001.json"),
                tmp.0.join("leaktrace-node-20231114T221320Z-000001.pb.gz"),
            ]
        );
        assert_eq!(fs::read(&paths[0]).expect("read json"), b"{}");
        assert_eq!(fs::read(&paths[1]).expect("read pb"), b"\x1f\x8b");
        // Same second: a new seq keeps the sets apart.
        let again = write(&mut store, T0, 1, 1);
        assert!(again[0].ends_with("leaktrace-node-20231114T221320Z-000002.json"));
        let left = names(&tmp.0);
        assert!(
            !left
                .iter()
                .any(|n| n.ends_with(".tmp") || n.contains("probe")),
            "{left:?}"
        );
        assert_eq!(left.len(), 4, "{left:?}");
    }

    #[test]
    fn rotation_keeps_under_the_bound_oldest_first() {
        let tmp = TempDir::new("rotate");
        let mut store = Store::open(&tmp.0, 1000).expect("open");
        let mut sets = Vec::new();
        for i in 0..6 {
            sets.push(write(&mut store, T0 + 60 * i, 300, 100));
            let used = used_bytes(&tmp.0);
            assert!(used <= 1000, "interval {i}: {used} B on disk");
            assert_eq!(used, store.total_bytes, "interval {i}");
        }
        // 400 B a set, 1000 B allowed: the two newest stay.
        for (i, set) in sets.iter().enumerate() {
            for p in set {
                assert_eq!(p.exists(), i >= 4, "set {i}: {}", p.display());
            }
        }
    }

    #[test]
    fn newest_set_is_kept_even_when_alone_over_the_bound() {
        let tmp = TempDir::new("newest");
        let mut store = Store::open(&tmp.0, 10).expect("open");
        let first = write(&mut store, T0, 100, 50);
        assert!(first.iter().all(|p| p.exists()));
        let second = write(&mut store, T0 + 60, 100, 50);
        assert!(first.iter().all(|p| !p.exists()), "oldest set removed");
        assert!(second.iter().all(|p| p.exists()), "newest set kept");
        assert_eq!(used_bytes(&tmp.0), 150);
    }

    #[test]
    fn a_restart_keeps_the_bound_and_the_order() {
        let tmp = TempDir::new("restart");
        fs::write(tmp.0.join("notes.txt"), vec![b'n'; 10_000]).expect("write a stranger");
        let before: Vec<PathBuf> = {
            let mut store = Store::open(&tmp.0, 1000).expect("open");
            let a = write(&mut store, T0, 300, 100);
            let b = write(&mut store, T0 + 60, 300, 100);
            a.into_iter().chain(b).collect()
        };
        // A crash between write and rename left a temporary file.
        let leftover = tmp
            .0
            .join("leaktrace-node-20231114T222320Z-000003.json.tmp");
        fs::write(&leftover, b"half").expect("write a leftover");

        // The clock went back: order still follows seq.
        let mut store = Store::open(&tmp.0, 1000).expect("reopen");
        assert!(!leftover.exists(), "leftover .tmp removed on open");
        assert_eq!(store.total_bytes, 800, "previous files count");
        let after = write(&mut store, T0 - 3600, 300, 100);
        assert!(
            after[0].ends_with("leaktrace-node-20231114T211320Z-000004.json"),
            "{}",
            after[0].display()
        );
        assert!(before[..2].iter().all(|p| !p.exists()), "oldest removed");
        assert!(before[2..].iter().all(|p| p.exists()));
        assert!(after.iter().all(|p| p.exists()));
        assert!(tmp.0.join("notes.txt").exists(), "other files untouched");
        assert_eq!(used_bytes(&tmp.0), 800);
    }

    #[test]
    fn a_smaller_bound_applies_on_open() {
        let tmp = TempDir::new("shrink");
        {
            let mut store = Store::open(&tmp.0, 10_000).expect("open");
            for i in 0..5 {
                write(&mut store, T0 + i, 300, 100);
            }
        }
        assert_eq!(used_bytes(&tmp.0), 2000);
        let store = Store::open(&tmp.0, 500).expect("reopen");
        assert_eq!(used_bytes(&tmp.0), 400);
        assert_eq!(store.intervals.keys().copied().collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn bad_extensions_are_refused_before_writing() {
        let tmp = TempDir::new("ext");
        let mut store = Store::open(&tmp.0, 1000).expect("open");
        for files in [
            &[("", &b"x"[..])][..],
            &[("../x", &b"x"[..])][..],
            &[("json.tmp", &b"x"[..])][..],
            &[(".json", &b"x"[..])][..],
            &[("json", &b"x"[..]), ("json", &b"y"[..])][..],
        ] {
            let e = store.write_interval(T0, files).expect_err("refused");
            assert!(matches!(e, StoreError::BadExtension { .. }), "{e}");
        }
        assert!(names(&tmp.0).is_empty());
    }

    fn assert_names_dir_and_fix(e: &StoreError, dir: &Path, reason: &str) {
        let msg = e.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains(reason), "{msg}");
        assert!(
            msg.ends_with("pick a writable directory with --out"),
            "{msg}"
        );
        assert!(!msg.contains("os error"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn a_path_under_a_regular_file_is_refused() {
        let tmp = TempDir::new("underfile");
        let file = tmp.0.join("plain");
        fs::write(&file, b"").expect("write a file");
        let dir = file.join("reports");
        let e = Store::open(&dir, 1000).err().expect("refused");
        assert!(matches!(e, StoreError::Create { .. }), "{e}");
        assert_names_dir_and_fix(&e, &dir, "not a directory");
    }

    // Root ignores permission bits, so a chmod'ed directory would not stop
    // the tests in CI; /proc refuses new files to everyone.
    #[test]
    fn a_filesystem_without_room_for_files_is_refused() {
        let proc = Path::new("/proc");
        let e = Store::open(proc, 1000).err().expect("refused");
        assert!(matches!(e, StoreError::NotWritable { .. }), "{e}");
        assert_names_dir_and_fix(&e, proc, "cannot write reports to /proc: ");

        let below = Path::new("/proc/leaktrace-reports");
        let e = Store::open(below, 1000).err().expect("refused");
        assert!(matches!(e, StoreError::Create { .. }), "{e}");
        assert_names_dir_and_fix(&e, below, "cannot create report directory");
    }
}
