//! The configured sinks (stdout, socket, MQTT) as one set: started together, restarted together
//! on SIGHUP, and closed together when the session ends, so that each drains what it holds.

use std::sync::mpsc::Sender;

use super::{Control, StartError};
use crate::bus::Events;
use crate::bus::{self, SinkQueue};
use crate::config::Config;
use crate::sink::mqtt::{MqttError, MqttSink};
use crate::sink::socket::{self, SocketSink};
use crate::sink::{self, SinkHandle, stdout::StdoutSink};

/// The sinks and the handle that feeds them. Dropping it (also on an early error return) closes
/// the queues first, so that each sink drains what it holds and ends at once.
pub(super) struct Sinks {
    pub(super) events: Events,
    handles: Vec<SinkHandle>,
    /// How many sinks were started; each `SinkGone` takes one away.
    running: usize,
    pub(super) dropped: bus::Dropped,
    /// How a sink builds a `status` event of its own (a socket client's first line).
    pub(super) status: socket::StatusSource,
    reporter: sink::Reporter,
}

impl Sinks {
    /// Start the configured sinks; each tells `control` when it stops by itself.
    pub(super) fn start(config: &Config, control: &Sender<Control>) -> Result<Sinks, StartError> {
        let dropped = bus::Dropped::default();
        let reporter = sink::Reporter::default();
        let status = socket::StatusSource::default();
        let (queues, handles) = build(config, control, &dropped, &reporter, &status)?;
        let events = Events::new(config.device_id(), queues);
        reporter.set(&events);
        Ok(Sinks {
            events,
            running: handles.len(),
            handles,
            dropped,
            status,
            reporter,
        })
    }

    /// Queues the command feeds itself (`hark transcribe -f jsonl`), no sink threads.
    pub(super) fn given(config: &Config, queues: Vec<SinkQueue>) -> Sinks {
        Sinks {
            events: Events::new(config.device_id(), queues),
            handles: Vec::new(),
            running: 0,
            dropped: bus::Dropped::default(),
            status: socket::StatusSource::default(),
            reporter: sink::Reporter::default(),
        }
    }

    /// Note that a sink ended; `true` when none is left (nothing would see hark's events).
    pub(super) fn gone(&mut self, name: &str) -> bool {
        self.running = self.running.saturating_sub(1);
        tracing::info!("the {name} sink stopped; {} left", self.running);
        self.running == 0
    }

    /// Replace the sinks by those of `new` (SIGHUP). The old ones drain and stop first (a socket
    /// path or an MQTT client id can be the same); if the new ones cannot start, those of `old`
    /// are started again. Returns whether `new` is in effect.
    pub(super) fn restart(
        &mut self,
        new: &Config,
        old: &Config,
        control: &Sender<Control>,
    ) -> bool {
        drop(self.events.take_queues());
        self.handles.clear();
        let built = build(new, control, &self.dropped, &self.reporter, &self.status);
        let (applied, (queues, handles)) = match built {
            Ok(sinks) => (true, sinks),
            Err(e) => {
                tracing::error!("SIGHUP: the new outputs cannot start: {e}; the old ones again");
                let again = build(old, control, &self.dropped, &self.reporter, &self.status);
                (
                    false,
                    again.unwrap_or_else(|e| {
                        tracing::error!("SIGHUP: the old outputs cannot start either: {e}");
                        (Vec::new(), Vec::new())
                    }),
                )
            }
        };
        self.running = handles.len();
        self.handles = handles;
        self.events.set_queues(queues);
        applied
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.events.close();
        self.handles.clear();
    }
}

/// The sink threads of `config.output`, sharing the drop counter, reporter and status source.
fn build(
    config: &Config,
    control: &Sender<Control>,
    dropped: &bus::Dropped,
    reporter: &sink::Reporter,
    status: &socket::StatusSource,
) -> Result<(Vec<SinkQueue>, Vec<SinkHandle>), StartError> {
    let mut backends: Vec<Box<dyn sink::Sink>> = Vec::new();
    if config.output.stdout {
        backends.push(Box::new(StdoutSink::new(config.output.format)));
    }
    if !config.output.socket.as_os_str().is_empty() {
        let sink = SocketSink::bind(
            &config.output,
            status.clone(),
            reporter.clone(),
            dropped.clone(),
        )?;
        backends.push(Box::new(sink));
    }
    if !config.output.mqtt.url.is_empty() {
        let mqtt = &config.output.mqtt;
        let device = config.device_id();
        let sink = MqttSink::start(mqtt, &device, dropped.clone(), reporter.clone()).map_err(
            |e| match e {
                MqttError::Start(source) => StartError::Thread {
                    what: "the MQTT connection thread",
                    source,
                },
                e => StartError::Mqtt(e),
            },
        )?;
        backends.push(Box::new(sink));
    }
    let mut queues = Vec::new();
    let mut handles = Vec::new();
    for backend in backends {
        let tx = control.clone();
        let on_end: sink::OnEnd = Box::new(move |name, _| {
            let _ = tx.send(Control::SinkGone(name));
        });
        let (queue, handle) =
            sink::spawn(backend, dropped.clone(), on_end).map_err(|source| StartError::Thread {
                what: "a sink thread",
                source,
            })?;
        queues.push(queue);
        handles.push(handle);
    }
    Ok((queues, handles))
}
