//! A session: the stages of one command, started in one order and stopped in the reverse one.
//!
//! Start: sinks, spool, status ([`Health`]), signals, upload threads, then capture and dsp (the
//! [`Pipeline`]). Stop: capture, the dsp thread's flush of the open utterance, the uploads (with a
//! deadline after a stop signal), then the sinks, which drain what they hold. When to stop is
//! decided by the pure [`shutdown::Shutdown`]; this module only carries its actions out.
//! Each command says in a [`Plan`] what it needs; what it does with utterances, upload results and
//! SIGHUP it says through a [`Driver`].
//! Deliberately not here: anything a single command does (its options, its output, its exit
//! rules beyond the shared ones).

pub(crate) mod shutdown;
mod signals;
mod sinks;

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use signal_hook::consts::SIGHUP;

use crate::bus::Events;
use crate::bus::SinkQueue;
use crate::capture::{CaptureError, Source};
use crate::config::Config;
use crate::health::Health;
use crate::notify;
use crate::pipeline::{self, DspConfig, DspUpdate, Pipeline, Probe, Summary};
use crate::sink::mqtt::MqttError;
use crate::sink::socket::SocketError;
use crate::spool::{Entry, Spool, SpoolError};
use crate::upload::{self, Finished, Patience, Report, Setup, Submitter, Uploader};
use shutdown::{Action, Input, Phase, Shutdown, UPLOAD_GRACE};
use signals::SignalThread;
use sinks::Sinks;

/// What the control loop hears.
pub(crate) enum Control {
    Signal(i32),
    PipelineDone,
    UploadsDone,
    /// A sink stopped by itself (stdout closed by its reader).
    SinkGone(&'static str),
    /// An utterance the dsp thread wrote, for a command that routes them itself.
    Utterance(Entry, Instant),
    /// An upload's outcome, for a command that asked for them.
    Result(Finished),
}

/// Why a session could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// The spool directory is unusable.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The event socket cannot be made.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The MQTT output is misconfigured (URL, password or CA file).
    #[error(transparent)]
    Mqtt(MqttError),
    /// A thread or the signal handler could not be started.
    #[error("cannot start {what}: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Where the events go.
pub(crate) enum Outputs {
    /// The sinks of `[output]` (stdout, socket, MQTT).
    Configured,
    /// Queues the command drains itself.
    Given(Vec<SinkQueue>),
}

/// The upload threads of a session.
pub(crate) struct Uploads {
    pub(crate) setup: Setup,
    pub(crate) patience: Patience,
    pub(crate) workers: usize,
    /// Send each outcome to the driver as [`Control::Result`].
    pub(crate) results: bool,
}

/// Where the dsp thread's utterances go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Straight to the upload queue (or nowhere, recording only).
    Uploads,
    /// To the driver as [`Control::Utterance`].
    Driver,
}

/// Capture and dsp for a session.
pub(crate) struct Capture {
    pub(crate) source: Box<dyn Source>,
    /// Whether `source` is already open (a file) or opened by the capture thread (a device).
    pub(crate) opened: bool,
    pub(crate) dsp: DspConfig,
    pub(crate) route: Route,
}

/// What a command needs from its session.
pub(crate) struct Plan {
    pub(crate) outputs: Outputs,
    /// The spool to use; `None` opens `spool.dir`.
    pub(crate) spool: Option<Arc<Spool>>,
    /// Stop on SIGTERM/SIGINT, and hand SIGHUP to the driver.
    pub(crate) signals: bool,
    /// Talk to systemd (READY, STATUS, WATCHDOG, STOPPING).
    pub(crate) notify: bool,
    /// Emit `status` events: on every change of the uploads' state and at the end, and also
    /// this often.
    pub(crate) status: Option<Option<Duration>>,
    pub(crate) uploads: Option<Uploads>,
    pub(crate) capture: Option<Capture>,
}

/// What a command does with what its session hears.
pub(crate) trait Driver {
    /// SIGHUP.
    fn reload(&mut self, _session: &mut Session) {}
    /// [`Control::Utterance`] and [`Control::Result`].
    fn message(&mut self, _session: &Session, _msg: Control) {}
    /// On every wake of the control loop, and at least this often.
    fn tick(&mut self, _session: &Session) {}
    fn tick_every(&self) -> Option<Duration> {
        None
    }
}

/// A driver that adds nothing.
pub(crate) struct Plain;
impl Driver for Plain {}

/// The running stages of one command.
pub(crate) struct Session {
    tx: Sender<Control>,
    rx: Receiver<Control>,
    sinks: Sinks,
    spool: Arc<Spool>,
    health: Option<Arc<Health>>,
    status_every: Option<Duration>,
    sd: Option<notify::Service>,
    signals: Option<SignalThread>,
    uploader: Option<Uploader>,
    pipeline: Option<Pipeline>,
    shutdown: Shutdown,
}

/// What a session left behind when it ended.
pub(crate) struct Ended {
    /// What the dsp thread did (zero without capture).
    pub(crate) summary: Summary,
    /// What the upload threads did, when they ended by themselves.
    pub(crate) report: Option<Report>,
    /// The capture error that ended the input for good.
    pub(crate) fatal: Option<CaptureError>,
    pub(crate) shutdown: Shutdown,
    pub(crate) spool: Arc<Spool>,
}

impl Session {
    /// Start the stages of `plan` in order. On an error, what was started is stopped again.
    pub(crate) fn start(config: &Config, plan: Plan) -> Result<Session, StartError> {
        Self::start_with(config, plan, |_, _| Ok::<(), StartError>(()))
    }

    /// [`start`](Self::start), with `late` run once the outputs and the spool are up and before
    /// anything else: it fills in the parts of `plan` that depend on checks a command makes
    /// itself (the API key, the input file). So when several things are wrong, the outputs' and
    /// the spool's errors are the ones reported, as they always were; an error from `late` stops
    /// the outputs again.
    pub(crate) fn start_with<E: From<StartError>>(
        config: &Config,
        mut plan: Plan,
        late: impl FnOnce(&mut Plan, &Spool) -> Result<(), E>,
    ) -> Result<Session, E> {
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        let sinks = match &mut plan.outputs {
            Outputs::Configured => Sinks::start(config, &tx)?,
            Outputs::Given(queues) => Sinks::given(config, std::mem::take(queues)),
        };
        let spool = match plan.spool.take() {
            Some(spool) => spool,
            None => Arc::new(
                Spool::open(&config.spool.dir, config.spool.max_bytes).map_err(StartError::from)?,
            ),
        };
        late(&mut plan, &spool)?;
        Ok(Self::start_stages(
            config,
            plan,
            started,
            (tx, rx),
            sinks,
            spool,
        )?)
    }

    /// The rest of [`start_with`](Self::start_with): status, signals, uploads, capture, sd_notify.
    fn start_stages(
        config: &Config,
        plan: Plan,
        started: Instant,
        (tx, rx): (Sender<Control>, Receiver<Control>),
        sinks: Sinks,
        spool: Arc<Spool>,
    ) -> Result<Session, StartError> {
        let health = plan.status.is_some().then(|| {
            let events = sinks.events.clone();
            Health::new(
                started,
                &spool,
                events,
                sinks.dropped.clone(),
                &sinks.status,
            )
        });
        let signals = match plan.signals {
            true => Some(SignalThread::start(tx.clone())?),
            false => None,
        };
        let shutdown = Shutdown::new(plan.capture.is_some(), plan.uploads.is_some(), UPLOAD_GRACE);
        let mut session = Session {
            tx,
            rx,
            sinks,
            spool,
            health,
            status_every: plan.status.flatten(),
            sd: None,
            signals,
            uploader: None,
            pipeline: None,
            shutdown,
        };
        if let Some(uploads) = plan.uploads {
            session.uploader = Some(session.start_uploads(config, uploads)?);
        }
        if let Some(capture) = plan.capture {
            let pipeline = session.start_pipeline(config, capture)?;
            if let Some(h) = &session.health {
                h.watch(pipeline.probe());
            }
            session.pipeline = Some(pipeline);
        }
        if plan.notify {
            session.sd = Some(notify::Service::from_env(Instant::now()));
        }
        Ok(session)
    }

    fn start_uploads(&self, config: &Config, plan: Uploads) -> Result<Uploader, StartError> {
        let on_state: upload::OnState = match &self.health {
            Some(h) => Health::on_upload_state(h),
            None => Arc::new(|_| {}),
        };
        let on_result: Option<upload::OnResult> = plan.results.then(|| {
            let tx = self.tx.clone();
            let f: upload::OnResult = Arc::new(move |f| {
                let _ = tx.send(Control::Result(f));
            });
            f
        });
        let options = upload::Options {
            patience: plan.patience,
            keep_audio: config.spool.keep_audio,
            workers: plan.workers,
            on_state,
            on_result,
        };
        let done = (self.tx.clone(), Control::UploadsDone);
        let events = self.sinks.events.clone();
        Uploader::start(plan.setup, self.spool.clone(), events, options, done).map_err(
            |e| match e {
                upload::StartError::Spool(e) => StartError::Spool(e),
                upload::StartError::Thread(source) => StartError::Thread {
                    what: "the upload threads",
                    source,
                },
            },
        )
    }

    fn start_pipeline(&self, config: &Config, capture: Capture) -> Result<Pipeline, StartError> {
        let mut dsp = capture.dsp;
        dsp.uploads = match capture.route {
            Route::Uploads => self.uploader.as_ref().map(Uploader::submitter),
            Route::Driver => {
                let tx = self.tx.clone();
                Some(Submitter::new(move |entry, ended| {
                    let _ = tx.send(Control::Utterance(entry, ended));
                }))
            }
        };
        Pipeline::start(
            capture.source,
            capture.opened,
            pipeline::ring_samples(config),
            dsp,
            self.spool.clone(),
            self.sinks.events.clone(),
            (self.tx.clone(), Control::PipelineDone),
        )
        .map_err(|source| StartError::Thread {
            what: "the capture and dsp threads",
            source,
        })
    }

    pub(crate) fn events(&self) -> &Events {
        &self.sinks.events
    }

    pub(crate) fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// The pipeline's state, when the session captures.
    pub(crate) fn probe(&self) -> Option<Probe> {
        self.pipeline.as_ref().map(Pipeline::probe)
    }

    /// Whether the upload threads are still taking utterances.
    pub(crate) fn uploading(&self) -> bool {
        self.uploader.is_some() && !self.shutdown.uploads_done()
    }

    /// Queue an utterance for upload (a driver that routes utterances itself).
    pub(crate) fn submit(&self, entry: Entry, ended: Instant) {
        if let (Some(u), true) = (&self.uploader, self.uploading()) {
            u.submitter().submit(entry, ended);
        }
    }

    /// New vad and encode settings for the dsp thread (SIGHUP).
    pub(crate) fn reconfigure_dsp(&self, update: DspUpdate) {
        if let Some(p) = &self.pipeline {
            p.reconfigure(update);
        }
    }

    /// New endpoints and keys for the upload threads (SIGHUP); `false` without upload threads.
    pub(crate) fn reconfigure_uploads(&self, setup: Setup) -> bool {
        match &self.uploader {
            Some(u) => {
                u.reconfigure(setup);
                true
            }
            None => false,
        }
    }

    /// Whether the session has upload threads at all.
    pub(crate) fn has_uploads(&self) -> bool {
        self.uploader.is_some()
    }

    /// Restart the sinks with the `[output]` of `new` (SIGHUP); `false` if the old ones run again.
    pub(crate) fn restart_outputs(&mut self, new: &Config, old: &Config) -> bool {
        let tx = self.tx.clone();
        self.sinks.restart(new, old, &tx)
    }

    /// Emit a `status` event now (sessions that report status).
    pub(crate) fn emit_status(&self) {
        if let Some(h) = &self.health {
            h.emit();
        }
    }

    /// Run until the work is done, or a stop and its deadline; then stop every stage in order.
    pub(crate) fn run(mut self, driver: &mut dyn Driver) -> Ended {
        let start = self.shutdown.start();
        self.act(&start);
        let forever = Duration::from_secs(365 * 24 * 3600);
        let mut next_status = Instant::now() + self.status_every.unwrap_or(forever);
        loop {
            match self.shutdown.phase(Instant::now()) {
                Phase::Done => break,
                Phase::TimedOut => {
                    // (`hark upload` has always ended here without a word: its summary says
                    // what is still waiting.)
                    if self.pipeline.is_some() {
                        tracing::warn!(
                            "the upload in flight did not finish in time; it stays in the spool"
                        );
                    }
                    break;
                }
                Phase::Running => {}
            }
            if let (Some(sd), Some(h)) = (&mut self.sd, &self.health) {
                h.notify(sd);
            }
            let mut wake = next_status;
            for t in [
                self.sd.as_ref().and_then(notify::Service::next_wake),
                self.shutdown.wake_by(),
                driver.tick_every().map(|d| Instant::now() + d),
            ]
            .into_iter()
            .flatten()
            {
                wake = wake.min(t);
            }
            match self
                .rx
                .recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Ok(Control::Signal(SIGHUP)) => driver.reload(&mut self),
                Ok(Control::Signal(sig)) => self.stop_signal(sig),
                Ok(Control::SinkGone(name)) => {
                    if self.sinks.gone(name) && self.shutdown.cause().is_none() {
                        let what = if self.pipeline.is_some() {
                            ""
                        } else {
                            " the upload"
                        };
                        tracing::info!("no sink is left to take events; stopping{what}");
                        self.input(Input::LastSinkGone);
                    }
                }
                Ok(Control::PipelineDone) => self.input(Input::PipelineDone),
                Ok(Control::UploadsDone) => self.input(Input::UploadsDone),
                Ok(msg) => driver.message(&self, msg),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= next_status {
                        self.emit_status();
                        next_status = Instant::now() + self.status_every.unwrap_or(forever);
                    }
                }
            }
            driver.tick(&self);
        }
        self.end()
    }

    fn stop_signal(&mut self, sig: i32) {
        match (self.shutdown.cause(), self.pipeline.is_some()) {
            (None, true) => tracing::info!("signal {sig}: closing the open utterance and stopping"),
            (_, false) => tracing::info!("signal {sig}: stopping the upload"),
            (Some(_), true) => {}
        }
        self.input(Input::StopSignal);
    }

    fn input(&mut self, input: Input) {
        let actions = self.shutdown.on(input, Instant::now());
        self.act(&actions);
    }

    fn act(&mut self, actions: &[Action]) {
        for action in actions {
            match *action {
                Action::Stopping => {
                    if let Some(sd) = &mut self.sd {
                        sd.stopping();
                    }
                }
                Action::StopPipeline => {
                    if let Some(p) = &self.pipeline {
                        p.stop();
                    }
                }
                Action::StopUploads(deadline) => {
                    if let Some(u) = &self.uploader {
                        u.stop(deadline);
                    }
                }
                Action::FinishUploads => {
                    if let Some(u) = &self.uploader {
                        u.finish();
                    }
                }
            }
        }
    }

    /// Stop in order: systemd hears STOPPING, the last status, the pipeline joined, the signal
    /// thread closed, the upload threads joined (or left behind past their deadline).
    fn end(mut self) -> Ended {
        if let Some(sd) = &mut self.sd {
            sd.stopping();
        }
        self.emit_status();
        let (summary, fatal) = match self.pipeline.take() {
            Some(p) => {
                let probe = p.probe();
                (p.join(), probe.take_fatal())
            }
            None => (Summary::default(), None),
        };
        drop(self.signals.take());
        let report = match self.uploader.take() {
            Some(u) if self.shutdown.uploads_done() => Some(u.join()),
            Some(u) => {
                u.detach();
                None
            }
            None => None,
        };
        Ended {
            summary,
            report,
            fatal,
            shutdown: self.shutdown.clone(),
            spool: self.spool.clone(),
        }
    }
}
