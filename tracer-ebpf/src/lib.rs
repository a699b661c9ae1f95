//! Host-side stub so the workspace builds; the programs live in `main.rs`
//! and are compiled for `bpfel-unknown-none` by `tracer/build.rs`.
#![no_std]
