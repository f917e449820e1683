//! Text bodies of a transcription answer: plain text, SRT and WebVTT, whose cues become
//! segments (with WebVTT voice tags as speakers). Tags and entities are stripped; nothing here
//! validates a subtitle file beyond what finding the cues needs.

use crate::config::ResponseFormat;
use crate::event::Segment;

/// The text and segments of a text body: trimmed as it is for plain text, or the cues of an
/// `Srt`/`Vtt` answer joined by a space, with each cue as a segment.
pub(super) fn parse_text_body(text: &str, requested: ResponseFormat) -> (String, Vec<Segment>) {
    let vtt = matches!(requested, ResponseFormat::Vtt);
    if !(vtt || matches!(requested, ResponseFormat::Srt)) {
        return (text.trim().to_owned(), Vec::new());
    }
    let segments = parse_cues(text, vtt);
    if segments.is_empty() {
        // No cues: silence (an empty SRT, or a bare WEBVTT header), or a server that ignored
        // the requested format and sent plain text.
        let trimmed = text.trim();
        let text = if trimmed.starts_with("WEBVTT") {
            ""
        } else {
            trimmed
        };
        return (text.to_owned(), Vec::new());
    }
    let text = segments
        .iter()
        .map(|s| s.text.as_str())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    (text, segments)
}

struct Cue {
    start: f64,
    end: f64,
    lines: Vec<String>,
}

impl Cue {
    fn into_segment(self, vtt: bool) -> Segment {
        let mut speaker = None;
        let mut parts = Vec::with_capacity(self.lines.len());
        for line in &self.lines {
            if speaker.is_none() {
                speaker = voice_speaker(line);
            }
            let mut clean = strip_tags(line);
            if vtt {
                clean = decode_entities(&clean);
            }
            let clean = clean.trim();
            if !clean.is_empty() {
                parts.push(clean.to_owned());
            }
        }
        Segment {
            start: self.start,
            end: self.end,
            text: parts.join(" "),
            speaker,
        }
    }
}

/// SRT or WebVTT cues. Lines outside a cue (the WEBVTT header, cue identifiers, NOTE, STYLE and
/// REGION blocks) are skipped; a cue's text runs from its timing line to the next blank line.
fn parse_cues(text: &str, vtt: bool) -> Vec<Segment> {
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut segments = Vec::new();
    let mut current: Option<Cue> = None;
    let mut skipping_block = false;
    for line in normalized.lines() {
        let line = line.trim_end();
        if line.trim_start().is_empty() {
            if let Some(cue) = current.take() {
                segments.push(cue.into_segment(vtt));
            }
            skipping_block = false;
            continue;
        }
        if skipping_block {
            continue;
        }
        if let Some((start, end)) = parse_timing(line) {
            if let Some(mut cue) = current.take() {
                // A missing blank line between cues: the previous "text" line was the next
                // cue's SRT index.
                if cue
                    .lines
                    .last()
                    .is_some_and(|l| l.trim().bytes().all(|b| b.is_ascii_digit()))
                {
                    cue.lines.pop();
                }
                segments.push(cue.into_segment(vtt));
            }
            current = Some(Cue {
                start,
                end,
                lines: Vec::new(),
            });
            continue;
        }
        match current.as_mut() {
            Some(cue) => cue.lines.push(line.to_owned()),
            None => {
                if ["WEBVTT", "NOTE", "STYLE", "REGION"]
                    .iter()
                    .any(|kw| starts_with_word(line, kw))
                {
                    skipping_block = true;
                }
                // Anything else outside a cue is a cue identifier: ignored.
            }
        }
    }
    if let Some(cue) = current.take() {
        segments.push(cue.into_segment(vtt));
    }
    segments
}

fn starts_with_word(line: &str, word: &str) -> bool {
    line.strip_prefix(word)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// `start --> end [cue settings]`.
fn parse_timing(line: &str) -> Option<(f64, f64)> {
    let (left, right) = line.split_once("-->")?;
    let start = parse_timestamp(left.trim())?;
    let end = parse_timestamp(right.split_whitespace().next()?)?;
    Some((start, end))
}

/// `HH:MM:SS,mmm`, `HH:MM:SS.mmm` or `MM:SS.mmm` (any number of hour digits, fraction optional).
fn parse_timestamp(s: &str) -> Option<f64> {
    let (clock, fraction) = match s.find([',', '.']) {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    let mut seconds = 0.0;
    for part in parts {
        seconds = seconds * 60.0 + digits(part)? as f64;
    }
    if !fraction.is_empty() {
        let value = digits(fraction)? as f64;
        seconds += value / 10f64.powi(i32::try_from(fraction.len()).ok()?);
    }
    Some(seconds)
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The name in a leading WebVTT voice tag: `<v Name>` or `<v.class Name>`.
fn voice_speaker(line: &str) -> Option<String> {
    let rest = line.trim_start().strip_prefix("<v")?;
    if !rest.starts_with([' ', '\t', '.']) {
        return None;
    }
    let tag = &rest[..rest.find('>')?];
    let name = tag.split_once([' ', '\t'])?.1.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// Removes `<...>` tags; an unclosed `<` is kept as text.
fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        match rest[open..].find('>') {
            Some(close) => rest = &rest[open + close + 1..],
            None => {
                out.push_str(&rest[open..]);
                return out;
            }
        }
    }
    out.push_str(rest);
    out
}

pub(super) fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", " ")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&lrm;", "")
        .replace("&rlm;", "")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("00:00:01,000"), Some(1.0));
        assert_eq!(parse_timestamp("01:02.5"), Some(62.5));
        assert_eq!(parse_timestamp("100:00:00.000"), Some(360000.0));
        assert_eq!(parse_timestamp("12"), None);
        assert_eq!(parse_timestamp("a:b.c"), None);
        assert_eq!(parse_timestamp("00:00:01,"), Some(1.0));
        assert_eq!(parse_timestamp("1:2:3:4.0"), None);
        assert_eq!(parse_timestamp("00:-1.0"), None);
        assert_eq!(
            parse_timing("00:01.000 --> 00:02.000 line:0"),
            Some((1.0, 2.0))
        );
        assert_eq!(parse_timing("00:01.000 -->"), None);
    }
}
