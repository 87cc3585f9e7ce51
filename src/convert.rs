//! Python arguments to Rust values, and Redis replies back to Python objects.

use std::borrow::Cow;

use pyo3::exceptions::{PyRecursionError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::json;
use crate::message::timestamp as message_timestamp;
use crate::store::Since;

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

pub fn channel_str<'a>(channel: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, str>> {
    let channel = channel.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!("channel must be str, not {}", type_name(channel)))
    })?;
    channel.to_cow()
}

pub fn triple<'py>(
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
pub fn parse_since(since: &Bound<'_, PyAny>) -> PyResult<Since> {
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
        let text = text.to_cow()?;
        let text = text.trim();
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

pub fn parse_limit(limit: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
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
    if limit.lt(0)? {
        return Err(PyValueError::new_err("limit must be zero or more"));
    }
    // Past what Redis counts to, a limit is no limit.
    Ok(limit.extract::<i64>().ok().map(|n| n as u64))
}

/// Stored messages as Python values (dicts, or strs for `raw`), and how many were left out.
///
/// A message our decoder refuses is read by `json.loads` instead, as the article's code would
/// read it. One that neither reads (written by another program) is left out and logged, so
/// that it never makes the rest of the log unreadable; callers report it as a hole.
pub fn messages_to_python<'a>(
    py: Python<'_>,
    messages: impl IntoIterator<Item = &'a [u8]>,
    raw: bool,
) -> PyResult<(Bound<'_, PyList>, usize)> {
    let mut decoder = json::Decoder::new(py);
    let mut unreadable = 0;
    let list = PyList::empty(py);
    for message in messages {
        let item = if raw {
            json::raw_str(py, message).map(Bound::into_any)
        } else {
            decoder.decode(message).or_else(|_| json_loads(py, message))
        };
        match item {
            Ok(item) => list.append(item)?,
            Err(error) if is_unreadable(py, &error) => {
                unreadable += 1;
                log_unreadable(py, message, &error)?;
            }
            Err(error) => return Err(error),
        }
    }
    Ok((list, unreadable))
}

/// A stored message as `json.loads` reads it.
pub fn json_loads<'py>(py: Python<'py>, message: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let text = json::raw_str(py, message)?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Whether `error` says the text is not JSON (or too deep to read), not that the process is
/// in trouble (out of memory, interrupted).
pub fn is_unreadable(py: Python<'_>, error: &PyErr) -> bool {
    error.is_instance_of::<PyValueError>(py) || error.is_instance_of::<PyRecursionError>(py)
}

/// Warns on the `replaylog` logger about a stored message that cannot be read: its size and
/// timestamp, never its content.
pub fn log_unreadable(py: Python<'_>, message: &[u8], error: &PyErr) -> PyResult<()> {
    let timestamp = message_timestamp(message)
        .map_or_else(|| "no timestamp".to_owned(), |ts| format!("timestamp {ts}"));
    let text = format!(
        "skipped a stored message that is not valid JSON ({} bytes, {timestamp}): {}",
        message.len(),
        error.value(py)
    );
    py.import("logging")?
        .call_method1("getLogger", ("replaylog",))?
        .call_method1("warning", (text,))?;
    Ok(())
}
