//! What every file input shares, whatever its format: the label, the period, the limits a header
//! may declare, `--pace`, and the conversion of a file's frames to stream samples. Apart from
//! `file` (WAV, raw, stdin, and the choice of reader) and `media` (FLAC, MP3, Ogg/Opus), so that
//! neither needs the other for these.

use std::time::{Duration, Instant};

use super::SAMPLE_RATE;

/// The source's name in labels and utterance metadata (`file:PATH`).
pub(crate) const NAME: &str = "file";

/// Frames read per period: 20 ms at the file's rate.
pub(super) const PERIOD_MS: usize = 20;

/// What a file header may declare; beyond this it is broken or hostile, not a recording.
pub(super) const MAX_RATE: u32 = 192_000;
pub(super) const MIN_RATE: u32 = 8_000;
pub(super) const MAX_CHANNELS: u16 = 32;

/// `--pace`: deliver a file at real-time speed, as a microphone would, by sleeping until each
/// period is due (measured from the first period, so the sleeps do not drift).
pub(super) struct Pace {
    rate: u32,
    start: Option<Instant>,
    frames: u64,
}

impl Pace {
    pub(super) fn new(rate: u32) -> Pace {
        Pace {
            rate: rate.max(1),
            start: None,
            frames: 0,
        }
    }

    /// `frames` more frames have been delivered: sleep until they are due.
    pub(super) fn wait(&mut self, frames: usize) {
        let start = *self.start.get_or_insert_with(Instant::now);
        self.frames += frames as u64;
        let due = start + Duration::from_micros(self.frames * 1_000_000 / u64::from(self.rate));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
}

/// `frames` at `rate` in stream samples (16 kHz): what the converter delivers for them.
pub(super) fn to_stream_samples(frames: u64, rate: u32) -> u64 {
    (u128::from(frames) * u128::from(SAMPLE_RATE) / u128::from(rate.max(1))) as u64
}
