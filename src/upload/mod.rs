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
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;

use crate::codec::decode;
use crate::config::{Chunking, ResponseFormat, TranscribeConfig};
use crate::event::{DropReason, EventKind, Events, Stage};
use crate::spool::{self, Entry, Spool};
use client::{Client, Endpoint, Fields, Secret, Upload};
use retry::Verdict;

/// Utterances shorter than this are never sent: every API answers 400 `audio_too_short`.
pub const MIN_DURATION_MS: u64 = 100;

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

/// What the upload threads did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub transcribed: u64,
    pub failed: u64,
    /// Still in the spool when the threads ended.
    pub waiting: u64,
}

/// How one utterance ended, for a caller that keeps its own record (`hark transcribe`).
#[derive(Debug, Clone)]
pub enum Finished {
    /// Transcribed; its `transcript` event was handed to the sinks.
    Transcribed {
        utterance: String,
        transcript: response::Transcript,
        model: String,
        endpoint: String,
    },
    /// Under 0.1 s: not sent (its `dropped` event was emitted, its audio removed).
    TooShort { utterance: String },
    /// Refused for good by every endpoint (its audio is in `failed/`, an `error` event said why).
    Failed {
        utterance: String,
        code: &'static str,
        message: String,
    },
}

struct Job {
    entry: Entry,
    /// When its `speech_end` was emitted, for utterances of this run.
    ended: Option<Instant>,
}

/// Hands new utterances to whoever uploads them. Cheap to clone.
#[derive(Clone)]
pub struct Submitter(Arc<dyn Fn(Entry, Instant) + Send + Sync>);

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Submitter")
    }
}

impl Submitter {
    /// A submitter that calls `f` with each utterance (a caller that queues them itself).
    pub fn new(f: impl Fn(Entry, Instant) + Send + Sync + 'static) -> Submitter {
        Submitter(Arc::new(f))
    }

    /// Queue an utterance whose `speech_end` was emitted at `ended`.
    pub fn submit(&self, entry: Entry, ended: Instant) {
        (self.0)(entry, ended)
    }
}

/// Called with `true` when every endpoint has failed and with `false` when one answers again.
pub type OnState = Arc<dyn Fn(bool) + Send + Sync>;
/// Called by the upload thread with each utterance it finished.
pub type OnResult = Arc<dyn Fn(Finished) + Send + Sync>;

/// How the upload threads behave.
pub struct Options {
    pub patience: Patience,
    /// Move transcribed audio to `done/` instead of deleting it.
    pub keep_audio: bool,
    /// Uploads at a time. The daemon uses 1, so that transcripts come in speech order.
    pub workers: usize,
    pub on_state: OnState,
    pub on_result: Option<OnResult>,
}

/// The queue the upload threads share, and what the control thread tells them.
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// No more jobs will come: end once the queue is empty.
    finishing: bool,
    /// End by this instant, whatever is left.
    deadline: Option<Instant>,
    /// The newest settings (a reload replaces them) and how many times they were replaced.
    setup: Arc<Setup>,
    generation: u64,
    /// Every endpoint failed: reported once, whichever thread saw it.
    down: bool,
    /// A thread gave up on the endpoints ([`Patience::GiveUp`]): no one takes a new job.
    gave_up: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, job: Job) {
        self.lock().jobs.push_back(job);
        // All: a thread waiting out a backoff sleeps on the same condvar as an idle one.
        self.changed.notify_all();
    }
}

/// Owns the upload threads.
pub struct Uploader {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<Report>>,
}

impl Uploader {
    /// Queue what waits in the spool now (oldest first), then start `options.workers` threads.
    /// `done` receives one message when the last thread ends.
    pub fn start<T: Send + 'static>(
        setup: Setup,
        spool: Arc<Spool>,
        events: Events,
        options: Options,
        done: (Sender<T>, T),
    ) -> Result<Uploader, StartError> {
        let jobs: VecDeque<Job> = spool
            .entries()?
            .into_iter()
            .map(|entry| Job { entry, ended: None })
            .collect();
        if !jobs.is_empty() {
            tracing::info!(
                "{} utterances wait in the spool; uploading them first",
                jobs.len()
            );
        }
        let setup = Arc::new(setup);
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                jobs,
                finishing: false,
                deadline: None,
                setup: setup.clone(),
                generation: 0,
                down: false,
                gave_up: false,
            }),
            changed: Condvar::new(),
        });
        // Sent when the last thread ends, however it ends (a panic included).
        let done = Arc::new(DoneGuard(Mutex::new(Some(done))));
        let mut uploader = Uploader {
            queue: queue.clone(),
            threads: Vec::new(),
        };
        for i in 0..options.workers.max(1) {
            let worker = Worker {
                queue: queue.clone(),
                setup: setup.clone(),
                generation: 0,
                spool: spool.clone(),
                events: events.clone(),
                patience: options.patience,
                keep_audio: options.keep_audio,
                on_state: options.on_state.clone(),
                on_result: options.on_result.clone(),
                report: Report::default(),
            };
            let done = done.clone();
            let name = if options.workers > 1 {
                format!("hark-upload-{i}")
            } else {
                "hark-upload".to_owned()
            };
            let thread = thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _done = done;
                    worker.run()
                })
                // Dropping `uploader` stops and joins the threads already started.
                .map_err(StartError::Thread)?;
            uploader.threads.push(thread);
        }
        Ok(uploader)
    }

    pub fn submitter(&self) -> Submitter {
        let queue = self.queue.clone();
        Submitter::new(move |entry, ended| {
            queue.push(Job {
                entry,
                ended: Some(ended),
            })
        })
    }

    /// No more utterances will come: the threads end when the queue is empty (or, with
    /// [`Patience::GiveUp`], when every endpoint is down).
    pub fn finish(&self) {
        self.queue.lock().finishing = true;
        self.queue.changed.notify_all();
    }

    /// New settings from a reloaded config, used from the next utterance on.
    pub fn reconfigure(&self, setup: Setup) {
        let mut state = self.queue.lock();
        state.setup = Arc::new(setup);
        state.generation += 1;
    }

    /// Keep going until `deadline`, then abandon what is left (it stays in the spool).
    pub fn stop(&self, deadline: Instant) {
        let mut state = self.queue.lock();
        state.deadline = Some(state.deadline.map_or(deadline, |d| d.min(deadline)));
        drop(state);
        self.queue.changed.notify_all();
    }

    /// Join the threads; call after the `done` message arrived (else this blocks until they end).
    pub fn join(mut self) -> Report {
        let mut report = Report::default();
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().unwrap_or_default();
            report.transcribed += r.transcribed;
            report.failed += r.failed;
        }
        let state = self.queue.lock();
        report.waiting = state.jobs.len() as u64;
        if report.waiting > 0
            && let Some(dir) = state.jobs.front().and_then(|job| job.entry.audio.parent())
        {
            tracing::warn!(
                "{} utterances stay in {} for the next run",
                report.waiting,
                dir.display()
            );
        }
        report
    }

    /// Give up on the threads without joining them (an upload in flight past the stop deadline).
    pub fn detach(mut self) {
        self.threads.clear();
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(Instant::now());
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

struct DoneGuard<T>(Mutex<Option<(Sender<T>, T)>>);

impl<T> Drop for DoneGuard<T> {
    fn drop(&mut self) {
        let taken = self
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((tx, msg)) = taken {
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
            self.wav = Some(decode::ogg_opus_to_wav(&self.ogg)?);
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
    queue: Arc<Queue>,
    /// The settings in use, taken from the queue between utterances (an endpoint index must
    /// not change under an upload).
    setup: Arc<Setup>,
    generation: u64,
    spool: Arc<Spool>,
    events: Events,
    patience: Patience,
    keep_audio: bool,
    on_state: OnState,
    on_result: Option<OnResult>,
    report: Report,
}

impl Worker {
    fn run(mut self) -> Report {
        while let Some(job) = self.next_job() {
            match self.upload(&job) {
                Outcome::Done => {}
                outcome => {
                    // It stays in the spool; the others stop too (past the deadline, or every
                    // endpoint is down and this run does not wait).
                    let mut state = self.queue.lock();
                    state.jobs.push_front(job);
                    state.gave_up |= matches!(outcome, Outcome::GaveUp);
                    drop(state);
                    self.queue.changed.notify_all();
                    break;
                }
            }
        }
        self.report
    }

    /// The next job, or `None` when this thread should end.
    fn next_job(&self) -> Option<Job> {
        let mut state = self.queue.lock();
        loop {
            if state.gave_up || state.deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.finishing || state.deadline.is_some() {
                return None;
            }
            state = self
                .queue
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.queue.lock().deadline
    }

    fn past_deadline(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Wait `d`; `false` when the stop deadline comes first.
    fn wait(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut state = self.queue.lock();
        loop {
            let now = Instant::now();
            if let Some(deadline) = state.deadline
                && deadline <= until
            {
                if now >= deadline {
                    return false;
                }
            } else if now >= until {
                return true;
            }
            let end = state.deadline.map_or(until, |dl| dl.min(until));
            state = self
                .queue
                .changed
                .wait_timeout(state, end.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Take new settings, if a reload sent some; only between rounds over the endpoints.
    fn take_setup(&mut self) {
        let state = self.queue.lock();
        if state.generation != self.generation {
            self.generation = state.generation;
            self.setup = state.setup.clone();
            drop(state);
            tracing::info!("new transcription settings in effect");
        }
    }

    /// Mark every endpoint down (`true`) or one up again; whether that changed the state.
    fn set_down(&self, down: bool) -> bool {
        std::mem::replace(&mut self.queue.lock().down, down) != down
    }

    fn is_down(&self) -> bool {
        self.queue.lock().down
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
            if let Some(on_result) = &self.on_result {
                on_result(Finished::TooShort {
                    utterance: meta.utterance,
                });
            }
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
            if self.set_down(true) {
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
                self.deadline(),
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
                    if !self.is_down() {
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
        // For a caller that keeps its own record of the results.
        let kept = self.on_result.is_some().then(|| t.clone());
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
        if let (Some(on_result), Some(transcript)) = (&self.on_result, kept) {
            on_result(Finished::Transcribed {
                utterance: meta.utterance.clone(),
                transcript,
                model: ep.model.clone(),
                endpoint: ep.shown.clone(),
            });
        }
        let kept = if self.keep_audio {
            self.spool.move_to(&job.entry, "done").map(|_| ())
        } else {
            self.spool.remove(&job.entry)
        };
        if let Err(e) = kept {
            tracing::warn!("{}: transcribed, but {e}", meta.utterance);
        }
        if self.set_down(false) {
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
        if let Some(on_result) = &self.on_result {
            on_result(Finished::Failed {
                utterance: entry.id.clone(),
                code,
                message: message.clone(),
            });
        }
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
