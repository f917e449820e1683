//! `hark run` (and bare `hark`): the daemon. Capture from a device, a file or stdin until the
//! input ends or a stop signal, upload every utterance (retrying forever while the endpoints are
//! down), report status on a timer and to systemd, and reload the config on SIGHUP.

use std::time::Duration;

use super::Error;
use crate::capture::alsa::AlsaSource;
use crate::capture::file::FileSource;
use crate::capture::open_input;
use crate::capture::{SAMPLE_RATE, Source};
use crate::cli::RunArgs;
use crate::config::{Config, ConfigError, Source as SourceKind};
use crate::event::{EventKind, Stage};
use crate::pipeline::{DspConfig, Summary};
use crate::session::shutdown::{self, RunVerdict};
use crate::session::{Capture, Driver, Outputs, Plan, Route, Session, Uploads};
use crate::upload::{self, Patience, Report, Setup};

/// Loads the config again (the same file and overrides) when SIGHUP comes.
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError>>;

/// The run flags (-i, -d) as config overrides, applied after every `-s` so that they win.
pub fn overrides(args: &RunArgs) -> Vec<String> {
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

/// Run the daemon until end of input (and every upload) or a stop signal. Returns what the dsp
/// thread did.
pub fn run(config: &Config, args: &RunArgs) -> Result<Summary, Error> {
    run_with_reload(config, args, None)
}

/// [`run`], reloading the config with `reload` on SIGHUP.
pub fn run_with_reload(
    config: &Config,
    args: &RunArgs,
    reload: Option<Reload>,
) -> Result<Summary, Error> {
    let every = match config.output.status_interval_s {
        0 => None,
        s => Some(Duration::from_secs(u64::from(s))),
    };
    let plan = Plan {
        outputs: Outputs::Configured,
        spool: None,
        signals: true,
        notify: true,
        status: Some(every),
        uploads: None,
        capture: None,
    };
    // Checked once the outputs and the spool are up, as hark always has: the key, then the input.
    let session = Session::start_with(config, plan, |plan, spool| {
        let setup = transcription(config, args)?;
        let (source, opened) = open_source(config, args)?;
        let mut dsp = DspConfig::from_config(config, source.describe());
        dsp.announce_audio = setup.is_none() || config.spool.keep_audio;
        match setup.as_ref().map(|s| s.endpoints.first()) {
            Some(Some(endpoint)) => {
                tracing::info!("transcribing with {} ({})", endpoint.shown, endpoint.model);
            }
            Some(None) => {}
            None => tracing::info!("record-only: utterances stay in {}", spool.dir().display()),
        }
        plan.uploads = setup.map(|setup| Uploads {
            setup,
            patience: Patience::Forever,
            workers: 1,
            results: false,
        });
        plan.capture = Some(Capture {
            source,
            opened,
            dsp,
            route: Route::Uploads,
        });
        Ok::<(), Error>(())
    })?;
    let mut driver = Daemon {
        current: config.clone(),
        reload,
    };
    let ended = session.run(&mut driver);
    let summary = ended.summary;
    tracing::info!(
        "done: {} utterances kept, {} dropped, {:.1} s of audio",
        summary.utterances,
        summary.dropped,
        summary.samples as f64 / f64::from(SAMPLE_RATE)
    );
    let failed = match &ended.report {
        Some(r) => {
            tracing::info!(
                "uploads: {} transcribed, {} failed, {} waiting in the spool",
                r.transcribed,
                r.failed,
                r.waiting
            );
            r.failed
        }
        None => 0,
    };
    match (
        shutdown::run_verdict(&ended.shutdown, ended.fatal.is_some(), failed),
        ended.fatal,
    ) {
        (RunVerdict::InputBroken, Some(e)) => Err(Error::Capture(e)),
        (RunVerdict::Failed, _) => Err(Error::UploadsLeft(Report {
            failed,
            ..Report::default()
        })),
        _ => Ok(summary),
    }
}

/// Set up transcription: `None` records only (asked for, or no key for a cloud API).
fn transcription(config: &Config, args: &RunArgs) -> Result<Option<Setup>, Error> {
    if args.record_only {
        return Ok(None);
    }
    let setup = Setup::from_config(&config.transcribe)?;
    if setup.is_none() {
        tracing::warn!("{}", upload::no_key_hint(&config.transcribe));
    }
    Ok(setup)
}

/// Open the configured source. A file that cannot be read is an error now; a device that cannot
/// be opened is reported and retried by the capture thread.
fn open_source(config: &Config, args: &RunArgs) -> Result<(Box<dyn Source>, bool), Error> {
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

/// The daemon's part of the control loop: SIGHUP.
struct Daemon {
    current: Config,
    reload: Option<Reload>,
}

impl Driver for Daemon {
    fn reload(&mut self, session: &mut Session) {
        match &self.reload {
            Some(load) => {
                self.current = reconfigure(&self.current, load(), session);
                session.emit_status();
            }
            None => tracing::info!("SIGHUP: there is no config to reload"),
        }
    }
}

/// Apply a reloaded config: vad and encode settings go to the dsp thread (from its next utterance),
/// `[transcribe]` to the upload thread; what needs a restart is named in a log line and keeps its
/// running value. A config that does not load is refused (an `error` event) and the old one stays.
/// Returns the config now in effect.
fn reconfigure(old: &Config, loaded: Result<Config, ConfigError>, session: &mut Session) -> Config {
    let new = match loaded {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; the running config stays");
            reload_failed(session, format!("{e}; the running config stays"));
            return old.clone();
        }
    };
    let (mut now, mut restart) = restart_only(old, new);
    if now.output != old.output {
        if session.restart_outputs(&now, old) {
            tracing::info!("SIGHUP: outputs restarted with the new settings");
        } else {
            let why = "the new [output] settings could not start; the old outputs run";
            reload_failed(session, why.into());
            now.output = old.output.clone();
        }
    }
    session.reconfigure_dsp(DspConfig::from_config(&now, String::new()).update());
    if now.transcribe != old.transcribe && !reconfigure_uploads(&now, session, &mut restart) {
        now.transcribe = old.transcribe.clone();
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

/// `new` with the settings that need a restart put back to their running values, and their names.
fn restart_only(old: &Config, new: Config) -> (Config, Vec<&'static str>) {
    let mut restart = Vec::new();
    let mut now = new;
    if now.device_id != old.device_id {
        restart.push("device_id");
        now.device_id = old.device_id.clone();
    }
    if now.capture != old.capture {
        restart.push("[capture] (device, rate, channels, ...)");
        now.capture = old.capture.clone();
    }
    if now.vad.frame_ms != old.vad.frame_ms {
        restart.push("vad.frame_ms");
        now.vad.frame_ms = old.vad.frame_ms;
    }
    if now.spool != old.spool {
        restart.push("[spool]");
        now.spool = old.spool.clone();
    }
    (now, restart)
}

/// Hand a changed `[transcribe]` to the upload thread; whether it took it.
fn reconfigure_uploads(now: &Config, session: &Session, restart: &mut Vec<&'static str>) -> bool {
    if !session.has_uploads() {
        restart.push("[transcribe] (transcription was off at start)");
        return false;
    }
    // Keys and trust roots are read only when there is an upload thread to take them.
    match Setup::from_config(&now.transcribe) {
        Ok(Some(setup)) => session.reconfigure_uploads(setup),
        Ok(None) => {
            let why = upload::no_key_hint(&now.transcribe);
            tracing::error!("SIGHUP: {why}; the running [transcribe] stays");
            false
        }
        Err(e) => {
            tracing::error!("SIGHUP: {e}; the running [transcribe] stays");
            false
        }
    }
}

fn reload_failed(session: &Session, message: String) {
    session.events().emit(EventKind::Error {
        stage: Stage::Config,
        code: "reload_failed",
        message,
        retrying: false,
    });
}
