//! The per-process tokio runtime and Redis connection, rebuilt after fork.
//!
//! A forked child inherits the parent's memory but not its threads: the runtime's workers
//! and the connection's driver task are gone there. So each is tagged with the pid that made
//! it, and a child builds its own. The parent's are leaked in the child, never dropped:
//! dropping would wait on threads that do not exist, and shutting down the inherited socket
//! would cut the parent's connection.

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, ProtocolVersion, RedisResult};
use tokio::runtime::Runtime;

struct ProcessRuntime {
    pid: u32,
    runtime: &'static Runtime,
}

static RUNTIME: Mutex<Option<ProcessRuntime>> = Mutex::new(None);

/// This process's runtime: one worker thread drives every connection's socket.
pub fn runtime() -> &'static Runtime {
    let pid = std::process::id();
    let mut slot = RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match &*slot {
        Some(current) if current.pid == pid => current.runtime,
        _ => {
            let runtime: &'static Runtime = Box::leak(Box::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("replaylog-io")
                    .enable_all()
                    .build()
                    .expect("cannot start the tokio runtime"),
            ));
            *slot = Some(ProcessRuntime { pid, runtime });
            runtime
        }
    }
}

/// Called in a forked child (`os.register_at_fork`): forget the parent's runtime now.
pub fn forget_after_fork() {
    let mut slot = RUNTIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Leaked on purpose, see the module comment; the runtime itself was never owned here.
    *slot = None;
}

/// Connection settings of one log.
#[derive(Clone)]
pub struct Settings {
    pub url: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

impl Settings {
    /// The password in the URL, to scrub from any error text.
    pub fn password(&self) -> Option<String> {
        let info = self.url.as_str().into_connection_info().ok()?;
        info.redis_settings().password().map(str::to_owned)
    }
}

struct ProcessConnection {
    pid: u32,
    manager: ConnectionManager,
}

/// One multiplexed connection per log and process, made lazily and shared by all threads:
/// concurrent calls are pipelined onto it, and it reconnects by itself after Redis restarts.
pub struct Connection {
    settings: Settings,
    current: Mutex<Option<ProcessConnection>>,
}

impl Connection {
    pub fn new(settings: Settings) -> RedisResult<Connection> {
        // Parse now so a malformed URL fails at construction, not at the first call.
        settings.url.as_str().into_connection_info()?;
        Ok(Connection {
            settings,
            current: Mutex::new(None),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// This process's connection manager; no I/O happens here.
    pub fn manager(&self) -> RedisResult<ConnectionManager> {
        let pid = std::process::id();
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(connection) = &*current {
            if connection.pid == pid {
                return Ok(connection.manager.clone());
            }
        }
        if let Some(inherited) = current.take() {
            std::mem::forget(inherited);
        }
        let manager = self.build_manager()?;
        *current = Some(ProcessConnection {
            pid,
            manager: manager.clone(),
        });
        Ok(manager)
    }

    fn build_manager(&self) -> RedisResult<ConnectionManager> {
        let info = self.settings.url.as_str().into_connection_info()?;
        // RESP3 lets the manager hear of a disconnect at once and reconnect in the background.
        let redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(redis_settings))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(Some(self.settings.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let _context = runtime().enter();
        ConnectionManager::new_lazy_with_config(client, config)
    }

    /// Drops this process's connection; the next call makes a new one.
    pub fn close(&self) {
        let pid = std::process::id();
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(connection) = current.take() {
            if connection.pid == pid {
                drop(connection);
            } else {
                std::mem::forget(connection);
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}
