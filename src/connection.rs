//! The per-process tokio runtime and Redis connection, rebuilt after fork.
//!
//! A forked child inherits the parent's memory but not its threads: the runtime's workers
//! and the connection's driver task are gone there. So each is tagged with the pid that made
//! it, and a child builds its own. The parent's are leaked in the child, never dropped:
//! dropping would wait on threads that do not exist, and shutting down the inherited socket
//! would cut the parent's connection.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{Client, ConnectionInfo, ProtocolVersion, RedisResult};
use tokio::runtime::Runtime;

use crate::hub::{Dial, Hub};
use crate::link::Link;
use crate::process_local::ProcessLocal;
use crate::sentinel::{Sentinels, RECHECK};
use crate::target::Target;

/// Which runtime a call runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// A current-thread runtime that the calling thread drives itself: a blocking call does
    /// its own socket I/O, with no handoff to another thread. Threads calling at once take
    /// turns driving it and share (pipeline onto) its connection.
    Calling,
    /// One worker thread: asyncio calls and subscriptions, which must progress while no
    /// Python thread is waiting on them.
    Background,
}

static CALLING: ProcessLocal<&'static Runtime> = ProcessLocal::new();
static BACKGROUND: ProcessLocal<&'static Runtime> = ProcessLocal::new();

/// Locks `mutex`, also after a panic elsewhere poisoned it: every value kept behind these locks
/// is whole at all times.
pub fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This process's runtime of the given flavor, made on first use. One that two threads made
/// at once is leaked by the thread that lost: a runtime must not be dropped where it may be
/// running, and this happens once at most.
pub fn runtime(flavor: Flavor) -> &'static Runtime {
    let slot = match flavor {
        Flavor::Calling => &CALLING,
        Flavor::Background => &BACKGROUND,
    };
    slot.get(|| {
        let mut builder = match flavor {
            Flavor::Calling => tokio::runtime::Builder::new_current_thread(),
            Flavor::Background => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(1).thread_name("replaylog-io");
                builder
            }
        };
        Box::leak(Box::new(
            builder
                .enable_all()
                .build()
                .expect("cannot start the tokio runtime"),
        ))
    })
}

/// Runs `future` to completion on this process's `flavor` runtime, from a thread that is
/// not a runtime's own. On a runtime thread (Python code run there, e.g. a finalizer that the
/// garbage collector ran while an asyncio result was converted), a helper thread does it:
/// tokio refuses to block a runtime thread.
pub fn block_on<F>(flavor: Flavor, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime(flavor).block_on(future);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime(flavor).block_on(future))
            .join()
            .expect("the helper thread does not panic")
    })
}

/// Synchronous calls of this process now waiting on Redis, across all logs.
static SYNC_CALLS_WAITING: AtomicUsize = AtomicUsize::new(0);

/// Awaits `future` on the calling-flavor runtime, polling for the reply without sleeping for
/// up to the connection's budget while no other synchronous call is waiting. A thread that
/// sleeps in `epoll_wait` for a round trip of a few dozen µs pays the kernel's (on a VM, the
/// hypervisor's) wake-up on top of it; polling skips that. Another waiting call means the CPU
/// is wanted by other threads, so the poll stops and the thread sleeps as usual. So does a
/// call after one whose reply took longer than the budget: a remote Redis, where polling would
/// only burn CPU.
pub async fn busy_poll<F: Future>(future: F, connection: &Connection) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waiting = WaitingCall::new();
    let started = Instant::now();
    let budget = connection.settings.busy_poll;
    let last_wait = Duration::from_micros(connection.calling_last_wait_us.load(Ordering::Relaxed));
    let deadline =
        (waiting.alone && !budget.is_zero() && last_wait <= budget).then(|| started + budget);
    let output = loop {
        let polled = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
        if let Poll::Ready(output) = polled {
            break output;
        }
        let polling = deadline.is_some_and(|deadline| Instant::now() < deadline)
            && SYNC_CALLS_WAITING.load(Ordering::Relaxed) == 1;
        if !polling {
            break future.await;
        }
        // Defers this task, so the runtime checks the socket with a zero timeout, not a sleep.
        tokio::task::yield_now().await;
    };
    let waited = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
    connection
        .calling_last_wait_us
        .store(waited, Ordering::Relaxed);
    output
}

/// Counts one synchronous call in `SYNC_CALLS_WAITING` while it lives.
struct WaitingCall {
    alone: bool,
}

impl WaitingCall {
    fn new() -> WaitingCall {
        WaitingCall {
            alone: SYNC_CALLS_WAITING.fetch_add(1, Ordering::Relaxed) == 0,
        }
    }
}

impl Drop for WaitingCall {
    fn drop(&mut self) {
        SYNC_CALLS_WAITING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Called in a forked child (`os.register_at_fork`): forget the parent's runtimes now.
pub fn forget_after_fork() {
    // Calls in the parent's other threads do not exist here. (The runtimes and connections
    // are per process already; see `ProcessLocal`.)
    SYNC_CALLS_WAITING.store(0, Ordering::Relaxed);
}

/// Connection settings of one log.
#[derive(Clone)]
pub struct Settings {
    pub url: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// How long a synchronous call polls for its reply before it sleeps; see [`busy_poll`].
    pub busy_poll: Duration,
    /// The most payload bytes a subscription buffers for a consumer that lags.
    pub subscription_buffer_bytes: usize,
    /// On a cluster: SPUBLISH/SSUBSCRIBE (each message goes to its shard only), not PUBLISH.
    pub sharded_pubsub: bool,
}

/// One runtime flavor's connection, with the address it was made for (a Sentinel group's
/// master moves; other targets keep "").
type Current = Option<(String, Link)>;

/// A log's connections in this process, per runtime flavor, and its pub/sub hub.
#[derive(Default)]
struct ProcessConnections {
    calling: Mutex<Current>,
    background: Mutex<Current>,
    hub: OnceLock<Hub>,
}

impl ProcessConnections {
    fn current(&self, flavor: Flavor) -> &Mutex<Current> {
        match flavor {
            Flavor::Calling => &self.calling,
            Flavor::Background => &self.background,
        }
    }
}

/// One multiplexed connection per log, process and runtime flavor, made lazily and shared
/// by all threads: concurrent calls are pipelined onto it, and it reconnects by itself
/// after Redis restarts.
pub struct Connection {
    settings: Settings,
    /// `settings.url`, parsed once.
    target: Target,
    sentinels: Option<std::sync::Arc<Sentinels>>,
    process: ProcessLocal<ProcessConnections>,
    created: Instant,
    /// When the calling-flavor connection last answered, in ms after `created`.
    calling_answered: AtomicU64,
    /// How long the last synchronous call waited for Redis, in µs; see [`busy_poll`].
    calling_last_wait_us: AtomicU64,
}

impl Connection {
    pub fn new(settings: Settings) -> RedisResult<Connection> {
        // Parsed now, so a malformed URL fails at construction, not at the first call.
        let target = Target::parse(&settings.url)?;
        let sentinels = match &target {
            Target::Sentinel {
                sentinels,
                master_name,
                node,
            } => Some(std::sync::Arc::new(Sentinels::new(
                sentinels.clone(),
                master_name.clone(),
                node.clone(),
                settings.connect_timeout,
            ))),
            _ => None,
        };
        Ok(Connection {
            settings,
            target,
            sentinels,
            process: ProcessLocal::new(),
            created: Instant::now(),
            calling_answered: AtomicU64::new(0),
            calling_last_wait_us: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// This process's connections (a forked child starts with none).
    fn process(&self) -> &ProcessConnections {
        self.process.get(ProcessConnections::default)
    }

    /// This process's pub/sub connection for the log's subscriptions, started on first use.
    pub fn hub(&self) -> RedisResult<&Hub> {
        let process = self.process();
        if let Some(hub) = process.hub.get() {
            return Ok(hub);
        }
        let dial = match (&self.target, &self.sentinels) {
            (Target::Cluster(nodes), _) => Dial::Cluster {
                nodes: nodes.clone(),
                sharded: self.settings.sharded_pubsub,
            },
            (_, Some(sentinels)) => Dial::Sentinel(sentinels.clone()),
            (target, None) => Dial::Single(Box::new(Client::open(target.node_info().clone())?)),
        };
        Ok(process
            .hub
            .get_or_init(|| Hub::start(dial, self.settings.connect_timeout)))
    }

    /// The cluster nodes the URL names, to start from.
    pub fn cluster_seeds(&self) -> &[ConnectionInfo] {
        match &self.target {
            Target::Cluster(nodes) => nodes,
            _ => &[],
        }
    }

    /// The one server's address, for the bulk path (one server only).
    pub fn single_server(&self) -> Option<&ConnectionInfo> {
        self.target.single()
    }

    /// The password in the URL, to scrub from any error text.
    pub fn password(&self) -> Option<&str> {
        self.target.node_info().redis_settings().password()
    }

    /// After a failure: if a Sentinel failover may explain it, ask where the master is before
    /// the next call.
    pub fn failed(&self, error: &redis::RedisError) {
        if let Some(sentinels) = &self.sentinels {
            if crate::sentinel::failover_may_explain(error) {
                sentinels.suspect();
            }
        }
    }

    /// This process's connection on the `flavor` runtime. No I/O happens here, except that a
    /// Sentinel group's master is asked for when the last answer is older than `RECHECK`.
    pub async fn link(&self, flavor: Flavor) -> RedisResult<Link> {
        let master = match &self.sentinels {
            Some(sentinels) => Some(sentinels.master(RECHECK).await?),
            None => None,
        };
        let address = master
            .as_ref()
            .map_or_else(String::new, |info| info.addr().to_string());
        let mut current = locked(self.process().current(flavor));
        if let Some((made_for, link)) = &*current {
            if *made_for == address {
                return Ok(link.clone());
            }
        }
        // The master moved: calls go to the new one from now on.
        let link = self.build_link(flavor, master)?;
        *current = Some((address, link.clone()));
        Ok(link)
    }

    fn build_link(&self, flavor: Flavor, master: Option<ConnectionInfo>) -> RedisResult<Link> {
        // The connections' tasks live on the runtime that will drive their calls.
        let _context = runtime(flavor).enter();
        let info = match (&self.target, master) {
            (Target::Cluster(nodes), _) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(self.settings.connect_timeout)
                    .response_timeout(self.settings.response_timeout)
                    .build()?;
                let config = redis::cluster::ClusterConfig::new();
                return Ok(Link::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ));
            }
            (_, Some(master)) => master,
            (target, None) => target.node_info().clone(),
        };
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
        Ok(Link::Single(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }

    /// Whether the `flavor` connection may have died unnoticed: a calling-flavor connection
    /// is only driven while a call runs, so a Redis restart between calls goes unseen until
    /// a request fails on it. One idle this long (no busy caller waits that long) is checked
    /// first, for an EOF already in its socket: a few turns of the runtime, no round trip.
    pub fn needs_check(&self, flavor: Flavor) -> bool {
        const IDLE: u64 = 100;
        let now = self.created.elapsed().as_millis() as u64;
        flavor == Flavor::Calling
            && now.saturating_sub(self.calling_answered.load(Ordering::Relaxed)) > IDLE
    }

    pub fn answered(&self, flavor: Flavor) {
        if flavor == Flavor::Calling {
            let now = self.created.elapsed().as_millis() as u64;
            self.calling_answered.store(now, Ordering::Relaxed);
        }
    }

    /// Drops this process's connections; the next call makes new ones.
    pub fn close(&self) {
        let process = self.process();
        for flavor in [Flavor::Calling, Flavor::Background] {
            let taken = locked(process.current(flavor)).take();
            drop(taken);
        }
    }
}
