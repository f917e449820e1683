//! The dsp thread's memory of recent audio, for an utterance's pre-roll: a ring of samples
//! indexed by stream position, which forgets what came before a break in the stream.

/// Recent frames, for an utterance's pre-roll.
pub(super) struct History {
    buf: Vec<i16>,
    /// Stream position just past the newest sample.
    pub(super) end: u64,
    /// Nothing before this position is held (the start of the stream, or the end of a break).
    valid_from: u64,
}

impl History {
    pub(super) fn new(samples: usize) -> History {
        History {
            buf: vec![0; samples.max(1)],
            end: 0,
            valid_from: 0,
        }
    }

    pub(super) fn push(&mut self, frame: &[i16]) {
        let cap = self.buf.len();
        for (i, &s) in frame.iter().enumerate() {
            self.buf[((self.end + i as u64) % cap as u64) as usize] = s;
        }
        self.end += frame.len() as u64;
    }

    /// Hold `samples` from now on, keeping the newest of what is held.
    pub(super) fn resize(&mut self, samples: usize) {
        let cap = samples.max(1);
        let mut kept = Vec::with_capacity(cap);
        self.range(self.end.saturating_sub(cap as u64), |s| {
            kept.extend_from_slice(s)
        });
        let start = self.end - kept.len() as u64;
        let valid_from = self.valid_from.max(start);
        self.buf = vec![0; cap];
        self.end = start;
        self.push(&kept);
        self.valid_from = valid_from;
    }

    /// The stream jumps `len` samples ahead: what is held is no longer anyone's pre-roll.
    pub(super) fn skip(&mut self, len: u64) {
        self.end += len;
        self.valid_from = self.end;
    }

    /// Hand the samples of `[from, self.end)` to `f` in at most two slices.
    pub(super) fn range(&self, from: u64, mut f: impl FnMut(&[i16])) {
        let cap = self.buf.len() as u64;
        let from = from.max(self.end.saturating_sub(cap)).max(self.valid_from);
        if from >= self.end {
            return;
        }
        let a = (from % cap) as usize;
        let b = (self.end % cap) as usize;
        if a < b {
            f(&self.buf[a..b]);
        } else {
            f(&self.buf[a..]);
            f(&self.buf[..b]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resized_history_keeps_the_newest_samples_at_their_positions() {
        let mut h = History::new(4);
        h.push(&[1, 2, 3, 4, 5, 6]);
        h.resize(8);
        let mut got = Vec::new();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [3, 4, 5, 6]);
        h.push(&[7, 8, 9]);
        got.clear();
        h.range(2, |s| got.extend_from_slice(s));
        assert_eq!(got, [3, 4, 5, 6, 7, 8, 9]);
        h.resize(2);
        got.clear();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [8, 9]);
    }

    #[test]
    fn history_returns_the_requested_range_across_the_wrap() {
        let mut h = History::new(8);
        h.push(&[1, 2, 3, 4, 5]);
        h.push(&[6, 7, 8, 9, 10]);
        let mut got = Vec::new();
        h.range(4, |s| got.extend_from_slice(s));
        assert_eq!(got, [5, 6, 7, 8, 9, 10]);
        got.clear();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [3, 4, 5, 6, 7, 8, 9, 10], "clamped to what is kept");
        h.skip(100);
        h.push(&[11, 12]);
        got.clear();
        h.range(0, |s| got.extend_from_slice(s));
        assert_eq!(got, [11, 12], "nothing from before a break");
    }
}
