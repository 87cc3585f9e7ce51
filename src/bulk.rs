//! Unspool's bulk path: a lean connection for replies of thousands of bulk strings each, its
//! pool, and the one entry point, [`BulkPath::read_or`], that falls back to the regular
//! connection.
//!
//! redis-rs parses every bulk string of a reply into a `Vec` of its own and reads the socket
//! 8 KB at a time; at 10,000 messages that is most of an unspool's client time (see
//! `bench/README.md`). This connection sends the same pipelined `ZRANGEBYSCORE`s over RESP2,
//! reads the replies into one buffer with large reads, and hands out slices of it.
//!
//! It serves one server only (not a Cluster, nor a Sentinel group, whose master moves), and
//! only ever runs read-only commands, so whenever it meets anything unusual (an error reply, a
//! dropped connection, a TLS URL) the request runs again on the regular connection, which
//! reports errors and reconnects the way every other call does.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, Pipeline, RedisResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::connection::{locked, Flavor, Settings};
use crate::process_local::ProcessLocal;

/// The free space offered to reads: from this, doubling as a reply grows, up to `MAX_READ`.
/// Redis writes up to 64 KB to a client per turn of its event loop; larger reads mean fewer
/// system calls.
const FIRST_READ: usize = 16 * 1024;
const MAX_READ: usize = 1024 * 1024;

/// Redis's own cap on a bulk string (`proto-max-bulk-len`'s default).
const MAX_BULK: usize = 512 * 1024 * 1024;

/// Arrays of bulk strings, as slices of the one buffer they were read into.
pub struct Replies {
    buffer: Vec<u8>,
    spans: Vec<Range<usize>>,
    /// Where each array's spans end in `spans`.
    ends: Vec<usize>,
}

impl Replies {
    /// The same shape from replies the regular connection parsed.
    pub fn from_arrays(arrays: Vec<Vec<Vec<u8>>>) -> Replies {
        let mut replies = Replies {
            buffer: Vec::new(),
            spans: Vec::new(),
            ends: Vec::with_capacity(arrays.len()),
        };
        for array in arrays {
            for item in array {
                let start = replies.buffer.len();
                replies.buffer.extend_from_slice(&item);
                replies.spans.push(start..replies.buffer.len());
            }
            replies.ends.push(replies.spans.len());
        }
        replies
    }

    /// Each array's bulk strings, in order.
    pub fn arrays(&self) -> impl Iterator<Item = impl ExactSizeIterator<Item = &[u8]>> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(move |(start, &end)| {
            self.spans[start..end]
                .iter()
                .map(move |span| &self.buffer[span.clone()])
        })
    }
}

/// Why a request did not come back on this connection.
enum Miss {
    /// Redis refused something (an error reply, a handshake it did not take) or the reply had
    /// an unexpected shape: run it on the regular connection, and leave this path alone a while.
    Refused,
    /// The connection was dead before any reply came (Redis restarted, an idle connection was
    /// closed), or it cannot be made here (TLS, a refused connect): run it on the regular one.
    Unusable,
    /// Failed past the point where running it again would keep within the timeouts: the
    /// caller's error, as on the regular connection.
    Failed(io::Error),
}

/// `what` took longer than its timeout.
fn timed_out(what: &str) -> Miss {
    Miss::Failed(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

/// Bulk connections open at once per log and flavor; past that, unspools share the regular
/// connection, so sockets stay few however many calls run at once.
const OPEN_MAX: usize = 4;
/// An idle bulk connection older than this is closed rather than trusted: a NAT or firewall
/// may have dropped it without a word.
const IDLE_MAX: Duration = Duration::from_secs(30);
/// How long unspools leave the bulk path alone after Redis refused it.
const REST: Duration = Duration::from_secs(10);

/// The bulk path of one log on one server: its connections in this process, per runtime
/// flavor (a connection's socket belongs to the runtime it was made on).
pub struct BulkPath {
    server: ConnectionInfo,
    connect_timeout: Duration,
    response_timeout: Duration,
    pools: ProcessLocal<Pools>,
}

#[derive(Default)]
struct Pools {
    calling: Pool,
    background: Pool,
}

impl BulkPath {
    pub fn new(server: ConnectionInfo, settings: &Settings) -> BulkPath {
        BulkPath {
            server,
            connect_timeout: settings.connect_timeout,
            response_timeout: settings.response_timeout,
            pools: ProcessLocal::new(),
        }
    }

    fn pool(&self, flavor: Flavor) -> &Pool {
        let pools = self.pools.get(Pools::default);
        match flavor {
            Flavor::Calling => &pools.calling,
            Flavor::Background => &pools.background,
        }
    }

    /// The replies to `pipe`, a pipeline of `arrays` reads, from a bulk connection; when the
    /// path cannot serve it (resting, all connections busy, Redis refused it, a dead socket),
    /// from `regular`, the same read on the log's regular connection, run only then.
    pub async fn read_or(
        &self,
        flavor: Flavor,
        pipe: &Pipeline,
        arrays: usize,
        regular: impl Future<Output = RedisResult<Replies>>,
    ) -> RedisResult<Replies> {
        match self.read(flavor, &pipe.get_packed_pipeline(), arrays).await {
            Ok(replies) => Ok(replies),
            Err(Miss::Failed(error)) => Err(error.into()),
            Err(Miss::Refused | Miss::Unusable) => regular.await,
        }
    }

    async fn read(&self, flavor: Flavor, request: &[u8], arrays: usize) -> Result<Replies, Miss> {
        let pool = self.pool(flavor);
        let Some((lease, idle)) = pool.take() else {
            return Err(Miss::Unusable);
        };
        let outcome = async {
            let mut connection = match idle {
                Some(connection) => connection,
                None => BulkConnection::open(&self.server, self.connect_timeout).await?,
            };
            let exchange = connection.exchange(request, 0, arrays);
            match tokio::time::timeout(self.response_timeout, exchange).await {
                // The connection is dropped: a late reply must not answer the next request.
                Err(_) => Err(timed_out("the reply")),
                Ok(replies) => replies.map(|replies| (connection, replies)),
            }
        }
        .await;
        match outcome {
            Ok((connection, replies)) => {
                lease.keep(connection);
                Ok(replies)
            }
            Err(miss) => {
                drop(lease);
                pool.lost(matches!(miss, Miss::Refused));
                Err(miss)
            }
        }
    }

    /// Closes this process's idle bulk connections; those in use close when their read ends.
    pub fn close(&self) {
        for flavor in [Flavor::Calling, Flavor::Background] {
            let idle = locked(&self.pool(flavor).0).drain();
            drop(idle);
        }
    }
}

/// The bulk connections of one log, runtime flavor and process.
#[derive(Default)]
struct Pool(Mutex<PoolState>);

#[derive(Default)]
struct PoolState {
    /// Open ones, idle or in use: at most `OPEN_MAX`.
    open: usize,
    /// The idle ones, each with when it last answered.
    idle: Vec<(Instant, BulkConnection)>,
    /// After Redis refused this path (a login, a command), unspools use the regular
    /// connection until then.
    resting_until: Option<Instant>,
}

impl PoolState {
    /// Removes the idle connections (they count as closed), to drop once the lock is released.
    fn drain(&mut self) -> Vec<(Instant, BulkConnection)> {
        let idle = std::mem::take(&mut self.idle);
        self.open -= idle.len();
        idle
    }
}

impl Pool {
    /// A connection to use: an idle one, or leave to open one (`None` inside). `None` while
    /// the path rests or `OPEN_MAX` are in use: the regular connection serves then.
    fn take(&self) -> Option<(Lease<'_>, Option<BulkConnection>)> {
        let mut expired = Vec::new();
        let mut state = locked(&self.0);
        let now = Instant::now();
        if state.resting_until.is_some_and(|until| now < until) {
            return None;
        }
        while let Some((answered, connection)) = state.idle.pop() {
            if now.duration_since(answered) <= IDLE_MAX {
                return Some((Lease { pool: self }, Some(connection)));
            }
            state.open -= 1;
            expired.push(connection);
        }
        if state.open >= OPEN_MAX {
            return None;
        }
        state.open += 1;
        Some((Lease { pool: self }, None))
    }

    /// After a connection failed: `refused` rests the path (Redis said no, and would again),
    /// else the idle ones are closed too (they most likely died with it).
    fn lost(&self, refused: bool) {
        let idle = {
            let mut state = locked(&self.0);
            if refused {
                state.resting_until = Some(Instant::now() + REST);
                Vec::new()
            } else {
                state.drain()
            }
        };
        drop(idle);
    }
}

/// One open connection counted in its pool; dropping the lease (a failed or abandoned read)
/// uncounts it.
struct Lease<'a> {
    pool: &'a Pool,
}

impl Lease<'_> {
    /// Keeps a connection that answered well for the next read; it stays counted as open.
    fn keep(self, connection: BulkConnection) {
        locked(&self.pool.0).idle.push((Instant::now(), connection));
        std::mem::forget(self);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        locked(&self.pool.0).open -= 1;
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

struct BulkConnection {
    stream: Stream,
}

impl BulkConnection {
    /// Connects and logs in as the URL says, all within `timeout`; TLS URLs are left to the
    /// regular connection.
    async fn open(info: &ConnectionInfo, timeout: Duration) -> Result<BulkConnection, Miss> {
        match tokio::time::timeout(timeout, BulkConnection::connect(info)).await {
            Err(_) => Err(timed_out("connecting to Redis")),
            Ok(outcome) => outcome,
        }
    }

    async fn connect(info: &ConnectionInfo) -> Result<BulkConnection, Miss> {
        let connected = match info.addr() {
            ConnectionAddr::Tcp(host, port) => TcpStream::connect((host.as_str(), *port))
                .await
                .and_then(|stream| stream.set_nodelay(true).map(|()| Stream::Tcp(stream))),
            ConnectionAddr::Unix(path) => UnixStream::connect(path).await.map(Stream::Unix),
            _ => return Err(Miss::Unusable),
        };
        let stream = match connected {
            Ok(stream) => stream,
            // Quick to tell, and the regular connection reports it as every call does.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(Miss::Unusable)
            }
            Err(error) => return Err(Miss::Failed(error)),
        };
        let mut connection = BulkConnection { stream };
        let settings = info.redis_settings();
        let mut handshake = Vec::new();
        let mut answers = 0;
        if let Some(password) = settings.password() {
            // Named user always, as redis-rs's HELLO does: a bare AUTH fails where the default
            // user has no password.
            let user = settings.username().unwrap_or("default");
            pack(
                &mut handshake,
                &[b"AUTH", user.as_bytes(), password.as_bytes()],
            );
            answers += 1;
        }
        if settings.db() != 0 {
            let db = settings.db().to_string();
            pack(&mut handshake, &[b"SELECT", db.as_bytes()]);
            answers += 1;
        }
        if answers > 0 {
            connection.exchange(&handshake, answers, 0).await?;
        }
        Ok(connection)
    }

    /// Sends `request` and reads `simple` status replies, then `arrays` arrays of bulk strings.
    async fn exchange(
        &mut self,
        request: &[u8],
        simple: usize,
        arrays: usize,
    ) -> Result<Replies, Miss> {
        let written = match &mut self.stream {
            Stream::Tcp(stream) => stream.write_all(request).await,
            Stream::Unix(stream) => stream.write_all(request).await,
        };
        written.map_err(|_| Miss::Unusable)?;
        let mut parser = Parser::new(simple, arrays);
        let mut buffer = Vec::with_capacity(FIRST_READ);
        loop {
            if buffer.capacity() - buffer.len() < FIRST_READ {
                buffer.reserve(buffer.len().clamp(FIRST_READ, MAX_READ));
            }
            let read = match &mut self.stream {
                Stream::Tcp(stream) => stream.read_buf(&mut buffer).await,
                Stream::Unix(stream) => stream.read_buf(&mut buffer).await,
            };
            match read {
                Ok(0) | Err(_) if buffer.is_empty() => return Err(Miss::Unusable),
                Ok(0) => return Err(Miss::Failed(io::ErrorKind::UnexpectedEof.into())),
                Err(error) => return Err(Miss::Failed(error)),
                Ok(_) => {}
            }
            if parser.parse(&buffer)? {
                break;
            }
        }
        // Bytes past the replies asked for would desynchronise the next request.
        if parser.position != buffer.len() {
            return Err(Miss::Refused);
        }
        Ok(Replies {
            buffer,
            spans: parser.spans,
            ends: parser.ends,
        })
    }
}

/// Appends one command in RESP.
fn pack(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
}

/// Walks replies as they arrive, resuming where the last read ended.
struct Parser {
    position: usize,
    simple_left: usize,
    arrays: usize,
    /// Bulk strings still due in the array being read, if one is.
    in_array: Option<usize>,
    spans: Vec<Range<usize>>,
    ends: Vec<usize>,
}

impl Parser {
    fn new(simple: usize, arrays: usize) -> Parser {
        Parser {
            position: 0,
            simple_left: simple,
            arrays,
            in_array: None,
            spans: Vec::new(),
            ends: Vec::with_capacity(arrays),
        }
    }

    /// Whether every reply is complete in `buffer`; anything but the expected shape misses.
    fn parse(&mut self, buffer: &[u8]) -> Result<bool, Miss> {
        loop {
            if self.in_array == Some(0) {
                self.in_array = None;
                self.ends.push(self.spans.len());
            }
            if self.in_array.is_none() && self.simple_left == 0 && self.ends.len() == self.arrays {
                return Ok(true);
            }
            let Some((kind, value, after)) = line(buffer, self.position)? else {
                return Ok(false);
            };
            match (kind, self.in_array) {
                (b'+', None) if self.simple_left > 0 => self.simple_left -= 1,
                (b'*', None) if self.simple_left == 0 => {
                    let count = length(value)?;
                    // Bounded: the count is Redis's word, not yet the data.
                    self.spans.reserve(count.min(1 << 16));
                    self.in_array = Some(count);
                }
                (b'$', Some(due)) => {
                    let size = length(value)?;
                    if size > MAX_BULK {
                        return Err(Miss::Refused);
                    }
                    let end = after + size;
                    if buffer.len() < end + 2 {
                        return Ok(false);
                    }
                    if &buffer[end..end + 2] != b"\r\n" {
                        return Err(Miss::Refused);
                    }
                    self.spans.push(after..end);
                    self.in_array = Some(due - 1);
                    self.position = end + 2;
                    continue;
                }
                // An error reply, a nil, or anything else unexpected.
                _ => return Err(Miss::Refused),
            }
            self.position = after;
        }
    }
}

/// The RESP line at `start`, if it is all there: its type byte, its text, and where the next
/// line begins. An empty line is no RESP.
#[allow(clippy::type_complexity)]
fn line(buffer: &[u8], start: usize) -> Result<Option<(u8, &[u8], usize)>, Miss> {
    let rest = &buffer[start..];
    let Some(end) = rest.windows(2).position(|pair| pair == b"\r\n") else {
        return Ok(None);
    };
    let (&kind, value) = rest[..end].split_first().ok_or(Miss::Refused)?;
    Ok(Some((kind, value, start + end + 2)))
}

/// A non-negative length or count; a nil (-1) is not expected here.
fn length(text: &[u8]) -> Result<usize, Miss> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or(Miss::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(simple: usize, arrays: usize, input: &[u8]) -> Result<Option<Vec<Vec<Vec<u8>>>>, ()> {
        let mut parser = Parser::new(simple, arrays);
        match parser.parse(input) {
            Err(_) => Err(()),
            Ok(false) => Ok(None),
            Ok(true) => {
                let replies = Replies {
                    buffer: input.to_vec(),
                    spans: parser.spans,
                    ends: parser.ends,
                };
                Ok(Some(
                    replies
                        .arrays()
                        .map(|array| array.map(<[u8]>::to_vec).collect())
                        .collect(),
                ))
            }
        }
    }

    #[test]
    fn arrays_of_bulk_strings_after_status_replies() {
        let input = b"+OK\r\n*2\r\n$3\r\nabc\r\n$0\r\n\r\n*0\r\n*1\r\n$4\r\na\r\nb\r\n";
        let expected = vec![
            vec![b"abc".to_vec(), b"".to_vec()],
            vec![],
            vec![b"a\r\nb".to_vec()],
        ];
        assert_eq!(parsed(1, 3, input), Ok(Some(expected)));
    }

    #[test]
    fn every_prefix_is_incomplete_and_resumes() {
        let input = b"*2\r\n$5\r\nhello\r\n$5\r\nworld\r\n";
        let mut parser = Parser::new(0, 1);
        for cut in 0..input.len() {
            assert!(
                matches!(parser.parse(&input[..cut]), Ok(false)),
                "cut at {cut}"
            );
        }
        assert!(matches!(parser.parse(input), Ok(true)));
        assert_eq!(parser.spans, vec![8..13, 19..24]);
    }

    #[test]
    fn errors_nils_and_other_shapes_fall_back() {
        for input in [
            &b"-NOPERM no\r\n"[..],
            b"*1\r\n$18446744073709551614\r\n",
            b"*1\r\n$536870913\r\n",
            b"\r\n",
            b"*1\r\n\r\n",
            b"*-1\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n:5\r\n",
            b"*1\r\n$3\r\nabcd\r\n",
            b"+OK\r\n",
        ] {
            assert_eq!(parsed(0, 1, input), Err(()), "{input:?}");
        }
        assert_eq!(parsed(1, 0, b"-WRONGPASS\r\n"), Err(()));
    }

    #[test]
    fn from_arrays_keeps_the_shape() {
        let arrays = vec![
            vec![b"x".to_vec(), b"yz".to_vec()],
            vec![],
            vec![b"".to_vec()],
        ];
        let replies = Replies::from_arrays(arrays.clone());
        let back: Vec<Vec<Vec<u8>>> = replies
            .arrays()
            .map(|array| array.map(<[u8]>::to_vec).collect())
            .collect();
        assert_eq!(back, arrays);
    }
}
