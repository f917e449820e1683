//! Capture: one thread per source fills a lock-free SPSC ring with mono 16 kHz i16 samples.
//!
//! A source ([`Source`]) reads its device, file or pipe one period at a time; [`Converter`] picks or
//! mixes the channel and resamples; [`RingWriter`] pushes into the ring. The period loop does not
//! allocate, lock, log or block on anything but the device: an overrun is counted in an atomic and
//! marked as a gap (position and length) in a second small ring, so the dsp thread keeps the stream's
//! timeline exact. Everything that may allocate (opening, reopening, reporting) happens outside it.
//!
//! Deliberately not here: voice detection, encoding, any knowledge of utterances.

pub mod alsa;
mod convert;
pub mod file;
mod input;
pub mod media;
pub(crate) mod realtime;

pub(crate) use convert::Converter;
/// Open any input file (WAV, raw, FLAC, MP3, Ogg/Opus; a pipe too) by its first bytes.
pub use file::open_input;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use ringbuf::traits::{Consumer, Observer, Producer, Split};
use ringbuf::{HeapCons, HeapProd, HeapRb};

use crate::backoff;
use crate::bus::Events;
use crate::event::{EventKind, Stage};

/// The internal format: mono i16 at this rate.
pub(crate) const SAMPLE_RATE: u32 = 16_000;

/// Errors of the capture stage.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The input file cannot be opened or read. Final: fix the path or permissions.
    #[error("cannot read input {path}: {source}")]
    Input {
        path: String,
        source: std::io::Error,
    },
    /// The file looks like WAV but its header is broken or unsupported. Final.
    #[error("{path}: not a usable WAV file: {source}")]
    Wav { path: String, source: hound::Error },
    /// The file looks like FLAC, MP3 or Ogg/Opus (by its first bytes or its name) but cannot be
    /// decoded, or its audio is unusable (rate, channels, a format change mid-way). Final.
    #[error("{path}: not a usable FLAC/MP3/Ogg-Opus file: {source}")]
    Media {
        path: String,
        source: media::MediaError,
    },
    /// `capture.channel` names a channel the file does not have. Final.
    #[error(
        "{path} has {channels} channel(s); capture.channel = {channel} does not exist (channels count from 0)"
    )]
    Channel {
        path: String,
        channel: u32,
        channels: u16,
    },
    /// The ALSA device cannot be opened or configured. Retried with backoff by the daemon.
    #[error("ALSA device {device}: {what}: {source}")]
    Alsa {
        device: String,
        what: &'static str,
        source: ::alsa::Error,
    },
    /// The device does not offer what the config asks (rate, channels). Retried like `Alsa`.
    #[error("ALSA device {device}: {message}")]
    Unsupported { device: String, message: String },
    /// The resampler cannot be built for this rate. Final.
    #[error("cannot resample {from} Hz to {SAMPLE_RATE} Hz: {message}")]
    Resample { from: u32, message: String },
}

impl CaptureError {
    /// Whether reopening the source later may help (a device may come back; a file will not heal).
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            CaptureError::Alsa { .. } | CaptureError::Unsupported { .. }
        )
    }

    /// The `code` of the `error` event.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            CaptureError::Input { .. } => "input_unreadable",
            CaptureError::Wav { .. } => "bad_wav",
            CaptureError::Media { .. } => "bad_media",
            CaptureError::Channel { .. } => "bad_channel",
            CaptureError::Alsa { .. } | CaptureError::Unsupported { .. } => "device_unavailable",
            CaptureError::Resample { .. } => "resample",
        }
    }
}

/// What a source's period read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The input ended; the converter has been flushed.
    EndOfInput,
}

/// A capture backend. `open` may allocate and log; `read_period` is the hot loop's body and must not.
pub trait Source: Send {
    fn name(&self) -> &'static str;
    /// A description for logs, e.g. `alsa:plughw:CARD=Device,DEV=0`.
    fn describe(&self) -> String;
    /// Open or reopen the device. Called before the first period and after a lost device.
    fn open(&mut self) -> Result<(), CaptureError>;
    /// Read one period, convert it and push it into the ring.
    fn read_period(&mut self, ring: &mut RingWriter) -> Result<Flow, CaptureError>;
    /// Whether a full ring should wait for the consumer (files, pipes) rather than drop (devices).
    fn waits_for_consumer(&self) -> bool;
    /// The SCHED_FIFO priority the capture thread asks for with this source; 0 for none
    /// (files and pipes need no realtime scheduling).
    fn realtime_priority(&self) -> u32 {
        0
    }
    /// Capture is stopping: push what the converter still holds (the resampler's tail).
    fn flush(&mut self, _ring: &mut RingWriter) {}
    /// A file's own sample rate and channel count (for logs); `None` for devices and stdin.
    fn input_format(&self) -> Option<(u32, usize)> {
        None
    }
    /// The input's length in stream samples (16 kHz), when the file says so: WAV and FLAC
    /// headers, MP3's Xing/VBRI header (or symphonia's estimate from the bitrate), the decoded
    /// length of Ogg/Opus, a raw file's size. `None` for devices, pipes and stdin. A progress
    /// measure, not a promise: a file cut short delivers less.
    fn duration_samples(&self) -> Option<u64> {
        None
    }
}

/// A break in the sample stream, in stream positions (samples at 16 kHz).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// Stream position where the gap starts.
    pub(crate) pos: u64,
    /// Samples lost (an overrun, replayed as silence), or 0 for a discontinuity (device lost).
    pub(crate) len: u64,
}

/// State shared by the capture thread, the dsp thread and the control thread.
#[derive(Debug, Default)]
pub struct RingState {
    /// Set by the control thread: capture stops, dsp drains and closes the open utterance.
    pub(crate) stop: AtomicBool,
    /// Set by the capture thread when it will push no more samples.
    pub(crate) finished: AtomicBool,
    /// Overruns (ring full, device xruns), each one a gap.
    pub(crate) overruns: AtomicU64,
    /// Samples lost to overruns.
    pub lost_samples: AtomicU64,
    /// Whether the source is open and delivering (false while a device is being reopened).
    pub(crate) capturing: AtomicBool,
    /// Set by a file source while it waits for room in the ring.
    producer_waiting: AtomicBool,
    /// Set when the dsp thread has ended (normally or not): nobody reads the ring any more.
    pub(crate) consumer_gone: AtomicBool,
    /// Set once the source is open or its first open has failed (systemd's READY=1 waits for it).
    pub(crate) started: AtomicBool,
    /// Bumped by the capture thread for each period that moved the stream (samples or a marked
    /// loss) and while it waits to reopen a lost device: still while it is stalled.
    pub(crate) capture_beats: AtomicU64,
    /// Bumped by the dsp thread for each pass of its loop (a chunk, a gap, or an idle wait).
    pub(crate) dsp_beats: AtomicU64,
    /// Utterances kept so far (the dsp thread's count, for systemd's STATUS line).
    pub(crate) utterances: AtomicU64,
    /// Stream position the dsp thread has judged up to (`hark transcribe`'s progress).
    pub(crate) position: AtomicU64,
    /// A capture error that ended the input for good (an unreadable file), for the exit status.
    pub(crate) fatal: Mutex<Option<CaptureError>>,
    /// The threads at each end of the ring, woken when the other end moves.
    pub(crate) producer: OnceLock<Thread>,
    pub(crate) consumer: OnceLock<Thread>,
}

impl RingState {
    fn wake(thread: &OnceLock<Thread>) {
        if let Some(t) = thread.get() {
            t.unpark();
        }
    }
}

/// The capture thread's end of the ring.
pub struct RingWriter {
    samples: HeapProd<i16>,
    gaps: HeapProd<Gap>,
    /// Stream position of the next sample (lost samples included).
    pos: u64,
    shared: Arc<RingState>,
    wait: bool,
    /// A loss not yet in the gap ring: consecutive losses merge into it, and it is published
    /// before the next sample that makes it into the ring.
    pending: Option<Gap>,
}

/// The dsp thread's end of the ring.
pub struct RingReader {
    samples: HeapCons<i16>,
    gaps: HeapCons<Gap>,
    pos: u64,
    shared: Arc<RingState>,
}

/// What [`RingReader::read`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// This many samples were copied.
    Samples(usize),
    /// The stream has a gap here; the reader's position has moved past it.
    Gap(Gap),
    /// Nothing available now.
    Empty,
}

/// Gaps the ring can hold before further ones are merged into the count only.
const GAP_CAPACITY: usize = 64;

/// Make a ring of `capacity` samples.
pub fn ring(capacity: usize, shared: Arc<RingState>) -> (RingWriter, RingReader) {
    let (samples_tx, samples_rx) = HeapRb::<i16>::new(capacity.max(1)).split();
    let (gaps_tx, gaps_rx) = HeapRb::<Gap>::new(GAP_CAPACITY).split();
    (
        RingWriter {
            samples: samples_tx,
            gaps: gaps_tx,
            pos: 0,
            shared: shared.clone(),
            wait: false,
            pending: None,
        },
        RingReader {
            samples: samples_rx,
            gaps: gaps_rx,
            pos: 0,
            shared,
        },
    )
}

impl RingWriter {
    /// Push samples. A device source drops what does not fit (an overrun, marked as a gap); a file
    /// source waits for the consumer. Returns false when told to stop while waiting.
    pub(crate) fn push(&mut self, mut samples: &[i16]) -> bool {
        loop {
            // A pending loss is published once a sample can follow it; while 64 losses wait
            // unread, these samples are lost too (the pending gap grows: the timeline stays exact).
            if self.pending.is_some() && !self.samples.is_full() && !self.publish_gap() {
                self.mark_gap(samples.len() as u64);
                return true;
            }
            let n = self.samples.push_slice(samples);
            self.pos += n as u64;
            samples = &samples[n..];
            if n > 0 {
                self.wake_consumer();
            }
            if samples.is_empty() {
                return true;
            }
            if !self.wait {
                self.mark_gap(samples.len() as u64);
                return true;
            }
            if self.shared.stop.load(Ordering::Relaxed)
                || self.shared.consumer_gone.load(Ordering::Relaxed)
            {
                return false;
            }
            self.shared.producer_waiting.store(true, Ordering::SeqCst);
            if self.samples.is_full() {
                thread::park_timeout(Duration::from_millis(50));
            }
            self.shared.producer_waiting.store(false, Ordering::Relaxed);
        }
    }

    /// Record that `len` samples were lost here. Back-to-back losses make one gap.
    pub(crate) fn mark_gap(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        match &mut self.pending {
            // Nothing entered the ring since the pending loss began: this one continues it.
            Some(gap) => gap.len += len,
            None => {
                self.pending = Some(Gap { pos: self.pos, len });
                self.shared.overruns.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.pos += len;
        self.shared.lost_samples.fetch_add(len, Ordering::Relaxed);
    }

    /// Record a discontinuity (a lost device): the open utterance ends here.
    pub(crate) fn mark_break(&mut self) {
        self.publish_gap();
        let _ = self.gaps.try_push(Gap {
            pos: self.pos,
            len: 0,
        });
        self.wake_consumer();
    }

    /// Publish any pending loss (before samples that follow it, or when capture ends). Returns
    /// false when the gap ring is full.
    pub(crate) fn publish_gap(&mut self) -> bool {
        if let Some(gap) = self.pending {
            if self.gaps.try_push(gap).is_err() {
                return false;
            }
            self.pending = None;
            self.wake_consumer();
        }
        true
    }

    fn wake_consumer(&self) {
        RingState::wake(&self.shared.consumer);
    }

    /// The stream position of the next sample.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }
}

impl RingReader {
    /// Copy available samples into `out`, stopping at the next gap.
    pub fn read(&mut self, out: &mut [i16]) -> Chunk {
        let mut limit = out.len();
        if let Some(gap) = self.gaps.first().copied() {
            if gap.pos <= self.pos {
                self.gaps.try_pop();
                self.pos += gap.len;
                return Chunk::Gap(gap);
            }
            limit = limit.min((gap.pos - self.pos) as usize);
        }
        let n = self.samples.pop_slice(&mut out[..limit]);
        if n == 0 {
            return Chunk::Empty;
        }
        self.pos += n as u64;
        // Wake a waiting file reader once half the ring is free, not after every frame.
        if self.shared.producer_waiting.load(Ordering::SeqCst)
            && self.samples.vacant_len() >= self.samples.capacity().get() / 2
        {
            RingState::wake(&self.shared.producer);
        }
        Chunk::Samples(n)
    }

    /// Wait until the producer may have pushed something, or `timeout`.
    pub(crate) fn wait(&self, timeout: Duration) {
        if self.samples.is_empty() && self.gaps.is_empty() {
            thread::park_timeout(timeout);
        }
    }

    /// True once the producer finished and everything it pushed has been read.
    pub(crate) fn is_drained(&self) -> bool {
        self.shared.finished.load(Ordering::Acquire)
            && self.samples.is_empty()
            && self.gaps.is_empty()
    }

    /// Stream position of the next sample read.
    #[cfg(test)]
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn shared(&self) -> &Arc<RingState> {
        &self.shared
    }
}

/// Owns the capture thread. Dropping it stops the thread and joins it (or, for a source blocked in
/// a read that cannot be interrupted, such as stdin, leaves it to end with the process).
pub(crate) struct CaptureHandle {
    shared: Arc<RingState>,
    thread: Option<JoinHandle<()>>,
}

impl CaptureHandle {
    /// Ask the thread to stop after its current period.
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for CaptureHandle {
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            // A period is at most 200 ms; give a blocked read a little more, then let it go.
            for _ in 0..50 {
                if thread.is_finished() {
                    let _ = thread.join();
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Start the capture thread. The source should already be open (so that a bad file is reported
/// before anything starts); a device that fails later is reopened with backoff.
pub(crate) fn spawn(
    mut source: Box<dyn Source>,
    mut ring: RingWriter,
    events: Events,
    mut opened: bool,
) -> std::io::Result<CaptureHandle> {
    let shared = ring.shared.clone();
    ring.wait = source.waits_for_consumer();
    let thread = thread::Builder::new()
        .name("hark-capture".into())
        .spawn(move || {
            let shared = ring.shared.clone();
            // However the thread ends (even by a panic), the dsp thread learns that it did.
            let _end = EndGuard(shared.clone());
            let _ = shared.producer.set(thread::current());
            realtime::promote_current_thread(source.realtime_priority());
            let mut attempt = 0u32;
            'outer: while !shared.stop.load(Ordering::Acquire) {
                if !opened {
                    match source.open() {
                        Ok(()) => {
                            tracing::info!("capturing from {}", source.describe());
                            attempt = 0;
                        }
                        Err(e) => {
                            report(&events, &e, e.is_retryable());
                            shared.started.store(true, Ordering::Release);
                            if !e.is_retryable() {
                                break;
                            }
                            park_unless_stopped(&shared, backoff::RECONNECT.delay(attempt));
                            attempt = attempt.saturating_add(1);
                            continue;
                        }
                    }
                }
                opened = true;
                shared.capturing.store(true, Ordering::Release);
                shared.started.store(true, Ordering::Release);
                // The hot loop: no allocation, lock or log until it ends.
                let mut moved = ring.position();
                let result = loop {
                    if shared.stop.load(Ordering::Relaxed) {
                        break Ok(Flow::Continue);
                    }
                    match source.read_period(&mut ring) {
                        Ok(Flow::Continue) => {}
                        other => break other,
                    }
                    // Progress for the watchdog: a period that brought samples (or a loss). A
                    // device that only times out is as stalled as a pipe that never returns.
                    if ring.position() != moved {
                        moved = ring.position();
                        shared.capture_beats.fetch_add(1, Ordering::Relaxed);
                    }
                };
                match result {
                    Ok(Flow::EndOfInput) => break 'outer,
                    Ok(Flow::Continue) => source.flush(&mut ring),
                    Err(e) => {
                        shared.capturing.store(false, Ordering::Release);
                        report(&events, &e, e.is_retryable());
                        ring.mark_break();
                        opened = false;
                        if !e.is_retryable() {
                            *shared.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            break 'outer;
                        }
                    }
                }
            }
            ring.publish_gap();
        })?;
    Ok(CaptureHandle {
        shared,
        thread: Some(thread),
    })
}

/// Marks the capture thread finished when dropped.
struct EndGuard(Arc<RingState>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.capturing.store(false, Ordering::Release);
        self.0.finished.store(true, Ordering::Release);
        RingState::wake(&self.0.consumer);
    }
}

fn report(events: &Events, e: &CaptureError, retrying: bool) {
    if retrying {
        tracing::warn!("{e}; retrying");
    } else {
        tracing::error!("{e}");
    }
    events.emit(EventKind::Error {
        stage: Stage::Capture,
        code: e.code(),
        message: e.to_string(),
        retrying,
    });
}

/// Wait before reopening a device, in short steps that tell the watchdog this thread is alive: a
/// missing device is reported as degraded, not fixed by restarting hark.
fn park_unless_stopped(shared: &RingState, delay: Duration) {
    const STEP: Duration = Duration::from_millis(100);
    let until = std::time::Instant::now() + delay;
    while !shared.stop.load(Ordering::Acquire) {
        shared.capture_beats.fetch_add(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        if now >= until {
            return;
        }
        thread::park_timeout((until - now).min(STEP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_stops_at_gaps_and_keeps_the_timeline() {
        let shared = Arc::new(RingState::default());
        let (mut w, mut r) = ring(8, shared.clone());
        assert!(w.push(&[1, 2, 3, 4, 5, 6]));
        // Only 2 of these 4 fit: an overrun of 2 samples at position 8.
        assert!(w.push(&[7, 8, 9, 10]));
        let mut buf = [0i16; 16];
        assert_eq!(r.read(&mut buf), Chunk::Samples(8));
        assert_eq!(&buf[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(w.push(&[11]));
        assert_eq!(r.read(&mut buf), Chunk::Gap(Gap { pos: 8, len: 2 }));
        assert_eq!(r.position(), 10);
        assert_eq!(r.read(&mut buf), Chunk::Samples(1));
        assert_eq!(r.position(), 11);
        assert_eq!(shared.overruns.load(Ordering::Relaxed), 1);
        assert_eq!(shared.lost_samples.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn back_to_back_losses_make_one_gap_published_before_later_samples() {
        let shared = Arc::new(RingState::default());
        let (mut w, mut r) = ring(4, shared.clone());
        assert!(w.push(&[1, 2, 3, 4]));
        // The ring stays full for three periods: one loss of 9 samples.
        for _ in 0..3 {
            assert!(w.push(&[9, 9, 9]));
        }
        let mut buf = [0i16; 8];
        assert_eq!(r.read(&mut buf), Chunk::Samples(4));
        assert_eq!(
            r.read(&mut buf),
            Chunk::Empty,
            "not published before the next sample"
        );
        assert!(w.push(&[5]));
        assert_eq!(r.read(&mut buf), Chunk::Gap(Gap { pos: 4, len: 9 }));
        assert_eq!(r.read(&mut buf), Chunk::Samples(1));
        assert_eq!(buf[0], 5);
        assert_eq!(r.position(), 14);
        assert_eq!(shared.overruns.load(Ordering::Relaxed), 1);
        assert_eq!(shared.lost_samples.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn a_full_gap_ring_loses_samples_but_keeps_the_timeline() {
        let shared = Arc::new(RingState::default());
        let (mut w, mut r) = ring(1000, shared);
        for i in 0..GAP_CAPACITY + 6 {
            assert!(w.push(&[i as i16]));
            w.mark_gap(1); // an xrun after every sample
        }
        let mut buf = [0i16; 1000];
        let mut samples = 0;
        let mut lost = 0;
        for _ in 0..2 {
            loop {
                match r.read(&mut buf) {
                    Chunk::Gap(g) => lost += g.len,
                    Chunk::Samples(n) => samples += n as u64,
                    Chunk::Empty => break,
                }
            }
            w.publish_gap();
        }
        assert!(
            samples < (GAP_CAPACITY + 6) as u64,
            "some samples were lost with the gaps"
        );
        assert_eq!(
            samples + lost,
            w.position(),
            "every sample and every loss is accounted for"
        );
        assert_eq!(r.position(), w.position());
    }
}
