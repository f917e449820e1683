//! File and stdin sources: WAV at any common rate, width and channel count, or raw s16le 16 kHz mono;
//! and [`open_input`], the one way to open an input file of any kind hark reads.
//!
//! A file is read as fast as the pipeline takes it (the ring waits for the consumer, so a file never
//! overruns), or at real-time speed with `--pace`, as a microphone would deliver it.
//!
//! [`open_input`] looks at the first four bytes, then at the name: `RIFF`/`RIFX`/`RF64` is WAV,
//! `fLaC` FLAC, `OggS` Ogg/Opus and `ID3` MP3, whatever the name; otherwise a name ending in
//! `.wav`/`.wave` is WAV, `.flac` FLAC, `.mp3` MP3 and `.ogg`/`.opus`/`.oga` Ogg/Opus; anything
//! else is raw s16le. WAV and raw are read here; the compressed formats by
//! [`MediaSource`]. A recognised file that does not parse is an error,
//! never read as raw noise. The bytes read to recognise a file are put back in front of it, so a
//! FIFO works for every format.

use std::fs::File;
use std::io::{self, BufReader, Chain, Cursor, Read};
use std::path::Path;

use super::input::{MAX_CHANNELS, MAX_RATE, MIN_RATE, NAME, PERIOD_MS, Pace, to_stream_samples};
use super::media::{MediaError, MediaKind, MediaSource};
use super::{CaptureError, Converter, Flow, RingWriter, SAMPLE_RATE, Source};
use crate::config::ChannelSel;

pub(crate) const STDIN_NAME: &str = "stdin";

/// The file with the bytes already read to recognise it put back in front (the file may be a
/// pipe, which cannot be reopened or rewound).
type Sniffed = Chain<Cursor<Vec<u8>>, File>;

/// What an input file is, by its first bytes and then its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Wav,
    Media(MediaKind),
    Raw,
}

/// Recognise a file from its first (up to 4) bytes, then from its extension. Pure, for tests.
fn recognise(magic: &[u8], path: &Path) -> Kind {
    if [b"RIFF", b"RIFX", b"RF64"]
        .iter()
        .any(|m| magic.starts_with(*m))
    {
        return Kind::Wav;
    }
    if magic.starts_with(b"fLaC") {
        return Kind::Media(MediaKind::Flac);
    }
    if magic.starts_with(b"OggS") {
        return Kind::Media(MediaKind::OggOpus);
    }
    if magic.starts_with(b"ID3") {
        return Kind::Media(MediaKind::Mp3);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("wav" | "wave") => Kind::Wav,
        Some("flac") => Kind::Media(MediaKind::Flac),
        Some("mp3") => Kind::Media(MediaKind::Mp3),
        Some("ogg" | "opus" | "oga") => Kind::Media(MediaKind::OggOpus),
        _ => Kind::Raw,
    }
}

/// Open any input file hark reads: WAV, FLAC, MP3, Ogg/Opus or raw s16le 16 kHz mono (see the
/// module doc for how each is recognised). The header is read now, so that a bad file is reported
/// before capture starts.
///
/// ```no_run
/// use hark::capture::file::open_input;
/// use hark::config::ChannelSel;
///
/// let source = open_input("talk.flac".as_ref(), ChannelSel::Mix, false)?;
/// println!("{} ({:?} samples at 16 kHz)", source.describe(), source.duration_samples());
/// # Ok::<(), hark::capture::CaptureError>(())
/// ```
pub fn open_input(
    path: &Path,
    channel: ChannelSel,
    pace: bool,
) -> Result<Box<dyn Source>, CaptureError> {
    let (file, magic) = open_sniffing(path)?;
    Ok(match recognise(&magic, path) {
        Kind::Wav => Box::new(FileSource::open_wav(path, file, magic, channel, pace)?),
        Kind::Raw => Box::new(FileSource::open_raw(path, file, magic, channel, pace)?),
        Kind::Media(kind) => Box::new(MediaSource::open(path, kind, file, magic, channel, pace)?),
    })
}

/// Open `path` (not a directory) and read up to 4 bytes to recognise it.
fn open_sniffing(path: &Path) -> Result<(File, Vec<u8>), CaptureError> {
    let input_err = |source| CaptureError::Input {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(input_err)?;
    if file.metadata().map_err(input_err)?.is_dir() {
        return Err(input_err(io::Error::other("is a directory")));
    }
    let mut magic = [0u8; 4];
    let n = read_full(&mut file, &mut magic).map_err(input_err)?;
    Ok((file, magic[..n].to_vec()))
}

enum Reader {
    Wav {
        wav: hound::WavReader<BufReader<Sniffed>>,
        float: bool,
        bits: u16,
    },
    Raw(Box<dyn Read + Send>),
}

/// Reads a WAV or raw file, or stdin, into the ring.
pub struct FileSource {
    name: &'static str,
    label: String,
    path: String,
    reader: Reader,
    rate: u32,
    channels: usize,
    converter: Converter,
    buf: Vec<i16>,
    bytes: Vec<u8>,
    pace: Option<Pace>,
    /// The input's length in stream samples (16 kHz), when known.
    duration: Option<u64>,
}

impl FileSource {
    /// Open `path` as WAV or raw s16le 16 kHz mono, and read its header now, so that a bad file
    /// is reported before capture starts. A FLAC, MP3 or Ogg/Opus file is an error here (rather
    /// than being read as raw noise): [`open_input`] opens any input file.
    pub fn open_path(
        path: &Path,
        channel: ChannelSel,
        pace: bool,
    ) -> Result<FileSource, CaptureError> {
        let (file, magic) = open_sniffing(path)?;
        match recognise(&magic, path) {
            Kind::Wav => Self::open_wav(path, file, magic, channel, pace),
            Kind::Raw => Self::open_raw(path, file, magic, channel, pace),
            Kind::Media(kind) => Err(CaptureError::Media {
                path: path.display().to_string(),
                source: MediaError::Unusable(format!(
                    "{kind} is read by MediaSource (open it with capture::file::open_input)"
                )),
            }),
        }
    }

    /// A WAV file whose first bytes `magic` have been read.
    fn open_wav(
        path: &Path,
        file: File,
        magic: Vec<u8>,
        channel: ChannelSel,
        pace: bool,
    ) -> Result<FileSource, CaptureError> {
        let shown = path.display().to_string();
        let file = Cursor::new(magic).chain(file);
        let wav =
            hound::WavReader::new(BufReader::new(file)).map_err(|source| CaptureError::Wav {
                path: shown.clone(),
                source,
            })?;
        let spec = wav.spec();
        let bad = if !(MIN_RATE..=MAX_RATE).contains(&spec.sample_rate) {
            Some("sample rate outside 8000..=192000 Hz")
        } else if spec.channels == 0 || spec.channels > MAX_CHANNELS {
            Some("channel count outside 1..=32")
        } else {
            None
        };
        if let Some(why) = bad {
            return Err(CaptureError::Wav {
                path: shown,
                source: hound::Error::FormatError(why),
            });
        }
        if let ChannelSel::Index(c) = channel
            && c >= u32::from(spec.channels)
        {
            return Err(CaptureError::Channel {
                path: shown,
                channel: c,
                channels: spec.channels,
            });
        }
        // The header's frame count; a file cut short delivers less (and ends with an error).
        let duration = to_stream_samples(u64::from(wav.duration()), spec.sample_rate);
        let reader = Reader::Wav {
            wav,
            float: spec.sample_format == hound::SampleFormat::Float,
            bits: spec.bits_per_sample,
        };
        let mut source = Self::new(
            NAME,
            shown,
            reader,
            spec.sample_rate,
            spec.channels.into(),
            channel,
            pace,
        )?;
        source.duration = Some(duration);
        Ok(source)
    }

    /// A raw s16le 16 kHz mono file whose first bytes `magic` have been read.
    fn open_raw(
        path: &Path,
        file: File,
        magic: Vec<u8>,
        channel: ChannelSel,
        pace: bool,
    ) -> Result<FileSource, CaptureError> {
        // A regular file's length is its duration; a pipe's is unknown.
        let duration = file
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len() / 2);
        let reader = Reader::Raw(Box::new(BufReader::new(Cursor::new(magic).chain(file))));
        let shown = path.display().to_string();
        let mut source = Self::new(NAME, shown, reader, SAMPLE_RATE, 1, channel, pace)?;
        source.duration = duration;
        Ok(source)
    }

    /// Raw s16le 16 kHz mono from standard input.
    pub(crate) fn stdin(pace: bool) -> Result<FileSource, CaptureError> {
        // A duplicate of fd 0 as a plain file: `io::Stdin` takes a lock on every read.
        use std::os::fd::AsFd;
        let fd =
            io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| CaptureError::Input {
                    path: "-".into(),
                    source,
                })?;
        let reader = Reader::Raw(Box::new(File::from(fd)));
        Self::new(
            STDIN_NAME,
            "-".into(),
            reader,
            SAMPLE_RATE,
            1,
            ChannelSel::Index(0),
            pace,
        )
    }

    fn new(
        name: &'static str,
        path: String,
        reader: Reader,
        rate: u32,
        channels: usize,
        channel: ChannelSel,
        pace: bool,
    ) -> Result<FileSource, CaptureError> {
        let period = (rate as usize * PERIOD_MS / 1000).max(1);
        Ok(FileSource {
            name,
            label: format!("{name}:{path}"),
            path,
            converter: Converter::new(rate, channels, channel, period)?,
            reader,
            rate,
            channels,
            buf: vec![0; period * channels],
            bytes: vec![0; period * channels * 2],
            pace: pace.then(|| Pace::new(rate)),
            duration: None,
        })
    }

    /// The file's own rate and channel count.
    pub(crate) fn format(&self) -> (u32, usize) {
        (self.rate, self.channels)
    }

    /// Fill `buf` with whole frames; returns the samples read (0 at end of input).
    fn fill(&mut self) -> Result<usize, CaptureError> {
        match &mut self.reader {
            Reader::Wav { wav, float, bits } => {
                let mut n = 0;
                if *float {
                    for s in wav.samples::<f32>().take(self.buf.len()) {
                        let s = s.map_err(|e| wav_err(&self.path, e))?;
                        self.buf[n] = (s * 32768.0).clamp(-32768.0, 32767.0) as i16;
                        n += 1;
                    }
                } else {
                    let bits = *bits;
                    for s in wav.samples::<i32>().take(self.buf.len()) {
                        let s = s.map_err(|e| wav_err(&self.path, e))?;
                        self.buf[n] = if bits > 16 {
                            (s >> (bits - 16)) as i16
                        } else {
                            (s << (16 - bits)) as i16
                        };
                        n += 1;
                    }
                }
                Ok(n - n % self.channels)
            }
            Reader::Raw(r) => {
                let got = read_full(r, &mut self.bytes).map_err(|source| CaptureError::Input {
                    path: self.path.clone(),
                    source,
                })?;
                let n = got / 2;
                for (dst, b) in self.buf[..n].iter_mut().zip(self.bytes.chunks_exact(2)) {
                    *dst = i16::from_le_bytes([b[0], b[1]]);
                }
                Ok(n - n % self.channels)
            }
        }
    }
}

fn wav_err(path: &str, source: hound::Error) -> CaptureError {
    CaptureError::Wav {
        path: path.to_owned(),
        source,
    }
}

/// Read until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Source for FileSource {
    fn name(&self) -> &'static str {
        self.name
    }

    fn describe(&self) -> String {
        self.label.clone()
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        // Opened (and its header read) in `open_path`; a file cannot be reopened meaningfully.
        Ok(())
    }

    fn read_period(&mut self, ring: &mut RingWriter) -> Result<Flow, CaptureError> {
        let n = self.fill()?;
        if n == 0 {
            self.converter.flush(ring);
            return Ok(Flow::EndOfInput);
        }
        if !self.converter.push(&self.buf[..n], ring) {
            return Ok(Flow::Continue);
        }
        if let Some(pace) = &mut self.pace {
            pace.wait(n / self.channels);
        }
        Ok(Flow::Continue)
    }

    fn waits_for_consumer(&self) -> bool {
        true
    }

    fn input_format(&self) -> Option<(u32, usize)> {
        Some(self.format())
    }

    fn duration_samples(&self) -> Option<u64> {
        self.duration
    }

    fn flush(&mut self, ring: &mut RingWriter) {
        self.converter.flush(ring);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_win_then_the_name_then_raw() {
        let p = |name: &str| Path::new(name).to_path_buf();
        let flac = Kind::Media(MediaKind::Flac);
        let mp3 = Kind::Media(MediaKind::Mp3);
        let ogg = Kind::Media(MediaKind::OggOpus);
        for (magic, name, kind) in [
            (&b"RIFF"[..], "x.flac", Kind::Wav),
            (b"RF64", "x", Kind::Wav),
            (b"RIFX", "x.raw", Kind::Wav),
            (b"fLaC", "x.wav", flac),
            (b"OggS", "x.mp3", ogg),
            (b"ID3\x04", "x", mp3),
            (b"\x00\x01\x02\x03", "x.WAV", Kind::Wav),
            (b"\x00\x01\x02\x03", "x.wave", Kind::Wav),
            (b"\x00\x01\x02\x03", "x.FLAC", flac),
            (b"\xff\xfb\x90\x00", "x.mp3", mp3),
            (b"\x00\x01\x02\x03", "x.ogg", ogg),
            (b"\x00\x01\x02\x03", "x.opus", ogg),
            (b"\x00\x01\x02\x03", "x.oga", ogg),
            (b"\x00\x01\x02\x03", "x.raw", Kind::Raw),
            (b"\xff\xfb\x90\x00", "/dev/stdin", Kind::Raw),
            (b"RI", "short", Kind::Raw),
            (b"", "empty.flac", flac),
            (b"", "empty", Kind::Raw),
        ] {
            assert_eq!(recognise(magic, &p(name)), kind, "{magic:?} {name}");
        }
    }

    #[test]
    fn wav_and_raw_files_know_their_duration() {
        let dir = tempfile::tempdir().unwrap();
        let wav = dir.path().join("a.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 48_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&wav, spec).unwrap();
        for _ in 0..2 * 24_000 {
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
        let source = open_input(&wav, ChannelSel::Mix, false).unwrap();
        assert_eq!(source.duration_samples(), Some(8_000));
        assert_eq!(source.input_format(), Some((48_000, 2)));

        let raw = dir.path().join("a.raw");
        std::fs::write(&raw, [0u8; 3200]).unwrap();
        let source = open_input(&raw, ChannelSel::Mix, false).unwrap();
        assert_eq!(source.duration_samples(), Some(1600));
    }

    #[test]
    fn compressed_files_through_a_fifo_are_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in.fifo");
        crate::sys::mkfifo(&fifo, 0o600).unwrap();
        // Ogg/Opus from hark's own writer, 0.5 s.
        let settings = crate::codec::EncodeSettings {
            bitrate: 24_000,
            complexity: 5,
        };
        let mut w = crate::codec::OggOpusWriter::new(Vec::new(), &settings, "t", &[], 1).unwrap();
        w.write(&[100i16; 8000]).unwrap();
        let (bytes, _) = w.finish().unwrap();
        let path = fifo.clone();
        let writer = std::thread::spawn(move || std::fs::write(path, bytes).unwrap());
        let source = open_input(&fifo, ChannelSel::Mix, false).unwrap();
        writer.join().unwrap();
        assert_eq!(source.duration_samples(), Some(8000));
    }

    #[test]
    fn open_path_refuses_compressed_files_rather_than_reading_noise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.mp3");
        std::fs::write(&path, b"ID3\x04\x00\x00\x00\x00\x00\x00").unwrap();
        let err = FileSource::open_path(&path, ChannelSel::Mix, false)
            .err()
            .unwrap();
        assert_eq!(err.code(), "bad_media");
        assert!(err.to_string().contains("open_input"), "{err}");
    }
}
