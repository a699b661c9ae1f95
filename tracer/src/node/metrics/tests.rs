use std::collections::{HashMap, HashSet};

use super::*;

/// A parsed sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A strict reader of format 0.0.4 as `render` must write it: HELP and
/// TYPE once per family, before its samples; a family's samples together;
/// `name{label="value",...} value` with only `\\`, `\"` and `\n` escapes;
/// no series twice; a newline at the end.
fn check(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "no final newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            assert!(valid_name(name), "{at}");
            assert!(helped.insert(name.to_string()), "HELP twice, {at}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
            assert!(valid_name(name), "{at}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{at}"
            );
            assert!(it.next().is_none(), "{at}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE twice, {at}"
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{at}");
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value, {at}"));
        let name = &line[..name_end];
        assert!(valid_name(name), "{at}");
        assert!(types.contains_key(name), "sample before its TYPE, {at}");
        if current.as_deref() != Some(name) {
            if let Some(prev) = current.take() {
                done.insert(prev);
            }
            assert!(!done.contains(name), "family split, {at}");
            current = Some(name.to_string());
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end: usize;
            loop {
                // label name
                let start = chars.peek().map(|&(i, _)| i).unwrap_or(body.len());
                if body[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = body[start..]
                    .find('=')
                    .unwrap_or_else(|| panic!("no '=', {at}"));
                let lname = &body[start..start + eq];
                assert!(
                    valid_name(lname) && !lname.contains(':'),
                    "label {lname:?}, {at}"
                );
                while chars.peek().is_some_and(|&(i, _)| i <= start + eq) {
                    chars.next();
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{at}");
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            other => panic!("bad escape {other:?}, {at}"),
                        },
                        Some((_, '"')) => break,
                        Some((_, '\n')) => panic!("raw newline, {at}"),
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated value, {at}"),
                    }
                }
                labels.push((lname.to_string(), value));
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    other => panic!("after a label {other:?}, {at}"),
                }
            }
            rest = &body[end..];
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before value, {at}"));
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value {v:?}, {at}")),
        };
        let names: HashSet<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names.len(), labels.len(), "label twice, {at}");
        let key = format!("{name}{labels:?}");
        assert!(series.insert(key), "series twice, {at}");
        out.push((name.to_string(), labels, value));
    }
    for name in types.keys() {
        assert!(helped.contains(name), "{name} without HELP");
    }
    out
}

fn row(pid: u32, anon: u64, trend: Trend, growth: f64) -> ProcessRow {
    ProcessRow {
        pid,
        comm: format!("worker-{pid}"),
        cgroup: "/system.slice/app.service".to_string(),
        container: String::new(),
        pod_uid: String::new(),
        anon_bytes: anon,
        rss_bytes: anon + 4096,
        growth_bytes_per_s: growth,
        trend,
    }
}

fn label<'a>(s: &'a Sample, k: &str) -> &'a str {
    s.1.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no label {k} in {s:?}"))
}

fn sample_snapshot() -> Snapshot {
    Snapshot {
        processes: vec![
            row(10, 5 << 20, Trend::Growing, 4096.5),
            row(11, 900 << 20, Trend::Steady, 0.0),
        ],
        cgroups: vec![CgroupRow {
            path: "/kubepods/pod1/abc".to_string(),
            container: "abc".to_string(),
            pod_uid: "1".to_string(),
            memory_current: 1 << 30,
            memory_max: Some(2 << 30),
            anon_bytes: None,
            growth_bytes_per_s: -12.25,
            trend: Trend::Shrinking,
            processes: 3,
        }],
        stacks: vec![
            StackRow {
                rank: 7,
                pid: None,
                comm: String::new(),
                source: "page_fault".to_string(),
                frames: stack_label(&["memset", "fill", "main", "libc_start"]),
                bytes: 1e6,
                growth_bytes_per_s: 10.0,
            },
            StackRow {
                rank: 3,
                pid: Some(10),
                comm: "worker-10".to_string(),
                source: "allocator".to_string(),
                frames: "x".repeat(500),
                bytes: 2e6,
                growth_bytes_per_s: 20.0,
            },
        ],
        own: SelfFigures {
            cpu_seconds_total: 1.5,
            rss_bytes: 30 << 20,
            events_lost_total: 2,
            drilldowns_total: 1,
            watched_processes: 2,
        },
        ..Snapshot::default()
    }
}

#[test]
fn exposition_is_well_formed() {
    let mut out = String::new();
    render(&sample_snapshot(), &mut out);
    let samples = check(&out);
    let get = |name: &str| -> Vec<&Sample> { samples.iter().filter(|s| s.0 == name).collect() };
    assert_eq!(get("leaktrace_process_anon_bytes").len(), 2);
    // Growing first.
    assert_eq!(label(get("leaktrace_process_anon_bytes")[0], "pid"), "10");
    let growing = get("leaktrace_process_growing");
    assert_eq!(label(growing[0], "trend"), "growing");
    assert_eq!(growing[0].2, 1.0);
    assert_eq!(growing[1].2, 0.0);
    assert_eq!(
        get("leaktrace_process_growth_bytes_per_second")[0].2,
        4096.5
    );
    assert_eq!(
        get("leaktrace_cgroup_memory_max_bytes")[0].2,
        (2u64 << 30) as f64
    );
    assert!(
        get("leaktrace_cgroup_anon_bytes").is_empty(),
        "unknown anon"
    );
    assert_eq!(get("leaktrace_cgroup_growth_bytes_per_second")[0].2, -12.25);
    assert_eq!(label(get("leaktrace_cgroup_memory_bytes")[0], "pod"), "1");
    // Stacks by rank, relabelled 1..N; labels cut.
    let stacks = get("leaktrace_stack_bytes");
    assert_eq!(label(stacks[0], "rank"), "1");
    assert_eq!(label(stacks[0], "pid"), "10");
    assert_eq!(label(stacks[1], "rank"), "2");
    assert_eq!(label(stacks[1], "pid"), "");
    assert_eq!(label(stacks[1], "stack"), "memset ← fill ← main");
    assert_eq!(label(stacks[0], "stack").chars().count(), STACK_LABEL_CHARS);
    assert_eq!(get("leaktrace_self_cpu_seconds_total")[0].2, 1.5);
    assert_eq!(get("leaktrace_events_lost_total")[0].2, 2.0);
    assert!(out.contains("# TYPE leaktrace_self_cpu_seconds_total counter\n"));
    assert!(
        out.contains("\nleaktrace_self_rss_bytes 31457280\n"),
        "{out}"
    );
}

#[test]
fn label_values_are_escaped() {
    let mut p = row(1, 1, Trend::Steady, 0.0);
    p.comm = "a\\b\"c\nd".to_string();
    p.cgroup = "/weird\"path\\".to_string();
    let snap = Snapshot {
        processes: vec![p],
        ..Snapshot::default()
    };
    let mut out = String::new();
    render(&snap, &mut out);
    assert!(
        out.contains(r#"comm="a\\b\"c\nd",cgroup="/weird\"path\\""#),
        "{out}"
    );
    let samples = check(&out);
    let s = samples
        .iter()
        .find(|s| s.0 == "leaktrace_process_anon_bytes")
        .expect("sample");
    assert_eq!(label(s, "comm"), "a\\b\"c\nd");
    assert_eq!(label(s, "cgroup"), "/weird\"path\\");
}

#[test]
fn odd_values_use_prometheus_spelling() {
    let mut out = String::new();
    for v in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        3.0,
        -0.5,
        1e20,
        2.5e-7,
    ] {
        push_value(&mut out, v);
        out.push(' ');
    }
    assert_eq!(
        out,
        "NaN +Inf -Inf 3 -0.5 100000000000000000000 0.00000025 "
    );
}

#[test]
fn series_stay_bounded_with_thousands_of_processes() {
    let count_series = |n: u32, growing_every: u32| -> (usize, HashSet<String>) {
        let processes = (0..n)
            .map(|i| {
                if i % growing_every == 0 {
                    row(
                        100_000 + i,
                        1000 + u64::from(i),
                        Trend::Growing,
                        f64::from(i),
                    )
                } else {
                    row(100_000 + i, u64::from(i) << 20, Trend::Churn, 0.0)
                }
            })
            .collect();
        let snap = Snapshot {
            processes,
            ..Snapshot::default()
        };
        let mut out = String::new();
        render(&snap, &mut out);
        let samples = check(&out);
        let pids: HashSet<String> = samples
            .iter()
            .filter(|s| s.0.starts_with("leaktrace_process_"))
            .map(|s| label(s, "pid").to_string())
            .collect();
        let omitted = samples
            .iter()
            .find(|s| s.0 == "leaktrace_series_omitted" && label(s, "kind") == "process")
            .expect("omitted")
            .2;
        assert_eq!(
            omitted as usize,
            (n as usize).saturating_sub(DEFAULT_MAX_PROCESSES_SERIES)
        );
        (samples.len(), pids)
    };
    let (few, _) = count_series(1000, 50);
    let (many, pids) = count_series(5000, 50);
    assert_eq!(few, many, "series do not grow with processes");
    assert_eq!(pids.len(), DEFAULT_MAX_PROCESSES_SERIES);
    // All 100 growing ones (every 50th of 5,000) are in, small as they are.
    assert!((0..5000)
        .step_by(50)
        .all(|i| pids.contains(&(100_000 + i).to_string())));
    // With fewer growing ones, the rest are the largest.
    let (_, pids) = count_series(5000, 1000);
    assert!(pids.contains("104999") && pids.contains("104000"));
    assert!(!pids.contains("100001"));
}

#[test]
fn stack_labels_are_short() {
    assert_eq!(stack_label(&[]), "");
    assert_eq!(stack_label(&["leaf"]), "leaf");
    let long = "n".repeat(300);
    let l = stack_label(&[&long]);
    assert_eq!(l.chars().count(), STACK_LABEL_CHARS);
    assert!(l.ends_with('…'));
}

#[test]
fn own_usage_reads_this_process() {
    let (cpu, rss) = own_usage().expect("own usage");
    assert!(cpu >= 0.0 && rss > 0, "{cpu} {rss}");
}

async fn fetch(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8(out).expect("utf-8 response")
}

#[tokio::test]
async fn serves_metrics_over_http() {
    let std_listener = bind("127.0.0.1:0").expect("bind");
    let addr = std_listener.local_addr().expect("addr");
    let listener = TcpListener::from_std(std_listener).expect("tokio listener");
    let mut body = String::new();
    render(&sample_snapshot(), &mut body);
    let (tx, rx) = watch::channel(Arc::new(body.clone()));
    let server = tokio::spawn(serve(listener, rx));

    let resp = fetch(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, got) = resp.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
    assert_eq!(got, body);
    check(got);

    // Many at once, and a query string.
    let many: Vec<_> = (0..40)
        .map(|_| tokio::spawn(fetch(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n")))
        .collect();
    for r in many {
        assert!(r.await.expect("task").ends_with(&body));
    }

    // A new snapshot is served from then on.
    tx.send(Arc::new("leaktrace_watched_processes 3\n".to_string()))
        .expect("send");
    let resp = fetch(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.ends_with("\r\n\r\nleaktrace_watched_processes 3\n"),
        "{resp}"
    );

    let resp = fetch(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200 OK") && resp.contains("/metrics"));
    let resp = fetch(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 200 OK") && resp.ends_with("\r\n\r\n"),
        "{resp}"
    );
    let resp = fetch(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    let resp = fetch(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 405 ") && resp.contains("Allow: GET, HEAD"));
    let resp = fetch(addr, "garbage\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let resp = fetch(addr, &huge).await;
    assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
    // A client that sends half a head and leaves does not stop the server.
    {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /met").await.expect("send");
    }
    let resp = fetch(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200 OK"));

    // The daemon stops: the server returns.
    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returns when the sender is dropped")
        .expect("no panic");
}

#[test]
fn port_in_use_names_the_address_and_the_fix() {
    let first = bind("127.0.0.1:0").expect("bind");
    let addr = first.local_addr().expect("addr").to_string();
    let err = bind(&addr).expect_err("in use");
    assert!(matches!(err, BindError::InUse { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "failed to listen on {addr}: address already in use; pick another port with --listen"
        )
    );
}

#[test]
fn bad_addresses_say_what_is_expected() {
    let err = bind("9464").expect_err("no host");
    assert!(matches!(err, BindError::Invalid { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("give HOST:PORT, e.g. 127.0.0.1:9464"),
        "{err}"
    );
    let err = bind("192.0.2.1:9464").expect_err("not ours");
    assert!(matches!(err, BindError::NotAvailable { .. }), "{err:?}");
}
