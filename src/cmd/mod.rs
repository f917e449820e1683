//! The commands, one module each, saying what is special about each: `run` (the daemon),
//! `upload`, `transcribe`, `devices` and `check-config`. They share the [`Session`] that starts and
//! stops the stages, and one error type whose variants map to exit codes.
//!
//! Nothing here prints to stdout or exits, except a command's own result: errors go back to `main`.
//!
//! [`Session`]: crate::session::Session

pub mod check_config;
pub mod devices;
pub mod run;
pub mod transcribe;
pub mod upload;

use std::io;
use std::path::PathBuf;

use crate::capture::CaptureError;
use crate::config::ConfigError;
use crate::session::StartError;
use crate::sink::mqtt::MqttError;
use crate::sink::socket::SocketError;
use crate::spool::SpoolError;
use crate::upload::{Report, SetupError};
use transcribe::render::Counts;

/// Why a command did not do its whole job. Each maps to an exit code in `main`
/// ([`Error::exit_code`]: sysexits 78 for configuration, 69 for a missing device, 2 for usage).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad config or command-line override: exit 78.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The input cannot be read, or broke off: exit 1.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// No capture device at all: exit 69.
    #[error("{0}")]
    NoDevice(String),
    /// The spool (or cache, or record-only) directory is unusable: exit 1.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Transcription is misconfigured (keys, trust roots, speakers): exit 78.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// No API key for the endpoint (`hark transcribe`): exit 78.
    #[error("{0}; or use --record-only to cut the recording without uploading")]
    NoKey(String),
    /// The MQTT output is misconfigured (URL, password or CA file): exit 78.
    #[error(transparent)]
    Mqtt(MqttError),
    /// The event socket cannot be made: exit 78 (`socket_group`, a path too long) or 1.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// Options that do not go together: exit 2.
    #[error("{0}")]
    Usage(String),
    /// A file of ours (output, cache, timeline) cannot be written: exit 1.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A thread or the signal handler could not be started: exit 1.
    #[error("cannot start {what}: {source}")]
    Start {
        what: &'static str,
        source: io::Error,
    },
    /// `hark run` or `hark upload` left utterances behind: exit 1.
    #[error(
        "{} utterances failed for good (see spool/failed/), {} still wait in the spool",
        .0.failed,
        .0.waiting
    )]
    UploadsLeft(Report),
    /// Utterances the spool could not write (each reported when it happened): exit 1.
    #[error(
        "{count} utterances could not be written to {} (see the errors above) and are missing \
         from the output",
        dir.display()
    )]
    Unwritten { count: u64, dir: PathBuf },
    /// `hark transcribe`: some utterances have no transcript (the output says which): exit 1.
    #[error(
        "{} of {} utterances failed for good and {} were not transcribed (endpoints down); \
         the output marks them, and running the same command again uploads only those",
        .0.failed, .0.utterances, .0.pending
    )]
    Incomplete(Counts),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Setup(_) | Error::NoKey(_) | Error::Mqtt(_) => 78,
            Error::NoDevice(_) => 69,
            Error::Usage(_) => 2,
            Error::Socket(e) => e.exit_code(),
            _ => 1,
        }
    }
}

impl From<StartError> for Error {
    fn from(e: StartError) -> Error {
        match e {
            StartError::Spool(e) => Error::Spool(e),
            StartError::Socket(e) => Error::Socket(e),
            StartError::Mqtt(e) => Error::Mqtt(e),
            StartError::Thread { what, source } => Error::Start { what, source },
        }
    }
}
