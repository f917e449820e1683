//! The command line: `hark [run]`, `transcribe`, `upload`, `check-config`, `devices`. Parsing only; what each command does
//! lives in [`crate::cmd`] and is decided in `main`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Voice-capture daemon: microphone → VAD → Ogg/Opus utterances → JSON events.
#[derive(Debug, Parser)]
#[command(name = "hark", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run(RunArgs),
    /// Cut a recording (WAV, FLAC, MP3, Ogg/Opus) into utterances, transcribe them N at a time,
    /// and write the transcript in the recording's timeline (JSON, JSON lines, text, SRT, WebVTT).
    /// Running it again on the same file uploads only what is not transcribed yet.
    Transcribe(TranscribeArgs),
    /// Upload every utterance waiting in the spool, emit the transcripts, and exit (1 when some
    /// are still waiting because no endpoint answered, or failed for good).
    Upload,
    /// Parse and validate a config; print the effective config with secrets redacted.
    CheckConfig {
        /// The config file (default: -c, else /etc/hark/hark.toml when it exists, else built-in).
        file: Option<PathBuf>,
    },
    /// List ALSA capture devices and the rates and channel counts they accept.
    Devices {
        /// Probe only this PCM (e.g. plughw:CARD=Device,DEV=0).
        #[arg(short = 'd', long = "device")]
        device: Option<String>,
    },
}

#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// Config file [default: /etc/hark/hark.toml when it exists, else built-in defaults].
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Set any config key, dotted, e.g. -s vad.silence_ms=600 (repeatable).
    #[arg(short = 's', long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short = 'q', long = "quiet", global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
}

#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// WAV, FLAC, MP3, Ogg/Opus or raw s16le 16 kHz mono file, or - for stdin (overrides
    /// capture.source).
    #[arg(short = 'i', long = "input", value_name = "PATH")]
    pub input: Option<String>,
    /// ALSA PCM name (overrides capture.device, selects capture.source = alsa).
    #[arg(short = 'd', long = "device", value_name = "PCM")]
    pub device: Option<String>,
    /// Do not upload: keep the Ogg files in the spool and emit events.
    #[arg(long = "record-only")]
    pub record_only: bool,
    /// Feed a file at real-time speed, as a microphone would.
    #[arg(long = "pace")]
    pub pace: bool,
}

/// `hark transcribe`'s output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One document: every utterance with offset, duration, text, segments and words.
    Json,
    /// The daemon's events, one per line.
    Jsonl,
    /// The text of each utterance, one per line.
    Text,
    /// SubRip subtitles.
    Srt,
    /// WebVTT subtitles.
    Vtt,
}

#[derive(Debug, Args, Clone)]
pub struct TranscribeArgs {
    /// The recording: WAV (any common rate and channel count), FLAC, MP3 or Ogg/Opus.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Write the result here [default: stdout]. With --record-only: the directory for the
    /// utterances [default: FILE's name + .hark, in the current directory].
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Output format [default: from -o's extension (.srt, .vtt, .txt, .jsonl), else json].
    #[arg(short = 'f', long = "format", value_enum)]
    pub format: Option<Format>,
    /// Uploads at a time.
    #[arg(short = 'j', long = "jobs", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// Do not upload: write the utterances as Ogg files plus timeline.json, for later upload
    /// (`hark upload -s spool.dir=DIR`).
    #[arg(long = "record-only")]
    pub record_only: bool,
    /// Where transcripts are kept so that a second run resumes [default:
    /// $XDG_CACHE_HOME/hark/transcribe, else ~/.cache/hark/transcribe].
    #[arg(long = "cache-dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Upload every utterance again, even those the cache has (the cache is still updated).
    #[arg(long = "no-cache")]
    pub no_cache: bool,
}

impl RunArgs {
    /// Whether any run flag was given (they mean nothing to the other subcommands).
    pub fn any(&self) -> bool {
        self.input.is_some() || self.device.is_some() || self.record_only || self.pace
    }
}

impl GlobalArgs {
    /// The config file to read: -c, else /etc/hark/hark.toml when it exists.
    pub fn config_path(&self, explicit: Option<PathBuf>) -> Option<PathBuf> {
        explicit.or_else(|| self.config.clone()).or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG);
            default.exists().then_some(default)
        })
    }
}

pub(crate) const DEFAULT_CONFIG: &str = "/etc/hark/hark.toml";

/// The rest of what a man page would say: files, signals, exit codes.
const AFTER_HELP: &str = "\
Files: /etc/hark/hark.toml (config; `hark check-config` prints every key), /var/lib/hark/spool
(spool.dir), $CREDENTIALS_DIRECTORY/api_key (the API key from systemd's LoadCredential=).
Signals: SIGTERM/SIGINT stop (the open utterance is kept), SIGHUP reloads the config.
Exit codes: 0 ok, 2 usage, 78 bad config, 69 audio device unavailable, 1 other.
Documentation: /usr/share/doc/hark/README.md; the events, every config key and the API in
/usr/share/doc/hark/docs/ (events.md, config.md, api.md).";
