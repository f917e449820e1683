//! Control: builds the stages from the config, runs them, handles signals and periodic status,
//! and stops them in order (capture, dsp flush, upload, sinks). Also `upload` and `devices`.
//!
//! Nothing here prints to stdout or exits: results and errors go back to `main`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use crate::capture::alsa::{self, AlsaSource, DeviceInfo};
use crate::capture::file::{FileSource, open_input};
use crate::capture::{CaptureError, SAMPLE_RATE, Shared, Source};
use crate::cli::RunArgs;
use crate::config::{Config, ConfigError, Source as SourceKind};

use crate::bus::Events;
use crate::codec::EncodeSettings;
use crate::event::{EventKind, State};
use crate::notify::{self, Beat};
use crate::pipeline::{DspConfig, DspUpdate, Pipeline, Summary};
use crate::sink::mqtt::{MqttError, MqttSink};
use crate::sink::socket::{self, SocketSink};
use crate::sink::{self, SinkHandle, stdout::StdoutSink};
use crate::spool::{Spool, SpoolError};
use crate::upload::{self, OnState, Patience, Report, Setup, SetupError, Uploader};
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
    /// Transcription is misconfigured (keys, trust roots, speakers): exit 78.
    #[error(transparent)]
    Transcribe(#[from] SetupError),
    /// The MQTT output is misconfigured (URL, password or CA file): exit 78.
    #[error(transparent)]
    Mqtt(MqttError),
    /// `hark upload` left utterances behind: exit 1.
    #[error(
        "{} utterances failed for good (see spool/failed/), {} still wait in the spool",
        .0.failed,
        .0.waiting
    )]
    Incomplete(Report),
    /// The event socket cannot be made: exit 78 (`socket_group`, a path too long) or 1.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    /// `hark transcribe` did not finish its job: its own exit code.
    #[error(transparent)]
    Batch(crate::cmd::transcribe::BatchError),
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
            DaemonError::Config(_) | DaemonError::Transcribe(_) | DaemonError::Mqtt(_) => 78,
            DaemonError::NoDevice(_) => 69,
            DaemonError::Socket(e) => e.exit_code(),
            DaemonError::Batch(e) => e.exit_code(),
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
    UploadDone,
    /// A sink stopped by itself (stdout closed by its reader).
    SinkGone(&'static str),
}

/// How long a stop signal leaves the upload in flight (and the last utterance) to finish.
const UPLOAD_GRACE: Duration = Duration::from_secs(5);

/// What `status` events report, shared by the control loop and the upload thread.
struct Board {
    started: Instant,
    spool: Arc<Spool>,
    events: Events,
    capture: OnceLock<Arc<Shared>>,
    upload_down: AtomicBool,
    dropped: sink::Dropped,
}

impl Board {
    fn new(started: Instant, spool: &Arc<Spool>, sinks: &Sinks) -> Arc<Board> {
        let board = Arc::new(Board {
            started,
            spool: spool.clone(),
            events: sinks.events.clone(),
            dropped: sinks.dropped.clone(),
            capture: OnceLock::new(),
            upload_down: AtomicBool::new(false),
        });
        // A socket client's first line; weak, so that the sinks do not keep the board alive.
        let weak = Arc::downgrade(&board);
        sinks
            .status
            .set(Box::new(move || weak.upgrade().map(|b| b.status_kind())));
        board
    }

    fn emit(&self) {
        self.events.emit(self.status_kind());
    }

    /// The `status` event as of now, without emitting it.
    fn status_kind(&self) -> EventKind {
        let (pending, bytes) = self.spool.usage();
        let (capture_ok, overruns) = match self.capture.get() {
            // A file that ended is not a fault; a device being reopened is.
            Some(shared) => (
                shared.capturing.load(Ordering::Acquire) || shared.finished.load(Ordering::Acquire),
                shared.overruns.load(Ordering::Relaxed),
            ),
            None => (true, 0),
        };
        let state = if capture_ok && !self.upload_down.load(Ordering::Acquire) {
            State::Online
        } else {
            State::Degraded
        };
        EventKind::Status {
            state,
            overruns,
            spool_pending: pending,
            spool_bytes: bytes,
            events_dropped: self.dropped.get(),
            uptime_s: self.started.elapsed().as_secs(),
        }
    }

    /// The upload thread's callback: record the transition and report it at once.
    fn on_upload_state(board: &Arc<Board>) -> OnState {
        let board = board.clone();
        Arc::new(move |down| {
            board.upload_down.store(down, Ordering::Release);
            board.emit();
        })
    }
}

/// The sinks and the handle that feeds them. Dropping it (also on an early error return) closes
/// the queues first, so that each sink drains what it holds and ends at once.
struct Sinks {
    events: Events,
    handles: Vec<SinkHandle>,
    /// How many sinks were started; each `SinkGone` takes one away.
    running: usize,
    dropped: sink::Dropped,
    /// How a sink builds a `status` event of its own (a socket client's first line).
    status: socket::StatusSource,
    reporter: sink::Reporter,
}

impl Sinks {
    /// Note that a sink ended; `true` when none is left (nothing would see hark's events).
    fn gone(&mut self, name: &str) -> bool {
        self.running = self.running.saturating_sub(1);
        tracing::info!("the {name} sink stopped; {} left", self.running);
        self.running == 0
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.events.close();
        self.handles.clear();
    }
}

/// Start the configured sinks; each tells `control` when it stops by itself.
fn start_sinks(config: &Config, control: &Sender<Control>) -> Result<Sinks, DaemonError> {
    let dropped = sink::Dropped::default();
    let reporter = sink::Reporter::default();
    let status = socket::StatusSource::default();
    let (queues, handles) = build_sinks(config, control, &dropped, &reporter, &status)?;
    let events = Events::new(config.device_id(), queues);
    reporter.set(&events);
    Ok(Sinks {
        events,
        running: handles.len(),
        handles,
        dropped,
        status,
        reporter,
    })
}

/// The sink threads of `config.output`, sharing the drop counter, reporter and status source.
fn build_sinks(
    config: &Config,
    control: &Sender<Control>,
    dropped: &sink::Dropped,
    reporter: &sink::Reporter,
    status: &socket::StatusSource,
) -> Result<(Vec<sink::SinkQueue>, Vec<SinkHandle>), DaemonError> {
    let mut handles: Vec<SinkHandle> = Vec::new();
    let mut queues = Vec::new();
    let mut backends: Vec<Box<dyn sink::Sink>> = Vec::new();
    if config.output.stdout {
        backends.push(Box::new(StdoutSink::new(config.output.format)));
    }
    if !config.output.socket.as_os_str().is_empty() {
        let sink = SocketSink::bind(
            &config.output,
            status.clone(),
            reporter.clone(),
            dropped.clone(),
        )?;
        backends.push(Box::new(sink));
    }
    if !config.output.mqtt.url.is_empty() {
        let mqtt = &config.output.mqtt;
        let device = config.device_id();
        let sink = MqttSink::start(mqtt, &device, dropped.clone(), reporter.clone()).map_err(
            |e| match e {
                MqttError::Start(source) => DaemonError::Start {
                    what: "the MQTT connection thread",
                    source,
                },
                e => DaemonError::Mqtt(e),
            },
        )?;
        backends.push(Box::new(sink));
    }
    for backend in backends {
        let tx = control.clone();
        let on_end: sink::OnEnd = Box::new(move |name, _| {
            let _ = tx.send(Control::SinkGone(name));
        });
        let (queue, handle) =
            sink::spawn(backend, dropped.clone(), on_end).map_err(|source| DaemonError::Start {
                what: "a sink thread",
                source,
            })?;
        queues.push(queue);
        handles.push(handle);
    }
    Ok((queues, handles))
}

impl Sinks {
    /// Replace the sinks by those of `new` (SIGHUP). The old ones drain and stop first (a socket
    /// path or an MQTT client id can be the same); if the new ones cannot start, those of `old`
    /// are started again. Returns whether `new` is in effect.
    fn restart(&mut self, new: &Config, old: &Config, control: &Sender<Control>) -> bool {
        drop(self.events.take_queues());
        self.handles.clear();
        let built = build_sinks(new, control, &self.dropped, &self.reporter, &self.status);
        let (applied, (queues, handles)) = match built {
            Ok(sinks) => (true, sinks),
            Err(e) => {
                tracing::error!("SIGHUP: the new outputs cannot start: {e}; the old ones again");
                let again = build_sinks(old, control, &self.dropped, &self.reporter, &self.status);
                (
                    false,
                    again.unwrap_or_else(|e| {
                        tracing::error!("SIGHUP: the old outputs cannot start either: {e}");
                        (Vec::new(), Vec::new())
                    }),
                )
            }
        };
        self.running = handles.len();
        self.handles = handles;
        self.events.set_queues(queues);
        applied
    }
}

/// A thread that turns SIGTERM, SIGINT and SIGHUP into `Control::Signal` messages.
struct SignalThread {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SignalThread {
    fn start(tx: Sender<Control>) -> Result<SignalThread, DaemonError> {
        let signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|source| {
                DaemonError::Start {
                    what: "signal handling",
                    source,
                }
            })?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("hark-signals".into())
            .spawn(move || {
                let mut signals = signals;
                for sig in signals.forever() {
                    if tx.send(Control::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| DaemonError::Start {
                what: "the signal thread",
                source,
            })?;
        Ok(SignalThread {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalThread {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn upload_start(e: upload::StartError) -> DaemonError {
    match e {
        upload::StartError::Spool(e) => DaemonError::Spool(e),
        upload::StartError::Thread(source) => DaemonError::Start {
            what: "the upload thread",
            source,
        },
    }
}

/// Set up transcription for `hark run`: `None` records only (asked for, or no key for a cloud API).
fn transcription(config: &Config, args: &RunArgs) -> Result<Option<Setup>, DaemonError> {
    if args.record_only {
        return Ok(None);
    }
    let setup = Setup::from_config(&config.transcribe)?;
    if setup.is_none() {
        tracing::warn!("{}", upload::no_key_hint(&config.transcribe));
    }
    Ok(setup)
}

/// Loads the config again (the same file and overrides) when SIGHUP comes.
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError>>;

/// Run the daemon until end of input (and every upload) or a stop signal. Returns what the dsp
/// thread did.
pub fn run(config: &Config, args: &RunArgs) -> Result<Summary, DaemonError> {
    run_with_reload(config, args, None)
}

/// [`run`], reloading the config with `reload` on SIGHUP.
pub fn run_with_reload(
    config: &Config,
    args: &RunArgs,
    reload: Option<Reload>,
) -> Result<Summary, DaemonError> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    let mut sinks = start_sinks(config, &tx)?;
    let events = sinks.events.clone();
    let spool = Arc::new(Spool::open(&config.spool.dir, config.spool.max_bytes)?);
    let setup = transcription(config, args)?;
    let (source, opened) = open_source(config, args)?;
    let label = source.describe();
    let board = Board::new(started, &spool, &sinks);

    let signals = SignalThread::start(tx.clone())?;
    let uploader = match setup {
        Some(setup) => {
            if let Some(endpoint) = setup.endpoints.first() {
                tracing::info!("transcribing with {} ({})", endpoint.shown, endpoint.model);
            }
            Some(
                Uploader::start(
                    setup,
                    spool.clone(),
                    events.clone(),
                    upload::Options {
                        patience: Patience::Forever,
                        keep_audio: config.spool.keep_audio,
                        workers: 1,
                        on_state: Board::on_upload_state(&board),
                        on_result: None,
                    },
                    (tx.clone(), Control::UploadDone),
                )
                .map_err(upload_start)?,
            )
        }
        None => {
            tracing::info!("record-only: utterances stay in {}", spool.dir().display());
            None
        }
    };

    let ring_samples = u64::from(config.capture.ring_ms) * u64::from(SAMPLE_RATE) / 1000;
    let ring_samples = usize::try_from(ring_samples).unwrap_or(usize::MAX).max(1);
    let mut dsp = dsp_config(config, label);
    dsp.uploads = uploader.as_ref().map(Uploader::submitter);
    dsp.announce_audio = uploader.is_none() || config.spool.keep_audio;
    let pipeline = Pipeline::start(
        source,
        opened,
        ring_samples,
        dsp,
        spool.clone(),
        events.clone(),
        (tx.clone(), Control::PipelineDone),
    )
    .map_err(|source| DaemonError::Start {
        what: "the capture and dsp threads",
        source,
    })?;
    let _ = board.capture.set(pipeline.shared().clone());
    let mut sd = notify::Service::from_env(Instant::now());

    let every = match config.output.status_interval_s {
        0 => Duration::from_secs(365 * 24 * 3600),
        s => Duration::from_secs(u64::from(s)),
    };
    let mut next_status = Instant::now() + every;
    let mut current = config.clone();
    let mut stop_by: Option<Instant> = None;
    let mut pipeline_done = false;
    let mut upload_done = uploader.is_none();
    while !(pipeline_done && upload_done) {
        notify_poll(&mut sd, &board, pipeline.shared());
        let mut wake = sd.next_wake().map_or(next_status, |t| t.min(next_status));
        // The deadline is the uploads'; the pipeline's own flush is bounded by its stop.
        if let (true, Some(deadline)) = (pipeline_done, stop_by) {
            if Instant::now() >= deadline {
                tracing::warn!(
                    "the upload in flight did not finish in time; it stays in the spool"
                );
                break;
            }
            wake = wake.min(deadline);
        }
        match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(Control::Signal(SIGHUP)) => match &reload {
                Some(load) => {
                    current = reconfigure(
                        &current,
                        load(),
                        &pipeline,
                        uploader.as_ref(),
                        &mut sinks,
                        &tx,
                    );
                    board.emit();
                }
                None => tracing::info!("SIGHUP: there is no config to reload"),
            },
            Ok(Control::Signal(sig)) => {
                sd.stopping();
                if stop_by.is_none() {
                    tracing::info!("signal {sig}: closing the open utterance and stopping");
                    pipeline.stop();
                    stop_by = Some(Instant::now() + UPLOAD_GRACE);
                } else {
                    // A second signal: stop now.
                    stop_by = Some(Instant::now());
                }
                if let (true, Some(u), Some(deadline)) = (pipeline_done, &uploader, stop_by) {
                    u.stop(deadline);
                }
            }
            Ok(Control::SinkGone(name)) => {
                // `hark | head -1`: nobody sees the events any more; stop as on SIGTERM.
                if sinks.gone(name) && stop_by.is_none() {
                    tracing::info!("no sink is left to take events; stopping");
                    sd.stopping();
                    pipeline.stop();
                    let deadline = Instant::now() + UPLOAD_GRACE;
                    stop_by = Some(deadline);
                    if let (true, Some(u)) = (pipeline_done, &uploader) {
                        u.stop(deadline);
                    }
                }
            }
            Ok(Control::PipelineDone) => {
                pipeline_done = true;
                if let Some(u) = &uploader {
                    match stop_by {
                        Some(deadline) => u.stop(deadline),
                        None => u.finish(),
                    }
                }
            }
            Ok(Control::UploadDone) => upload_done = true,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                if Instant::now() >= next_status {
                    board.emit();
                    next_status = Instant::now() + every;
                }
            }
        }
    }
    sd.stopping();
    board.emit();
    let shared = pipeline.shared().clone();
    let summary = pipeline.join();
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    drop(signals);
    tracing::info!(
        "done: {} utterances kept, {} dropped, {:.1} s of audio",
        summary.utterances,
        summary.dropped,
        summary.samples as f64 / f64::from(SAMPLE_RATE)
    );
    let mut failed = Report::default();
    if let Some(u) = uploader {
        if upload_done {
            let r = u.join();
            tracing::info!(
                "uploads: {} transcribed, {} failed, {} waiting in the spool",
                r.transcribed,
                r.failed,
                r.waiting
            );
            failed.failed = r.failed;
        } else {
            u.detach();
        }
    }
    drop(sinks);
    match fatal {
        // The input broke off (a truncated file): what came before is spooled, but say so.
        Some(e) => Err(DaemonError::Capture(e)),
        // Utterances that failed for good: the run did not do its job for them (a stop by
        // signal is a normal end whatever happened before).
        None if failed.failed > 0 && stop_by.is_none() => Err(DaemonError::Incomplete(failed)),
        None => Ok(summary),
    }
}

/// Apply a reloaded config: vad and encode settings go to the dsp thread (from its next utterance),
/// `[transcribe]` to the upload thread; what needs a restart is named in a log line and keeps its
/// running value. A config that does not load is refused (an `error` event) and the old one stays.
/// Returns the config now in effect.
fn reconfigure(
    old: &Config,
    loaded: Result<Config, ConfigError>,
    pipeline: &Pipeline,
    uploader: Option<&Uploader>,
    sinks: &mut Sinks,
    control: &Sender<Control>,
) -> Config {
    let events = sinks.events.clone();
    let new = match loaded {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; the running config stays");
            events.emit(EventKind::Error {
                stage: crate::event::Stage::Config,
                code: "reload_failed",
                message: format!("{e}; the running config stays"),
                retrying: false,
            });
            return old.clone();
        }
    };
    let mut restart = Vec::new();
    let mut now = new.clone();
    if new.device_id != old.device_id {
        restart.push("device_id");
        now.device_id = old.device_id.clone();
    }
    if new.capture != old.capture {
        restart.push("[capture] (device, rate, channels, ...)");
        now.capture = old.capture.clone();
    }
    if new.vad.frame_ms != old.vad.frame_ms {
        restart.push("vad.frame_ms");
        now.vad.frame_ms = old.vad.frame_ms;
    }
    if new.spool != old.spool {
        restart.push("[spool]");
        now.spool = old.spool.clone();
    }
    if new.output != old.output {
        if sinks.restart(&now, old, control) {
            tracing::info!("SIGHUP: outputs restarted with the new settings");
        } else {
            events.emit(EventKind::Error {
                stage: crate::event::Stage::Config,
                code: "reload_failed",
                message: "the new [output] settings could not start; the old outputs run".into(),
                retrying: false,
            });
            now.output = old.output.clone();
        }
    }
    let dsp = dsp_config(&now, String::new());
    pipeline.reconfigure(DspUpdate {
        segmenter: dsp.segmenter,
        vad_mode: dsp.vad_mode,
        encode: dsp.encode,
    });
    if now.transcribe != old.transcribe {
        let applied = match uploader {
            // Keys and trust roots are read only when there is an upload thread to take them.
            Some(u) => match Setup::from_config(&now.transcribe) {
                Ok(Some(setup)) => {
                    u.reconfigure(setup);
                    true
                }
                Ok(None) => {
                    let why = upload::no_key_hint(&now.transcribe);
                    tracing::error!("SIGHUP: {why}; the running [transcribe] stays");
                    false
                }
                Err(e) => {
                    tracing::error!("SIGHUP: {e}; the running [transcribe] stays");
                    false
                }
            },
            None => {
                restart.push("[transcribe] (transcription was off at start)");
                false
            }
        };
        if !applied {
            now.transcribe = old.transcribe.clone();
        }
    }
    if !restart.is_empty() {
        tracing::warn!(
            "SIGHUP: these settings change only with a restart, their running values stay: {}",
            restart.join(", ")
        );
    }
    tracing::info!("SIGHUP: config reloaded");
    now
}

/// sd_notify on each wake of the control loop: READY once capture started (or its device's first
/// open failed: STATUS then says degraded), STATUS on change, WATCHDOG while capture and dsp move.
fn notify_poll(sd: &mut notify::Service, board: &Board, shared: &Shared) {
    let beat = |done: &AtomicBool, count: &AtomicU64| {
        if done.load(Ordering::Acquire) {
            Beat::Done
        } else {
            Beat::Count(count.load(Ordering::Relaxed))
        }
    };
    sd.poll(
        Instant::now(),
        shared.started.load(Ordering::Acquire),
        || board.notify_facts(shared),
        || {
            [
                beat(&shared.finished, &shared.capture_beats),
                beat(&shared.consumer_gone, &shared.dsp_beats),
            ]
        },
    );
}

impl Board {
    /// What systemd's STATUS line says: the `status` event's state and counts, and why degraded.
    fn notify_facts(&self, shared: &Shared) -> notify::Facts {
        let (state, spool_pending, spool_bytes) = match self.status_kind() {
            EventKind::Status {
                state,
                spool_pending,
                spool_bytes,
                ..
            } => (state, spool_pending, spool_bytes),
            _ => (State::Degraded, 0, 0),
        };
        notify::Facts {
            state,
            no_device: !shared.capturing.load(Ordering::Acquire)
                && !shared.finished.load(Ordering::Acquire),
            upload_down: self.upload_down.load(Ordering::Acquire),
            utterances: shared.utterances.load(Ordering::Relaxed),
            spool_pending,
            spool_bytes,
        }
    }
}

/// `hark upload`: transcribe everything waiting in the spool, oldest first, and exit. When no
/// endpoint answers, the rest stays in the spool for the next try.
pub fn upload(config: &Config) -> Result<Report, DaemonError> {
    let (tx, rx) = mpsc::channel();
    let mut sinks = start_sinks(config, &tx)?;
    let events = sinks.events.clone();
    let spool = Arc::new(Spool::open(&config.spool.dir, config.spool.max_bytes)?);
    let Some(setup) = Setup::from_config(&config.transcribe)? else {
        return Err(DaemonError::Transcribe(SetupError::NoKey {
            endpoint: crate::config::redact_url(&config.transcribe.endpoint),
            env: config.transcribe.api_key_env.clone(),
        }));
    };
    let board = Board::new(Instant::now(), &spool, &sinks);
    let signals = SignalThread::start(tx.clone())?;
    let (pending, _) = spool.usage();
    tracing::info!(
        "uploading {pending} utterances from {}",
        spool.dir().display()
    );
    let uploader = Uploader::start(
        setup,
        spool.clone(),
        events.clone(),
        upload::Options {
            patience: Patience::GiveUp,
            keep_audio: config.spool.keep_audio,
            workers: 1,
            on_state: Board::on_upload_state(&board),
            on_result: None,
        },
        (tx, Control::UploadDone),
    )
    .map_err(upload_start)?;
    uploader.finish();
    let mut stop_by: Option<Instant> = None;
    let mut done = false;
    loop {
        let wait = stop_by.map_or(Duration::from_secs(3600), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(wait) {
            Ok(Control::UploadDone) => {
                done = true;
                break;
            }
            Ok(Control::Signal(SIGHUP)) | Ok(Control::PipelineDone) => {}
            Ok(Control::SinkGone(name)) => {
                if sinks.gone(name) && stop_by.is_none() {
                    tracing::info!("no sink is left to take events; stopping the upload");
                    let deadline = Instant::now() + UPLOAD_GRACE;
                    stop_by = Some(deadline);
                    uploader.stop(deadline);
                }
            }
            Ok(Control::Signal(sig)) => {
                tracing::info!("signal {sig}: stopping the upload");
                let deadline = match stop_by {
                    Some(_) => Instant::now(),
                    None => Instant::now() + UPLOAD_GRACE,
                };
                stop_by = Some(deadline);
                uploader.stop(deadline);
            }
            Err(RecvTimeoutError::Timeout) if stop_by.is_some() => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(signals);
    board.emit();
    let report = if done {
        uploader.join()
    } else {
        uploader.detach();
        Report {
            waiting: spool.usage().0,
            ..Report::default()
        }
    };
    tracing::info!(
        "{} transcribed, {} failed, {} waiting in the spool",
        report.transcribed,
        report.failed,
        report.waiting
    );
    drop(sinks);
    if report.failed > 0 || report.waiting > 0 {
        return Err(DaemonError::Incomplete(report));
    }
    Ok(report)
}

/// Open the configured source. A file that cannot be read is an error now; a device that cannot
/// be opened is reported and retried by the capture thread.
fn open_source(config: &Config, args: &RunArgs) -> Result<(Box<dyn Source>, bool), DaemonError> {
    let c = &config.capture;
    Ok(match c.source {
        SourceKind::File => {
            let source = open_input(&c.file, c.channel, args.pace)?;
            if let Some((rate, channels)) = source.input_format() {
                tracing::info!("reading {} ({rate} Hz, {channels} ch)", c.file.display());
            }
            (source, true)
        }
        SourceKind::Stdin => (Box::new(FileSource::stdin(args.pace)?), true),
        SourceKind::Alsa => {
            // Opened by the capture thread, which reports a missing device and retries.
            let source =
                AlsaSource::new(&c.device, c.sample_rate, c.channels, c.channel, c.period_ms)
                    .with_realtime_priority(c.realtime_priority);
            (Box::new(source), false)
        }
    })
}

pub(crate) fn dsp_config(config: &Config, source: String) -> DspConfig {
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
        uploads: None,
        announce_audio: true,
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
