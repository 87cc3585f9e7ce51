//! The Redis operations: broadcast, unspool and prune, on the article's key layout.

use std::future::Future;

use redis::aio::ConnectionManager;
use redis::{Cmd, Pipeline, RedisError, RedisResult, Script, Value};

use crate::connection::{runtime, Connection};
use crate::errors::Failure;

const BROADCAST_LUA: &str = include_str!("lua/broadcast.lua");

/// Keys SCAN looks at per step: enough to amortize the round trip, few enough that
/// no step holds Redis for more than a fraction of a millisecond.
const SCAN_COUNT: usize = 1000;

/// One message, serialized and ready to send.
pub struct Outgoing {
    pub log_key: Vec<u8>,
    pub channel_key: Vec<u8>,
    /// The message JSON up to its timestamp: `{"event_name":..,"content":..,"timestamp":`.
    pub head: Vec<u8>,
}

/// The lower bound of an unspool: entries scored strictly above it.
pub enum Since {
    Int(i64),
    Float(f64),
}

impl Since {
    fn exclusive_min(&self) -> String {
        match self {
            Since::Int(value) => format!("({value}"),
            Since::Float(value) if value.is_infinite() => {
                if *value > 0.0 { "(+inf" } else { "-inf" }.to_owned()
            }
            Since::Float(value) => format!("({value}"),
        }
    }
}

pub struct Store {
    connection: Connection,
    pub channel_prefix: String,
    pub log_prefix: String,
    broadcast_script: Script,
    /// Where the log lives, password masked, for error messages.
    label: String,
    secret: Option<String>,
}

impl Store {
    pub fn new(
        connection: Connection,
        label: String,
        channel_prefix: String,
        log_prefix: String,
    ) -> Store {
        let secret = connection.settings().password();
        Store {
            connection,
            channel_prefix,
            log_prefix,
            broadcast_script: Script::new(BROADCAST_LUA),
            label,
            secret,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn close(&self) {
        self.connection.close();
    }

    pub fn log_key(&self, channel: &str) -> Vec<u8> {
        [self.log_prefix.as_bytes(), channel.as_bytes()].concat()
    }

    pub fn channel_key(&self, channel: &str) -> Vec<u8> {
        [self.channel_prefix.as_bytes(), channel.as_bytes()].concat()
    }

    /// Runs one operation to completion on this process's runtime, bounded in time.
    /// Call it with the GIL released.
    pub fn run<T, F, Fut>(&self, what: &str, operation: F) -> Result<T, Failure>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let context = format!("{what} on {}", self.label);
        let manager = self
            .connection
            .manager()
            .map_err(|e| Failure::from_redis(&e, &context, self.secret.as_deref()))?;
        let settings = self.connection.settings();
        let limit = settings.connect_timeout + settings.response_timeout;
        let future = operation(manager);
        runtime().block_on(async {
            match tokio::time::timeout(limit, future).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(Failure::from_redis(&e, &context, self.secret.as_deref())),
                Err(_) => Err(Failure::Timeout(format!(
                    "{context}: no answer within {:.3}s",
                    limit.as_secs_f64()
                ))),
            }
        })
    }

    /// Publishes and stores each message in one atomic script run, all in one round trip.
    /// Returns the timestamps, in order.
    pub async fn broadcast(
        &self,
        mut manager: ConnectionManager,
        messages: &[Outgoing],
    ) -> RedisResult<Vec<i64>> {
        let mut timestamps: Vec<Option<i64>> = vec![None; messages.len()];
        // A script cache flushed under us answers NOSCRIPT without running anything,
        // so loading the script and sending just those again is safe.
        for attempt in 0..2 {
            let pending: Vec<usize> = (0..messages.len())
                .filter(|&i| timestamps[i].is_none())
                .collect();
            let mut pipe = Pipeline::with_capacity(pending.len());
            pipe.ignore_errors();
            for &index in &pending {
                let message = &messages[index];
                pipe.add_command(self.broadcast_command(message));
            }
            let replies: Vec<Value> = pipe.query_async(&mut manager).await?;
            let mut missing_script = false;
            for (index, reply) in pending.into_iter().zip(replies) {
                match reply {
                    Value::Int(timestamp) => timestamps[index] = Some(timestamp),
                    Value::ServerError(error) if error.code() == "NOSCRIPT" && attempt == 0 => {
                        missing_script = true
                    }
                    Value::ServerError(error) => return Err(RedisError::from(error)),
                    other => return Err(unexpected("the broadcast script", &other)),
                }
            }
            if !missing_script {
                break;
            }
            self.broadcast_script
                .prepare_invoke()
                .load_async(&mut manager)
                .await?;
        }
        Ok(timestamps.into_iter().flatten().collect())
    }

    fn broadcast_command(&self, message: &Outgoing) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.broadcast_script.get_hash())
            .arg(1)
            .arg(&message.log_key)
            .arg(&message.channel_key)
            .arg(&message.head)
            .arg(b"}");
        cmd
    }

    /// The stored messages of each log newer than its cursor, oldest first, in one round trip.
    pub async fn unspool(
        &self,
        mut manager: ConnectionManager,
        requests: &[(Vec<u8>, Since)],
        limit: Option<u64>,
    ) -> RedisResult<Vec<Vec<Vec<u8>>>> {
        let mut pipe = Pipeline::with_capacity(requests.len());
        for (log_key, since) in requests {
            let cmd = pipe
                .cmd("ZRANGEBYSCORE")
                .arg(log_key)
                .arg(since.exclusive_min())
                .arg("+inf");
            if let Some(limit) = limit {
                cmd.arg("LIMIT").arg(0).arg(limit);
            }
        }
        pipe.query_async(&mut manager).await
    }

    /// Trims entries older than `expire_ms`, by the Redis clock, from every log.
    ///
    /// SCAN walks the logs a step at a time (never KEYS, which blocks Redis for the whole
    /// keyspace); the trims of one step travel with the SCAN of the next, one round trip each.
    pub async fn prune(&self, mut manager: ConnectionManager, expire_ms: i64) -> RedisResult<i64> {
        let (seconds, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut manager).await?;
        let oldest_kept = seconds * 1000 + micros / 1000 - expire_ms;
        let pattern = [glob_escape(&self.log_prefix).as_bytes(), b"*"].concat();
        let mut removed = 0;
        let mut cursor: Option<u64> = Some(0);
        let mut keys: Vec<Vec<u8>> = Vec::new();
        while cursor.is_some() || !keys.is_empty() {
            let mut pipe = Pipeline::with_capacity(keys.len() + 1);
            for key in &keys {
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(key)
                    .arg("-inf")
                    .arg(oldest_kept);
            }
            if let Some(position) = cursor {
                pipe.cmd("SCAN")
                    .arg(position)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .arg("TYPE")
                    .arg("zset");
            }
            let mut replies: Vec<Value> = pipe.query_async(&mut manager).await?;
            let scan_reply = cursor.map(|_| replies.pop().expect("one reply per command"));
            for reply in replies {
                removed += redis::from_redis_value::<i64>(reply)?;
            }
            keys.clear();
            cursor = None;
            if let Some(reply) = scan_reply {
                let (next, found): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)?;
                keys = found;
                cursor = (next != 0).then_some(next);
            }
        }
        Ok(removed)
    }
}

/// Escapes SCAN's glob characters so a prefix matches only itself.
pub fn glob_escape(prefix: &str) -> String {
    let mut escaped = String::with_capacity(prefix.len());
    for ch in prefix.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(ch);
    }
    escaped
}

fn unexpected(what: &str, reply: &Value) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply",
        format!("{what} answered {reply:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("replay:"), "replay:");
        assert_eq!(glob_escape("re[p]lay*?:\\"), "re\\[p\\]lay\\*\\?:\\\\");
    }

    #[test]
    fn exclusive_bounds() {
        assert_eq!(Since::Int(5).exclusive_min(), "(5");
        assert_eq!(Since::Float(1.5).exclusive_min(), "(1.5");
        assert_eq!(Since::Float(f64::NEG_INFINITY).exclusive_min(), "-inf");
        assert_eq!(Since::Float(f64::INFINITY).exclusive_min(), "(+inf");
    }
}
