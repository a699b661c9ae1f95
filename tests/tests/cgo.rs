//! End-to-end: a cgo program's C malloc leak, with the Go code that called
//! into C on the same stack.
//!
//! `cache_blob` (C, in the cgo preamble) keeps every block it mallocs;
//! `main.storeBlob` calls it for each request from `main.handle`. Between
//! them the Go runtime switches from the goroutine's stack to the system
//! stack (`runtime.asmcgocall`), which the C code's unwind tables cannot
//! describe. leaktrace must name the C function, the cgo glue and the Go
//! callers in order, with the bytes leaked.

use std::path::PathBuf;

use leaktrace_tests::{functions, require_bpf, stacks_from, sum, Fixture, Go, GoDir, Tracer};

const SOURCE: &str = r#"package main

/*
#include <stdlib.h>
#include <string.h>

// Read from Go (blobsKept), so the compiler cannot drop the mallocs.
void *kept[100000];
int nkept;

__attribute__((noinline)) void cache_blob(int size) {
	void *p = malloc(size);
	memset(p, 1, size);
	if (nkept < 100000) kept[nkept++] = p;
}
*/
import "C"

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

func blobsKept() int { return int(C.nkept) }

//go:noinline
func storeBlob(size int) {
	C.cache_blob(C.int(size))
}

//go:noinline
func handle(n int) {
	for i := 0; i < n; i++ {
		storeBlob(3000)
	}
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	fmt.Println("ready")
	for in.Scan() {
		switch strings.TrimSpace(in.Text()) {
		case "go":
			handle(200)
			fmt.Println("done", blobsKept())
		case "quit":
			return
		}
	}
}
"#;

fn build() -> (GoDir, PathBuf) {
    Go::installed().build("cgo", "cgoleak", SOURCE, &[], true)
}

#[test]
fn cgo_malloc_leak_shows_c_and_go_frames() {
    if !require_bpf("cgo_malloc_leak_shows_c_and_go_frames") {
        return;
    }
    let (_dir, bin) = build();
    let mut fx = Fixture::start(&bin, &[]);
    let pid = fx.pid().to_string();
    let tracer = Tracer::attach(&["-p", &pid, "-i", "0", "--format", "json", "-n", "100"]);
    fx.send("go");
    fx.expect("done");
    let out = tracer.interrupt();
    assert!(out.status.success(), "leaktrace failed: {out:?}");
    let r = out.json();
    let leaks = stacks_from(&r, "cache_blob");
    let all: Vec<Vec<String>> = r["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .map(functions)
        .collect();
    assert!(!leaks.is_empty(), "no stack from cache_blob: {all:#?}");
    assert_eq!(
        sum(&leaks, "outstanding_bytes"),
        200 * 3000,
        "bytes leaked by cache_blob; stacks: {all:#?}"
    );
    for s in &leaks {
        let f = functions(s);
        let at = |name: &str| f.iter().position(|x| x == name);
        let (Some(store), Some(handle)) = (at("main.storeBlob"), at("main.handle")) else {
            panic!("the Go callers are missing from a cgo stack: {f:#?}");
        };
        assert!(
            store < handle,
            "main.storeBlob must be inside main.handle: {f:#?}"
        );
        assert!(
            f.iter().position(|x| x.contains("cache_blob")) < Some(store),
            "the C frames come first: {f:#?}"
        );
    }
    fx.send("quit");
}
