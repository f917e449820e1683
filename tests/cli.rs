//! Command-line behaviour: config errors (exit 78, naming the key), check-config, bad inputs.

use crate::common;

use common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_exits_78_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[vad]\nbogus = 1\n", "vad.bogus"),
        ("[vad]\nmode = 7\n", "vad.mode"),
        ("[vad]\nsilence_ms = \"long\"\n", "vad.silence_ms"),
        ("[capture]\nchannel = \"left\"\n", "capture.channel"),
        ("colour = \"red\"\n", "colour"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        for args in [
            vec!["check-config".to_string(), path.display().to_string()],
            vec![
                "-c".to_string(),
                path.display().to_string(),
                "-i".into(),
                "x.wav".into(),
            ],
        ] {
            let out = hark().args(&args).output().unwrap();
            assert_eq!(out.status.code(), Some(78), "{toml}: {}", stderr(&out));
            let err = stderr(&out);
            assert!(
                err.contains(key),
                "{toml}: error does not name {key}: {err}"
            );
            assert!(
                err.contains(&path.display().to_string()),
                "names the file: {err}"
            );
        }
    }
}

#[test]
fn bad_override_exits_78_and_names_the_key() {
    for (set, key) in [
        ("vad.frame_ms=25", "vad.frame_ms"),
        ("vad.nonsense=1", "vad.nonsense"),
        ("encode.bitrate=fast", "encode.bitrate"),
    ] {
        let out = hark().args(["check-config", "-s", set]).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{set}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(key) && err.contains("-s"), "{set}: {err}");
    }
    let out = hark()
        .args(["check-config", "-s", "novalue"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hark.toml");
    std::fs::write(
        &path,
        "device_id = \"kiosk-7\"\n[vad]\nsilence_ms = 900\n[output.mqtt]\nurl = \"mqtt://hark:s3cretpw@broker:1883\"\n",
    )
    .unwrap();
    let out = hark()
        .args(["check-config"])
        .arg(&path)
        .args(["-s", "vad.mode=3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("device_id = \"kiosk-7\""), "{text}");
    assert!(text.contains("silence_ms = 900"), "{text}");
    assert!(text.contains("mode = 3"), "{text}");
    assert!(
        text.contains("pre_roll_ms = 300"),
        "defaults are shown: {text}"
    );
    assert!(
        !text.contains("s3cretpw") && !stderr(&out).contains("s3cretpw"),
        "{text}"
    );
    // The printed config is itself a valid config.
    let again = dir.path().join("again.toml");
    std::fs::write(&again, text.as_bytes()).unwrap();
    let out = hark().arg("check-config").arg(&again).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn missing_unreadable_or_broken_inputs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let run_on = |input: &std::path::Path| {
        let mut args = base_args(&spool);
        args.extend(["-i".into(), input.display().to_string()]);
        hark().args(&args).output().unwrap()
    };

    let missing = dir.path().join("nope.wav");
    let out = run_on(&missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nope.wav") && stderr(&out).contains("No such file"),
        "{}",
        stderr(&out)
    );

    let out = run_on(dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("directory"), "{}", stderr(&out));

    let broken = dir.path().join("broken.wav");
    let mut bytes = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00".to_vec();
    bytes.extend_from_slice(&[0xff; 7]);
    std::fs::write(&broken, bytes).unwrap();
    let out = run_on(&broken);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("broken.wav") && err.contains("WAV"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let stereo = dir.path().join("stereo.wav");
    write_wav(&stereo, &[0; 3200], 16_000, 2);
    let mut args = base_args(&spool);
    args.extend([
        "-i".into(),
        stereo.display().to_string(),
        "-s".into(),
        "capture.channel=2".into(),
    ]);
    let out = hark().args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("capture.channel"), "{}", stderr(&out));
}

/// When several things are wrong, hark reports them in its start order: the outputs (socket),
/// then the spool, then the API key, then the input. A user fixing one problem at a time sees them
/// in that order, and the exit code is the first one's.
#[test]
fn with_several_faults_the_outputs_and_the_spool_are_reported_first() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let bad_spool = format!("spool.dir={}", not_a_dir.join("spool").display());
    let good_spool = format!("spool.dir={}", dir.path().join("spool").display());
    let socket = format!(
        "output.socket={}",
        dir.path().join("nodir/s.sock").display()
    );
    let no_key = format!(
        "transcribe.api_key_file={}",
        dir.path().join("nokey").display()
    );
    let missing = dir.path().join("missing.wav").display().to_string();
    let cases: [(&[&str], i32, &str); 4] = [
        // An unusable spool (1) before an unreadable key file (78).
        (
            &["-s", &bad_spool, "-s", &no_key, "-i", &missing],
            1,
            "spool directory",
        ),
        // The socket's missing directory before a missing input (both 1).
        (
            &["-s", &good_spool, "-s", &socket, "-i", &missing],
            1,
            "output.socket",
        ),
        // The key (78) before a missing input (1).
        (
            &["-s", &good_spool, "-s", &no_key, "-i", &missing],
            78,
            "nokey",
        ),
        // `hark upload`: the spool (1) before a missing key (78).
        (
            &[
                "-s",
                &bad_spool,
                "-s",
                "transcribe.api_key_env=\"NO_SUCH_KEY\"",
                "upload",
            ],
            1,
            "spool directory",
        ),
    ];
    for (args, code, names) in cases {
        let out = hark()
            .args(["-c", "/dev/null", "-s", "output.status_interval_s=0"])
            .args(args)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: expected {names:?} in {err}");
    }
}

#[test]
fn unknown_subcommand_or_flag_is_a_usage_error() {
    let out = hark().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_wav_header_with_an_absurd_rate_or_channel_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    for (rate, channels, what) in [
        (100_000_007u32, 1u16, "sample rate"),
        (48_000, 64, "channel"),
    ] {
        let wav = dir.path().join("absurd.wav");
        let block = channels as u32 * 2;
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36u32 + 4).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&rate.wrapping_mul(block).to_le_bytes());
        b.extend_from_slice(&(block as u16).to_le_bytes());
        b.extend_from_slice(&16u16.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&block.to_le_bytes());
        b.extend(std::iter::repeat_n(0u8, block as usize));
        std::fs::write(&wav, b).unwrap();
        let mut args = base_args(&spool);
        args.extend(["-i".into(), wav.display().to_string()]);
        let out = hark().args(&args).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("absurd.wav") && err.contains(what), "{err}");
    }
}
