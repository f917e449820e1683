//! The one event type hark emits, serialized once and fanned out to every sink.
//!
//! Every event is a JSON object on one line with `v`, `type`, `device`, `seq` and `time`, followed by
//! the fields of its type (the README's "Events" section). This module does not know where events go: it
//! hands the same bytes to each sink's bounded queue and never waits for a sink.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::sink::SinkQueue;
use crate::upload::response::{Segment, Word};

/// Why an utterance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `vad.silence_ms` of unvoiced audio followed the speech.
    Silence,
    /// The utterance reached `vad.max_utterance_ms`; the speech goes on in a new utterance.
    MaxLength,
    /// The file or pipe ended.
    EndOfInput,
    /// hark was asked to stop (SIGTERM, SIGINT).
    Shutdown,
    /// The capture device vanished mid-utterance; what was captured is kept.
    DeviceLost,
    /// Capture lost at least `vad.silence_ms` of audio (the ring overflowed); what came before is
    /// kept as an utterance of its own.
    Overrun,
}

/// Why an utterance was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    TooShort,
    TooQuiet,
    SpoolFull,
}

/// The stage an `error` event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Capture,
    Upload,
    Sink,
    Config,
    Spool,
}

/// The daemon's health as reported in `status` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Online,
    Offline,
    Degraded,
}

/// The fields of each event type. Serialized flat into the event object after the common fields.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EventKind {
    SpeechStart {
        utterance: String,
        offset_ms: u64,
    },
    SpeechEnd {
        utterance: String,
        offset_ms: u64,
        duration_ms: u64,
        reason: EndReason,
        #[serde(skip_serializing_if = "Option::is_none")]
        audio: Option<String>,
    },
    Transcript {
        utterance: String,
        offset_ms: u64,
        text: String,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        language: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        segments: Vec<Segment>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        words: Vec<Word>,
        #[serde(skip_serializing_if = "Option::is_none")]
        logprobs: Option<serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<serde_json::Value>,
        model: String,
        /// The endpoint's base URL, userinfo redacted.
        endpoint: String,
        attempts: u32,
        /// From the end of speech (the `speech_end` event) to this event.
        latency_ms: u64,
    },
    TranscriptDelta {
        utterance: String,
        offset_ms: u64,
        delta: String,
    },
    Dropped {
        utterance: String,
        offset_ms: u64,
        reason: DropReason,
        duration_ms: u64,
    },
    Error {
        stage: Stage,
        code: &'static str,
        message: String,
        retrying: bool,
    },
    Status {
        state: State,
        overruns: u64,
        spool_pending: u64,
        spool_bytes: u64,
        /// Event lines lost by the sinks (full queues, slow socket clients, MQTT's queue).
        events_dropped: u64,
        uptime_s: u64,
    },
}

impl EventKind {
    /// The event's `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SpeechStart { .. } => "speech_start",
            EventKind::SpeechEnd { .. } => "speech_end",
            EventKind::Transcript { .. } => "transcript",
            EventKind::TranscriptDelta { .. } => "transcript_delta",
            EventKind::Dropped { .. } => "dropped",
            EventKind::Error { .. } => "error",
            EventKind::Status { .. } => "status",
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    v: u8,
    #[serde(rename = "type")]
    kind_name: &'static str,
    device: &'a str,
    seq: u64,
    time: String,
    #[serde(flatten)]
    kind: &'a EventKind,
}

/// One serialized event: the JSON line without its newline, shared by every sink.
#[derive(Debug, Clone)]
pub struct Line {
    pub kind: &'static str,
    /// The event's `seq`: a sink that starts a new reader mid-stream (a socket client) uses it to
    /// skip what was emitted before that reader's first line.
    pub seq: u64,
    pub json: Arc<str>,
    /// For `transcript` events, the text alone (stdout's `text` format).
    pub text: Option<Arc<str>>,
}

/// Hands events to the sinks. Cheap to clone; every stage holds one.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    device: String,
    seq: AtomicU64,
    closed: AtomicBool,
    /// The sinks are being replaced (SIGHUP): nothing is handed over meanwhile.
    paused: AtomicBool,
    /// Held while numbering and queueing, so that `seq` order is delivery order on every sink.
    queues: Mutex<Vec<SinkQueue>>,
}

impl Events {
    pub fn new(device: String, queues: Vec<SinkQueue>) -> Events {
        Events {
            inner: Arc::new(Inner {
                device,
                seq: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                queues: Mutex::new(queues),
            }),
        }
    }

    pub fn device(&self) -> &str {
        &self.inner.device
    }

    /// Serialize `kind` once and offer it to every sink without blocking. Returns whether it
    /// was handed over: at least one sink took it, or there are no sinks at all. `false` after
    /// [`Events::close`], or when every sink refused it (full or gone).
    pub fn emit(&self, kind: EventKind) -> bool {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.inner.closed.load(Ordering::Relaxed) || self.inner.paused.load(Ordering::Relaxed) {
            return false;
        }
        let Some(line) = self.serialize(&kind) else {
            return false;
        };
        let mut taken = queues.is_empty();
        for queue in queues.iter_mut() {
            taken |= queue.offer(&line);
        }
        taken
    }

    /// Number and serialize an event without handing it to the sinks: the first line for one
    /// new reader (a socket client's `status`). `None` after [`Events::close`].
    ///
    /// The caller may hold a lock that its sink's `write` also takes: this takes the events
    /// lock, which `emit` holds only while offering lines to queues (never while a sink writes).
    pub fn render(&self, kind: &EventKind) -> Option<Line> {
        let _queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.inner.closed.load(Ordering::Relaxed) {
            return None;
        }
        self.serialize(kind)
    }

    /// Called with the events lock held, so that `seq` order is queueing order.
    fn serialize(&self, kind: &EventKind) -> Option<Line> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let envelope = Envelope {
            v: 1,
            kind_name: kind.name(),
            device: &self.inner.device,
            seq,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            kind,
        };
        let json = match serde_json::to_string(&envelope) {
            Ok(json) => json,
            // Serializing plain structs of strings and numbers cannot fail; log rather than panic.
            Err(e) => {
                tracing::error!("cannot serialize a {} event: {e}", kind.name());
                return None;
            }
        };
        let text = match kind {
            EventKind::Transcript { text, .. } => Some(Arc::from(text.as_str())),
            _ => None,
        };
        Some(Line {
            kind: kind.name(),
            seq,
            json: json.into(),
            text,
        })
    }

    /// Take the sink queues out to replace the sinks (SIGHUP); until [`Events::set_queues`],
    /// events are not handed to anyone (`emit` returns `false`, so transcripts are kept).
    pub fn take_queues(&self) -> Vec<SinkQueue> {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.inner.paused.store(true, Ordering::Relaxed);
        std::mem::take(&mut *queues)
    }

    /// Install new sink queues after [`Events::take_queues`].
    pub fn set_queues(&self, new: Vec<SinkQueue>) {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        *queues = new;
        self.inner.paused.store(false, Ordering::Relaxed);
    }

    /// Close every sink queue; the sink threads drain what they hold and end.
    pub fn close(&self) {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.inner.closed.store(true, Ordering::Relaxed);
        queues.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_fields_come_first_and_type_specific_fields_follow() {
        let (queue, rx) = SinkQueue::pair("test", 4);
        let events = Events::new("kiosk-1".into(), vec![queue]);
        events.emit(EventKind::SpeechStart {
            utterance: "u1".into(),
            offset_ms: 1200,
        });
        events.emit(EventKind::SpeechEnd {
            utterance: "u1".into(),
            offset_ms: 1200,
            duration_ms: 900,
            reason: EndReason::MaxLength,
            audio: None,
        });
        let first = rx.recv().unwrap();
        assert!(
            first
                .json
                .starts_with(r#"{"v":1,"type":"speech_start","device":"kiosk-1","seq":0,"time":""#),
            "{}",
            first.json
        );
        assert!(
            first
                .json
                .ends_with(r#""utterance":"u1","offset_ms":1200}"#)
        );
        let second: serde_json::Value = serde_json::from_str(&rx.recv().unwrap().json).unwrap();
        assert_eq!(second["seq"], 1);
        assert_eq!(second["reason"], "max_length");
        assert!(second.get("audio").is_none());
    }
}
