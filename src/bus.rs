//! The event bus: numbers each event, serialises it once (through [`crate::event`]) and offers the
//! line to every sink's bounded queue without waiting; a full queue drops the line and counts it.
//! Every stage that reports something holds a clone of [`Events`].
//!
//! Deliberately not here: the schema (`crate::event`), the sinks' threads and backends, and what a
//! sink does with a line (`crate::sink`, which holds the receiving ends of these queues).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::event::{EventKind, Line};

/// Hands events to the sinks. Cheap to clone; every stage holds one.
#[derive(Clone)]
pub(crate) struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    device: String,
    seq: AtomicU64,
    closed: AtomicBool,
    /// The sinks are being replaced (SIGHUP): nothing is handed over meanwhile.
    paused: AtomicBool,
    /// Held while numbering and queueing, so that `seq` order is delivery order on every sink.
    queues: Mutex<Vec<SinkQueue>>,
}

impl Events {
    pub(crate) fn new(device: String, queues: Vec<SinkQueue>) -> Events {
        Events {
            inner: Arc::new(Inner {
                device,
                seq: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                queues: Mutex::new(queues),
            }),
        }
    }

    pub(crate) fn device(&self) -> &str {
        &self.inner.device
    }

    /// Serialize `kind` once and offer it to every sink without blocking. Returns whether it
    /// was handed over: at least one sink took it, or there are no sinks at all. `false` after
    /// [`Events::close`], or when every sink refused it (full or gone).
    pub(crate) fn emit(&self, kind: EventKind) -> bool {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.inner.closed.load(Ordering::Relaxed) || self.inner.paused.load(Ordering::Relaxed) {
            return false;
        }
        let Some(line) = self.serialize(&kind) else {
            return false;
        };
        let mut taken = queues.is_empty();
        for queue in queues.iter_mut() {
            taken |= queue.offer(&line);
        }
        taken
    }

    /// Number and serialize an event without handing it to the sinks: the first line for one
    /// new reader (a socket client's `status`). `None` after [`Events::close`].
    ///
    /// The caller may hold a lock that its sink's `write` also takes: this takes the events
    /// lock, which `emit` holds only while offering lines to queues (never while a sink writes).
    pub(crate) fn render(&self, kind: &EventKind) -> Option<Line> {
        let _queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.inner.closed.load(Ordering::Relaxed) {
            return None;
        }
        self.serialize(kind)
    }

    /// Called with the events lock held, so that `seq` order is queueing order.
    fn serialize(&self, kind: &EventKind) -> Option<Line> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        match Line::serialize(kind, &self.inner.device, seq, SystemTime::now()) {
            Ok(line) => Some(line),
            // Serializing plain structs of strings and numbers cannot fail; log rather than panic.
            Err(e) => {
                tracing::error!("cannot serialize a {} event: {e}", kind.name());
                None
            }
        }
    }

    /// Take the sink queues out to replace the sinks (SIGHUP); until [`Events::set_queues`],
    /// events are not handed to anyone (`emit` returns `false`, so transcripts are kept).
    pub(crate) fn take_queues(&self) -> Vec<SinkQueue> {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.inner.paused.store(true, Ordering::Relaxed);
        std::mem::take(&mut *queues)
    }

    /// Install new sink queues after [`Events::take_queues`].
    pub(crate) fn set_queues(&self, new: Vec<SinkQueue>) {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        *queues = new;
        self.inner.paused.store(false, Ordering::Relaxed);
    }

    /// Close every sink queue; the sink threads drain what they hold and end.
    pub(crate) fn close(&self) {
        let mut queues = match self.inner.queues.lock() {
            Ok(q) => q,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.inner.closed.store(true, Ordering::Relaxed);
        queues.clear();
    }
}

/// Lines lost by every sink together (queues full, a slow socket client, MQTT's queue overflowing):
/// reported as `events_dropped` in `status` events.
#[derive(Clone, Default)]
pub(crate) struct Dropped(Arc<AtomicU64>);

impl Dropped {
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The sending side of one sink's bounded queue.
pub(crate) struct SinkQueue {
    name: &'static str,
    tx: SyncSender<Line>,
    dropped: Dropped,
    warned: bool,
}

impl SinkQueue {
    /// A queue and its receiving end, for a sink thread or a test.
    pub(crate) fn pair(name: &'static str, capacity: usize) -> (SinkQueue, Receiver<Line>) {
        Self::counted(name, capacity, Dropped::default())
    }

    pub(crate) fn counted(
        name: &'static str,
        capacity: usize,
        dropped: Dropped,
    ) -> (SinkQueue, Receiver<Line>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let queue = SinkQueue {
            name,
            tx,
            dropped,
            warned: false,
        };
        (queue, rx)
    }

    /// Queue a line without waiting; a full queue drops it and counts.
    /// Whether the sink took the line.
    pub(crate) fn offer(&mut self, line: &Line) -> bool {
        match self.tx.try_send(line.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.add(1);
                if !std::mem::replace(&mut self.warned, true) {
                    tracing::warn!("sink {} is not keeping up; dropping its events", self.name);
                }
                false
            }
            // The sink stopped (it logged why); nothing more to do.
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EndReason;

    #[test]
    fn common_fields_come_first_and_type_specific_fields_follow() {
        let (queue, rx) = SinkQueue::pair("test", 4);
        let events = Events::new("kiosk-1".into(), vec![queue]);
        events.emit(EventKind::SpeechStart {
            utterance: "u1".into(),
            offset_ms: 1200,
        });
        events.emit(EventKind::SpeechEnd {
            utterance: "u1".into(),
            offset_ms: 1200,
            duration_ms: 900,
            reason: EndReason::MaxLength,
            audio: None,
        });
        let first = rx.recv().unwrap();
        assert!(
            first
                .json
                .starts_with(r#"{"v":1,"type":"speech_start","device":"kiosk-1","seq":0,"time":""#),
            "{}",
            first.json
        );
        assert!(
            first
                .json
                .ends_with(r#""utterance":"u1","offset_ms":1200}"#)
        );
        let second: serde_json::Value = serde_json::from_str(&rx.recv().unwrap().json).unwrap();
        assert_eq!(second["seq"], 1);
        assert_eq!(second["reason"], "max_length");
        assert!(second.get("audio").is_none());
    }

    #[test]
    fn replacing_the_sinks_pauses_and_closing_ends_delivery() {
        let start = || EventKind::SpeechStart {
            utterance: "u".into(),
            offset_ms: 0,
        };
        let (queue, rx) = SinkQueue::pair("a", 1);
        let events = Events::new("d".into(), vec![queue]);
        assert!(events.emit(start()));
        // Full: the line is dropped and counted, and nobody took it.
        assert!(!events.emit(start()));
        let taken = events.take_queues();
        assert_eq!(taken.len(), 1);
        assert!(!events.emit(start()), "paused while the sinks are replaced");
        let (queue, rx2) = SinkQueue::pair("b", 4);
        events.set_queues(vec![queue]);
        assert!(events.emit(start()));
        let seqs: Vec<u64> = [rx.try_recv(), rx2.try_recv()]
            .into_iter()
            .map(|l| l.expect("a line").seq)
            .collect();
        // The dropped line was numbered too; the paused emit was not.
        assert_eq!(seqs, [0, 2]);
        assert!(events.render(&start()).is_some_and(|l| l.seq == 3));
        events.close();
        assert!(!events.emit(start()));
        assert!(events.render(&start()).is_none());
        assert!(
            Events::new("d".into(), Vec::new()).emit(start()),
            "no sinks: handed over"
        );
    }
}
