"""A bounded queue in front of a writer thread, so compute never waits on the disk (and memory stays bounded).

The producer (the forward pass) submits finished batches; one thread writes them in order. At most
`max_pending` batches wait; an error in the writer is re-raised in the producer at its next submit or at close.
"""

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")
_STOP = object()


class BackgroundWriter(Generic[T]):
    """Runs `write(item)` for every submitted item on one background thread, in submission order."""

    def __init__(self, write: Callable[[T], None], max_pending: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="actstore-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:

        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            start = time.perf_counter()
            try:
                self._write(item)  # type: ignore[arg-type]
            except BaseException as exc:  # re-raised in the producer thread
                self._error = exc
            self.busy_seconds += time.perf_counter() - start

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: T) -> None:
        """Queue one item; blocks while `max_pending` items wait. Raises the writer's error, if any."""
        self._raise_if_failed()
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> None:
        """Wait until everything submitted is written; raise the writer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "BackgroundWriter[T]":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:  # stop promptly; the producer's error wins
            self._error = self._error or exc
            if self._thread.is_alive():
                self._queue.put(_STOP)
                self._thread.join()
