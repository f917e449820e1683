//! sd_notify: tells systemd (a `Type=notify` unit) when hark is ready, what it is doing, that it
//! is alive, and that it is stopping, as datagrams on the socket named by `$NOTIFY_SOCKET`.
//!
//! The protocol is a few `KEY=VALUE` lines per datagram (see sd_notify(3)); this is all of it, with
//! std alone. Without `$NOTIFY_SOCKET` (not run by systemd, or not `Type=notify`) every call is a
//! no-op. Sending never blocks the daemon and never fails it: a lost datagram is a lost datagram.
//!
//! The watchdog (`WatchdogSec=` → `$WATCHDOG_USEC`) is pinged only while the capture and dsp threads
//! make progress, judged by [`progressed`] on counters the threads bump ([`Beat`]): a capture thread
//! blocked in a read that never returns lets systemd restart hark.
//!
//! Deliberately not here: `MAINPID=`, file-descriptor passing, `EXTEND_TIMEOUT_USEC=`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use crate::event::State;

/// A connection to systemd's notification socket, or nothing.
pub(crate) struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Whether a failed send was already logged (once is enough).
    warned: bool,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`: a path, or `@name` for an abstract address. Unset or empty: no-op.
    pub(crate) fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(s) if !s.is_empty() => match s.to_str() {
                Some(s) => Notifier::at(s),
                None => {
                    tracing::warn!("NOTIFY_SOCKET is not UTF-8; not notifying systemd");
                    Notifier::none()
                }
            },
            _ => Notifier::none(),
        }
    }

    /// A notifier for the socket at `socket` (a path, or `@name`); on error, a warning and none.
    pub(crate) fn at(socket: &str) -> Notifier {
        match address(socket).and_then(|a| Ok((UnixDatagram::unbound()?, a))) {
            Ok(target) => Notifier {
                target: Some(target),
                warned: false,
            },
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={socket}: {e}; not notifying systemd");
                Notifier::none()
            }
        }
    }

    /// A notifier that sends nothing.
    pub(crate) fn none() -> Notifier {
        Notifier {
            target: None,
            warned: false,
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send one datagram of `KEY=VALUE` lines.
    pub(crate) fn send(&mut self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            if !self.warned {
                tracing::warn!("cannot notify systemd: {e}");
                self.warned = true;
            }
        } else {
            tracing::trace!("sd_notify: {}", message.replace('\n', " "));
        }
    }
}

/// The address in `$NOTIFY_SOCKET`: `@name` is abstract (Linux), anything else a path.
fn address(s: &str) -> std::io::Result<SocketAddr> {
    match s.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(s),
    }
}

/// The watchdog interval from `$WATCHDOG_USEC`, when it is meant for this process
/// (`$WATCHDOG_PID` unset or ours). Pure: the caller passes the variables.
pub(crate) fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    match usec?.trim().parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(us) => Some(Duration::from_micros(us)),
    }
}

/// A thread's liveness as the watchdog sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The thread's progress counter now.
    Count(u64),
    /// The thread ended its work normally (end of input, pipeline done): nothing to watch.
    Done,
}

/// Whether every watched thread advanced since `before` (the counters at the last ping). A thread
/// that is done counts as advancing; one whose counter did not move is stalled.
pub(crate) fn progressed(before: &[u64], now: &[Beat]) -> bool {
    before.iter().zip(now).all(|(b, n)| match n {
        Beat::Done => true,
        Beat::Count(c) => c != b,
    })
}

/// The watchdog's timing and the counters at the last ping.
#[derive(Debug)]
pub(crate) struct Watchdog {
    /// How often to check and ping: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises.
    every: Duration,
    next: Instant,
    /// Counters at the last ping. A thread must move past these before the next ping, however
    /// many checks that takes: a check that finds a slow thread does not reset the bar.
    baseline: [u64; 2],
}

impl Watchdog {
    pub(crate) fn new(interval: Duration, now: Instant) -> Watchdog {
        let every = (interval / 2).max(Duration::from_millis(1));
        Watchdog {
            every,
            next: now + every,
            baseline: [u64::MAX; 2],
        }
    }

    /// When the next check is due.
    pub(crate) fn next(&self) -> Instant {
        self.next
    }

    /// At or after [`Watchdog::next`]: whether to send `WATCHDOG=1` now, given the threads' beats
    /// (capture, dsp). Schedules the next check.
    pub(crate) fn check(&mut self, now: Instant, beats: [Beat; 2]) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        if !progressed(&self.baseline, &beats) {
            return false;
        }
        for (b, n) in self.baseline.iter_mut().zip(beats) {
            if let Beat::Count(c) = n {
                *b = c;
            }
        }
        true
    }
}

/// What a `STATUS=` line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Facts {
    pub(crate) state: State,
    /// The capture device is not open (missing, or being reopened).
    pub(crate) no_device: bool,
    /// Every transcription endpoint failed the last attempt.
    pub(crate) upload_down: bool,
    /// Utterances kept since start.
    pub(crate) utterances: u64,
    pub(crate) spool_pending: u64,
    pub(crate) spool_bytes: u64,
}

/// The `STATUS=` text, e.g. `online: 12 utterances, 3 waiting in the spool (45 KB)`.
pub(crate) fn status_text(f: &Facts) -> String {
    let state = match f.state {
        State::Online => "online",
        State::Degraded => "degraded",
    };
    let mut why = Vec::new();
    if f.no_device {
        why.push("no audio device, retrying");
    }
    if f.upload_down {
        why.push("transcription unreachable, retrying");
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({})", why.join("; "))
    };
    let plural = if f.utterances == 1 { "" } else { "s" };
    format!(
        "{state}{why}: {} utterance{plural}, {} waiting in the spool ({})",
        f.utterances,
        f.spool_pending,
        size(f.spool_bytes)
    )
}

/// A byte count for people: B, KB, MB (powers of 1024).
fn size(bytes: u64) -> String {
    const K: u64 = 1024;
    match bytes {
        b if b < K => format!("{b} B"),
        b if b < K * K => format!("{} KB", b.div_ceil(K)),
        b => format!("{:.1} MB", b as f64 / (K * K) as f64),
    }
}

/// The daemon's side of the protocol: READY once, STATUS on change, WATCHDOG while alive,
/// STOPPING once. The control loop calls [`Service::poll`] on every wake-up and sleeps no longer
/// than [`Service::next_wake`].
pub(crate) struct Service {
    notifier: Notifier,
    watchdog: Option<Watchdog>,
    ready: bool,
    stopping: bool,
    last_status: String,
    /// When to look for a changed status (or readiness) next.
    next_status: Instant,
}

/// How often the status text is recomputed to catch changes (spool, device, uploads).
const STATUS_POLL: Duration = Duration::from_secs(1);
/// How often readiness is looked for until it is sent (the first open of a device).
const READY_POLL: Duration = Duration::from_millis(50);

impl Service {
    /// From the environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub(crate) fn from_env(now: Instant) -> Service {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        let interval = watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id());
        Service::new(Notifier::from_env(), interval, now)
    }

    /// Send through `notifier`, with the watchdog at `interval` when there is one.
    pub(crate) fn new(notifier: Notifier, interval: Option<Duration>, now: Instant) -> Service {
        let watchdog = interval
            .filter(|_| notifier.is_enabled())
            .map(|i| Watchdog::new(i, now));
        if let Some(w) = &watchdog {
            tracing::info!(
                "systemd watchdog: a ping every {} ms while capture and dsp make progress",
                w.every.as_millis()
            );
        }
        Service {
            notifier,
            watchdog,
            ready: false,
            stopping: false,
            last_status: String::new(),
            next_status: now,
        }
    }

    /// When the control loop should wake up next for this, if ever.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        if !self.notifier.is_enabled() {
            return None;
        }
        let status = if self.ready {
            self.next_status
        } else {
            self.next_status.min(Instant::now() + READY_POLL)
        };
        Some(
            self.watchdog
                .as_ref()
                .map_or(status, |w| w.next().min(status)),
        )
    }

    /// Send what is due. `ready` says whether capture has started (or its device's first open
    /// failed); `facts` builds the status; `beats` samples the threads (capture, dsp).
    pub(crate) fn poll(
        &mut self,
        now: Instant,
        ready: bool,
        facts: impl FnOnce() -> Facts,
        beats: impl FnOnce() -> [Beat; 2],
    ) {
        if !self.notifier.is_enabled() {
            return;
        }
        // Nothing is said about a capture that has not started yet.
        if ready && !self.stopping && (now >= self.next_status || !self.ready) {
            self.next_status = now + STATUS_POLL;
            let status = status_text(&facts());
            let mut message = String::new();
            if !self.ready {
                self.ready = true;
                message.push_str("READY=1\n");
            }
            if status != self.last_status || !message.is_empty() {
                message.push_str("STATUS=");
                message.push_str(&status);
                self.last_status = status;
            }
            if !message.is_empty() {
                self.notifier.send(message.trim_end());
            }
        }
        if let Some(w) = &mut self.watchdog
            && now >= w.next()
            && w.check(now, beats())
        {
            self.notifier.send("WATCHDOG=1");
        }
    }

    /// Shutdown has begun: `STOPPING=1`, once.
    pub(crate) fn stopping(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.notifier.send("STOPPING=1\nSTATUS=stopping");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Beat::{Count, Done};

    #[test]
    fn progress_needs_every_thread_to_move_or_be_done() {
        assert!(progressed(&[1, 1], &[Count(2), Count(5)]));
        assert!(
            !progressed(&[1, 1], &[Count(1), Count(5)]),
            "capture stalled"
        );
        assert!(!progressed(&[1, 1], &[Count(2), Count(1)]), "dsp stalled");
        assert!(!progressed(&[1, 1], &[Count(1), Count(1)]));
        assert!(progressed(&[1, 1], &[Done, Count(2)]), "input ended");
        assert!(progressed(&[1, 1], &[Done, Done]));
        assert!(!progressed(&[1, 1], &[Done, Count(1)]));
        // A counter that wrapped around still moved.
        assert!(progressed(&[u64::MAX, 3], &[Count(0), Count(4)]));
    }

    #[test]
    fn watchdog_pings_every_half_interval_only_while_both_threads_move() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = Watchdog::new(ms(200), t0);
        assert_eq!(w.next(), t0 + ms(100));
        assert!(!w.check(t0 + ms(50), [Count(1), Count(1)]), "not due yet");
        assert!(w.check(t0 + ms(100), [Count(1), Count(1)]), "first check");
        assert_eq!(w.next(), t0 + ms(200));
        assert!(w.check(t0 + ms(200), [Count(2), Count(9)]));
        // Capture stops moving: no more pings, however long.
        assert!(!w.check(t0 + ms(300), [Count(2), Count(10)]));
        assert!(!w.check(t0 + ms(400), [Count(2), Count(11)]));
        // It moves again: the bar is the last ping's counters, so one move is enough.
        assert!(w.check(t0 + ms(500), [Count(3), Count(11)]));
        // dsp slow for one check, then moving: pinged at the next check.
        assert!(!w.check(t0 + ms(600), [Count(4), Count(11)]));
        assert!(w.check(t0 + ms(700), [Count(4), Count(12)]));
        assert!(w.check(t0 + ms(800), [Done, Count(13)]));
    }

    #[test]
    fn watchdog_interval_comes_from_the_environment_for_this_process() {
        let d = Duration::from_micros;
        assert_eq!(watchdog_interval(Some("200000"), None, 7), Some(d(200_000)));
        assert_eq!(
            watchdog_interval(Some("200000"), Some("7"), 7),
            Some(d(200_000))
        );
        assert_eq!(watchdog_interval(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn status_text_names_state_reasons_and_counts() {
        let mut f = Facts {
            state: State::Online,
            no_device: false,
            upload_down: false,
            utterances: 12,
            spool_pending: 3,
            spool_bytes: 45 * 1024,
        };
        assert_eq!(
            status_text(&f),
            "online: 12 utterances, 3 waiting in the spool (45 KB)"
        );
        f.state = State::Degraded;
        f.no_device = true;
        f.utterances = 1;
        f.spool_pending = 0;
        f.spool_bytes = 0;
        assert_eq!(
            status_text(&f),
            "degraded (no audio device, retrying): 1 utterance, 0 waiting in the spool (0 B)"
        );
        f.upload_down = true;
        f.spool_bytes = 3 * 1024 * 1024 + 512 * 1024;
        assert_eq!(
            status_text(&f),
            "degraded (no audio device, retrying; transcription unreachable, retrying): \
             1 utterance, 0 waiting in the spool (3.5 MB)"
        );
    }

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let a = address("/run/systemd/notify").unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = address("@hark-test").unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"hark-test"[..]));
    }

    #[test]
    fn without_a_socket_nothing_is_due_or_sent() {
        let now = Instant::now();
        let mut s = Service::new(Notifier::none(), Some(Duration::from_millis(10)), now);
        assert_eq!(s.next_wake(), None);
        s.poll(
            now,
            true,
            || panic!("no status is built without a socket"),
            || panic!("no beats are sampled without a socket"),
        );
        s.stopping();
    }

    fn facts(utterances: u64) -> Facts {
        Facts {
            state: State::Online,
            no_device: false,
            upload_down: false,
            utterances,
            spool_pending: 0,
            spool_bytes: 0,
        }
    }

    #[test]
    fn service_sends_ready_once_status_on_change_and_stopping_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let recv = || {
            let mut buf = [0u8; 512];
            let mut got = Vec::new();
            while let Ok(n) = rx.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            got
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Service::new(Notifier::at(path.to_str().unwrap()), None, t0);
        let beats = || [Count(1), Count(1)];
        s.poll(
            t0,
            false,
            || panic!("no status before capture starts"),
            beats,
        );
        assert!(recv().is_empty());
        s.poll(t0 + ms(10), true, || facts(0), beats);
        assert_eq!(
            recv(),
            ["READY=1\nSTATUS=online: 0 utterances, 0 waiting in the spool (0 B)"]
        );
        s.poll(t0 + ms(20), true, || panic!("not due"), beats);
        s.poll(t0 + ms(1010), true, || facts(0), beats);
        assert!(recv().is_empty(), "an unchanged status is not sent again");
        s.poll(t0 + ms(2010), true, || facts(2), beats);
        assert_eq!(
            recv(),
            ["STATUS=online: 2 utterances, 0 waiting in the spool (0 B)"]
        );
        s.stopping();
        s.stopping();
        s.poll(t0 + ms(5000), true, || facts(3), beats);
        assert_eq!(recv(), ["STOPPING=1\nSTATUS=stopping"]);
    }
}
