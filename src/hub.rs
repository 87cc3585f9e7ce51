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
use redis::{Client, RedisError, RedisResult};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::connection::{runtime, Flavor};

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

/// The handle of a log's hub task; dropping it ends the task and closes its connection.
pub struct Hub {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicUsize,
}

impl Hub {
    pub fn start(client: Client, connect_timeout: Duration) -> Hub {
        let (commands, received) = mpsc::unbounded_channel();
        runtime(Flavor::Background).spawn(run(client, connect_timeout, received));
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
    client: Client,
    connect_timeout: Duration,
    members: HashMap<u64, Member>,
    /// Pub/sub name -> the members listening, each with its index for the channel.
    listeners: HashMap<Vec<u8>, Vec<(u64, usize)>>,
    link: Option<(PubSubSink, PubSubStream)>,
    /// While the connection is down and someone listens: when to try again, and the delay
    /// after that.
    retry: Option<(Instant, Duration)>,
}

async fn run(
    client: Client,
    connect_timeout: Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut state = State {
        client,
        connect_timeout,
        members: HashMap::new(),
        listeners: HashMap::new(),
        link: None,
        retry: None,
    };
    loop {
        let overflowed = state.members.values().any(|member| member.overflowed);
        let retry_at = state.retry.map(|(at, _)| at);
        let message = async {
            match &mut state.link {
                Some((_, stream)) => stream.next().await,
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
            message = message => match message {
                Some(message) => state.fan_out(message.get_channel_name().as_bytes(), message.get_payload_bytes()),
                None => state.lost(),
            },
            _ = sleep_until(retry_at) => state.reconnect().await,
            _ = tokio::time::sleep(OVERFLOW_CHECK), if overflowed => {
                for member in state.members.values_mut() {
                    if member.overflowed && member.queue.has_room() {
                        member.catch_up();
                    }
                }
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
            Some((sink, _)) => sink.subscribe(&new).await.map(|()| false),
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
        } else if let (Some((sink, _)), false) = (&mut self.link, gone.is_empty()) {
            let _ = sink.unsubscribe(&gone).await;
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
            let (mut sink, stream) = self.client.get_async_pubsub().await?.split();
            sink.subscribe(&names).await?;
            RedisResult::Ok((sink, stream))
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

    fn catch_up_all(&mut self) {
        for member in self.members.values_mut() {
            member.catch_up();
        }
    }
}
