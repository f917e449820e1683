//! ALSA capture: opens a PCM for interleaved S16_LE at the configured rate and channel count, reads
//! one period at a time, recovers from xruns and reports a vanished device so the thread reopens it.
//!
//! Also lists capture devices for `hark devices`. Deliberately not here: mixer controls, mmap I/O.
//!
//! # Why non-blocking
//! A blocking `snd_pcm_open` on a device that another program holds sleeps until that program
//! lets go: no error, no event, no retry. The PCM is opened non-blocking (a busy device fails at
//! once with EBUSY, reported and retried), and each period waits with `snd_pcm_wait` and a
//! timeout, which also bounds how long a stop request waits.
//!
//! # Why `io_unchecked`
//! `PCM::io_i16()` verifies the sample format on every call by fetching the current hw params, and
//! that allocates (`snd_pcm_hw_params_malloc`). The format is checked once in `open`, and the period
//! loop then uses `io_unchecked`, so the hot loop makes no allocation.

use std::ffi::{CString, c_char, c_int, c_void};
use std::time::Instant;

use ::alsa::pcm::{Access, Format, Frames, HwParams, PCM};
use ::alsa::{Direction, ValueOr};

use super::{CaptureError, Converter, Flow, RingWriter, SAMPLE_RATE, Source};
use crate::config::ChannelSel;

pub(crate) const NAME: &str = "alsa";

/// alsa-lib's per-thread error handler: `va_list` as its last parameter, not `...`.
type LocalErrorHandler =
    unsafe extern "C" fn(*const c_char, c_int, *const c_char, c_int, *const c_char, *mut c_void);

// `unsafe` allowed: the `alsa` crate has no binding for alsa-lib's per-thread error handler, so
// hark declares it and hands it a handler that does nothing (see `quiet_alsa_lib`).
#[allow(unsafe_code)]
unsafe extern "C" {
    fn snd_lib_error_set_local(handler: Option<LocalErrorHandler>) -> Option<LocalErrorHandler>;
}

// `unsafe` allowed: a C callback for alsa-lib is an `unsafe extern "C" fn`; it touches nothing.
#[allow(unsafe_code)]
unsafe extern "C" fn ignore_alsa_lib_error(
    _file: *const c_char,
    _line: c_int,
    _function: *const c_char,
    _errcode: c_int,
    _fmt: *const c_char,
    _args: *mut c_void,
) {
}

/// Stop alsa-lib printing its own errors to stderr on this thread. A missing card makes it print
/// eight lines per failed open, every retry, for as long as the microphone is unplugged; hark
/// reports the same failure once per attempt as an `error` event and a log line.
// `unsafe` allowed: installing the error-handler hook above (a foreign call).
#[allow(unsafe_code)]
pub(crate) fn quiet_alsa_lib() {
    // SAFETY: sets a thread-local function pointer in alsa-lib; the handler does nothing.
    unsafe {
        snd_lib_error_set_local(Some(ignore_alsa_lib_error));
    }
}

/// Captures from an ALSA PCM.
pub struct AlsaSource {
    device: String,
    rate: u32,
    channels: u32,
    channel: ChannelSel,
    period_ms: u32,
    pcm: Option<PCM>,
    converter: Option<Converter>,
    buf: Vec<i16>,
    actual_rate: u32,
    last_read: Option<Instant>,
    rt_priority: u32,
}

impl AlsaSource {
    pub fn new(
        device: &str,
        rate: u32,
        channels: u32,
        channel: ChannelSel,
        period_ms: u32,
    ) -> AlsaSource {
        AlsaSource {
            device: device.to_owned(),
            rate,
            channels,
            channel,
            period_ms,
            pcm: None,
            converter: None,
            buf: Vec::new(),
            actual_rate: rate,
            last_read: None,
            rt_priority: super::realtime::DEFAULT_PRIORITY,
        }
    }

    /// The SCHED_FIFO priority for the capture thread (0: normal scheduling).
    pub(crate) fn with_realtime_priority(mut self, priority: u32) -> AlsaSource {
        self.rt_priority = priority;
        self
    }

    fn err(&self, what: &'static str) -> impl FnOnce(::alsa::Error) -> CaptureError + '_ {
        move |source| CaptureError::Alsa {
            device: self.device.clone(),
            what,
            source,
        }
    }

    /// Lost samples (at 16 kHz) since the last good read: the estimate of an xrun's gap.
    fn lost_since_last_read(&self) -> u64 {
        match self.last_read {
            Some(t) => t.elapsed().as_millis() as u64 * u64::from(SAMPLE_RATE) / 1000,
            None => 0,
        }
    }
}

impl Source for AlsaSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        format!(
            "alsa:{} ({} Hz, {} ch)",
            self.device, self.actual_rate, self.channels
        )
    }

    fn open(&mut self) -> Result<(), CaptureError> {
        quiet_alsa_lib();
        self.pcm = None;
        let pcm = PCM::new(&self.device, Direction::Capture, true).map_err(self.err("open"))?;
        let period_frames;
        {
            let hwp = HwParams::any(&pcm).map_err(self.err("read hardware parameters"))?;
            hwp.set_access(Access::RWInterleaved)
                .map_err(self.err("set interleaved access"))?;
            hwp.set_format(Format::s16())
                .map_err(self.err("set format S16_LE"))?;
            if hwp.set_channels(self.channels).is_err() {
                let (lo, hi) = (
                    hwp.get_channels_min().unwrap_or(0),
                    hwp.get_channels_max().unwrap_or(0),
                );
                return Err(CaptureError::Unsupported {
                    device: self.device.clone(),
                    message: format!(
                        "cannot capture {} channels (it offers {lo}..={hi}); set capture.channels",
                        self.channels
                    ),
                });
            }
            let rate = hwp
                .set_rate_near(self.rate, ValueOr::Nearest)
                .map_err(self.err("set rate"))?;
            // Frames is a C long: 32 bits on armv7 and ARMv6. A period is at most 38,400 frames
            // (200 ms at 192 kHz), but the rate comes from the device, so check.
            let want = (u64::from(rate) * u64::from(self.period_ms) / 1000).max(16);
            let want = Frames::try_from(want).map_err(|_| CaptureError::Unsupported {
                device: self.device.clone(),
                message: format!(
                    "a {want}-frame period does not fit this platform's ALSA frame count"
                ),
            })?;
            let period = hwp
                .set_period_size_near(want, ValueOr::Nearest)
                .map_err(self.err("set period size"))?;
            hwp.set_buffer_size_near(period * 8)
                .map_err(self.err("set buffer size"))?;
            pcm.hw_params(&hwp)
                .map_err(self.err("apply hardware parameters"))?;
            self.actual_rate = rate;
            period_frames = period.max(1) as usize;
        }
        let current = pcm
            .hw_params_current()
            .map_err(self.err("read back parameters"))?;
        if current.get_format().map_err(self.err("read back format"))? != Format::s16() {
            return Err(CaptureError::Unsupported {
                device: self.device.clone(),
                message: "did not accept S16_LE samples".into(),
            });
        }
        drop(current);
        if self.actual_rate != self.rate {
            tracing::warn!(
                "{} runs at {} Hz, not the configured {} Hz; resampling from {} Hz",
                self.device,
                self.actual_rate,
                self.rate,
                self.actual_rate
            );
        }
        self.converter = Some(Converter::new(
            self.actual_rate,
            self.channels as usize,
            self.channel,
            period_frames,
        )?);
        self.buf = vec![0; period_frames * self.channels as usize];
        pcm.start()
            .or_else(|_| pcm.prepare())
            .map_err(self.err("start"))?;
        self.pcm = Some(pcm);
        self.last_read = None;
        Ok(())
    }

    fn read_period(&mut self, ring: &mut RingWriter) -> Result<Flow, CaptureError> {
        let (Some(pcm), Some(converter)) = (&self.pcm, &mut self.converter) else {
            return Err(CaptureError::Unsupported {
                device: self.device.clone(),
                message: "not open".into(),
            });
        };
        // Up to two periods for data; a timeout is no error (the caller checks for a stop).
        if let Err(e) = pcm.wait(Some(self.period_ms * 2 + 10))
            && e.errno() != libc::EPIPE
            && e.errno() != libc::ESTRPIPE
        {
            return Err(CaptureError::Alsa {
                device: self.device.clone(),
                what: "wait",
                source: e,
            });
        }
        // `unsafe` allowed: this is the capture hot loop, and `io_unchecked` skips the per-period
        // format check that allocates (see "Why `io_unchecked`" above).
        // SAFETY: the format was verified as S16_LE in `open`, and this is the only IO object.
        #[allow(unsafe_code)]
        let io = unsafe { pcm.io_unchecked::<i16>() };
        match io.readi(&mut self.buf) {
            Ok(frames) => {
                let n = frames * self.channels as usize;
                converter.push(&self.buf[..n], ring);
                self.last_read = Some(Instant::now());
                Ok(Flow::Continue)
            }
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => Ok(Flow::Continue),
            Err(e) if e.errno() == libc::EPIPE || e.errno() == libc::ESTRPIPE => {
                // Overrun (or suspend): the device dropped what we did not read in time.
                if pcm.try_recover(e, true).is_err() {
                    return Err(CaptureError::Alsa {
                        device: self.device.clone(),
                        what: "recover from overrun",
                        source: e,
                    });
                }
                let _ = pcm.start();
                ring.mark_gap(self.lost_since_last_read().max(1));
                self.last_read = Some(Instant::now());
                Ok(Flow::Continue)
            }
            Err(e) => Err(CaptureError::Alsa {
                device: self.device.clone(),
                what: "read",
                source: e,
            }),
        }
    }

    fn waits_for_consumer(&self) -> bool {
        false
    }

    fn realtime_priority(&self) -> u32 {
        self.rt_priority
    }

    fn flush(&mut self, ring: &mut RingWriter) {
        if let Some(converter) = &mut self.converter {
            converter.flush(ring);
        }
    }
}

/// One capture device as `hark devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceInfo {
    pub(crate) name: String,
    pub(crate) description: String,
    /// What the device accepts, or why it could not be probed.
    pub(crate) caps: Result<Caps, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caps {
    pub(crate) rate_min: u32,
    pub(crate) rate_max: u32,
    /// Common rates the device accepts.
    pub(crate) rates: Vec<u32>,
    pub(crate) channels_min: u32,
    pub(crate) channels_max: u32,
    pub(crate) s16: bool,
}

const COMMON_RATES: &[u32] = &[8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000];

/// Probe what `name` accepts for capture.
pub(crate) fn probe(name: &str) -> Result<Caps, String> {
    probe_pcm(name).map_err(|e| e.to_string())
}

fn probe_pcm(name: &str) -> Result<Caps, ::alsa::Error> {
    quiet_alsa_lib();
    let pcm = PCM::new(name, Direction::Capture, true)?;
    let hwp = HwParams::any(&pcm)?;
    let rates = COMMON_RATES
        .iter()
        .copied()
        .filter(|&r| hwp.test_rate(r).is_ok())
        .collect();
    Ok(Caps {
        rate_min: hwp.get_rate_min()?,
        rate_max: hwp.get_rate_max()?,
        rates,
        channels_min: hwp.get_channels_min()?,
        channels_max: hwp.get_channels_max()?,
        s16: hwp.test_format(Format::s16()).is_ok(),
    })
}

/// Capture devices: the PCMs ALSA's configuration hints at that can be opened for capture (or are
/// busy), and every card's hardware devices. Hinted PCMs that cannot capture at all (rate
/// converter plugins, a sound server that is not running) are left out; `probe` one by name to
/// see why it fails.
pub(crate) fn list_devices() -> Vec<DeviceInfo> {
    quiet_alsa_lib();
    let mut out: Vec<DeviceInfo> = Vec::new();
    let pcm_iface = CString::new("pcm").unwrap_or_default();
    if let Ok(hints) = ::alsa::device_name::HintIter::new(None, &pcm_iface) {
        for hint in hints {
            let Some(name) = hint.name else { continue };
            if hint.direction == Some(Direction::Playback) || name == "null" {
                continue;
            }
            // libjack prints to stderr itself when no JACK server runs.
            if name == "jack" {
                continue;
            }
            let caps = match probe_pcm(&name) {
                Ok(caps) => Ok(caps),
                Err(e) if e.errno() == libc::EBUSY => Err(format!("busy: {e}")),
                Err(_) => continue,
            };
            let description = hint.desc.unwrap_or_default().replace('\n', " ");
            out.push(DeviceInfo {
                caps,
                name,
                description,
            });
        }
    }
    for card in ::alsa::card::Iter::new().flatten() {
        let index = card.get_index();
        let card_name = card.get_name().unwrap_or_default();
        let Ok(ctl) = ::alsa::ctl::Ctl::from_card(&card, false) else {
            continue;
        };
        for dev in ::alsa::ctl::DeviceIter::new(&ctl) {
            let name = format!("hw:{index},{dev}");
            if out.iter().any(|d| d.name == name) {
                continue;
            }
            let caps = probe(&name);
            if caps.is_err() && probe(&format!("plughw:{index},{dev}")).is_err() {
                // Not a capture device.
                continue;
            }
            out.push(DeviceInfo {
                name,
                description: format!(
                    "{card_name}, device {dev} (use plughw:{index},{dev} for any rate)"
                ),
                caps,
            });
        }
    }
    out
}
