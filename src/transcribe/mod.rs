//! Upload: one thread works through the spool, oldest utterance first, posting each to the
//! configured endpoints with the SDKs' retry policy and ordered fallback, and emits its transcript.
//!
//! The spool is the queue. An utterance leaves it only after its `transcript` event has been
//! handed to the sinks (then it is deleted, or moved to `done/` with `spool.keep_audio`), or after
//! every endpoint refused it for good (moved to `failed/`, with an `error` event). While every
//! endpoint is down the thread keeps trying with a capped backoff and reports `degraded`; nothing
//! is lost meanwhile, because nothing leaves the spool. Deliberately not here: HTTP details
//! (`client`), the policy itself (`retry`), body parsing (`response`, `sse`).

pub mod client;
pub mod multipart;
pub mod response;
pub mod retry;
pub mod sse;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;

use crate::config::{Chunking, ResponseFormat, TranscribeConfig};
use crate::encode::decode;
use crate::event::{DropReason, EventKind, Events, Stage};
use crate::spool::{self, Entry, Spool};
use client::{Client, Endpoint, Fields, Secret, Upload};
use retry::Verdict;

/// Utterances shorter than this are never sent: every API answers 400 `audio_too_short`.
const MIN_DURATION_MS: u64 = 100;

/// The default `api_key_env`, whose key is sent to [`OPENAI_HOST`] only.
const OPENAI_KEY_ENV: &str = "OPENAI_API_KEY";
const OPENAI_HOST: &str = "api.openai.com";

/// Hosts that always need a key: without one, hark records only.
const KEYED_HOSTS: [&str; 4] = [
    "api.openai.com",
    "api.groq.com",
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
];

/// Why transcription cannot be set up. All of them are configuration problems (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "no API key for {endpoint}: set ${env}, or transcribe.api_key_file, or run under systemd with LoadCredential=api_key"
    )]
    NoKey { endpoint: String, env: String },
    #[error("{key} {path}: {source}")]
    KeyFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path}: the file is empty")]
    EmptyKeyFile { key: String, path: PathBuf },
    #[error(
        "refusing to send the API key over plain http to {endpoint} (not a loopback address): use https://, or set transcribe.allow_insecure_http = true on a network you trust"
    )]
    Insecure { endpoint: String },
    #[error(transparent)]
    Tls(#[from] client::TlsSetupError),
    #[error("transcribe.known_speakers[{index}].audio {path}: {why}")]
    Speaker {
        index: usize,
        path: PathBuf,
        why: String,
    },
}

/// Why the upload thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("cannot start the upload thread: {0}")]
    Thread(std::io::Error),
}

/// Everything the upload thread needs, built from `[transcribe]` before any thread starts.
pub struct Setup {
    pub client: Client,
    pub endpoints: Vec<Endpoint>,
    pub fields: Fields,
}

impl Setup {
    /// Resolve keys, check where they may be sent, load trust roots and speaker references.
    /// `Ok(None)`: the primary endpoint needs a key and there is none (hark records only).
    pub fn from_config(t: &TranscribeConfig) -> Result<Option<Setup>, SetupError> {
        // An OpenAI key goes to OpenAI only: a LAN server named as the endpoint must not get
        // it just because `api_key_env` kept its default.
        let host = client::host_of(&t.endpoint).to_ascii_lowercase();
        let env = if t.api_key_env == OPENAI_KEY_ENV && host != OPENAI_HOST {
            ""
        } else {
            t.api_key_env.as_str()
        };
        let primary_key = resolve_key("transcribe.api_key_file", &t.api_key_file, env, true)?;
        if primary_key.is_none() && needs_key(&t.endpoint) {
            return Ok(None);
        }
        let mut endpoints = vec![Endpoint::new(
            &t.endpoint,
            t.model.clone(),
            primary_key.clone(),
        )];
        for (i, f) in t.fallback.iter().enumerate() {
            let own = resolve_key(
                &format!("transcribe.fallback[{i}].api_key_file"),
                &f.api_key_file,
                &f.api_key_env,
                false,
            )?;
            // The primary key goes only to the primary's own host, never to another server.
            let key = own.or_else(|| {
                (client_host(&f.endpoint) == client_host(&t.endpoint))
                    .then(|| primary_key.clone())
                    .flatten()
            });
            let model = if f.model.is_empty() {
                t.model.clone()
            } else {
                f.model.clone()
            };
            endpoints.push(Endpoint::new(&f.endpoint, model, key));
        }
        if !t.allow_insecure_http {
            for ep in &endpoints {
                if ep.has_key() && ep.url.starts_with("http://") && !client::is_loopback(&ep.url) {
                    return Err(SetupError::Insecure {
                        endpoint: ep.shown.clone(),
                    });
                }
            }
        }
        let ca = (!t.ca_file.as_os_str().is_empty()).then_some(t.ca_file.as_path());
        let client = Client::new(
            Duration::from_secs(u64::from(t.connect_timeout_s)),
            Duration::from_secs(u64::from(t.timeout_s)),
            ca,
        )?;
        Ok(Some(Setup {
            client,
            endpoints,
            fields: fields(t)?,
        }))
    }
}

/// The message for a user who has no key: how to turn transcription on.
pub fn no_key_hint(t: &TranscribeConfig) -> String {
    format!(
        "transcription is off: no API key for {}. Set {} (transcribe.api_key_env) or transcribe.api_key_file, \
         or point transcribe.endpoint at a local server; utterances stay in the spool until then",
        crate::config::redact_url(&t.endpoint),
        if t.api_key_env.is_empty() {
            "an environment variable"
        } else {
            &t.api_key_env
        }
    )
}

fn needs_key(endpoint: &str) -> bool {
    let host = client::host_of(endpoint).to_ascii_lowercase();
    KEYED_HOSTS.iter().any(|h| {
        if h.starts_with('.') {
            host.ends_with(h)
        } else {
            host == *h
        }
    })
}

/// `host:port`, lowercased: the primary's key goes to a fallback only on the very same one.
fn client_host(url: &str) -> String {
    client::authority(url).to_ascii_lowercase()
}

/// The key from `file`, else `$CREDENTIALS_DIRECTORY/api_key` (primary only; an empty one counts
/// as none), else `$env`.
fn resolve_key(
    key: &str,
    file: &std::path::Path,
    env: &str,
    credentials: bool,
) -> Result<Option<Secret>, SetupError> {
    let read = |path: PathBuf| -> Result<Secret, SetupError> {
        let text = std::fs::read_to_string(&path).map_err(|source| SetupError::KeyFile {
            key: key.to_owned(),
            path: path.clone(),
            source,
        })?;
        let text = text.trim();
        if text.is_empty() {
            return Err(SetupError::EmptyKeyFile {
                key: key.to_owned(),
                path,
            });
        }
        Ok(Secret::new(text.to_owned()))
    };
    if !file.as_os_str().is_empty() {
        return read(file.to_owned()).map(Some);
    }
    if credentials && let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let path = PathBuf::from(dir).join("api_key");
        if path.exists() {
            match read(path) {
                // Empty: hark.service's `SetCredential=` fallback for a missing /etc/hark/api_key.
                Err(SetupError::EmptyKeyFile { .. }) => {}
                key => return key.map(Some),
            }
        }
    }
    if env.is_empty() {
        return Ok(None);
    }
    Ok(std::env::var(env)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .map(Secret::new))
}

/// The optional request fields in SDK encoding: arrays as `name[]`, objects as `name[key]`,
/// booleans `true`, defaults left out.
fn fields(t: &TranscribeConfig) -> Result<Fields, SetupError> {
    let mut parts: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: String| parts.push((k.to_owned(), v));
    if !t.language.is_empty() {
        add("language", t.language.clone());
    }
    if !t.prompt.is_empty() {
        add("prompt", t.prompt.clone());
    }
    add("response_format", format_name(t.response_format).to_owned());
    if t.temperature != 0.0 {
        add("temperature", t.temperature.to_string());
    }
    for g in &t.timestamp_granularities {
        let v = match g {
            crate::config::Granularity::Word => "word",
            crate::config::Granularity::Segment => "segment",
        };
        add("timestamp_granularities[]", v.to_owned());
    }
    for i in &t.include {
        match i {
            crate::config::Include::Logprobs => add("include[]", "logprobs".to_owned()),
        }
    }
    if t.stream {
        add("stream", "true".to_owned());
    }
    match &t.chunking_strategy {
        Chunking::Off => {}
        Chunking::Auto => add("chunking_strategy", "auto".to_owned()),
        Chunking::ServerVad(v) => {
            add("chunking_strategy[type]", v.kind.clone());
            if let Some(ms) = v.prefix_padding_ms {
                add("chunking_strategy[prefix_padding_ms]", ms.to_string());
            }
            if let Some(ms) = v.silence_duration_ms {
                add("chunking_strategy[silence_duration_ms]", ms.to_string());
            }
            if let Some(th) = v.threshold {
                add("chunking_strategy[threshold]", th.to_string());
            }
        }
    }
    let mut names = Vec::new();
    let mut refs = Vec::new();
    for (index, s) in t.known_speakers.iter().enumerate() {
        let err = |why: String| SetupError::Speaker {
            index,
            path: s.audio.clone(),
            why,
        };
        let bytes = std::fs::read(&s.audio).map_err(|e| err(e.to_string()))?;
        let reader = hound::WavReader::new(std::io::Cursor::new(&bytes))
            .map_err(|e| err(format!("not a WAV file: {e}")))?;
        let spec = reader.spec();
        let frames = reader.duration();
        let secs = f64::from(frames) / f64::from(spec.sample_rate.max(1));
        if !(2.0..=10.0).contains(&secs) {
            return Err(err(format!(
                "must be 2 to 10 seconds of audio, it is {secs:.2} s"
            )));
        }
        names.push(s.name.clone());
        refs.push(format!(
            "data:audio/wav;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        ));
    }
    for n in names {
        add("known_speaker_names[]", n);
    }
    for r in refs {
        add("known_speaker_references[]", r);
    }
    Ok(Fields {
        parts,
        format: Some(t.response_format),
        stream: t.stream,
    })
}

fn format_name(f: ResponseFormat) -> &'static str {
    match f {
        ResponseFormat::Json => "json",
        ResponseFormat::Text => "text",
        ResponseFormat::Srt => "srt",
        ResponseFormat::Vtt => "vtt",
        ResponseFormat::VerboseJson => "verbose_json",
        ResponseFormat::DiarizedJson => "diarized_json",
    }
}

/// What to do when every endpoint is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Keep trying with a capped backoff (the daemon).
    Forever,
    /// Stop and leave the rest in the spool (`hark upload`).
    GiveUp,
}

/// What the upload thread did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub transcribed: u64,
    pub failed: u64,
    /// Still in the spool when the thread ended.
    pub waiting: u64,
}

enum Msg {
    Job(Job),
    /// No more jobs will come: end once the queue is empty.
    Finish,
    /// End by this instant, whatever is left.
    Stop(Instant),
    /// New endpoints, keys and fields (SIGHUP), used from the next utterance on.
    Reconfigure(Box<Setup>),
}

struct Job {
    entry: Entry,
    /// When its `speech_end` was emitted, for utterances of this run.
    ended: Option<Instant>,
}

/// Hands new utterances to the upload thread. Cheap to clone.
#[derive(Clone)]
pub struct Submitter(Sender<Msg>);

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Submitter")
    }
}

impl Submitter {
    /// Queue an utterance whose `speech_end` was emitted at `ended`.
    pub fn submit(&self, entry: Entry, ended: Instant) {
        let _ = self.0.send(Msg::Job(Job {
            entry,
            ended: Some(ended),
        }));
    }
}

/// Owns the upload thread.
pub struct Uploader {
    tx: Sender<Msg>,
    thread: Option<JoinHandle<Report>>,
}

/// Called with `true` when every endpoint has failed and with `false` when one answers again.
pub type OnState = Box<dyn Fn(bool) + Send>;

impl Uploader {
    /// Queue what waits in the spool now (oldest first), then start the thread. `done` receives
    /// one message when the thread ends.
    pub fn start<T: Send + 'static>(
        setup: Setup,
        spool: Arc<Spool>,
        events: Events,
        patience: Patience,
        keep_audio: bool,
        on_state: OnState,
        done: (Sender<T>, T),
    ) -> Result<Uploader, StartError> {
        let queue: VecDeque<Job> = spool
            .entries()?
            .into_iter()
            .map(|entry| Job { entry, ended: None })
            .collect();
        if !queue.is_empty() {
            tracing::info!(
                "{} utterances wait in the spool; uploading them first",
                queue.len()
            );
        }
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            setup,
            spool,
            events,
            patience,
            keep_audio,
            on_state,
            rx,
            queue,
            finishing: false,
            deadline: None,
            down: false,
            report: Report::default(),
            next_setup: None,
        };
        let thread = thread::Builder::new()
            .name("hark-upload".into())
            .spawn(move || {
                // Sent however the thread ends, a panic included, so nobody waits forever.
                let _done = DoneGuard(Some(done));
                worker.run()
            })
            .map_err(StartError::Thread)?;
        Ok(Uploader {
            tx,
            thread: Some(thread),
        })
    }

    pub fn submitter(&self) -> Submitter {
        Submitter(self.tx.clone())
    }

    /// No more utterances will come: the thread ends when the queue is empty (or, with
    /// [`Patience::GiveUp`], when every endpoint is down).
    pub fn finish(&self) {
        let _ = self.tx.send(Msg::Finish);
    }

    /// New settings from a reloaded config, used from the next utterance on.
    pub fn reconfigure(&self, setup: Setup) {
        let _ = self.tx.send(Msg::Reconfigure(Box::new(setup)));
    }

    /// Keep going until `deadline`, then abandon what is left (it stays in the spool).
    pub fn stop(&self, deadline: Instant) {
        let _ = self.tx.send(Msg::Stop(deadline));
    }

    /// Join the thread; call after its `done` message arrived (else this blocks until it ends).
    pub fn join(mut self) -> Report {
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }

    /// Give up on the thread without joining it (an upload in flight past the stop deadline).
    pub fn detach(mut self) {
        self.thread.take();
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.tx.send(Msg::Stop(Instant::now()));
            let _ = t.join();
        }
    }
}

struct DoneGuard<T>(Option<(Sender<T>, T)>);

impl<T> Drop for DoneGuard<T> {
    fn drop(&mut self) {
        if let Some((tx, msg)) = self.0.take() {
            let _ = tx.send(msg);
        }
    }
}

/// An utterance's audio: the Ogg file, and the WAV made from it once an endpoint asked for it.
struct Audio {
    ogg: Vec<u8>,
    wav: Option<Vec<u8>>,
}

impl Audio {
    fn bytes(&mut self, wav: bool) -> Result<&[u8], decode::DecodeError> {
        if !wav {
            return Ok(&self.ogg);
        }
        if self.wav.is_none() {
            let pcm = decode::decode_ogg_opus(&self.ogg)?;
            self.wav = Some(decode::wav_bytes(&pcm, crate::capture::SAMPLE_RATE));
        }
        Ok(self.wav.as_deref().unwrap_or_default())
    }
}

/// What one endpoint did with an utterance, its retries included.
enum Tried {
    /// Transcribed, and the transcript handed to the sinks.
    Delivered,
    /// The stop deadline came first (the audio stays in the spool).
    Stopped,
    /// It will not take this audio (a final error): why, and the event code.
    Refused(String, &'static str),
    /// It did not answer usefully after its retries.
    Down(String),
}

enum Outcome {
    Done,
    /// Stopped before this job was finished: it stays in the spool.
    Stopped,
    /// Every endpoint is down and the patience ran out.
    GaveUp,
}

struct Worker {
    setup: Setup,
    spool: Arc<Spool>,
    events: Events,
    patience: Patience,
    keep_audio: bool,
    on_state: OnState,
    rx: Receiver<Msg>,
    queue: VecDeque<Job>,
    finishing: bool,
    deadline: Option<Instant>,
    down: bool,
    report: Report,
    /// Taken between utterances (an endpoint index must not change under an upload).
    next_setup: Option<Box<Setup>>,
}

impl Worker {
    fn run(mut self) -> Report {
        loop {
            while let Ok(msg) = self.rx.try_recv() {
                self.take(msg);
            }
            if self.past_deadline() {
                break;
            }
            let Some(job) = self.queue.pop_front() else {
                if self.finishing || self.deadline.is_some() {
                    break;
                }
                match self.rx.recv() {
                    Ok(msg) => self.take(msg),
                    Err(_) => break,
                }
                continue;
            };
            match self.upload(&job) {
                Outcome::Done => {}
                Outcome::Stopped | Outcome::GaveUp => {
                    self.queue.push_front(job);
                    break;
                }
            }
        }
        // Jobs sent after the last look are in the spool too.
        while let Ok(msg) = self.rx.try_recv() {
            self.take(msg);
        }
        self.report.waiting = self.queue.len() as u64;
        if self.report.waiting > 0 {
            tracing::warn!(
                "{} utterances stay in {} for the next run",
                self.report.waiting,
                self.spool.dir().display()
            );
        }
        self.report
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Job(job) => self.queue.push_back(job),
            Msg::Finish => self.finishing = true,
            Msg::Stop(at) => self.deadline = Some(self.deadline.map_or(at, |d| d.min(at))),
            Msg::Reconfigure(setup) => self.next_setup = Some(setup),
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Wait `d` while taking new jobs; `false` when the stop deadline comes first.
    fn wait(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            let now = Instant::now();
            if let Some(deadline) = self.deadline
                && deadline <= until
            {
                if now >= deadline {
                    return false;
                }
            } else if now >= until {
                return true;
            }
            let end = self.deadline.map_or(until, |dl| dl.min(until));
            match self.rx.recv_timeout(end.saturating_duration_since(now)) {
                Ok(msg) => self.take(msg),
                Err(RecvTimeoutError::Timeout) => {}
                // The daemon is gone: sleep out the rest without a channel.
                Err(RecvTimeoutError::Disconnected) => {
                    thread::sleep(end.saturating_duration_since(Instant::now()));
                }
            }
        }
    }

    /// Take new settings, if a reload sent some; only between rounds over the endpoints.
    fn take_setup(&mut self) {
        if let Some(setup) = self.next_setup.take() {
            self.setup = *setup;
            tracing::info!("new transcription settings in effect");
        }
    }

    fn upload(&mut self, job: &Job) -> Outcome {
        let entry = &job.entry;
        let meta = match spool::read_meta(&entry.meta) {
            Ok(meta) => meta,
            // Dropped by the spool cap while it waited: its `dropped` event was emitted then.
            Err(_) if !entry.meta.exists() => return Outcome::Done,
            Err(e) => {
                self.fail(entry, "bad_metadata", &format!("{e}"));
                return Outcome::Done;
            }
        };
        if meta.duration_ms < MIN_DURATION_MS {
            self.events.emit(EventKind::Dropped {
                utterance: meta.utterance.clone(),
                offset_ms: meta.offset_ms,
                reason: DropReason::TooShort,
                duration_ms: meta.duration_ms,
            });
            let _ = self.spool.remove(entry);
            return Outcome::Done;
        }
        let mut audio = match std::fs::read(&entry.audio) {
            Ok(ogg) => Audio { ogg, wav: None },
            Err(e) => {
                let msg = format!("{}: {e}", entry.audio.display());
                self.fail(entry, "missing_audio", &msg);
                return Outcome::Done;
            }
        };
        let mut attempts = 0u32;
        let mut round = 0u32;
        loop {
            // A reload during an outage (the endpoint fixed) applies to the next round.
            self.take_setup();
            // Every endpoint in order; the utterance fails for good only if all refuse it.
            let mut down: Option<String> = None;
            let mut refused: Option<(String, &'static str)> = None;
            for i in 0..self.setup.endpoints.len() {
                match self.try_endpoint(i, job, &meta, &mut audio, &mut attempts) {
                    Tried::Delivered => return Outcome::Done,
                    Tried::Stopped => return Outcome::Stopped,
                    Tried::Refused(why, code) => refused = Some((why, code)),
                    Tried::Down(why) => down = Some(why),
                }
            }
            let Some(why) = down else {
                let (why, code) =
                    refused.unwrap_or_else(|| ("no endpoint configured".to_owned(), "no_endpoint"));
                self.fail(entry, code, &why);
                return Outcome::Done;
            };
            if self.patience == Patience::GiveUp {
                tracing::warn!("every endpoint failed ({why}); giving up for now");
                return Outcome::GaveUp;
            }
            if !self.down {
                self.down = true;
                self.events.emit(EventKind::Error {
                    stage: Stage::Upload,
                    code: "endpoints_down",
                    message: format!(
                        "every endpoint failed, last {why}; retrying, utterances wait in the spool"
                    ),
                    retrying: true,
                });
                (self.on_state)(true);
            }
            if !self.wait(retry::outage_backoff(round, jitter())) {
                return Outcome::Stopped;
            }
            round = round.saturating_add(1);
        }
    }

    /// Endpoint `i` with the SDKs' retries: a transcript (delivered), a refusal, or down.
    fn try_endpoint(
        &mut self,
        i: usize,
        job: &Job,
        meta: &spool::UtteranceMeta,
        audio: &mut Audio,
        attempts: &mut u32,
    ) -> Tried {
        let mut retry = 0u32;
        loop {
            while let Ok(msg) = self.rx.try_recv() {
                self.take(msg);
            }
            if self.past_deadline() {
                return Tried::Stopped;
            }
            let ep = &self.setup.endpoints[i];
            let as_wav = ep.wants_wav();
            let bytes = match audio.bytes(as_wav) {
                Ok(bytes) => bytes,
                Err(e) => {
                    let why = format!("cannot convert {} to WAV: {e}", job.entry.audio.display());
                    return Tried::Refused(why, "bad_audio");
                }
            };
            *attempts += 1;
            let started = Instant::now();
            let events = &self.events;
            let mut on_delta = |delta: &str| {
                events.emit(EventKind::TranscriptDelta {
                    utterance: meta.utterance.clone(),
                    offset_ms: meta.offset_ms,
                    delta: delta.to_owned(),
                });
            };
            let upload = Upload {
                id: &meta.utterance,
                bytes,
                wav: as_wav,
            };
            let result = self.setup.client.transcribe(
                ep,
                &self.setup.fields,
                &upload,
                self.deadline,
                &mut on_delta,
            );
            let f = match result {
                Ok(t) => {
                    tracing::debug!(
                        "{}: transcribed by {} in {} ms",
                        meta.utterance,
                        ep.shown,
                        started.elapsed().as_millis()
                    );
                    return match self.deliver(job, meta, t, i, *attempts) {
                        true => Tried::Delivered,
                        false => Tried::Stopped,
                    };
                }
                Err(f) => f,
            };
            let what = format!("{}: {f}", ep.shown);
            match f.verdict() {
                Verdict::WantsWav if !as_wav => {
                    tracing::info!(
                        "{} does not take Ogg/Opus ({f}); sending WAV to it from now on",
                        ep.shown
                    );
                    ep.remember_wav();
                }
                Verdict::Unavailable => {
                    tracing::warn!("{}: {what}", meta.utterance);
                    return Tried::Down(what);
                }
                Verdict::WantsWav | Verdict::Final => {
                    tracing::warn!("{}: {what}", meta.utterance);
                    return Tried::Refused(what, f.code());
                }
                Verdict::Retry { after } => {
                    tracing::warn!("{} (attempt {attempts}): {what}", meta.utterance);
                    // Each failure while the service is up; once every endpoint is down, only
                    // the transitions (no event per retry).
                    if !self.down {
                        self.events.emit(EventKind::Error {
                            stage: Stage::Upload,
                            code: f.code(),
                            message: format!("utterance {}: {what}; retrying", meta.utterance),
                            retrying: true,
                        });
                    }
                    if retry >= retry::MAX_RETRIES {
                        return Tried::Down(what);
                    }
                    let wait = after.unwrap_or_else(|| retry::backoff(retry, jitter()));
                    retry += 1;
                    if !self.wait(wait) {
                        return Tried::Stopped;
                    }
                }
            }
        }
    }

    /// Emit the transcript, then let go of the audio. `false`: no sink took the transcript
    /// before the stop deadline, so the audio stays in the spool (to be sent again).
    fn deliver(
        &mut self,
        job: &Job,
        meta: &spool::UtteranceMeta,
        t: response::Transcript,
        endpoint: usize,
        attempts: u32,
    ) -> bool {
        let ep = &self.setup.endpoints[endpoint];
        let latency = match job.ended {
            Some(at) => at.elapsed(),
            None => humantime::parse_rfc3339(&meta.start_time)
                .ok()
                .map(|start| start + Duration::from_millis(meta.duration_ms))
                .and_then(|end| SystemTime::now().duration_since(end).ok())
                .unwrap_or_default(),
        };
        let event = EventKind::Transcript {
            utterance: meta.utterance.clone(),
            offset_ms: meta.offset_ms,
            text: t.text,
            duration_ms: meta.duration_ms,
            language: t.language,
            segments: t.segments,
            words: t.words,
            logprobs: t.logprobs,
            usage: t.usage,
            model: ep.model.clone(),
            endpoint: ep.shown.clone(),
            attempts,
            latency_ms: latency.as_millis() as u64,
        };
        // Handed to the sinks, or kept: every sink full (a stalled reader) or hark stopping.
        while !self.events.emit(event.clone()) {
            if !self.wait(Duration::from_secs(1)) {
                tracing::warn!(
                    "{}: no sink took its transcript; the audio stays in the spool",
                    meta.utterance
                );
                return false;
            }
        }
        let ep = &self.setup.endpoints[endpoint];
        self.report.transcribed += 1;
        let kept = if self.keep_audio {
            self.spool.move_to(&job.entry, "done").map(|_| ())
        } else {
            self.spool.remove(&job.entry)
        };
        if let Err(e) = kept {
            tracing::warn!("{}: transcribed, but {e}", meta.utterance);
        }
        if self.down {
            self.down = false;
            tracing::info!("{} answers again", ep.shown);
            (self.on_state)(false);
        }
        true
    }

    /// Move an utterance that will never be transcribed to `failed/` and say why.
    fn fail(&mut self, entry: &Entry, code: &'static str, why: &str) {
        let moved = self.spool.move_to(entry, "failed");
        let place = match &moved {
            Ok(path) => format!("kept as {}", path.display()),
            Err(e) => format!("could not be moved to failed/: {e}"),
        };
        let message = format!("utterance {}: {why}; not retried, {place}", entry.id);
        tracing::error!("{message}");
        self.events.emit(EventKind::Error {
            stage: Stage::Upload,
            code,
            message,
            retrying: false,
        });
        self.report.failed += 1;
    }
}

/// A number in 0..1 for backoff jitter.
fn jitter() -> f64 {
    f64::from(spool::random_u32()) / f64::from(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parts(overrides: &[&str]) -> Vec<(String, String)> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let c = Config::load(None, &o).expect("config");
        fields(&c.transcribe).expect("fields").parts
    }

    #[test]
    fn defaults_send_only_the_response_format() {
        assert_eq!(
            parts(&[]),
            [("response_format".to_owned(), "json".to_owned())]
        );
    }

    #[test]
    fn auto_chunking_and_streaming_use_the_sdk_spelling() {
        let p = parts(&[
            "transcribe.chunking_strategy=\"auto\"",
            "transcribe.stream=true",
            "transcribe.response_format=\"text\"",
        ]);
        let p: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            p,
            [
                ("response_format", "text"),
                ("stream", "true"),
                ("chunking_strategy", "auto"),
            ]
        );
    }

    #[test]
    fn a_speaker_reference_outside_2_to_10_s_is_refused_with_its_key() {
        let dir = std::env::temp_dir().join(format!("hark-spk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wav = dir.join("short.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&wav, spec).unwrap();
        for _ in 0..16000 {
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
        let set = format!(
            "transcribe.known_speakers=[{{name=\"a\", audio={:?}}}]",
            wav.display().to_string()
        );
        let c = Config::load(None, &[set]).unwrap();
        let err = fields(&c.transcribe).unwrap_err().to_string();
        assert!(err.contains("known_speakers[0]"), "{err}");
        assert!(err.contains("1.00 s"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_go_to_the_hosts_that_need_them() {
        assert!(needs_key("https://api.openai.com/v1"));
        assert!(needs_key("https://api.groq.com/openai/v1"));
        assert!(needs_key(
            "https://res.openai.azure.com/openai/deployments/w?api-version=1"
        ));
        assert!(needs_key("https://api.groq.com:443/openai/v1"));
        assert!(!needs_key("http://127.0.0.1:8000/v1"));
        assert!(!needs_key("http://whisper.lan:8080/inference"));
    }
}
