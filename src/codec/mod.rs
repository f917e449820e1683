//! Encoding captured utterances to Ogg/Opus files.

pub mod decode;
pub mod ogg;
pub mod opus;

pub use opus::{EncodeError, EncodeSettings, OggOpusWriter};
