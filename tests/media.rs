//! FLAC, MP3 and Ogg/Opus input end to end, with the real binary: made by sox, lame and opusenc
//! from a 16 kHz mono WAV of espeak-ng speech, each must give that WAV's utterances, from a file or
//! a pipe; damaged, cut and empty files end cleanly or with a clear error.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SENTENCES: [&str; 3] = [
    "The kitchen lights are on.",
    "Please lock the front door now.",
    "Remind me to water the plants tomorrow.",
];

/// How far each utterance's offset_ms and duration_ms may be from the WAV's. FLAC is lossless;
/// MP3 (gapless: the LAME header's encoder delay and padding are trimmed) and Opus (the decoder
/// drops the pre-skip) keep the timeline, and their coding noise rarely moves a VAD decision.
/// Measured on this speech: 0 ms for every format here, the lossy ones included.
const TOLERANCE_MS: u64 = 60;

fn tool(program: &str, package: &str, args: &[&str], input: &Path, output: &Path) {
    require(program, package);
    let mut cmd = Command::new(program);
    // sox takes its options after the input file; lame and opusenc before it.
    if program == "sox" {
        cmd.arg(input).args(args).arg(output);
    } else {
        cmd.args(args).arg(input).arg(output);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// The 16 kHz mono WAV of three sentences and its utterances.
fn reference(dir: &Path) -> (PathBuf, Vec<(u64, u64)>) {
    let pieces: Vec<Vec<i16>> = SENTENCES.iter().map(|s| speech(s, dir)).collect();
    let t = timeline(&pieces, 1500, 1000, 33.0);
    let wav = dir.join("mono16.wav");
    write_wav(&wav, &t.samples, RATE, 1);
    let (_, events) = run_input(&wav, &dir.join("spool-ref"), &[]);
    let spans = spans(&utterances(&events));
    assert_eq!(spans.len(), 3, "{events:#?}");
    (wav, spans)
}

fn assert_close(name: &str, got: &[(u64, u64)], want: &[(u64, u64)], tolerance: u64) {
    assert_eq!(got.len(), want.len(), "{name}: {got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.0.abs_diff(w.0) <= tolerance && g.1.abs_diff(w.1) <= tolerance,
            "{name}: utterance (offset_ms, duration_ms) {g:?} vs the WAV's {w:?} \
             (tolerance {tolerance} ms): {got:?} vs {want:?}"
        );
    }
}

#[test]
fn flac_mp3_and_ogg_opus_give_the_same_utterances_as_the_wav() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (wav, want) = reference(d);
    let stereo48 = d.join("stereo48.wav");
    tool("sox", "sox", &["-r", "48000", "-c", "2"], &wav, &stereo48);

    let flac16 = d.join("mono16.flac");
    tool("sox", "sox", &[], &wav, &flac16);
    let flac48 = d.join("stereo48.flac");
    tool("sox", "sox", &[], &stereo48, &flac48);
    // At lame's default bitrate for 16 kHz mono (24 kbit/s) a frame is too small for the
    // Xing/LAME header, so lame leaves it out, and with it the encoder delay and padding that
    // gapless decoding trims: the timeline would start 69 ms late (1105 samples of encoder and
    // decoder delay) and end later still. 64 kbit/s keeps the header.
    let mp3_16 = d.join("mono16.mp3");
    tool("lame", "lame", &["--quiet", "-b", "64"], &wav, &mp3_16);
    let mp3_48 = d.join("stereo48.mp3");
    tool("lame", "lame", &["--quiet"], &stereo48, &mp3_48);
    let opus16 = d.join("mono16.opus");
    tool("opusenc", "opus-tools", &["--quiet"], &wav, &opus16);
    let opus48 = d.join("stereo48.ogg");
    tool("opusenc", "opus-tools", &["--quiet"], &stereo48, &opus48);

    let (_, events) = run_input(&stereo48, &d.join("spool-wav48"), &[]);
    assert_close(
        "48 kHz stereo WAV",
        &spans(&utterances(&events)),
        &want,
        TOLERANCE_MS,
    );
    for input in [&flac16, &flac48, &mp3_16, &mp3_48, &opus16, &opus48] {
        let name = input.file_name().unwrap().to_string_lossy().into_owned();
        let (out, events) = run_input(input, &d.join(format!("spool-{name}")), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("WARN"), "{name}: {stderr}");
        assert_close(&name, &spans(&utterances(&events)), &want, TOLERANCE_MS);
    }
}

#[test]
fn a_flac_read_through_a_pipe_gives_the_same_utterances() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (wav, want) = reference(d);
    let flac = d.join("mono16.flac");
    tool("sox", "sox", &[], &wav, &flac);
    // `-i /dev/stdin` is a pipe: the first bytes recognise FLAC and are put back in front.
    let mut args = base_args(&d.join("spool"));
    args.extend(["-i".to_string(), "/dev/stdin".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with_stdin(&refs, Some(std::fs::read(&flac).unwrap()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(spans(&utterances(&events(&out.stdout))), want);
}

#[test]
fn an_ogg_opus_read_through_a_pipe_gives_the_same_utterances() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (wav, want) = reference(d);
    let opus = d.join("mono16.opus");
    tool("opusenc", "opus-tools", &["--quiet"], &wav, &opus);
    // Decoded as it comes down the pipe: the first bytes recognise Ogg and are put back.
    let mut args = base_args(&d.join("spool"));
    args.extend(["-i".to_string(), "/dev/stdin".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with_stdin(&refs, Some(std::fs::read(&opus).unwrap()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_close(
        "piped Ogg/Opus",
        &spans(&utterances(&events(&out.stdout))),
        &want,
        TOLERANCE_MS,
    );
}

/// Run hark on `input`; the exit code, stderr and utterances. Never a panic.
fn run_bad(input: &Path, spool: &Path) -> (Option<i32>, String, Vec<(u64, u64)>) {
    let mut args = base_args(spool);
    args.extend(["-i".to_string(), input.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&refs);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.code(),
        stderr,
        spans(&utterances(&events(&out.stdout))),
    )
}

#[test]
fn damaged_empty_and_cut_files_are_clear_errors_or_clean_ends() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (wav, want) = reference(d);

    // An empty .flac: nothing to decode, said with the path; exit 1.
    let empty = d.join("empty.flac");
    std::fs::write(&empty, b"").unwrap();
    let (code, stderr, _) = run_bad(&empty, &d.join("s1"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("empty.flac") && stderr.contains("empty"),
        "{stderr}"
    );

    // A valid FLAC header, then garbage: the header's frame count is not reached, which is an
    // error naming the file (exit 1), like a truncated WAV.
    let flac = d.join("mono16.flac");
    tool("sox", "sox", &[], &wav, &flac);
    let mut bytes = std::fs::read(&flac).unwrap();
    let keep = 8192;
    let garbage = noise(bytes.len() - keep, 10_000.0, 3);
    bytes.truncate(keep);
    bytes.extend(le_bytes(&garbage));
    let corrupt = d.join("corrupt.flac");
    std::fs::write(&corrupt, &bytes).unwrap();
    let (code, stderr, _) = run_bad(&corrupt, &d.join("s2"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("corrupt.flac") && stderr.contains("frames its header declares"),
        "{stderr}"
    );

    // An MP3 cut two thirds in (mid-frame): MPEG audio has no declared end, so it ends cleanly
    // where it was cut, with the sentences before the cut.
    let mp3 = d.join("mono16.mp3");
    tool("lame", "lame", &["--quiet", "-b", "64"], &wav, &mp3);
    let mut bytes = std::fs::read(&mp3).unwrap();
    bytes.truncate(bytes.len() * 2 / 3 + 7);
    let cut = d.join("cut.mp3");
    std::fs::write(&cut, &bytes).unwrap();
    let (code, stderr, got) = run_bad(&cut, &d.join("s3"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(got.len() >= 2, "{got:?}");
    assert_close("cut MP3", &got[..2], &want[..2], TOLERANCE_MS);

    // An Ogg/Opus file cut two thirds in (inside a page, in the second sentence): read as a
    // stream, it delivers the audio of the pages before the cut (the first sentence whole, the
    // second up to the cut page), then the cut page is an error naming the file and where (exit
    // 1), as for a truncated FLAC or WAV.
    let opus = d.join("mono16.opus");
    tool("opusenc", "opus-tools", &["--quiet"], &wav, &opus);
    let mut bytes = std::fs::read(&opus).unwrap();
    bytes.truncate(bytes.len() * 2 / 3 + 7);
    let cut = d.join("cut.opus");
    std::fs::write(&cut, &bytes).unwrap();
    let (code, stderr, got) = run_bad(&cut, &d.join("s4"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cut.opus") && stderr.contains("truncated inside the Ogg page"),
        "{stderr}"
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert_close("cut Ogg/Opus", &got[..1], &want[..1], TOLERANCE_MS);
    assert!(
        got[1].0.abs_diff(want[1].0) <= TOLERANCE_MS && got[1].1 < want[1].1,
        "cut Ogg/Opus: {got:?} vs {want:?}"
    );
}

#[test]
fn pace_feeds_a_flac_at_real_time_speed() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("two.wav");
    write_wav(&wav, &vec![0i16; RATE as usize * 2], RATE, 1);
    let flac = dir.path().join("two.flac");
    tool("sox", "sox", &[], &wav, &flac);
    let started = std::time::Instant::now();
    run_input(&flac, &dir.path().join("spool"), &["--pace"]);
    // A lower bound only: pacing sleeps until each period is due, whatever the machine's speed.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}
