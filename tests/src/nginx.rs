//! Debian's nginx as a test subject: its own master (`daemon off;
//! master_process on;`) with a private prefix, N workers on a free
//! loopback port, optionally with the Lua module (Debian's
//! `libnginx-mod-http-lua` on LuaJIT) and a `lua_package_path`.
//!
//! Inputs: [`Options`] (workers, Lua, extra `http` directives, the
//! server's locations). Outputs: a running [`Nginx`] whose workers all
//! answer, plain HTTP/1.0 requests over a `TcpStream` (no HTTP client),
//! reloads and worker kills that wait until the replacements answer, and
//! the error log.
//!
//! Invariants: the listen socket has `reuseport`, so the kernel spreads
//! connections over the workers by their source port (a test can reach
//! every worker, and a load spreads over all of them). Every wait has a
//! deadline that only guards against hangs. On drop the master gets
//! SIGTERM, then everything left (master, workers of every generation)
//! gets SIGKILL.

use std::{
    collections::BTreeSet,
    io::{self, Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::Guard;

const HANG_GUARD: Duration = Duration::from_secs(60);

/// Where Debian installs nginx's dynamic modules. The Lua module needs the
/// development kit loaded first (the order of
/// `/usr/share/nginx/modules-available/mod-http-{ndk,lua}.conf`, which
/// `/etc/nginx/modules-enabled` numbers 10 and 50).
pub const MODULES_DIR: &str = "/usr/lib/nginx/modules";
pub const NDK_MODULE: &str = "ndk_http_module.so";
pub const LUA_MODULE: &str = "ngx_http_lua_module.so";

/// A location every generated config has: the pid of the worker that
/// served the request (nginx's `$pid`, no Lua needed).
pub const PID_LOCATION: &str = "/__pid";

/// How to configure nginx.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `worker_processes`.
    pub workers: usize,
    /// `lua_package_path` (the directory, `?.lua` is appended) when the
    /// Lua module is to be loaded.
    pub lua_dir: Option<PathBuf>,
    /// More directives for the `http` block.
    pub http: String,
    /// The server's `location` blocks (besides [`PID_LOCATION`]).
    pub locations: String,
}

/// A response: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// A running nginx master and its workers.
pub struct Nginx {
    master: Guard,
    prefix: PathBuf,
    conf: PathBuf,
    port: u16,
    workers: usize,
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Children of `pid` (its main thread's), from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // The state follows the parenthesized command name.
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// One HTTP/1.0 request to `127.0.0.1:port`; the server closes the
/// connection after the response.
pub fn get(port: u16, path: &str) -> io::Result<Response> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{why}: {text:?}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

impl Nginx {
    /// Write `dir/nginx.conf` and start nginx with prefix `dir`; returns
    /// once `opts.workers` workers run and each has answered.
    pub fn start(dir: &Path, opts: Options) -> Nginx {
        assert!(opts.workers > 0, "nginx needs at least one worker");
        let found = Command::new("sh")
            .args(["-c", "command -v nginx"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "nginx is needed by this test; install it with `apt-get install nginx`"
        );
        std::fs::create_dir_all(dir.join("logs"))
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", dir.display()));
        let port = free_port();
        let d = dir.display();
        let mut conf_text = String::new();
        if opts.lua_dir.is_some() {
            for module in [NDK_MODULE, LUA_MODULE] {
                let path = Path::new(MODULES_DIR).join(module);
                assert!(
                    path.exists(),
                    "{} is missing; install it with `apt-get install libnginx-mod-http-lua`",
                    path.display()
                );
                conf_text += &format!("load_module {};\n", path.display());
            }
        }
        conf_text += &format!(
            "daemon off;\nmaster_process on;\nworker_processes {};\n\
             error_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{}}\n\
             http {{\n  access_log off;\n",
            opts.workers
        );
        if let Some(lua) = &opts.lua_dir {
            conf_text += &format!("  lua_package_path \"{}/?.lua;;\";\n", lua.display());
        }
        conf_text += &opts.http;
        conf_text += &format!(
            "  server {{\n    listen 127.0.0.1:{port} reuseport;\n\
             \x20   location = {PID_LOCATION} {{ return 200 \"$pid\"; }}\n{}\n  }}\n}}\n",
            opts.locations
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, conf_text).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start nginx: {e}"));
        let nginx = Nginx {
            master: Guard(child),
            prefix: dir.to_path_buf(),
            conf,
            port,
            workers: opts.workers,
        };
        nginx.wait_workers(&BTreeSet::new());
        nginx
    }

    pub fn master(&self) -> u32 {
        self.master.0.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The master's children now (workers, including old ones still
    /// shutting down after a reload), sorted.
    pub fn workers(&self) -> Vec<u32> {
        let mut w = children(self.master());
        w.sort();
        w
    }

    /// One request; `Err` when the connection or the response failed.
    pub fn get(&self, path: &str) -> io::Result<Response> {
        get(self.port, path)
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }

    /// Panics with the error log when `cond` is false.
    fn ensure(&self, cond: bool, deadline: Instant, what: &str) {
        assert!(
            cond || Instant::now() < deadline,
            "{what}; nginx's error log:\n{}",
            self.error_log()
        );
    }

    /// Waits until the master has exactly `self.workers` children, none of
    /// them in `old`, every old one is gone, and each of them has served
    /// a request; returns them, sorted.
    fn wait_workers(&self, old: &BTreeSet<u32>) -> Vec<u32> {
        let deadline = Instant::now() + HANG_GUARD;
        let mut answered = BTreeSet::new();
        loop {
            assert!(
                alive(self.master()),
                "nginx's master exited; its error log:\n{}",
                self.error_log()
            );
            let now: Vec<u32> = self.workers();
            let settled = now.len() == self.workers
                && now.iter().all(|w| !old.contains(w))
                && old.iter().all(|&w| !alive(w));
            if settled {
                if let Ok(r) = self.get(PID_LOCATION) {
                    if let Ok(pid) = r.body.trim().parse::<u32>() {
                        answered.insert(pid);
                    }
                }
                if now.iter().all(|w| answered.contains(w)) {
                    return now;
                }
            } else {
                thread::sleep(Duration::from_millis(20));
            }
            self.ensure(
                false,
                deadline,
                &format!(
                    "nginx never had {} answering workers on port {} (now {now:?}, \
                     old {old:?}, answered {answered:?})",
                    self.workers, self.port
                ),
            );
        }
    }

    /// `nginx -s reload`, then wait until the old workers are gone and
    /// the new ones answer; returns the new workers.
    pub fn reload(&self) -> Vec<u32> {
        let old: BTreeSet<u32> = self.workers().into_iter().collect();
        let out = Command::new("nginx")
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(&self.conf)
            .arg("-e")
            .arg(self.prefix.join("error.log"))
            .args(["-s", "reload"])
            .output()
            .unwrap_or_else(|e| panic!("failed to run nginx -s reload: {e}"));
        assert!(
            out.status.success(),
            "nginx -s reload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_workers(&old)
    }

    /// SIGKILL the worker `pid`, then wait until the master has replaced
    /// it and every worker answers; returns the workers.
    pub fn kill_worker(&self, pid: u32) -> Vec<u32> {
        assert!(
            self.workers().contains(&pid),
            "{pid} is not a worker of nginx {}",
            self.master()
        );
        // SAFETY: plain kill(2) on a child of our child, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        self.wait_workers(&BTreeSet::from([pid]))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let master = self.master();
        let workers = children(master);
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(master as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.master.0.try_wait(), Ok(Some(_))) {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // A worker outlives a killed master; the Guard kills the master.
        for w in workers.into_iter().filter(|&w| alive(w)) {
            // SAFETY: as above; a worker's pid is only reused once reaped.
            unsafe { libc::kill(w as i32, libc::SIGKILL) };
        }
    }
}
