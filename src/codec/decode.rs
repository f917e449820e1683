//! Reading Ogg/Opus (RFC 7845) as a stream of 16 kHz mono 16-bit PCM.
//!
//! [`OggOpusReader`] pulls pages from any [`Read`] as samples are asked for
//! and decodes one Opus packet at a time, so it holds one page's packets
//! whatever the length of the input: `hark transcribe` and `hark run -i` read
//! Ogg/Opus files through it like WAV, FLAC and MP3.
//! [`decode_ogg_opus`] and [`ogg_opus_to_wav`] run it over a file in memory
//! (a spool file: the upload's WAV fallback, written with hound, and tests).
//! It reads hark's own files (written by
//! [`OggOpusWriter`](super::opus::OggOpusWriter)) as well as Ogg/Opus files
//! from other encoders such as `opusenc`.
//!
//! The `ogg` crate demuxes: its [`PageParser`] checks each page's version and
//! CRC and splits the body by its lacing values, its [`BasePacketReader`]
//! joins packets across pages. The crate's `PacketReader` (the same two
//! behind a reader) is not used because it checks less than hark did: it
//! skips up to 150 KB of damaged bytes to find the next page (audio lost
//! without an error), takes a file cut inside a page header for a clean end,
//! hides page sequence numbers (a missing page goes unseen) and the offset of
//! a bad page, and needs a seekable input (no pipes). So the reader here
//! reads each page at a known offset and checks the capture pattern,
//! sequence numbers, packet continuation and truncation itself.
//!
//! Decoding is libopus at 16 kHz, downmixed to mono, with the OpusHead
//! output gain; the pre-skip is dropped and each page's audio is trimmed to
//! its granule position, so a file from `OggOpusWriter` decodes to exactly
//! the samples that were written.
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
//! - seek, or resynchronise after damaged data (a bad page is an error, not
//!   a gap).

mod head;

use std::collections::VecDeque;
use std::io::{self, Cursor, Read};
use std::sync::Arc;

use ogg::OggReadError;
use ogg::reading::{BasePacketReader, OggPage, PageParser, PageParsingOptions};

use super::ogg::{FLAG_BOS, FLAG_CONTINUED, FLAG_EOS, HEADER_LEN, PageHeader};
use super::opus::SAMPLE_RATE;
use head::{Head, OpusDecoder};

/// Ogg/Opus granule positions count 48 kHz samples: 3 per output sample.
const GRANULE_PER_SAMPLE: u64 = 48_000 / SAMPLE_RATE as u64;
/// Longest Opus packet (120 ms) in output samples per channel: the most
/// samples one [`OggOpusReader::read`] appends.
pub(crate) const MAX_PACKET_SAMPLES: usize = SAMPLE_RATE as usize * 120 / 1000;
/// Most output samples a file decoded into memory may have (4 hours). A few
/// bytes of Opus can stand for 120 ms of audio, so without a limit a small
/// hostile file could make [`decode_ogg_opus`] allocate gigabytes. (The
/// stream itself has no limit: it holds no more for a longer input.)
const MAX_SAMPLES: usize = SAMPLE_RATE as usize * 4 * 3600;
/// Longest packet accepted, in bytes of the pages it spans (it is held whole
/// until it ends). An Opus audio packet is at most 61 KB without padding;
/// OpusTags may carry cover art.
const MAX_PACKET_BYTES: usize = 16 << 20;

/// Why an Ogg/Opus file could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The input does not start with an Ogg page (`OggS`).
    #[error("not an Ogg file (no \"OggS\" at the start)")]
    NotOgg,
    /// The page starting at byte `offset` is damaged: no capture pattern,
    /// an unknown Ogg version, or a CRC mismatch.
    #[error("bad Ogg page at byte {offset}: {reason}")]
    BadPage { offset: u64, reason: &'static str },
    /// The input ends inside the page starting at byte `offset`, or (with
    /// `offset` = input length) before the Opus headers are complete.
    #[error("input truncated inside the Ogg page or headers at byte {offset}")]
    Truncated { offset: u64 },
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
    /// OpusTags, a packet over 16 MB); `offset` is the byte offset of the
    /// page.
    #[error("bad Ogg/Opus stream at byte {offset}: {reason}")]
    BadStream { offset: u64, reason: &'static str },
    /// The audio of a file decoded into memory is longer than 4 hours.
    #[error("decoded audio longer than 4 hours")]
    TooLong,
    /// libopus rejected a packet or setting.
    #[error("opus decoder: {0}")]
    Opus(#[from] opus::Error),
    /// Reading the input failed.
    #[error("reading the Ogg/Opus input: {0}")]
    Io(#[from] io::Error),
    /// hound could not write the WAV file.
    #[error("writing the WAV file: {0}")]
    Wav(#[from] hound::Error),
}

/// Decodes a whole Ogg/Opus file to mono 16-bit samples at 16 kHz.
///
/// Stereo is downmixed by libopus; single-stream files with other channel
/// mappings (family 1 or 255 with one Opus stream) are mixed to the mean of
/// their output channels. The OpusHead output gain is applied. A decoded
/// sample is kept when its 48 kHz timestamp lies at or after the pre-skip and
/// before its page's granule position (counted from the stream's first
/// sample), i.e. the pre-skip becomes `ceil(pre_skip / 3)` samples at 16 kHz,
/// which is exact for hark's files (their pre-skip is a multiple of 3), and
/// the last page's granule position trims the end.
///
/// Truncation: input that ends inside a page is [`DecodeError::Truncated`].
/// A stream that ends at a page boundary without an end-of-stream page is
/// accepted and decodes to the audio of its complete pages (a packet left
/// unfinished on the last page is dropped): hark writes pages while an
/// utterance is captured, so that is what a spool file cut short by a crash
/// looks like, and its pages are good audio. Zero-length packets carry no
/// audio and are skipped; pages without a granule position (-1) are fine.
pub fn decode_ogg_opus(bytes: &[u8]) -> Result<Vec<i16>, DecodeError> {
    let mut reader = OggOpusReader::new(bytes)?;
    let mut pcm = Vec::new();
    while reader.read(&mut pcm)? {
        if pcm.len() > MAX_SAMPLES {
            return Err(DecodeError::TooLong);
        }
    }
    Ok(pcm)
}

/// Decodes a whole Ogg/Opus file (as [`decode_ogg_opus`]) into a complete
/// 16-bit PCM mono WAV file at 16 kHz, written by hound packet by packet as
/// it is decoded: the upload's fallback for servers that refuse Ogg.
pub(crate) fn ogg_opus_to_wav(bytes: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut reader = OggOpusReader::new(bytes)?;
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = Cursor::new(Vec::new());
    let mut wav = hound::WavWriter::new(&mut out, spec)?;
    let mut pcm = Vec::with_capacity(MAX_PACKET_SAMPLES);
    let mut samples = 0usize;
    loop {
        pcm.clear();
        if !reader.read(&mut pcm)? {
            break;
        }
        // Also keeps the data under the 4 GiB that a WAV header can count.
        samples += pcm.len();
        if samples > MAX_SAMPLES {
            return Err(DecodeError::TooLong);
        }
        for &s in &pcm {
            wav.write_sample(s)?;
        }
    }
    wav.finalize()?;
    Ok(out.into_inner())
}

/// Reads one Ogg/Opus stream from `R`, decoding as samples are asked for.
///
/// [`new`](Self::new) reads up to the first audio page (the headers are
/// checked, and a file that is not Ogg/Opus fails there); each
/// [`read`](Self::read) decodes one packet, reading the next page when the
/// last one is used up. An error ends the stream (read no further): the
/// audio read before it was good.
///
/// End trimming is by each page's granule position, applied to that page's
/// audio as it is decoded. RFC 7845 allows a granule position smaller than
/// the audio decoded through its page only on the last page, so for a valid
/// stream that is the same as trimming the whole output to the last page's
/// granule position (what this decoder did when it decoded whole files); a
/// page before the last that does it has its own audio trimmed.
pub(crate) struct OggOpusReader<R> {
    input: R,
    /// Byte offset of the next page in the input.
    offset: u64,
    parse_opts: Arc<PageParsingOptions>,
    packets: BasePacketReader,
    serial: u32,
    next_sequence: u32,
    /// Offset of the last page of the stream read.
    page_offset: u64,
    /// A page of the stream has been read.
    started: bool,
    /// The last page of the stream ended inside a packet.
    in_packet: bool,
    /// Bytes of the pages that the unfinished packet spans (a bound on its
    /// length).
    packet_bytes: usize,
    /// Packets completed so far (0: OpusHead, 1: OpusTags, then audio).
    count: u64,
    /// Created from the OpusHead packet.
    decoder: Option<OpusDecoder>,
    /// Audio packets of the last page read that are not decoded yet, and
    /// the samples they decode to.
    queue: VecDeque<Vec<u8>>,
    queued: u64,
    /// Samples decoded so far, the pre-skip included.
    decoded: u64,
    /// Decoded samples dropped at the start: the pre-skip at 16 kHz.
    skip: u64,
    /// Granule position of the first decoded sample (from the first audio
    /// page that has a granule position).
    base: Option<u64>,
    /// Decoded samples from this count on are dropped (end trimming by the
    /// granule position of the page being decoded); `None`: keep all.
    limit: Option<u64>,
    /// The end-of-stream page was read.
    eos: bool,
    /// No more pages: the end-of-stream page or the end of the input.
    ended: bool,
}

/// One page read and checked (CRC included), not yet given to the packet
/// reader.
struct Page {
    offset: u64,
    header: PageHeader,
    /// The last packet on the page goes on in the next page.
    ends_in_packet: bool,
    body_len: usize,
    /// The page's first packet starts with `OpusHead`.
    opus_head: bool,
    page: OggPage,
}

impl<R: Read> OggOpusReader<R> {
    /// Reads pages up to the first audio page: finds the Opus stream (the
    /// first logical stream that begins with OpusHead) and checks its
    /// headers.
    pub(crate) fn new(input: R) -> Result<Self, DecodeError> {
        let mut r = Self {
            input,
            offset: 0,
            parse_opts: Arc::new(PageParsingOptions::default()),
            packets: BasePacketReader::new(),
            serial: 0,
            next_sequence: 0,
            page_offset: 0,
            started: false,
            in_packet: false,
            packet_bytes: 0,
            count: 0,
            decoder: None,
            queue: VecDeque::new(),
            queued: 0,
            decoded: 0,
            skip: 0,
            base: None,
            limit: None,
            eos: false,
            ended: false,
        };
        loop {
            let Some(page) = r.read_page()? else {
                return Err(DecodeError::NoOpusHead);
            };
            if page.header.flags & FLAG_BOS == 0 {
                // All streams begin before any data page does.
                return Err(DecodeError::NoOpusHead);
            }
            if page.opus_head {
                r.serial = page.header.serial;
                r.next_sequence = page.header.sequence;
                r.stream_page(page)?;
                break;
            }
            // Another multiplexed stream.
        }
        while r.count < 2 {
            if r.eos {
                return Err(DecodeError::BadStream {
                    offset: r.page_offset,
                    reason: "stream ends before its OpusTags packet",
                });
            }
            if r.ended {
                return Err(DecodeError::Truncated { offset: r.offset });
            }
            r.next_page()?;
        }
        // The first audio page: its granule position gives the stream's start.
        if r.queue.is_empty() && !r.ended {
            r.next_page()?;
        }
        Ok(r)
    }

    /// Decodes the next packet and appends its samples that are kept (none
    /// for a packet inside the pre-skip, at most [`MAX_PACKET_SAMPLES`]) to
    /// `out`. Returns `false` at the end of the stream.
    pub(crate) fn read(&mut self, out: &mut Vec<i16>) -> Result<bool, DecodeError> {
        loop {
            if let Some(packet) = self.queue.pop_front() {
                let Some(decoder) = self.decoder.as_mut() else {
                    return Ok(false); // Unreachable: no audio before OpusHead.
                };
                let pcm = decoder.decode(&packet)?;
                let first = self.decoded;
                let n = pcm.len() as u64;
                self.decoded += n;
                self.queued = self.queued.saturating_sub(n);
                let from = self.skip.saturating_sub(first).min(n);
                let to = self.limit.map_or(n, |l| l.saturating_sub(first).min(n));
                if from < to {
                    out.extend_from_slice(pcm.get(from as usize..to as usize).unwrap_or_default());
                }
                return Ok(true);
            }
            if self.ended {
                return Ok(false);
            }
            self.next_page()?;
        }
    }

    /// How many samples the stream decodes to, going by the granule position
    /// of its last page in `tail` (the last bytes of the input, or all of
    /// it); `None` if `tail` holds no complete page of the stream with one.
    /// A measure of progress: a damaged or cut stream delivers less.
    pub(crate) fn length_from_tail(&self, tail: &[u8]) -> Option<u64> {
        let granule = (0..tail.len())
            .rev()
            .filter(|&at| tail[at..].starts_with(b"OggS"))
            .find_map(|at| self.granule_of_page_at(&tail[at..]))?;
        let base = self.base.unwrap_or(0);
        let end = granule.saturating_sub(base).div_ceil(GRANULE_PER_SAMPLE);
        Some(end.saturating_sub(self.skip))
    }

    /// The granule position of the page `bytes` starts with, if it is a
    /// complete page of the stream (CRC checked) and has one.
    fn granule_of_page_at(&self, bytes: &[u8]) -> Option<u64> {
        let head: &[u8; HEADER_LEN] = bytes.first_chunk()?;
        let header = PageHeader::parse(head);
        if header.serial != self.serial || i64::try_from(header.granule).is_err() {
            return None;
        }
        let (mut parser, segments) =
            PageParser::new_with_parse_opts(*head, Arc::clone(&self.parse_opts)).ok()?;
        let lacing = bytes.get(HEADER_LEN..HEADER_LEN + segments)?;
        let body_len = parser.parse_segments(lacing.to_vec());
        let start = HEADER_LEN + segments;
        let body = bytes.get(start..start + body_len)?;
        parser.parse_packet_data(body.to_vec()).ok()?;
        Some(header.granule)
    }

    /// Reads pages until one of the stream (which it takes in) or the end.
    fn next_page(&mut self) -> Result<(), DecodeError> {
        while let Some(page) = self.read_page()? {
            if page.header.serial == self.serial {
                return self.stream_page(page);
            }
        }
        self.ended = true;
        Ok(())
    }

    /// Reads the page at `self.offset` and checks it; `None` at the end of
    /// the input (at a page boundary).
    fn read_page(&mut self) -> Result<Option<Page>, DecodeError> {
        let offset = self.offset;
        let truncated = DecodeError::Truncated { offset };
        let mut head = [0u8; HEADER_LEN];
        let n = read_full(&mut self.input, &mut head)?;
        let got = head.get(..n).unwrap_or_default();
        if offset == 0 && !got.starts_with(b"OggS") {
            return Err(DecodeError::NotOgg);
        }
        if n == 0 {
            return Ok(None);
        }
        if !got.starts_with(b"OggS") {
            return Err(if b"OggS".starts_with(got) {
                truncated
            } else {
                DecodeError::BadPage {
                    offset,
                    reason: "no capture pattern \"OggS\"",
                }
            });
        }
        if n < HEADER_LEN {
            return Err(truncated);
        }
        let header = PageHeader::parse(&head);
        let (mut parser, segments) =
            PageParser::new_with_parse_opts(head, Arc::clone(&self.parse_opts))
                .map_err(|e| page_error(e, offset))?;
        let mut lacing = vec![0; segments];
        if read_full(&mut self.input, &mut lacing)? < segments {
            return Err(truncated);
        }
        let ends_in_packet = match lacing.last() {
            Some(&last) => last == 255,
            // No segment: the page is all inside the packet it continues.
            None => header.flags & FLAG_CONTINUED != 0,
        };
        let body_len = parser.parse_segments(lacing);
        let mut body = vec![0; body_len];
        if read_full(&mut self.input, &mut body)? < body_len {
            return Err(truncated);
        }
        let opus_head = body.starts_with(b"OpusHead");
        let page = parser
            .parse_packet_data(body)
            .map_err(|e| page_error(e, offset))?;
        self.offset = offset.saturating_add((HEADER_LEN + segments + body_len) as u64);
        Ok(Some(Page {
            offset,
            header,
            ends_in_packet,
            body_len,
            opus_head,
            page,
        }))
    }

    /// Takes in a page of the stream: checks it follows the one before,
    /// hands the packets that end on it to the header parsing or the decode
    /// queue, and sets the end trimming for its audio.
    fn stream_page(&mut self, page: Page) -> Result<(), DecodeError> {
        let offset = page.offset;
        let bad = |reason| DecodeError::BadStream { offset, reason };
        let header = page.header;
        self.page_offset = offset;
        if header.sequence != self.next_sequence {
            return Err(bad("page sequence number out of order (missing page?)"));
        }
        self.next_sequence = header.sequence.wrapping_add(1);
        match (header.flags & FLAG_CONTINUED != 0, self.in_packet) {
            (true, false) => return Err(bad("page continues a packet that never started")),
            (false, true) => return Err(bad("page does not continue the unfinished packet")),
            _ => {}
        }
        if self.started && header.flags & FLAG_BOS != 0 {
            return Err(bad("beginning-of-stream flag on a later page"));
        }
        self.started = true;
        self.packets
            .push_page(page.page)
            .map_err(|_| bad("page does not fit the stream before it"))?;

        let before = self.count;
        while let Some(packet) = self.packets.read_packet() {
            self.packet(packet.data, offset)?;
        }
        self.packet_bytes = match (page.ends_in_packet, self.count > before) {
            (false, _) => 0,
            (true, true) => page.body_len,
            (true, false) => self.packet_bytes.saturating_add(page.body_len),
        };
        if self.packet_bytes > MAX_PACKET_BYTES {
            return Err(bad("packet longer than 16 MB"));
        }
        self.in_packet = page.ends_in_packet;
        self.eos = header.flags & FLAG_EOS != 0;
        self.ended = self.eos;

        // Granule positions of pages on which audio packets end; -1 (no
        // packet ends here) and other negative values are ignored.
        self.limit = None;
        let audio_ended = self.count > before.max(2);
        if audio_ended && i64::try_from(header.granule).is_ok() {
            let base = match self.base {
                Some(base) => base,
                None => {
                    let decoded = (self.decoded + self.queued).saturating_mul(GRANULE_PER_SAMPLE);
                    let base = match header.granule.checked_sub(decoded) {
                        Some(base) => base,
                        // Less audio than decoded: end trimming on a stream
                        // whose only audio page is the last one (RFC 7845 4.5).
                        None if self.eos => 0,
                        None => {
                            return Err(bad("granule position smaller than the audio before it"));
                        }
                    };
                    *self.base.insert(base)
                }
            };
            let end = header.granule.saturating_sub(base);
            self.limit = Some(end.div_ceil(GRANULE_PER_SAMPLE));
        }
        Ok(())
    }

    /// One packet completed on the page at `offset`.
    fn packet(&mut self, packet: Vec<u8>, offset: u64) -> Result<(), DecodeError> {
        let index = self.count;
        self.count += 1;
        match index {
            0 => {
                let head = Head::parse(&packet)?;
                self.skip = u64::from(head.pre_skip).div_ceil(GRANULE_PER_SAMPLE);
                self.decoder = Some(OpusDecoder::new(&head)?);
            }
            1 => {
                if !packet.starts_with(b"OpusTags") {
                    return Err(DecodeError::BadStream {
                        offset,
                        reason: "second packet is not OpusTags",
                    });
                }
            }
            _ => {
                // An empty packet has no TOC byte, so no duration: nothing to
                // decode (libopus would take it for a lost packet of unknown
                // length).
                if let (Some(decoder), false) = (&self.decoder, packet.is_empty()) {
                    self.queued += decoder.samples(&packet)? as u64;
                    self.queue.push_back(packet);
                }
            }
        }
        Ok(())
    }
}

/// The error for a page the `ogg` crate rejects.
fn page_error(e: OggReadError, offset: u64) -> DecodeError {
    let bad = |reason| DecodeError::BadPage { offset, reason };
    match e {
        OggReadError::HashMismatch(..) => bad("CRC mismatch"),
        OggReadError::InvalidStreamStructVer(_) => bad("unknown Ogg version"),
        OggReadError::NoCapturePatternFound => bad("no capture pattern \"OggS\""),
        OggReadError::ReadError(e) => DecodeError::Io(e),
        OggReadError::InvalidData => DecodeError::BadStream {
            offset,
            reason: "page does not fit the stream before it",
        },
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..).filter(|rest| !rest.is_empty()) {
        match input.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::ogg::tests::parse;
    use crate::codec::ogg::{OggPageWriter, crc32_update};
    use crate::codec::opus::{EncodeSettings, OggOpusWriter};
    use std::cell::Cell;
    use std::ops::Range;
    use std::process::Command;
    use std::rc::Rc;

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
    fn wav_from_ogg_round_trips_through_hound() {
        let inputs = [
            noise(1234, 3),
            Vec::new(),
            sine(16_000 * 2 + 77, 8000.0),
            // Full scale both ways: hound must write the extremes as they come.
            (0..4000)
                .map(|i| if i % 40 < 20 { i16::MAX } else { i16::MIN })
                .collect(),
        ];
        for input in inputs {
            let ogg = hark_file(&input, 4);
            let pcm = decode_ogg_opus(&ogg).unwrap();
            let wav = ogg_opus_to_wav(&ogg).unwrap();
            assert_eq!(wav.len(), 44 + 2 * pcm.len());
            let mut r = hound::WavReader::new(std::io::Cursor::new(wav)).unwrap();
            let spec = hound::WavSpec {
                channels: 1,
                sample_rate: 16_000,
                bits_per_sample: 16,
                sample_format: hound::SampleFormat::Int,
            };
            assert_eq!(r.spec(), spec);
            assert_eq!(r.duration() as usize, input.len());
            let got: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
            assert_eq!(got, pcm);
        }
        assert!(matches!(
            ogg_opus_to_wav(b"RIFF not Ogg"),
            Err(DecodeError::NotOgg)
        ));
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
                        assert_eq!(offset, r.start as u64);
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
            Err(DecodeError::BadPage { offset, .. }) if offset == pages[2].start as u64
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
                    matches!(result, Err(DecodeError::Truncated { offset }) if offset == r.start as u64),
                    "cut {cut}: {result:?}"
                ),
                None if cut < pages[1].end => assert!(
                    matches!(result, Err(DecodeError::Truncated { offset }) if offset == cut as u64),
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
            ogg_opus_to_wav(&hark_file(&noise(100, 1), 1)).unwrap(),
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
            Err(DecodeError::BadStream { offset, .. }) if offset == p[2].start as u64
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

    /// Input handed out at most `step` bytes a call, counting what was
    /// read; an error once `fail_at` bytes are read.
    struct Trickle<'a> {
        data: &'a [u8],
        pos: Rc<Cell<usize>>,
        step: usize,
        fail_at: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let pos = self.pos.get();
            if pos >= self.fail_at {
                return Err(io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.step).min(self.data.len() - pos);
            buf[..n].copy_from_slice(&self.data[pos..pos + n]);
            self.pos.set(pos + n);
            Ok(n)
        }
    }

    #[test]
    fn the_reader_pulls_pages_only_as_samples_are_taken() {
        // 20 s in hark's pages of 1 s: head, tags, then 21 audio pages.
        let input = noise(16_000 * 20, 5);
        let bytes = hark_file(&input, 8);
        let pages = page_ranges(&bytes);
        let whole = decode_ogg_opus(&bytes).unwrap();
        assert_eq!(whole.len(), input.len());
        let pos = Rc::new(Cell::new(0));
        let trickle = Trickle {
            data: &bytes,
            pos: pos.clone(),
            step: 7,
            fail_at: usize::MAX,
        };
        let mut reader = OggOpusReader::new(trickle).unwrap();
        // The headers and the first audio page, nothing more.
        assert_eq!(pos.get(), pages[2].end);
        let mut out = Vec::new();
        let mut reads = 0;
        loop {
            let before = out.len();
            if !reader.read(&mut out).unwrap() {
                break;
            }
            reads += 1;
            assert!(out.len() - before <= MAX_PACKET_SAMPLES);
            // Audio page k (from 0) holds second k: never more than the page
            // of the samples handed out, and the one after it, is read.
            let ahead = (out.len() / 16_000 + 3).min(pages.len() - 1);
            assert!(
                pos.get() <= pages[ahead].end,
                "{} bytes read for {} samples",
                pos.get(),
                out.len()
            );
        }
        assert_eq!(out, whole);
        assert_eq!(reads, 20 * 50 + 1, "one read per 20 ms packet");
        assert_eq!(pos.get(), bytes.len());
        assert!(!reader.read(&mut out).unwrap(), "ended stays ended");

        // A read error is an error (not an end), with the reader's message.
        let trickle = Trickle {
            data: &bytes,
            pos: Rc::new(Cell::new(0)),
            step: 1000,
            fail_at: pages[5].start + 3,
        };
        let mut reader = OggOpusReader::new(trickle).unwrap();
        let mut out = Vec::new();
        let err = loop {
            match reader.read(&mut out) {
                Ok(true) => {}
                Ok(false) => panic!("ended without the error"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, DecodeError::Io(_)), "{err}");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(out, whole[..out.len()]);
    }

    #[test]
    fn length_from_the_last_page_is_the_decoded_length() {
        for n in [0usize, 1, 321, 16_000 * 3 + 7] {
            let bytes = hark_file(&noise(n, 2), 6);
            let reader = OggOpusReader::new(bytes.as_slice()).unwrap();
            assert_eq!(reader.length_from_tail(&bytes), Some(n as u64), "n = {n}");
            let last = page_ranges(&bytes).pop().unwrap();
            let tail = &bytes[last.clone()];
            assert_eq!(reader.length_from_tail(tail), Some(n as u64), "n = {n}");
            // The last page cut, damaged, or of another stream: not taken.
            assert_eq!(reader.length_from_tail(&tail[..tail.len() - 1]), None);
            let mut damaged = tail.to_vec();
            damaged[HEADER_LEN + 3] ^= 1;
            assert_eq!(reader.length_from_tail(&damaged), None);
            let other = hark_file(&noise(n, 2), 7);
            assert_eq!(reader.length_from_tail(&other), None);
            assert_eq!(reader.length_from_tail(b""), None);
        }
        // A cut file: the last complete page counts.
        let bytes = hark_file(&noise(16_000 * 3, 2), 6);
        let pages = page_ranges(&bytes);
        let cut = &bytes[..pages[3].end + 10];
        let reader = OggOpusReader::new(cut).unwrap();
        let decoded = decode_ogg_opus(&bytes[..pages[3].end]).unwrap();
        assert_eq!(reader.length_from_tail(cut), Some(decoded.len() as u64));

        // A stream whose first sample is not at granule 0 (cut from a longer
        // one): its length is counted from its start.
        let n = 16_000 * 2 + 99;
        let (packets, pre_skip) = encode_packets(&sine(n, 8000.0), false);
        let late: Vec<(Vec<u8>, u64)> = packets
            .into_iter()
            .map(|(p, g)| (p, g + 48_000 * 3600))
            .collect();
        let bytes = mux(&opus_head(1, pre_skip, 0, 0, &[]), &late, 5, 50);
        assert_eq!(decode_ogg_opus(&bytes).unwrap().len(), n);
        let reader = OggOpusReader::new(bytes.as_slice()).unwrap();
        assert_eq!(reader.length_from_tail(&bytes), Some(n as u64));
    }

    #[test]
    fn file_from_opusenc_decodes_to_a_third_of_its_48k_length() {
        // Like every tool the tests need, a missing opusenc fails the test: nothing is skipped.
        assert!(
            Command::new("opusenc").arg("--version").output().is_ok(),
            "`opusenc` not found: install opus-tools (apt-get install opus-tools)"
        );
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
