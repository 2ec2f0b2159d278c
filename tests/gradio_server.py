"""Helpers shared by the app tests: build the Gradio app on a tiny model and serve it on 127.0.0.1."""

import contextlib
import importlib
import shutil
from pathlib import Path

from helpers import REPO, encode, product_photo

from benchmarks.app_harness import free_port

FAKE_TOKEN = "hf_" + "FakeTokenThatMustNeverBeShown" * 2


def import_app():
    """The repo's `app.py` as a module (importing it must not load a model nor start a server)."""
    return importlib.import_module("app")


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
        **app.launch_options(settings, demo.service),
    )
    try:
        yield url
    finally:
        demo.close()


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
