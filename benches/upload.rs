//! Upload benchmark: `cargo bench --bench upload` (about 4 minutes of real time).
//!
//! Runs the release binary on a file of 100 short spoken commands (espeak-ng, 10 phrases × 10
//! voices, each followed by 1.2 s of silence over a -60 dBFS noise floor; made once into
//! `target/bench-data/upload100.wav`) with `--pace`, so that speech arrives in real time as from a
//! microphone, and uploads every utterance to the test server of tests/common/server.rs on
//! 127.0.0.1, which answers at once with `{"text":"ok"}`. It prints:
//!
//! - the `latency_ms` of the `transcript` events (hark's own measure: its `speech_end` to its
//!   transcript), p50, p90, p99 and max;
//! - the same measured here: when the bench read the `transcript` line from the pipe minus when it
//!   read that utterance's `speech_end` line, split at the moment the server had the whole request;
//! - bytes uploaded per second of audio (`speech_end` `duration_ms`), whole multipart bodies and
//!   the Ogg file parts alone, and their ratio to 16-bit 16 kHz mono WAV (32000 B/s).
//!
//! Every `speech_end` must have its `transcript`, or the bench fails. Without `--bench` (e.g.
//! `cargo test --benches`) it runs 5 utterances without `--pace`, as a quick smoke test.

// The 80-line limit is for src/: a test or a bench is one scenario, read from top to bottom.
#![allow(clippy::too_many_lines)]

/// The integration tests' helpers: the test server and the noise generator.
#[path = "../tests/common/mod.rs"]
mod testkit;
use testkit::{noise, server};

mod common;
use common::{missing_tool, ms, read_wav, spool_dir, toml_string, tool};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use server::{Reply, Server};

const RATE: usize = 16_000;
/// Full run: 10 phrases × 10 voices.
const FULL_UTTERANCES: usize = 100;
const SMOKE_UTTERANCES: usize = 5;
/// Silence after each utterance; the default `vad.silence_ms` (800) closes it well inside.
const GAP_MS: usize = 1200;
/// Silence before the first utterance.
const LEAD_MS: usize = 500;
/// RMS of the noise floor added everywhere (about -60 dBFS, as in the integration tests), so
/// that the pre-roll and closing silence cost what they would from a real microphone.
const NOISE_RMS: f64 = 33.0;
/// Samples above this (-40 dBFS) count as speech when trimming espeak-ng's own silence.
const LOUD: u16 = 328;
/// 16-bit 16 kHz mono WAV, for comparison.
const WAV_BYTES_PER_S: f64 = 32_000.0;
const KEY: &str = "sk-bench";

/// Short commands, as spoken to a kiosk.
const PHRASES: [&str; 10] = [
    "Lights on.",
    "What time is it?",
    "Stop the music.",
    "Next song, please.",
    "Call my mother.",
    "Turn the volume up.",
    "Lock the front door.",
    "Set a timer.",
    "Good morning.",
    "Thank you.",
];

/// espeak-ng voice and speed of each round of the phrases, so that no two utterances are alike.
const VOICES: [(&str, u32); 10] = [
    ("en-us", 160),
    ("en-us+f2", 175),
    ("en-gb", 150),
    ("en-us+m3", 185),
    ("en-gb+f3", 165),
    ("en-us+m5", 155),
    ("en-gb+f4", 190),
    ("en-us+m7", 170),
    ("en-gb+m2", 180),
    ("en-us+f5", 160),
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upload bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    // `cargo bench` passes `--bench`; any other run (cargo test --benches) is a quick smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full {
        FULL_UTTERANCES
    } else {
        SMOKE_UTTERANCES
    };

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    let wav = data.join(format!("upload{n}.wav"));
    if !full && !is_current(&wav, n) && missing_tool().is_some() {
        println!("upload bench: espeak-ng or sox missing; smoke test skipped");
        return Ok(());
    }
    make_speech_file(&data, &wav, n)?;
    let voiced_s = read_voiced(&wav)? as f64 / RATE as f64;
    let file_s = wav_seconds(&wav)?;

    let (spool, tmpfs) = spool_dir("hark-upload-bench");
    let server = Server::start(None, |_, _| Reply::Json(200, r#"{"text":"ok"}"#.to_owned()));
    let result = run_hark(&wav, &spool, &server.url(), full, file_s);
    let _ = std::fs::remove_dir_all(&spool);
    let lines = result?;

    let utts = match_events(&lines, n)?;
    let requests = server.requests();
    let connections = server.connections();
    drop(server);

    // Server side: when each utterance's request was complete, and what it weighed.
    let mut received: HashMap<String, Instant> = HashMap::new();
    let mut body_bytes = 0usize;
    let mut ogg_bytes = 0usize;
    for req in &requests {
        body_bytes += req.body.len();
        let file = req
            .part("file")
            .ok_or_else(|| format!("a request to {} has no `file` part", req.target))?;
        ogg_bytes += file.data.len();
        if !file.data.starts_with(b"OggS") {
            return Err("a `file` part is not an Ogg stream".into());
        }
        let id = file
            .filename
            .as_deref()
            .and_then(|f| f.strip_suffix(".ogg"))
            .ok_or_else(|| format!("`file` part named {:?}, not <id>.ogg", file.filename))?;
        received.insert(id.to_owned(), req.at);
    }
    if requests.len() != utts.len() {
        return Err(format!(
            "{} requests for {} utterances (retries?)",
            requests.len(),
            utts.len()
        ));
    }

    let inside: Vec<f64> = utts.iter().map(|u| u.latency_ms as f64).collect();
    let outside: Vec<f64> = utts.iter().map(|u| ms(u.transcript - u.end)).collect();
    let mut to_server = Vec::new();
    let mut from_server = Vec::new();
    for u in &utts {
        let at = received
            .get(&u.id)
            .ok_or_else(|| format!("no request carried utterance {}", u.id))?;
        to_server.push(ms(at.saturating_duration_since(u.end)));
        from_server.push(ms(u.transcript.saturating_duration_since(*at)));
    }
    let audio_s: f64 = utts.iter().map(|u| u.duration_ms as f64 / 1000.0).sum();

    println!();
    println!(
        "hark upload bench: {} ({file_s:.1} s, {voiced_s:.1} s voiced), {}, spool in {}{}, server {}",
        wav.display(),
        if full { "--pace" } else { "not paced" },
        spool.display(),
        if tmpfs { " (tmpfs)" } else { "" },
        requests.first().map_or("-", |r| r.target.as_str()),
    );
    println!(
        "utterances: {} (every speech_end has its transcript); {} requests on {connections} connection(s); attempts: {}",
        utts.len(),
        requests.len(),
        attempts_summary(&utts)
    );
    print_latency(
        "latency_ms (hark: speech_end -> transcript)",
        &inside,
        true,
        0,
    );
    print_latency(
        "measured here (transcript line read - speech_end line read)",
        &outside,
        true,
        1,
    );
    print_latency(
        "  of which speech_end line -> request at server",
        &to_server,
        false,
        1,
    );
    print_latency(
        "  of which request at server -> transcript line",
        &from_server,
        false,
        1,
    );
    let diff: Vec<f64> = outside.iter().zip(&inside).map(|(o, i)| o - i).collect();
    print_latency("  here - hark (per utterance)", &diff, false, 1);

    let per_s = |bytes: usize| bytes as f64 / audio_s;
    println!(
        "bytes: {body_bytes} multipart, {ogg_bytes} Ogg, for {audio_s:.1} s of utterances (sum of duration_ms; {voiced_s:.1} s of it voiced)"
    );
    println!(
        "  multipart: {:.0} B per audio second ({:.1}% of WAV's 32000 B/s; {:.0} B per voiced second)  target <= 3500: {}",
        per_s(body_bytes),
        100.0 * per_s(body_bytes) / WAV_BYTES_PER_S,
        body_bytes as f64 / voiced_s,
        verdict(per_s(body_bytes) <= 3500.0),
    );
    println!(
        "  Ogg alone: {:.0} B per audio second ({:.1}% of WAV's 32000 B/s; {:.0} B per voiced second); multipart overhead {:.0} B per request",
        per_s(ogg_bytes),
        100.0 * per_s(ogg_bytes) / WAV_BYTES_PER_S,
        ogg_bytes as f64 / voiced_s,
        (body_bytes - ogg_bytes) as f64 / requests.len() as f64,
    );
    if !full {
        println!(
            "(smoke test: {n} utterances without --pace, so uploads queue; use `cargo bench --bench upload` for figures)"
        );
    }
    Ok(())
}

/// One utterance as seen on hark's stdout.
struct Utterance {
    id: String,
    duration_ms: u64,
    /// When the bench read its `speech_end` line.
    end: Instant,
    /// When the bench read its `transcript` line.
    transcript: Instant,
    latency_ms: u64,
    attempts: u64,
}

/// A stdout line and when it was read.
struct Line {
    at: Instant,
    json: serde_json::Value,
}

/// Runs hark on `wav` until it exits (killed after the file's length plus a minute) and returns
/// its stdout lines, each stamped when it was read.
fn run_hark(
    wav: &Path,
    spool: &Path,
    url: &str,
    pace: bool,
    file_s: f64,
) -> Result<Vec<Line>, String> {
    // Hermetic, like the tests: no log filter, key or proxy from the machine running the bench.
    let mut cmd = testkit::hark();
    cmd.arg("-i").arg(wav);
    if pace {
        cmd.arg("--pace");
    }
    for set in [
        format!("spool.dir={}", toml_string(spool)?),
        "output.status_interval_s=0".to_owned(),
        format!("transcribe.endpoint={}", toml_string(Path::new(url))?),
        "transcribe.api_key_env=\"HARK_BENCH_KEY\"".to_owned(),
    ] {
        cmd.arg("-s").arg(set);
    }
    cmd.env("HARK_BENCH_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", env!("CARGO_BIN_EXE_hark")))?;
    let pid = child.id() as libc::pid_t;
    let limit = Duration::from_secs_f64(file_s + 60.0);
    let (stop, stopped) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if stopped.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            testkit::kill(pid, libc::SIGKILL);
            true
        } else {
            false
        }
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut lines = Vec::new();
    let mut bad = None;
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    for line in stdout.lines() {
        let at = Instant::now();
        let Ok(line) = line else { break };
        match serde_json::from_str(&line) {
            Ok(json) => lines.push(Line { at, json }),
            Err(e) => {
                bad.get_or_insert(format!(
                    "hark printed a line that is not JSON ({e}): {line}"
                ));
            }
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for hark: {e}"))?;
    let _ = stop.send(());
    let killed = watchdog.join().unwrap_or(false);
    let stderr = errors.join().unwrap_or_default();
    if killed {
        return Err(format!(
            "hark did not finish within {limit:?} and was killed; its stderr:\n{stderr}"
        ));
    }
    if !status.success() {
        return Err(format!("hark failed ({status}); its stderr:\n{stderr}"));
    }
    if let Some(bad) = bad {
        return Err(bad);
    }
    Ok(lines)
}

/// Pairs every `speech_end` with its `transcript`; fails unless there are exactly `expected`
/// utterances, each with a transcript, and nothing was dropped or failed.
fn match_events(lines: &[Line], expected: usize) -> Result<Vec<Utterance>, String> {
    let str_of = |l: &Line, key: &str| {
        l.json[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("event without `{key}`: {}", l.json))
    };
    let u64_of = |l: &Line, key: &str| {
        l.json[key]
            .as_u64()
            .ok_or_else(|| format!("event without `{key}`: {}", l.json))
    };
    let mut utts: Vec<Utterance> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut orphans = Vec::new();
    let mut problems = Vec::new();
    for l in lines {
        match l.json["type"].as_str().unwrap_or_default() {
            "speech_end" => {
                let id = str_of(l, "utterance")?;
                index.insert(id.clone(), utts.len());
                utts.push(Utterance {
                    id,
                    duration_ms: u64_of(l, "duration_ms")?,
                    end: l.at,
                    // Replaced by the transcript's; checked below.
                    transcript: l.at,
                    latency_ms: u64::MAX,
                    attempts: 0,
                });
            }
            "transcript" => {
                let id = str_of(l, "utterance")?;
                match index.get(&id) {
                    Some(&i) => {
                        let u = &mut utts[i];
                        u.transcript = l.at;
                        u.latency_ms = u64_of(l, "latency_ms")?;
                        u.attempts = u64_of(l, "attempts")?;
                    }
                    None => orphans.push(id),
                }
            }
            "dropped" | "error" => problems.push(l.json.to_string()),
            _ => {}
        }
    }
    let missing: Vec<&str> = utts
        .iter()
        .filter(|u| u.latency_ms == u64::MAX)
        .map(|u| u.id.as_str())
        .collect();
    if !missing.is_empty() || !orphans.is_empty() || !problems.is_empty() {
        return Err(format!(
            "{} of {} utterances have no transcript {missing:?}; transcripts without speech_end: {orphans:?}; dropped/error events: {problems:?}",
            missing.len(),
            utts.len()
        ));
    }
    if utts.len() != expected {
        return Err(format!(
            "hark cut {} utterances, not the {expected} spoken (durations ms: {:?})",
            utts.len(),
            utts.iter().map(|u| u.duration_ms).collect::<Vec<_>>()
        ));
    }
    Ok(utts)
}

fn attempts_summary(utts: &[Utterance]) -> String {
    let max = utts.iter().map(|u| u.attempts).max().unwrap_or(0);
    if max <= 1 {
        "1 each".to_owned()
    } else {
        format!(
            "{} took more than one (max {max})",
            utts.iter().filter(|u| u.attempts > 1).count()
        )
    }
}

/// p50, p90, p99 and max of `values` (ms), with the targets beside them when `targets`.
fn print_latency(what: &str, values: &[f64], targets: bool, decimals: usize) {
    let (p50, p90, p99, max) = (
        percentile(values, 50.0),
        percentile(values, 90.0),
        percentile(values, 99.0),
        percentile(values, 100.0),
    );
    let mut line = format!(
        "{what}: p50 {p50:.decimals$} ms, p90 {p90:.decimals$} ms, p99 {p99:.decimals$} ms, max {max:.decimals$} ms"
    );
    if targets {
        line.push_str(&format!(
            "  target p50 <= 20: {}, p99 <= 50: {}",
            verdict(p50 <= 20.0),
            verdict(p99 <= 50.0)
        ));
    }
    println!("{line}");
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

/// Nearest-rank percentile (p in 0..=100) of `values`; 0 when there are none.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The first `n` utterances: (voice, speed, text), phrase by phrase within each voice.
fn script(n: usize) -> Vec<(&'static str, u32, &'static str)> {
    VOICES
        .iter()
        .flat_map(|&(voice, speed)| PHRASES.iter().map(move |&text| (voice, speed, text)))
        .take(n)
        .collect()
}

/// What `wav` was made from, kept beside it so that a changed recipe makes it again.
fn recipe(n: usize) -> String {
    let mut r = format!(
        "espeak-ng -v VOICE -s SPEED; sox -D -r 16000 -c 1 -b 16; trimmed at |s| > {LOUD}; lead {LEAD_MS} ms, gap {GAP_MS} ms, noise rms {NOISE_RMS}\n"
    );
    for (voice, speed, text) in script(n) {
        r.push_str(&format!("{voice}\t{speed}\t{text}\n"));
    }
    r
}

fn recipe_path(wav: &Path) -> PathBuf {
    wav.with_extension("txt")
}

/// Where the number of voiced samples (the trimmed espeak-ng pieces) is kept.
fn voiced_path(wav: &Path) -> PathBuf {
    wav.with_extension("voiced")
}

fn read_voiced(wav: &Path) -> Result<usize, String> {
    let path = voiced_path(wav);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{}: not a number: {text:?}", path.display()))
}

/// Length of a WAV file in seconds.
fn wav_seconds(wav: &Path) -> Result<f64, String> {
    let r =
        hound::WavReader::open(wav).map_err(|e| format!("cannot read {}: {e}", wav.display()))?;
    Ok(f64::from(r.duration()) / f64::from(r.spec().sample_rate))
}

/// Whether `wav` is there, 16 kHz mono s16, and made from the current recipe.
fn is_current(wav: &Path, n: usize) -> bool {
    let valid = hound::WavReader::open(wav).is_ok_and(|r| {
        let s = r.spec();
        s.sample_rate == RATE as u32
            && s.channels == 1
            && s.bits_per_sample == 16
            && s.sample_format == hound::SampleFormat::Int
            && r.len() > 0
    });
    valid
        && read_voiced(wav).is_ok()
        && std::fs::read_to_string(recipe_path(wav)).is_ok_and(|r| r == recipe(n))
}

/// Make `wav` (n utterances) unless it is already there.
fn make_speech_file(data: &Path, wav: &Path, n: usize) -> Result<(), String> {
    if is_current(wav, n) {
        return Ok(());
    }
    if let Some(tool) = missing_tool() {
        return Err(format!(
            "{tool} is needed to make the speech file {}: install it with `apt-get install espeak-ng sox`",
            wav.display()
        ));
    }
    let tmp = data.join(format!("tmp-upload-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let result = make_in(&tmp, wav, n);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    if !is_current(wav, n) {
        return Err(format!(
            "{} was made but is not 16 kHz mono s16",
            wav.display()
        ));
    }
    println!("made {}", wav.display());
    Ok(())
}

fn make_in(tmp: &Path, wav: &Path, n: usize) -> Result<(), String> {
    let ms = RATE / 1000;
    let mut samples = vec![0i16; LEAD_MS * ms];
    let mut voiced = 0;
    for (i, (voice, speed, text)) in script(n).into_iter().enumerate() {
        let raw = tmp.join(format!("raw{i:03}.wav"));
        let part = tmp.join(format!("s{i:03}.wav"));
        tool(
            Command::new("espeak-ng")
                .args(["-v", voice, "-s", &speed.to_string(), "-w"])
                .arg(&raw)
                .arg(text),
        )?;
        tool(
            Command::new("sox")
                .arg(&raw)
                .args(["-D", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed"])
                .arg(&part),
        )?;
        let pcm = read_wav(&part)?;
        // espeak-ng's own leading and trailing silence out: the gap is exactly GAP_MS.
        let loud = |s: &i16| s.unsigned_abs() > LOUD;
        let (Some(first), Some(last)) = (pcm.iter().position(loud), pcm.iter().rposition(loud))
        else {
            return Err(format!("espeak-ng said nothing for {text:?} ({voice})"));
        };
        samples.extend_from_slice(&pcm[first..=last]);
        voiced += last + 1 - first;
        samples.extend(std::iter::repeat_n(0, GAP_MS * ms));
    }
    let floor = noise(samples.len(), NOISE_RMS, 7);
    for (s, n) in samples.iter_mut().zip(floor) {
        *s = s.saturating_add(n);
    }
    let partial = tmp.join("out.wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE as u32,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&partial, spec)
        .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    for s in samples {
        w.write_sample(s)
            .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    }
    w.finalize()
        .map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    std::fs::rename(&partial, wav).map_err(|e| format!("cannot move to {}: {e}", wav.display()))?;
    let path = voiced_path(wav);
    std::fs::write(&path, format!("{voiced}\n"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let path = recipe_path(wav);
    std::fs::write(&path, recipe(n)).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
