//! Ogg/Opus both ways: utterances encoded into the spool as they are captured ([`opus`] on
//! hark's own page writer, [`ogg`]), and Ogg/Opus read back as a stream of 16 kHz mono ([`decode`]
//! for the pages and packets, `head` for the OpusHead and the libopus decoder: input files, and
//! spool files for the upload's WAV fallback).
//!
//! Deliberately not here: other codecs or containers (FLAC and MP3 input are symphonia's, in
//! `capture::media`), resampling, and anything about where the bytes go.

pub mod decode;
pub(crate) mod ogg;
pub(crate) mod opus;

pub use opus::{EncodeError, EncodeSettings, OggOpusWriter};
