//! Redis errors to the Python exceptions of `replaylog._errors`.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;
use redis::RedisError;

use crate::process_local::ProcessLocal;

/// What went wrong, decided without the GIL; made into a Python exception later.
#[derive(Debug)]
pub enum Failure {
    Connection(String),
    Timeout(String),
    Refused { code: String, message: String },
    Other(String),
}

impl Failure {
    /// Classifies a redis-rs error. `context` says what we were doing and where, with any
    /// password already masked; `secret` is scrubbed from Redis's text in case it echoes it.
    pub fn from_redis(error: &RedisError, context: &str, secret: Option<&str>) -> Failure {
        let text = scrub(&error.to_string(), secret);
        if error.is_timeout() {
            return Failure::Timeout(format!("{context}: timed out ({text})"));
        }
        if error.is_io_error()
            || error.is_connection_refusal()
            || error.is_connection_dropped()
            || error.is_unrecoverable_error()
        {
            return Failure::Connection(format!("{context}: {text}"));
        }
        // A script's command refused by ACL comes back as ERR, not NOPERM.
        if text.contains("can't run this command") || text.contains("no permissions") {
            return Failure::Refused {
                code: "NOPERM".to_owned(),
                message: format!("{context}: Redis refused the command: {text}"),
            };
        }
        // A refused command of a pipeline carries its code inside the pipeline's error.
        let code = error.code().map(str::to_owned).or_else(|| {
            let refused = error.clone().into_server_errors()?;
            refused
                .first()
                .map(|(_, refusal)| refusal.code().to_owned())
        });
        match code {
            Some(code) => Failure::Refused {
                code,
                message: format!("{context}: Redis refused the command: {text}"),
            },
            None => Failure::Other(format!("{context}: {text}")),
        }
    }

    /// Says, for a write cut off by a timeout or a lost connection, that it may have been
    /// stored and published, and what to do about it.
    pub fn with_outcome_unknown(self) -> Failure {
        const UNKNOWN: &str = "; the outcome is unknown: the message may have been stored and \
            published, so retry with the same idempotency_key to publish it at most once";
        match self {
            Failure::Connection(m) => Failure::Connection(m + UNKNOWN),
            Failure::Timeout(m) => Failure::Timeout(m + UNKNOWN),
            other => other,
        }
    }

    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let (class, message, code) = match self {
            Failure::Connection(m) => ("ConnectionError", m, None),
            Failure::Timeout(m) => ("TimeoutError", m, None),
            Failure::Refused { code, message } => (refusal_class(&code), message, Some(code)),
            Failure::Other(m) => ("ReplayLogError", m, None),
        };
        let error = python_error(py, class, (message,));
        if let Some(code) = code {
            // Redis's own code (e.g. WRONGTYPE), where the class alone says less.
            if let Err(e) = error.value(py).setattr("code", code) {
                return e;
            }
        }
        error
    }
}

/// An exception of `replaylog._errors`, made with `args`.
pub fn python_error<'py, A>(py: Python<'py>, name: &str, args: A) -> PyErr
where
    A: pyo3::call::PyCallArgs<'py>,
{
    match error_class(py, name).and_then(|class| class.call1(args)) {
        Ok(error) => PyErr::from_value(error),
        Err(e) => e,
    }
}

fn refusal_class(code: &str) -> &'static str {
    match code {
        "OOM" => "OutOfMemoryError",
        "READONLY" => "ReadOnlyError",
        "NOPERM" | "NOAUTH" | "WRONGPASS" => "PermissionDeniedError",
        _ => "RedisRefusedError",
    }
}

fn error_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    // Not a PyOnceLock: see `aio::helper`.
    static MODULE: ProcessLocal<Py<PyModule>> = ProcessLocal::new();
    let module = MODULE.get_or_try(|| PyResult::Ok(py.import("replaylog._errors")?.unbind()))?;
    module
        .bind(py)
        .getattr(name)?
        .cast_into::<PyType>()
        .map_err(|_| PyRuntimeError::new_err(format!("replaylog._errors.{name} is not a class")))
}

fn scrub(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(secret) if !secret.is_empty() => text.replace(secret, "***"),
        _ => text.to_owned(),
    }
}
