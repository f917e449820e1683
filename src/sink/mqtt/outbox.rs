//! The MQTT sink's bookkeeping, without any I/O: which lines wait for the broker (bounded, the
//! oldest dropped), the publishes each line becomes, which publishes rumqttc holds and which the
//! broker has acknowledged, and what goes first after a (re)connect.
//!
//! Why hark keeps its own copy of every publish until the broker acknowledges it: rumqttc keeps
//! unacknowledged publishes across a reconnect only when the broker resumes the session
//! (`session_present`); otherwise it clears them (`EventLoop::poll`: `if !connack.session_present
//! { self.pending.clear() }`). A broker restarted without persistence never resumes a session, so
//! relying on rumqttc would lose what was in flight. hark connects with a clean session and
//! resends, in order, whatever was not acknowledged: at least once, never reordered.
//!
//! The connection thread feeds this state machine rumqttc's events ([`Outbox::sent`],
//! [`Outbox::acked`], ...); the sink thread feeds it lines ([`Outbox::push`]); both take the next
//! publishes with [`Outbox::next_publish`] and hand them to rumqttc.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::json;

use crate::event::Line;

/// The retained status payload the broker publishes for hark when the connection dies (last will),
/// and that hark publishes itself when it stops.
pub(crate) const OFFLINE: &str = r#"{"state":"offline"}"#;

/// One MQTT publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Msg {
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Arc<str>,
    pub(crate) retain: bool,
    /// Published on connect (status, discovery): made afresh on each connect, never resent.
    transient: bool,
}

impl Msg {
    fn new(topic: &Arc<str>, payload: Arc<str>, retain: bool) -> Msg {
        Msg {
            topic: topic.clone(),
            payload,
            retain,
            transient: false,
        }
    }
}

/// The topics of one device, and the Home Assistant discovery configs when asked for.
#[derive(Debug, Clone)]
pub(crate) struct Topics {
    pub(crate) event: Arc<str>,
    pub(crate) transcript: Arc<str>,
    pub(crate) status: Arc<str>,
    pub(crate) speaking: Arc<str>,
    /// (config topic, config) pairs, published retained on connect; empty without discovery.
    pub(crate) discovery: Vec<(Arc<str>, Arc<str>)>,
}

impl Topics {
    /// `{prefix}/{device}/...` (just `{device}/...` with an empty prefix).
    pub(crate) fn new(prefix: &str, device: &str, discovery: bool, qos: u8) -> Topics {
        let prefix = prefix.trim_end_matches('/');
        let base = if prefix.is_empty() {
            device.to_owned()
        } else {
            format!("{prefix}/{device}")
        };
        let topic = |name: &str| -> Arc<str> { format!("{base}/{name}").into() };
        let mut topics = Topics {
            event: topic("event"),
            transcript: topic("transcript"),
            status: topic("status"),
            speaking: topic("speaking"),
            discovery: Vec::new(),
        };
        if discovery {
            topics.discovery = home_assistant(&topics, device, qos);
        }
        topics
    }

    fn ha(&self) -> bool {
        !self.discovery.is_empty()
    }
}

/// Home Assistant's node id for a device: `hark_{device}` with anything but `[A-Za-z0-9_-]`
/// replaced by `_`.
pub(crate) fn node_id(device: &str) -> String {
    format!("hark_{device}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// MQTT discovery configs: a sensor with the last transcript (its text as the state, the whole
/// event as attributes) and a binary sensor that is on while someone speaks.
fn home_assistant(topics: &Topics, device: &str, qos: u8) -> Vec<(Arc<str>, Arc<str>)> {
    let node = node_id(device);
    let device_block = json!({
        "identifiers": [node],
        "name": format!("hark {device}"),
        "manufacturer": "hark",
        "model": "hark voice capture",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    // `degraded` (a missing microphone, transcription down) is still a running hark: available.
    let availability = json!([{
        "topic": &*topics.status,
        "value_template": "{{ 'offline' if value_json.state == 'offline' else 'online' }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }]);
    let sensor = json!({
        "name": "Transcript",
        "unique_id": format!("{node}_transcript"),
        "state_topic": &*topics.transcript,
        // Home Assistant refuses states over 255 characters.
        "value_template": "{{ value_json.text[:255] }}",
        "json_attributes_topic": &*topics.transcript,
        "icon": "mdi:microphone-message",
        "availability": availability,
        "qos": qos,
        "device": device_block,
    });
    let speaking = json!({
        "name": "Speaking",
        "unique_id": format!("{node}_speaking"),
        "state_topic": &*topics.speaking,
        "payload_on": "ON",
        "payload_off": "OFF",
        "device_class": "sound",
        "availability": availability,
        "qos": qos,
        "device": device_block,
    });
    vec![
        (
            format!("homeassistant/sensor/{node}/transcript/config").into(),
            sensor.to_string().into(),
        ),
        (
            format!("homeassistant/binary_sensor/{node}/speaking/config").into(),
            speaking.to_string().into(),
        ),
    ]
}

/// Where a handed-over publish is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flight {
    /// In rumqttc's request channel.
    Handed,
    /// Written with this packet id; waiting for its PUBACK (QoS 1) or PUBCOMP (QoS 2).
    Sent(u16),
    /// rumqttc holds it until the broker acknowledges an older publish with the same id.
    Collided(u16),
}

/// Lines and publishes on their way to the broker.
#[derive(Debug)]
pub(crate) struct Outbox {
    topics: Topics,
    /// Most lines kept in `waiting`.
    bound: usize,
    /// Most publishes handed to rumqttc and not yet acknowledged.
    window: usize,
    /// Lines not yet turned into publishes, oldest first.
    waiting: VecDeque<Line>,
    /// Publishes to hand over next, in order: on-connect ones, then unacknowledged ones of the
    /// last connection, then those of the line being handed over.
    ready: VecDeque<Msg>,
    /// Handed over during this connection and not acknowledged, in the order handed.
    inflight: VecDeque<(Msg, Flight)>,
    connected: bool,
    /// No connection attempt has ended yet (hark is still making its first connection).
    first_attempt: bool,
    /// The last `status` line taken in: what goes on the status topic at connect.
    last_status: Option<Arc<str>>,
    /// Whether the lines handed over so far leave someone speaking.
    speaking: bool,
}

impl Outbox {
    pub(crate) fn new(topics: Topics, bound: usize, window: usize) -> Outbox {
        Outbox {
            topics,
            bound: bound.max(1),
            window: window.max(1),
            waiting: VecDeque::new(),
            ready: VecDeque::new(),
            inflight: VecDeque::new(),
            connected: false,
            first_attempt: true,
            last_status: None,
            speaking: false,
        }
    }

    pub(crate) fn topics(&self) -> &Topics {
        &self.topics
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// Connected, or still making the first connection: worth waiting for when hark stops
    /// (a short run must not end before its first connection had a chance).
    pub(crate) fn may_deliver(&self) -> bool {
        self.connected || self.first_attempt
    }

    /// Take a line in. Returns how many lines were dropped (the oldest) to stay within the bound.
    pub(crate) fn push(&mut self, line: &Line) -> u64 {
        if line.kind == "status" {
            self.last_status = Some(line.json.clone());
        }
        let mut dropped = 0;
        while self.waiting.len() >= self.bound {
            self.waiting.pop_front();
            dropped += 1;
        }
        self.waiting.push_back(line.clone());
        dropped
    }

    /// Lines or publishes wait to be handed over.
    pub(crate) fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.ready.is_empty()
    }

    /// Everything taken in has been acknowledged (or written, at QoS 0).
    pub(crate) fn is_idle(&self) -> bool {
        !self.has_work() && self.inflight.is_empty()
    }

    /// Lines waiting, publishes ready, publishes in flight.
    pub(crate) fn lens(&self) -> (usize, usize, usize) {
        (self.waiting.len(), self.ready.len(), self.inflight.len())
    }

    /// The broker accepted the connection (CONNACK, a new session): the retained status, the
    /// discovery configs and the speaking state go first, then what the last connection left
    /// unacknowledged, then the waiting lines.
    pub(crate) fn connected(&mut self) {
        self.connected = true;
        self.first_attempt = false;
        let mut first = vec![self.online()];
        if self.topics.ha() {
            for (topic, config) in &self.topics.discovery {
                first.push(Msg::new(topic, config.clone(), true));
            }
            let state = if self.speaking { "ON" } else { "OFF" };
            first.push(Msg::new(&self.topics.speaking, state.into(), true));
        }
        for mut msg in first.into_iter().rev() {
            msg.transient = true;
            self.ready.push_front(msg);
        }
    }

    /// The connection is gone, and with it whatever rumqttc held: every publish not acknowledged
    /// goes back, in order, ahead of the rest. Publishes made for the connect are dropped (the
    /// next connect makes its own).
    /// Returns how many publishes go back.
    pub(crate) fn disconnected(&mut self) -> usize {
        self.connected = false;
        self.first_attempt = false;
        self.ready.retain(|m| !m.transient);
        let mut back = 0;
        while let Some((msg, _)) = self.inflight.pop_back() {
            if !msg.transient {
                self.ready.push_front(msg);
                back += 1;
            }
        }
        back
    }

    /// The next publish to hand to rumqttc, if connected and the window has room. It counts as
    /// handed over; give it back with [`Outbox::refused`] if rumqttc does not take it.
    pub(crate) fn next_publish(&mut self) -> Option<Msg> {
        if !self.connected || self.inflight.len() >= self.window {
            return None;
        }
        while self.ready.is_empty() {
            let line = self.waiting.pop_front()?;
            self.expand(&line);
        }
        let msg = self.ready.pop_front()?;
        self.inflight.push_back((msg.clone(), Flight::Handed));
        Some(msg)
    }

    /// rumqttc did not take the publish [`Outbox::next_publish`] gave last: it goes first again.
    pub(crate) fn refused(&mut self) {
        if let Some((msg, _)) = self.inflight.pop_back() {
            self.ready.push_front(msg);
        }
    }

    /// rumqttc wrote a publish (`Outgoing::Publish`). At QoS 0 that is all there is to it.
    pub(crate) fn sent(&mut self, pkid: u16) {
        if pkid == 0 {
            if let Some(i) = self.position(Flight::Handed) {
                self.inflight.remove(i);
            }
            return;
        }
        // One that waited out a packet id collision keeps its place.
        let i = self
            .position(Flight::Collided(pkid))
            .or_else(|| self.position(Flight::Handed));
        if let Some(i) = i {
            self.inflight[i].1 = Flight::Sent(pkid);
        }
    }

    /// rumqttc holds the next publish until `pkid` is acknowledged (`Outgoing::AwaitAck`).
    pub(crate) fn collided(&mut self, pkid: u16) {
        if let Some(i) = self.position(Flight::Handed) {
            self.inflight[i].1 = Flight::Collided(pkid);
        }
    }

    /// The broker acknowledged `pkid` (PUBACK at QoS 1, PUBCOMP at QoS 2).
    pub(crate) fn acked(&mut self, pkid: u16) {
        if let Some(i) = self.position(Flight::Sent(pkid)) {
            self.inflight.remove(i);
        }
    }

    fn position(&self, flight: Flight) -> Option<usize> {
        self.inflight.iter().position(|(_, f)| *f == flight)
    }

    /// The publishes of one line: always the event topic; transcripts also on their own topic,
    /// status retained on the status topic, and with discovery the speaking state.
    fn expand(&mut self, line: &Line) {
        let t = &self.topics;
        self.ready
            .push_back(Msg::new(&t.event, line.json.clone(), false));
        match line.kind {
            "transcript" => self
                .ready
                .push_back(Msg::new(&t.transcript, line.json.clone(), false)),
            "status" => self
                .ready
                .push_back(Msg::new(&t.status, line.json.clone(), true)),
            "speech_start" if t.ha() => {
                self.speaking = true;
                self.ready
                    .push_back(Msg::new(&t.speaking, "ON".into(), true));
            }
            "speech_end" | "dropped" if t.ha() => {
                self.speaking = false;
                self.ready
                    .push_back(Msg::new(&t.speaking, "OFF".into(), true));
            }
            _ => {}
        }
    }

    /// The retained status at connect: the last status line with `"state":"online"` (a
    /// `degraded` one as it is), or `{"state":"online"}` before the first.
    fn online(&self) -> Msg {
        let payload: Arc<str> = match &self.last_status {
            None => r#"{"state":"online"}"#.into(),
            // hark's states are online, degraded and offline; a quote inside a string value is
            // escaped, so the pattern can only be the field itself. Replacing text keeps the
            // line's field order, which parsing and printing it again would not.
            Some(json) => json
                .replacen(r#""state":"offline""#, r#""state":"online""#, 1)
                .into(),
        };
        Msg::new(&self.topics.status, payload, true)
    }

    /// The retained status hark publishes when it stops.
    pub(crate) fn offline(&self) -> Msg {
        let mut msg = Msg::new(&self.topics.status, OFFLINE.into(), true);
        msg.transient = true;
        msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn line(kind: &'static str, seq: u64) -> Line {
        let json = match kind {
            "status" => format!(r#"{{"v":1,"type":"status","seq":{seq},"state":"offline"}}"#),
            _ => format!(r#"{{"v":1,"type":"{kind}","seq":{seq}}}"#),
        };
        Line {
            kind,
            seq,
            json: json.into(),
            text: None,
        }
    }

    fn outbox(bound: usize, window: usize, ha: bool) -> Outbox {
        Outbox::new(Topics::new("hark", "kiosk-1", ha, 1), bound, window)
    }

    /// Hand over everything possible; returns (topic, payload) of each.
    fn drain(o: &mut Outbox) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while let Some(m) = o.next_publish() {
            out.push((m.topic.to_string(), m.payload.to_string()));
        }
        out
    }

    fn seqs(msgs: &[(String, String)], topic: &str) -> Vec<u64> {
        msgs.iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| {
                serde_json::from_str::<Value>(p).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn nothing_is_handed_over_while_disconnected_and_the_oldest_lines_overflow() {
        let mut o = outbox(3, 10, false);
        let dropped: u64 = (0..5).map(|i| o.push(&line("speech_start", i))).sum();
        assert_eq!(dropped, 2);
        assert_eq!(o.next_publish(), None);
        o.connected();
        let out = drain(&mut o);
        assert_eq!(out[0].0, "hark/kiosk-1/status");
        assert_eq!(out[0].1, r#"{"state":"online"}"#);
        assert_eq!(seqs(&out, "hark/kiosk-1/event"), [2, 3, 4]);
    }

    #[test]
    fn each_line_goes_to_the_event_topic_and_to_its_own() {
        let mut o = outbox(10, 10, false);
        o.connected();
        o.push(&line("transcript", 0));
        o.push(&line("status", 1));
        o.push(&line("speech_start", 2));
        let out = drain(&mut o);
        let topics: Vec<&str> = out.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                "hark/kiosk-1/status",
                "hark/kiosk-1/event",
                "hark/kiosk-1/transcript",
                "hark/kiosk-1/event",
                "hark/kiosk-1/status",
                "hark/kiosk-1/event",
            ]
        );
        assert_eq!(out[1].1, out[2].1);
    }

    #[test]
    fn unacknowledged_publishes_are_resent_in_order_after_a_reconnect() {
        let mut o = outbox(100, 100, false);
        o.connected();
        for i in 0..6 {
            o.push(&line("speech_start", i));
        }
        let first = drain(&mut o);
        assert_eq!(first.len(), 7);
        // rumqttc wrote the status and events 0..=3 (packet ids 1..=5); the broker acked 1..=3.
        for pkid in 1..=5 {
            o.sent(pkid);
        }
        for pkid in 1..=3 {
            o.acked(pkid);
        }
        // Events 4 and 5 were still in rumqttc's channel when the connection dropped.
        o.disconnected();
        assert_eq!(o.next_publish(), None);
        o.push(&line("speech_end", 6));
        o.connected();
        let again = drain(&mut o);
        assert_eq!(again[0].0, "hark/kiosk-1/status");
        assert_eq!(seqs(&again, "hark/kiosk-1/event"), [2, 3, 4, 5, 6]);
        for (pkid, _) in (6..).zip(&again) {
            o.sent(pkid);
        }
        for (pkid, _) in (6..).zip(&again) {
            o.acked(pkid);
        }
        assert!(o.is_idle());
    }

    #[test]
    fn the_window_bounds_what_rumqttc_holds() {
        let mut o = outbox(100, 3, false);
        for i in 0..5 {
            o.push(&line("speech_start", i));
        }
        o.connected();
        assert_eq!(drain(&mut o).len(), 3);
        o.sent(1);
        o.acked(1);
        assert_eq!(drain(&mut o).len(), 1);
        assert_eq!(o.lens(), (2, 0, 3));
    }

    #[test]
    fn qos_0_publishes_are_done_once_written() {
        let mut o = outbox(10, 10, false);
        o.connected();
        o.push(&line("speech_start", 0));
        assert_eq!(drain(&mut o).len(), 2);
        o.sent(0);
        o.sent(0);
        assert!(o.is_idle());
    }

    #[test]
    fn a_stop_waits_only_for_a_connection_or_for_the_first_attempt() {
        let mut o = outbox(10, 10, false);
        assert!(o.may_deliver());
        o.disconnected();
        assert!(!o.may_deliver());
        o.connected();
        assert!(o.may_deliver());
    }

    #[test]
    fn a_refused_publish_goes_first_again() {
        let mut o = outbox(10, 10, false);
        o.connected();
        o.push(&line("speech_start", 0));
        let status = o.next_publish().unwrap();
        o.refused();
        assert_eq!(o.next_publish(), Some(status));
    }

    #[test]
    fn a_collided_publish_keeps_its_place_until_written() {
        let mut o = outbox(10, 10, false);
        o.connected();
        o.push(&line("speech_start", 0));
        drain(&mut o);
        o.sent(1);
        // The event waits for packet id 1, which the broker then acks.
        o.collided(1);
        o.acked(1);
        o.sent(1);
        assert_eq!(o.lens(), (0, 0, 1));
        o.acked(1);
        assert!(o.is_idle());
    }

    #[test]
    fn the_status_at_connect_is_the_last_one_seen_with_state_online_unless_degraded() {
        let mut o = outbox(10, 10, false);
        o.push(&line("status", 7));
        o.connected();
        let out = drain(&mut o);
        assert_eq!(
            out[0].1,
            r#"{"v":1,"type":"status","seq":7,"state":"online"}"#
        );
        let mut o = outbox(10, 10, false);
        let degraded = r#"{"v":1,"type":"status","seq":3,"state":"degraded"}"#;
        o.push(&Line {
            kind: "status",
            seq: 3,
            json: degraded.into(),
            text: None,
        });
        o.connected();
        assert_eq!(drain(&mut o)[0].1, degraded);
    }

    #[test]
    fn connect_messages_are_not_resent_but_made_afresh() {
        let mut o = outbox(10, 10, true);
        o.connected();
        let first = drain(&mut o);
        let topics: Vec<&str> = first.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                "hark/kiosk-1/status",
                "homeassistant/sensor/hark_kiosk-1/transcript/config",
                "homeassistant/binary_sensor/hark_kiosk-1/speaking/config",
                "hark/kiosk-1/speaking",
            ]
        );
        assert_eq!(first[3].1, "OFF");
        o.disconnected();
        o.push(&line("speech_start", 0));
        o.connected();
        let again = drain(&mut o);
        assert_eq!(again.len(), 6);
        assert_eq!(&again[..4], &first[..]);
        assert_eq!(again[5], ("hark/kiosk-1/speaking".into(), "ON".into()));
        o.disconnected();
        o.connected();
        // The speaking state of the lines handed over, then the unacknowledged ON again.
        let third = drain(&mut o);
        assert_eq!(third[3].1, "ON");
        assert_eq!(third.len(), 6);
    }

    #[test]
    fn discovery_configs_point_at_the_device_topics() {
        let t = Topics::new("home/", "Kiosk 1", true, 1);
        assert_eq!(&*t.event, "home/Kiosk 1/event");
        let (topic, config) = &t.discovery[0];
        assert_eq!(
            &**topic,
            "homeassistant/sensor/hark_Kiosk_1/transcript/config"
        );
        let c: Value = serde_json::from_str(config).unwrap();
        assert_eq!(c["state_topic"], "home/Kiosk 1/transcript");
        assert_eq!(c["json_attributes_topic"], "home/Kiosk 1/transcript");
        assert_eq!(c["value_template"], "{{ value_json.text[:255] }}");
        assert_eq!(c["unique_id"], "hark_Kiosk_1_transcript");
        assert_eq!(c["availability"][0]["topic"], "home/Kiosk 1/status");
        assert_eq!(c["device"]["manufacturer"], "hark");
        assert_eq!(c["device"]["identifiers"][0], "hark_Kiosk_1");
        let b: Value = serde_json::from_str(&t.discovery[1].1).unwrap();
        assert_eq!(b["state_topic"], "home/Kiosk 1/speaking");
        assert_eq!(b["device_class"], "sound");
        assert_eq!(&*Topics::new("", "k", false, 0).status, "k/status");
    }
}
