//! Upload: one thread works through the spool, oldest utterance first, posting each to the
//! configured endpoints with the SDKs' retry policy and ordered fallback, and emits its transcript.
//!
//! The spool is the queue. An utterance leaves it only after its `transcript` event has been
//! handed to the sinks (then it is deleted, or moved to `done/` with `spool.keep_audio`), or after
//! every endpoint refused it for good (moved to `failed/`, with an `error` event). While every
//! endpoint is down the thread keeps trying with a capped backoff and reports `degraded`; nothing
//! is lost meanwhile, because nothing leaves the spool.
//!
//! Here: the settings built from `[transcribe]` ([`Setup`]) and the types callers see. Deliberately
//! not here: the queue and its threads (`queue`, `worker`), the decisions they carry out (`policy`, with
//! the SDKs' rule in `retry`), HTTP details (`client`), body parsing (`response`, `sse`).

pub mod client;
mod cues;
pub(crate) mod multipart;
pub(crate) mod policy;
mod queue;
pub(crate) mod response;
pub(crate) mod retry;
pub(crate) mod sse;
mod uploader;
mod worker;

pub(crate) use uploader::Uploader;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::codec::decode;
use crate::config::{Chunking, ResponseFormat, TranscribeConfig};
use crate::spool::{self, Entry};
use client::{Client, Endpoint, Fields, Secret};

/// Utterances shorter than this are never sent: every API answers 400 `audio_too_short`.
pub(crate) const MIN_DURATION_MS: u64 = 100;

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
pub(crate) enum StartError {
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("cannot start the upload thread: {0}")]
    Thread(std::io::Error),
}

/// Everything the upload thread needs, built from `[transcribe]` before any thread starts.
pub(crate) struct Setup {
    pub(crate) client: Client,
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) fields: Fields,
}

impl Setup {
    /// Resolve keys, check where they may be sent, load trust roots and speaker references.
    /// `Ok(None)`: the primary endpoint needs a key and there is none (hark records only).
    pub(crate) fn from_config(t: &TranscribeConfig) -> Result<Option<Setup>, SetupError> {
        // An OpenAI key goes to OpenAI only: a LAN server named as the endpoint must not get
        // it just because `api_key_env` kept its default.
        let host = crate::url::host_of(&t.endpoint).to_ascii_lowercase();
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
                if ep.has_key()
                    && ep.url.starts_with("http://")
                    && !crate::url::is_loopback(&ep.url)
                {
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
pub(crate) fn no_key_hint(t: &TranscribeConfig) -> String {
    format!(
        "transcription is off: no API key for {}. Set {} (transcribe.api_key_env) or transcribe.api_key_file, \
         or point transcribe.endpoint at a local server; utterances stay in the spool until then",
        crate::url::redact(&t.endpoint),
        if t.api_key_env.is_empty() {
            "an environment variable"
        } else {
            &t.api_key_env
        }
    )
}

fn needs_key(endpoint: &str) -> bool {
    let host = crate::url::host_of(endpoint).to_ascii_lowercase();
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
    crate::url::authority(url).to_ascii_lowercase()
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
    let (names, refs) = speakers(t)?;
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

/// `known_speakers`: the names, and the references as WAV data URLs (2 to 10 s each).
fn speakers(t: &TranscribeConfig) -> Result<(Vec<String>, Vec<String>), SetupError> {
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
    Ok((names, refs))
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
pub(crate) enum Patience {
    /// Keep trying with a capped backoff (the daemon).
    Forever,
    /// Stop and leave the rest in the spool (`hark upload`).
    GiveUp,
}

/// What the upload threads did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub(crate) transcribed: u64,
    pub(crate) failed: u64,
    /// Still in the spool when the threads ended.
    pub(crate) waiting: u64,
}

/// How one utterance ended, for a caller that keeps its own record (`hark transcribe`).
#[derive(Debug, Clone)]
pub(crate) enum Finished {
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

/// Hands new utterances to whoever uploads them. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Submitter(Arc<dyn Fn(Entry, Instant) + Send + Sync>);

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Submitter")
    }
}

impl Submitter {
    /// A submitter that calls `f` with each utterance (a caller that queues them itself).
    pub(crate) fn new(f: impl Fn(Entry, Instant) + Send + Sync + 'static) -> Submitter {
        Submitter(Arc::new(f))
    }

    /// Queue an utterance whose `speech_end` was emitted at `ended`.
    pub(crate) fn submit(&self, entry: Entry, ended: Instant) {
        (self.0)(entry, ended)
    }
}

/// Called with `true` when every endpoint has failed and with `false` when one answers again.
pub(crate) type OnState = Arc<dyn Fn(bool) + Send + Sync>;
/// Called by the upload thread with each utterance it finished.
pub(crate) type OnResult = Arc<dyn Fn(Finished) + Send + Sync>;

/// How the upload threads behave.
pub(crate) struct Options {
    pub(crate) patience: Patience,
    /// Move transcribed audio to `done/` instead of deleting it.
    pub(crate) keep_audio: bool,
    /// Uploads at a time. The daemon uses 1, so that transcripts come in speech order.
    pub(crate) workers: usize,
    pub(crate) on_state: OnState,
    pub(crate) on_result: Option<OnResult>,
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
