//! sd_notify with the real binary and a real datagram socket as `$NOTIFY_SOCKET`: READY, STATUS,
//! WATCHDOG while capture and dsp make progress (and not while a stdin source is stalled), and
//! STOPPING; a missing device is degraded but alive; realtime priority for ALSA capture, and the
//! single warning when it is denied.

use crate::common;

use std::io::Write;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// `WATCHDOG_USEC` in these tests: 200 ms, so hark checks and pings every 100 ms.
const WATCHDOG_USEC: &str = "200000";
const INTERVAL: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(30);

/// Every line of every datagram on `socket`, with the time it came, read by a thread of its own.
fn listen(socket: UnixDatagram) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let now = Instant::now();
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if tx.send((now, line.to_owned())).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next line that starts with `prefix`, within `limit`; every line seen goes to `seen`.
fn expect(
    rx: &mpsc::Receiver<(Instant, String)>,
    seen: &mut Vec<String>,
    prefix: &str,
    limit: Duration,
) -> (Instant, String) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((t, line)) => {
                seen.push(line.clone());
                if line.starts_with(prefix) {
                    return (t, line);
                }
            }
            Err(_) => panic!("no {prefix:?} within {limit:?}; got {seen:#?}"),
        }
    }
}

/// Every line that comes within `window`.
fn collect(rx: &mpsc::Receiver<(Instant, String)>, window: Duration) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    while let Ok(m) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        out.push(m);
    }
    out
}

fn watchdogs(lines: &[(Instant, String)]) -> usize {
    lines.iter().filter(|(_, l)| l == "WATCHDOG=1").count()
}

/// Writes 50 ms of low noise to hark's stdin every 50 ms while `on` is set; keeps the pipe open
/// (a source that stopped sending, not one that ended) until the test ends.
fn feeder(mut stdin: ChildStdin, on: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let chunk = le_bytes(&noise(RATE as usize / 20, 30.0, 3));
        loop {
            if on.load(Ordering::Relaxed) && stdin.write_all(&chunk).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

fn bound_socket(dir: &Path) -> (UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    (socket, path.display().to_string())
}

// See: issue 5 (sd_notify: WATCHDOG=1 only while capture makes progress).
#[test]
fn ready_status_watchdog_while_fed_none_while_stdin_stalls_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, path) = bound_socket(dir.path());
    let rx = listen(socket);
    let mut cmd = hark();
    cmd.args(base_args(&dir.path().join("spool")))
        .args(["-i", "-"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::piped());
    let mut running = Running::spawn(cmd);
    let on = Arc::new(AtomicBool::new(true));
    feeder(running.child.stdin.take().expect("stdin"), on.clone());

    let mut seen = Vec::new();
    expect(&rx, &mut seen, "READY=1", WAIT);
    let (_, status) = expect(&rx, &mut seen, "STATUS=", Duration::from_secs(5));
    assert_eq!(
        status, "STATUS=online: 0 utterances, 0 waiting in the spool (0 B)",
        "{seen:#?}"
    );

    // Fed: pinged every 100 ms or so; at least a few in 2 s on any machine.
    let (first, _) = expect(&rx, &mut seen, "WATCHDOG=1", Duration::from_secs(10));
    let fed = collect(&rx, 10 * INTERVAL);
    assert!(
        watchdogs(&fed) >= 3,
        "few pings while fed: {fed:#?} (first at {first:?})"
    );

    // Stalled: capture blocks in its read of the open pipe. Once the stall is detectable (two
    // checks, 200 ms; 1 s allowed for pings already on their way), no ping comes for 10
    // intervals. (No assertion on when the settling pings arrived: under qemu on a loaded
    // machine the test thread itself can be late by that much.)
    on.store(false, Ordering::Relaxed);
    collect(&rx, 5 * INTERVAL);
    let stalled = collect(&rx, 10 * INTERVAL);
    assert_eq!(
        watchdogs(&stalled),
        0,
        "pinged while stdin sent nothing: {stalled:#?}"
    );
    assert!(
        running.child.try_wait().unwrap().is_none(),
        "hark still runs"
    );

    // Fed again: the pings come back.
    on.store(true, Ordering::Relaxed);
    expect(&rx, &mut seen, "WATCHDOG=1", Duration::from_secs(10));

    on.store(false, Ordering::Relaxed);
    running.signal(libc::SIGTERM);
    expect(&rx, &mut seen, "STOPPING=1", Duration::from_secs(10));
    let (status, _, stderr) = running.finish(WAIT);
    assert!(status.success(), "exit {status}: {stderr}");
}

#[test]
fn an_abstract_socket_hears_ready_then_stopping_when_a_file_ends() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("hark-test-{}-{:?}", std::process::id(), Instant::now());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&addr).expect("bind an abstract socket");
    let rx = listen(socket);
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/hello.wav");
    let spool = dir.path().join("spool");
    let mut args = base_args(&spool);
    args.extend(["-i".into(), sample.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_env(&refs, &[("NOTIFY_SOCKET", &format!("@{name}"))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(utterances(&events(&out.stdout)).len(), 3);
    let lines: Vec<String> = collect(&rx, Duration::from_millis(300))
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(
        lines.first().map(String::as_str),
        Some("READY=1"),
        "{lines:#?}"
    );
    assert!(lines[1].starts_with("STATUS=online: "), "{lines:#?}");
    let stopping = lines.iter().position(|l| l == "STOPPING=1");
    assert!(stopping.is_some(), "{lines:#?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| *l == "READY=1" || *l == "STOPPING=1")
            .count(),
        2,
        "once each: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l == "WATCHDOG=1"),
        "no WATCHDOG_USEC, no pings"
    );
}

#[test]
fn a_notify_socket_nobody_listens_on_changes_nothing_but_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/hello.wav");
    let mut args = base_args(&dir.path().join("spool"));
    args.extend(["-i".into(), sample.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let gone = dir.path().join("nobody.sock").display().to_string();
    let out = run_env(
        &refs,
        &[
            ("NOTIFY_SOCKET", gone.as_str()),
            ("WATCHDOG_USEC", "100000"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(utterances(&events(&out.stdout)).len(), 3);
    assert_eq!(
        stderr.matches("cannot notify systemd").count(),
        1,
        "{stderr}"
    );
}

/// hark on an ALSA PCM whose card does not exist, with the notify socket and watchdog.
fn missing_device(dir: &Path, socket: &str, extra: &[&str]) -> Command {
    let raw = dir.join("silence.raw");
    write_raw(&raw, &[0; 1600]);
    let conf = alsa_config(dir, &raw);
    let mut cmd = hark();
    cmd.args(base_args(&dir.join("spool")))
        .args(["-d", "hark_test_hw"])
        .args(extra)
        .env("ALSA_CONFIG_PATH", conf)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null());
    cmd
}

/// (policy, rt_priority) of the thread named `name` in process `pid`, from /proc.
fn sched_of(pid: u32, name: &str) -> Option<(u32, u32)> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?.path();
        let comm = std::fs::read_to_string(task.join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // Fields after the `(comm)`: state is field 3; rt_priority is 40, policy 41.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        return Some((fields[38].parse().ok()?, fields[37].parse().ok()?));
    }
    None
}

#[test]
fn a_missing_device_is_ready_and_degraded_and_still_pinged() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, path) = bound_socket(dir.path());
    let rx = listen(socket);
    let running = Running::spawn(missing_device(dir.path(), &path, &[]));
    let mut seen = Vec::new();
    expect(&rx, &mut seen, "READY=1", WAIT);
    let (_, status) = expect(&rx, &mut seen, "STATUS=", Duration::from_secs(5));
    assert!(
        status.starts_with("STATUS=degraded (no audio device, retrying): "),
        "{status}"
    );
    // Waiting for the device is not a stall: the pings go on.
    expect(&rx, &mut seen, "WATCHDOG=1", Duration::from_secs(10));
    let later = collect(&rx, 10 * INTERVAL);
    assert!(watchdogs(&later) >= 3, "{later:#?}");

    // The capture thread asked for SCHED_FIFO 10: granted (root, or LimitRTPRIO), or one warning.
    let stderr = running.stderr.lock().unwrap().clone();
    let granted = stderr.contains("capture thread runs at realtime priority 10");
    let denied = stderr.matches("realtime priority denied").count();
    assert!(granted != (denied == 1), "{stderr}");
    if granted {
        assert_eq!(
            sched_of(running.child.id(), "hark-capture"),
            Some((libc::SCHED_FIFO as u32, 10))
        );
    }
    running.signal(libc::SIGTERM);
    expect(&rx, &mut seen, "STOPPING=1", Duration::from_secs(10));
    let (status, _, stderr) = running.finish(WAIT);
    assert!(status.success(), "exit {status}: {stderr}");
}

#[test]
#[allow(unsafe_code)] // pre_exec: setrlimit in the child between fork and exec
fn realtime_denied_is_one_warning_and_capture_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, path) = bound_socket(dir.path());
    let rx = listen(socket);
    let mut cmd = missing_device(dir.path(), &path, &[]);
    // No rtprio allowance and no CAP_SYS_NICE, as under a unit without LimitRTPRIO=.
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_RTPRIO, &zero);
            // Root keeps only the bounding set across exec; others have no CAP_SYS_NICE anyway.
            libc::prctl(libc::PR_CAPBSET_DROP, 23 /* CAP_SYS_NICE */, 0, 0, 0);
            Ok(())
        });
    }
    let running = Running::spawn(cmd);
    let mut seen = Vec::new();
    expect(&rx, &mut seen, "READY=1", WAIT);
    running.wait_stderr("realtime priority denied", Duration::from_secs(10));
    expect(&rx, &mut seen, "WATCHDOG=1", Duration::from_secs(10));
    assert_eq!(
        sched_of(running.child.id(), "hark-capture").map(|s| s.0),
        Some(libc::SCHED_OTHER as u32)
    );
    running.signal(libc::SIGTERM);
    let (status, _, stderr) = running.finish(WAIT);
    assert!(status.success(), "exit {status}: {stderr}");
    assert_eq!(
        stderr.matches("realtime priority denied").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("LimitRTPRIO=10"), "{stderr}");
}
