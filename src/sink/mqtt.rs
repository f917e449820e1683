//! Events to an MQTT broker with rumqttc's sync client: every event on `{prefix}/{device}/event`,
//! transcripts also on `{prefix}/{device}/transcript`, status retained on `{prefix}/{device}/status`
//! (`online` at each connect, `{"state":"offline"}` as last will and at a clean stop), and Home
//! Assistant discovery when asked for.
//!
//! Two threads. The sink thread ([`MqttSink::write`]) only queues a line in the [`Outbox`] and hands
//! what it can to rumqttc's request channel with `try_publish`: it never waits on the network. A
//! connection thread drives rumqttc's event loop, reconnects with backoff (0.5 s doubling to 30 s),
//! reports each kind of failure once per outage (an `error` event and a log line), and tells the
//! outbox what the broker acknowledged, so that nothing is lost while the broker is away (within
//! `output.mqtt.queue` events; the oldest are dropped and counted beyond it).
//!
//! Deliberately not here: subscribing to anything, MQTT 5, client certificates, websockets.

mod link;
mod outbox;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttc::{Client, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use super::{Dropped, Reporter, Sink};
use crate::config::{MqttConfig, topic_text_ok};
use crate::event::Line;
use crate::url::{self, Broker};
use link::Link;
pub(crate) use outbox::{OFFLINE, Outbox, Topics};

pub(crate) const NAME: &str = "mqtt";

/// Publishes handed to rumqttc and not yet acknowledged, at most.
const WINDOW: usize = 64;
/// Event lines larger than this are not published (brokers refuse, or drop the client for, large
/// packets, and a publish that always fails would be resent forever).
const MAX_PAYLOAD: usize = 256 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// A connection that lasted this long starts the next outage's backoff from the beginning.
const STABLE: Duration = Duration::from_secs(30);
/// How long a stop waits for queued events to be acknowledged, then for the connection to close;
/// together under the sink thread's 2 s drain deadline.
const STOP_DRAIN: Duration = Duration::from_millis(1500);
const STOP_CLOSE: Duration = Duration::from_millis(400);
/// While publishes wait (rumqttc's channel was full), the sink thread retries this often.
const TICK: Duration = Duration::from_millis(100);

/// Why the MQTT sink cannot start. Everything but `Start` is a configuration problem (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("output.mqtt.url {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("output.mqtt.password_file {path}: {source}")]
    PasswordFile { path: String, source: io::Error },
    #[error("output.mqtt.password_file {path}: the file is empty")]
    EmptyPassword { path: String },
    #[error("output.mqtt.password_file is set but output.mqtt.username is empty")]
    PasswordWithoutUser,
    #[error("output.mqtt.ca_file {0}")]
    CaFile(#[from] crate::tls::CaFileError),
    #[error("output.mqtt.ca_file is set but output.mqtt.url is not mqtts://")]
    CaWithoutTls,
    #[error("{key} {value:?}: MQTT topics cannot contain +, # or NUL")]
    Topic { key: &'static str, value: String },
    #[error("cannot start the MQTT connection thread: {0}")]
    Start(io::Error),
}

fn qos(level: u32) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The password from `password_file`, trimmed. Never logged or shown.
fn read_password(path: &Path) -> Result<String, MqttError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| MqttError::PasswordFile {
        path: shown.clone(),
        source,
    })?;
    let password = text.trim();
    if password.is_empty() {
        return Err(MqttError::EmptyPassword { path: shown });
    }
    Ok(password.to_owned())
}

/// The user and password file of the config or the URL (the keys win), set on `options`.
fn login(
    config: &MqttConfig,
    broker: &Broker,
    options: &mut MqttOptions,
) -> Result<Option<(String, Option<PathBuf>)>, MqttError> {
    let user = match config.username.as_str() {
        "" => broker.user.clone(),
        user => Some(user.to_owned()),
    };
    let file = (!config.password_file.as_os_str().is_empty()).then_some(&config.password_file);
    let login = match (user, file) {
        (None, None) => None,
        (None, Some(_)) => return Err(MqttError::PasswordWithoutUser),
        (Some(user), file) => Some((user, file.cloned())),
    };
    if let Some((user, file)) = &login {
        let password = match (file, &broker.password) {
            (Some(path), _) => read_password(path)?,
            (None, Some(password)) => password.expose().to_owned(),
            (None, None) => String::new(),
        };
        options.set_credentials(user.clone(), password);
    }
    Ok(login)
}

/// TLS for an `mqtts://` broker, with the system's and `ca_file`'s roots; `None` for plain MQTT.
fn transport(config: &MqttConfig, broker: &Broker) -> Result<Option<Transport>, MqttError> {
    let ca = (!config.ca_file.as_os_str().is_empty()).then_some(config.ca_file.as_path());
    if !broker.tls {
        return match ca {
            Some(_) => Err(MqttError::CaWithoutTls),
            None => Ok(None),
        };
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(crate::tls::trust_roots(ca)?);
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Start(io::Error::other(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    ))))
}

/// The sink thread's and the connection thread's common state.
struct Relay {
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox changes (acks, connect, disconnect) and on stop.
    changed: Condvar,
    stopping: AtomicBool,
    qos: QoS,
}

impl Relay {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hand rumqttc every publish the outbox lets go now. Never waits: a full channel leaves the
/// rest for later.
fn pump(outbox: &mut Outbox, client: &Client, qos: QoS) {
    while let Some(msg) = outbox.next_publish() {
        let sent = client.try_publish(&*msg.topic, qos, msg.retain, msg.payload.as_bytes());
        if sent.is_err() {
            outbox.refused();
            break;
        }
    }
}

/// The MQTT backend of [`Sink`].
pub(crate) struct MqttSink {
    shared: Arc<Relay>,
    client: Client,
    dropped: Dropped,
    reporter: Reporter,
    /// Warned that the queue overflows (again after it has emptied).
    overflow_warned: bool,
    /// Warned that a line was too large to publish.
    size_warned: bool,
    thread: Option<JoinHandle<()>>,
}

impl MqttSink {
    /// Read the password and CA files, connect in the background. Lines the queue drops are
    /// counted in `dropped`; connection trouble is reported through `reporter`.
    pub(crate) fn start(
        config: &MqttConfig,
        device: &str,
        dropped: Dropped,
        reporter: Reporter,
    ) -> Result<MqttSink, MqttError> {
        let broker = Broker::parse(&config.url).map_err(|why| MqttError::Url {
            url: url::redact(&config.url),
            why,
        })?;
        for (key, value) in [
            ("output.mqtt.topic_prefix", config.topic_prefix.as_str()),
            ("device_id", device),
        ] {
            if !topic_text_ok(value) {
                let value = value.to_owned();
                return Err(MqttError::Topic { key, value });
            }
        }
        let client_id = if config.client_id.is_empty() {
            format!("hark-{device}")
        } else {
            config.client_id.clone()
        };
        let level = qos(config.qos);
        let topics = Topics::new(
            &config.topic_prefix,
            device,
            config.homeassistant_discovery,
            level as u8,
        );

        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options
            .set_keep_alive(KEEP_ALIVE)
            // hark resends what was not acknowledged itself (see outbox.rs).
            .set_clean_session(true)
            .set_max_packet_size(64 * 1024, MAX_PAYLOAD + 64 * 1024)
            .set_last_will(LastWill::new(&*topics.status, OFFLINE, level, true));
        let login = login(config, &broker, &mut options)?;
        if let Some(transport) = transport(config, &broker)? {
            options.set_transport(transport);
        }

        // Room for the whole window, the offline status and the DISCONNECT at stop.
        let (client, connection) = Client::new(options, WINDOW + 4);
        let shared = Arc::new(Relay {
            outbox: Mutex::new(Outbox::new(topics, config.queue as usize, WINDOW)),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            qos: level,
        });
        let mut link = Link::new(
            connection,
            client.clone(),
            shared.clone(),
            broker.to_string(),
            reporter.clone(),
            login,
        );
        let thread = thread::Builder::new()
            .name("hark-mqtt".into())
            .spawn(move || link.run())
            .map_err(MqttError::Start)?;
        tracing::info!(
            "MQTT: publishing to {broker} under {}",
            shared.lock().topics().event.trim_end_matches("/event")
        );
        Ok(MqttSink {
            shared,
            client,
            dropped,
            reporter,
            overflow_warned: false,
            size_warned: false,
            thread: Some(thread),
        })
    }
}

impl Sink for MqttSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn write(&mut self, line: &Line) -> io::Result<()> {
        if line.json.len() > MAX_PAYLOAD {
            self.dropped.add(1);
            if !std::mem::replace(&mut self.size_warned, true) {
                let message = format!(
                    "a {} event of {} bytes is over the {MAX_PAYLOAD} bytes hark publishes to MQTT; not published",
                    line.kind,
                    line.json.len()
                );
                tracing::warn!("MQTT: {message}");
                self.reporter.error("mqtt_too_large", message, false);
            }
            return Ok(());
        }
        let mut outbox = self.shared.lock();
        if !outbox.has_work() {
            self.overflow_warned = false;
        }
        let lost = outbox.push(line);
        if lost > 0 {
            self.dropped.add(lost);
            if !std::mem::replace(&mut self.overflow_warned, true) {
                tracing::warn!(
                    "MQTT: the queue is full (output.mqtt.queue); dropping the oldest events"
                );
            }
        }
        pump(&mut outbox, &self.client, self.shared.qos);
        Ok(())
    }

    fn tick_every(&self) -> Option<Duration> {
        self.shared.lock().has_work().then_some(TICK)
    }

    fn tick(&mut self) -> io::Result<()> {
        pump(&mut self.shared.lock(), &self.client, self.shared.qos);
        Ok(())
    }
}

impl Drop for MqttSink {
    /// hark stops: publish what is queued if the broker is there, or still being connected to
    /// for the first time (bounded), then the retained offline status (a clean DISCONNECT
    /// discards the last will), then disconnect.
    fn drop(&mut self) {
        let shared = &self.shared;
        let until = Instant::now() + STOP_DRAIN;
        let mut outbox = shared.lock();
        while outbox.may_deliver() && !outbox.is_idle() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let (waiting, ready, inflight) = outbox.lens();
                tracing::warn!(
                    "MQTT: stopping with {waiting} events and {} publishes not acknowledged",
                    ready + inflight
                );
                break;
            }
            pump(&mut outbox, &self.client, shared.qos);
            outbox = shared
                .changed
                .wait_timeout(outbox, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        shared.stopping.store(true, Ordering::Release);
        if outbox.is_connected() {
            // Past the window: the request channel keeps room for these two.
            let offline = outbox.offline();
            let _ = self.client.try_publish(
                &*offline.topic,
                shared.qos,
                true,
                offline.payload.as_bytes(),
            );
            let _ = self.client.try_disconnect();
        }
        drop(outbox);
        shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let until = Instant::now() + STOP_CLOSE;
            while !thread.is_finished() && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                // It ends with the process; the broker then publishes the last will.
                tracing::debug!("MQTT: the connection did not close in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_name_the_key_and_never_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let start = |c: &MqttConfig| {
            MqttSink::start(c, "kiosk-1", Dropped::default(), Reporter::default()).err()
        };
        let mut c = MqttConfig {
            url: "mqtt://127.0.0.1:1".into(),
            username: "hark".into(),
            password_file: dir.path().join("missing"),
            ..MqttConfig::default()
        };
        let e = start(&c).unwrap().to_string();
        assert!(e.starts_with("output.mqtt.password_file "), "{e}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        c.password_file = empty;
        let e = start(&c).unwrap().to_string();
        assert!(e.contains("empty"), "{e}");
        c.username.clear();
        assert!(matches!(start(&c), Some(MqttError::PasswordWithoutUser)));
        let c = MqttConfig {
            url: "mqtts://127.0.0.1:1".into(),
            ca_file: dir.path().join("ca.pem"),
            ..MqttConfig::default()
        };
        let e = start(&c).unwrap().to_string();
        assert!(e.starts_with("output.mqtt.ca_file "), "{e}");
        let c = MqttConfig {
            url: "mqtt://127.0.0.1:1".into(),
            topic_prefix: "a/+".into(),
            ..MqttConfig::default()
        };
        assert!(matches!(start(&c), Some(MqttError::Topic { .. })));
    }
}
