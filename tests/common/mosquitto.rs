//! A real mosquitto broker for the MQTT tests, on a free loopback port with a config the test
//! writes (plain or TLS with a test CA, anonymous or with a password file, with or without
//! persistence), and a subscriber (rumqttc) that collects what the broker delivers.
//!
//! Readiness is awaited, never slept for: the broker's own log line ("mosquitto version ...
//! running") after each start, and the subscriber's SUBACK.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

use super::require;
use super::server::{TestCa, free_port};

/// How long a broker may take to say it is running.
const START_LIMIT: Duration = Duration::from_secs(10);

/// What the broker's config says.
#[derive(Default, Clone)]
pub struct Options {
    /// A TLS listener with the CA's leaf certificate.
    pub tls: Option<TestCa>,
    /// Only this user, with this password (made with `mosquitto_passwd -b -c`); else anonymous.
    pub login: Option<(String, String)>,
    /// Keep sessions and retained messages across a restart (also a kill: saved on every change).
    pub persistence: bool,
}

/// The broker's log, shared with the threads that read its stderr.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A mosquitto process (restartable on the same port); killed on drop.
pub struct Mosquitto {
    pub port: u16,
    tls: bool,
    conf: PathBuf,
    child: Option<Child>,
    starts: usize,
    log: Arc<Log>,
}

impl Mosquitto {
    pub fn start(dir: &Path, options: &Options) -> Mosquitto {
        require("mosquitto", "mosquitto");
        let dir = dir.join(format!("mosquitto-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let port = free_port();
        // As root, mosquitto 2 switches to the `mosquitto` user unless told otherwise, and that
        // user could not read the test's files; as any other user this line does nothing.
        let mut conf =
            format!("user root\nlog_dest stderr\nlog_type all\nlistener {port} 127.0.0.1\n");
        match &options.login {
            Some((user, password)) => {
                require("mosquitto_passwd", "mosquitto");
                let file = dir.join("passwd");
                let ok = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&file)
                    .args([user, password])
                    .status()
                    .expect("mosquitto_passwd runs")
                    .success();
                assert!(ok, "mosquitto_passwd failed");
                conf += &format!("allow_anonymous false\npassword_file {}\n", file.display());
            }
            None => conf += "allow_anonymous true\n",
        }
        if let Some(ca) = &options.tls {
            conf += &format!(
                "certfile {}\nkeyfile {}\n",
                ca.leaf_pem.display(),
                ca.leaf_key.display()
            );
        }
        if options.persistence {
            conf += &format!(
                "persistence true\npersistence_location {}/\nautosave_on_changes true\nautosave_interval 1\n",
                dir.display()
            );
        }
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).expect("write mosquitto.conf");
        let mut broker = Mosquitto {
            port,
            tls: options.tls.is_some(),
            conf: path,
            child: None,
            starts: 0,
            log: Arc::new(Log::default()),
        };
        broker.spawn();
        broker
    }

    /// Start the process again (after [`Mosquitto::stop`] or [`Mosquitto::kill`]).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto starts");
        let stderr = child.stderr.take().expect("mosquitto's stderr");
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.lines.lock().unwrap().push(line);
                log.changed.notify_all();
            }
        });
        self.child = Some(child);
        self.starts += 1;
        let starts = self.starts;
        let running = |l: &str| l.contains("mosquitto version") && l.ends_with("running");
        self.wait_log(starts, START_LIMIT, running);
    }

    /// `mqtt://127.0.0.1:PORT` or `mqtts://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Wait until `n` log lines match `pred`; returns the last of them.
    pub fn wait_log(&self, n: usize, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let lines = self.log.lines.lock().unwrap();
        let (lines, _) = self
            .log
            .changed
            .wait_timeout_while(lines, limit, |l| l.iter().filter(|l| pred(l)).count() < n)
            .unwrap();
        let matching: Vec<&String> = lines.iter().filter(|l| pred(l)).collect();
        assert!(
            matching.len() >= n,
            "mosquitto: expected {n} matching log line(s) within {limit:?}; log:\n{}",
            lines.join("\n")
        );
        matching[n - 1].clone()
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        self.log.lines.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: i32) {
        let child = self.child.as_ref().expect("the broker is running");
        super::kill(child.id() as i32, sig);
    }

    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.wait().expect("wait for mosquitto");
        }
    }

    /// SIGTERM (mosquitto saves its database and closes every connection), and wait for the exit.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        self.reap();
    }

    /// SIGKILL: connections die with the process, nothing is saved.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.reap();
    }

    /// SIGSTOP: the broker keeps its sockets but reads nothing and acknowledges nothing.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One message as the subscriber got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    pub qos: QoS,
    pub retain: bool,
}

/// How the subscriber connects.
#[derive(Default, Clone)]
pub struct SubOptions {
    /// A persistent session (clean_session = false) with this client id, so that messages
    /// published while it is away (a broker restart with persistence) wait for it.
    pub session: Option<String>,
    pub login: Option<(String, String)>,
    pub ca: Option<PathBuf>,
}

/// A client subscribed at QoS 1 to some topics; messages arrive on a channel. It reconnects by
/// itself when the broker goes away.
pub struct Subscriber {
    rx: mpsc::Receiver<Received>,
    client: Client,
    done: Arc<AtomicBool>,
}

impl Subscriber {
    /// Connect and subscribe; returns once the broker acknowledged the subscription.
    pub fn connect(broker: &Mosquitto, topics: &[&str], sub: &SubOptions) -> Subscriber {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = sub.session.clone().unwrap_or_else(|| {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("test-sub-{}-{n}", std::process::id())
        });
        let mut options = MqttOptions::new(id, "127.0.0.1", broker.port);
        options
            .set_clean_session(sub.session.is_none())
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = &sub.login {
            options.set_credentials(user.clone(), password.clone());
        }
        if let Some(ca) = &sub.ca {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).expect("read the CA") {
                roots
                    .add(cert.expect("a CA certificate"))
                    .expect("add the CA");
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        let (client, mut connection) = Client::new(options, 16);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let subscriber = client.clone();
        let done = Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        std::thread::spawn(move || {
            // Payloads of messages the broker may deliver again after its own restart.
            let mut seen = std::collections::HashSet::new();
            while !finished.load(Ordering::Relaxed) {
                match connection.recv() {
                    Err(_) => break,
                    Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                        if !ack.session_present {
                            for t in &topics {
                                let _ = subscriber.try_subscribe(t.clone(), QoS::AtLeastOnce);
                            }
                        }
                    }
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        // A redelivery by the broker (DUP) of something already received is
                        // the broker's doing, not the publisher's.
                        if p.dup && seen.contains(&(p.topic.clone(), payload.clone())) {
                            continue;
                        }
                        seen.insert((p.topic.clone(), payload.clone()));
                        let received = Received {
                            topic: p.topic,
                            payload,
                            qos: p.qos,
                            retain: p.retain,
                        };
                        if tx.send(received).is_err() {
                            break;
                        }
                    }
                    Ok(Ok(_)) => {}
                    // The broker is away: try again soon (this paces reconnects, it does not
                    // wait for anything).
                    Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx.recv_timeout(START_LIMIT).unwrap_or_else(|_| {
            panic!(
                "no SUBACK within {START_LIMIT:?}; broker log:\n{}",
                broker.log()
            )
        });
        Subscriber { rx, client, done }
    }

    /// The next message, or `None` after `limit`.
    pub fn next(&self, limit: Duration) -> Option<Received> {
        self.rx.recv_timeout(limit).ok()
    }

    /// Collect messages until one matches `pred` (returned, and also pushed to `seen`).
    pub fn wait_for(
        &self,
        seen: &mut Vec<Received>,
        limit: Duration,
        pred: impl Fn(&Received) -> bool,
    ) -> Received {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(r) => {
                    seen.push(r.clone());
                    if pred(&r) {
                        return r;
                    }
                }
                Err(_) => panic!(
                    "no matching message within {limit:?}; got {:#?}",
                    seen.iter()
                        .map(|r| (&r.topic, &r.payload))
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// The retained message of `topic` as a new subscriber gets it.
    pub fn retained(broker: &Mosquitto, topic: &str, sub: &SubOptions) -> Received {
        let s = Subscriber::connect(broker, &[topic], sub);
        let r = s
            .next(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no retained message on {topic}"));
        assert!(r.retain, "{r:?} is not a retained message");
        r
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
    }
}
