//! A live subscription that first replays what a client missed, then streams, with no gap
//! and no duplicate.
//!
//! Order of work: SUBSCRIBE first, buffer what arrives, replay the log from each cursor,
//! then deliver the buffered and live messages that follow the cursor. Every message is
//! published and stored in one atomic step, so a message is either in the log the replay
//! reads or arrives on the subscription after it: none falls between.
//!
//! Each stored message names the one before it (`prev`, see `message.rs`). A live message that does not follow
//! the last one delivered means something was missed (the pub/sub connection dropped, this
//! consumer fell behind, Redis lost its data): the log is read again from the cursor, which
//! either fills the hole or reports a gap. When the connection drops, the hub (`hub.rs`, the
//! pub/sub connection this subscription shares with the others of its log) reconnects and
//! subscribes again, and asks for that same catch-up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::connection::Flavor;
use crate::errors::Failure;
use crate::hub::{Event, Membership, Queue, QUEUED_MESSAGES};
use crate::message;
use crate::store::{ChannelKeys, ReplayRequest, Since, Store};

const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(20);

/// The messages a catch-up reads from one log in one request: a cursor far behind is read in
/// pages, each delivered before the next is read, so Redis is never held long and the
/// consumer's queue stays small.
const CATCH_UP_PAGE: u64 = 1_000;

/// What the consumer gets, in order.
pub enum Delivery {
    Message {
        channel: usize,
        payload: Arc<[u8]>,
    },
    /// Messages after `since` on this channel are gone and cannot be replayed; the
    /// subscription goes on from `resume`, the newest timestamp, in history `epoch`.
    Gap {
        channel: usize,
        since: i64,
        resume: i64,
        epoch: String,
    },
}

/// The outcome of waiting for the next delivery.
pub enum Next {
    Delivery(Delivery),
    /// Nothing came within the wait.
    Idle,
    /// The subscription was closed.
    Closed,
}

/// Where a channel stands: the last message delivered, and the epoch of its log.
#[derive(Clone, Default)]
struct Position {
    /// None until the first catch-up: then "from now".
    cursor: Option<i64>,
    epoch: String,
}

/// A channel to subscribe to: its name, the cursor to replay from (None: from now), and the
/// epoch the client last saw ("" if none).
pub struct Request {
    pub channel: String,
    pub since: Option<i64>,
    pub epoch: String,
}

pub struct Subscription {
    store: Arc<Store>,
    pub names: Vec<String>,
    /// Where the stream starts, per channel: the cursor asked for (or the newest timestamp
    /// at subscribe time), and the epoch asked for (or the log's). A client that received
    /// nothing resumes from here without loss.
    pub start: Vec<(i64, String)>,
    keys: Vec<ChannelKeys>,
    positions: Vec<Position>,
    events: mpsc::Receiver<Event>,
    /// Payload bytes in `events`, added by the hub and taken off here.
    pub buffered_bytes: Arc<AtomicUsize>,
    ready: VecDeque<Delivery>,
    /// Set when the log must be read again. A catch-up is never cut short by a wait, and
    /// one that fails (Redis unreachable) is tried again, so nothing is lost either way.
    catch_up_pending: bool,
    retry_delay: Duration,
}

impl Subscription {
    /// Subscribes to every channel (on the log's shared pub/sub connection, see `hub`) and
    /// reads the logs from the cursors; returns once that is done, or fails within the
    /// connect timeout. Dropping the returned membership leaves the hub.
    pub async fn open(
        store: Arc<Store>,
        channels: Vec<Request>,
    ) -> Result<(Subscription, Membership), Failure> {
        let keys: Vec<ChannelKeys> = channels
            .iter()
            .map(|request| store.layout.channel_keys(&request.channel))
            .collect();
        let pubsub_names: Vec<Vec<u8>> = keys.iter().map(|k| k.pubsub.clone()).collect();
        let (sender, events) = mpsc::channel(QUEUED_MESSAGES);
        let buffered_bytes = Arc::new(AtomicUsize::new(0));
        let queue = Queue {
            events: sender,
            bytes: buffered_bytes.clone(),
            max_bytes: store.settings().subscription_buffer_bytes,
        };
        let hub = store
            .connection()
            .hub()
            .map_err(|e| store.failure(&e, "subscribe"))?;
        let membership = hub
            .join(pubsub_names, queue)
            .await
            .map_err(|e| store.failure(&e, "subscribe"))?;
        let names = channels.iter().map(|r| r.channel.clone()).collect();
        let requested: Vec<(Option<i64>, String)> = channels
            .into_iter()
            .map(|request| (request.since, request.epoch))
            .collect();
        let positions = requested
            .iter()
            .map(|(cursor, epoch)| Position {
                cursor: *cursor,
                epoch: epoch.clone(),
            })
            .collect();
        let mut subscription = Subscription {
            store,
            names,
            start: Vec::new(),
            keys,
            positions,
            events,
            buffered_bytes,
            ready: VecDeque::new(),
            catch_up_pending: false,
            retry_delay: FIRST_RETRY_DELAY,
        };
        // Read the logs now, not at the first `next`: "from now" means from the subscription.
        if let Some(Event::CatchUp) = subscription.events.recv().await {
            if let Err(failure) = subscription.catch_up().await {
                membership.leave().await;
                return Err(failure);
            }
        }
        subscription.start = requested
            .into_iter()
            .zip(&subscription.positions)
            .map(|((cursor, epoch), now)| {
                let cursor = cursor.or(now.cursor).unwrap_or(0);
                let epoch = if epoch.is_empty() {
                    now.epoch.clone()
                } else {
                    epoch
                };
                (cursor, epoch)
            })
            .collect();
        Ok((subscription, membership))
    }

    /// The next delivery, waiting at most `wait` (None: as long as it takes).
    pub async fn next(&mut self, wait: Option<Duration>) -> Next {
        let deadline = wait.map(|wait| Instant::now() + wait);
        loop {
            if let Some(delivery) = self.ready.pop_front() {
                return Next::Delivery(delivery);
            }
            if self.catch_up_pending {
                if self.catch_up().await.is_ok() {
                    self.retry_delay = FIRST_RETRY_DELAY;
                    continue;
                }
                // Redis is unreachable; the hub is reconnecting too. Try again soon.
                let pause = Instant::now() + self.retry_delay;
                self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY_DELAY);
                match deadline {
                    Some(deadline) if deadline <= pause => {
                        tokio::time::sleep_until(deadline).await;
                        return Next::Idle;
                    }
                    _ => tokio::time::sleep_until(pause).await,
                }
                continue;
            }
            let event = match deadline {
                None => self.events.recv().await,
                Some(deadline) => match tokio::time::timeout_at(deadline, self.events.recv()).await
                {
                    Ok(event) => event,
                    Err(_) => return Next::Idle,
                },
            };
            match event {
                None => return Next::Closed,
                Some(Event::CatchUp) => self.catch_up_pending = true,
                Some(Event::Message { channel, payload }) => {
                    if let Some(delivery) = self.accept(channel, payload) {
                        return Next::Delivery(delivery);
                    }
                }
            }
        }
    }

    /// The next delivery and whatever else is ready without waiting; empty once closed.
    pub async fn next_batch(&mut self) -> Vec<Delivery> {
        let Next::Delivery(first) = self.next(None).await else {
            return Vec::new();
        };
        let mut batch = vec![first];
        batch.extend(self.ready.drain(..));
        while !self.catch_up_pending {
            match self.events.try_recv() {
                Ok(Event::CatchUp) => self.catch_up_pending = true,
                Ok(Event::Message { channel, payload }) => {
                    batch.extend(self.accept(channel, payload));
                }
                Err(_) => break,
            }
        }
        batch
    }

    /// A live message, if it is the one that follows the cursor. One already delivered by a
    /// replay is dropped; any other means a hole, and the log is read again.
    fn accept(&mut self, channel: usize, payload: Arc<[u8]>) -> Option<Delivery> {
        self.buffered_bytes
            .fetch_sub(payload.len(), Ordering::Relaxed);
        // A message without a timestamp is not replaylog's: nothing to order it by.
        let timestamp = message::timestamp(&payload)?;
        let position = &mut self.positions[channel];
        let Some(cursor) = position.cursor else {
            position.cursor = Some(timestamp);
            return Some(Delivery::Message { channel, payload });
        };
        let prev = message::prev(&payload);
        if prev == Some(cursor) {
            position.cursor = Some(timestamp);
            return Some(Delivery::Message { channel, payload });
        }
        // An older message with a link is one a replay already delivered. Anything else
        // leaves a hole: the catch-up reads this message from the log too (stored first).
        if timestamp > cursor || prev.is_none() {
            self.catch_up_pending = true;
        }
        None
    }

    /// Reads each channel's log past its cursor; queues the messages, or a gap.
    async fn catch_up(&mut self) -> Result<(), Failure> {
        let requests: Vec<ReplayRequest> = self
            .keys
            .iter()
            .zip(&self.positions)
            .map(|(keys, position)| ReplayRequest {
                keys: keys.clone(),
                // No cursor yet: only the newest timestamp is wanted, as the starting point.
                since: position
                    .cursor
                    .map_or(Since::Float(f64::INFINITY), Since::Int),
                epoch: position.epoch.clone(),
            })
            .collect();
        let store = self.store.clone();
        let replays = store
            .call(Flavor::Background, "subscribe", |manager| {
                store.replay(manager, &requests, Some(CATCH_UP_PAGE))
            })
            .await?;
        // Nothing below can fail: this page of the catch-up is done once, wholly.
        self.catch_up_pending = false;
        for (channel, replayed) in replays.into_iter().enumerate() {
            let position = &mut self.positions[channel];
            let latest = replayed.latest.unwrap_or(0);
            position.epoch = replayed.epoch;
            let Some(cursor) = position.cursor else {
                position.cursor = Some(latest);
                continue;
            };
            if !replayed.complete {
                self.ready.push_back(Delivery::Gap {
                    channel,
                    since: cursor,
                    resume: latest,
                    epoch: position.epoch.clone(),
                });
                // The caller reloads its state as of now: go on from the newest message of
                // the log as it is (after FLUSHALL that may be below the old cursor).
                position.cursor = Some(latest);
                continue;
            }
            // A full page: the rest is read once this one is delivered (live messages
            // meanwhile do not follow the cursor, so they wait in the log too).
            if replayed.messages.len() as u64 == CATCH_UP_PAGE {
                self.catch_up_pending = true;
            }
            for payload in replayed.messages {
                if let Some(timestamp) = message::timestamp(&payload) {
                    position.cursor = Some(timestamp);
                }
                self.ready.push_back(Delivery::Message {
                    channel,
                    payload: payload.into(),
                });
            }
        }
        Ok(())
    }
}
