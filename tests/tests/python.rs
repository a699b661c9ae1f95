//! End-to-end: Python frames in the stacks of CPython 3.8-3.13 processes.
//!
//! Debian's `/usr/bin/python3.11` (static libpython in a stripped non-PIE
//! binary) and pyenv's 3.8.18, 3.9.18, 3.10.13, 3.11.7, 3.12.1 and 3.13.0
//! (shared `libpython3.X.so`; a pyenv version that is not installed is
//! skipped with a message). A script leaks `bytearray(4096)` buffers
//! (malloc'd: too big for pymalloc) from `load_author_profiles`, called by
//! `handle`, `main` and the module; the leaking stack must name all four,
//! innermost first, with the script's file and lines, in place of the
//! interpreter's eval loop, and keep the native frames around them.

use std::path::{Path, PathBuf};

use leaktrace_tests::{functions, require_bpf, stacks_through, sum, Fixture, Tracer};
use serde_json::Value;

const SCRIPT: &str = r#"import sys

PROFILES = {}


def load_author_profiles(n):
    for i in range(n):
        PROFILES[len(PROFILES)] = bytearray(4096)  # leak


def handle():
    load_author_profiles(200)  # call


def load_one(i):
    return bytearray(8192)  # leak one


def handle_batch():
    BATCH.extend(map(load_one, range(100)))  # map


BATCH = []


def main():
    print("ready", flush=True)
    sys.stdin.readline()
    handle()  # serve
    handle_batch()  # batch
    print("done", flush=True)
    sys.stdin.readline()


main()  # start
"#;

const LEAKS: i64 = 200;
const LEAK_BYTES: i64 = 4096;
const BATCH_LEAKS: i64 = 100;
const BATCH_LEAK_BYTES: i64 = 8192;

/// 1-based line of the script holding `marker`.
fn line_of(marker: &str) -> u64 {
    SCRIPT
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in the script")) as u64
        + 1
}

/// The script in a fresh directory, removed on drop.
struct ScriptDir(PathBuf);

impl ScriptDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("leaktrace-py-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the script directory");
        std::fs::write(dir.join("app.py"), SCRIPT).expect("write the script");
        Self(dir)
    }

    fn script(&self) -> PathBuf {
        self.0.join("app.py")
    }
}

impl Drop for ScriptDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the script under `python` (the interpreter, or a command line
/// ending with it) and trace it.
fn trace_python(test: &str, python: &[&str]) -> (Value, String) {
    let interp = python.last().expect("an interpreter");
    assert!(
        Path::new(interp).exists(),
        "{test}: {interp} is needed by this test"
    );
    let dir = ScriptDir::new(test);
    let script = dir.script().display().to_string();
    let args: Vec<&str> = python[1..]
        .iter()
        .copied()
        .chain([script.as_str()])
        .collect();
    let mut fx = Fixture::start(Path::new(python[0]), &args);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "100"]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "{test}: leaktrace failed: {out:?}");
    (out.json(), script)
}

/// How a version runs Python-to-Python calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Calls {
    /// In the same C call of the eval loop (3.11+): the Python frames sit
    /// together where that one `_PyEval_EvalFrameDefault` was.
    Inlined,
    /// Each through C (3.8-3.10): every Python frame replaces its own
    /// `_PyEval_EvalFrameDefault`, with the C call frames between them.
    ThroughC,
}

/// A pyenv build: skipped with a message when not installed.
fn check_pyenv(test: &str, version: &str, calls: Calls) {
    let minor = version.rsplit_once('.').map_or(version, |(mm, _)| mm);
    let python = format!("/root/.pyenv/versions/{version}/bin/python{minor}");
    if !Path::new(&python).exists() {
        eprintln!("skipping {test}: pyenv {version} is not installed ({python} missing)");
        return;
    }
    check_python_frames(test, &[&python], calls);
}

/// The stack holding the most bytes among those naming `function`.
fn stack_of<'a>(test: &str, r: &'a Value, function: &str) -> &'a Value {
    r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| functions(s).iter().any(|f| f == function))
        .max_by_key(|s| s["outstanding_bytes"].as_i64())
        .unwrap_or_else(|| panic!("{test}: no stack names {function}: {r:#}"))
}

/// The Python frames of `stack` are `expect` (innermost first, with the
/// line in `script`); returns the frames' positions in the stack.
fn check_py(test: &str, stack: &Value, script: &str, expect: &[(&str, u64)]) -> Vec<usize> {
    let frames = stack["frames"].as_array().expect("frames");
    let names = functions(stack);
    let at: Vec<usize> = (0..frames.len())
        .filter(|i| frames[*i]["kind"] == "python")
        .collect();
    let got: Vec<&str> = at
        .iter()
        .map(|i| frames[*i]["function"].as_str().unwrap_or("?"))
        .collect();
    let want: Vec<&str> = expect.iter().map(|(n, _)| *n).collect();
    assert_eq!(got, want, "{test}: wrong Python frames in {names:?}");
    for (i, (name, line)) in at.iter().zip(expect) {
        let f = &frames[*i];
        assert_eq!(f["file"].as_str(), Some(script), "{test}: {f}");
        assert_eq!(f["line"].as_u64(), Some(*line), "{test}: {name}: {f}");
    }
    assert!(
        !names.iter().any(|n| n == "_PyEval_EvalFrameDefault"),
        "{test}: the eval loop is still shown: {names:?}"
    );
    at
}

fn check_python_frames(test: &str, python: &[&str], calls: Calls) {
    if !require_bpf(test) {
        return;
    }
    let (r, script) = trace_python(test, python);
    assert_eq!(r["notes"], serde_json::json!([]), "{test}: notes");

    // Python-to-Python calls.
    let stack = stack_of(test, &r, "load_author_profiles");
    assert!(
        stack["outstanding_allocs"].as_i64() >= Some(LEAKS)
            && stack["outstanding_bytes"].as_i64() >= Some(LEAKS * LEAK_BYTES),
        "{test}: the bytearrays are not all outstanding on one stack: {stack:#}"
    );
    let frames = stack["frames"].as_array().expect("frames");
    let names = functions(stack);
    let at = check_py(
        test,
        stack,
        &script,
        &[
            ("load_author_profiles", line_of("# leak")),
            ("handle", line_of("# call")),
            ("main", line_of("# serve")),
            ("<module>", line_of("# start")),
        ],
    );
    let (first, last) = (at[0], at[at.len() - 1]);
    // The Python frames sit where the eval loop ran them: together in the
    // one C call that ran them all, or each in place of its own call with
    // the C call path between them.
    match calls {
        Calls::Inlined => assert_eq!(last - first + 1, at.len(), "{test}: {names:?}"),
        Calls::ThroughC => assert!(
            at.windows(2).all(|w| w[1] - w[0] > 1),
            "{test}: no C frames between Python calls: {names:?}"
        ),
    }
    // The malloc caller chain up to the eval loop's callee stays ...
    assert!(
        names[..first].iter().any(|n| n == "PyByteArray_Resize"),
        "{test}: native frames inside the interpreter lost: {names:?}"
    );
    assert!(
        frames[..first].iter().all(|f| f["kind"] == "native"),
        "{test}: {names:?}"
    );
    // ... and so does the native path into the interpreter.
    assert!(
        names[last + 1..].iter().any(|n| n == "Py_BytesMain"),
        "{test}: native frames outside the interpreter lost: {names:?}"
    );

    // A call from C back into Python (`map` calling `load_one`): the
    // frames run by the inner eval loop call go in its place, inside the
    // C frames of `map`, the others in the outer call's place. (`map` is
    // reached from two call sites in `list_extend`: two stacks, same
    // frames.)
    let stacks = stacks_through(&r, "load_one");
    assert!(
        sum(&stacks, "outstanding_allocs") >= BATCH_LEAKS
            && sum(&stacks, "outstanding_bytes") >= BATCH_LEAKS * BATCH_LEAK_BYTES,
        "{test}: the batch is not all outstanding: {stacks:#?}"
    );
    for stack in stacks {
        let names = functions(stack);
        let at = check_py(
            test,
            stack,
            &script,
            &[
                ("load_one", line_of("# leak one")),
                ("handle_batch", line_of("# map")),
                ("main", line_of("# batch")),
                ("<module>", line_of("# start")),
            ],
        );
        // `map`'s C frames sit between them: `map_next` by name unless the
        // binary is stripped of it (Debian's keeps exported symbols only).
        let between = &names[at[0] + 1..at[1]];
        assert!(
            between.iter().any(|n| n == "map_next")
                || (!between.is_empty() && between.iter().any(|n| n == "??")),
            "{test}: map's C frames not between load_one and handle_batch: {names:?}"
        );
        if calls == Calls::Inlined {
            assert_eq!(at[3] - at[1], 2, "{test}: {names:?}");
        }
    }
}

#[test]
fn distro_python311_names_python_frames() {
    check_python_frames(
        "distro_python311_names_python_frames",
        &["/usr/bin/python3.11"],
        Calls::Inlined,
    );
}

#[test]
fn pyenv_python38_names_python_frames() {
    check_pyenv(
        "pyenv_python38_names_python_frames",
        "3.8.18",
        Calls::ThroughC,
    );
}

#[test]
fn pyenv_python39_names_python_frames() {
    check_pyenv(
        "pyenv_python39_names_python_frames",
        "3.9.18",
        Calls::ThroughC,
    );
}

#[test]
fn pyenv_python310_names_python_frames() {
    check_pyenv(
        "pyenv_python310_names_python_frames",
        "3.10.13",
        Calls::ThroughC,
    );
}

#[test]
fn pyenv_python311_names_python_frames() {
    check_pyenv(
        "pyenv_python311_names_python_frames",
        "3.11.7",
        Calls::Inlined,
    );
}

#[test]
fn pyenv_python312_names_python_frames() {
    check_pyenv(
        "pyenv_python312_names_python_frames",
        "3.12.1",
        Calls::Inlined,
    );
}

#[test]
fn pyenv_python313_names_python_frames() {
    check_pyenv(
        "pyenv_python313_names_python_frames",
        "3.13.0",
        Calls::Inlined,
    );
}

/// A 3.10 whose binary and libpython names say no version (`libqython`,
/// with `DT_NEEDED` and `DT_SONAME` renamed to match, in a scratch
/// directory) is named by the `sys.version` text in its memory.
#[test]
fn renamed_python310_is_named_by_its_version_text() {
    let test = "renamed_python310_is_named_by_its_version_text";
    let home = "/root/.pyenv/versions/3.10.13";
    let (lib, bin) = (
        format!("{home}/lib/libpython3.10.so.1.0"),
        format!("{home}/bin/python3.10"),
    );
    if !Path::new(&lib).exists() || !Path::new(&bin).exists() {
        eprintln!("skipping {test}: pyenv 3.10.13 is not installed ({lib} missing)");
        return;
    }
    let dir = ScriptDir::new(test);
    let rename = |from: &str, to: &Path| {
        let data = std::fs::read(from).unwrap_or_else(|e| panic!("{test}: read {from}: {e}"));
        let (old, new) = (b"libpython3.10.so.1.0\0", b"libqython3.10.so.1.0\0");
        let at = data
            .windows(old.len())
            .position(|w| w == old)
            .unwrap_or_else(|| panic!("{test}: no libpython name in {from}"));
        let mut out = data.clone();
        out[at..at + new.len()].copy_from_slice(new);
        std::fs::write(to, out).unwrap_or_else(|e| panic!("{test}: write {to:?}: {e}"));
    };
    let renamed_lib = dir.0.join("libqython3.10.so.1.0");
    let renamed_bin = dir.0.join("qy");
    rename(&lib, &renamed_lib);
    rename(&bin, &renamed_bin);
    std::fs::set_permissions(
        &renamed_bin,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("make the copy executable");
    let libdir = format!("LD_LIBRARY_PATH={}", dir.0.display());
    let pyhome = format!("PYTHONHOME={home}");
    let interp = renamed_bin.display().to_string();
    check_python_frames(
        test,
        &["/usr/bin/env", &libdir, &pyhome, &interp],
        Calls::ThroughC,
    );
}
