//! The [`Uploader`] handle: it fills the queue from the spool, starts the upload threads, tells
//! them to finish or to stop by a deadline, and joins them.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use super::queue::{Job, Queue};
use super::worker::Worker;
use super::{Options, Report, Setup, StartError, Submitter};
use crate::bus::Events;
use crate::spool::Spool;

/// Owns the upload threads.
pub(crate) struct Uploader {
    queue: Arc<Queue>,
    threads: Vec<JoinHandle<Report>>,
}

impl Uploader {
    /// Queue what waits in the spool now (oldest first), then start `options.workers` threads.
    /// `done` receives one message when the last thread ends.
    pub(crate) fn start<T: Send + 'static>(
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
        let queue = Arc::new(Queue::new(jobs, setup.clone()));
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

    pub(crate) fn submitter(&self) -> Submitter {
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
    pub(crate) fn finish(&self) {
        self.queue.finish();
    }

    /// New settings from a reloaded config, used from the next utterance on.
    pub(crate) fn reconfigure(&self, setup: Setup) {
        self.queue.reconfigure(setup);
    }

    /// Keep going until `deadline`, then abandon what is left (it stays in the spool).
    pub(crate) fn stop(&self, deadline: Instant) {
        self.queue.stop(deadline);
    }

    /// Join the threads; call after the `done` message arrived (else this blocks until they end).
    pub(crate) fn join(mut self) -> Report {
        let mut report = Report::default();
        for t in std::mem::take(&mut self.threads) {
            let r = t.join().unwrap_or_default();
            report.transcribed += r.transcribed;
            report.failed += r.failed;
        }
        let (waiting, dir) = self.queue.left();
        report.waiting = waiting;
        if waiting > 0
            && let Some(dir) = dir
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
    pub(crate) fn detach(mut self) {
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
