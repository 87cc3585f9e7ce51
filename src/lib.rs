//! The `replaylog._native` module: registration, and the argument glue its classes share. Each
//! class has a module of its own: `native_log` (`NativeLog`, behind `replaylog.ReplayLog`) and
//! `native_subscription` (`NativeSubscription`, with its asyncio pump). The work is done in
//! plain Rust modules: `store` (the Redis operations), `subscription`, `connection`, `json`.

mod aio;
mod bulk;
mod connection;
mod convert;
mod errors;
mod hub;
mod json;
mod link;
mod message;
mod native_log;
mod native_subscription;
mod process_local;
mod sentinel;
mod store;
mod subscription;
mod target;

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use convert::type_name;
use json::Encoder;
use native_log::NativeLog;
use native_subscription::NativeSubscription;

/// A timeout given in seconds; a Python caller's mistake (negative, NaN) is a ValueError.
pub fn seconds(value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!("a timeout must be positive seconds, got {value}"))
    })
}

/// A wait given in seconds, where zero or less means no wait.
pub fn seconds_or_zero(value: f64) -> PyResult<Duration> {
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
