//! Compressed input files: FLAC and MP3 decoded with symphonia, Ogg/Opus with hark's reader.
//!
//! [`MediaSource`] is the file source for these formats. It feeds interleaved i16 at the file's own
//! rate and channel count into the same [`Converter`] as WAV input, one 20 ms period at a time, so
//! channel selection, resampling and the exact timeline are the same as for WAV.
//!
//! - FLAC and MP3 are probed and demuxed by symphonia and decoded packet by packet as the pipeline
//!   takes them; the period loop allocates only inside symphonia (each packet's buffer). MP3's
//!   encoder delay and padding (from the LAME/Xing header) are trimmed by symphonia's gapless mode,
//!   so the timeline starts at the recording's true first sample. A packet that fails to decode,
//!   and a FLAC frame the demuxer skipped as damaged (seen as a hole in the timestamps), become
//!   silence of their length, so later speech keeps its time; the first is warned about, the rest
//!   counted. Too many bad packets in a row, or a change of rate or channel count mid-stream, is
//!   an error naming the file rather than a mistimed stream, and so is a FLAC file that ends
//!   before the frame count in its header (after its audio, like a truncated WAV).
//! - Ogg/Opus is read page by page and decoded packet by packet as the pipeline takes it, by
//!   [`OggOpusReader`], which yields 16 kHz mono (so the converter does not resample, and
//!   `capture.channel` can only be 0 or mix): memory does not grow with the file's length, and the
//!   period loop allocates only inside the `ogg` crate (each page's buffers and packet). Its
//!   headers and first audio page are read when the file is opened, so a file that is not Ogg/Opus
//!   (Vorbis, FLAC in Ogg) fails then with that reader's error; damage further in (a bad or missing
//!   page, a cut) ends the input with an error after the audio before it. The length comes from the
//!   last page's granule position: read from the end of a regular file, or from a pipe whose whole
//!   content fits the first 64 KB, read before decoding starts (a longer pipe has no known length).
//!
//! Deliberately not here: seeking, tracks after the first audio track, chained streams, other
//! codecs (Vorbis, AAC, ...), recovering an MP3 frame lost in damaged bytes (its time is lost:
//! MPEG audio timestamps only count the frames found), and metadata: tags and cover art are
//! skipped, never reported.

mod flac_mp3;

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::io::ReadOnlySource;

use super::input::{NAME, PERIOD_MS, Pace, to_stream_samples};
use super::{CaptureError, Converter, Flow, RingWriter, SAMPLE_RATE, Source};
use crate::codec::decode::{DecodeError, MAX_PACKET_SAMPLES, OggOpusReader};
use crate::config::ChannelSel;
use flac_mp3::{SymphoniaDecoder, stream_error};

/// The compressed formats [`MediaSource`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MediaKind {
    Flac,
    Mp3,
    OggOpus,
}

impl fmt::Display for MediaKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MediaKind::Flac => "FLAC",
            MediaKind::Mp3 => "MP3",
            MediaKind::OggOpus => "Ogg/Opus",
        })
    }
}

/// Why a FLAC, MP3 or Ogg/Opus file cannot be used (inside [`CaptureError::Media`]).
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// symphonia cannot probe, demux or decode the FLAC or MP3 file.
    #[error(transparent)]
    Decode(#[from] SymphoniaError),
    /// hark's Ogg/Opus decoder rejects the file (an Ogg file that is not Opus among others).
    #[error(transparent)]
    OggOpus(#[from] DecodeError),
    /// The file decodes, but not into audio hark can use as it is.
    #[error("{0}")]
    Unusable(String),
}

/// Undecodable packets in a row that end the input with an error: past this the file is not
/// damaged here and there but unreadable (or an MP3 changing its rate, which symphonia reports
/// as undecodable packets). 100 MP3 packets are 2.6 s at 44.1 kHz.
const MAX_BAD_RUN: u32 = 100;

/// The largest packet a decoder may declare (FLAC's limit); a bound on the pending buffer.
const MAX_PACKET_FRAMES: u64 = 65_535;

/// The end of a regular Ogg/Opus file read for its length: two of the largest pages (64 KB
/// each), so that a file cut inside its last page still shows the one before.
const TAIL_BYTES: u64 = 128 << 10;

/// A piped Ogg/Opus input is read this far before decoding starts; if it ends within, its length
/// is known. At most a few seconds of a live stream at speech bitrates (24-64 kbit/s).
const READ_AHEAD: u64 = 64 << 10;

/// An Ogg/Opus input after its first bytes: buffered, the sniffed bytes put back for a pipe.
type OggInput = Box<dyn Read + Send>;

/// Reads a FLAC, MP3 or Ogg/Opus file into the ring.
pub(crate) struct MediaSource {
    label: String,
    path: String,
    kind: MediaKind,
    /// The demuxer and decoder.
    decoder: Demux,
    rate: u32,
    channels: usize,
    converter: Converter,
    /// One period of interleaved frames: what each `read_period` pushes.
    buf: Vec<i16>,
    /// Decoded interleaved samples (whole frames), served from `taken` on.
    pending: Vec<i16>,
    taken: usize,
    /// Frames of silence to serve before `pending`: in place of lost or undecodable packets.
    silence: u64,
    /// Frames of silence at most put in place of a packet that fails to decode.
    max_packet_frames: u64,
    /// Frames the header declares (delay and padding excluded), when it does.
    declared_frames: Option<u64>,
    /// Frames delivered so far (silence included).
    delivered: u64,
    pace: Option<Pace>,
    /// The input's length in stream samples (16 kHz), when known.
    duration: Option<u64>,
    /// Packets that failed to decode or were lost, and how many of the last ones in a row failed.
    skipped: u64,
    bad_run: u32,
    ended: bool,
    /// An error met after some samples of a period were gathered: those are pushed first.
    failed: Option<CaptureError>,
}

/// Where the samples come from.
enum Demux {
    /// FLAC or MP3: symphonia.
    Symphonia(SymphoniaDecoder),
    /// Ogg/Opus at 16 kHz mono.
    Ogg(Box<OggOpusReader<OggInput>>),
}

/// A demuxer and decoder just opened, and what it says of the stream.
struct Opened {
    demux: Demux,
    rate: u32,
    channels: usize,
    /// Frames in the stream, when its header or last page says.
    frames: Option<u64>,
    /// The decoded-packet buffer, sized for the largest packet.
    pending: Vec<i16>,
    max_packet_frames: u64,
}

impl Opened {
    /// Open `file` (whose first bytes `magic` are already read) as `kind`.
    fn new(
        path: &Path,
        kind: MediaKind,
        file: File,
        magic: Vec<u8>,
    ) -> Result<Opened, CaptureError> {
        let shown = path.display().to_string();
        let media_err = |source: MediaError| CaptureError::Media {
            path: shown.clone(),
            source,
        };
        let input_err = |source| CaptureError::Input {
            path: shown.clone(),
            source,
        };
        let regular = file.metadata().map_err(input_err)?.is_file();
        if magic.is_empty() {
            return Err(media_err(MediaError::Unusable("the file is empty".into())));
        }
        Ok(match kind {
            MediaKind::OggOpus => {
                let (input, tail) = ogg_input(file, magic, regular).map_err(input_err)?;
                let reader = OggOpusReader::new(input).map_err(|e| ogg_error(&shown, e))?;
                let frames = tail.and_then(|tail| reader.length_from_tail(&tail));
                let pending = Vec::with_capacity(MAX_PACKET_SAMPLES);
                Opened {
                    demux: Demux::Ogg(Box::new(reader)),
                    rate: SAMPLE_RATE,
                    channels: 1,
                    frames,
                    pending,
                    max_packet_frames: 0,
                }
            }
            MediaKind::Flac | MediaKind::Mp3 => {
                let source: Box<dyn symphonia::core::io::MediaSource> = if regular {
                    let mut file = file;
                    file.seek(SeekFrom::Start(0)).map_err(input_err)?;
                    Box::new(file)
                } else {
                    Box::new(ReadOnlySource::new(Cursor::new(magic).chain(file)))
                };
                let (decoder, info) =
                    SymphoniaDecoder::open(source, path, kind).map_err(|e| match e {
                        MediaError::Decode(SymphoniaError::IoError(e))
                            if e.kind() != io::ErrorKind::UnexpectedEof =>
                        {
                            input_err(e)
                        }
                        e => media_err(e),
                    })?;
                let max = info.max_packet_frames.clamp(1, MAX_PACKET_FRAMES);
                let pending = Vec::with_capacity(max as usize * info.channels);
                Opened {
                    demux: Demux::Symphonia(decoder),
                    rate: info.rate,
                    channels: info.channels,
                    frames: info.frames,
                    pending,
                    max_packet_frames: max,
                }
            }
        })
    }
}

impl MediaSource {
    /// Open `path` as `kind`: `file` is it opened, with its first bytes `magic` already read
    /// (put back in front when the file is a pipe; a regular file is rewound).
    pub(super) fn open(
        path: &Path,
        kind: MediaKind,
        file: File,
        magic: Vec<u8>,
        channel: ChannelSel,
        pace: bool,
    ) -> Result<MediaSource, CaptureError> {
        let shown = path.display().to_string();
        let Opened {
            demux: decoder,
            rate,
            channels,
            frames,
            pending,
            max_packet_frames,
        } = Opened::new(path, kind, file, magic)?;
        if let ChannelSel::Index(c) = channel
            && c as usize >= channels
        {
            return Err(CaptureError::Channel {
                path: shown,
                channel: c,
                channels: channels as u16,
            });
        }
        let period = (rate as usize * PERIOD_MS / 1000).max(1);
        Ok(MediaSource {
            label: format!("{NAME}:{shown}"),
            path: shown,
            kind,
            decoder,
            rate,
            channels,
            converter: Converter::new(rate, channels, channel, period)?,
            buf: vec![0; period * channels],
            pending,
            taken: 0,
            silence: 0,
            max_packet_frames,
            declared_frames: frames,
            delivered: 0,
            pace: pace.then(|| Pace::new(rate)),
            duration: frames.map(|f| to_stream_samples(f, rate)),
            skipped: 0,
            bad_run: 0,
            ended: false,
            failed: None,
        })
    }

    /// Fill `buf` with up to one period of whole frames, decoding packets as needed; returns the
    /// samples gathered (0 at end of input).
    fn fill(&mut self) -> Result<usize, CaptureError> {
        let mut n = 0;
        while n < self.buf.len() {
            if self.silence > 0 {
                let silence = usize::try_from(self.silence).unwrap_or(usize::MAX);
                let frames = ((self.buf.len() - n) / self.channels).min(silence);
                let k = frames * self.channels;
                self.buf[n..n + k].fill(0);
                n += k;
                self.silence -= frames as u64;
                continue;
            }
            if self.taken == self.pending.len() {
                if self.ended {
                    break;
                }
                match self.decode_next() {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.ended = true;
                        break;
                    }
                    // What was gathered goes out first; the error ends the input next time.
                    Err(e) if n > 0 => {
                        self.failed = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            let k = (self.buf.len() - n).min(self.pending.len() - self.taken);
            self.buf[n..n + k].copy_from_slice(&self.pending[self.taken..self.taken + k]);
            n += k;
            self.taken += k;
        }
        Ok(n)
    }

    /// Count a lost or undecodable packet; warn about the first only (this runs in the period
    /// loop, which does not log; the arguments are only formatted for that one warning).
    fn lost_packet(&mut self, why: fmt::Arguments<'_>) {
        self.skipped += 1;
        if self.skipped == 1 {
            tracing::warn!(
                "{}: {why}; replaced by silence of its length (any more are only counted)",
                self.path
            );
        }
    }

    /// Decode the next packet of the track into `pending` (and any silence that stands for lost
    /// packets before it into `silence`). Returns false at the end of input.
    fn decode_next(&mut self) -> Result<bool, CaptureError> {
        let dec = match &mut self.decoder {
            Demux::Symphonia(dec) => dec,
            Demux::Ogg(reader) => {
                self.pending.clear();
                self.taken = 0;
                return reader
                    .read(&mut self.pending)
                    .map_err(|e| ogg_error(&self.path, e));
            }
        };
        let path = self.path.as_str();
        let unusable = |why: String| CaptureError::Media {
            path: path.to_owned(),
            source: MediaError::Unusable(why),
        };
        let Some(packet) = dec.next_packet(path)? else {
            return Ok(false);
        };
        let gap = dec.gap(&packet, self.rate).map_err(unusable)?;
        let decoded = match dec.decoder.decode(&packet) {
            Ok(audio) => {
                let (rate, channels) = (audio.spec().rate(), audio.spec().channels().count());
                if (rate, channels) != (self.rate, self.channels) {
                    return Err(unusable(format!(
                        "the audio changes from {} Hz, {} ch to {rate} Hz, {channels} ch \
                         mid-stream",
                        self.rate, self.channels
                    )));
                }
                self.bad_run = 0;
                audio.copy_to_vec_interleaved(&mut self.pending);
                self.taken = 0;
                Ok(())
            }
            // The packet is damaged: its data ended early or does not parse.
            Err(SymphoniaError::DecodeError(why)) => Err(Damage::Data(why)),
            Err(SymphoniaError::IoError(e)) => Err(Damage::Io(e)),
            Err(e) => return Err(stream_error(path, e)),
        };
        let frames_timebase = dec.frames_timebase;
        if gap > 0 {
            self.silence += gap;
            self.lost_packet(format_args!(
                "{gap} frames are missing (damaged data skipped)"
            ));
        }
        if let Err(why) = decoded {
            self.bad_run += 1;
            if self.bad_run > MAX_BAD_RUN {
                return Err(CaptureError::Media {
                    path: self.path.clone(),
                    source: MediaError::Unusable(format!(
                        "{} packets in a row cannot be decoded (the last: {why})",
                        self.bad_run
                    )),
                });
            }
            self.pending.clear();
            self.taken = 0;
            if frames_timebase {
                self.silence += packet.dur.get().min(self.max_packet_frames);
            }
            self.lost_packet(format_args!("a packet cannot be decoded ({why})"));
        }
        Ok(true)
    }

    /// At the end of input: a FLAC file that delivered fewer frames than its header declares was
    /// cut short or damaged at its end. (An MP3's length is an estimate unless a Xing header
    /// gives it, and a stream may be longer than its header says, so only FLAC is held to it.)
    fn check_length(&self) -> Result<(), CaptureError> {
        match self.declared_frames {
            Some(declared) if self.kind == MediaKind::Flac && self.delivered < declared => {
                Err(CaptureError::Media {
                    path: self.path.clone(),
                    source: MediaError::Unusable(format!(
                        "ends after {} of the {declared} frames its header declares (truncated \
                         or damaged)",
                        self.delivered
                    )),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Why a packet could not be decoded (kept unformatted: formatting allocates).
enum Damage {
    Data(&'static str),
    Io(io::Error),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Data(why) => f.write_str(why),
            Damage::Io(e) => e.fmt(f),
        }
    }
}

impl Source for MediaSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        self.label.clone()
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        // Opened (and its header read) when made; a file cannot be reopened meaningfully.
        Ok(())
    }

    fn read_period(&mut self, ring: &mut RingWriter) -> Result<Flow, CaptureError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let n = self.fill()?;
        if n == 0 {
            if self.skipped > 1 {
                tracing::warn!(
                    "{}: {} packets were lost or could not be decoded; silence stands in for them",
                    self.path,
                    self.skipped
                );
            }
            self.converter.flush(ring);
            self.check_length()?;
            return Ok(Flow::EndOfInput);
        }
        if !self.converter.push(&self.buf[..n], ring) {
            return Ok(Flow::Continue);
        }
        self.delivered += (n / self.channels) as u64;
        if let Some(pace) = &mut self.pace {
            pace.wait(n / self.channels);
        }
        Ok(Flow::Continue)
    }

    fn waits_for_consumer(&self) -> bool {
        true
    }

    fn flush(&mut self, ring: &mut RingWriter) {
        self.converter.flush(ring);
    }

    fn input_format(&self) -> Option<(u32, usize)> {
        Some((self.rate, self.channels))
    }

    fn duration_samples(&self) -> Option<u64> {
        self.duration
    }
}

/// Ogg/Opus input and, when it comes cheap, its end (for the length, which only the last page's
/// granule position tells): a regular file's last [`TAIL_BYTES`], read before it is rewound; a
/// pipe's whole content if it ends within [`READ_AHEAD`] bytes (`magic` included).
fn ogg_input(
    mut file: File,
    magic: Vec<u8>,
    regular: bool,
) -> io::Result<(OggInput, Option<Vec<u8>>)> {
    if regular {
        let len = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut tail = Vec::new();
        (&mut file).take(TAIL_BYTES).read_to_end(&mut tail)?;
        file.seek(SeekFrom::Start(0))?;
        return Ok((Box::new(BufReader::new(file)), Some(tail)));
    }
    let mut head = magic;
    let wanted = READ_AHEAD.saturating_sub(head.len() as u64);
    let got = (&mut file).take(wanted).read_to_end(&mut head)?;
    let whole = (got as u64) < wanted;
    let tail = whole.then(|| head.clone());
    let input = BufReader::new(Cursor::new(head).chain(file));
    Ok((Box::new(input), tail))
}

/// An Ogg/Opus reader's error, for the file at `path`: a failed read is the input's, anything
/// else the file's.
fn ogg_error(path: &str, e: DecodeError) -> CaptureError {
    match e {
        DecodeError::Io(source) => CaptureError::Input {
            path: path.to_owned(),
            source,
        },
        e => CaptureError::Media {
            path: path.to_owned(),
            source: e.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;
    use crate::capture::{Chunk, RingState, open_input, ring};
    use crate::codec::{EncodeSettings, OggOpusWriter};

    /// A FLAC file with verbatim (uncompressed) subframes of 16-bit samples, `block` frames each:
    /// small to write, and exact. `declared` is the frame count written into STREAMINFO.
    fn flac(
        interleaved: &[i16],
        rate: u32,
        channels: usize,
        block: usize,
        declared: u64,
    ) -> Vec<u8> {
        let mut out = b"fLaC".to_vec();
        // STREAMINFO, the last metadata block: 34 bytes.
        out.extend([0x80, 0, 0, 34]);
        out.extend((block as u16).to_be_bytes());
        out.extend((block as u16).to_be_bytes());
        out.extend([0; 6]); // frame sizes unknown
        let packed = (u64::from(rate) << 44)
            | ((channels as u64 - 1) << 41)
            | (15u64 << 36)
            | (declared & 0xF_FFFF_FFFF);
        out.extend(packed.to_be_bytes());
        out.extend([0; 16]); // no MD5
        for (number, chunk) in interleaved.chunks(block * channels).enumerate() {
            let frames = chunk.len() / channels;
            let start = out.len();
            // Sync, fixed blocking; 16-bit block size at the end of the header; rate from
            // STREAMINFO; independent channels; 16 bits per sample.
            out.extend([0xFF, 0xF8, 0x70, (((channels - 1) as u8) << 4) | 0x08]);
            out.extend(utf8_number(number as u32));
            out.extend(((frames - 1) as u16).to_be_bytes());
            let crc8 = out[start..].iter().fold(0u8, |crc, &b| {
                (0..8).fold(crc ^ b, |c, _| {
                    if c & 0x80 != 0 {
                        (c << 1) ^ 0x07
                    } else {
                        c << 1
                    }
                })
            });
            out.push(crc8);
            for c in 0..channels {
                out.push(0x02); // verbatim subframe, no wasted bits
                for f in 0..frames {
                    out.extend(chunk[f * channels + c].to_be_bytes());
                }
            }
            let crc16 = out[start..].iter().fold(0u16, |crc, &b| {
                (0..8).fold(crc ^ (u16::from(b) << 8), |c, _| {
                    if c & 0x8000 != 0 {
                        (c << 1) ^ 0x8005
                    } else {
                        c << 1
                    }
                })
            });
            out.extend(crc16.to_be_bytes());
        }
        out
    }

    /// FLAC's UTF-8-like coding of a frame number (up to 2^16 here).
    fn utf8_number(n: u32) -> Vec<u8> {
        match n {
            0..=0x7F => vec![n as u8],
            0x80..=0x7FF => vec![0xC0 | (n >> 6) as u8, 0x80 | (n & 0x3F) as u8],
            _ => vec![
                0xE0 | (n >> 12) as u8,
                0x80 | ((n >> 6) & 0x3F) as u8,
                0x80 | (n & 0x3F) as u8,
            ],
        }
    }

    /// Deterministic, full-band test signal (a linear congruential generator).
    fn signal(len: usize, seed: u32) -> Vec<i16> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 16) as i16 / 4
            })
            .collect()
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Read a source to its end (or first error) through a ring: the 16 kHz samples it delivered.
    fn read_all(source: &mut dyn Source) -> (Vec<i16>, Result<(), CaptureError>) {
        let (mut w, mut r) = ring(4_000_000, Arc::new(RingState::default()));
        let result = loop {
            match source.read_period(&mut w) {
                Ok(Flow::Continue) => {}
                Ok(Flow::EndOfInput) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let mut out = vec![0i16; 4_000_000];
        let mut n = 0;
        while let Chunk::Samples(k) = r.read(&mut out[n..]) {
            n += k;
        }
        out.truncate(n);
        (out, result)
    }

    #[test]
    fn flac_at_16k_mono_is_delivered_sample_for_sample() {
        let dir = tempfile::tempdir().unwrap();
        let input = signal(40_000, 1);
        let path = write(&dir, "a.flac", &flac(&input, 16_000, 1, 4096, 40_000));
        let mut source = open_input(&path, ChannelSel::Mix, false).unwrap();
        assert_eq!(source.describe(), format!("file:{}", path.display()));
        assert_eq!(source.input_format(), Some((16_000, 1)));
        assert_eq!(source.duration_samples(), Some(40_000));
        let (out, result) = read_all(source.as_mut());
        result.unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn flac_at_48k_stereo_picks_the_channel_and_resamples_to_the_exact_length() {
        let dir = tempfile::tempdir().unwrap();
        let right = signal(48_000, 2);
        let stereo: Vec<i16> = right.iter().flat_map(|&s| [i16::MAX, s]).collect();
        // Not a FLAC name: recognised by its first bytes.
        let path = write(&dir, "a.audio", &flac(&stereo, 48_000, 2, 1152, 48_000));
        let mut source = open_input(&path, ChannelSel::Index(1), false).unwrap();
        assert_eq!(source.input_format(), Some((48_000, 2)));
        assert_eq!(source.duration_samples(), Some(16_000));
        let (out, result) = read_all(source.as_mut());
        result.unwrap();
        assert_eq!(out.len(), 16_000);
        // Channel 0 is full scale; channel 1 is a quarter of it at most.
        assert!(
            out.iter().all(|s| s.unsigned_abs() < 16_000),
            "channel 0 leaked in"
        );
    }

    #[test]
    fn a_damaged_flac_frame_becomes_silence_and_later_audio_keeps_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let input = signal(5 * 1000, 3);
        let mut bytes = flac(&input, 16_000, 1, 1000, 5000);
        // Frames 0 and 2 (samples 0..1000 and 2000..3000): frame n starts after fLaC,
        // STREAMINFO and n frames of the same length.
        let frame_len = 4 + 1 + 2 + 1 + 1 + 2000 + 2;
        for n in [0, 2] {
            let start = 4 + 4 + 34 + n * frame_len;
            for b in &mut bytes[start + 100..start + 140] {
                *b ^= 0x5A;
            }
        }
        let path = write(&dir, "damaged.flac", &bytes);
        let mut source = open_input(&path, ChannelSel::Mix, false).unwrap();
        let (out, result) = read_all(source.as_mut());
        result.unwrap();
        assert_eq!(out.len(), input.len());
        assert!(out[..1000].iter().all(|&s| s == 0));
        assert_eq!(out[1000..2000], input[1000..2000]);
        assert!(out[2000..3000].iter().all(|&s| s == 0));
        assert_eq!(out[3000..], input[3000..]);
    }

    #[test]
    fn a_truncated_flac_delivers_what_it_has_then_reports_the_shortfall() {
        let dir = tempfile::tempdir().unwrap();
        let input = signal(8000, 4);
        let bytes = flac(&input, 16_000, 1, 1000, 8000);
        let path = write(&dir, "cut.flac", &bytes[..bytes.len() / 2]);
        let mut source = open_input(&path, ChannelSel::Mix, false).unwrap();
        let (out, result) = read_all(source.as_mut());
        let err = result.unwrap_err();
        assert_eq!(err.code(), "bad_media");
        let message = err.to_string();
        assert!(
            message.contains("cut.flac") && message.contains("of the 8000 frames"),
            "{message}"
        );
        assert!(
            out.len() >= 3000,
            "the whole frames before the cut are kept: {}",
            out.len()
        );
        assert_eq!(out[..3000], input[..3000]);
    }

    #[test]
    fn unusable_flac_headers_and_channels_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let low = write(
            &dir,
            "low.flac",
            &flac(&signal(1000, 5), 7_000, 1, 1000, 1000),
        );
        let err = open_input(&low, ChannelSel::Mix, false).err().unwrap();
        assert_eq!(err.code(), "bad_media");
        assert!(err.to_string().contains("7000 Hz outside"), "{err}");

        let stereo = write(
            &dir,
            "st.flac",
            &flac(&signal(2000, 6), 16_000, 2, 500, 1000),
        );
        let err = open_input(&stereo, ChannelSel::Index(2), false)
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                CaptureError::Channel {
                    channel: 2,
                    channels: 2,
                    ..
                }
            ),
            "{err}"
        );

        let empty = write(&dir, "empty.flac", b"");
        let err = open_input(&empty, ChannelSel::Mix, false).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: not a usable FLAC/MP3/Ogg-Opus file: the file is empty",
                empty.display()
            )
        );

        // A valid header and then noise: an error or a clean end, never a panic.
        let mut noise = flac(&[], 16_000, 1, 1000, 1000);
        noise.extend(signal(20_000, 7).iter().flat_map(|s| s.to_le_bytes()));
        let path = write(&dir, "noise.flac", &noise);
        if let Ok(mut source) = open_input(&path, ChannelSel::Mix, false) {
            let _ = read_all(source.as_mut());
        }
        // Noise after the magic alone.
        let mut junk = b"fLaC".to_vec();
        junk.extend(signal(20_000, 8).iter().flat_map(|s| s.to_le_bytes()));
        let path = write(&dir, "junk.flac", &junk);
        assert!(open_input(&path, ChannelSel::Mix, false).is_err());
    }

    #[test]
    fn mp3_garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = b"ID3\x03\x00\x00\x00\x00\x00\x10".to_vec();
        bytes.extend([0u8; 16]);
        bytes.extend(signal(20_000, 9).iter().flat_map(|s| s.to_le_bytes()));
        let path = write(&dir, "junk.mp3", &bytes);
        match open_input(&path, ChannelSel::Mix, false) {
            Ok(mut source) => drop(read_all(source.as_mut())),
            Err(e) => assert!(e.to_string().contains("junk.mp3"), "{e}"),
        }
    }

    #[test]
    fn ogg_opus_is_decoded_at_16k_mono() {
        let dir = tempfile::tempdir().unwrap();
        let input: Vec<i16> = (0..24_000)
            .map(|i| ((i as f32 * 0.07).sin() * 8000.0) as i16)
            .collect();
        let settings = EncodeSettings {
            bitrate: 32_000,
            complexity: 5,
        };
        let mut w = OggOpusWriter::new(Vec::new(), &settings, "test", &[], 7).unwrap();
        w.write(&input).unwrap();
        let (bytes, _) = w.finish().unwrap();
        // Recognised by its first bytes, whatever the name.
        let path = write(&dir, "speech.bin", &bytes);
        let mut source = open_input(&path, ChannelSel::Index(0), false).unwrap();
        assert_eq!(source.input_format(), Some((16_000, 1)));
        assert_eq!(source.duration_samples(), Some(24_000));
        let (out, result) = read_all(source.as_mut());
        result.unwrap();
        assert_eq!(out.len(), 24_000);

        let err = open_input(&path, ChannelSel::Index(1), false)
            .err()
            .unwrap();
        assert!(matches!(err, CaptureError::Channel { .. }), "{err}");

        // An Ogg file that is not Opus, and an .opus file that is not Ogg.
        let mut not_opus = bytes.clone();
        not_opus[28..36].copy_from_slice(b"XpusHead");
        let path = write(&dir, "vorbis.ogg", &not_opus);
        let err = open_input(&path, ChannelSel::Mix, false).err().unwrap();
        assert_eq!(err.code(), "bad_media");
        let path = write(&dir, "raw.opus", &[1, 2, 3, 4, 5, 6]);
        let err = open_input(&path, ChannelSel::Mix, false).err().unwrap();
        assert!(err.to_string().contains("raw.opus"), "{err}");
    }

    /// hark's Ogg/Opus file of `input` (pages of 1 s).
    fn ogg_file(input: &[i16]) -> Vec<u8> {
        let settings = EncodeSettings {
            bitrate: 32_000,
            complexity: 5,
        };
        let mut w = OggOpusWriter::new(Vec::new(), &settings, "test", &[], 3).unwrap();
        w.write(input).unwrap();
        w.finish().unwrap().0
    }

    /// Byte ranges of the pages of hark's Ogg file (one stream, complete pages).
    fn ogg_pages(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut pages = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let segments = usize::from(bytes[pos + 26]);
            let lacing = &bytes[pos + 27..pos + 27 + segments];
            let len = 27 + segments + lacing.iter().map(|&l| usize::from(l)).sum::<usize>();
            pages.push(pos..pos + len);
            pos += len;
        }
        pages
    }

    #[test]
    fn ogg_opus_streams_exactly_what_the_decoder_gives_from_a_file_or_a_pipe() {
        let dir = tempfile::tempdir().unwrap();
        // 30 s of noise at 32 kbit/s: about 120 KB, more than a pipe is read ahead.
        let input = signal(16_000 * 30 + 17, 11);
        let bytes = ogg_file(&input);
        assert!(bytes.len() as u64 > READ_AHEAD, "{} bytes", bytes.len());
        let want = crate::codec::decode::decode_ogg_opus(&bytes).unwrap();
        assert_eq!(want.len(), input.len());

        let path = write(&dir, "noise.opus", &bytes);
        let mut source = open_input(&path, ChannelSel::Mix, false).unwrap();
        assert_eq!(source.duration_samples(), Some(want.len() as u64));
        let (out, result) = read_all(source.as_mut());
        result.unwrap();
        assert_eq!(out, want);

        // Through a FIFO: streamed as it is written, with no length (it is longer than the
        // read-ahead); a short one has its length.
        for (name, bytes) in [
            ("long.fifo", bytes.clone()),
            ("short.fifo", ogg_file(&input[..8000])),
        ] {
            let fifo = dir.path().join(name);
            crate::sys::mkfifo(&fifo, 0o600).unwrap();
            let (path, data) = (fifo.clone(), bytes.clone());
            let writer = std::thread::spawn(move || std::fs::write(path, data).unwrap());
            let mut source = open_input(&fifo, ChannelSel::Mix, false).unwrap();
            let (out, result) = read_all(source.as_mut());
            writer.join().unwrap();
            result.unwrap();
            let want = crate::codec::decode::decode_ogg_opus(&bytes).unwrap();
            let length = (bytes.len() as u64) < READ_AHEAD;
            assert_eq!(
                source.duration_samples(),
                length.then_some(want.len() as u64),
                "{name}"
            );
            assert_eq!(out, want, "{name}");
        }
    }

    #[test]
    fn damage_inside_an_ogg_opus_file_ends_it_with_an_error_after_the_audio_before() {
        let dir = tempfile::tempdir().unwrap();
        let input = signal(16_000 * 6, 12);
        let bytes = ogg_file(&input);
        let whole = crate::codec::decode::decode_ogg_opus(&bytes).unwrap();
        let pages = ogg_pages(&bytes);
        // Head, tags, then a page a second: cut inside the page of second 3.
        let cut = pages[5].start + 100;
        let path = write(&dir, "cut.opus", &bytes[..cut]);
        let mut source = open_input(&path, ChannelSel::Mix, false).unwrap();
        let (out, result) = read_all(source.as_mut());
        let err = result.unwrap_err();
        assert_eq!(err.code(), "bad_media");
        let message = err.to_string();
        assert!(
            message.contains("cut.opus")
                && message.contains(&format!(
                    "truncated inside the Ogg page or headers at byte {}",
                    pages[5].start
                )),
            "{message}"
        );
        // The three whole seconds before the cut page were delivered, exactly.
        assert!(out.len() >= 3 * 16_000 - 320, "{}", out.len());
        assert_eq!(out, whole[..out.len()]);

        // A damaged byte: that page's CRC fails, the error says where.
        let mut damaged = bytes.clone();
        damaged[pages[4].start + 200] ^= 0x40;
        let path = write(&dir, "damaged.opus", &damaged);
        let mut source = open_input(&path, ChannelSel::Mix, false).unwrap();
        let (out, result) = read_all(source.as_mut());
        let message = result.unwrap_err().to_string();
        assert!(
            message.contains("damaged.opus")
                && message.contains(&format!(
                    "bad Ogg page at byte {}: CRC mismatch",
                    pages[4].start
                )),
            "{message}"
        );
        assert_eq!(out, whole[..out.len()]);
        assert!(out.len() >= 2 * 16_000 - 320, "{}", out.len());
    }
}
