//! The MQTT sink end to end: the real binary against a real mosquitto started by each test on a
//! free loopback port (tests/common/mosquitto.rs), read by a subscriber at QoS 1.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::mosquitto::{Mosquitto, Options, Received, SubOptions, Subscriber};
use common::server::{Reply, Server, free_port, test_ca};
use common::*;
use rumqttc::QoS;
use serde_json::{Value, json};

const KEY: &str = "sk-hark-test-0123456789abcdef";
const PASSWORD: &str = "correct-horse-battery-staple";
const WAIT: Duration = Duration::from_secs(60);
const OFFLINE: &str = r#"{"state":"offline"}"#;
const EVENT: &str = "hark/kiosk-1/event";
const TRANSCRIPT: &str = "hark/kiosk-1/transcript";
const STATUS: &str = "hark/kiosk-1/status";
const SPEAKING: &str = "hark/kiosk-1/speaking";

const SENTENCES: [&str; 3] = [
    "The kitchen lights are on.",
    "Please lock the front door now.",
    "Remind me to water the plants tomorrow.",
];

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/hello.wav")
}

/// Config overrides for a run that publishes to `url` as device kiosk-1.
fn mqtt_args(spool: &Path, url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("spool.dir={:?}", spool.display().to_string()),
        "output.status_interval_s=0".into(),
        "device_id=\"kiosk-1\"".into(),
        format!("output.mqtt.url={url:?}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.into_iter()
        .flat_map(|a| ["-s".to_owned(), a])
        .collect()
}

fn lines(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn payloads<'a>(got: &'a [Received], topic: &str) -> Vec<&'a str> {
    got.iter()
        .filter(|r| r.topic == topic)
        .map(|r| r.payload.as_str())
        .collect()
}

fn is_offline(r: &Received) -> bool {
    r.topic == STATUS && r.payload == OFFLINE
}

fn assert_no_secret(text: &str, secret: &str) {
    for i in 0..=secret.len() - 8 {
        let piece = &secret[i..i + 8];
        assert!(!text.contains(piece), "a secret leaked ({piece}):\n{text}");
    }
}

/// Speech, then enough silence (1.5 s) for the VAD to close the utterance.
fn utterance(text: &str, dir: &Path) -> Vec<i16> {
    let mut samples = vec![0i16; RATE as usize / 2];
    samples.extend(speech(text, dir));
    samples.extend(vec![0i16; RATE as usize * 3 / 2]);
    samples
}

#[test]
fn transcripts_and_every_event_reach_the_broker_in_order_at_qos_1() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), &Options::default());
    let sub = Subscriber::connect(
        &broker,
        &["hark/kiosk-1/#", "homeassistant/#"],
        &SubOptions::default(),
    );
    let pieces: Vec<Vec<i16>> = SENTENCES.iter().map(|s| speech(s, dir.path())).collect();
    let input = dir.path().join("three.wav");
    write_wav(&input, &timeline(&pieces, 1500, 800, 33.0).samples, RATE, 1);
    let texts = ["first", "second", "third"];
    let server = Server::start(None, move |_, n| {
        Reply::Json(200, json!({ "text": texts[n.min(2)] }).to_string())
    });

    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(mqtt_args(
        &dir.path().join("spool"),
        &broker.url(),
        &[
            &format!("transcribe.endpoint={:?}", server.url()),
            "transcribe.api_key_env=\"HARK_TEST_KEY\"",
            "output.mqtt.homeassistant_discovery=true",
        ],
    ));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_env(&refs, &[("HARK_TEST_KEY", KEY)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = lines(&out.stdout);

    // hark published everything it emitted before it stopped, then its offline status.
    let mut got = Vec::new();
    sub.wait_for(&mut got, WAIT, is_offline);
    assert_eq!(
        payloads(&got, EVENT),
        stdout,
        "the event topic has every line, in order"
    );
    let transcripts: Vec<&String> = stdout
        .iter()
        .filter(|l| l.contains(r#""type":"transcript""#))
        .collect();
    assert_eq!(payloads(&got, TRANSCRIPT), transcripts);
    let said: Vec<String> = payloads(&got, TRANSCRIPT)
        .iter()
        .map(|p| {
            serde_json::from_str::<Value>(p).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(said, texts);
    for r in got.iter().filter(|r| r.topic.starts_with("hark/")) {
        assert_eq!(r.qos, QoS::AtLeastOnce, "{r:?}");
    }
    // Status: online at connect, each status event, offline at the clean stop.
    let last_status = stdout
        .iter()
        .rfind(|l| l.contains(r#""type":"status""#))
        .expect("a status event");
    assert_eq!(
        payloads(&got, STATUS),
        [r#"{"state":"online"}"#, last_status.as_str(), OFFLINE]
    );
    assert_eq!(
        Subscriber::retained(&broker, STATUS, &SubOptions::default()).payload,
        OFFLINE
    );

    // Home Assistant: two entities of one device, available while hark is online.
    let config_topic = "homeassistant/sensor/hark_kiosk-1/transcript/config";
    let sensor = Subscriber::retained(&broker, config_topic, &SubOptions::default());
    assert_eq!(payloads(&got, config_topic), [sensor.payload.as_str()]);
    let sensor: Value = serde_json::from_str(&sensor.payload).unwrap();
    assert_eq!(sensor["state_topic"], TRANSCRIPT);
    assert_eq!(sensor["json_attributes_topic"], TRANSCRIPT);
    assert_eq!(sensor["value_template"], "{{ value_json.text[:255] }}");
    assert_eq!(sensor["unique_id"], "hark_kiosk-1_transcript");
    assert_eq!(sensor["availability"][0]["topic"], STATUS);
    assert_eq!(sensor["device"]["identifiers"][0], "hark_kiosk-1");
    let speaking = got
        .iter()
        .find(|r| r.topic == "homeassistant/binary_sensor/hark_kiosk-1/speaking/config")
        .expect("the speaking sensor's discovery config");
    let speaking: Value = serde_json::from_str(&speaking.payload).unwrap();
    assert_eq!(speaking["state_topic"], SPEAKING);
    assert_eq!(speaking["device"], sensor["device"]);
    let mut expected = vec!["OFF"];
    expected.extend(["ON", "OFF"].repeat(3));
    assert_eq!(payloads(&got, SPEAKING), expected);
    assert_eq!(
        Subscriber::retained(&broker, SPEAKING, &SubOptions::default()).payload,
        "OFF"
    );
}

#[test]
fn tls_with_a_test_ca_and_a_password_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let login = Some(("hark".to_owned(), PASSWORD.to_owned()));
    let options = Options {
        tls: Some(ca.clone()),
        login: login.clone(),
        ..Options::default()
    };
    let broker = Mosquitto::start(dir.path(), &options);
    assert!(broker.url().starts_with("mqtts://"));
    let sub_options = SubOptions {
        login,
        ca: Some(ca.ca_pem.clone()),
        ..SubOptions::default()
    };
    let sub = Subscriber::connect(&broker, &["hark/kiosk-1/#"], &sub_options);
    let password_file = dir.path().join("mqtt-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let ca_file = format!("output.mqtt.ca_file={:?}", ca.ca_pem.display().to_string());
    let pw = format!(
        "output.mqtt.password_file={:?}",
        password_file.display().to_string()
    );
    let run_with = |extra: &[&str]| -> Output {
        let mut args = vec![
            "--record-only".to_owned(),
            "-i".into(),
            sample().display().to_string(),
            // Trace logs of every crate must not show the password either.
            "-vv".into(),
        ];
        let mut settings = vec!["output.mqtt.username=\"hark\"", pw.as_str()];
        settings.extend(extra);
        args.extend(mqtt_args(
            &dir.path().join("spool"),
            &broker.url(),
            &settings,
        ));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&refs);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let all = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert_no_secret(&all, PASSWORD);
        out
    };

    let out = run_with(&[&ca_file]);
    let mut got = Vec::new();
    sub.wait_for(&mut got, WAIT, is_offline);
    assert_eq!(payloads(&got, EVENT), lines(&out.stdout));
    assert_eq!(payloads(&got, STATUS)[0], r#"{"state":"online"}"#);

    // Without the CA the broker's certificate is not trusted: an error event, and hark goes on.
    let mut args = vec!["--record-only".to_owned(), "-i".into(), "-".into()];
    args.extend(mqtt_args(
        &dir.path().join("spool"),
        &broker.url(),
        &["output.mqtt.username=\"hark\"", &pw],
    ));
    let mut cmd = hark();
    cmd.args(&args).stdin(Stdio::piped());
    let mut running = Running::spawn(cmd);
    let mut seen = Vec::new();
    let error = running.wait_for(&mut seen, WAIT, |e| e["type"] == "error");
    assert_eq!(error["code"], "mqtt_tls");
    assert_eq!(error["stage"], "sink");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("UnknownIssuer"), "{message}");
    write_stdin(&mut running.child, &utterance(SENTENCES[0], dir.path()));
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    drop(running.child.stdin.take());
    let (status, _, stderr) = running.finish(WAIT);
    assert!(status.success(), "{stderr}");
}

#[test]
fn a_wrong_password_is_a_clear_error_once_and_hark_retries_until_the_file_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let login = Some(("hark".to_owned(), PASSWORD.to_owned()));
    let options = Options {
        login: login.clone(),
        ..Options::default()
    };
    let broker = Mosquitto::start(dir.path(), &options);
    let sub_options = SubOptions {
        login,
        ..SubOptions::default()
    };
    let sub = Subscriber::connect(&broker, &["hark/kiosk-1/#"], &sub_options);
    let password_file = dir.path().join("mqtt-password");
    let wrong = "Xq7Zk29pWm41Rt";
    std::fs::write(&password_file, wrong).unwrap();
    let mut args = vec!["--record-only".to_owned(), "-i".into(), "-".into()];
    args.extend(mqtt_args(
        &dir.path().join("spool"),
        &broker.url(),
        &[
            "output.mqtt.username=\"hark\"",
            &format!(
                "output.mqtt.password_file={:?}",
                password_file.display().to_string()
            ),
        ],
    ));
    let mut cmd = hark();
    cmd.args(&args).stdin(Stdio::piped());
    let mut running = Running::spawn(cmd);

    let mut seen = Vec::new();
    let error = running.wait_for(&mut seen, WAIT, |e| e["type"] == "error");
    assert_eq!(error["code"], "mqtt_auth", "{error}");
    assert_eq!(error["stage"], "sink");
    assert_eq!(error["retrying"], true);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("refused the login") && message.contains("output.mqtt.password_file"),
        "{message}"
    );
    // It keeps trying, with backoff (0.5 s, 1 s, 2 s): three more refusals.
    let refused = |l: &str| l.contains("disconnected, not authorised");
    broker.wait_log(4, WAIT, refused);
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let mut got = Vec::new();
    sub.wait_for(&mut got, WAIT, |r| {
        r.topic == STATUS && r.payload.contains(r#""state":"online""#)
    });
    write_stdin(&mut running.child, &utterance(SENTENCES[0], dir.path()));
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    sub.wait_for(&mut got, WAIT, |r| {
        r.topic == EVENT && r.payload.contains(r#""type":"speech_end""#)
    });
    drop(running.child.stdin.take());
    let (status, rest, stderr) = running.finish(WAIT);
    assert!(status.success(), "{stderr}");
    seen.extend(rest);
    // One error event and one warning for the whole outage, however many attempts it took.
    let auth: Vec<&Value> = seen.iter().filter(|e| e["code"] == "mqtt_auth").collect();
    assert_eq!(auth.len(), 1, "{seen:#?}");
    assert_eq!(stderr.matches("refused the login").count(), 1, "{stderr}");
    assert!(stderr.contains("connected to mqtt://127.0.0.1"), "{stderr}");
    let all = serde_json::to_string(&seen).unwrap() + &stderr;
    assert_no_secret(&all, PASSWORD);
    assert_no_secret(&all, wrong);
}

/// Wait for the `speech_end` on hark's stdout that follows the `speech_start` of a new utterance.
fn spoken(running: &Running, seen: &mut Vec<Value>) -> Value {
    running.wait_for(seen, WAIT, |e| e["type"] == "speech_end")
}

/// The next `speech_end` of utterance `id` on the event topic.
fn published(sub: &Subscriber, got: &mut Vec<Received>, end: &Value) {
    let id = end["utterance"].as_str().unwrap().to_owned();
    sub.wait_for(got, WAIT, |r| {
        r.topic == EVENT && r.payload.contains(r#""type":"speech_end""#) && r.payload.contains(&id)
    });
}

#[test]
fn across_broker_restarts_every_event_is_published_in_order_and_none_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    // The broker keeps the subscriber's session across its restarts, so that the subscriber
    // misses nothing hark publishes before it is back; hark itself gets no session (it connects
    // with a clean one and resends what the broker did not acknowledge).
    let options = Options {
        persistence: true,
        ..Options::default()
    };
    let mut broker = Mosquitto::start(dir.path(), &options);
    let sub_options = SubOptions {
        session: Some("test-restart".into()),
        ..SubOptions::default()
    };
    let sub = Subscriber::connect(&broker, &[EVENT], &sub_options);
    let words = utterance(SENTENCES[1], dir.path());
    let mut args = vec!["--record-only".to_owned(), "-i".into(), "-".into()];
    args.extend(mqtt_args(&dir.path().join("spool"), &broker.url(), &[]));
    let mut cmd = hark();
    cmd.args(&args).stdin(Stdio::piped());
    let mut running = Running::spawn(cmd);
    let mut seen = Vec::new();
    let mut got = Vec::new();

    // A: the broker is up.
    write_stdin(&mut running.child, &words);
    let end = spoken(&running, &mut seen);
    published(&sub, &mut got, &end);

    // B: a clean broker stop; hark sees the connection close at once and queues.
    broker.stop();
    running.wait_for(&mut seen, WAIT, |e| e["code"] == "mqtt_disconnected");
    write_stdin(&mut running.child, &words);
    let end = spoken(&running, &mut seen);
    broker.spawn();
    published(&sub, &mut got, &end);

    // C: the broker hangs (takes publishes into its socket, acknowledges none), then dies:
    // what hark handed over and never saw acknowledged is published again after the restart.
    broker.freeze();
    write_stdin(&mut running.child, &words);
    let end = spoken(&running, &mut seen);
    broker.kill();
    running.wait_for(&mut seen, WAIT, |e| e["code"] == "mqtt_disconnected");
    broker.spawn();
    published(&sub, &mut got, &end);

    // D: and on it goes.
    write_stdin(&mut running.child, &words);
    let end = spoken(&running, &mut seen);
    published(&sub, &mut got, &end);
    drop(running.child.stdin.take());
    let (status, rest, stderr) = running.finish(WAIT);
    assert!(status.success(), "{stderr}");
    seen.extend(rest);
    let last = seen.last().expect("events").clone();
    assert_eq!(last["type"], "status");
    let last_seq = last["seq"].as_u64().unwrap();
    sub.wait_for(&mut got, WAIT, |r| {
        serde_json::from_str::<Value>(&r.payload).unwrap()["seq"] == last_seq
    });

    let stdout: Vec<String> = seen.iter().map(|e| e.to_string()).collect();
    // At least once: a publish whose acknowledgement died with the broker comes again after the
    // reconnect. Every event arrives, first occurrences in stdout's order.
    let mut firsts = std::collections::BTreeSet::new();
    let published: Vec<String> = payloads(&got, EVENT)
        .iter()
        .map(|p| serde_json::from_str::<Value>(p).unwrap())
        .filter(|v| firsts.insert(v["seq"].as_u64().unwrap()))
        .map(|v| v.to_string())
        .collect();
    assert_eq!(published, stdout, "stderr: {stderr}");
    assert_eq!(of_type(&seen, "speech_end").len(), 4);
    // C went through the resend: hark had handed its publishes over when the broker died.
    assert!(stderr.contains("not acknowledged go out again"), "{stderr}");
}

#[test]
fn kill_9_leaves_the_retained_status_offline_by_the_last_will() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), &Options::default());
    let sub = Subscriber::connect(&broker, &[STATUS], &SubOptions::default());
    let mut args = vec!["--record-only".to_owned(), "-i".into(), "-".into()];
    args.extend(mqtt_args(&dir.path().join("spool"), &broker.url(), &[]));
    let mut cmd = hark();
    cmd.args(&args).stdin(Stdio::piped());
    let running = Running::spawn(cmd);
    let mut got = Vec::new();
    sub.wait_for(&mut got, WAIT, |r| r.payload == r#"{"state":"online"}"#);
    assert_eq!(
        Subscriber::retained(&broker, STATUS, &SubOptions::default()).payload,
        r#"{"state":"online"}"#
    );
    running.signal(libc::SIGKILL);
    sub.wait_for(&mut got, WAIT, is_offline);
    assert_eq!(
        Subscriber::retained(&broker, STATUS, &SubOptions::default()).payload,
        OFFLINE
    );
    let (status, _, _) = running.finish(WAIT);
    assert!(!status.success());
}

#[test]
fn while_no_broker_answers_the_queue_drops_its_oldest_counts_them_and_never_holds_hark_up() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let mut args = vec!["--record-only".to_owned(), "-i".into(), "-".into()];
    args.extend(mqtt_args(
        &dir.path().join("spool"),
        &url,
        &["output.mqtt.queue=2"],
    ));
    let mut cmd = hark();
    cmd.args(&args).stdin(Stdio::piped());
    let mut running = Running::spawn(cmd);
    let mut seen = Vec::new();
    let error = running.wait_for(&mut seen, WAIT, |e| e["type"] == "error");
    assert_eq!(error["code"], "mqtt_connect", "{error}");
    assert_eq!(error["retrying"], true);
    let words = utterance(SENTENCES[2], dir.path());
    for _ in 0..2 {
        write_stdin(&mut running.child, &words);
        running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    }
    let closed = Instant::now();
    drop(running.child.stdin.take());
    let (status, rest, stderr) = running.finish(WAIT);
    assert!(status.success(), "{stderr}");
    // Nothing to wait for when no broker is connected.
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "{:?}",
        closed.elapsed()
    );
    seen.extend(rest);
    // One report for the whole outage, however many attempts.
    assert_eq!(of_type(&seen, "error").len(), 1, "{seen:#?}");
    // Five lines came before the last status (the error, two starts, two ends); the queue keeps
    // two. The status is made while the sink thread may still be taking the last of them in.
    let last = seen.last().unwrap();
    assert_eq!(last["type"], "status");
    let dropped = last["events_dropped"].as_u64().unwrap();
    assert!((1..=3).contains(&dropped), "{dropped}");
}

#[test]
fn a_bad_mqtt_setup_exits_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let missing = dir.path().join("missing-password");
    for (extra, key) in [
        (
            vec![
                "output.mqtt.username=\"hark\"".to_owned(),
                format!(
                    "output.mqtt.password_file={:?}",
                    missing.display().to_string()
                ),
            ],
            "output.mqtt.password_file",
        ),
        (
            vec![format!(
                "output.mqtt.ca_file={:?}",
                missing.display().to_string()
            )],
            "output.mqtt.ca_file",
        ),
        (
            vec!["output.mqtt.topic_prefix=\"a/#\"".to_owned()],
            "output.mqtt.topic_prefix",
        ),
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut args = vec![
            "--record-only".to_owned(),
            "-i".into(),
            sample().display().to_string(),
        ];
        args.extend(mqtt_args(&spool, "mqtts://127.0.0.1:1", &extra));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&refs);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(key), "{stderr}");
    }
    // A bad URL is refused, and a password in it not repeated.
    let file = dir.path().join("hark.toml");
    std::fs::write(
        &file,
        "[output.mqtt]\nurl = \"mqtt://hark:hunter2@host:65536\"\n",
    )
    .unwrap();
    let out = run(&["check-config", &file.display().to_string()]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("output.mqtt.url") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}
