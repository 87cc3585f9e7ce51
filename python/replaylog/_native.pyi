"""The Rust core. Use it through :class:`replaylog.ReplayLog`."""

from asyncio import AbstractEventLoop, Future, Queue
from typing import Any, Callable

from ._settings import Settings

_Default = Callable[[Any], Any] | None
_Since = int | float | str
_Aio = tuple[AbstractEventLoop, Future[Any]] | None

class NativeLog:
    def __init__(self, settings: Settings) -> None: ...
    def broadcast(
        self,
        channel: str,
        event_name: str,
        content: Any,
        default: _Default = None,
        idempotency_key: str | None = None,
        *,
        aio: _Aio = None,
    ) -> Any: ...
    def broadcast_many(
        self, items: list[tuple[str, str, Any]], default: _Default = None, *, aio: _Aio = None
    ) -> Any: ...
    def unspool(
        self, channel: str, since: _Since, raw: bool, limit: int | None, *, aio: _Aio = None
    ) -> Any: ...
    def unspool_many(
        self,
        cursors: list[tuple[str, _Since]],
        raw: bool,
        limit: int | None,
        *,
        aio: _Aio = None,
    ) -> Any: ...
    def replay(
        self,
        channel: str,
        since: _Since,
        raw: bool,
        limit: int | None,
        epoch: str | None = None,
        *,
        aio: _Aio = None,
    ) -> Any: ...
    def prune(self, expire_ms: int, channels: str | None = None, *, aio: _Aio = None) -> Any: ...
    def prune_log(self, channel: str, expire_ms: int, *, aio: _Aio = None) -> Any: ...
    def delete_log(self, channel: str, *, aio: _Aio = None) -> Any: ...
    def scan_logs(
        self,
        position: tuple[str, int] | None,
        channels: str | None = None,
        expire_ms: int | None = None,
        dry_run: bool = False,
    ) -> tuple[
        tuple[str, int] | None,
        int,
        list[tuple[bytes, int, int | None, int | None, int, int | None]],
    ]: ...
    def subscribe(
        self, channels: list[tuple[str, int | None, str | None]], *, aio: _Aio = None
    ) -> Any: ...
    def close(self) -> None: ...
    @staticmethod
    def _after_fork_in_child() -> None: ...

class NativeSubscription:
    @property
    def channels(self) -> list[str]: ...
    @property
    def start_positions(self) -> list[tuple[int, str | None]]: ...
    @property
    def queued_bytes(self) -> int: ...
    def next(self, timeout: float | None = None) -> dict[str, Any] | None: ...
    def start_pump(self, event_loop: AbstractEventLoop, queue: Queue[Any]) -> None: ...
    def close(self) -> None: ...

def shutdown() -> None: ...
def encode_json(obj: Any, default: _Default = None) -> bytes: ...
def decode_json(data: bytes | str) -> Any: ...
