"""Helpers shared by the app tests: build the Gradio app on a tiny model and serve it on 127.0.0.1."""

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import REPO, encode, product_photo

FAKE_TOKEN = "hf_" + "FakeTokenThatMustNeverBeShown" * 2


def import_app():
    """The repo's `app.py` as a module (importing it must not load a model nor start a server)."""
    return importlib.import_module("app")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def example_folder(folder: Path) -> Path:
    """A small example catalogue: two of the repo's example photos when present, else two synthetic ones."""
    folder.mkdir(parents=True, exist_ok=True)
    shipped = sorted((REPO / "examples").glob("*.jpg"))[:2]
    if len(shipped) == 2:
        for path in shipped:
            shutil.copy(path, folder / path.name)
    else:
        for index, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            (folder / f"example-{index}.jpg").write_bytes(encode(product_photo(colour=colour)))
    return folder


@contextlib.contextmanager
def serving(demo, settings):
    """Launch `demo` on 127.0.0.1 and a free port with the app's launch options; yield its URL; close it after."""
    app = import_app()
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **app.launch_options(settings),
    )
    try:
        yield url
    finally:
        demo.close()


class AppProcess:
    """`python app.py` in a process of its own, configured by environment variables like a Space, on a free port.

    Its stdout and stderr go to `log_path` (read them with `log()`). Tests use it where the server must be separate
    from the test: to kill it (SIGKILL), to measure its memory, to read its logs.
    """

    def __init__(self, log_path: Path, **environment):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.log_path = Path(log_path)
        env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
        env.update(
            GRADIO_SERVER_NAME="127.0.0.1",
            GRADIO_SERVER_PORT=str(port),
            GRADIO_ANALYTICS_ENABLED="False",
            HF_HUB_OFFLINE="1",
            EXAMPLES_DIR=str(self.log_path.parent / "no-examples"),  # no example catalogue to tag at start-up
            PYTHONUNBUFFERED="1",
        )
        env.update({key: str(value) for key, value in environment.items()})
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "app.py")], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 240.0) -> "AppProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"app.py did not answer within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def memory(self) -> dict:
        """Resident memory now (`rss`) and at its peak so far (`peak`, the kernel's VmHWM), in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}

    def kill(self) -> None:
        """SIGKILL: no clean-up, no flush, no atexit: what an out-of-memory kill or a pulled plug does."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def served_app(settings, **build_kwargs):
    """Build the app in this process (`build_app(settings, **build_kwargs)`), serve it, yield (client, service).

    On exit the server and the feedback store are closed.
    """
    from gradio_client import Client

    demo = import_app().build_app(settings, **build_kwargs)
    try:
        with serving(demo, settings) as url:
            yield Client(url, verbose=False), demo.service
    finally:
        demo.service.store.close(push=False)  # stops Hub sync, if any: no push at interpreter exit
