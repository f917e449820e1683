//! SIGHUP: a changed config applies without a restart; a broken one is refused and the old stays.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn config(silence_ms: u32, spool: &std::path::Path) -> String {
    format!(
        "[vad]\nsilence_ms = {silence_ms}\n[spool]\ndir = {:?}\n[output]\nstatus_interval_s = 0\n",
        spool.display().to_string()
    )
}

/// Two sentences 500 ms apart, then 1.5 s of silence: one utterance with `silence_ms = 800`, two
/// with 300.
fn pattern(a: &[i16], b: &[i16]) -> Vec<i16> {
    let mut out = a.to_vec();
    out.extend(vec![0i16; RATE as usize / 2]);
    out.extend_from_slice(b);
    out.extend(vec![0i16; RATE as usize * 3 / 2]);
    out
}

fn ends(seen: &[Value]) -> usize {
    of_type(seen, "speech_end").len()
}

#[test]
fn sighup_applies_a_new_silence_ms_and_refuses_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let a = speech("Turn on the lights", dir.path());
    let b = speech("in the kitchen please", dir.path());
    let feed = pattern(&a, &b);
    let spool = dir.path().join("spool");
    let file = dir.path().join("hark.toml");
    std::fs::write(&file, config(800, &spool)).unwrap();

    let mut cmd = hark();
    cmd.args(["-c", file.to_str().unwrap(), "--record-only", "-i", "-"])
        .stdin(Stdio::piped());
    let mut running = Running::spawn(cmd);
    let mut seen = Vec::new();

    // 800 ms: the 500 ms pause stays inside one utterance.
    write_stdin(&mut running.child, &feed);
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    assert_eq!(ends(&seen), 1);

    // 300 ms, without a restart: the same audio makes two utterances. The device's rate needs a
    // restart: it is named in the log and keeps its running value.
    let rate = "[capture]\nsample_rate = 48000\n";
    std::fs::write(&file, format!("{}{rate}", config(300, &spool))).unwrap();
    running.signal(libc::SIGHUP);
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "status");
    write_stdin(&mut running.child, &feed);
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    assert_eq!(ends(&seen), 3, "{seen:#?}");

    // A broken file: an error event, and the running config (300 ms) stays.
    std::fs::write(&file, "[vad]\nsilence_ms = \"soon\"\n").unwrap();
    running.signal(libc::SIGHUP);
    let err = running.wait_for(&mut seen, WAIT, |e| e["type"] == "error");
    assert_eq!(err["stage"], "config");
    assert_eq!(err["code"], "reload_failed");
    assert!(
        err["message"].as_str().unwrap().contains("vad.silence_ms"),
        "{err}"
    );
    write_stdin(&mut running.child, &feed);
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    assert_eq!(ends(&seen), 5, "{seen:#?}");

    running.signal(libc::SIGTERM);
    let (status, _, stderr) = running.finish(WAIT);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("SIGHUP: config reloaded"), "{stderr}");
    assert!(stderr.contains("the running config stays"), "{stderr}");
    assert!(
        stderr.contains("change only with a restart") && stderr.contains("[capture]"),
        "{stderr}"
    );
}

#[test]
fn sighup_restarts_changed_outputs_and_keeps_the_old_ones_when_the_new_cannot_start() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;

    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let file = dir.path().join("hark.toml");
    let sock = dir.path().join("events.sock");
    std::fs::write(&file, config(800, &spool)).unwrap();
    let mut cmd = hark();
    cmd.args(["-c", file.to_str().unwrap(), "--record-only", "-i", "-"])
        .stdin(Stdio::piped());
    let mut running = Running::spawn(cmd);
    let mut seen = Vec::new();
    // Signals are handled once hark runs: an utterance shows that it does.
    let a = speech("Turn on the lights", dir.path());
    write_stdin(&mut running.child, &pattern(&a, &a));
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    assert!(!sock.exists());

    let first_line = |path: &std::path::Path| -> Value {
        let stream = UnixStream::connect(path).expect("the socket is there");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };

    // A socket added by a reload is there once the reload's status event is out.
    let with_socket = format!(
        "{}socket = {:?}\n",
        config(800, &spool),
        sock.display().to_string()
    );
    std::fs::write(&file, &with_socket).unwrap();
    running.signal(libc::SIGHUP);
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "status");
    assert_eq!(first_line(&sock)["type"], "status");

    // A socket whose directory does not exist cannot start: the old socket runs again.
    let bad = format!(
        "{}socket = {:?}\n",
        config(800, &spool),
        dir.path().join("missing/events.sock").display().to_string()
    );
    std::fs::write(&file, bad).unwrap();
    running.signal(libc::SIGHUP);
    let err = running.wait_for(&mut seen, WAIT, |e| e["type"] == "error");
    assert_eq!(err["code"], "reload_failed");
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "status");
    assert_eq!(first_line(&sock)["type"], "status");

    running.signal(libc::SIGTERM);
    let (status, _, stderr) = running.finish(WAIT);
    assert!(status.success(), "{stderr}");
    assert!(!sock.exists(), "the socket is removed on exit");
}
