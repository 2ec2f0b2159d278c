"""Concurrent requests sharing the model: one batched call for many callers, and the predictions they saw."""

import threading
from collections import OrderedDict
from concurrent.futures import Future


class RequestBatcher:
    """Runs concurrent requests' items through batched calls, each caller waiting for its own result.

    Inputs are checked by their own request before they join (a broken upload fails only its sender, which Gradio's
    `batch=True` cannot do: one exception fails every request of the batch). Items that arrive while a batch runs
    wait, and the first of their callers allowed to start runs them all (up to `max_batch_size`) as the next batch.
    Up to `max_running` batches run at once, but one starts beside a running batch only when at least `min_beside`
    items wait (default half a batch): a lone arrival beside a batch costs nearly as much as a full one and slows it
    (`BENCHMARKS.md`, "Serving efficiency"), while two half batches keep both cores busy where one batch's
    single-threaded parts leave one idle ("two batches at once"). Callers wait on a condition, never on a lock that
    a batch holds: one whose item another caller's batch took returns as soon as that batch ends.
    """

    def __init__(self, run_batch, max_batch_size: int, max_running: int = 1, min_beside: int | None = None):
        self._run_batch, self._max_batch_size, self._max_running = run_batch, max_batch_size, max_running
        self._min_beside = max(1, max_batch_size // 2) if min_beside is None else min_beside
        self._waiting: list[tuple[object, Future]] = []
        self._running = 0
        self._changed = threading.Condition()

    def _may_start(self) -> bool:
        if self._running == 0:
            return True
        return self._running < self._max_running and len(self._waiting) >= self._min_beside

    def __call__(self, item):
        future = Future()
        with self._changed:
            self._waiting.append((item, future))
            self._changed.notify_all()  # enough may now wait to start a batch beside a running one
        while not _taken(future):
            with self._changed:
                while not self._may_start() and not _taken(future):
                    self._changed.wait()
                if _taken(future):
                    break
                batch = self._waiting[: self._max_batch_size]  # this item, unless more than a batch waits before it
                del self._waiting[: self._max_batch_size]
                for _, taken in batch:
                    taken.set_running_or_notify_cancel()
                self._running += 1
            try:
                self._run(batch)
            finally:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()
        return future.result()

    def _run(self, batch: list[tuple[object, Future]]) -> None:
        try:
            results = self._run_batch([item for item, _ in batch])
        except Exception as error:  # noqa: BLE001 - handed to every caller of the batch, raised in its own thread
            for _, future in batch:
                future.set_exception(error)
        else:
            for (_, future), result in zip(batch, results):
                future.set_result(result)


def _taken(future: Future) -> bool:
    """Whether a batch has taken the item of `future` (it is running, or done)."""
    return future.running() or future.done()


class PredictionCache:
    """Recent predictions by image SHA-256 (a thread-safe LRU): feedback records the prediction the user saw."""

    def __init__(self, size: int = 512):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
