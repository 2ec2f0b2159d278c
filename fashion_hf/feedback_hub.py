"""Pushing a `FeedbackStore` folder to a Hub dataset: a `CommitScheduler` that retries and never loses a record.

The store decides what to push (`FeedbackStore.push_snapshot`, read under its lock) and records what was pushed
(`mark_pushed`); this module decides when, commits, and retries failures with back-off.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, CommitScheduler

if TYPE_CHECKING:
    from fashion_hf.feedback import FeedbackStore

logger = logging.getLogger(__name__)


def state_file_name(repo_id: str, revision: str | None, path_in_repo: str = "") -> str:
    """Name of the file recording what was pushed to one repo/branch/path."""
    key = f"{repo_id}\ndataset\n{revision}\n{path_in_repo}"
    return "hub-" + hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_retryable(exc: BaseException) -> bool:
    status = _http_status(exc)
    return status is None or status in (408, 409, 412, 423, 425, 429) or status >= 500


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


class FeedbackCommitScheduler(CommitScheduler):
    """`CommitScheduler` for a `FeedbackStore` folder that never loses a push error.

    Differences from the parent (huggingface_hub 2.4): pushes run on its own single-thread executor (not on
    `HfApi.run_as_future`), are serialised by a lock so `push_to_hub` may also be called directly, and catch every
    error: it is recorded (token redacted) for `FeedbackStore.status()` and, when worth retrying (network error,
    408/409/429/5xx), retried with exponential back-off (`retry_initial_delay * 2**(n-1)`, capped at
    `retry_max_delay`, at least the server's Retry-After). Nothing is lost meanwhile: files are only marked as pushed
    after a successful commit, so the next one carries everything. What is uploaded: the README, the images and the
    metadata files that changed since the last successful push (the record of what was pushed is shared by all
    processes under the store's lock, so a restart does not re-upload everything); metadata files are read under
    the lock (a file rewritten by a delete is never uploaded half-old, half-new); withdrawn images are deleted
    from the repo.
    """

    def __init__(
        self,
        *,
        store: FeedbackStore,
        retry_initial_delay: float = 10.0,
        retry_max_delay: float | None = None,
        max_files_per_commit: int = 500,
        max_bytes_per_commit: int = 256 * 1024 * 1024,
        **kwargs: Any,
    ) -> None:
        # Set before super().__init__: it starts the scheduler thread.
        self._store = store
        self._status = store.push_state
        self._ready = threading.Event()
        self._stop_event = threading.Event()
        self._push_lock = threading.Lock()
        self._timer_lock = threading.Lock()
        self._retry_timer: threading.Timer | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-push")
        self.retry_initial_delay = float(retry_initial_delay)
        self.max_files_per_commit = max_files_per_commit
        self.max_bytes_per_commit = max_bytes_per_commit
        self.retry_delays: list[float] = []
        self.last_push_ok: bool | None = None
        self.last_future: Future | None = None
        requested_repo_id = kwargs["repo_id"]
        try:
            super().__init__(**kwargs)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        if not isinstance(self.repo_id, str):  # `create_repo` returned no RepoUrl (e.g. a mocked HfApi)
            self.repo_id = requested_repo_id
        self.retry_max_delay = float(retry_max_delay) if retry_max_delay is not None else self.every * 60.0
        self._state_name = state_file_name(self.repo_id, self.revision, self.path_in_repo)
        self._ready.set()

    # -- scheduling -------------------------------------------------------------------------------------------------

    def _run_scheduler(self) -> None:
        self._ready.wait()
        while not self._stop_event.is_set():
            self.last_future = self.trigger()
            if self._stop_event.wait(self.every * 60):
                break

    def trigger(self) -> Future:
        """Queue a push in the background; the future's result is the `CommitInfo` (None: nothing or failed)."""
        try:
            return self._executor.submit(self._push_to_hub)
        except RuntimeError:  # executor shut down
            future: Future = Future()
            future.set_result(None)
            return future

    def stop(self) -> None:
        super().stop()
        self._stop_event.set()
        with self._timer_lock:
            if self._retry_timer is not None:
                self._retry_timer.cancel()
                self._retry_timer = None

    def shutdown(self) -> None:
        self.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _schedule_retry(self, delay: float) -> None:
        with self._timer_lock:
            if self._stop_event.is_set() or self._retry_timer is not None:
                return
            timer = threading.Timer(delay, self._retry_now)
            timer.daemon = True
            try:
                timer.start()
            except RuntimeError:  # interpreter shutting down (the parent's atexit push)
                return
            self._retry_timer = timer

    def _retry_now(self) -> None:
        with self._timer_lock:
            self._retry_timer = None
        if not self._stop_event.is_set():
            self.trigger()

    # -- pushing ----------------------------------------------------------------------------------------------------

    def push_to_hub(self):  # noqa: ANN201 (CommitInfo | None)
        """Push what changed; never raises. Returns the last `CommitInfo`, or None (nothing to push, or failed)."""
        with self._push_lock:
            try:
                info, committed = self._push_pending()
            except Exception as exc:  # noqa: BLE001 - every failure is reported and retried
                self._push_failed(exc)
                return None
            self.last_push_ok = True
            self._status.succeeded(committed)
            with self._timer_lock:
                if self._retry_timer is not None:
                    self._retry_timer.cancel()
                    self._retry_timer = None
            return info

    def _push_pending(self) -> tuple[Any, bool]:
        info, committed = None, False
        while True:
            with self.lock:
                snapshot = self._store.push_snapshot(
                    self._state_name, self.max_files_per_commit, self.max_bytes_per_commit
                )
            if not snapshot.adds and not snapshot.deletes:
                return info, committed
            prefix = f"{self.path_in_repo.strip('/')}/" if self.path_in_repo else ""
            deletes: list[str] = []
            if snapshot.deletes:
                remote = set(
                    self.api.list_repo_files(repo_id=self.repo_id, repo_type=self.repo_type, revision=self.revision)
                )
                deletes = [path for path in snapshot.deletes if prefix + path in remote]
            operations: list[Any] = [
                CommitOperationAdd(path_in_repo=prefix + path, path_or_fileobj=content)
                for path, content, _ in snapshot.adds
            ]
            operations += [CommitOperationDelete(path_in_repo=prefix + path) for path in deletes]
            if operations:
                records = snapshot.records
                info = self.api.create_commit(
                    repo_id=self.repo_id,
                    repo_type=self.repo_type,
                    revision=self.revision,
                    operations=operations,
                    commit_message=(
                        f"Feedback sync: {len(snapshot.adds)} file(s) added or updated"
                        + (f" ({records} record(s) in updated metadata files)" if records else "")
                        + (f", {len(deletes)} withdrawn file(s) removed" if deletes else "")
                    ),
                )
                committed = True
            self._store.mark_pushed(self._state_name, snapshot)
            if not snapshot.truncated:
                return info, committed

    def _push_failed(self, exc: BaseException) -> None:
        self.last_push_ok = False
        message = self._store.redact(f"{type(exc).__name__}: {exc}")[:500]
        delay = None
        if _is_retryable(exc) and not self._stop_event.is_set():
            failures = self._status.consecutive_failures + 1
            delay = min(self.retry_initial_delay * 2 ** (failures - 1), self.retry_max_delay)
            server_delay = _retry_after(exc)
            if server_delay is not None:
                delay = max(delay, server_delay)
        failures = self._status.failed(message, delay)
        logger.warning(
            "Pushing feedback to %s failed (attempt %d): %s%s",
            self.repo_id,
            failures,
            message,
            f"; retrying in {delay:.3g}s" if delay is not None else "; will try again at the next scheduled push",
        )
        if delay is not None:
            self.retry_delays.append(delay)
            self._schedule_retry(delay)
