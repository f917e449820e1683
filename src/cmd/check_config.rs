//! `hark check-config`: load the config file and the `-s` overrides, check them as `hark run`
//! would, and give back the result as TOML with every secret replaced, for a person to read.

use std::path::Path;

use super::Error;
use crate::config::Config;

/// The effective config, secrets redacted; a config error (exit 78) if it does not load.
pub fn run(path: Option<&Path>, overrides: &[String]) -> Result<String, Error> {
    let config = Config::load(path, overrides)?;
    Ok(config.to_redacted_toml())
}
