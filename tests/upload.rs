//! Transcription end to end: the real binary against a real HTTP/TLS server on 127.0.0.1 that
//! parses the multipart body hark sends and answers (or fails) as each test scripts it.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::server::{Reply, Request, Server, free_port, test_ca};
use common::*;
use serde_json::{Value, json};

const KEY: &str = "sk-hark-test-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(60);

const SENTENCES: [&str; 3] = [
    "The kitchen lights are on.",
    "Please lock the front door now.",
    "Remind me to water the plants tomorrow.",
];

/// A WAV of `n` of the sentences, 1.5 s apart.
fn sentences(dir: &Path, n: usize) -> PathBuf {
    let pieces: Vec<Vec<i16>> = SENTENCES[..n].iter().map(|s| speech(s, dir)).collect();
    let t = timeline(&pieces, 1500, 800, 33.0);
    let wav = dir.join(format!("sentences-{n}.wav"));
    write_wav(&wav, &t.samples, RATE, 1);
    wav
}

/// Arguments for a run that uploads to `url` with the test key.
fn upload_args(spool: &Path, url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-s".to_owned(),
        format!("spool.dir={:?}", spool.display().to_string()),
        "-s".into(),
        "output.status_interval_s=0".into(),
        "-s".into(),
        format!("transcribe.endpoint={url:?}"),
        "-s".into(),
        "transcribe.api_key_env=\"HARK_TEST_KEY\"".into(),
    ];
    for e in extra {
        // Flags go as they are; everything else is a config override.
        if !e.starts_with('-') {
            args.push("-s".into());
        }
        args.push((*e).to_owned());
    }
    args
}

/// Run hark with the test key in its environment.
fn run_keyed(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_env(&refs, &[("HARK_TEST_KEY", KEY)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Any 8 characters of it: a log that dumps bytes in rows would split the key.
    for i in 0..=KEY.len() - 8 {
        let piece = &KEY[i..i + 8];
        assert!(
            !stdout.contains(piece) && !stderr.contains(piece),
            "the API key leaked ({piece}):\n{stdout}\n{stderr}"
        );
    }
    out
}

fn transcribe_file(input: &Path, spool: &Path, url: &str, extra: &[&str]) -> (Output, Vec<Value>) {
    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(upload_args(spool, url, extra));
    let out = run_keyed(&args);
    let ev = events(&out.stdout);
    (out, ev)
}

fn ok_json(text: &str) -> Reply {
    Reply::Json(200, json!({ "text": text }).to_string())
}

fn ids(events: &[Value], kind: &str) -> Vec<String> {
    of_type(events, kind)
        .iter()
        .map(|e| e["utterance"].as_str().unwrap().to_owned())
        .collect()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn spool_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_file() && !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn every_request_field_is_sent_in_sdk_encoding_with_a_valid_ogg() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let speaker = dir.path().join("agent.wav");
    // 2 to 10 s, as the API asks of a speaker reference.
    let mut voice = speech("This is the agent speaking.", dir.path());
    voice.extend(vec![0; RATE as usize]);
    voice.extend(speech("Hello there.", dir.path()));
    write_wav(&speaker, &voice, RATE, 1);
    let reference = std::fs::read(&speaker).unwrap();
    let server = Server::start(None, |_, _| ok_json("ok"));
    let spool = dir.path().join("spool");
    let speakers = format!(
        "transcribe.known_speakers=[{{name=\"agent\", audio={:?}}}]",
        speaker.display().to_string()
    );
    let (out, ev) = transcribe_file(
        &input,
        &spool,
        &server.url(),
        &[
            "transcribe.model=\"gpt-4o-transcribe-diarize\"",
            "transcribe.language=\"en\"",
            "transcribe.prompt=\"kitchen, door\"",
            "transcribe.response_format=\"verbose_json\"",
            "transcribe.temperature=0.2",
            "transcribe.timestamp_granularities=[\"word\", \"segment\"]",
            "transcribe.include=[\"logprobs\"]",
            "transcribe.chunking_strategy={type=\"server_vad\", prefix_padding_ms=300, silence_duration_ms=200, threshold=0.5}",
            &speakers,
            // Trace logging of every crate, HTTP internals included, must not show the key.
            "-vv",
        ],
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/v1/audio/transcriptions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("multipart/form-data; boundary=")
    );
    let utterance = &ids(&ev, "speech_end")[0];
    let file = r.part("file").expect("file part");
    assert_eq!(
        file.filename.as_deref(),
        Some(format!("{utterance}.ogg").as_str())
    );
    assert_eq!(file.content_type.as_deref(), Some("audio/ogg"));
    assert_eq!(r.field("model"), Some("gpt-4o-transcribe-diarize"));
    assert_eq!(r.field("language"), Some("en"));
    assert_eq!(r.field("prompt"), Some("kitchen, door"));
    assert_eq!(r.field("response_format"), Some("verbose_json"));
    assert_eq!(r.field("temperature"), Some("0.2"));
    assert_eq!(r.fields("timestamp_granularities[]"), ["word", "segment"]);
    assert_eq!(r.fields("include[]"), ["logprobs"]);
    assert_eq!(r.field("chunking_strategy[type]"), Some("server_vad"));
    assert_eq!(r.field("chunking_strategy[prefix_padding_ms]"), Some("300"));
    assert_eq!(
        r.field("chunking_strategy[silence_duration_ms]"),
        Some("200")
    );
    assert_eq!(r.field("chunking_strategy[threshold]"), Some("0.5"));
    assert_eq!(r.fields("known_speaker_names[]"), ["agent"]);
    let refs = r.fields("known_speaker_references[]");
    assert_eq!(refs.len(), 1);
    let b64 = refs[0]
        .strip_prefix("data:audio/wav;base64,")
        .expect("a WAV data URL");
    assert_eq!(base64_decode(b64), reference);
    // Nothing else: the SDK leaves out what is not set (stream is false).
    let names: BTreeSet<&str> = r.parts.iter().map(|p| p.name.as_str()).collect();
    assert!(!names.contains("stream"), "{names:?}");
    assert_eq!(names.len(), 14, "{names:?}");

    // The audio is a valid Ogg/Opus file holding exactly the utterance.
    let ogg = dir.path().join("sent.ogg");
    std::fs::write(&ogg, &file.data).unwrap();
    let samples = check_ogg(&ogg, dir.path());
    let duration_ms = of_type(&ev, "speech_end")[0]["duration_ms"]
        .as_u64()
        .unwrap();
    assert_eq!(samples as u64 / 16, duration_ms);

    let t = of_type(&ev, "transcript");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["text"], "ok");
    assert_eq!(t[0]["utterance"], utterance.as_str());
    assert_eq!(t[0]["model"], "gpt-4o-transcribe-diarize");
    assert_eq!(t[0]["endpoint"], server.url());
    assert_eq!(t[0]["attempts"], 1);
    assert_eq!(t[0]["duration_ms"], duration_ms);
    assert!(t[0]["latency_ms"].is_u64());
    // Delivered: the spool is empty again.
    assert!(spool_files(&spool).is_empty(), "{:?}", spool_files(&spool));
}

fn base64_decode(s: &str) -> Vec<u8> {
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = table.iter().position(|&t| t == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn answer_in_format(r: &Request) -> Reply {
    let text = |ct: &str, body: &str| Reply::Full {
        status: 200,
        headers: vec![("Content-Type".into(), ct.into())],
        body: body.as_bytes().to_vec(),
    };
    match r.field("response_format").unwrap_or("json") {
        "text" => text("text/plain; charset=utf-8", "Lights on.\n"),
        "srt" => text(
            "text/plain; charset=utf-8",
            "1\n00:00:00,000 --> 00:00:01,200\nLights\n\n2\n00:00:01,200 --> 00:00:02,000\non.\n\n",
        ),
        "vtt" => text(
            "text/vtt",
            "WEBVTT\n\n00:00.000 --> 00:01.200\nLights\n\n00:01.200 --> 00:02.000\non.\n",
        ),
        "verbose_json" => Reply::Json(
            200,
            json!({"task":"transcribe","language":"english","duration":2.0,"text":"Lights on.",
                "segments":[{"id":0,"seek":0,"start":0.0,"end":2.0,"text":" Lights on.","tokens":[1,2],
                    "temperature":0.0,"avg_logprob":-0.2,"compression_ratio":1.0,"no_speech_prob":0.01}],
                "words":[{"word":"Lights","start":0.1,"end":0.6},{"word":"on.","start":0.7,"end":1.0}]})
            .to_string(),
        ),
        "diarized_json" => Reply::Json(
            200,
            json!({"task":"transcribe","duration":2.0,"text":"Lights on.",
                "segments":[{"type":"transcript.text.segment","id":"seg_0","start":0.0,"end":1.0,
                    "text":"Lights","speaker":"agent"},
                    {"type":"transcript.text.segment","id":"seg_1","start":1.0,"end":2.0,
                    "text":"on.","speaker":"B"}],
                "usage":{"type":"duration","seconds":2}})
            .to_string(),
        ),
        _ => Reply::Json(
            200,
            json!({"text":"Lights on.","usage":{"type":"tokens","input_tokens":10,
                "output_tokens":3,"total_tokens":13}})
            .to_string(),
        ),
    }
}

#[test]
fn each_response_format_becomes_a_transcript_event() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let server = Server::start(None, |r, _| answer_in_format(r));
    for format in [
        "json",
        "text",
        "srt",
        "vtt",
        "verbose_json",
        "diarized_json",
    ] {
        let spool = dir.path().join(format!("spool-{format}"));
        let set = format!("transcribe.response_format={format:?}");
        let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[&set]);
        assert!(out.status.success(), "{format}: {}", stderr_of(&out));
        let t = of_type(&ev, "transcript");
        assert_eq!(t.len(), 1, "{format}: {ev:#?}");
        let t = t[0];
        match format {
            "srt" | "vtt" => {
                assert_eq!(t["text"], "Lights on.", "{format}");
                let segs = t["segments"].as_array().expect("segments from cues");
                assert_eq!(segs.len(), 2, "{format}");
                assert_eq!(segs[1]["start"], 1.2, "{format}");
                assert_eq!(segs[1]["end"], 2.0, "{format}");
            }
            "verbose_json" => {
                assert_eq!(t["text"], "Lights on.");
                assert_eq!(t["language"], "english");
                assert_eq!(t["segments"][0]["text"], "Lights on.");
                assert_eq!(t["words"][1]["word"], "on.");
                assert_eq!(t["words"][1]["start"], 0.7);
            }
            "diarized_json" => {
                assert_eq!(t["segments"][0]["speaker"], "agent");
                assert_eq!(t["segments"][1]["speaker"], "B");
                assert_eq!(t["usage"]["type"], "duration");
            }
            "json" => {
                assert_eq!(t["text"], "Lights on.");
                assert_eq!(t["usage"]["total_tokens"], 13);
                assert!(t.get("segments").is_none());
            }
            _ => assert_eq!(t["text"], "Lights on.", "{format}"),
        }
    }
}

#[test]
fn streamed_deltas_arrive_in_order_before_the_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let server = Server::start(None, |r, _| {
        assert_eq!(r.field("stream"), Some("true"));
        let mut chunks: Vec<Vec<u8>> = ["Lights", " on", " now."]
            .iter()
            .map(|d| {
                format!(
                    "data: {}\n\n",
                    json!({"type":"transcript.text.delta","delta":d})
                )
                .into_bytes()
            })
            .collect();
        chunks.push(
            format!(
                "data: {}\n\n",
                json!({"type":"transcript.text.done","text":"Lights on now.",
                    "usage":{"type":"tokens","input_tokens":5,"output_tokens":3,"total_tokens":8}})
            )
            .into_bytes(),
        );
        chunks.push(b"data: [DONE]\n\n".to_vec());
        Reply::Chunks {
            status: 200,
            headers: vec![("Content-Type".into(), "text/event-stream".into())],
            chunks,
        }
    });
    let spool = dir.path().join("spool");
    let (out, ev) = transcribe_file(&input, &spool, &server.url(), &["transcribe.stream=true"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let kinds: Vec<&str> = ev
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|k| k.starts_with("transcript"))
        .collect();
    assert_eq!(
        kinds,
        [
            "transcript_delta",
            "transcript_delta",
            "transcript_delta",
            "transcript"
        ]
    );
    let deltas: Vec<&str> = of_type(&ev, "transcript_delta")
        .iter()
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["Lights", " on", " now."]);
    let t = of_type(&ev, "transcript")[0];
    assert_eq!(t["text"], "Lights on now.");
    assert_eq!(t["usage"]["total_tokens"], 8);
    assert_eq!(
        of_type(&ev, "transcript_delta")[0]["utterance"],
        t["utterance"]
    );
}

#[test]
fn a_503_three_times_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let server = Server::start(None, |_, i| {
        if i < 3 {
            Reply::Json(
                503,
                json!({"error":{"message":"overloaded","type":"server_error","param":null,"code":null}})
                    .to_string(),
            )
        } else {
            ok_json("at last")
        }
    });
    let spool = dir.path().join("spool");
    let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(server.requests().len(), 4);
    let t = of_type(&ev, "transcript");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["text"], "at last");
    assert_eq!(t[0]["attempts"], 4);
    // While it failed, hark said so and that it was retrying.
    let errors = of_type(&ev, "error");
    assert!(
        errors
            .iter()
            .any(|e| e["stage"] == "upload" && e["retrying"] == true),
        "{ev:#?}"
    );
    assert!(spool_files(&spool).is_empty());
}

#[test]
fn a_429_with_retry_after_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let server = Server::start(None, |_, i| {
        if i == 0 {
            Reply::Full {
                status: 429,
                headers: vec![
                    ("Content-Type".into(), "application/json".into()),
                    ("Retry-After".into(), "2".into()),
                ],
                body: json!({"error":{"message":"Rate limit reached","type":"requests",
                    "param":null,"code":"rate_limit_exceeded"}})
                .to_string()
                .into_bytes(),
            }
        } else {
            ok_json("ok")
        }
    });
    let spool = dir.path().join("spool");
    let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    // Without the header the first retry would come after at most 0.5 s.
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    assert_eq!(of_type(&ev, "transcript")[0]["attempts"], 2);
}

#[test]
fn a_connection_reset_mid_response_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let server = Server::start(None, |_, i| {
        if i == 0 {
            Reply::ResetMidBody
        } else {
            ok_json("ok")
        }
    });
    let spool = dir.path().join("spool");
    let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(server.requests().len(), 2);
    assert_eq!(of_type(&ev, "transcript")[0]["attempts"], 2);
}

#[test]
fn a_server_that_stalls_past_the_timeout_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let server = Server::start(None, |_, i| {
        if i == 0 {
            Reply::Stall(Duration::from_secs(10))
        } else {
            ok_json("ok")
        }
    });
    let spool = dir.path().join("spool");
    let (out, ev) = transcribe_file(&input, &spool, &server.url(), &["transcribe.timeout_s=1"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(
        gap >= Duration::from_secs(1),
        "retried after {gap:?}, before the timeout"
    );
    assert!(
        gap < Duration::from_secs(10),
        "the stall was waited out: {gap:?}"
    );
    let errors = of_type(&ev, "error");
    assert!(errors.iter().any(|e| e["code"] == "timeout"), "{ev:#?}");
    assert_eq!(of_type(&ev, "transcript")[0]["attempts"], 2);
}

#[test]
fn a_server_down_at_start_gets_every_utterance_in_order_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 3);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let spool = dir.path().join("spool");
    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(upload_args(&spool, &url, &[]));
    let mut cmd = hark();
    cmd.args(&args).env("HARK_TEST_KEY", KEY);
    let running = Running::spawn(cmd);
    let mut seen = Vec::new();
    running.wait_for(&mut seen, WAIT, |e| {
        e["type"] == "error" && e["code"] == "endpoints_down" && e["retrying"] == true
    });
    running.wait_for(&mut seen, WAIT, |e| {
        e["type"] == "status" && e["state"] == "degraded"
    });
    let server = Server::start_on(port, None, |r, _| {
        let name = r
            .part("file")
            .and_then(|f| f.filename.clone())
            .unwrap_or_default();
        ok_json(&name)
    });
    let (status, rest, stderr) = running.finish(WAIT);
    seen.extend(rest);
    assert!(status.success(), "{stderr}");
    let ends = ids(&seen, "speech_end");
    assert_eq!(ends.len(), 3, "{seen:#?}");
    let done = ids(&seen, "transcript");
    assert_eq!(done, ends, "transcribed out of order");
    for t in of_type(&seen, "transcript") {
        assert_eq!(
            t["text"].as_str().unwrap(),
            format!("{}.ogg", t["utterance"].as_str().unwrap())
        );
    }
    // The server saw them oldest first, too.
    let sent: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.part("file").unwrap().filename.clone().unwrap())
        .collect();
    let expected: Vec<String> = ends.iter().map(|id| format!("{id}.ogg")).collect();
    assert_eq!(sent, expected);
    let last_status = of_type(&seen, "status").last().copied().unwrap().clone();
    assert_eq!(last_status["state"], "online", "{seen:#?}");
    assert!(spool_files(&spool).is_empty());
}

#[test]
fn final_errors_are_not_retried_and_the_audio_moves_to_failed() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let cases = [
        (
            401,
            json!({"error":{"message":format!("Incorrect API key provided: {KEY}."),
                "type":"invalid_request_error","param":null,"code":"invalid_api_key"}}),
            "unauthorized",
        ),
        (
            400,
            json!({"error":{"message":"Audio file is too short. Minimum audio length is 0.1 seconds.",
                "type":"invalid_request_error","param":"file","code":"audio_too_short"}}),
            "audio_too_short",
        ),
    ];
    for (status, body, code) in cases {
        let body = body.to_string();
        let server = Server::start(None, move |_, _| Reply::Json(status, body.clone()));
        let spool = dir.path().join(format!("spool-{status}"));
        let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[]);
        assert_eq!(out.status.code(), Some(1), "{status}: {}", stderr_of(&out));
        assert_eq!(server.requests().len(), 1, "{status} was retried");
        assert!(of_type(&ev, "transcript").is_empty());
        let errors = of_type(&ev, "error");
        assert_eq!(errors.len(), 1, "{ev:#?}");
        assert_eq!(errors[0]["stage"], "upload");
        assert_eq!(errors[0]["code"], code);
        assert_eq!(errors[0]["retrying"], false);
        let message = errors[0]["message"].as_str().unwrap();
        assert!(message.contains(&status.to_string()), "{message}");
        assert!(message.contains("failed"), "{message}");
        let id = &ids(&ev, "speech_end")[0];
        let failed = spool_files(&spool.join("failed"));
        assert_eq!(failed, [format!("{id}.json"), format!("{id}.ogg")]);
        assert!(spool_files(&spool).is_empty());
    }
}

#[test]
fn ogg_rejected_as_a_format_is_resent_as_wav_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 2);
    let server = Server::start(None, |r, _| {
        let file = r.part("file").expect("file");
        if file
            .filename
            .as_deref()
            .is_some_and(|f| f.ends_with(".ogg"))
        {
            // whisper.cpp's server without --convert
            Reply::Json(400, json!({"error":"failed to read WAV file"}).to_string())
        } else {
            ok_json("wav ok")
        }
    });
    let spool = dir.path().join("spool");
    let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let reqs = server.requests();
    let names: Vec<String> = reqs
        .iter()
        .map(|r| r.part("file").unwrap().filename.clone().unwrap())
        .collect();
    let ends = ids(&ev, "speech_end");
    assert_eq!(
        names,
        [
            format!("{}.ogg", ends[0]),
            format!("{}.wav", ends[0]),
            format!("{}.wav", ends[1])
        ],
        "the choice of WAV was not remembered"
    );
    let ends_ms: Vec<u64> = of_type(&ev, "speech_end")
        .iter()
        .map(|e| e["duration_ms"].as_u64().unwrap())
        .collect();
    for (r, ms) in reqs[1..].iter().zip(ends_ms) {
        let file = r.part("file").unwrap();
        assert_eq!(file.content_type.as_deref(), Some("audio/wav"));
        let wav = hound::WavReader::new(std::io::Cursor::new(&file.data)).expect("a valid WAV");
        assert_eq!(wav.spec().sample_rate, 16_000);
        assert_eq!(wav.spec().channels, 1);
        assert_eq!(wav.duration() as u64 / 16, ms);
    }
    let t = of_type(&ev, "transcript");
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|t| t["text"] == "wav ok"));
}

#[test]
fn a_failing_primary_falls_back_to_the_next_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let primary = Server::start(None, |_, _| {
        Reply::Json(500, json!({"detail":"model not loaded"}).to_string())
    });
    let fallback = Server::start(None, |_, _| ok_json("from the fallback"));
    let spool = dir.path().join("spool");
    let set = format!(
        "transcribe.fallback=[{{endpoint={:?}, model=\"whisper-1\"}}]",
        fallback.url()
    );
    let (out, ev) = transcribe_file(&input, &spool, &primary.url(), &[&set]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        primary.requests().len(),
        3,
        "the SDK policy: 1 attempt + 2 retries"
    );
    let reqs = fallback.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].field("model"), Some("whisper-1"));
    // The primary's key goes to the primary's host only.
    assert!(reqs[0].header("authorization").is_none());
    let t = of_type(&ev, "transcript")[0];
    assert_eq!(t["text"], "from the fallback");
    assert_eq!(t["endpoint"], fallback.url());
    assert_eq!(t["model"], "whisper-1");
    assert_eq!(t["attempts"], 4);
}

#[test]
fn kill_9_during_an_upload_loses_no_utterance() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 3);
    let spool = dir.path().join("spool");
    // The first upload is answered, the second is held until hark is killed.
    let first = Server::start(None, |_, i| {
        if i == 0 {
            ok_json("first")
        } else {
            Reply::Hold
        }
    });
    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(upload_args(&spool, &first.url(), &[]));
    let mut cmd = hark();
    cmd.args(&args).env("HARK_TEST_KEY", KEY);
    let running = Running::spawn(cmd);
    let mut seen = Vec::new();
    running.wait_for(&mut seen, WAIT, |e| e["type"] == "transcript");
    first.wait_for_requests(2, WAIT);
    running.signal(libc::SIGKILL);
    let (_, rest, _) = running.finish(WAIT);
    seen.extend(rest);
    // What reached `speech_end`: the events hark wrote out before it died, and the uploads the
    // server saw (a kill -9 can take the last events still queued for stdout with it).
    let mut ended: BTreeSet<String> = ids(&seen, "speech_end").into_iter().collect();
    for r in first.requests() {
        let name = r.part("file").unwrap().filename.clone().unwrap();
        ended.insert(name.trim_end_matches(".ogg").to_owned());
    }
    for name in spool_files(&spool) {
        if let Some(id) = name.strip_suffix(".json") {
            ended.insert(id.to_owned());
        }
    }
    assert!(ended.len() >= 2, "{seen:#?}");
    let mut transcribed = ids(&seen, "transcript");
    assert_eq!(transcribed.len(), 1);

    // After the "reboot": `hark upload` sends what is left, oldest first, and exits.
    let second = Server::start(None, |_, _| ok_json("later"));
    let mut args = upload_args(&spool, &second.url(), &[]);
    args.push("upload".into());
    let out = run_keyed(&args);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let ev = events(&out.stdout);
    let later = ids(&ev, "transcript");
    assert!(
        later.windows(2).all(|w| w[0] < w[1]),
        "not oldest first: {later:?}"
    );
    transcribed.extend(later);
    for id in &ended {
        assert!(transcribed.contains(id), "{id} was lost: {transcribed:?}");
    }
    // Each exactly once: the kill fell before the second transcript was emitted.
    let unique: BTreeSet<&String> = transcribed.iter().collect();
    assert_eq!(
        unique.len(),
        transcribed.len(),
        "a duplicate: {transcribed:?}"
    );
    assert_eq!(
        transcribed.len(),
        ended.len(),
        "{transcribed:?} vs {ended:?}"
    );
    assert!(spool_files(&spool).is_empty(), "{:?}", spool_files(&spool));
    assert!(!spool.join("failed").exists());
}

#[test]
fn hark_upload_without_a_server_keeps_the_spool_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let spool = dir.path().join("spool");
    let (_, ev) = run_input(&input, &spool, &[]);
    let id = &ids(&ev, "speech_end")[0];
    let url = format!("http://127.0.0.1:{}/v1", free_port());
    let mut args = upload_args(&spool, &url, &[]);
    args.push("upload".into());
    let out = run_keyed(&args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("1 still wait"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(
        spool_files(&spool),
        [format!("{id}.json"), format!("{id}.ogg")]
    );
}

#[test]
fn tls_with_an_untrusted_certificate_is_refused_and_ca_file_makes_it_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let ca = test_ca(dir.path());
    let server = Server::start(Some(&ca), |_, _| ok_json("over tls"));
    assert!(server.url().starts_with("https://127.0.0.1:"));

    let spool = dir.path().join("spool");
    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(upload_args(&spool, &server.url(), &[]));
    let mut cmd = hark();
    cmd.args(&args).env("HARK_TEST_KEY", KEY);
    let running = Running::spawn(cmd);
    let mut seen = Vec::new();
    let err = running.wait_for(&mut seen, WAIT, |e| e["type"] == "error");
    assert_eq!(err["code"], "tls", "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("certificate"),
        "{err}"
    );
    running.signal(libc::SIGTERM);
    let (status, _, stderr) = running.finish(WAIT);
    assert!(status.success(), "{stderr}");
    assert!(server.requests().is_empty(), "a request got through");

    let trust = format!("transcribe.ca_file={:?}", ca.ca_pem.display().to_string());
    let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[&trust]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    // The utterance left by the refused run and the new one.
    let t = of_type(&ev, "transcript");
    assert_eq!(t.len(), 2, "{ev:#?}");
    assert!(t.iter().all(|t| t["text"] == "over tls"));
    assert!(spool_files(&spool).is_empty());
}

#[test]
fn a_key_over_plain_http_to_another_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let spool = dir.path().join("spool");
    let (out, _) = transcribe_file(&input, &spool, "http://192.0.2.10:8000/v1", &[]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr_of(&out);
    assert!(
        err.contains("refusing to send the API key over plain http"),
        "{err}"
    );
    assert!(err.contains("allow_insecure_http"), "{err}");
    assert!(!spool.exists() || spool_files(&spool).is_empty());
}

#[test]
fn without_a_key_hark_says_how_to_enable_transcription_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let spool = dir.path().join("spool");
    let out = run(&[
        "-i",
        input.to_str().unwrap(),
        "-s",
        &format!("spool.dir={:?}", spool.display().to_string()),
    ]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("transcription is off"), "{err}");
    assert!(err.contains("OPENAI_API_KEY"), "{err}");
    let ev = events(&out.stdout);
    let end = of_type(&ev, "speech_end")[0];
    assert!(Path::new(end["audio"].as_str().unwrap()).exists());
}

#[test]
fn sigterm_abandons_an_upload_in_flight_within_the_deadline_and_keeps_the_audio() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let spool = dir.path().join("spool");
    let server = Server::start(None, |_, _| Reply::Hold);
    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(upload_args(&spool, &server.url(), &[]));
    let mut cmd = hark();
    cmd.args(&args).env("HARK_TEST_KEY", KEY);
    let running = Running::spawn(cmd);
    let mut seen = Vec::new();
    let end = running.wait_for(&mut seen, WAIT, |e| e["type"] == "speech_end");
    server.wait_for_requests(1, WAIT);
    running.signal(libc::SIGTERM);
    // The grace for the upload in flight is 5 s; the limit leaves room for a slow machine.
    let (status, rest, stderr) = running.finish(Duration::from_secs(30));
    seen.extend(rest);
    assert!(status.success(), "{stderr}");
    assert!(of_type(&seen, "transcript").is_empty());
    let id = end["utterance"].as_str().unwrap();
    assert_eq!(
        spool_files(&spool),
        [format!("{id}.json"), format!("{id}.ogg")]
    );
    assert!(stderr.contains("stays in the spool"), "{stderr}");
}

#[test]
fn oversized_and_malformed_bodies_are_final_errors_and_html_errors_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    // A proxy's HTML error page is a retryable 502 whose words are kept.
    let proxy = Server::start(None, |_, i| match i {
        0 => Reply::Full {
            status: 502,
            headers: vec![("Content-Type".into(), "text/html".into())],
            body: b"<html><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
        },
        _ => ok_json("fine"),
    });
    let spool = dir.path().join("spool-proxy");
    let (out, ev) = transcribe_file(&input, &spool, &proxy.url(), &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let e = of_type(&ev, "error")[0];
    assert_eq!(e["code"], "server_error");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("502 Bad Gateway") && !message.contains("<h1>"),
        "{message}"
    );
    assert_eq!(of_type(&ev, "transcript")[0]["attempts"], 2);

    // A complete answer that cannot be read is not retried: the audio is kept in failed/.
    let bodies = [
        format!("{{\"text\":\"{}\"}}", "a".repeat(5 << 20)),
        "{\"text\": \"unterminated".to_owned(),
        "{\"no_text\": 1}".to_owned(),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let server = Server::start(None, move |_, _| Reply::Json(200, body.clone()));
        let spool = dir.path().join(format!("spool-{i}"));
        let (out, ev) = transcribe_file(&input, &spool, &server.url(), &[]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
        assert_eq!(server.requests().len(), 1);
        let errors = of_type(&ev, "error");
        assert_eq!(errors.len(), 1, "{ev:#?}");
        assert_eq!(errors[0]["code"], "bad_response");
        assert_eq!(errors[0]["retrying"], false);
        assert_eq!(spool_files(&spool.join("failed")).len(), 2);
    }
}

#[test]
fn keys_come_from_a_file_or_systemd_credentials_and_azure_gets_an_api_key_header() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let server = Server::start(None, |_, _| ok_json("ok"));
    let base = server.url().trim_end_matches("/v1").to_owned();

    // api_key_file (surrounding whitespace trimmed), to an Azure-style deployment URL.
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let azure = format!("{base}/openai/deployments/whisper?api-version=2024-06-01");
    let spool = dir.path().join("spool-azure");
    let file_set = format!(
        "transcribe.api_key_file={:?}",
        key_file.display().to_string()
    );
    let (out, ev) = transcribe_file(&input, &spool, &azure, &[&file_set]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let r = &server.requests()[0];
    assert_eq!(
        r.target,
        "/openai/deployments/whisper/audio/transcriptions?api-version=2024-06-01"
    );
    assert_eq!(r.header("api-key"), Some(KEY));
    assert!(r.header("authorization").is_none());
    assert_eq!(of_type(&ev, "transcript").len(), 1);

    // $CREDENTIALS_DIRECTORY/api_key (systemd LoadCredential=), with keep_audio.
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("api_key"), "sk-from-credentials").unwrap();
    let spool = dir.path().join("spool-creds");
    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(upload_args(
        &spool,
        &server.url(),
        &["transcribe.api_key_env=\"\"", "spool.keep_audio=true"],
    ));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_env(&refs, &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let r = &server.requests()[1];
    assert_eq!(
        r.header("authorization"),
        Some("Bearer sk-from-credentials")
    );
    let ev = events(&out.stdout);
    let end = of_type(&ev, "speech_end")[0];
    let id = end["utterance"].as_str().unwrap();
    assert!(end["audio"].is_string(), "kept audio is announced");
    assert_eq!(
        spool_files(&spool.join("done")),
        [format!("{id}.json"), format!("{id}.ogg")]
    );
    assert!(spool_files(&spool).is_empty());

    // An empty credential (hark.service's SetCredential= fallback when /etc/hark/api_key does
    // not exist) is no key: a self-hosted endpoint is called without Authorization.
    std::fs::write(creds.join("api_key"), "\n").unwrap();
    let spool = dir.path().join("spool-creds-empty");
    let mut args = vec!["-i".to_owned(), input.display().to_string()];
    args.extend(upload_args(
        &spool,
        &server.url(),
        &["transcribe.api_key_env=\"\""],
    ));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_env(&refs, &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(server.requests()[2].header("authorization").is_none());
    assert_eq!(of_type(&events(&out.stdout), "transcript").len(), 1);

    // A key file that cannot be read is a configuration error naming the key.
    let missing = format!("transcribe.api_key_file={:?}", "/nonexistent/key");
    let (out, _) = transcribe_file(
        &input,
        &dir.path().join("spool-x"),
        &server.url(),
        &[&missing],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr_of(&out).contains("transcribe.api_key_file /nonexistent/key"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn an_utterance_under_a_tenth_of_a_second_is_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let input = sentences(dir.path(), 1);
    let spool = dir.path().join("spool");
    let (_, ev) = run_input(&input, &spool, &[]);
    let id = ids(&ev, "speech_end")[0].clone();
    // As if vad.min_utterance_ms had let a 60 ms blip through.
    let meta_path = spool.join(format!("{id}.json"));
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["duration_ms"] = json!(60);
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let server = Server::start(None, |_, _| ok_json("never"));
    let mut args = upload_args(&spool, &server.url(), &[]);
    args.push("upload".into());
    let out = run_keyed(&args);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(server.requests().is_empty());
    let ev = events(&out.stdout);
    let dropped = of_type(&ev, "dropped");
    assert_eq!(dropped.len(), 1, "{ev:#?}");
    assert_eq!(dropped[0]["reason"], "too_short");
    assert_eq!(dropped[0]["utterance"], id.as_str());
    assert!(spool_files(&spool).is_empty());
}
