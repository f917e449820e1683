//! The MQTT connection thread: it drives rumqttc's event loop, reconnects with backoff, reports
//! connection failures once per outage as `error` events, and tells the outbox what the broker
//! acknowledged.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{Client, ConnectReturnCode, Connection, ConnectionError, Event, Outgoing, Packet};

use super::{Outbox, Relay, STABLE, pump, read_password};
use crate::sink::Reporter;

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
pub(super) struct Link {
    connection: Connection,
    client: Client,
    shared: Arc<Relay>,
    broker: String,
    reporter: Reporter,
    /// Reports made before the daemon's event handle existed; emitted once it does.
    held: Vec<(&'static str, String)>,
    /// The user and password file, read again after the broker refuses the login.
    login: Option<(String, Option<PathBuf>)>,
}

impl Link {
    pub(super) fn new(
        connection: Connection,
        client: Client,
        shared: Arc<Relay>,
        broker: String,
        reporter: Reporter,
        login: Option<(String, Option<PathBuf>)>,
    ) -> Link {
        Link {
            connection,
            client,
            shared,
            broker,
            reporter,
            held: Vec::new(),
            login,
        }
    }

    fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Drive rumqttc's event loop until hark stops. `Connection::iter()` would hold the connection
    /// borrowed; `recv()` is what its `next()` calls, and leaves the event loop reachable between
    /// events to clear what a dead connection left in it.
    pub(super) fn run(&mut self) {
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
pub(super) fn apply(outbox: &mut Outbox, event: &Event) -> bool {
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
    use std::io;

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
}
