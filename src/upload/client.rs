//! The HTTP side of transcription: a blocking `ureq` agent with rustls, the endpoints it talks to
//! (URL, model, key, how the key is sent), and one attempt = one POST whose answer is read into a
//! [`Transcript`] or a classified [`Failure`].
//!
//! Deliberately not here: retries, fallback, the spool, events. Keys live in [`Secret`], whose
//! `Debug` prints `***`, and are scrubbed from anything a server echoes back.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};

use super::response::{self, ApiError, MAX_BODY, Transcript};
use super::retry::RetryHeaders;
use super::sse::{Stream, StreamError};
use crate::config::ResponseFormat;
use crate::url;

/// An API key. Never printed.
#[derive(Clone)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(key: String) -> Secret {
        Secret(key)
    }
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How an endpoint wants its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Auth {
    /// `Authorization: Bearer KEY` (OpenAI, Groq, speaches, vLLM, LocalAI).
    Bearer,
    /// `api-key: KEY` (Azure OpenAI).
    ApiKey,
}

/// One transcription endpoint.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// The full request URL: base + `/audio/transcriptions`, query kept.
    pub(crate) url: String,
    /// The base URL as configured, with any userinfo replaced by `***`: safe for events.
    pub(crate) shown: String,
    pub(crate) model: String,
    key: Option<Secret>,
    auth: Auth,
    /// Set once the endpoint has rejected Ogg/Opus: it gets WAV from then on.
    wav: AtomicBool,
}

impl Endpoint {
    pub(crate) fn new(base: &str, model: String, key: Option<Secret>) -> Endpoint {
        let parts = url::split(base);
        let path = parts.path.trim_end_matches('/');
        // A base that already names the route (whisper.cpp's `/inference`) is used as it is.
        let route = if path.ends_with("/audio/transcriptions") || path.ends_with("/inference") {
            ""
        } else {
            "/audio/transcriptions"
        };
        // The query stays after the route; a fragment is never sent.
        let mut request = format!("{}{path}{route}", parts.origin);
        if let Some(q) = parts.query {
            request.push('?');
            request.push_str(q);
        }
        let host = parts.host.to_ascii_lowercase();
        let azure = path.contains("/openai/deployments/")
            || host.ends_with(".openai.azure.com")
            || host.ends_with(".cognitiveservices.azure.com");
        Endpoint {
            url: request,
            shown: url::redact(base),
            model,
            key,
            auth: if azure { Auth::ApiKey } else { Auth::Bearer },
            wav: AtomicBool::new(false),
        }
    }

    pub(crate) fn has_key(&self) -> bool {
        self.key.is_some()
    }

    /// Whether this endpoint gets WAV instead of Ogg/Opus.
    pub(crate) fn wants_wav(&self) -> bool {
        self.wav.load(Ordering::Relaxed)
    }

    pub(crate) fn remember_wav(&self) {
        self.wav.store(true, Ordering::Relaxed);
    }

    /// `text` with this endpoint's key (if a server echoed it) replaced by `***`.
    pub(crate) fn scrub(&self, text: &str) -> String {
        match &self.key {
            Some(k) if !k.expose().is_empty() => text.replace(k.expose(), "***"),
            _ => text.to_owned(),
        }
    }
}

// Callers of the URL helpers written before `crate::url` existed name them here.

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("transcribe.ca_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("transcribe.ca_file {path}: no PEM certificate in it")]
    Empty { path: String },
}

/// The audio of one attempt.
pub(crate) struct Upload<'a> {
    pub(crate) id: &'a str,
    pub(crate) bytes: &'a [u8],
    pub(crate) wav: bool,
}

/// What one attempt ended with when it did not give a transcript.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The server answered with an error status; what it means is the upload policy's to say.
    Status {
        status: u16,
        error: ApiError,
        /// Boxed, to keep `Result<Transcript, Failure>` small.
        headers: Box<RetryHeaders>,
    },
    /// No usable answer: connection refused or reset, TLS, timeout, a malformed or oversized body.
    Transport { code: &'static str, message: String },
}

impl Failure {
    /// A short machine-readable code for `error` events.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Failure::Status { status, error, .. } => match (status, error.code.as_deref()) {
                (400, Some("audio_too_short")) => "audio_too_short",
                (429, Some("insufficient_quota")) => "insufficient_quota",
                (400, _) => "bad_request",
                (401, _) => "unauthorized",
                (403, _) => "forbidden",
                (404, _) => "not_found",
                (408, _) => "request_timeout",
                (409, _) => "conflict",
                (413, _) => "too_large",
                (415, _) => "unsupported_media_type",
                (422, _) => "unprocessable",
                (429, _) => "rate_limited",
                (s, _) if *s >= 500 => "server_error",
                _ => "http_error",
            },
            Failure::Transport { code, .. } => code,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status { status, error, .. } => {
                write!(f, "HTTP {status}: {}", error.message)?;
                if let Some(code) = &error.code {
                    write!(f, " (code {code})")?;
                }
                Ok(())
            }
            Failure::Transport { message, .. } => f.write_str(message),
        }
    }
}

/// The request fields other than `file` and `model`, in SDK encoding.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fields {
    pub(crate) parts: Vec<(String, String)>,
    pub(crate) format: Option<ResponseFormat>,
    pub(crate) stream: bool,
}

/// A blocking HTTPS client shared by every endpoint.
pub(crate) struct Client {
    agent: ureq::Agent,
    timeout: Duration,
}

impl Client {
    /// Trust Mozilla's roots (webpki) and the system store, plus `ca_file` when given.
    pub(crate) fn new(
        connect_timeout: Duration,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Client, TlsSetupError> {
        let roots: Vec<Certificate<'static>> = crate::tls::trust_roots(ca_file)
            .map_err(|e| match e {
                crate::tls::CaFileError::Read { path, source } => {
                    TlsSetupError::Read { path, source }
                }
                crate::tls::CaFileError::Empty { path } => TlsSetupError::Empty { path },
            })?
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        // ring, set here rather than through a ureq feature, so that neither ureq's copy of
        // the webpki roots nor a process-wide default provider is involved.
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(crate::tls::provider())
            .root_certs(RootCerts::new_with_certs(&roots))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_connect(Some(connect_timeout))
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent(concat!("hark/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Client { agent, timeout })
    }

    /// One POST. `deadline` shortens the timeout (shutdown); `on_delta` gets streamed text.
    pub(crate) fn transcribe(
        &self,
        ep: &Endpoint,
        fields: &Fields,
        audio: &Upload<'_>,
        deadline: Option<Instant>,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<Transcript, Failure> {
        let (content_type, body) = form(ep, fields, audio);
        let mut timeout = self.timeout;
        if let Some(d) = deadline {
            timeout = timeout.min(d.saturating_duration_since(Instant::now()));
        }
        let accept = if fields.stream {
            "text/event-stream, application/json"
        } else {
            "application/json, text/plain, */*"
        };
        let mut req = self
            .agent
            .post(&ep.url)
            .header("Content-Type", &content_type)
            .header("Accept", accept);
        if let Some(key) = &ep.key {
            req = match ep.auth {
                Auth::Bearer => req.header("Authorization", format!("Bearer {}", key.expose())),
                Auth::ApiKey => req.header("api-key", key.expose()),
            };
        }
        let req = req
            .config()
            .timeout_global(Some(timeout.max(Duration::from_millis(1))))
            .build();
        let resp = req.send(&body[..]).map_err(|e| transport(ep, &e))?;
        read_answer(ep, fields, resp, on_delta)
    }
}

/// The multipart body of one upload, and its content type.
fn form(ep: &Endpoint, fields: &Fields, audio: &Upload<'_>) -> (String, Vec<u8>) {
    let mut form = super::multipart::Form::new();
    let (name, mime) = if audio.wav {
        (format!("{}.wav", audio.id), "audio/wav")
    } else {
        (format!("{}.ogg", audio.id), "audio/ogg")
    };
    form.file("file", &name, mime, audio.bytes);
    form.text("model", &ep.model);
    for (k, v) in &fields.parts {
        form.text(k, v);
    }
    form.finish()
}

/// The server's answer: an error with its retry headers, an event stream, or a body.
fn read_answer(
    ep: &Endpoint,
    fields: &Fields,
    mut resp: ureq::http::Response<ureq::Body>,
    on_delta: &mut dyn FnMut(&str),
) -> Result<Transcript, Failure> {
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header("content-type");
    if !(200..300).contains(&status) {
        let headers = Box::new(RetryHeaders {
            should_retry: header("x-should-retry"),
            retry_after_ms: header("retry-after-ms"),
            retry_after: header("retry-after"),
        });
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_vec()
            .unwrap_or_default();
        let mut error = response::parse_error(&body);
        error.message = ep.scrub(&error.message);
        return Err(Failure::Status {
            status,
            error,
            headers,
        });
    }
    let is_sse = content_type
        .as_deref()
        .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
    if is_sse {
        let mut stream = Stream::new();
        let mut reader = resp.body_mut().with_config().limit(MAX_BODY).reader();
        let mut buf = [0u8; 4096];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return Err(io_failure(ep, &e)),
            };
            stream
                .feed(&buf[..n], on_delta)
                .map_err(|e| stream_failure(ep, e))?;
        }
        return stream.finish().map_err(|e| stream_failure(ep, e));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| transport(ep, &e))?;
    let format = fields.format.unwrap_or(ResponseFormat::Json);
    response::parse_body(content_type.as_deref(), format, &body).map_err(|e| Failure::Transport {
        code: "bad_response",
        message: ep.scrub(&e.0),
    })
}

fn stream_failure(ep: &Endpoint, e: StreamError) -> Failure {
    match e {
        // An error event inside a 200 stream: the server's own failure, worth another try
        // (as a 500 is).
        StreamError::Api(mut error) => {
            error.message = ep.scrub(&error.message);
            Failure::Status {
                status: 500,
                error,
                headers: Box::default(),
            }
        }
        StreamError::Bad(message) => Failure::Transport {
            code: "bad_response",
            message: ep.scrub(&message),
        },
    }
}

fn io_failure(ep: &Endpoint, e: &std::io::Error) -> Failure {
    // ureq wraps its own errors (timeouts, limits) in io::Error while a body is read.
    let code = match e.kind() {
        std::io::ErrorKind::TimedOut => "timeout",
        std::io::ErrorKind::InvalidData => "bad_response",
        _ => "connection",
    };
    Failure::Transport {
        code,
        message: ep.scrub(&format!("reading the response: {e}")),
    }
}

/// Whether an I/O error is rustls refusing the handshake (ureq passes those on as I/O errors).
fn is_tls(e: &std::io::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(c) = cause {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        cause = c.source();
    }
    // Wrapped in a type this crate cannot name: fall back on what it says.
    let text = e.to_string().to_ascii_lowercase();
    text.contains("certificate") || text.contains("handshake")
}

fn transport(ep: &Endpoint, e: &ureq::Error) -> Failure {
    use ureq::Error as E;
    let code = match e {
        E::Timeout(_) => "timeout",
        E::HostNotFound => "dns",
        E::ConnectionFailed => "connection",
        E::Tls(_) | E::Rustls(_) | E::Pem(_) => "tls",
        E::BodyExceedsLimit(_) => "bad_response",
        E::Protocol(_) | E::LargeResponseHeader(..) => "bad_response",
        E::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => "timeout",
        E::Io(io) if is_tls(io) => "tls",
        _ => "connection",
    };
    let detail = match e {
        E::BodyExceedsLimit(limit) => format!("response body larger than {limit} bytes"),
        E::Io(io) => format!("{code}: {io}"),
        _ => format!("{e}"),
    };
    Failure::Transport {
        code,
        message: ep.scrub(&detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_is_appended_before_the_query() {
        let ep = Endpoint::new("https://api.openai.com/v1", "m".into(), None);
        assert_eq!(ep.url, "https://api.openai.com/v1/audio/transcriptions");
        assert_eq!(ep.auth, Auth::Bearer);
        let azure = Endpoint::new(
            "https://res.openai.azure.com/openai/deployments/whisper?api-version=2024-06-01",
            "whisper".into(),
            None,
        );
        assert_eq!(
            azure.url,
            "https://res.openai.azure.com/openai/deployments/whisper/audio/transcriptions?api-version=2024-06-01"
        );
        assert_eq!(azure.auth, Auth::ApiKey);
        let wcpp = Endpoint::new("http://10.0.0.5:8080/inference", "m".into(), None);
        assert_eq!(wcpp.url, "http://10.0.0.5:8080/inference");
        let slash = Endpoint::new("http://h:8000/v1/", "m".into(), None);
        assert_eq!(slash.url, "http://h:8000/v1/audio/transcriptions");
        let bare = Endpoint::new("http://[::1]:8000?x=1", "m".into(), None);
        assert_eq!(bare.url, "http://[::1]:8000/audio/transcriptions?x=1");
        let login = Endpoint::new("https://u:pw@h/v1/?v=1#top", "m".into(), None);
        assert_eq!(login.url, "https://u:pw@h/v1/audio/transcriptions?v=1");
        assert_eq!(login.shown, "https://***@h/v1/?v=1#top");
        let cognitive = Endpoint::new("https://R.CognitiveServices.Azure.com/x", "m".into(), None);
        assert_eq!(cognitive.auth, Auth::ApiKey);
    }

    #[test]
    fn keys_are_never_printed_and_are_scrubbed_from_echoes() {
        let key = Secret::new("sk-test-123456".into());
        assert_eq!(format!("{key:?}"), "***");
        let ep = Endpoint::new("https://h/v1", "m".into(), Some(key));
        assert!(!format!("{ep:?}").contains("sk-test"));
        assert_eq!(
            ep.scrub("Incorrect API key provided: sk-test-123456."),
            "Incorrect API key provided: ***."
        );
    }
}
