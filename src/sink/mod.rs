//! Where events go. Each sink runs in its own thread behind a bounded queue; a slow or dead sink loses
//! its own events (counted), never the pipeline's time.
//!
//! Backends implement [`Sink`]. This module does not retry or reconnect:
//! a backend that needs to (MQTT) does so inside its own `write`.

pub mod stdout;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::{self, JoinHandle};

use crate::event::Line;

/// Events waiting for one sink before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 1024;

/// A destination for event lines.
pub trait Sink: Send + 'static {
    /// Short name used in logs and the thread name.
    fn name(&self) -> &'static str;
    /// Deliver one line. An error stops this sink (and only this sink).
    fn write(&mut self, line: &Line) -> io::Result<()>;
}

/// The sending side of one sink's bounded queue.
pub struct SinkQueue {
    name: &'static str,
    tx: SyncSender<Line>,
    dropped: Arc<AtomicU64>,
}

impl SinkQueue {
    /// A queue and its receiving end, for a sink thread or a test.
    pub fn pair(name: &'static str, capacity: usize) -> (SinkQueue, Receiver<Line>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let queue = SinkQueue {
            name,
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (queue, rx)
    }

    /// Queue a line without waiting; a full queue drops it and counts.
    /// Whether the sink took the line.
    pub fn offer(&mut self, line: &Line) -> bool {
        match self.tx.try_send(line.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed);
                if n == 0 {
                    tracing::warn!("sink {} is not keeping up; dropping its events", self.name);
                }
                false
            }
            // The sink stopped (it logged why); nothing more to do.
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Owns a sink's thread. Dropping it (after the queue is closed) joins the thread.
pub struct SinkHandle {
    thread: Option<JoinHandle<()>>,
}

/// How long stopping waits for a sink to write out what it holds (a stalled reader of stdout
/// must not keep hark from exiting after SIGTERM).
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for SinkHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let until = std::time::Instant::now() + DRAIN_DEADLINE;
            while !thread.is_finished() && std::time::Instant::now() < until {
                thread::sleep(std::time::Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("a sink did not finish writing within {DRAIN_DEADLINE:?}");
            }
        }
    }
}

/// Start a sink's thread; returns the queue to hand to [`crate::event::Events`].
pub fn spawn(mut sink: Box<dyn Sink>) -> io::Result<(SinkQueue, SinkHandle)> {
    let name = sink.name();
    let (queue, rx) = SinkQueue::pair(name, QUEUE_CAPACITY);
    let thread = thread::Builder::new()
        .name(format!("hark-sink-{name}"))
        .spawn(move || {
            for line in rx {
                if let Err(e) = sink.write(&line) {
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        tracing::warn!("{name} was closed; no more events are written there");
                    } else {
                        tracing::error!(
                            "sink {name} failed: {e}; no more events are written there"
                        );
                    }
                    return;
                }
            }
        })?;
    Ok((
        queue,
        SinkHandle {
            thread: Some(thread),
        },
    ))
}
