//! Progress of `hark transcribe` on stderr: a bar when stderr is a terminal, a log line every
//! [`LOG_EVERY`] otherwise (journals and CI logs do not want carriage returns).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the plain log line is written.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(5);

/// What has been done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Audio judged by the VAD, ms.
    pub(crate) audio_ms: u64,
    pub(crate) utterances: u64,
    pub(crate) transcribed: u64,
    pub(crate) failed: u64,
    /// Taken from the resume cache instead of uploaded.
    pub(crate) cached: u64,
}

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    total_ms: Option<u64>,
    started: Instant,
    last_log: Instant,
    uploads: bool,
}

impl Progress {
    /// `total_ms`: the recording's length when the container says it.
    pub(crate) fn new(total_ms: Option<u64>, uploads: bool) -> Progress {
        // -q (info off) silences the bar as it does the log lines.
        let show = std::io::stderr().is_terminal() && tracing::enabled!(tracing::Level::INFO);
        let bar = show.then(|| {
            let bar = match total_ms {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr());
            let template = if total_ms.is_some() {
                "{elapsed_precise} [{bar:30}] {msg}"
            } else {
                "{elapsed_precise} {spinner} {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Progress {
            bar,
            total_ms,
            started: Instant::now(),
            last_log: Instant::now(),
            uploads,
        }
    }

    /// Show `s`: the bar at once, a log line at most every [`LOG_EVERY`] (or when `force`d).
    pub(crate) fn show(&mut self, s: Snapshot, force: bool) {
        let line = self.line(s);
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.audio_ms);
                bar.set_message(line);
            }
            None => {
                if force || self.last_log.elapsed() >= LOG_EVERY {
                    self.last_log = Instant::now();
                    tracing::info!("{line}");
                }
            }
        }
    }

    fn line(&self, s: Snapshot) -> String {
        let audio = match self.total_ms {
            Some(t) => format!("{} of {} audio", clock(s.audio_ms), clock(t)),
            None => format!("{} audio", clock(s.audio_ms)),
        };
        let mut line = format!("{audio}, {} utterances", s.utterances);
        if self.uploads {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let uploaded = s.transcribed.saturating_sub(s.cached) + s.failed;
            line.push_str(&format!(
                ", {} transcribed ({} from the cache), {} failed, {:.1} uploads/s",
                s.transcribed,
                s.cached,
                s.failed,
                uploaded as f64 / secs
            ));
        }
        line
    }

    /// Clear the bar (the final summary is logged by the caller).
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `h:mm:ss`, or `m:ss` under an hour.
pub(crate) fn clock(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_says_audio_time_utterances_and_upload_rate() {
        let p = Progress {
            bar: None,
            total_ms: Some(3_600_000),
            started: Instant::now() - Duration::from_secs(10),
            last_log: Instant::now(),
            uploads: true,
        };
        let line = p.line(Snapshot {
            audio_ms: 754_000,
            utterances: 52,
            transcribed: 40,
            failed: 0,
            cached: 20,
        });
        assert!(
            line.starts_with("12:34 of 1:00:00 audio, 52 utterances, 40 transcribed (20 from the cache), 0 failed, 2.0 uploads/s"),
            "{line}"
        );
    }
}
