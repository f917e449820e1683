//! The dsp thread: frames from the ring through the VAD and the segmenter; each utterance is
//! encoded to Ogg/Opus into the spool while it is spoken, and its events are emitted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime};

use super::history::History;
use super::{DspConfig, DspUpdate, Summary};
use crate::bus::Events;
use crate::capture::{Chunk, RingReader, RingState, SAMPLE_RATE};
use crate::codec::{EncodeError, OggOpusWriter};
use crate::event::{DropReason, EndReason, EventKind, Stage};
use crate::spool::{Entry, Part, Spool, UtteranceMeta};
use crate::vad::segmenter::{Closed, Segmenter, Settings};
use crate::vad::{self, Vad};

/// How long the dsp thread waits, after a stop, for capture to deliver its last period.
const STOP_GRACE: Duration = Duration::from_millis(500);

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
pub(super) struct Dsp {
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
    shared: Option<Arc<RingState>>,
}

impl Dsp {
    pub(super) fn new(
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

    pub(super) fn run(mut self, mut reader: RingReader) -> Summary {
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
                    pos = self.jump(&frame[..filled], pos, gap.len);
                    filled = 0;
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

    /// A loss of `len` samples (0: the device was lost) after the partial frame `tail` at `pos`:
    /// the open utterance is closed and the stream position jumps over the loss. Returns it.
    fn jump(&mut self, tail: &[i16], pos: u64, len: u64) -> u64 {
        self.tail(tail);
        let pos = pos + tail.len() as u64;
        let reason = if len == 0 {
            EndReason::DeviceLost
        } else {
            EndReason::Overrun
        };
        if let Some(closed) = self.segmenter.skip(pos, len, reason) {
            self.close(closed);
        }
        self.history.skip(len);
        pos + len
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
        let Some(mut utt) = self.open.take() else {
            return;
        };
        let duration_ms = (closed.end - closed.start) / 16;
        let offset_ms = closed.start / 16;
        debug_assert_eq!(utt.start, closed.start);
        let finished = utt.writer.take().map(|w| w.finish());
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
        let audio = self.commit(&utt, &closed, finished);
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

    /// Put a finished utterance's file and metadata in the spool; `None` (reported) if the spool
    /// could not take it.
    fn commit(
        &mut self,
        utt: &Utterance,
        closed: &Closed,
        finished: Option<Result<(Part, u64), EncodeError>>,
    ) -> Option<Entry> {
        let (part, samples) = match finished? {
            Ok(done) => done,
            Err(e) => {
                if let Some(path) = &utt.part {
                    self.spool.abandon(path);
                }
                self.spool_error(&utt.id, &e);
                return None;
            }
        };
        debug_assert_eq!(samples, closed.end - closed.start);
        let meta = UtteranceMeta {
            v: 1,
            utterance: utt.id.clone(),
            device: self.events.device().to_owned(),
            offset_ms: closed.start / 16,
            duration_ms: (closed.end - closed.start) / 16,
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
