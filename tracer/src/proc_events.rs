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

    /// Read every event queued now (non-blocking). `Err` with
    /// `WouldBlock` never escapes: an empty queue gives an empty batch.
    /// An overrun (ENOBUFS) is reported so the caller can rescan `/proc`.
    pub fn read_batch(&self, out: &mut Vec<ProcEvent>) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            let n = n as usize;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = u32_at(&buf, off).unwrap_or(0) as usize;
                if len < NLMSG_HDRLEN || off + len > n {
                    break;
                }
                if let Some(ev) = parse_event(&buf[off + NLMSG_HDRLEN + CN_MSG_LEN..off + len]) {
                    out.push(ev);
                }
                off += (len + 3) & !3;
            }
        }
    }
}

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
