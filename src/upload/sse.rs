//! Incremental reader for a streaming transcription body (`stream=true`, `text/event-stream`):
//! splits the bytes into server-sent events by the WHATWG rules, whatever the chunking, and turns
//! their payloads into text deltas (reported as they arrive) and a final [`Transcript`].
//!
//! Understood payloads: OpenAI's `transcript.text.delta` / `transcript.text.segment` /
//! `transcript.text.done` events, vLLM's chat-style `transcription.chunk` chunks, speaches'
//! one-JSON-transcript-per-segment events (`{"text": ...}` without a `type`), `[DONE]`, and
//! error payloads (an `error` key, `"object": "error"`, `"type": "error"`, or `event: error`).
//!
//! Deliberately not here: HTTP, reconnection (`id:` and `retry:` are ignored; a transcription
//! cannot be resumed), the `event:` name beyond spotting `error`, non-JSON payloads (speaches'
//! `text`/`srt`/`vtt` streams are rejected: request JSON when streaming), logprobs of individual
//! deltas (the done event carries them all), and telling a cut-off stream from a complete one
//! when the server sends neither a done event nor `[DONE]` (the caller sees the transport error).

use crate::event::{Segment, Word};
use crate::upload::response::{self, ApiError, Transcript, api_error_in, cap_chars, non_null};
use serde_json::{Map, Value};

/// Cap on what is buffered for one event (its data lines plus the line being read).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// Incremental text/event-stream reader for streaming transcription (`stream=true`).
#[derive(Debug, Default)]
pub(crate) struct Stream {
    /// Bytes of the line being read (raw, so a UTF-8 sequence may be split across feeds).
    line: Vec<u8>,
    /// The last line ended with `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
    /// The first line was seen (a byte-order mark is dropped from it).
    first_line_done: bool,
    /// The data buffer of the event being read.
    data: String,
    /// The `event:` field of the event being read.
    event: String,
    /// `[DONE]` was seen: everything after it is ignored.
    ended: bool,
    /// The error already returned; returned again by later calls.
    failed: Option<StreamError>,
    deltas: String,
    saw_delta: bool,
    saw_done: bool,
    done_text: Option<String>,
    segments: Vec<Segment>,
    words: Vec<Word>,
    language: Option<String>,
    usage: Option<Value>,
    logprobs: Option<Value>,
}

/// Why a stream did not yield a transcript.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum StreamError {
    /// The server sent an error in the stream.
    #[error("{}", .0.message)]
    Api(ApiError),
    /// The stream is not something hark understands; the string names what is wrong.
    #[error("{0}")]
    Bad(String),
}

impl Stream {
    pub(crate) fn new() -> Stream {
        Stream::default()
    }

    /// Feed the next bytes as they arrive (any split, even mid-UTF-8 or mid-line); calls
    /// `on_delta` for each text delta in order. After an error, every later call returns it.
    pub(crate) fn feed(
        &mut self,
        bytes: &[u8],
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), StreamError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        let result = self.feed_inner(bytes, on_delta);
        if let Err(err) = &result {
            self.failed = Some(err.clone());
        }
        result
    }

    /// End of the body: the final transcript.
    ///
    /// An event still open (no trailing blank line) is dispatched first; a delta in it goes into
    /// the transcript but is not reported through `on_delta`.
    pub(crate) fn finish(mut self) -> Result<Transcript, StreamError> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        if !self.ended {
            let mut ignore = |_: &str| {};
            if !self.line.is_empty() {
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, &mut ignore)?;
            }
            if !self.ended {
                self.dispatch(&mut ignore)?;
            }
        }
        let text = if let Some(text) = self.done_text {
            text.trim().to_owned()
        } else if self.saw_done || self.saw_delta || self.ended {
            self.deltas.trim().to_owned()
        } else if !self.segments.is_empty() {
            self.segments
                .iter()
                .map(|s| s.text.as_str())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            return Err(StreamError::Bad(
                "stream ended without a transcript".to_owned(),
            ));
        };
        Ok(Transcript {
            text,
            language: self.language,
            duration_s: None,
            segments: self.segments,
            words: self.words,
            usage: self.usage,
            logprobs: self.logprobs,
        })
    }

    fn feed_inner(
        &mut self,
        mut bytes: &[u8],
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), StreamError> {
        while !self.ended {
            if self.after_cr {
                match bytes {
                    [] => return Ok(()),
                    [b'\n', rest @ ..] => bytes = rest,
                    _ => {}
                }
                self.after_cr = false;
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => return self.buffer_line(bytes),
                Some(end) => {
                    self.buffer_line(&bytes[..end])?;
                    self.after_cr = bytes[end] == b'\r';
                    bytes = &bytes[end + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, on_delta)?;
                    // Reuse the allocation for the next line.
                    self.line = line;
                    self.line.clear();
                }
            }
        }
        Ok(())
    }

    fn buffer_line(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        if self.line.len() + self.data.len() + bytes.len() > MAX_EVENT_BYTES {
            return Err(StreamError::Bad(format!(
                "stream event exceeds {} KiB",
                MAX_EVENT_BYTES >> 10
            )));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(
        &mut self,
        raw: &[u8],
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), StreamError> {
        let raw = if self.first_line_done {
            raw
        } else {
            self.first_line_done = true;
            raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw)
        };
        if raw.is_empty() {
            return self.dispatch(on_delta);
        }
        if raw.starts_with(b":") {
            return Ok(()); // comment
        }
        let line = String::from_utf8_lossy(raw);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "event" => self.event = value.to_owned(),
            _ => {} // id, retry, unknown fields
        }
        Ok(())
    }

    fn dispatch(&mut self, on_delta: &mut dyn FnMut(&str)) -> Result<(), StreamError> {
        let data = std::mem::take(&mut self.data);
        let event = std::mem::take(&mut self.event);
        let payload = data.strip_suffix('\n').unwrap_or(&data).trim();
        if payload.is_empty() {
            return Ok(());
        }
        if payload == "[DONE]" {
            self.ended = true;
            return Ok(());
        }
        if event.trim().eq_ignore_ascii_case("error") {
            return Err(StreamError::Api(response::parse_error(payload.as_bytes())));
        }
        let value: Value = serde_json::from_str(payload).map_err(|e| {
            StreamError::Bad(format!(
                "stream event is not JSON ({e}): {}",
                cap_chars(payload, 80)
            ))
        })?;
        match value {
            Value::Object(obj) => self.handle_object(&obj, on_delta),
            // A JSON scalar or array is nothing hark knows; skipped like an unknown event.
            _ => Ok(()),
        }
    }

    fn handle_object(
        &mut self,
        obj: &Map<String, Value>,
        on_delta: &mut dyn FnMut(&str),
    ) -> Result<(), StreamError> {
        if let Some(err) = api_error_in(obj, false) {
            return Err(StreamError::Api(err));
        }
        match obj.get("type").and_then(Value::as_str) {
            Some("transcript.text.delta") => {
                if let Some(delta) = obj.get("delta").and_then(Value::as_str) {
                    self.saw_delta = true;
                    self.push_delta(delta, on_delta);
                }
            }
            Some("transcript.text.segment") => {
                self.segments.push(response::segment_from(obj));
            }
            Some("transcript.text.done") => {
                self.saw_done = true;
                self.done_text = obj.get("text").and_then(Value::as_str).map(str::to_owned);
                self.take_extras(obj);
            }
            Some(_) => {} // unknown event types: forward compatible
            None => {
                if let Some(choices) = obj.get("choices").and_then(Value::as_array) {
                    // vLLM: {"object":"transcription.chunk","choices":[{"delta":{"content":..}}]}
                    for choice in choices {
                        let content = choice
                            .get("delta")
                            .and_then(|d| d.get("content"))
                            .and_then(Value::as_str);
                        if let Some(content) = content {
                            self.saw_delta = true;
                            self.push_delta(content, on_delta);
                        }
                    }
                    self.take_extras(obj);
                } else if let Some(text) = obj.get("text").and_then(Value::as_str) {
                    // speaches: each event is a whole json/verbose_json response for one
                    // segment; json ones are trimmed, so a space goes between them.
                    self.saw_delta = true;
                    let needs_space = !text.is_empty()
                        && !text.starts_with(char::is_whitespace)
                        && !self.deltas.is_empty()
                        && !self.deltas.ends_with(char::is_whitespace);
                    if needs_space {
                        self.push_delta(&format!(" {text}"), on_delta);
                    } else {
                        self.push_delta(text, on_delta);
                    }
                    self.segments
                        .extend(response::segments_from(obj.get("segments")));
                    self.words.extend(response::all_words(obj));
                    if self.language.is_none() {
                        self.language = response::nonempty_string(obj.get("language"));
                    }
                    self.take_extras(obj);
                }
            }
        }
        Ok(())
    }

    fn push_delta(&mut self, delta: &str, on_delta: &mut dyn FnMut(&str)) {
        if delta.is_empty() {
            return;
        }
        self.deltas.push_str(delta);
        on_delta(delta);
    }

    /// `usage` and `logprobs`, when present and not null.
    fn take_extras(&mut self, obj: &Map<String, Value>) {
        if let Some(usage) = non_null(obj.get("usage")) {
            self.usage = Some(usage);
        }
        if let Some(logprobs) = non_null(obj.get("logprobs")) {
            self.logprobs = Some(logprobs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` in order; returns the deltas and the result of finish.
    fn run(chunks: &[&[u8]]) -> (Vec<String>, Result<Transcript, StreamError>) {
        let mut stream = Stream::new();
        let mut deltas = Vec::new();
        for chunk in chunks {
            if let Err(e) = stream.feed(chunk, &mut |d| deltas.push(d.to_owned())) {
                return (deltas, Err(e));
            }
        }
        (deltas, stream.finish())
    }

    fn run_whole(body: &str) -> (Vec<String>, Result<Transcript, StreamError>) {
        run(&[body.as_bytes()])
    }

    /// Feeding one byte at a time, and split in two at every position, gives the same as
    /// feeding the whole body (deltas may only be split differently, never reordered).
    fn assert_split_invariant(body: &[u8]) {
        let whole = run(&[body]);
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let single = run(&bytes);
        assert_eq!(whole.1, single.1, "byte-by-byte result differs");
        assert_eq!(whole.0, single.0, "byte-by-byte deltas differ");
        for i in 0..=body.len() {
            let split = run(&[&body[..i], &body[i..]]);
            assert_eq!(whole.1, split.1, "result differs when split at {i}");
            assert_eq!(whole.0, split.0, "deltas differ when split at {i}");
        }
    }

    const OPENAI: &str = concat!(
        "data: {\"type\":\"transcript.text.delta\",\"delta\":\"I\",\"logprobs\":[{\"token\":\"I\",\"logprob\":-0.001,\"bytes\":[73]}]}\n\n",
        "data: {\"type\":\"transcript.text.delta\",\"delta\":\" see skies of blue\"}\n\n",
        "data: {\"type\":\"transcript.text.delta\",\"delta\":\" and clouds of white — café\"}\n\n",
        "data: {\"type\":\"transcript.text.done\",\"text\":\"I see skies of blue and clouds of white — café\",",
        "\"logprobs\":[{\"token\":\"I\",\"logprob\":-0.001,\"bytes\":[73]}],",
        "\"usage\":{\"type\":\"tokens\",\"input_tokens\":14,\"input_token_details\":{\"text_tokens\":0,\"audio_tokens\":14},\"output_tokens\":12,\"total_tokens\":26}}\n\n",
    );

    #[test]
    fn openai_delta_and_done() {
        let (deltas, result) = run_whole(OPENAI);
        assert_eq!(
            deltas,
            ["I", " see skies of blue", " and clouds of white — café"]
        );
        let t = result.unwrap();
        assert_eq!(t.text, "I see skies of blue and clouds of white — café");
        assert_eq!(t.usage.as_ref().unwrap()["total_tokens"], 26);
        assert_eq!(t.logprobs.as_ref().unwrap()[0]["token"], "I");
        assert!(t.segments.is_empty());
    }

    #[test]
    fn split_at_every_byte() {
        assert_split_invariant(OPENAI.as_bytes());
        assert_split_invariant(OPENAI.replace('\n', "\r\n").as_bytes());
        assert_split_invariant(OPENAI.replace('\n', "\r").as_bytes());
        assert_split_invariant(VLLM.as_bytes());
        assert_split_invariant(b"\xEF\xBB\xBFdata: {\"type\":\"transcript.text.delta\",\"delta\":\"\xC3\xA9t\xC3\xA9\"}\r\n\r\ndata: [DONE]\r\n\r\n");
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        for body in [OPENAI.replace('\n', "\r\n"), OPENAI.replace('\n', "\r")] {
            let (deltas, result) = run_whole(&body);
            assert_eq!(deltas.len(), 3);
            assert_eq!(
                result.unwrap().text,
                "I see skies of blue and clouds of white — café"
            );
        }
        // \r at the end of one chunk, \n at the start of the next: one line end, not two.
        let (deltas, result) = run(&[
            b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"a\"}\r",
            b"\ndata: {\"type\":\"transcript.text.delta\",\"delta\":\"b\"}\r\n\r\n",
        ]);
        // Both data lines belong to one event: "a-json\nb-json" is not JSON.
        assert!(deltas.is_empty());
        assert!(matches!(result, Err(StreamError::Bad(_))), "{result:?}");
    }

    #[test]
    fn mid_utf8_split() {
        let body = "data: {\"type\":\"transcript.text.delta\",\"delta\":\"日本語\"}\n\n".as_bytes();
        let cut = body.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let (deltas, result) = run(&[&body[..cut], &body[cut..]]);
        assert_eq!(deltas, ["日本語"]);
        assert_eq!(result.unwrap().text, "日本語");
    }

    #[test]
    fn done_marker_variants() {
        for done in [
            "data: [DONE]\n\n",
            "data:[DONE]\n\n",
            "data:  [DONE] \r\n\r\n",
            "data: [DONE]",
        ] {
            let body =
                format!("data: {{\"type\":\"transcript.text.delta\",\"delta\":\" hi\"}}\n\n{done}");
            let (deltas, result) = run_whole(&body);
            assert_eq!(deltas, [" hi"], "{done:?}");
            assert_eq!(result.unwrap().text, "hi", "{done:?}");
        }
        // Bytes after [DONE] are ignored, even garbage.
        let (deltas, result) = run(&[
            b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"x\"}\n\ndata: [DONE]\n\n",
            b"data: not json\n\ndata: {\"error\":\"late\"}\n\n",
        ]);
        assert_eq!(deltas, ["x"]);
        assert_eq!(result.unwrap().text, "x");
        // [DONE] alone: an empty transcript (silence), not an error.
        let (_, result) = run_whole("data: [DONE]\n\n");
        assert_eq!(result.unwrap(), Transcript::default());
    }

    const VLLM: &str = concat!(
        "data: {\"id\":\"trsc-1\",\"object\":\"transcription.chunk\",\"created\":1,\"model\":\"openai/whisper-large-v3\",\"choices\":[{\"delta\":{\"content\":\" The\"}}]}\n\n",
        "data: {\"id\":\"trsc-1\",\"object\":\"transcription.chunk\",\"created\":1,\"model\":\"openai/whisper-large-v3\",\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n",
        "data: {\"id\":\"trsc-1\",\"object\":\"transcription.chunk\",\"created\":1,\"model\":\"openai/whisper-large-v3\",\"choices\":[{\"delta\":{\"content\":\" quick fox.\"},\"finish_reason\":\"stop\",\"stop_reason\":null}]}\n\n",
        "data: {\"id\":\"trsc-1\",\"object\":\"transcription.chunk\",\"created\":1,\"model\":\"openai/whisper-large-v3\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn vllm_chunks_and_done() {
        let (deltas, result) = run_whole(VLLM);
        assert_eq!(deltas, [" The", " quick fox."]);
        let t = result.unwrap();
        assert_eq!(t.text, "The quick fox.");
        assert_eq!(t.usage.unwrap()["total_tokens"], 9);
    }

    #[test]
    fn speaches_per_segment_json() {
        let body = concat!(
            "data: {\"text\":\"Hello there.\"}\n\n",
            "data: {\"text\":\"General Kenobi.\"}\n\n",
        );
        let (deltas, result) = run_whole(body);
        assert_eq!(deltas, ["Hello there.", " General Kenobi."]);
        assert_eq!(result.unwrap().text, "Hello there. General Kenobi.");
        let body = concat!(
            "data: {\"task\":\"transcribe\",\"language\":\"en\",\"duration\":1.5,\"text\":\" One.\",\"words\":null,",
            "\"segments\":[{\"id\":0,\"seek\":0,\"start\":0.0,\"end\":1.5,\"text\":\" One.\",\"tokens\":[1],\"temperature\":0.0,",
            "\"avg_logprob\":-0.1,\"compression_ratio\":1.0,\"no_speech_prob\":0.0,\"words\":[{\"start\":0.0,\"end\":1.5,\"word\":\" One.\",\"probability\":0.9}],\"speaker\":null}]}\n\n",
            "data: {\"task\":\"transcribe\",\"language\":\"en\",\"duration\":1.0,\"text\":\" Two.\",\"words\":null,",
            "\"segments\":[{\"id\":1,\"seek\":0,\"start\":1.5,\"end\":2.5,\"text\":\" Two.\",\"tokens\":[2],\"temperature\":0.0,",
            "\"avg_logprob\":-0.1,\"compression_ratio\":1.0,\"no_speech_prob\":0.0,\"words\":null,\"speaker\":null}]}\n\n",
        );
        let (deltas, result) = run_whole(body);
        assert_eq!(deltas, [" One.", " Two."]);
        let t = result.unwrap();
        assert_eq!(t.text, "One. Two.");
        assert_eq!(t.language.as_deref(), Some("en"));
        assert_eq!(t.segments.len(), 2);
        assert_eq!(t.segments[1].start, 1.5);
        assert_eq!(t.words.len(), 1);
        assert_eq!(t.words[0].word, "One.");
    }

    #[test]
    fn diarize_segments() {
        let body = concat!(
            "data: {\"type\":\"transcript.text.segment\",\"id\":\"seg_001\",\"start\":0.0,\"end\":2.1,\"text\":\" Hello.\",\"speaker\":\"A\"}\n\n",
            "data: {\"type\":\"transcript.text.segment\",\"id\":\"seg_002\",\"start\":2.1,\"end\":3.0,\"text\":\"Hi!\",\"speaker\":\"B\"}\n\n",
            "data: {\"type\":\"transcript.text.done\",\"text\":\"Hello. Hi!\",\"usage\":{\"type\":\"duration\",\"seconds\":3}}\n\n",
        );
        let (deltas, result) = run_whole(body);
        assert!(deltas.is_empty());
        let t = result.unwrap();
        assert_eq!(t.text, "Hello. Hi!");
        assert_eq!(
            t.segments,
            vec![
                Segment {
                    start: 0.0,
                    end: 2.1,
                    text: "Hello.".into(),
                    speaker: Some("A".into())
                },
                Segment {
                    start: 2.1,
                    end: 3.0,
                    text: "Hi!".into(),
                    speaker: Some("B".into())
                },
            ]
        );
        assert_eq!(t.usage.unwrap()["seconds"], 3);
        // Segments without a done event still make a transcript.
        let (_, result) = run_whole(
            "data: {\"type\":\"transcript.text.segment\",\"start\":0,\"end\":1,\"text\":\"a\",\"speaker\":\"A\"}\n\n",
        );
        assert_eq!(result.unwrap().text, "a");
    }

    #[test]
    fn error_payload_mid_stream() {
        let mut stream = Stream::new();
        let mut deltas = Vec::new();
        let mut on = |d: &str| deltas.push(d.to_owned());
        stream
            .feed(
                b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"par\"}\n\n",
                &mut on,
            )
            .unwrap();
        let err = stream
            .feed(
                b"data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\ndata: {\"type\":\"transcript.text.delta\",\"delta\":\"tial\"}\n\n",
                &mut on,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "The server had an error while processing your request."
        );
        let StreamError::Api(api) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(api.kind.as_deref(), Some("server_error"));
        // The error sticks.
        assert_eq!(stream.feed(b"data: [DONE]\n\n", &mut on), Err(err.clone()));
        assert_eq!(stream.finish(), Err(err));
        assert_eq!(deltas, ["par"]);
    }

    #[test]
    fn error_shapes() {
        let cases: [(&str, &str); 5] = [
            ("data: {\"error\":\"model crashed\"}\n\n", "model crashed"),
            (
                "data: {\"object\":\"error\",\"message\":\"out of memory\",\"type\":\"InternalServerError\",\"param\":null,\"code\":500}\n\n",
                "out of memory",
            ),
            (
                "data: {\"type\":\"error\",\"error\":{\"type\":\"server_error\",\"message\":\"overloaded\"}}\n\n",
                "overloaded",
            ),
            (
                "event: error\ndata: upstream timed out\n\n",
                "upstream timed out",
            ),
            (
                "event: error\ndata: {\"message\":\"quota\",\"code\":\"insufficient_quota\"}\n\n",
                "quota",
            ),
        ];
        for (body, message) in cases {
            let (_, result) = run_whole(body);
            match result {
                Err(StreamError::Api(e)) => assert_eq!(e.message, message, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        let (_, result) =
            run_whole("data: {\"object\":\"error\",\"message\":\"x\",\"code\":500}\n\n");
        let Err(StreamError::Api(e)) = result else {
            panic!()
        };
        assert_eq!(e.code.as_deref(), Some("500"));
    }

    #[test]
    fn comments_fields_and_multiline_data() {
        let body = concat!(
            ": keep-alive\n",
            "retry: 1000\n",
            "id: 7\n",
            "event: transcript.text.delta\n",
            "data: {\"type\":\"transcript.text.delta\",\n",
            "data:\"delta\":\"Hi\"}\n",
            "\n",
            ":\n\n\n",
            "data\n\n",
            "data: {\"type\":\"transcript.text.done\",\"text\":\"Hi\"}\n\n",
        );
        let (deltas, result) = run_whole(body);
        assert_eq!(deltas, ["Hi"]);
        assert_eq!(result.unwrap().text, "Hi");
    }

    #[test]
    fn unknown_events_and_json_scalars_are_ignored() {
        let body = concat!(
            "data: {\"type\":\"transcript.text.language\",\"language\":\"en\"}\n\n",
            "data: 42\n\n",
            "data: {\"type\":\"transcript.text.delta\",\"delta\":\"ok\"}\n\n",
        );
        let (deltas, result) = run_whole(body);
        assert_eq!(deltas, ["ok"]);
        assert_eq!(result.unwrap().text, "ok");
    }

    #[test]
    fn stream_ending_without_blank_line() {
        let body = "data: {\"type\":\"transcript.text.delta\",\"delta\":\"a\"}\n\ndata: {\"type\":\"transcript.text.done\",\"text\":\"a b\"}";
        let (deltas, result) = run_whole(body);
        assert_eq!(deltas, ["a"]);
        assert_eq!(result.unwrap().text, "a b");
        let (deltas, result) =
            run_whole("data: {\"type\":\"transcript.text.delta\",\"delta\":\"tail\"}\n");
        assert!(deltas.is_empty()); // dispatched by finish, which has no callback
        assert_eq!(result.unwrap().text, "tail");
        // An error in the final, unterminated event is still an error.
        let (_, result) = run_whole("data: {\"error\":\"late failure\"}");
        assert_eq!(result.unwrap_err().to_string(), "late failure");
    }

    #[test]
    fn deltas_without_done() {
        let body = "data: {\"type\":\"transcript.text.delta\",\"delta\":\" a\"}\n\ndata: {\"type\":\"transcript.text.delta\",\"delta\":\" b \"}\n\n";
        assert_eq!(run_whole(body).1.unwrap().text, "a b");
        // A done event without text falls back to the deltas.
        let body = "data: {\"type\":\"transcript.text.delta\",\"delta\":\"x\"}\n\ndata: {\"type\":\"transcript.text.done\",\"usage\":{\"type\":\"duration\",\"seconds\":1}}\n\n";
        let t = run_whole(body).1.unwrap();
        assert_eq!(t.text, "x");
        assert!(t.usage.is_some());
    }

    #[test]
    fn empty_streams_are_bad() {
        for body in [
            "",
            "\n\n",
            ": ping\n\n",
            "event: ping\n\n",
            "data:\n\n",
            "retry: 5",
        ] {
            let (_, result) = run_whole(body);
            assert_eq!(
                result,
                Err(StreamError::Bad("stream ended without a transcript".into())),
                "{body:?}"
            );
        }
    }

    #[test]
    fn non_json_payload_is_bad() {
        let (_, result) = run_whole("data: Hello world\n\n");
        let Err(StreamError::Bad(msg)) = result else {
            panic!("{result:?}")
        };
        assert!(msg.starts_with("stream event is not JSON"), "{msg}");
        assert!(msg.ends_with(": Hello world"), "{msg}");
    }

    #[test]
    fn oversized_event_is_bad() {
        let mut stream = Stream::new();
        let chunk = vec![b'a'; 64 << 10];
        let mut result = stream.feed(b"data: ", &mut |_| {});
        for _ in 0..20 {
            result = result.and_then(|()| stream.feed(&chunk, &mut |_| {}));
        }
        assert_eq!(
            result,
            Err(StreamError::Bad("stream event exceeds 1024 KiB".into()))
        );
        // Many data lines in one event count too.
        let mut stream = Stream::new();
        let line = format!("data: {}\n", "b".repeat(1000));
        let mut result = Ok(());
        for _ in 0..2000 {
            result = result.and_then(|()| stream.feed(line.as_bytes(), &mut |_| {}));
        }
        assert!(matches!(result, Err(StreamError::Bad(_))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let alphabet: &[u8] =
            b"data: event:error[DONE]{}\"type\":delta,transcript.text.\n\r\n\r:  \xff\xc3\xa9";
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for round in 0..600 {
            let len = (next() % 400) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if round % 2 == 0 {
                        (r >> 56) as u8
                    } else {
                        alphabet[(r >> 32) as usize % alphabet.len()]
                    }
                })
                .collect();
            let mut stream = Stream::new();
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let n = ((next() % 17) as usize + 1).min(rest.len());
                let _ = stream.feed(&rest[..n], &mut |_| {});
                rest = &rest[n..];
            }
            let _ = stream.finish();
        }
    }
}
