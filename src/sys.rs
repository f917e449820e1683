//! Every call into the C library that hark makes itself, each behind a small safe function: `poll`
//! (the stdout and socket sinks), the socket's peer credentials and group lookup, `getuid` (the
//! transcribe cache's fallback directory), and the capture thread's realtime scheduling.
//!
//! The crate denies `unsafe` everywhere but here (allowed on `mod sys` in `src/lib.rs`) and in the
//! ALSA capture loop in `capture/alsa.rs`, which says why. Deliberately not here: any policy. These
//! functions do what the C call does and report its error; what a failure means is the caller's
//! business.

use std::ffi::{CString, c_short};
use std::io;
use std::os::fd::RawFd;

/// One descriptor for [`poll`]: the events asked for, and `revents`, what came back.
pub(crate) type PollFd = libc::pollfd;

/// Data to read (asked for).
pub(crate) const POLLIN: c_short = libc::POLLIN;
/// The peer hung up (always reported).
pub(crate) const POLLHUP: c_short = libc::POLLHUP;
/// An error on the descriptor, e.g. a pipe without reader (always reported).
pub(crate) const POLLERR: c_short = libc::POLLERR;
/// Not an open descriptor (always reported).
pub(crate) const POLLNVAL: c_short = libc::POLLNVAL;

/// A [`PollFd`] for `fd` asking for `events` (0: only the conditions always reported).
pub(crate) fn pollfd(fd: RawFd, events: c_short) -> PollFd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// poll(2): wait until one of `fds` is ready or `timeout_ms` passed (-1: no limit, 0: never
/// wait). Returns how many have `revents` set. A descriptor that is not open is no error: it
/// comes back with [`POLLNVAL`].
pub(crate) fn poll(fds: &mut [PollFd], timeout_ms: i32) -> io::Result<usize> {
    let nfds = libc::nfds_t::try_from(fds.len()).map_err(io::Error::other)?;
    // SAFETY: `fds` is a live, initialised array of `nfds` pollfd structs, written only by the
    // kernel during the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout_ms) };
    // A negative count is an error; any other fits in usize.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The process id of the peer of a connected Unix socket (SO_PEERCRED); `None` when unknown.
pub(crate) fn peer_pid(fd: RawFd) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: `cred` and `len` are live and `len` is the size of `cred`; a bad `fd` is an error
    // return, not undefined behaviour.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// The id of the group named `name` (getgrnam_r); `Ok(None)` when there is no such group (a
/// name with a NUL byte names none).
pub(crate) fn group_id(name: &str) -> io::Result<Option<u32>> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `group` is plain old data (integers and pointers); all zeroes is a valid value.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is live for the call, and `buf.len()` is the buffer's size.
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        return match rc {
            0 if !found.is_null() => Ok(Some(group.gr_gid)),
            0 | libc::ENOENT => Ok(None),
            rc => Err(io::Error::from_raw_os_error(rc)),
        };
    }
}

/// The real user id of the process.
pub(crate) fn getuid() -> u32 {
    // SAFETY: getuid cannot fail and touches no memory.
    unsafe { libc::getuid() }
}

/// The soft `RLIMIT_RTPRIO`: the highest realtime priority this process may ask for without
/// CAP_SYS_NICE. `None` when unlimited or unknown.
pub(crate) fn rtprio_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_RTPRIO, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    // rlim_t is 32 bits on 32-bit ARM.
    #[allow(clippy::unnecessary_cast)]
    let cur = lim.rlim_cur as u64;
    Some(cur)
}

/// Move the calling thread to SCHED_FIFO at `priority` (pthread_setschedparam); the error says
/// why not (EPERM: not allowed).
pub(crate) fn set_current_thread_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pthread_self() is the calling thread; the param struct lives across the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    match rc {
        0 => Ok(()),
        rc => Err(io::Error::from_raw_os_error(rc)),
    }
}

/// mkfifo(3) with `mode`, for tests that read from a pipe.
#[cfg(test)]
pub(crate) fn mkfifo(path: &std::path::Path, mode: libc::mode_t) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: mkfifo(3) reads a NUL-terminated path that lives across the call.
    if unsafe { libc::mkfifo(path.as_ptr(), mode) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn poll_reports_readable_and_hung_up_ends() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut fds = [pollfd(a.as_raw_fd(), POLLIN)];
        assert_eq!(poll(&mut fds, 0).unwrap(), 0);
        std::io::Write::write_all(&mut &b, b"x").unwrap();
        assert_eq!(poll(&mut fds, 1000).unwrap(), 1);
        assert_ne!(fds[0].revents & POLLIN, 0);
        drop(b);
        let mut fds = [pollfd(a.as_raw_fd(), 0)];
        assert_eq!(poll(&mut fds, 1000).unwrap(), 1);
        assert_ne!(fds[0].revents & POLLHUP, 0);
        let mut closed = [pollfd(1_000_000, 0)];
        assert_eq!(poll(&mut closed, 0).unwrap(), 1);
        assert_ne!(closed[0].revents & POLLNVAL, 0);
    }

    #[test]
    fn peer_pid_is_this_process_for_a_pair() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_pid(a.as_raw_fd()), Some(std::process::id() as i32));
        assert_eq!(peer_pid(-1), None);
    }

    #[test]
    fn groups_resolve_and_unknown_ones_are_none() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("no-such-group-hark-test").unwrap(), None);
        assert_eq!(group_id("nul\0byte").unwrap(), None);
    }

    /// The value of a `/proc/self/...` line that starts with `key`, split at whitespace.
    fn proc_fields(file: &str, key: &str) -> Vec<String> {
        let text = std::fs::read_to_string(format!("/proc/self/{file}")).unwrap();
        let line = text.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn uid_and_rtprio_limit_are_what_proc_says() {
        let uid = proc_fields("status", "Uid:");
        assert_eq!(getuid().to_string(), uid[0]);
        let soft = &proc_fields("limits", "Max realtime priority")[0];
        let want = if soft == "unlimited" {
            None
        } else {
            Some(soft.parse::<u64>().unwrap())
        };
        assert_eq!(rtprio_limit(), want);
    }

    #[test]
    fn mkfifo_makes_a_fifo_and_refuses_an_existing_path() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        mkfifo(&path, 0o600).unwrap();
        assert!(std::fs::metadata(&path).unwrap().file_type().is_fifo());
        assert_eq!(
            mkfifo(&path, 0o600).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
