//! Streaming Ogg/Opus (RFC 7845) encoder for one utterance of 16 kHz mono
//! 16-bit PCM.
//!
//! Samples are encoded in 20 ms frames as they arrive and written to `W` in
//! Ogg pages, one page roughly every second of audio, so the file grows while
//! the utterance is being captured and nothing is re-encoded at the end.
//! [`OggOpusWriter::finish`] sets the end-trimming granule position so that a
//! decoder returns exactly the samples that were written. It deliberately does
//! not: resample or accept other rates or channel counts, decode, do chained
//! or multiplexed streams, or recover a file whose writer was dropped without
//! `finish` (such a file has no EOS page). Frame and packet buffers are
//! allocated once, so steady-state writing does not allocate.

use std::io::{self, Write};

use opus::{Application, Bitrate, Channels, Encoder};

use super::ogg::OggPageWriter;

/// Input sample rate (Hz); input is mono.
pub(crate) const SAMPLE_RATE: u32 = 16_000;
/// Samples per 20 ms frame at [`SAMPLE_RATE`].
const FRAME: usize = 320;
/// Ogg/Opus granule positions count 48 kHz samples.
const GRANULE_PER_SAMPLE: u64 = 48_000 / SAMPLE_RATE as u64;
const GRANULE_PER_FRAME: u64 = FRAME as u64 * GRANULE_PER_SAMPLE;
/// Audio packets per page: 50 × 20 ms = 1 s.
const PACKETS_PER_PAGE: u64 = 50;
/// Output buffer for one packet (a 20 ms packet is at most 1275 bytes).
const MAX_PACKET: usize = 4000;

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeSettings {
    /// Target bitrate in bits/s (6000..=510000; libopus clamps or rejects
    /// values outside its range).
    pub bitrate: i32,
    /// Encoder complexity 0..=10 (others are rejected by libopus).
    pub complexity: i32,
}

/// Failure while encoding or writing.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("opus encoder: {0}")]
    Opus(#[from] opus::Error),
    #[error("writing Ogg: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes 16 kHz mono i16 samples as an Ogg/Opus stream to `W`.
pub struct OggOpusWriter<W: Write> {
    ogg: OggPageWriter<W>,
    encoder: Encoder,
    /// Samples of the frame being collected. A full frame is only encoded
    /// once more input arrives (or in `finish`), so `finish` always has a
    /// last packet to put on the EOS page.
    frame: [i16; FRAME],
    filled: usize,
    packet: Box<[u8]>,
    /// Frames encoded so far.
    frames: u64,
    /// Input samples accepted so far.
    samples: u64,
    /// Encoder lookahead in input (16 kHz) samples.
    lookahead: u64,
}

impl<W: Write> OggOpusWriter<W> {
    /// Creates the encoder and writes the OpusHead and OpusTags pages.
    /// `comments` become `KEY=value` user comments; keys should be ASCII
    /// without `=`.
    pub fn new(
        out: W,
        settings: &EncodeSettings,
        vendor: &str,
        comments: &[(&str, &str)],
        serial: u32,
    ) -> Result<Self, EncodeError> {
        let mut encoder = Encoder::new(SAMPLE_RATE, Channels::Mono, Application::Voip)?;
        encoder.set_bitrate(Bitrate::Bits(settings.bitrate))?;
        encoder.set_complexity(settings.complexity)?;
        encoder.set_vbr(true)?;
        let lookahead = u64::try_from(encoder.get_lookahead()?).unwrap_or(0);
        let pre_skip = u16::try_from(lookahead * GRANULE_PER_SAMPLE)
            .map_err(|_| invalid_input("encoder lookahead too large for pre-skip"))?;

        let mut ogg = OggPageWriter::new(out, serial);
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1); // version
        head.push(1); // channel count
        head.extend_from_slice(&pre_skip.to_le_bytes());
        head.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes()); // output gain
        head.push(0); // channel mapping family
        ogg.write_packet(&head, 0, true)?;

        let mut tags = Vec::new();
        tags.extend_from_slice(b"OpusTags");
        push_string(&mut tags, &[vendor])?;
        tags.extend_from_slice(&len_u32(comments.len())?.to_le_bytes());
        for (key, value) in comments {
            push_string(&mut tags, &[key, "=", value])?;
        }
        ogg.write_packet(&tags, 0, true)?;

        Ok(Self {
            ogg,
            encoder,
            frame: [0; FRAME],
            filled: 0,
            packet: vec![0; MAX_PACKET].into_boxed_slice(),
            frames: 0,
            samples: 0,
            lookahead,
        })
    }

    /// Accepts any number of 16 kHz mono samples, encoding and writing every
    /// completed frame.
    pub fn write(&mut self, mut samples: &[i16]) -> Result<(), EncodeError> {
        while !samples.is_empty() {
            if self.filled == FRAME {
                self.encode_and_write()?;
            }
            let n = (FRAME - self.filled).min(samples.len());
            self.frame[self.filled..self.filled + n].copy_from_slice(&samples[..n]);
            self.filled += n;
            self.samples += n as u64;
            samples = &samples[n..];
        }
        Ok(())
    }

    /// Encodes the rest (zero-padded, plus enough silence to flush the
    /// encoder's lookahead), writes the EOS page with the end-trimmed granule
    /// position and returns the writer and the total number of input samples.
    pub fn finish(mut self) -> Result<(W, u64), EncodeError> {
        let total = self.samples;
        let covered = total + self.lookahead;
        loop {
            // The frame being collected is always encoded here, so even an
            // empty utterance gets one packet.
            self.frame[self.filled..].fill(0);
            if (self.frames + 1) * FRAME as u64 >= covered {
                let len = self.encode_frame()?;
                let granule = covered * GRANULE_PER_SAMPLE;
                let out = self.ogg.finish(&self.packet[..len], granule)?;
                return Ok((out, total));
            }
            self.encode_and_write()?;
        }
    }

    /// Encodes the (full) frame buffer into `self.packet`; returns its length.
    fn encode_frame(&mut self) -> Result<usize, EncodeError> {
        let len = self.encoder.encode(&self.frame, &mut self.packet)?;
        self.frames += 1;
        self.filled = 0;
        Ok(len)
    }

    /// Encodes and writes a frame that is not the last one, ending the page
    /// after every [`PACKETS_PER_PAGE`] packets.
    fn encode_and_write(&mut self) -> Result<(), EncodeError> {
        let len = self.encode_frame()?;
        let end_page = self.frames.is_multiple_of(PACKETS_PER_PAGE);
        let granule = self.frames * GRANULE_PER_FRAME;
        let packet = &self.packet[..len];
        self.ogg.write_packet(packet, granule, end_page)?;
        Ok(())
    }
}

fn invalid_input(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn len_u32(len: usize) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| invalid_input("OpusTags field longer than 4 GiB"))
}

/// Appends a length-prefixed string made of `parts`.
fn push_string(buf: &mut Vec<u8>, parts: &[&str]) -> io::Result<()> {
    let len = parts.iter().map(|p| p.len()).sum();
    buf.extend_from_slice(&len_u32(len)?.to_le_bytes());
    for p in parts {
        buf.extend_from_slice(p.as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ogg::tests::parse;
    use std::cell::RefCell;
    use std::process::Command;
    use std::rc::Rc;

    const SETTINGS: EncodeSettings = EncodeSettings {
        bitrate: 32_000,
        complexity: 10,
    };

    /// 440 Hz + 1250 Hz tones with a little deterministic noise.
    fn signal(n: usize) -> Vec<i16> {
        let mut seed = 0x1234_5678u32;
        (0..n)
            .map(|i| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = f64::from((seed >> 16) as u16 as i16) / 32768.0 * 300.0;
                let t = i as f64 / f64::from(SAMPLE_RATE);
                let tone = 6000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()
                    + 2000.0 * (2.0 * std::f64::consts::PI * 1250.0 * t).sin();
                (tone + noise) as i16
            })
            .collect()
    }

    /// Encodes `input`, feeding it in chunks of `chunk` samples.
    fn encode(input: &[i16], chunk: usize) -> Vec<u8> {
        let comments = [("TITLE", "utterance"), ("ENCODER", "hark")];
        let mut w = OggOpusWriter::new(Vec::new(), &SETTINGS, "hark test", &comments, 42).unwrap();
        for c in input.chunks(chunk.max(1)) {
            w.write(c).unwrap();
        }
        assert_eq!(w.samples, input.len() as u64);
        let (bytes, total) = w.finish().unwrap();
        assert_eq!(total, input.len() as u64);
        bytes
    }

    struct Decoded {
        tags: Vec<u8>,
        pcm: Vec<i16>,
        pre_skip: u64,
        audio_packets: usize,
        pages: Vec<crate::codec::ogg::tests::Page>,
    }

    /// Parses and checks the stream, decodes at 16 kHz, drops the pre-skip
    /// and trims to the final granule position.
    fn decode(bytes: &[u8]) -> Decoded {
        let (pages, packets) = parse(bytes);
        let head = &packets[0].0;
        assert_eq!(head.len(), 19);
        assert_eq!(&head[..8], b"OpusHead");
        assert_eq!(head[8..10], [1, 1]);
        let pre_skip = u64::from(u16::from_le_bytes([head[10], head[11]]));
        assert_eq!(u32::from_le_bytes(head[12..16].try_into().unwrap()), 16_000);
        assert_eq!(head[16..19], [0, 0, 0]);
        assert_eq!((pages[0].lacing.len(), pages[0].granule), (1, 0));
        assert_eq!(packets[1].1, 1, "OpusTags ends page 1");
        assert_eq!(pages[1].granule, 0);

        let mut decoder = opus::Decoder::new(SAMPLE_RATE, Channels::Mono).unwrap();
        let mut pcm = Vec::new();
        let mut buf = [0i16; 5760];
        for (k, (packet, page)) in packets[2..].iter().enumerate() {
            assert!(*page >= 2, "audio starts on its own page");
            let n = decoder.decode(packet, &mut buf, false).unwrap();
            assert_eq!(n, FRAME);
            pcm.extend_from_slice(&buf[..n]);
            let last_on_page = packets.get(k + 3).is_none_or(|(_, p)| p != page);
            if last_on_page && *page != pages.len() - 1 {
                assert_eq!(pages[*page].granule, (k as u64 + 1) * GRANULE_PER_FRAME);
            }
        }
        let final_granule = pages[pages.len() - 1].granule;
        assert!(final_granule >= pre_skip);
        let end = ((final_granule - pre_skip) / 3) as usize;
        let start = (pre_skip / 3) as usize;
        assert!(
            start + end <= pcm.len(),
            "final granule beyond the decoded audio"
        );
        Decoded {
            tags: packets[1].0.clone(),
            pcm: pcm[start..start + end].to_vec(),
            pre_skip,
            audio_packets: packets.len() - 2,
            pages,
        }
    }

    /// Signal-to-noise ratio in dB of `decoded` against `input` shifted by `lag`.
    fn snr_db(input: &[i16], decoded: &[i16], lag: isize) -> f64 {
        let (mut sig, mut err) = (0.0f64, 0.0f64);
        for (i, &d) in decoded.iter().enumerate().skip(400) {
            let Some(&x) = input.get((i as isize + lag) as usize) else {
                continue;
            };
            sig += f64::from(x).powi(2);
            err += (f64::from(x) - f64::from(d)).powi(2);
        }
        10.0 * (sig / err.max(1.0)).log10()
    }

    #[test]
    fn round_trip_1234_ms() {
        let input = signal(16 * 1234);
        let bytes = encode(&input, 137);
        let d = decode(&bytes);
        let mut tags = b"OpusTags".to_vec();
        let strings = ["hark test", "TITLE=utterance", "ENCODER=hark"];
        for (i, s) in strings.into_iter().enumerate() {
            tags.extend_from_slice(&(s.len() as u32).to_le_bytes());
            tags.extend_from_slice(s.as_bytes());
            if i == 0 {
                tags.extend_from_slice(&2u32.to_le_bytes());
            }
        }
        assert_eq!(d.tags, tags);
        assert_eq!(d.pre_skip % 3, 0);
        assert_eq!(d.pcm.len(), input.len());
        // SILK's resampling delays low tones by a fraction of a sample, so
        // lag 0 must beat every lag off by more than one sample.
        let snr = snr_db(&input, &d.pcm, 0);
        assert!(snr > 10.0, "SNR {snr:.1} dB");
        for lag in [-4isize, -3, -2, 2, 3, 4] {
            let other = snr_db(&input, &d.pcm, lag);
            assert!(
                snr > other + 3.0,
                "lag 0: {snr:.1} dB, lag {lag}: {other:.1} dB"
            );
        }
        let energy = |s: &[i16]| s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>();
        let ratio = energy(&d.pcm) / energy(&input);
        assert!((0.7..1.3).contains(&ratio), "energy ratio {ratio}");
    }

    #[test]
    fn pre_skip_aligns_exactly_on_broadband_signal() {
        let mut seed = 7u32;
        let input: Vec<i16> = (0..16 * 1234)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 16) as u16 as i16 / 4
            })
            .collect();
        let settings = EncodeSettings {
            bitrate: 64_000,
            complexity: 10,
        };
        let mut w = OggOpusWriter::new(Vec::new(), &settings, "v", &[], 1).unwrap();
        w.write(&input).unwrap();
        let d = decode(&w.finish().unwrap().0);
        assert_eq!(d.pcm.len(), input.len());
        let snr = snr_db(&input, &d.pcm, 0);
        assert!(snr > 8.0, "SNR {snr:.1} dB");
        for lag in [-4isize, -3, -2, -1, 1, 2, 3, 4] {
            let other = snr_db(&input, &d.pcm, lag);
            assert!(
                snr > other + 6.0,
                "lag 0: {snr:.1} dB, lag {lag}: {other:.1} dB"
            );
        }
    }

    #[test]
    fn odd_lengths_and_empty() {
        for n in [0usize, 1, 215, 216, 319, 320, 321, 640, 16_007] {
            let input = signal(n);
            for chunk in [1usize, 320, 1000] {
                let d = decode(&encode(&input, chunk));
                assert_eq!(d.pcm.len(), n, "n = {n}, chunk = {chunk}");
                let lookahead = d.pre_skip / 3;
                let frames = (n as u64 + lookahead).div_ceil(FRAME as u64).max(1);
                assert_eq!(d.audio_packets as u64, frames, "n = {n}");
                let last = d.pages.last().unwrap();
                assert_eq!(last.granule, d.pre_skip + 3 * n as u64);
            }
        }
    }

    #[test]
    fn long_input_pages_every_second() {
        let input = signal(16_000 * 60 + 123);
        let d = decode(&encode(&input, 160));
        assert_eq!(d.pcm.len(), input.len());
        let audio_pages = &d.pages[2..];
        let frames = d.audio_packets as u64;
        assert_eq!(audio_pages.len() as u64, frames.div_ceil(PACKETS_PER_PAGE));
        for (i, page) in audio_pages[..audio_pages.len() - 1].iter().enumerate() {
            assert_eq!(page.lacing.len() as u64, PACKETS_PER_PAGE);
            assert_eq!(
                page.granule,
                (i as u64 + 1) * PACKETS_PER_PAGE * GRANULE_PER_FRAME
            );
        }
        assert!(snr_db(&input, &d.pcm, 0) > 10.0);
    }

    /// Shares what reached it (bytes, flush count) with the test.
    #[derive(Clone, Default)]
    struct Probe(Rc<RefCell<(Vec<u8>, usize)>>);

    impl Write for Probe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.borrow_mut().0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.borrow_mut().1 += 1;
            Ok(())
        }
    }

    #[test]
    fn pages_reach_writer_while_encoding() {
        let probe = Probe::default();
        let mut w = OggOpusWriter::new(probe.clone(), &SETTINGS, "v", &[], 1).unwrap();
        let headers = probe.0.borrow().0.len();
        assert_eq!(probe.0.borrow().1, 2, "OpusHead and OpusTags pages flushed");
        w.write(&signal(16_000 * 3 / 2)).unwrap();
        assert!(
            probe.0.borrow().0.len() > headers + 1000,
            "a page of audio after 1.5 s"
        );
        assert_eq!(probe.0.borrow().1, 3);
        let (_, total) = w.finish().unwrap();
        assert_eq!(total, 24_000);
        assert_eq!(probe.0.borrow().1, 4, "EOS page flushed");
        assert_eq!(decode(&probe.0.borrow().0).pcm.len(), 24_000);
    }

    #[test]
    fn bad_settings_are_rejected() {
        let bad = EncodeSettings {
            bitrate: 24_000,
            complexity: 11,
        };
        let err = OggOpusWriter::new(Vec::new(), &bad, "v", &[], 1)
            .err()
            .unwrap();
        assert!(matches!(err, EncodeError::Opus(_)), "{err}");
    }

    fn need(tool: &str) {
        let found = Command::new(tool).arg("--help").output().is_ok();
        assert!(
            found,
            "`{tool}` not found: install opus-tools (apt-get install opus-tools)"
        );
    }

    /// Number of sample frames in a 16-bit mono WAV file's data chunk.
    fn wav_samples(wav: &[u8]) -> usize {
        assert_eq!((&wav[..4], &wav[8..12]), (&b"RIFF"[..], &b"WAVE"[..]));
        let mut pos = 12;
        while pos + 8 <= wav.len() {
            let size = u32::from_le_bytes(wav[pos + 4..pos + 8].try_into().unwrap()) as usize;
            if &wav[pos..pos + 4] == b"fmt " {
                let channels = u16::from_le_bytes([wav[pos + 10], wav[pos + 11]]);
                let rate = u32::from_le_bytes(wav[pos + 12..pos + 16].try_into().unwrap());
                let bits = u16::from_le_bytes([wav[pos + 22], wav[pos + 23]]);
                assert_eq!((channels, rate, bits), (1, 16_000, 16));
            }
            if &wav[pos..pos + 4] == b"data" {
                return size / 2;
            }
            pos += 8 + size + (size & 1);
        }
        panic!("no data chunk");
    }

    #[test]
    fn opus_tools_accept_the_file() {
        need("opusinfo");
        need("opusdec");
        let dir = tempfile::tempdir().unwrap();
        for n in [0usize, 1, 16 * 1234, 16_000 * 5 + 77] {
            let path = dir.path().join(format!("u{n}.opus"));
            let file = io::BufWriter::new(std::fs::File::create(&path).unwrap());
            let mut w = OggOpusWriter::new(file, &SETTINGS, "hark", &[("K", "v")], 9).unwrap();
            w.write(&signal(n)).unwrap();
            let (file, _) = w.finish().unwrap();
            drop(file.into_inner().unwrap());

            let info = Command::new("opusinfo").arg(&path).output().unwrap();
            let text =
                String::from_utf8_lossy(&info.stdout) + String::from_utf8_lossy(&info.stderr);
            assert!(info.status.success(), "opusinfo failed:\n{text}");
            let bad: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARNING") || l.contains("ERROR"))
                .collect();
            assert!(bad.is_empty(), "opusinfo on {n} samples:\n{text}");

            let wav = dir.path().join(format!("u{n}.wav"));
            let dec = Command::new("opusdec")
                .args(["--quiet", "--rate", "16000"])
                .arg(&path)
                .arg(&wav)
                .output()
                .unwrap();
            assert!(
                dec.status.success(),
                "opusdec: {}",
                String::from_utf8_lossy(&dec.stderr)
            );
            assert_eq!(
                wav_samples(&std::fs::read(&wav).unwrap()),
                n,
                "opusdec sample count"
            );
        }
    }
}
