"""Security and privacy: no pickle, no leaked token, markup kept as data and shown escaped, safe limits.

Proved elsewhere, not repeated here: consent before storing and withdrawal by record id through the API
(tests/test_app.py: `test_absurd_feedback_is_a_clear_error_and_stores_nothing[no consent]`,
`test_feedback_can_be_withdrawn_by_id`; on the store: tests/test_feedback.py), the token absent from the page,
the config and the status line (`test_page_never_shows_the_token`, `test_store_errors_never_show_the_token`) and
from the store's logs (`test_push_errors_are_reported_without_the_token`), stored images without EXIF/GPS
(tests/test_hostile.py through /feedback; tests/test_feedback.py on the store), limits read from the environment
(`test_settings_come_from_the_environment`).
"""

import ast
import functools
import html
import json
import logging
import os
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from gradio_server import FAKE_TOKEN, import_app, served_app
from helpers import REPO, encode, product_photo, tagging_model, tiny_config
from huggingface_hub import CommitOperationAdd
from test_feedback import http_error, mock_api, wait_until

import fashion_hf
from fashion_hf.feedback import FeedbackStore

# --- model loading: safetensors, or torch.load(weights_only=True); never pickle -----------------------------------

UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
    "pandas.read_pickle", "pd.read_pickle", "torch.jit.load",
}  # fmt: skip


def python_files() -> list[Path]:
    skip = {".git", "__pycache__", ".venv", "venv", "node_modules", ".pytest_cache"}
    return [path for path in sorted(REPO.rglob("*.py")) if not skip & set(path.relative_to(REPO).parts)]


def dotted(node) -> str | None:
    """`torch.load` for the call `torch.load(...)`; names imported with `from torch import load` are resolved."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def model_loading_problems(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    imported = {}  # local name -> module.name, for `from torch import load as tl`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        name = f"{imported[head]}.{rest}".rstrip(".") if head in imported else name
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        where = f"{path.relative_to(root)}:{node.lineno}"
        if name == "torch.load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        elif name in UNSAFE_CALLS:
            problems.append(f"{where}: {name} (pickle)")
        elif name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy"):
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{where}: numpy load with allow_pickle")
        elif name.split(".")[-1] == "from_pretrained" and "use_safetensors" in keywords:
            flag = keywords["use_safetensors"]
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: from_pretrained(use_safetensors=...) allows pickle checkpoints")
    return problems


def test_source_loads_weights_only_from_safetensors_or_weights_only_torch_load():
    files = python_files()
    assert REPO / "fashion_hf" / "encoder_weights.py" in files and REPO / "app.py" in files
    torch_loads = [path for path in files if "torch.load(" in path.read_text(encoding="utf-8")]
    assert torch_loads, "the scan should see the one torch.load (ImageNet weights in fashion_hf/encoder_weights.py)"
    problems = [problem for path in files for problem in model_loading_problems(path)]
    assert problems == []


def test_the_scan_catches_unsafe_loads(tmp_path):
    """The scanner itself: every unsafe form is reported, the safe ones are not."""
    source = tmp_path / "unsafe.py"
    source.write_text(
        "import pickle, torch, numpy as np\nfrom torch import load as tl\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\ntl('a')\npickle.loads(b'')\n"
        "np.load('a', allow_pickle=True)\nM.from_pretrained('m', use_safetensors=False)\n"
        "torch.load('a', weights_only=True)\nnp.load('a')\n"
    )
    problems = model_loading_problems(source, root=tmp_path)
    assert [problem.split(":")[1] for problem in problems] == ["3", "4", "5", "6", "7", "8"]


def test_training_resume_reads_no_pickle():
    """accelerate unpickles registered checkpoint objects with weights_only=False; the run's progress is JSON instead."""
    loop = REPO / "fashion_hf" / "training" / "loop.py"
    assert "accelerator.load_state(" in loop.read_text(encoding="utf-8")  # the code that resumes a checkpoint
    training = sorted((REPO / "fashion_hf" / "training").glob("*.py"))
    assert [path.name for path in training if "register_for_checkpointing(" in path.read_text(encoding="utf-8")] == []
    assert model_loading_problems(loop) == []


def test_the_app_refuses_a_pickled_checkpoint_without_running_it(tmp_path):
    """A model folder with a malicious pytorch_model.bin: loading it must fail without executing the pickle."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    folder = tmp_path / "model"
    model = fashion_hf.FashionTaggerModel(tiny_config()).eval()
    model.save_pretrained(folder)
    fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "payload": Payload()}, folder / "pytorch_model.bin")

    app = import_app()
    with pytest.raises(Exception, match=r"(?i)weights.only|safetensors|unsupported global"):  # noqa: B017
        app.load_tagger(app.Settings(model=str(folder)))
    assert not marker.exists()


# --- an app whose vocabulary and Hub errors carry markup, with a token in the environment --------------------------

SCRIPT_LABEL = '<img src=x onerror="alert(1)">'
VOCABULARY = {  # every label holds markup or an ampersand: whatever the model says, it must be escaped on the page
    "gender": ["Men & Boys", "<i>Women</i>"],
    "articleType": [SCRIPT_LABEL, "Tops & Tees", "<script>alert(2)</script>"],
}
DETAIL_TAGS = ["R&D", "<b onmouseover='alert(3)'>bold</b>"]
MARKUP = ("<img", "<i>", "<script", "<b ")


@pytest.fixture(scope="module")
def markup_model_dir(tmp_path_factory) -> Path:
    tags = [[label, name] for name, labels in VOCABULARY.items() for label in labels]
    model = tagging_model(attributes=VOCABULARY, tags=tags + [[text, "detail"] for text in DETAIL_TAGS])
    folder = tmp_path_factory.mktemp("markup-model")
    model.save_pretrained(folder)
    fashion_hf.FashionTaggerImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub():
    """A Hub that accepts the repo and fails every commit with an error echoing the token and some markup."""
    api = mock_api()
    error = http_error(401)
    error.append_to_message(f" (Authorization: Bearer {FAKE_TOKEN}) <img src=x onerror=alert(4)>")
    api.create_commit.side_effect = error
    return api


@pytest.fixture(scope="module")
def served(markup_model_dir, hub, tmp_path_factory):
    app = import_app()
    folder = tmp_path_factory.mktemp("secure-app")
    settings = app.Settings(
        model=str(markup_model_dir), feedback_dir=str(folder / "feedback"), feedback_repo="me/feedback",
        examples_dir=None,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", FAKE_TOKEN)
        patch.setattr(app, "FeedbackStore", functools.partial(FeedbackStore, hf_api=hub, retry_initial_delay=600))
        with served_app(settings) as (client, service):
            yield client, service, settings


def test_markup_in_feedback_is_stored_verbatim_as_data(served, tmp_path):
    import datasets

    client, service, settings = served
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(product_photo(), "PNG"))
    corrected = json.dumps({"articleType": SCRIPT_LABEL, "gender": "Men & Boys"})
    answer = client.predict(handle_file(str(photo)), corrected, "Rock & Roll, Levi's, 3/4 sleeve", True,
                            api_name="/feedback")  # fmt: skip
    record = service.store.get(answer["id"])
    assert json.loads(record["corrected_attributes"]) == {"articleType": SCRIPT_LABEL, "gender": "Men & Boys"}
    assert record["corrected_tags"] == ["Rock & Roll", "Levi's", "3/4 sleeve"]
    raw = Path(settings.feedback_dir).joinpath("data").glob("*/metadata.jsonl")
    line = next(line for path in raw for line in path.read_text(encoding="utf-8").splitlines() if answer["id"] in line)
    assert "&amp;" not in line and "&lt;" not in line and "Rock & Roll" in line  # data, not HTML
    dataset = datasets.load_dataset(settings.feedback_dir, split="train", cache_dir=str(tmp_path / "cache"))
    row = next(row for row in dataset if row["id"] == answer["id"])
    assert json.loads(row["corrected_attributes"])["articleType"] == SCRIPT_LABEL
    assert row["corrected_tags"] == ["Rock & Roll", "Levi's", "3/4 sleeve"]


def test_markup_is_rendered_escaped(served, tmp_path):
    client, service, _ = served
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(product_photo(colour=(10, 120, 40))))
    outputs = client.predict(handle_file(str(photo)), api_name="/tag_image")
    chips, prediction = outputs[len(VOCABULARY)], outputs[-1]
    assert prediction["tags"], "the model should generate at least one tag for this test to mean something"
    assert not any(markup in chips for markup in MARKUP)
    assert all(html.escape(tag["tag"]) in chips for tag in prediction["tags"])
    assert prediction["tags"][0]["tag"] in sum(VOCABULARY.values(), DETAIL_TAGS)  # the API returns the data as is
    with pytest.raises(AppError) as error:  # a label outside the vocabulary is echoed back, escaped
        client.predict(handle_file(str(photo)), '{"articleType": "<b>x</b>"}', "", True, api_name="/feedback")
    assert "&lt;b&gt;x" in str(error.value) and "<b>" not in str(error.value)



def test_visitors_see_a_generic_hub_status_and_the_log_the_redacted_detail(served, caplog):
    _, service, _ = served
    with caplog.at_level("WARNING"):
        assert service.store.push_now() is False
    status = service.store_status()
    assert status == "Corrections are kept on this server; sending them to the dataset is delayed and will be retried."
    assert "401 Server Error" in caplog.text and FAKE_TOKEN not in caplog.text  # the detail is for the server's log


def test_the_token_never_reaches_logs_errors_cards_or_pushed_files(served, hub, caplog, capfd, tmp_path):
    client, service, settings = served
    app = import_app()
    photo, junk = tmp_path / "photo.jpg", tmp_path / "junk.jpg"
    photo.write_bytes(encode(product_photo(colour=(90, 10, 10))))
    junk.write_bytes(b"<html>not a photo</html>")
    errors = []
    with caplog.at_level(logging.DEBUG):
        client.predict(handle_file(str(photo)), "{}", "check", True, api_name="/feedback")
        assert service.store.push_now() is False
        wait_until(lambda: service.store.hub_status()["consecutive_failures"] >= 1)
        for call in (
            lambda: client.predict(handle_file(str(junk)), api_name="/tag"),
            lambda: client.predict(handle_file(str(photo)), '{"colour": "x"}', "", True, api_name="/feedback"),
            lambda: client.predict(handle_file(str(photo)), "{}", "check", False, api_name="/feedback"),
            lambda: client.predict("0" * 32, api_name="/delete_feedback"),
        ):
            with pytest.raises(AppError) as error:
                call()
            errors.append(str(error.value))
    out, err = capfd.readouterr()
    assert "Pushing feedback to me/feedback failed" in caplog.text and "401" in caplog.text  # it was logged ...
    assert hub.create_commit.called  # ... and the token was in play
    pushed = b"".join(
        op.path_or_fileobj
        for call in hub.create_commit.call_args_list
        for op in call.kwargs["operations"]
        if isinstance(op, CommitOperationAdd)
    )
    shown = {
        "logs": caplog.text,
        "stdout": out,
        "stderr": err,
        "errors": "\n".join(errors),
        "status": service.store_status() + json.dumps(service.store.hub_status()),
        "model tab": app.model_card_markdown(service),
        "dataset card": (Path(settings.feedback_dir) / "README.md").read_text(encoding="utf-8"),
        "pushed files": pushed.decode("utf-8", errors="replace"),
    }
    for where, text in shown.items():
        assert FAKE_TOKEN not in text and FAKE_TOKEN[3:20] not in text, f"the token appears in the {where}"


def test_a_server_path_instead_of_an_upload_is_refused(served, tmp_path):
    """The handlers read the file at the path Gradio hands them (preprocess=False): a client that names a file on
    the server instead of uploading one must be refused by Gradio, or it could tag or store any image there."""
    client, service, _ = served
    on_server = tmp_path / "not-uploaded.jpg"
    on_server.write_bytes(encode(product_photo()))
    file = {"path": str(on_server), "meta": {"_type": "gradio.FileData"}}
    url, before = client.src.rstrip("/") + "/gradio_api/call/", len(service.store)
    for api, data in (("tag", [file]), ("feedback", [file, "{}", "check", True])):
        event_id = httpx.post(url + api, json={"data": data}).json()["event_id"]
        stream = httpx.get(f"{url}{api}/{event_id}", timeout=60).text
        assert "event: error" in stream and "not uploaded" in stream, stream
    assert len(service.store) == before


# --- limits: configurable, with safe defaults, applied everywhere -------------------------------------------------


def test_limits_have_safe_defaults_and_reach_every_layer(served):
    app = import_app()
    defaults = app.Settings()
    assert defaults.max_upload_mb <= 10 and defaults.max_image_pixels <= 40_000_000
    assert defaults.max_images_per_request <= 32 and defaults.queue_size <= 64
    _, service, settings = served
    processor, store = service.tagger.image_processor, service.store
    assert app.launch_options(settings)["max_file_size"] == settings.max_upload_bytes
    limits = (settings.max_upload_bytes, settings.max_image_pixels)
    assert (processor.max_file_bytes, processor.max_image_pixels) == limits
    assert (store.max_image_bytes, store.max_image_pixels) == limits
