//! stdout closed by its reader (`hark | head -1`): hark stops cleanly when stdout was its only
//! sink, and otherwise goes on without it. Real binary, speech through stdin; every wait bounded.

use crate::common;

use std::io::BufRead;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Read the first line of hark's stdout in a thread that then closes the pipe, as `head -1` does.
fn head_1(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx
}

/// Wait for hark to exit; kill it and fail after `limit`.
fn wait_exit(mut child: Child, limit: Duration) -> ExitStatus {
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(limit) {
        Ok(status) => status.expect("wait for hark"),
        Err(_) => {
            common::kill(pid, libc::SIGKILL);
            panic!("hark did not exit within {limit:?}");
        }
    }
}

/// Whether process `pid` ignores SIGPIPE (`SigIgn` in /proc/PID/status).
fn ignores_sigpipe(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("SigIgn");
    mask & (1 << (libc::SIGPIPE - 1)) != 0
}

fn spawn(args: &[String]) -> (Child, mpsc::Receiver<String>) {
    let mut child = hark()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hark starts");
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    (child, stderr)
}

fn stdin_args(spool: &std::path::Path) -> Vec<String> {
    let mut args = base_args(spool);
    args.extend(["-i".to_string(), "-".to_string()]);
    args
}

#[test]
fn closing_stdout_stops_hark_when_stdout_is_its_only_sink() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (mut child, stderr) = spawn(&stdin_args(&spool));
    // Rust ignores SIGPIPE, so a write to a closed pipe fails with EPIPE instead of killing hark.
    wait_line(&stderr, WAIT, |l| l.contains("record-only")).expect("hark is up");
    assert!(ignores_sigpipe(child.id()), "SIGPIPE is not ignored");
    let first = head_1(&mut child);
    // Speech, and stdin stays open: hark is mid-utterance when its reader goes.
    let mut audio = vec![0i16; RATE as usize / 2];
    audio.extend(speech(
        "Good morning, this sentence is never finished",
        dir.path(),
    ));
    write_stdin(&mut child, &audio);
    let line = first.recv_timeout(WAIT).expect("a first line");
    let start: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(start["type"], "speech_start", "{line}");

    // Held open until hark has exited (`Child::wait` would close it: end of input).
    let _stdin = child.stdin.take();
    let closed = Instant::now();
    let status = wait_exit(child, Duration::from_secs(10));
    assert!(status.success(), "exit {status}");
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "took {:?}",
        closed.elapsed()
    );
    let log: Vec<String> = stderr.iter().collect();
    let log = log.join("\n");
    assert!(log.contains("stdout was closed"), "{log}");
    assert!(log.contains("no sink is left"), "{log}");

    // The open utterance was closed and spooled.
    let id = start["utterance"].as_str().unwrap();
    let meta: Value =
        serde_json::from_slice(&std::fs::read(spool.join(format!("{id}.json"))).unwrap()).unwrap();
    assert_eq!(meta["reason"], "shutdown", "{meta}");
    let samples = check_ogg(&spool.join(format!("{id}.ogg")), dir.path()) as u64;
    assert_eq!(Some(samples), meta["samples"].as_u64());
    assert!(samples >= audio.len() as u64 / 2, "{samples} samples kept");
}

#[test]
fn closing_stdout_with_the_socket_on_disables_stdout_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("events.sock");
    let mut args = stdin_args(&dir.path().join("spool"));
    args.extend([
        "-s".to_string(),
        format!("output.socket={}", socket.display()),
    ]);
    let (mut child, stderr) = spawn(&args);
    wait_line(&stderr, WAIT, |l| l.contains("listening on")).expect("listening");
    let client = SocketClient::connect(&socket);
    let status: Value = serde_json::from_str(&client.next(WAIT).expect("status")).unwrap();
    assert_eq!(status["type"], "status");

    let first = head_1(&mut child);
    let pause = vec![0i16; RATE as usize];
    let mut audio = pause.clone();
    audio.extend(speech("The kitchen lights are on.", dir.path()));
    audio.extend(&pause);
    write_stdin(&mut child, &audio);
    let line = first.recv_timeout(WAIT).expect("a first line");
    assert!(line.contains("\"speech_start\""), "{line}");
    wait_line(&stderr, WAIT, |l| {
        l.contains("the stdout sink stopped; 1 left")
    })
    .expect("hark notices that stdout is closed");

    let mut more = speech("Please lock the front door now.", dir.path());
    more.extend(&pause);
    write_stdin(&mut child, &more);
    drop(child.stdin.take());
    let exit = wait_exit(child, WAIT);
    assert!(exit.success(), "exit {exit}");

    let events: Vec<Value> = client
        .rest(WAIT)
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let utts = utterances(&events);
    assert_eq!(
        utts.len(),
        2,
        "both utterances reach the socket: {events:#?}"
    );
    assert_eq!(events.last().unwrap()["type"], "status");
    assert!(of_type(&events, "error").is_empty(), "{events:#?}");
}
