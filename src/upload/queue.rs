//! The upload queue: the spooled utterances waiting for an upload, oldest first, and what the
//! control thread tells the upload threads (finish, stop by a deadline, new settings).
//!
//! Deliberately not here: what a thread does with an utterance (`worker`), and any decision
//! about retries, fallbacks or outages (`policy`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::Setup;
use super::policy::Outage;
use crate::spool::Entry;

/// An utterance waiting for its upload.
pub(super) struct Job {
    pub(super) entry: Entry,
    /// When its `speech_end` was emitted, for utterances of this run.
    pub(super) ended: Option<Instant>,
}

/// The queue the upload threads share, and what the control thread tells them.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
    /// Whether every endpoint is down, shared by the threads.
    pub(super) outage: Outage,
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// No more jobs will come: end once the queue is empty.
    finishing: bool,
    /// End by this instant, whatever is left.
    deadline: Option<Instant>,
    /// The newest settings (a reload replaces them) and how many times they were replaced.
    setup: Arc<Setup>,
    generation: u64,
    /// A thread gave up on the endpoints ([`Patience::GiveUp`](super::Patience::GiveUp)): no
    /// one takes a new job.
    gave_up: bool,
}

impl Queue {
    /// A queue holding `jobs`, for threads that start with `setup`.
    pub(super) fn new(jobs: VecDeque<Job>, setup: Arc<Setup>) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                jobs,
                finishing: false,
                deadline: None,
                setup,
                generation: 0,
                gave_up: false,
            }),
            changed: Condvar::new(),
            outage: Outage::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn push(&self, job: Job) {
        self.lock().jobs.push_back(job);
        // All: a thread waiting out a backoff sleeps on the same condvar as an idle one.
        self.changed.notify_all();
    }

    /// Put back a job that was not finished, in front; with `gave_up`, no thread takes
    /// another one ([`Patience::GiveUp`](super::Patience::GiveUp)).
    pub(super) fn put_back(&self, job: Job, gave_up: bool) {
        let mut state = self.lock();
        state.jobs.push_front(job);
        state.gave_up |= gave_up;
        drop(state);
        self.changed.notify_all();
    }

    /// The next job, or `None` when a thread should end.
    pub(super) fn next_job(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if state.gave_up || state.deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.finishing || state.deadline.is_some() {
                return None;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The stop deadline, once a stop was asked for.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.lock().deadline
    }

    /// Wait `d`; `false` when the stop deadline comes first.
    pub(super) fn wait(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if let Some(deadline) = state.deadline
                && deadline <= until
            {
                if now >= deadline {
                    return false;
                }
            } else if now >= until {
                return true;
            }
            let end = state.deadline.map_or(until, |dl| dl.min(until));
            state = self
                .changed
                .wait_timeout(state, end.saturating_duration_since(now))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The newest settings and their generation, if newer than `generation`.
    pub(super) fn newer_setup(&self, generation: u64) -> Option<(Arc<Setup>, u64)> {
        let state = self.lock();
        (state.generation != generation).then(|| (state.setup.clone(), state.generation))
    }

    /// No more jobs will come: the threads end when the queue is empty.
    pub(super) fn finish(&self) {
        self.lock().finishing = true;
        self.changed.notify_all();
    }

    /// New settings, taken by each thread before its next job.
    pub(super) fn reconfigure(&self, setup: Setup) {
        let mut state = self.lock();
        state.setup = Arc::new(setup);
        state.generation += 1;
    }

    /// End by `deadline` (the earliest one asked for), whatever is left.
    pub(super) fn stop(&self, deadline: Instant) {
        let mut state = self.lock();
        state.deadline = Some(state.deadline.map_or(deadline, |d| d.min(deadline)));
        drop(state);
        self.changed.notify_all();
    }

    /// How many jobs are left, and the spool directory they are in.
    pub(super) fn left(&self) -> (u64, Option<PathBuf>) {
        let state = self.lock();
        let dir = state
            .jobs
            .front()
            .and_then(|job| job.entry.audio.parent())
            .map(Path::to_path_buf);
        (state.jobs.len() as u64, dir)
    }
}
