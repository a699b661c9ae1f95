use super::*;

const MIB: f64 = 1024.0 * 1024.0;

fn census(window_s: u64) -> Census {
    Census::with_mounts(
        CensusOptions {
            window: Duration::from_secs(window_s),
            ..CensusOptions::default()
        },
        Mounts::default(),
    )
}

fn inject(c: &mut Census, now_s: f64, pid: u32) {
    c.admit(
        now_s,
        pid,
        Ident {
            start_ticks: u64::from(pid),
            comm: format!("proc{pid}"),
            cgroup: Arc::from("/system.slice/demo.service"),
            statm: Source::Injected,
            text_pages: 1,
        },
    );
}

/// One tick with injected anon figures for some processes.
fn tick(c: &mut Census, now_s: f64, figures: &[(u32, f64)]) {
    c.begin(now_s);
    for &(pid, anon) in figures {
        if !c.procs.contains_key(&pid) {
            inject(c, now_s, pid);
        }
        let anon_bytes = anon.max(0.0) as u64;
        let reading = Reading {
            rss_bytes: anon_bytes + (8 << 20),
            anon_bytes,
        };
        c.record(now_s, pid, reading);
    }
    c.end(now_s);
}

/// Feed `f(t)` every `step_s` up to `secs` (window 600 s) and return the
/// census, plus every trend seen after `settle_s`.
fn run(secs: f64, step_s: f64, settle_s: f64, f: impl Fn(f64) -> f64) -> (Census, Vec<Trend>) {
    let mut c = census(600);
    let mut seen = Vec::new();
    let mut t = 0.0;
    while t <= secs {
        tick(&mut c, t, &[(7, f(t))]);
        if t >= settle_s {
            seen.push(c.process(7).expect("tracked").trend);
        }
        t += step_s;
    }
    (c, seen)
}

fn last_trend(c: &Census) -> Trend {
    c.process(7).expect("tracked").trend
}

/// A small deterministic jitter in whole pages, -n..=n.
fn jitter(t: f64, pages: i64) -> f64 {
    let x = (t * 7919.0) as i64;
    ((x.wrapping_mul(2_654_435_761) >> 7).rem_euclid(2 * pages + 1) - pages) as f64 * 4096.0
}

#[test]
fn flat_process_is_steady() {
    let (c, seen) = run(900.0, 2.0, 60.0, |t| 100.0 * MIB + jitter(t, 4));
    assert!(seen.iter().all(|&t| t == Trend::Steady), "{seen:?}");
    assert_eq!(c.growing_for_s(7), 0.0);
}

#[test]
fn tiny_process_with_page_jitter_is_not_growing() {
    let (_, seen) = run(900.0, 1.0, 60.0, |t| MIB + jitter(t, 3));
    assert!(!seen.contains(&Trend::Growing), "{seen:?}");
}

#[test]
fn steady_leak_is_growing_with_its_rate() {
    let (c, seen) = run(900.0, 2.0, 60.0, |t| 50.0 * MIB + 20_000.0 * t);
    assert!(seen.iter().all(|&t| t == Trend::Growing), "{seen:?}");
    let v = c.process(7).expect("tracked");
    assert!(
        (v.growth_bytes_per_s - 20_000.0).abs() < 500.0,
        "{}",
        v.growth_bytes_per_s
    );
    // Growing since the first classification, about 40 s in.
    let g = c.growing_for_s(7);
    assert!(g > 800.0 && g <= 900.0, "{g}");
}

#[test]
fn slow_leak_on_a_large_process_is_growing() {
    // 2 GiB resident, 50 KB/s more: 30 MB across the window.
    let (c, _) = run(900.0, 2.0, 60.0, |t| {
        2048.0 * MIB + 50_000.0 * t + jitter(t, 8)
    });
    assert_eq!(last_trend(&c), Trend::Growing);
}

#[test]
fn cache_that_filled_is_a_plateau_then_steady() {
    let fill = |t: f64| 20.0 * MIB + (t.min(250.0) * 0.8 * MIB);
    let (c, _) = run(600.0, 2.0, 0.0, fill);
    assert_eq!(last_trend(&c), Trend::Plateau);
    assert_eq!(c.growing_for_s(7), 0.0);
    // Once the window no longer holds the filling, it is just held.
    let (c, _) = run(1200.0, 2.0, 0.0, fill);
    assert_eq!(last_trend(&c), Trend::Steady);
}

#[test]
fn swinging_anon_memory_churns_and_is_never_growing() {
    // Square waves and GC sawtooths of various periods: once the window
    // holds two periods, never growing, and churn at the end.
    for period in [6.0, 20.0, 45.0, 90.0, 140.0] {
        let square = move |t: f64| {
            if ((t / (period / 2.0)) as u64).is_multiple_of(2) {
                100.0 * MIB
            } else {
                160.0 * MIB
            }
        };
        let sawtooth = move |t: f64| 200.0 * MIB + (t % period) / period * 600.0 * MIB;
        for (name, f) in [
            ("square", &square as &dyn Fn(f64) -> f64),
            ("sawtooth", &sawtooth),
        ] {
            let settle = 2.0 * period + 20.0;
            let (c, seen) = run(1500.0, 1.0, settle, f);
            assert!(
                !seen.contains(&Trend::Growing),
                "{name} period {period}: {:?}",
                seen.iter().filter(|&&t| t == Trend::Growing).count()
            );
            assert_eq!(last_trend(&c), Trend::Churn, "{name} period {period}");
            assert_eq!(c.growing_for_s(7), 0.0);
        }
    }
}

#[test]
fn leak_under_a_sawtooth_is_growing() {
    // A GC that frees back to a floor rising 40 KB/s.
    let (c, _) = run(900.0, 1.0, 0.0, |t| {
        200.0 * MIB + 40_000.0 * t + (t % 30.0) / 30.0 * 300.0 * MIB
    });
    assert_eq!(last_trend(&c), Trend::Growing);
    let g = c.process(7).expect("tracked").growth_bytes_per_s;
    assert!((g - 40_000.0).abs() < 8_000.0, "{g}");
}

#[test]
fn freeing_is_shrinking() {
    let (c, _) = run(600.0, 2.0, 0.0, |t| 500.0 * MIB - 200_000.0 * t);
    assert_eq!(last_trend(&c), Trend::Shrinking);
}

#[test]
fn unknown_until_enough_slots() {
    // Slots are 600/64 s long: three of them are not enough.
    let (c, _) = run(20.0, 1.0, 0.0, |t| MIB + 1_000_000.0 * t);
    assert_eq!(last_trend(&c), Trend::Unknown);
}

#[test]
fn growth_that_stops_resets_growing_for() {
    let leak_then_flat = |t: f64| 50.0 * MIB + 50_000.0 * t.min(300.0);
    let mut c = census(600);
    let mut t = 0.0;
    let mut longest: f64 = 0.0;
    while t <= 1000.0 {
        tick(&mut c, t, &[(7, leak_then_flat(t))]);
        longest = longest.max(c.growing_for_s(7));
        t += 2.0;
    }
    assert!(longest > 150.0, "{longest}");
    assert_eq!(c.growing_for_s(7), 0.0);
    assert_ne!(last_trend(&c), Trend::Growing);
}

#[test]
fn history_is_bounded_by_the_slots() {
    let (c, _) = run(3000.0, 0.5, 0.0, |t| MIB + t);
    let v = c.process(7).expect("tracked");
    assert!(v.history.len() <= SLOTS, "{}", v.history.len());
    assert!(v.history.len() >= SLOTS - 2, "{}", v.history.len());
    let span = v.history[v.history.len() - 1].0 - v.history[0].0;
    assert!(span <= 600.0, "{span}");
    assert!(c.process_summaries()[0].history.is_empty());
}

#[test]
fn unselected_processes_age_out_and_are_remembered() {
    let mut c = census(600);
    tick(&mut c, 0.0, &[(1, 1e6), (2, 2e6), (3, 3e6)]);
    tick(&mut c, 2.0, &[(1, 1e6), (3, 3.5e6)]);
    assert!(c.process(2).is_none());
    let gone = c.last_known(2).expect("remembered");
    assert_eq!(gone.anon_bytes, 2_000_000);
    assert_eq!(gone.comm, "proc2");
    assert!(c.last_known(3).is_none(), "still running");
    let counts = c.counts();
    assert_eq!(counts.processes_seen, 3);
    assert_eq!(counts.aged_out, 1);
    assert_eq!(counts.processes, 2);
    // Sorted by growth: 3 grew, 1 did not.
    let order: Vec<u32> = c.processes().iter().map(|v| v.pid).collect();
    assert_eq!(order, vec![3, 1]);
}

#[test]
fn remembered_exits_are_bounded() {
    let mut c = census(600);
    for i in 0..(LAST_KNOWN as u32 + 50) {
        tick(&mut c, f64::from(i), &[(1000 + i, 1e6)]);
    }
    tick(&mut c, 1e4, &[]);
    assert_eq!(c.exited.len(), LAST_KNOWN);
    assert!(c.last_known(1000).is_none(), "oldest forgotten");
    assert!(c.last_known(1000 + LAST_KNOWN as u32 + 49).is_some());
}

#[test]
fn parses_statm_stat_cgroup_and_memory_files() {
    assert_eq!(
        parse_statm(b"2466 412 384 169 0 116 0\n"),
        Some(Statm {
            size: 2466,
            resident: 412,
            shared: 384,
            text: 169
        })
    );
    assert_eq!(parse_statm(b"1 2\n"), None);
    let stat = b"42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100\n";
    assert_eq!(
        parse_stat(stat),
        Some(Stat {
            comm: "a) b (c)".to_string(),
            state: b'S',
            flags: 4194560,
            start_ticks: 987654
        })
    );
    let kthread = b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 3 0 0\n";
    assert!(parse_stat(kthread).is_some_and(|s| s.flags & PF_KTHREAD != 0));

    let hybrid = b"9:name=systemd:/\n4:memory:/docker/abc\n1:cpu,cpuacct:/x\n0::/\n";
    assert_eq!(parse_cgroup(hybrid, true), Some("/docker/abc"));
    assert_eq!(parse_cgroup(hybrid, false), Some("/"));
    assert_eq!(
        parse_cgroup(b"0::/system.slice/nginx.service\n", false),
        Some("/system.slice/nginx.service")
    );
    assert_eq!(parse_cgroup(b"garbage\n", false), None);

    let v2 = b"anon 1234\nfile 99\nanon_thp 0\n";
    assert_eq!(parse_key(v2, "anon"), Some(1234));
    assert_eq!(parse_key(v2, "file"), Some(99));
    let v1 = b"cache 5\nrss 7\nrss_huge 0\ntotal_rss 11\n";
    assert_eq!(parse_key(v1, "total_rss"), Some(11));
    assert_eq!(parse_key(v1, "rss"), Some(7));
    assert_eq!(parse_limit(b"max\n".to_vec()), None);
    assert_eq!(parse_limit(b"9223372036854771712\n".to_vec()), None);
    assert_eq!(parse_limit(b"536870912\n".to_vec()), Some(512 << 20));
}

fn spawn_sleep() -> std::process::Child {
    std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("start sleep")
}

struct Reap(Vec<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_reaped_child_is_gone_and_last_known() {
    let mut c = Census::new(CensusOptions::default());
    let mut kids = Reap(vec![spawn_sleep()]);
    let pid = kids.0[0].id();
    // Wait for the exec so the figures are sleep's.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while procfs_comm(pid).as_deref() != Some("sleep") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    c.sample(0.0, &[pid]);
    let v = c.process(pid).expect("tracked");
    assert_eq!(v.comm, "sleep");
    assert!(v.rss_bytes > 0 && v.anon_bytes > 0, "{v:?}");
    let _ = kids.0[0].kill();
    let _ = kids.0[0].wait();
    // Still listed by a stale caller: the held statm says it is gone.
    c.sample(1.0, &[pid]);
    assert!(c.process(pid).is_none());
    let last = c.last_known(pid).expect("remembered");
    assert_eq!(last.anon_bytes, v.anon_bytes);
    drop(kids);
}

fn procfs_comm(pid: u32) -> Option<String> {
    crate::sys::procfs::comm(pid)
}

#[test]
fn held_statm_sees_this_process_grow() {
    let me = std::process::id();
    let mut c = Census::new(CensusOptions::default());
    c.sample(0.0, &[me]);
    let before = c.process(me).expect("tracked").anon_bytes;
    let block = vec![1u8; 64 << 20];
    c.sample(1.0, &[me]);
    let after = c.process(me).expect("tracked").anon_bytes;
    assert!(block.iter().step_by(4096).all(|&b| b == 1));
    assert!(
        after >= before + (32 << 20),
        "before {before} after {after}"
    );
}

#[test]
fn bound_refuses_then_a_much_larger_process_displaces_a_small_one() {
    let me = std::process::id();
    let kids = Reap(vec![spawn_sleep(), spawn_sleep()]);
    let (a, b) = (kids.0[0].id(), kids.0[1].id());
    // This test binary holds megabytes; sleep a few hundred KiB at most.
    let _ballast = vec![1u8; 16 << 20];
    let mut c = Census::new(CensusOptions {
        max_processes: 1,
        ..CensusOptions::default()
    });
    c.sample(0.0, &[a]);
    c.sample(1.0, &[a, b]);
    assert!(c.process(a).is_some());
    assert!(c.process(b).is_none(), "refused: same size");
    assert_eq!(c.counts().dropped, 1);
    c.sample(2.0, &[a, me]);
    assert!(c.process(me).is_some(), "larger one admitted");
    assert!(c.process(a).is_none(), "small one displaced");
    let counts = c.counts();
    assert_eq!(counts.processes, 1);
    assert_eq!(counts.dropped, 3, "{counts:?}");
    drop(kids);
}

#[test]
fn kernel_threads_are_ignored() {
    let mut c = Census::new(CensusOptions::default());
    // kthreadd is pid 2 in the initial pid namespace; elsewhere pid 2 may
    // be anything, so only check when it is a kernel thread.
    let is_kthread = std::fs::read("/proc/2/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
        .is_some_and(|s| s.flags & PF_KTHREAD != 0);
    c.sample(0.0, &[2]);
    if is_kthread {
        assert!(c.process(2).is_none());
        assert_eq!(c.counts().processes_seen, 0);
    }
}

/// Not an assertion of speed (the machine is shared): the figure for the
/// report. `cargo test -p leaktrace --lib census_of_this_machine -- --nocapture`.
#[test]
fn census_of_this_machine() {
    let mut c = Census::new(CensusOptions::default());
    let pids = crate::sys::procfs::all_pids();
    let t = std::time::Instant::now();
    c.sample(0.0, &pids);
    let first = t.elapsed();
    let mut steady = Duration::ZERO;
    const TICKS: u32 = 20;
    for i in 1..=TICKS {
        let pids = crate::sys::procfs::all_pids();
        let t = std::time::Instant::now();
        c.sample(f64::from(i), &pids);
        steady += t.elapsed();
    }
    let counts = c.counts();
    let per_tick = steady / TICKS;
    eprintln!(
        "census: {} pids listed, {} processes and {} cgroups tracked; first sample {:?}, \
         then {:?} per sample ({:.2} us per process); {counts:?}",
        pids.len(),
        counts.processes,
        counts.cgroups,
        first,
        per_tick,
        per_tick.as_secs_f64() * 1e6 / counts.processes.max(1) as f64,
    );
    let me = c
        .process(std::process::id())
        .expect("this process is tracked");
    assert!(me.anon_bytes > 0 && !me.comm.is_empty(), "{me:?}");
    assert!(counts.processes > 1);
    // Our own cgroup is read when its files are.
    let cg = c.cgroups();
    if let Some(g) = cg.iter().find(|g| g.path == me.cgroup) {
        assert!(g.memory_current > 0 && g.processes >= 1, "{g:?}");
    }
    eprintln!("cgroups: {cg:?}");
}

/// The cost per process at a realistic count: 500 `sleep`s beside what
/// runs here. Ignored by default (it starts 500 processes); run with
/// `cargo test --release -p leaktrace --lib census_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn census_cost_with_many_processes() {
    let kids = Reap((0..500).map(|_| spawn_sleep()).collect());
    std::thread::sleep(Duration::from_millis(500));
    let mut c = Census::new(CensusOptions::default());
    let list = std::time::Instant::now();
    let pids = crate::sys::procfs::all_pids();
    let list = list.elapsed();
    let t = std::time::Instant::now();
    c.sample(0.0, &pids);
    let first = t.elapsed();
    const TICKS: u32 = 50;
    let t = std::time::Instant::now();
    for i in 1..=TICKS {
        c.sample(f64::from(i), &pids);
    }
    let per_tick = t.elapsed() / TICKS;
    let counts = c.counts();
    eprintln!(
        "census of {} processes ({} pids listed in {list:?}): first sample {first:?}, then \
         {per_tick:?} per sample, {:.2} us per process; {:.3}% of a core at one sample a second",
        counts.processes,
        pids.len(),
        per_tick.as_secs_f64() * 1e6 / counts.processes.max(1) as f64,
        per_tick.as_secs_f64() * 100.0,
    );
    assert!(counts.processes >= 500, "{counts:?}");
    drop(kids);
}
