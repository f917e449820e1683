//! When a session stops, and how: a state machine that takes what happened (a stop signal, the
//! last sink gone, the pipeline or the uploads finished, the clock) and returns what to do (stop
//! capture, give the uploads a deadline, let them finish the queue, stop waiting).
//!
//! It never touches a thread, a channel or the clock itself: the session's control loop feeds it
//! and carries out its actions, so every rule here is tested on sequences of inputs below.
//! Deliberately not here: reloading the config (SIGHUP), which does not stop anything.

use std::time::{Duration, Instant};

/// How long a stop leaves the upload in flight (and the last utterance) to finish.
pub(crate) const UPLOAD_GRACE: Duration = Duration::from_secs(5);

/// Something the control loop heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// SIGTERM or SIGINT.
    StopSignal,
    /// A sink ended by itself and none is left (`hark | head -1`).
    LastSinkGone,
    /// The dsp thread ended: the input ended, or capture stopped and the open utterance is written.
    PipelineDone,
    /// Every upload thread ended.
    UploadsDone,
}

/// What the control loop must do now, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Tell systemd `STOPPING=1`.
    Stopping,
    /// Stop capture: the dsp thread drains the ring and closes the open utterance.
    StopPipeline,
    /// The uploads get until then; what is not done stays in the spool.
    StopUploads(Instant),
    /// No more utterances will come: the uploads end when the queue is empty.
    FinishUploads,
}

/// Why a stop was asked for (the log line says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    Signal,
    NoSink,
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Both the pipeline and the uploads ended.
    Done,
    /// The deadline passed with an upload still in flight: stop waiting (it stays in the spool).
    TimedOut,
}

/// The shutdown rules of one session.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown {
    grace: Duration,
    pipeline_done: bool,
    uploads_done: bool,
    has_uploads: bool,
    stop_by: Option<Instant>,
    cause: Option<Cause>,
}

impl Shutdown {
    /// `pipeline`: whether the session captures (`hark upload` does not); `uploads`: whether it
    /// has upload threads.
    pub(crate) fn new(pipeline: bool, uploads: bool, grace: Duration) -> Shutdown {
        Shutdown {
            grace,
            pipeline_done: !pipeline,
            uploads_done: !uploads,
            has_uploads: uploads,
            stop_by: None,
            cause: None,
        }
    }

    /// What to do at the start: a session without capture lets its uploads finish the queue.
    pub(crate) fn start(&self) -> Vec<Action> {
        if self.pipeline_done && self.has_uploads {
            vec![Action::FinishUploads]
        } else {
            Vec::new()
        }
    }

    /// Take one input; returns the actions, in order.
    pub(crate) fn on(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::StopSignal => self.stop(Cause::Signal, now),
            // A stop already under way goes on as it is; the last sink going is not a second signal.
            Input::LastSinkGone if self.cause.is_some() => Vec::new(),
            Input::LastSinkGone => self.stop(Cause::NoSink, now),
            Input::PipelineDone => {
                self.pipeline_done = true;
                match (self.has_uploads, self.stop_by) {
                    (false, _) => Vec::new(),
                    (true, Some(deadline)) => vec![Action::StopUploads(deadline)],
                    (true, None) => vec![Action::FinishUploads],
                }
            }
            Input::UploadsDone => {
                self.uploads_done = true;
                Vec::new()
            }
        }
    }

    /// A stop: the first one gives the uploads the grace period, a second signal ends them now.
    fn stop(&mut self, cause: Cause, now: Instant) -> Vec<Action> {
        let mut actions = vec![Action::Stopping];
        let deadline = match self.stop_by {
            None => {
                self.cause = Some(cause);
                if !self.pipeline_done {
                    actions.push(Action::StopPipeline);
                }
                now + self.grace
            }
            Some(_) => now,
        };
        self.stop_by = Some(deadline);
        if self.pipeline_done && self.has_uploads {
            actions.push(Action::StopUploads(deadline));
        }
        actions
    }

    /// Where the session is at `now`.
    pub(crate) fn phase(&self, now: Instant) -> Phase {
        if self.pipeline_done && self.uploads_done {
            return Phase::Done;
        }
        // The deadline is the uploads'; the pipeline's own flush is bounded by its stop.
        match self.stop_by {
            Some(deadline) if self.pipeline_done && now >= deadline => Phase::TimedOut,
            _ => Phase::Running,
        }
    }

    /// When the control loop must wake at the latest to see a deadline pass.
    pub(crate) fn wake_by(&self) -> Option<Instant> {
        self.stop_by.filter(|_| self.pipeline_done)
    }

    /// Why the session was asked to stop, if it was.
    pub(crate) fn cause(&self) -> Option<Cause> {
        self.cause
    }

    /// Whether the stop came from outside (a signal, the last sink gone) rather than the end of
    /// the work.
    pub(crate) fn stopped(&self) -> bool {
        self.cause.is_some()
    }

    /// Whether the upload threads ended by themselves (else they are left behind, detached).
    pub(crate) fn uploads_done(&self) -> bool {
        self.uploads_done
    }
}

/// How a `hark run` ends, from what it left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunVerdict {
    Ok,
    /// The input broke off (a truncated file): what came before is spooled, but say so.
    InputBroken,
    /// Utterances failed for good.
    Failed,
}

/// The exit rule of `hark run`: a broken input first; failed utterances count only when the run
/// ended by itself (a stop by signal is a normal end whatever happened before).
pub(crate) fn run_verdict(shutdown: &Shutdown, input_broken: bool, failed: u64) -> RunVerdict {
    if input_broken {
        RunVerdict::InputBroken
    } else if failed > 0 && !shutdown.stopped() {
        RunVerdict::Failed
    } else {
        RunVerdict::Ok
    }
}

/// The exit rule of `hark upload`: anything failed or left in the spool is not a success.
pub(crate) fn upload_complete(failed: u64, waiting: u64) -> bool {
    failed == 0 && waiting == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn daemon() -> (Shutdown, Instant) {
        (Shutdown::new(true, true, UPLOAD_GRACE), Instant::now())
    }

    #[test]
    fn end_of_input_lets_the_uploads_finish_the_queue() {
        let (mut s, t0) = daemon();
        assert!(s.start().is_empty());
        assert_eq!(s.on(Input::PipelineDone, t0), [Action::FinishUploads]);
        assert_eq!(s.phase(at(t0, 3_600_000)), Phase::Running, "no deadline");
        assert_eq!(s.wake_by(), None);
        assert!(s.on(Input::UploadsDone, t0).is_empty());
        assert_eq!(s.phase(t0), Phase::Done);
        assert!(!s.stopped());
    }

    #[test]
    fn a_signal_stops_capture_then_gives_the_uploads_the_grace() {
        let (mut s, t0) = daemon();
        assert_eq!(
            s.on(Input::StopSignal, t0),
            [Action::Stopping, Action::StopPipeline]
        );
        assert_eq!(
            s.phase(at(t0, 10_000)),
            Phase::Running,
            "capture still flushing"
        );
        let deadline = t0 + UPLOAD_GRACE;
        assert_eq!(
            s.on(Input::PipelineDone, at(t0, 100)),
            [Action::StopUploads(deadline)]
        );
        assert_eq!(s.wake_by(), Some(deadline));
        assert_eq!(s.phase(at(t0, 4_999)), Phase::Running);
        assert_eq!(s.phase(deadline), Phase::TimedOut);
        assert_eq!(s.cause(), Some(Cause::Signal));
    }

    #[test]
    fn a_second_signal_ends_the_uploads_now() {
        let (mut s, t0) = daemon();
        s.on(Input::StopSignal, t0);
        s.on(Input::PipelineDone, at(t0, 100));
        let now = at(t0, 200);
        assert_eq!(
            s.on(Input::StopSignal, now),
            [Action::Stopping, Action::StopUploads(now)]
        );
        assert_eq!(s.phase(now), Phase::TimedOut);
    }

    #[test]
    fn a_second_signal_while_capture_flushes_moves_the_deadline_without_a_second_stop() {
        let (mut s, t0) = daemon();
        s.on(Input::StopSignal, t0);
        assert_eq!(s.on(Input::StopSignal, at(t0, 50)), [Action::Stopping]);
        assert_eq!(
            s.on(Input::PipelineDone, at(t0, 100)),
            [Action::StopUploads(at(t0, 50))]
        );
    }

    #[test]
    fn uploads_that_end_in_time_are_done_not_timed_out() {
        let (mut s, t0) = daemon();
        s.on(Input::StopSignal, t0);
        s.on(Input::PipelineDone, at(t0, 100));
        s.on(Input::UploadsDone, at(t0, 900));
        assert_eq!(s.phase(at(t0, 60_000)), Phase::Done);
        assert!(s.uploads_done());
    }

    #[test]
    fn the_last_sink_gone_stops_like_a_signal_once() {
        let (mut s, t0) = daemon();
        assert_eq!(
            s.on(Input::LastSinkGone, t0),
            [Action::Stopping, Action::StopPipeline]
        );
        assert_eq!(s.cause(), Some(Cause::NoSink));
        assert!(s.on(Input::LastSinkGone, at(t0, 10)).is_empty());
        // A signal after it is a second stop: now.
        let now = at(t0, 20);
        assert_eq!(s.on(Input::StopSignal, now), [Action::Stopping]);
        assert_eq!(
            s.on(Input::PipelineDone, at(t0, 30)),
            [Action::StopUploads(now)]
        );
    }

    #[test]
    fn the_last_sink_gone_after_a_signal_changes_nothing() {
        let (mut s, t0) = daemon();
        s.on(Input::StopSignal, t0);
        assert!(s.on(Input::LastSinkGone, at(t0, 10)).is_empty());
        assert_eq!(s.cause(), Some(Cause::Signal));
    }

    #[test]
    fn record_only_ends_with_the_pipeline() {
        let mut s = Shutdown::new(true, false, UPLOAD_GRACE);
        let t0 = Instant::now();
        assert_eq!(
            s.on(Input::StopSignal, t0),
            [Action::Stopping, Action::StopPipeline]
        );
        assert!(s.on(Input::PipelineDone, at(t0, 10)).is_empty());
        assert_eq!(s.phase(at(t0, 10)), Phase::Done);
    }

    #[test]
    fn upload_only_finishes_at_start_and_a_signal_gives_the_grace() {
        let mut s = Shutdown::new(false, true, UPLOAD_GRACE);
        let t0 = Instant::now();
        assert_eq!(s.start(), [Action::FinishUploads]);
        assert_eq!(
            s.on(Input::StopSignal, t0),
            [Action::Stopping, Action::StopUploads(t0 + UPLOAD_GRACE)]
        );
        assert_eq!(s.wake_by(), Some(t0 + UPLOAD_GRACE));
        assert_eq!(s.phase(t0 + UPLOAD_GRACE), Phase::TimedOut);
    }

    #[test]
    fn run_exit_rules() {
        let (mut s, t0) = daemon();
        assert_eq!(run_verdict(&s, false, 0), RunVerdict::Ok);
        assert_eq!(run_verdict(&s, false, 2), RunVerdict::Failed);
        assert_eq!(run_verdict(&s, true, 2), RunVerdict::InputBroken);
        s.on(Input::StopSignal, t0);
        assert_eq!(
            run_verdict(&s, false, 2),
            RunVerdict::Ok,
            "stopped by a signal"
        );
        assert_eq!(run_verdict(&s, true, 0), RunVerdict::InputBroken);
        assert!(upload_complete(0, 0));
        assert!(!upload_complete(1, 0));
        assert!(!upload_complete(0, 1));
    }
}
