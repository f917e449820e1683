//! Voice activity: WebRTC VAD decisions per frame, fed to the pure [`segmenter`].
//!
//! The WebRTC VAD holds a raw C pointer and is not `Send`: build it on the thread that uses it.

pub(crate) mod segmenter;

use webrtc_vad::{SampleRate, VadMode};

/// A WebRTC VAD at 16 kHz with the configured aggressiveness (0..=3).
pub struct Vad {
    inner: webrtc_vad::Vad,
}

impl Vad {
    pub fn new(mode: u8) -> Vad {
        let mode = match mode {
            0 => VadMode::Quality,
            1 => VadMode::LowBitrate,
            2 => VadMode::Aggressive,
            _ => VadMode::VeryAggressive,
        };
        Vad {
            inner: webrtc_vad::Vad::new_with_rate_and_mode(SampleRate::Rate16kHz, mode),
        }
    }

    /// Whether a 10, 20 or 30 ms frame holds speech. A frame of another length counts as silence.
    pub fn is_voice(&mut self, frame: &[i16]) -> bool {
        self.inner.is_voice_segment(frame).unwrap_or(false)
    }
}

/// Sum of squares of a frame, for the level guard.
pub fn energy(frame: &[i16]) -> f64 {
    frame.iter().map(|&s| f64::from(s) * f64::from(s)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_not_voice_and_a_voiced_buzz_is() {
        let mut vad = Vad::new(2);
        assert!(!vad.is_voice(&[0i16; 320]));
        // A 150 Hz glottal-like pulse train with harmonics, loud: WebRTC VAD calls this voice.
        let mut voiced = false;
        for k in 0..20 {
            let frame: Vec<i16> = (0..320)
                .map(|i| {
                    let t = (k * 320 + i) as f32 / 16_000.0;
                    let mut s = 0.0;
                    for h in 1..15 {
                        s += (t * 150.0 * h as f32 * std::f32::consts::TAU).sin() / h as f32;
                    }
                    (s * 6000.0) as i16
                })
                .collect();
            voiced |= vad.is_voice(&frame);
        }
        assert!(voiced);
        assert!(!vad.is_voice(&[0i16; 100]), "wrong frame size is silence");
    }
}
