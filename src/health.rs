//! What hark says about itself: the `status` event (on a timer, on every change of the uploads'
//! state, and as a socket client's first line) and systemd's STATUS/READY/WATCHDOG facts.
//!
//! It reads the other stages (the spool's usage, the pipeline's [`PipelineHealth`], the sinks'
//! drop counter) and keeps only one fact of its own: whether the upload endpoints are down.
//! Deliberately not here: deciding anything; the session acts, this only reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::bus::Events;
use crate::event::{EventKind, State};
use crate::notify::{self, Beat};
use crate::pipeline::{PipelineHealth, Probe};
use crate::spool::Spool;
use crate::upload::OnState;
use crate::{bus, sink};

/// The status of one session, shared by the control loop and the upload threads.
pub(crate) struct Health {
    started: Instant,
    spool: Arc<Spool>,
    events: Events,
    capture: OnceLock<Probe>,
    upload_down: AtomicBool,
    dropped: bus::Dropped,
}

impl Health {
    /// `status` is where a socket client's first line comes from; it is given a weak handle, so
    /// that the sinks do not keep this alive.
    pub(crate) fn new(
        started: Instant,
        spool: &Arc<Spool>,
        events: Events,
        dropped: bus::Dropped,
        status: &sink::socket::StatusSource,
    ) -> Arc<Health> {
        let health = Arc::new(Health {
            started,
            spool: spool.clone(),
            events,
            dropped,
            capture: OnceLock::new(),
            upload_down: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&health);
        status.set(Box::new(move || weak.upgrade().map(|h| h.status())));
        health
    }

    /// From now on the status includes the pipeline's.
    pub(crate) fn watch(&self, probe: Probe) {
        let _ = self.capture.set(probe);
    }

    /// Emit a `status` event now.
    pub(crate) fn emit(&self) {
        self.events.emit(self.status());
    }

    /// The `status` event as of now, without emitting it.
    pub(crate) fn status(&self) -> EventKind {
        let (pending, bytes) = self.spool.usage();
        let (capture_ok, overruns) = match self.pipeline() {
            // A file that ended is not a fault; a device being reopened is.
            Some(p) => (p.capturing || p.finished, p.overruns),
            None => (true, 0),
        };
        let state = if capture_ok && !self.upload_down.load(Ordering::Acquire) {
            State::Online
        } else {
            State::Degraded
        };
        EventKind::Status {
            state,
            overruns,
            spool_pending: pending,
            spool_bytes: bytes,
            events_dropped: self.dropped.get(),
            uptime_s: self.started.elapsed().as_secs(),
        }
    }

    fn pipeline(&self) -> Option<PipelineHealth> {
        self.capture.get().map(Probe::health)
    }

    /// The upload threads' callback: record the transition and report it at once.
    pub(crate) fn on_upload_state(health: &Arc<Health>) -> OnState {
        let health = health.clone();
        Arc::new(move |down| {
            health.upload_down.store(down, Ordering::Release);
            health.emit();
        })
    }

    /// sd_notify on each wake of the control loop: READY once capture started (or its device's
    /// first open failed: STATUS then says degraded), STATUS on change, WATCHDOG while capture and
    /// dsp move. Nothing before the pipeline runs.
    pub(crate) fn notify(&self, sd: &mut notify::Service) {
        let Some(p) = self.pipeline() else {
            return;
        };
        let beat = |done: bool, count: u64| {
            if done { Beat::Done } else { Beat::Count(count) }
        };
        sd.poll(
            Instant::now(),
            p.started,
            || self.notify_facts(),
            || {
                let now = self.pipeline().unwrap_or(p);
                [
                    beat(now.finished, now.capture_beats),
                    beat(now.dsp_ended, now.dsp_beats),
                ]
            },
        );
    }

    /// What systemd's STATUS line says: the `status` event's state and counts, and why degraded.
    fn notify_facts(&self) -> notify::Facts {
        let (state, spool_pending, spool_bytes) = match self.status() {
            EventKind::Status {
                state,
                spool_pending,
                spool_bytes,
                ..
            } => (state, spool_pending, spool_bytes),
            _ => (State::Degraded, 0, 0),
        };
        let p = self.pipeline().unwrap_or_default();
        notify::Facts {
            state,
            no_device: !p.capturing && !p.finished,
            upload_down: self.upload_down.load(Ordering::Acquire),
            utterances: p.utterances,
            spool_pending,
            spool_bytes,
        }
    }
}
