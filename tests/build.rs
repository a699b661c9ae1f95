//! Compiles the C fixtures with gcc into OUT_DIR.
use std::{env, path::PathBuf, process::Command};

fn gcc(args: &[&str]) {
    let st = Command::new("gcc")
        .args(args)
        .status()
        .expect("gcc is needed to build the test fixtures (cargo xtask setup installs it)");
    assert!(st.success(), "gcc {args:?} failed");
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let o = |name: &str| out.join(name).display().to_string();
    println!("cargo:rerun-if-changed=fixtures");
    let fp = ["-O0", "-g", "-fno-omit-frame-pointer"];
    let mut a: Vec<&str> = fp.to_vec();
    let leaky = o("leaky");
    a.extend(["-o", &leaky, "fixtures/leaky.c"]);
    gcc(&a);
    let lib = o("libmyalloc.so");
    gcc(&[
        "-O1",
        "-g",
        "-shared",
        "-fPIC",
        "-o",
        &lib,
        "fixtures/myalloc.c",
    ]);
    let user = o("uses_myalloc");
    let ldir = format!("-L{}", out.display());
    let rpath = format!("-Wl,-rpath,{}", out.display());
    gcc(&[
        "-O0",
        "-g",
        "-o",
        &user,
        "fixtures/uses_myalloc.c",
        &ldir,
        "-lmyalloc",
        &rpath,
    ]);

    // tests/tests/accounting.rs: frame pointers and no sibling calls, so
    // every frame of the fixtures' own code is walkable.
    let acct = [
        "-O0",
        "-g",
        "-fno-omit-frame-pointer",
        "-fno-optimize-sibling-calls",
    ];
    for name in [
        "sys_regions",
        "trend_mix",
        "forking_master",
        "dlopen_host",
        "load_churn",
        "aged_leak",
    ] {
        let exe = o(name);
        let src = format!("fixtures/{name}.c");
        let mut a: Vec<&str> = acct.to_vec();
        a.extend(["-o", &exe, &src, "-pthread", "-ldl"]);
        gcc(&a);
    }
    let plugin = o("libleakplugin.so");
    let mut a: Vec<&str> = acct.to_vec();
    a.extend(["-shared", "-fPIC", "-o", &plugin, "fixtures/leakplugin.c"]);
    gcc(&a);
    // Built like a release allocator: its forwards are tail calls.
    let prefalloc = o("libprefalloc.so");
    gcc(&[
        "-O2",
        "-g",
        "-shared",
        "-fPIC",
        "-o",
        &prefalloc,
        "fixtures/prefalloc.c",
    ]);
    let user = o("uses_prefalloc");
    let mut a: Vec<&str> = acct.to_vec();
    a.extend([
        "-o",
        &user,
        "fixtures/uses_prefalloc.c",
        &ldir,
        "-lprefalloc",
        &rpath,
    ]);
    gcc(&a);
}
