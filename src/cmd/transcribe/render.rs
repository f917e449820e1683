//! The outputs of `hark transcribe`, made from the utterances of one recording: a JSON document,
//! plain text, SRT and WebVTT. Pure functions of their input; the caller writes the bytes.
//!
//! Every time is in the recording's own timeline. Where the server gave segments (verbose_json,
//! diarized_json, srt, vtt), each becomes a cue, offset by its utterance's start; otherwise an
//! utterance is one cue over its voiced span (from its first voiced frame to the end of its last),
//! not over the pre-roll and the closing silence the upload carries. Not here: line wrapping (players
//! wrap long cues themselves) and splitting word timings into cues.

use serde::Serialize;

use crate::event::{EndReason, Segment, Word};
use crate::spool::UtteranceMeta;

/// One utterance of the recording and what became of it.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) meta: UtteranceMeta,
    pub(crate) state: ItemState,
}

#[derive(Debug, Clone)]
pub(crate) enum ItemState {
    /// `--record-only`: the audio is written, nothing was sent.
    Recorded,
    /// Not transcribed in this run (every endpoint was down, or it never got its turn).
    Pending,
    /// Too short to send (under 0.1 s).
    Dropped,
    Transcribed(Text),
    /// Refused for good by every endpoint.
    Failed {
        code: String,
        message: String,
    },
}

/// A transcript as the output needs it (also what the resume cache keeps).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub(crate) struct Text {
    pub(crate) text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) language: Option<String>,
    /// Times relative to the utterance's start, as the server sent them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) segments: Vec<Segment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) words: Vec<Word>,
    #[serde(default)]
    pub(crate) model: String,
    #[serde(default)]
    pub(crate) endpoint: String,
}

impl Item {
    /// The voiced span in the recording's timeline, in ms: where a cue without server timing goes.
    fn speech_span(&self) -> (u64, u64) {
        let m = &self.meta;
        let end = m.offset_ms + m.duration_ms;
        if m.speech_ms == 0 || m.speech_offset_ms < m.offset_ms {
            return (m.offset_ms, end);
        }
        (
            m.speech_offset_ms,
            (m.speech_offset_ms + m.speech_ms).min(end),
        )
    }

    /// A time the server gave (seconds from the utterance's start) in the recording's timeline,
    /// in ms, kept inside the utterance.
    fn at(&self, seconds: f64) -> u64 {
        let m = &self.meta;
        let ms = if seconds.is_finite() && seconds > 0.0 {
            (seconds * 1000.0).round() as u64
        } else {
            0
        };
        m.offset_ms + ms.min(m.duration_ms)
    }
}

/// Counts of the states, for the document and the exit status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub(crate) utterances: u64,
    pub(crate) transcribed: u64,
    pub(crate) failed: u64,
    pub(crate) pending: u64,
    pub(crate) dropped: u64,
}

pub(crate) fn counts(items: &[Item]) -> Counts {
    let mut c = Counts {
        utterances: items.len() as u64,
        ..Counts::default()
    };
    for item in items {
        match item.state {
            ItemState::Transcribed(_) => c.transcribed += 1,
            ItemState::Failed { .. } => c.failed += 1,
            ItemState::Pending => c.pending += 1,
            ItemState::Dropped => c.dropped += 1,
            ItemState::Recorded => {}
        }
    }
    c
}

/// One subtitle cue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cue {
    pub(crate) start_ms: u64,
    pub(crate) end_ms: u64,
    pub(crate) text: String,
}

/// The cues of `items` (in any order), sorted, none empty, none overlapping the next.
pub(crate) fn cues(items: &[Item]) -> Vec<Cue> {
    let mut out = Vec::new();
    for item in items {
        match &item.state {
            ItemState::Transcribed(t) if !t.segments.is_empty() => {
                for seg in &t.segments {
                    let text = one_paragraph(&seg.text);
                    let (start, end) = (item.at(seg.start), item.at(seg.end));
                    if !text.is_empty() {
                        out.push(Cue {
                            start_ms: start,
                            end_ms: end,
                            text,
                        });
                    }
                }
            }
            ItemState::Transcribed(t) => {
                let text = one_paragraph(&t.text);
                if text.is_empty() {
                    continue;
                }
                let (start, end) = match (t.words.first(), t.words.last()) {
                    (Some(first), Some(last)) => (item.at(first.start), item.at(last.end)),
                    _ => item.speech_span(),
                };
                out.push(Cue {
                    start_ms: start,
                    end_ms: end,
                    text,
                });
            }
            ItemState::Failed { code, .. } => {
                let (start, end) = item.speech_span();
                out.push(Cue {
                    start_ms: start,
                    end_ms: end,
                    text: format!("[not transcribed: {code}]"),
                });
            }
            ItemState::Pending => {
                let (start, end) = item.speech_span();
                out.push(Cue {
                    start_ms: start,
                    end_ms: end,
                    text: "[not transcribed yet]".to_owned(),
                });
            }
            ItemState::Recorded | ItemState::Dropped => {}
        }
    }
    out.sort_by_key(|c| (c.start_ms, c.end_ms));
    let mut cues: Vec<Cue> = Vec::with_capacity(out.len());
    for cue in out {
        if let Some(prev) = cues.last_mut() {
            // Cues that start together (segments the server timed past the audio's end, all
            // pinned to it) become one.
            if cue.start_ms == prev.start_ms {
                prev.text.push('\n');
                prev.text.push_str(&cue.text);
                prev.end_ms = prev.end_ms.max(cue.end_ms);
                continue;
            }
            prev.end_ms = prev.end_ms.min(cue.start_ms);
        }
        cues.push(cue);
    }
    // A cue has a length (players skip empty ones); the next one starts at least 1 ms later.
    for cue in &mut cues {
        if cue.end_ms <= cue.start_ms {
            cue.end_ms = cue.start_ms + 1;
        }
    }
    cues
}

/// Text as one paragraph: trimmed, inner blank lines removed (a blank line ends an SRT cue).
fn one_paragraph(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn clock(ms: u64, sep: char) -> String {
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

pub(crate) fn srt(items: &[Item]) -> String {
    let mut out = String::new();
    for (i, cue) in cues(items).iter().enumerate() {
        out.push_str(&format!(
            "{}\n{} --> {}\n{}\n\n",
            i + 1,
            clock(cue.start_ms, ','),
            clock(cue.end_ms, ','),
            cue.text
        ));
    }
    out
}

pub(crate) fn vtt(items: &[Item]) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for cue in cues(items) {
        let text = cue
            .text
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            clock(cue.start_ms, '.'),
            clock(cue.end_ms, '.'),
            text
        ));
    }
    out
}

/// One line per utterance, in the recording's order.
pub(crate) fn text(items: &[Item]) -> String {
    let mut out = String::new();
    for item in sorted(items) {
        let line = match &item.state {
            ItemState::Transcribed(t) => t.text.split_whitespace().collect::<Vec<_>>().join(" "),
            ItemState::Failed { code, .. } => format!("[not transcribed: {code}]"),
            ItemState::Pending => "[not transcribed yet]".to_owned(),
            ItemState::Recorded | ItemState::Dropped => continue,
        };
        if !line.is_empty() {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

fn sorted(items: &[Item]) -> Vec<&Item> {
    let mut v: Vec<&Item> = items.iter().collect();
    v.sort_by_key(|i| i.meta.offset_ms);
    v
}

#[derive(Serialize)]
struct Head<'a> {
    v: u8,
    file: &'a str,
    /// Length of the recording in ms (as decoded at 16 kHz).
    duration_ms: u64,
    counts: Counts,
}

#[derive(Serialize)]
struct Utterance<'a> {
    utterance: &'a str,
    offset_ms: u64,
    duration_ms: u64,
    speech_offset_ms: u64,
    speech_ms: u64,
    reason: EndReason,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    language: Option<&'a str>,
    /// Segments and words in the recording's timeline (seconds).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    segments: Vec<Segment>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    words: Vec<Word>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorField<'a>>,
    /// The Ogg file (record-only), relative to the document.
    #[serde(skip_serializing_if = "Option::is_none")]
    audio: Option<String>,
}

#[derive(Serialize)]
struct ErrorField<'a> {
    code: &'a str,
    message: &'a str,
}

/// The JSON document: every utterance with its times, text, segments and words, one utterance
/// per line. Made of [`json_head`], the [`json_utterance`]s joined by `,\n`, and [`JSON_TAIL`], so
/// that a long `--record-only` run can write the utterances as they come.
pub(crate) fn json(file: &str, duration_ms: u64, items: &[Item], audio: Option<&str>) -> String {
    let mut out = json_head(file, duration_ms, counts(items));
    let lines: Vec<String> = sorted(items)
        .into_iter()
        .map(|item| json_utterance(item, audio))
        .collect();
    out.push_str(&lines.join(",\n"));
    out.push_str(JSON_TAIL);
    out
}

/// Everything before the first utterance.
pub(crate) fn json_head(file: &str, duration_ms: u64, counts: Counts) -> String {
    let head = Head {
        v: 1,
        file,
        duration_ms,
        counts,
    };
    let mut s = to_json(&head);
    // Reopen the object for the utterances.
    s.pop();
    s.push_str(",\"utterances\":[\n");
    s
}

/// After the last utterance.
pub(crate) const JSON_TAIL: &str = "\n]}\n";

/// One utterance of the document, on one line; `audio`: the directory of its Ogg file, relative
/// to the document, when the document names it (record-only).
pub(crate) fn json_utterance(item: &Item, audio: Option<&str>) -> String {
    let shift = |s: f64| item.at(s) as f64 / 1000.0;
    let m = &item.meta;
    let mut u = Utterance {
        utterance: &m.utterance,
        offset_ms: m.offset_ms,
        duration_ms: m.duration_ms,
        speech_offset_ms: m.speech_offset_ms,
        speech_ms: m.speech_ms,
        reason: m.reason,
        status: "recorded",
        text: None,
        language: None,
        segments: Vec::new(),
        words: Vec::new(),
        model: None,
        endpoint: None,
        error: None,
        audio: audio.map(|dir| format!("{dir}/{}", m.audio)),
    };
    match &item.state {
        ItemState::Recorded => {}
        ItemState::Pending => u.status = "pending",
        ItemState::Dropped => u.status = "too_short",
        ItemState::Failed { code, message } => {
            u.status = "failed";
            u.error = Some(ErrorField { code, message });
        }
        ItemState::Transcribed(t) => {
            u.status = "transcribed";
            u.text = Some(&t.text);
            u.language = t.language.as_deref();
            u.model = Some(&t.model);
            u.endpoint = Some(&t.endpoint);
            u.segments = t
                .segments
                .iter()
                .map(|s| Segment {
                    start: shift(s.start),
                    end: shift(s.end),
                    ..s.clone()
                })
                .collect();
            u.words = t
                .words
                .iter()
                .map(|w| Word {
                    start: shift(w.start),
                    end: shift(w.end),
                    ..w.clone()
                })
                .collect();
        }
    }
    to_json(&u)
}

fn to_json(value: &impl Serialize) -> String {
    // Plain structs of strings and numbers: serializing cannot fail.
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(offset_ms: u64, duration_ms: u64, speech: (u64, u64), state: ItemState) -> Item {
        Item {
            meta: UtteranceMeta {
                v: 1,
                utterance: format!("u{offset_ms}"),
                device: "d".into(),
                offset_ms,
                duration_ms,
                samples: duration_ms * 16,
                sample_rate: 16000,
                start_time: String::new(),
                reason: EndReason::Silence,
                speech_ms: speech.1,
                level_dbfs: -20.0,
                source: String::new(),
                audio: format!("u{offset_ms}.ogg"),
                speech_offset_ms: speech.0,
            },
            state,
        }
    }

    fn said(text: &str) -> ItemState {
        ItemState::Transcribed(Text {
            text: text.into(),
            ..Text::default()
        })
    }

    #[test]
    fn an_utterance_without_timing_is_a_cue_over_its_voiced_span() {
        // Pre-roll 300 ms before the speech, 800 ms of silence after it.
        let items = [item(10_000, 3_100, (10_300, 2_000), said(" Hello there. "))];
        assert_eq!(
            srt(&items),
            "1\n00:00:10,300 --> 00:00:12,300\nHello there.\n\n"
        );
    }

    #[test]
    fn server_segments_are_offset_by_the_utterance_start_and_kept_inside_it() {
        let mut t = Text {
            text: "a b".into(),
            ..Text::default()
        };
        t.segments = vec![
            Segment {
                start: 0.5,
                end: 1.25,
                text: "a".into(),
                speaker: None,
            },
            Segment {
                start: 1.25,
                end: 99.0,
                text: " b ".into(),
                speaker: None,
            },
        ];
        let items = [item(
            3_723_000,
            2_000,
            (3_723_300, 1_000),
            ItemState::Transcribed(t),
        )];
        assert_eq!(
            vtt(&items),
            "WEBVTT\n\n01:02:03.500 --> 01:02:04.250\na\n\n01:02:04.250 --> 01:02:05.000\nb\n\n"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&json("f.wav", 4_000_000, &items, None)).unwrap();
        assert_eq!(doc["utterances"][0]["segments"][0]["start"], 3723.5);
        assert_eq!(doc["utterances"][0]["segments"][1]["end"], 3725.0);
    }

    #[test]
    fn cues_come_in_time_order_without_overlap_and_failures_are_visible() {
        let items = [
            item(5_000, 1_500, (5_300, 900), said("second")),
            item(
                9_000,
                1_000,
                (9_300, 500),
                ItemState::Failed {
                    code: "bad_request".into(),
                    message: "400".into(),
                },
            ),
            item(1_000, 5_000, (1_300, 4_500), said("first")),
            item(12_000, 1_000, (12_300, 500), said("  ")),
        ];
        let cues = cues(&items);
        let texts: Vec<&str> = cues.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["first", "second", "[not transcribed: bad_request]"]);
        assert_eq!(cues[0].end_ms, 5_300, "clipped at the next cue's start");
        assert_eq!(
            text(&items),
            "first\nsecond\n[not transcribed: bad_request]\n"
        );
    }

    #[test]
    fn segments_pinned_to_the_same_time_become_one_cue() {
        let seg = |start: f64, end: f64, text: &str| Segment {
            start,
            end,
            text: text.into(),
            speaker: None,
        };
        let t = Text {
            text: "a b c".into(),
            segments: vec![
                seg(0.5, 50.0, "a"),
                seg(60.0, 70.0, "b"),
                seg(80.0, 90.0, "c"),
            ],
            ..Text::default()
        };
        let items = [
            item(0, 2_000, (300, 1_000), ItemState::Transcribed(t)),
            item(2_000, 1_000, (2_300, 500), said("next")),
        ];
        let cues = cues(&items);
        let got: Vec<(u64, u64, &str)> = cues
            .iter()
            .map(|c| (c.start_ms, c.end_ms, c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (500, 2_000, "a"),
                (2_000, 2_001, "b\nc"),
                (2_300, 2_800, "next")
            ]
        );
    }

    #[test]
    fn cue_text_cannot_end_a_cue_or_inject_markup() {
        let items = [item(
            0,
            1_000,
            (0, 500),
            said("one\n\n2\n00:00 --> 00:01\n<b>&"),
        )];
        let srt = srt(&items);
        assert_eq!(srt.matches("\n\n").count(), 1, "{srt:?}");
        let vtt = vtt(&items);
        assert!(vtt.contains("--&gt; 00:01\n&lt;b&gt;&amp;"), "{vtt:?}");
    }

    #[test]
    fn the_document_says_what_became_of_each_utterance() {
        let items = [
            item(0, 1_000, (100, 500), said("hi")),
            item(
                2_000,
                1_000,
                (2_100, 500),
                ItemState::Failed {
                    code: "bad_request".into(),
                    message: "nope".into(),
                },
            ),
            item(4_000, 1_000, (4_100, 500), ItemState::Pending),
        ];
        let doc: serde_json::Value =
            serde_json::from_str(&json("rec.flac", 6_000, &items, None)).unwrap();
        assert_eq!(doc["file"], "rec.flac");
        assert_eq!(doc["counts"]["utterances"], 3);
        assert_eq!(doc["counts"]["transcribed"], 1);
        assert_eq!(doc["counts"]["failed"], 1);
        assert_eq!(doc["counts"]["pending"], 1);
        let u = &doc["utterances"];
        assert_eq!(u[0]["text"], "hi");
        assert_eq!(u[1]["status"], "failed");
        assert_eq!(u[1]["error"]["code"], "bad_request");
        assert_eq!(u[2]["status"], "pending");
        assert!(u[0].get("audio").is_none());
    }
}
