//! The resume cache of `hark transcribe`: transcripts already received for a recording, so that a
//! second run uploads only what the first did not finish.
//!
//! One directory per recording and settings: `{cache}/{content}-{settings}/`, where `content` is a
//! BLAKE3 hash of the file's bytes and `settings` a hash of everything that changes where the
//! utterances are cut or what the server is asked (`[vad]`, `capture.channel`, `[encode]`, and
//! the model, language, prompt, response format, temperature, granularities and includes of
//! `[transcribe]`). In it, `transcripts.jsonl` holds one line per transcribed utterance keyed by
//! its offset and duration in the recording; segmentation is deterministic, so the same file cut
//! by the same settings gives the same utterances. Lines are appended and flushed as transcripts
//! arrive; a line torn by a crash is skipped when read. `spool/` holds the audio being uploaded.
//! Deliberately not here: expiry (delete the directory to forget), sharing between machines.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::render::Text;
use crate::config::Config;

/// Where the cache lives without `--cache-dir`: `$XDG_CACHE_HOME/hark/transcribe`, else
/// `~/.cache/hark/transcribe`, else `hark-cache-UID` in the temporary directory.
pub(crate) fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .map(|b| b.join("hark"))
        .unwrap_or_else(|| {
            let uid = crate::sys::getuid();
            std::env::temp_dir().join(format!("hark-cache-{uid}"))
        });
    base.join("transcribe")
}

/// The BLAKE3 hash of everything `r` yields, as hex.
pub(crate) fn content_hash(mut r: impl Read) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// A hash of the settings that decide the utterances and their transcripts.
pub(crate) fn settings_hash(config: &Config) -> String {
    let t = &config.transcribe;
    // The reference recordings by content: a new recording of a speaker is a new question.
    let speakers: Vec<(String, String)> = t
        .known_speakers
        .iter()
        .map(|k| {
            let audio = File::open(&k.audio)
                .and_then(content_hash)
                .unwrap_or_else(|_| k.audio.display().to_string());
            (k.name.clone(), audio)
        })
        .collect();
    let key = serde_json::json!({
        "vad": config.vad,
        "channel": config.capture.channel,
        "encode": config.encode,
        "model": t.model,
        "language": t.language,
        "prompt": t.prompt,
        "response_format": t.response_format,
        "temperature": t.temperature,
        "timestamp_granularities": t.timestamp_granularities,
        "include": t.include,
        "chunking_strategy": t.chunking_strategy,
        "endpoint": t.endpoint,
        "known_speakers": speakers,
    });
    blake3::hash(key.to_string().as_bytes())
        .to_hex()
        .to_string()
}

/// One line of `transcripts.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Line {
    offset_ms: u64,
    duration_ms: u64,
    #[serde(flatten)]
    text: Text,
}

/// The transcripts of one recording under one set of settings.
pub(crate) struct Cache {
    dir: PathBuf,
    known: HashMap<(u64, u64), Text>,
    log: File,
    /// A write failed part-way: the next line starts on a line of its own.
    torn: bool,
}

impl Cache {
    /// Open (and create) `{root}/{content}-{settings}`; read what earlier runs left.
    pub(crate) fn open(root: &Path, content: &str, settings: &str) -> io::Result<Cache> {
        let dir = root.join(format!(
            "{}-{}",
            &content[..content.len().min(16)],
            &settings[..settings.len().min(16)]
        ));
        fs::create_dir_all(&dir)?;
        // Transcripts are private: only the user who made them reads them.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let path = dir.join("transcripts.jsonl");
        let mut known = HashMap::new();
        match File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    // A torn line (a crash or a full disk mid-append, perhaps inside a multi-byte
                    // character) or foreign bytes are skipped.
                    if let Ok(l) = serde_json::from_slice::<Line>(&line?) {
                        known.insert((l.offset_ms, l.duration_ms), l.text);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut log = OpenOptions::new().create(true).append(true).open(&path)?;
        // A torn line must not swallow the next one.
        if fs::metadata(&path)?.len() > 0 && !ends_with_newline(&path)? {
            log.write_all(b"\n")?;
        }
        Ok(Cache {
            dir,
            known,
            log,
            torn: false,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn len(&self) -> usize {
        self.known.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    pub(crate) fn get(&self, offset_ms: u64, duration_ms: u64) -> Option<&Text> {
        self.known.get(&(offset_ms, duration_ms))
    }

    /// Remember a transcript (appended to the file at once).
    pub(crate) fn put(&mut self, offset_ms: u64, duration_ms: u64, text: &Text) -> io::Result<()> {
        let line = Line {
            offset_ms,
            duration_ms,
            text: text.clone(),
        };
        let mut json = if self.torn { vec![b'\n'] } else { Vec::new() };
        serde_json::to_writer(&mut json, &line).map_err(io::Error::other)?;
        json.push(b'\n');
        self.torn = self.log.write_all(&json).is_err();
        if self.torn {
            return Err(io::Error::other("cannot append to transcripts.jsonl"));
        }
        self.known.insert((offset_ms, duration_ms), text.clone());
        Ok(())
    }
}

fn ends_with_newline(path: &Path) -> io::Result<bool> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    f.seek(SeekFrom::End(-1))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b)?;
    Ok(b[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_survive_a_reopen_and_a_torn_line() {
        let root = tempfile::tempdir().unwrap();
        let text = Text {
            text: "hello".into(),
            model: "m".into(),
            ..Text::default()
        };
        {
            let mut c = Cache::open(root.path(), "abcdef0123456789ff", "0123").unwrap();
            c.put(1_000, 2_000, &text).unwrap();
        }
        let path = root.path().join("abcdef0123456789-0123/transcripts.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        // Torn inside a multi-byte character: not even UTF-8.
        f.write_all(b"{\"offset_ms\":5000,\"text\":\"\xe6\x97")
            .unwrap();
        drop(f);
        let mut c = Cache::open(root.path(), "abcdef0123456789ff", "0123").unwrap();
        assert_eq!(c.get(1_000, 2_000), Some(&text));
        assert_eq!(c.len(), 1);
        c.put(5_000, 1_000, &text).unwrap();
        let c = Cache::open(root.path(), "abcdef0123456789ff", "0123").unwrap();
        assert_eq!(c.len(), 2, "the line after the torn one is read");
        assert!(c.get(1_000, 2_001).is_none(), "keyed by duration too");
    }

    #[test]
    fn settings_that_cut_differently_or_ask_differently_change_the_key() {
        let base = Config::load(None, &[]).unwrap();
        let other_vad = Config::load(None, &["vad.silence_ms=300".into()]).unwrap();
        let other_model = Config::load(None, &["transcribe.model=\"x\"".into()]).unwrap();
        let other_timeout = Config::load(None, &["transcribe.timeout_s=5".into()]).unwrap();
        let h = settings_hash(&base);
        assert_ne!(h, settings_hash(&other_vad));
        assert_ne!(h, settings_hash(&other_model));
        assert_eq!(h, settings_hash(&other_timeout));
    }
}
