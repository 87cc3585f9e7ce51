//! `NativeLog`, the class behind `replaylog.ReplayLog`: its settings made into a `Store`, and
//! each operation's Python arguments in and result out. A call blocks with the GIL released, or
//! with `aio` runs on the runtime and resolves an asyncio future.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyRecursionError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use redis::RedisResult;

use crate::aio::{self, Aio};
use crate::connection::{self, Connection, Flavor, Settings};
use crate::convert::{
    channel_str, messages_to_python, parse_limit, parse_since, triple, type_name,
};
use crate::errors::{python_error, Failure};
use crate::link::Link;
use crate::message;
use crate::native_subscription::NativeSubscription;
use crate::seconds;
use crate::store::{
    self, Broadcasted, Layout, Limits, Outgoing, ReplayRequest, ScanPosition, Store,
};
use crate::subscription::Request;

/// A log's settings as `replaylog._settings.Settings` resolved them, read by attribute name.
#[derive(FromPyObject)]
struct LogSettings {
    url: String,
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
    replica_timeout: f64,
}

impl LogSettings {
    fn into_store(self, py: Python<'_>) -> PyResult<Store> {
        let settings = Settings {
            url: self.url,
            connect_timeout: seconds(self.connect_timeout)?,
            response_timeout: seconds(self.response_timeout)?,
            busy_poll: Duration::from_micros(self.busy_poll_us),
            subscription_buffer_bytes: self.subscription_buffer_bytes,
            sharded_pubsub: self.sharded_pubsub,
        };
        let url = settings.url.clone();
        let masked_url = self.masked_url;
        let connection = Connection::new(settings).map_err(|e| {
            let reason = e
                .detail()
                .unwrap_or(e.category())
                .replace(&url, &masked_url);
            let message = format!("invalid Redis URL {masked_url}: {reason}");
            python_error(py, "ConfigurationError", (message,))
        })?;
        let layout = Layout {
            channel_prefix: self.channel_prefix,
            log_prefix: self.log_prefix,
            meta_prefix: self.meta_prefix,
            idempotency_prefix: self.idempotency_prefix,
            cluster_keys: self.cluster_keys,
            sharded_pubsub: self.sharded_pubsub,
        };
        let limits = Limits {
            expire_ms: self.expire_ms,
            max_len: self.max_len,
            idempotency_window_ms: self.idempotency_window_ms,
            min_replicas: self.min_replicas,
            replica_timeout_ms: (self.replica_timeout * 1000.0) as u64,
        };
        Ok(Store::new(connection, masked_url, layout, limits))
    }
}

/// One replay log: a Redis URL, key layout and limits, and this process's connection.
#[pyclass(module = "replaylog._native", frozen)]
pub struct NativeLog {
    store: Arc<Store>,
}

#[pymethods]
impl NativeLog {
    #[new]
    fn new(py: Python<'_>, settings: LogSettings) -> PyResult<NativeLog> {
        Ok(NativeLog {
            store: Arc::new(settings.into_store(py)?),
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

    /// One SCAN step over the logs (see `Store::scan_logs`): `(next_position, redis_now_ms,
    /// [(key, count, oldest, newest, ttl_ms, memory)])`. A position is `(node, cursor)`,
    /// opaque to the caller: None starts the walk, and comes back when it is done.
    #[pyo3(signature = (position, channels=None, expire_ms=None, dry_run=false))]
    fn scan_logs(
        &self,
        py: Python<'_>,
        position: Option<(String, u64)>,
        channels: Option<String>,
        expire_ms: Option<i64>,
        dry_run: bool,
    ) -> PyResult<Py<PyAny>> {
        let position = position.map(|(node, cursor)| ScanPosition { node, cursor });
        self.dispatch(
            py,
            "scan_logs",
            None,
            move |store, manager| async move {
                store
                    .scan_logs(manager, position, channels.as_deref(), expire_ms, dry_run)
                    .await
            },
            |py, (next, now, logs)| {
                let next = next.map(|position| (position.node, position.cursor));
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

    /// Subscribes to `(channel, since or None, epoch or None)` triples; see `subscription.rs`.
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
        let open = NativeSubscription::open(self.store.clone(), requests);
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
        Ok(Outgoing {
            keys: self.store.layout.channel_keys(&channel),
            head: message::head(event_name, content, default)?,
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
