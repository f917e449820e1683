//! Realtime scheduling for the capture thread: SCHED_FIFO at a modest priority when the system
//! allows it, so that a busy board (an upload's TLS, the encoder) does not make ALSA overrun.
//!
//! Asked for, never required: when it is denied (no `LimitRTPRIO=` in the unit, no `rtprio` in
//! limits.conf, no CAP_SYS_NICE) hark logs one warning saying how to allow it and captures at
//! normal priority. Deliberately not here: rtkit over D-Bus, CPU affinity, memory locking.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

/// The priority asked for by default: above ordinary threads, below the audio servers' and the
/// kernel's own threaded IRQs (50).
pub(crate) const DEFAULT_PRIORITY: u32 = 10;

/// Whether the denial was already logged: once per process, not once per capture thread.
static WARNED: AtomicBool = AtomicBool::new(false);

/// The priority to ask for: `want`, capped by the soft `RLIMIT_RTPRIO` (`None`: unlimited). A
/// limit of 0 leaves `want` as is: it is then allowed only with CAP_SYS_NICE (root), and the
/// attempt says which.
pub(crate) fn choose_priority(want: u32, rlimit: Option<u64>) -> u32 {
    match rlimit {
        Some(limit) if limit > 0 => want.min(u32::try_from(limit).unwrap_or(u32::MAX)),
        _ => want,
    }
}

/// Move the calling thread to SCHED_FIFO at `want` (capped by RLIMIT_RTPRIO); 0 does nothing.
/// Logs the outcome: info on success, one warning per process on failure. Never fails.
pub(crate) fn promote_current_thread(want: u32) {
    if want == 0 {
        return;
    }
    let priority = choose_priority(want, sys::rtprio_limit());
    match sys::set_current_thread_fifo(i32::try_from(priority).unwrap_or(i32::MAX)) {
        Ok(()) => {
            tracing::info!("capture thread runs at realtime priority {priority} (SCHED_FIFO)");
        }
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!("{}", denied_hint(priority, e));
            }
        }
    }
}

/// The warning for a denied promotion: why, and how to allow it.
pub(crate) fn denied_hint(priority: u32, e: std::io::Error) -> String {
    format!(
        "realtime priority denied for the capture thread (SCHED_FIFO {priority}: {e}); capturing \
         at normal priority, which may overrun on a busy system. To allow it: LimitRTPRIO={priority} \
         in the systemd unit (and RestrictRealtime=no), or `@audio - rtprio {priority}` in \
         /etc/security/limits.conf for a user in group audio; capture.realtime_priority = 0 \
         silences this"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_is_capped_by_the_rlimit() {
        let cases = [
            (10, None, 10),
            (10, Some(0), 10),
            (10, Some(5), 5),
            (10, Some(10), 10),
            (10, Some(99), 10),
            (10, Some(u64::MAX - 1), 10),
        ];
        for (want, limit, got) in cases {
            assert_eq!(choose_priority(want, limit), got, "{want} {limit:?}");
        }
    }

    #[test]
    fn the_denial_says_how_to_allow_it() {
        let hint = denied_hint(10, std::io::Error::from_raw_os_error(libc::EPERM));
        assert!(hint.contains("LimitRTPRIO=10"), "{hint}");
        assert!(hint.contains("rtprio"), "{hint}");
        assert!(hint.contains("Operation not permitted"), "{hint}");
    }
}
