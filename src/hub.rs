//! One pub/sub connection per log and process, shared by every subscription of that log.
//!
//! An SSE server holds a subscription per open browser tab: a connection each would cost Redis
//! a client, a file descriptor and a copy of every message per tab. Here the hub subscribes a
//! channel when the first local subscription needs it and unsubscribes it when the last one
//! leaves, and copies what arrives into each subscription's own bounded queue.
//!
//! The hub never waits on a subscription. One whose queue is full (by count or bytes) misses
//! live messages until it has drained half, then is told to catch up from the log, from its
//! own cursor: a stalled consumer costs the others nothing and loses nothing. When the
//! connection drops, the hub reconnects once for all, and tells every subscription to catch up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionInfo, PushInfo, PushKind, RedisError, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::connection::{runtime, Flavor};
use crate::sentinel::{Sentinels, RECHECK};

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How often a subscription that overflowed is looked at, to tell it to catch up once it
/// has room again.
const OVERFLOW_CHECK: Duration = Duration::from_millis(10);

/// Messages one subscription may have queued; their bytes are bounded by
/// `subscription_buffer_bytes`.
pub const QUEUED_MESSAGES: usize = 10_000;

/// What a subscription hears from the hub.
pub enum Event {
    /// Subscribed (again), or room again after an overflow: what was published meanwhile is
    /// only in the log.
    CatchUp,
    Message {
        channel: usize,
        payload: Arc<[u8]>,
    },
}

/// A subscription's queue, as the hub fills it.
pub struct Queue {
    pub events: mpsc::Sender<Event>,
    /// Payload bytes queued, added here and taken off by the subscription.
    pub bytes: Arc<AtomicUsize>,
    pub max_bytes: usize,
}

impl Queue {
    /// Whether the subscription has drained half of what it may hold, in count and bytes.
    fn has_room(&self) -> bool {
        self.events.capacity() >= QUEUED_MESSAGES / 2
            && self.bytes.load(Ordering::Relaxed) <= self.max_bytes / 2
    }
}

enum Command {
    Join {
        id: u64,
        channels: Vec<Vec<u8>>,
        queue: Queue,
        joined: oneshot::Sender<RedisResult<()>>,
    },
    Leave {
        id: u64,
        left: Option<oneshot::Sender<()>>,
    },
}

/// How the hub reaches Redis.
pub enum Dial {
    Single(Box<Client>),
    /// The master the sentinels name at each connect; checked every `RECHECK` meanwhile.
    Sentinel(Arc<Sentinels>),
    /// A cluster connection that subscribes where the channels live and subscribes again by
    /// itself after a failover or resharding; `sharded` for SSUBSCRIBE.
    Cluster {
        nodes: Vec<ConnectionInfo>,
        sharded: bool,
    },
}

/// The hub's connection.
enum PubSubLink {
    Plain {
        sink: PubSubSink,
        stream: PubSubStream,
        /// Where it is connected, to notice that a Sentinel group's master moved.
        address: String,
    },
    Cluster {
        connection: ClusterConnection,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        sharded: bool,
    },
}

/// What the hub's connection brought.
enum Heard {
    Message(Vec<u8>, Vec<u8>),
    /// Subscribed (again): messages of this channel may have been missed before.
    Subscribed(Vec<u8>),
    /// Unsubscribed: by us (a leave), or by the server (its slot moved to another node).
    Unsubscribed(Vec<u8>),
    Lost,
    Nothing,
}

impl PubSubLink {
    async fn next(&mut self) -> Heard {
        match self {
            PubSubLink::Plain { stream, .. } => match stream.next().await {
                Some(message) => Heard::Message(
                    message.get_channel_name().as_bytes().to_vec(),
                    message.get_payload_bytes().to_vec(),
                ),
                None => Heard::Lost,
            },
            PubSubLink::Cluster { pushes, .. } => {
                let Some(push) = pushes.recv().await else {
                    return Heard::Lost;
                };
                // One node's connection dropped. redis-rs subscribes again by itself, but not
                // always where the channel lives now (a failover, a dead node): start afresh.
                if push.kind == PushKind::Disconnection {
                    return Heard::Lost;
                }
                let name = match push.data.first() {
                    Some(Value::BulkString(name)) => name.clone(),
                    _ => return Heard::Nothing,
                };
                match (push.kind, push.data.get(1)) {
                    (PushKind::Message | PushKind::SMessage, Some(Value::BulkString(payload))) => {
                        Heard::Message(name, payload.clone())
                    }
                    (PushKind::Subscribe | PushKind::SSubscribe, _) => Heard::Subscribed(name),
                    (PushKind::Unsubscribe | PushKind::SUnsubscribe, _) => {
                        Heard::Unsubscribed(name)
                    }
                    _ => Heard::Nothing,
                }
            }
        }
    }

    async fn subscribe(&mut self, names: &[&Vec<u8>]) -> RedisResult<()> {
        match self {
            PubSubLink::Plain { sink, .. } => sink.subscribe(names).await,
            PubSubLink::Cluster {
                connection,
                sharded: false,
                ..
            } => connection.subscribe(names).await,
            PubSubLink::Cluster { connection, .. } => {
                // Each shard channel lives on its own slot's node.
                for name in names {
                    connection.ssubscribe(name).await?;
                }
                Ok(())
            }
        }
    }

    async fn unsubscribe(&mut self, names: &[Vec<u8>]) -> RedisResult<()> {
        match self {
            PubSubLink::Plain { sink, .. } => sink.unsubscribe(names).await,
            PubSubLink::Cluster {
                connection,
                sharded: false,
                ..
            } => connection.unsubscribe(names).await,
            PubSubLink::Cluster { connection, .. } => {
                for name in names {
                    connection.sunsubscribe(name).await?;
                }
                Ok(())
            }
        }
    }
}

/// The handle of a log's hub task; dropping it ends the task and closes its connection.
pub struct Hub {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicUsize,
}

impl Hub {
    pub fn start(dial: Dial, connect_timeout: Duration) -> Hub {
        let (commands, received) = mpsc::unbounded_channel();
        runtime(Flavor::Background).spawn(run(dial, connect_timeout, received));
        Hub {
            commands,
            next_id: AtomicUsize::new(0),
        }
    }

    /// Adds a subscription to `channels` (pub/sub names); returns once they are subscribed,
    /// with `Event::CatchUp` first in its queue. Fails if Redis cannot be reached now.
    pub async fn join(&self, channels: Vec<Vec<u8>>, queue: Queue) -> RedisResult<Membership> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let (joined, outcome) = oneshot::channel();
        let command = Command::Join {
            id,
            channels,
            queue,
            joined,
        };
        let stopped = || RedisError::from((redis::ErrorKind::Io, "the pub/sub task stopped"));
        self.commands.send(command).map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())??;
        Ok(Membership {
            id,
            commands: Some(self.commands.clone()),
        })
    }
}

/// A subscription's place in the hub; dropping it leaves.
pub struct Membership {
    id: u64,
    commands: Option<mpsc::UnboundedSender<Command>>,
}

impl Membership {
    /// Leaves, and returns once the hub has unsubscribed what no one else needs (and closed
    /// the connection if no one is left).
    pub async fn leave(mut self) {
        let (left, done) = oneshot::channel();
        if let Some(commands) = self.commands.take() {
            let leave = Command::Leave {
                id: self.id,
                left: Some(left),
            };
            if commands.send(leave).is_ok() {
                let _ = done.await;
            }
        }
    }

    /// A forked child's copy: the hub it names runs in the parent only.
    pub fn forget(mut self) {
        self.commands = None;
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::Leave {
                id: self.id,
                left: None,
            });
        }
    }
}

struct Member {
    queue: Queue,
    channels: Vec<Vec<u8>>,
    /// Missing live messages since its queue filled; told to catch up once it has room.
    overflowed: bool,
}

impl Member {
    fn deliver(&mut self, channel: usize, payload: &Arc<[u8]>) {
        if self.overflowed {
            return;
        }
        // One message larger than the bound still goes through an empty queue.
        let held = self.queue.bytes.load(Ordering::Relaxed);
        if held > 0 && held + payload.len() > self.queue.max_bytes {
            self.overflowed = true;
            return;
        }
        let event = Event::Message {
            channel,
            payload: payload.clone(),
        };
        match self.queue.events.try_send(event) {
            Ok(()) => {
                self.queue.bytes.fetch_add(payload.len(), Ordering::Relaxed);
            }
            // A closed queue is a subscription on its way out: its Leave follows.
            Err(_) => self.overflowed = true,
        }
    }

    fn catch_up(&mut self) {
        self.overflowed = self.queue.events.try_send(Event::CatchUp).is_err();
    }
}

/// The hub's state: its members, who listens to which channel, and the connection.
struct State {
    dial: Dial,
    connect_timeout: Duration,
    members: HashMap<u64, Member>,
    /// Pub/sub name -> the members listening, each with its index for the channel.
    listeners: HashMap<Vec<u8>, Vec<(u64, usize)>>,
    link: Option<PubSubLink>,
    /// While the connection is down and someone listens: when to try again, and the delay
    /// after that.
    retry: Option<(Instant, Duration)>,
}

async fn run(
    dial: Dial,
    connect_timeout: Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let sentinel = matches!(dial, Dial::Sentinel(_));
    let mut state = State {
        dial,
        connect_timeout,
        members: HashMap::new(),
        listeners: HashMap::new(),
        link: None,
        retry: None,
    };
    // Deadlines, not fresh sleeps: a steady flow of messages must not keep putting them off.
    let mut next_overflow_check = Instant::now();
    let mut next_master_check = Instant::now() + RECHECK;
    loop {
        let overflowed = state.members.values().any(|member| member.overflowed);
        if !overflowed {
            next_overflow_check = Instant::now() + OVERFLOW_CHECK;
        }
        let retry_at = state.retry.map(|(at, _)| at);
        let checks_master = sentinel && state.link.is_some();
        let message = async {
            match &mut state.link {
                Some(link) => link.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Join { id, channels, queue, joined }) => {
                    let outcome = state.join(id, channels, queue).await;
                    let _ = joined.send(outcome);
                }
                Some(Command::Leave { id, left }) => {
                    state.leave(id).await;
                    if let Some(left) = left {
                        let _ = left.send(());
                    }
                }
            },
            heard = message => match heard {
                Heard::Message(name, payload) => state.fan_out(&name, &payload),
                Heard::Subscribed(name) => state.catch_up_listeners(&name),
                // Still wanted: the server dropped it (resharding moved its slot).
                Heard::Unsubscribed(name) if state.listeners.contains_key(&name) => state.lost(),
                Heard::Unsubscribed(_) => {}
                Heard::Lost => state.lost(),
                Heard::Nothing => {}
            },
            _ = sleep_until(retry_at) => state.reconnect().await,
            _ = tokio::time::sleep_until(next_overflow_check), if overflowed => {
                next_overflow_check = Instant::now() + OVERFLOW_CHECK;
                for member in state.members.values_mut() {
                    if member.overflowed && member.queue.has_room() {
                        member.catch_up();
                    }
                }
            }
            _ = tokio::time::sleep_until(next_master_check), if checks_master => {
                next_master_check = Instant::now() + RECHECK;
                state.check_master().await;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl State {
    async fn join(&mut self, id: u64, channels: Vec<Vec<u8>>, queue: Queue) -> RedisResult<()> {
        let mut new = Vec::new();
        for (index, name) in channels.iter().enumerate() {
            let listening = self.listeners.entry(name.clone()).or_default();
            if listening.is_empty() {
                new.push(name.clone());
            }
            listening.push((id, index));
        }
        let member = Member {
            queue,
            channels,
            overflowed: false,
        };
        self.members.insert(id, member);
        // Connecting afresh means everyone missed what came meanwhile.
        let subscribed = match &mut self.link {
            Some(_) if new.is_empty() => Ok(false),
            Some(link) => {
                let new: Vec<&Vec<u8>> = new.iter().collect();
                link.subscribe(&new).await.map(|()| false)
            }
            None => self.connect().await.map(|()| true),
        };
        match subscribed {
            Ok(everyone) => {
                if everyone {
                    self.catch_up_all();
                } else if let Some(member) = self.members.get_mut(&id) {
                    member.catch_up();
                }
                Ok(())
            }
            Err(error) => {
                self.forget(id);
                if self.link.is_some() {
                    // The connection broke under the SUBSCRIBE: the others catch up later.
                    self.lost();
                }
                Err(error)
            }
        }
    }

    async fn leave(&mut self, id: u64) {
        let gone = self.forget(id);
        if self.members.is_empty() {
            // No one listens: close the connection (ending the subscriptions with it).
            self.link = None;
            self.retry = None;
        } else if let (Some(link), false) = (&mut self.link, gone.is_empty()) {
            let _ = link.unsubscribe(&gone).await;
        }
    }

    /// Removes a member; returns the channels no one listens to any more.
    fn forget(&mut self, id: u64) -> Vec<Vec<u8>> {
        let Some(member) = self.members.remove(&id) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for name in member.channels {
            if let Some(listening) = self.listeners.get_mut(&name) {
                listening.retain(|(listener, _)| *listener != id);
                if listening.is_empty() {
                    self.listeners.remove(&name);
                    gone.push(name);
                }
            }
        }
        gone
    }

    fn fan_out(&mut self, name: &[u8], payload: &[u8]) {
        let Some(listening) = self.listeners.get(name) else {
            return;
        };
        let payload: Arc<[u8]> = payload.into();
        for (id, channel) in listening {
            if let Some(member) = self.members.get_mut(id) {
                member.deliver(*channel, &payload);
            }
        }
    }

    /// The connection dropped: reconnect soon, if anyone listens.
    fn lost(&mut self) {
        self.link = None;
        self.retry = (!self.members.is_empty()).then(|| (Instant::now(), FIRST_RETRY_DELAY));
    }

    async fn reconnect(&mut self) {
        match self.connect().await {
            Ok(()) => self.catch_up_all(),
            Err(_) => {
                let (_, delay) = self.retry.unwrap_or((Instant::now(), FIRST_RETRY_DELAY));
                self.retry = Some((Instant::now() + delay, (delay * 2).min(MAX_RETRY_DELAY)));
            }
        }
    }

    /// Connects and subscribes every channel someone listens to.
    async fn connect(&mut self) -> RedisResult<()> {
        let names: Vec<&Vec<u8>> = self.listeners.keys().collect();
        let connected = tokio::time::timeout(self.connect_timeout, async {
            let (client, address) = match &self.dial {
                Dial::Single(client) => ((**client).clone(), String::new()),
                Dial::Sentinel(sentinels) => {
                    let master = sentinels.master(Duration::ZERO).await?;
                    let address = master.addr().to_string();
                    (Client::open(master)?, address)
                }
                Dial::Cluster { nodes, sharded } => {
                    let (pushed, pushes) = mpsc::unbounded_channel();
                    let client = ClusterClientBuilder::new(nodes.clone())
                        .use_protocol(redis::ProtocolVersion::RESP3)
                        .push_sender(pushed)
                        .connection_timeout(self.connect_timeout)
                        .build()?;
                    let mut link = PubSubLink::Cluster {
                        connection: client.get_async_connection().await?,
                        pushes,
                        sharded: *sharded,
                    };
                    if !names.is_empty() {
                        link.subscribe(&names).await?;
                    }
                    return RedisResult::Ok(link);
                }
            };
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            if !names.is_empty() {
                sink.subscribe(&names).await?;
            }
            RedisResult::Ok(PubSubLink::Plain {
                sink,
                stream,
                address,
            })
        })
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from((
                redis::ErrorKind::Io,
                "timed out connecting",
            )))
        })?;
        self.link = Some(connected);
        self.retry = None;
        Ok(())
    }

    /// A Sentinel group's master moved away from the connection: connect to the new one.
    async fn check_master(&mut self) {
        let (Dial::Sentinel(sentinels), Some(PubSubLink::Plain { address, .. })) =
            (&self.dial, &self.link)
        else {
            return;
        };
        if let Ok(master) = sentinels.master(RECHECK).await {
            if master.addr().to_string() != *address {
                self.lost();
            }
        }
    }

    fn catch_up_listeners(&mut self, name: &[u8]) {
        let Some(listening) = self.listeners.get(name) else {
            return;
        };
        for (id, _) in listening {
            if let Some(member) = self.members.get_mut(id) {
                member.catch_up();
            }
        }
    }

    fn catch_up_all(&mut self) {
        for member in self.members.values_mut() {
            member.catch_up();
        }
    }
}
