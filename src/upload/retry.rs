//! The retry rule of the official OpenAI SDKs, as pure functions: which failures are worth
//! another attempt, how long the server asked to wait before it, and when an endpoint has
//! rejected the audio format.
//!
//! Nothing here sleeps or touches the network; the upload policy asks and acts. The backoff
//! curve itself is `crate::backoff::SDK_RETRY`. Sources: openai-python
//! `_base_client.py` (`_should_retry`, `_calculate_retry_timeout`); the README's "Transcription"
//! section says what hark retries.

use std::time::{Duration, SystemTime};

/// Retries per endpoint after the first attempt (the SDKs' `max_retries` default).
pub(crate) const MAX_RETRIES: u32 = 2;

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    /// Worth another attempt; the server may have said how long to wait.
    Retry { after: Option<Duration> },
    /// This endpoint will not take this audio as it is (bad key, too large, too short, ...).
    Final,
    /// This endpoint cannot serve anyone for a while (its quota ran out): not worth the quick
    /// retries, but not the audio's fault either, so it waits in the spool like in an outage.
    Unavailable,
    /// The endpoint cannot read Ogg/Opus; the same audio as WAV may work.
    WantsWav,
}

/// The headers of a failed response that the policy reads, as the server sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RetryHeaders {
    pub(crate) should_retry: Option<String>,
    pub(crate) retry_after_ms: Option<String>,
    pub(crate) retry_after: Option<String>,
}

/// Classify an HTTP error status. `code` and `message` come from the error body.
pub(crate) fn classify_status(
    status: u16,
    headers: &RetryHeaders,
    code: Option<&str>,
    message: &str,
    now: SystemTime,
) -> Verdict {
    if rejects_format(status, code, message) {
        return Verdict::WantsWav;
    }
    let after = server_delay(headers, now);
    match headers.should_retry.as_deref().map(str::trim) {
        Some("true") => return Verdict::Retry { after },
        Some("false") => return Verdict::Final,
        _ => {}
    }
    // A quota that ran out does not come back within the quick retries.
    if status == 429 && code == Some("insufficient_quota") {
        return Verdict::Unavailable;
    }
    let retry = match status {
        408 | 409 | 429 => true,
        s => s >= 500,
    };
    if retry {
        Verdict::Retry { after }
    } else {
        Verdict::Final
    }
}

/// Whether a 4xx says that the file's format, not its content, is the problem: OpenAI's
/// "Invalid file format" and "Unrecognized file format", 415, and the messages of servers that
/// read WAV only (whisper.cpp's server without `--convert`).
pub(crate) fn rejects_format(status: u16, code: Option<&str>, message: &str) -> bool {
    if status == 415 {
        return true;
    }
    if status != 400 {
        return false;
    }
    if code == Some("audio_too_short") {
        return false;
    }
    let m = message.to_ascii_lowercase();
    [
        "invalid file format",
        "unrecognized file format",
        "unsupported file format",
        "unsupported audio format",
        "failed to read audio",
        "failed to read wav",
        "failed to decode",
        "could not decode",
        "format not recognised",
        "format not recognized",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The server's requested delay: `retry-after-ms`, else `retry-after` in seconds or as an HTTP
/// date, used only when it is more than 0 and at most 120 s (as the SDKs do).
pub(crate) fn server_delay(headers: &RetryHeaders, now: SystemTime) -> Option<Duration> {
    let ms = headers
        .retry_after_ms
        .as_deref()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|ms| ms / 1000.0);
    let secs = ms.or_else(|| {
        let v = headers.retry_after.as_deref()?.trim();
        v.parse::<f64>().ok().or_else(|| {
            let at = httpdate(v)?;
            Some(match at.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(_) => 0.0,
            })
        })
    })?;
    (secs > 0.0 && secs <= 120.0).then(|| Duration::from_secs_f64(secs))
}

/// Parse an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only HTTP date form servers send.
fn httpdate(s: &str) -> Option<SystemTime> {
    let rest = s.split_once(", ")?.1;
    let mut it = rest.split_ascii_whitespace();
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    if !(1970..=9999).contains(&year) {
        return None;
    }
    let mut hms = it.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Verdict {
        classify_status(
            code,
            &RetryHeaders::default(),
            None,
            "",
            SystemTime::UNIX_EPOCH,
        )
    }

    #[test]
    fn retries_what_the_sdks_retry_and_nothing_else() {
        for code in [408, 409, 429, 500, 502, 503, 504, 529] {
            assert_eq!(status(code), Verdict::Retry { after: None }, "{code}");
        }
        for code in [400, 401, 403, 404, 413, 422] {
            assert_eq!(status(code), Verdict::Final, "{code}");
        }
        let quota = classify_status(
            429,
            &RetryHeaders::default(),
            Some("insufficient_quota"),
            "You exceeded your current quota",
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(quota, Verdict::Unavailable);
    }

    #[test]
    fn x_should_retry_overrides_the_status() {
        let now = SystemTime::UNIX_EPOCH;
        let yes = RetryHeaders {
            should_retry: Some("true".into()),
            ..Default::default()
        };
        let no = RetryHeaders {
            should_retry: Some("false".into()),
            ..Default::default()
        };
        assert_eq!(
            classify_status(400, &yes, None, "", now),
            Verdict::Retry { after: None }
        );
        assert_eq!(classify_status(503, &no, None, "", now), Verdict::Final);
    }

    #[test]
    fn format_rejections_ask_for_wav_but_too_short_audio_does_not() {
        let now = SystemTime::UNIX_EPOCH;
        let h = RetryHeaders::default();
        let openai = "Invalid file format. Supported formats: ['flac', 'm4a', 'mp3', 'wav']";
        assert_eq!(
            classify_status(400, &h, Some("invalid_value"), openai, now),
            Verdict::WantsWav
        );
        assert_eq!(
            classify_status(400, &h, None, "failed to read WAV file", now),
            Verdict::WantsWav
        );
        assert_eq!(classify_status(415, &h, None, "", now), Verdict::WantsWav);
        let short = "Audio file is too short. Minimum audio length is 0.1 seconds.";
        assert_eq!(
            classify_status(400, &h, Some("audio_too_short"), short, now),
            Verdict::Final
        );
        assert_eq!(
            classify_status(500, &h, None, "invalid file format", now),
            Verdict::Retry { after: None }
        );
    }

    #[test]
    fn server_delay_prefers_milliseconds_and_ignores_absurd_values() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let h = |ms: Option<&'static str>, s: Option<&'static str>| RetryHeaders {
            should_retry: None,
            retry_after_ms: ms.map(String::from),
            retry_after: s.map(String::from),
        };
        assert_eq!(
            server_delay(&h(Some("1500"), Some("9")), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            server_delay(&h(None, Some("2")), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(server_delay(&h(None, Some("0")), now), None);
        assert_eq!(server_delay(&h(None, Some("121")), now), None);
        assert_eq!(server_delay(&h(None, Some("soon")), now), None);
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            server_delay(&h(None, Some("Sun, 06 Nov 1994 08:49:47 GMT")), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            server_delay(&h(None, Some("Sun, 06 Nov 1994 08:49:30 GMT")), now),
            None
        );
        // Absurd dates are ignored, not overflowed.
        for date in [
            "Sun, 06 Nov 300000000000 08:49:37 GMT",
            "Sun, 06 Nov -5 08:49:37 GMT",
            "Sun, 99 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(server_delay(&h(None, Some(date)), now), None, "{date}");
        }
    }
}
