//! File and stdin sources: WAV at any common rate, width and channel count, or raw s16le 16 kHz mono.
//!
//! A file is read as fast as the pipeline takes it (the ring waits for the consumer, so a file never
//! overruns), or at real-time speed with `--pace`, as a microphone would deliver it. A file whose name
//! ends in `.wav` or that starts with a RIFF tag must parse as WAV; anything else is raw s16le.

use std::fs::File;
use std::io::{self, BufReader, Chain, Cursor, Read};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{CaptureError, Converter, Flow, RingWriter, SAMPLE_RATE, Source};
use crate::config::ChannelSel;

pub const NAME: &str = "file";
pub const STDIN_NAME: &str = "stdin";

/// Frames read per period: 20 ms at the file's rate.
const PERIOD_MS: usize = 20;

/// The file with the bytes already read to recognise it put back in front (the file may be a
/// pipe, which cannot be reopened or rewound).
type Sniffed = Chain<Cursor<Vec<u8>>, File>;

/// What a WAV header may declare; beyond this it is broken or hostile, not a recording.
const MAX_RATE: u32 = 192_000;
const MIN_RATE: u32 = 8_000;
const MAX_CHANNELS: u16 = 32;

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
}

struct Pace {
    start: Option<Instant>,
    frames: u64,
}

impl FileSource {
    /// Open `path` and read its header now, so that a bad file is reported before capture starts.
    pub fn open_path(
        path: &Path,
        channel: ChannelSel,
        pace: bool,
    ) -> Result<FileSource, CaptureError> {
        let shown = path.display().to_string();
        let input_err = |source| CaptureError::Input {
            path: shown.clone(),
            source,
        };
        let mut file = File::open(path).map_err(input_err)?;
        if file.metadata().map_err(input_err)?.is_dir() {
            return Err(input_err(io::Error::other("is a directory")));
        }
        let mut magic = [0u8; 4];
        let n = read_full(&mut file, &mut magic).map_err(input_err)?;
        let by_name = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("wav") || e.eq_ignore_ascii_case("wave"));
        let by_magic = n == 4 && matches!(&magic, b"RIFF" | b"RIFX" | b"RF64");
        let file = Cursor::new(magic[..n].to_vec()).chain(file);
        if by_name || by_magic {
            let wav = hound::WavReader::new(BufReader::new(file)).map_err(|source| {
                CaptureError::Wav {
                    path: shown.clone(),
                    source,
                }
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
            let reader = Reader::Wav {
                wav,
                float: spec.sample_format == hound::SampleFormat::Float,
                bits: spec.bits_per_sample,
            };
            Self::new(
                NAME,
                shown,
                reader,
                spec.sample_rate,
                spec.channels.into(),
                channel,
                pace,
            )
        } else {
            let reader = Reader::Raw(Box::new(BufReader::new(file)));
            Self::new(NAME, shown, reader, SAMPLE_RATE, 1, channel, pace)
        }
    }

    /// Raw s16le 16 kHz mono from standard input.
    pub fn stdin(pace: bool) -> Result<FileSource, CaptureError> {
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
            pace: pace.then_some(Pace {
                start: None,
                frames: 0,
            }),
        })
    }

    /// The file's own rate and channel count.
    pub fn format(&self) -> (u32, usize) {
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
            let start = *pace.start.get_or_insert_with(Instant::now);
            pace.frames += (n / self.channels) as u64;
            let due = start + Duration::from_micros(pace.frames * 1_000_000 / u64::from(self.rate));
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Ok(Flow::Continue)
    }

    fn waits_for_consumer(&self) -> bool {
        true
    }

    fn flush(&mut self, ring: &mut RingWriter) {
        self.converter.flush(ring);
    }
}
