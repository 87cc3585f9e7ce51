"""The Rust core's process hooks, installed at import."""

from __future__ import annotations

import atexit
import os

from ._native import NativeLog, shutdown

# Background tasks must stop calling into Python before the interpreter finalizes.
atexit.register(shutdown)

if hasattr(os, "register_at_fork"):
    # A forked child has none of the parent's threads: it forgets the calls they were waiting
    # on. Its runtimes and connections are made afresh by pid (see src/process_local.rs).
    os.register_at_fork(after_in_child=NativeLog._after_fork_in_child)
