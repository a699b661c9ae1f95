//! The built-in demo: a small program that leaks from a named function
//! while churning memory it frees, run as a child of leaktrace itself
//! (`leaktrace --demo-target`) so the demo needs nothing installed.

use std::{
    hint::black_box,
    io::{BufRead as _, Write as _},
    time::Duration,
};

/// A request handler that caches every session profile forever: the leak.
#[inline(never)]
fn cache_session_profile(cache: &mut Vec<*mut u8>) {
    // SAFETY: plain malloc; the pointer is kept (that is the leak).
    let p = unsafe { libc::malloc(4096) }.cast::<u8>();
    if !p.is_null() {
        // SAFETY: p points to 4096 writable bytes.
        unsafe { p.write_bytes(0x5a, 4096) };
        cache.push(p);
    }
}

/// Per-request scratch buffers, freed before the request ends: churn.
#[inline(never)]
fn render_response() {
    for size in [64usize, 200, 1500, 9000] {
        // SAFETY: allocated and freed here.
        unsafe {
            let p = libc::malloc(size);
            black_box(p);
            libc::free(p);
        }
    }
}

#[inline(never)]
fn handle_request(cache: &mut Vec<*mut u8>) {
    render_response();
    cache_session_profile(cache);
}

/// Run as the demo target: wait for a line on stdin (leaktrace has
/// attached), then serve fake requests until killed.
pub fn target_main() -> ! {
    // Everything the loop needs is allocated before tracing starts, so the
    // report shows only the request path.
    let mut cache = Vec::with_capacity(1 << 16);
    let mut stdout = std::io::stdout();
    let mut line = String::with_capacity(64);
    let _ = std::io::stdin().lock().read_line(&mut line);
    loop {
        for _ in 0..10 {
            handle_request(black_box(&mut cache));
        }
        let _ = stdout.flush();
        std::thread::sleep(Duration::from_millis(50));
    }
}
