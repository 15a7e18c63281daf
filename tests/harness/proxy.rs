//! A small fault-injecting HTTP proxy for the S3 tests, on 127.0.0.1 in front of an S3 server.
//!
//! It understands just enough HTTP/1.1 to find where requests and responses end (Content-Length,
//! chunked bodies, HEAD), so that it can pass traffic through untouched or, for requests that match a
//! [`Rule`], misbehave in one of the ways a real store or network does: answer 503 Slow Down (or any
//! other S3 error), stall without ever answering, drop the connection, cut a response off midway, hold
//! a response midway until the test says go on, or answer late.
//!
//! Rules can be added and removed while commands run. Every request is recorded ([`Proxy::seen`]) so
//! that tests can prove what a command sent: retries, aborts, part sizes, parallelism.
//!
//! Apart from rules, the proxy can play a store that accepts `If-None-Match` and ignores it (Garage
//! does): [`Proxy::ignore_conditional_writes`] removes the header from every request before rules
//! apply, and signs the request anew ([`crate::resign`]) so that s3s-fs, which checks signatures,
//! takes it. A create-only write then replaces an existing object.
//!
//! Only std (libc, already a dependency, for an RST; the SDK's own signing crates for the new
//! signatures): one thread accepts, one thread serves each client connection. Every socket has short
//! timeouts and every wait checks the stop flag, so dropping the proxy ends all its threads promptly.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A client or server that accepts no bytes for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request and response heads larger than this are refused (S3 heads are a few KiB).
const MAX_HEAD: usize = 64 * 1024;

/// One request as the proxy saw its head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent (`/bucket/key?uploadId=...&partNumber=3`).
    pub target: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(path, _)| path)
    }

    /// Whether the query has parameter `name` (with or without a value).
    pub fn has_query(&self, name: &str) -> bool {
        self.target.split_once('?').is_some_and(|(_, query)| {
            query.split('&').any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k) == name)
        })
    }

    /// The value of query parameter `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query.split('&').find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
    }

    /// A multipart UploadPart: `PUT ...?partNumber=N&uploadId=...`.
    pub fn is_upload_part(&self) -> bool {
        self.method == "PUT" && self.has_query("partNumber") && self.has_query("uploadId")
    }

    /// The part number of an UploadPart.
    pub fn part_number(&self) -> Option<u32> {
        self.query("partNumber")?.parse().ok()
    }

    /// The region in the SigV4 credential scope (`Credential=KEY/DATE/REGION/s3/aws4_request`).
    pub fn signing_region(&self) -> Option<&str> {
        let auth = self.header("authorization")?;
        let credential = auth.split("Credential=").nth(1)?;
        credential.split(['/', ',']).nth(2)
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.trim().parse().ok())
    }

    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
}

/// A canned answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// An S3 error document, as S3 sends one.
    pub fn s3_error(status: u16, reason: &str, code: &str, message: &str) -> Response {
        Response {
            status,
            reason: reason.to_owned(),
            headers: vec![("Content-Type".into(), "application/xml".into())],
            body: format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message>\
                 <RequestId>walship-test-proxy</RequestId></Error>"
            ),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// What a matching request gets instead of (or on top of) being passed through.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this response and close the connection.
    Respond(Response),
    /// Read the request and never answer (until the client gives up or the proxy is dropped).
    Stall,
    /// Read the request and close the connection without a word (a FIN), as a server process that
    /// died does: the client sees "connection closed before message completed".
    Close,
    /// Read the request and reset the connection (an RST), as a crashed host or a middlebox does.
    Reset,
    /// Pass the request on, send the first `after` bytes of the response (head included), then close.
    CutResponse { after: usize },
    /// Pass the request on, send the first `after` bytes of the response, then wait for
    /// [`Proxy::release`] (or the client to go away) before sending the rest.
    HoldResponse { after: usize },
    /// Read the whole request, then pass it on after this pause.
    Delay(Duration),
    /// Read the whole request, pass its head and the first `after` bytes of its body on at once and
    /// the rest after `pause`: the server is busy with a request whose bytes are still in transit
    /// (and keeps them coming even if the client has given up meanwhile).
    SlowBody { after: usize, pause: Duration },
}

impl Fault {
    /// `503 Slow Down`, S3's way of saying "too many requests".
    pub fn slow_down() -> Fault {
        Fault::Respond(Response::s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate."))
    }

    /// An S3 error that no client should retry.
    pub fn bad_request(code: &str) -> Fault {
        Fault::Respond(Response::s3_error(400, "Bad Request", code, "Injected by the walship test proxy."))
    }

    fn label(&self) -> String {
        match self {
            Fault::Respond(r) => format!("{} {}", r.status, r.reason),
            Fault::Stall => "stall".into(),
            Fault::Close => "close".into(),
            Fault::Reset => "reset".into(),
            Fault::CutResponse { after } => format!("cut after {after} bytes"),
            Fault::HoldResponse { after } => format!("hold after {after} bytes"),
            Fault::Delay(d) => format!("delay {} ms", d.as_millis()),
            Fault::SlowBody { after, pause } => format!("body paused after {after} bytes for {} ms", pause.as_millis()),
        }
    }
}

type Matcher = Box<dyn Fn(&Request) -> bool + Send>;

/// Which requests get a fault, and how many of them.
pub struct Rule {
    when: Matcher,
    fault: Fault,
    /// Matching requests still to let through untouched before the fault starts.
    skip: usize,
    /// Matching requests still to fault; `None` for all of them.
    times: Option<usize>,
}

impl Rule {
    /// `fault` for every request, for ever (narrow it with [`Rule::when`], [`Rule::times`], [`Rule::skip`]).
    pub fn new(fault: Fault) -> Rule {
        Rule { when: Box::new(|_| true), fault, skip: 0, times: None }
    }

    /// Only requests for which `when` holds.
    pub fn when(mut self, when: impl Fn(&Request) -> bool + Send + 'static) -> Rule {
        self.when = Box::new(when);
        self
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: usize) -> Rule {
        self.times = Some(n);
        self
    }

    /// Let the first `n` matching requests through first.
    pub fn skip(mut self, n: usize) -> Rule {
        self.skip = n;
        self
    }
}

/// A request the proxy handled.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub request: Request,
    /// The request body's declared length.
    pub content_length: Option<u64>,
    /// Whether the proxy took `If-None-Match` out before passing the request on
    /// ([`Proxy::ignore_conditional_writes`]); `request` still has it, as the client sent it.
    pub if_none_match_removed: bool,
    /// The fault applied, if any (`"503 Slow Down"`, `"stall"`, ...).
    pub fault: Option<String>,
    /// The status the client got, if it got one.
    pub status: Option<u16>,
    pub started: Instant,
    pub finished: Option<Instant>,
}

#[derive(Default)]
struct HoldState {
    /// Responses currently held.
    holding: usize,
    /// Bumped by every release.
    generation: u64,
}

struct Shared {
    upstream_port: AtomicU16,
    stop: AtomicBool,
    /// [`Proxy::ignore_conditional_writes`].
    ignore_conditional_writes: AtomicBool,
    rules: Mutex<Vec<Rule>>,
    seen: Mutex<Vec<Seen>>,
    faults_applied: AtomicUsize,
    hold: Mutex<HoldState>,
    hold_changed: Condvar,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection thread must not take the whole proxy down with it.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The fault for `request`, consuming one use of the first matching rule.
    fn pick(&self, request: &Request) -> Option<Fault> {
        let mut rules = lock(&self.rules);
        let index = rules.iter().position(|rule| (rule.when)(request))?;
        let rule = &mut rules[index];
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        let fault = rule.fault.clone();
        if let Some(times) = &mut rule.times {
            *times -= 1;
            if *times == 0 {
                rules.remove(index);
            }
        }
        self.faults_applied.fetch_add(1, Ordering::SeqCst);
        Some(fault)
    }

    fn record(&self, request: &Request, fault: &Option<Fault>, if_none_match_removed: bool) -> usize {
        let mut seen = lock(&self.seen);
        seen.push(Seen {
            method: request.method.clone(),
            target: request.target.clone(),
            request: request.clone(),
            content_length: request.content_length(),
            if_none_match_removed,
            fault: fault.as_ref().map(Fault::label),
            status: None,
            started: Instant::now(),
            finished: None,
        });
        seen.len() - 1
    }

    fn finish(&self, index: usize, status: Option<u16>) {
        let mut seen = lock(&self.seen);
        let entry = &mut seen[index];
        entry.status = entry.status.or(status);
        entry.finished = Some(Instant::now());
    }

    /// Waits (holding a response) until a release, the proxy stops, or `client` goes away.
    fn hold(&self, client: &TcpStream) {
        let mut state = lock(&self.hold);
        state.holding += 1;
        let generation = state.generation;
        self.hold_changed.notify_all();
        while state.generation == generation && !self.stopped() && !peer_closed(client) {
            state = self.hold_changed.wait_timeout(state, POLL).unwrap_or_else(|p| p.into_inner()).0;
        }
        state.holding -= 1;
        self.hold_changed.notify_all();
    }
}

/// The proxy. Dropping it stops every thread it started.
pub struct Proxy {
    shared: Arc<Shared>,
    port: u16,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy on a free 127.0.0.1 port in front of `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            upstream_port: AtomicU16::new(upstream_port),
            stop: AtomicBool::new(false),
            ignore_conditional_writes: AtomicBool::new(false),
            rules: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            faults_applied: AtomicUsize::new(0),
            hold: Mutex::new(HoldState::default()),
            hold_changed: Condvar::new(),
            connections: Mutex::new(Vec::new()),
        });
        let accepting = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy-{port}-accept"))
            .spawn(move || accept_loop(listener, accepting))
            .expect("start the proxy thread");
        Proxy { shared, port, acceptor: Some(acceptor) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint URL clients should use.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Points the proxy at another upstream port (a restarted server) for new connections.
    pub fn set_upstream(&self, port: u16) {
        self.shared.upstream_port.store(port, Ordering::SeqCst);
    }

    /// With `on`, the proxy behaves as a store that accepts `If-None-Match` and ignores it: every
    /// request that carries the header reaches the server without it (and signed anew), so that a
    /// create-only write replaces an existing object. Rules still match, and [`Proxy::seen`] still
    /// shows, the request as the client sent it, header included. Applies to requests that arrive
    /// from now on.
    pub fn ignore_conditional_writes(&self, on: bool) {
        self.shared.ignore_conditional_writes.store(on, Ordering::SeqCst);
    }

    /// Adds a rule after the existing ones (the first matching rule decides).
    pub fn add(&self, rule: Rule) {
        lock(&self.shared.rules).push(rule);
    }

    /// Removes every rule: from now on everything passes through.
    pub fn clear(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Rules still active (a rule with a count goes away once used up).
    pub fn rules_left(&self) -> usize {
        lock(&self.shared.rules).len()
    }

    /// How many requests got a fault so far.
    pub fn faults_applied(&self) -> usize {
        self.shared.faults_applied.load(Ordering::SeqCst)
    }

    /// Every request handled so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.shared.seen).clone()
    }

    /// Forgets the requests seen so far.
    pub fn forget_seen(&self) {
        lock(&self.shared.seen).clear();
    }

    /// The largest number of requests satisfying `filter` that were in progress at one time.
    pub fn max_concurrent(&self, filter: impl Fn(&Seen) -> bool) -> usize {
        let seen = self.seen();
        let mut events: Vec<(Instant, i32)> = Vec::new();
        for entry in seen.iter().filter(|s| filter(s)) {
            events.push((entry.started, 1));
            events.push((entry.finished.unwrap_or_else(Instant::now), -1));
        }
        // Ends sort before starts at the same instant.
        events.sort();
        let (mut current, mut max) = (0i32, 0i32);
        for (_, delta) in events {
            current += delta;
            max = max.max(current);
        }
        max as usize
    }

    /// Waits up to `timeout` until at least `n` responses are being held; true if they are.
    pub fn wait_for_holds(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.shared.hold);
        while state.holding < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.shared.hold_changed.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Lets every held response go on.
    pub fn release(&self) {
        let mut state = lock(&self.shared.hold);
        state.generation += 1;
        self.shared.hold_changed.notify_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.release();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for connection in connections {
            let _ = connection.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                let serving = Arc::clone(&shared);
                let handle = std::thread::Builder::new()
                    .name("proxy-connection".into())
                    .spawn(move || serve(stream, &serving))
                    .expect("start a proxy connection thread");
                let mut connections = lock(&shared.connections);
                connections.retain(|c| !c.is_finished());
                connections.push(handle);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// Whether the other end of `stream` has closed (a zero-length peek without blocking).
fn peer_closed(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    let _ = stream.set_nonblocking(true);
    let closed = matches!(stream.peek(&mut byte), Ok(0));
    let _ = stream.set_nonblocking(false);
    closed
}

/// One side of a proxied connection, with what has been read from it but not consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: TcpStream) -> io::Result<Conn> {
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: Vec::new() })
    }

    /// Reads more into the buffer; false at end of stream.
    fn fill(&mut self, shared: &Shared) -> io::Result<bool> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if shared.stopped() {
                return Err(io::Error::other("proxy stopping"));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next message head, up to and including the blank line; `None` at a clean end of stream.
    fn read_head(&mut self, shared: &Shared) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..end + 4).collect()));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::other("message head too large"));
            }
            if !self.fill(shared)? {
                return if self.buf.is_empty() { Ok(None) } else { Err(eof()) };
            }
        }
    }

    fn read_line(&mut self, shared: &Shared) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.drain(..end + 2).collect());
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::other("line too long"));
            }
            if !self.fill(shared)? {
                return Err(eof());
            }
        }
    }

    /// Passes exactly `len` bytes to `sink`.
    fn copy_exact(
        &mut self,
        mut len: u64,
        shared: &Shared,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        while len > 0 {
            if self.buf.is_empty() && !self.fill(shared)? {
                return Err(eof());
            }
            let n = self.buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            sink(&self.buf[..n])?;
            self.buf.drain(..n);
            len -= n as u64;
        }
        Ok(())
    }

    /// Passes a body framed as `framing` to `sink`, framing included.
    fn copy_body(
        &mut self,
        framing: Framing,
        shared: &Shared,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        match framing {
            Framing::Empty => Ok(()),
            Framing::Length(len) => self.copy_exact(len, shared, sink),
            Framing::Chunked => loop {
                let line = self.read_line(shared)?;
                sink(&line)?;
                let text = String::from_utf8_lossy(&line);
                let size_text = text.trim().split(';').next().unwrap_or("").trim().to_owned();
                let size = u64::from_str_radix(&size_text, 16)
                    .map_err(|_| io::Error::other(format!("bad chunk size {size_text:?}")))?;
                if size == 0 {
                    // Trailers, up to the blank line.
                    loop {
                        let trailer = self.read_line(shared)?;
                        sink(&trailer)?;
                        if trailer == b"\r\n" {
                            return Ok(());
                        }
                    }
                }
                self.copy_exact(size + 2, shared, sink)?;
            },
            Framing::UntilEof => loop {
                if !self.buf.is_empty() {
                    sink(&self.buf)?;
                    self.buf.clear();
                }
                if !self.fill(shared)? {
                    return Ok(());
                }
            },
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-message")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilEof,
}

/// Header names (lower case) and values.
type Headers = Vec<(String, String)>;

/// The start line and headers of a head.
fn parse_head(head: &[u8]) -> io::Result<(Vec<String>, Headers)> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let start: Vec<String> = lines.next().unwrap_or("").splitn(3, ' ').map(str::to_owned).collect();
    if start.len() < 2 {
        return Err(io::Error::other(format!("bad start line in {text:?}")));
    }
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((start, headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn wants_close(headers: &[(String, String)]) -> bool {
    header(headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
}

fn request_framing(request: &Request) -> Framing {
    if request.is_chunked() {
        Framing::Chunked
    } else {
        request.content_length().map_or(Framing::Empty, Framing::Length)
    }
}

/// Serves one client connection until either side closes or the proxy stops.
fn serve(client: TcpStream, shared: &Shared) {
    let Ok(mut client) = Conn::new(client) else { return };
    let mut upstream: Option<Conn> = None;
    while let Ok(Some(head)) = client.read_head(shared) {
        let Ok((start, headers)) = parse_head(&head) else { break };
        let request = Request { method: start[0].clone(), target: start[1].clone(), headers };
        // Before the rules: a fault then applies to the request as this store would receive it.
        let stripped = if shared.ignore_conditional_writes.load(Ordering::SeqCst) {
            without_if_none_match(&head, &request)
        } else {
            None
        };
        let fault = shared.pick(&request);
        let index = shared.record(&request, &fault, stripped.is_some());
        let forwarded = stripped.as_deref().unwrap_or(&head);
        let next = handle(&mut client, &mut upstream, forwarded, &request, fault, shared, index);
        shared.finish(index, None);
        match next {
            Next::KeepAlive if !shared.stopped() => {}
            Next::Reset => {
                reset(&client.stream);
                return;
            }
            _ => break,
        }
    }
    let _ = client.stream.shutdown(Shutdown::Both);
    if let Some(upstream) = upstream {
        let _ = upstream.stream.shutdown(Shutdown::Both);
    }
}

/// `head` without its `If-None-Match` lines and with a new `Authorization` value to match; `None`
/// when `request` has no such header. Every other byte stays as the client sent it.
fn without_if_none_match(head: &[u8], request: &Request) -> Option<Vec<u8>> {
    let is_condition = |name: &str| name == "if-none-match";
    let (removed, kept): (Headers, Headers) = request.headers.iter().cloned().partition(|(n, _)| is_condition(n));
    if removed.is_empty() {
        return None;
    }
    let authorization = crate::resign::authorization(&request.method, &request.target, &kept, &removed)
        .inspect_err(|e| {
            // The server gets the client's old signature and refuses the request (403), as a store
            // would: the message says why the proxy could not sign it anew.
            eprintln!("test proxy: {} {} not signed anew: {e}", request.method, request.target);
        })
        .ok();
    let mut out = Vec::with_capacity(head.len());
    for line in head.split_inclusive(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let name = text.split_once(':').map(|(n, _)| n.trim().to_ascii_lowercase());
        match (name.as_deref(), &authorization) {
            (Some(name), _) if is_condition(name) => {}
            (Some("authorization"), Some(value)) => {
                // The name and separator as sent, then the new value.
                let colon = line.iter().position(|&b| b == b':').expect("a header line");
                let start = colon + 1 + line[colon + 1..].iter().take_while(|&&b| b == b' ' || b == b'\t').count();
                out.extend_from_slice(&line[..start]);
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            _ => out.extend_from_slice(line),
        }
    }
    Some(out)
}

/// What becomes of a client connection after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    Reset,
}

/// Closes `stream` with an RST rather than a FIN (SO_LINGER with a zero timeout).
fn reset(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Handles one request.
fn handle(
    client: &mut Conn,
    upstream: &mut Option<Conn>,
    head: &[u8],
    request: &Request,
    fault: Option<Fault>,
    shared: &Shared,
    index: usize,
) -> Next {
    let framing = request_framing(request);
    let (cut_after, hold_after) = match fault {
        Some(Fault::Respond(response)) => {
            if client.copy_body(framing, shared, &mut |_| Ok(())).is_err() {
                return Next::Close;
            }
            let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, response.reason);
            for (name, value) in &response.headers {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
            out.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", response.body.len()));
            if request.method != "HEAD" {
                out.push_str(&response.body);
            }
            let _ = client.write(out.as_bytes());
            shared.finish(index, Some(response.status));
            return Next::Close;
        }
        Some(Fault::Stall) => {
            let _ = client.copy_body(framing, shared, &mut |_| Ok(()));
            // Never answer; stop when the client hangs up or the proxy stops.
            while !shared.stopped() {
                match client.fill(shared) {
                    Ok(true) => client.buf.clear(),
                    _ => break,
                }
            }
            return Next::Close;
        }
        Some(Fault::Close) => {
            let _ = client.copy_body(framing, shared, &mut |_| Ok(()));
            return Next::Close;
        }
        Some(Fault::Reset) => {
            let _ = client.copy_body(framing, shared, &mut |_| Ok(()));
            return Next::Reset;
        }
        Some(Fault::Delay(pause)) => return forward_buffered(client, upstream, head, request, 0, pause, shared, index),
        Some(Fault::SlowBody { after, pause }) => {
            return forward_buffered(client, upstream, head, request, after, pause, shared, index);
        }
        Some(Fault::CutResponse { after }) => (Some(after), None),
        Some(Fault::HoldResponse { after }) => (None, Some(after)),
        None => (None, None),
    };

    pass_through(client, upstream, head, request, Body::Stream(framing), cut_after, hold_after, shared, index)
}

/// Where the body of a passed-on request comes from.
enum Body {
    /// Copied from the client as it arrives.
    Stream(Framing),
    /// Already read: sent as `first`, then after `pause`, `rest`.
    Buffered { first: Vec<u8>, pause: Duration, rest: Vec<u8> },
}

/// Reads the request body, then passes the request on with a pause after `after` body bytes.
#[allow(clippy::too_many_arguments)]
fn forward_buffered(
    client: &mut Conn,
    upstream: &mut Option<Conn>,
    head: &[u8],
    request: &Request,
    after: usize,
    pause: Duration,
    shared: &Shared,
    index: usize,
) -> Next {
    let mut body = Vec::new();
    if client
        .copy_body(request_framing(request), shared, &mut |bytes| {
            body.extend_from_slice(bytes);
            Ok(())
        })
        .is_err()
    {
        return Next::Close;
    }
    let rest = body.split_off(after.min(body.len()));
    pass_through(
        client,
        upstream,
        head,
        request,
        Body::Buffered { first: body, pause, rest },
        None,
        None,
        shared,
        index,
    )
}

fn sleep_unless_stopped(pause: Duration, shared: &Shared) {
    let until = Instant::now() + pause;
    while Instant::now() < until && !shared.stopped() {
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
}

/// Passes a request on to the server and its response back, cutting or holding the response as asked.
#[allow(clippy::too_many_arguments)]
fn pass_through(
    client: &mut Conn,
    upstream: &mut Option<Conn>,
    head: &[u8],
    request: &Request,
    body: Body,
    cut_after: Option<usize>,
    hold_after: Option<usize>,
    shared: &Shared,
    index: usize,
) -> Next {
    if upstream.is_none() {
        let port = shared.upstream_port.load(Ordering::SeqCst);
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        match TcpStream::connect_timeout(&address, Duration::from_secs(2)).and_then(Conn::new) {
            Ok(conn) => *upstream = Some(conn),
            // The server is down: the client sees its connection closed, as with a dead server.
            Err(_) => {
                if let Body::Stream(framing) = body {
                    let _ = client.copy_body(framing, shared, &mut |_| Ok(()));
                }
                return Next::Close;
            }
        }
    }
    let server = upstream.as_mut().expect("connected above");
    if server.write(head).is_err() {
        return Next::Close;
    }
    // A server may answer before it has read the whole body (s3s-fs does, for a 412) and close: then
    // the rest of the body goes nowhere, and its answer still reaches the client.
    let mut server_gone = false;
    match body {
        Body::Stream(framing) => {
            let stream = &mut server.stream;
            let mut to_server = |bytes: &[u8]| {
                server_gone = server_gone || stream.write_all(bytes).is_err();
                Ok(())
            };
            if client.copy_body(framing, shared, &mut to_server).is_err() {
                return Next::Close;
            }
        }
        Body::Buffered { first, pause, rest } => {
            server_gone = server.write(&first).is_err();
            sleep_unless_stopped(pause, shared);
            server_gone = server_gone || server.write(&rest).is_err();
        }
    }

    // The response, after any interim 1xx responses.
    let mut forwarded = 0usize;
    let mut held = false;
    let client_stream = client.stream.try_clone();
    let Ok(client_stream) = client_stream else { return Next::Close };
    let mut to_client = |bytes: &[u8]| -> io::Result<()> {
        let mut bytes = bytes;
        if let Some(limit) = cut_after {
            let room = limit.saturating_sub(forwarded);
            if bytes.len() >= room {
                (&client_stream).write_all(&bytes[..room])?;
                return Err(io::Error::other("response cut by the test proxy"));
            }
        }
        if let Some(limit) = hold_after
            && !held
            && forwarded + bytes.len() >= limit
        {
            let room = limit - forwarded.min(limit);
            (&client_stream).write_all(&bytes[..room])?;
            forwarded += room;
            bytes = &bytes[room..];
            held = true;
            shared.hold(&client_stream);
        }
        (&client_stream).write_all(bytes)?;
        forwarded += bytes.len();
        Ok(())
    };
    loop {
        let head = match server.read_head(shared) {
            Ok(Some(head)) => head,
            _ => return Next::Close,
        };
        let Ok((start, headers)) = parse_head(&head) else { return Next::Close };
        let status: u16 = start[1].parse().unwrap_or(0);
        let head = if server_gone && !wants_close(&headers) {
            // This connection ends after the response: say so, so that the client does not reuse it.
            let mut head = head;
            head.truncate(head.len() - 2);
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            head
        } else {
            head
        };
        if to_client(&head).is_err() {
            return Next::Close;
        }
        if (100..200).contains(&status) {
            continue;
        }
        shared.finish(index, Some(status));
        let framing = if request.method == "HEAD" || status == 204 || status == 304 {
            Framing::Empty
        } else if header(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            Framing::Chunked
        } else if let Some(len) = header(&headers, "content-length").and_then(|v| v.parse().ok()) {
            Framing::Length(len)
        } else {
            Framing::UntilEof
        };
        if server.copy_body(framing, shared, &mut to_client).is_err() {
            return Next::Close;
        }
        let close = server_gone
            || wants_close(&headers)
            || wants_close(&request.headers)
            || matches!(framing, Framing::UntilEof);
        return if close { Next::Close } else { Next::KeepAlive };
    }
}
