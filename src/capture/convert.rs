//! From what a device or file delivers to what the ring holds: one channel picked or all mixed, and
//! any rate resampled to 16 kHz (rubato's FFT resampler, delay removed so the timeline starts at 0).
//! Every buffer is allocated when the converter is made, none in the period loop.

use audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use super::{CaptureError, RingWriter, SAMPLE_RATE};
use crate::config::ChannelSel;

/// Turns interleaved device samples into mono 16 kHz and pushes them into the ring.
///
/// All buffers are allocated in [`Converter::new`]; [`Converter::push`] does not allocate.
pub(crate) struct Converter {
    channels: usize,
    select: ChannelSel,
    mono: Vec<i16>,
    resampler: Option<Resample>,
}

struct Resample {
    fft: Fft<f32>,
    chunk: usize,
    input: Vec<f32>,
    filled: usize,
    output: Vec<f32>,
    out_i16: Vec<i16>,
    /// Output samples still to discard: the resampler's delay, so the timeline starts at 0.
    skip: usize,
    in_total: u64,
    out_total: u64,
    in_rate: u32,
}

impl Converter {
    /// A converter for `channels`-channel audio at `rate`, fed at most `max_frames` frames a call.
    pub(crate) fn new(
        rate: u32,
        channels: usize,
        select: ChannelSel,
        max_frames: usize,
    ) -> Result<Converter, CaptureError> {
        let resampler = if rate == SAMPLE_RATE {
            None
        } else {
            Some(Resample::new(rate)?)
        };
        Ok(Converter {
            channels: channels.max(1),
            select,
            mono: vec![0; max_frames.max(1)],
            resampler,
        })
    }

    /// Convert `interleaved` (whole frames) and push it. Returns false when told to stop.
    pub(crate) fn push(&mut self, interleaved: &[i16], ring: &mut RingWriter) -> bool {
        let frames = (interleaved.len() / self.channels).min(self.mono.len());
        let mono = &mut self.mono[..frames];
        if self.channels == 1 {
            mono.copy_from_slice(&interleaved[..frames]);
        } else {
            let frames_in = interleaved.chunks_exact(self.channels);
            match self.select {
                ChannelSel::Mix => {
                    for (out, frame) in mono.iter_mut().zip(frames_in) {
                        let sum: i32 = frame.iter().map(|&s| i32::from(s)).sum();
                        *out = (sum / self.channels as i32) as i16;
                    }
                }
                ChannelSel::Index(c) => {
                    let c = (c as usize).min(self.channels - 1);
                    for (out, frame) in mono.iter_mut().zip(frames_in) {
                        *out = frame[c];
                    }
                }
            }
        }
        match &mut self.resampler {
            None => ring.push(mono),
            Some(r) => r.push(mono, ring),
        }
    }

    /// At end of input: push what the resampler still holds, so that the output has exactly
    /// `input * 16000 / rate` samples.
    pub(crate) fn flush(&mut self, ring: &mut RingWriter) -> bool {
        match &mut self.resampler {
            None => true,
            Some(r) => r.flush(ring),
        }
    }
}

impl Resample {
    /// Input frames per resampler call. 1/10 s at the input rate keeps the FFT cheap.
    fn new(rate: u32) -> Result<Resample, CaptureError> {
        let chunk = (rate / 10) as usize;
        let fft = Fft::<f32>::new(
            rate as usize,
            SAMPLE_RATE as usize,
            chunk,
            1,
            FixedSync::Input,
        )
        .map_err(|e| CaptureError::Resample {
            from: rate,
            message: e.to_string(),
        })?;
        let out_max = fft.output_frames_max();
        let skip = fft.output_delay();
        Ok(Resample {
            fft,
            chunk,
            input: vec![0.0; chunk],
            filled: 0,
            output: vec![0.0; out_max],
            out_i16: vec![0; out_max],
            skip,
            in_total: 0,
            out_total: 0,
            in_rate: rate,
        })
    }

    fn push(&mut self, mut mono: &[i16], ring: &mut RingWriter) -> bool {
        self.in_total += mono.len() as u64;
        while !mono.is_empty() {
            let n = (self.chunk - self.filled).min(mono.len());
            for (dst, &s) in self.input[self.filled..self.filled + n]
                .iter_mut()
                .zip(&mono[..n])
            {
                *dst = f32::from(s) / 32768.0;
            }
            self.filled += n;
            mono = &mono[n..];
            if self.filled == self.chunk && !self.process(ring, u64::MAX) {
                return false;
            }
        }
        true
    }

    /// Resample one full input chunk and push at most `limit` more output samples.
    fn process(&mut self, ring: &mut RingWriter, limit: u64) -> bool {
        self.filled = 0;
        let input = InterleavedSlice::new(&self.input[..], 1, self.chunk);
        let frames_out = self.output.len();
        let output = InterleavedSlice::new_mut(&mut self.output[..], 1, frames_out);
        let (Ok(input), Ok(mut output)) = (input, output) else {
            return true;
        };
        let Ok((_, produced)) = self.fft.process_into_buffer(&input, &mut output, None) else {
            return true;
        };
        let skip = self.skip.min(produced);
        self.skip -= skip;
        let mut count = produced - skip;
        // In u64: on 32-bit targets `as usize` would keep the low bits of `u64::MAX - out_total`,
        // and capture would go silent once 2^32 samples (74.6 hours) had been resampled.
        let room = usize::try_from(limit.saturating_sub(self.out_total)).unwrap_or(usize::MAX);
        count = count.min(room);
        for (dst, &s) in self.out_i16[..count]
            .iter_mut()
            .zip(&self.output[skip..skip + count])
        {
            *dst = (s * 32768.0).clamp(-32768.0, 32767.0) as i16;
        }
        self.out_total += count as u64;
        ring.push(&self.out_i16[..count])
    }

    fn flush(&mut self, ring: &mut RingWriter) -> bool {
        let expected = self.in_total * u64::from(SAMPLE_RATE) / u64::from(self.in_rate);
        // Zero-padded chunks push the delayed tail out; a bounded number suffices.
        for _ in 0..4 {
            if self.out_total >= expected {
                break;
            }
            self.input[self.filled..].fill(0.0);
            self.filled = self.chunk;
            if !self.process(ring, expected) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Chunk, RingState, ring};
    use std::sync::Arc;

    fn convert_all(rate: u32, channels: usize, sel: ChannelSel, input: &[i16]) -> Vec<i16> {
        let shared = Arc::new(RingState::default());
        let (mut w, mut r) = ring(input.len() + 100_000, shared);
        let mut conv = Converter::new(rate, channels, sel, 1000).unwrap();
        for chunk in input.chunks(333 * channels) {
            assert!(conv.push(chunk, &mut w));
        }
        assert!(conv.flush(&mut w));
        let mut out = vec![0i16; input.len() + 100_000];
        let Chunk::Samples(n) = r.read(&mut out) else {
            panic!("no output")
        };
        out.truncate(n);
        out
    }

    #[test]
    fn picks_or_mixes_channels() {
        let stereo = [100, -100, 200, 0, 300, 100];
        assert_eq!(
            convert_all(16_000, 2, ChannelSel::Index(1), &stereo),
            vec![-100, 0, 100]
        );
        assert_eq!(
            convert_all(16_000, 2, ChannelSel::Mix, &stereo),
            vec![0, 100, 200]
        );
    }

    // See: issue 11 — on 32-bit targets the output limit was truncated to usize, and a resampled
    // stream went silent after 2^32 output samples (74.6 hours of a 48 kHz microphone).
    #[test]
    fn resampling_goes_on_past_2_to_the_32_samples() {
        let shared = Arc::new(RingState::default());
        let (mut w, mut r) = ring(100_000, shared);
        let mut resample = Resample::new(48_000).unwrap();
        resample.skip = 0;
        resample.out_total = u64::from(u32::MAX) - 10;
        assert!(resample.push(&[1000; 48_000], &mut w));
        let mut out = vec![0i16; 100_000];
        let Chunk::Samples(n) = r.read(&mut out) else {
            panic!("no output")
        };
        // About a second's output (the first chunks give a little less; with the bug: 10 samples).
        assert!(n > 15_000, "{n} samples out of 1 s");
        assert_eq!(resample.out_total, u64::from(u32::MAX) - 10 + n as u64);
    }

    #[test]
    fn resampling_keeps_length_and_alignment() {
        // 1 s of a 440 Hz tone with a click at 0.5 s, at 48 kHz.
        let mut input: Vec<i16> = (0..48_000)
            .map(|i| ((i as f32 * 440.0 * std::f32::consts::TAU / 48_000.0).sin() * 8000.0) as i16)
            .collect();
        for s in &mut input[24_000..24_048] {
            *s = 30_000;
        }
        let out = convert_all(48_000, 1, ChannelSel::Index(0), &input);
        assert_eq!(out.len(), 16_000);
        let peak = out
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| s.unsigned_abs())
            .map(|(i, _)| i)
            .unwrap();
        assert!((7_995..=8_025).contains(&peak), "click moved to {peak}");
    }
}
