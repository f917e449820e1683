//! Every shipped board config (boards/*.toml) passes `hark check-config` with the real binary, sets
//! a real capture device and has every section; Cross.toml covers the three ARM targets.
//! (STYLE.md habit 11: every shipped config is tested.)

mod common;

use std::path::{Path, PathBuf};

use common::hark;

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
fn cross_toml_installs_alsa_and_cmake_for_each_arm_target() {
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
        assert!(all.contains("dpkg --add-architecture $CROSS_DEB_ARCH"), "{target}");
        assert!(all.contains("libasound2-dev:$CROSS_DEB_ARCH"), "{target}");
        assert!(all.contains("cmake"), "{target}: libopus is built with cmake");
    }
}
