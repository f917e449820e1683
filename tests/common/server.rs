//! A small HTTP/1.1 server, plain or over TLS, for tests that talk to a fake transcription API.
//!
//! It needs nothing but std, rustls and rcgen. One thread per connection, keep-alive, request
//! bodies by `Content-Length` or chunked (with `Expect: 100-continue`), `multipart/form-data`
//! parsed into [`Part`]s. Every complete request is recorded before the handler sees it, so a test
//! can wait for requests with [`Server::wait_for_requests`] and look at them afterwards. The
//! handler's [`Reply`] can also misbehave on purpose: reset the connection mid-body, stall, or
//! hold the request until the server is dropped.
//!
//! A malformed request ends its connection (with a line on stderr), never the server. A handler
//! that panics gets a 500 for its client, and the panic is raised again when the [`Server`] is
//! dropped, so that an assertion inside a handler fails the test.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// Request line and headers together (and chunked trailers) may not exceed this.
const MAX_HEADER: usize = 64 * 1024;
/// A request body may not exceed this.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// A CA made for one test, and a server certificate it signed for 127.0.0.1, ::1 and localhost.
#[derive(Clone, Debug)]
pub struct TestCa {
    /// The CA's certificate in PEM, for the client to trust.
    pub ca_pem: PathBuf,
    /// The server's certificate and its private key (PKCS#8) in PEM, for servers other than
    /// this module's (mosquitto).
    pub leaf_pem: PathBuf,
    pub leaf_key: PathBuf,
    config: Arc<ServerConfig>,
}

/// Makes a self-signed CA and a leaf certificate for 127.0.0.1, ::1 and "localhost" signed by it;
/// writes the CA's PEM to dir/ca.pem, and the leaf's certificate and key to dir/leaf.pem and
/// dir/leaf.key.
pub fn test_ca(dir: &Path) -> TestCa {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hark test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed CA");
    let issuer = Issuer::new(ca_params, ca_key);

    let names = vec![
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "localhost".to_string(),
    ];
    let mut leaf_params = CertificateParams::new(names).expect("leaf parameters");
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf signed by the CA");

    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem())
        .unwrap_or_else(|e| panic!("writing {}: {e}", ca_pem.display()));

    let leaf_pem = dir.join("leaf.pem");
    let leaf_key_pem = dir.join("leaf.key");
    for (path, pem) in [
        (&leaf_pem, leaf_cert.pem()),
        (&leaf_key_pem, leaf_key.serialize_pem()),
    ] {
        std::fs::write(path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate and key");
    TestCa {
        ca_pem,
        leaf_pem,
        leaf_key: leaf_key_pem,
        config: Arc::new(config),
    }
}

/// One part of a `multipart/form-data` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// `name` of its Content-Disposition, unescaped.
    pub name: String,
    /// `filename` of its Content-Disposition, unescaped, if there was one.
    pub filename: Option<String>,
    /// Its Content-Type header, if it had one.
    pub content_type: Option<String>,
    /// The bytes between the blank line after its headers and the CRLF before the next delimiter.
    pub data: Vec<u8>,
}

/// A complete request as the server read it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request-target as sent, e.g. "/v1/audio/transcriptions?api-version=x".
    pub target: String,
    /// Header names and values as sent (values trimmed), in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked if it came with `Transfer-Encoding: chunked`.
    pub body: Vec<u8>,
    /// The parts of a `multipart/form-data` body; empty for any other body, or a malformed one
    /// (which is also reported on stderr).
    pub parts: Vec<Part>,
    /// When the request was completely read.
    pub at: Instant,
}

impl Request {
    /// The first header of that name, case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first part of that name, as text. Panics if its data is not UTF-8.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.part(name).map(Part::text)
    }

    /// All parts of that name, in order, as text. Panics if one's data is not UTF-8.
    pub fn fields(&self, name: &str) -> Vec<&str> {
        self.parts
            .iter()
            .filter(|p| p.name == name)
            .map(Part::text)
            .collect()
    }

    /// The first part of that name.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }
}

impl Part {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.data).unwrap_or_else(|e| {
            panic!(
                "multipart field {:?} is not UTF-8 text ({e}); use part() for binary data",
                self.name
            )
        })
    }
}

/// What the handler wants done with a request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// status + body with Content-Type: application/json
    Json(u16, String),
    /// Any status, extra headers (Content-Type among them if wanted), body with Content-Length.
    /// The server writes the framing headers itself: do not pass Content-Length or
    /// Transfer-Encoding.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Transfer-Encoding: chunked, each chunk written and flushed separately (for
    /// text/event-stream). Empty chunks are skipped, since an empty chunk ends the body.
    Chunks {
        status: u16,
        headers: Vec<(String, String)>,
        chunks: Vec<Vec<u8>>,
    },
    /// Sends "HTTP/1.1 200 OK", Content-Type: application/json, Content-Length: 1000, then 10
    /// bytes of body, then resets the TCP connection (SO_LINGER 0 then close): "connection reset
    /// mid-response".
    ResetMidBody,
    /// Reads the request, then waits this long without answering, then closes the connection
    /// (sooner if the server is dropped).
    Stall(Duration),
    /// Reads the request and never answers until the Server is dropped (for kill -9 tests).
    Hold,
}

type Handler = dyn Fn(&Request, usize) -> Reply + Send + Sync;

struct State {
    requests: Vec<Request>,
    stopped: bool,
    /// Messages of handlers that panicked.
    panics: Vec<String>,
    /// A clone of each open connection's socket, to shut them down when the server is dropped.
    conns: HashMap<u64, TcpStream>,
    next_conn: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    handler: Box<Handler>,
    tls: Option<Arc<ServerConfig>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the server is stopped, or at most `limit` when there is one.
    fn wait_stopped(&self, limit: Option<Duration>) {
        let state = self.lock();
        match limit {
            Some(limit) => drop(
                self.changed
                    .wait_timeout_while(state, limit, |s| !s.stopped)
                    .unwrap_or_else(PoisonError::into_inner),
            ),
            None => drop(
                self.changed
                    .wait_while(state, |s| !s.stopped)
                    .unwrap_or_else(PoisonError::into_inner),
            ),
        }
    }
}

/// A running server; dropping it stops it.
pub struct Server {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on 127.0.0.1:0 (plain HTTP when tls is None, else TLS with the CA's leaf).
    pub fn start(
        tls: Option<&TestCa>,
        handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> Server {
        Self::start_on(0, tls, handler)
    }

    /// Same on a given port (for "server down at start, up later").
    pub fn start_on(
        port: u16,
        tls: Option<&TestCa>,
        handler: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> Server {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("test server cannot listen on 127.0.0.1:{port}: {e}"));
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                requests: Vec::new(),
                stopped: false,
                panics: Vec::new(),
                conns: HashMap::new(),
                next_conn: 0,
            }),
            changed: Condvar::new(),
            handler: Box::new(handler),
            tls: tls.map(|ca| ca.config.clone()),
        });
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("test-server-{}", addr.port()))
                .spawn(move || accept_loop(&listener, &shared))
                .expect("spawn the accept thread")
        };
        Server {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// "http://127.0.0.1:PORT/v1" or "https://127.0.0.1:PORT/v1".
    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}/v1", self.addr.port())
    }

    /// All complete requests so far, in arrival order (the index is what the handler was given).
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// How many connections the server has accepted so far (to tell keep-alive from reconnects).
    pub fn connections(&self) -> usize {
        self.shared.lock().next_conn as usize
    }

    /// Blocks until at least n requests arrived, and returns all of them; panics after `limit`.
    pub fn wait_for_requests(&self, n: usize, limit: Duration) -> Vec<Request> {
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, limit, |s| s.requests.len() < n)
            .unwrap_or_else(PoisonError::into_inner);
        if state.requests.len() < n {
            let seen: Vec<String> = state
                .requests
                .iter()
                .map(|r| format!("{} {}", r.method, r.target))
                .collect();
            panic!(
                "test server at {}: expected {n} request(s) within {limit:?}, got {}: {seen:?}",
                self.addr,
                state.requests.len()
            );
        }
        state.requests.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopped = true;
            self.shared.changed.notify_all();
        }
        // Wake accept(); the loop sees the flag and ends.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // Unblock connection threads waiting for a client's next request.
        let (conns, panics) = {
            let mut state = self.shared.lock();
            (
                std::mem::take(&mut state.conns),
                std::mem::take(&mut state.panics),
            )
        };
        for conn in conns.values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if !panics.is_empty() && !thread::panicking() {
            panic!(
                "test server at {}: handler panicked: {}",
                self.addr,
                panics.join("; ")
            );
        }
    }
}

/// Binds 127.0.0.1:0, reads the port, drops the listener.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for tcp in listener.incoming() {
        let Ok(tcp) = tcp else {
            if shared.lock().stopped {
                return;
            }
            // Out of descriptors or the like: don't spin.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let id = {
            let mut state = shared.lock();
            if state.stopped {
                return;
            }
            let Ok(clone) = tcp.try_clone() else {
                continue;
            };
            let id = state.next_conn;
            state.next_conn += 1;
            state.conns.insert(id, clone);
            id
        };
        let _ = tcp.set_nodelay(true);
        let conn_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("test-server-conn-{id}"))
            .spawn(move || connection(tcp, id, &conn_shared));
        if spawned.is_err() {
            shared.lock().conns.remove(&id);
        }
    }
}

/// A connection's socket, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// How a connection ends.
enum End {
    /// Just close it (client gone, bad request, stall over).
    Close,
    /// Close it after a response with `Connection: close`: TLS gets a close_notify.
    Graceful,
    /// Reset it: SO_LINGER 0, then close.
    Reset,
}

fn connection(tcp: TcpStream, id: u64, shared: &Shared) {
    let stream = match &shared.tls {
        None => Stream::Plain(tcp),
        Some(config) => match ServerConnection::new(config.clone()) {
            Ok(conn) => Stream::Tls(Box::new(StreamOwned::new(conn, tcp))),
            Err(e) => {
                eprintln!("test server: TLS setup failed: {e}");
                shared.lock().conns.remove(&id);
                return;
            }
        },
    };
    let mut stream = BufReader::new(stream);
    let end = match serve(&mut stream, shared) {
        Ok(end) => end,
        Err(e) => {
            if e.kind() == io::ErrorKind::InvalidData {
                eprintln!("test server: closing the connection: {e}");
            }
            End::Close
        }
    };
    // The socket closes when its last descriptor does: drop the registry's clone first.
    shared.lock().conns.remove(&id);
    let mut stream = stream.into_inner();
    match end {
        End::Close => {}
        End::Graceful => {
            if let Stream::Tls(tls) = &mut stream {
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
        End::Reset => {
            if let Err(e) = linger_zero(stream.tcp()) {
                eprintln!("test server: SO_LINGER 0 failed, closing normally: {e}");
            }
        }
    }
    drop(stream);
}

/// Reads requests and answers them until the connection should end.
fn serve(stream: &mut BufReader<Stream>, shared: &Shared) -> io::Result<End> {
    loop {
        let Some(head) = read_head(stream)? else {
            return Ok(End::Close);
        };
        let keep_alive = head.keep_alive();
        let head_only = head.method.eq_ignore_ascii_case("HEAD");
        let body = read_body(stream, &head)?;
        let at = Instant::now();
        let parts = match multipart_boundary(&head.headers) {
            Some(boundary) => parse_multipart(&body, &boundary).unwrap_or_else(|e| {
                eprintln!(
                    "test server: malformed multipart body in {} {}: {e}",
                    head.method, head.target
                );
                Vec::new()
            }),
            None => Vec::new(),
        };
        let request = Request {
            method: head.method,
            target: head.target,
            headers: head.headers,
            body,
            parts,
            at,
        };
        let index = {
            let mut state = shared.lock();
            state.requests.push(request.clone());
            shared.changed.notify_all();
            state.requests.len() - 1
        };
        let reply = match catch_unwind(AssertUnwindSafe(|| (shared.handler)(&request, index))) {
            Ok(reply) => reply,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(not a string)".to_string());
                let message = format!(
                    "request {index} ({} {}): {message}",
                    request.method, request.target
                );
                shared.lock().panics.push(message.clone());
                Reply::Full {
                    status: 500,
                    headers: vec![("Content-Type".into(), "text/plain".into())],
                    body: format!("test server handler panicked: {message}").into_bytes(),
                }
            }
        };
        let writer = stream.get_mut();
        match reply {
            Reply::Json(status, body) => {
                let headers = [("Content-Type".to_string(), "application/json".to_string())];
                write_full(
                    writer,
                    status,
                    &headers,
                    body.as_bytes(),
                    keep_alive,
                    head_only,
                )?;
            }
            Reply::Full {
                status,
                headers,
                body,
            } => write_full(writer, status, &headers, &body, keep_alive, head_only)?,
            Reply::Chunks {
                status,
                headers,
                chunks,
            } => write_chunks(writer, status, &headers, &chunks, keep_alive, head_only)?,
            Reply::ResetMidBody => {
                writer.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Content-Length: 1000\r\n\r\n{\"text\": \"",
                )?;
                writer.flush()?;
                return Ok(End::Reset);
            }
            Reply::Stall(limit) => {
                shared.wait_stopped(Some(limit));
                return Ok(End::Close);
            }
            Reply::Hold => {
                shared.wait_stopped(None);
                return Ok(End::Close);
            }
        }
        if !keep_alive {
            return Ok(End::Graceful);
        }
    }
}

struct Head {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether any header of that name lists `token` (case-insensitive, comma-separated).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn keep_alive(&self) -> bool {
        if self.version == "HTTP/1.0" {
            self.has_token("Connection", "keep-alive")
        } else {
            !self.has_token("Connection", "close")
        }
    }
}

fn bad(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// One line, without its CRLF (or bare LF), taking its bytes from `budget`. None at EOF before any
/// byte.
fn read_line(stream: &mut impl BufRead, budget: &mut usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = stream.take(*budget as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return if *budget == 0 {
            Err(bad("request head too large"))
        } else {
            Ok(None)
        };
    }
    if line.last() != Some(&b'\n') {
        return if n == *budget {
            Err(bad(format!("request head larger than {MAX_HEADER} bytes")))
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-line",
            ))
        };
    }
    *budget -= n;
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Header lines up to the blank line, into `headers`.
fn read_fields(
    stream: &mut impl BufRead,
    budget: &mut usize,
    headers: &mut Vec<(String, String)>,
) -> io::Result<()> {
    loop {
        let line = read_line(stream, budget)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in headers")
        })?;
        if line.is_empty() {
            return Ok(());
        }
        let line = String::from_utf8(line).map_err(|_| bad("header is not UTF-8"))?;
        if line.starts_with([' ', '\t']) {
            return Err(bad("obsolete header folding"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("header without a colon: {line:?}")))?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(bad(format!("bad header name: {name:?}")));
        }
        headers.push((
            name.to_string(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }
}

/// The request line and headers; None if the client closed the connection before a request.
fn read_head(stream: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut budget = MAX_HEADER;
    let line = loop {
        match read_line(stream, &mut budget)? {
            None => return Ok(None),
            // Empty lines before a request line are to be ignored (RFC 9112, 2.2).
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let line = String::from_utf8(line).map_err(|_| bad("request line is not UTF-8"))?;
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad(format!("bad request line: {line:?}")));
    };
    if method.is_empty() || target.is_empty() || !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(bad(format!("bad request line: {line:?}")));
    }
    let mut head = Head {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers: Vec::new(),
    };
    read_fields(stream, &mut budget, &mut head.headers)?;
    Ok(Some(head))
}

/// The body by Transfer-Encoding: chunked or Content-Length; sends 100 Continue first if asked.
fn read_body(stream: &mut BufReader<Stream>, head: &Head) -> io::Result<Vec<u8>> {
    let chunked = match head.header("Transfer-Encoding") {
        None => false,
        Some(_) => {
            let codings: Vec<String> = head
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("Transfer-Encoding"))
                .flat_map(|(_, v)| v.split(','))
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty())
                .collect();
            if codings != ["chunked"] {
                return Err(bad(format!("unsupported Transfer-Encoding: {codings:?}")));
            }
            true
        }
    };
    let length = if chunked {
        None
    } else {
        let mut length: Option<usize> = None;
        for (_, value) in head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("Content-Length"))
        {
            for value in value.split(',') {
                let value = value.trim();
                let n: usize = value
                    .parse()
                    .ok()
                    .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| bad(format!("bad Content-Length: {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(bad("conflicting Content-Length headers"));
                }
                length = Some(n);
            }
        }
        if length.is_some_and(|n| n > MAX_BODY) {
            return Err(bad(format!("body larger than {MAX_BODY} bytes")));
        }
        Some(length.unwrap_or(0))
    };
    if head.has_token("Expect", "100-continue") && head.version == "HTTP/1.1" {
        let writer = stream.get_mut();
        writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        writer.flush()?;
    }
    match length {
        Some(n) => {
            let mut body = vec![0; n];
            stream.read_exact(&mut body)?;
            Ok(body)
        }
        None => read_chunked(stream),
    }
}

fn read_chunked(stream: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        // Each chunk-size line, and then the trailers, get their own budget.
        let mut budget = MAX_HEADER;
        let line = read_line(stream, &mut budget)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in a chunked body",
            )
        })?;
        let line = String::from_utf8(line).map_err(|_| bad("chunk size line is not UTF-8"))?;
        let size = line
            .split(';')
            .next()
            .unwrap_or("")
            .trim_matches([' ', '\t']);
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("bad chunk size line: {line:?}")));
        }
        let size = usize::from_str_radix(size, 16)
            .ok()
            .filter(|&n| n <= MAX_BODY && body.len() + n <= MAX_BODY)
            .ok_or_else(|| bad(format!("body larger than {MAX_BODY} bytes")))?;
        if size == 0 {
            // Trailers, if any, are read and dropped.
            let mut trailers = Vec::new();
            budget = MAX_HEADER;
            read_fields(stream, &mut budget, &mut trailers)?;
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        stream.read_exact(&mut body[start..])?;
        let mut crlf = [0; 2];
        stream.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(bad("chunk data not followed by CRLF"));
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// A response that may carry no body at all (RFC 9110, 6.4.1).
fn bodiless(status: u16) -> bool {
    (100..200).contains(&status) || status == 204 || status == 304
}

fn status_and_headers(status: u16, headers: &[(String, String)], keep_alive: bool) -> String {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    if !keep_alive {
        head.push_str("Connection: close\r\n");
    }
    head
}

fn write_full(
    w: &mut impl Write,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut head = status_and_headers(status, headers, keep_alive);
    let with_body = !bodiless(status);
    if with_body {
        let _ = write!(head, "Content-Length: {}\r\n", body.len());
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if with_body && !head_only {
        out.extend_from_slice(body);
    }
    w.write_all(&out)?;
    w.flush()
}

fn write_chunks(
    w: &mut impl Write,
    status: u16,
    headers: &[(String, String)],
    chunks: &[Vec<u8>],
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut head = status_and_headers(status, headers, keep_alive);
    head.push_str("Transfer-Encoding: chunked\r\n\r\n");
    w.write_all(head.as_bytes())?;
    w.flush()?;
    if head_only {
        return Ok(());
    }
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        let mut out = format!("{:x}\r\n", chunk.len()).into_bytes();
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
        w.write_all(&out)?;
        w.flush()?;
    }
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

/// SO_LINGER 0, so that closing the socket resets the connection instead of ending it with FIN.
#[allow(unsafe_code)]
fn linger_zero(tcp: &TcpStream) -> io::Result<()> {
    use std::ffi::{c_int, c_void};
    use std::os::fd::AsRawFd;

    #[repr(C)]
    struct Linger {
        l_onoff: c_int,
        l_linger: c_int,
    }
    unsafe extern "C" {
        fn setsockopt(
            fd: c_int,
            level: c_int,
            name: c_int,
            value: *const c_void,
            len: u32,
        ) -> c_int;
    }
    // Linux's values (asm-generic/socket.h).
    const SOL_SOCKET: c_int = 1;
    const SO_LINGER: c_int = 13;

    let linger = Linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid descriptor, a pointer to a live `struct linger` and its exact size.
    let rc = unsafe {
        setsockopt(
            tcp.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            (&raw const linger).cast(),
            size_of::<Linger>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The boundary of a `multipart/form-data` Content-Type, if the request has one.
fn multipart_boundary(headers: &[(String, String)]) -> Option<String> {
    let value = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("Content-Type"))
        .map(|(_, v)| v.as_str())?;
    let (kind, params) = split_params(value);
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v)
}

/// `value; key=value; key="quoted \" value"` into the value and its parameters. Quoted values are
/// unescaped; parameters that don't parse are skipped.
fn split_params(header: &str) -> (&str, Vec<(String, String)>) {
    let (first, mut rest) = header.split_once(';').unwrap_or((header, ""));
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        if rest.is_empty() {
            break;
        }
        let Some(eq) = rest
            .find(['=', ';'])
            .filter(|&i| rest.as_bytes()[i] == b'=')
        else {
            // A parameter without a value: skip it.
            rest = rest.find(';').map_or("", |i| &rest[i..]);
            continue;
        };
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start_matches([' ', '\t']);
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            out.push(escaped);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => out.push(c),
                }
            }
            value = out;
            // An unterminated quote runs to the end.
            rest = end.map_or("", |i| &quoted[i..]);
        } else {
            let end = rest.find(';').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        params.push((key, value));
    }
    (first.trim(), params)
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    let mut at = from;
    loop {
        at += haystack.get(at..)?.iter().position(|&b| b == first)?;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        at += 1;
    }
}

/// After a delimiter at `at`: Some(true) if it closes the body (`--`), Some(false) with `at` moved
/// past its line if a part follows, None if it is not a delimiter at all.
fn after_delimiter(body: &[u8], at: &mut usize) -> Option<bool> {
    let rest = &body[*at..];
    if rest.starts_with(b"--") {
        *at += 2;
        return Some(true);
    }
    // Transport padding (RFC 2046, 5.1.1), then CRLF.
    let padding = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    if rest[padding..].starts_with(b"\r\n") {
        *at += padding + 2;
        Some(false)
    } else {
        None
    }
}

/// The parts of a multipart body: RFC 2046 delimiters, RFC 7578 Content-Disposition.
fn parse_multipart(body: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
    if boundary.is_empty() {
        return Err("empty boundary".into());
    }
    let dash = format!("--{boundary}").into_bytes();
    let crlf_dash = format!("\r\n--{boundary}").into_bytes();

    // The first delimiter: at the very start, or after a preamble and its CRLF.
    let mut at = 0;
    let mut closed = loop {
        let start = if at == 0 && body.starts_with(&dash) {
            0
        } else {
            find(body, &crlf_dash, at).ok_or("no delimiter")? + 2
        };
        at = start + dash.len();
        if let Some(closed) = after_delimiter(body, &mut at) {
            break closed;
        }
    };
    let mut parts = Vec::new();
    while !closed {
        // A part with no headers at all starts with the blank line itself.
        let (headers, data_start) = if body[at..].starts_with(b"\r\n") {
            ("", at + 2)
        } else {
            let end = find(body, b"\r\n\r\n", at)
                .ok_or("part headers without a blank line after them")?
                + 2;
            let text = std::str::from_utf8(&body[at..end - 2])
                .map_err(|_| "part headers are not UTF-8")?;
            (text, end + 2)
        };
        let mut name = None;
        let mut filename = None;
        let mut content_type = None;
        for line in headers.split("\r\n").filter(|l| !l.is_empty()) {
            let (key, value) = line
                .split_once(':')
                .ok_or_else(|| format!("part header without a colon: {line:?}"))?;
            let value = value.trim();
            if key.trim().eq_ignore_ascii_case("Content-Disposition") {
                let (kind, params) = split_params(value);
                if !kind.eq_ignore_ascii_case("form-data") {
                    return Err(format!("Content-Disposition is not form-data: {value:?}"));
                }
                for (k, v) in params {
                    if k.eq_ignore_ascii_case("name") {
                        name = Some(v);
                    } else if k.eq_ignore_ascii_case("filename") {
                        filename = Some(v);
                    }
                }
            } else if key.trim().eq_ignore_ascii_case("Content-Type") {
                content_type = Some(value.to_string());
            }
        }
        let name = name.ok_or_else(|| format!("part without a name: {headers:?}"))?;
        // The data runs to the next CRLF--boundary that is a delimiter.
        let mut search = data_start;
        let data_end = loop {
            let found = find(body, &crlf_dash, search)
                .ok_or_else(|| format!("part {name:?} has no closing delimiter"))?;
            let mut next = found + crlf_dash.len();
            if let Some(last) = after_delimiter(body, &mut next) {
                closed = last;
                at = next;
                break found;
            }
            search = found + 1;
        };
        parts.push(Part {
            name,
            filename,
            content_type,
            data: body[data_start..data_end].to_vec(),
        });
    }
    Ok(parts)
}
