//! A realistic workload: Debian's nginx (1 worker, loopback, its own
//! config, pid file and logs under `target/bench/<site>`) under `wrk`,
//! untraced and with the tracer on the worker (or, for node mode, watching
//! the machine): requests/s and the worker's CPU per request. Two sites,
//! one nginx each ([`Site`]): a static page,
//! and a location whose content is made by Lua (nginx's Lua module,
//! `bench/luabench.lua`), where leaktrace also probes LuaJIT's allocator.
//!
//! Imports: `super` (configurations), `harness`, `procfs`.

use std::{
    fs,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    harness::{signal, LeaktraceReport, NodeFigures, Proc, Usage},
    measure_row, median,
    procfs::{bpf_run_stats, children, schedstat_ns},
    Ctx, Kind, Row,
};

/// Seconds per measured wrk run, runs per row, keep-alive connections.
pub(super) const WRK_SECS: u32 = 4;
pub(super) const WRK_REPS: usize = 3;
pub(super) const WRK_CONNECTIONS: u32 = 32;

pub(super) struct NginxResult {
    pub(super) rps: f64,
    /// Requests/s of each measured run, in order.
    pub(super) runs_rps: Vec<f64>,
    /// The worker's CPU time per request (median over runs).
    pub(super) worker_ns_per_request: f64,
    pub(super) usage: Option<Usage>,
    pub(super) report: Option<LeaktraceReport>,
    /// `leaktrace node`'s report (node mode rows).
    pub(super) node: Option<NodeFigures>,
    /// Over the measured runs: the requests, and the run time (ns) and
    /// runs of the tracer's eBPF programs (kernel statistics: node mode
    /// turns them on; zero otherwise).
    pub(super) requests: u64,
    pub(super) bpf: Option<(u64, u64)>,
}

/// What the nginx of a set of rows serves at `/`.
#[derive(Clone, Copy)]
pub(super) enum Site {
    /// A static page of about 600 bytes.
    Static,
    /// `bench/luabench.lua` run by `content_by_lua_block`.
    Lua,
}

/// The Lua module's shared objects (Debian's `libnginx-mod-http-lua`
/// and the development kit it needs), loaded by the Lua site's config.
const LUA_MODULES: [&str; 2] = [
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
];

impl Site {
    /// Its directory under `target/bench`, its leaktrace report, and the
    /// section in the log.
    fn name(self) -> &'static str {
        match self {
            Site::Static => "nginx",
            Site::Lua => "nginx-lua",
        }
    }
}

/// Every row of `specs`, against one nginx serving `site`.
pub(super) fn measure(
    ctx: &Ctx,
    site: Site,
    specs: Vec<(&'static str, Kind)>,
    bcc_ready: &Result<(), String>,
) -> Result<Vec<Row<NginxResult>>> {
    let nginx = Nginx::start(ctx, site)?;
    let url = format!("http://127.0.0.1:{}/", nginx.port);
    let rows = specs
        .into_iter()
        .map(|(label, kind)| {
            measure_row(ctx, site.name(), label.to_string(), || {
                match (&kind, bcc_ready) {
                    (Kind::Memleak, Err(why)) => bail!("{why}"),
                    _ => run(ctx, &nginx, &url, &kind),
                }
            })
        })
        .collect();
    nginx.stop();
    Ok(rows)
}

/// One row: a 1 s warm-up, then `WRK_REPS` wrk runs under one tracer.
fn run(ctx: &Ctx, nginx: &Nginx, url: &str, kind: &Kind) -> Result<NginxResult> {
    let json = ctx.fresh_report(&format!("{}.json", nginx.site.name()));
    let mut tracer = kind.attach(ctx, nginx.worker, &json, None)?;
    wrk(url, 1)?;
    let cpu0 = tracer.as_ref().and_then(|t| t.cpu_s(ctx));
    let bpf0 = tracer.as_ref().and_then(|t| bpf_run_stats(t.pid));
    let (mut rps, mut worker_ns, mut requests) = (Vec::new(), Vec::new(), 0);
    for _ in 0..WRK_REPS {
        let before = schedstat_ns(nginx.worker);
        let w = wrk(url, WRK_SECS)?;
        if let (Some(a), Some(b)) = (before, schedstat_ns(nginx.worker)) {
            worker_ns.push(b.saturating_sub(a) as f64 / w.requests.max(1) as f64);
        }
        rps.push(w.rps);
        requests += w.requests;
    }
    let cpu1 = tracer.as_ref().and_then(|t| t.cpu_s(ctx));
    let bpf1 = tracer.as_ref().and_then(|t| bpf_run_stats(t.pid));
    let usage = tracer
        .as_mut()
        .map(|t| t.stop_measured((cpu0, cpu1)))
        .transpose()?;
    Ok(NginxResult {
        runs_rps: rps.clone(),
        rps: median(&mut rps),
        worker_ns_per_request: median(&mut worker_ns),
        usage,
        report: kind.report(&json)?,
        node: kind.node_report(&json)?,
        requests,
        bpf: bpf0
            .zip(bpf1)
            .map(|(a, b)| (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
    })
}

struct Wrk {
    rps: f64,
    requests: u64,
}

/// Requests per second from one bounded wrk run over keep-alive
/// connections.
fn wrk(url: &str, secs: u32) -> Result<Wrk> {
    let mut p = Proc::spawn(
        "wrk",
        Command::new("wrk").args([
            "-t1",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{secs}s"),
            url,
        ]),
        false,
    )?;
    let line = p.wait_line(
        |l| l.starts_with("Requests/sec:"),
        Duration::from_secs(u64::from(secs) + 30),
    )?;
    p.finish(Duration::from_secs(10))?;
    let rps = line
        .trim_start_matches("Requests/sec:")
        .trim()
        .parse()
        .with_context(|| format!("unexpected wrk line {line:?}"))?;
    // "  293876 requests in 4.00s, 245.12MB read"
    let requests = p
        .seen
        .iter()
        .find_map(|l| l.split_once(" requests in ")?.0.trim().parse().ok())
        .with_context(|| format!("wrk printed no request count{}", p.tail()))?;
    // An error page is fast: a broken site (a Lua error answers 500) must
    // fail the row rather than measure its errors.
    if let Some(bad) = p
        .seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
    {
        bail!(
            "nginx answered {} of {requests} requests with an error status; its error.log is under target/bench",
            bad.trim()
        );
    }
    Ok(Wrk { rps, requests })
}

/// Debian's nginx with its own prefix, config, pid file and logs; never
/// the system configuration. Stopped (SIGQUIT, then SIGKILL) on drop.
struct Nginx {
    master: Option<Child>,
    worker: u32,
    port: u16,
    site: Site,
}

impl Nginx {
    fn start(ctx: &Ctx, site: Site) -> Result<Nginx> {
        let dir = &ctx.dir.join(site.name());
        let conf = dir.join("nginx.conf");
        stop_stale(&dir.join("nginx.pid"), &conf);
        let _ = fs::remove_dir_all(dir);
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("failed to find a free loopback port")?
            .port();
        write_site(ctx, site, dir, &conf, port)?;
        let master = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .spawn()
            .context("failed to start nginx")?;
        let mut nginx = Nginx {
            worker: 0,
            port,
            master: Some(master),
            site,
        };
        nginx.worker = nginx.wait_serving(dir)?;
        Ok(nginx)
    }

    /// The worker's pid, once the master has forked it and the port
    /// answers.
    fn wait_serving(&mut self, dir: &Path) -> Result<u32> {
        let master_pid = self.master.as_ref().map_or(0, Child::id);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(Ok(Some(st))) = self.master.as_mut().map(Child::try_wait) {
                let log = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited at start ({st}): {}", log.trim());
            }
            let worker = children(master_pid).into_iter().next();
            if let (Some(w), Ok(_)) = (worker, TcpStream::connect(("127.0.0.1", self.port))) {
                return Ok(w);
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx did not answer on 127.0.0.1:{} within 15 s",
                    self.port
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        if let Ok(None) = master.try_wait() {
            signal(master.id(), "QUIT");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = master.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        if let Ok(None) = master.try_wait() {
            if self.worker != 0 {
                signal(self.worker, "KILL");
            }
            let _ = master.kill();
        }
        let _ = master.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A run killed hard may have left its nginx behind: stop it, if the
/// pid file names a process started with this config.
fn stop_stale(pid_file: &Path, conf: &Path) {
    let Some(pid) = fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(&*conf.to_string_lossy()) {
        eprintln!("xtask: bench: stopping a stale nginx (pid {pid})");
        signal(pid, "TERM");
        thread::sleep(Duration::from_secs(1));
        signal(pid, "KILL");
    }
}

/// The page or the Lua module, and the config, under `dir` only.
fn write_site(ctx: &Ctx, site: Site, dir: &Path, conf: &Path, port: u16) -> Result<()> {
    let www = dir.join("www");
    let tmp = dir.join("tmp");
    fs::create_dir_all(&www).with_context(|| format!("failed to create {}", www.display()))?;
    fs::create_dir_all(&tmp)?;
    match site {
        Site::Static => fs::write(
            www.join("index.html"),
            format!(
                "<!doctype html><title>bench</title><p>{}</p>\n",
                "leaktrace benchmark page. ".repeat(20)
            ),
        )?,
        Site::Lua => {
            for module in LUA_MODULES {
                if !Path::new(module).exists() {
                    bail!("{module} is missing; install libnginx-mod-http-lua");
                }
            }
            let lua = dir.join("lua");
            fs::create_dir_all(&lua)?;
            fs::copy(&ctx.luabench, lua.join("luabench.lua")).with_context(|| {
                format!(
                    "failed to copy {} to {}",
                    ctx.luabench.display(),
                    lua.display()
                )
            })?;
        }
    }
    fs::write(conf, config(site, dir, port))
        .with_context(|| format!("failed to write {}", conf.display()))
}

/// The config of `site` served from `dir` on `port`.
fn config(site: Site, dir: &Path, port: u16) -> String {
    let d = dir.display();
    // Main-context lines before the common ones, http-context lines after
    // the temp paths, and the location's body.
    let (main, http, location) = match site {
        Site::Static => (String::new(), String::new(), " "),
        Site::Lua => (
            LUA_MODULES.map(|m| format!("load_module {m};\n")).concat(),
            // `;;` keeps the default path, where lua-resty-core is.
            format!("\x20 lua_package_path \"{d}/lua/?.lua;;\";\n"),
            r#" content_by_lua_block { require("luabench").handle() } "#,
        ),
    };
    format!(
        "# Written by `cargo xtask bench`.\n{main}\
         daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n\
         \x20 client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n\
         \x20 scgi_temp_path {d}/tmp/scgi;\n{http}\
         \x20 server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n\
         \x20   location / {{{location}}}\n  }}\n}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATIC: &str = "# Written by `cargo xtask bench`.
daemon off;
master_process on;
worker_processes 1;
user root;
pid /b/nginx.pid;
error_log /b/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path /b/tmp/body;
  proxy_temp_path /b/tmp/proxy;
  fastcgi_temp_path /b/tmp/fastcgi;
  uwsgi_temp_path /b/tmp/uwsgi;
  scgi_temp_path /b/tmp/scgi;
  server {
    listen 127.0.0.1:8080;
    root /b/www;
    location / { }
  }
}
";

    #[test]
    fn the_static_site_is_a_plain_location() {
        assert_eq!(config(Site::Static, Path::new("/b"), 8080), STATIC);
    }

    #[test]
    fn the_lua_site_loads_the_module_and_runs_luabench() {
        let want = STATIC
            .replace(
                "daemon off;",
                "load_module /usr/lib/nginx/modules/ndk_http_module.so;\n\
                 load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;\n\
                 daemon off;",
            )
            .replace(
                "  server {",
                "  lua_package_path \"/b/lua/?.lua;;\";\n  server {",
            )
            .replace(
                "location / { }",
                r#"location / { content_by_lua_block { require("luabench").handle() } }"#,
            );
        assert_eq!(config(Site::Lua, Path::new("/b"), 8080), want);
    }
}
