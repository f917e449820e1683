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

mod outbox;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttc::{
    Client, ConnectReturnCode, Connection, ConnectionError, Event, LastWill, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};

use super::{Dropped, Reporter, Sink};
use crate::config::{MqttConfig, topic_text_ok};
use crate::event::Line;
use crate::url::{self, Broker};
pub use outbox::{OFFLINE, Outbox, Topics, node_id};

pub const NAME: &str = "mqtt";

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

/// The sink thread's and the connection thread's common state.
struct Shared {
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox changes (acks, connect, disconnect) and on stop.
    changed: Condvar,
    stopping: AtomicBool,
    qos: QoS,
}

impl Shared {
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
pub struct MqttSink {
    shared: Arc<Shared>,
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
    pub fn start(
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
        // The keys win over the URL's user and password.
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
        if broker.tls {
            let ca = (!config.ca_file.as_os_str().is_empty()).then_some(config.ca_file.as_path());
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(crate::tls::trust_roots(ca)?);
            let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| MqttError::Start(io::Error::other(e)))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        } else if !config.ca_file.as_os_str().is_empty() {
            return Err(MqttError::CaWithoutTls);
        }

        // Room for the whole window, the offline status and the DISCONNECT at stop.
        let (client, connection) = Client::new(options, WINDOW + 4);
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox::new(topics, config.queue as usize, WINDOW)),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            qos: level,
        });
        let mut link = Link {
            connection,
            client: client.clone(),
            shared: shared.clone(),
            broker: broker.to_string(),
            reporter: reporter.clone(),
            held: Vec::new(),
            login,
        };
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

/// What went wrong with the connection, as an `error` event's code and message.
fn classify(e: &ConnectionError, was_connected: bool, broker: &str) -> (&'static str, String) {
    if was_connected {
        return (
            "mqtt_disconnected",
            format!("lost the connection to {broker}: {e}"),
        );
    }
    match e {
        ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
        ) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                // mosquitto's answer to a wrong password.
                _ => "not authorized (a wrong user name or password, or a user the broker refuses)",
            };
            (
                "mqtt_auth",
                format!(
                    "{broker} refused the login: {why} (check output.mqtt.username and output.mqtt.password_file)"
                ),
            )
        }
        ConnectionError::ConnectionRefused(code) => (
            "mqtt_refused",
            format!("{broker} refused the connection: {code:?}"),
        ),
        ConnectionError::Tls(e) => ("mqtt_tls", format!("TLS with {broker}: {e}")),
        ConnectionError::NetworkTimeout => (
            "mqtt_connect",
            format!("cannot connect to {broker}: timed out"),
        ),
        e => ("mqtt_connect", format!("cannot connect to {broker}: {e}")),
    }
}

/// Failures since the connection was last up.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    attempts: u32,
    /// Codes already reported in this outage.
    reported: Vec<&'static str>,
}

/// The connection thread's state: rumqttc's event loop and what it reports.
struct Link {
    connection: Connection,
    client: Client,
    shared: Arc<Shared>,
    broker: String,
    reporter: Reporter,
    /// Reports made before the daemon's event handle existed; emitted once it does.
    held: Vec<(&'static str, String)>,
    /// The user and password file, read again after the broker refuses the login.
    login: Option<(String, Option<std::path::PathBuf>)>,
}

impl Link {
    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Drive rumqttc's event loop until hark stops. `Connection::iter()` would hold the connection
    /// borrowed; `recv()` is what its `next()` calls, and leaves the event loop reachable between
    /// events to clear what a dead connection left in it.
    fn run(&mut self) {
        let mut outage = Outage::default();
        let mut attempt = 0u32;
        let mut up_since: Option<Instant> = None;
        let mut ever_connected = false;
        loop {
            self.flush_reports();
            let event = match self.connection.recv() {
                Ok(event) => event,
                // Every request sender is gone (cannot happen while the sink lives).
                Err(_) => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // A clean session: nothing of the last connection is resent by rumqttc.
                    self.connection.eventloop.pending.clear();
                    if outage.attempts > 0 {
                        let secs = outage.since.map_or(0, |t| t.elapsed().as_secs());
                        tracing::info!(
                            "MQTT: connected to {} again after {} failed attempts ({secs} s)",
                            self.broker,
                            outage.attempts
                        );
                    } else if !ever_connected {
                        tracing::info!("MQTT: connected to {}", self.broker);
                    } else {
                        tracing::info!("MQTT: reconnected to {}", self.broker);
                    }
                    outage = Outage::default();
                    ever_connected = true;
                    up_since = Some(Instant::now());
                    let mut outbox = self.shared.lock();
                    outbox.connected();
                    pump(&mut outbox, &self.client, self.shared.qos);
                    drop(outbox);
                    self.shared.changed.notify_all();
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if self.stopping() => break,
                Ok(event) => {
                    let mut outbox = self.shared.lock();
                    if apply(&mut outbox, &event) {
                        pump(&mut outbox, &self.client, self.shared.qos);
                        drop(outbox);
                        self.shared.changed.notify_all();
                    }
                }
                Err(e) => {
                    let was_connected = self.connection_lost();
                    if self.stopping() {
                        break;
                    }
                    if up_since.is_some_and(|t| t.elapsed() >= STABLE) {
                        attempt = 0;
                    }
                    up_since = None;
                    let code = self.failed(&e, was_connected, &mut outage);
                    let delay = crate::backoff::RECONNECT.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    if self.pause(delay) {
                        break;
                    }
                    if code == "mqtt_auth" {
                        // The next attempt uses the password file as it is now.
                        self.reread_password();
                    }
                }
            }
        }
        self.connection_lost();
    }

    /// The connection failed or ended: acknowledgements read with the failing packet still count;
    /// whatever rumqttc holds is dropped (hark resends it from the outbox). Returns whether the
    /// connection had been up.
    fn connection_lost(&mut self) -> bool {
        let mut outbox = self.shared.lock();
        let eventloop = &mut self.connection.eventloop;
        for event in eventloop.state.events.drain(..) {
            apply(&mut outbox, &event);
        }
        // Also moves publishes still in the request channel into `pending`, where they are
        // dropped: they are in the outbox, and must not go out ahead of older ones it resends.
        eventloop.clean();
        eventloop.pending.clear();
        let was = outbox.is_connected();
        let back = outbox.disconnected();
        drop(outbox);
        if back > 0 {
            tracing::info!(
                "MQTT: {back} publishes not acknowledged go out again after reconnecting"
            );
        }
        self.shared.changed.notify_all();
        was
    }

    /// Report a failure once per kind and outage; returns its code.
    fn failed(
        &mut self,
        e: &ConnectionError,
        was_connected: bool,
        outage: &mut Outage,
    ) -> &'static str {
        outage.since.get_or_insert_with(Instant::now);
        if !was_connected {
            outage.attempts += 1;
        }
        let (code, message) = classify(e, was_connected, &self.broker);
        if outage.reported.contains(&code) {
            tracing::debug!("MQTT: {message}; retrying");
            return code;
        }
        outage.reported.push(code);
        tracing::warn!("MQTT: {message}; retrying with backoff");
        self.held.push((code, message));
        self.flush_reports();
        code
    }

    /// After a refused login, read the password file again: a fixed file needs no restart.
    fn reread_password(&mut self) {
        if let Some((user, Some(path))) = &self.login {
            match read_password(path) {
                Ok(password) => {
                    let options = &mut self.connection.eventloop.mqtt_options;
                    options.set_credentials(user.clone(), password);
                }
                Err(e) => tracing::warn!("MQTT: {e}"),
            }
        }
    }

    fn flush_reports(&mut self) {
        if self.held.is_empty() || self.reporter.events().is_none() {
            return;
        }
        for (code, message) in self.held.drain(..) {
            self.reporter.error(code, message, true);
        }
    }

    /// Wait before the next attempt; `true` when hark stops meanwhile.
    fn pause(&self, delay: Duration) -> bool {
        let outbox = self.shared.lock();
        let (_outbox, _) = self
            .shared
            .changed
            .wait_timeout_while(outbox, delay, |_| !self.stopping())
            .unwrap_or_else(|p| p.into_inner());
        self.stopping()
    }
}

/// Tell the outbox about one of rumqttc's events; `true` if something may have made room.
fn apply(outbox: &mut Outbox, event: &Event) -> bool {
    match event {
        Event::Outgoing(Outgoing::Publish(pkid)) => {
            outbox.sent(*pkid);
            *pkid == 0
        }
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
            outbox.collided(*pkid);
            false
        }
        Event::Incoming(Packet::PubAck(ack)) => {
            outbox.acked(ack.pkid);
            true
        }
        Event::Incoming(Packet::PubComp(comp)) => {
            outbox.acked(comp.pkid);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_for_error_events() {
        let refused = |code| ConnectionError::ConnectionRefused(code);
        let c = |e: &ConnectionError, up| classify(e, up, "mqtt://b:1883").0;
        assert_eq!(
            c(&refused(ConnectReturnCode::BadUserNamePassword), false),
            "mqtt_auth"
        );
        assert_eq!(
            c(&refused(ConnectReturnCode::NotAuthorized), false),
            "mqtt_auth"
        );
        assert_eq!(
            c(&refused(ConnectReturnCode::BadClientId), false),
            "mqtt_refused"
        );
        let io = ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(c(&io, false), "mqtt_connect");
        assert_eq!(c(&io, true), "mqtt_disconnected");
        assert_eq!(c(&ConnectionError::NetworkTimeout, false), "mqtt_connect");
    }

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
