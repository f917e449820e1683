//! The upload queue: the spooled utterances waiting for an upload, oldest first, what the
//! control thread tells the upload threads (finish, stop by a deadline, new settings), and the
//! [`Uploader`] handle that starts, stops and joins the threads.
//!
//! Deliberately not here: what a thread does with an utterance (`worker`), and any decision
//! about retries, fallbacks or outages (`policy`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::policy::Outage;
use super::worker::Worker;
use super::{Options, Report, Setup, StartError, Submitter};
use crate::event::Events;
use crate::spool::{Entry, Spool};

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
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, job: Job) {
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
}

/// Owns the upload threads.
pub struct Uploader {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<Report>>,
}

impl Uploader {
    /// Queue what waits in the spool now (oldest first), then start `options.workers` threads.
    /// `done` receives one message when the last thread ends.
    pub fn start<T: Send + 'static>(
        setup: Setup,
        spool: Arc<Spool>,
        events: Events,
        options: Options,
        done: (Sender<T>, T),
    ) -> Result<Uploader, StartError> {
        let jobs: VecDeque<Job> = spool
            .entries()?
            .into_iter()
            .map(|entry| Job { entry, ended: None })
            .collect();
        if !jobs.is_empty() {
            tracing::info!(
                "{} utterances wait in the spool; uploading them first",
                jobs.len()
            );
        }
        let setup = Arc::new(setup);
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                jobs,
                finishing: false,
                deadline: None,
                setup: setup.clone(),
                generation: 0,
                gave_up: false,
            }),
            changed: Condvar::new(),
            outage: Outage::default(),
        });
        // Sent when the last thread ends, however it ends (a panic included).
        let done = Arc::new(DoneGuard(Mutex::new(Some(done))));
        let mut uploader = Uploader {
            queue: queue.clone(),
            threads: Vec::new(),
        };
        for i in 0..options.workers.max(1) {
            let worker = Worker::new(
                queue.clone(),
                setup.clone(),
                spool.clone(),
                events.clone(),
                &options,
            );
            let done = done.clone();
            let name = if options.workers > 1 {
                format!("hark-upload-{i}")
            } else {
                "hark-upload".to_owned()
            };
            let thread = thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _done = done;
                    worker.run()
                })
                // Dropping `uploader` stops and joins the threads already started.
                .map_err(StartError::Thread)?;
            uploader.threads.push(thread);
        }
        Ok(uploader)
    }

    pub fn submitter(&self) -> Submitter {
        let queue = self.queue.clone();
        Submitter::new(move |entry, ended| {
            queue.push(Job {
                entry,
                ended: Some(ended),
            })
        })
    }

    /// No more utterances will come: the threads end when the queue is empty (or, with
    /// [`Patience::GiveUp`](super::Patience::GiveUp), when every endpoint is down).
    pub fn finish(&self) {
        self.queue.lock().finishing = true;
        self.queue.changed.notify_all();
    }

    /// New settings from a reloaded config, used from the next utterance on.
    pub fn reconfigure(&self, setup: Setup) {
        let mut state = self.queue.lock();
        state.setup = Arc::new(setup);
        state.generation += 1;
    }

    /// Keep going until `deadline`, then abandon what is left (it stays in the spool).
    pub fn stop(&self, deadline: Instant) {
        let mut state = self.queue.lock();
        state.deadline = Some(state.deadline.map_or(deadline, |d| d.min(deadline)));
        drop(state);
        self.queue.changed.notify_all();
    }

    /// Join the threads; call after the `done` message arrived (else this blocks until they end).
    pub fn join(mut self) -> Report {
        let mut report = Report::default();
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().unwrap_or_default();
            report.transcribed += r.transcribed;
            report.failed += r.failed;
        }
        let state = self.queue.lock();
        report.waiting = state.jobs.len() as u64;
        if report.waiting > 0
            && let Some(dir) = state.jobs.front().and_then(|job| job.entry.audio.parent())
        {
            tracing::warn!(
                "{} utterances stay in {} for the next run",
                report.waiting,
                dir.display()
            );
        }
        report
    }

    /// Give up on the threads without joining them (an upload in flight past the stop deadline).
    pub fn detach(mut self) {
        self.threads.clear();
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(Instant::now());
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

struct DoneGuard<T>(Mutex<Option<(Sender<T>, T)>>);

impl<T> Drop for DoneGuard<T> {
    fn drop(&mut self) {
        let taken = self
            .0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((tx, msg)) = taken {
            let _ = tx.send(msg);
        }
    }
}
