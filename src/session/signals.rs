//! SIGTERM, SIGINT and SIGHUP as messages to the control loop. systemd stops services with
//! SIGTERM, so handling Ctrl-C alone would lose the open utterance.

use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::{Control, StartError};

/// A thread that turns the signals into `Control::Signal`; dropping it closes and joins it.
pub(super) struct SignalThread {
    handle: signal_hook::iterator::Handle,
    thread: Option<JoinHandle<()>>,
}

impl SignalThread {
    pub(super) fn start(tx: Sender<Control>) -> Result<SignalThread, StartError> {
        let signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|source| {
                StartError::Thread {
                    what: "signal handling",
                    source,
                }
            })?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("hark-signals".into())
            .spawn(move || {
                let mut signals = signals;
                for sig in signals.forever() {
                    if tx.send(Control::Signal(sig)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| StartError::Thread {
                what: "the signal thread",
                source,
            })?;
        Ok(SignalThread {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalThread {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
