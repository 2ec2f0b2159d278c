"""Annotators' work is never lost: feedback through the app's API under concurrency, SIGKILL, a full or read-only
disk and a failing Hub.

tests/test_feedback.py proves the same properties on `FeedbackStore` alone (threads, processes, a killed writer, a
torn line, a short write, read-only permissions, Hub back-off); here every submission goes through the app's
/feedback endpoint with gradio_client, as a user's would, and every failure must reach the user as a clear error.
"""

import contextlib
import errno
import functools
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_server import FAKE_TOKEN, import_app, served_app
from helpers import encode, product_photo
from PIL import Image
from test_feedback import all_lines, folder_snapshot, http_error, images, mock_api, wait_until

from benchmarks.app_harness import AppServer
from fashion_hf.feedback import FeedbackStore

pytestmark = pytest.mark.slow  # the module starts `python app.py` in its own process (`kill_target`) and mounts disks

try:  # huggingface_hub 2.4 speaks HTTP through httpx2 (older releases through httpx): its time-outs come from there
    from httpx2 import ReadTimeout
except ImportError:
    from httpx import ReadTimeout


@pytest.fixture(scope="module")
def app_module():
    return import_app()


@pytest.fixture(scope="module")
def tagger(app_module, tiny_model_dir):
    return app_module.load_tagger(app_module.Settings(model=str(tiny_model_dir)))


@pytest.fixture
def launch(app_module, tagger, tiny_model_dir):
    """Serve the app in this process on a feedback folder; returns (client, service). Closed after the test."""
    with contextlib.ExitStack() as stack:

        def start(feedback_dir: Path, **settings):
            settings = app_module.Settings(
                model=str(tiny_model_dir), feedback_dir=str(feedback_dir), examples_dir=None, **settings
            )
            return stack.enter_context(served_app(settings, tagger=tagger))

        yield start


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """Distinct small product photos (distinct images: identical resubmissions would share one record)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for index in range(360):
        path = folder / f"photo-{index}.jpg"
        colour = (index % 7 * 36, index // 7 % 6 * 50, index // 42 * 25)
        path.write_bytes(encode(product_photo(colour=colour, size=(24, 32)), quality=90))
        paths.append(str(path))
    return paths


def submit(client: Client, path: str, tags: str = "check") -> str:
    answer = client.predict(handle_file(path), '{"gender": "Women"}', tags, True, api_name="/feedback")
    assert answer["status"] == "saved"
    return answer["id"]


def stream_feedback(url: str, paths: list[str], clients: int, acknowledged: list, errors: list, stop=None):
    """`clients` threads, each with its own gradio_client, submit the paths (each once) until done or `stop`."""
    work = queue.Queue()
    for path in paths:
        work.put(path)

    def worker():
        client = Client(url, verbose=False)
        while stop is None or not stop.is_set():
            try:
                path = work.get_nowait()
            except queue.Empty:
                return
            try:
                acknowledged.append(submit(client, path))
            except Exception as error:  # noqa: BLE001 - recorded; a killed server ends the stream
                errors.append(error)
                if stop is not None:
                    return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def check_dataset(folder: Path, expected_ids: set[str], cache_dir: Path) -> None:
    """Exactly these records: complete JSON lines, no duplicate, every image readable, and load_dataset agrees."""
    import datasets

    lines = all_lines(folder)  # fails on a partial or unparsable line
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids
    for line in lines:
        with Image.open(next(folder.glob(f"data/*/{line['file_name']}"))) as image:
            image.load()
    assert {str(path.name) for path in images(folder)} == {line["file_name"] for line in lines}  # no orphan image
    dataset = datasets.load_dataset(str(folder), split="train", cache_dir=str(cache_dir))
    assert dataset.num_rows == len(expected_ids) and set(dataset["id"]) == expected_ids


# --- many clients -------------------------------------------------------------------------------------------------


def test_128_submissions_from_16_clients_give_128_readable_records(launch, photos, tmp_path):
    """Each acknowledged submission is exactly one complete, readable record (bench_feedback.py does 1,000)."""
    folder = tmp_path / "feedback"
    client, service = launch(folder)
    acknowledged, errors = [], []
    for thread in stream_feedback(client.src, photos[:128], 16, acknowledged, errors):
        thread.join(timeout=300)
    assert errors == [] and len(acknowledged) == len(set(acknowledged)) == 128
    assert len(service.store) == 128 and service.store.corrupt_lines == 0
    check_dataset(folder, set(acknowledged), tmp_path / "cache")


# --- full disk, read-only folder ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), to fill up or make read-only; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8); the simulated tests cover these paths")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the simulated tests cover these paths")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system to the last byte (a file that grows until ENOSPC)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)
    return filler


def assert_untouched(folder: Path, before: dict[str, bytes], records: int, service) -> None:
    assert folder_snapshot(folder / "data") == before  # no record line, no image, nothing half-written
    assert list((folder / ".feedback" / "tmp").iterdir()) == []
    assert len(service.store) == records


def test_full_disk_is_a_clear_error_and_leaves_nothing_half_written(launch, photos, small_disk):
    folder = small_disk / "feedback"
    client, service = launch(folder)
    kept = submit(client, photos[1])
    filler = fill(small_disk)
    before = folder_snapshot(folder / "data")

    with pytest.raises(AppError, match="disk is full") as error:
        submit(client, photos[2])
    assert str(folder) not in str(error.value)  # the server's paths stay on the server
    assert_untouched(folder, before, 1, service)
    assert service.store.get(kept) is not None
    assert client.predict(handle_file(photos[3]), api_name="/tag")["tags"] is not None  # tagging still works

    filler.unlink()  # space again: the same submission now goes through
    stored = submit(client, photos[2])
    assert {line["id"] for line in all_lines(folder)} == {kept, stored}


def fail_once(real, fd_suffix: str, state: dict):
    """`real` (os.write or os.fsync), failing with ENOSPC the first time it is used on a file ending `fd_suffix`."""

    @functools.wraps(real)
    def patched(fd, *args):
        if not state["failed"] and os.readlink(f"/proc/self/fd/{fd}").endswith(fd_suffix):
            state["failed"] = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args)

    return patched


@pytest.mark.parametrize(
    "call, fd_suffix",
    [("write", ".tmp"), ("write", "metadata.jsonl"), ("fsync", "metadata.jsonl")],
    ids=["writing the image", "appending the record", "syncing the record"],
)
def test_enospc_at_each_write_is_a_clear_error_and_leaves_nothing_half_written(
    launch, photos, tmp_path, monkeypatch, call, fd_suffix
):
    """ENOSPC simulated in the server process, at the exact system call (the store's `os.write` / `os.fsync`)."""
    folder = tmp_path / "feedback"
    client, service = launch(folder)
    submit(client, photos[4])
    before, state = folder_snapshot(folder / "data"), {"failed": False}
    monkeypatch.setattr(os, call, fail_once(getattr(os, call), fd_suffix, state))
    with pytest.raises(AppError, match="disk is full"):
        submit(client, photos[5])
    monkeypatch.undo()
    assert state["failed"]
    assert_untouched(folder, before, 1, service)
    submit(client, photos[5])  # the next attempt, once there is space, is stored
    assert len(all_lines(folder)) == 2


@pytest.fixture(params=["mounted read-only", "simulated"])
def read_only(request, monkeypatch):
    """Make a folder read-only: a real read-only remount of a small tmpfs, or EROFS from every write call."""
    if request.param == "mounted read-only":
        disk = request.getfixturevalue("small_disk")

        def make(folder: Path):
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            return lambda: subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)

        return disk, make

    def make(folder: Path):
        root, real_open = str(folder), os.open

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        def read_only_open(path, flags, *args, **kwargs):
            if str(path).startswith(root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
        for name in ("replace", "unlink", "ftruncate", "mkdir", "rename"):
            monkeypatch.setattr(os, name, refuse)
        return monkeypatch.undo

    return request.getfixturevalue("tmp_path"), make


def test_read_only_folder_is_a_clear_error_and_changes_nothing(launch, photos, read_only):
    base, make_read_only = read_only
    folder = base / "feedback"
    client, service = launch(folder)
    kept = submit(client, photos[6])
    before = folder_snapshot(folder)
    restore = make_read_only(folder)
    try:
        with pytest.raises(AppError, match="read-only"):
            submit(client, photos[7])
        with pytest.raises(AppError, match="read-only"):
            client.predict(kept, api_name="/delete_feedback")
        assert client.predict(handle_file(photos[8]), api_name="/tag")["tags"] is not None  # tagging still works
        assert folder_snapshot(folder) == before and len(service.store) == 1
    finally:
        restore()
    submit(client, photos[7])
    assert len(all_lines(folder)) == 2


# --- the Hub failing ----------------------------------------------------------------------------------------------


def test_failed_hub_pushes_are_retried_shown_and_the_next_success_carries_everything(
    app_module, launch, photos, tmp_path, monkeypatch
):
    """Push failures of every kind (a dropped connection, HTTP 429 and 500, a time-out) from a mocked HfApi."""
    api, attempts, statuses, released = mock_api(), [], [], threading.Event()
    failures = [
        ConnectionResetError("Connection reset by peer"),
        http_error(429, retry_after="0"),
        http_error(500),
        ReadTimeout("The read operation timed out"),
    ]
    service = None

    def create_commit(**kwargs):
        attempts.append(kwargs)
        released.wait(60)  # the first push waits until every submission is in: a Hub that hangs
        if len(attempts) > 1:
            statuses.append(service.store.status())  # what the server reports after the previous failure
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]
        return MagicMock(oid="0" * 40)

    api.create_commit.side_effect = create_commit
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    fast_retries = functools.partial(FeedbackStore, hf_api=api, retry_initial_delay=0.05, retry_max_delay=5)
    monkeypatch.setattr(app_module, "FeedbackStore", fast_retries)
    client, service = launch(tmp_path / "feedback", feedback_repo="me/feedback")

    ids = [submit(client, path) for path in photos[9:14]]  # served while the push hangs
    released.set()
    wait_until(lambda: len(attempts) > len(failures) and service.store.hub_status()["pending_records"] == 0, 30)

    assert service.store.scheduler.retry_delays[:4] == [0.05, 0.1, 0.2, 0.4]  # exponential back-off
    for status, shown in zip(statuses, ["ConnectionResetError", "429", "500", "ReadTimeout"]):
        assert shown in status and "5 record(s) waiting to be pushed" in status and "retrying in" in status
        assert FAKE_TOKEN not in status
    success = {op.path_in_repo: op for op in attempts[len(failures)]["operations"]}
    metadata = b"".join(op.path_or_fileobj for path, op in success.items() if path.endswith("metadata.jsonl"))
    assert all(rid.encode() in metadata for rid in ids)
    assert all(any(path.endswith(f"{rid}.jpg") for path in success) for rid in ids)
    assert "everything pushed" in service.store.status()
    wait_until(lambda: "sent to the dataset every" in service.store_status(), 10)  # visitors: it works, no details

    later = submit(client, photos[14])  # and the next push carries what came after
    assert service.store.push_now()
    last = {op.path_in_repo: op.path_or_fileobj for op in attempts[-1]["operations"]}
    assert any(later.encode() in content for path, content in last.items() if path.endswith("metadata.jsonl"))
    assert any(path.endswith(f"{later}.jpg") for path in last)


# --- SIGKILL (last: its server starts with the module, in the background) ------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def kill_target(tiny_model_dir, tmp_path_factory):
    """`python app.py` for the SIGKILL test, started when the module starts so that it boots while the others run."""
    folder = tmp_path_factory.mktemp("killed-app")
    server = AppServer(folder, str(tiny_model_dir), folder / "feedback").launch()
    yield server
    server.stop()


def test_sigkill_mid_stream_loses_no_acknowledged_submission(launch, photos, kill_target, tmp_path):
    """8 clients stream submissions to `python app.py`; SIGKILL; after a restart every acknowledged one is there."""
    server, folder = kill_target.wait_ready(), kill_target.feedback_dir
    acknowledged, errors, stop = [], [], threading.Event()
    try:
        threads = stream_feedback(server.url, photos[200:], 8, acknowledged, errors, stop)
        wait_until(lambda: len(acknowledged) >= 24 or errors, timeout=120)
        server.kill()  # mid-stream: the clients still have requests in flight
    finally:
        stop.set()
        server.stop()
    for thread in threads:
        thread.join(timeout=60)
    acknowledged = set(acknowledged)
    assert len(acknowledged) >= 24 and errors, "the stream should have been cut while in flight"

    client, service = launch(folder)  # restart on the same folder: opening the store repairs a torn last line
    stored = {record["id"] for record in service.store.records()}
    assert acknowledged <= stored  # in-flight submissions may or may not have made it; acknowledged ones did
    after_restart = submit(client, photos[0], tags="after restart")
    check_dataset(folder, stored | {after_restart}, tmp_path / "cache")
