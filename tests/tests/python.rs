//! End-to-end: Python frames in the stacks of CPython 3.11 processes.
//!
//! Two builds of the same version: Debian's `/usr/bin/python3.11` (static
//! libpython in a stripped non-PIE binary) and pyenv's 3.11.7 (shared
//! `libpython3.11.so`). A script leaks `bytearray(4096)` buffers (malloc'd:
//! too big for pymalloc) from `load_author_profiles`, called by `handle`;
//! the leaking stack must name both, with the script's file and lines, in
//! place of the interpreter's eval loop, and keep the native frames
//! around it.

use std::path::{Path, PathBuf};

use leaktrace_tests::{functions, require_bpf, Fixture, Tracer};
use serde_json::Value;

const SCRIPT: &str = r#"import sys

PROFILES = {}


def load_author_profiles(n):
    for i in range(n):
        PROFILES[len(PROFILES)] = bytearray(4096)  # leak


def handle():
    load_author_profiles(200)  # call


def main():
    print("ready", flush=True)
    sys.stdin.readline()
    handle()  # serve
    print("done", flush=True)
    sys.stdin.readline()


main()  # start
"#;

const LEAKS: i64 = 200;
const LEAK_BYTES: i64 = 4096;

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

fn trace_python(test: &str, python: &str) -> (Value, String) {
    assert!(
        Path::new(python).exists(),
        "{test}: {python} is needed by this test"
    );
    let dir = ScriptDir::new(test);
    let script = dir.script().display().to_string();
    let mut fx = Fixture::start(Path::new(python), &[&script]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "100"]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "{test}: leaktrace failed: {out:?}");
    (out.json(), script)
}

fn check_python_frames(test: &str, python: &str) {
    if !require_bpf(test) {
        return;
    }
    let (r, script) = trace_python(test, python);
    let stack = r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .find(|s| functions(s).iter().any(|f| f == "load_author_profiles"))
        .unwrap_or_else(|| panic!("{test}: no stack names load_author_profiles: {r:#}"));
    assert!(
        stack["outstanding_allocs"].as_i64() >= Some(LEAKS)
            && stack["outstanding_bytes"].as_i64() >= Some(LEAKS * LEAK_BYTES),
        "{test}: the bytearrays are not all outstanding on one stack: {stack:#}"
    );
    let frames = stack["frames"].as_array().expect("frames");
    let names = functions(stack);

    // The Python frames, innermost first, with file and line.
    let py: Vec<&Value> = frames.iter().filter(|f| f["kind"] == "python").collect();
    let expect = [
        ("load_author_profiles", line_of("# leak")),
        ("handle", line_of("# call")),
        ("main", line_of("# serve")),
        ("<module>", line_of("# start")),
    ];
    assert_eq!(
        py.len(),
        expect.len(),
        "{test}: wrong Python frames in {names:?}"
    );
    for (f, (name, line)) in py.iter().zip(expect) {
        assert_eq!(f["function"], name, "{test}: {names:?}");
        assert_eq!(f["file"].as_str(), Some(script.as_str()), "{test}: {f}");
        assert_eq!(f["line"].as_u64(), Some(line), "{test}: {name}: {f}");
    }

    // The Python frames sit together where the eval loop ran them ...
    let first = frames
        .iter()
        .position(|f| f["kind"] == "python")
        .expect("a Python frame");
    let last = frames
        .iter()
        .rposition(|f| f["kind"] == "python")
        .expect("a Python frame");
    assert_eq!(last - first + 1, py.len(), "{test}: {names:?}");
    assert!(
        !names.iter().any(|n| n == "_PyEval_EvalFrameDefault"),
        "{test}: the eval loop is still shown: {names:?}"
    );
    // ... the malloc caller chain up to the eval loop's callee stays ...
    let inner = &names[..first];
    assert!(
        inner.iter().any(|n| n == "PyByteArray_Resize"),
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
}

#[test]
fn distro_python311_names_python_frames() {
    check_python_frames(
        "distro_python311_names_python_frames",
        "/usr/bin/python3.11",
    );
}

#[test]
fn pyenv_python311_names_python_frames() {
    check_python_frames(
        "pyenv_python311_names_python_frames",
        "/root/.pyenv/versions/3.11.7/bin/python3.11",
    );
}
