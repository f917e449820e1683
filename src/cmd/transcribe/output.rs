//! Where `hark transcribe` writes: the output document (stdout, or a file renamed into place when
//! complete) and `--record-only`'s `timeline.json`, written as the utterances come.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::UTTERANCES;
use super::render::{self, Counts, Item};
use crate::cmd::Error;

/// `timeline.json` of a `--record-only` run: the utterances go to a part file as they come; the
/// document is put together when the counts are known.
pub(super) struct Timeline {
    path: PathBuf,
    part: PathBuf,
    out: io::BufWriter<File>,
    pub(super) count: u64,
    error: Option<io::Error>,
}

impl Timeline {
    pub(super) fn create(path: &Path) -> Result<Timeline, Error> {
        let part = path.with_file_name(".timeline.utterances.tmp");
        let file = File::create(&part).map_err(|source| Error::Io {
            what: "timeline",
            path: part.clone(),
            source,
        })?;
        Ok(Timeline {
            path: path.to_owned(),
            part,
            out: io::BufWriter::new(file),
            count: 0,
            error: None,
        })
    }

    pub(super) fn add(&mut self, item: &Item) {
        let sep: &[u8] = if self.count == 0 { b"" } else { b",\n" };
        let line = render::json_utterance(item, Some(UTTERANCES));
        let written = self
            .out
            .write_all(sep)
            .and_then(|()| self.out.write_all(line.as_bytes()));
        if let Err(e) = written {
            // Reported when the document is put together; the Ogg files are written regardless.
            self.error.get_or_insert(e);
        }
        self.count += 1;
    }

    pub(super) fn finish(
        mut self,
        file: &str,
        duration_ms: u64,
        counts: Counts,
    ) -> Result<(), Error> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io {
                what: "timeline",
                path,
                source,
            }
        };
        if let Some(e) = self.error.take() {
            return Err(err(&self.part)(e));
        }
        self.out.flush().map_err(err(&self.part))?;
        let mut out = Output::open(Some(&self.path))?;
        out.write(render::json_head(file, duration_ms, counts).as_bytes())?;
        let mut part = File::open(&self.part).map_err(err(&self.part))?;
        io::copy(&mut part, &mut out.out).map_err(err(&self.path))?;
        out.write(render::JSON_TAIL.as_bytes())?;
        out.commit()?;
        let _ = std::fs::remove_file(&self.part);
        Ok(())
    }
}

/// Where the result goes: stdout, or a file written beside its final name and renamed into place
/// when complete (so a half-written file never replaces a good one).
pub(super) struct Output {
    target: Option<(PathBuf, PathBuf)>,
    out: Box<dyn Write + Send>,
}

impl Output {
    pub(super) fn open(path: Option<&Path>) -> Result<Output, Error> {
        match path {
            None => Ok(Output {
                target: None,
                out: Box::new(io::LineWriter::new(io::stdout())),
            }),
            Some(path) => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let tmp = path.with_file_name(format!(".{name}.part"));
                let file = File::create(&tmp).map_err(|source| Error::Io {
                    what: "output",
                    path: tmp.clone(),
                    source,
                })?;
                Ok(Output {
                    target: Some((tmp, path.to_owned())),
                    out: Box::new(io::BufWriter::new(file)),
                })
            }
        }
    }

    pub(super) fn line(&mut self, json: &str) -> io::Result<()> {
        self.out.write_all(json.as_bytes())?;
        self.out.write_all(b"\n")
    }

    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out
            .write_all(bytes)
            .map_err(|source| self.error(source))
    }

    pub(super) fn error(&self, source: io::Error) -> Error {
        Error::Io {
            what: "output",
            path: self
                .target
                .as_ref()
                .map_or_else(|| "stdout".into(), |(_, p)| p.clone()),
            source,
        }
    }

    pub(super) fn commit(mut self) -> Result<(), Error> {
        if let Err(e) = self.out.flush() {
            return Err(self.error(e));
        }
        if let Some((tmp, path)) = self.target.take() {
            drop(self.out);
            std::fs::rename(&tmp, &path).map_err(|source| Error::Io {
                what: "output",
                path,
                source,
            })?;
        }
        Ok(())
    }
}
