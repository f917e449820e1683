//! `hark transcribe FILE`: cut a recording into utterances with the daemon's VAD and segmenter,
//! upload them N at a time with the daemon's client, retry policy and fallbacks, and stitch the
//! transcripts together in the recording's own timeline (JSON, JSON lines, text, SRT, WebVTT).
//!
//! The pipeline is the daemon's: the file is a capture source, the dsp thread writes each utterance
//! to a spool (the resume cache's `spool/`, or the `--record-only` directory) and hands it here
//! instead of to the upload queue, so that an utterance the cache already knows is not sent again.
//! The rest go to the session's `-j` upload threads, which retry patiently like `hark upload`: when
//! every endpoint is down it gives up, the run exits 1 and the next run resumes.
//! Deliberately not here: signal handling (Ctrl-C ends the run; what was transcribed is cached),
//! watching a directory of recordings.

pub(crate) mod cache;
mod output;
pub(crate) mod progress;
pub mod render;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::Error;
use crate::bus::SinkQueue;
use crate::capture::{CaptureError, SAMPLE_RATE, Source};
use crate::cli::{Format, TranscribeArgs};
use crate::config::Config;
use crate::event::EventKind;
use crate::pipeline::DspConfig;
use crate::session::{Capture, Control, Driver, Ended, Outputs, Plan, Route, Session, Uploads};
use crate::spool::{self, Entry, Spool};
use crate::upload::{self, Finished, Patience, Setup};
use cache::Cache;
use output::{Output, Timeline};
use progress::{Progress, Snapshot};
use render::{Counts, Item, ItemState, Text};

/// The format `-o` names by its extension, else JSON.
pub(crate) fn format_for(output: Option<&Path>) -> Format {
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

/// The jsonl writer thread: the events as they come, to stdout or the `-o` file.
type Writer = JoinHandle<Result<(), Error>>;

/// Run `hark transcribe`. Returns the counts when every utterance has its transcript (or, with
/// `--record-only`, its audio).
pub fn run(config: &Config, args: &TranscribeArgs) -> Result<Counts, Error> {
    let format = args
        .format
        .unwrap_or_else(|| format_for(args.output.as_deref()));
    if args.record_only && args.format.is_some_and(|f| f != Format::Json) {
        return Err(Error::Usage(
            "--record-only writes Ogg files and a JSON timeline (timeline.json) into a directory; \
             --format does not apply"
                .into(),
        ));
    }
    let source: Box<dyn Source> =
        crate::capture::open_input(&args.file, config.capture.channel, false)?;
    let total_ms = source
        .duration_samples()
        .map(|n| n * 1000 / u64::from(SAMPLE_RATE));
    let shown = args.file.display().to_string();
    let setup = setup(config, args)?;
    let store = Store::prepare(config, args, &shown)?;
    // Opened before anything is uploaded: a bad -o is found before the recording is billed.
    let document = if format == Format::Jsonl || args.record_only {
        None
    } else {
        Some(Output::open(args.output.as_deref())?)
    };
    let (queues, writer) = match format == Format::Jsonl && !args.record_only {
        true => jsonl_writer(args.output.as_deref())?,
        false => (Vec::new(), None),
    };
    announce(&setup, args, &shown, &store.spool_dir);
    let mut dsp = DspConfig::from_config(config, source.describe());
    dsp.announce_audio = args.record_only || config.spool.keep_audio;
    let plan = Plan {
        outputs: Outputs::Given(queues),
        spool: Some(store.spool.clone()),
        signals: false,
        notify: false,
        status: None,
        uploads: setup.map(|setup| Uploads {
            setup,
            patience: Patience::GiveUp,
            workers: usize::from(args.jobs),
            results: true,
        }),
        capture: Some(Capture {
            source,
            opened: true,
            dsp,
            route: Route::Driver,
        }),
    };
    let timeline = match args.record_only {
        true => Some(Timeline::create(&store.out_dir.join("timeline.json"))?),
        false => None,
    };
    let session = Session::start(config, plan)?;
    let mut batch = Batch {
        progress: Progress::new(total_ms, session.has_uploads()),
        run: Run {
            items: Vec::new(),
            index: HashMap::new(),
            snap: Snapshot::default(),
            cache: store.cache,
            use_cache: !args.no_cache,
            timeline,
        },
    };
    let ended = session.run(&mut batch);
    let finish = Finish {
        args,
        format,
        shown: &shown,
        out_dir: &store.out_dir,
        spool_dir: store.spool_dir,
    };
    finish.write(batch, ended, writer, document)
}

/// Say on stderr what the run is about to do.
fn announce(setup: &Option<Setup>, args: &TranscribeArgs, shown: &str, spool_dir: &Path) {
    match setup {
        Some(setup) => {
            if let Some(endpoint) = setup.endpoints.first() {
                tracing::info!(
                    "transcribing {shown} with {} ({}), {} at a time",
                    endpoint.shown,
                    endpoint.model,
                    args.jobs
                );
            }
        }
        None => {
            let dir = spool_dir.display();
            tracing::info!("record-only: cutting {shown} into {dir}");
        }
    }
}

/// The uploads of a run: `None` records only; no key for the endpoint is an error.
fn setup(config: &Config, args: &TranscribeArgs) -> Result<Option<Setup>, Error> {
    if args.record_only {
        return Ok(None);
    }
    match Setup::from_config(&config.transcribe)? {
        Some(setup) => Ok(Some(setup)),
        None => Err(Error::NoKey(upload::no_key_hint(&config.transcribe))),
    }
}

/// Where the utterances' audio goes: the `--record-only` directory, or the resume cache's spool.
struct Store {
    spool: Arc<Spool>,
    spool_dir: PathBuf,
    out_dir: PathBuf,
    cache: Option<Cache>,
}

impl Store {
    fn prepare(config: &Config, args: &TranscribeArgs, shown: &str) -> Result<Store, Error> {
        let out_dir = args
            .output
            .clone()
            .unwrap_or_else(|| default_record_dir(&args.file));
        let (spool_dir, cache) = if args.record_only {
            (out_dir.join(UTTERANCES), None)
        } else {
            let cache = open_cache(config, args, shown)?;
            (cache.dir().join("spool"), Some(cache))
        };
        let spool = Arc::new(Spool::open(&spool_dir, u64::MAX)?);
        let leftovers = spool.entries()?;
        if args.record_only && !leftovers.is_empty() {
            return Err(Error::Usage(format!(
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
        Ok(Store {
            spool,
            spool_dir,
            out_dir,
            cache,
        })
    }
}

/// The resume cache of this recording and these settings.
fn open_cache(config: &Config, args: &TranscribeArgs, shown: &str) -> Result<Cache, Error> {
    let input = |source| CaptureError::Input {
        path: shown.to_owned(),
        source,
    };
    let file = File::open(&args.file).map_err(input)?;
    let content = cache::content_hash(file).map_err(input)?;
    let root = args.cache_dir.clone().unwrap_or_else(cache::default_dir);
    let c = Cache::open(&root, &content, &cache::settings_hash(config)).map_err(|source| {
        Error::Io {
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
    Ok(c)
}

/// `-f jsonl`: a queue for the events and the thread that writes them out.
fn jsonl_writer(path: Option<&Path>) -> Result<(Vec<SinkQueue>, Option<Writer>), Error> {
    let (queue, lines) = SinkQueue::pair("jsonl", 1 << 16);
    let mut out = Output::open(path)?;
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
        .map_err(|source| Error::Start {
            what: "the output thread",
            source,
        })?;
    Ok((vec![queue], Some(writer)))
}

/// The command's part of the control loop: utterances, upload results, progress.
struct Batch {
    run: Run,
    progress: Progress,
}

impl Driver for Batch {
    fn message(&mut self, session: &Session, msg: Control) {
        match msg {
            // Once every endpoint gave up, the utterance waits for the next run.
            Control::Utterance(entry, ended) if self.run.utterance(&entry, session) => {
                session.submit(entry, ended);
            }
            Control::Result(finished) => self.run.result(finished),
            _ => {}
        }
    }

    fn tick(&mut self, session: &Session) {
        if let Some(probe) = session.probe() {
            self.run.snap.audio_ms = probe.health().position * 1000 / u64::from(SAMPLE_RATE);
        }
        self.progress.show(self.run.snap, false);
    }

    fn tick_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(250))
    }
}

/// The end of a run: the output, the report on stderr, the exit status.
struct Finish<'a> {
    args: &'a TranscribeArgs,
    format: Format,
    shown: &'a str,
    out_dir: &'a Path,
    spool_dir: PathBuf,
}

impl Finish<'_> {
    fn write(
        self,
        batch: Batch,
        ended: Ended,
        writer: Option<Writer>,
        document: Option<Output>,
    ) -> Result<Counts, Error> {
        let Batch { run, mut progress } = batch;
        progress.show(run.snap, true);
        progress.finish();
        let duration_ms = ended.summary.samples * 1000 / u64::from(SAMPLE_RATE);
        let Run {
            items, timeline, ..
        } = run;
        let mut counts = render::counts(&items);
        // The output, whatever happened to the uploads: what was transcribed is not lost.
        if let Some(writer) = writer {
            let written = writer.join().unwrap_or_else(|_| {
                Err(Error::Io {
                    what: "output",
                    path: self.args.output.clone().unwrap_or_else(|| "stdout".into()),
                    source: std::io::Error::other("the output thread panicked"),
                })
            });
            written?;
        } else if let Some(timeline) = timeline {
            counts.utterances = timeline.count;
            timeline.finish(self.shown, duration_ms, counts)?;
            tracing::info!(
                "{} utterances and their timeline are in {}; `hark upload -s spool.dir={}` sends them later",
                counts.utterances,
                self.out_dir.display(),
                self.spool_dir.display()
            );
        } else if let Some(mut out) = document {
            let body = match self.format {
                Format::Json => render::json(self.shown, duration_ms, &items, None),
                Format::Text => render::text(&items),
                Format::Srt => render::srt(&items),
                Format::Vtt => render::vtt(&items),
                Format::Jsonl => String::new(),
            };
            out.write(body.as_bytes())?;
            out.commit()?;
        }
        report(&items, &counts, self.args.record_only);
        self.verdict(ended, counts)
    }

    /// The exit rules of `hark transcribe`.
    fn verdict(self, ended: Ended, counts: Counts) -> Result<Counts, Error> {
        // Cut but not written (a full disk): not in the output, so the run is not complete.
        let lost = ended.summary.utterances.saturating_sub(counts.utterances);
        if lost > 0 {
            return Err(Error::Unwritten {
                count: lost,
                dir: self.spool_dir,
            });
        }
        if let Some(e) = ended.fatal {
            // The recording broke off (truncated): what came before is in the output.
            return Err(Error::Capture(e));
        }
        if !self.args.record_only && (counts.failed > 0 || counts.pending > 0) {
            return Err(Error::Incomplete(counts));
        }
        Ok(counts)
    }
}

/// Say on stderr what became of the recording, and where each failure is in it.
fn report(items: &[Item], counts: &Counts, record_only: bool) {
    if record_only {
        return;
    }
    for item in items {
        if let ItemState::Failed { code, message } = &item.state {
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
struct Run {
    items: Vec<Item>,
    index: HashMap<String, usize>,
    snap: Snapshot,
    cache: Option<Cache>,
    use_cache: bool,
    /// `--record-only`: the timeline's utterances, written as they come (nothing is kept in
    /// memory, however long the recording).
    timeline: Option<Timeline>,
}

impl Run {
    /// A new utterance from the dsp thread; whether it should be uploaded.
    fn utterance(&mut self, entry: &Entry, session: &Session) -> bool {
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
                state: ItemState::Recorded,
            };
            timeline.add(&item);
            return false;
        }
        let (state, upload) = if let Some(text) = cached {
            self.snap.transcribed += 1;
            self.snap.cached += 1;
            session.events().emit(EventKind::Transcript {
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
            let _ = session.spool().remove(entry);
            (ItemState::Transcribed(text), false)
        } else {
            (ItemState::Pending, true)
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
                self.items[i].state = ItemState::Transcribed(text);
                self.snap.transcribed += 1;
            }
            Finished::TooShort { utterance } => {
                if let Some(&i) = self.index.get(&utterance) {
                    self.items[i].state = ItemState::Dropped;
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
                self.items[i].state = ItemState::Failed {
                    code: code.to_owned(),
                    message,
                };
                self.snap.failed += 1;
            }
        }
    }
}
