//! FLAC and MP3 input through symphonia: probing the file, picking its audio track, the decoder
//! with gapless trimming, and the packet timestamps that show where a damaged stream lost frames.
//! [`MediaSource`](super::MediaSource) turns the packets into periods for the ring.

use std::io;
use std::path::Path;

use symphonia::core::codecs::audio::{AudioDecoder, AudioDecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::packet::Packet;

use super::{MediaError, MediaKind};
use crate::capture::CaptureError;
use crate::capture::input::{MAX_CHANNELS, MAX_RATE, MIN_RATE};

/// A hole in the timestamps longer than this is damage, not lost frames to fill with silence.
const MAX_GAP_S: u64 = 600;

/// The longest packet assumed when the decoder does not say (an MPEG-1 layer III frame).
const DEFAULT_PACKET_FRAMES: u64 = 1152;

/// A FLAC or MP3 track: symphonia's demuxer and decoder.
pub(super) struct SymphoniaDecoder {
    format: Box<dyn FormatReader>,
    pub(super) decoder: Box<dyn AudioDecoder>,
    track: u32,
    /// Whether timestamps count frames (time base 1/rate), so a lost packet's length is known.
    pub(super) frames_timebase: bool,
    /// Where the next packet should start (frames), to see packets the demuxer lost.
    next_ts: Option<i64>,
}

impl SymphoniaDecoder {
    /// The next packet of the track; `None` at the end (or where a cut stream was cut).
    pub(super) fn next_packet(&mut self, path: &str) -> Result<Option<Packet>, CaptureError> {
        loop {
            match self.format.next_packet() {
                Ok(Some(packet)) if packet.track_id == self.track => return Ok(Some(packet)),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(None),
                // A stream cut short ends where it was cut.
                Err(SymphoniaError::IoError(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(None);
                }
                Err(SymphoniaError::IoError(source)) => {
                    return Err(CaptureError::Input {
                        path: path.to_owned(),
                        source,
                    });
                }
                Err(e) => return Err(stream_error(path, e)),
            }
        }
    }

    /// Frames missing before `packet`. The demuxer skips a damaged FLAC frame and resyncs on the
    /// next one, whose timestamp shows the hole: it is filled with silence, so later speech keeps
    /// its time. (An MP3 demuxer cannot tell: its timestamps only count the frames it found.)
    /// A jump of more than `MAX_GAP_S` is damage, not a hole.
    pub(super) fn gap(&mut self, packet: &Packet, rate: u32) -> Result<u64, String> {
        if !self.frames_timebase {
            return Ok(0);
        }
        let pts = packet.pts.get();
        let raw_dur = packet
            .dur
            .get()
            .saturating_add(packet.trim_start.get())
            .saturating_add(packet.trim_end.get());
        let mut gap = 0;
        if let Some(expected) = self.next_ts
            && pts > expected
        {
            gap = pts.abs_diff(expected);
            if gap > u64::from(rate) * MAX_GAP_S {
                return Err(format!(
                    "the stream jumps {} s ahead at {} s: damaged",
                    gap / u64::from(rate),
                    expected.max(0) as u64 / u64::from(rate)
                ));
            }
        }
        self.next_ts = Some(pts.saturating_add_unsigned(raw_dur));
        Ok(gap)
    }
}

/// What the container and codec say about the track.
pub(super) struct TrackInfo {
    pub(super) rate: u32,
    pub(super) channels: usize,
    /// Frames in the track (delay and padding excluded), when known.
    pub(super) frames: Option<u64>,
    pub(super) max_packet_frames: u64,
}

impl SymphoniaDecoder {
    /// Probe `source` (a FLAC or MP3 file), pick the first audio track with a known codec and
    /// make its decoder, with gapless trimming (MP3's encoder delay and padding removed).
    pub(super) fn open(
        source: Box<dyn symphonia::core::io::MediaSource>,
        path: &Path,
        kind: MediaKind,
    ) -> Result<(SymphoniaDecoder, TrackInfo), MediaError> {
        let mss = MediaSourceStream::new(source, MediaSourceStreamOptions::default());
        let mut hint = Hint::new();
        let ext = path.extension().and_then(|e| e.to_str());
        hint.with_extension(ext.unwrap_or(match kind {
            MediaKind::Mp3 => "mp3",
            _ => "flac",
        }));
        let format = symphonia::default::get_probe().probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )?;
        let unusable = |why: &str| MediaError::Unusable(why.to_owned());
        let track = format
            .first_track_known_codec(TrackType::Audio)
            .ok_or_else(|| unusable("no audio track with a known codec"))?;
        let params = track
            .codec_params
            .as_ref()
            .and_then(|p| p.audio())
            .ok_or_else(|| unusable("no audio track with a known codec"))?;
        let rate = params
            .sample_rate
            .ok_or_else(|| unusable("the audio track declares no sample rate"))?;
        let channels = params
            .channels
            .as_ref()
            .map(|c| c.count())
            .ok_or_else(|| unusable("the audio track declares no channel count"))?;
        if !(MIN_RATE..=MAX_RATE).contains(&rate) {
            return Err(MediaError::Unusable(format!(
                "sample rate {rate} Hz outside 8000..=192000 Hz"
            )));
        }
        if channels == 0 || channels > usize::from(MAX_CHANNELS) {
            return Err(MediaError::Unusable(format!(
                "channel count {channels} outside 1..=32"
            )));
        }
        let frames_timebase = track
            .time_base
            .is_some_and(|tb| tb.numer.get() == 1 && tb.denom.get() == rate);
        let frames = track.num_frames;
        let track_id = track.id;
        // So that a damaged first FLAC frame is seen too.
        let start_ts = track.start_ts.get();
        let options = AudioDecoderOptions::default().gapless(true);
        let decoder = symphonia::default::get_codecs().make_audio_decoder(params, &options)?;
        let max_packet_frames = decoder
            .codec_params()
            .max_frames_per_packet
            .or(params.max_frames_per_packet)
            .unwrap_or(DEFAULT_PACKET_FRAMES);
        let info = TrackInfo {
            rate,
            channels,
            frames,
            max_packet_frames,
        };
        Ok((
            SymphoniaDecoder {
                format,
                decoder,
                track: track_id,
                frames_timebase,
                next_ts: Some(start_ts),
            },
            info,
        ))
    }
}

/// A demuxer or decoder error that ends the input (damaged data is handled where it occurs).
pub(super) fn stream_error(path: &str, e: SymphoniaError) -> CaptureError {
    let source = match e {
        SymphoniaError::ResetRequired => {
            MediaError::Unusable("the stream changes its format mid-way".into())
        }
        e => e.into(),
    };
    CaptureError::Media {
        path: path.to_owned(),
        source,
    }
}
