//! The event schema: every event hark emits, its fields, and its serialisation as one JSON line.
//!
//! Every event is a JSON object on one line with `v`, `type`, `device`, `seq` and `time`, followed by
//! the fields of its type (the README's "Events" section). The types of a transcript's `segments`
//! and `words` live here too: the upload stage parses servers' answers into them.
//! Deliberately not here: numbering events and handing them to the sinks (`crate::bus`), and the
//! sinks themselves (`crate::sink`). This module imports nothing else of hark's.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

/// Why an utterance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EndReason {
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
pub(crate) enum DropReason {
    TooShort,
    TooQuiet,
    SpoolFull,
}

/// The stage an `error` event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Stage {
    Capture,
    Upload,
    Sink,
    Config,
    Spool,
}

/// The daemon's health as reported in `status` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    Online,
    Degraded,
}

/// One timed stretch of the transcript (a verbose/diarized JSON segment or an SRT/VTT cue).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Segment {
    pub(crate) start: f64,
    pub(crate) end: f64,
    pub(crate) text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) speaker: Option<String>,
}

/// One timed word (verbose_json with `timestamp_granularities[]=word`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Word {
    pub(crate) word: String,
    pub(crate) start: f64,
    pub(crate) end: f64,
}

/// The fields of each event type. Serialized flat into the event object after the common fields.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub(crate) enum EventKind {
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
    pub(crate) fn name(&self) -> &'static str {
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
pub(crate) struct Line {
    pub(crate) kind: &'static str,
    /// The event's `seq`: a sink that starts a new reader mid-stream (a socket client) uses it to
    /// skip what was emitted before that reader's first line.
    pub(crate) seq: u64,
    pub(crate) json: Arc<str>,
    /// For `transcript` events, the text alone (stdout's `text` format).
    pub(crate) text: Option<Arc<str>>,
}

impl Line {
    /// `kind` as event number `seq` of `device`, stamped `time`: the `v`, `type`, `device`, `seq`
    /// and `time` fields first, then the fields of its type.
    pub(crate) fn serialize(
        kind: &EventKind,
        device: &str,
        seq: u64,
        time: SystemTime,
    ) -> Result<Line, serde_json::Error> {
        let envelope = Envelope {
            v: 1,
            kind_name: kind.name(),
            device,
            seq,
            time: humantime::format_rfc3339_millis(time).to_string(),
            kind,
        };
        let json = serde_json::to_string(&envelope)?;
        let text = match kind {
            EventKind::Transcript { text, .. } => Some(Arc::from(text.as_str())),
            _ => None,
        };
        Ok(Line {
            kind: kind.name(),
            seq,
            json: json.into(),
            text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_the_common_fields_first_then_its_own() {
        let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let kind = EventKind::Transcript {
            utterance: "u1".into(),
            offset_ms: 5,
            text: "hello".into(),
            duration_ms: 900,
            language: None,
            segments: vec![Segment {
                start: 0.0,
                end: 0.5,
                text: "hello".into(),
                speaker: None,
            }],
            words: Vec::new(),
            logprobs: None,
            usage: None,
            model: "m".into(),
            endpoint: "https://h/v1".into(),
            attempts: 1,
            latency_ms: 40,
        };
        let line = Line::serialize(&kind, "kiosk-1", 7, time).unwrap();
        assert_eq!(
            (line.kind, line.seq, line.text.as_deref()),
            ("transcript", 7, Some("hello"))
        );
        assert_eq!(
            &*line.json,
            concat!(
                r#"{"v":1,"type":"transcript","device":"kiosk-1","seq":7,"#,
                r#""time":"2023-11-14T22:13:20.123Z","utterance":"u1","offset_ms":5,"#,
                r#""text":"hello","duration_ms":900,"#,
                r#""segments":[{"start":0.0,"end":0.5,"text":"hello"}],"#,
                r#""model":"m","endpoint":"https://h/v1","attempts":1,"latency_ms":40}"#
            )
        );
        let status = EventKind::Status {
            state: State::Degraded,
            overruns: 0,
            spool_pending: 2,
            spool_bytes: 3,
            events_dropped: 4,
            uptime_s: 5,
        };
        let line = Line::serialize(&status, "d", 0, time).unwrap();
        assert!(line.text.is_none());
        assert!(line.json.ends_with(r#""state":"degraded","overruns":0,"spool_pending":2,"spool_bytes":3,"events_dropped":4,"uptime_s":5}"#), "{}", line.json);
    }
}
