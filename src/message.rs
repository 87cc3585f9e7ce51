//! The stored message format, defined here once.
//!
//! A message is one JSON object, stored as the member of its log's sorted set (scored by its
//! timestamp) and published, byte for byte the same:
//!
//! ```text
//! {"event_name":<str>,"content":<any JSON>,"prev":<P>,"timestamp":<T>}
//! └──────────── head: `head` ────────────┘└─ tail: lua/broadcast.lua ─┘
//! ```
//!
//! - The head is made here, when a broadcast is serialized, before anything is sent.
//! - The tail is added by `lua/broadcast.lua` in the atomic step that stores and publishes the
//!   message: `T` is the Redis clock in ms, strictly above `P`, the channel's timestamp before
//!   it (after a failover, the break that script issues). The first message of a history (the bookkeeping, defined in that script, is new or
//!   lost) has nothing to chain to, and its tail is `,"timestamp":<T>}`.
//! - The tail is read back from the message's last bytes, without parsing the rest: by
//!   `timestamp` and `prev` here (a subscription orders live messages with them), and by
//!   `lua/replay.lua`, whose pattern `,"prev":(%d+),"timestamp":%d+}$` is `prev`'s rule in Lua.
//!   A `"prev"` or `"timestamp"` inside the content is never the message's own.
//! - The article's code stores `{"event_name": .., "content": .., "timestamp": T}` (with
//!   `json.dumps`' spaces): `timestamp` reads it too; it has no `prev`.
//!
//! `bench/impls.py` builds the same head in Python for its peer implementation.

use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::json::Encoder;

/// The head of a message: `{"event_name":<event_name>,"content":<content>`, the content
/// serialized with `default` for what JSON has no type for.
pub fn head(
    event_name: &Bound<'_, PyString>,
    content: &Bound<'_, PyAny>,
    default: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<u8>> {
    let mut encoder = Encoder::new(default, Vec::with_capacity(256));
    encoder.out.extend_from_slice(b"{\"event_name\":");
    encoder.write(event_name.as_any())?;
    encoder.out.extend_from_slice(b",\"content\":");
    encoder.write(content)?;
    Ok(encoder.out)
}

/// The timestamp that ends a stored message: `,"timestamp":T}` (ours) or `"timestamp": T}`
/// (the article's). Anything else, such as a foreign payload on the channel, has none.
pub fn timestamp(message: &[u8]) -> Option<i64> {
    let (before, timestamp) = trailing_digits(message.strip_suffix(b"}")?)?;
    let before = before.strip_suffix(b" ").unwrap_or(before);
    if !message.starts_with(b"{") || !before.ends_with(b"\"timestamp\":") {
        return None;
    }
    Some(timestamp)
}

/// The `prev` of a message replaylog stored, from its exact tail `,"prev":P,"timestamp":T}`;
/// None on the first of a history and on others' messages.
pub fn prev(message: &[u8]) -> Option<i64> {
    timestamp(message)?;
    let (before, _) = trailing_digits(message.strip_suffix(b"}")?)?;
    let (before, prev) = trailing_digits(before.strip_suffix(b",\"timestamp\":")?)?;
    before.ends_with(b",\"prev\":").then_some(prev)
}

/// Splits the decimal number that ends `bytes` off it.
fn trailing_digits(bytes: &[u8]) -> Option<(&[u8], i64)> {
    let start = bytes
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let number = std::str::from_utf8(&bytes[start..]).ok()?.parse().ok()?;
    Some((&bytes[..start], number))
}

#[cfg(test)]
mod tests {
    use super::{prev, timestamp};

    #[test]
    fn timestamp_of_compact_and_article_json() {
        let ours =
            br#"{"event_name":"e","content":{"timestamp":1},"prev":17,"timestamp":1700000000123}"#;
        assert_eq!(timestamp(ours), Some(1_700_000_000_123));
        assert_eq!(prev(ours), Some(17));
        let article = br#"{"event_name": "e", "content": 5, "timestamp": 1700000000456}"#;
        assert_eq!(timestamp(article), Some(1_700_000_000_456));
        assert_eq!(prev(article), None);
        assert_eq!(timestamp(b"not json"), None);
        // A "prev" inside the content is not the message's own.
        let first = br#"{"event_name":"e","content":{"prev":5},"timestamp":9}"#;
        assert_eq!(prev(first), None);
        // Neither is a payload that only looks like a message.
        let array = br#"[{"prev":1,"timestamp":2}]"#;
        assert_eq!(timestamp(array), None);
        assert_eq!(prev(array), None);
    }

    /// What `lua/broadcast.lua` stores, on a real redis-server, reads back with `timestamp`
    /// and `prev`, and `lua/replay.lua` finds the same `prev` (a replay from it is complete).
    #[test]
    fn the_scripts_tail_parses_here_and_in_replay_lua() {
        let server = RedisServer::start();
        let mut redis = server.connection();
        let broadcast = redis::Script::new(include_str!("lua/broadcast.lua"));
        let replay = redis::Script::new(include_str!("lua/replay.lua"));
        // A content with a tail of its own inside: only the message's tail counts.
        let head = br#"{"event_name":"e","content":{"prev":1,"timestamp":2}"#;
        let mut timestamps = Vec::new();
        for _ in 0..2 {
            let stored: i64 = broadcast
                .key("log")
                .key("meta")
                .key("mark")
                .arg("channel")
                .arg(&head[..])
                .arg(60_000)
                .arg(0)
                .arg(60_000)
                .arg(0)
                .invoke(&mut redis)
                .expect("the broadcast script runs");
            timestamps.push(stored);
        }
        let messages: Vec<Vec<u8>> = redis::cmd("ZRANGE")
            .arg("log")
            .arg(0)
            .arg(-1)
            .query(&mut redis)
            .expect("the log reads");
        assert_eq!(messages.len(), 2);
        for (message, stored) in messages.iter().zip(&timestamps) {
            assert!(message.starts_with(head), "{message:?}");
            assert_eq!(timestamp(message), Some(*stored));
        }
        // The first message of a history has no `prev`; the next one links to it.
        assert_eq!(prev(&messages[0]), None);
        assert_eq!(prev(&messages[1]), Some(timestamps[0]));
        let (complete, replayed, _, _, _): (i64, Vec<Vec<u8>>, String, Option<i64>, i64) = replay
            .key("log")
            .key("meta")
            .key("mark")
            .arg(format!("({}", timestamps[0]))
            .arg(timestamps[0])
            .arg(-1)
            .arg("")
            .invoke(&mut redis)
            .expect("the replay script runs");
        assert_eq!((complete, replayed), (1, vec![messages[1].clone()]));
    }

    /// A redis-server of this test's own on a Unix socket, stopped when dropped.
    struct RedisServer {
        process: std::process::Child,
        directory: std::path::PathBuf,
    }

    impl RedisServer {
        fn start() -> RedisServer {
            let directory =
                std::env::temp_dir().join(format!("replaylog-message-test-{}", std::process::id()));
            std::fs::create_dir_all(&directory).expect("a temporary directory");
            let process = std::process::Command::new("redis-server")
                .args(["--port", "0", "--save", "", "--appendonly", "no", "--dir"])
                .arg(&directory)
                .arg("--unixsocket")
                .arg(directory.join("redis.sock"))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is installed (scripts/setup)");
            RedisServer { process, directory }
        }

        fn connection(&self) -> redis::Connection {
            let url = format!(
                "redis+unix://{}",
                self.directory.join("redis.sock").display()
            );
            let client = redis::Client::open(url).expect("a socket URL");
            for _ in 0..200 {
                if let Ok(connection) = client.get_connection() {
                    return connection;
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            panic!("redis-server did not start");
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            let _ = self.process.kill();
            let _ = self.process.wait();
            let _ = std::fs::remove_dir_all(&self.directory);
        }
    }
}
