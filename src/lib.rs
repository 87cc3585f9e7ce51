//! The `replaylog._native` module: argument conversion, releasing the GIL, error mapping.
//! The work is done in plain Rust modules: `json`, `store`, `subscription`, `connection`.

mod aio;
mod bulk;
mod connection;
mod convert;
mod errors;
mod hub;
mod json;
mod link;
mod process_local;
mod sentinel;
mod store;
mod subscription;
mod target;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::link::Link;
use pyo3::exceptions::{PyRecursionError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use redis::RedisResult;
use tokio::task::JoinHandle;

use connection::{runtime, Connection, Flavor, Settings};
use convert::{
    channel_str, is_unreadable, json_loads, log_unreadable, messages_to_python, parse_limit,
    parse_since, triple, type_name,
};
use errors::{python_error, Failure};
use hub::Membership;
use json::Encoder;
use store::{Broadcasted, Layout, Limits, Outgoing, ReplayRequest, Store};
use subscription::{message_prev, message_timestamp, Delivery, Next, Request, Subscription};

/// `(loop, future)`: run asynchronously and resolve `future` on `loop` with the result.
type Aio<'py> = Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>;

/// One replay log: a Redis URL, key layout and limits, and this process's connection.
#[pyclass(module = "replaylog._native", frozen)]
struct NativeLog {
    store: Arc<Store>,
}

#[pymethods]
impl NativeLog {
    #[new]
    #[pyo3(signature = (
        url, masked_url, *, connect_timeout, response_timeout, busy_poll_us,
        subscription_buffer_bytes, sharded_pubsub, channel_prefix,
        log_prefix, meta_prefix, idempotency_prefix, cluster_keys, expire_ms, max_len,
        idempotency_window_ms, min_replicas, replica_timeout_ms
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: &str,
        masked_url: String,
        connect_timeout: f64,
        response_timeout: f64,
        busy_poll_us: u64,
        subscription_buffer_bytes: usize,
        sharded_pubsub: bool,
        channel_prefix: String,
        log_prefix: String,
        meta_prefix: String,
        idempotency_prefix: String,
        cluster_keys: bool,
        expire_ms: i64,
        max_len: u64,
        idempotency_window_ms: i64,
        min_replicas: u32,
        replica_timeout_ms: u64,
    ) -> PyResult<NativeLog> {
        let settings = Settings {
            url: url.to_owned(),
            connect_timeout: seconds(connect_timeout)?,
            response_timeout: seconds(response_timeout)?,
            busy_poll: Duration::from_micros(busy_poll_us),
            subscription_buffer_bytes,
            sharded_pubsub,
        };
        let connection = Connection::new(settings).map_err(|e| {
            let reason = e.detail().unwrap_or(e.category()).replace(url, &masked_url);
            let message = format!("invalid Redis URL {masked_url}: {reason}");
            python_error(py, "ConfigurationError", (message,))
        })?;
        let layout = Layout {
            channel_prefix,
            log_prefix,
            meta_prefix,
            idempotency_prefix,
            cluster_keys,
            sharded_pubsub,
        };
        let limits = Limits {
            expire_ms,
            max_len,
            idempotency_window_ms,
            min_replicas,
            replica_timeout_ms,
        };
        Ok(NativeLog {
            store: Arc::new(Store::new(connection, masked_url, layout, limits)),
        })
    }

    /// Publishes and stores one message; returns its timestamp.
    #[pyo3(signature = (channel, event_name, content, default=None, idempotency_key=None, *, aio=None))]
    #[allow(clippy::too_many_arguments)]
    fn broadcast(
        &self,
        py: Python<'_>,
        channel: &Bound<'_, PyAny>,
        event_name: &Bound<'_, PyAny>,
        content: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
        idempotency_key: Option<&Bound<'_, PyAny>>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        let message = self.encode(channel, event_name, content, default, idempotency_key)?;
        let wanted = self.wanted_replicas();
        self.dispatch(
            py,
            "broadcast",
            aio,
            move |store, manager| async move { store.broadcast(manager, &[message]).await },
            move |py, broadcasted| {
                let timestamps = replicated(py, broadcasted, wanted)?;
                Ok(timestamps[0].into_pyobject(py)?.into_any().unbind())
            },
        )
    }

    /// Broadcasts `(channel, event_name, content)` items in one round trip.
    #[pyo3(signature = (items, default=None, *, aio=None))]
    fn broadcast_many(
        &self,
        py: Python<'_>,
        items: &Bound<'_, PyList>,
        default: Option<&Bound<'_, PyAny>>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        // Everything is serialized before anything is sent: one bad item writes nothing.
        let mut messages = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let message = triple(&item).and_then(|(channel, event_name, content)| {
                self.encode(&channel, &event_name, &content, default, None)
            });
            messages.push(message.map_err(|e| naming_item(py, e, index))?);
        }
        let wanted = self.wanted_replicas();
        self.dispatch(
            py,
            "broadcast_many",
            aio,
            move |store, manager| async move { store.broadcast(manager, &messages).await },
            move |py, broadcasted| {
                let timestamps = replicated(py, broadcasted, wanted)?;
                Ok(timestamps.into_pyobject(py)?.into_any().unbind())
            },
        )
    }

    /// Messages of `channel` newer than `since`, oldest first: dicts, or with `raw` the JSON.
    #[pyo3(signature = (channel, since, raw, limit, *, aio=None))]
    fn unspool(
        &self,
        py: Python<'_>,
        channel: &Bound<'_, PyAny>,
        since: &Bound<'_, PyAny>,
        raw: bool,
        limit: Option<&Bound<'_, PyAny>>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        let request = (
            self.store.layout.channel_keys(&channel_str(channel)?),
            parse_since(since)?,
        );
        let limit = parse_limit(limit)?;
        self.run(
            py,
            aio,
            move |store, flavor| async move {
                store.unspool(flavor, "unspool", &[request], limit).await
            },
            move |py, replies| {
                let messages = replies.arrays().next().into_iter().flatten();
                Ok(messages_to_python(py, messages, raw)?.0.into_any().unbind())
            },
        )
    }

    /// `unspool` for many `(channel, since)` pairs in one round trip: `{channel: messages}`.
    #[pyo3(signature = (cursors, raw, limit, *, aio=None))]
    fn unspool_many(
        &self,
        py: Python<'_>,
        cursors: &Bound<'_, PyList>,
        raw: bool,
        limit: Option<&Bound<'_, PyAny>>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        let mut channels = Vec::with_capacity(cursors.len());
        let mut requests = Vec::with_capacity(cursors.len());
        for pair in cursors.iter() {
            let pair = pair.cast_into::<PyTuple>()?;
            let channel = pair.get_item(0)?;
            requests.push((
                self.store.layout.channel_keys(&channel_str(&channel)?),
                parse_since(&pair.get_item(1)?)?,
            ));
            channels.push(channel.unbind());
        }
        let limit = parse_limit(limit)?;
        self.run(
            py,
            aio,
            move |store, flavor| async move {
                store
                    .unspool(flavor, "unspool_many", &requests, limit)
                    .await
            },
            move |py, replies| {
                let result = PyDict::new(py);
                for (channel, messages) in channels.into_iter().zip(replies.arrays()) {
                    result.set_item(channel, messages_to_python(py, messages, raw)?.0)?;
                }
                Ok(result.into_any().unbind())
            },
        )
    }

    /// `unspool` plus completeness: `(complete, messages, epoch)`.
    #[pyo3(signature = (channel, since, raw, limit, epoch=None, *, aio=None))]
    #[allow(clippy::too_many_arguments)]
    fn replay(
        &self,
        py: Python<'_>,
        channel: &Bound<'_, PyAny>,
        since: &Bound<'_, PyAny>,
        raw: bool,
        limit: Option<&Bound<'_, PyAny>>,
        epoch: Option<String>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        let request = ReplayRequest {
            keys: self.store.layout.channel_keys(&channel_str(channel)?),
            since: parse_since(since)?,
            epoch: epoch.unwrap_or_default(),
        };
        let limit = parse_limit(limit)?;
        self.dispatch(
            py,
            "replay",
            aio,
            move |store, manager| async move { store.replay(manager, &[request], limit).await },
            move |py, mut replays| {
                let replayed = replays.pop().unwrap_or_default();
                let epoch = (!replayed.epoch.is_empty()).then_some(replayed.epoch);
                let messages = replayed.messages.iter().map(Vec::as_slice);
                let (messages, unreadable) = messages_to_python(py, messages, raw)?;
                // A message the client cannot read is one it missed.
                let complete = replayed.complete && unreadable == 0;
                Ok((complete, messages, epoch)
                    .into_pyobject(py)?
                    .into_any()
                    .unbind())
            },
        )
    }

    /// Trims entries older than `expire_ms` from every log, or from those of the channels
    /// matching the glob `channels`; returns how many it removed.
    #[pyo3(signature = (expire_ms, channels=None, *, aio=None))]
    fn prune(
        &self,
        py: Python<'_>,
        expire_ms: i64,
        channels: Option<String>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        self.dispatch(
            py,
            store::PRUNE,
            aio,
            move |store, manager| async move {
                store.prune(manager, expire_ms, channels.as_deref()).await
            },
            |py, removed| Ok(removed.into_pyobject(py)?.into_any().unbind()),
        )
    }

    /// Trims entries older than `expire_ms` from one channel's log; returns how many.
    #[pyo3(signature = (channel, expire_ms, *, aio=None))]
    fn prune_log(
        &self,
        py: Python<'_>,
        channel: &Bound<'_, PyAny>,
        expire_ms: i64,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        let keys = self.store.layout.channel_keys(&channel_str(channel)?);
        self.dispatch(
            py,
            "prune_replay_logs",
            aio,
            move |store, manager| async move { store.prune_log(manager, &keys, expire_ms).await },
            |py, removed| Ok(removed.into_pyobject(py)?.into_any().unbind()),
        )
    }

    /// Deletes one channel's log and bookkeeping; returns how many messages it held.
    #[pyo3(signature = (channel, *, aio=None))]
    fn delete_log(
        &self,
        py: Python<'_>,
        channel: &Bound<'_, PyAny>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        let keys = self.store.layout.channel_keys(&channel_str(channel)?);
        self.dispatch(
            py,
            "delete_log",
            aio,
            move |store, manager| async move { store.delete(manager, &keys).await },
            |py, count| Ok(count.into_pyobject(py)?.into_any().unbind()),
        )
    }

    /// One SCAN step over the logs (see `Store::scan_logs`): `(next_cursor, redis_now_ms,
    /// [(key, count, oldest, newest, ttl_ms, memory)])`.
    #[pyo3(signature = (cursor, channels=None, expire_ms=None, dry_run=false))]
    fn scan_logs(
        &self,
        py: Python<'_>,
        cursor: u64,
        channels: Option<String>,
        expire_ms: Option<i64>,
        dry_run: bool,
    ) -> PyResult<Py<PyAny>> {
        self.dispatch(
            py,
            "scan_logs",
            None,
            move |store, manager| async move {
                store
                    .scan_logs(manager, cursor, channels.as_deref(), expire_ms, dry_run)
                    .await
            },
            |py, (next, now, logs)| {
                let logs: Vec<_> = logs
                    .into_iter()
                    .map(|log| {
                        let key = PyBytes::new(py, &log.key);
                        (
                            key, log.count, log.oldest, log.newest, log.ttl_ms, log.memory,
                        )
                    })
                    .collect();
                Ok((next, now, logs).into_pyobject(py)?.into_any().unbind())
            },
        )
    }

    /// Subscribes to `(channel, since or None)` pairs; see `subscription.rs`.
    #[pyo3(signature = (channels, *, aio=None))]
    fn subscribe(
        &self,
        py: Python<'_>,
        channels: &Bound<'_, PyList>,
        aio: Aio<'_>,
    ) -> PyResult<Py<PyAny>> {
        let mut requests = Vec::with_capacity(channels.len());
        for triple in channels.iter() {
            let triple = triple.cast_into::<PyTuple>()?;
            let channel = channel_str(&triple.get_item(0)?)?.into_owned();
            let epoch: Option<String> = triple.get_item(2)?.extract()?;
            let since = triple.get_item(1)?;
            let since = if since.is_none() {
                None
            } else {
                Some(since.extract::<i64>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "since must be an int or None, not {}",
                        type_name(&since)
                    ))
                })?)
            };
            requests.push(Request {
                channel,
                since,
                epoch: epoch.unwrap_or_default(),
            });
        }
        let store = self.store.clone();
        let open = async move {
            let (subscription, membership) = Subscription::open(store, requests).await?;
            Ok(NativeSubscription {
                names: subscription.names.clone(),
                start: subscription.start.clone(),
                queued_bytes: subscription.buffered_bytes.clone(),
                inner: Arc::new(tokio::sync::Mutex::new(subscription)),
                membership: Mutex::new(Some(membership)),
                tasks: Mutex::new(Vec::new()),
                pid: std::process::id(),
            })
        };
        let convert = |py: Python<'_>, subscription: NativeSubscription| {
            Ok(Py::new(py, subscription)?.into_any())
        };
        match aio {
            None => {
                let subscription = py
                    .detach(|| connection::block_on(Flavor::Background, open))
                    .map_err(|failure: Failure| failure.into_pyerr(py))?;
                convert(py, subscription)
            }
            Some((event_loop, future)) => {
                let cancel = aio::spawn(event_loop, future, open, convert);
                Ok(Py::new(py, cancel)?.into_any())
            }
        }
    }

    fn close(&self) {
        self.store.close();
    }

    /// Forgets the parent's runtime in a forked child; logs rebuild their connections by pid.
    #[staticmethod]
    fn _after_fork_in_child() {
        connection::forget_after_fork();
    }

    fn __repr__(&self) -> String {
        format!("<NativeLog {}>", self.store.label())
    }
}

impl NativeLog {
    /// What `replicated` checks a broadcast against: `min_replicas` and its timeout.
    fn wanted_replicas(&self) -> (u32, u64) {
        let limits = self.store.limits();
        (limits.min_replicas, limits.replica_timeout_ms)
    }

    fn encode(
        &self,
        channel: &Bound<'_, PyAny>,
        event_name: &Bound<'_, PyAny>,
        content: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
        idempotency_key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Outgoing> {
        let channel = channel_str(channel)?;
        let event_name = event_name.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!(
                "event_name must be str, not {}",
                type_name(event_name)
            ))
        })?;
        let idempotency_key = match idempotency_key.filter(|key| !key.is_none()) {
            None => None,
            Some(key) => {
                let key = key.cast::<PyString>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "idempotency_key must be str, not {}",
                        type_name(key)
                    ))
                })?;
                Some(self.store.layout.idempotency_key(&channel, &key.to_cow()?))
            }
        };
        let mut encoder = Encoder::new(default, Vec::with_capacity(256));
        encoder.out.extend_from_slice(b"{\"event_name\":");
        encoder.write(event_name.as_any())?;
        encoder.out.extend_from_slice(b",\"content\":");
        encoder.write(content)?;
        Ok(Outgoing {
            keys: self.store.layout.channel_keys(&channel),
            head: encoder.out,
            idempotency_key,
        })
    }

    /// Runs `operation` on the log's regular connection (see `Store::call`) as `run` does.
    fn dispatch<T, F, Fut, C>(
        &self,
        py: Python<'_>,
        what: &'static str,
        aio: Aio<'_>,
        operation: F,
        convert: C,
    ) -> PyResult<Py<PyAny>>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Store>, Link) -> Fut + Send + 'static,
        Fut: Future<Output = RedisResult<T>> + Send + 'static,
        C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    {
        self.run(
            py,
            aio,
            move |store, flavor| async move {
                let owner = store.clone();
                owner
                    .call(flavor, what, |link| operation(store, link))
                    .await
            },
            convert,
        )
    }

    /// Runs work prepared under the GIL: without `aio`, now, with the GIL released; with it,
    /// on the runtime, resolving the asyncio future when done.
    fn run<T, W, Fut, C>(
        &self,
        py: Python<'_>,
        aio: Aio<'_>,
        work: W,
        convert: C,
    ) -> PyResult<Py<PyAny>>
    where
        T: Send + 'static,
        W: FnOnce(Arc<Store>, Flavor) -> Fut,
        Fut: Future<Output = Result<T, Failure>> + Send + 'static,
        C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    {
        let flavor = if aio.is_some() {
            Flavor::Background
        } else {
            Flavor::Calling
        };
        let work = work(self.store.clone(), flavor);
        match aio {
            None => {
                let polled = connection::busy_poll(work, self.store.connection());
                let value = py
                    .detach(|| connection::block_on(flavor, polled))
                    .map_err(|failure: Failure| failure.into_pyerr(py))?;
                convert(py, value)
            }
            Some((event_loop, future)) => {
                let cancel = aio::spawn(event_loop, future, work, convert);
                Ok(Py::new(py, cancel)?.into_any())
            }
        }
    }
}

/// A live subscription; `replaylog.Subscription` wraps it.
#[pyclass(module = "replaylog._native", frozen)]
struct NativeSubscription {
    names: Vec<String>,
    /// Per channel, `(cursor, epoch)` where the stream starts (see `Subscription::start`).
    start: Vec<(i64, String)>,
    inner: Arc<tokio::sync::Mutex<Subscription>>,
    /// Bytes of live messages waiting for this consumer (see `hub::Queue`).
    queued_bytes: Arc<AtomicUsize>,
    /// Its place on the log's shared pub/sub connection: leaving ends the stream.
    membership: Mutex<Option<Membership>>,
    /// The task feeding an asyncio queue when iterated asynchronously.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The process that opened it: a forked child inherits it, but not its tasks' threads.
    pid: u32,
}

/// How often a blocked `next` wakes to let Ctrl-C through.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Items an asyncio consumer may have waiting before the feeding task pauses.
const ASYNC_QUEUE_HIGH_WATER: usize = 1_000;

#[pymethods]
impl NativeSubscription {
    /// The next message as a dict, None on timeout or once closed (see `closed`).
    /// Raises `IncompleteReplayError` where a hole could not be filled.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        if self.inherited() {
            return Ok(None);
        }
        let deadline = match timeout {
            Some(seconds) => Some(Instant::now() + seconds_or_zero(seconds)?),
            None => None,
        };
        loop {
            let slice = deadline.map_or(SIGNAL_CHECK, |deadline| {
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_CHECK)
            });
            let inner = self.inner.clone();
            let outcome = py.detach(|| {
                connection::block_on(Flavor::Background, async move {
                    let started = tokio::time::Instant::now();
                    let Ok(mut subscription) = tokio::time::timeout(slice, inner.lock()).await
                    else {
                        return Next::Idle;
                    };
                    subscription
                        .next(Some(slice.saturating_sub(started.elapsed())))
                        .await
                })
            });
            match outcome {
                Next::Delivery(delivery) => {
                    if let Some(message) = delivery_to_python(py, &self.names, delivery)? {
                        return Ok(Some(message));
                    }
                }
                Next::Closed => return Ok(None),
                Next::Idle if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(None),
                Next::Idle => py.check_signals()?,
            }
        }
    }

    /// Feeds deliveries to `queue` (an asyncio.Queue) on `loop`, in batches: dicts, exception
    /// instances for holes, and None at the end. It pauses while the consumer lags.
    fn start_pump(&self, event_loop: Bound<'_, PyAny>, queue: Bound<'_, PyAny>) {
        let inner = self.inner.clone();
        let names = self.names.clone();
        let event_loop = event_loop.unbind();
        let queue = queue.unbind();
        let task = runtime(Flavor::Background).spawn(async move {
            loop {
                loop {
                    let waiting =
                        aio::with_python(|py| queue.call_method0(py, "qsize")?.extract(py));
                    match waiting {
                        Some(Ok(waiting)) if waiting >= ASYNC_QUEUE_HIGH_WATER => {
                            tokio::time::sleep(Duration::from_millis(5)).await
                        }
                        Some(Ok::<usize, PyErr>(_)) => break,
                        _ => return,
                    }
                }
                let batch = inner.lock().await.next_batch().await;
                let finished = batch.is_empty();
                let delivered = aio::with_python(|py| {
                    let items = PyList::empty(py);
                    for delivery in batch {
                        match delivery_to_python(py, &names, delivery) {
                            Ok(Some(message)) => items.append(message)?,
                            Ok(None) => {}
                            Err(error) => items.append(error.into_value(py))?,
                        }
                    }
                    if finished {
                        items.append(py.None())?;
                    }
                    aio::deliver(py, &event_loop, &queue, items)
                });
                if !matches!(delivered, Some(Ok(()))) || finished {
                    return;
                }
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Unsubscribes and releases the pub/sub connection; iteration then ends.
    /// Returns once the connection is closed.
    fn close(&self, py: Python<'_>) {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let membership = self
            .membership
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if self.inherited() {
            // The parent's: its runtime has no threads here to end them.
            std::mem::forget(tasks);
            if let Some(membership) = membership {
                membership.forget();
            }
            return;
        }
        for task in &tasks {
            task.abort();
        }
        // The pump may be waiting for the GIL: release it while the tasks wind down.
        py.detach(|| {
            connection::block_on(Flavor::Background, async {
                for task in tasks {
                    let _ = task.await;
                }
                if let Some(membership) = membership {
                    membership.leave().await;
                }
            })
        });
    }

    /// Bytes of live messages waiting to be read: at most `subscription_buffer_bytes`.
    #[getter]
    fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    #[getter]
    fn channels(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Per channel, `(cursor, epoch or None)` where the stream starts.
    #[getter]
    fn start_positions(&self) -> Vec<(i64, Option<String>)> {
        self.start
            .iter()
            .map(|(cursor, epoch)| (*cursor, (!epoch.is_empty()).then(|| epoch.clone())))
            .collect()
    }
}

impl NativeSubscription {
    fn inherited(&self) -> bool {
        self.pid != std::process::id()
    }
}

impl Drop for NativeSubscription {
    /// A subscription dropped without `close` must not leave its connection behind: a
    /// dropped task handle would only detach the task.
    fn drop(&mut self) {
        let tasks = std::mem::take(self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()));
        let membership = self
            .membership
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if self.inherited() {
            std::mem::forget(tasks);
            if let Some(membership) = membership {
                membership.forget();
            }
            return;
        }
        // Dropping the membership leaves the hub.
        for task in tasks {
            task.abort();
        }
    }
}

/// The timestamps of a broadcast, or `ReplicationError` if fewer replicas than `wanted` (count,
/// timeout in ms) acknowledged it in time.
fn replicated(py: Python<'_>, broadcasted: Broadcasted, wanted: (u32, u64)) -> PyResult<Vec<i64>> {
    let Broadcasted {
        timestamps,
        replicas,
    } = broadcasted;
    match replicas {
        Some(acknowledged) if acknowledged < i64::from(wanted.0) => Err(python_error(
            py,
            "ReplicationError",
            (timestamps, acknowledged, wanted.0, wanted.1),
        )),
        _ => Ok(timestamps),
    }
}

/// A delivery as Python sees it: a message dict, or the exception for a gap. None for a
/// message on the channel that is not a JSON object (not replaylog's): it is skipped.
fn delivery_to_python(
    py: Python<'_>,
    names: &[String],
    delivery: Delivery,
) -> PyResult<Option<Py<PyAny>>> {
    match delivery {
        Delivery::Message { channel, payload } => {
            let message = match json::decode(py, &payload).or_else(|_| json_loads(py, &payload)) {
                Ok(message) => message,
                // It ends like one of ours (the subscription only delivers those), so it was
                // meant for this consumer: losing it is a hole, never a silent skip.
                Err(error) if is_unreadable(py, &error) => {
                    log_unreadable(py, &payload, &error)?;
                    let since = message_prev(&payload)
                        .or_else(|| message_timestamp(&payload).map(|ts| ts - 1))
                        .unwrap_or(0);
                    // The stream goes on after it, in the same history.
                    let resume = message_timestamp(&payload);
                    return Err(incomplete_replay(py, &names[channel], since, resume, None));
                }
                Err(error) => return Err(error),
            };
            let Ok(dict) = message.cast::<PyDict>() else {
                return Ok(None);
            };
            dict.set_item("channel", &names[channel])?;
            Ok(Some(message.unbind()))
        }
        Delivery::Gap {
            channel,
            since,
            resume,
            epoch,
        } => {
            let epoch = (!epoch.is_empty()).then_some(epoch);
            Err(incomplete_replay(
                py,
                &names[channel],
                since,
                Some(resume),
                epoch,
            ))
        }
    }
}

/// `IncompleteReplayError`: messages after `since` are gone; the stream goes on from `resume`
/// in history `epoch` (None: the same as before).
fn incomplete_replay(
    py: Python<'_>,
    channel: &str,
    since: i64,
    resume: Option<i64>,
    epoch: Option<String>,
) -> PyErr {
    python_error(
        py,
        "IncompleteReplayError",
        (channel.to_owned(), since, resume, epoch),
    )
}

/// `error`, raised for item `index` of a `broadcast_many`, saying which item it is about: a
/// plain TypeError, ValueError or RecursionError (what input checks and serialization raise)
/// gains the item in its message; any other exception, such as one of a `default`'s own, passes
/// unchanged.
fn naming_item(py: Python<'_>, error: PyErr, index: usize) -> PyErr {
    let value = error.value(py);
    if value.is_exact_instance_of::<PyTypeError>()
        || value.is_exact_instance_of::<PyValueError>()
        || value.is_exact_instance_of::<PyRecursionError>()
    {
        let message = format!("broadcast_many item {index}: {value}");
        if let Err(e) = value.setattr("args", (message,)) {
            return e;
        }
    }
    error
}

fn seconds(value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!("a timeout must be positive seconds, got {value}"))
    })
}

fn seconds_or_zero(value: f64) -> PyResult<Duration> {
    if value <= 0.0 {
        return Ok(Duration::ZERO);
    }
    seconds(value)
}

/// At interpreter exit: background tasks stop calling into Python (see `aio::with_python`).
#[pyfunction]
fn shutdown(py: Python<'_>) {
    py.detach(aio::shutdown);
}

/// Serializes `obj` as replaylog stores content (tests compare it with `json.dumps`).
#[pyfunction]
#[pyo3(signature = (obj, default=None))]
fn encode_json<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    default: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut encoder = Encoder::new(default, Vec::new());
    encoder.write(obj)?;
    Ok(PyBytes::new(py, &encoder.out))
}

/// Parses JSON as `unspool` does (tests compare it with `json.loads`).
#[pyfunction]
fn decode_json<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(text) = data.cast::<PyString>() {
        return json::decode(py, text.to_cow()?.as_bytes());
    }
    let bytes = data.cast::<PyBytes>().map_err(|_| {
        PyTypeError::new_err(format!(
            "data must be bytes or str, not {}",
            type_name(data)
        ))
    })?;
    json::decode(py, bytes.as_bytes())
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<NativeLog>()?;
    module.add_class::<NativeSubscription>()?;
    module.add_function(wrap_pyfunction!(encode_json, module)?)?;
    module.add_function(wrap_pyfunction!(decode_json, module)?)?;
    module.add_function(wrap_pyfunction!(shutdown, module)?)?;
    Ok(())
}
