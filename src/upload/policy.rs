//! The upload policy as a state machine, one [`Attempt`] per utterance: which endpoint to post
//! to next and in which format, how long to wait before another attempt, and when the utterance
//! is delivered, fails for good, waits out an outage or is given up on.
//!
//! The rules: endpoints in order, the primary first; on each, the SDKs' rule (`retry`) with
//! [`retry::MAX_RETRIES`] retries after [`backoff::SDK_RETRY`] or the server's `Retry-After`; an
//! endpoint that rejects Ogg/Opus gets the same audio as WAV, and WAV from then on
//! ([`Formats`]); a final error on one endpoint moves on to the next, and the utterance fails only
//! if every endpoint refused it; an endpoint out of quota counts as down; when every endpoint is
//! down, [`Patience`] says whether to give up or to try again in rounds after
//! [`backoff::OUTAGE`], and [`Outage`] makes the outage's start and end reported once; nothing
//! is posted after the stop deadline.
//!
//! Sans-IO: methods change the attempt's state with what happened (the [`Outcome`] of a POST,
//! the moment as [`Now`]) and return a [`Decision`]. Nothing here does HTTP, touches the spool,
//! emits events or logs, sleeps, reads a clock or draws a random number: the upload threads
//! (`worker`) do that and feed the results back. Deliberately not here either: what a
//! status means on its own (`retry`), the curves' shape (`crate::backoff`), the wording of logs
//! and events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::Patience;
use super::retry::{self, RetryHeaders, Verdict};
use crate::backoff;

/// Which endpoints take WAV only: learnt from a rejection of Ogg/Opus, kept for every later
/// utterance and context by the upload threads (the upload settings hold it, so a reload
/// forgets it with the endpoints it was about).
pub(crate) trait Formats {
    /// Whether endpoint `endpoint` gets WAV instead of Ogg/Opus.
    fn wants_wav(&self, endpoint: usize) -> bool;
    /// Endpoint `endpoint` rejected Ogg/Opus: WAV for it from now on.
    fn learn_wav(&self, endpoint: usize);
}

/// Whether every endpoint is down. One flag for all the upload threads, so that an outage is
/// reported once when it begins and once when it ends, whichever thread saw it.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    down: AtomicBool,
}

impl Outage {
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Every endpoint failed: whether that is news.
    fn went_down(&self) -> bool {
        !self.down.swap(true, Ordering::AcqRel)
    }

    /// An endpoint answered: whether every endpoint was down until now.
    fn came_up(&self) -> bool {
        self.down.swap(false, Ordering::AcqRel)
    }
}

/// What the upload threads share, handed to each step.
#[derive(Clone, Copy)]
pub(crate) struct Context<'a> {
    pub(crate) formats: &'a dyn Formats,
    pub(crate) outage: &'a Outage,
}

/// The moment of a step, as the caller read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) at: Instant,
    /// Wall-clock time, for a `Retry-After` given as an HTTP date.
    pub(crate) wall: SystemTime,
    /// When a stop was asked for, the instant after which nothing is posted.
    pub(crate) deadline: Option<Instant>,
    /// A number in 0..1 for the backoff's jitter.
    pub(crate) jitter: f64,
}

impl Now {
    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| self.at >= d)
    }
}

/// How a POST ended when it gave no transcript, or why it could not be made.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome<'a> {
    /// The server answered with an error status; `code` and `message` come from the error body.
    Status {
        status: u16,
        headers: &'a RetryHeaders,
        code: Option<&'a str>,
        message: &'a str,
    },
    /// No answer: connection refused or reset, DNS, TLS, a timeout. Worth another try.
    NoAnswer,
    /// A complete answer that cannot be read (malformed, oversized): it will not read better
    /// the next time.
    Unreadable,
    /// The audio could not be converted to the WAV this endpoint needs; nothing was sent.
    Unconvertible,
}

/// How a failure is told: the `error` event's code and a line naming the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reason {
    pub(crate) code: &'static str,
    pub(crate) text: String,
}

/// What to do next with the utterance.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Post the audio to endpoint `endpoint` (an index into the endpoints of this round), as WAV
    /// or as Ogg/Opus; then [`Attempt::answered`] or [`Attempt::failed`].
    Post { endpoint: usize, wav: bool },
    /// Wait this long (or until the stop deadline, if that comes first), then
    /// [`Attempt::resume`]: the backoff before a retry on the same endpoint.
    Retry(Duration),
    /// Every endpoint is down: wait `delay` (or until the stop deadline), take any new settings,
    /// then [`Attempt::round`]. `report`: the outage begins here (say so once, and that the
    /// service is degraded); `why` is the last endpoint's failure.
    Park {
        delay: Duration,
        report: bool,
        why: String,
    },
    /// Every endpoint refused the audio for good (or none is configured): the last refusal.
    Fail(Reason),
    /// Every endpoint is down and this run does not wait ([`Patience::GiveUp`]): the utterance
    /// stays in the spool. `why` is the last endpoint's failure.
    GiveUp { why: String },
    /// The stop deadline passed: the utterance stays in the spool.
    Stop,
}

/// What to tell about the failure just handed to [`Attempt::failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Note {
    /// The endpoint does not take Ogg/Opus: it gets WAV from now on.
    Wav,
    /// Worth another attempt (or the next endpoint, once the retries are spent). `attempt`
    /// counts every POST of this utterance; `report`: as an `error` event too, which is not
    /// done while every endpoint is down (the outage was reported).
    Retrying { attempt: u32, report: bool },
    /// This endpoint will not take this audio as it is.
    Refused,
    /// This endpoint cannot serve anyone for a while (its quota ran out).
    Unavailable,
    /// The audio could not be made into WAV for this endpoint.
    Unconvertible,
}

/// The result of [`Attempt::failed`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub(crate) note: Note,
    pub(crate) next: Decision,
}

/// A transcript came: hand it to the sinks, then let go of the audio, and call
/// [`Attempt::delivered`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub(crate) endpoint: usize,
    /// Every POST of this utterance, this one included.
    pub(crate) attempts: u32,
}

/// Where one utterance stands, from its first POST to its end.
#[derive(Debug)]
pub(crate) struct Attempt {
    patience: Patience,
    /// How many endpoints this round has.
    endpoints: usize,
    /// The endpoint being tried.
    endpoint: usize,
    /// Retries made on it.
    retry: u32,
    /// Rounds that ended with every endpoint down.
    round: u32,
    /// POSTs made, over every endpoint and round.
    posts: u32,
    /// Whether the POST in flight carries WAV.
    wav: bool,
    /// This round's last endpoint that was down, and why.
    down: Option<String>,
    /// This round's last endpoint that refused the audio, and why.
    refused: Option<Reason>,
}

impl Attempt {
    pub(crate) fn new(patience: Patience) -> Attempt {
        Attempt {
            patience,
            endpoints: 0,
            endpoint: 0,
            retry: 0,
            round: 0,
            posts: 0,
            wav: false,
            down: None,
            refused: None,
        }
    }

    /// Try every endpoint in order, the primary first: the first step of an utterance, and the
    /// one after [`Decision::Park`]. `endpoints` is how many the settings now in effect have (a
    /// reload between rounds may change them).
    pub(crate) fn round(&mut self, endpoints: usize, context: Context<'_>, now: &Now) -> Decision {
        self.endpoints = endpoints;
        self.endpoint = 0;
        self.retry = 0;
        self.down = None;
        self.refused = None;
        self.next(context, now)
    }

    /// The wait of [`Decision::Retry`] is over: the same endpoint again.
    pub(crate) fn resume(&mut self, context: Context<'_>, now: &Now) -> Decision {
        self.next(context, now)
    }

    /// The POST gave a transcript.
    pub(crate) fn answered(&mut self) -> Delivery {
        self.posts = self.posts.saturating_add(1);
        Delivery {
            endpoint: self.endpoint,
            attempts: self.posts,
        }
    }

    /// The transcript was handed to the sinks. `true`: that ends an outage (report it once).
    pub(crate) fn delivered(&self, context: Context<'_>) -> bool {
        context.outage.came_up()
    }

    /// The POST failed (or could not be made): what to tell, and what next. `reason` is how
    /// this failure is told, kept in case it is the one the utterance ends with.
    pub(crate) fn failed(
        &mut self,
        outcome: Outcome<'_>,
        reason: Reason,
        context: Context<'_>,
        now: &Now,
    ) -> Step {
        let verdict = match outcome {
            Outcome::Unconvertible => {
                self.refused = Some(reason);
                return step(Note::Unconvertible, self.next_endpoint(context, now));
            }
            Outcome::Status {
                status,
                headers,
                code,
                message,
            } => retry::classify_status(status, headers, code, message, now.wall),
            Outcome::NoAnswer => Verdict::Retry { after: None },
            Outcome::Unreadable => Verdict::Final,
        };
        self.posts = self.posts.saturating_add(1);
        match verdict {
            Verdict::WantsWav if !self.wav => {
                context.formats.learn_wav(self.endpoint);
                step(Note::Wav, self.next(context, now))
            }
            Verdict::WantsWav | Verdict::Final => {
                self.refused = Some(reason);
                step(Note::Refused, self.next_endpoint(context, now))
            }
            Verdict::Unavailable => {
                self.down = Some(reason.text);
                step(Note::Unavailable, self.next_endpoint(context, now))
            }
            Verdict::Retry { after } => {
                let note = Note::Retrying {
                    attempt: self.posts,
                    report: !context.outage.is_down(),
                };
                if self.retry >= retry::MAX_RETRIES {
                    self.down = Some(reason.text);
                    return step(note, self.next_endpoint(context, now));
                }
                let wait =
                    after.unwrap_or_else(|| backoff::SDK_RETRY.jittered(self.retry, now.jitter));
                self.retry += 1;
                step(note, Decision::Retry(wait))
            }
        }
    }

    fn next_endpoint(&mut self, context: Context<'_>, now: &Now) -> Decision {
        self.endpoint += 1;
        self.retry = 0;
        self.next(context, now)
    }

    /// A POST to the current endpoint, unless the round is over or the stop deadline passed.
    fn next(&mut self, context: Context<'_>, now: &Now) -> Decision {
        if self.endpoint >= self.endpoints {
            return self.round_over(context, now);
        }
        if now.past_deadline() {
            return Decision::Stop;
        }
        self.wav = context.formats.wants_wav(self.endpoint);
        Decision::Post {
            endpoint: self.endpoint,
            wav: self.wav,
        }
    }

    /// Every endpoint was tried: fail if all refused the audio, else the outage rules.
    fn round_over(&mut self, context: Context<'_>, now: &Now) -> Decision {
        let Some(why) = self.down.take() else {
            return Decision::Fail(self.refused.take().unwrap_or_else(|| Reason {
                code: "no_endpoint",
                text: "no endpoint configured".to_owned(),
            }));
        };
        if self.patience == Patience::GiveUp {
            return Decision::GiveUp { why };
        }
        let report = context.outage.went_down();
        let delay = backoff::OUTAGE.jittered(self.round, now.jitter);
        self.round = self.round.saturating_add(1);
        Decision::Park { delay, report, why }
    }
}

fn step(note: Note, next: Decision) -> Step {
    Step { note, next }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// The formats learnt, as the endpoints of the upload settings keep them.
    #[derive(Default)]
    struct Learnt(RefCell<Vec<usize>>);

    impl Formats for Learnt {
        fn wants_wav(&self, endpoint: usize) -> bool {
            self.0.borrow().contains(&endpoint)
        }
        fn learn_wav(&self, endpoint: usize) {
            self.0.borrow_mut().push(endpoint);
        }
    }

    /// What the upload threads share, and the clock they read.
    struct World {
        formats: Learnt,
        outage: Outage,
        now: Now,
    }

    impl World {
        fn new() -> World {
            World {
                formats: Learnt::default(),
                outage: Outage::default(),
                now: Now {
                    at: Instant::now(),
                    // Sun, 06 Nov 1994 08:49:37 GMT
                    wall: SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777),
                    deadline: None,
                    jitter: 0.0,
                },
            }
        }

        fn context(&self) -> Context<'_> {
            Context {
                formats: &self.formats,
                outage: &self.outage,
            }
        }

        fn round(&self, a: &mut Attempt, endpoints: usize) -> Decision {
            a.round(endpoints, self.context(), &self.now)
        }

        fn resume(&self, a: &mut Attempt) -> Decision {
            a.resume(self.context(), &self.now)
        }

        /// An HTTP error with an OpenAI-style body.
        fn status(&self, a: &mut Attempt, status: u16, code: Option<&str>, message: &str) -> Step {
            self.headers(a, status, &RetryHeaders::default(), code, message)
        }

        fn headers(
            &self,
            a: &mut Attempt,
            status: u16,
            headers: &RetryHeaders,
            code: Option<&str>,
            message: &str,
        ) -> Step {
            let outcome = Outcome::Status {
                status,
                headers,
                code,
                message,
            };
            a.failed(outcome, reason(status), self.context(), &self.now)
        }

        fn outcome(&self, a: &mut Attempt, outcome: Outcome<'_>, code: &'static str) -> Step {
            let reason = Reason {
                code,
                text: code.to_owned(),
            };
            a.failed(outcome, reason, self.context(), &self.now)
        }

        /// Three 503s on the current endpoint: two retries, then the next step after them.
        fn three_503s(&self, a: &mut Attempt) -> Decision {
            for _ in 0..2 {
                let step = self.status(a, 503, None, "overloaded");
                assert!(matches!(step.next, Decision::Retry(_)), "{step:?}");
                assert!(matches!(self.resume(a), Decision::Post { .. }));
            }
            self.status(a, 503, None, "overloaded").next
        }
    }

    fn reason(status: u16) -> Reason {
        Reason {
            code: match status {
                401 => "unauthorized",
                429 => "rate_limited",
                _ => "http_error",
            },
            text: format!("http://e: HTTP {status}"),
        }
    }

    fn post(endpoint: usize, wav: bool) -> Decision {
        Decision::Post { endpoint, wav }
    }

    fn retrying(attempt: u32, report: bool) -> Note {
        Note::Retrying { attempt, report }
    }

    #[test]
    fn three_503s_are_two_sdk_retries_then_the_fallback() {
        let w = World::new();
        let mut a = Attempt::new(Patience::Forever);
        assert_eq!(w.round(&mut a, 2), post(0, false));
        let step = w.status(&mut a, 503, None, "overloaded");
        assert_eq!(step.note, retrying(1, true));
        assert_eq!(step.next, Decision::Retry(Duration::from_millis(500)));
        assert_eq!(w.resume(&mut a), post(0, false));
        let step = w.status(&mut a, 503, None, "overloaded");
        assert_eq!(step.note, retrying(2, true));
        assert_eq!(step.next, Decision::Retry(Duration::from_secs(1)));
        assert_eq!(w.resume(&mut a), post(0, false));
        let step = w.status(&mut a, 503, None, "overloaded");
        assert_eq!(step.note, retrying(3, true));
        assert_eq!(step.next, post(1, false));
        assert_eq!(
            a.answered(),
            Delivery {
                endpoint: 1,
                attempts: 4
            }
        );
        assert!(!a.delivered(w.context()), "no outage to end");
        // A fallback that fails too gets its own two retries.
        let mut b = Attempt::new(Patience::Forever);
        w.round(&mut b, 2);
        assert_eq!(w.three_503s(&mut b), post(1, false));
        assert!(matches!(w.three_503s(&mut b), Decision::Park { .. }));
    }

    #[test]
    fn ogg_rejected_is_resent_as_wav_and_that_endpoint_keeps_getting_wav() {
        let w = World::new();
        let mut a = Attempt::new(Patience::Forever);
        assert_eq!(w.round(&mut a, 2), post(0, false));
        let step = w.status(&mut a, 415, None, "");
        assert_eq!(step.note, Note::Wav);
        assert_eq!(step.next, post(0, true));
        assert_eq!(a.answered().attempts, 2);
        // The next utterance goes as WAV at once, to that endpoint only.
        let mut b = Attempt::new(Patience::Forever);
        assert_eq!(w.round(&mut b, 2), post(0, true));
        assert_eq!(
            w.three_503s(&mut b),
            post(1, false),
            "only endpoint 0 wants WAV"
        );
        // whisper.cpp's message counts as a rejection of the format too.
        let step = w.status(&mut b, 400, None, "failed to read WAV file");
        assert_eq!(
            step,
            Step {
                note: Note::Wav,
                next: post(1, true)
            }
        );
        // WAV rejected as well: that endpoint refuses the audio.
        let step = w.status(&mut b, 415, None, "");
        assert_eq!(step.note, Note::Refused);
    }

    #[test]
    fn retry_after_is_honoured_in_its_three_forms() {
        let w = World::new();
        let cases = [
            (None, Some("2"), Duration::from_secs(2)),
            (Some("1500"), Some("9"), Duration::from_millis(1500)),
            (
                None,
                Some("Sun, 06 Nov 1994 08:49:47 GMT"),
                Duration::from_secs(10),
            ),
            // Absurd: the SDK backoff instead.
            (None, Some("3600"), Duration::from_millis(500)),
        ];
        for (ms, after, expected) in cases {
            let mut a = Attempt::new(Patience::Forever);
            w.round(&mut a, 1);
            let headers = RetryHeaders {
                should_retry: None,
                retry_after_ms: ms.map(String::from),
                retry_after: after.map(String::from),
            };
            let step = w.headers(&mut a, 429, &headers, Some("rate_limit_exceeded"), "slow");
            assert_eq!(step.next, Decision::Retry(expected), "{ms:?} {after:?}");
        }
    }

    #[test]
    fn jitter_shortens_the_sdk_backoff() {
        let mut w = World::new();
        w.now.jitter = 1.0;
        let mut a = Attempt::new(Patience::Forever);
        w.round(&mut a, 1);
        let step = w.outcome(&mut a, Outcome::NoAnswer, "connection");
        assert_eq!(step.next, Decision::Retry(Duration::from_millis(375)));
    }

    #[test]
    fn an_outage_is_reported_down_once_and_up_once() {
        let w = World::new();
        let mut a = Attempt::new(Patience::Forever);
        assert_eq!(w.round(&mut a, 1), post(0, false));
        let Decision::Park { delay, report, why } = w.three_503s(&mut a) else {
            panic!("every endpoint down, and the daemon waits");
        };
        assert_eq!((delay, report), (Duration::from_secs(1), true));
        assert!(why.contains("503"), "{why}");
        assert!(w.outage.is_down());
        // The next round: failures are no longer reported one by one, nor the outage again.
        assert_eq!(w.round(&mut a, 1), post(0, false));
        let step = w.status(&mut a, 503, None, "overloaded");
        assert_eq!(step.note, retrying(4, false));
        w.resume(&mut a);
        w.status(&mut a, 503, None, "overloaded");
        w.resume(&mut a);
        let step = w.outcome(&mut a, Outcome::NoAnswer, "connection");
        assert_eq!(step.note, retrying(6, false));
        assert!(matches!(
            step.next,
            Decision::Park { delay, report: false, .. } if delay == Duration::from_secs(2)
        ));
        // Another thread's utterance finds the outage already reported.
        let mut b = Attempt::new(Patience::Forever);
        w.round(&mut b, 1);
        assert!(matches!(
            w.three_503s(&mut b),
            Decision::Park { delay, report: false, .. } if delay == Duration::from_secs(1)
        ));
        // Up again: the first delivery reports it, the next one does not.
        assert_eq!(w.round(&mut a, 1), post(0, false));
        assert_eq!(a.answered().attempts, 7);
        assert!(a.delivered(w.context()));
        assert!(!w.outage.is_down());
        w.round(&mut b, 1);
        b.answered();
        assert!(!b.delivered(w.context()));
    }

    #[test]
    fn outage_rounds_back_off_to_a_minute() {
        let w = World::new();
        let mut a = Attempt::new(Patience::Forever);
        let mut delays = Vec::new();
        for _ in 0..8 {
            w.round(&mut a, 1);
            let step = w.outcome(
                &mut a,
                Outcome::Status {
                    status: 429,
                    headers: &RetryHeaders::default(),
                    code: Some("insufficient_quota"),
                    message: "quota",
                },
                "insufficient_quota",
            );
            let Decision::Park { delay, .. } = step.next else {
                panic!("{step:?}");
            };
            delays.push(delay.as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn hark_upload_gives_up_when_every_endpoint_is_down_and_the_daemon_does_not() {
        let w = World::new();
        let mut a = Attempt::new(Patience::GiveUp);
        w.round(&mut a, 2);
        w.three_503s(&mut a);
        let Decision::GiveUp { why } = w.three_503s(&mut a) else {
            panic!("GiveUp waits for nothing");
        };
        assert!(why.contains("503"), "{why}");
        assert!(!w.outage.is_down(), "giving up is no outage to report");
        let mut b = Attempt::new(Patience::Forever);
        w.round(&mut b, 2);
        w.three_503s(&mut b);
        assert!(matches!(
            w.three_503s(&mut b),
            Decision::Park { report: true, .. }
        ));
    }

    #[test]
    fn a_final_error_fails_at_once_unless_another_endpoint_takes_it() {
        let w = World::new();
        let mut a = Attempt::new(Patience::Forever);
        w.round(&mut a, 1);
        let step = w.status(&mut a, 401, Some("invalid_api_key"), "Incorrect API key");
        assert_eq!(step.note, Note::Refused);
        assert_eq!(
            step.next,
            Decision::Fail(Reason {
                code: "unauthorized",
                text: "http://e: HTTP 401".into()
            })
        );
        // With a fallback: the fallback is tried, and the last refusal is the one told.
        let mut b = Attempt::new(Patience::Forever);
        w.round(&mut b, 2);
        let step = w.status(&mut b, 401, None, "no");
        assert_eq!(step.next, post(1, false));
        let step = w.outcome(&mut b, Outcome::Unreadable, "bad_response");
        assert!(matches!(
            step.next,
            Decision::Fail(Reason {
                code: "bad_response",
                ..
            })
        ));
        // Refused by one, down on the other: the audio is not at fault, so it waits.
        let mut c = Attempt::new(Patience::Forever);
        w.round(&mut c, 2);
        w.status(&mut c, 413, None, "too large");
        assert!(matches!(w.three_503s(&mut c), Decision::Park { .. }));
        for status in [400, 403, 404, 413, 422] {
            let mut d = Attempt::new(Patience::Forever);
            w.round(&mut d, 1);
            let step = w.status(&mut d, status, None, "");
            assert!(matches!(step.next, Decision::Fail(_)), "{status}: {step:?}");
        }
    }

    #[test]
    fn insufficient_quota_skips_the_retries_and_waits_like_an_outage() {
        let w = World::new();
        let quota = |w: &World, a: &mut Attempt| {
            w.status(
                a,
                429,
                Some("insufficient_quota"),
                "You exceeded your current quota",
            )
        };
        let mut a = Attempt::new(Patience::Forever);
        w.round(&mut a, 2);
        let step = quota(&w, &mut a);
        assert_eq!(
            step,
            Step {
                note: Note::Unavailable,
                next: post(1, false)
            }
        );
        let step = quota(&w, &mut a);
        assert!(
            matches!(step.next, Decision::Park { report: true, .. }),
            "{step:?}"
        );
        let mut b = Attempt::new(Patience::GiveUp);
        w.round(&mut b, 1);
        assert!(matches!(quota(&w, &mut b).next, Decision::GiveUp { .. }));
    }

    #[test]
    fn nothing_is_posted_after_the_stop_deadline() {
        let mut w = World::new();
        let mut a = Attempt::new(Patience::Forever);
        w.round(&mut a, 2);
        w.status(&mut a, 503, None, "overloaded");
        // A deadline still ahead changes nothing.
        w.now.deadline = Some(w.now.at + Duration::from_secs(1));
        assert_eq!(w.resume(&mut a), post(0, false));
        // Passed during the backoff: no retry.
        w.status(&mut a, 503, None, "overloaded");
        w.now.at += Duration::from_secs(1);
        assert_eq!(w.resume(&mut a), Decision::Stop);
        // Passed during a POST: no fallback either.
        let mut b = Attempt::new(Patience::Forever);
        w.now.at -= Duration::from_secs(1);
        assert_eq!(w.round(&mut b, 2), post(0, false));
        w.now.at += Duration::from_secs(1);
        let step = w.status(&mut b, 401, None, "no");
        assert_eq!(step.next, Decision::Stop);
        // Nor after waiting out an outage, nor for a new utterance.
        assert_eq!(w.round(&mut a, 2), Decision::Stop);
        assert_eq!(
            w.round(&mut Attempt::new(Patience::Forever), 1),
            Decision::Stop
        );
    }

    #[test]
    fn audio_that_cannot_become_wav_is_refused_by_that_endpoint_without_a_post() {
        let w = World::new();
        w.formats.learn_wav(0);
        let mut a = Attempt::new(Patience::Forever);
        assert_eq!(w.round(&mut a, 2), post(0, true));
        let step = w.outcome(&mut a, Outcome::Unconvertible, "bad_audio");
        assert_eq!(
            step,
            Step {
                note: Note::Unconvertible,
                next: post(1, false)
            }
        );
        assert_eq!(a.answered().attempts, 1, "nothing was sent to endpoint 0");
        let mut b = Attempt::new(Patience::Forever);
        w.round(&mut b, 1);
        let step = w.outcome(&mut b, Outcome::Unconvertible, "bad_audio");
        assert!(matches!(
            step.next,
            Decision::Fail(Reason {
                code: "bad_audio",
                ..
            })
        ));
    }

    #[test]
    fn no_endpoint_at_all_fails_with_its_own_code() {
        let w = World::new();
        let next = w.round(&mut Attempt::new(Patience::Forever), 0);
        assert!(matches!(
            next,
            Decision::Fail(Reason {
                code: "no_endpoint",
                ..
            })
        ));
    }
}
