//! Plain LuaJIT: Debian's `luajit` interpreter (upstream LuaJIT 2.1, whose
//! `lua_State` is smaller than OpenResty's, so its VMs are told apart in
//! memory), traced with `-p`: Lua frames on JIT-compiled code, and the
//! leak's bytes against the heap's own growth.
//!
//! Debian's `luajit` conflicts with the LuaJIT that nginx's Lua module
//! uses, so it is unpacked from its package rather than installed.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use leaktrace_tests::{debian_package, fixture_dir, forward_lines, require_bpf, Guard, Tracer};
use serde_json::Value;

/// Seconds between the two heap measurements, while the trace runs.
const WINDOW_S: u64 = 8;

fn work_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("leaktrace-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test's directory");
    dir
}

/// The 1-based line of `marker` in `src`.
fn line_of(src: &str, marker: &str) -> u64 {
    src.lines()
        .position(|l| l.contains(marker))
        .map(|i| i as u64 + 1)
        .unwrap_or_else(|| panic!("no {marker} in the script"))
}

/// Asks the script for its heap after a full collection, in bytes.
fn heap(flag: &std::path::Path, lines: &mpsc::Receiver<String>) -> f64 {
    std::fs::write(flag, b"").expect("write the flag file");
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("luajit printed its heap");
        if let Some(kib) = line.strip_prefix("heap ") {
            return kib.trim().parse::<f64>().expect("a heap size") * 1024.0;
        }
    }
}

fn lua_frames_in<'a>(stack: &'a Value, file: &str) -> Vec<&'a Value> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .filter(|f| f["kind"] == "lua" && f["file"].as_str().is_some_and(|p| p.ends_with(file)))
        .collect()
}

#[test]
fn debian_luajit_leak_is_named_at_its_lua_line() {
    let test = "debian_luajit_leak_is_named_at_its_lua_line";
    if !require_bpf(test) {
        return;
    }
    let luajit = debian_package("luajit").join("usr/bin/luajit");
    let script = fixture_dir().join("lua/plain_leak.lua");
    let src = std::fs::read_to_string(&script).expect("read the script");
    let leak_line = line_of(&src, "-- LEAK");
    let dir = work_dir(test);
    let flag = dir.join("heap-please");
    let mut child = Command::new(&luajit)
        .arg(&script)
        .arg(&flag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{test}: cannot start {}: {e}", luajit.display()));
    let (tx, lines) = mpsc::channel();
    forward_lines(child.stdout.take().expect("stdout"), tx);
    let guard = Guard(child);
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(20)).as_deref(),
        Ok("ready"),
        "{test}: luajit did not start"
    );
    // Let the heap grow and the loop be compiled before attaching.
    thread::sleep(Duration::from_secs(2));
    let pid = guard.0.id().to_string();
    let out = dir.join("report.json");
    let out_s = out.display().to_string();
    let tracer = Tracer::attach(&[
        "-p", &pid, "-i", "1", "-d", "120", "-n", "100", "--format", "json", "-o", &out_s,
    ]);
    let before = heap(&flag, &lines);
    thread::sleep(Duration::from_secs(WINDOW_S));
    let after = heap(&flag, &lines);
    // Readings after the collection, so the trace sees it.
    thread::sleep(Duration::from_millis(2500));
    let fin = tracer.interrupt();
    assert!(fin.status.success(), "{test}: leaktrace failed: {fin:?}");
    let text = std::fs::read_to_string(&out).expect("the report file");
    let r: Value = serde_json::from_str(&text).expect("the report is JSON");

    let notes: Vec<&str> = r["notes"]
        .as_array()
        .map(|n| n.iter().filter_map(|n| n.as_str()).collect())
        .unwrap_or_default();
    assert!(
        !notes.iter().any(|n| n.contains("no VM was found")),
        "{test}: the VM was not found: {notes:#?}"
    );
    let stacks = r["stacks"].as_array().expect("stacks");
    let growing: Vec<&Value> = stacks.iter().filter(|s| s["trend"] == "growing").collect();
    // The insertion, named at its line, in a growing row.
    let named = growing.iter().find(|s| {
        lua_frames_in(s, "plain_leak.lua").iter().any(|f| {
            f["function"]
                .as_str()
                .is_some_and(|n| n.contains("remember"))
                && f["line"] == leak_line
        })
    });
    assert!(
        named.is_some(),
        "{test}: no growing row names remember at plain_leak.lua:{leak_line}: {}",
        serde_json::to_string_pretty(&growing).unwrap_or_default()
    );
    // Lua frames on the JIT's code: some row was recorded in a trace.
    assert!(
        stacks
            .iter()
            .any(|s| s["frames"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["function"]
                    .as_str()
                    .is_some_and(|n| n.contains("[trace]"))))),
        "{test}: no row was recorded inside a JIT trace"
    );
    // Every growing byte under the script's frames, against the heap's
    // growth over the same window.
    let traced: i64 = growing
        .iter()
        .filter(|s| !lua_frames_in(s, "plain_leak.lua").is_empty())
        .map(|s| s["outstanding_bytes"].as_i64().unwrap_or(0))
        .sum();
    let grew = after - before;
    assert!(grew > 1e6, "{test}: the heap grew only {grew} bytes");
    let ratio = traced as f64 / grew;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{test}: the growing rows hold {traced} bytes, the heap grew {grew:.0} ({ratio:.3}x)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// PUC-Rio's Lua (Debian's `lua5.1` and `lua5.4`) is not LuaJIT: its
/// frames are not read, and the report says so, naming the version, while
/// its leak is still found through malloc with native stacks.
#[test]
fn debian_puc_lua_is_named_in_a_note_and_its_leak_found() {
    let test = "debian_puc_lua_is_named_in_a_note_and_its_leak_found";
    if !require_bpf(test) {
        return;
    }
    for (package, version) in [("lua5.1", "Lua 5.1"), ("lua5.4", "Lua 5.4")] {
        let lua = debian_package(package).join("usr/bin").join(package);
        let child = Command::new(&lua)
            .args([
                "-e",
                "local kept = {} local i = 0 \
                 while true do i = i + 1 kept[#kept + 1] = string.rep('p', 200) .. i \
                 if i % 500 == 0 then io.read(0) end end",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: cannot start {}: {e}", lua.display()));
        let guard = Guard(child);
        thread::sleep(Duration::from_millis(500));
        let pid = guard.0.id().to_string();
        let fin = Tracer::attach(&["-p", &pid, "-d", "3", "-i", "0", "--format", "json"]).finish();
        assert!(fin.status.success(), "{test}: {package}: {fin:?}");
        let r = fin.json();
        let notes: Vec<&str> = r["notes"]
            .as_array()
            .map(|n| n.iter().filter_map(|n| n.as_str()).collect())
            .unwrap_or_default();
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("{version}.")) && n.contains("PUC-Rio")),
            "{test}: no note names {version} (PUC-Rio): {notes:#?}"
        );
        let growing = r["stacks"]
            .as_array()
            .expect("stacks")
            .iter()
            .filter(|s| s["trend"] == "growing")
            .count();
        assert!(growing > 0, "{test}: {package}: no growing row");
    }
}
