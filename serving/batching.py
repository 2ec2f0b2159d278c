"""Concurrent requests sharing the model: one batched call for many callers, and the predictions they saw."""

import threading
from collections import OrderedDict
from concurrent.futures import Future


class RequestBatcher:
    """Runs concurrent requests' items through one batched call, each caller waiting for its own result.

    Inputs are checked by their own request before they join (a broken upload fails only its sender, which Gradio's
    `batch=True` cannot do: one exception fails every request of the batch). `slots` bounds the batches running at
    once; a caller that gets a slot takes every item waiting (up to `max_batch_size`), so items that arrive while a
    batch runs are batched together.
    """

    def __init__(self, run_batch, max_batch_size: int, slots: threading.Semaphore):
        self._run_batch, self._max_batch_size, self._slots = run_batch, max_batch_size, slots
        self._waiting: list[tuple[object, Future]] = []
        self._lock = threading.Lock()

    def __call__(self, item):
        future = Future()
        with self._lock:
            self._waiting.append((item, future))
        # Until a batch takes this item (its future then runs): take a slot and run what waits, this item included
        # unless more than a batch waits before it. Once taken, only wait: a caller that kept taking slots to find
        # nothing waiting would spin.
        while not (future.running() or future.done()):
            with self._slots:
                with self._lock:
                    batch = self._waiting[: self._max_batch_size]
                    del self._waiting[: self._max_batch_size]
                    for _, taken in batch:
                        taken.set_running_or_notify_cancel()
                if batch:
                    self._run(batch)
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
