//! A live subscription that first replays what a client missed, then streams, with no gap
//! and no duplicate.
//!
//! Order of work: SUBSCRIBE first, buffer what arrives, replay the log from each cursor,
//! then deliver the buffered and live messages whose timestamp is past the cursor. Every
//! message is published and stored in one atomic step, so a message is either in the log
//! the replay reads or arrives on the subscription after it: none falls between. When the
//! pub/sub connection drops, a background task reconnects and subscribes again, and the
//! hole is filled from the log the same way.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::{Client, IntoConnectionInfo, RedisResult};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::connection::{runtime, Flavor};
use crate::errors::Failure;
use crate::store::{ChannelKeys, Since, Store};

const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What the pub/sub task reports.
enum Event {
    /// Subscribed (again): what was published while unsubscribed is only in the log.
    Subscribed,
    Message {
        channel: usize,
        payload: Vec<u8>,
    },
}

/// What the consumer gets, in order.
pub enum Delivery {
    Message {
        channel: usize,
        payload: Vec<u8>,
    },
    /// Messages after `since` on this channel are gone and cannot be replayed.
    Gap {
        channel: usize,
        since: i64,
    },
}

pub struct Subscription {
    store: Arc<Store>,
    pub names: Vec<String>,
    keys: Vec<ChannelKeys>,
    /// The timestamp of the last message delivered per channel; None: start from now.
    cursors: Vec<Option<i64>>,
    events: mpsc::UnboundedReceiver<Event>,
    ready: VecDeque<Delivery>,
    /// Set when a (re)subscription happened and the log has not been read since. It stays
    /// set if the read is interrupted, so `next` stays safe to cancel.
    catch_up_pending: bool,
}

impl Subscription {
    /// Subscribes to every channel; returns once Redis confirmed, or fails within the
    /// connect timeout. Aborting the returned handle closes the pub/sub connection.
    pub async fn open(
        store: Arc<Store>,
        channels: Vec<(String, Option<i64>)>,
    ) -> Result<(Subscription, JoinHandle<()>), Failure> {
        let settings = store.settings().clone();
        let client = settings
            .url
            .as_str()
            .into_connection_info()
            .and_then(Client::open)
            .map_err(|e| store.failure(&e, "subscribe"))?;
        let keys: Vec<ChannelKeys> = channels
            .iter()
            .map(|(name, _)| store.layout.channel_keys(name))
            .collect();
        let pubsub_names: Vec<Vec<u8>> = keys.iter().map(|k| k.pubsub.clone()).collect();
        let (sender, events) = mpsc::unbounded_channel();
        let (first, first_result) = oneshot::channel();
        let listener = runtime(Flavor::Background).spawn(listen(
            client,
            pubsub_names,
            settings.connect_timeout,
            sender,
            first,
        ));
        let subscribed = first_result.await.unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the subscription task stopped",
            )))
        });
        if let Err(e) = subscribed {
            listener.abort();
            return Err(store.failure(&e, "subscribe"));
        }
        let (names, cursors) = channels.into_iter().unzip();
        let mut subscription = Subscription {
            store,
            names,
            keys,
            cursors,
            events,
            ready: VecDeque::new(),
            catch_up_pending: false,
        };
        // Read the logs now, not at the first `next`: "from now" means from the subscription.
        if let Some(Event::Subscribed) = subscription.events.recv().await {
            if let Err(failure) = subscription.catch_up().await {
                listener.abort();
                return Err(failure);
            }
        }
        Ok((subscription, listener))
    }

    /// The next delivery and whatever else is ready without waiting; empty once closed.
    pub async fn next_batch(&mut self) -> Result<Vec<Delivery>, Failure> {
        let Some(first) = self.next().await? else {
            return Ok(Vec::new());
        };
        let mut batch = vec![first];
        batch.extend(self.ready.drain(..));
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Subscribed => {
                    // A catch-up needs a round trip: leave it for the next batch.
                    self.catch_up_pending = true;
                    break;
                }
                Event::Message { channel, payload } => {
                    if let Some(delivery) = self.accept(channel, payload) {
                        batch.push(delivery);
                    }
                }
            }
        }
        Ok(batch)
    }

    /// A live message, unless the replay already delivered it.
    fn accept(&mut self, channel: usize, payload: Vec<u8>) -> Option<Delivery> {
        // A message without a timestamp is not replaylog's: nothing to order it by.
        let timestamp = message_timestamp(&payload)?;
        if self.cursors[channel].is_some_and(|cursor| timestamp <= cursor) {
            return None;
        }
        self.cursors[channel] = Some(timestamp);
        Some(Delivery::Message { channel, payload })
    }

    /// The next message or gap; None once the subscription is closed.
    pub async fn next(&mut self) -> Result<Option<Delivery>, Failure> {
        loop {
            if let Some(delivery) = self.ready.pop_front() {
                return Ok(Some(delivery));
            }
            if self.catch_up_pending {
                self.catch_up().await?;
                continue;
            }
            match self.events.recv().await {
                None => return Ok(None),
                Some(Event::Subscribed) => self.catch_up_pending = true,
                Some(Event::Message { channel, payload }) => {
                    if let Some(delivery) = self.accept(channel, payload) {
                        return Ok(Some(delivery));
                    }
                }
            }
        }
    }

    /// Reads each channel's log past its cursor; queues the messages, or a gap.
    async fn catch_up(&mut self) -> Result<(), Failure> {
        let requests: Vec<(ChannelKeys, Since)> = self
            .keys
            .iter()
            .zip(&self.cursors)
            .map(|(keys, cursor)| {
                // No cursor yet: only the newest timestamp is wanted, as the starting point.
                let since = cursor.map_or(Since::Float(f64::INFINITY), Since::Int);
                (keys.clone(), since)
            })
            .collect();
        let store = self.store.clone();
        let replays = store
            .call(Flavor::Background, "subscribe", |manager| {
                store.replay(manager, &requests, None, "")
            })
            .await?;
        for (channel, replayed) in replays.into_iter().enumerate() {
            let Some(cursor) = self.cursors[channel] else {
                self.cursors[channel] = Some(replayed.latest.unwrap_or(0));
                continue;
            };
            if !replayed.complete {
                self.ready.push_back(Delivery::Gap {
                    channel,
                    since: cursor,
                });
                // The caller reloads its state as of now; go on from the newest message.
                self.cursors[channel] = Some(replayed.latest.unwrap_or(cursor).max(cursor));
                continue;
            }
            for payload in replayed.messages {
                if let Some(timestamp) = message_timestamp(&payload) {
                    self.cursors[channel] = Some(timestamp);
                }
                self.ready.push_back(Delivery::Message { channel, payload });
            }
        }
        self.catch_up_pending = false;
        Ok(())
    }
}

/// Keeps a pub/sub connection subscribed, reconnecting with backoff, and forwards what
/// arrives. The first attempt's outcome goes to `first`; later failures only delay.
async fn listen(
    client: Client,
    pubsub_names: Vec<Vec<u8>>,
    connect_timeout: Duration,
    events: mpsc::UnboundedSender<Event>,
    first: oneshot::Sender<RedisResult<()>>,
) {
    let index: HashMap<Vec<u8>, usize> = pubsub_names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), i))
        .collect();
    let mut first = Some(first);
    let mut delay = Duration::from_millis(20);
    loop {
        let attempt = tokio::time::timeout(connect_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&pubsub_names).await?;
            RedisResult::Ok(pubsub)
        })
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "timed out connecting",
            )))
        });
        let mut pubsub = match attempt {
            Ok(pubsub) => pubsub,
            Err(error) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(error));
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                continue;
            }
        };
        delay = Duration::from_millis(20);
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        if events.send(Event::Subscribed).is_err() {
            return;
        }
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Some(&channel) = index.get(message.get_channel_name().as_bytes()) else {
                continue;
            };
            let payload = message.get_payload_bytes().to_vec();
            if events.send(Event::Message { channel, payload }).is_err() {
                return;
            }
        }
        // The stream ended: the connection dropped. Subscribe again, then catch up.
    }
}

/// The `"timestamp":N` that ends a stored message, without parsing the rest.
pub fn message_timestamp(payload: &[u8]) -> Option<i64> {
    const FIELD: &[u8] = b"\"timestamp\":";
    let start = payload
        .windows(FIELD.len())
        .rposition(|window| window == FIELD)?
        + FIELD.len();
    let digits: Vec<u8> = payload[start..]
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| b.is_ascii_digit() || *b == b'-')
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::message_timestamp;

    #[test]
    fn timestamp_of_compact_and_article_json() {
        let ours = br#"{"event_name":"e","content":{"timestamp":1},"timestamp":1700000000123}"#;
        assert_eq!(message_timestamp(ours), Some(1_700_000_000_123));
        let article = br#"{"event_name": "e", "content": 5, "timestamp": 1700000000456}"#;
        assert_eq!(message_timestamp(article), Some(1_700_000_000_456));
        assert_eq!(message_timestamp(b"not json"), None);
    }
}
