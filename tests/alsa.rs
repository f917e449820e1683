//! Real ALSA capture through the `file` PCM plugin over a `null` slave (no sound hardware needed).
//! The plugin reads faster than real time and repeats its last period at end of file, so every run
//! here is bounded by events and ended with SIGTERM.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

fn alsa_hark(conf: &std::path::Path, spool: &std::path::Path, extra: &[&str]) -> Running {
    let mut cmd = hark();
    // The file plugin delivers as fast as it is read: a SCHED_FIFO capture thread would spin
    // and starve the other tests' threads (tests/notify.rs covers realtime priority).
    cmd.env("ALSA_CONFIG_PATH", conf)
        .args(base_args(spool))
        .args(["-s", "capture.realtime_priority=0"])
        .args(extra)
        .stdin(Stdio::null());
    Running::spawn(cmd)
}

#[test]
fn alsa_capture_gives_the_same_utterances_as_the_file_source() {
    let dir = tempfile::tempdir().unwrap();
    let pieces: Vec<Vec<i16>> = ["Open the garage door.", "What time is it in Tokyo?"]
        .iter()
        .map(|s| speech(s, dir.path()))
        .collect();
    let t = timeline(&pieces, 1500, 1000, 33.0);
    let raw = dir.path().join("speech.raw");
    write_raw(&raw, &t.samples);
    let conf = alsa_config(dir.path(), &raw);

    let (_, from_file) = run_input(&raw, &dir.path().join("file"), &[]);
    let from_file = utterances(&from_file);
    assert_eq!(from_file.len(), 2);

    // A ring large enough for the whole recording: the plugin delivers it faster than real time.
    let running = alsa_hark(
        &conf,
        &dir.path().join("alsa"),
        &["-d", "hark_test", "-s", "capture.ring_ms=120000"],
    );
    let mut seen = Vec::new();
    for _ in 0..2 {
        running.wait_for(&mut seen, Duration::from_secs(60), |e| {
            e["type"] == "speech_end"
        });
    }
    running.signal(libc::SIGTERM);
    let (status, rest, _) = running.finish(Duration::from_secs(30));
    assert!(status.success(), "exit {status}");
    seen.extend(rest);
    let from_alsa = utterances(&seen);
    assert_eq!(from_alsa.len(), 2, "{seen:#?}");
    for (a, f) in from_alsa.iter().zip(&from_file) {
        assert_eq!((a.0, a.1, &a.2), (f.0, f.1, &f.2));
        assert_eq!(
            check_ogg(std::path::Path::new(&a.3), dir.path()) as u64,
            a.1 * 16
        );
    }
    assert!(of_type(&seen, "error").is_empty(), "{seen:#?}");
}

#[test]
fn overruns_are_counted_and_reported_in_status_events() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("noise.raw");
    write_raw(&raw, &noise(16_000, 30.0, 1));
    let conf = alsa_config(dir.path(), &raw);
    // The null slave is far faster than the dsp thread: a 100 ms ring must overflow.
    let running = alsa_hark(
        &conf,
        &dir.path().join("spool"),
        &[
            "-d",
            "hark_test",
            "-s",
            "capture.ring_ms=100",
            "-s",
            "output.status_interval_s=1",
        ],
    );
    let mut seen = Vec::new();
    let status = running.wait_for(&mut seen, Duration::from_secs(30), |e| {
        e["type"] == "status" && e["overruns"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(status["state"], "online");
    running.signal(libc::SIGTERM);
    let (code, _, _) = running.finish(Duration::from_secs(30));
    assert!(code.success());
}

#[test]
fn a_missing_device_is_reported_and_retried_while_the_daemon_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("x.raw");
    write_raw(&raw, &[0; 320]);
    let conf = alsa_config(dir.path(), &raw);
    let running = alsa_hark(
        &conf,
        &dir.path().join("spool"),
        &["-d", "nosuchpcm", "-s", "output.status_interval_s=1"],
    );
    let mut seen = Vec::new();
    for _ in 0..2 {
        let err = running.wait_for(&mut seen, Duration::from_secs(30), |e| e["type"] == "error");
        assert_eq!(err["stage"], "capture");
        assert_eq!(err["code"], "device_unavailable");
        assert_eq!(err["retrying"], true);
        assert!(
            err["message"].as_str().unwrap().contains("nosuchpcm"),
            "{err}"
        );
    }
    let status = running.wait_for(&mut seen, Duration::from_secs(30), |e| {
        e["type"] == "status"
    });
    assert_eq!(status["state"], "degraded");
    running.signal(libc::SIGTERM);
    let (code, _, stderr) = running.finish(Duration::from_secs(30));
    assert!(code.success(), "exit {code}");
    // alsa-lib's own stderr messages are silenced: hark's one line per attempt is enough.
    assert!(!stderr.contains("ALSA lib"), "{stderr}");
    assert!(
        stderr.contains("nosuchpcm"),
        "hark logs the failure itself: {stderr}"
    );
}

#[test]
fn devices_lists_capture_pcms_with_rates_and_channels() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("x.raw");
    write_raw(&raw, &[0; 320]);
    let conf = alsa_config(dir.path(), &raw);
    let out = hark()
        .arg("devices")
        .env("ALSA_CONFIG_PATH", &conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("hark_test "))
        .unwrap_or_else(|| panic!("hark_test not listed:\n{text}"));
    assert!(line.contains("16000"), "{line}");
    assert!(line.contains("hark test capture"), "{line}");

    let out = hark()
        .args(["devices", "-d", "hark_test_hw"])
        .env("ALSA_CONFIG_PATH", &conf)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("unavailable"));

    let empty = dir.path().join("empty.conf");
    std::fs::write(&empty, "").unwrap();
    let out = hark()
        .arg("devices")
        .env("ALSA_CONFIG_PATH", &empty)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
