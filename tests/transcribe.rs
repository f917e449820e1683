//! `hark transcribe FILE` end to end: the real binary on generated recordings, uploading to the
//! same real HTTP server as the daemon's tests, which decodes every Ogg it receives.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::server::{Reply, Request, Server};
use common::*;
use serde_json::Value;

const KEY: &str = "sk-hark-test-transcribe-0123456789";

/// Of clearly different lengths (0.5 s to 5 s), so the test server can tell them apart by the
/// length of the audio it receives.
const SENTENCES: [&str; 6] = [
    "Yes.",
    "Lock the door.",
    "Turn the kitchen lights on now.",
    "Remind me to water the plants in the garden tomorrow morning.",
    "What is the weather going to be like in Lisbon and in Porto on Saturday afternoon?",
    "Please play some quiet music in the living room, and turn the radio in the kitchen down a little bit more.",
];

/// A recording of `sentences`, 1.5 s apart after 1 s of lead-in, over a quiet noise floor; and
/// where each sentence truly is, in ms.
fn recording(dir: &Path, sentences: &[&str], name: &str) -> (PathBuf, Vec<(u64, u64)>) {
    let pieces: Vec<Vec<i16>> = sentences.iter().map(|s| speech(s, dir)).collect();
    let t = timeline(&pieces, 1500, 1000, 33.0);
    let wav = dir.join(name);
    write_wav(&wav, &t.samples, RATE, 1);
    let ms = |s: usize| s as u64 * 1000 / u64::from(RATE);
    let truth = t.spans.iter().map(|&(a, b)| (ms(a), ms(b))).collect();
    (wav, truth)
}

/// How long the Ogg/Opus file a request carries plays, in ms.
fn audio_ms(req: &Request) -> u64 {
    let part = req.part("file").expect("a file part");
    let pcm = hark::codec::decode::decode_ogg_opus(&part.data).expect("a valid Ogg/Opus upload");
    pcm.len() as u64 * 1000 / u64::from(RATE)
}

/// `hark transcribe` with the test key, against `url`, caching in `cache`.
fn transcribe(file: &Path, url: &str, cache: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "transcribe".to_owned(),
        file.display().to_string(),
        "--cache-dir".into(),
        cache.display().to_string(),
        "-s".into(),
        format!("transcribe.endpoint={url:?}"),
        "-s".into(),
        "transcribe.api_key_env=\"HARK_TEST_KEY\"".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_env(&refs, &[("HARK_TEST_KEY", KEY)])
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A cue of a subtitle file: start and end in ms, and its text.
type Cue = (u64, u64, String);

/// `HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (VTT) in ms; panics on anything else.
fn clock(s: &str, sep: char) -> u64 {
    let (hms, ms) = s
        .split_once(sep)
        .unwrap_or_else(|| panic!("bad time {s:?}"));
    let parts: Vec<u64> = hms
        .split(':')
        .map(|p| {
            assert_eq!(p.len(), 2, "bad time {s:?}");
            p.parse().unwrap_or_else(|_| panic!("bad time {s:?}"))
        })
        .collect();
    assert_eq!(parts.len(), 3, "bad time {s:?}");
    assert_eq!(ms.len(), 3, "bad time {s:?}");
    let ms: u64 = ms.parse().unwrap_or_else(|_| panic!("bad time {s:?}"));
    assert!(parts[1] < 60 && parts[2] < 60, "bad time {s:?}");
    (parts[0] * 3600 + parts[1] * 60 + parts[2]) * 1000 + ms
}

/// The timing line `A --> B` of a cue.
fn timing(line: &str, sep: char) -> (u64, u64) {
    let (a, b) = line
        .split_once(" --> ")
        .unwrap_or_else(|| panic!("bad timing line {line:?}"));
    let (a, b) = (clock(a, sep), clock(b, sep));
    assert!(a < b, "a cue ends before it starts: {line:?}");
    (a, b)
}

/// A strict SRT parser: numbered blocks from 1, a timing line, text lines, a blank line.
fn parse_srt(text: &str) -> Vec<Cue> {
    assert!(text.ends_with("\n\n"), "SRT must end with a blank line");
    let mut cues = Vec::new();
    for (i, block) in text.trim_end().split("\n\n").enumerate() {
        let mut lines = block.lines();
        assert_eq!(
            lines.next(),
            Some((i + 1).to_string().as_str()),
            "{block:?}"
        );
        let (a, b) = timing(lines.next().expect("a timing line"), ',');
        let body: Vec<&str> = lines.collect();
        assert!(!body.is_empty() && body.iter().all(|l| !l.trim().is_empty()));
        cues.push((a, b, body.join("\n")));
    }
    cues
}

/// A strict WebVTT parser for what hark writes: the header, then cues without identifiers.
fn parse_vtt(text: &str) -> Vec<Cue> {
    let rest = text
        .strip_prefix("WEBVTT\n\n")
        .expect("a WEBVTT header and a blank line");
    let mut cues = Vec::new();
    for block in rest.trim_end().split("\n\n") {
        let mut lines = block.lines();
        let (a, b) = timing(lines.next().expect("a timing line"), '.');
        let body: Vec<&str> = lines.collect();
        assert!(!body.is_empty() && body.iter().all(|l| !l.contains("-->")));
        cues.push((a, b, body.join("\n")));
    }
    cues
}

/// Every cue in order, each holding its sentence's true start and end within 0.3 s.
fn assert_cues_match(cues: &[Cue], truth: &[(u64, u64)], what: &str) {
    assert_eq!(cues.len(), truth.len(), "{what}: {cues:?}");
    for (i, ((a, b, text), &(ta, tb))) in cues.iter().zip(truth).enumerate() {
        assert!(
            a.abs_diff(ta) <= 300 && b.abs_diff(tb) <= 300,
            "{what}: cue {i} {a}..{b} ms, sentence {ta}..{tb} ms"
        );
        assert_eq!(
            text,
            &format!("sentence {i}"),
            "{what}: cue {i} is another sentence's"
        );
        if i > 0 {
            assert!(*a >= cues[i - 1].1, "{what}: cues overlap");
        }
    }
}

/// Uploads at the same time, and the most seen.
#[derive(Default)]
struct InFlight {
    now: Mutex<usize>,
    changed: Condvar,
    most: AtomicUsize,
}

impl InFlight {
    /// Count this request in, wait (up to 5 s) until another one is in flight too, then out.
    /// With uploads one at a time, each request waits the whole 5 s and `most` stays 1.
    fn overlap(&self) {
        let mut now = self.now.lock().unwrap();
        *now += 1;
        self.most.fetch_max(*now, Ordering::SeqCst);
        self.changed.notify_all();
        let (mut now, _) = self
            .changed
            .wait_timeout_while(now, Duration::from_secs(5), |n| *n < 2)
            .unwrap();
        *now -= 1;
    }
}

#[test]
fn srt_and_vtt_cues_hold_each_sentence_within_0_3_s_with_parallel_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let (wav, truth) = recording(dir.path(), &SENTENCES, "six.wav");
    // The server names each utterance by its place in the recording, which it tells from the
    // length of the audio it decodes: the sentences are of different lengths.
    let lengths: Vec<u64> = truth.iter().map(|(a, b)| b - a).collect();
    let in_flight = Arc::new(InFlight::default());
    let server = {
        let in_flight = in_flight.clone();
        Server::start(None, move |req, _| {
            let ms = audio_ms(req);
            // An utterance is its sentence plus the pre-roll and the closing silence.
            let i = (0..lengths.len())
                .min_by_key(|&i| (lengths[i] + 1100).abs_diff(ms))
                .unwrap_or(0);
            in_flight.overlap();
            Reply::Json(200, format!(r#"{{"text":"sentence {i}"}}"#))
        })
    };
    let cache = dir.path().join("cache");
    let srt = dir.path().join("six.srt");
    let out = transcribe(
        &wav,
        &server.url(),
        &cache,
        &["-j", "4", "-o", &srt.display().to_string()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        in_flight.most.load(Ordering::SeqCst) >= 2,
        "uploads never overlapped"
    );
    assert_eq!(server.requests().len(), SENTENCES.len());
    let cues = parse_srt(&std::fs::read_to_string(&srt).unwrap());
    assert_cues_match(&cues, &truth, "srt");

    // The same recording again, as WebVTT: every transcript comes from the resume cache.
    let out = transcribe(&wav, &server.url(), &cache, &["-f", "vtt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cues = parse_vtt(&String::from_utf8(out.stdout).unwrap());
    assert_cues_match(&cues, &truth, "vtt");
    assert_eq!(
        server.requests().len(),
        SENTENCES.len(),
        "nothing uploaded twice"
    );

    // And as the daemon's events: a transcript per utterance, from the cache (0 attempts).
    let out = transcribe(&wav, &server.url(), &cache, &["-f", "jsonl"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ev = events(&out.stdout);
    let transcripts = of_type(&ev, "transcript");
    assert_eq!(transcripts.len(), SENTENCES.len());
    assert!(transcripts.iter().all(|t| t["attempts"] == 0));
    assert_eq!(of_type(&ev, "speech_end").len(), SENTENCES.len());
}

/// The utterances of a `--record-only` run: (offset, duration) in ms.
fn record_only(file: &Path, out: &Path) -> Vec<(u64, u64)> {
    let result = run(&[
        "transcribe",
        "--record-only",
        &file.display().to_string(),
        "-o",
        &out.display().to_string(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("timeline.json")).unwrap()).unwrap();
    let utts = doc["utterances"].as_array().unwrap();
    for u in utts {
        let ogg = out.join(u["audio"].as_str().unwrap());
        assert!(ogg.exists(), "{} is missing", ogg.display());
    }
    utts.iter()
        .map(|u| {
            (
                u["offset_ms"].as_u64().unwrap(),
                u["duration_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn stereo_48k_wav_and_flac_segment_like_the_16k_mono_original() {
    let dir = tempfile::tempdir().unwrap();
    let (wav, truth) = recording(dir.path(), &SENTENCES[..4], "mono16k.wav");
    let stereo = dir.path().join("stereo48k.wav");
    let flac = dir.path().join("mono16k.flac");
    for (to, args) in [(&stereo, vec!["-r", "48000", "-c", "2"]), (&flac, vec![])] {
        let ok = std::process::Command::new("sox")
            .arg("-D")
            .arg(&wav)
            .args(&args)
            .arg(to)
            .status()
            .unwrap();
        assert!(ok.success(), "sox could not make {}", to.display());
    }
    let original = record_only(&wav, &dir.path().join("mono"));
    assert_eq!(original.len(), truth.len(), "{original:?}");
    for (what, file) in [("48 kHz stereo WAV", &stereo), ("FLAC", &flac)] {
        let got = record_only(file, &dir.path().join(what.replace(' ', "-")));
        assert_eq!(got.len(), original.len(), "{what}: {got:?} vs {original:?}");
        for (g, o) in got.iter().zip(&original) {
            // Resampling moves a VAD decision by at most a frame (20 ms) at either end.
            assert!(
                g.0.abs_diff(o.0) <= 20 && g.1.abs_diff(o.1) <= 40,
                "{what}: {got:?} vs {original:?}"
            );
        }
    }
}

#[test]
fn a_permanent_failure_is_reported_the_rest_kept_and_a_rerun_uploads_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let long = "This sentence is the long one that the server refuses, because it goes on and on \
                for much longer than any of the others.";
    let sentences = [SENTENCES[0], long, SENTENCES[1], SENTENCES[2]];
    let (wav, truth) = recording(dir.path(), &sentences, "four.wav");
    let refuse = Arc::new(AtomicBool::new(true));
    let server = {
        let refuse = refuse.clone();
        Server::start(None, move |req, _| {
            if audio_ms(req) > 5000 && refuse.load(Ordering::SeqCst) {
                return Reply::Json(
                    400,
                    r#"{"error":{"message":"refused by the test server","type":"invalid_request_error","code":"refused"}}"#.into(),
                );
            }
            Reply::Json(200, format!(r#"{{"text":"{} ms"}}"#, audio_ms(req)))
        })
    };
    let cache = dir.path().join("cache");
    let json = dir.path().join("four.json");
    let out = transcribe(
        &wav,
        &server.url(),
        &cache,
        &["-o", &json.display().to_string()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let at = truth[1].0 / 1000;
    assert!(
        err.contains(&format!("not transcribed: the utterance at 0:{at:02}")),
        "stderr does not say which utterance failed: {err}"
    );
    assert!(err.contains("1 of 4 utterances failed for good"), "{err}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let statuses: Vec<&str> = doc["utterances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["transcribed", "failed", "transcribed", "transcribed"]
    );
    assert_eq!(doc["utterances"][1]["error"]["code"], "bad_request");
    assert!(
        doc["utterances"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with(" ms")
    );
    let first_run = server.requests().len();
    assert_eq!(first_run, 4);
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    // The key is sent, and nowhere else: not in the output, the logs or the cache.
    for (what, text) in [
        ("stdout", String::from_utf8_lossy(&out.stdout).into_owned()),
        ("stderr", err.clone()),
        ("output", std::fs::read_to_string(&json).unwrap()),
    ] {
        assert!(!text.contains(&KEY[8..]), "the key is in {what}");
    }
    for entry in walk(&cache) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes
                .windows(KEY.len() - 8)
                .any(|w| w == &KEY.as_bytes()[8..]),
            "the key is in {}",
            entry.display()
        );
    }

    // The server takes it now: the second run sends that one utterance and nothing else.
    refuse.store(false, Ordering::SeqCst);
    let out = transcribe(
        &wav,
        &server.url(),
        &cache,
        &["-o", &json.display().to_string()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let requests = server.requests();
    assert_eq!(
        requests.len(),
        first_run + 1,
        "only the failed utterance again"
    );
    assert!(audio_ms(&requests[first_run]) > 5000);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["counts"]["transcribed"], 4);
    assert_eq!(doc["counts"]["failed"], 0);
}

#[test]
fn a_cloud_endpoint_without_a_key_is_a_config_error_that_suggests_record_only() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("silence.wav");
    write_wav(&wav, &vec![0i16; 16000], RATE, 1);
    let out = run(&["transcribe", &wav.display().to_string()]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("--record-only"), "{}", stderr(&out));
    let out = run(&[
        "transcribe",
        &dir.path().join("missing.flac").display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.flac"), "{}", stderr(&out));
}

#[test]
fn server_segments_become_cues_offset_by_their_utterance_start() {
    let dir = tempfile::tempdir().unwrap();
    let (wav, truth) = recording(dir.path(), &SENTENCES[1..4], "three.wav");
    // verbose_json with two segments per utterance, timed from the start of the audio received:
    // the speech begins after the 300 ms pre-roll and ends 800 ms (the closing silence) before
    // the end, and the server splits it in the middle.
    let server = Server::start(None, |req, _| {
        assert_eq!(req.field("response_format"), Some("verbose_json"));
        let s = audio_ms(req) as f64 / 1000.0;
        let (a, b) = (0.3, s - 0.8);
        let mid = (a + b) / 2.0;
        Reply::Json(
            200,
            serde_json::json!({
                "text": "first half second half",
                "language": "english",
                "duration": s,
                "segments": [
                    {"id": 0, "start": a, "end": mid, "text": " first half"},
                    {"id": 1, "start": mid, "end": b, "text": " second half"},
                ],
            })
            .to_string(),
        )
    });
    let out = transcribe(
        &wav,
        &server.url(),
        &dir.path().join("cache"),
        &[
            "-f",
            "srt",
            "-s",
            "transcribe.response_format=\"verbose_json\"",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let cues = parse_srt(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(cues.len(), 2 * truth.len(), "{cues:?}");
    for (pair, &(ta, tb)) in cues.chunks(2).zip(&truth) {
        let (first, second) = (&pair[0], &pair[1]);
        assert_eq!(
            (first.2.as_str(), second.2.as_str()),
            ("first half", "second half")
        );
        assert!(
            first.0.abs_diff(ta) <= 300 && second.1.abs_diff(tb) <= 300,
            "cues {first:?} {second:?}, sentence {ta}..{tb} ms"
        );
        assert_eq!(first.1, second.0, "the halves meet");
    }
}

#[test]
fn endpoints_down_leave_utterances_pending_and_the_next_run_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let (wav, _) = recording(dir.path(), &SENTENCES[1..3], "two.wav");
    let port = common::server::free_port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let cache = dir.path().join("cache");
    let json = dir.path().join("two.json");
    let out = transcribe(&wav, &url, &cache, &["-o", &json.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("were not transcribed"),
        "{}",
        stderr(&out)
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["counts"]["pending"], 2, "{doc}");

    let server = Server::start_on(port, None, |_, _| {
        Reply::Json(200, r#"{"text":"back"}"#.into())
    });
    let out = transcribe(&wav, &url, &cache, &["-o", &json.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.requests().len(), 2);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["counts"]["transcribed"], 2);
}

#[test]
fn record_only_utterances_upload_later_with_their_offsets_in_the_recording() {
    let dir = tempfile::tempdir().unwrap();
    let (wav, _) = recording(dir.path(), &SENTENCES[1..3], "two.wav");
    let out_dir = dir.path().join("two.hark");
    let recorded = record_only(&wav, &out_dir);
    let server = Server::start(None, |_, _| Reply::Json(200, r#"{"text":"later"}"#.into()));
    let spool = out_dir.join("utterances");
    let out = run_env(
        &[
            "upload",
            "-s",
            &format!("spool.dir={:?}", spool.display().to_string()),
            "-s",
            &format!("transcribe.endpoint={:?}", server.url()),
            "-s",
            "transcribe.api_key_env=\"HARK_TEST_KEY\"",
        ],
        &[("HARK_TEST_KEY", KEY)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let ev = events(&out.stdout);
    let offsets: Vec<u64> = of_type(&ev, "transcript")
        .iter()
        .map(|t| t["offset_ms"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = recorded.iter().map(|r| r.0).collect();
    assert_eq!(offsets, expected);
}

// See: review of issue 6 — with -f jsonl, a reader that went away made every upload wait forever
// for a sink to take its transcript.
#[test]
fn jsonl_to_a_reader_that_goes_away_ends_with_an_error_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let (wav, _) = recording(dir.path(), &SENTENCES[1..4], "three.wav");
    let server = Server::start(None, |_, _| Reply::Json(200, r#"{"text":"ok"}"#.into()));
    let script = format!(
        "{{ $RUNNER \"$HARK\" transcribe \"$WAV\" -f jsonl --cache-dir \"$CACHE\" \
         -s 'transcribe.endpoint=\"{}\"' -s 'transcribe.api_key_env=\"HARK_TEST_KEY\"'; \
         echo \"hark exit $?\" >&2; }} | head -1 >/dev/null",
        server.url()
    );
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("HARK", env!("CARGO_BIN_EXE_hark"))
        .env(
            "RUNNER",
            std::env::var(common::RUNNER_VAR).unwrap_or_default(),
        )
        .env("WAV", &wav)
        .env("CACHE", dir.path().join("cache"))
        .env("HARK_TEST_KEY", KEY)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + RUN_LIMIT;
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "hark hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(err.contains("hark exit 1"), "{err}");
    assert!(err.contains("cannot write the events"), "{err}");
    // What was uploaded is not lost: the next run has it all in the cache.
    let uploaded = server.requests().len();
    let out = transcribe(
        &wav,
        &server.url(),
        &dir.path().join("cache"),
        &["-f", "text"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    assert_eq!(
        server.requests().len(),
        uploaded,
        "all of it came from the cache"
    );
}
