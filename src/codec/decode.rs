//! Reading Ogg/Opus files (RFC 7845) back into 16 kHz mono 16-bit PCM.
//!
//! [`decode_ogg_opus`] reads hark's own spool files (written by
//! [`OggOpusWriter`](super::opus::OggOpusWriter)) as well as Ogg/Opus files
//! from other encoders such as `opusenc`. It demuxes the Ogg pages itself
//! (checking every page's CRC, sequence numbers and packet continuation),
//! decodes with libopus at 16 kHz, downmixes to mono, applies the OpusHead
//! output gain, drops the pre-skip and trims the end to the last granule
//! position, so a file from `OggOpusWriter` decodes to exactly the samples
//! that were written. [`wav_bytes`] wraps PCM in a WAV file.
//!
//! It deliberately does not:
//! - decode chained streams: only the first link is read, and nothing after
//!   the end-of-stream page of the chosen stream is looked at;
//! - decode more than one logical stream of a multiplexed file: the first
//!   stream that begins with an OpusHead is decoded, pages of other streams
//!   are CRC-checked and skipped;
//! - decode multistream Opus (surround, channel mapping family 1 with more
//!   than two channels, or any stream count above one) or ambisonics
//!   (families 2 and 3): those return [`DecodeError::Unsupported`];
//! - seek, decode incrementally (the whole file is in memory), or
//!   resynchronise after damaged data (a bad page is an error, not a gap).

use super::ogg::crc32_update;
use super::opus::SAMPLE_RATE;

/// Fixed part of an Ogg page header, before the lacing values.
const HEADER_LEN: usize = 27;
/// Offset of the CRC field within the page header.
const CRC_OFFSET: usize = 22;

const FLAG_CONTINUED: u8 = 0x01;
const FLAG_BOS: u8 = 0x02;
const FLAG_EOS: u8 = 0x04;

/// Ogg/Opus granule positions count 48 kHz samples: 3 per output sample.
const GRANULE_PER_SAMPLE: u64 = 48_000 / SAMPLE_RATE as u64;
/// Longest Opus packet (120 ms) in output samples per channel.
const MAX_PACKET_SAMPLES: usize = SAMPLE_RATE as usize * 120 / 1000;
/// Most output samples one file may decode to (4 hours). A few bytes of
/// Opus can stand for 120 ms of audio, so without a limit a small hostile
/// file could make the decoder allocate gigabytes.
const MAX_SAMPLES: usize = SAMPLE_RATE as usize * 4 * 3600;

/// Why an Ogg/Opus file could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The input does not start with an Ogg page (`OggS`).
    #[error("not an Ogg file (no \"OggS\" at the start)")]
    NotOgg,
    /// The page starting at byte `offset` is damaged: no capture pattern,
    /// an unknown Ogg version, or a CRC mismatch.
    #[error("bad Ogg page at byte {offset}: {reason}")]
    BadPage { offset: usize, reason: &'static str },
    /// The input ends inside the page starting at byte `offset`, or (with
    /// `offset` = input length) before the Opus headers are complete.
    #[error("input truncated inside the Ogg page or headers at byte {offset}")]
    Truncated { offset: usize },
    /// No logical stream begins with an OpusHead packet.
    #[error("no Opus stream (no logical stream begins with OpusHead)")]
    NoOpusHead,
    /// The OpusHead packet is malformed.
    #[error("bad OpusHead: {0}")]
    BadHead(String),
    /// A valid stream this decoder does not handle (multistream/surround,
    /// ambisonics, unknown mapping family or major version).
    #[error("unsupported Ogg/Opus stream: {0}")]
    Unsupported(String),
    /// The pages or packets of the Opus stream are inconsistent (missing
    /// page, broken packet continuation, bad granule position, missing
    /// OpusTags); `offset` is the byte offset of the page.
    #[error("bad Ogg/Opus stream at byte {offset}: {reason}")]
    BadStream { offset: usize, reason: &'static str },
    /// The audio is longer than the decoder's limit of 4 hours.
    #[error("decoded audio longer than 4 hours")]
    TooLong,
    /// libopus rejected a packet or setting.
    #[error("opus decoder: {0}")]
    Opus(#[from] opus::Error),
}

/// Decodes a whole Ogg/Opus file to mono 16-bit samples at 16 kHz.
///
/// Stereo is downmixed by libopus; single-stream files with other channel
/// mappings (family 1 or 255 with one Opus stream) are mixed to the mean of
/// their output channels. The OpusHead output gain is applied. A decoded
/// sample is kept when its 48 kHz timestamp lies at or after the pre-skip and
/// before the last page's granule position (counted from the stream's first
/// sample), i.e. the pre-skip becomes `ceil(pre_skip / 3)` samples at 16 kHz,
/// which is exact for hark's files (their pre-skip is a multiple of 3).
///
/// Truncation: input that ends inside a page is [`DecodeError::Truncated`].
/// A stream that ends at a page boundary without an end-of-stream page is
/// accepted and decodes to the audio of its complete pages (a packet left
/// unfinished on the last page is dropped): hark writes pages while an
/// utterance is captured, so that is what a spool file cut short by a crash
/// looks like, and its pages are good audio. Zero-length packets carry no
/// audio and are skipped; pages without a granule position (-1) are fine.
pub fn decode_ogg_opus(bytes: &[u8]) -> Result<Vec<i16>, DecodeError> {
    if !bytes.starts_with(b"OggS") {
        return Err(DecodeError::NotOgg);
    }
    let mut stream: Option<Stream> = None;
    // The part of a packet that continues on the next page. It is reused, so
    // a packet spread over pages is copied once; others are decoded in place.
    let mut partial = Vec::new();
    let mut offset = 0;
    let mut ended = false;
    while offset < bytes.len() {
        let page = read_page(bytes, offset)?;
        offset += page.len;
        if stream.is_none() {
            if page.flags & FLAG_BOS == 0 {
                // All streams begin before any data page does.
                return Err(DecodeError::NoOpusHead);
            }
            if !page.body.starts_with(b"OpusHead") {
                continue; // Another multiplexed stream.
            }
            stream = Some(Stream::new(&page));
        }
        let Some(st) = stream.as_mut() else {
            continue;
        };
        if page.serial != st.serial {
            continue;
        }
        st.page(&page, &mut partial)?;
        if page.flags & FLAG_EOS != 0 {
            ended = true;
            break;
        }
    }
    match stream {
        Some(st) => st.finish(ended, bytes.len()),
        None => Err(DecodeError::NoOpusHead),
    }
}

/// A complete 16-bit PCM mono WAV file (RIFF header + data) for `samples` at
/// `rate`. Sizes that do not fit the format's 32-bit fields (over 4 GiB of
/// data) saturate.
pub fn wav_bytes(samples: &[i16], rate: u32) -> Vec<u8> {
    let data_len = u32::try_from(samples.len().saturating_mul(2)).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(44 + 2 * samples.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&data_len.saturating_add(36).to_le_bytes());
    out.extend_from_slice(b"WAVE");
    out.extend_from_slice(b"fmt ");
    out.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // channels
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&rate.saturating_mul(2).to_le_bytes()); // bytes/s
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
}

/// One Ogg page, borrowed from the input.
struct Page<'a> {
    /// Byte offset of the page in the input.
    offset: usize,
    /// Length of the whole page.
    len: usize,
    flags: u8,
    granule: u64,
    serial: u32,
    sequence: u32,
    lacing: &'a [u8],
    body: &'a [u8],
}

/// Reads the page at `offset` (within `bytes`) and checks its CRC.
fn read_page(bytes: &[u8], offset: usize) -> Result<Page<'_>, DecodeError> {
    let rest = bytes.get(offset..).unwrap_or_default();
    let truncated = || DecodeError::Truncated { offset };
    let bad = |reason| DecodeError::BadPage { offset, reason };
    if !rest.starts_with(b"OggS") {
        return Err(if b"OggS".starts_with(rest) {
            truncated()
        } else {
            bad("no capture pattern \"OggS\"")
        });
    }
    let header: &[u8; HEADER_LEN] = rest.first_chunk().ok_or_else(truncated)?;
    if header[4] != 0 {
        return Err(bad("unknown Ogg version"));
    }
    let segments = usize::from(header[26]);
    let lacing = rest
        .get(HEADER_LEN..HEADER_LEN + segments)
        .ok_or_else(truncated)?;
    let body_len: usize = lacing.iter().map(|&l| usize::from(l)).sum();
    let len = HEADER_LEN + segments + body_len;
    let page = rest.get(..len).ok_or_else(truncated)?;
    let body = page.get(HEADER_LEN + segments..).unwrap_or_default();

    let stored = u32::from_le_bytes([header[22], header[23], header[24], header[25]]);
    let mut crc = crc32_update(0, &header[..CRC_OFFSET]);
    crc = crc32_update(crc, &[0; 4]);
    crc = crc32_update(crc, page.get(CRC_OFFSET + 4..).unwrap_or_default());
    if crc != stored {
        return Err(bad("CRC mismatch"));
    }
    Ok(Page {
        offset,
        len,
        flags: header[5],
        granule: u64::from_le_bytes([
            header[6], header[7], header[8], header[9], header[10], header[11], header[12],
            header[13],
        ]),
        serial: u32::from_le_bytes([header[14], header[15], header[16], header[17]]),
        sequence: u32::from_le_bytes([header[18], header[19], header[20], header[21]]),
        lacing,
        body,
    })
}

/// The Opus stream being decoded.
struct Stream {
    serial: u32,
    next_sequence: u32,
    /// Offset of the last page read.
    offset: usize,
    /// Packets completed so far (0: OpusHead, 1: OpusTags, then audio).
    packets: u64,
    /// Created from the OpusHead packet.
    decoder: Option<Decoder>,
    /// Pre-skip in 48 kHz samples.
    pre_skip: u64,
    /// Every decoded sample, pre-skip included.
    pcm: Vec<i16>,
    /// Granule position of the first decoded sample (from the first audio
    /// page that has a granule position).
    base: Option<u64>,
    /// Granule position of the last audio page that has one.
    last_granule: Option<u64>,
}

impl Stream {
    fn new(first: &Page<'_>) -> Self {
        Self {
            serial: first.serial,
            next_sequence: first.sequence,
            offset: first.offset,
            packets: 0,
            decoder: None,
            pre_skip: 0,
            pcm: Vec::new(),
            base: None,
            last_granule: None,
        }
    }

    /// Decodes the packets that complete on `page`; `partial` holds the
    /// start of a packet continued from the previous page, and keeps the
    /// start of one continued on the next.
    fn page(&mut self, page: &Page<'_>, partial: &mut Vec<u8>) -> Result<(), DecodeError> {
        let bad = |reason| DecodeError::BadStream {
            offset: page.offset,
            reason,
        };
        self.offset = page.offset;
        if page.sequence != self.next_sequence {
            return Err(bad("page sequence number out of order (missing page?)"));
        }
        self.next_sequence = page.sequence.wrapping_add(1);
        // A pending packet always holds at least one 255-byte segment.
        match (page.flags & FLAG_CONTINUED != 0, partial.is_empty()) {
            (true, true) => return Err(bad("page continues a packet that never started")),
            (false, false) => return Err(bad("page does not continue the unfinished packet")),
            _ => {}
        }

        let packets_before = self.packets;
        let (mut start, mut end) = (0, 0);
        for &lace in page.lacing {
            end += usize::from(lace);
            if lace < 255 {
                let data = page.body.get(start..end).unwrap_or_default();
                let packet = if partial.is_empty() {
                    data
                } else {
                    partial.extend_from_slice(data);
                    partial.as_slice()
                };
                self.packet(packet, page.offset)?;
                partial.clear();
                start = end;
            }
        }
        partial.extend_from_slice(page.body.get(start..).unwrap_or_default());

        // Granule positions of pages on which audio packets end; -1 (no
        // packet ends here) and other negative values are ignored.
        let audio_ended = self.packets > packets_before.max(2);
        if audio_ended && i64::try_from(page.granule).is_ok() {
            if self.base.is_none() {
                let decoded = self.pcm.len() as u64 * GRANULE_PER_SAMPLE;
                self.base = Some(match page.granule.checked_sub(decoded) {
                    Some(base) => base,
                    // Less audio than decoded: end trimming on a stream
                    // whose only audio page is the last one (RFC 7845 4.5).
                    None if page.flags & FLAG_EOS != 0 => 0,
                    None => return Err(bad("granule position smaller than the audio before it")),
                });
            }
            self.last_granule = Some(page.granule);
        }
        Ok(())
    }

    fn packet(&mut self, packet: &[u8], offset: usize) -> Result<(), DecodeError> {
        let index = self.packets;
        self.packets += 1;
        match (index, self.decoder.as_mut()) {
            (0, _) => {
                let head = Head::parse(packet)?;
                self.pre_skip = u64::from(head.pre_skip);
                self.decoder = Some(Decoder::new(&head)?);
            }
            (1, _) => {
                if !packet.starts_with(b"OpusTags") {
                    return Err(DecodeError::BadStream {
                        offset,
                        reason: "second packet is not OpusTags",
                    });
                }
            }
            (_, Some(decoder)) => {
                if i32::try_from(packet.len()).is_err() {
                    return Err(DecodeError::BadStream {
                        offset,
                        reason: "packet longer than 2 GiB",
                    });
                }
                decoder.decode(packet, &mut self.pcm)?;
            }
            // Unreachable: a failed OpusHead ends decoding.
            (_, None) => {}
        }
        Ok(())
    }

    /// Drops the pre-skip and trims the end to the last granule position.
    fn finish(mut self, ended: bool, input_len: usize) -> Result<Vec<i16>, DecodeError> {
        if self.packets < 2 {
            return Err(if ended {
                DecodeError::BadStream {
                    offset: self.offset,
                    reason: "stream ends before its OpusTags packet",
                }
            } else {
                DecodeError::Truncated { offset: input_len }
            });
        }
        let mut end = self.pcm.len();
        if let (Some(base), Some(last)) = (self.base, self.last_granule) {
            let samples = last.saturating_sub(base).div_ceil(GRANULE_PER_SAMPLE);
            end = end.min(usize::try_from(samples).unwrap_or(usize::MAX));
        }
        let start = usize::try_from(self.pre_skip.div_ceil(GRANULE_PER_SAMPLE))
            .unwrap_or(usize::MAX)
            .min(end);
        self.pcm.truncate(end);
        self.pcm.drain(..start);
        Ok(self.pcm)
    }
}

/// The OpusHead fields the decoder needs.
struct Head {
    /// In 48 kHz samples.
    pre_skip: u16,
    /// Output gain in Q7.8 dB.
    gain: i16,
    layout: Layout,
}

/// How the one Opus stream becomes mono.
enum Layout {
    /// Every coded channel is one output channel: libopus downmixes.
    Mono,
    /// Decode `coded` (1 or 2) channels; the output sample is the mean of
    /// the output channels, where coded channel `k` feeds `weights[k]` of
    /// the `channels` output channels (the others are silent).
    Mix {
        coded: usize,
        weights: [i32; 2],
        channels: i32,
    },
}

impl Head {
    fn parse(p: &[u8]) -> Result<Self, DecodeError> {
        let bad = |msg: String| Err(DecodeError::BadHead(msg));
        let unsupported = |msg: String| Err(DecodeError::Unsupported(msg));
        let Some(h) = p.first_chunk::<19>() else {
            return bad(format!("{} bytes, need at least 19", p.len()));
        };
        if !h.starts_with(b"OpusHead") {
            return bad("no \"OpusHead\" magic".into());
        }
        let version = h[8];
        if version >> 4 != 0 {
            return unsupported(format!("OpusHead version {version}"));
        }
        let channels = h[9];
        if channels == 0 {
            return bad("channel count 0".into());
        }
        let pre_skip = u16::from_le_bytes([h[10], h[11]]);
        let gain = i16::from_le_bytes([h[16], h[17]]);
        let family = h[18];
        let (streams, coupled, mapping): (u8, u8, &[u8]) = match family {
            0 => match channels {
                1 => (1, 0, &[0]),
                2 => (1, 1, &[0, 1]),
                _ => return bad(format!("mapping family 0 with {channels} channels")),
            },
            1 | 255 => {
                let need = 21 + usize::from(channels);
                let Some(&[streams, coupled, ref mapping @ ..]) = p.get(19..need) else {
                    return bad(format!("{} bytes, need {need} for the mapping", p.len()));
                };
                (streams, coupled, mapping)
            }
            _ => return unsupported(format!("channel mapping family {family}")),
        };
        if family == 1 && channels > 8 {
            return bad(format!("mapping family 1 with {channels} channels"));
        }
        if streams == 0 || coupled > streams {
            return bad(format!("{streams} streams, {coupled} coupled"));
        }
        let coded_total = usize::from(streams) + usize::from(coupled);
        if coded_total > 255 {
            return bad(format!("{coded_total} coded channels"));
        }
        if let Some(m) = mapping
            .iter()
            .find(|&&m| m != 255 && usize::from(m) >= coded_total)
        {
            return bad(format!("mapping to channel {m} of {coded_total}"));
        }
        if streams > 1 {
            return unsupported(format!(
                "multistream Opus ({channels} channels in {streams} streams)"
            ));
        }

        let coded = coded_total; // 1 or 2: one stream, maybe coupled
        let mut weights = [0i32; 2];
        for &m in mapping {
            if let Some(w) = weights.get_mut(usize::from(m)) {
                *w += 1;
            }
        }
        let layout =
            if usize::from(channels) == coded && weights.iter().take(coded).all(|&w| w == 1) {
                Layout::Mono
            } else {
                Layout::Mix {
                    coded,
                    weights,
                    channels: i32::from(channels),
                }
            };
        Ok(Self {
            pre_skip,
            gain,
            layout,
        })
    }
}

/// libopus decoder at 16 kHz plus the mixing to mono.
struct Decoder {
    opus: opus::Decoder,
    /// Channels decoded by libopus; 1 if it downmixes.
    coded: usize,
    /// `Some((weights, channels))` to mix `coded` channels (see [`Layout`]).
    mix: Option<([i32; 2], i32)>,
    /// One packet of interleaved samples.
    buf: Vec<i16>,
}

impl Decoder {
    fn new(head: &Head) -> Result<Self, DecodeError> {
        let (coded, mix) = match head.layout {
            Layout::Mono => (1, None),
            Layout::Mix {
                coded,
                weights,
                channels,
            } => (coded, Some((weights, channels))),
        };
        let channels = if coded == 2 {
            opus::Channels::Stereo
        } else {
            opus::Channels::Mono
        };
        let mut opus = opus::Decoder::new(SAMPLE_RATE, channels)?;
        if head.gain != 0 {
            opus.set_gain(i32::from(head.gain))?;
        }
        Ok(Self {
            opus,
            coded,
            mix,
            buf: vec![0; MAX_PACKET_SAMPLES * coded],
        })
    }

    /// Decodes one audio packet and appends it, as mono, to `pcm`.
    fn decode(&mut self, packet: &[u8], pcm: &mut Vec<i16>) -> Result<(), DecodeError> {
        if packet.is_empty() {
            // No TOC byte, so no duration: nothing to decode (libopus
            // would take it for a lost packet of unknown length).
            return Ok(());
        }
        let n = self.opus.decode(packet, &mut self.buf, false)?;
        if pcm.len().saturating_add(n) > MAX_SAMPLES {
            return Err(DecodeError::TooLong);
        }
        match self.mix {
            None => pcm.extend_from_slice(self.buf.get(..n).unwrap_or_default()),
            Some((weights, channels)) => {
                pcm.extend(self.buf.chunks_exact(self.coded).take(n).map(|f| {
                    let sum: i32 = f.iter().zip(weights).map(|(&x, w)| i32::from(x) * w).sum();
                    (sum / channels.max(1)).clamp(i16::MIN.into(), i16::MAX.into()) as i16
                }))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ogg::OggPageWriter;
    use crate::codec::ogg::tests::parse;
    use crate::codec::opus::{EncodeSettings, OggOpusWriter};
    use std::ops::Range;
    use std::process::Command;

    const SETTINGS: EncodeSettings = EncodeSettings {
        bitrate: 24_000,
        complexity: 10,
    };

    /// Deterministic xorshift64 generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// 440 Hz sine at 16 kHz.
    fn sine(n: usize, amplitude: f64) -> Vec<i16> {
        (0..n)
            .map(|i| {
                let t = i as f64 / 16_000.0;
                (amplitude * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
            })
            .collect()
    }

    fn noise(n: usize, seed: u64) -> Vec<i16> {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        (0..n)
            .map(|_| (rng.next() >> 48) as u16 as i16 / 4)
            .collect()
    }

    fn hark_file(input: &[i16], serial: u32) -> Vec<u8> {
        let comments = [("TITLE", "utterance")];
        let mut w = OggOpusWriter::new(Vec::new(), &SETTINGS, "hark test", &comments, serial)
            .expect("writer");
        w.write(input).expect("write");
        w.finish().expect("finish").0
    }

    /// Independent decode of a hark file: the Ogg test parser, a plain mono
    /// decoder, pre-skip and end trimming as in hark's encoder tests.
    fn reference(bytes: &[u8]) -> Vec<i16> {
        let (pages, packets) = parse(bytes);
        let head = &packets[0].0;
        let pre_skip = usize::from(u16::from_le_bytes([head[10], head[11]]));
        let mut decoder = opus::Decoder::new(16_000, opus::Channels::Mono).unwrap();
        let mut buf = [0i16; 1920];
        let mut pcm = Vec::new();
        for (packet, _) in &packets[2..] {
            let n = decoder.decode(packet, &mut buf, false).unwrap();
            pcm.extend_from_slice(&buf[..n]);
        }
        let end = (pages.last().unwrap().granule / 3) as usize;
        pcm[pre_skip / 3..end].to_vec()
    }

    /// SNR in dB of `decoded` against `want`, skipping the first 400 samples.
    fn snr_db(want: &[i16], decoded: &[i16]) -> f64 {
        let (mut sig, mut err) = (0.0f64, 0.0f64);
        for (&x, &d) in want.iter().zip(decoded).skip(400) {
            sig += f64::from(x).powi(2);
            err += (f64::from(x) - f64::from(d)).powi(2);
        }
        10.0 * (sig / err.max(1.0)).log10()
    }

    fn rms(s: &[i16]) -> f64 {
        (s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / s.len().max(1) as f64).sqrt()
    }

    /// Byte ranges of the complete pages of an Ogg file (trusting lengths).
    fn page_ranges(bytes: &[u8]) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos + HEADER_LEN <= bytes.len() {
            let n = usize::from(bytes[pos + 26]);
            let Some(lacing) = bytes.get(pos + HEADER_LEN..pos + HEADER_LEN + n) else {
                break;
            };
            let len = HEADER_LEN + n + lacing.iter().map(|&l| usize::from(l)).sum::<usize>();
            if pos + len > bytes.len() {
                break;
            }
            out.push(pos..pos + len);
            pos += len;
        }
        out
    }

    /// Recomputes the CRC of every page.
    fn fix_crcs(bytes: &mut [u8]) {
        for r in page_ranges(bytes) {
            let page = &mut bytes[r];
            page[22..26].fill(0);
            let crc = crc32_update(0, page);
            page[22..26].copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// One page with a correct CRC.
    fn make_page(
        flags: u8,
        granule: u64,
        serial: u32,
        seq: u32,
        lacing: &[u8],
        body: &[u8],
    ) -> Vec<u8> {
        let mut p = b"OggS\0".to_vec();
        p.push(flags);
        p.extend_from_slice(&granule.to_le_bytes());
        p.extend_from_slice(&serial.to_le_bytes());
        p.extend_from_slice(&seq.to_le_bytes());
        p.extend_from_slice(&[0; 4]);
        p.push(lacing.len() as u8);
        p.extend_from_slice(lacing);
        p.extend_from_slice(body);
        fix_crcs(&mut p);
        p
    }

    fn opus_head(channels: u8, pre_skip: u16, gain: i16, family: u8, table: &[u8]) -> Vec<u8> {
        let mut h = b"OpusHead\x01".to_vec();
        h.push(channels);
        h.extend_from_slice(&pre_skip.to_le_bytes());
        h.extend_from_slice(&16_000u32.to_le_bytes());
        h.extend_from_slice(&gain.to_le_bytes());
        h.push(family);
        h.extend_from_slice(table);
        h
    }

    /// OpusHead, OpusTags and audio `packets` (with their end granules),
    /// ending a page after every `per_page` packets.
    fn mux(head: &[u8], packets: &[(Vec<u8>, u64)], serial: u32, per_page: usize) -> Vec<u8> {
        let mut w = OggPageWriter::new(Vec::new(), serial);
        w.write_packet(head, 0, true).unwrap();
        let tags = b"OpusTags\x04\0\0\0test\0\0\0\0";
        w.write_packet(tags, 0, true).unwrap();
        let (last, rest) = packets.split_last().unwrap();
        for (i, (p, g)) in rest.iter().enumerate() {
            w.write_packet(p, *g, (i + 1) % per_page == 0).unwrap();
        }
        w.finish(&last.0, last.1).unwrap()
    }

    /// Encodes interleaved 16 kHz PCM in 20 ms packets with end-trimmed
    /// granule positions; returns the packets and the pre-skip.
    fn encode_packets(pcm: &[i16], stereo: bool) -> (Vec<(Vec<u8>, u64)>, u16) {
        let (ch, channels) = if stereo {
            (2, opus::Channels::Stereo)
        } else {
            (1, opus::Channels::Mono)
        };
        let mut enc = opus::Encoder::new(16_000, channels, opus::Application::Audio).unwrap();
        enc.set_bitrate(opus::Bitrate::Bits(48_000)).unwrap();
        let lookahead = enc.get_lookahead().unwrap() as usize;
        let n = pcm.len() / ch;
        let frames = (n + lookahead).div_ceil(320);
        let mut padded = pcm.to_vec();
        padded.resize(frames * 320 * ch, 0);
        let pre_skip = (lookahead * 3) as u16;
        let end = u64::from(pre_skip) + 3 * n as u64;
        let packets = padded
            .chunks(320 * ch)
            .enumerate()
            .map(|(i, f)| {
                let granule = ((i as u64 + 1) * 960).min(end);
                (enc.encode_vec(f, 4000).unwrap(), granule)
            })
            .collect();
        (packets, pre_skip)
    }

    #[test]
    fn hark_files_decode_to_exactly_the_samples_written() {
        for n in [0usize, 1, 319, 320, 321, 16_000 + 123, 16_000 * 3 + 7] {
            for input in [sine(n, 8000.0), noise(n, n as u64)] {
                let bytes = hark_file(&input, 7);
                let pcm = decode_ogg_opus(&bytes).unwrap();
                assert_eq!(pcm.len(), n);
                assert_eq!(pcm, reference(&bytes), "n = {n}");
            }
        }
    }

    #[test]
    fn sine_at_24_kbps_is_close_to_the_input() {
        let input = sine(16_000 + 123, 8000.0);
        let pcm = decode_ogg_opus(&hark_file(&input, 1)).unwrap();
        assert_eq!(pcm.len(), input.len());
        let snr = snr_db(&input, &pcm);
        assert!(snr > 10.0, "SNR {snr:.1} dB");
    }

    #[test]
    fn wav_bytes_round_trip_through_hound() {
        let cases = [
            (noise(1234, 3), 16_000),
            (Vec::new(), 8_000),
            (vec![i16::MIN, -1, 0, 1, i16::MAX], 48_000),
        ];
        for (samples, rate) in cases {
            let wav = wav_bytes(&samples, rate);
            assert_eq!(wav.len(), 44 + 2 * samples.len());
            let mut r = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: rate,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            assert_eq!(r.spec(), spec);
            assert_eq!(r.duration() as usize, samples.len());
            let got: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
            assert_eq!(got, samples);
        }
    }

    #[test]
    fn corrupt_byte_is_bad_page_at_its_offset() {
        let bytes = hark_file(&sine(16_000 * 2, 8000.0), 3);
        let pages = page_ranges(&bytes);
        assert_eq!(pages.last().unwrap().end, bytes.len());
        for r in &pages {
            // Header flags, the CRC itself, the last body byte.
            for at in [r.start + 5, r.start + 22, r.end - 1] {
                let mut bad = bytes.clone();
                bad[at] ^= 0x10;
                match decode_ogg_opus(&bad) {
                    Err(DecodeError::BadPage { offset, reason }) => {
                        assert_eq!(offset, r.start);
                        assert_eq!(reason, "CRC mismatch");
                    }
                    other => panic!("byte {at}: {other:?}"),
                }
            }
        }
        let mut bad = bytes.clone();
        bad[pages[2].start] = b'X';
        assert!(matches!(
            decode_ogg_opus(&bad),
            Err(DecodeError::BadPage { offset, .. }) if offset == pages[2].start
        ));
    }

    #[test]
    fn truncated_inside_a_page_is_an_error_at_a_page_boundary_fewer_samples() {
        let input = noise(16_000 * 2 + 5, 9);
        let bytes = hark_file(&input, 5);
        let full = decode_ogg_opus(&bytes).unwrap();
        assert_eq!(full.len(), input.len());
        let pages = page_ranges(&bytes);
        assert_eq!(pages.len(), 5, "head, tags, 1 s, 1 s, rest");
        let mut cuts: Vec<usize> = (0..bytes.len()).step_by(7).collect();
        for r in &pages {
            cuts.extend([r.end - 1, r.end, r.end + 1]);
        }
        for cut in cuts.into_iter().filter(|&c| c <= bytes.len()) {
            let result = decode_ogg_opus(&bytes[..cut]);
            let inside = pages.iter().find(|r| r.start < cut && cut < r.end);
            match inside {
                _ if cut < 4 => assert!(matches!(result, Err(DecodeError::NotOgg))),
                Some(r) => assert!(
                    matches!(result, Err(DecodeError::Truncated { offset }) if offset == r.start),
                    "cut {cut}: {result:?}"
                ),
                None if cut < pages[1].end => assert!(
                    matches!(result, Err(DecodeError::Truncated { offset }) if offset == cut),
                    "cut {cut}: {result:?}"
                ),
                None => {
                    let pcm = result.unwrap();
                    assert_eq!(pcm, full[..pcm.len()], "cut {cut}");
                    if cut >= pages[2].end {
                        assert!(pcm.len() >= 16_000 - 320, "cut {cut}: {}", pcm.len());
                    }
                }
            }
        }
    }

    #[test]
    fn garbage_is_not_ogg() {
        let mut rng = Rng(42);
        let mut inputs = vec![
            Vec::new(),
            b"Ogg".to_vec(),
            b"OggT\0\0\0\0".to_vec(),
            wav_bytes(&noise(100, 1), 16_000),
        ];
        for n in [1, 10, 100, 5000] {
            inputs.push(rng.bytes(n));
        }
        for input in inputs {
            assert!(matches!(decode_ogg_opus(&input), Err(DecodeError::NotOgg)));
        }
    }

    #[test]
    fn missing_page_or_tags_is_bad_stream() {
        let bytes = hark_file(&sine(16_000 * 3, 8000.0), 4);
        let p = page_ranges(&bytes);
        let mut gap = bytes[..p[2].start].to_vec();
        gap.extend_from_slice(&bytes[p[3].start..]);
        assert!(matches!(
            decode_ogg_opus(&gap),
            Err(DecodeError::BadStream { offset, .. }) if offset == p[2].start
        ));

        let (_, packets) = parse(&bytes);
        let mut w = OggPageWriter::new(Vec::new(), 1);
        w.write_packet(&packets[0].0, 0, true).unwrap();
        let no_tags = w.finish(&packets[2].0, 960).unwrap();
        let err = decode_ogg_opus(&no_tags).unwrap_err();
        assert!(matches!(err, DecodeError::BadStream { .. }), "{err}");

        let mut w = OggPageWriter::new(Vec::new(), 1);
        w.write_packet(b"not an OpusHead", 0, true).unwrap();
        let not_opus = w.finish(&packets[2].0, 960).unwrap();
        assert!(matches!(
            decode_ogg_opus(&not_opus),
            Err(DecodeError::NoOpusHead)
        ));
    }

    #[test]
    fn packets_across_pages_empty_packets_and_pages_without_granule() {
        let input = sine(16_000 + 123, 8000.0);
        let bytes = hark_file(&input, 2);
        let expected = decode_ogg_opus(&bytes).unwrap();
        let (pages, packets) = parse(&bytes);
        let final_granule = pages.last().unwrap().granule;
        let mut audio = Vec::new();
        for (k, (p, _)) in packets[2..].iter().enumerate() {
            let granule = ((k as u64 + 1) * 960).min(final_granule);
            if k % 3 == 0 {
                // Opus padding makes a packet that spans several pages.
                let mut big = p.clone();
                big.resize(70_000 + k, 0);
                opus::packet::pad(&mut big, p.len()).unwrap();
                audio.push((big, granule));
            } else {
                audio.push((p.clone(), granule));
            }
            if k % 5 == 0 {
                audio.push((Vec::new(), granule));
            }
        }
        let muxed = mux(&packets[0].0, &audio, 77, 7);
        let (pages, _) = parse(&muxed);
        assert!(pages.iter().any(|p| p.granule == u64::MAX));
        assert!(pages.iter().any(|p| p.header_type & FLAG_CONTINUED != 0));
        assert_eq!(decode_ogg_opus(&muxed).unwrap(), expected);
    }

    #[test]
    fn multiplexed_file_decodes_the_opus_stream() {
        let opus_file = hark_file(&sine(16_000 * 2 + 50, 8000.0), 1);
        let expected = decode_ogg_opus(&opus_file).unwrap();
        let mut other = OggPageWriter::new(Vec::new(), 2);
        other
            .write_packet(b"fishead\0 other stream", 0, true)
            .unwrap();
        for i in 0..4u8 {
            other.write_packet(&[i; 300], u64::from(i), true).unwrap();
        }
        let other = other.finish(b"end", 9).unwrap();
        let (o, p) = (page_ranges(&other), page_ranges(&opus_file));
        assert!(matches!(
            decode_ogg_opus(&other),
            Err(DecodeError::NoOpusHead)
        ));

        for opus_first in [false, true] {
            // All BOS pages first, then data pages interleaved.
            let (a, b) = if opus_first {
                ((&opus_file, &p), (&other, &o))
            } else {
                ((&other, &o), (&opus_file, &p))
            };
            let mut muxed = a.0[a.1[0].clone()].to_vec();
            muxed.extend_from_slice(&b.0[b.1[0].clone()]);
            for i in 1..a.1.len().max(b.1.len()) {
                for (file, ranges) in [a, b] {
                    if let Some(r) = ranges.get(i) {
                        muxed.extend_from_slice(&file[r.clone()]);
                    }
                }
            }
            assert_eq!(decode_ogg_opus(&muxed).unwrap(), expected);
        }
    }

    #[test]
    fn chained_file_decodes_the_first_link() {
        let mut bytes = hark_file(&sine(16_001, 8000.0), 1);
        let first = decode_ogg_opus(&bytes).unwrap();
        bytes.extend_from_slice(&hark_file(&noise(5000, 3), 2));
        assert_eq!(decode_ogg_opus(&bytes).unwrap(), first);
        bytes.extend_from_slice(b"trailing garbage");
        assert_eq!(decode_ogg_opus(&bytes).unwrap(), first);
    }

    #[test]
    fn stereo_and_single_stream_mappings_are_downmixed() {
        let n = 16_000 + 77;
        let mono = sine(n, 8000.0);
        let stereo: Vec<i16> = mono.iter().flat_map(|&s| [s, s]).collect();
        let (packets, pre_skip) = encode_packets(&stereo, true);
        let cases = [
            (opus_head(2, pre_skip, 0, 0, &[]), 1.0),
            (opus_head(2, pre_skip, 0, 1, &[1, 1, 0, 1]), 1.0),
            (opus_head(2, pre_skip, 0, 1, &[1, 1, 1, 0]), 1.0),
            // One silent output channel: the mean is half.
            (opus_head(2, pre_skip, 0, 1, &[1, 1, 0, 255]), 0.5),
            // One output channel from a coupled stream (its left).
            (opus_head(1, pre_skip, 0, 1, &[1, 1, 0]), 1.0),
            (opus_head(3, pre_skip, 0, 255, &[1, 1, 0, 1, 0]), 1.0),
        ];
        for (head, scale) in cases {
            let pcm = decode_ogg_opus(&mux(&head, &packets, 9, 50)).unwrap();
            assert_eq!(pcm.len(), n);
            let want: Vec<i16> = mono
                .iter()
                .map(|&s| (f64::from(s) * scale) as i16)
                .collect();
            let snr = snr_db(&want, &pcm);
            assert!(snr > 10.0, "head {head:?}: SNR {snr:.1} dB");
        }

        // A mono stream in a mono head, for comparison with the stereo path.
        let (packets, pre_skip) = encode_packets(&mono, false);
        let pcm = decode_ogg_opus(&mux(&opus_head(1, pre_skip, 0, 0, &[]), &packets, 3, 50));
        let pcm = pcm.unwrap();
        assert_eq!(pcm.len(), n);
        assert!(snr_db(&mono, &pcm) > 10.0);
    }

    #[test]
    fn unsupported_and_malformed_heads() {
        let (packets, pre_skip) = encode_packets(&sine(3200, 8000.0), false);
        let mut version_16 = opus_head(1, pre_skip, 0, 0, &[]);
        version_16[8] = 0x10;
        let unsupported = [
            opus_head(6, pre_skip, 0, 1, &[4, 2, 0, 4, 1, 2, 3, 5]),
            opus_head(2, pre_skip, 0, 1, &[2, 0, 0, 1]),
            opus_head(4, pre_skip, 0, 2, &[4, 0, 0, 1, 2, 3]),
            opus_head(1, pre_skip, 0, 3, &[1, 0]),
            version_16,
        ];
        for head in unsupported {
            let err = decode_ogg_opus(&mux(&head, &packets, 1, 50)).unwrap_err();
            assert!(
                matches!(err, DecodeError::Unsupported(_)),
                "{head:?}: {err}"
            );
        }
        let bad = [
            b"OpusHead\x01\x01".to_vec(),
            opus_head(0, pre_skip, 0, 0, &[]),
            opus_head(3, pre_skip, 0, 0, &[]),
            opus_head(2, pre_skip, 0, 1, &[1, 1, 0]),
            opus_head(2, pre_skip, 0, 1, &[1, 1, 0, 2]),
            opus_head(2, pre_skip, 0, 1, &[0, 0, 0, 0]),
            opus_head(2, pre_skip, 0, 1, &[1, 2, 0, 1]),
            opus_head(9, pre_skip, 0, 1, &[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ];
        for head in bad {
            let err = decode_ogg_opus(&mux(&head, &packets, 1, 50)).unwrap_err();
            assert!(matches!(err, DecodeError::BadHead(_)), "{head:?}: {err}");
        }
    }

    #[test]
    fn output_gain_is_applied() {
        let bytes = hark_file(&sine(16_000, 8000.0), 1);
        let plain = decode_ogg_opus(&bytes).unwrap();
        // OpusHead is alone on page 0: its body starts after 27 + 1 bytes.
        let gain_at = HEADER_LEN + 1 + 16;
        let mut quieter = bytes.clone();
        quieter[gain_at..gain_at + 2].copy_from_slice(&(-1541i16).to_le_bytes()); // -6.02 dB
        fix_crcs(&mut quieter);
        let half = decode_ogg_opus(&quieter).unwrap();
        assert_eq!(half.len(), plain.len());
        let ratio = rms(&half) / rms(&plain);
        assert!((0.49..0.51).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn fuzzed_input_never_panics() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let short = hark_file(&noise(8000, 4), 11);
        let long = hark_file(&sine(16_000 * 2, 8000.0), 12);
        let (_, packets) = parse(&short);
        let real: Vec<&[u8]> = packets.iter().map(|(p, _)| p.as_slice()).collect();

        // Random bytes behind a capture pattern.
        for _ in 0..2000 {
            let mut b = b"OggS".to_vec();
            let n = rng.below(600);
            b.extend_from_slice(&rng.bytes(n));
            let _ = decode_ogg_opus(&b);
        }

        // Changed and cut valid files; mostly with fixed CRCs so that the
        // damage reaches the page, packet and Opus parsing.
        for i in 0..3000 {
            let mut b = if i % 4 == 0 {
                long.clone()
            } else {
                short.clone()
            };
            for _ in 0..1 + rng.below(4) {
                let at = if rng.below(2) == 0 {
                    rng.below(150)
                } else {
                    rng.below(b.len())
                };
                b[at] = rng.next() as u8;
            }
            if rng.below(4) != 0 {
                fix_crcs(&mut b);
            }
            if rng.below(4) == 0 {
                b.truncate(rng.below(b.len()));
            }
            let _ = decode_ogg_opus(&b);
        }

        // Streams of random pages with valid CRCs: random flags, granules
        // (often -1 or huge), lacing counts up to 255, empty packets, real,
        // random and cut Opus packets, other serials, sequence slips.
        let head_and_tags = &short[..page_ranges(&short)[1].end];
        for _ in 0..1000 {
            let mut b = head_and_tags.to_vec();
            let mut seq = 2u32;
            for _ in 0..rng.below(8) {
                let segments = rng.below(256);
                let mut lacing = Vec::with_capacity(segments);
                let mut body = Vec::new();
                while lacing.len() < segments {
                    let packet: Vec<u8> = match rng.below(5) {
                        0 => Vec::new(),
                        1 => {
                            let n = rng.below(700);
                            rng.bytes(n)
                        }
                        2 => {
                            let p = real[2 + rng.below(real.len() - 2)];
                            p[..rng.below(p.len() + 1)].to_vec()
                        }
                        _ => real[2 + rng.below(real.len() - 2)].to_vec(),
                    };
                    let mut rest = packet.as_slice();
                    loop {
                        let n = rest.len().min(255);
                        lacing.push(n as u8);
                        body.extend_from_slice(&rest[..n]);
                        rest = &rest[n..];
                        if n < 255 || lacing.len() == segments {
                            break;
                        }
                    }
                }
                let flags = match rng.below(4) {
                    0 => rng.next() as u8,
                    _ => u8::from(lacing.first() == Some(&255)),
                };
                let granule = match rng.below(4) {
                    0 => u64::MAX,
                    1 => rng.next(),
                    _ => u64::from(seq) * 960 * rng.below(3) as u64,
                };
                let serial = if rng.below(10) == 0 { 99 } else { 11 };
                seq = seq.wrapping_add(1 + u32::from(rng.below(20) == 0));
                b.extend(make_page(flags, granule, serial, seq - 1, &lacing, &body));
            }
            let _ = decode_ogg_opus(&b);
        }
    }

    #[test]
    fn file_from_opusenc_decodes_to_a_third_of_its_48k_length() {
        if Command::new("opusenc").arg("--version").output().is_err() {
            println!("skipped: opusenc (opus-tools) is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (wav, opus_path) = (dir.path().join("in.wav"), dir.path().join("out.opus"));
        let frames = 48_000 * 2 + 777;
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 48_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&wav, spec).unwrap();
        let tone = |i: usize| {
            let t = i as f64 / 48_000.0;
            (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16
        };
        for i in 0..frames {
            w.write_sample(tone(i)).unwrap();
            w.write_sample(tone(i)).unwrap();
        }
        w.finalize().unwrap();
        let out = Command::new("opusenc")
            .args(["--quiet", "--bitrate", "64"])
            .arg(&wav)
            .arg(&opus_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "opusenc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pcm = decode_ogg_opus(&std::fs::read(&opus_path).unwrap()).unwrap();
        let expected = frames / 3;
        assert!(
            pcm.len().abs_diff(expected) <= 320,
            "{} samples, expected {expected}",
            pcm.len()
        );
        let want: Vec<i16> = (0..pcm.len()).map(|i| tone(3 * i)).collect();
        let snr = snr_db(&want, &pcm);
        println!(
            "opusenc file: {} samples (input {frames} at 48 kHz), SNR {snr:.1} dB",
            pcm.len()
        );
        assert!(snr > 10.0, "SNR {snr:.1} dB");
    }
}
