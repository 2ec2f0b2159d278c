"""Concurrent requests sharing the model: one batched call for many callers, and the predictions they saw."""

import threading
from collections import OrderedDict
from concurrent.futures import Future


class RequestBatcher:
    """Runs concurrent requests' items through one batched call, each caller waiting for its own result.

    Inputs are checked by their own request before they join (a broken upload fails only its sender, which Gradio's
    `batch=True` cannot do: one exception fails every request of the batch). One batch runs at a time: items that
    arrive while it runs wait, and the first of their callers to find the batcher free runs them all (up to
    `max_batch_size`) as the next batch. A second batch beside a running one would mostly be a lone arrival, which
    costs nearly as much as a full batch and slows it (`BENCHMARKS.md`, "Serving efficiency"). Callers wait on a
    condition, never on a lock that a batch holds: one whose item another caller's batch took returns as soon as
    that batch ends.
    """

    def __init__(self, run_batch, max_batch_size: int):
        self._run_batch, self._max_batch_size = run_batch, max_batch_size
        self._waiting: list[tuple[object, Future]] = []
        self._running = False
        self._changed = threading.Condition()

    def __call__(self, item):
        future = Future()
        with self._changed:
            self._waiting.append((item, future))
        while not _taken(future):
            with self._changed:
                while self._running and not _taken(future):
                    self._changed.wait()
                if _taken(future):
                    break
                batch = self._waiting[: self._max_batch_size]  # this item, unless more than a batch waits before it
                del self._waiting[: self._max_batch_size]
                for _, taken in batch:
                    taken.set_running_or_notify_cancel()
                self._running = True
            try:
                self._run(batch)
            finally:
                with self._changed:
                    self._running = False
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
