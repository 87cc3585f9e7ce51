//! The `replaylog._native` module: argument conversion, releasing the GIL, error mapping.
//! The work is done in plain Rust modules: `json`, `store`, `connection`.

mod connection;
mod errors;
mod json;
mod store;

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use connection::{Connection, Settings};
use errors::Failure;
use json::Encoder;
use store::{Layout, Limits, Outgoing, Since, Store};

/// One replay log: a Redis URL, key prefixes, and this process's connection.
#[pyclass(module = "replaylog._native", frozen)]
struct NativeLog {
    store: Store,
}

#[pymethods]
impl NativeLog {
    #[new]
    #[pyo3(signature = (
        url, masked_url, *, connect_timeout, response_timeout, channel_prefix, log_prefix,
        meta_prefix, idempotency_prefix, cluster_keys, expire_ms, max_len, idempotency_window_ms
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        url: &str,
        masked_url: String,
        connect_timeout: f64,
        response_timeout: f64,
        channel_prefix: String,
        log_prefix: String,
        meta_prefix: String,
        idempotency_prefix: String,
        cluster_keys: bool,
        expire_ms: i64,
        max_len: u64,
        idempotency_window_ms: i64,
    ) -> PyResult<NativeLog> {
        let settings = Settings {
            url: url.to_owned(),
            connect_timeout: seconds(connect_timeout)?,
            response_timeout: seconds(response_timeout)?,
        };
        let connection = Connection::new(settings).map_err(|e| {
            let message = format!("invalid Redis URL {masked_url}: {}", e.category());
            config_error(py, message)
        })?;
        let layout = Layout {
            channel_prefix,
            log_prefix,
            meta_prefix,
            idempotency_prefix,
            cluster_keys,
        };
        let limits = Limits {
            expire_ms,
            max_len,
            idempotency_window_ms,
        };
        Ok(NativeLog {
            store: Store::new(connection, masked_url, layout, limits),
        })
    }

    /// Publishes and stores one message; returns its timestamp.
    #[pyo3(signature = (channel, event_name, content, default=None, idempotency_key=None))]
    fn broadcast(
        &self,
        py: Python<'_>,
        channel: &Bound<'_, PyAny>,
        event_name: &Bound<'_, PyAny>,
        content: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
        idempotency_key: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<i64> {
        let mut message = self.encode(channel, event_name, content, default)?;
        if let Some(key) = idempotency_key.filter(|key| !key.is_none()) {
            let key = key.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "idempotency_key must be str, not {}",
                    type_name(key)
                ))
            })?;
            message.idempotency_key = Some(
                self.store
                    .layout
                    .idempotency_key(channel_str(channel)?, key.to_str()?),
            );
        }
        let timestamps = self.run(py, "broadcast", |manager| {
            self.store
                .broadcast(manager, std::slice::from_ref(&message))
        })?;
        Ok(timestamps[0])
    }

    /// Broadcasts `(channel, event_name, content)` items in one round trip.
    fn broadcast_many(
        &self,
        py: Python<'_>,
        items: &Bound<'_, PyList>,
        default: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<i64>> {
        // Everything is serialized before anything is sent: one bad item writes nothing.
        let mut messages = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let (channel, event_name, content) = triple(&item)
                .map_err(|e| PyTypeError::new_err(format!("broadcast_many item {index}: {e}")))?;
            messages.push(self.encode(&channel, &event_name, &content, default)?);
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        self.run(py, "broadcast_many", |manager| {
            self.store.broadcast(manager, &messages)
        })
    }

    /// Messages of `channel` newer than `since`, oldest first: dicts, or with `raw` the JSON.
    fn unspool<'py>(
        &self,
        py: Python<'py>,
        channel: &Bound<'py, PyAny>,
        since: &Bound<'py, PyAny>,
        raw: bool,
        limit: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let request = (
            self.store.layout.channel_keys(channel_str(channel)?),
            parse_since(since)?,
        );
        let limit = parse_limit(limit)?;
        let mut logs = self.run(py, "unspool", |manager| {
            self.store
                .unspool(manager, std::slice::from_ref(&request), limit)
        })?;
        messages_to_python(py, logs.pop().unwrap_or_default(), raw)
    }

    /// `unspool` for many `(channel, since)` pairs in one round trip: `{channel: messages}`.
    fn unspool_many<'py>(
        &self,
        py: Python<'py>,
        cursors: &Bound<'py, PyList>,
        raw: bool,
        limit: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut channels = Vec::with_capacity(cursors.len());
        let mut requests = Vec::with_capacity(cursors.len());
        for pair in cursors.iter() {
            let pair = pair.cast_into::<PyTuple>()?;
            let channel = pair.get_item(0)?;
            requests.push((
                self.store.layout.channel_keys(channel_str(&channel)?),
                parse_since(&pair.get_item(1)?)?,
            ));
            channels.push(channel);
        }
        let limit = parse_limit(limit)?;
        let result = PyDict::new(py);
        if requests.is_empty() {
            return Ok(result);
        }
        let logs = self.run(py, "unspool_many", |manager| {
            self.store.unspool(manager, &requests, limit)
        })?;
        for (channel, messages) in channels.into_iter().zip(logs) {
            result.set_item(channel, messages_to_python(py, messages, raw)?)?;
        }
        Ok(result)
    }

    /// `unspool` plus completeness: `(complete, messages, epoch)`.
    #[pyo3(signature = (channel, since, raw, limit, epoch=None))]
    fn replay<'py>(
        &self,
        py: Python<'py>,
        channel: &Bound<'py, PyAny>,
        since: &Bound<'py, PyAny>,
        raw: bool,
        limit: Option<&Bound<'py, PyAny>>,
        epoch: Option<&str>,
    ) -> PyResult<(bool, Bound<'py, PyList>, Option<String>)> {
        let request = (
            self.store.layout.channel_keys(channel_str(channel)?),
            parse_since(since)?,
        );
        let limit = parse_limit(limit)?;
        let mut replays = self.run(py, "replay", |manager| {
            self.store.replay(
                manager,
                std::slice::from_ref(&request),
                limit,
                epoch.unwrap_or(""),
            )
        })?;
        let replayed = replays.pop().unwrap_or_default();
        let epoch = (!replayed.epoch.is_empty()).then_some(replayed.epoch);
        Ok((
            replayed.complete,
            messages_to_python(py, replayed.messages, raw)?,
            epoch,
        ))
    }

    /// Trims entries older than `expire_ms` from every log; returns how many it removed.
    fn prune(&self, py: Python<'_>, expire_ms: i64) -> PyResult<i64> {
        self.run(py, "prune_replay_logs", |manager| {
            self.store.prune(manager, expire_ms)
        })
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
    fn encode(
        &self,
        channel: &Bound<'_, PyAny>,
        event_name: &Bound<'_, PyAny>,
        content: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Outgoing> {
        let channel = channel_str(channel)?;
        let event_name = event_name.cast::<PyString>().map_err(|_| {
            PyTypeError::new_err(format!(
                "event_name must be str, not {}",
                event_name
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        let mut encoder = Encoder::new(default, Vec::with_capacity(256));
        encoder.out.extend_from_slice(b"{\"event_name\":");
        encoder.write(event_name.as_any())?;
        encoder.out.extend_from_slice(b",\"content\":");
        encoder.write(content)?;
        encoder.out.extend_from_slice(b",\"timestamp\":");
        Ok(Outgoing {
            keys: self.store.layout.channel_keys(channel),
            head: encoder.out,
            idempotency_key: None,
        })
    }

    /// Runs a Redis operation with the GIL released; failures become Python exceptions.
    fn run<T, F, Fut>(&self, py: Python<'_>, what: &str, operation: F) -> PyResult<T>
    where
        T: Send,
        F: FnOnce(redis::aio::ConnectionManager) -> Fut + Send,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        py.detach(|| self.store.run(what, operation))
            .map_err(|failure: Failure| failure.into_pyerr(py))
    }
}

fn seconds(value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!("a timeout must be positive seconds, got {value}"))
    })
}

fn config_error(py: Python<'_>, message: String) -> PyErr {
    match py
        .import("replaylog._errors")
        .and_then(|module| module.getattr("ConfigurationError"))
        .and_then(|class| class.call1((message,)))
    {
        Ok(error) => PyErr::from_value(error),
        Err(e) => e,
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn channel_str<'a>(channel: &'a Bound<'_, PyAny>) -> PyResult<&'a str> {
    let channel = channel.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!("channel must be str, not {}", type_name(channel)))
    })?;
    channel.to_str()
}

fn triple<'py>(
    item: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let tuple = item.cast::<PyTuple>().map_err(|_| {
        PyTypeError::new_err(format!(
            "expected a (channel, event_name, content) tuple, not {}",
            type_name(item)
        ))
    })?;
    if tuple.len() != 3 {
        return Err(PyTypeError::new_err(format!(
            "expected a (channel, event_name, content) tuple, got {} items",
            tuple.len()
        )));
    }
    Ok((tuple.get_item(0)?, tuple.get_item(1)?, tuple.get_item(2)?))
}

/// A cursor: an int, a float, or a numeric string, as clients send it.
fn parse_since(since: &Bound<'_, PyAny>) -> PyResult<Since> {
    if since.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(
            "since must be a number or a numeric string, not bool",
        ));
    }
    if let Ok(int) = since.cast::<PyInt>() {
        return Ok(match int.extract::<i64>() {
            Ok(value) => Since::Int(value),
            Err(_) => Since::Float(int.extract::<f64>().unwrap_or(if int.lt(0)? {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            })),
        });
    }
    let value = if let Ok(float) = since.cast::<PyFloat>() {
        float.value()
    } else if let Ok(text) = since.cast::<PyString>() {
        let text = text.to_str()?.trim();
        if let Ok(value) = text.parse::<i64>() {
            return Ok(Since::Int(value));
        }
        text.parse::<f64>().map_err(|_| {
            PyValueError::new_err(format!("since must be a numeric string, got {text:?}"))
        })?
    } else {
        return Err(PyTypeError::new_err(format!(
            "since must be an int, a float or a numeric string, not {}",
            type_name(since)
        )));
    };
    if value.is_nan() {
        return Err(PyValueError::new_err("since must not be NaN"));
    }
    Ok(Since::Float(value))
}

fn parse_limit(limit: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    let Some(limit) = limit else { return Ok(None) };
    if limit.is_none() {
        return Ok(None);
    }
    if limit.is_instance_of::<PyBool>() || !limit.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "limit must be an int, not {}",
            type_name(limit)
        )));
    }
    limit
        .extract::<u64>()
        .map(Some)
        .map_err(|_| PyValueError::new_err("limit must be zero or more"))
}

fn messages_to_python(
    py: Python<'_>,
    messages: Vec<Vec<u8>>,
    raw: bool,
) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    for message in messages {
        let item = if raw {
            PyString::new(
                py,
                std::str::from_utf8(&message).map_err(|e| {
                    PyValueError::new_err(format!("a stored message is not UTF-8: {e}"))
                })?,
            )
            .into_any()
        } else {
            json::decode(py, &message)?
        };
        list.append(item)?;
    }
    Ok(list)
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
        return json::decode(py, text.to_str()?.as_bytes());
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
    module.add_function(wrap_pyfunction!(encode_json, module)?)?;
    module.add_function(wrap_pyfunction!(decode_json, module)?)?;
    Ok(())
}
