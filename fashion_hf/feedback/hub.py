"""The feedback store kept in sync with a Hub dataset: a `CommitScheduler` that retries and never loses a record.

`FeedbackStore` is the local store (`store.py`) plus Hub sync when given a `repo_id`. It decides what to push
(`push_snapshot`, read under the folder's lock) and records what was pushed (`mark_pushed`); its
`FeedbackCommitScheduler` decides when, commits, and retries failures with back-off. `HubPushState` says how the
pushes are going, for `FeedbackStore.status()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, CommitScheduler

from .files import atomic_write, json_line, read_json_lines
from .schema import DATA_DIR, IMAGE_SUFFIX, METADATA_NAME, utc_timestamp
from .store import FeedbackStoreError, LocalFeedbackStore

logger = logging.getLogger(__name__)

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s'\")]+")


class Redactor:
    """Hides secrets in text meant for people or logs: the ones given (the Hub token), and anything shaped like a
    Hub token or a bearer credential (another token, echoed by a server)."""

    def __init__(self, secrets: Iterable[str | None]):
        self.secrets = [secret for secret in secrets if secret]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        text = _TOKEN_RE.sub("hf_***", text)
        return _BEARER_RE.sub(r"\1***", text)


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


@dataclass
class HubPushState:
    """How the Hub pushes are going, for `FeedbackStore.status()`; written by the scheduler."""

    last_push_time: str | None = None
    last_check_time: str | None = None
    last_error: str | None = None
    last_error_time: str | None = None
    consecutive_failures: int = 0
    next_retry_at: float | None = None  # time.time()
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self, message: str, retry_in: float | None) -> int:
        with self.lock:
            self.consecutive_failures += 1
            self.last_error = message
            self.last_error_time = utc_timestamp()
            self.next_retry_at = None if retry_in is None else time.time() + retry_in
            return self.consecutive_failures

    def succeeded(self, committed: bool) -> None:
        with self.lock:
            now = utc_timestamp()
            self.last_check_time = now
            if committed:
                self.last_push_time = now
            self.consecutive_failures = 0
            self.next_retry_at = None


@dataclass
class PushSnapshot:
    """What one Hub commit carries: changed files with their content, and withdrawn paths to delete."""

    adds: list[tuple[str, bytes, list[int]]]  # (path in folder, content, [size, mtime_ns])
    deletes: list[str]
    truncated: bool

    @property
    def records(self) -> int:
        """Records in the metadata files this push updates (for the commit message)."""
        return sum(content.count(b"\n") for path, content, _ in self.adds if path.endswith(METADATA_NAME))


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
        self.state_name = state_file_name(self.repo_id, self.revision, self.path_in_repo)
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
                    self.state_name, self.max_files_per_commit, self.max_bytes_per_commit
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
            self._store.mark_pushed(self.state_name, snapshot)
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


class FeedbackStore(LocalFeedbackStore):
    """Durable, append-only store of tag corrections; a `datasets` dataset folder, optionally synced to the Hub.

    Safe to use from many threads and processes at once (an `fcntl.flock` lock on `<folder>/.feedback/lock`).

    Args:
        folder: the local folder (created if missing).
        repo_id: Hub dataset repo to push to (private by default); None keeps everything local.
        hf_api: `HfApi` client to push with (injected in tests); default `HfApi(token=token)`.
        token: Hub token used when `hf_api` is not given; never logged nor shown in errors or `status()`.
        every_minutes: minutes between scheduled pushes (at least 5: the Hub rate-limits commits).
        private: create the Hub repo private (ignored if it exists).
        revision: Hub branch to push to (default `main`).
        retry_initial_delay / retry_max_delay: back-off of failed pushes (see `FeedbackCommitScheduler`).
        **store_options: the local store's limits and vocabulary (`LocalFeedbackStore`): `max_image_pixels`,
            `max_image_bytes`, `max_text_length`, `max_tags`, `max_attributes`, `max_predicted_chars`,
            `allowed_attributes`, `max_records_per_shard`.

    Example:
        >>> store = FeedbackStore("feedback", repo_id="me/fashion-feedback")
        >>> rid = store.add("shirt.jpg", predicted, {"baseColour": "Blue"}, ["slim fit"], consent=True,
        ...                 model_id="me/fashion-tagger", model_revision="abc123")
        >>> store.status()
    """

    def __init__(
        self,
        folder: str | Path,
        repo_id: str | None = None,
        hf_api: Any = None,
        token: str | None = None,
        every_minutes: float = 5,
        *,
        private: bool = True,
        revision: str | None = None,
        retry_initial_delay: float = 10.0,
        retry_max_delay: float | None = None,
        **store_options: Any,
    ) -> None:
        super().__init__(folder, **store_options)
        self.repo_id = repo_id
        self.every_minutes = max(5.0, float(every_minutes))
        if every_minutes < 5:
            logger.info("every_minutes=%s raised to 5: the Hub rate-limits commits.", every_minutes)
        self.private = private
        self.revision = revision
        self.retry_initial_delay = float(retry_initial_delay)
        self.retry_max_delay = retry_max_delay
        self._hf_api = hf_api
        self._token = token
        self.redact = Redactor([token])  # `text` with the Hub token, and anything shaped like one, masked

        self.push_state = HubPushState()
        self._scheduler: FeedbackCommitScheduler | None = None
        self._sched_init_lock = threading.Lock()
        self._sched_flag_lock = threading.Lock()
        self._creating = False
        self._create_failures = 0
        self._next_create_attempt = 0.0
        self._create_timer: threading.Timer | None = None

    def add(self, *args: Any, **kwargs: Any) -> str:
        """`LocalFeedbackStore.add`; the first record stored starts the Hub sync (in the background)."""
        record_id = super().add(*args, **kwargs)
        self._ensure_scheduler()
        return record_id

    def delete(self, record_id: str) -> bool:
        """`LocalFeedbackStore.delete`; while Hub sync runs, the withdrawal is pushed at once, not at the next
        scheduled push."""
        deleted = super().delete(record_id)
        if deleted and self._scheduler is not None:
            self._scheduler.trigger()
        return deleted

    def status(self) -> str:
        """One line for the app: records stored, what awaits a push, last push time and last error (no token)."""
        info = self.hub_status()
        if not info["enabled"]:
            return f"{info['records']} feedback record(s) saved locally; Hub sync is off."
        waiting = []
        if info["pending_records"]:
            waiting.append(f"{info['pending_records']} record(s) waiting to be pushed")
        if info["pending_deletions"]:
            waiting.append(f"{info['pending_deletions']} withdrawal(s) waiting to be pushed")
        parts = [
            f"Hub sync to {info['repo_id']}: " + (", ".join(waiting) if waiting else "everything pushed"),
            f"last push: {info['last_push_time'] or 'never'}",
        ]
        if info["consecutive_failures"]:
            error = f"last error ({info['last_error_time']}): {info['last_error']}"
            if info["retry_in_seconds"] is not None:
                error += f"; retrying in {info['retry_in_seconds']:.0f}s"
            parts.append(error)
        return self.redact("; ".join(parts) + ".")

    def hub_status(self) -> dict[str, Any]:
        """`status()` as data: records, enabled, repo_id, pending_records, pending_deletions, last_push_time,
        last_error, last_error_time, consecutive_failures, retry_in_seconds."""
        with self._lock, self._flock(exclusive=False):
            self._index.refresh()
            count = len(self._index.records)
            pending_records, pending_deletions = self._pending_counts() if self.repo_id else (0, 0)
        hub = self.push_state
        with hub.lock:
            retry_in = None if hub.next_retry_at is None else max(0.0, hub.next_retry_at - time.time())
            return {
                "records": count,
                "enabled": self.repo_id is not None,
                "repo_id": self.repo_id,
                "pending_records": pending_records,
                "pending_deletions": pending_deletions,
                "last_push_time": hub.last_push_time,
                "last_error": self.redact(hub.last_error) if hub.last_error else None,
                "last_error_time": hub.last_error_time,
                "consecutive_failures": hub.consecutive_failures,
                "retry_in_seconds": retry_in,
            }

    def push_now(self) -> bool:
        """Push pending changes now, in this thread; True on success (or nothing to push). Needs `repo_id`."""
        if self.repo_id is None:
            raise FeedbackStoreError("push_now() needs a repo_id: this store keeps feedback locally only.")
        scheduler = self._ensure_scheduler(wait=True)
        if scheduler is None:
            return False
        scheduler.push_to_hub()
        return scheduler.last_push_ok

    @property
    def scheduler(self) -> FeedbackCommitScheduler | None:
        """The Hub scheduler, once created (lazily, at the first `add`)."""
        return self._scheduler

    def close(self, push: bool = True) -> None:
        """Stop Hub sync (after a last push when `push`); local data stays. Further `add` calls fail."""
        super().close()
        with self._sched_flag_lock:
            if self._create_timer is not None:
                self._create_timer.cancel()
        scheduler = self._scheduler
        if scheduler is not None:
            if push:
                scheduler.push_to_hub()
            scheduler.shutdown()

    def __repr__(self) -> str:
        return f"FeedbackStore(folder={str(self.folder)!r}, repo_id={self.repo_id!r})"

    # -- the scheduler, created lazily ------------------------------------------------------------------------------

    def _ensure_scheduler(self, wait: bool = False) -> FeedbackCommitScheduler | None:
        """Create the Hub scheduler lazily (its constructor calls `create_repo`): in the background, or now."""
        if self.repo_id is None or self._scheduler is not None or self._closed:
            return self._scheduler
        if wait:
            self._create_scheduler()
            return self._scheduler
        with self._sched_flag_lock:
            if self._creating or time.monotonic() < self._next_create_attempt:
                return None
            self._creating = True
        threading.Thread(target=self._create_scheduler, name="feedback-hub-init", daemon=True).start()
        return None

    def _retry_create(self) -> None:
        with self._sched_flag_lock:
            if self._creating or self._scheduler is not None or self._closed:
                return
            self._creating = True
        self._create_scheduler()

    def _create_scheduler(self) -> None:
        try:
            with self._sched_init_lock:
                if self._scheduler is not None or self._closed:
                    return
                try:
                    self._scheduler = FeedbackCommitScheduler(
                        store=self,
                        repo_id=self.repo_id,
                        repo_type="dataset",
                        folder_path=self.folder,
                        every=self.every_minutes,
                        private=self.private,
                        revision=self.revision,
                        token=self._token,
                        hf_api=self._hf_api,
                        retry_initial_delay=self.retry_initial_delay,
                        retry_max_delay=self.retry_max_delay,
                    )
                except Exception as exc:  # noqa: BLE001 - reported in status(), retried with back-off
                    self._create_failures += 1
                    delay = min(self.retry_initial_delay * 2 ** (self._create_failures - 1), self.every_minutes * 60)
                    message = self.redact(f"{type(exc).__name__}: {exc}")[:500]
                    self.push_state.failed(f"could not create or reach the Hub repo: {message}", delay)
                    logger.warning("Creating Hub repo %s failed: %s; retrying in %.3gs", self.repo_id, message, delay)
                    with self._sched_flag_lock:
                        self._next_create_attempt = time.monotonic() + delay
                        if self._create_timer is not None:
                            self._create_timer.cancel()
                        if not self._closed:
                            self._create_timer = threading.Timer(delay, self._retry_create)
                            self._create_timer.daemon = True
                            with contextlib.suppress(RuntimeError):  # interpreter shutting down
                                self._create_timer.start()
                    return
                self._create_failures = 0
        finally:
            with self._sched_flag_lock:
                self._creating = False

    # -- what FeedbackCommitScheduler pushes ------------------------------------------------------------------------

    def _pushed(self, state_name: str) -> dict[str, list[int]]:
        """What was pushed to one repo: path -> [size, mtime_ns] (`state_file_name`)."""
        try:
            state = json.loads((self._state / state_name).read_text())
            files = state.get("files", {}) if isinstance(state, dict) else {}
            return files if isinstance(files, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def _repo_files(self) -> list[tuple[str, Path]]:
        """Files that belong in the repo: README, images, then metadata (so records follow their images)."""
        files = [("README.md", self.folder / "README.md")]
        files += [(f"{DATA_DIR}/{p.parent.name}/{p.name}", p) for p in sorted(self._data.glob(f"*/*{IMAGE_SUFFIX}"))]
        files += [(f"{DATA_DIR}/{p.parent.name}/{p.name}", p) for p in sorted(self._data.glob(f"*/{METADATA_NAME}"))]
        return files

    def _pending_deletes(self) -> list[str]:
        """Withdrawn repo paths not yet removed from the Hub, once each (a path written again is not withdrawn)."""
        pending = [item.get("path") for item in read_json_lines(self._pending_deletes_path)]
        return [p for p in dict.fromkeys(pending) if isinstance(p, str) and not (self.folder / p).exists()]

    def push_snapshot(self, state_name: str, max_files: int, max_bytes: int) -> PushSnapshot:
        """What to push, read under the folder's shared lock (which every writer's exclusive lock excludes, in this
        process and others): changed files with their content, withdrawn paths."""
        with self._flock(exclusive=False):
            pushed = self._pushed(state_name)
            adds: list[tuple[str, bytes, list[int]]] = []
            total, truncated = 0, False
            for rel, path in self._repo_files():
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                key = [st.st_size, st.st_mtime_ns]
                if pushed.get(rel) == key:
                    continue
                if adds and (len(adds) >= max_files or total + st.st_size > max_bytes):
                    truncated = True
                    break
                adds.append((rel, path.read_bytes(), key))
                total += st.st_size
            return PushSnapshot(adds, [] if truncated else self._pending_deletes(), truncated)

    def mark_pushed(self, state_name: str, snapshot: PushSnapshot) -> None:
        """Record a successful commit (under the exclusive lock, merged with what other processes pushed)."""
        with self._flock(exclusive=True):
            pushed = self._pushed(state_name)
            for rel, _, key in snapshot.adds:
                pushed[rel] = key
            for rel in snapshot.deletes:
                pushed.pop(rel, None)
            for rel in [rel for rel in pushed if not (self.folder / rel).exists()]:
                pushed.pop(rel)
            state = {"repo_id": self.repo_id, "files": pushed}
            atomic_write(self._state / state_name, json.dumps(state).encode(), self._tmp)
            if snapshot.deletes:
                done = set(snapshot.deletes)
                pending = read_json_lines(self._pending_deletes_path)
                remaining = b"".join(json_line(item) for item in pending if item.get("path") not in done)
                atomic_write(self._pending_deletes_path, remaining, self._tmp)

    def _pending_counts(self) -> tuple[int, int]:
        """(records not yet pushed, withdrawals not yet pushed); call under the lock after refreshing the index."""
        scheduler = self._scheduler
        state_name = scheduler.state_name if scheduler is not None else state_file_name(self.repo_id, self.revision)
        pushed = self._pushed(state_name)
        pending = 0
        for shard, offset in self._index.where.values():
            rel = f"{DATA_DIR}/{shard}/{METADATA_NAME}"
            key = pushed.get(rel)
            if key is None:
                pending += 1
                continue
            try:
                st = (self.folder / rel).stat()
            except FileNotFoundError:
                continue
            if [st.st_size, st.st_mtime_ns] != key and offset >= key[0]:
                pending += 1
        return pending, len(self._pending_deletes())
