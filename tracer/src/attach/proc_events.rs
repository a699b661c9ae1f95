//! Process lifecycle events from the kernel's netlink process connector
//! (`CN_PROC`): fork, exec and exit, as they happen, for the whole machine.
//! Used to follow children of traced processes (nginx workers, uwsgi and
//! multiprocessing pools), re-attach after exec, and drop exited processes.
//! Needs root; when the connector is unavailable, callers fall back to
//! scanning `/proc`.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// One process event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// A new process (not a thread): `child` was forked by `parent`.
    Fork { parent: u32, child: u32 },
    /// Process `pid` replaced its image.
    Exec { pid: u32 },
    /// Process `pid` (its whole thread group) exited.
    Exit { pid: u32 },
    /// A thread of process `pid` changed its name (`prctl(PR_SET_NAME)`).
    Comm { pid: u32 },
}

const NETLINK_CONNECTOR: i32 = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
const PROC_EVENT_FORK: u32 = 0x1;
const PROC_EVENT_EXEC: u32 = 0x2;
const PROC_EVENT_COMM: u32 = 0x200;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// A subscribed, non-blocking connector socket.
pub struct ProcConnector {
    fd: OwnedFd,
}

impl AsRawFd for ProcConnector {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl ProcConnector {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is valid; fields set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        addr.nl_pid = 0;
        // SAFETY: addr is a valid sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // A fork storm fills the default queue (about 200 KiB) in
        // milliseconds; as root the buffer can be raised past rmem_max.
        // LEAKTRACE_PROC_EVENTS_RCVBUF overrides it (tests force overruns).
        let want: libc::c_int = std::env::var("LEAKTRACE_PROC_EVENTS_RCVBUF")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8 << 20);
        // SAFETY: setsockopt with a valid int option of its size; failure
        // only leaves the default size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const want).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: msg is a valid buffer of its length.
        let rc = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Read every event queued now (non-blocking), until the queue is
    /// empty. Returns whether the kernel dropped events since the last read
    /// (an overrun, ENOBUFS), so the caller can rescan `/proc`.
    ///
    /// The queue must be drained even after an overrun: netlink marks an
    /// overrun socket congested and drops every later broadcast until a
    /// read finds its queue empty, and an edge-triggered poller would
    /// never be woken for it again.
    pub fn read_batch(&self, out: &mut Vec<ProcEvent>) -> io::Result<Batch> {
        let mut buf = [0u8; 8192];
        let mut batch = Batch::default();
        // Bounded, so a fork storm cannot hold the daemon here; the caller
        // keeps the socket marked readable when the queue was not emptied.
        for _ in 0..MAX_READS {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        batch.drained = true;
                        return Ok(batch);
                    }
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        batch.overrun = true;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = u32_at(&buf, off).unwrap_or(0) as usize;
                if len < NLMSG_HDRLEN || off + len > n {
                    break;
                }
                if let Some(ev) = buf
                    .get(off + NLMSG_HDRLEN + CN_MSG_LEN..off + len)
                    .and_then(parse_event)
                {
                    out.push(ev);
                }
                off += (len + 3) & !3;
            }
        }
        Ok(batch)
    }
}

/// What one [`ProcConnector::read_batch`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// The kernel dropped events since the last read.
    pub overrun: bool,
    /// The queue was read until empty.
    pub drained: bool,
}

/// Datagrams read per batch before yielding to other work.
const MAX_READS: usize = 4096;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Parse a `struct proc_event` (what, cpu, timestamp, then the union).
pub fn parse_event(ev: &[u8]) -> Option<ProcEvent> {
    let what = u32_at(ev, 0)?;
    let data = 16;
    match what {
        PROC_EVENT_FORK => {
            let parent_tgid = u32_at(ev, data + 4)?;
            let child_pid = u32_at(ev, data + 8)?;
            let child_tgid = u32_at(ev, data + 12)?;
            // A new thread is not a new process.
            (child_pid == child_tgid).then_some(ProcEvent::Fork {
                parent: parent_tgid,
                child: child_tgid,
            })
        }
        PROC_EVENT_EXEC => Some(ProcEvent::Exec {
            pid: u32_at(ev, data + 4)?,
        }),
        PROC_EVENT_COMM => Some(ProcEvent::Comm {
            pid: u32_at(ev, data + 4)?,
        }),
        PROC_EVENT_EXIT => {
            let pid = u32_at(ev, data)?;
            let tgid = u32_at(ev, data + 4)?;
            (pid == tgid).then_some(ProcEvent::Exit { pid: tgid })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(what: u32, words: &[u32]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&what.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&0u64.to_ne_bytes());
        for w in words {
            v.extend_from_slice(&w.to_ne_bytes());
        }
        v
    }

    #[test]
    fn fork_of_a_process_not_a_thread() {
        assert_eq!(
            parse_event(&event(PROC_EVENT_FORK, &[10, 10, 11, 11])),
            Some(ProcEvent::Fork {
                parent: 10,
                child: 11
            })
        );
        assert_eq!(
            parse_event(&event(PROC_EVENT_FORK, &[10, 10, 12, 10])),
            None
        );
    }

    #[test]
    fn comm_change_names_the_process() {
        assert_eq!(
            parse_event(&event(PROC_EVENT_COMM, &[12, 10, 0, 0, 0, 0])),
            Some(ProcEvent::Comm { pid: 10 })
        );
    }

    #[test]
    fn exec_and_group_exit() {
        assert_eq!(
            parse_event(&event(PROC_EVENT_EXEC, &[7, 7])),
            Some(ProcEvent::Exec { pid: 7 })
        );
        assert_eq!(
            parse_event(&event(PROC_EVENT_EXIT, &[7, 7, 0, 17])),
            Some(ProcEvent::Exit { pid: 7 })
        );
        assert_eq!(parse_event(&event(PROC_EVENT_EXIT, &[8, 7, 0, 17])), None);
    }
}
