//! Where a Sentinel group's master is now.
//!
//! Sentinels announce a failover (`+switch-master`), but an announcement can be missed (a
//! sentinel restarting, a dropped pub/sub link), so nothing here listens for it. Instead the
//! master's address is asked again: by a call at most once per `RECHECK` (each call after
//! that asks first), by the pub/sub hub every `RECHECK` while anyone listens, and right
//! away after a call failed in a way a failover explains (READONLY, a lost connection).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::{Client, ConnectionInfo, ErrorKind, RedisError, RedisResult};

use crate::process_local::ProcessLocal;
use crate::target::with_address;

/// How old an answer may be before a call asks again.
pub const RECHECK: Duration = Duration::from_secs(1);

pub struct Sentinels {
    sentinels: Vec<ConnectionInfo>,
    master_name: String,
    /// The master's login, database and TLS; the address comes from the sentinels.
    node: ConnectionInfo,
    connect_timeout: Duration,
    /// This process's last answer and when it came; a lock no forked child inherits.
    known: ProcessLocal<tokio::sync::Mutex<Option<(Instant, ConnectionInfo)>>>,
    /// Set after a failure that a failover explains: the next call asks first.
    suspect: AtomicBool,
}

impl Sentinels {
    pub fn new(
        sentinels: Vec<ConnectionInfo>,
        master_name: String,
        node: ConnectionInfo,
        connect_timeout: Duration,
    ) -> Sentinels {
        Sentinels {
            sentinels,
            master_name,
            node,
            connect_timeout,
            known: ProcessLocal::new(),
            suspect: AtomicBool::new(false),
        }
    }

    /// The master, as known if the answer is younger than `max_age` and nothing failed since,
    /// else as the first sentinel that answers says now.
    pub async fn master(&self, max_age: Duration) -> RedisResult<ConnectionInfo> {
        let mut known = self.known.get(Default::default).lock().await;
        let suspect = self.suspect.swap(false, Ordering::Relaxed);
        if let Some((asked, master)) = &*known {
            if !suspect && asked.elapsed() < max_age {
                return Ok(master.clone());
            }
        }
        let master = self.ask().await?;
        *known = Some((Instant::now(), master.clone()));
        Ok(master)
    }

    /// After a failure a failover would explain: ask again before the next call.
    pub fn suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
    }

    async fn ask(&self) -> RedisResult<ConnectionInfo> {
        let mut last_error = None;
        for sentinel in &self.sentinels {
            let asked = tokio::time::timeout(self.connect_timeout, async {
                let client = Client::open(sentinel.clone())?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                let address: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master_name)
                    .query_async(&mut connection)
                    .await?;
                RedisResult::Ok(address)
            })
            .await;
            match asked {
                Ok(Ok(Some((host, port)))) => {
                    return with_address(&self.node, &format!("{host}:{port}"));
                }
                Ok(Ok(None)) => {
                    last_error = Some(RedisError::from((
                        ErrorKind::MasterNameNotFoundBySentinel,
                        "no sentinel knows the master",
                        self.master_name.clone(),
                    )))
                }
                Ok(Err(error)) => last_error = Some(error),
                Err(_) => {
                    last_error = Some(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no sentinel answered within connect_timeout",
                    )))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RedisError::from((ErrorKind::EmptySentinelList, "no sentinel given"))
        }))
    }
}

/// Whether `error` may mean the master moved: it refused a write as a replica, or its
/// connection failed.
pub fn failover_may_explain(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || error.code() == Some("READONLY")
        || error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
}
