//! JSON lines on a local Unix stream socket (`output.socket`), for any number of local readers up
//! to [`MAX_CLIENTS`]: each gets a `status` event first, then every event from that moment on, the
//! same bytes as stdout's `json` format.
//!
//! The socket file is made carefully (after ntpd-rs' `create_unix_socket`): a stale socket left by
//! a hark that died is replaced, a socket another process serves is not, and anything else at the
//! path (a file, a directory, a symlink) is refused and left as it is. Its mode and group are set
//! after `bind`, and it is removed on exit if it is still ours.
//!
//! Deliberately, this sink never reads from its clients (what they send is ignored, and they may
//! shut down their write side) and never waits for one: each client has its own bounded queue and
//! writer thread, and a client whose queue fills (it stopped reading) is disconnected, its lost
//! lines counted and reported with an `error` event. There is no request protocol, no history and
//! no authentication beyond the file's mode and group.

mod file;

use std::ffi::c_short;
use std::io::{self, BufWriter, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{Dropped, Reporter, Sink};
use crate::config::OutputConfig;
use crate::event::{EventKind, Line};
use crate::sys;
use file::{MAX_PATH_BYTES, SocketFile, group_id};

pub(crate) const NAME: &str = "socket";

/// Clients served at once; one more is closed as soon as it connects (ntpd-rs caps its observers
/// the same way). Each client costs a thread and up to [`CLIENT_QUEUE`] queued lines.
pub(crate) const MAX_CLIENTS: usize = 16;

/// Lines waiting for one client (beyond what the kernel's socket buffer holds, about 200 KB)
/// before that client is taken to have stopped reading and is disconnected.
pub(crate) const CLIENT_QUEUE: usize = 256;

/// How long closing the sink waits for clients to take the lines still queued for them.
const CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// Why the socket could not be set up. Each names the config key and the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something other than a socket is at the path: it is left untouched. Exit 1.
    #[error(
        "output.socket: {} exists and is {kind}, not a socket; refusing to replace it \
         (remove it or choose another path)",
        path.display()
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    /// A live process accepts connections on the socket at the path. Exit 1.
    #[error(
        "output.socket: {} is in use: another process (another hark?) accepts connections on it",
        path.display()
    )]
    InUse { path: PathBuf },
    /// hark does not create directories (systemd's `RuntimeDirectory=hark` does). Exit 1.
    #[error(
        "output.socket: cannot create {}: its directory {} does not exist",
        path.display(),
        parent.display()
    )]
    NoParent { path: PathBuf, parent: PathBuf },
    /// The path does not fit in a socket address. Exit 78.
    #[error(
        "output.socket: {} is {len} bytes long; a socket path must be at most {MAX_PATH_BYTES}",
        path.display()
    )]
    PathTooLong { path: PathBuf, len: usize },
    /// Exit 78.
    #[error(r#"output.socket_mode: must be octal <= 0777, e.g. "0660", got {0:?}"#)]
    BadMode(String),
    /// No group of that name (or number) on this system. Exit 78.
    #[error("output.socket_group: no group named {0:?}")]
    UnknownGroup(String),
    /// The group database could not be read (NSS trouble). Exit 1.
    #[error("output.socket_group: cannot look up {name:?}: {source}")]
    GroupLookup { name: String, source: io::Error },
    /// Any other failure of the system calls involved (permissions, `chown` to a group hark's
    /// user is not in, a stale socket that cannot be removed). Exit 1.
    #[error("output.socket: {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

impl SocketError {
    /// 78 (bad config) when the config alone is wrong, 1 when the system is in the way.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            SocketError::PathTooLong { .. }
            | SocketError::BadMode(_)
            | SocketError::UnknownGroup(_) => 78,
            _ => 1,
        }
    }
}

/// Builds the `status` event a new client gets first; `None` once hark is stopping.
pub(crate) type StatusFn = Box<dyn Fn() -> Option<EventKind> + Send + Sync>;

/// The late-bound status builder. The status aggregator (`health::Health`) needs the sinks to exist, so the
/// session sets the builder once it does; until then clients wait in the listen backlog.
#[derive(Clone, Default)]
pub(crate) struct StatusSource(Arc<StatusInner>);

#[derive(Default)]
struct StatusInner {
    build: OnceLock<StatusFn>,
    /// Wakes the accept thread when the builder arrives.
    waker: OnceLock<UnixStream>,
}

impl StatusSource {
    /// Set the builder (once; later calls are ignored) and let the socket accept clients.
    pub(crate) fn set(&self, build: StatusFn) {
        let _ = self.0.build.set(build);
        if let Some(waker) = self.0.waker.get() {
            wake(waker);
        }
    }

    fn ready(&self) -> bool {
        self.0.build.get().is_some()
    }

    fn status(&self) -> Option<EventKind> {
        self.0.build.get().and_then(|build| build())
    }
}

/// One connected reader.
struct Client {
    id: u64,
    label: String,
    /// The seq of the `status` line it got first: it gets only lines after it.
    start_seq: u64,
    tx: SyncSender<Arc<str>>,
    /// Our end, to poll for the peer's hang-up and to shut down.
    stream: UnixStream,
    writer: JoinHandle<()>,
    /// Disconnected when the writer thread ends.
    done: Receiver<()>,
}

impl Client {
    /// Make the writer thread stop now: its blocked write fails, and the peer reads end of file.
    fn hang_up(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// What the sink thread and the accept thread share.
struct Clients {
    path: PathBuf,
    clients: Mutex<Vec<Client>>,
    stopping: AtomicBool,
    status: StatusSource,
    reporter: Reporter,
    dropped: Dropped,
    next_id: AtomicU64,
}

impl Clients {
    fn clients(&self) -> MutexGuard<'_, Vec<Client>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accept `stream` as a client: queue its `status` line and register it in one critical
    /// section, so that [`SocketSink::write`] (which takes the same lock) gives it every line
    /// numbered after that status and none before.
    fn admit(&self, stream: UnixStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let label = match sys::peer_pid(stream.as_raw_fd()) {
            Some(pid) => format!("client {id} (pid {pid})"),
            None => format!("client {id}"),
        };
        // Built before taking the lock: what it reports may be a moment old, its seq may not.
        let status = self.status.status();
        let mut clients = self.clients();
        if clients.len() >= MAX_CLIENTS {
            // Those that left since the last poll do not count.
            forget_hung_up(&mut clients);
        }
        if clients.len() >= MAX_CLIENTS {
            tracing::warn!(
                "{}: closing {label}: {MAX_CLIENTS} clients are connected already",
                self.path.display()
            );
            return;
        }
        let line = match (status, self.reporter.events()) {
            (Some(kind), Some(events)) => events.render(&kind),
            _ => None,
        };
        let Some(line) = line else {
            tracing::debug!("hark is stopping; closing {label}");
            return;
        };
        let (tx, rx) = mpsc::sync_channel(CLIENT_QUEUE);
        // An empty queue takes its first line.
        let _ = tx.try_send(line.json.clone());
        let (done_tx, done) = mpsc::channel();
        let spawned = stream.try_clone().and_then(|ours| {
            let who = label.clone();
            thread::Builder::new()
                .name(format!("hark-sock-{id}"))
                .spawn(move || {
                    let _done = done_tx;
                    if let Err(e) = serve(stream, &rx) {
                        tracing::debug!("socket {who} is gone: {e}");
                    }
                })
                .map(|writer| (ours, writer))
        });
        match spawned {
            Ok((stream, writer)) => {
                tracing::debug!("socket {label} connected");
                clients.push(Client {
                    id,
                    label,
                    start_seq: line.seq,
                    tx,
                    stream,
                    writer,
                    done,
                });
            }
            Err(e) => tracing::warn!("cannot serve socket {label}: {e}"),
        }
    }

    /// The peer of client `id` closed its end: forget it quietly.
    fn disconnected(&self, id: u64) {
        let mut clients = self.clients();
        if let Some(i) = clients.iter().position(|c| c.id == id) {
            let client = clients.swap_remove(i);
            drop(clients);
            tracing::debug!("socket {} disconnected", client.label);
            client.hang_up();
        }
    }
}

/// The socket sink: owns the socket file, the accept thread and the clients.
pub(crate) struct SocketSink {
    shared: Arc<Clients>,
    file: Option<SocketFile>,
    accept: Option<JoinHandle<()>>,
    wake: UnixStream,
}

impl SocketSink {
    /// Make the socket at `output.socket` with `socket_mode` and `socket_group`, and start
    /// accepting clients once `status` is set. Lines lost by slow clients are counted in
    /// `dropped`, and reported through `reporter`, which also numbers each client's first line.
    pub(crate) fn bind(
        output: &OutputConfig,
        status: StatusSource,
        reporter: Reporter,
        dropped: Dropped,
    ) -> Result<SocketSink, SocketError> {
        let path = output.socket.clone();
        let mode = output
            .socket_mode_bits()
            .ok_or_else(|| SocketError::BadMode(output.socket_mode.clone()))?;
        let gid = match output.socket_group.as_str() {
            "" => None,
            name => Some(group_id(name)?),
        };
        let (listener, file) = SocketFile::bind(&path, mode, gid)?;
        let io = |what| {
            let path = path.clone();
            move |source| SocketError::Io { path, what, source }
        };
        listener
            .set_nonblocking(true)
            .map_err(io("making it non-blocking"))?;
        let (wake, wake_rx) = UnixStream::pair().map_err(io("making a wake-up pipe"))?;
        let status_waker = wake.try_clone().map_err(io("making a wake-up pipe"))?;
        for end in [&wake, &wake_rx] {
            end.set_nonblocking(true)
                .map_err(io("making a wake-up pipe"))?;
        }
        let _ = status.0.waker.set(status_waker);
        let shared = Arc::new(Clients {
            path: path.clone(),
            clients: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            status,
            reporter,
            dropped,
            next_id: AtomicU64::new(0),
        });
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("hark-sock-accept".into())
                .spawn(move || accept_loop(&listener, &wake_rx, &shared))
                .map_err(io("starting its thread"))?
        };
        tracing::info!(
            "listening on {} (mode {mode:04o}{})",
            path.display(),
            match gid {
                Some(gid) => format!(", group {} = {gid}", output.socket_group),
                None => String::new(),
            }
        );
        Ok(SocketSink {
            shared,
            file: Some(file),
            accept: Some(accept),
            wake,
        })
    }
}

impl Sink for SocketSink {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Queue `line` for every client that connected before it was numbered. Never waits: a
    /// client whose queue is full is disconnected instead.
    fn write(&mut self, line: &Line) -> io::Result<()> {
        let mut slow = Vec::new();
        {
            let mut clients = self.shared.clients();
            clients.retain(|c| {
                if line.seq <= c.start_seq {
                    return true;
                }
                match c.tx.try_send(line.json.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        c.hang_up();
                        slow.push(c.label.clone());
                        false
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        tracing::debug!("socket {} disconnected", c.label);
                        false
                    }
                }
            });
        }
        for label in slow {
            // The queue was full: all of it, and this line, never reach that client.
            let lost = CLIENT_QUEUE + 1;
            self.shared.dropped.add(lost as u64);
            let message = format!(
                "{label} of {} stopped reading: its queue of {CLIENT_QUEUE} events was full, so \
                 it was disconnected and lost {lost} events",
                self.shared.path.display()
            );
            tracing::warn!("{message}");
            self.shared
                .reporter
                .error("socket_client_dropped", message, false);
        }
        Ok(())
    }
}

impl Drop for SocketSink {
    /// Stop accepting, remove the socket file, give the clients what is queued for them (up to
    /// [`CLOSE_DEADLINE`]), then close them.
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        wake(&self.wake);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        self.file = None;
        let clients = std::mem::take(&mut *self.shared.clients());
        let until = Instant::now() + CLOSE_DEADLINE;
        let mut closing = Vec::new();
        for client in clients {
            // Closing its queue lets the writer end once the queue is written out.
            drop(client.tx);
            closing.push((client.stream, client.writer, client.done));
        }
        for (stream, writer, done) in closing {
            let left = until.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Timeout) = done.recv_timeout(left) {
                tracing::debug!("a socket client did not take its last events in time");
            }
            let _ = stream.shutdown(Shutdown::Both);
            let _ = writer.join();
        }
    }
}

/// Write a client's lines until its queue closes (`Ok`) or the client goes away. Batches what is
/// queued and flushes whenever the queue runs empty.
fn serve(stream: UnixStream, rx: &Receiver<Arc<str>>) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, stream);
    loop {
        let line = match rx.try_recv() {
            Ok(line) => line,
            Err(TryRecvError::Empty) => {
                out.flush()?;
                match rx.recv() {
                    Ok(line) => line,
                    Err(_) => return Ok(()),
                }
            }
            Err(TryRecvError::Disconnected) => return out.flush(),
        };
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
    }
}

/// Accept clients, and notice those that hang up, until the sink stops. Blocks in `poll` on the
/// wake-up pipe, the listener (once the status builder is set) and every client (for `POLLHUP`
/// only: nothing is ever read from a client).
fn accept_loop(listener: &UnixListener, wake: &UnixStream, shared: &Clients) {
    loop {
        let ready = shared.status.ready();
        let mut fds = vec![sys::pollfd(wake.as_raw_fd(), sys::POLLIN)];
        let mut ids = Vec::new();
        if ready {
            fds.push(sys::pollfd(listener.as_raw_fd(), sys::POLLIN));
            for c in shared.clients().iter() {
                fds.push(sys::pollfd(c.stream.as_raw_fd(), 0));
                ids.push(c.id);
            }
        }
        match sys::poll(&mut fds, -1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("socket: poll failed: {e}; no more clients are accepted");
                return;
            }
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if fds[0].revents != 0 {
            drain(wake);
        }
        if !ready {
            continue;
        }
        for (fd, id) in fds[2..].iter().zip(&ids) {
            if fd.revents & HUNG_UP != 0 {
                shared.disconnected(*id);
            }
        }
        if fds[1].revents != 0 {
            accept_all(listener, shared);
        }
    }
}

/// Accept what waits in the backlog.
fn accept_all(listener: &UnixListener, shared: &Clients) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // Writers block; only the listener is non-blocking.
                if let Err(e) = stream.set_nonblocking(false) {
                    tracing::warn!("socket: cannot serve a client: {e}");
                    continue;
                }
                shared.admit(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // Out of file descriptors, most likely: back off rather than spin.
                tracing::warn!("socket: cannot accept a client: {e}");
                thread::sleep(Duration::from_millis(100));
                return;
            }
        }
    }
}

/// What `poll` reports, asked or not, for a client that closed its end.
const HUNG_UP: c_short = sys::POLLHUP | sys::POLLERR | sys::POLLNVAL;

/// Drop the clients whose peer closed its end, without waiting.
fn forget_hung_up(clients: &mut Vec<Client>) {
    let mut fds: Vec<sys::PollFd> = clients
        .iter()
        .map(|c| sys::pollfd(c.stream.as_raw_fd(), 0))
        .collect();
    if sys::poll(&mut fds, 0).is_err() {
        return;
    }
    let mut gone = fds.iter().map(|fd| fd.revents & HUNG_UP != 0);
    clients.retain(|c| {
        let hung_up = gone.next().unwrap_or(false);
        if hung_up {
            tracing::debug!("socket {} disconnected", c.label);
            c.hang_up();
        }
        !hung_up
    });
}

fn wake(waker: &UnixStream) {
    // Full means a wake-up is pending already.
    let _ = (&*waker).write(&[1]);
}

fn drain(wake: &UnixStream) {
    let mut buf = [0u8; 64];
    while matches!((&*wake).read(&mut buf), Ok(n) if n > 0) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Events;
    use crate::bus::SinkQueue;
    use std::fs;
    use std::path::Path;

    fn output(path: &Path) -> OutputConfig {
        OutputConfig {
            socket: path.to_owned(),
            ..OutputConfig::default()
        }
    }

    fn status() -> EventKind {
        EventKind::Status {
            state: crate::event::State::Online,
            overruns: 0,
            spool_pending: 0,
            spool_bytes: 0,
            events_dropped: 0,
            uptime_s: 0,
        }
    }

    fn read_line(r: &mut io::BufReader<UnixStream>) -> String {
        use std::io::BufRead;
        let mut s = String::new();
        r.read_line(&mut s).expect("read");
        s
    }

    #[test]
    fn a_client_gets_status_first_then_only_later_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (queue, _rx) = SinkQueue::pair("test", 16);
        let events = Events::new("dev".into(), vec![queue]);
        let reporter = Reporter::default();
        reporter.set(&events);
        let source = StatusSource::default();
        let mut sink =
            SocketSink::bind(&output(&path), source.clone(), reporter, Dropped::default())
                .expect("bind");
        let before = events.render(&status()).unwrap();
        // Connected before the builder is set: it waits, then gets its status.
        let client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        source.set(Box::new(|| Some(status())));
        let mut r = io::BufReader::new(client);
        let first: serde_json::Value = serde_json::from_str(&read_line(&mut r)).unwrap();
        assert_eq!(first["type"], "status");
        let start = first["seq"].as_u64().unwrap();
        assert!(start > before.seq);
        // A line numbered before the client's status is not sent; a later one is.
        sink.write(&before).unwrap();
        let after = events.render(&status()).unwrap();
        sink.write(&after).unwrap();
        let second: serde_json::Value = serde_json::from_str(&read_line(&mut r)).unwrap();
        assert_eq!(second["seq"].as_u64(), Some(after.seq));
        drop(sink);
        assert_eq!(read_line(&mut r), "", "closed on drop");
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn the_socket_file_of_someone_else_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let sink = SocketSink::bind(
            &output(&path),
            StatusSource::default(),
            Reporter::default(),
            Dropped::default(),
        )
        .expect("bind");
        fs::remove_file(&path).unwrap();
        let _theirs = UnixListener::bind(&path).unwrap();
        drop(sink);
        assert!(path.exists());
    }

    #[test]
    fn group_names_resolve_and_unknown_ones_are_config_errors() {
        assert_eq!(group_id("root").ok(), Some(0));
        assert_eq!(group_id("4242").ok(), Some(4242));
        let e = group_id("no-such-group-hark").unwrap_err();
        assert_eq!(e.exit_code(), 78);
        assert!(e.to_string().contains("output.socket_group"), "{e}");
    }
}
