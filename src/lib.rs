//! hark: a voice-capture daemon. Microphone (ALSA), file or stdin → lock-free ring → WebRTC VAD and
//! segmenter → streaming Ogg/Opus utterances in a durable spool → JSON events on the sinks.
//!
//! The README describes the architecture and every command, key and event. The binary's `main` is thin: parsing in [`cli`],
//! each command in [`cmd`], exit decisions in `main` alone.
//!
//! ```no_run
//! use hark::{cli::RunArgs, cmd, config::Config};
//! let config = Config::load(None, &["capture.source=\"file\"".into(), "capture.file=\"in.wav\"".into()])?;
//! let summary = cmd::run::run(&config, &RunArgs::default())?;
//! println!("{} utterances", summary.utterances);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod backoff;
pub(crate) mod bus;
pub mod capture;
pub mod cli;
pub mod cmd;
pub mod codec;
pub mod config;
pub(crate) mod event;
pub(crate) mod health;
pub(crate) mod notify;
pub mod pipeline;
pub(crate) mod session;
pub mod sink;
pub mod spool;
/// The C library calls, each behind a small safe function; the only module allowed `unsafe`
/// besides the ALSA capture loop.
#[allow(unsafe_code)]
pub(crate) mod sys;
pub mod tls;
pub mod upload;
pub(crate) mod url;
pub mod vad;

/// The module layering, checked over the source files (tests only).
#[cfg(test)]
mod layers;
