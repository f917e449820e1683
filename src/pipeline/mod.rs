//! The pipeline: capture thread → ring → dsp thread (VAD, segmenter, streaming Opus) → spool.
//!
//! [`Pipeline::start`] spawns both threads; [`Pipeline::stop`] stops capture, after which the dsp
//! thread drains the ring, closes the open utterance (reason `shutdown`) and writes it. At end of
//! input the same happens with reason `end_of_input`. Dropping a `Pipeline` stops and joins it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};

mod dsp;
mod history;

use crate::bus::Events;
use crate::capture::{self, CaptureHandle, RingState, SAMPLE_RATE, Source};
use crate::codec::EncodeSettings;
use crate::config::Config;
use crate::spool::Spool;
use crate::upload::Submitter;
use crate::vad::segmenter::Settings;
use dsp::Dsp;

/// What the dsp thread needs to know.
#[derive(Debug, Clone)]
pub(crate) struct DspConfig {
    pub(crate) segmenter: Settings,
    pub(crate) vad_mode: u8,
    pub(crate) encode: EncodeSettings,
    /// Source description for the utterance metadata.
    pub(crate) source: String,
    /// Where finished utterances go for upload; `None` records only.
    pub(crate) uploads: Option<Submitter>,
    /// Whether `speech_end` names the audio file (it is kept: record-only or `spool.keep_audio`).
    pub(crate) announce_audio: bool,
}

impl DspConfig {
    /// The dsp settings of `config`, for a source described as `source`; utterances are not
    /// handed on for upload until `uploads` is set.
    pub(crate) fn from_config(config: &Config, source: String) -> DspConfig {
        let v = &config.vad;
        DspConfig {
            segmenter: Settings::from_ms(
                v.frame_ms,
                v.start_ms,
                v.silence_ms,
                v.pre_roll_ms,
                v.min_utterance_ms,
                v.max_utterance_ms,
                v.min_level_dbfs,
            ),
            vad_mode: v.mode.min(3) as u8,
            encode: EncodeSettings {
                bitrate: config.encode.bitrate as i32,
                complexity: config.encode.complexity as i32,
            },
            source,
            uploads: None,
            announce_audio: true,
        }
    }

    /// The part a reloaded config may change while running.
    pub(crate) fn update(&self) -> DspUpdate {
        DspUpdate {
            segmenter: self.segmenter,
            vad_mode: self.vad_mode,
            encode: self.encode,
        }
    }
}

/// The ring between capture and dsp, in samples, for `capture.ring_ms`.
pub(crate) fn ring_samples(config: &Config) -> usize {
    let samples = u64::from(config.capture.ring_ms) * u64::from(SAMPLE_RATE) / 1000;
    usize::try_from(samples).unwrap_or(usize::MAX).max(1)
}

/// New dsp settings from a reloaded config (SIGHUP). Applied between utterances, so an utterance
/// is cut by one set of rules; `frame_ms` cannot change without a restart.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DspUpdate {
    pub(crate) segmenter: Settings,
    pub(crate) vad_mode: u8,
    pub(crate) encode: EncodeSettings,
}

/// Counts of what the dsp thread did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub utterances: u64,
    pub dropped: u64,
    pub samples: u64,
}

/// The running capture and dsp threads.
pub(crate) struct Pipeline {
    capture: Option<CaptureHandle>,
    dsp: Option<JoinHandle<Summary>>,
    shared: Arc<RingState>,
    updates: Sender<DspUpdate>,
}

impl Pipeline {
    /// Start capture and dsp. `opened` says whether `source` is already open. `done` receives one
    /// message when the dsp thread has finished (end of input, or after `stop`).
    pub(crate) fn start<T: Send + 'static>(
        source: Box<dyn Source>,
        opened: bool,
        ring_samples: usize,
        config: DspConfig,
        spool: Arc<Spool>,
        events: Events,
        done: (Sender<T>, T),
    ) -> std::io::Result<Pipeline> {
        let shared = Arc::new(RingState::default());
        let (writer, reader) = capture::ring(ring_samples, shared.clone());
        let (updates, updates_rx) = mpsc::channel();
        let dsp_events = events.clone();
        let dsp = thread::Builder::new()
            .name("hark-dsp".into())
            .spawn(move || {
                // However this thread ends (even by a panic), capture stops waiting for it and
                // the control thread hears that it ended.
                let _done = Done {
                    shared: reader.shared().clone(),
                    notify: Some(done),
                };
                Dsp::new(config, updates_rx, spool, dsp_events).run(reader)
            })?;
        // Registered before capture starts, so the first push can wake the dsp thread.
        let _ = shared.consumer.set(dsp.thread().clone());
        let capture = capture::spawn(source, writer, events, opened)?;
        Ok(Pipeline {
            capture: Some(capture),
            dsp: Some(dsp),
            shared,
            updates,
        })
    }

    /// Stop capture; the dsp thread then drains the ring and closes the open utterance.
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(c) = &self.capture {
            c.stop();
        }
        if let Some(d) = &self.dsp {
            d.thread().unpark();
        }
    }

    /// New vad and encode settings, taken by the dsp thread before its next utterance.
    pub(crate) fn reconfigure(&self, update: DspUpdate) {
        let _ = self.updates.send(update);
    }

    /// A handle that reads the pipeline's state from any thread (status, systemd, progress).
    pub(crate) fn probe(&self) -> Probe {
        Probe {
            shared: self.shared.clone(),
        }
    }

    /// Wait for both threads; returns what the dsp thread did.
    pub(crate) fn join(mut self) -> Summary {
        self.finish()
    }

    fn finish(&mut self) -> Summary {
        let summary = match self.dsp.take() {
            Some(dsp) => dsp.join().unwrap_or_default(),
            None => Summary::default(),
        };
        // Dropping the handle stops and joins the capture thread.
        self.capture.take();
        summary
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if self.dsp.is_some() {
            self.stop();
            self.finish();
        }
    }
}

/// Reads the state of a running (or ended) pipeline; cheap to clone, safe from any thread.
#[derive(Clone)]
pub(crate) struct Probe {
    shared: Arc<RingState>,
}

/// The pipeline's state at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PipelineHealth {
    /// The source is open, or its first open failed (systemd's READY=1 waits for this).
    pub(crate) started: bool,
    /// The source is open and delivering (false while a device is being reopened).
    pub(crate) capturing: bool,
    /// The input ended (end of file): capture will push no more samples.
    pub(crate) finished: bool,
    /// The dsp thread ended.
    pub(crate) dsp_ended: bool,
    /// Overruns so far (ring full, device xruns), each one a gap.
    pub(crate) overruns: u64,
    /// Utterances kept so far.
    pub(crate) utterances: u64,
    /// How far (in samples at 16 kHz) the dsp thread has judged the stream.
    pub(crate) position: u64,
    /// Bumped for each capture period that moved the stream, and while a lost device is awaited.
    pub(crate) capture_beats: u64,
    /// Bumped for each pass of the dsp thread's loop.
    pub(crate) dsp_beats: u64,
}

impl Probe {
    pub(crate) fn health(&self) -> PipelineHealth {
        let s = &self.shared;
        PipelineHealth {
            started: s.started.load(Ordering::Acquire),
            capturing: s.capturing.load(Ordering::Acquire),
            finished: s.finished.load(Ordering::Acquire),
            dsp_ended: s.consumer_gone.load(Ordering::Acquire),
            overruns: s.overruns.load(Ordering::Relaxed),
            utterances: s.utterances.load(Ordering::Relaxed),
            position: s.position.load(Ordering::Relaxed),
            capture_beats: s.capture_beats.load(Ordering::Relaxed),
            dsp_beats: s.dsp_beats.load(Ordering::Relaxed),
        }
    }

    /// The capture error that ended the input for good (an unreadable or truncated file), taken
    /// once for the exit status.
    pub(crate) fn take_fatal(&self) -> Option<capture::CaptureError> {
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// Sent and set when the dsp thread ends.
struct Done<T> {
    shared: Arc<RingState>,
    notify: Option<(Sender<T>, T)>,
}

impl<T> Drop for Done<T> {
    fn drop(&mut self) {
        self.shared.consumer_gone.store(true, Ordering::Release);
        if let Some(t) = self.shared.producer.get() {
            t.unpark();
        }
        if let Some((tx, msg)) = self.notify.take() {
            let _ = tx.send(msg);
        }
    }
}
