//! The Redis operations of one log: broadcast, replay, unspool, prune (all logs or one), delete
//! and the command line's scan, on the article's key layout or its cluster variant (`Layout`).
//! `Store::call` runs each within the log's timeouts and makes its errors Python's; unspool
//! reads through the bulk path (`bulk.rs`) on one server.

use std::collections::HashSet;
use std::future::Future;
use std::io;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, Pipeline, RedisError, RedisResult, Script,
    Value,
};

use crate::bulk::{BulkPath, Replies};
use crate::connection::{Connection, Flavor};
use crate::errors::Failure;
use crate::link::Link;
use crate::target::with_address;

const BROADCAST_LUA: &str = include_str!("lua/broadcast.lua");
const REPLAY_LUA: &str = include_str!("lua/replay.lua");
const SEAL_LUA: &str = include_str!("lua/seal.lua");
const DELETE_LUA: &str = include_str!("lua/delete.lua");

/// Keys SCAN looks at per step: enough to amortize the round trip, few enough that
/// no step holds Redis for more than a fraction of a millisecond.
const SCAN_COUNT: usize = 1000;
/// Turns of the runtime that carry a closed socket's EOF to the connection manager: the I/O
/// driver wakes the connection's task, which reports the disconnect to the manager's task,
/// which starts a new connection. One more for good measure.
const CHECK_YIELDS: usize = 4;
/// How long a prune on a cluster keeps looking at the topology while nodes fail under it (a
/// failover, resharding) before it gives up.
const TOPOLOGY_SETTLES: std::time::Duration = std::time::Duration::from_secs(30);
/// The one operation of many round trips, each bounded on its own.
pub const PRUNE: &str = "prune_replay_logs";

/// One message, serialized and ready to send.
pub struct Outgoing {
    pub keys: ChannelKeys,
    /// The message up to the tail the script adds (see `message.rs`).
    pub head: Vec<u8>,
    /// Set for a publish that may be retried: a repeat within the window is a no-op.
    pub idempotency_key: Option<Vec<u8>>,
}

/// The Redis names of one channel.
#[derive(Clone)]
pub struct ChannelKeys {
    /// `PUBLISH` target: `mq:<channel>`.
    pub pubsub: Vec<u8>,
    /// The log, a sorted set: `replay:<channel>`.
    pub log: Vec<u8>,
    /// The log's bookkeeping (defined in `lua/broadcast.lua`): `replaymeta:<channel>`.
    pub meta: Vec<u8>,
    /// The writing master's mark, never replicated (see broadcast.lua): `replayonce:w:<channel>`,
    /// beside the idempotency keys, which all go on with a digit there.
    pub mark: Vec<u8>,
}

/// Key names. With `cluster_keys`, the channel inside every key is a `{hash tag}`, so all
/// of a channel's keys share one Redis Cluster slot and each script touches one slot.
pub struct Layout {
    pub channel_prefix: String,
    pub log_prefix: String,
    pub meta_prefix: String,
    pub idempotency_prefix: String,
    pub cluster_keys: bool,
    /// Sharded pub/sub: the channel name carries the same hash tag as the keys, since SPUBLISH
    /// in a script must stay in the script's slot.
    pub sharded_pubsub: bool,
}

impl Layout {
    fn key(&self, prefix: &str, channel: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(prefix.len() + channel.len() + 3);
        key.extend_from_slice(prefix.as_bytes());
        if !self.cluster_keys {
            key.extend_from_slice(channel.as_bytes());
        } else if channel.is_empty() || channel.starts_with(['}', '\0']) {
            // `{}` or `{}...}` would be an empty hash tag, and Redis would hash each whole
            // key apart. These channels get the fixed tag `{\0}` instead; no tag made by the
            // rule below starts with \0, so no two channels share keys.
            key.extend_from_slice(b"{\0}");
            key.extend_from_slice(channel.as_bytes());
        } else {
            key.push(b'{');
            key.extend_from_slice(channel.as_bytes());
            key.push(b'}');
        }
        key
    }

    fn mark_key(&self, channel: &str) -> Vec<u8> {
        self.key(&format!("{}w:", self.idempotency_prefix), channel)
    }

    pub fn channel_keys(&self, channel: &str) -> ChannelKeys {
        ChannelKeys {
            pubsub: if self.sharded_pubsub {
                self.key(&self.channel_prefix, channel)
            } else {
                [self.channel_prefix.as_bytes(), channel.as_bytes()].concat()
            },
            log: self.key(&self.log_prefix, channel),
            meta: self.key(&self.meta_prefix, channel),
            mark: self.mark_key(channel),
        }
    }

    /// `<prefix><len(channel)>:<channel>:<key>`: scoped by channel, and the length, ahead of
    /// the names, keeps any two (channel, key) pairs apart.
    pub fn idempotency_key(&self, channel: &str, key: &str) -> Vec<u8> {
        let prefix = format!("{}{}:", self.idempotency_prefix, channel.len());
        let mut name = self.key(&prefix, channel);
        name.push(b':');
        name.extend_from_slice(key.as_bytes());
        name
    }
}

/// A replay to run: the log, the cursor, and the epoch the client last saw ("" if none).
pub struct ReplayRequest {
    pub keys: ChannelKeys,
    pub since: Since,
    pub epoch: String,
}

/// One log's replay: its messages after the cursor, and whether nothing in between is lost.
#[derive(Default)]
pub struct Replayed {
    pub complete: bool,
    pub messages: Vec<Vec<u8>>,
    /// Names the log's history; empty when the log has no bookkeeping.
    pub epoch: String,
    /// The newest timestamp issued on the channel (stored or removed since), if known.
    pub latest: Option<i64>,
}

/// How big and how old logs may grow.
pub struct Limits {
    pub expire_ms: i64,
    /// 0: no cap.
    pub max_len: u64,
    pub idempotency_window_ms: i64,
    /// Replicas that must hold a broadcast before it returns (`WAIT`); 0: none asked.
    pub min_replicas: u32,
    pub replica_timeout_ms: u64,
}

/// What a broadcast did: its timestamps and, when `min_replicas` asked for it, how many
/// replicas acknowledged it in time.
pub struct Broadcasted {
    pub timestamps: Vec<i64>,
    pub replicas: Option<i64>,
}

/// The lower bound of an unspool: entries scored strictly above it.
pub enum Since {
    Int(i64),
    Float(f64),
}

impl Since {
    fn as_number(&self) -> String {
        match self {
            Since::Int(value) => value.to_string(),
            Since::Float(value) if value.is_infinite() => {
                if *value > 0.0 { "inf" } else { "-inf" }.to_owned()
            }
            Since::Float(value) => value.to_string(),
        }
    }

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
    /// Unspool's reads on one server (None on a Cluster or a Sentinel group).
    bulk: Option<BulkPath>,
    pub layout: Layout,
    limits: Limits,
    broadcast_script: Script,
    replay_script: Script,
    seal_script: Script,
    delete_script: Script,
    /// Where the log lives, password masked, for error messages.
    label: String,
    secret: Option<String>,
}

impl Store {
    pub fn new(connection: Connection, label: String, layout: Layout, limits: Limits) -> Store {
        let secret = connection.password().map(str::to_owned);
        let bulk = connection
            .single_server()
            .map(|server| BulkPath::new(server.clone(), connection.settings()));
        Store {
            connection,
            bulk,
            layout,
            limits,
            broadcast_script: Script::new(BROADCAST_LUA),
            replay_script: Script::new(REPLAY_LUA),
            seal_script: Script::new(SEAL_LUA),
            delete_script: Script::new(DELETE_LUA),
            label,
            secret,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn close(&self) {
        self.connection.close();
        if let Some(bulk) = &self.bulk {
            bulk.close();
        }
    }

    /// Runs one operation on this log's regular connection for the runtime `flavor` (the one
    /// polling this future), within the call's budget (see `within_budget`).
    pub async fn call<T, F, Fut>(
        &self,
        flavor: Flavor,
        what: &str,
        operation: F,
    ) -> Result<T, Failure>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let link = match self.connection.link(flavor).await {
            Ok(link) => link,
            Err(error) => return Err(self.failure(&error, what)),
        };
        self.within_budget(what, self.on_link(flavor, link, operation))
            .await
    }

    /// `operation` on `link`, the regular connection for `flavor`, checked first after a quiet
    /// spell (see `needs_check`).
    async fn on_link<T, F, Fut>(&self, flavor: Flavor, link: Link, operation: F) -> RedisResult<T>
    where
        F: FnOnce(Link) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.connection.needs_check(flavor) {
            // Let the connection's own task read what the socket holds: a connection that
            // Redis closed (a restart, CLIENT KILL, a timeout) shows as EOF without a round
            // trip, and the manager connects afresh before the request goes out.
            for _ in 0..CHECK_YIELDS {
                tokio::task::yield_now().await;
            }
        }
        let value = operation(link).await?;
        self.connection.answered(flavor);
        Ok(value)
    }

    /// Runs `work` within `connect_timeout` (to connect and log in, when it must) plus one
    /// `response_timeout`, never more (a prune, many round trips, gets that for each of them),
    /// and makes its error Python's.
    async fn within_budget<T>(
        &self,
        what: &str,
        work: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Failure> {
        let outcome = if what == PRUNE {
            work.await
        } else {
            let settings = self.settings();
            let budget = settings.connect_timeout + settings.response_timeout;
            tokio::time::timeout(budget, work)
                .await
                .unwrap_or_else(|_| {
                    Err(RedisError::from(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer within connect_timeout + response_timeout",
                    )))
                })
        };
        if let Err(error) = &outcome {
            self.connection.failed(error);
        }
        outcome.map_err(|e| self.failure(&e, what))
    }

    /// A Redis error as the Python exception to raise, with what was being done and where.
    pub fn failure(&self, error: &RedisError, what: &str) -> Failure {
        let context = format!("{what} on {}", self.label);
        let failure = Failure::from_redis(error, &context, self.secret.as_deref());
        // A write that timed out or lost its connection may have run all the same; only a
        // refused connection says that nothing was sent.
        let writes = matches!(what, "broadcast" | "broadcast_many");
        if writes && !error.is_connection_refusal() {
            return failure.with_outcome_unknown();
        }
        failure
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    pub fn settings(&self) -> &crate::connection::Settings {
        self.connection.settings()
    }

    /// Publishes and stores each message in one atomic script run, all in one round trip.
    /// Returns the timestamps, in order.
    pub async fn broadcast(
        &self,
        mut manager: Link,
        messages: &[Outgoing],
    ) -> RedisResult<Broadcasted> {
        if messages.is_empty() {
            return Ok(Broadcasted {
                timestamps: Vec::new(),
                replicas: None,
            });
        }
        let commands: Vec<Cmd> = messages.iter().map(|m| self.broadcast_command(m)).collect();
        let replies = run_scripts(&mut manager, &self.broadcast_script, &commands).await?;
        let timestamps = replies
            .into_iter()
            .map(|reply| match reply {
                Value::Int(timestamp) => Ok(timestamp),
                other => Err(unexpected("the broadcast script", &other)),
            })
            .collect::<RedisResult<Vec<i64>>>()?;
        // WAIT counts the replicas holding every write this connection made so far, ours
        // included; a script cannot run it, so it follows in its own round trip.
        let replicas = match self.limits.min_replicas {
            0 => None,
            wanted => Some(
                self.wait_for_replicas(&mut manager, messages, wanted)
                    .await?,
            ),
        };
        Ok(Broadcasted {
            timestamps,
            replicas,
        })
    }

    /// The fewest replicas holding the messages: WAIT on the master of each message's slot
    /// (one server: the one master).
    async fn wait_for_replicas(
        &self,
        manager: &mut Link,
        messages: &[Outgoing],
        wanted: u32,
    ) -> RedisResult<i64> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted).arg(self.limits.replica_timeout_ms);
        let Link::Cluster(cluster) = manager else {
            return wait.query_async(manager).await;
        };
        let slots: HashSet<Route> = messages
            .iter()
            .map(|message| Route::with_key(&message.keys.log, SlotAddr::Master))
            .collect();
        let waits = slots.into_iter().map(|route| {
            let mut cluster = cluster.clone();
            let wait = wait.clone();
            async move {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let held = cluster.route_command(wait, routing).await?;
                Ok::<i64, RedisError>(redis::from_redis_value::<i64>(held)?)
            }
        });
        let held = futures_util::future::try_join_all(waits).await?;
        Ok(held.into_iter().min().unwrap_or(i64::from(wanted)))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn broadcast_command(&self, message: &Outgoing) -> Cmd {
        let keys = &message.keys;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.broadcast_script.get_hash());
        let [log, meta, mark] = [&keys.log, &keys.meta, &keys.mark];
        match &message.idempotency_key {
            Some(key) => cmd.arg(4).arg(log).arg(meta).arg(mark).arg(key),
            None => cmd.arg(3).arg(log).arg(meta).arg(mark),
        };
        cmd.arg(&keys.pubsub)
            .arg(&message.head)
            .arg(self.limits.expire_ms)
            .arg(self.limits.max_len)
            .arg(self.limits.idempotency_window_ms)
            .arg(u8::from(self.layout.sharded_pubsub));
        cmd
    }

    /// Like `unspool`, plus whether each replay is complete: false when a message after the
    /// cursor existed but is gone (pruned, trimmed, expired, flushed, or lost in a failover).
    ///
    /// A log whose new master has not recorded its failover's break yet (see `seal.lua`) gets
    /// it recorded, and is replayed again: the position a client goes on from once told is
    /// then one the new master's messages chain to, so it is not told twice.
    pub async fn replay(
        &self,
        mut manager: Link,
        requests: &[ReplayRequest],
        limit: Option<u64>,
    ) -> RedisResult<Vec<Replayed>> {
        let all: Vec<&ReplayRequest> = requests.iter().collect();
        let mut replayed = self.replay_once(&mut manager, &all, limit).await?;
        let unsealed: Vec<usize> = (0..requests.len())
            .filter(|&index| replayed[index].1)
            .collect();
        let seals: Vec<Cmd> = unsealed
            .iter()
            .map(|&index| {
                let keys = &requests[index].keys;
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.seal_script.get_hash())
                    .arg(2)
                    .arg(&keys.meta)
                    .arg(&keys.mark);
                cmd
            })
            .collect();
        // A seal refused (OOM, a replica now) leaves the first verdict, incomplete already.
        if !seals.is_empty()
            && run_scripts(&mut manager, &self.seal_script, &seals)
                .await
                .is_ok()
        {
            let again: Vec<&ReplayRequest> =
                unsealed.iter().map(|&index| &requests[index]).collect();
            let replays = self.replay_once(&mut manager, &again, limit).await?;
            for (index, replay) in unsealed.into_iter().zip(replays) {
                replayed[index] = replay;
            }
        }
        Ok(replayed.into_iter().map(|(replay, _)| replay).collect())
    }

    /// One round trip of `replay.lua`: each replay, and whether its log is unsealed.
    async fn replay_once(
        &self,
        manager: &mut Link,
        requests: &[&ReplayRequest],
        limit: Option<u64>,
    ) -> RedisResult<Vec<(Replayed, bool)>> {
        let commands: Vec<Cmd> = requests
            .iter()
            .map(|ReplayRequest { keys, since, epoch }| {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.replay_script.get_hash())
                    .arg(3)
                    .arg(&keys.log)
                    .arg(&keys.meta)
                    .arg(&keys.mark)
                    .arg(since.exclusive_min())
                    .arg(since.as_number())
                    .arg(limit.map_or(-1, |n| n as i64))
                    .arg(epoch);
                cmd
            })
            .collect();
        let replies = run_scripts(manager, &self.replay_script, &commands).await?;
        replies
            .into_iter()
            .map(|reply| {
                let (complete, messages, epoch, latest, unsealed): (
                    i64,
                    Vec<Vec<u8>>,
                    String,
                    Option<f64>,
                    i64,
                ) = redis::from_redis_value(reply)?;
                let replay = Replayed {
                    complete: complete == 1,
                    messages,
                    epoch,
                    latest: latest.map(|score| score as i64),
                };
                Ok((replay, unsealed == 1))
            })
            .collect()
    }

    /// The stored messages of each log newer than its cursor, oldest first, in one round trip:
    /// through the bulk path on one server, else on the regular connection.
    pub async fn unspool(
        &self,
        flavor: Flavor,
        what: &str,
        requests: &[(ChannelKeys, Since)],
        limit: Option<u64>,
    ) -> Result<Replies, Failure> {
        if requests.is_empty() {
            return Ok(Replies::from_arrays(Vec::new()));
        }
        let mut pipe = Pipeline::with_capacity(requests.len());
        for (keys, since) in requests {
            let cmd = pipe
                .cmd("ZRANGEBYSCORE")
                .arg(&keys.log)
                .arg(since.exclusive_min())
                .arg("+inf");
            if let Some(limit) = limit {
                cmd.arg("LIMIT").arg(0).arg(limit);
            }
        }
        let pipe = &pipe;
        let read =
            |mut link: Link| async move { query(&mut link, pipe).await.map(Replies::from_arrays) };
        let Some(bulk) = &self.bulk else {
            return self.call(flavor, what, read).await;
        };
        let regular = async {
            let link = self.connection.link(flavor).await?;
            self.on_link(flavor, link, read).await
        };
        self.within_budget(what, bulk.read_or(flavor, pipe, requests.len(), regular))
            .await
    }

    /// Trims entries older than `expire_ms`, by the Redis clock, from every log.
    ///
    /// SCAN walks the logs a step at a time (never KEYS, which blocks Redis for the whole
    /// keyspace); a step's trims travel with the SCAN of the next step, one round trip each.
    /// Replays tell what was trimmed from the messages' `prev` links: no bookkeeping here.
    /// `channels`, a SCAN glob over channel names, narrows it to the logs it matches.
    pub async fn prune(
        &self,
        mut manager: Link,
        expire_ms: i64,
        channels: Option<&str>,
    ) -> RedisResult<i64> {
        let oldest_kept = redis_now_ms(&mut manager).await? - expire_ms;
        let pattern = self.log_pattern(channels);
        let mut removed = 0;
        if !manager.is_cluster() {
            prune_node(&mut manager, &pattern, oldest_kept, &mut removed).await?;
            return Ok(removed);
        }
        // Every master's keys, each SCAN paged on its own node. A node that fails on the way
        // (a failover, resharding) is left for another look at the topology, which walks
        // whichever master serves its slots now; a trim done twice removes nothing the second
        // time, so each entry is counted once.
        let deadline = tokio::time::Instant::now() + TOPOLOGY_SETTLES;
        let mut walked = HashSet::new();
        let mut known: Vec<ConnectionInfo> = self.connection.cluster_seeds().to_vec();
        loop {
            let failed = match cluster_masters(&known, self.settings()).await {
                Err(error) => Some(error),
                Ok(masters) => {
                    let mut failed = None;
                    for master in masters {
                        let address = master.addr().to_string();
                        if walked.contains(&address) {
                            continue;
                        }
                        let walk = async {
                            let mut node = node_connection(&master, self.settings()).await?;
                            prune_node(&mut node, &pattern, oldest_kept, &mut removed).await
                        };
                        match walk.await {
                            Ok(()) => {
                                walked.insert(address);
                            }
                            Err(error) => failed = Some(error),
                        }
                        if !known.iter().any(|seen| seen.addr() == master.addr()) {
                            known.push(master);
                        }
                    }
                    failed
                }
            };
            match failed {
                None => return Ok(removed),
                Some(error) if tokio::time::Instant::now() >= deadline => return Err(error),
                Some(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
    }
}

/// Trims the logs that SCAN finds on one node (one server, or one cluster master) to
/// `oldest_kept`, adding what it removed to `removed`. A step's trims travel with the SCAN of
/// the next step, one round trip each.
async fn prune_node(
    node: &mut impl ConnectionLike,
    pattern: &[u8],
    oldest_kept: i64,
    removed: &mut i64,
) -> RedisResult<()> {
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
            scan_for_logs(&mut pipe, position, pattern);
        }
        let mut replies: Vec<Value> = query(node, &pipe).await?;
        let scan_reply = cursor.map(|_| replies.pop().expect("one reply per command"));
        for trimmed in replies {
            *removed += redis::from_redis_value::<i64>(trimmed)?;
        }
        keys.clear();
        cursor = None;
        if let Some(reply) = scan_reply {
            let (next, found): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)?;
            keys = found;
            cursor = (next != 0).then_some(next);
        }
    }
    Ok(())
}

/// Adds a SCAN step from `cursor` over the sorted sets whose keys match `pattern`.
fn scan_for_logs(pipe: &mut Pipeline, cursor: u64, pattern: &[u8]) {
    pipe.cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .arg("TYPE")
        .arg("zset");
}

/// A connection of its own to one cluster node: a walk of that node's keys must stay on it,
/// never be redirected.
async fn node_connection(
    node: &ConnectionInfo,
    settings: &crate::connection::Settings,
) -> RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_response_timeout(Some(settings.response_timeout));
    Client::open(node.clone())?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The cluster's masters that serve slots, from CLUSTER NODES of the first of `known` that
/// answers; each with the login and TLS of the seed nodes.
async fn cluster_masters(
    known: &[ConnectionInfo],
    settings: &crate::connection::Settings,
) -> RedisResult<Vec<ConnectionInfo>> {
    let mut last_error = None;
    for node in known {
        let nodes: RedisResult<String> = async {
            let mut connection = node_connection(node, settings).await?;
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut connection)
                .await
        }
        .await;
        let nodes = match nodes {
            Ok(nodes) => nodes,
            Err(error) => {
                last_error = Some(error);
                continue;
            }
        };
        let mut masters = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            let serving = fields.len() > 8;
            let failing = flags.contains("fail") || flags.contains("noaddr");
            if !flags.split(',').any(|flag| flag == "master") || failing || !serving {
                continue;
            }
            // "ip:port@cport[,hostname]"
            let address = address.split(['@', ',']).next().unwrap_or_default();
            masters.push(with_address(node, address)?);
        }
        return Ok(masters);
    }
    Err(last_error.unwrap_or_else(|| RedisError::from((redis::ErrorKind::Client, "no node"))))
}

impl Store {
    /// SCAN's MATCH for the logs of the channels matching the glob `channels` (all if None).
    /// With `cluster_keys`, a channel whose keys carry the fixed tag (see `Layout::key`) only
    /// matches when all channels do.
    fn log_pattern(&self, channels: Option<&str>) -> Vec<u8> {
        let prefix = glob_escape(&self.layout.log_prefix);
        match channels {
            None => format!("{prefix}*"),
            Some(glob) if self.layout.cluster_keys => format!("{prefix}{{{glob}}}"),
            Some(glob) => format!("{prefix}{glob}"),
        }
        .into_bytes()
    }

    /// Trims entries older than `expire_ms` from one channel's log; returns how many.
    pub async fn prune_log(
        &self,
        mut manager: Link,
        keys: &ChannelKeys,
        expire_ms: i64,
    ) -> RedisResult<i64> {
        let oldest_kept = redis_now_ms(&mut manager).await? - expire_ms;
        let mut trim = Pipeline::new();
        trim.cmd("ZREMRANGEBYSCORE")
            .arg(&keys.log)
            .arg("-inf")
            .arg(oldest_kept);
        let (removed,): (i64,) = query(&mut manager, &trim).await?;
        Ok(removed)
    }

    /// Deletes one channel's log and bookkeeping; returns how many messages it held.
    pub async fn delete(&self, mut manager: Link, keys: &ChannelKeys) -> RedisResult<i64> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.delete_script.get_hash())
            .arg(3)
            .arg(&keys.log)
            .arg(&keys.meta)
            .arg(&keys.mark);
        let replies = run_scripts(&mut manager, &self.delete_script, &[cmd]).await?;
        match replies.as_slice() {
            [Value::Int(count)] => Ok(*count),
            other => Err(unexpected(
                "the delete script",
                &Value::Array(other.to_vec()),
            )),
        }
    }

    /// One SCAN step over the logs of channels matching `channels`, from `position` (None: the
    /// start): where the next step starts (None when done), the Redis clock, and for each log
    /// found its key, message count, oldest and newest timestamps, time to live in ms (-1:
    /// none) and memory in bytes. With `expire_ms`, each log is also trimmed (or with
    /// `dry_run`, counted) as `prune` does, and the count is of what it removed (or would
    /// remove). For the command line.
    ///
    /// On a cluster the walk goes through the masters in address order, each SCAN paged on a
    /// connection of its own to that master, as `prune` does.
    pub async fn scan_logs(
        &self,
        mut manager: Link,
        position: Option<ScanPosition>,
        channels: Option<&str>,
        expire_ms: Option<i64>,
        dry_run: bool,
    ) -> RedisResult<(Option<ScanPosition>, i64, Vec<LogStats>)> {
        let pattern = self.log_pattern(channels);
        if !manager.is_cluster() {
            let cursor = position.map_or(0, |position| position.cursor);
            let (next, now, stats) =
                scan_step(&mut manager, cursor, &pattern, expire_ms, dry_run).await?;
            let next = (next != 0).then(|| ScanPosition {
                node: String::new(),
                cursor: next,
            });
            return Ok((next, now, stats));
        }
        let mut masters: Vec<(String, ConnectionInfo)> =
            cluster_masters(self.connection.cluster_seeds(), self.settings())
                .await?
                .into_iter()
                .map(|master| (master.addr().to_string(), master))
                .collect();
        masters.sort_by(|a, b| a.0.cmp(&b.0));
        let (address, master, cursor) = match &position {
            None => {
                let (address, master) = masters.first().ok_or_else(|| {
                    RedisError::from((redis::ErrorKind::Client, "the cluster has no master"))
                })?;
                (address, master, 0)
            }
            Some(position) => {
                let (address, master) = masters
                    .iter()
                    .find(|(address, _)| *address == position.node)
                    .ok_or_else(|| {
                        RedisError::from((
                            redis::ErrorKind::Client,
                            "the cluster's masters changed during the walk over the logs (a failover?)",
                            format!("{} no longer serves slots; run it again", position.node),
                        ))
                    })?;
                (address, master, position.cursor)
            }
        };
        let mut node = node_connection(master, self.settings()).await?;
        let (next, now, stats) = scan_step(&mut node, cursor, &pattern, expire_ms, dry_run).await?;
        let next = if next != 0 {
            Some(ScanPosition {
                node: address.clone(),
                cursor: next,
            })
        } else {
            masters
                .iter()
                .find(|(other, _)| other > address)
                .map(|(other, _)| ScanPosition {
                    node: other.clone(),
                    cursor: 0,
                })
        };
        Ok((next, now, stats))
    }
}

/// Where a walk over the logs stands: the node it is on (its address; empty for one server)
/// and the SCAN cursor there.
pub struct ScanPosition {
    pub node: String,
    pub cursor: u64,
}

/// One step of `Store::scan_logs` on one node (one server, or one cluster master).
async fn scan_step(
    node: &mut impl ConnectionLike,
    cursor: u64,
    pattern: &[u8],
    expire_ms: Option<i64>,
    dry_run: bool,
) -> RedisResult<(u64, i64, Vec<LogStats>)> {
    let now = redis_now_ms(node).await?;
    let mut scan = Pipeline::new();
    scan_for_logs(&mut scan, cursor, pattern);
    let ((next, keys),): ((u64, Vec<Vec<u8>>),) = query(node, &scan).await?;
    let mut pipe = Pipeline::with_capacity(keys.len() * 6);
    for key in &keys {
        match expire_ms {
            Some(expire_ms) if dry_run => {
                pipe.cmd("ZCOUNT").arg(key).arg("-inf").arg(now - expire_ms)
            }
            Some(expire_ms) => pipe
                .cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(now - expire_ms),
            None => pipe.cmd("ZCARD").arg(key),
        };
        pipe.cmd("ZRANGE").arg(key).arg(0).arg(0).arg("WITHSCORES");
        pipe.cmd("ZRANGE")
            .arg(key)
            .arg(-1)
            .arg(-1)
            .arg("WITHSCORES");
        pipe.cmd("PTTL").arg(key);
        pipe.cmd("MEMORY").arg("USAGE").arg(key);
    }
    let replies: Vec<Value> = if keys.is_empty() {
        Vec::new()
    } else {
        query(node, &pipe).await?
    };
    let mut stats = Vec::with_capacity(keys.len());
    for (key, replies) in keys.into_iter().zip(replies.chunks(5)) {
        let score = |reply: &Value| -> RedisResult<Option<i64>> {
            let pair: Vec<(Vec<u8>, f64)> = redis::from_redis_value(reply.clone())?;
            Ok(pair.first().map(|(_, score)| *score as i64))
        };
        stats.push(LogStats {
            key,
            count: redis::from_redis_value(replies[0].clone())?,
            oldest: score(&replies[1])?,
            newest: score(&replies[2])?,
            ttl_ms: redis::from_redis_value(replies[3].clone())?,
            memory: redis::from_redis_value(replies[4].clone())?,
        });
    }
    Ok((next, now, stats))
}

/// What `scan_logs` tells of one log.
pub struct LogStats {
    pub key: Vec<u8>,
    pub count: i64,
    pub oldest: Option<i64>,
    pub newest: Option<i64>,
    pub ttl_ms: i64,
    /// None where Redis cannot tell (the key went away meanwhile).
    pub memory: Option<i64>,
}

/// The Redis clock, in milliseconds.
async fn redis_now_ms(manager: &mut impl ConnectionLike) -> RedisResult<i64> {
    let mut time = Pipeline::new();
    time.cmd("TIME");
    let ((seconds, micros),): ((i64, i64),) = query(manager, &time).await?;
    Ok(seconds * 1000 + micros / 1000)
}

/// Sends a pipeline. A refused connection sent nothing, so it is tried once more: the first
/// call after Redis came back would otherwise fail on the connection that died with it.
async fn query<T: redis::FromRedisValue>(
    manager: &mut impl ConnectionLike,
    pipe: &Pipeline,
) -> RedisResult<T> {
    match pipe.query_async(manager).await {
        Err(e) if e.is_connection_refusal() => pipe.query_async(manager).await,
        outcome => outcome,
    }
}

/// Runs `commands` (see `Link::run_each`) and returns their replies. Those that answer
/// NOSCRIPT (the script cache was flushed; nothing ran) are sent again once `script` is loaded
/// (on a cluster, on every master).
async fn run_scripts(
    manager: &mut Link,
    script: &Script,
    commands: &[Cmd],
) -> RedisResult<Vec<Value>> {
    let mut replies: Vec<Option<Value>> = vec![None; commands.len()];
    for attempt in 0..2 {
        let pending: Vec<usize> = (0..commands.len())
            .filter(|&i| replies[i].is_none())
            .collect();
        let sent: Vec<Cmd> = pending.iter().map(|&i| commands[i].clone()).collect();
        let answers = match manager.run_each(&sent).await {
            Err(e) if e.is_connection_refusal() => manager.run_each(&sent).await?,
            answers => answers?,
        };
        let mut missing_script = false;
        for (index, answer) in pending.into_iter().zip(answers) {
            match answer {
                Value::ServerError(error) if error.code() == "NOSCRIPT" && attempt == 0 => {
                    missing_script = true
                }
                Value::ServerError(error) => return Err(RedisError::from(error)),
                answer => replies[index] = Some(answer),
            }
        }
        if !missing_script {
            break;
        }
        script.prepare_invoke().load_async(manager).await?;
    }
    Ok(replies.into_iter().flatten().collect())
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

    fn layout(cluster_keys: bool) -> Layout {
        Layout {
            channel_prefix: "mq:".into(),
            log_prefix: "replay:".into(),
            meta_prefix: "replaymeta:".into(),
            idempotency_prefix: "replayonce:".into(),
            cluster_keys,
            sharded_pubsub: false,
        }
    }

    #[test]
    fn article_layout_by_default() {
        let keys = layout(false).channel_keys("room:1");
        assert_eq!(keys.log, b"replay:room:1");
        assert_eq!(keys.meta, b"replaymeta:room:1");
        assert_eq!(keys.pubsub, b"mq:room:1");
    }

    #[test]
    fn cluster_keys_always_have_a_non_empty_hash_tag() {
        let layout = layout(true);
        assert_eq!(layout.channel_keys("room").log, b"replay:{room}");
        assert_eq!(layout.channel_keys("").log, b"replay:{\0}");
        assert_eq!(layout.channel_keys("}x").meta, b"replaymeta:{\0}}x");
        // A channel that spells out the fixed tag still gets keys of its own.
        assert_ne!(layout.channel_keys("\0}").log, layout.channel_keys("").log);
    }

    #[test]
    fn exclusive_bounds() {
        assert_eq!(Since::Int(5).exclusive_min(), "(5");
        assert_eq!(Since::Float(1.5).exclusive_min(), "(1.5");
        assert_eq!(Since::Float(f64::NEG_INFINITY).exclusive_min(), "-inf");
        assert_eq!(Since::Float(f64::INFINITY).exclusive_min(), "(+inf");
    }
}
