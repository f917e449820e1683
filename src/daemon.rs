//! Control: builds the stages from the config, runs them, handles signals and periodic status,
//! and stops them in order (capture, dsp flush, sinks). Also the `devices` listing.
//!
//! Nothing here prints to stdout or exits: results and errors go back to `main`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::capture::alsa::{self, AlsaSource, DeviceInfo};
use crate::capture::file::FileSource;
use crate::capture::{CaptureError, SAMPLE_RATE, Source};
use crate::cli::RunArgs;
use crate::config::{Config, ConfigError, Source as SourceKind};

use crate::encode::EncodeSettings;
use crate::event::{EventKind, Events, State};
use crate::pipeline::{DspConfig, Pipeline, Summary};
use crate::sink::{self, SinkHandle, stdout::StdoutSink};
use crate::spool::{Spool, SpoolError};
use crate::vad::segmenter::Settings;

/// Errors that end a command. Each maps to an exit code in `main`.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A bad config or command-line override: exit 78.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The input cannot be read (file source): exit 1.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// No capture device at all: exit 69.
    #[error("{0}")]
    NoDevice(String),
    /// The spool directory is unusable: exit 1.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A thread or the signal handler could not be started: exit 1.
    #[error("cannot start {what}: {source}")]
    Start {
        what: &'static str,
        source: std::io::Error,
    },
}

impl DaemonError {
    /// The process exit code for this error (sysexits: 78 config, 69 unavailable).
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) => 78,
            DaemonError::NoDevice(_) => 69,
            _ => 1,
        }
    }
}

/// The run flags (-i, -d) as config overrides, applied after every `-s` so that they win.
pub fn run_overrides(args: &RunArgs) -> Vec<String> {
    let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out = Vec::new();
    if let Some(input) = &args.input {
        if input == "-" {
            out.push("capture.source=\"stdin\"".to_owned());
        } else {
            out.push("capture.source=\"file\"".to_owned());
            out.push(format!("capture.file={}", quote(input)));
        }
    }
    if let Some(device) = &args.device {
        out.push("capture.source=\"alsa\"".to_owned());
        out.push(format!("capture.device={}", quote(device)));
    }
    out
}

enum Control {
    Signal(i32),
    PipelineDone,
}

/// Run the daemon until end of input or a stop signal. Returns what the dsp thread did.
pub fn run(config: &Config, args: &RunArgs) -> Result<Summary, DaemonError> {
    let started = Instant::now();
    let device = config.device_id();

    let mut handles: Vec<SinkHandle> = Vec::new();
    let mut queues = Vec::new();
    if config.output.stdout {
        let (queue, handle) = sink::spawn(Box::new(StdoutSink::new(config.output.format)))
            .map_err(|source| DaemonError::Start {
                what: "the stdout sink",
                source,
            })?;
        queues.push(queue);
        handles.push(handle);
    }
    let events = Events::new(device, queues);

    let spool = Arc::new(Spool::open(&config.spool.dir, config.spool.max_bytes)?);
    let (source, opened) = open_source(config, args)?;
    let label = source.describe();
    if args.record_only {
        tracing::info!("record-only: utterances stay in {}", spool.dir().display());
    } else {
        tracing::info!(
            "transcription is not part of this build yet; utterances stay in {}",
            spool.dir().display()
        );
    }

    let (tx, rx) = mpsc::channel();
    let signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|source| {
            DaemonError::Start {
                what: "signal handling",
                source,
            }
        })?;
    let signal_handle = signals.handle();
    let signal_tx = tx.clone();
    let signal_thread = std::thread::Builder::new()
        .name("hark-signals".into())
        .spawn(move || {
            let mut signals = signals;
            for sig in signals.forever() {
                if signal_tx.send(Control::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| DaemonError::Start {
            what: "the signal thread",
            source,
        })?;

    let ring_samples = u64::from(config.capture.ring_ms) * u64::from(SAMPLE_RATE) / 1000;
    let ring_samples = usize::try_from(ring_samples).unwrap_or(usize::MAX).max(1);
    let pipeline = Pipeline::start(
        source,
        opened,
        ring_samples,
        dsp_config(config, label),
        spool.clone(),
        events.clone(),
        (tx, Control::PipelineDone),
    )
    .map_err(|source| DaemonError::Start {
        what: "the capture and dsp threads",
        source,
    })?;

    let status = |events: &Events| {
        let shared = pipeline.shared();
        let (pending, bytes) = spool.usage();
        events.emit(EventKind::Status {
            // A file that ended is not a fault; a device being reopened is.
            state: if shared.capturing.load(Ordering::Acquire)
                || shared.finished.load(Ordering::Acquire)
            {
                State::Online
            } else {
                State::Degraded
            },
            overruns: shared.overruns.load(Ordering::Relaxed),
            spool_pending: pending,
            spool_bytes: bytes,
            uptime_s: started.elapsed().as_secs(),
        });
    };

    let every = match config.output.status_interval_s {
        0 => Duration::from_secs(365 * 24 * 3600),
        s => Duration::from_secs(u64::from(s)),
    };
    let mut next_status = Instant::now() + every;
    let mut stopping = false;
    loop {
        let wait = next_status.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Control::Signal(SIGHUP)) => {
                tracing::info!("SIGHUP: reloading the config is not supported yet; ignored");
            }
            Ok(Control::Signal(sig)) => {
                if !stopping {
                    tracing::info!("signal {sig}: closing the open utterance and stopping");
                    pipeline.stop();
                    stopping = true;
                }
            }
            Ok(Control::PipelineDone) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                status(&events);
                next_status = Instant::now() + every;
            }
        }
    }
    status(&events);
    let shared = pipeline.shared().clone();
    let summary = pipeline.join();
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    signal_handle.close();
    let _ = signal_thread.join();
    tracing::info!(
        "done: {} utterances kept, {} dropped, {:.1} s of audio",
        summary.utterances,
        summary.dropped,
        summary.samples as f64 / f64::from(SAMPLE_RATE)
    );
    events.close();
    drop(handles);
    match fatal {
        // The input broke off (a truncated file): what came before is spooled, but say so.
        Some(e) => Err(DaemonError::Capture(e)),
        None => Ok(summary),
    }
}

/// Open the configured source. A file that cannot be read is an error now; a device that cannot
/// be opened is reported and retried by the capture thread.
fn open_source(config: &Config, args: &RunArgs) -> Result<(Box<dyn Source>, bool), DaemonError> {
    let c = &config.capture;
    Ok(match c.source {
        SourceKind::File => {
            let source = FileSource::open_path(&c.file, c.channel, args.pace)?;
            let (rate, channels) = source.format();
            tracing::info!("reading {} ({rate} Hz, {channels} ch)", c.file.display());
            (Box::new(source), true)
        }
        SourceKind::Stdin => (Box::new(FileSource::stdin(args.pace)?), true),
        SourceKind::Alsa => {
            // Opened by the capture thread, which reports a missing device and retries.
            let source =
                AlsaSource::new(&c.device, c.sample_rate, c.channels, c.channel, c.period_ms);
            (Box::new(source), false)
        }
    })
}

fn dsp_config(config: &Config, source: String) -> DspConfig {
    let v = &config.vad;
    DspConfig {
        segmenter: Settings::from_ms(
            v.frame_ms,
            v.start_ms,
            v.silence_ms,
            v.pre_roll_ms,
            v.min_utterance_ms,
            v.max_utterance_ms,
            v.min_level_dbfs,
        ),
        vad_mode: v.mode.min(3) as u8,
        encode: EncodeSettings {
            bitrate: config.encode.bitrate as i32,
            complexity: config.encode.complexity as i32,
        },
        source,
    }
}

/// `hark devices`: the capture devices as a table, or `NoDevice` when there are none.
pub fn devices(only: Option<&str>) -> Result<String, DaemonError> {
    let list: Vec<DeviceInfo> = match only {
        Some(name) => vec![DeviceInfo {
            name: name.to_owned(),
            description: String::new(),
            caps: alsa::probe(name),
        }],
        None => alsa::list_devices(),
    };
    if list.is_empty() {
        return Err(DaemonError::NoDevice(
            "no ALSA capture devices found (is a microphone plugged in, and is the user in group audio?)"
                .into(),
        ));
    }
    let mut out = format!(
        "{:<36} {:<28} {:<10} {}\n",
        "DEVICE", "RATES (Hz)", "CHANNELS", "DESCRIPTION"
    );
    for d in &list {
        let (rates, channels) = match &d.caps {
            Ok(c) => {
                let common: Vec<String> = c.rates.iter().map(u32::to_string).collect();
                let mut rates = if c.rate_min == c.rate_max {
                    c.rate_min.to_string()
                } else {
                    format!("{}-{}", c.rate_min, c.rate_max)
                };
                if !common.is_empty() && c.rate_min != c.rate_max {
                    rates = format!("{rates} ({})", common.join(","));
                }
                let channels = if c.channels_min == c.channels_max {
                    c.channels_min.to_string()
                } else {
                    format!("{}-{}", c.channels_min, c.channels_max)
                };
                let s16 = if c.s16 {
                    ""
                } else {
                    " [no S16_LE: use plughw]"
                };
                (rates, format!("{channels}{s16}"))
            }
            Err(e) => (format!("unavailable: {e}"), String::new()),
        };
        out.push_str(&format!(
            "{:<36} {:<28} {:<10} {}\n",
            d.name, rates, channels, d.description
        ));
    }
    Ok(out)
}
