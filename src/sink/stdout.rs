//! JSON lines (or transcript text alone) on standard output, flushed per event so a pipe reader sees
//! each one as it happens.

use std::io::{self, Write};

use super::Sink;
use crate::config::OutputFormat;
use crate::event::Line;

pub const NAME: &str = "stdout";

pub struct StdoutSink {
    format: OutputFormat,
}

impl StdoutSink {
    pub fn new(format: OutputFormat) -> StdoutSink {
        StdoutSink { format }
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn write(&mut self, line: &Line) -> io::Result<()> {
        let text = match self.format {
            OutputFormat::Json => &line.json,
            OutputFormat::Text => match &line.text {
                Some(text) => text,
                None => return Ok(()),
            },
        };
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()
    }
}
