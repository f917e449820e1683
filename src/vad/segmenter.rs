//! The segmenter: a pure state machine that turns per-frame voice decisions into utterances.
//!
//! It takes one frame at a time (its stream position, the VAD decision and its energy) and returns
//! what to do with it: open an utterance (starting `pre_roll` before the voiced run that triggered
//! it), append the frame, close the utterance (and say whether to keep it), or nothing. It never
//! touches audio, files or clocks, so its behaviour is tested on arrays of decisions.
//!
//! Rules (all lengths in samples at 16 kHz, frame-aligned):
//! - An utterance opens when `start` consecutive voiced frames have been seen. It starts
//!   `pre_roll` before the first of them, but never before the end of the previous utterance.
//! - It closes after `silence` consecutive unvoiced frames; the closing silence stays in it
//!   (a trailing word is never cut).
//! - Its length, pre-roll included, never exceeds `max`: the frame that reaches `max` closes it
//!   (reason `max_length`) and the next frame opens a new one at once, without pre-roll.
//! - A closed utterance is dropped when its speech (first to last voiced frame) is shorter than
//!   `min_speech`, or when the RMS level of its voiced frames is below `min_level_dbfs`.

use crate::event::{DropReason, EndReason};

/// Segmenter settings in samples. Built from `[vad]` by [`Settings::from_ms`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Settings {
    pub(crate) frame: u64,
    pub(crate) start_frames: u64,
    pub(crate) silence_frames: u64,
    pub(crate) pre_roll_frames: u64,
    pub(crate) min_speech: u64,
    pub(crate) max: u64,
    pub(crate) min_level_dbfs: f64,
}

impl Settings {
    /// Convert milliseconds at 16 kHz into frame counts and samples.
    pub(crate) fn from_ms(
        frame_ms: u32,
        start_ms: u32,
        silence_ms: u32,
        pre_roll_ms: u32,
        min_utterance_ms: u32,
        max_utterance_ms: u32,
        min_level_dbfs: f64,
    ) -> Settings {
        let frame_ms = frame_ms.max(1);
        let frame = u64::from(frame_ms) * 16;
        Settings {
            frame,
            start_frames: u64::from(start_ms.div_ceil(frame_ms)).max(1),
            silence_frames: u64::from(silence_ms.div_ceil(frame_ms)).max(1),
            pre_roll_frames: u64::from(pre_roll_ms / frame_ms),
            min_speech: u64::from(min_utterance_ms) * 16,
            // Whole frames, and room for at least the opening run.
            max: (u64::from(max_utterance_ms) * 16 / frame * frame).max(frame * 2),
            min_level_dbfs,
        }
    }

    /// Frames of history the caller must keep to honour an `Open`: pre-roll plus the opening run.
    pub(crate) fn history_frames(&self) -> u64 {
        self.pre_roll_frames + self.start_frames
    }
}

/// A finished utterance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Closed {
    pub(crate) start: u64,
    /// Exclusive end position.
    pub(crate) end: u64,
    pub(crate) reason: EndReason,
    /// Samples from the first voiced frame to the end of the last one.
    pub(crate) speech: u64,
    /// Stream position of the first voiced frame (`start` when none was voiced).
    pub(crate) speech_start: u64,
    /// RMS level of the voiced frames, dBFS.
    pub(crate) level_dbfs: f64,
    /// Why it should not be kept, if so.
    pub(crate) drop: Option<DropReason>,
}

/// What to do with the frame just given, in this order: append, close, open.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Step {
    /// Append this frame to the open utterance.
    pub(crate) append: bool,
    /// Then close the open utterance.
    pub(crate) close: Option<Closed>,
    /// Then open one at this position, and write the history from there to this frame's end
    /// (empty after a `max_length` cut, which goes on from the cut).
    pub(crate) open: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle {
        run: u64,
        run_start: u64,
        run_energy: f64,
    },
    Speech(Open),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Open {
    start: u64,
    /// It goes on from a `max_length` cut: any speech in it is the rest of a word, kept however
    /// short or quiet.
    continued: bool,
    first_voiced: Option<u64>,
    last_voiced_end: u64,
    unvoiced: u64,
    voiced_energy: f64,
    voiced_samples: u64,
}

/// The state machine. Feed it every frame in stream order with [`Segmenter::frame`].
#[derive(Debug, Clone)]
pub(crate) struct Segmenter {
    s: Settings,
    phase: Phase,
    /// End of the previous utterance: the next one's pre-roll does not reach back past it.
    last_end: u64,
}

const IDLE: Phase = Phase::Idle {
    run: 0,
    run_start: 0,
    run_energy: 0.0,
};

impl Segmenter {
    pub(crate) fn new(settings: Settings) -> Segmenter {
        Segmenter {
            s: settings,
            phase: IDLE,
            last_end: 0,
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.s
    }

    /// New rules (same frame size) from the next frame on; a run of voiced frames being counted
    /// towards `start_ms` starts again. An open utterance keeps going under the new rules.
    pub(crate) fn set_settings(&mut self, settings: Settings) {
        self.s = settings;
        if !self.in_speech() {
            self.phase = IDLE;
        }
    }

    /// Whether an utterance is open.
    pub(crate) fn in_speech(&self) -> bool {
        matches!(self.phase, Phase::Speech(_))
    }

    /// Take the frame at stream position `pos` (`settings.frame` samples long).
    pub(crate) fn frame(&mut self, pos: u64, voiced: bool, energy: f64) -> Step {
        let end = pos + self.s.frame;
        match &mut self.phase {
            Phase::Idle {
                run,
                run_start,
                run_energy,
            } => {
                if !voiced {
                    self.phase = IDLE;
                    return Step::default();
                }
                if *run == 0 {
                    *run_start = pos;
                    *run_energy = 0.0;
                }
                *run += 1;
                *run_energy += energy;
                if *run < self.s.start_frames {
                    return Step::default();
                }
                let first = *run_start;
                let start = first
                    .saturating_sub(self.s.pre_roll_frames * self.s.frame)
                    .max(self.last_end);
                let open = Open {
                    start,
                    continued: false,
                    first_voiced: Some(first),
                    last_voiced_end: end,
                    unvoiced: 0,
                    voiced_energy: *run_energy,
                    voiced_samples: *run * self.s.frame,
                };
                self.phase = Phase::Speech(open);
                Step {
                    open: Some(start),
                    ..Step::default()
                }
            }
            Phase::Speech(open) => {
                if voiced {
                    open.first_voiced.get_or_insert(pos);
                    open.last_voiced_end = end;
                    open.unvoiced = 0;
                    open.voiced_energy += energy;
                    open.voiced_samples += self.s.frame;
                } else {
                    open.unvoiced += 1;
                }
                let mut step = Step {
                    append: true,
                    ..Step::default()
                };
                if open.unvoiced >= self.s.silence_frames {
                    step.close = Some(self.close(end, EndReason::Silence));
                } else if end - open.start >= self.s.max {
                    step.close = Some(self.cut(end));
                    step.open = Some(end);
                }
                step
            }
        }
    }

    /// The stream breaks at `at` and goes on `len` samples later (lost audio, or 0 for a lost
    /// device): close the open utterance at `at`, and let no pre-roll reach back across the break.
    pub(crate) fn skip(&mut self, at: u64, len: u64, reason: EndReason) -> Option<Closed> {
        let closed = self.finish(at, reason);
        self.last_end = at + len;
        closed
    }

    /// Close the open utterance, if any, at `end` (end of input, shutdown, device lost).
    pub(crate) fn finish(&mut self, end: u64, reason: EndReason) -> Option<Closed> {
        match self.phase {
            Phase::Speech(_) => Some(self.close(end, reason)),
            Phase::Idle { .. } => {
                self.phase = IDLE;
                None
            }
        }
    }

    /// Close at `end` for length and go on in a new utterance that starts right there.
    fn cut(&mut self, end: u64) -> Closed {
        let unvoiced = match self.phase {
            Phase::Speech(open) => open.unvoiced,
            Phase::Idle { .. } => 0,
        };
        let closed = self.close(end, EndReason::MaxLength);
        self.phase = Phase::Speech(Open {
            start: end,
            continued: true,
            first_voiced: None,
            last_voiced_end: end,
            unvoiced,
            voiced_energy: 0.0,
            voiced_samples: 0,
        });
        closed
    }

    fn close(&mut self, end: u64, reason: EndReason) -> Closed {
        let Phase::Speech(open) = self.phase else {
            unreachable!("close is only called in speech")
        };
        self.phase = IDLE;
        self.last_end = end;
        let speech = open
            .first_voiced
            .map_or(0, |first| open.last_voiced_end.saturating_sub(first));
        let level_dbfs = level_dbfs(open.voiced_energy, open.voiced_samples);
        let drop = if speech == 0 || (speech < self.s.min_speech && !open.continued) {
            Some(DropReason::TooShort)
        } else if level_dbfs < self.s.min_level_dbfs && !open.continued {
            Some(DropReason::TooQuiet)
        } else {
            None
        };
        Closed {
            start: open.start,
            end,
            reason,
            speech,
            speech_start: open.first_voiced.unwrap_or(open.start),
            level_dbfs,
            drop,
        }
    }
}

/// RMS level in dBFS of `samples` samples whose squares sum to `energy`; -inf for none.
pub(crate) fn level_dbfs(energy: f64, samples: u64) -> f64 {
    if samples == 0 || energy <= 0.0 {
        return f64::NEG_INFINITY;
    }
    let rms = (energy / samples as f64).sqrt();
    20.0 * (rms / 32768.0).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 ms frames (160 samples): start 3 frames, silence 5, pre-roll 2, min speech 40 ms,
    /// max 30 frames, level guard -60 dBFS.
    fn settings() -> Settings {
        Settings::from_ms(10, 30, 50, 20, 40, 300, -60.0)
    }

    const LOUD: f64 = 160.0 * 10_000.0 * 10_000.0; // about -10 dBFS
    const FRAME: u64 = 160;

    /// Run decisions ('1' voiced, '0' not) and return (open, append, closed) per frame.
    fn run(seg: &mut Segmenter, pattern: &str) -> Vec<Step> {
        pattern
            .bytes()
            .enumerate()
            .map(|(i, b)| {
                seg.frame(
                    i as u64 * FRAME,
                    b == b'1',
                    if b == b'1' { LOUD } else { 0.0 },
                )
            })
            .collect()
    }

    fn closes(steps: &[Step]) -> Vec<Closed> {
        steps.iter().filter_map(|s| s.close).collect()
    }

    #[test]
    fn settings_round_up_to_frames() {
        let s = Settings::from_ms(20, 120, 800, 300, 250, 30_000, -55.0);
        assert_eq!(s.frame, 320);
        assert_eq!(s.start_frames, 6);
        assert_eq!(s.silence_frames, 40);
        assert_eq!(s.pre_roll_frames, 15);
        assert_eq!(s.max, 480_000);
        assert_eq!(s.history_frames(), 21);
        assert_eq!(
            Settings::from_ms(30, 100, 800, 300, 0, 1000, -55.0).start_frames,
            4
        );
    }

    #[test]
    fn opens_after_the_start_run_with_pre_roll_and_closes_after_silence() {
        let mut seg = Segmenter::new(settings());
        //            0123456789...
        let steps = run(&mut seg, "00000111111000001");
        assert_eq!(steps[6].open, None);
        // Third voiced frame (index 7) opens at the first voiced (5) minus 2 frames of pre-roll.
        assert_eq!(steps[7].open, Some(3 * FRAME));
        assert!(!steps[7].append);
        assert!(steps[8].append);
        let closed = closes(&steps);
        assert_eq!(closed.len(), 1);
        // Voiced 5..=10, then 5 unvoiced frames 11..=15: closes at the end of frame 15.
        assert_eq!(closed[0].start, 3 * FRAME);
        assert_eq!(closed[0].end, 16 * FRAME);
        assert_eq!(closed[0].speech, 6 * FRAME);
        assert_eq!(closed[0].reason, EndReason::Silence);
        assert_eq!(closed[0].drop, None);
        assert!(
            !seg.in_speech(),
            "the last voiced frame alone does not reopen"
        );
    }

    #[test]
    fn short_pauses_stay_in_one_utterance() {
        let mut seg = Segmenter::new(settings());
        let steps = run(&mut seg, "1111000011110000111100000");
        let closed = closes(&steps);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].start, 0);
        assert_eq!(closed[0].speech, 20 * FRAME);
    }

    #[test]
    fn scattered_voiced_frames_never_open() {
        let mut seg = Segmenter::new(settings());
        let steps = run(&mut seg, "1101101101100110110");
        assert!(steps.iter().all(|s| s.open.is_none() && s.close.is_none()));
    }

    #[test]
    fn pre_roll_does_not_reach_into_the_previous_utterance() {
        let mut seg = Segmenter::new(settings());
        let steps = run(&mut seg, "111000001111");
        let first = closes(&steps)[0];
        assert_eq!(first.end, 8 * FRAME);
        // Second run starts at frame 8; pre-roll would be frame 6, clamped to the first's end.
        assert_eq!(steps[10].open, Some(8 * FRAME));
    }

    #[test]
    fn max_length_cuts_and_goes_on_without_a_gap() {
        let mut seg = Segmenter::new(settings());
        let voiced = "1".repeat(70);
        let steps = run(&mut seg, &format!("{voiced}00000"));
        let closed = closes(&steps);
        assert_eq!(closed.len(), 3);
        assert_eq!((closed[0].start, closed[0].end), (0, 30 * FRAME));
        assert_eq!(closed[0].reason, EndReason::MaxLength);
        assert_eq!(steps[29].open, Some(30 * FRAME));
        assert_eq!(steps[29].close.map(|c| c.end), Some(30 * FRAME));
        assert_eq!((closed[1].start, closed[1].end), (30 * FRAME, 60 * FRAME));
        assert_eq!(closed[1].reason, EndReason::MaxLength);
        assert_eq!((closed[2].start, closed[2].end), (60 * FRAME, 75 * FRAME));
        assert_eq!(closed[2].reason, EndReason::Silence);
        assert!(closed.iter().all(|c| c.drop.is_none()));
        for c in &closed {
            assert!(c.end - c.start <= 30 * FRAME);
        }
    }

    #[test]
    fn the_short_rest_of_a_cut_utterance_is_kept_but_pure_silence_is_not() {
        // min speech 100 ms (10 frames), max 30 frames: 32 voiced frames leave a 2-frame rest.
        let mut seg = Segmenter::new(Settings::from_ms(10, 30, 50, 0, 100, 300, -60.0));
        let voiced = "1".repeat(32);
        let closed = closes(&run(&mut seg, &format!("{voiced}00000")));
        assert_eq!(closed.len(), 2);
        assert_eq!(closed[1].speech, 2 * FRAME);
        assert_eq!(closed[1].drop, None, "the end of the last word is kept");

        let mut seg = Segmenter::new(Settings::from_ms(10, 30, 50, 0, 100, 300, -60.0));
        let closed = closes(&run(&mut seg, &format!("{}0000000", "1".repeat(28))));
        // The cut falls in the closing silence: the rest holds no speech at all.
        assert_eq!(closed.len(), 2);
        assert_eq!(closed[1].drop, Some(DropReason::TooShort));
    }

    #[test]
    fn too_short_and_too_quiet_are_dropped() {
        // min speech 100 ms = 10 frames.
        let mut seg = Segmenter::new(Settings::from_ms(10, 30, 50, 0, 100, 1000, -40.0));
        let closed = closes(&run(&mut seg, "111100000"));
        assert_eq!(closed[0].drop, Some(DropReason::TooShort));

        let mut seg = Segmenter::new(Settings::from_ms(10, 30, 50, 0, 0, 1000, -40.0));
        let quiet = 160.0 * 100.0 * 100.0; // about -50 dBFS
        let mut closed = None;
        for i in 0..20u64 {
            let voiced = i < 12;
            let step = seg.frame(i * FRAME, voiced, if voiced { quiet } else { 0.0 });
            closed = closed.or(step.close);
        }
        let closed = closed.expect("closed");
        assert!(
            (closed.level_dbfs - -50.3).abs() < 0.5,
            "{}",
            closed.level_dbfs
        );
        assert_eq!(closed.drop, Some(DropReason::TooQuiet));
    }

    #[test]
    fn a_break_in_the_stream_closes_and_blocks_pre_roll_across_it() {
        let mut seg = Segmenter::new(settings());
        run(&mut seg, "1111");
        let closed = seg.skip(4 * FRAME, 1000, EndReason::Overrun).expect("open");
        assert_eq!(
            (closed.start, closed.end, closed.reason),
            (0, 4 * FRAME, EndReason::Overrun)
        );
        let resume = 4 * FRAME + 1000;
        let mut open = None;
        for i in 0..3 {
            open = open.or(seg.frame(resume + i * FRAME, true, LOUD).open);
        }
        assert_eq!(open, Some(resume), "pre-roll stops at the break");
    }

    #[test]
    fn finish_closes_an_open_utterance_only() {
        let mut seg = Segmenter::new(settings());
        assert_eq!(seg.finish(0, EndReason::EndOfInput), None);
        run(&mut seg, "111111");
        let closed = seg.finish(6 * FRAME, EndReason::Shutdown).expect("open");
        assert_eq!(closed.reason, EndReason::Shutdown);
        assert_eq!((closed.start, closed.end), (0, 6 * FRAME));
        assert!(!seg.in_speech());
    }
}
