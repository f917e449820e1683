//! Helpers for the real-binary tests: speech from espeak-ng, WAV and raw fixtures, running hark and
//! reading its events, ALSA `file` plugin configs. Tools that are missing fail the test with the
//! Debian package to install; nothing is skipped silently.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

pub const RATE: u32 = 16_000;

pub mod mosquitto;
pub mod server;

/// The environment variable that names a program to start hark through, with its arguments
/// separated by spaces: scripts/cross.sh sets it to qemu-user (`qemu-aarch64-static`) when the
/// suite runs for an ARM target, since the machine has no binfmt_misc to start ARM binaries by
/// itself. Unset, hark starts directly.
pub const RUNNER_VAR: &str = "HARK_TEST_RUNNER";

/// A command that starts the hark binary at `bin` (behind the runner, when one is set). Every
/// test starts hark through this, so that an emulated run tests the ARM binary and nothing else.
pub fn hark_at(bin: impl AsRef<std::ffi::OsStr>) -> Command {
    let runner = std::env::var(RUNNER_VAR).unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

/// hark as cargo built it for these tests, with a hermetic environment.
pub fn hark() -> Command {
    let mut cmd = hark_at(env!("CARGO_BIN_EXE_hark"));
    cmd.env_remove("RUST_LOG");
    // Hermetic: no key or proxy from the machine running the tests.
    for var in [
        "OPENAI_API_KEY",
        "CREDENTIALS_DIRECTORY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Fail clearly when a tool the tests need is missing.
pub fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: apt-get install {package} (or run the README's test command)"
    );
}

/// Speech for `text` from espeak-ng, at 16 kHz mono, trimmed to its voiced part (first to last
/// sample above -40 dBFS), so that the caller knows exactly where speech starts and ends.
pub fn speech(text: &str, dir: &Path) -> Vec<i16> {
    require("espeak-ng", "espeak-ng");
    require("sox", "sox");
    let wav = dir.join(format!("espeak-{}.wav", hash(text)));
    let raw = wav.with_extension("raw");
    let ok = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "160", "-w"])
        .arg(&wav)
        .arg(text)
        .status()
        .expect("espeak-ng runs")
        .success();
    assert!(ok, "espeak-ng failed");
    let ok = Command::new("sox")
        .arg(&wav)
        .args([
            "-D", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed", "-t", "raw",
        ])
        .arg(&raw)
        .status()
        .expect("sox runs")
        .success();
    assert!(ok, "sox failed");
    let samples = read_raw(&raw);
    let loud = |s: &i16| s.unsigned_abs() > 328;
    let first = samples
        .iter()
        .position(loud)
        .expect("espeak produced sound");
    let last = samples
        .iter()
        .rposition(loud)
        .expect("espeak produced sound");
    samples[first..=last].to_vec()
}

fn hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn read_raw(path: &Path) -> Vec<i16> {
    let bytes = std::fs::read(path).expect("read raw");
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

pub fn write_raw(path: &Path, samples: &[i16]) {
    std::fs::write(path, le_bytes(samples)).expect("write raw");
}

pub fn write_wav(path: &Path, samples: &[i16], rate: u32, channels: u16) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).expect("create wav");
    for &s in samples {
        w.write_sample(s).expect("write wav");
    }
    w.finalize().expect("finalize wav");
}

/// Deterministic noise of RMS about `rms` (a linear congruential generator, uniform).
pub fn noise(len: usize, rms: f64, seed: u64) -> Vec<i16> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let amp = rms * 3f64.sqrt();
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            ((u * 2.0 - 1.0) * amp) as i16
        })
        .collect()
}

/// A timeline of speech pieces over a noise floor, with the true speech spans in samples.
pub struct Timeline {
    pub samples: Vec<i16>,
    pub spans: Vec<(usize, usize)>,
}

/// Lay out `pieces` (speech) with `gap_ms` of silence between them and `edge_ms` at both ends,
/// then add a noise floor of `noise_rms`.
pub fn timeline(pieces: &[Vec<i16>], gap_ms: usize, edge_ms: usize, noise_rms: f64) -> Timeline {
    let ms = RATE as usize / 1000;
    let mut samples = vec![0i16; edge_ms * ms];
    let mut spans = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 {
            samples.extend(std::iter::repeat_n(0, gap_ms * ms));
        }
        spans.push((samples.len(), samples.len() + p.len()));
        samples.extend_from_slice(p);
    }
    samples.extend(std::iter::repeat_n(0, edge_ms * ms));
    let floor = noise(samples.len(), noise_rms, 7);
    for (s, n) in samples.iter_mut().zip(floor) {
        *s = s.saturating_add(n);
    }
    Timeline { samples, spans }
}

/// How long any single hark run in the tests may take before it is killed and the test fails.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Run hark to completion (killed and failed after [`RUN_LIMIT`]) and return its output.
pub fn run(args: &[&str]) -> Output {
    run_with_stdin(args, None)
}

/// Like [`run`], with these environment variables set.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_full(args, None, env)
}

/// Like [`run`], with `input` written to hark's stdin (from another thread, then closed).
pub fn run_with_stdin(args: &[&str], input: Option<Vec<u8>>) -> Output {
    run_full(args, input, &[])
}

fn run_full(args: &[&str], input: Option<Vec<u8>>, env: &[(&str, &str)]) -> Output {
    let mut child = hark()
        .args(args)
        .envs(env.iter().copied())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hark runs");
    let writer = input.map(|bytes| {
        let mut stdin = child.stdin.take().expect("stdin");
        // A broken pipe is hark's to report; the test checks its output.
        std::thread::spawn(move || drop(stdin.write_all(&bytes)))
    });
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(RUN_LIMIT).is_err() {
            kill(pid, libc::SIGKILL);
            return true;
        }
        false
    });
    let output = child.wait_with_output().expect("hark output");
    let _ = tx.send(());
    if let Some(w) = writer {
        w.join().expect("stdin writer");
    }
    assert!(
        !watchdog.join().unwrap(),
        "hark {args:?} did not finish within {RUN_LIMIT:?}"
    );
    output
}

/// Raw s16le bytes of `samples`.
pub fn le_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// (offset_ms, duration_ms) of each utterance.
pub fn spans(utts: &[(u64, u64, String, String)]) -> Vec<(u64, u64)> {
    utts.iter().map(|u| (u.0, u.1)).collect()
}

/// Parse JSON lines.
pub fn events(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// Utterances from `speech_end` events: (offset_ms, duration_ms, reason, audio).
pub fn utterances(events: &[Value]) -> Vec<(u64, u64, String, String)> {
    of_type(events, "speech_end")
        .iter()
        .map(|e| {
            (
                e["offset_ms"].as_u64().expect("offset_ms"),
                e["duration_ms"].as_u64().expect("duration_ms"),
                e["reason"].as_str().expect("reason").to_owned(),
                e["audio"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Common flags: a private spool dir, and record-only.
pub fn base_args(spool: &Path) -> Vec<String> {
    vec![
        "--record-only".into(),
        "-s".into(),
        format!("spool.dir={}", spool.display()),
        "-s".into(),
        "output.status_interval_s=0".into(),
    ]
}

pub fn run_input(input: &Path, spool: &Path, extra: &[&str]) -> (Output, Vec<Value>) {
    let mut args = base_args(spool);
    args.push("-i".into());
    args.push(input.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&refs);
    assert!(
        out.status.success(),
        "hark failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out.stdout);
    (out, ev)
}

/// An ALSA config with one PCM, `hark_test`, that captures `raw` (s16le) through the file plugin.
pub fn alsa_config(dir: &Path, raw: &Path) -> PathBuf {
    let conf = dir.join("asound.conf");
    std::fs::write(
        &conf,
        format!(
            "pcm.hark_test {{\n  type file\n  slave.pcm {{ type null }}\n  file \"/dev/null\"\n  \
             infile \"{}\"\n  format \"raw\"\n  hint.description \"hark test capture\"\n}}\n\
             pcm.hark_test_hw {{\n  type hw\n  card 99\n}}\n",
            raw.display()
        ),
    )
    .expect("write asound.conf");
    conf
}

/// A running hark whose stdout events arrive on a channel; killed on drop.
pub struct Running {
    pub child: Child,
    pub events: mpsc::Receiver<Value>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    stderr_thread: Option<std::thread::JoinHandle<()>>,
    /// Each stderr line as it comes, for [`Running::wait_stderr`].
    stderr_lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hark starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr_pipe = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        let (line_tx, stderr_lines) = mpsc::channel();
        let stderr_thread = std::thread::spawn(move || {
            for line in BufReader::new(&mut stderr_pipe).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                let _ = line_tx.send(line);
            }
        });
        Running {
            child,
            events: rx,
            stderr,
            stderr_thread: Some(stderr_thread),
            stderr_lines,
        }
    }

    /// Wait for the next stderr line that contains `needle` (a log line such as "listening on").
    pub fn wait_stderr(&self, needle: &str, limit: Duration) -> String {
        wait_line(&self.stderr_lines, limit, |l| l.contains(needle)).unwrap_or_else(|| {
            panic!(
                "no stderr line with {needle:?} within {limit:?}; stderr: {}",
                self.stderr.lock().unwrap()
            )
        })
    }

    /// Wait for the next event matching `pred`, collecting everything seen into `seen`.
    pub fn wait_for(
        &self,
        seen: &mut Vec<Value>,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no matching event within {limit:?}; saw {seen:#?}\nstderr: {}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        kill(self.child.id() as i32, sig);
    }

    /// Wait for exit (bounded), then return the status, the remaining events and all of stderr.
    pub fn finish(mut self, limit: Duration) -> (std::process::ExitStatus, Vec<Value>, String) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let rest: Vec<Value> = self.events.iter().collect();
                if let Some(t) = self.stderr_thread.take() {
                    t.join().expect("stderr reader");
                }
                let stderr = self.stderr.lock().unwrap().clone();
                return (status, rest, stderr);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hark did not exit within {limit:?}; stderr: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decode an Ogg/Opus file with opusdec at 16 kHz and return its sample count; checks opusinfo.
pub fn check_ogg(path: &Path, dir: &Path) -> usize {
    require("opusinfo", "opus-tools");
    let info = Command::new("opusinfo")
        .arg(path)
        .output()
        .expect("opusinfo runs");
    let text =
        String::from_utf8_lossy(&info.stdout).to_string() + &String::from_utf8_lossy(&info.stderr);
    assert!(
        info.status.success(),
        "opusinfo failed on {}: {text}",
        path.display()
    );
    assert!(
        !text.contains("WARNING") && !text.contains("ERROR"),
        "opusinfo complains about {}: {text}",
        path.display()
    );
    let wav = dir.join("decoded.wav");
    let out = Command::new("opusdec")
        .args(["--quiet", "--rate", "16000"])
        .arg(path)
        .arg(&wav)
        .output()
        .expect("opusdec runs");
    assert!(
        out.status.success(),
        "opusdec failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reader = hound::WavReader::open(&wav).expect("decoded wav");
    reader.duration() as usize
}

pub fn write_stdin(child: &mut Child, samples: &[i16]) {
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(&bytes)
        .expect("write stdin");
}

/// Every line `reader` gives, on a channel, read by a thread of its own until end of file.
pub fn lines_of(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next line from `lines` that matches `pred`, skipping others; `None` at end of input or
/// when `limit` passes first.
pub fn wait_line(
    lines: &mpsc::Receiver<String>,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if pred(&line) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// A reader of hark's event socket: every line it receives, on a channel.
pub struct SocketClient {
    pub stream: std::os::unix::net::UnixStream,
    pub lines: mpsc::Receiver<String>,
}

impl SocketClient {
    /// Connect to `path` and read lines in a thread of its own.
    pub fn connect(path: &Path) -> SocketClient {
        let stream = std::os::unix::net::UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        let lines = lines_of(stream.try_clone().expect("clone the client socket"));
        SocketClient { stream, lines }
    }

    /// The next line, or `None` at end of input; fails the test after `limit`.
    pub fn next(&self, limit: Duration) -> Option<String> {
        match self.lines.recv_timeout(limit) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("no line from the socket within {limit:?}")
            }
        }
    }

    /// Every line until hark closes the connection; fails the test after `limit`.
    pub fn rest(&self, limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "the socket was not closed within {limit:?}; got {} lines",
                        out.len()
                    )
                }
            }
        }
    }
}

impl Drop for SocketClient {
    /// Hang up (the reading thread holds a second handle that would keep the connection open).
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Send `sig` to process `pid` (a child the test started).
#[allow(unsafe_code)]
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers; the pid is a child of this process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// This process's effective user and group ids.
#[allow(unsafe_code)]
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid(2) and getegid(2) have no preconditions and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}
