//! The spool: a directory of finished utterances, `<id>.ogg` beside `<id>.json`, and the queue that
//! the uploader works through, oldest first.
//!
//! An utterance is written to a hidden `.<id>.ogg.part` while it is spoken, then fsynced and renamed;
//! its `.json` is written the same way, and the directory is fsynced. A `.json` therefore always
//! stands beside a complete `.ogg`, and an entry without one is not an utterance yet. Ids sort by
//! time and are unique across restarts. Part files left by a crash are moved to `partial/` (kept,
//! never uploaded) when the spool is opened. Deliberately not here: uploading, events.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::event::EndReason;

/// Errors of the spool. All of them mean the disk refused a write: not retried per utterance.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("spool file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error(
        "spool directory {path} is in use by another hark process (two would upload every utterance twice)"
    )]
    Busy { path: PathBuf },
}

/// What `<id>.json` says about an utterance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct UtteranceMeta {
    pub(crate) v: u8,
    pub(crate) utterance: String,
    pub(crate) device: String,
    /// Start in the stream's timeline.
    pub(crate) offset_ms: u64,
    pub(crate) duration_ms: u64,
    /// Samples at `sample_rate`: exactly what the Ogg file decodes to.
    pub(crate) samples: u64,
    pub(crate) sample_rate: u32,
    /// Wall-clock time of the first sample, RFC 3339 UTC.
    pub(crate) start_time: String,
    pub(crate) reason: EndReason,
    /// From the first voiced frame to the end of the last one.
    pub(crate) speech_ms: u64,
    /// Where the first voiced frame starts, in the stream's timeline (after the pre-roll).
    /// Missing in files written before it existed: read as 0.
    #[serde(default)]
    pub(crate) speech_offset_ms: u64,
    /// RMS level of the voiced frames.
    pub(crate) level_dbfs: f64,
    /// Where the audio came from, e.g. `alsa:default` or `file:recording.wav`.
    pub(crate) source: String,
    /// The Ogg file's name in the spool directory.
    pub(crate) audio: String,
}

/// A finished utterance waiting in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: String,
    pub(crate) audio: PathBuf,
    pub(crate) meta: PathBuf,
    /// Both files together.
    pub(crate) bytes: u64,
}

/// An utterance's audio being written.
pub(crate) struct Part {
    pub(crate) id: String,
    path: PathBuf,
    file: BufWriter<File>,
}

impl Part {
    /// Where the audio is being written.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Write for Part {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    seq: AtomicU32,
    salt: u32,
    /// Utterances and bytes in the spool, kept up to date by this process's own writes and
    /// deletions, so the cap and status need no directory scan.
    usage: Mutex<(u64, u64)>,
    /// `.lock`, held (an exclusive `File::try_lock`, flock on Linux) while this process owns the spool.
    _lock: File,
}

const PART: &str = ".part";

impl Spool {
    /// Open (and create) the spool directory; move part files left by a crash to `partial/`.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let dir_err = |source| SpoolError::Dir {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(dir_err)?;
        let lock = lock(dir)?;
        for entry in fs::read_dir(dir).map_err(dir_err)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let part = name.starts_with('.') && name.ends_with(PART);
            // Audio whose metadata was never written (a crash between the two renames).
            let orphan = !name.starts_with('.')
                && name
                    .strip_suffix(".ogg")
                    .is_some_and(|id| !dir.join(format!("{id}.json")).exists());
            if part || orphan {
                let partial = dir.join("partial");
                fs::create_dir_all(&partial).map_err(dir_err)?;
                let kept = partial.join(name.trim_start_matches('.').trim_end_matches(PART));
                tracing::warn!(
                    "spool: {} was being written when hark stopped; kept as {}",
                    entry.path().display(),
                    kept.display()
                );
                fs::rename(entry.path(), kept).map_err(dir_err)?;
            }
        }
        let mut spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            seq: AtomicU32::new(0),
            salt: random_u32(),
            usage: Mutex::new((0, 0)),
            _lock: lock,
        };
        let entries = spool.entries()?;
        *spool.usage.get_mut().unwrap_or_else(|p| p.into_inner()) =
            (entries.len() as u64, entries.iter().map(|e| e.bytes).sum());
        Ok(spool)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new utterance id: the UTC time to the millisecond, then a per-process counter and a
    /// random salt, e.g. `20261122T013455123Z-0001a3f9`. Sorts by time; unique across restarts.
    pub(crate) fn new_id(&self, at: SystemTime) -> String {
        let stamp: String = humantime::format_rfc3339_millis(at)
            .to_string()
            .chars()
            .filter(|c| !matches!(c, '-' | ':' | '.'))
            .collect();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) & 0xffff;
        format!("{stamp}-{seq:04x}{:04x}", self.salt & 0xffff)
    }

    /// Start writing an utterance's audio.
    pub(crate) fn begin(&self, id: &str) -> Result<Part, SpoolError> {
        let path = self.dir.join(format!(".{id}.ogg{PART}"));
        let file = File::create(&path).map_err(|source| SpoolError::File {
            path: path.clone(),
            source,
        })?;
        Ok(Part {
            id: id.to_owned(),
            path,
            file: BufWriter::with_capacity(16 * 1024, file),
        })
    }

    /// Make a finished utterance durable: fsync and rename its audio, write its metadata the same
    /// way, fsync the directory. Returns the entry.
    pub(crate) fn commit(&self, part: Part, meta: &UtteranceMeta) -> Result<Entry, SpoolError> {
        let audio = self.dir.join(format!("{}.ogg", part.id));
        let file_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SpoolError::File { path, source }
        };
        let file = part.file.into_inner().map_err(|e| SpoolError::File {
            path: part.path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(file_err(&part.path))?;
        fs::rename(&part.path, &audio).map_err(file_err(&audio))?;

        let meta_path = self.dir.join(format!("{}.json", part.id));
        let tmp = self.dir.join(format!(".{}.json{PART}", part.id));
        let mut json = serde_json::to_vec_pretty(meta).map_err(|e| SpoolError::File {
            path: meta_path.clone(),
            source: e.into(),
        })?;
        json.push(b'\n');
        let mut f = File::create(&tmp).map_err(file_err(&tmp))?;
        f.write_all(&json).map_err(file_err(&tmp))?;
        f.sync_all().map_err(file_err(&tmp))?;
        fs::rename(&tmp, &meta_path).map_err(file_err(&meta_path))?;
        self.sync_dir()?;
        let bytes = file_len(&audio) + json.len() as u64;
        self.account(1, bytes as i64);
        Ok(Entry {
            id: part.id,
            audio,
            meta: meta_path,
            bytes,
        })
    }

    /// Throw away an utterance being written (it was dropped).
    pub(crate) fn discard(&self, part: Part) {
        let Part { path, file, .. } = part;
        drop(file);
        self.abandon(&path);
    }

    /// Remove a part file whose writer failed (disk full): it would never become an utterance.
    pub(crate) fn abandon(&self, path: &Path) {
        if let Err(e) = fs::remove_file(path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("spool: cannot remove {}: {e}", path.display());
        }
    }

    /// Every finished utterance, oldest first.
    pub(crate) fn entries(&self) -> Result<Vec<Entry>, SpoolError> {
        let mut out = Vec::new();
        let dir = fs::read_dir(&self.dir).map_err(|source| SpoolError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if id.starts_with('.') {
                continue;
            }
            let audio = self.dir.join(format!("{id}.ogg"));
            let meta = entry.path();
            out.push(Entry {
                id: id.to_owned(),
                bytes: file_len(&audio) + file_len(&meta),
                audio,
                meta,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Utterances waiting and their bytes.
    pub(crate) fn usage(&self) -> (u64, u64) {
        *self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn account(&self, count: i64, bytes: i64) {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        usage.0 = usage.0.saturating_add_signed(count);
        usage.1 = usage.1.saturating_add_signed(bytes);
    }

    /// Delete an utterance (metadata first: without it the audio is no longer an utterance).
    pub(crate) fn remove(&self, entry: &Entry) -> Result<(), SpoolError> {
        fs::remove_file(&entry.meta).map_err(|source| SpoolError::File {
            path: entry.meta.clone(),
            source,
        })?;
        let _ = fs::remove_file(&entry.audio);
        self.account(-1, -(entry.bytes as i64));
        // Made durable, so that a power cut does not bring back an utterance already delivered.
        let _ = self.sync_dir();
        Ok(())
    }

    /// Move an utterance out of the queue into the subdirectory `sub` (`failed`, `done`).
    /// Returns the audio's new path.
    pub(crate) fn move_to(&self, entry: &Entry, sub: &str) -> Result<PathBuf, SpoolError> {
        let dir = self.dir.join(sub);
        fs::create_dir_all(&dir).map_err(|source| SpoolError::Dir {
            path: dir.clone(),
            source,
        })?;
        let mut audio = PathBuf::new();
        // Into `failed/`, audio first (a crash in between leaves metadata the uploader reports);
        // into `done/`, metadata first (a crash in between leaves audio that the next start
        // moves to `partial/`, instead of a transcribed utterance reported as failed).
        let order = if sub == "done" {
            [&entry.meta, &entry.audio]
        } else {
            [&entry.audio, &entry.meta]
        };
        for path in order {
            let Some(name) = path.file_name() else {
                continue;
            };
            let to = dir.join(name);
            match fs::rename(path, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound && path == &entry.audio => {}
                Err(source) => {
                    return Err(SpoolError::File {
                        path: path.clone(),
                        source,
                    });
                }
            }
            if path == &entry.audio {
                audio = to;
            }
        }
        self.account(-1, -(entry.bytes as i64));
        let _ = self.sync_dir();
        Ok(audio)
    }

    /// Delete the oldest utterances until the spool fits `max_bytes`; returns what was deleted.
    /// Scans the directory only when the running total is over the cap.
    pub(crate) fn enforce_cap(&self) -> Vec<UtteranceMeta> {
        if self.usage().1 <= self.max_bytes {
            return Vec::new();
        }
        let Ok(entries) = self.entries() else {
            return Vec::new();
        };
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        let mut dropped = Vec::new();
        for entry in entries {
            if total <= self.max_bytes {
                break;
            }
            let meta = read_meta(&entry.meta).ok();
            if self.remove(&entry).is_ok() {
                total = total.saturating_sub(entry.bytes);
                tracing::warn!(
                    "spool over {} bytes: dropped the oldest utterance {}",
                    self.max_bytes,
                    entry.id
                );
                if let Some(meta) = meta {
                    dropped.push(meta);
                }
            }
        }
        dropped
    }

    fn sync_dir(&self) -> Result<(), SpoolError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| SpoolError::Dir {
                path: self.dir.clone(),
                source,
            })
    }
}

/// Take the spool's lock, or say that another process holds it.
fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SpoolError::File {
            path: path.clone(),
            source,
        })?;
    // flock(2) on Linux, as hark always took it: released when the file is closed, and seen by
    // older hark processes too.
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Busy {
            path: dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(SpoolError::File { path, source }),
    }
}

/// Read an utterance's metadata.
pub(crate) fn read_meta(path: &Path) -> Result<UtteranceMeta, SpoolError> {
    let file_err = |source| SpoolError::File {
        path: path.to_owned(),
        source,
    };
    let bytes = fs::read(path).map_err(file_err)?;
    serde_json::from_slice(&bytes).map_err(|e| file_err(e.into()))
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A random 32-bit value from the standard library's per-process hash seed.
pub(crate) fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> UtteranceMeta {
        UtteranceMeta {
            v: 1,
            utterance: id.into(),
            device: "test".into(),
            offset_ms: 0,
            duration_ms: 1000,
            samples: 16_000,
            sample_rate: 16_000,
            start_time: "2026-11-22T00:00:00.000Z".into(),
            reason: EndReason::Silence,
            speech_ms: 800,
            speech_offset_ms: 0,
            level_dbfs: -20.0,
            source: "file:x".into(),
            audio: format!("{id}.ogg"),
        }
    }

    #[test]
    fn a_spool_in_use_is_refused_until_it_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = Spool::open(dir.path(), 1 << 30).unwrap();
        let err = Spool::open(dir.path(), 1 << 30).err().expect("busy");
        assert!(err.to_string().contains("in use by another hark"), "{err}");
        drop(first);
        Spool::open(dir.path(), 1 << 30).expect("free again");
    }

    #[test]
    fn ids_sort_by_time_and_differ() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let a = spool.new_id(t);
        let b = spool.new_id(t);
        let c = spool.new_id(t + std::time::Duration::from_millis(1));
        assert!(a.starts_with("20231114T221320123Z-"), "{a}");
        assert!(a < b && b < c, "{a} {b} {c}");
        drop(spool);
        let other = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_ne!(other.new_id(t), a, "another process gets another salt");
    }

    #[test]
    fn commit_is_atomic_and_entries_are_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        for id in ["b", "a"] {
            let mut part = spool.begin(id).unwrap();
            part.write_all(b"OggS fake").unwrap();
            // Not visible as an utterance before commit.
            assert!(spool.entries().unwrap().iter().all(|e| e.id != id));
            spool.commit(part, &meta(id)).unwrap();
        }
        let entries = spool.entries().unwrap();
        assert_eq!(
            entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(read_meta(&entries[0].meta).unwrap(), meta("a"));
        assert_eq!(fs::read(&entries[0].audio).unwrap(), b"OggS fake");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".lock")
            .collect();
        assert_eq!(names.len(), 4, "no part files left: {names:?}");
    }

    #[test]
    fn crash_leftovers_are_kept_apart_and_cap_drops_oldest() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".x.ogg.part"), b"half").unwrap();
        fs::write(dir.path().join("y.ogg"), b"no metadata").unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(fs::read(dir.path().join("partial/x.ogg")).unwrap(), b"half");
        assert_eq!(
            fs::read(dir.path().join("partial/y.ogg")).unwrap(),
            b"no metadata"
        );
        for id in ["1", "2", "3"] {
            let mut part = spool.begin(id).unwrap();
            part.write_all(&[0u8; 1000]).unwrap();
            spool.commit(part, &meta(id)).unwrap();
        }
        let (n, bytes) = spool.usage();
        assert_eq!(n, 3);
        drop(spool);
        let capped = Spool::open(dir.path(), bytes - 1).unwrap();
        assert_eq!(capped.usage(), (3, bytes), "counted at open");
        let dropped = capped.enforce_cap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].utterance, "1");
        assert_eq!(capped.usage().0, 2);
    }
}
