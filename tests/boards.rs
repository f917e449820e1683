//! Every shipped board config (boards/*.toml) passes `hark check-config` with the real binary, sets
//! a real capture device and has every section, and its capture shape (rate, channels, channel)
//! works through real ALSA; Cross.toml covers the three ARM targets.
//! (STYLE.md habit 11: every shipped config is tested.)

use crate::common;

use std::path::{Path, PathBuf};

use std::process::Stdio;
use std::time::Duration;

use common::*;

const SECTIONS: [&str; 6] = ["capture", "vad", "encode", "transcribe", "spool", "output"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn boards() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("boards"))
        .expect("boards/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn device_of(table: &toml::Table) -> Option<&str> {
    table.get("capture")?.get("device")?.as_str()
}

#[test]
fn boards_has_a_config_for_each_supported_board() {
    let names: Vec<String> = boards()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.len() >= 6, "boards/ has only {names:?}");
    for expected in [
        "raspberry-pi-zero-2-w-usb-mic.toml",
        "raspberry-pi-4-usb-mic.toml",
        "raspberry-pi-5-usb-mic.toml",
        "respeaker-2mic-hat.toml",
        "respeaker-usb-mic-array-v2.toml",
        "generic-usb-mic-48k.toml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
}

#[test]
fn every_board_config_passes_check_config() {
    let files = boards();
    assert!(files.len() >= 6, "boards/ has {} files", files.len());
    for file in &files {
        let name = file.display();
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!text.trim().is_empty(), "{name} is empty");
        let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        for section in SECTIONS {
            assert!(table.contains_key(section), "{name} has no [{section}]");
        }
        let device = device_of(&table).unwrap_or_else(|| panic!("{name}: no capture.device"));
        assert!(
            !device.is_empty() && device != "default",
            "{name}: capture.device is {device:?}: a board file names the board's device"
        );

        let out = hark()
            .args(["check-config".as_ref(), file.as_os_str()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {:?}: {stderr}", out.status);
        // The effective config is the file's, not a default that hid it.
        let effective: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
        assert_eq!(device_of(&effective), Some(device), "{name}");
        for (key, value) in table["capture"].as_table().unwrap() {
            assert_eq!(effective["capture"].get(key), Some(value), "{name}: {key}");
        }
    }
}

#[test]
fn cross_toml_installs_alsa_for_each_arm_target_and_finds_it_on_armv6() {
    let text = std::fs::read_to_string(repo().join("Cross.toml")).expect("Cross.toml (capital C)");
    let table: toml::Table = text.parse().unwrap();
    for target in [
        "aarch64-unknown-linux-gnu",
        "armv7-unknown-linux-gnueabihf",
        "arm-unknown-linux-gnueabihf",
    ] {
        let pre_build = table["target"][target]["pre-build"]
            .as_array()
            .unwrap_or_else(|| panic!("{target}: no pre-build"));
        let steps: Vec<&str> = pre_build.iter().map(|s| s.as_str().unwrap()).collect();
        let all = steps.join("\n");
        assert!(
            all.contains("dpkg --add-architecture $CROSS_DEB_ARCH"),
            "{target}"
        );
        assert!(all.contains("libasound2-dev:$CROSS_DEB_ARCH"), "{target}");
        // cross 0.2.5's images carry cmake 3.23 in /usr/local/bin; Ubuntu's own is too old for
        // libopus, and installing it only confuses.
        assert!(!all.contains("cmake"), "{target}: no cmake from apt");
    }
    // cross 0.2.5's ARMv6 image sets no pkg-config path: alsa-sys would not find ALSA.
    let passthrough: Vec<&str> =
        table["target"]["arm-unknown-linux-gnueabihf"]["env"]["passthrough"]
            .as_array()
            .expect("ARMv6 env passthrough")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
    assert!(
        passthrough.contains(&"PKG_CONFIG_PATH=/usr/lib/arm-linux-gnueabihf/pkgconfig"),
        "{passthrough:?}"
    );
    assert!(passthrough.contains(&"PKG_CONFIG_ALLOW_CROSS=1"));
}

/// Each board's capture settings, run for real: the board file as the config, its device replaced
/// by the ALSA `file` plugin fed a recording of the board's shape (its rate and channel count),
/// with speech only on the channel(s) the file selects. Finding the utterance means the channel
/// pick or mix, and the resampling for 48 kHz boards, did what the file says.
#[test]
fn every_board_capture_shape_works_through_alsa() {
    let dir = tempfile::tempdir().unwrap();
    let words = speech("Turn on the kitchen lights.", dir.path());
    let mono = timeline(std::slice::from_ref(&words), 0, 1000, 0.0).samples;
    for file in boards() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let table: toml::Table = std::fs::read_to_string(&file).unwrap().parse().unwrap();
        let capture = &table["capture"];
        let rate = capture["sample_rate"].as_integer().unwrap() as usize;
        let channels = capture["channels"].as_integer().unwrap() as usize;
        let speaks = |c: usize| match &capture["channel"] {
            toml::Value::String(s) => s == "mix",
            v => v.as_integer() == Some(c as i64),
        };
        // Sample-and-hold up to the board's rate is crude, but hark's resampler filters it, and
        // the VAD needs only the speech band.
        assert_eq!(rate % RATE as usize, 0, "{name}: rate {rate}");
        let hold = rate / RATE as usize;
        let mut interleaved = Vec::with_capacity(mono.len() * hold * channels);
        for &s in &mono {
            for _ in 0..hold {
                interleaved.extend((0..channels).map(|c| if speaks(c) { s } else { 0 }));
            }
        }
        let raw = dir.path().join(format!("{name}.raw"));
        write_raw(&raw, &interleaved);
        let conf_dir = dir.path().join(&name);
        std::fs::create_dir_all(&conf_dir).unwrap();
        let conf = alsa_config(&conf_dir, &raw);

        let mut cmd = hark();
        cmd.env("ALSA_CONFIG_PATH", &conf)
            .arg("-c")
            .arg(&file)
            .args(base_args(&conf_dir.join("spool")))
            .args(["-d", "hark_test", "-s", "capture.ring_ms=120000"])
            .args(["-s", "output.format=\"json\"", "-s", "output.socket=\"\""])
            .stdin(Stdio::null());
        let running = Running::spawn(cmd);
        let mut seen = Vec::new();
        let end = running.wait_for(&mut seen, Duration::from_secs(60), |e| {
            e["type"] == "speech_end" || e["type"] == "dropped"
        });
        running.signal(libc::SIGTERM);
        let (status, rest, stderr) = running.finish(Duration::from_secs(30));
        assert!(status.success(), "{name}: exit {status}: {stderr}");
        assert_eq!(end["type"], "speech_end", "{name}: {seen:#?}");
        let spoken = (words.len() * 1000 / RATE as usize) as i64;
        let duration = end["duration_ms"].as_i64().unwrap();
        // The utterance holds the speech, its pre-roll and the closing silence.
        assert!(
            duration >= spoken && duration <= spoken + 2000,
            "{name}: {duration} ms for {spoken} ms of speech"
        );
        seen.extend(rest);
        assert!(of_type(&seen, "error").is_empty(), "{name}: {seen:#?}");
    }
}
