//! Parsers for the bodies that `/v1/audio/transcriptions` servers send back: a successful
//! non-streaming body ([`parse_body`]: JSON in its `json`, `verbose_json` and `diarized_json`
//! shapes and the whisper.cpp, speaches, vLLM and LocalAI variants, or a `text`, `srt` or `vtt`
//! text body) and an error body of any status >= 400 ([`parse_error`]), reduced to a
//! [`Transcript`] or an [`ApiError`].
//!
//! Deliberately not here: reading the HTTP response or enforcing [`MAX_BODY`] (the caller does
//! that while reading), deciding whether to retry, reading a `text/event-stream` body (that is
//! `crate::upload::sse`, which reuses the helpers below; [`parse_body`] only hands it an
//! event-stream body a server sent unasked), and validating the content: cue and
//! segment timings are taken as sent (not sorted, not checked for overlap), and no text
//! normalisation is done beyond trimming, tag stripping in cues and joining cue lines.

use super::cues::{decode_entities, parse_text_body};
use crate::config::ResponseFormat;
use crate::event::{Segment, Word};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// A transcription result, whatever format it arrived in.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub(crate) struct Transcript {
    pub(crate) text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) language: Option<String>,
    #[serde(skip)]
    pub(crate) duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) segments: Vec<Segment>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) words: Vec<Word>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) logprobs: Option<serde_json::Value>,
}

/// An error body from any of the servers, reduced to what hark needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ApiError {
    pub(crate) message: String,
    pub(crate) code: Option<String>,
    /// The `type` field.
    pub(crate) kind: Option<String>,
    pub(crate) param: Option<String>,
}

/// A 2xx body that is not a usable transcript; the string names what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadBody(pub String);

/// Largest body hark reads (the caller enforces it while reading).
pub(crate) const MAX_BODY: u64 = 4 << 20;

/// Cap on a message taken from a non-JSON (e.g. proxy HTML) error body, in characters.
const TEXT_MESSAGE_CAP: usize = 300;
/// Cap on a message taken from a JSON error body, in characters.
const JSON_MESSAGE_CAP: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Text,
}

/// Parse a successful (2xx) non-streaming body.
///
/// The parser is chosen from the Content-Type (`application/json`, also with parameters, and
/// `+json` types → JSON; `text/plain`, `text/srt`, `application/x-subrip`, `text/vtt` → text;
/// missing or anything else → sniff: first non-whitespace character `{` → JSON, else text), not
/// from `requested`; a `text/event-stream` body (a server that streamed unasked) is read whole
/// with `crate::upload::sse::Stream`. `requested` only says how to read a text body:
/// `Srt`/`Vtt` → cues become segments and the text is the cue texts joined by a space; anything
/// else → the trimmed body.
pub(crate) fn parse_body(
    content_type: Option<&str>,
    requested: ResponseFormat,
    body: &[u8],
) -> Result<Transcript, BadBody> {
    if content_type.is_some_and(is_event_stream) {
        return parse_event_stream(body);
    }
    let text = decode(body);
    let kind = content_type
        .and_then(kind_of_content_type)
        .unwrap_or_else(|| {
            if text.trim_start().starts_with('{') {
                BodyKind::Json
            } else {
                BodyKind::Text
            }
        });
    match kind {
        BodyKind::Json => parse_json_body(&text),
        BodyKind::Text => {
            let (text, segments) = parse_text_body(&text, requested);
            Ok(Transcript {
                text,
                segments,
                ..Default::default()
            })
        }
    }
}

/// Parse an error body (any status >= 400) from any of the known servers, or a non-JSON body.
/// Never fails, never panics; the message is never empty.
pub(crate) fn parse_error(body: &[u8]) -> ApiError {
    let text = decode(body);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return message_only("empty response body".to_owned());
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(value) => error_from_json(&value),
        Err(_) => message_only(summarize_text(trimmed)),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers (also used by the SSE reader).

/// Body bytes as text: lossy UTF-8, a leading byte-order mark dropped.
pub(crate) fn decode(body: &[u8]) -> Cow<'_, str> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    String::from_utf8_lossy(body)
}

/// The error carried by a JSON object, if it is one: a non-empty `error` (object or string),
/// `"object": "error"` (vLLM) or `"type": "error"`. `lenient` also accepts FastAPI's `detail`
/// and a bare top-level `message` (used where the object cannot be anything but an error).
pub(crate) fn api_error_in(obj: &Map<String, Value>, lenient: bool) -> Option<ApiError> {
    match obj.get("error") {
        Some(Value::Object(inner)) => {
            let mut err = ApiError {
                message: message_of(inner).unwrap_or_default(),
                code: scalar_string(inner.get("code")),
                kind: scalar_string(inner.get("type")),
                param: scalar_string(inner.get("param")),
            };
            err.code = err.code.or_else(|| scalar_string(obj.get("code")));
            return Some(finish_error(err, obj));
        }
        Some(Value::String(s)) if !s.trim().is_empty() => {
            let err = ApiError {
                message: s.trim().to_owned(),
                ..top_level_fields(obj)
            };
            return Some(finish_error(err, obj));
        }
        _ => {}
    }
    let is_error_object = str_field(obj, "object") == Some("error");
    let is_error_type = str_field(obj, "type") == Some("error");
    if is_error_object || is_error_type {
        let err = ApiError {
            message: message_of(obj).unwrap_or_default(),
            ..top_level_fields(obj)
        };
        return Some(finish_error(err, obj));
    }
    if !lenient {
        return None;
    }
    if let Some(detail) = obj.get("detail").filter(|d| !d.is_null()) {
        let (message, kind) = detail_message(detail);
        let err = ApiError {
            message,
            kind,
            ..Default::default()
        };
        return Some(finish_error(err, obj));
    }
    if let Some(message) = message_of(obj) {
        let err = ApiError {
            message,
            ..top_level_fields(obj)
        };
        return Some(finish_error(err, obj));
    }
    None
}

/// A segment from a JSON object: start/end (numbers or numeric strings; missing → 0), text
/// (trimmed), speaker (string, or a number as its string).
pub(crate) fn segment_from(obj: &Map<String, Value>) -> Segment {
    Segment {
        start: number_like(obj.get("start")).unwrap_or(0.0),
        end: number_like(obj.get("end")).unwrap_or(0.0),
        text: str_field(obj, "text").unwrap_or("").trim().to_owned(),
        speaker: scalar_string(obj.get("speaker")),
    }
}

/// The segments of a JSON array (non-objects skipped).
pub(crate) fn segments_from(value: Option<&Value>) -> Vec<Segment> {
    objects(value).map(segment_from).collect()
}

/// The words of a JSON array: `{word,start,end}`, or LocalAI's `{text,start,end}`. Words are
/// trimmed (whisper.cpp sends tokens with a leading space); entries without a word are skipped.
pub(crate) fn words_from(value: Option<&Value>) -> Vec<Word> {
    objects(value)
        .filter_map(|obj| {
            let word = str_field(obj, "word")
                .or_else(|| str_field(obj, "text"))?
                .trim();
            (!word.is_empty()).then(|| Word {
                word: word.to_owned(),
                start: number_like(obj.get("start")).unwrap_or(0.0),
                end: number_like(obj.get("end")).unwrap_or(0.0),
            })
        })
        .collect()
}

/// Top-level words, or when there are none, the words inside the segments (whisper.cpp).
pub(crate) fn all_words(obj: &Map<String, Value>) -> Vec<Word> {
    let words = words_from(obj.get("words"));
    if !words.is_empty() {
        return words;
    }
    objects(obj.get("segments"))
        .flat_map(|seg| words_from(seg.get("words")))
        .collect()
}

/// A non-empty trimmed string field.
pub(crate) fn nonempty_string(value: Option<&Value>) -> Option<String> {
    let s = value?.as_str()?.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A JSON value copied unless absent or null.
pub(crate) fn non_null(value: Option<&Value>) -> Option<Value> {
    value.filter(|v| !v.is_null()).cloned()
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub(crate) fn cap_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

// ---------------------------------------------------------------------------------------------
// JSON success bodies.

fn kind_of_content_type(content_type: &str) -> Option<BodyKind> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/json" || media.ends_with("+json") {
        Some(BodyKind::Json)
    } else if matches!(
        media.as_str(),
        "text/plain" | "text/srt" | "application/x-subrip" | "text/vtt"
    ) {
        Some(BodyKind::Text)
    } else {
        None
    }
}

fn is_event_stream(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .eq_ignore_ascii_case("text/event-stream")
}

/// A server that streamed although hark did not ask it to: read the whole body as a stream.
fn parse_event_stream(body: &[u8]) -> Result<Transcript, BadBody> {
    let mut stream = crate::upload::sse::Stream::new();
    let result = stream.feed(body, &mut |_| {});
    result.and_then(|()| stream.finish()).map_err(|e| match e {
        crate::upload::sse::StreamError::Api(err) => BadBody(format!(
            "server sent an error in a successful response: {}",
            err.message
        )),
        crate::upload::sse::StreamError::Bad(msg) => BadBody(msg),
    })
}

fn parse_json_body(text: &str) -> Result<Transcript, BadBody> {
    let value: Value = serde_json::from_str(text.trim())
        .map_err(|e| BadBody(format!("response is not valid JSON: {e}")))?;
    let obj = match &value {
        Value::Object(obj) => obj,
        // A bare JSON string is taken as the transcript (text-as-JSON servers).
        Value::String(s) => {
            return Ok(Transcript {
                text: s.trim().to_owned(),
                ..Default::default()
            });
        }
        other => {
            return Err(BadBody(format!(
                "JSON response is {}, not an object",
                json_kind(other)
            )));
        }
    };
    let text = str_field(obj, "text");
    if let Some(err) = api_error_in(obj, text.is_none()) {
        return Err(BadBody(format!(
            "server sent an error in a successful response: {}",
            err.message
        )));
    }
    let Some(text) = text else {
        return Err(BadBody(match obj.get("text") {
            None | Some(Value::Null) => "JSON response has no \"text\" field".to_owned(),
            Some(other) => format!(
                "JSON response's \"text\" field is {}, not a string",
                json_kind(other)
            ),
        }));
    };
    Ok(Transcript {
        text: text.trim().to_owned(),
        language: nonempty_string(obj.get("language")),
        duration_s: number_like(obj.get("duration")),
        segments: segments_from(obj.get("segments")),
        words: all_words(obj),
        usage: non_null(obj.get("usage")),
        logprobs: non_null(obj.get("logprobs")),
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// A finite number, or a string holding one.
fn number_like(value: Option<&Value>) -> Option<f64> {
    let n = match value? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    n.is_finite().then_some(n)
}

/// A non-empty string, or a number as its string (codes, speakers).
fn scalar_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn objects(value: Option<&Value>) -> impl Iterator<Item = &Map<String, Value>> {
    value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

// ---------------------------------------------------------------------------------------------
// Error bodies.

fn message_only(message: String) -> ApiError {
    ApiError {
        message,
        ..Default::default()
    }
}

fn error_from_json(value: &Value) -> ApiError {
    match value {
        Value::Object(obj) => api_error_in(obj, true)
            .unwrap_or_else(|| message_only(cap_chars(&value.to_string(), TEXT_MESSAGE_CAP))),
        Value::String(s) if !s.trim().is_empty() => {
            message_only(cap_chars(s.trim(), JSON_MESSAGE_CAP))
        }
        other => message_only(cap_chars(&other.to_string(), TEXT_MESSAGE_CAP)),
    }
}

/// `type`, `code` and `param` from the top level of an error object.
fn top_level_fields(obj: &Map<String, Value>) -> ApiError {
    ApiError {
        message: String::new(),
        code: scalar_string(obj.get("code")),
        kind: scalar_string(obj.get("type")).filter(|t| t != "error"),
        param: scalar_string(obj.get("param")),
    }
}

/// Caps the message; an empty message is replaced by the whole object, compacted.
fn finish_error(mut err: ApiError, whole: &Map<String, Value>) -> ApiError {
    let message = err.message.trim();
    err.message = if message.is_empty() {
        cap_chars(&Value::Object(whole.clone()).to_string(), TEXT_MESSAGE_CAP)
    } else {
        cap_chars(message, JSON_MESSAGE_CAP)
    };
    err
}

/// `message` (or `msg`, or a nested `error` string) of an object.
fn message_of(obj: &Map<String, Value>) -> Option<String> {
    ["message", "msg", "error", "detail"]
        .iter()
        .find_map(|key| nonempty_string(obj.get(*key)))
}

/// FastAPI's `detail`: a string, or a list of `{loc, msg, type}` validation errors.
fn detail_message(detail: &Value) -> (String, Option<String>) {
    match detail {
        Value::String(s) => (s.trim().to_owned(), None),
        Value::Array(items) => {
            let mut kind = None;
            let parts: Vec<String> = items
                .iter()
                .map(|item| match item {
                    Value::Object(obj) => {
                        if kind.is_none() {
                            kind = scalar_string(obj.get("type"));
                        }
                        let msg = message_of(obj).unwrap_or_else(|| item.to_string());
                        let loc: Vec<String> = obj
                            .get("loc")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(|l| scalar_string(Some(l)))
                            .collect();
                        if loc.is_empty() {
                            msg
                        } else {
                            format!("{}: {msg}", loc.join("."))
                        }
                    }
                    Value::String(s) => s.trim().to_owned(),
                    other => other.to_string(),
                })
                .filter(|p| !p.is_empty())
                .collect();
            (parts.join("; "), kind)
        }
        Value::Object(obj) => (
            message_of(obj).unwrap_or_else(|| detail.to_string()),
            scalar_string(obj.get("type")),
        ),
        other => (other.to_string(), None),
    }
}

/// A short readable message from a non-JSON body: HTML tags, comments, scripts and styles
/// removed when it looks like HTML, whitespace collapsed, capped.
fn summarize_text(text: &str) -> String {
    let lower_head: String = text
        .chars()
        .take(512)
        .collect::<String>()
        .to_ascii_lowercase();
    let html =
        text.starts_with('<') || lower_head.contains("<html") || lower_head.contains("<body");
    let plain = if html {
        decode_entities(&strip_html(text))
    } else {
        text.to_owned()
    };
    let collapsed = plain.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return "error body has no readable text".to_owned();
    }
    cap_chars(&collapsed, TEXT_MESSAGE_CAP)
}

fn strip_html(s: &str) -> String {
    // ASCII lowercasing keeps every byte offset, so indices into `lower` are valid in `s`.
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let rest = &lower[i..];
        if rest.starts_with("<!--") {
            match rest.find("-->") {
                Some(j) => i += j + 3,
                None => break,
            }
            out.push(' ');
            continue;
        }
        let raw_end = if rest.starts_with("<script") {
            Some("</script")
        } else if rest.starts_with("<style") {
            Some("</style")
        } else {
            None
        };
        if let Some(close) = raw_end {
            match rest.find(close) {
                // Jump to the closing tag; it is removed as a tag on the next turn.
                Some(j) => i += j,
                None => break,
            }
            out.push(' ');
            continue;
        }
        if rest.starts_with('<') {
            match rest.find('>') {
                Some(j) => i += j + 1,
                None => break,
            }
            out.push(' ');
            continue;
        }
        let j = rest.find('<').unwrap_or(rest.len());
        out.push_str(&s[i..i + j]);
        i += j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn json_body(body: &str) -> Transcript {
        parse_body(
            Some("application/json"),
            ResponseFormat::Json,
            body.as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn openai_json_with_usage_tokens() {
        let body = r#"{
          "text": "Imagine the wildest idea that you've ever had, and you're curious about how it might scale to something that's a 100, a 1,000 times bigger.",
          "usage": {
            "type": "tokens",
            "input_tokens": 14,
            "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
            "output_tokens": 45,
            "total_tokens": 59
          }
        }"#;
        let t = json_body(body);
        assert!(t.text.starts_with("Imagine the wildest idea"));
        assert_eq!(t.usage.as_ref().unwrap()["total_tokens"], 59);
        assert_eq!(t.usage.as_ref().unwrap()["type"], "tokens");
        assert_eq!(t.language, None);
        assert_eq!(t.duration_s, None);
        assert!(t.segments.is_empty() && t.words.is_empty() && t.logprobs.is_none());
    }

    #[test]
    fn openai_json_with_logprobs_and_charset() {
        let body = r#"{"text":" Hello. ","logprobs":[{"token":"Hello","logprob":-0.01,"bytes":[72,101,108,108,111]}],"usage":{"type":"duration","seconds":3}}"#;
        let t = parse_body(
            Some("application/json; charset=utf-8"),
            ResponseFormat::Json,
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(t.text, "Hello.");
        assert_eq!(t.logprobs.as_ref().unwrap()[0]["token"], "Hello");
        assert_eq!(t.usage.unwrap()["seconds"], 3);
    }

    #[test]
    fn verbose_json_with_segments_and_words() {
        let body = r#"{
          "task": "transcribe",
          "language": "english",
          "duration": 8.470000267028809,
          "text": "The beach was a popular spot on a hot summer day.",
          "segments": [
            {"id": 0, "seek": 0, "start": 0.0, "end": 3.319999933242798,
             "text": " The beach was a popular spot on a hot summer day.",
             "tokens": [50364, 440, 7534], "temperature": 0.0, "avg_logprob": -0.2860786020755768,
             "compression_ratio": 1.2363636493682861, "no_speech_prob": 0.00985979475080967}
          ],
          "words": [
            {"word": "The", "start": 0.0, "end": 0.23999999463558197},
            {"word": "beach", "start": 0.23999999463558197, "end": 0.6200000047683716}
          ],
          "usage": {"type": "duration", "seconds": 9}
        }"#;
        let t = json_body(body);
        assert_eq!(t.text, "The beach was a popular spot on a hot summer day.");
        assert_eq!(t.language.as_deref(), Some("english"));
        assert!((t.duration_s.unwrap() - 8.47).abs() < 1e-6);
        assert_eq!(t.segments.len(), 1);
        assert_eq!(
            t.segments[0].text,
            "The beach was a popular spot on a hot summer day."
        );
        assert!((t.segments[0].end - 3.32).abs() < 1e-6);
        assert_eq!(t.segments[0].speaker, None);
        assert_eq!(t.words.len(), 2);
        assert_eq!(t.words[1].word, "beach");
        assert!((t.words[1].end - 0.62).abs() < 1e-6);
    }

    #[test]
    fn diarized_json() {
        let body = r#"{
          "task": "transcribe",
          "duration": 27.4,
          "text": "Agent: Thanks for calling OpenAI support. Customer: Hi, I need help with diarization.",
          "segments": [
            {"type": "transcript.text.segment", "id": "seg_001", "start": 0.0, "end": 4.7,
             "text": "Thanks for calling OpenAI support.", "speaker": "agent"},
            {"type": "transcript.text.segment", "id": "seg_002", "start": 4.7, "end": 11.8,
             "text": "Hi, I need help with diarization.", "speaker": "A"}
          ],
          "usage": {"type": "duration", "seconds": 27}
        }"#;
        let t = json_body(body);
        assert_eq!(t.duration_s, Some(27.4));
        assert_eq!(t.segments.len(), 2);
        assert_eq!(t.segments[0].speaker.as_deref(), Some("agent"));
        assert_eq!(t.segments[1].speaker.as_deref(), Some("A"));
        assert_eq!(t.segments[1].start, 4.7);
        assert_eq!(t.usage.unwrap()["seconds"], 27);
    }

    #[test]
    fn whisper_cpp_verbose_json_words_in_segments() {
        let body = r#"{"task":"transcribe","language":"english","duration":2.5,"text":" And so my fellow Americans",
          "segments":[
            {"id":0,"text":" And so","start":0.0,"end":1.0,"tokens":[400,370],
             "words":[{"word":" And","start":0.0,"end":0.4,"probability":0.9},{"word":" so","start":0.4,"end":1.0,"probability":0.8}],
             "temperature":0.0,"avg_logprob":-0.2,"no_speech_prob":0.01},
            {"id":1,"text":" my fellow Americans","start":1.0,"end":2.5,"tokens":[1],
             "words":[{"word":" my","start":1.0,"end":1.3,"probability":0.9},{"word":" fellow","start":1.3,"end":1.8,"probability":0.9},{"word":" Americans","start":1.8,"end":2.5,"probability":0.9}]}
          ]}"#;
        let t = json_body(body);
        assert_eq!(t.text, "And so my fellow Americans");
        assert_eq!(t.language.as_deref(), Some("english"));
        assert_eq!(t.segments.len(), 2);
        let words: Vec<&str> = t.words.iter().map(|w| w.word.as_str()).collect();
        assert_eq!(words, ["And", "so", "my", "fellow", "Americans"]);
        assert_eq!(t.words[4].start, 1.8);
    }

    #[test]
    fn localai_words_use_text_key_and_numeric_strings() {
        let body = r#"{"segments":[{"id":0,"start":0,"end":1200000000,"text":" hi there","tokens":[1,2],"speaker":1}],
          "words":[{"text":"hi","start":"0.0","end":"0.5"},{"text":"there","start":0.5,"end":1.2},{"start":1,"end":2}],
          "text":"hi there","duration":"1.2"}"#;
        let t = parse_body(None, ResponseFormat::VerboseJson, body.as_bytes()).unwrap();
        assert_eq!(t.text, "hi there");
        assert_eq!(t.duration_s, Some(1.2));
        assert_eq!(t.segments[0].speaker.as_deref(), Some("1"));
        assert_eq!(t.words.len(), 2);
        assert_eq!(t.words[0].word, "hi");
        assert_eq!(t.words[0].end, 0.5);
    }

    #[test]
    fn segment_fields_missing_default_to_zero() {
        let t = json_body(r#"{"text":"x","segments":[{"text":" a "},7,{"start":1.5}]}"#);
        assert_eq!(
            t.segments,
            vec![
                Segment {
                    text: "a".into(),
                    ..Default::default()
                },
                Segment {
                    start: 1.5,
                    ..Default::default()
                }
            ]
        );
    }

    #[test]
    fn vllm_text_format_is_json() {
        // vLLM answers response_format=text with JSON.
        let t = parse_body(
            Some("application/json"),
            ResponseFormat::Text,
            br#"{"text":" The quick brown fox.","usage":{"type":"duration","seconds":2}}"#,
        )
        .unwrap();
        assert_eq!(t.text, "The quick brown fox.");
        // Even when the server labels it text/html or nothing, the sniffing finds the JSON.
        let t = parse_body(
            Some("text/html"),
            ResponseFormat::Text,
            b"  {\"text\":\"sniffed\"}",
        )
        .unwrap();
        assert_eq!(t.text, "sniffed");
        // A bare JSON string is a transcript too.
        let t = parse_body(Some("application/json"), ResponseFormat::Text, b"\"hi \"").unwrap();
        assert_eq!(t.text, "hi");
    }

    #[test]
    fn unrequested_event_stream_is_read_as_a_stream() {
        let body = b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hi\"}\n\ndata: {\"type\":\"transcript.text.done\",\"text\":\"Hi there\"}\n\n";
        let t = parse_body(
            Some("text/event-stream; charset=utf-8"),
            ResponseFormat::Json,
            body,
        )
        .unwrap();
        assert_eq!(t.text, "Hi there");
        let err = parse_body(
            Some("text/event-stream"),
            ResponseFormat::Json,
            b"data: {\"error\":\"boom\"}\n\n",
        )
        .unwrap_err();
        assert_eq!(err.0, "server sent an error in a successful response: boom");
        let err = parse_body(Some("text/event-stream"), ResponseFormat::Json, b"").unwrap_err();
        assert_eq!(err.0, "stream ended without a transcript");
    }

    #[test]
    fn vendor_json_content_types() {
        let t = parse_body(
            Some("Application/Vnd.Example+JSON ; charset=utf-8"),
            ResponseFormat::Json,
            br#"{"text":"ok"}"#,
        )
        .unwrap();
        assert_eq!(t.text, "ok");
    }

    #[test]
    fn text_format() {
        let t = parse_body(
            Some("text/plain; charset=utf-8"),
            ResponseFormat::Text,
            b"  Hello world.\n",
        )
        .unwrap();
        assert_eq!(
            t,
            Transcript {
                text: "Hello world.".into(),
                ..Default::default()
            }
        );
        // whisper.cpp labels text as text/html: sniffed as text.
        let t = parse_body(
            Some("text/html; charset=utf-8"),
            ResponseFormat::Text,
            b" And so my fellow Americans\n",
        )
        .unwrap();
        assert_eq!(t.text, "And so my fellow Americans");
        // Declared text/plain wins over a body that looks like JSON.
        let t = parse_body(Some("text/plain"), ResponseFormat::Text, b"{weird}").unwrap();
        assert_eq!(t.text, "{weird}");
        let t = parse_body(Some("text/plain"), ResponseFormat::Text, b"").unwrap();
        assert_eq!(t.text, "");
    }

    #[test]
    fn srt() {
        let body = "1\r\n00:00:00,000 --> 00:00:03,320\r\n The beach was a popular spot\r\non a hot summer day.\r\n\r\n2\r\n00:00:03,320 --> 00:01:02,050\r\nPeople were out.\r\n\r\n";
        let t = parse_body(
            Some("application/x-subrip"),
            ResponseFormat::Srt,
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(
            t.text,
            "The beach was a popular spot on a hot summer day. People were out."
        );
        assert_eq!(t.segments.len(), 2);
        assert_eq!(t.segments[0].start, 0.0);
        assert!((t.segments[0].end - 3.32).abs() < 1e-9);
        assert!((t.segments[1].end - 62.05).abs() < 1e-9);
        assert_eq!(t.segments[1].text, "People were out.");
    }

    #[test]
    fn srt_without_blank_lines_between_cues_and_hours() {
        let body =
            "1\n01:00:00,500 --> 01:00:01,000\n<i>one</i>\n2\n01:00:01,000 --> 01:00:02,000\ntwo";
        let t = parse_body(Some("text/plain"), ResponseFormat::Srt, body.as_bytes()).unwrap();
        assert_eq!(t.text, "one two");
        assert_eq!(t.segments[0].start, 3600.5);
        assert_eq!(t.segments[1].end, 3602.0);
    }

    #[test]
    fn vtt_with_short_timestamps_note_settings_and_voice() {
        let body = "WEBVTT\nKind: captions\nLanguage: en\n\nNOTE This is a comment\nspanning 00:01.000 --> 00:02.000 two lines\n\nSTYLE\n::cue { color: red }\n\n1\n00:00.000 --> 00:02.500 align:start position:10%\n<v Roger Bingham>We are in New York City &amp; it's hot\n\nintro\n00:02.500 --> 01:04.250\n<v.loud Neil>Yes</v> <b>we</b> are\n\n00:01:04.250 --> 01:00:00.000\nthird\n";
        let t = parse_body(Some("text/vtt"), ResponseFormat::Vtt, body.as_bytes()).unwrap();
        assert_eq!(t.segments.len(), 3);
        assert_eq!(
            t.segments[0],
            Segment {
                start: 0.0,
                end: 2.5,
                text: "We are in New York City & it's hot".into(),
                speaker: Some("Roger Bingham".into()),
            }
        );
        assert_eq!(t.segments[1].text, "Yes we are");
        assert_eq!(t.segments[1].speaker.as_deref(), Some("Neil"));
        assert_eq!(t.segments[1].end, 64.25);
        assert_eq!(t.segments[2].start, 64.25);
        assert_eq!(t.segments[2].end, 3600.0);
        assert_eq!(
            t.text,
            "We are in New York City & it's hot Yes we are third"
        );
    }

    #[test]
    fn empty_vtt_and_srt_are_empty_transcripts() {
        let t = parse_body(Some("text/vtt"), ResponseFormat::Vtt, b"WEBVTT\n\n").unwrap();
        assert_eq!(t, Transcript::default());
        let t = parse_body(Some("text/plain"), ResponseFormat::Srt, b"\n").unwrap();
        assert_eq!(t, Transcript::default());
        // A server that ignored response_format=srt and sent plain text.
        let t = parse_body(Some("text/plain"), ResponseFormat::Srt, b"just text\n").unwrap();
        assert_eq!(t.text, "just text");
        assert!(t.segments.is_empty());
    }

    #[test]
    fn non_utf8_is_lossy() {
        let t = parse_body(Some("text/plain"), ResponseFormat::Text, b"caf\xe9 ok").unwrap();
        assert_eq!(t.text, "caf\u{fffd} ok");
        let t = parse_body(None, ResponseFormat::Json, b"{\"text\":\"caf\xe9\"}").unwrap();
        assert_eq!(t.text, "caf\u{fffd}");
        let t = parse_body(
            None,
            ResponseFormat::Json,
            b"\xEF\xBB\xBF{\"text\":\"bom\"}",
        )
        .unwrap();
        assert_eq!(t.text, "bom");
    }

    #[test]
    fn malformed_json_is_bad_body() {
        let err = parse_body(
            Some("application/json"),
            ResponseFormat::Json,
            b"{\"text\": ",
        )
        .unwrap_err();
        assert!(err.0.starts_with("response is not valid JSON: "), "{err}");
        let err = parse_body(Some("application/json"), ResponseFormat::Json, b"").unwrap_err();
        assert!(err.0.starts_with("response is not valid JSON: "), "{err}");
        let err =
            parse_body(Some("application/json"), ResponseFormat::Json, b"<html>").unwrap_err();
        assert_eq!(
            err.0,
            "response is not valid JSON: expected value at line 1 column 1"
        );
        let err = parse_body(None, ResponseFormat::Json, b"{not json").unwrap_err();
        assert!(err.0.starts_with("response is not valid JSON"));
    }

    #[test]
    fn json_without_text_is_bad_body() {
        let err = parse_body(None, ResponseFormat::Json, br#"{"language":"en"}"#).unwrap_err();
        assert_eq!(err, BadBody("JSON response has no \"text\" field".into()));
        let err = parse_body(None, ResponseFormat::Json, br#"{"text":null}"#).unwrap_err();
        assert_eq!(err.0, "JSON response has no \"text\" field");
        let err = parse_body(None, ResponseFormat::Json, br#"{"text":5}"#).unwrap_err();
        assert_eq!(
            err.0,
            "JSON response's \"text\" field is a number, not a string"
        );
        let err = parse_body(Some("application/json"), ResponseFormat::Json, b"[1]").unwrap_err();
        assert_eq!(err.0, "JSON response is an array, not an object");
    }

    #[test]
    fn error_objects_in_2xx_are_bad_body_with_message() {
        let err = parse_body(
            Some("application/json"),
            ResponseFormat::Json,
            br#"{"error":{"message":"model not loaded","type":"BadRequestError","param":null,"code":400}}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            "server sent an error in a successful response: model not loaded"
        );
        let err = parse_body(
            Some("application/json"),
            ResponseFormat::Json,
            br#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#,
        )
        .unwrap_err();
        assert!(err.0.ends_with("The model `x` does not exist."), "{err}");
        let err = parse_body(
            None,
            ResponseFormat::Json,
            br#"{"error":"failed to decode audio"}"#,
        )
        .unwrap_err();
        assert!(err.0.ends_with(": failed to decode audio"), "{err}");
        let err = parse_body(None, ResponseFormat::Json, br#"{"detail":"Not Found"}"#).unwrap_err();
        assert!(err.0.ends_with(": Not Found"), "{err}");
        // `"error": null` next to a text is not an error.
        let t = json_body(r#"{"text":"fine","error":null}"#);
        assert_eq!(t.text, "fine");
    }

    #[test]
    fn serializes_without_empty_fields() {
        let t = Transcript {
            text: "hi".into(),
            duration_s: Some(1.0),
            segments: vec![Segment {
                start: 0.0,
                end: 1.0,
                text: "hi".into(),
                speaker: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"text":"hi","segments":[{"start":0.0,"end":1.0,"text":"hi"}]})
        );
    }

    // ----- errors

    #[test]
    fn openai_error() {
        let e = parse_error(
            br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        );
        assert_eq!(
            e,
            ApiError {
                message:
                    "You exceeded your current quota, please check your plan and billing details."
                        .into(),
                code: Some("insufficient_quota".into()),
                kind: Some("insufficient_quota".into()),
                param: None,
            }
        );
        let e = parse_error(
            br#"{"error":{"message":"Audio file is too short. Minimum audio length is 0.1 seconds.","type":"invalid_request_error","param":"file","code":"audio_too_short"}}"#,
        );
        assert_eq!(e.code.as_deref(), Some("audio_too_short"));
        assert_eq!(e.param.as_deref(), Some("file"));
        assert_eq!(e.kind.as_deref(), Some("invalid_request_error"));
        let e = parse_error(
            br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":null}}"#,
        );
        assert_eq!(e.code, None);
        assert_eq!(e.message, "Rate limit reached");
        let e = parse_error(br#"{"error":{"message":"boom","type":"server_error","code":500}}"#);
        assert_eq!(e.code.as_deref(), Some("500"));
    }

    #[test]
    fn whisper_cpp_error() {
        let e = parse_error(br#"{"error":"failed to read WAV file"}"#);
        assert_eq!(e, message_only("failed to read WAV file".into()));
    }

    #[test]
    fn speaches_fastapi_errors() {
        let e = parse_error(
            br#"{"detail":"Model 'foo' is not installed locally. You can download the model using `POST /v1/models`"}"#,
        );
        assert!(
            e.message
                .starts_with("Model 'foo' is not installed locally.")
        );
        assert_eq!(e.code, None);
        let e = parse_error(
            br#"{"detail":[{"type":"missing","loc":["body","file"],"msg":"Field required","input":null},{"type":"literal_error","loc":["body","response_format"],"msg":"Input should be 'text' or 'json'","input":"lrc","ctx":{"expected":"'text' or 'json'"}}]}"#,
        );
        assert_eq!(
            e.message,
            "body.file: Field required; body.response_format: Input should be 'text' or 'json'"
        );
        assert_eq!(e.kind.as_deref(), Some("missing"));
        let e = parse_error(br#"{"detail":[{"loc":["query",0],"msg":"bad"}]}"#);
        assert_eq!(e.message, "query.0: bad");
    }

    #[test]
    fn vllm_errors() {
        let e = parse_error(
            br#"{"object":"error","message":"Maximum clip duration (30s) exceeded.","type":"BadRequestError","param":null,"code":400}"#,
        );
        assert_eq!(
            e,
            ApiError {
                message: "Maximum clip duration (30s) exceeded.".into(),
                code: Some("400".into()),
                kind: Some("BadRequestError".into()),
                param: None,
            }
        );
        let e = parse_error(
            br#"{"error":{"message":"The model `whisper` does not exist.","type":"NotFoundError","param":"model","code":404}}"#,
        );
        assert_eq!(e.code.as_deref(), Some("404"));
        assert_eq!(e.param.as_deref(), Some("model"));
    }

    #[test]
    fn localai_errors() {
        let e = parse_error(
            br#"{"error":{"code":500,"message":"could not load model: rpc error: code = Unknown","type":""}}"#,
        );
        assert_eq!(
            e,
            ApiError {
                message: "could not load model: rpc error: code = Unknown".into(),
                code: Some("500".into()),
                kind: None,
                param: None,
            }
        );
        // An empty message: the whole body stands in for it.
        let e = parse_error(br#"{"error":{"code":500,"message":"","type":""}}"#);
        assert_eq!(
            e.message,
            r#"{"error":{"code":500,"message":"","type":""}}"#
        );
        assert_eq!(e.code.as_deref(), Some("500"));
    }

    #[test]
    fn other_json_errors() {
        let e = parse_error(br#"{"message":"Unauthorized","code":401}"#);
        assert_eq!(e.message, "Unauthorized");
        assert_eq!(e.code.as_deref(), Some("401"));
        let e = parse_error(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        );
        assert_eq!(e.message, "Overloaded");
        assert_eq!(e.kind.as_deref(), Some("overloaded_error"));
        let e = parse_error(br#"{"foo":1}"#);
        assert_eq!(e.message, r#"{"foo":1}"#);
        let e = parse_error(br#""plain string""#);
        assert_eq!(e.message, "plain string");
        let e = parse_error(b"42");
        assert_eq!(e.message, "42");
        let e = parse_error(b"[]");
        assert_eq!(e.message, "[]");
        let long = format!(r#"{{"error":"{}"}}"#, "x".repeat(5000));
        assert_eq!(
            parse_error(long.as_bytes()).message.chars().count(),
            JSON_MESSAGE_CAP
        );
    }

    #[test]
    fn html_and_text_errors() {
        let e = parse_error(
            b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n",
        );
        assert_eq!(e.message, "502 Bad Gateway 502 Bad Gateway nginx/1.25.3");
        assert_eq!(e.code, None);
        let e = parse_error(
            b"<!DOCTYPE html><html><head><style>body{color:red}</style><script>var x = '<b>';</script><!-- c --></head><body><p>Request&nbsp;Entity Too&amp;Large</p></body></html>",
        );
        assert_eq!(e.message, "Request Entity Too&Large");
        let e = parse_error(b"Internal Server Error");
        assert_eq!(e.message, "Internal Server Error");
        let e = parse_error(
            b"upstream connect error or disconnect/reset before headers.\n reset reason: overflow",
        );
        assert_eq!(
            e.message,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
        let big = format!("<html><body>{}</body></html>", "word ".repeat(1000));
        let e = parse_error(big.as_bytes());
        assert_eq!(e.message.chars().count(), TEXT_MESSAGE_CAP);
        assert!(e.message.ends_with('…'));
        let e = parse_error(b"<html><body></body></html>");
        assert_eq!(e.message, "error body has no readable text");
        let e = parse_error(b"<unclosed");
        assert_eq!(e.message, "error body has no readable text");
    }

    #[test]
    fn empty_and_non_utf8_errors() {
        assert_eq!(parse_error(b"").message, "empty response body");
        assert_eq!(parse_error(b" \r\n\t").message, "empty response body");
        assert_eq!(
            parse_error(b"bad \xff\xfe gateway").message,
            "bad \u{fffd}\u{fffd} gateway"
        );
        assert_eq!(parse_error(b"{\"error\":\"x\xff\"}").message, "x\u{fffd}");
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    fn pseudo_random(seed: u64, len: usize, alphabet: &[u8]) -> Vec<u8> {
        let mut x = seed.max(1);
        (0..len)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
                if alphabet.is_empty() {
                    (r >> 56) as u8
                } else {
                    alphabet[(r >> 32) as usize % alphabet.len()]
                }
            })
            .collect()
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let alphabet = b"{}[]\":,<>-->0123456789.:\n\r \t&;abcdeNOTEWEBVTT\\\xff\xc3\xa9";
        for seed in 1..400u64 {
            for bytes in [
                pseudo_random(seed, (seed as usize * 7) % 300, &[]),
                pseudo_random(seed, (seed as usize * 13) % 400, alphabet),
            ] {
                for ct in [
                    None,
                    Some("application/json"),
                    Some("text/vtt"),
                    Some("text/event-stream"),
                    Some(";;"),
                ] {
                    for fmt in [
                        ResponseFormat::Json,
                        ResponseFormat::Text,
                        ResponseFormat::Srt,
                        ResponseFormat::Vtt,
                        ResponseFormat::VerboseJson,
                        ResponseFormat::DiarizedJson,
                    ] {
                        let _ = parse_body(ct, fmt, &bytes);
                    }
                }
                assert!(!parse_error(&bytes).message.is_empty());
            }
        }
        // Deep nesting hits serde_json's recursion limit, not the stack.
        let deep = "[".repeat(100_000);
        assert!(parse_body(None, ResponseFormat::Json, deep.as_bytes()).is_ok());
        assert!(
            parse_body(
                Some("application/json"),
                ResponseFormat::Json,
                deep.as_bytes()
            )
            .is_err()
        );
        assert!(!parse_error(deep.as_bytes()).message.is_empty());
    }
}
