//! asyncio bridging: work runs on the tokio runtime, and its result is handed to the event
//! loop's thread with `call_soon_threadsafe`, so the loop never blocks on Redis.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyList;
use tokio::task::AbortHandle;

use crate::connection::{runtime, Flavor};
use crate::errors::Failure;
use crate::process_local::ProcessLocal;

/// `(loop, future)`: run asynchronously and resolve `future` on `loop` with the result.
pub type Aio<'py> = Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>;

/// Stops the work of an awaited call whose task was cancelled: what has not reached Redis
/// yet (still connecting, say) never does. What was sent may still run: the outcome of a
/// cancelled write is unknown, and a retry with its idempotency key is the safe answer.
#[pyclass(module = "replaylog._native", frozen)]
pub struct Cancel {
    work: AbortHandle,
}

#[pymethods]
impl Cancel {
    fn __call__(&self) {
        self.work.abort();
    }
}

/// Runs `work` on the runtime, then resolves `future` on `event_loop` with `convert`'s
/// result, or with the failure as an exception. Returns what cancels it.
pub fn spawn<T, W, C>(
    event_loop: Bound<'_, PyAny>,
    future: Bound<'_, PyAny>,
    work: W,
    convert: C,
) -> Cancel
where
    T: Send + 'static,
    W: Future<Output = Result<T, Failure>> + Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    let event_loop = event_loop.unbind();
    let future = future.unbind();
    let task = runtime(Flavor::Background).spawn(async move {
        let outcome = work.await;
        with_python(|py| {
            let result = outcome
                .map_err(|failure| failure.into_pyerr(py))
                .and_then(|value| convert(py, value));
            let (failed, value) = match result {
                Ok(value) => (false, value),
                Err(error) => (true, error.into_value(py).into_any()),
            };
            // A closed loop has nobody left to tell.
            let _ = helper(py, "resolve").and_then(|resolve| {
                event_loop.call_method1(
                    py,
                    "call_soon_threadsafe",
                    (resolve, future, failed, value),
                )
            });
        });
    });
    Cancel {
        work: task.abort_handle(),
    }
}

/// Hands a batch of items to an asyncio queue on its loop.
pub fn deliver(
    py: Python<'_>,
    event_loop: &Py<PyAny>,
    queue: &Py<PyAny>,
    items: Bound<'_, PyList>,
) -> PyResult<()> {
    let put_all = helper(py, "put_all")?;
    event_loop.call_method1(py, "call_soon_threadsafe", (put_all, queue, items))?;
    Ok(())
}

fn helper<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    // Not a PyOnceLock: one that a parent's thread was filling at a fork would block the
    // child forever.
    static MODULE: ProcessLocal<Py<PyModule>> = ProcessLocal::new();
    let module = MODULE.get_or_try(|| PyResult::Ok(py.import("replaylog._aio")?.unbind()))?;
    module.bind(py).getattr(name)
}

static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
static ATTACHED: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with the GIL from a runtime thread, unless the interpreter is shutting down.
///
/// A thread that waits for the GIL while the interpreter finalizes is ended by CPython in a
/// way Rust cannot unwind through, so `shutdown` (run by `atexit`) closes the door first and
/// waits for those already inside.
pub fn with_python<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    ATTACHED.fetch_add(1, Ordering::SeqCst);
    let result = if SHUTTING_DOWN.load(Ordering::SeqCst) {
        None
    } else {
        Python::try_attach(f)
    };
    ATTACHED.fetch_sub(1, Ordering::SeqCst);
    result
}

/// Called without the GIL at interpreter exit.
pub fn shutdown() {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(2);
    while ATTACHED.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}
