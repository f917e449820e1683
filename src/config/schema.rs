//! The configuration's shape: every table and key with its default, the keyword enums written as
//! snake_case strings, and the few values with a custom TOML form (`chunking_strategy`,
//! `channel`). Loading, `-s` overrides and the range checks are in the parent module.

use std::path::PathBuf;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Declares a config table: every key optional, unknown keys rejected.
macro_rules! table {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident: $ty:ty = $def:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name { $($(#[$fm])* pub $field: $ty,)* }
        impl Default for $name {
            fn default() -> Self {
                $name { $($field: $def,)* }
            }
        }
    };
}

/// Declares an enum written as a snake_case string in TOML.
macro_rules! keyword {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant,)* }
    };
}

table!(Config {
    /// Empty: use the hostname, see [`Config::device_id`].
    device_id: String = String::new(),
    capture: CaptureConfig = CaptureConfig::default(),
    vad: VadConfig = VadConfig::default(),
    encode: EncodeConfig = EncodeConfig::default(),
    transcribe: TranscribeConfig = TranscribeConfig::default(),
    spool: SpoolConfig = SpoolConfig::default(),
    output: OutputConfig = OutputConfig::default(),
});

table!(CaptureConfig {
    source: Source = Source::Alsa,
    device: String = "default".into(),
    sample_rate: u32 = 16000,
    channels: u32 = 1,
    channel: ChannelSel = ChannelSel::Index(0),
    period_ms: u32 = 20,
    ring_ms: u32 = 2000,
    /// SCHED_FIFO priority of the ALSA capture thread when allowed; 0: normal scheduling.
    realtime_priority: u32 = 10,
    /// Input file; required when `source = "file"`.
    file: PathBuf = PathBuf::new(),
});

table!(VadConfig {
    mode: u32 = 2,
    frame_ms: u32 = 20,
    start_ms: u32 = 120,
    silence_ms: u32 = 800,
    pre_roll_ms: u32 = 300,
    min_utterance_ms: u32 = 250,
    max_utterance_ms: u32 = 30000,
    min_level_dbfs: f64 = -55.0,
});

table!(EncodeConfig {
    bitrate: u32 = 24000,
    complexity: u32 = 5,
});

table!(TranscribeConfig {
    endpoint: String = "https://api.openai.com/v1".into(),
    model: String = "gpt-4o-mini-transcribe".into(),
    api_key_env: String = "OPENAI_API_KEY".into(),
    api_key_file: PathBuf = PathBuf::new(),
    language: String = String::new(),
    prompt: String = String::new(),
    response_format: ResponseFormat = ResponseFormat::Json,
    temperature: f64 = 0.0,
    timestamp_granularities: Vec<Granularity> = Vec::new(),
    include: Vec<Include> = Vec::new(),
    stream: bool = false,
    connect_timeout_s: u32 = 5,
    timeout_s: u32 = 60,
    ca_file: PathBuf = PathBuf::new(),
    allow_insecure_http: bool = false,
    /// `""` (not sent), `"auto"`, or a `{ type = "server_vad", ... }` table.
    chunking_strategy: Chunking = Chunking::Off,
    known_speakers: Vec<KnownSpeaker> = Vec::new(),
    fallback: Vec<FallbackEndpoint> = Vec::new(),
});

table!(KnownSpeaker {
    name: String = String::new(),
    audio: PathBuf = PathBuf::new(),
});

table!(
    /// A `[[transcribe.fallback]]` entry. `endpoint` is required; the rest
    /// default to empty (whether empty inherits from `[transcribe]` is up to
    /// the caller).
    FallbackEndpoint {
        endpoint: String = String::new(),
        model: String = String::new(),
        api_key_env: String = String::new(),
        api_key_file: PathBuf = PathBuf::new(),
    }
);

table!(SpoolConfig {
    dir: PathBuf = "/var/lib/hark/spool".into(),
    max_bytes: u64 = 256 << 20,
    keep_audio: bool = false,
});

table!(OutputConfig {
    stdout: bool = true,
    format: OutputFormat = OutputFormat::Json,
    socket: PathBuf = PathBuf::new(),
    /// Octal digits, e.g. `"0660"`; see [`OutputConfig::socket_mode_bits`].
    socket_mode: String = "0660".into(),
    /// Group that owns the socket (name); empty: the process's group.
    socket_group: String = String::new(),
    /// 0 disables periodic status output.
    status_interval_s: u32 = 60,
    mqtt: MqttConfig = MqttConfig::default(),
});

table!(MqttConfig {
    /// Empty disables MQTT.
    url: String = String::new(),
    topic_prefix: String = "hark".into(),
    qos: u32 = 1,
    client_id: String = String::new(),
    username: String = String::new(),
    password_file: PathBuf = PathBuf::new(),
    ca_file: PathBuf = PathBuf::new(),
    /// Events kept while the broker is away; beyond it the oldest are dropped (counted).
    queue: u32 = 1000,
    /// Publish Home Assistant MQTT discovery configs (a transcript sensor, a speaking sensor).
    homeassistant_discovery: bool = false,
});

keyword!(Source { Alsa, File, Stdin });
keyword!(ResponseFormat {
    Json,
    Text,
    Srt,
    Vtt,
    VerboseJson,
    DiarizedJson,
});
keyword!(Granularity { Word, Segment });
keyword!(Include { Logprobs });
keyword!(OutputFormat { Json, Text });

/// `transcribe.chunking_strategy`: `""` (not sent), `"auto"`, or a server VAD table
/// `{ type = "server_vad", prefix_padding_ms = 300, silence_duration_ms = 200, threshold = 0.5 }`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Chunking {
    #[default]
    Off,
    Auto,
    ServerVad(ServerVad),
}

table!(
    /// The `chunking_strategy` table; only `type = "server_vad"` exists.
    ServerVad {
        #[serde(rename = "type")]
        kind: String = "server_vad".into(),
        prefix_padding_ms: Option<u32> = None,
        silence_duration_ms: Option<u32> = None,
        threshold: Option<f64> = None,
    }
);

impl Serialize for Chunking {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Chunking::Off => s.serialize_str(""),
            Chunking::Auto => s.serialize_str("auto"),
            Chunking::ServerVad(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Chunking {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Chunking;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""", "auto" or a { type = "server_vad", ... } table"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Chunking, E> {
                match v {
                    "" => Ok(Chunking::Off),
                    "auto" => Ok(Chunking::Auto),
                    _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Chunking, A::Error> {
                ServerVad::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(Chunking::ServerVad)
            }
        }
        d.deserialize_any(V)
    }
}

/// Which capture channel feeds the VAD: `channel = 0` or `channel = "mix"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelSel {
    Index(u32),
    Mix,
}

impl Serialize for ChannelSel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ChannelSel::Index(i) => s.serialize_u32(*i),
            ChannelSel::Mix => s.serialize_str("mix"),
        }
    }
}

impl<'de> Deserialize<'de> for ChannelSel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ChannelSel;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"a channel index or "mix""#)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ChannelSel, E> {
                u32::try_from(v)
                    .map(ChannelSel::Index)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ChannelSel, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ChannelSel, E> {
                match v {
                    "mix" => Ok(ChannelSel::Mix),
                    _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl OutputConfig {
    /// `socket_mode` as permission bits; `None` unless it is octal digits <= 0o777.
    pub(crate) fn socket_mode_bits(&self) -> Option<u32> {
        let s = &self.socket_mode;
        if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return None;
        }
        u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o777)
    }
}
