//! JSON lines (or transcript text alone) on standard output, flushed per event so a pipe reader sees
//! each one as it happens.
//!
//! When the reader goes away (`hark | head -1`), the next write fails with `EPIPE` (Rust ignores
//! SIGPIPE) and the sink ends, which the daemon turns into a clean stop if no other sink is left.
//! Events can be minutes apart, so while stdout is a pipe or a socket the sink also checks every
//! [`READER_CHECK`] whether its reader is still there, without writing anything.

use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use super::Sink;
use crate::config::OutputFormat;
use crate::event::Line;
use crate::sys;

pub(crate) const NAME: &str = "stdout";

/// How often an idle sink checks that a pipe's reader is still there.
pub(crate) const READER_CHECK: Duration = Duration::from_secs(1);

pub(crate) struct StdoutSink {
    format: OutputFormat,
    /// stdout is a pipe or a socket, whose reader can go away.
    watch: bool,
}

impl StdoutSink {
    pub(crate) fn new(format: OutputFormat) -> StdoutSink {
        StdoutSink {
            format,
            watch: has_reader(),
        }
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

    fn tick_every(&self) -> Option<Duration> {
        self.watch.then_some(READER_CHECK)
    }

    /// `EPIPE` when the pipe's reader closed its end (or the socket's peer hung up).
    fn tick(&mut self) -> io::Result<()> {
        let stdout = io::stdout();
        // Nothing asked for: only POLLERR (a pipe without reader) and POLLHUP come back.
        let mut fds = [sys::pollfd(stdout.as_fd().as_raw_fd(), 0)];
        // A zero timeout never blocks; a failed poll says nothing about the reader.
        let ready = sys::poll(&mut fds, 0).unwrap_or(0);
        if ready > 0 && fds[0].revents & (sys::POLLERR | sys::POLLHUP) != 0 {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        Ok(())
    }
}

/// Whether stdout is a pipe or a socket (not a terminal, a file or /dev/null).
fn has_reader() -> bool {
    let stdout = io::stdout();
    if stdout.is_terminal() {
        return false;
    }
    let Ok(fd) = stdout.as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => meta.file_type().is_fifo() || meta.file_type().is_socket(),
        Err(_) => false,
    }
}
