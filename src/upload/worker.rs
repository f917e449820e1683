//! One upload thread: a thin I/O shell around the upload policy. For each utterance it asks an
//! [`Attempt`] what to do and does it (the POST through `client`, the WAV conversion, spool
//! moves, events and logs, waits that a stop cuts short), then tells the attempt how it went.
//!
//! Deliberately not here: any decision about retries, waits, fallbacks, formats, outages or
//! giving up (`policy`); HTTP details (`client`); the queue and the threads' lifecycle (`queue`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::client::{Endpoint, Failure, Upload};
use super::policy::{Attempt, Context, Decision, Delivery, Formats, Note, Now, Outcome, Reason};
use super::queue::{Job, Queue};
use super::{
    Audio, Finished, MIN_DURATION_MS, OnResult, OnState, Options, Patience, Report, Setup, response,
};
use crate::bus::Events;
use crate::event::{DropReason, EventKind, Stage};
use crate::spool::{self, Entry, Spool, UtteranceMeta};

/// How one utterance's upload ended.
enum Ended {
    Done,
    /// Stopped before this job was finished: it stays in the spool.
    Stopped,
    /// Every endpoint is down and the patience ran out.
    GaveUp,
}

/// What a POST led to.
enum Posted {
    /// Transcribed, and the transcript handed to the sinks.
    Delivered,
    /// Transcribed, but no sink took the transcript before the stop deadline.
    Kept,
    /// It failed: the policy's next decision.
    Failed(Decision),
}

/// The upload settings keep what the policy learnt about formats on their endpoints, so a
/// reload (new endpoints) starts afresh.
impl Formats for Setup {
    fn wants_wav(&self, endpoint: usize) -> bool {
        self.endpoints
            .get(endpoint)
            .is_some_and(Endpoint::wants_wav)
    }

    fn learn_wav(&self, endpoint: usize) {
        if let Some(ep) = self.endpoints.get(endpoint) {
            ep.remember_wav();
        }
    }
}

/// What the policy needs to know about a failed POST.
fn outcome(f: &Failure) -> Outcome<'_> {
    match f {
        Failure::Status {
            status,
            error,
            headers,
        } => Outcome::Status {
            status: *status,
            headers,
            code: error.code.as_deref(),
            message: &error.message,
        },
        Failure::Transport {
            code: "bad_response",
            ..
        } => Outcome::Unreadable,
        Failure::Transport { .. } => Outcome::NoAnswer,
    }
}

/// One upload thread.
pub(super) struct Worker {
    queue: Arc<Queue>,
    /// The settings in use, taken from the queue between rounds over the endpoints (an
    /// endpoint index must not change under an upload).
    setup: Arc<Setup>,
    generation: u64,
    spool: Arc<Spool>,
    events: Events,
    patience: Patience,
    keep_audio: bool,
    on_state: OnState,
    on_result: Option<OnResult>,
    report: Report,
}

impl Worker {
    pub(super) fn new(
        queue: Arc<Queue>,
        setup: Arc<Setup>,
        spool: Arc<Spool>,
        events: Events,
        options: &Options,
    ) -> Worker {
        Worker {
            queue,
            setup,
            generation: 0,
            spool,
            events,
            patience: options.patience,
            keep_audio: options.keep_audio,
            on_state: options.on_state.clone(),
            on_result: options.on_result.clone(),
            report: Report::default(),
        }
    }

    /// Upload jobs until there are none, or until a stop or an outage ends the run.
    pub(super) fn run(mut self) -> Report {
        while let Some(job) = self.queue.next_job() {
            match self.upload(&job) {
                Ended::Done => {}
                ended => {
                    // It stays in the spool; the others stop too (past the deadline, or every
                    // endpoint is down and this run does not wait).
                    self.queue.put_back(job, matches!(ended, Ended::GaveUp));
                    break;
                }
            }
        }
        self.report
    }

    /// The moment, for the policy.
    fn now(&self) -> Now {
        Now {
            at: Instant::now(),
            wall: SystemTime::now(),
            deadline: self.queue.deadline(),
            jitter: jitter(),
        }
    }

    fn context(&self) -> Context<'_> {
        Context {
            formats: &*self.setup,
            outage: &self.queue.outage,
        }
    }

    /// Take new settings, if a reload sent some; only between rounds over the endpoints.
    fn take_setup(&mut self) {
        if let Some((setup, generation)) = self.queue.newer_setup(self.generation) {
            self.setup = setup;
            self.generation = generation;
            tracing::info!("new transcription settings in effect");
        }
    }

    /// One utterance, from the spool to its end: the policy decides, this carries it out.
    fn upload(&mut self, job: &Job) -> Ended {
        let Some((meta, mut audio)) = self.prepare(&job.entry) else {
            return Ended::Done;
        };
        let mut attempt = Attempt::new(self.patience);
        self.take_setup();
        let mut next = attempt.round(self.setup.endpoints.len(), self.context(), &self.now());
        loop {
            next = match next {
                Decision::Post { endpoint, wav } => {
                    match self.post(job, &meta, &mut audio, &mut attempt, endpoint, wav) {
                        Posted::Delivered => return Ended::Done,
                        Posted::Kept => return Ended::Stopped,
                        Posted::Failed(next) => next,
                    }
                }
                Decision::Retry(delay) => {
                    self.queue.wait(delay);
                    attempt.resume(self.context(), &self.now())
                }
                Decision::Park { delay, report, why } => {
                    if report {
                        self.report_down(&why);
                    }
                    // A reload during an outage (the endpoint fixed) applies to the next round.
                    if self.queue.wait(delay) {
                        self.take_setup();
                    }
                    attempt.round(self.setup.endpoints.len(), self.context(), &self.now())
                }
                Decision::Fail(reason) => {
                    self.fail(&job.entry, reason.code, &reason.text);
                    return Ended::Done;
                }
                Decision::GiveUp { why } => {
                    tracing::warn!("every endpoint failed ({why}); giving up for now");
                    return Ended::GaveUp;
                }
                Decision::Stop => return Ended::Stopped,
            }
        }
    }

    /// The utterance's metadata and audio; `None` when it is finished without an upload
    /// (dropped by the spool cap, too short, or unreadable, each reported).
    fn prepare(&mut self, entry: &Entry) -> Option<(UtteranceMeta, Audio)> {
        let meta = match spool::read_meta(&entry.meta) {
            Ok(meta) => meta,
            // Dropped by the spool cap while it waited: its `dropped` event was emitted then.
            Err(_) if !entry.meta.exists() => return None,
            Err(e) => {
                self.fail(entry, "bad_metadata", &format!("{e}"));
                return None;
            }
        };
        if meta.duration_ms < MIN_DURATION_MS {
            self.events.emit(EventKind::Dropped {
                utterance: meta.utterance.clone(),
                offset_ms: meta.offset_ms,
                reason: DropReason::TooShort,
                duration_ms: meta.duration_ms,
            });
            let _ = self.spool.remove(entry);
            if let Some(on_result) = &self.on_result {
                on_result(Finished::TooShort {
                    utterance: meta.utterance,
                });
            }
            return None;
        }
        match std::fs::read(&entry.audio) {
            Ok(ogg) => Some((meta, Audio { ogg, wav: None })),
            Err(e) => {
                let msg = format!("{}: {e}", entry.audio.display());
                self.fail(entry, "missing_audio", &msg);
                None
            }
        }
    }

    /// Post the audio to endpoint `endpoint` as the policy said; a transcript is delivered at
    /// once, a failure goes back to the policy.
    fn post(
        &mut self,
        job: &Job,
        meta: &UtteranceMeta,
        audio: &mut Audio,
        attempt: &mut Attempt,
        endpoint: usize,
        wav: bool,
    ) -> Posted {
        let setup = self.setup.clone();
        let ep = &setup.endpoints[endpoint];
        let bytes = match audio.bytes(wav) {
            Ok(bytes) => bytes,
            Err(e) => {
                let reason = Reason {
                    code: "bad_audio",
                    text: format!("cannot convert {} to WAV: {e}", job.entry.audio.display()),
                };
                let step =
                    attempt.failed(Outcome::Unconvertible, reason, self.context(), &self.now());
                return Posted::Failed(step.next);
            }
        };
        let started = Instant::now();
        let events = &self.events;
        let mut on_delta = |delta: &str| {
            events.emit(EventKind::TranscriptDelta {
                utterance: meta.utterance.clone(),
                offset_ms: meta.offset_ms,
                delta: delta.to_owned(),
            });
        };
        let upload = Upload {
            id: &meta.utterance,
            bytes,
            wav,
        };
        let result = setup.client.transcribe(
            ep,
            &setup.fields,
            &upload,
            self.queue.deadline(),
            &mut on_delta,
        );
        match result {
            Ok(t) => {
                tracing::debug!(
                    "{}: transcribed by {} in {} ms",
                    meta.utterance,
                    ep.shown,
                    started.elapsed().as_millis()
                );
                if !self.deliver(job, meta, t, attempt.answered()) {
                    return Posted::Kept;
                }
                if attempt.delivered(self.context()) {
                    tracing::info!("{} answers again", ep.shown);
                    (self.on_state)(false);
                }
                Posted::Delivered
            }
            Err(f) => {
                let what = format!("{}: {f}", ep.shown);
                let reason = Reason {
                    code: f.code(),
                    text: what.clone(),
                };
                let step = attempt.failed(outcome(&f), reason, self.context(), &self.now());
                self.tell(meta, ep, &f, &what, step.note);
                Posted::Failed(step.next)
            }
        }
    }

    /// Log a failed POST as the policy noted it (`what` names the endpoint and the failure),
    /// and report it as an event if the policy said so.
    fn tell(&self, meta: &UtteranceMeta, ep: &Endpoint, f: &Failure, what: &str, note: Note) {
        match note {
            Note::Wav => tracing::info!(
                "{} does not take Ogg/Opus ({f}); sending WAV to it from now on",
                ep.shown
            ),
            Note::Refused | Note::Unavailable => tracing::warn!("{}: {what}", meta.utterance),
            Note::Retrying { attempt, report } => {
                tracing::warn!("{} (attempt {attempt}): {what}", meta.utterance);
                if report {
                    self.events.emit(EventKind::Error {
                        stage: Stage::Upload,
                        code: f.code(),
                        message: format!("utterance {}: {what}; retrying", meta.utterance),
                        retrying: true,
                    });
                }
            }
            Note::Unconvertible => {}
        }
    }

    /// Every endpoint just went down: say so once, and that the service is degraded.
    fn report_down(&self, why: &str) {
        self.events.emit(EventKind::Error {
            stage: Stage::Upload,
            code: "endpoints_down",
            message: format!(
                "every endpoint failed, last {why}; retrying, utterances wait in the spool"
            ),
            retrying: true,
        });
        (self.on_state)(true);
    }

    /// Emit the transcript, then let go of the audio. `false`: no sink took the transcript
    /// before the stop deadline, so the audio stays in the spool (to be sent again).
    fn deliver(
        &mut self,
        job: &Job,
        meta: &UtteranceMeta,
        t: response::Transcript,
        delivery: Delivery,
    ) -> bool {
        let Delivery { endpoint, attempts } = delivery;
        let ep = &self.setup.endpoints[endpoint];
        let latency = match job.ended {
            Some(at) => at.elapsed(),
            None => humantime::parse_rfc3339(&meta.start_time)
                .ok()
                .map(|start| start + Duration::from_millis(meta.duration_ms))
                .and_then(|end| SystemTime::now().duration_since(end).ok())
                .unwrap_or_default(),
        };
        // For a caller that keeps its own record of the results.
        let kept = self.on_result.is_some().then(|| t.clone());
        let event = EventKind::Transcript {
            utterance: meta.utterance.clone(),
            offset_ms: meta.offset_ms,
            text: t.text,
            duration_ms: meta.duration_ms,
            language: t.language,
            segments: t.segments,
            words: t.words,
            logprobs: t.logprobs,
            usage: t.usage,
            model: ep.model.clone(),
            endpoint: ep.shown.clone(),
            attempts,
            latency_ms: latency.as_millis() as u64,
        };
        // Handed to the sinks, or kept: every sink full (a stalled reader) or hark stopping.
        while !self.events.emit(event.clone()) {
            if !self.queue.wait(Duration::from_secs(1)) {
                tracing::warn!(
                    "{}: no sink took its transcript; the audio stays in the spool",
                    meta.utterance
                );
                return false;
            }
        }
        let ep = &self.setup.endpoints[endpoint];
        self.report.transcribed += 1;
        if let (Some(on_result), Some(transcript)) = (&self.on_result, kept) {
            on_result(Finished::Transcribed {
                utterance: meta.utterance.clone(),
                transcript,
                model: ep.model.clone(),
                endpoint: ep.shown.clone(),
            });
        }
        let kept = if self.keep_audio {
            self.spool.move_to(&job.entry, "done").map(|_| ())
        } else {
            self.spool.remove(&job.entry)
        };
        if let Err(e) = kept {
            tracing::warn!("{}: transcribed, but {e}", meta.utterance);
        }
        true
    }

    /// Move an utterance that will never be transcribed to `failed/` and say why.
    fn fail(&mut self, entry: &Entry, code: &'static str, why: &str) {
        let moved = self.spool.move_to(entry, "failed");
        let place = match &moved {
            Ok(path) => format!("kept as {}", path.display()),
            Err(e) => format!("could not be moved to failed/: {e}"),
        };
        let message = format!("utterance {}: {why}; not retried, {place}", entry.id);
        tracing::error!("{message}");
        if let Some(on_result) = &self.on_result {
            on_result(Finished::Failed {
                utterance: entry.id.clone(),
                code,
                message: message.clone(),
            });
        }
        self.events.emit(EventKind::Error {
            stage: Stage::Upload,
            code,
            message,
            retrying: false,
        });
        self.report.failed += 1;
    }
}

/// A number in 0..1 for backoff jitter.
fn jitter() -> f64 {
    f64::from(spool::random_u32()) / f64::from(u32::MAX)
}
