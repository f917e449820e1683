//! The file and stdin pipeline end to end, with the real binary and espeak-ng speech.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const SENTENCES: [&str; 3] = [
    "The kitchen lights are on.",
    "Please lock the front door now.",
    "Remind me to water the plants tomorrow.",
];

/// Default `[vad]` values the bounds below rely on.
const PRE_ROLL_MS: u64 = 300;
const SILENCE_MS: u64 = 800;

fn three_sentences(dir: &std::path::Path) -> Timeline {
    let pieces: Vec<Vec<i16>> = SENTENCES.iter().map(|s| speech(s, dir)).collect();
    // 1.5 s apart, over a noise floor of about -60 dBFS.
    timeline(&pieces, 1500, 1000, 33.0)
}

#[test]
fn sentences_apart_become_one_utterance_each_with_tight_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let t = three_sentences(dir.path());
    let wav = dir.path().join("three.wav");
    write_wav(&wav, &t.samples, RATE, 1);
    let spool = dir.path().join("spool");
    let (_, events) = run_input(&wav, &spool, &[]);

    let utts = utterances(&events);
    assert_eq!(utts.len(), 3, "events: {events:#?}");
    assert_eq!(of_type(&events, "speech_start").len(), 3);
    for (i, ((offset, duration, reason, _), (s, e))) in utts.iter().zip(&t.spans).enumerate() {
        let start_ms = *s as u64 / 16;
        let end_ms = (*e as u64).div_ceil(16);
        let utt_end = offset + duration;
        assert_eq!(reason, "silence");
        assert!(
            *offset <= start_ms,
            "utterance {i} starts at {offset} ms, after its speech at {start_ms} ms"
        );
        assert!(
            utt_end >= end_ms,
            "utterance {i} ends at {utt_end} ms, before its speech ends at {end_ms} ms"
        );
        assert!(
            start_ms - offset <= PRE_ROLL_MS + 150,
            "utterance {i} starts {} ms before its speech",
            start_ms - offset
        );
        assert!(
            utt_end - end_ms <= SILENCE_MS + 150,
            "utterance {i} ends {} ms after its speech",
            utt_end - end_ms
        );
    }
}

#[test]
fn every_ogg_passes_opusinfo_and_decodes_to_its_utterance_length() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/hello.wav");
    let spool = dir.path().join("spool");
    let (_, events) = run_input(&sample, &spool, &[]);
    let utts = utterances(&events);
    assert_eq!(utts.len(), 3, "the sample has three sentences: {events:#?}");
    // Ids sort in stream order even though a file is read faster than real time.
    let ids: Vec<&str> = of_type(&events, "speech_end")
        .iter()
        .map(|e| e["utterance"].as_str().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for (offset, duration, _, audio) in &utts {
        let audio = std::path::PathBuf::from(audio);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(audio.with_extension("json")).unwrap()).unwrap();
        let samples = meta["samples"].as_u64().unwrap();
        assert_eq!(
            samples,
            duration * 16,
            "duration_ms matches the sample count"
        );
        assert_eq!(meta["offset_ms"].as_u64(), Some(*offset));
        assert_eq!(
            check_ogg(&audio, dir.path()) as u64,
            samples,
            "{}",
            audio.display()
        );
    }
    // Nothing half-written is left behind.
    for entry in std::fs::read_dir(&spool).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with('.') || name == ".lock", "leftover {name}");
    }
}

#[test]
fn short_pauses_inside_a_sentence_keep_it_one_utterance() {
    let dir = tempfile::tempdir().unwrap();
    let pieces: Vec<Vec<i16>> = ["Turn on", "the lights", "in the hall"]
        .iter()
        .map(|s| speech(s, dir.path()))
        .collect();
    let t = timeline(&pieces, 300, 1000, 33.0);
    let wav = dir.path().join("pauses.wav");
    write_wav(&wav, &t.samples, RATE, 1);
    let (_, events) = run_input(
        &wav,
        &dir.path().join("spool"),
        &["-s", "vad.silence_ms=800"],
    );
    let utts = utterances(&events);
    assert_eq!(utts.len(), 1, "events: {events:#?}");
    let (offset, duration, _, _) = &utts[0];
    assert!(*offset <= t.spans[0].0 as u64 / 16);
    assert!(offset + duration >= t.spans[2].1 as u64 / 16);
}

#[test]
fn noise_alone_gives_no_utterance() {
    let dir = tempfile::tempdir().unwrap();
    for (name, rms) in [("quiet", 33.0), ("hiss", 300.0)] {
        let wav = dir.path().join(format!("{name}.wav"));
        write_wav(&wav, &noise(RATE as usize * 10, rms, 3), RATE, 1);
        let (_, events) = run_input(&wav, &dir.path().join(name), &[]);
        assert!(
            of_type(&events, "speech_start").is_empty()
                && of_type(&events, "speech_end").is_empty(),
            "{name} noise made utterances: {events:#?}"
        );
    }
}

#[test]
fn speech_longer_than_max_utterance_is_cut_into_contiguous_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let long = speech(
        "This is a long announcement that goes on and on without a real pause, because the \
         speaker keeps talking about the weather, the trains, the shops and the garden.",
        dir.path(),
    );
    assert!(
        long.len() > RATE as usize * 7,
        "espeak made {} samples",
        long.len()
    );
    let t = timeline(&[long], 0, 1000, 33.0);
    let wav = dir.path().join("long.wav");
    write_wav(&wav, &t.samples, RATE, 1);
    let (_, events) = run_input(
        &wav,
        &dir.path().join("spool"),
        &["-s", "vad.max_utterance_ms=3000"],
    );
    let utts = utterances(&events);
    assert!(utts.len() >= 3, "events: {events:#?}");
    for pair in utts.windows(2) {
        assert_eq!(pair[0].2, "max_length");
        assert_eq!(pair[0].0 + pair[0].1, pair[1].0, "pieces are contiguous");
    }
    for (_, duration, _, audio) in &utts {
        assert!(*duration <= 3000, "piece of {duration} ms");
        assert_eq!(
            check_ogg(std::path::Path::new(audio), dir.path()) as u64,
            duration * 16
        );
    }
    assert!(utts[0].0 <= t.spans[0].0 as u64 / 16);
    let last = utts.last().unwrap();
    assert!(last.0 + last.1 >= t.spans[0].1 as u64 / 16);
}

#[test]
fn stdin_and_a_48k_stereo_wav_give_the_same_utterances_as_the_16k_file() {
    let dir = tempfile::tempdir().unwrap();
    let t = three_sentences(dir.path());
    let wav = dir.path().join("mono16.wav");
    write_wav(&wav, &t.samples, RATE, 1);
    let (_, reference) = run_input(&wav, &dir.path().join("a"), &[]);
    let reference = utterances(&reference);
    assert_eq!(reference.len(), 3);

    // stdin: raw s16le 16 kHz mono through a pipe.
    let mut args = base_args(&dir.path().join("b"));
    args.extend(["-i".to_string(), "-".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with_stdin(&refs, Some(le_bytes(&t.samples)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(spans(&utterances(&events(&out.stdout))), spans(&reference));

    // 48 kHz stereo, speech in the right channel only, left channel loud noise.
    require("sox", "sox");
    let up = dir.path().join("up48.wav");
    let ok = std::process::Command::new("sox")
        .arg(&wav)
        .args(["-D", "-r", "48000"])
        .arg(&up)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mono48: Vec<i16> = hound::WavReader::open(&up)
        .unwrap()
        .samples::<i16>()
        .map(Result::unwrap)
        .collect();
    let junk = noise(mono48.len(), 3000.0, 9);
    let stereo: Vec<i16> = mono48
        .iter()
        .zip(&junk)
        .flat_map(|(&s, &n)| [n, s])
        .collect();
    let st = dir.path().join("stereo48.wav");
    write_wav(&st, &stereo, 48_000, 2);
    let (_, resampled) = run_input(&st, &dir.path().join("c"), &["-s", "capture.channel=1"]);
    let resampled = utterances(&resampled);
    assert_eq!(
        resampled.len(),
        reference.len(),
        "{resampled:?} vs {reference:?}"
    );
    for (r, o) in resampled.iter().zip(&reference) {
        assert!(r.0.abs_diff(o.0) <= 40, "offset {} vs {}", r.0, o.0);
        assert!(
            (r.0 + r.1).abs_diff(o.0 + o.1) <= 40,
            "end {} vs {}",
            r.0 + r.1,
            o.0 + o.1
        );
    }
}

#[test]
fn sigterm_and_sigint_close_the_open_utterance_and_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let words = speech("Good morning, this sentence is interrupted", dir.path());
    for (sig, name) in [(libc::SIGTERM, "term"), (libc::SIGINT, "int")] {
        let spool = dir.path().join(name);
        let mut args = base_args(&spool);
        args.extend(["-i".to_string(), "-".to_string()]);
        let mut cmd = hark();
        cmd.args(&args).stdin(Stdio::piped());
        let mut running = Running::spawn(cmd);
        // Speech, and the pipe stays open: hark is mid-utterance when the signal comes.
        let mut lead = vec![0i16; RATE as usize / 2];
        lead.extend_from_slice(&words);
        write_stdin(&mut running.child, &lead);
        let mut seen = Vec::new();
        let start = running.wait_for(&mut seen, Duration::from_secs(30), |e| {
            e["type"] == "speech_start"
        });
        running.signal(sig);
        let (status, rest, _) = running.finish(Duration::from_secs(30));
        assert!(status.success(), "exit {status}");
        seen.extend(rest);
        let end = of_type(&seen, "speech_end");
        assert_eq!(end.len(), 1, "{seen:#?}");
        assert_eq!(end[0]["reason"], "shutdown");
        assert_eq!(end[0]["utterance"], start["utterance"]);
        let audio = std::path::PathBuf::from(end[0]["audio"].as_str().unwrap());
        let samples = check_ogg(&audio, dir.path()) as u64;
        assert_eq!(samples, end[0]["duration_ms"].as_u64().unwrap() * 16);
        // Audio still in the pipe when the signal came was never captured; what was is all there.
        assert!(end[0]["offset_ms"].as_u64().unwrap() <= 500, "{:?}", end[0]);
    }
}

#[test]
fn pace_feeds_a_file_at_real_time_speed() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("two.wav");
    write_wav(&wav, &vec![0i16; RATE as usize * 2], RATE, 1);
    let started = Instant::now();
    run_input(&wav, &dir.path().join("spool"), &["--pace"]);
    // A lower bound only: pacing sleeps until each period is due, whatever the machine's speed.
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_wav_read_through_a_pipe_path_loses_nothing() {
    // `-i /dev/stdin` is a pipe: the bytes read to recognise the WAV cannot be read again.
    let dir = tempfile::tempdir().unwrap();
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/hello.wav");
    let (_, from_file) = run_input(&sample, &dir.path().join("a"), &[]);
    let mut args = base_args(&dir.path().join("b"));
    args.extend(["-i".to_string(), "/dev/stdin".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with_stdin(&refs, Some(std::fs::read(&sample).unwrap()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        spans(&utterances(&events(&out.stdout))),
        spans(&utterances(&from_file))
    );
}

#[test]
fn speech_running_to_the_end_of_a_file_is_kept_to_the_last_sample() {
    let dir = tempfile::tempdir().unwrap();
    let words = speech(
        "And this recording stops in the middle of a word",
        dir.path(),
    );
    let mut samples = vec![0i16; RATE as usize];
    samples.extend_from_slice(&words);
    // Not a whole number of frames.
    samples.truncate(samples.len() - samples.len() % 320 + 123);
    let wav = dir.path().join("cut.wav");
    write_wav(&wav, &samples, RATE, 1);
    let (_, events) = run_input(&wav, &dir.path().join("spool"), &[]);
    let end = of_type(&events, "speech_end");
    assert_eq!(end.len(), 1, "{events:#?}");
    assert_eq!(end[0]["reason"], "end_of_input");
    let audio = std::path::PathBuf::from(end[0]["audio"].as_str().unwrap());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(audio.with_extension("json")).unwrap()).unwrap();
    let kept = meta["samples"].as_u64().unwrap();
    assert_eq!(
        meta["offset_ms"].as_u64().unwrap() * 16 + kept,
        samples.len() as u64
    );
    assert_eq!(check_ogg(&audio, dir.path()) as u64, kept);
}

#[test]
fn a_truncated_wav_keeps_what_it_has_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/hello.wav");
    let mut bytes = std::fs::read(&sample).unwrap();
    // Cut mid-sample, two thirds in: the header still promises the whole recording.
    bytes.truncate(bytes.len() * 2 / 3 + 1);
    let wav = dir.path().join("truncated.wav");
    std::fs::write(&wav, bytes).unwrap();
    let mut args = base_args(&dir.path().join("spool"));
    args.extend(["-i".to_string(), wav.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&refs);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("truncated.wav"), "{err}");
    let events = events(&out.stdout);
    assert_eq!(
        utterances(&events).len(),
        2,
        "the two whole sentences are kept: {events:#?}"
    );
    assert_eq!(of_type(&events, "error")[0]["stage"], "capture");
}
