//! Pipeline benchmark: `cargo bench --bench pipeline` (`benches/measure.sh` adds peak RSS and the
//! stripped binary size).
//!
//! On a 60 s speech file (espeak-ng sentences separated by 1–2 s of silence, made once into
//! `target/bench-data/speech60.wav`) it measures, interleaved round by round:
//!
//! - (a) VAD alone: `Vad::is_voice` and `vad::energy` over every 20 ms frame;
//! - (b) Opus+Ogg encoding alone of exactly the spans the pipeline kept as utterances;
//! - (c) the whole pipeline, file → ring → VAD → encoder → spool on tmpfs, via `cmd::run::run`;
//!
//! and prints the minimum and median of each, per audio second, and c / (a + b).
//! Without `--bench` (e.g. `cargo test --benches`) it runs each measurement once, as a smoke test.

// The 80-line limit is for src/: a test or a bench is one scenario, read from top to bottom.
#![allow(clippy::too_many_lines)]

mod common;
use common::{missing_tool, ms, read_wav, spool_dir, toml_string, tool};

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use hark::cli::RunArgs;
use hark::codec::{EncodeSettings, OggOpusWriter};
use hark::config::Config;
use hark::vad::{self, Vad};

const RATE: usize = 16_000;
/// 20 ms at 16 kHz, as the pipeline's default `vad.frame_ms`.
const FRAME: usize = 320;
const SECONDS: usize = 60;
const MIN_RUNS: usize = 5;
const DEFAULT_RUNS: usize = 9;

/// Spoken by espeak-ng, each followed by the silence (seconds) beside it: about 42 s of speech
/// and 58 s in all, padded with silence to 60 s, so that every sentence ends inside the file.
const SENTENCES: &[(&str, &str)] = &[
    (
        "Please remind me to call the dentist tomorrow morning at nine.",
        "1.5",
    ),
    (
        "Turn off the lights in the kitchen and lock the back door before you go to bed tonight.",
        "1.0",
    ),
    (
        "What will the weather be like this weekend in the mountains?",
        "2.0",
    ),
    (
        "Add milk, eggs, two loaves of bread and a bag of coffee beans to the shopping list.",
        "1.25",
    ),
    (
        "The meeting with the design team has been moved to Thursday afternoon.",
        "1.75",
    ),
    (
        "How many kilometres is it from the station to the old harbour?",
        "1.5",
    ),
    (
        "Read me the last three messages from my sister, and then reply that I will be late.",
        "2.0",
    ),
    (
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "1.25",
    ),
    (
        "Remember that the car needs new tyres before the long drive in December.",
        "1.5",
    ),
    ("Thank you, that will be all for now, good night.", "2.0"),
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    // `cargo bench` passes `--bench`; any other run (cargo test --benches) is a quick smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let runs = if full {
        match std::env::var("HARK_BENCH_RUNS") {
            Ok(v) => v
                .parse::<usize>()
                .map_err(|_| format!("HARK_BENCH_RUNS={v:?} is not a number"))?
                .max(MIN_RUNS),
            Err(_) => DEFAULT_RUNS,
        }
    } else {
        1
    };

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    let wav = data.join("speech60.wav");
    if !full && !is_current(&wav) && missing_tool().is_some() {
        println!("pipeline bench: espeak-ng or sox missing; smoke test skipped");
        return Ok(());
    }
    make_speech_file(&data, &wav)?;
    let pcm = read_wav(&wav)?;
    let audio_s = pcm.len() as f64 / RATE as f64;

    let (spool, tmpfs) = spool_dir("hark-bench");
    if !tmpfs {
        println!(
            "note: /dev/shm is missing; the spool is in {} (may not be tmpfs)",
            spool.display()
        );
    }
    let config = pipeline_config(&wav, &spool)?;

    // A first pipeline run (also a warm-up) tells which spans are utterances.
    let (_, utterances) = pipeline_once(&config, &spool)?;
    let spans = read_spans(&spool, pcm.len())?;
    if spans.len() as u64 != utterances {
        return Err(format!(
            "the pipeline reported {utterances} utterances but the spool holds {} .json files",
            spans.len()
        ));
    }
    let speech_samples: usize = spans.iter().map(|(a, b)| b - a).sum();
    let speech_s = speech_samples as f64 / RATE as f64;
    // Warm-ups for (a) and (b).
    black_box(vad_once(&pcm));
    black_box(encode_once(&pcm, &spans)?);

    let mut a = Vec::with_capacity(runs);
    let mut b = Vec::with_capacity(runs);
    let mut c = Vec::with_capacity(runs);
    let mut ogg_bytes = 0;
    for _ in 0..runs {
        a.push(measure(|| Ok(black_box(vad_once(&pcm))))?.0);
        let (t, bytes) = measure(|| encode_once(&pcm, &spans))?;
        ogg_bytes = bytes;
        b.push(t);
        let (t, n) = measure(|| pipeline_once(&config, &spool).map(|r| r.1))?;
        if n != utterances {
            return Err(format!(
                "the pipeline made {n} utterances, not {utterances} as in the first run"
            ));
        }
        c.push(t);
    }
    let spooled = spool_ogg_bytes(&spool);
    let _ = std::fs::remove_dir_all(&spool);

    println!();
    println!(
        "hark pipeline bench: {} ({audio_s:.1} s), {runs} runs each, spool in {}{}",
        wav.display(),
        spool.display(),
        if tmpfs { " (tmpfs)" } else { "" }
    );
    println!(
        "speech: {} utterances, {speech_s:.2} s of the {audio_s:.1} s kept; Ogg bytes: bench {ogg_bytes}, spool {spooled}",
        spans.len()
    );
    let (wall_a, cpu_a) = split(&a);
    let (wall_b, cpu_b) = split(&b);
    let (wall_c, cpu_c) = split(&c);
    println!(
        "vad (a): min {:.2} ms, median {:.2} ms  (min {:.4}, median {:.4} ms per audio second)",
        ms(min(&wall_a)),
        ms(median(&wall_a)),
        ms(min(&wall_a)) / audio_s,
        ms(median(&wall_a)) / audio_s,
    );
    println!(
        "encode (b): min {:.2} ms, median {:.2} ms  (min {:.3}, median {:.3} ms per file second; min {:.3}, median {:.3} ms per speech second)",
        ms(min(&wall_b)),
        ms(median(&wall_b)),
        ms(min(&wall_b)) / audio_s,
        ms(median(&wall_b)) / audio_s,
        ms(min(&wall_b)) / speech_s,
        ms(median(&wall_b)) / speech_s,
    );
    println!(
        "pipeline (c): min {:.2} ms, median {:.2} ms  (min {:.3}, median {:.3} ms per audio second)",
        ms(min(&wall_c)),
        ms(median(&wall_c)),
        ms(min(&wall_c)) / audio_s,
        ms(median(&wall_c)) / audio_s,
    );
    println!(
        "c / (a + b): median {:.3}, min {:.3}  (wall time; target <= 1.25)",
        ms(median(&wall_c)) / (ms(median(&wall_a)) + ms(median(&wall_b))),
        ms(min(&wall_c)) / (ms(min(&wall_a)) + ms(min(&wall_b))),
    );
    println!(
        "cpu time (process, all threads): vad median {:.2} ms, encode median {:.2} ms, pipeline median {:.2} ms; c / (a + b): median {:.3}, min {:.3}",
        ms(median(&cpu_a)),
        ms(median(&cpu_b)),
        ms(median(&cpu_c)),
        ms(median(&cpu_c)) / (ms(median(&cpu_a)) + ms(median(&cpu_b))),
        ms(min(&cpu_c)) / (ms(min(&cpu_a)) + ms(min(&cpu_b))),
    );
    let list = |d: &[Duration]| {
        d.iter()
            .map(|d| format!("{:.1}", ms(*d)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "every run, wall ms: vad [{}]; encode [{}]; pipeline [{}]",
        list(&wall_a),
        list(&wall_b),
        list(&wall_c)
    );
    if !full {
        println!("(smoke test: one run each; use `cargo bench --bench pipeline` for figures)");
    }
    Ok(())
}

/// (a): the VAD decision and the energy of every whole frame, as the dsp thread computes them.
fn vad_once(pcm: &[i16]) -> (usize, f64) {
    let mut vad = Vad::new(2);
    let mut voiced = 0;
    let mut energy = 0.0;
    for frame in pcm.chunks_exact(FRAME) {
        voiced += usize::from(vad.is_voice(black_box(frame)));
        energy += vad::energy(frame);
    }
    (voiced, energy)
}

/// (b): each span into its own Ogg/Opus stream in memory, in 320-sample writes; returns the bytes.
fn encode_once(pcm: &[i16], spans: &[(usize, usize)]) -> Result<usize, String> {
    let settings = EncodeSettings {
        bitrate: 24_000,
        complexity: 5,
    };
    let mut bytes = 0;
    for &(start, end) in spans {
        let mut w = OggOpusWriter::new(Vec::new(), &settings, "bench", &[], 1)
            .map_err(|e| format!("encoder: {e}"))?;
        for chunk in pcm[start..end].chunks(FRAME) {
            w.write(chunk).map_err(|e| format!("encoder: {e}"))?;
        }
        let (out, _) = w.finish().map_err(|e| format!("encoder: {e}"))?;
        bytes += black_box(out).len();
    }
    Ok(bytes)
}

/// (c): one `--record-only` run of the daemon into an empty spool; returns (summary samples,
/// utterances kept).
fn pipeline_once(config: &Config, spool: &Path) -> Result<(u64, u64), String> {
    clear_dir(spool)?;
    let args = RunArgs {
        record_only: true,
        ..Default::default()
    };
    let summary = hark::cmd::run::run(config, &args).map_err(|e| format!("cmd::run::run: {e}"))?;
    if summary.samples != (SECONDS * RATE) as u64 {
        return Err(format!(
            "the pipeline read {} samples, not {}",
            summary.samples,
            SECONDS * RATE
        ));
    }
    Ok((summary.samples, summary.utterances))
}

fn pipeline_config(wav: &Path, spool: &Path) -> Result<Config, String> {
    let overrides = [
        r#"capture.source="file""#.to_owned(),
        format!("capture.file={}", toml_string(wav)?),
        format!("spool.dir={}", toml_string(spool)?),
        "output.stdout=false".to_owned(),
        "output.status_interval_s=0".to_owned(),
    ];
    Config::load(None, &overrides).map_err(|e| format!("config: {e}"))
}

fn clear_dir(dir: &Path) -> Result<(), String> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot clear {}: {e}", dir.display())),
    }
}

/// The utterances in the spool as sample ranges of the input, from `offset_ms` and `samples` of
/// each `<id>.json`, in stream order.
fn read_spans(spool: &Path, len: usize) -> Result<Vec<(usize, usize)>, String> {
    let entries =
        std::fs::read_dir(spool).map_err(|e| format!("cannot list {}: {e}", spool.display()))?;
    let mut spans = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let meta: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        let field = |key: &str| {
            meta.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("{}: no unsigned `{key}`", path.display()))
        };
        let start = field("offset_ms")? as usize * (RATE / 1000);
        let end = start + field("samples")? as usize;
        if end > len {
            return Err(format!(
                "{}: span {start}..{end} is beyond the file's {len} samples",
                path.display()
            ));
        }
        spans.push((start, end));
    }
    spans.sort_unstable();
    if spans.is_empty() {
        return Err(format!(
            "the pipeline kept no utterance in {}",
            spool.display()
        ));
    }
    Ok(spans)
}

fn spool_ogg_bytes(spool: &Path) -> u64 {
    std::fs::read_dir(spool)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".ogg"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Wall and process CPU time of `f`.
fn measure<T>(f: impl FnOnce() -> Result<T, String>) -> Result<((Duration, Duration), T), String> {
    let cpu = cpu_time();
    let wall = Instant::now();
    let out = f()?;
    let wall = wall.elapsed();
    let cpu = cpu_time().saturating_sub(cpu);
    Ok(((wall, cpu), out))
}

/// CPU time of the whole process (all threads).
#[allow(unsafe_code)]
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn split(samples: &[(Duration, Duration)]) -> (Vec<Duration>, Vec<Duration>) {
    samples.iter().copied().unzip()
}

fn min(d: &[Duration]) -> Duration {
    d.iter().copied().min().unwrap_or_default()
}

fn median(d: &[Duration]) -> Duration {
    let mut d = d.to_vec();
    d.sort_unstable();
    match d.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => d[n / 2],
        n => (d[n / 2 - 1] + d[n / 2]) / 2,
    }
}

/// Whether `path` is already the 60 s, 16 kHz mono s16 file.
fn is_valid_wav(path: &Path) -> bool {
    hound::WavReader::open(path).is_ok_and(|r| {
        let s = r.spec();
        s.sample_rate == RATE as u32
            && s.channels == 1
            && s.bits_per_sample == 16
            && s.sample_format == hound::SampleFormat::Int
            && r.len() as usize == SECONDS * RATE
    })
}

/// What `wav` was made from, kept beside it so that a changed recipe makes it again.
fn recipe() -> String {
    let mut r = format!("espeak-ng -v en-us -s 160; sox -D -r 16000 -c 1 -b 16; {SECONDS} s\n");
    for (text, gap) in SENTENCES {
        r.push_str(&format!("{text}\t{gap}\n"));
    }
    r
}

fn recipe_path(wav: &Path) -> PathBuf {
    wav.with_extension("txt")
}

/// Whether `wav` is there, well formed and made from the current [`SENTENCES`].
fn is_current(wav: &Path) -> bool {
    is_valid_wav(wav) && std::fs::read_to_string(recipe_path(wav)).is_ok_and(|r| r == recipe())
}

/// Make `wav` from the sentences unless it is already there.
fn make_speech_file(data: &Path, wav: &Path) -> Result<(), String> {
    if is_current(wav) {
        return Ok(());
    }
    if let Some(tool) = missing_tool() {
        return Err(format!(
            "{tool} is needed to make the 60 s speech file {}: install it with `apt-get install espeak-ng sox`",
            wav.display()
        ));
    }
    let tmp = data.join(format!("tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let result = make_in(&tmp, wav);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    if !is_valid_wav(wav) {
        return Err(format!(
            "{} was made but is not 60 s of 16 kHz mono s16",
            wav.display()
        ));
    }
    println!("made {}", wav.display());
    Ok(())
}

fn make_in(tmp: &Path, wav: &Path) -> Result<(), String> {
    let mut parts = Vec::new();
    for (i, (text, gap)) in SENTENCES.iter().enumerate() {
        let raw = tmp.join(format!("raw{i:02}.wav"));
        let part = tmp.join(format!("s{i:02}.wav"));
        tool(
            Command::new("espeak-ng")
                .args(["-v", "en-us", "-s", "160", "-w"])
                .arg(&raw)
                .arg(text),
        )?;
        tool(
            Command::new("sox")
                .arg(&raw)
                .args(["-D", "-r", "16000", "-c", "1", "-b", "16"])
                .arg(&part)
                .args(["pad", "0", gap]),
        )?;
        parts.push(part);
    }
    let joined = tmp.join("joined.wav");
    tool(Command::new("sox").args(&parts).arg(&joined))?;
    // Pad, then trim: exactly 60 s whatever the sentences add up to.
    let partial = tmp.join("speech60.wav");
    let secs = SECONDS.to_string();
    tool(
        Command::new("sox")
            .arg(&joined)
            .args(["-D", "-r", "16000", "-c", "1", "-b", "16"])
            .arg(&partial)
            .args(["pad", "0", &secs, "trim", "0", &secs]),
    )?;
    std::fs::rename(&partial, wav).map_err(|e| format!("cannot move to {}: {e}", wav.display()))?;
    let path = recipe_path(wav);
    std::fs::write(&path, recipe()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
