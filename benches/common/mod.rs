//! Helpers shared by the benchmarks: paths as TOML strings, a spool directory on tmpfs, running
//! the tools that make speech (espeak-ng, sox), reading WAV files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A path as a TOML basic string.
pub fn toml_string(path: &Path) -> Result<String, String> {
    let s = path
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// A fresh spool directory on tmpfs (/dev/shm), else in the temp dir; and whether it is /dev/shm.
pub fn spool_dir(prefix: &str) -> (PathBuf, bool) {
    let name = format!("{prefix}-{}", std::process::id());
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        (shm.join(name), true)
    } else {
        (std::env::temp_dir().join(name), false)
    }
}

/// The first of espeak-ng and sox that cannot be run.
pub fn missing_tool() -> Option<&'static str> {
    ["espeak-ng", "sox"].into_iter().find(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .map_or(true, |o| !o.status.success())
    })
}

pub fn read_wav(path: &Path) -> Result<Vec<i16>, String> {
    let reader =
        hound::WavReader::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    reader
        .into_samples::<i16>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub fn tool(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
