//! The OpusHead packet (RFC 7845 section 5.1) and the libopus decoder it sets up: which stream is
//! decoded, with what output gain, and how its one or two coded channels become mono. The reader in
//! [`decode`](super) owns the pages and packets; this file owns what one packet decodes to.

use super::{DecodeError, MAX_PACKET_SAMPLES};
use crate::codec::opus::SAMPLE_RATE;

/// The OpusHead fields the decoder needs.
pub(super) struct Head {
    /// In 48 kHz samples.
    pub(super) pre_skip: u16,
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
    pub(super) fn parse(p: &[u8]) -> Result<Self, DecodeError> {
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
pub(super) struct OpusDecoder {
    opus: opus::Decoder,
    /// Channels decoded by libopus; 1 if it downmixes.
    coded: usize,
    /// `Some((weights, channels))` to mix `coded` channels (see [`Layout`]).
    mix: Option<([i32; 2], i32)>,
    /// One packet of interleaved samples.
    buf: Vec<i16>,
    /// One packet mixed to mono (for `mix`).
    mono: Vec<i16>,
}

impl OpusDecoder {
    pub(super) fn new(head: &Head) -> Result<Self, DecodeError> {
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
            mono: vec![0; if mix.is_some() { MAX_PACKET_SAMPLES } else { 0 }],
        })
    }

    /// The samples (per channel) that `packet` decodes to.
    pub(super) fn samples(&self, packet: &[u8]) -> Result<usize, DecodeError> {
        Ok(self.opus.get_nb_samples(packet)?)
    }

    /// Decodes one (non-empty) audio packet to mono.
    pub(super) fn decode(&mut self, packet: &[u8]) -> Result<&[i16], DecodeError> {
        let n = self.opus.decode(packet, &mut self.buf, false)?;
        let Some((weights, channels)) = self.mix else {
            return Ok(self.buf.get(..n).unwrap_or_default());
        };
        let frames = self.buf.chunks_exact(self.coded).take(n);
        for (out, f) in self.mono.iter_mut().zip(frames) {
            let sum: i32 = f.iter().zip(weights).map(|(&x, w)| i32::from(x) * w).sum();
            *out = (sum / channels.max(1)).clamp(i16::MIN.into(), i16::MAX.into()) as i16;
        }
        Ok(self.mono.get(..n).unwrap_or_default())
    }
}
