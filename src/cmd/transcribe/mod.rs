//! `hark transcribe FILE`: cut a recording into utterances with the daemon's VAD and segmenter,
//! upload them N at a time with the daemon's client, retry policy and fallbacks, and stitch the
//! transcripts together in the recording's own timeline (JSON, JSON lines, text, SRT, WebVTT).
//!
//! The pipeline is the daemon's: the file is a capture source, the dsp thread writes each utterance
//! to a spool (the resume cache's `spool/`, or the `--record-only` directory) and hands it here
//! instead of to the upload queue, so that an utterance the cache already knows is not sent again.
//! The rest go to [`Uploader`] with `-j` threads, which patiently retries like `hark upload`: when
//! every endpoint is down it gives up, the run exits 1 and the next run resumes.
//! Deliberately not here: signal handling (Ctrl-C ends the run; what was transcribed is cached),
//! watching a directory of recordings.

pub mod cache;
pub mod progress;
pub mod render;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::bus::Events;
use crate::capture::{CaptureError, SAMPLE_RATE, Source};
use crate::cli::{Format, TranscribeArgs};
use crate::config::Config;
use crate::event::EventKind;
use crate::pipeline::Pipeline;
use crate::sink::SinkQueue;
use crate::spool::{self, Entry, Spool, SpoolError};
use crate::upload::{self, Finished, Patience, Setup, SetupError, Submitter, Uploader};
use cache::Cache;
use progress::{Progress, Snapshot};
use render::{Counts, Item, State, Text};

/// Why `hark transcribe` did not do all of its job. Each maps to an exit code in `main`.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The recording cannot be read or decoded: exit 1.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The cache or record-only directory is unusable: exit 1.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Transcription is misconfigured (keys, trust roots, speakers): exit 78.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// No API key for the endpoint: exit 78.
    #[error("{0}; or use --record-only to cut the recording without uploading")]
    NoKey(String),
    /// Options that do not go together: exit 2.
    #[error("{0}")]
    Usage(String),
    /// A file of ours (output, cache) cannot be written: exit 1.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start {what}: {source}")]
    Start {
        what: &'static str,
        source: io::Error,
    },
    /// Utterances the spool could not write (each reported when it happened): exit 1.
    #[error(
        "{count} utterances could not be written to {} (see the errors above) and are missing \
         from the output",
        dir.display()
    )]
    Unwritten { count: u64, dir: PathBuf },
    /// Some utterances have no transcript (the output says which): exit 1.
    #[error(
        "{} of {} utterances failed for good and {} were not transcribed (endpoints down); \
         the output marks them, and running the same command again uploads only those",
        .0.failed, .0.utterances, .0.pending
    )]
    Incomplete(Counts),
}

impl BatchError {
    pub fn exit_code(&self) -> u8 {
        match self {
            BatchError::Setup(_) | BatchError::NoKey(_) => 78,
            BatchError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// The format `-o` names by its extension, else JSON.
pub fn format_for(output: Option<&Path>) -> Format {
    let ext = output
        .and_then(Path::extension)
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("srt") => Format::Srt,
        Some("vtt") => Format::Vtt,
        Some("txt") => Format::Text,
        Some("jsonl") | Some("ndjson") => Format::Jsonl,
        _ => Format::Json,
    }
}

/// The subdirectory of the `--record-only` directory that holds the utterances (a spool).
const UTTERANCES: &str = "utterances";

/// Where `--record-only` writes without `-o`: `{file stem}.hark` in the current directory.
fn default_record_dir(file: &Path) -> PathBuf {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "recording".to_owned());
    PathBuf::from(format!("{stem}.hark"))
}

enum Msg {
    Utterance(Entry, Instant),
    Result(Finished),
    PipelineDone,
    UploadsDone,
}

/// Run `hark transcribe`. Returns the counts when every utterance has its transcript (or, with
/// `--record-only`, its audio).
pub fn run(config: &Config, args: &TranscribeArgs) -> Result<Counts, BatchError> {
    let format = args
        .format
        .unwrap_or_else(|| format_for(args.output.as_deref()));
    if args.record_only && args.format.is_some_and(|f| f != Format::Json) {
        return Err(BatchError::Usage(
            "--record-only writes Ogg files and a JSON timeline (timeline.json) into a directory; \
             --format does not apply"
                .into(),
        ));
    }
    let source: Box<dyn Source> =
        crate::capture::file::open_input(&args.file, config.capture.channel, false)?;
    let label = source.describe();
    let total_ms = source
        .duration_samples()
        .map(|n| n * 1000 / u64::from(SAMPLE_RATE));
    let shown = args.file.display().to_string();

    let setup = if args.record_only {
        None
    } else {
        match Setup::from_config(&config.transcribe)? {
            Some(setup) => Some(setup),
            None => {
                return Err(BatchError::NoKey(upload::no_key_hint(&config.transcribe)));
            }
        }
    };

    // The utterances' audio: the record-only directory, or the cache's spool.
    let mut cache = None;
    let out_dir = args
        .output
        .clone()
        .unwrap_or_else(|| default_record_dir(&args.file));
    let spool_dir = if args.record_only {
        out_dir.join(UTTERANCES)
    } else {
        let file = File::open(&args.file).map_err(|source| CaptureError::Input {
            path: shown.clone(),
            source,
        })?;
        let content = cache::content_hash(file).map_err(|source| CaptureError::Input {
            path: shown.clone(),
            source,
        })?;
        let root = args.cache_dir.clone().unwrap_or_else(cache::default_dir);
        let c = Cache::open(&root, &content, &cache::settings_hash(config)).map_err(|source| {
            BatchError::Io {
                what: "resume cache",
                path: root.clone(),
                source,
            }
        })?;
        if !c.is_empty() && !args.no_cache {
            tracing::info!(
                "{} transcripts of this recording are in the cache {}; uploading only the rest",
                c.len(),
                c.dir().display()
            );
        }
        let dir = c.dir().join("spool");
        cache = Some(c);
        dir
    };
    let spool = Arc::new(Spool::open(&spool_dir, u64::MAX)?);
    let leftovers = spool.entries()?;
    if args.record_only && !leftovers.is_empty() {
        return Err(BatchError::Usage(format!(
            "{} already holds {} utterances: give another directory with -o, or empty it",
            spool_dir.display(),
            leftovers.len()
        )));
    }
    // An interrupted run's audio, and what failed last time: this run cuts them again.
    for entry in &leftovers {
        let _ = spool.remove(entry);
    }
    if !args.record_only {
        let _ = std::fs::remove_dir_all(spool_dir.join("failed"));
    }

    // Opened before anything is uploaded: a bad -o is found before the recording is billed.
    let document = if format == Format::Jsonl || args.record_only {
        None
    } else {
        Some(Output::open(args.output.as_deref())?)
    };
    let (tx, rx) = mpsc::channel();
    let (events, writer) = if format == Format::Jsonl && !args.record_only {
        let (queue, lines) = SinkQueue::pair("jsonl", 1 << 16);
        let mut out = Output::open(args.output.as_deref())?;
        let writer = thread::Builder::new()
            .name("hark-jsonl".into())
            .spawn(move || {
                // After a failed write (a closed pipe, a full disk) the lines are still taken, so
                // that no upload waits for a reader that is gone; the error is the exit status.
                let mut failed = None;
                for line in lines {
                    if failed.is_none()
                        && let Err(e) = out.line(&line.json)
                    {
                        tracing::error!("cannot write the events: {e}; going on without them");
                        failed = Some(e);
                    }
                }
                match failed {
                    Some(e) => Err(out.error(e)),
                    None => out.commit(),
                }
            })
            .map_err(|source| BatchError::Start {
                what: "the output thread",
                source,
            })?;
        (Events::new(config.device_id(), vec![queue]), Some(writer))
    } else {
        (Events::new(config.device_id(), Vec::new()), None)
    };

    let uploader = match setup {
        Some(setup) => {
            if let Some(endpoint) = setup.endpoints.first() {
                tracing::info!(
                    "transcribing {shown} with {} ({}), {} at a time",
                    endpoint.shown,
                    endpoint.model,
                    args.jobs
                );
            }
            let results = tx.clone();
            let on_result: upload::OnResult = Arc::new(move |f| {
                let _ = results.send(Msg::Result(f));
            });
            let uploader = Uploader::start(
                setup,
                spool.clone(),
                events.clone(),
                upload::Options {
                    patience: Patience::GiveUp,
                    keep_audio: config.spool.keep_audio,
                    workers: usize::from(args.jobs),
                    on_state: Arc::new(|_| {}),
                    on_result: Some(on_result),
                },
                (tx.clone(), Msg::UploadsDone),
            )
            .map_err(|e| match e {
                upload::StartError::Spool(e) => BatchError::Spool(e),
                upload::StartError::Thread(source) => BatchError::Start {
                    what: "the upload threads",
                    source,
                },
            })?;
            Some(uploader)
        }
        None => {
            tracing::info!("record-only: cutting {shown} into {}", spool_dir.display());
            None
        }
    };

    let ring_samples = u64::from(config.capture.ring_ms) * u64::from(SAMPLE_RATE) / 1000;
    let mut dsp = crate::daemon::dsp_config(config, label);
    let utterances = tx.clone();
    dsp.uploads = Some(Submitter::new(move |entry, ended| {
        let _ = utterances.send(Msg::Utterance(entry, ended));
    }));
    dsp.announce_audio = args.record_only || config.spool.keep_audio;
    let pipeline = Pipeline::start(
        source,
        true,
        usize::try_from(ring_samples).unwrap_or(usize::MAX).max(1),
        dsp,
        spool.clone(),
        events.clone(),
        (tx.clone(), Msg::PipelineDone),
    )
    .map_err(|source| BatchError::Start {
        what: "the pipeline",
        source,
    })?;
    drop(tx);

    let submitter = uploader.as_ref().map(Uploader::submitter);
    let mut progress = Progress::new(total_ms, uploader.is_some());
    let mut run = Run {
        items: Vec::new(),
        index: HashMap::new(),
        snap: Snapshot::default(),
        cache: cache.as_mut(),
        use_cache: !args.no_cache,
        timeline: if args.record_only {
            Some(Timeline::create(&out_dir.join("timeline.json"))?)
        } else {
            None
        },
        spool: &spool,
        events: &events,
    };
    let mut pipeline_done = false;
    let mut uploads_done = uploader.is_none();
    loop {
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(Msg::Utterance(entry, ended)) => {
                let submit = run.utterance(&entry);
                match (&submitter, submit) {
                    (Some(s), true) if !uploads_done => s.submit(entry, ended),
                    // Every endpoint gave up: the utterance waits for the next run.
                    _ => {}
                }
            }
            Ok(Msg::Result(finished)) => run.result(finished),
            Ok(Msg::PipelineDone) => {
                pipeline_done = true;
                if let Some(u) = &uploader {
                    u.finish();
                }
            }
            Ok(Msg::UploadsDone) => uploads_done = true,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        run.snap.audio_ms = pipeline
            .shared()
            .position
            .load(std::sync::atomic::Ordering::Relaxed)
            * 1000
            / u64::from(SAMPLE_RATE);
        progress.show(run.snap, false);
        if pipeline_done && uploads_done {
            break;
        }
    }
    let shared = pipeline.shared().clone();
    let summary = pipeline.join();
    if let Some(u) = uploader {
        u.join();
    }
    progress.show(run.snap, true);
    progress.finish();
    let duration_ms = summary.samples * 1000 / u64::from(SAMPLE_RATE);
    let Run {
        items, timeline, ..
    } = run;
    let mut counts = render::counts(&items);

    // The output, whatever happened to the uploads: what was transcribed is not lost.
    events.close();
    if let Some(writer) = writer {
        let written = writer.join().unwrap_or_else(|_| {
            Err(BatchError::Io {
                what: "output",
                path: args.output.clone().unwrap_or_else(|| "stdout".into()),
                source: io::Error::other("the output thread panicked"),
            })
        });
        written?;
    } else if let Some(timeline) = timeline {
        counts.utterances = timeline.count;
        timeline.finish(&shown, duration_ms, counts)?;
        tracing::info!(
            "{} utterances and their timeline are in {}; `hark upload -s spool.dir={}` sends them later",
            counts.utterances,
            out_dir.display(),
            spool_dir.display()
        );
    } else if let Some(mut out) = document {
        let body = match format {
            Format::Json => render::json(&shown, duration_ms, &items, None),
            Format::Text => render::text(&items),
            Format::Srt => render::srt(&items),
            Format::Vtt => render::vtt(&items),
            Format::Jsonl => String::new(),
        };
        out.write(body.as_bytes())?;
        out.commit()?;
    }
    report(&items, &counts, args.record_only);
    // Cut but not written (a full disk): not in the output, so the run is not complete.
    let lost = summary.utterances.saturating_sub(counts.utterances);
    if lost > 0 {
        return Err(BatchError::Unwritten {
            count: lost,
            dir: spool_dir,
        });
    }
    let fatal = shared
        .fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(e) = fatal {
        // The recording broke off (truncated): what came before is in the output.
        return Err(BatchError::Capture(e));
    }
    if !args.record_only && (counts.failed > 0 || counts.pending > 0) {
        return Err(BatchError::Incomplete(counts));
    }
    Ok(counts)
}

/// Say on stderr what became of the recording, and where each failure is in it.
fn report(items: &[Item], counts: &Counts, record_only: bool) {
    if record_only {
        return;
    }
    for item in items {
        if let State::Failed { code, message } = &item.state {
            tracing::error!(
                "not transcribed: the utterance at {} ({}): {code}: {message}",
                progress::clock(item.meta.offset_ms),
                item.meta.utterance
            );
        }
    }
    tracing::info!(
        "{} utterances: {} transcribed, {} failed, {} not transcribed, {} too short",
        counts.utterances,
        counts.transcribed,
        counts.failed,
        counts.pending,
        counts.dropped
    );
}

/// The control thread's record of the run.
struct Run<'a> {
    items: Vec<Item>,
    index: HashMap<String, usize>,
    snap: Snapshot,
    cache: Option<&'a mut Cache>,
    use_cache: bool,
    /// `--record-only`: the timeline's utterances, written as they come (nothing is kept in
    /// memory, however long the recording).
    timeline: Option<Timeline>,
    spool: &'a Spool,
    events: &'a Events,
}

impl Run<'_> {
    /// A new utterance from the dsp thread; whether it should be uploaded.
    fn utterance(&mut self, entry: &Entry) -> bool {
        let meta = match spool::read_meta(&entry.meta) {
            Ok(meta) => meta,
            Err(e) => {
                // Written by this run a moment ago: only a disk failure gets here.
                tracing::error!("utterance {}: {e}", entry.id);
                return false;
            }
        };
        self.snap.utterances += 1;
        let cached = self
            .cache
            .as_ref()
            .filter(|_| self.use_cache)
            .and_then(|c| c.get(meta.offset_ms, meta.duration_ms))
            .cloned();
        if let Some(timeline) = &mut self.timeline {
            let item = Item {
                meta,
                state: State::Recorded,
            };
            timeline.add(&item);
            return false;
        }
        let (state, upload) = if let Some(text) = cached {
            self.snap.transcribed += 1;
            self.snap.cached += 1;
            self.events.emit(EventKind::Transcript {
                utterance: meta.utterance.clone(),
                offset_ms: meta.offset_ms,
                text: text.text.clone(),
                duration_ms: meta.duration_ms,
                language: text.language.clone(),
                segments: text.segments.clone(),
                words: text.words.clone(),
                logprobs: None,
                usage: None,
                model: text.model.clone(),
                endpoint: text.endpoint.clone(),
                attempts: 0,
                latency_ms: 0,
            });
            let _ = self.spool.remove(entry);
            (State::Transcribed(text), false)
        } else {
            (State::Pending, true)
        };
        self.index.insert(meta.utterance.clone(), self.items.len());
        self.items.push(Item { meta, state });
        upload
    }

    fn result(&mut self, finished: Finished) {
        match finished {
            Finished::Transcribed {
                utterance,
                transcript,
                model,
                endpoint,
                ..
            } => {
                let Some(&i) = self.index.get(&utterance) else {
                    return;
                };
                let text = Text {
                    text: transcript.text,
                    language: transcript.language,
                    segments: transcript.segments,
                    words: transcript.words,
                    model,
                    endpoint,
                };
                let meta = &self.items[i].meta;
                if let Some(cache) = self.cache.as_mut()
                    && let Err(e) = cache.put(meta.offset_ms, meta.duration_ms, &text)
                {
                    tracing::warn!("resume cache {}: {e}", cache.dir().display());
                }
                self.items[i].state = State::Transcribed(text);
                self.snap.transcribed += 1;
            }
            Finished::TooShort { utterance } => {
                if let Some(&i) = self.index.get(&utterance) {
                    self.items[i].state = State::Dropped;
                }
            }
            Finished::Failed {
                utterance,
                code,
                message,
            } => {
                let Some(&i) = self.index.get(&utterance) else {
                    return;
                };
                self.items[i].state = State::Failed {
                    code: code.to_owned(),
                    message,
                };
                self.snap.failed += 1;
            }
        }
    }
}

/// `timeline.json` of a `--record-only` run: the utterances go to a part file as they come; the
/// document is put together when the counts are known.
struct Timeline {
    path: PathBuf,
    part: PathBuf,
    out: io::BufWriter<File>,
    count: u64,
    error: Option<io::Error>,
}

impl Timeline {
    fn create(path: &Path) -> Result<Timeline, BatchError> {
        let part = path.with_file_name(".timeline.utterances.tmp");
        let file = File::create(&part).map_err(|source| BatchError::Io {
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

    fn add(&mut self, item: &Item) {
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

    fn finish(mut self, file: &str, duration_ms: u64, counts: Counts) -> Result<(), BatchError> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| BatchError::Io {
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
struct Output {
    target: Option<(PathBuf, PathBuf)>,
    out: Box<dyn Write + Send>,
}

impl Output {
    fn open(path: Option<&Path>) -> Result<Output, BatchError> {
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
                let file = File::create(&tmp).map_err(|source| BatchError::Io {
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

    fn line(&mut self, json: &str) -> io::Result<()> {
        self.out.write_all(json.as_bytes())?;
        self.out.write_all(b"\n")
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), BatchError> {
        self.out
            .write_all(bytes)
            .map_err(|source| self.error(source))
    }

    fn error(&self, source: io::Error) -> BatchError {
        BatchError::Io {
            what: "output",
            path: self
                .target
                .as_ref()
                .map_or_else(|| "stdout".into(), |(_, p)| p.clone()),
            source,
        }
    }

    fn commit(mut self) -> Result<(), BatchError> {
        if let Err(e) = self.out.flush() {
            return Err(self.error(e));
        }
        if let Some((tmp, path)) = self.target.take() {
            drop(self.out);
            std::fs::rename(&tmp, &path).map_err(|source| BatchError::Io {
                what: "output",
                path,
                source,
            })?;
        }
        Ok(())
    }
}
