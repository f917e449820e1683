//! Where events go. Each sink runs in its own thread behind a bounded queue; a slow or dead sink loses
//! its own events (counted), never the pipeline's time.
//!
//! Backends implement [`Sink`]. This module does not retry or reconnect: a backend that needs to
//! (MQTT) does so in its own threads, and its `write` and `tick` never wait on the network.

pub mod mqtt;
pub mod socket;
pub(crate) mod stdout;

use std::io;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::bus::Events;
/// The queues' sending side and the drop count live with the bus that feeds them.
use crate::bus::{Dropped, SinkQueue};
use crate::event::{EventKind, Line, Stage};

/// Events waiting for one sink before new ones are dropped.
pub(crate) const QUEUE_CAPACITY: usize = 1024;

/// A destination for event lines.
pub(crate) trait Sink: Send + 'static {
    /// Short name used in logs and the thread name.
    fn name(&self) -> &'static str;
    /// Deliver one line. An error stops this sink (and only this sink).
    fn write(&mut self, line: &Line) -> io::Result<()>;
    /// How often [`Sink::tick`] wants to run while no line comes; `None`: never.
    fn tick_every(&self) -> Option<Duration> {
        None
    }
    /// Periodic work between lines (a backend's own queue after a reconnect).
    fn tick(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How a sink reports trouble as events (`error`, stage `sink`). Sinks are built before the
/// [`Events`] handle that feeds them exists, so the handle is set once it does.
#[derive(Clone, Default)]
pub(crate) struct Reporter(Arc<OnceLock<Events>>);

impl Reporter {
    pub(crate) fn set(&self, events: &Events) {
        let _ = self.0.set(events.clone());
    }

    pub(crate) fn events(&self) -> Option<&Events> {
        self.0.get()
    }

    pub(crate) fn error(&self, code: &'static str, message: String, retrying: bool) {
        if let Some(events) = self.0.get() {
            events.emit(EventKind::Error {
                stage: Stage::Sink,
                code,
                message,
                retrying,
            });
        }
    }
}

/// Owns a sink's thread. Dropping it (after the queue is closed) joins the thread.
pub(crate) struct SinkHandle {
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

/// Called once when a sink stops by itself (its error), not when hark closes it.
pub(crate) type OnEnd = Box<dyn FnOnce(&'static str, io::Error) + Send>;

/// Start a sink's thread; returns the queue to hand to [`crate::bus::Events`]. Lines its queue
/// drops are counted in `dropped`.
pub(crate) fn spawn(
    mut sink: Box<dyn Sink>,
    dropped: Dropped,
    on_end: OnEnd,
) -> io::Result<(SinkQueue, SinkHandle)> {
    let name = sink.name();
    let (queue, rx) = SinkQueue::counted(name, QUEUE_CAPACITY, dropped);
    let thread = thread::Builder::new()
        .name(format!("hark-sink-{name}"))
        .spawn(move || {
            let result = drive(sink.as_mut(), &rx);
            if let Err(e) = result {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    tracing::warn!("{name} was closed; no more events are written there");
                } else {
                    tracing::error!("sink {name} failed: {e}; no more events are written there");
                }
                on_end(name, e);
            }
        })?;
    Ok((
        queue,
        SinkHandle {
            thread: Some(thread),
        },
    ))
}

/// Feed a sink until its queue closes (`Ok`) or it fails.
fn drive(sink: &mut dyn Sink, rx: &Receiver<Line>) -> io::Result<()> {
    loop {
        let line = match sink.tick_every() {
            None => match rx.recv() {
                Ok(line) => line,
                Err(_) => return Ok(()),
            },
            Some(every) => match rx.recv_timeout(every) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    sink.tick()?;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            },
        };
        sink.write(&line)?;
    }
}
