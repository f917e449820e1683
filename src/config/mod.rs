//! Configuration for `hark`: the TOML schema (`schema`: every key optional, defaults are
//! `Config::default()`), `-s dotted.key=VALUE` command-line overrides, and
//! range/consistency checks whose errors name the dotted key and where the bad
//! value came from (the file or a `-s`).
//!
//! Deliberately out of scope: reading secrets (API keys and MQTT passwords are
//! only *named* here, by env var or file path, and are read by their users),
//! touching the paths on disk, `~`/env-var expansion, and reloading.

mod schema;

use std::fmt::Debug;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::url;

pub use schema::*;

const MAX_CONFIG_BYTES: u64 = 1 << 20;
const CLI_ORIGIN: &str = "command line (-s)";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax error; `origin` is the file path or "built-in defaults".
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// Wrong type, unknown key, bad enum value or out-of-range value.
    #[error("{origin}: key `{key}`: {message}")]
    Key {
        origin: String,
        key: String,
        message: String,
    },
    /// Malformed `-s` argument.
    #[error("-s {arg}: {message}")]
    Override { arg: String, message: String },
}

/// One parsed `-s dotted.key=VALUE`.
struct Setting<'a> {
    arg: &'a str,
    path: Vec<&'a str>,
    raw: &'a str,
    value: toml::Value,
}

impl<'a> Setting<'a> {
    fn parse(arg: &'a str) -> Result<Self, ConfigError> {
        let bad = |message: &str| ConfigError::Override {
            arg: arg.to_owned(),
            message: message.to_owned(),
        };
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected dotted.key=VALUE"))?;
        let path: Vec<&str> = key.trim().split('.').map(str::trim).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(bad("empty key or key segment"));
        }
        let value = (raw.trim().parse::<toml::Value>()).unwrap_or_else(|_| raw.into());
        Ok(Setting {
            arg,
            path,
            raw,
            value,
        })
    }

    fn key(&self) -> String {
        self.path.join(".")
    }

    /// Whether an error at dotted `key` concerns the value this setting wrote.
    fn touches(&self, key: &str) -> bool {
        let mine = self.key();
        let under = |a: &str, b: &str| a.strip_prefix(b).is_some_and(|r| r.starts_with(['.', '[']));
        key == mine || under(key, &mine) || under(&mine, key)
    }

    fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        let mut t = table;
        for (i, part) in self.path.iter().enumerate() {
            if i + 1 == self.path.len() {
                t.insert((*part).to_owned(), self.value.clone());
                break;
            }
            let empty = || toml::Value::Table(toml::Table::new());
            t = match t.entry(*part).or_insert_with(empty) {
                toml::Value::Table(sub) => sub,
                _ => {
                    return Err(ConfigError::Override {
                        arg: self.arg.to_owned(),
                        message: format!("`{}` is not a table", self.path[..=i].join(".")),
                    });
                }
            };
        }
        Ok(())
    }
}

type Problem = (String, String);

/// Deserializes with the failing dotted key (including an unknown field's name).
fn from_table(table: toml::Table) -> Result<Config, Problem> {
    serde_path_to_error::deserialize(table).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().message().to_owned();
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next());
        let key = match unknown {
            Some(f) if path == "." => f.to_owned(),
            Some(f) if path.rsplit('.').next() != Some(f) => format!("{path}.{f}"),
            _ => path,
        };
        (key, message)
    })
}

fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim_end();
    match e.span().and_then(|s| text.get(..s.start)) {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg.to_owned(),
    }
}

/// Whether an MQTT topic level may hold this text (no wildcards, no NUL): checked for
/// `output.mqtt.topic_prefix` here and for the device id when the MQTT sink starts.
pub(crate) fn topic_text_ok(s: &str) -> bool {
    !s.contains(['+', '#', '\0'])
}

/// Collects validation problems; keys are relative to the current `section`.
struct Problems {
    section: &'static str,
    found: Vec<Problem>,
}

impl Problems {
    fn fail(&mut self, name: &str, message: String) {
        let key = format!("{}.{name}", self.section);
        self.found.push((key, message));
    }

    fn range<T: PartialOrd + Debug + Copy>(&mut self, name: &str, v: T, lo: T, hi: T) {
        self.bounded(name, v, (lo, hi), "");
    }

    /// `why` explains bounds that derive from other keys.
    fn bounded<T: PartialOrd + Debug + Copy>(&mut self, name: &str, v: T, b: (T, T), why: &str) {
        let (lo, hi) = b;
        if !(lo..=hi).contains(&v) {
            self.fail(name, format!("must be {lo:?}..={hi:?}{why}, got {v:?}"));
        }
    }

    fn url(&mut self, name: &str, url: &str, kind: url::Kind, empty_ok: bool) {
        if !(empty_ok && url.is_empty() || url::scheme_ok(url, kind)) {
            let empty = if empty_ok { "be empty or " } else { "" };
            let ([a, b], got) = (kind.schemes(), url::redact(url));
            self.fail(
                name,
                format!("must {empty}start with {a} or {b}, got {got:?}"),
            );
        }
    }
}

/// Names the origin of a problem in the merged config: the last `-s` that
/// wrote the key, else the file if it has the same problem on its own, else
/// the overrides as a whole.
fn blame(file: &toml::Table, origin: &str, sets: &[Setting], p: Problem) -> ConfigError {
    let origin = if let Some(s) = sets.iter().rev().find(|s| s.touches(&p.0)) {
        format!("-s {}", s.arg)
    } else if sets.is_empty() {
        origin.to_owned()
    } else {
        let in_file = match from_table(file.clone()) {
            Ok(alone) => alone.problems().contains(&p),
            Err(first) => first == p,
        };
        if in_file { origin } else { CLI_ORIGIN }.to_owned()
    };
    let (key, message) = p;
    ConfigError::Key {
        origin,
        key,
        message,
    }
}

impl Config {
    /// Parses a TOML document from `r`, applies `-s` overrides (each
    /// `dotted.key=VALUE`), validates. `origin` names the document in errors.
    pub(crate) fn parse_reader<R: Read>(
        r: R,
        origin: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: origin.into(),
            source,
        };
        let mut text = String::new();
        let limited = r.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text);
        limited.map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(read_err(std::io::Error::other("larger than 1 MiB")));
        }
        let file: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: parse_message(&text, &e),
        })?;
        let sets: Result<Vec<_>, _> = overrides.iter().map(|a| Setting::parse(a)).collect();
        let mut sets = sets?;
        loop {
            let mut merged = file.clone();
            for s in &sets {
                s.apply(&mut merged)?;
            }
            let (key, message) = match from_table(merged) {
                Ok(cfg) => match cfg.problems().into_iter().next() {
                    None => return Ok(cfg),
                    Some(p) => return Err(blame(&file, origin, &sets, p)),
                },
                Err(p) => p,
            };
            // `-s transcribe.model=1`: a non-string TOML value where a string
            // is expected is retried as the raw string.
            let wants_str = message.starts_with("invalid type:")
                && (message.ends_with("a string") || message.ends_with("path string"));
            let retry = sets.iter_mut().rev().find(|s| s.key() == key);
            match retry {
                Some(s) if wants_str && !s.value.is_str() => s.value = s.raw.into(),
                _ => return Err(blame(&file, origin, &sets, (key, message))),
            }
        }
    }

    /// Loads `path` (or, for `None`, the built-in defaults), then applies overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Config::parse_reader(&b""[..], "built-in defaults", overrides);
        };
        let file = std::fs::File::open(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse_reader(file, &path.display().to_string(), overrides)
    }

    fn problems(&self) -> Vec<Problem> {
        let (section, found) = ("capture", Vec::new());
        let mut p = Problems { section, found };
        self.capture_problems(&mut p);
        self.vad_problems(&mut p);
        p.section = "encode";
        p.range("bitrate", self.encode.bitrate, 6000, 510_000);
        p.range("complexity", self.encode.complexity, 0, 10);

        self.transcribe_problems(&mut p);
        p.section = "spool";
        if self.spool.max_bytes < 1 << 20 {
            let msg = format!("must be >= 1048576 (1 MiB), got {}", self.spool.max_bytes);
            p.fail("max_bytes", msg);
        }

        self.output_problems(&mut p);
        p.found
    }

    fn capture_problems(&self, p: &mut Problems) {
        let c = &self.capture;
        p.range("sample_rate", c.sample_rate, 8000, 192_000);
        p.range("channels", c.channels, 1, 32);
        // For files the file's own channel count applies (checked when it is opened).
        if let ChannelSel::Index(i) = c.channel
            && i >= c.channels
            && c.source == Source::Alsa
        {
            let msg = format!(r#"must be < channels ({}) or "mix", got {i}"#, c.channels);
            p.fail("channel", msg);
        }
        p.range("period_ms", c.period_ms, 5, 200);
        let ring = (c.period_ms.saturating_mul(4).max(100), 600_000);
        let why = " (min is max(100, 4 * period_ms))";
        p.bounded("ring_ms", c.ring_ms, ring, why);
        p.range("realtime_priority", c.realtime_priority, 0, 99);
        if c.source == Source::File && c.file == Path::new("") {
            p.fail("file", r#"must be set when capture.source = "file""#.into());
        }
    }

    fn vad_problems(&self, p: &mut Problems) {
        p.section = "vad";
        let v = &self.vad;
        p.range("mode", v.mode, 0, 3);
        if ![10, 20, 30].contains(&v.frame_ms) {
            let msg = format!("must be 10, 20 or 30, got {}", v.frame_ms);
            p.fail("frame_ms", msg);
        }
        let why = " (min is frame_ms)";
        p.bounded("start_ms", v.start_ms, (v.frame_ms, 2000), why);
        p.bounded("silence_ms", v.silence_ms, (v.frame_ms, 10_000), why);
        p.range("pre_roll_ms", v.pre_roll_ms, 0, 2000);
        let floor = v.pre_roll_ms.saturating_add(v.start_ms).saturating_add(1);
        let (max, why) = (
            v.max_utterance_ms,
            " (min is max(1000, pre_roll_ms + start_ms + 1))",
        );
        p.bounded("max_utterance_ms", max, (floor.max(1000), 600_000), why);
        let (min, why) = (v.min_utterance_ms, " (max is max_utterance_ms)");
        p.bounded("min_utterance_ms", min, (0, max), why);
        p.range("min_level_dbfs", v.min_level_dbfs, -96.0, 0.0);
    }

    fn transcribe_problems(&self, p: &mut Problems) {
        p.section = "transcribe";
        let t = &self.transcribe;
        let http = url::Kind::Http;
        p.url("endpoint", &t.endpoint, http, false);
        p.range("temperature", t.temperature, 0.0, 1.0);
        p.range("connect_timeout_s", t.connect_timeout_s, 1, 300);
        p.range("timeout_s", t.timeout_s, 1, 3600);
        if let Chunking::ServerVad(v) = &t.chunking_strategy {
            if v.kind != "server_vad" {
                let msg = format!(r#"must be "server_vad", got {:?}"#, v.kind);
                p.fail("chunking_strategy.type", msg);
            }
            if let Some(th) = v.threshold {
                p.range("chunking_strategy.threshold", th, 0.0, 1.0);
            }
        }
        let speakers = t.known_speakers.len();
        p.bounded("known_speakers", speakers, (0, 4), " entries");
        for (i, s) in t.known_speakers.iter().enumerate() {
            if s.name.is_empty() || s.audio == Path::new("") {
                let key = format!("known_speakers[{i}]");
                p.fail(&key, "needs both name and audio".into());
            }
        }
        for (i, f) in t.fallback.iter().enumerate() {
            p.url(&format!("fallback[{i}].endpoint"), &f.endpoint, http, false);
        }
    }

    fn output_problems(&self, p: &mut Problems) {
        p.section = "output";
        let o = &self.output;
        if o.socket_mode_bits().is_none() {
            let mode = &o.socket_mode;
            let msg = format!(r#"must be octal <= 0777, e.g. "0660", got {mode:?}"#);
            p.fail("socket_mode", msg);
        }
        p.range("status_interval_s", o.status_interval_s, 0, 86_400);
        p.url("mqtt.url", &o.mqtt.url, url::Kind::Mqtt, true);
        if !o.mqtt.url.is_empty()
            && let Err(why) = url::Broker::parse(&o.mqtt.url)
        {
            p.fail("mqtt.url", why);
        }
        if !topic_text_ok(&o.mqtt.topic_prefix) {
            let msg = format!("cannot contain +, # or NUL, got {:?}", o.mqtt.topic_prefix);
            p.fail("mqtt.topic_prefix", msg);
        }
        p.range("mqtt.qos", o.mqtt.qos, 0, 2);
        p.range("mqtt.queue", o.mqtt.queue, 1, 1_000_000);
    }

    /// `device_id` if set, else the hostname, else `"hark"`.
    pub fn device_id(&self) -> String {
        if !self.device_id.is_empty() {
            return self.device_id.clone();
        }
        ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_owned())
            .find(|s| !s.is_empty())
            .unwrap_or_else(|| "hark".to_owned())
    }

    /// The effective configuration as TOML, safe to log.
    ///
    /// The struct holds no secret values: API keys and the MQTT password are
    /// only referenced by env-var name or file path, which are shown. The one
    /// place a secret can hide is URL userinfo (`https://user:pw@host`), so
    /// that is replaced by `***` in `transcribe.endpoint`, fallback endpoints
    /// and `output.mqtt.url`.
    pub(crate) fn to_redacted_toml(&self) -> String {
        let mut c = self.clone();
        c.transcribe.endpoint = url::redact(&c.transcribe.endpoint);
        for f in &mut c.transcribe.fallback {
            f.endpoint = url::redact(&f.endpoint);
        }
        c.output.mqtt.url = url::redact(&c.output.mqtt.url);
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(doc: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::parse_reader(doc.as_bytes(), "test.toml", &ov)
    }

    /// Returns (origin, key, message) of a `Key` error.
    fn key_err(doc: &str, overrides: &[&str]) -> (String, String, String) {
        match parse(doc, overrides) {
            Err(ConfigError::Key {
                origin,
                key,
                message,
            }) => (origin, key, message),
            other => panic!("expected key error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_round_trip() {
        let c = Config::parse_reader(&b""[..], "built-in defaults", &[]).expect("defaults");
        assert_eq!(c, Config::default());
        let again = parse(&c.to_redacted_toml(), &[]).expect("reparse");
        assert_eq!(again, c);
    }

    #[test]
    fn full_config_round_trips_and_redacts_url_userinfo() {
        let doc = br#"
            device_id = "kitchen"
            [capture]
            channel = "mix"
            channels = 2
            [transcribe]
            endpoint = "https://u:hunter2@example.com/v1"
            include = ["logprobs"]
            timestamp_granularities = ["word", "segment"]
            known_speakers = [{ name = "ann", audio = "/a.wav" }]
            [[transcribe.fallback]]
            endpoint = "http://localhost:8000/v1"
            [output.mqtt]
            url = "mqtts://broker:8883"
            username = "hark"
        "#;
        let c = Config::parse_reader(&doc[..], "t", &[]).expect("parse");
        let out = c.to_redacted_toml();
        assert!(!out.contains("hunter2"), "{out}");
        let again = parse(&out, &[]).expect("reparse");
        assert_eq!(again.transcribe.endpoint, "https://***@example.com/v1");
        assert_eq!(again.output, c.output);
        assert_eq!(again.capture, c.capture);
        assert_eq!(again.transcribe.fallback, c.transcribe.fallback);
        assert_eq!(again.transcribe.known_speakers, c.transcribe.known_speakers);
    }

    #[test]
    fn unknown_key_names_dotted_key() {
        let (origin, key, msg) = key_err("bogus = 1", &[]);
        assert_eq!((origin.as_str(), key.as_str()), ("test.toml", "bogus"));
        assert!(msg.contains("unknown field"), "{msg}");
        assert_eq!(key_err("[vad]\nfoo = 1", &[]).1, "vad.foo");
        assert_eq!(
            key_err("[output.mqtt]\nport = 1", &[]).1,
            "output.mqtt.port"
        );
    }

    #[test]
    fn wrong_type_names_key() {
        let (_, key, msg) = key_err("[vad]\nmode = \"x\"", &[]);
        assert_eq!(key, "vad.mode");
        assert!(msg.contains("invalid type: string \"x\""), "{msg}");
        let (_, key, _) = key_err("[capture]\nsource = \"pulse\"", &[]);
        assert_eq!(key, "capture.source");
    }

    #[test]
    fn out_of_range_names_key_and_range() {
        let e = parse("[vad]\nmode = 7", &[]).expect_err("range");
        assert_eq!(
            e.to_string(),
            "test.toml: key `vad.mode`: must be 0..=3, got 7"
        );
        assert_eq!(key_err("[capture]\nchannel = 1", &[]).1, "capture.channel");
        let (_, key, _) = key_err("[[transcribe.fallback]]\nmodel = \"m\"", &[]);
        assert_eq!(key, "transcribe.fallback[0].endpoint");
        assert_eq!(
            key_err("[output]\nsocket_mode = \"0800\"", &[]).1,
            "output.socket_mode"
        );
    }

    #[test]
    fn channel_index_or_mix() {
        let c = parse("[capture]\nchannels = 2\nchannel = \"mix\"", &[]).expect("mix");
        assert_eq!(c.capture.channel, ChannelSel::Mix);
        let c = parse("[capture]\nchannels = 2\nchannel = 1", &[]).expect("index");
        assert_eq!(c.capture.channel, ChannelSel::Index(1));
        let (_, key, msg) = key_err("[capture]\nchannel = \"foo\"", &[]);
        assert_eq!(key, "capture.channel");
        assert!(msg.contains(r#"a channel index or "mix""#), "{msg}");
        assert_eq!(key_err("[capture]\nchannel = -1", &[]).1, "capture.channel");
    }

    #[test]
    fn overrides_set_values_and_create_tables() {
        let c = parse(
            "[vad]\nmode = 1",
            &[
                "capture.device=plughw:CARD=x,DEV=0",
                "vad.mode=3",
                r#"transcribe.include=["logprobs"]"#,
                "output.mqtt.qos=2",
                "transcribe.model=1",
            ],
        )
        .expect("overrides");
        assert_eq!(c.capture.device, "plughw:CARD=x,DEV=0");
        assert_eq!(c.vad.mode, 3);
        assert_eq!(c.transcribe.include, vec![Include::Logprobs]);
        assert_eq!(c.output.mqtt.qos, 2);
        assert_eq!(c.transcribe.model, "1");
        let c = parse("[capture]\nsource = \"file\"", &["capture.file=/tmp/a.wav"]).expect("fix");
        assert_eq!(c.capture.file, PathBuf::from("/tmp/a.wav"));
    }

    #[test]
    fn bad_override_blames_command_line() {
        let (origin, key, _) = key_err("", &["vad.foo=1"]);
        assert_eq!((origin.as_str(), key.as_str()), ("-s vad.foo=1", "vad.foo"));
        let (origin, key, _) = key_err("[vad]\nmode = 1", &["vad.mode=9"]);
        assert_eq!(
            (origin.as_str(), key.as_str()),
            ("-s vad.mode=9", "vad.mode")
        );
        let (origin, key, _) = key_err("[capture]\nring_ms = 500", &["capture.period_ms=200"]);
        assert_eq!(
            (origin.as_str(), key.as_str()),
            (CLI_ORIGIN, "capture.ring_ms")
        );
        let (origin, _, _) = key_err("[vad]\nmode = 9", &["capture.channels=2"]);
        assert_eq!(origin, "test.toml");
    }

    #[test]
    fn urls_are_checked_and_never_quoted_with_their_password() {
        let msg = |doc: &str| {
            let (_, key, msg) = key_err(doc, &[]);
            format!("{key}: {msg}")
        };
        assert_eq!(
            msg("[transcribe]\nendpoint = \"ftp://u:hunter2@h/v1\""),
            r#"transcribe.endpoint: must start with http:// or https://, got "ftp://***@h/v1""#
        );
        assert_eq!(
            msg("[transcribe]\nendpoint = \"https://\""),
            r#"transcribe.endpoint: must start with http:// or https://, got "https://""#
        );
        assert_eq!(
            msg("[output.mqtt]\nurl = \"mqtt://\""),
            r#"output.mqtt.url: must be empty or start with mqtt:// or mqtts://, got "mqtt://""#
        );
        assert_eq!(
            msg("[output.mqtt]\nurl = \"mqtt://hark:hunter2@h:0\""),
            r#"output.mqtt.url: port must be 1..=65535, got "0""#
        );
        assert_eq!(
            msg("[output.mqtt]\nurl = \"mqtt://h/x\""),
            "output.mqtt.url: takes no path or query: mqtt://host:port"
        );
        assert_eq!(
            msg("[output.mqtt]\ntopic_prefix = \"a/#\""),
            r#"output.mqtt.topic_prefix: cannot contain +, # or NUL, got "a/#""#
        );
        // Accepted as before: anything after http(s)://, a broker with a bare IPv6 literal.
        for doc in [
            "[transcribe]\nendpoint = \"http://h:port/v1\"",
            "[output.mqtt]\nurl = \"mqtts://u:p%40ss@[::1]/\"",
            "[output.mqtt]\nurl = \"mqtt://::1:1883\"",
        ] {
            parse(doc, &[]).expect(doc);
        }
    }

    #[test]
    fn source_file_requires_file() {
        let (_, key, _) = key_err("[capture]\nsource = \"file\"", &[]);
        assert_eq!(key, "capture.file");
    }

    #[test]
    fn malformed_overrides() {
        for arg in ["vad.mode", "=3", "vad..mode=3", "vad.mode.x=1"] {
            match parse("[vad]\nmode = 1", &[arg]) {
                Err(ConfigError::Override { arg: a, .. }) => assert_eq!(a, arg),
                other => panic!("{arg}: expected override error, got {other:?}"),
            }
        }
    }

    #[test]
    fn float_keys_accept_integers() {
        let c = parse(
            "[vad]\nmin_level_dbfs = -55\n[transcribe]\ntemperature = 0",
            &[],
        )
        .expect("ints");
        assert_eq!(
            (c.vad.min_level_dbfs, c.transcribe.temperature),
            (-55.0, 0.0)
        );
        let c = parse("", &["transcribe.temperature=1"]).expect("override int");
        assert_eq!(c.transcribe.temperature, 1.0);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        match parse("[vad]\nmode = = 3", &[]) {
            Err(ConfigError::Parse { origin, message }) => {
                assert_eq!(origin, "test.toml");
                assert!(message.starts_with("line 2, column "), "{message}");
            }
            other => panic!("expected parse error, got {other:?}"),
        }
    }

    #[test]
    fn load_file_and_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hark.toml");
        std::fs::write(&path, "device_id = \"x\"").expect("write");
        let c = Config::load(Some(&path), &["vad.mode=0".into()]).expect("load");
        assert_eq!((c.device_id(), c.vad.mode), ("x".to_owned(), 0));
        let missing = dir.path().join("nope.toml");
        let e = Config::load(Some(&missing), &[]).expect_err("missing");
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert_eq!(
            Config::load(None, &[]).expect("defaults"),
            Config::default()
        );
    }
}
