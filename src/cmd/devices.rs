//! `hark devices`: the ALSA capture devices, or one of them, with the rates, channel counts and
//! sample formats each accepts, as a table for a person to read.

use super::Error;
use crate::capture::alsa::{self, DeviceInfo};

/// `hark devices`: the capture devices as a table, or `NoDevice` when there are none.
pub fn run(only: Option<&str>) -> Result<String, Error> {
    let list: Vec<DeviceInfo> = match only {
        Some(name) => vec![DeviceInfo {
            name: name.to_owned(),
            description: String::new(),
            caps: alsa::probe(name),
        }],
        None => alsa::list_devices(),
    };
    if list.is_empty() {
        return Err(Error::NoDevice(
            "no ALSA capture devices found (is a microphone plugged in, and is the user in group audio?)"
                .into(),
        ));
    }
    let mut out = format!(
        "{:<36} {:<28} {:<10} {}\n",
        "DEVICE", "RATES (Hz)", "CHANNELS", "DESCRIPTION"
    );
    for d in &list {
        let (rates, channels) = match &d.caps {
            Ok(c) => {
                let common: Vec<String> = c.rates.iter().map(u32::to_string).collect();
                let mut rates = if c.rate_min == c.rate_max {
                    c.rate_min.to_string()
                } else {
                    format!("{}-{}", c.rate_min, c.rate_max)
                };
                if !common.is_empty() && c.rate_min != c.rate_max {
                    rates = format!("{rates} ({})", common.join(","));
                }
                let channels = if c.channels_min == c.channels_max {
                    c.channels_min.to_string()
                } else {
                    format!("{}-{}", c.channels_min, c.channels_max)
                };
                let s16 = if c.s16 {
                    ""
                } else {
                    " [no S16_LE: use plughw]"
                };
                (rates, format!("{channels}{s16}"))
            }
            Err(e) => (format!("unavailable: {e}"), String::new()),
        };
        out.push_str(&format!(
            "{:<36} {:<28} {:<10} {}\n",
            d.name, rates, channels, d.description
        ));
    }
    Ok(out)
}
