//! The Unix socket sink with the real binary: what clients get, slow and surplus clients, and how
//! the socket file is made and removed. Runs are fed through stdin so that clients connect before
//! the events they are meant to see; every wait is bounded.

use crate::common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// hark's per-client queue (src/sink/socket.rs, `CLIENT_QUEUE`).
const CLIENT_QUEUE: usize = 256;
/// hark's per-client write buffer, which also holds lines before the kernel does.
const CLIENT_WRITE_BUFFER: usize = 64 * 1024;
const MAX_CLIENTS: usize = 16;

const WAIT: Duration = Duration::from_secs(30);

/// samples/hello.wav: three sentences, 16 kHz mono.
fn hello() -> Vec<i16> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/hello.wav");
    hound::WavReader::open(path)
        .expect("samples/hello.wav")
        .samples::<i16>()
        .map(|s| s.expect("sample"))
        .collect()
}

/// hark reading stdin, record-only, with its event socket at `socket`.
fn hark_on_stdin(spool: &Path, socket: &Path, extra: &[&str]) -> Command {
    let mut cmd = hark();
    cmd.args(base_args(spool))
        .args(["-i", "-", "-s"])
        .arg(format!("output.socket={}", socket.display()))
        .args(extra)
        .stdin(Stdio::piped());
    cmd
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn seq(v: &Value) -> u64 {
    v["seq"].as_u64().expect("seq")
}

fn close_stdin(running: &mut Running) {
    drop(running.child.stdin.take());
}

fn run_args(args: &[String]) -> std::process::Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

/// hark on a short file with its socket at `socket`, to completion.
fn run_with_socket(dir: &Path, socket: &Path, extra: &[&str]) -> std::process::Output {
    let wav = dir.join("short.wav");
    write_wav(&wav, &vec![0i16; RATE as usize / 2], RATE, 1);
    let mut args = base_args(&dir.join("spool"));
    args.extend(["-i".into(), wav.display().to_string(), "-s".into()]);
    args.push(format!("output.socket={}", socket.display()));
    args.extend(extra.iter().map(|s| s.to_string()));
    run_args(&args)
}

#[test]
fn two_clients_get_identical_streams_that_start_with_status() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock");
    let mut running = Running::spawn(hark_on_stdin(&dir.path().join("spool"), &socket, &[]));
    running.wait_stderr("listening on", WAIT);

    let a = SocketClient::connect(&socket);
    let a_status = json(&a.next(WAIT).expect("a first line"));
    // A client may send (ignored) and shut down its write side; it still gets every event.
    {
        use std::io::Write;
        (&a.stream).write_all(b"hello hark\n").unwrap();
        a.stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let b = SocketClient::connect(&socket);
    let b_status = json(&b.next(WAIT).expect("b first line"));
    for s in [&a_status, &b_status] {
        assert_eq!(s["type"], "status", "{s}");
        // Degraded while stdin has given nothing yet.
        assert!(
            ["online", "degraded"].contains(&s["state"].as_str().unwrap()),
            "{s}"
        );
        assert_eq!(s["v"], 1);
    }
    assert!(seq(&b_status) > seq(&a_status));

    write_stdin(&mut running.child, &hello());
    close_stdin(&mut running);
    let (status, stdout, stderr) = running.finish(WAIT);
    assert!(status.success(), "exit {status}: {stderr}");
    let a_rest = a.rest(WAIT);
    let b_rest = b.rest(WAIT);

    assert_eq!(a_rest, b_rest, "the two clients' streams differ");
    let got: Vec<Value> = a_rest.iter().map(|l| json(l)).collect();
    assert_eq!(utterances(&got).len(), 3, "{got:#?}");
    assert_eq!(
        got.last().unwrap()["type"],
        "status",
        "the stop's status comes last"
    );
    // The same events as stdout from the moment the clients connected, in the same order.
    let after: Vec<Value> = stdout
        .into_iter()
        .filter(|e| seq(e) > seq(&b_status))
        .collect();
    assert_eq!(got, after);
    assert!(got.windows(2).all(|w| seq(&w[0]) < seq(&w[1])), "{got:#?}");
    assert!(!socket.exists(), "the socket is removed on exit");
}

#[test]
fn a_client_that_never_reads_is_dropped_while_the_other_and_the_pipeline_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock");
    // Long lines (the device name is in every event), so that fewer events fill the kernel's
    // socket buffer and the slow client's queue; and every blip of speech is two events
    // (speech_start, dropped as too short), with no spool writes.
    let device = "d".repeat(8000);
    let wmem = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(212_992);
    // Twice what the kernel and hark's write buffer can hold, plus the queue.
    let needed = 2 * (wmem + CLIENT_WRITE_BUFFER) / device.len() + CLIENT_QUEUE + 1;
    let blip = speech("Hi", dir.path());
    let mut audio = vec![0i16; RATE as usize / 5];
    for _ in 0..needed {
        audio.extend_from_slice(&blip);
        audio.extend(std::iter::repeat_n(0, RATE as usize / 4));
    }
    let device_arg = format!("device_id=\"{device}\"");
    let vad = [
        "-s",
        device_arg.as_str(),
        "-s",
        "vad.frame_ms=10",
        "-s",
        "vad.start_ms=30",
        "-s",
        "vad.silence_ms=100",
        "-s",
        "vad.pre_roll_ms=0",
        "-s",
        "vad.min_utterance_ms=10000",
    ];
    let mut running = Running::spawn(hark_on_stdin(&dir.path().join("spool"), &socket, &vad));
    running.wait_stderr("listening on", WAIT);

    // Connected first, so accepted first: once the reader has its status, the sleeper is in.
    let sleeper = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let reader = SocketClient::connect(&socket);
    let status = json(&reader.next(WAIT).expect("first line"));
    assert_eq!(status["type"], "status");

    write_stdin(&mut running.child, &audio);
    close_stdin(&mut running);
    let (exit, stdout, stderr) = running.finish(Duration::from_secs(90));
    assert!(exit.success(), "exit {exit}: {stderr}");
    let got: Vec<Value> = reader.rest(WAIT).iter().map(|l| json(l)).collect();

    let dropped = of_type(&stdout, "error");
    assert_eq!(dropped.len(), 1, "one client was dropped: {dropped:#?}");
    let e = dropped[0];
    assert_eq!(
        (&e["stage"], &e["code"], &e["retrying"]),
        (
            &Value::from("sink"),
            &Value::from("socket_client_dropped"),
            &Value::from(false)
        ),
        "{e}"
    );
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("client 1") && message.contains("stopped reading"),
        "{message}"
    );
    assert!(stderr.contains("stopped reading"), "{stderr}");
    // The reader got everything from its status on, the error event included.
    let after: Vec<Value> = stdout
        .iter()
        .filter(|e| seq(e) > seq(&status))
        .cloned()
        .collect();
    assert_eq!(got, after);
    assert!(
        of_type(&stdout, "speech_start").len() >= needed,
        "the pipeline went on to the end"
    );
    let last = stdout.last().unwrap();
    assert_eq!(last["type"], "status");
    assert!(
        last["events_dropped"].as_u64().unwrap() > CLIENT_QUEUE as u64,
        "{last}"
    );

    // The sleeper got its status, then a part of the stream, then end of file.
    let lines: Vec<Value> = lines_of(sleeper).iter().map(|l| json(&l)).collect();
    assert_eq!(lines[0]["type"], "status");
    assert!(seq(&lines[0]) < seq(&status));
    let part = &lines[1..];
    assert!(part.len() < got.len(), "{} of {}", part.len(), got.len());
    let from_sleeper_start: Vec<&Value> =
        stdout.iter().filter(|e| seq(e) > seq(&lines[0])).collect();
    assert_eq!(
        part.iter().collect::<Vec<_>>(),
        from_sleeper_start[..part.len()],
        "what it got is the stream's beginning"
    );
}

#[test]
fn clients_beyond_the_cap_are_closed_and_a_client_that_leaves_frees_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock");
    let mut running = Running::spawn(hark_on_stdin(&dir.path().join("spool"), &socket, &[]));
    running.wait_stderr("listening on", WAIT);
    let mut clients: Vec<SocketClient> = (0..MAX_CLIENTS)
        .map(|_| SocketClient::connect(&socket))
        .collect();
    for c in &clients {
        assert_eq!(json(&c.next(WAIT).expect("status"))["type"], "status");
    }
    let surplus = SocketClient::connect(&socket);
    assert_eq!(
        surplus.next(WAIT),
        None,
        "closed at once, with nothing sent"
    );
    running.wait_stderr("clients are connected already", WAIT);

    // One leaves (without any event coming); a newcomer takes its place.
    drop(clients.remove(0));
    let newcomer = SocketClient::connect(&socket);
    assert_eq!(
        json(&newcomer.next(WAIT).expect("status"))["type"],
        "status"
    );

    close_stdin(&mut running);
    let (exit, stdout, stderr) = running.finish(WAIT);
    assert!(exit.success(), "exit {exit}: {stderr}");
    assert!(of_type(&stdout, "error").is_empty(), "{stdout:#?}");
    for c in clients.iter().chain([&newcomer]) {
        let rest = c.rest(WAIT);
        assert_eq!(rest.len(), 1, "the stop's status: {rest:?}");
    }
}

#[test]
fn a_regular_file_or_a_directory_at_the_socket_path_is_left_untouched_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.sock");
    std::fs::write(&file, "precious").unwrap();
    let out = run_with_socket(dir.path(), &file, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{} exists and is a regular file, not a socket",
            file.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    assert!(out.stdout.is_empty(), "nothing ran");

    let sub = dir.path().join("a-directory");
    std::fs::create_dir(&sub).unwrap();
    let out = run_with_socket(dir.path(), &sub, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is a directory, not a socket"), "{err}");
    assert!(sub.is_dir());
}

#[test]
fn a_stale_socket_is_replaced_and_one_in_use_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let out = run_with_socket(dir.path(), &stale, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("replacing the stale socket"), "{err}");
    assert!(err.contains("listening on"), "{err}");
    assert!(!stale.exists(), "removed on exit");

    let live = dir.path().join("live.sock");
    let theirs = UnixListener::bind(&live).unwrap();
    let out = run_with_socket(dir.path(), &live, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is in use"), "{err}");
    // Still theirs: hark's probe is waiting in their backlog, and the file is still there.
    assert!(theirs.accept().is_ok());
    assert!(live.exists());
}

#[test]
fn the_socket_has_its_mode_and_group_and_bad_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock");
    let gid = common::effective_ids().1;
    let group = group_name(gid);
    let group_arg = format!("output.socket_group={group}");
    let extra = [
        "-s",
        "output.socket_mode=\"0600\"",
        "-s",
        group_arg.as_str(),
    ];
    let mut running = Running::spawn(hark_on_stdin(&dir.path().join("spool"), &socket, &extra));
    running.wait_stderr("listening on", WAIT);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.gid(), gid);
    close_stdin(&mut running);
    let (exit, _, stderr) = running.finish(WAIT);
    assert!(exit.success(), "{stderr}");
    assert!(!socket.exists(), "removed on exit");

    let out = run_with_socket(
        dir.path(),
        &socket,
        &["-s", "output.socket_group=no-such-group-for-hark"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("output.socket_group: no group named \"no-such-group-for-hark\""),
        "{err}"
    );
    assert!(!socket.exists());

    let orphan: PathBuf = dir.path().join("missing/events.sock");
    let out = run_with_socket(dir.path(), &orphan, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "its directory {} does not exist",
            dir.path().join("missing").display()
        )),
        "{err}"
    );
}

/// The name of group `gid`, from `getent group`.
fn group_name(gid: u32) -> String {
    let out = Command::new("getent")
        .args(["group", &gid.to_string()])
        .output()
        .expect("getent runs");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    line.split(':')
        .next()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| panic!("no name for group {gid}: {line}"))
        .to_owned()
}
