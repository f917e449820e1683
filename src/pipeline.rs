//! The pipeline: capture thread → ring → dsp thread (VAD, segmenter, streaming Opus) → spool.
//!
//! [`Pipeline::start`] spawns both threads; [`Pipeline::stop`] stops capture, after which the dsp
//! thread drains the ring, closes the open utterance (reason `shutdown`) and writes it. At end of
//! input the same happens with reason `end_of_input`. Dropping a `Pipeline` stops and joins it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crate::bus::Events;
use crate::capture::{self, CaptureHandle, Chunk, RingReader, SAMPLE_RATE, Shared, Source};
use crate::codec::{EncodeSettings, OggOpusWriter};
use crate::event::{DropReason, EndReason, EventKind, Stage};
use crate::spool::{Part, Spool, UtteranceMeta};
use crate::upload::Submitter;
use crate::vad::segmenter::{Closed, Segmenter, Settings};
use crate::vad::{self, Vad};

/// What the dsp thread needs to know.
#[derive(Debug, Clone)]
pub struct DspConfig {
    pub segmenter: Settings,
    pub vad_mode: u8,
    pub encode: EncodeSettings,
    /// Source description for the utterance metadata.
    pub source: String,
    /// Where finished utterances go for upload; `None` records only.
    pub uploads: Option<Submitter>,
    /// Whether `speech_end` names the audio file (it is kept: record-only or `spool.keep_audio`).
    pub announce_audio: bool,
}

/// New dsp settings from a reloaded config (SIGHUP). Applied between utterances, so an utterance
/// is cut by one set of rules; `frame_ms` cannot change without a restart.
#[derive(Debug, Clone, Copy)]
pub struct DspUpdate {
    pub segmenter: Settings,
    pub vad_mode: u8,
    pub encode: EncodeSettings,
}

/// Counts of what the dsp thread did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub utterances: u64,
    pub dropped: u64,
    pub samples: u64,
}

/// The running capture and dsp threads.
pub struct Pipeline {
    capture: Option<CaptureHandle>,
    dsp: Option<JoinHandle<Summary>>,
    shared: Arc<Shared>,
    updates: Sender<DspUpdate>,
}

impl Pipeline {
    /// Start capture and dsp. `opened` says whether `source` is already open. `done` receives one
    /// message when the dsp thread has finished (end of input, or after `stop`).
    pub fn start<T: Send + 'static>(
        source: Box<dyn Source>,
        opened: bool,
        ring_samples: usize,
        config: DspConfig,
        spool: Arc<Spool>,
        events: Events,
        done: (Sender<T>, T),
    ) -> std::io::Result<Pipeline> {
        let shared = Arc::new(Shared::default());
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
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(c) = &self.capture {
            c.stop();
        }
        if let Some(d) = &self.dsp {
            d.thread().unpark();
        }
    }

    /// New vad and encode settings, taken by the dsp thread before its next utterance.
    pub fn reconfigure(&self, update: DspUpdate) {
        let _ = self.updates.send(update);
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Wait for both threads; returns what the dsp thread did.
    pub fn join(mut self) -> Summary {
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

/// Sent and set when the dsp thread ends.
struct Done<T> {
    shared: Arc<Shared>,
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

/// How long the dsp thread waits, after a stop, for capture to deliver its last period.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// Recent frames, for an utterance's pre-roll.
struct History {
    buf: Vec<i16>,
    /// Stream position just past the newest sample.
    end: u64,
    /// Nothing before this position is held (the start of the stream, or the end of a break).
    valid_from: u64,
}

impl History {
    fn new(samples: usize) -> History {
        History {
            buf: vec![0; samples.max(1)],
            end: 0,
            valid_from: 0,
        }
    }

    fn push(&mut self, frame: &[i16]) {
        let cap = self.buf.len();
        for (i, &s) in frame.iter().enumerate() {
            self.buf[((self.end + i as u64) % cap as u64) as usize] = s;
        }
        self.end += frame.len() as u64;
    }

    /// Hold `samples` from now on, keeping the newest of what is held.
    fn resize(&mut self, samples: usize) {
        let cap = samples.max(1);
        let mut kept = Vec::with_capacity(cap);
        self.range(self.end.saturating_sub(cap as u64), |s| {
            kept.extend_from_slice(s)
        });
        let start = self.end - kept.len() as u64;
        let valid_from = self.valid_from.max(start);
        self.buf = vec![0; cap];
        self.end = start;
        self.push(&kept);
        self.valid_from = valid_from;
    }

    /// The stream jumps `len` samples ahead: what is held is no longer anyone's pre-roll.
    fn skip(&mut self, len: u64) {
        self.end += len;
        self.valid_from = self.end;
    }

    /// Hand the samples of `[from, self.end)` to `f` in at most two slices.
    fn range(&self, from: u64, mut f: impl FnMut(&[i16])) {
        let cap = self.buf.len() as u64;
        let from = from.max(self.end.saturating_sub(cap)).max(self.valid_from);
        if from >= self.end {
            return;
        }
        let a = (from % cap) as usize;
        let b = (self.end % cap) as usize;
        if a < b {
            f(&self.buf[a..b]);
        } else {
            f(&self.buf[a..]);
            f(&self.buf[..b]);
        }
    }
}

struct Utterance {
    id: String,
    /// The file being written, removed if writing fails.
    part: Option<std::path::PathBuf>,
    start: u64,
    start_time: SystemTime,
    /// None when the spool could not create the file (reported); the utterance's events go on.
    writer: Option<OggOpusWriter<Part>>,
}

/// The dsp thread's state.
struct Dsp {
    config: DspConfig,
    updates: Receiver<DspUpdate>,
    pending: Option<DspUpdate>,
    spool: Arc<Spool>,
    events: Events,
    segmenter: Segmenter,
    history: History,
    open: Option<Utterance>,
    summary: Summary,
    vendor: String,
    last_start_time: Option<SystemTime>,
    /// Where the utterance count is published (set when `run` starts).
    shared: Option<Arc<Shared>>,
}

impl Dsp {
    fn new(
        config: DspConfig,
        updates: Receiver<DspUpdate>,
        spool: Arc<Spool>,
        events: Events,
    ) -> Dsp {
        let s = config.segmenter;
        Dsp {
            updates,
            pending: None,
            segmenter: Segmenter::new(s),
            history: History::new((s.history_frames() * s.frame) as usize),
            config,
            spool,
            events,
            open: None,
            summary: Summary::default(),
            last_start_time: None,
            shared: None,
            vendor: format!(
                "hark {} (libopus {})",
                env!("CARGO_PKG_VERSION"),
                opus::version()
            ),
        }
    }

    fn run(mut self, mut reader: RingReader) -> Summary {
        let mut vad = Vad::new(self.config.vad_mode);
        let frame_len = self.config.segmenter.frame as usize;
        let mut frame = vec![0i16; frame_len];
        let mut filled = 0;
        let mut pos: u64 = 0;
        let shared = reader.shared().clone();
        self.shared = Some(shared.clone());
        let mut stop_seen: Option<std::time::Instant> = None;
        let reason = loop {
            // Alive for the watchdog: this loop turns at least every 100 ms, even when idle.
            shared.dsp_beats.fetch_add(1, Ordering::Relaxed);
            match reader.read(&mut frame[filled..]) {
                Chunk::Samples(n) => filled += n,
                Chunk::Gap(gap) if gap.len > 0 && gap.len < self.short_gap() => {
                    // A short loss is replayed as digital silence: the utterance goes on and the
                    // timeline stays exact.
                    let mut left = gap.len;
                    while left > 0 {
                        let n = (frame_len - filled).min(left as usize);
                        frame[filled..filled + n].fill(0);
                        filled += n;
                        left -= n as u64;
                        if filled == frame_len {
                            self.frame(&mut vad, &frame, pos);
                            pos += frame_len as u64;
                            filled = 0;
                        }
                    }
                }
                Chunk::Gap(gap) => {
                    // A lost device, or more lost audio than a pause: what was captured before it
                    // is an utterance of its own, and the timeline jumps over the loss.
                    self.tail(&frame[..filled]);
                    pos += filled as u64;
                    filled = 0;
                    let reason = if gap.len == 0 {
                        EndReason::DeviceLost
                    } else {
                        EndReason::Overrun
                    };
                    if let Some(closed) = self.segmenter.skip(pos, gap.len, reason) {
                        self.close(closed);
                    }
                    self.history.skip(gap.len);
                    pos += gap.len;
                }
                Chunk::Empty => {
                    if reader.is_drained() {
                        break if shared.stop.load(Ordering::Acquire) {
                            EndReason::Shutdown
                        } else {
                            EndReason::EndOfInput
                        };
                    }
                    if shared.stop.load(Ordering::Acquire) {
                        // Capture may be inside its last read; a source blocked for good (stdin
                        // with nothing coming) gets a short grace, then what is here is closed.
                        let since = *stop_seen.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= STOP_GRACE {
                            break EndReason::Shutdown;
                        }
                        reader.wait(Duration::from_millis(10));
                        continue;
                    }
                    reader.wait(Duration::from_millis(100));
                }
            }
            if filled == frame_len {
                self.frame(&mut vad, &frame, pos);
                pos += frame_len as u64;
                filled = 0;
            }
        };
        self.tail(&frame[..filled]);
        pos += filled as u64;
        if let Some(closed) = self.segmenter.finish(pos, reason) {
            self.close(closed);
        }
        self.summary.samples = pos;
        self.summary
    }

    /// A loss shorter than this is replayed as silence.
    fn short_gap(&self) -> u64 {
        let s = self.segmenter.settings();
        s.silence_frames * s.frame
    }

    /// Take new settings when no utterance is open.
    fn reconfigure(&mut self, vad: &mut Vad) {
        while let Ok(update) = self.updates.try_recv() {
            self.pending = Some(update);
        }
        if self.segmenter.in_speech() {
            return;
        }
        let Some(u) = self.pending.take() else {
            return;
        };
        if u.segmenter.frame != self.segmenter.settings().frame {
            tracing::warn!("vad.frame_ms changes only with a restart; the other settings apply");
        }
        let frame = self.segmenter.settings().frame;
        let s = Settings {
            frame,
            ..u.segmenter
        };
        let size = (s.history_frames() * s.frame) as usize;
        if size != (self.segmenter.settings().history_frames() * frame) as usize {
            self.history.resize(size);
        }
        self.segmenter.set_settings(s);
        *vad = Vad::new(u.vad_mode);
        self.config.vad_mode = u.vad_mode;
        self.config.encode = u.encode;
        tracing::info!("new vad and encode settings in effect");
    }

    /// One whole frame at stream position `pos`.
    fn frame(&mut self, vad: &mut Vad, frame: &[i16], pos: u64) {
        self.reconfigure(vad);
        if let Some(shared) = &self.shared {
            shared
                .position
                .store(pos + frame.len() as u64, Ordering::Relaxed);
        }
        let voiced = vad.is_voice(frame);
        let step = self.segmenter.frame(pos, voiced, vad::energy(frame));
        self.history.push(frame);
        if step.append {
            self.write(frame);
        }
        if let Some(closed) = step.close {
            self.close(closed);
        }
        if let Some(start) = step.open {
            self.begin(start);
        }
    }

    /// A partial last frame: kept in an open utterance, not judged by the VAD.
    fn tail(&mut self, samples: &[i16]) {
        self.history.push(samples);
        if self.segmenter.in_speech() {
            self.write(samples);
        }
    }

    fn write(&mut self, samples: &[i16]) {
        let Some(utt) = &mut self.open else { return };
        let Some(writer) = &mut utt.writer else {
            return;
        };
        if let Err(e) = writer.write(samples) {
            let id = utt.id.clone();
            utt.writer = None;
            if let Some(path) = utt.part.take() {
                self.spool.abandon(&path);
            }
            self.spool_error(&id, &e);
        }
    }

    fn begin(&mut self, start: u64) {
        // The wall-clock time of the first sample: now, less what was captured since. A file is
        // read faster than real time, so keep the times (and so the ids) in stream order.
        let back = self.history.end.saturating_sub(start);
        let mut start_time = SystemTime::now()
            .checked_sub(Duration::from_micros(
                back * 1_000_000 / u64::from(SAMPLE_RATE),
            ))
            .unwrap_or_else(SystemTime::now);
        if let Some(last) = self.last_start_time
            && start_time <= last
        {
            start_time = last + Duration::from_millis(1);
        }
        self.last_start_time = Some(start_time);
        let id = self.spool.new_id(start_time);
        let mut part_path = None;
        let writer = match self.spool.begin(&id) {
            Ok(part) => {
                part_path = Some(part.path().to_owned());
                let time = humantime::format_rfc3339_millis(start_time).to_string();
                let comments = [
                    ("DEVICE", self.events.device()),
                    ("UTTERANCE", id.as_str()),
                    ("START_TIME", time.as_str()),
                ];
                match OggOpusWriter::new(
                    part,
                    &self.config.encode,
                    &self.vendor,
                    &comments,
                    serial_of(&id),
                ) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        self.spool_error(&id, &e);
                        None
                    }
                }
            }
            Err(e) => {
                self.spool_error(&id, &e);
                None
            }
        };
        self.events.emit(EventKind::SpeechStart {
            utterance: id.clone(),
            offset_ms: start / 16,
        });
        self.open = Some(Utterance {
            id,
            part: part_path,
            start,
            start_time,
            writer,
        });
        // The pre-roll and the opening run, up to the current frame's end.
        let mut pending = Vec::new();
        self.history.range(start, |s| pending.extend_from_slice(s));
        self.write(&pending);
    }

    fn close(&mut self, closed: Closed) {
        let Some(utt) = self.open.take() else { return };
        let duration_ms = (closed.end - closed.start) / 16;
        let offset_ms = closed.start / 16;
        debug_assert_eq!(utt.start, closed.start);
        let finished = utt.writer.map(|w| w.finish());
        if let Some(reason) = closed.drop {
            if let Some(Ok((part, _))) = finished {
                self.spool.discard(part);
            }
            self.summary.dropped += 1;
            self.events.emit(EventKind::Dropped {
                utterance: utt.id,
                offset_ms,
                reason,
                duration_ms,
            });
            return;
        }
        let audio = match finished {
            Some(Ok((part, samples))) => {
                debug_assert_eq!(samples, closed.end - closed.start);
                let meta = UtteranceMeta {
                    v: 1,
                    utterance: utt.id.clone(),
                    device: self.events.device().to_owned(),
                    offset_ms,
                    duration_ms,
                    samples,
                    sample_rate: SAMPLE_RATE,
                    start_time: humantime::format_rfc3339_millis(utt.start_time).to_string(),
                    reason: closed.reason,
                    speech_ms: closed.speech / 16,
                    speech_offset_ms: closed.speech_start / 16,
                    level_dbfs: closed.level_dbfs.max(-200.0),
                    source: self.config.source.clone(),
                    audio: format!("{}.ogg", utt.id),
                };
                match self.spool.commit(part, &meta) {
                    Ok(entry) => Some(entry),
                    Err(e) => {
                        if let Some(path) = &utt.part {
                            self.spool.abandon(path);
                        }
                        self.spool_error(&utt.id, &e);
                        None
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(path) = &utt.part {
                    self.spool.abandon(path);
                }
                self.spool_error(&utt.id, &e);
                None
            }
            None => None,
        };
        self.summary.utterances += 1;
        if let Some(shared) = &self.shared {
            shared
                .utterances
                .store(self.summary.utterances, Ordering::Relaxed);
        }
        let path = audio
            .as_ref()
            .filter(|_| self.config.announce_audio)
            .map(|e| e.audio.display().to_string());
        self.events.emit(EventKind::SpeechEnd {
            utterance: utt.id,
            offset_ms,
            duration_ms,
            reason: closed.reason,
            audio: path,
        });
        // After `speech_end`, so that its transcript can only come later.
        if let (Some(entry), Some(uploads)) = (audio, &self.config.uploads) {
            uploads.submit(entry, Instant::now());
        }
        for meta in self.spool.enforce_cap() {
            self.events.emit(EventKind::Dropped {
                utterance: meta.utterance,
                offset_ms: meta.offset_ms,
                reason: DropReason::SpoolFull,
                duration_ms: meta.duration_ms,
            });
        }
    }

    fn spool_error(&self, id: &str, e: &dyn std::error::Error) {
        tracing::error!("utterance {id}: {e}");
        self.events.emit(EventKind::Error {
            stage: Stage::Spool,
            code: "spool_write",
            message: format!("utterance {id}: {e}"),
            retrying: false,
        });
    }
}

/// An Ogg stream serial number derived from the utterance id.
fn serial_of(id: &str) -> u32 {
    id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resized_history_keeps_the_newest_samples_at_their_positions() {
        let mut h = History::new(4);
        h.push(&[1, 2, 3, 4, 5, 6]);
        h.resize(8);
        let mut got = Vec::new();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [3, 4, 5, 6]);
        h.push(&[7, 8, 9]);
        got.clear();
        h.range(2, |s| got.extend_from_slice(s));
        assert_eq!(got, [3, 4, 5, 6, 7, 8, 9]);
        h.resize(2);
        got.clear();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [8, 9]);
    }

    #[test]
    fn history_returns_the_requested_range_across_the_wrap() {
        let mut h = History::new(8);
        h.push(&[1, 2, 3, 4, 5]);
        h.push(&[6, 7, 8, 9, 10]);
        let mut got = Vec::new();
        h.range(4, |s| got.extend_from_slice(s));
        assert_eq!(got, [5, 6, 7, 8, 9, 10]);
        got.clear();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [3, 4, 5, 6, 7, 8, 9, 10], "clamped to what is kept");
        h.skip(100);
        h.push(&[11, 12]);
        got.clear();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [11, 12], "nothing from before a break");
    }
}
