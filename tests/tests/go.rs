//! End-to-end: the Go heap of unmodified Go binaries, through the
//! runtime's own profile buckets.
//!
//! A stdlib-only Go program (built here with the installed `go`, Debian's
//! 1.19) has the label-cardinality leak: every new URL gets a metric with
//! five preallocated 4000-byte buffers (`newSummary`), kept forever in a
//! map (`lookupMetric`), next to churn that is freed. leaktrace must name
//! `main.newSummary` <- `main.lookupMetric` <- `main.handleRequest` as the
//! top growing Go stack, with the bytes the program's own heap profile
//! gives that stack (`go tool pprof -inuse_space`), within 15%.
//! Without runtime/pprof the runtime samples nothing: the report must say
//! so, and `--go-enable-profiling` must switch sampling on. The traced
//! program must keep running after leaktrace detaches.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use leaktrace_tests::{functions, require_bpf, stacks_from, sum, Fixture, Tracer};
use serde_json::Value;

const SOURCE: &str = r#"package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
	//PPROF_IMPORT
)

// Summary is a metric with preallocated quantile buffers.
type Summary struct {
	buckets [5][]float64
	count   uint64
}

//go:noinline
func newSummary() *Summary {
	s := &Summary{}
	for i := range s.buckets {
		s.buckets[i] = make([]float64, 500)
	}
	return s
}

var metrics = map[string]*Summary{}

//go:noinline
func lookupMetric(url string) *Summary {
	if s, ok := metrics[url]; ok {
		return s
	}
	s := newSummary()
	metrics[url] = s
	return s
}

var churn [][]byte

//go:noinline
func handleRequest(i int) {
	url := fmt.Sprintf("/api/users/%d/profile", i)
	lookupMetric(url).count++
	lookupMetric("/healthz").count++
	churn = append(churn, make([]byte, 16<<10))
	if len(churn) > 64 {
		churn = churn[:0]
	}
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	fmt.Println("ready")
	next := 0
	for in.Scan() {
		switch cmd := strings.TrimSpace(in.Text()); {
		case cmd == "go":
			// 4000 new URLs over about 4 s: a heap that keeps growing.
			for batch := 0; batch < 40; batch++ {
				for i := 0; i < 100; i++ {
					handleRequest(next)
					next++
				}
				time.Sleep(100 * time.Millisecond)
			}
			runtime.GC()
			fmt.Println("done")
		case strings.HasPrefix(cmd, "profile "):
			runtime.GC()
			fmt.Println("profiled", writeProfile(strings.TrimPrefix(cmd, "profile ")))
		case cmd == "ping":
			fmt.Println("pong")
		}
	}
}
"#;

const PPROF_IMPORT: &str = r#""runtime/pprof""#;

const WRITE_PROFILE: &str = r#"
func writeProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return pprof.WriteHeapProfile(f)
}
"#;

const NO_PROFILE: &str = r#"
func writeProfile(path string) error { return fmt.Errorf("built without runtime/pprof") }
"#;

/// A temporary directory holding the fixture's source and build, removed
/// on drop.
struct GoDir(PathBuf);

impl GoDir {
    /// Build the fixture, with or without runtime/pprof, in a fresh
    /// directory (its own GOPATH and GOCACHE; no network needed).
    fn build(tag: &str, pprof: bool) -> (Self, PathBuf) {
        Self::build_with(tag, pprof, &[])
    }

    /// As [`GoDir::build`], with extra `go build` flags
    /// (`-ldflags=-s -w` strips the symbol table and DWARF).
    fn build_with(tag: &str, pprof: bool, flags: &[&str]) -> (Self, PathBuf) {
        let dir = std::env::temp_dir().join(format!("leaktrace-go-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Go fixture directory");
        let dir = GoDir(dir);
        let src = if pprof {
            SOURCE.replace("//PPROF_IMPORT", PPROF_IMPORT) + WRITE_PROFILE
        } else {
            SOURCE.to_string() + NO_PROFILE
        };
        std::fs::write(dir.0.join("main.go"), src).expect("write main.go");
        std::fs::write(dir.0.join("go.mod"), "module leakfix\n\ngo 1.19\n").expect("write go.mod");
        let bin = dir.0.join(if pprof { "leaky-pprof" } else { "leaky" });
        let out = Command::new("go")
            .arg("build")
            .args(flags)
            .arg("-o")
            .arg(&bin)
            .arg(".")
            .current_dir(&dir.0)
            .env("GOFLAGS", "-mod=mod")
            .env("GOPATH", dir.0.join("gopath"))
            .env("GOCACHE", dir.0.join("gocache"))
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", "0")
            .output()
            .unwrap_or_else(|e| {
                panic!("{tag}: `go` is needed by this test (apt-get install golang-go): {e}")
            });
        assert!(
            out.status.success(),
            "{tag}: go build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, bin)
    }
}

impl Drop for GoDir {
    fn drop(&mut self) {
        // The module cache is read-only: make it writable first.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Attach, run the leak, and return the report (the fixture stays alive).
fn trace(fx: &mut Fixture, extra: &[&str], profile: Option<&Path>) -> (Value, String) {
    let pid = fx.pid().to_string();
    let mut args = vec![
        "-p",
        &pid,
        "-i",
        "0",
        "--format",
        "json",
        "-n",
        "50",
        "--sample-every",
        "0.2",
    ];
    args.extend_from_slice(extra);
    let tracer = Tracer::attach(&args);
    fx.send("go");
    fx.expect("done");
    if let Some(p) = profile {
        fx.send(&format!("profile {}", p.display()));
        let line = fx.expect_line("profiled");
        assert!(
            line.ends_with("<nil>"),
            "the fixture's profile failed: {line}"
        );
    }
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    (out.json(), out.stderr)
}

/// The traced program still runs after leaktrace detached.
fn still_answers(fx: &mut Fixture) {
    fx.send("ping");
    fx.expect("pong");
}

/// Stacks whose innermost frame is Go code, in report order.
fn go_stacks(r: &Value) -> Vec<&Value> {
    r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["frames"][0]["kind"] == "go")
        .collect()
}

/// `main.newSummary`'s in-use bytes in the fixture's own heap profile.
fn pprof_flat_bytes(bin: &Path, profile: &Path, function: &str) -> f64 {
    let out = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-sample_index=inuse_space",
            "-unit=B",
        ])
        .arg(bin)
        .arg(profile)
        .output()
        .expect("run go tool pprof");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "go tool pprof failed: {text}");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().last() == Some(function))
        .unwrap_or_else(|| panic!("pprof does not list {function}:\n{text}"));
    line.split_whitespace()
        .next()
        .and_then(|v| v.trim_end_matches('B').parse().ok())
        .unwrap_or_else(|| panic!("unparsable pprof line: {line}"))
}

#[test]
fn go_heap_growth_named_and_matches_pprof() {
    let test = "go_heap_growth_named_and_matches_pprof";
    if !require_bpf(test) {
        return;
    }
    let (dir, bin) = GoDir::build("pprof", true);
    leak_named_and_matches_pprof(test, &dir, &bin);
}

/// Stripped (`-ldflags="-s -w"`: no `.symtab`, no DWARF): the runtime's
/// functions and variables come from `.gopclntab` and the code, the
/// frames from `.gopclntab`; the result must be the same as unstripped,
/// with file:line on the leak's frames.
#[test]
fn go_stripped_binary_named_and_matches_pprof() {
    let test = "go_stripped_binary_named_and_matches_pprof";
    if !require_bpf(test) {
        return;
    }
    let (dir, bin) = GoDir::build_with("stripped", true, &["-ldflags=-s -w"]);
    let sections = Command::new("readelf")
        .arg("-S")
        .arg(&bin)
        .output()
        .expect("run readelf");
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "{test}: the fixture is not stripped:\n{sections}"
    );
    let top = leak_named_and_matches_pprof(test, &dir, &bin);
    let frames = top["frames"].as_array().expect("frames");
    for f in &frames[..3] {
        assert_eq!(f["kind"], "go", "{test}: {f}");
        assert!(
            f["file"].as_str().is_some_and(|p| p.ends_with("/main.go"))
                && f["line"].as_u64() > Some(0),
            "{test}: no file:line from .gopclntab: {f}"
        );
    }
}

/// Objects allocated before leaktrace attached: the fixture leaks 4000
/// summaries untraced, then leaktrace attaches and it leaks 4000 more.
/// The runtime's bucket list, walked at attach, holds the first half, so
/// the leak's bytes must still be the program's own heap profile's (all
/// 8000), not the half the probes saw.
#[test]
fn go_objects_allocated_before_attach_are_counted() {
    let test = "go_objects_allocated_before_attach_are_counted";
    if !require_bpf(test) {
        return;
    }
    let (dir, bin) = GoDir::build("preattach", true);
    let profile = dir.0.join("heap.pprof");
    let mut fx = Fixture::start(&bin, &[]);
    fx.send("go");
    fx.expect("done");
    let (r, _) = trace(&mut fx, &[], Some(&profile));
    still_answers(&mut fx);
    let leak = stacks_from(&r, "main.newSummary");
    assert!(!leak.is_empty(), "{test}: the leak is not named: {r:#}");
    assert_eq!(functions(leak[0])[1], "main.lookupMetric", "{test}");
    let ours = sum(&leak, "outstanding_bytes") as f64;
    let theirs = pprof_flat_bytes(&bin, &profile, "main.newSummary");
    let diff = (ours - theirs).abs() / theirs;
    eprintln!(
        "{test}: leaktrace {ours} B, go tool pprof {theirs} B ({:.2}%)",
        diff * 100.0
    );
    // 8000 summaries of 5 x 4096 bytes: about 156 MiB.
    assert!(
        theirs > 120.0 * 1048576.0,
        "{test}: the fixture's profile holds less than both rounds: {theirs} B"
    );
    assert!(
        diff <= 0.15,
        "{test}: leaktrace says {ours} B for main.newSummary, the program's own heap \
         profile {theirs} B (objects from before attach missing?)"
    );
}

/// Trace the pprof build at `bin`: the top growing Go stack must be the
/// leak, with the bytes its own heap profile gives within 15%, and churn
/// must not show. Returns that stack.
fn leak_named_and_matches_pprof(test: &str, dir: &GoDir, bin: &Path) -> Value {
    let profile = dir.0.join("heap.pprof");
    let mut fx = Fixture::start(bin, &[]);
    let (r, _) = trace(&mut fx, &[], Some(&profile));
    still_answers(&mut fx);

    let go = go_stacks(&r);
    let top = go
        .iter()
        .max_by_key(|s| s["growth_bytes_per_s"].as_f64().unwrap_or(0.0) as i64)
        .unwrap_or_else(|| panic!("{test}: no Go stack in the report: {r:#}"));
    let names = functions(top);
    assert_eq!(
        names.get(..3),
        Some(
            &[
                "main.newSummary".to_string(),
                "main.lookupMetric".to_string(),
                "main.handleRequest".to_string()
            ][..]
        ),
        "{test}: the top growing Go stack is not the leak: {top:#}"
    );
    assert_eq!(top["trend"], "growing", "{test}: {top:#}");

    let ours = sum(&stacks_from(&r, "main.newSummary"), "outstanding_bytes") as f64;
    let theirs = pprof_flat_bytes(bin, &profile, "main.newSummary");
    let diff = (ours - theirs).abs() / theirs;
    eprintln!(
        "{test}: leaktrace {ours} B, go tool pprof {theirs} B ({:.2}%)",
        diff * 100.0
    );
    assert!(
        diff <= 0.15,
        "{test}: leaktrace says {ours} B for main.newSummary, the program's own heap \
         profile {theirs} B"
    );
    // The churn is freed: it never shows as a large stack.
    let churn = sum(&stacks_from(&r, "main.handleRequest"), "outstanding_bytes") as f64;
    assert!(
        churn < theirs / 4.0,
        "{test}: churn counted as live: {churn} B"
    );
    (*top).clone()
}

#[test]
fn go_without_pprof_says_not_sampling_then_opt_in() {
    let test = "go_without_pprof_says_not_sampling_then_opt_in";
    if !require_bpf(test) {
        return;
    }
    let (_dir, bin) = GoDir::build("nopprof", false);

    let mut fx = Fixture::start(&bin, &[]);
    let (r, _) = trace(&mut fx, &[], None);
    still_answers(&mut fx);
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("not sampling heap allocations")
                && n.contains("--go-enable-profiling")),
        "{test}: no note that the runtime is not sampling: {notes:#?}"
    );
    assert!(
        stacks_from(&r, "main.newSummary").is_empty(),
        "{test}: a stack appeared though nothing is sampled: {r:#}"
    );
    drop(fx);

    let mut fx = Fixture::start(&bin, &[]);
    let (r, stderr) = trace(&mut fx, &["--go-enable-profiling", "524288"], None);
    still_answers(&mut fx);
    assert!(
        stderr.contains("runtime.MemProfileRate = 524288") && stderr.contains("changes the target"),
        "{test}: leaktrace did not say it changed the target: {stderr}"
    );
    let leak = stacks_from(&r, "main.newSummary");
    assert!(
        !leak.is_empty(),
        "{test}: with --go-enable-profiling the leak is not named: {r:#}"
    );
    assert_eq!(functions(leak[0])[1], "main.lookupMetric", "{test}");
    // 4000 summaries of 5 x 4096 bytes: about 78 MiB, sampled.
    let bytes = sum(&leak, "outstanding_bytes");
    assert!(
        (50 << 20..110 << 20).contains(&bytes),
        "{test}: implausible leak size {bytes} B"
    );
}
