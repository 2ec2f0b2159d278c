"""FeedbackStore: durable, concurrent, dataset-shaped, Hub-synced storage of user tag corrections.

No test touches the network (tests/conftest.py sets HF_HUB_OFFLINE=1; the Hub is a MagicMock HfApi).
"""

import errno
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pkgutil
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import MagicMock

import httpx
import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from hostile_images import HOSTILE, address_space_cap, write_hostile
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image

from fashion_hf.feedback import FeedbackStore, FeedbackStoreError, FeedbackValidationError, parse_tags

REPO_ROOT = Path(__file__).resolve().parents[1]
# Child processes import the store without running fashion_hf/__init__.py and its heavy model imports (seconds each):
# `fashion_hf` is made a bare package of the same folder, so only fashion_hf.feedback and what it imports load.
CHILD_PRELUDE = f"""
import io, sys, types
from PIL import Image
sys.modules["fashion_hf"] = types.ModuleType("fashion_hf")
sys.modules["fashion_hf"].__path__ = [{str(REPO_ROOT / "fashion_hf")!r}]
from fashion_hf import feedback

def png(seed):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (seed % 256, seed // 256 % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()
"""
TOKEN = "hf_SecretTokenValue1234567890abcdef"
PREDICTED = {
    "attributes": {"gender": [{"label": "Men", "score": 0.9}, {"label": "Women", "score": 0.1}]},
    "tags": [{"tag": "Shirts", "group": "articleType", "score": 0.8}],
}
ATTRIBUTES = {"gender": ["Boys", "Girls", "Men", "Unisex", "Women"], "baseColour": ["Blue", "Red", "White"]}


# -- helpers -----------------------------------------------------------------------------------------------------------


def png_bytes(seed: int, size=(16, 16)) -> bytes:
    """A small PNG whose pixels depend on `seed` (different seeds -> different files)."""
    image = Image.new("RGB", size, (seed % 256, (seed // 256) % 256, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def add(store: FeedbackStore, seed: int = 0, **overrides) -> str:
    kwargs = dict(
        image=png_bytes(seed),
        predicted=PREDICTED,
        corrected_attributes={"gender": "Women"},
        corrected_tags=["denim"],
        consent=True,
        model_id="me/fashion-tagger",
        model_revision="0123abcd",
    )
    kwargs.update(overrides)
    return store.add(**kwargs)


def metadata_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("data/*/metadata.jsonl"))


def all_lines(folder: Path) -> list[dict]:
    """Every metadata line, each of which must be complete, valid JSON."""
    lines = []
    for meta in metadata_files(folder):
        raw = meta.read_bytes()
        assert raw.endswith(b"\n"), f"{meta} ends with a partial line"
        lines += [json.loads(line) for line in raw.splitlines()]
    return lines


def images(folder: Path) -> list[Path]:
    return sorted(folder.glob("data/*/*.jpg"))


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def http_error(status: int, retry_after: str | None = None) -> HfHubHTTPError:
    request = httpx.Request("POST", "https://huggingface.co/api/datasets/me/feedback/commit/main")
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    response = httpx.Response(status, request=request, headers=headers)
    return HfHubHTTPError(f"{status} Server Error for url {request.url}", response=response)


def mock_api() -> MagicMock:
    api = MagicMock(name="HfApi")
    api.create_repo.return_value = MagicMock(repo_id="me/feedback")
    api.list_repo_files.return_value = []
    return api


def committed_operations(api: MagicMock) -> list:
    return [op for call in api.create_commit.call_args_list for op in call.kwargs["operations"]]


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(tmp_path / "feedback")


@pytest.fixture
def hub_store():
    """Make stores that push to "me/feedback" through a mocked HfApi; stopped after the test."""
    made = []

    def make(folder: Path, api: MagicMock, **kwargs) -> FeedbackStore:
        made.append(FeedbackStore(folder, repo_id="me/feedback", hf_api=api, token=TOKEN, **kwargs))
        return made[-1]

    yield make
    for store in made:
        store.close(push=False)


# -- records -----------------------------------------------------------------------------------------------------------


def test_add_get_len_round_trip_keeps_every_field(store):
    image = png_bytes(1)
    rid = store.add(
        image,
        PREDICTED,
        {"gender": "Women", "baseColour": "Blue"},
        ["denim", "slim fit"],
        consent=True,
        model_id="me/fashion-tagger",
        model_revision="0123abcd",
        annotator="alice",
    )
    record = store.get(rid)
    assert len(store) == 1 and rid in store
    assert record["id"] == rid and len(rid) == 32
    assert record["timestamp"].endswith("+00:00")
    assert record["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert record["model_id"] == "me/fashion-tagger" and record["model_revision"] == "0123abcd"
    assert json.loads(record["predicted"]) == PREDICTED
    assert json.loads(record["corrected_attributes"]) == {"gender": "Women", "baseColour": "Blue"}
    assert record["corrected_tags"] == ["denim", "slim fit"]
    assert record["annotator"] == "alice" and record["consent"] is True
    assert Image.open(record["image_path"]).format == "JPEG"
    assert store.open_image(rid).size == (16, 16)
    assert [r["id"] for r in store.records()] == [rid]
    assert store.get("0" * 32) is None
    assert FeedbackStore(store.folder).get(rid) == record  # durable: a new instance reads it back


def test_annotator_defaults_to_anonymous(store):
    assert store.get(add(store, annotator=None))["annotator"] == "anonymous"
    assert store.get(add(store, seed=2))["annotator"] == "anonymous"


def test_load_dataset_on_the_folder_gives_image_and_fields(tmp_path):
    import datasets

    folder = tmp_path / "feedback"
    first = FeedbackStore(folder)  # two writers -> two shards; one shard has only empty tag lists
    add(first, seed=1, corrected_tags=[])
    second = FeedbackStore(folder)
    add(second, seed=2, corrected_tags=["denim", "check"])
    add(second, seed=3, corrected_tags="")
    assert len(metadata_files(folder)) == 2

    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 3
    assert list(ds.features) == [
        "image", "id", "timestamp", "image_sha256", "model_id", "model_revision",
        "predicted", "corrected_attributes", "attribute_status", "corrected_tags", "annotator", "consent",
    ]  # fmt: skip
    assert ds.features["corrected_tags"] == datasets.List(datasets.Value("string"))
    row = next(r for r in ds if r["corrected_tags"] == ["denim", "check"])
    assert isinstance(row["image"], Image.Image) and row["image"].size == (16, 16)
    assert row["consent"] is True and json.loads(row["corrected_attributes"]) == {"gender": "Women"}
    assert json.loads(row["attribute_status"]) == {"gender": "confirmed"}
    assert sorted(ds["id"]) == sorted(r["id"] for r in first.records())

    as_imagefolder = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), features=FeedbackStore.features(), split="train",
        cache_dir=str(tmp_path / "cache2"),
    )  # fmt: skip
    assert sorted(as_imagefolder["id"]) == sorted(ds["id"])


def test_stored_image_has_no_exif_or_gps_and_is_upright(store):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue as stored in the file
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif[0x010F] = "SpyCam"  # camera make
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 1.0)}  # GPS IFD
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, comment=b"shot at home")
    assert b"SpyCam" in buffer.getvalue()

    record = store.get(add(store, image=buffer.getvalue()))
    raw = Path(record["image_path"]).read_bytes()
    stored = Image.open(record["image_path"])
    assert stored.format == "JPEG" and stored.mode == "RGB"
    assert len(stored.getexif()) == 0 and "exif" not in stored.info and "icc_profile" not in stored.info
    assert b"Exif" not in raw and b"SpyCam" not in raw and b"shot at home" not in raw
    assert stored.size == (20, 40)  # upright: the left (red) half is now on top
    top, bottom = stored.getpixel((10, 5)), stored.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_image_inputs_pil_array_bytes_path_and_alpha(store, tmp_path):
    data = png_bytes(5)
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    from_bytes = store.get(add(store, image=data))
    assert store.get(add(store, image=str(path), corrected_tags=["other"]))["image_sha256"] == from_bytes[
        "image_sha256"
    ] == hashlib.sha256(data).hexdigest()  # bytes and path: hash of the original file bytes

    pil = Image.open(io.BytesIO(data)).convert("RGB")
    from_pil = store.get(add(store, image=pil))
    pixels = hashlib.sha256(b"RGB 16x16\n" + pil.tobytes()).hexdigest()
    assert from_pil["image_sha256"] == pixels  # PIL: hash of the upright RGB pixels
    assert store.get(add(store, image=np.asarray(pil), corrected_tags=["x"]))["image_sha256"] == pixels

    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 120, 240)).save(buffer, format="PNG", icc_profile=srgb)
    stored = store.open_image(add(store, image=buffer.getvalue()))
    assert "icc_profile" not in stored.info
    assert max(abs(a - b) for a, b in zip(stored.getpixel((4, 4)), (10, 120, 240))) < 8

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent -> white background
    stored = store.open_image(add(store, image=rgba))
    assert stored.mode == "RGB" and min(stored.getpixel((4, 4))) > 240


@pytest.mark.parametrize(
    "bad_image, message",
    [
        (b"not an image", "not a readable image"),
        (b"", "empty"),
        (12345, "must be a PIL image"),
        ("/nonexistent/shirt.jpg", "not an existing file"),
    ],
)
def test_unreadable_images_are_rejected(store, bad_image, message):
    with pytest.raises(FeedbackValidationError, match=message):
        add(store, image=bad_image)
    assert len(store) == 0 and images(store.folder) == []


def test_images_over_the_pixel_limit_are_rejected_before_decoding(tmp_path):
    store = FeedbackStore(tmp_path / "fb", max_image_pixels=100)
    with pytest.raises(FeedbackValidationError, match="16x16 pixels is over the limit of 100 pixels"):
        add(store)


def test_identical_submissions_get_their_own_ids(tmp_path):
    # A record id withdraws its record: handing one submitter another's id let them delete it.
    folder = tmp_path / "feedback"
    store = FeedbackStore(folder)
    first = add(store, corrected_tags=["denim", "check"], submitter="alice")
    second = add(store, corrected_tags="check, denim", submitter="bob")  # same image, same corrections
    anonymous = add(store, corrected_tags=["denim", "check"])  # no submitter: never merged with anything
    assert len({first, second, anonymous}) == 3 and len(store) == 3 and len(all_lines(folder)) == 3
    assert store.delete(second) and store.get(first) is not None


def test_a_submitters_retry_gets_its_own_id_back_also_after_a_restart(tmp_path):
    folder = tmp_path / "feedback"
    store = FeedbackStore(folder)
    rid = add(store, corrected_tags=["denim", "check"], submitter="alice")
    assert add(store, corrected_tags="check, denim", submitter="alice") == rid  # a retry, a double click
    assert FeedbackStore(folder).add(  # the app restarted: the retry still finds its record
        png_bytes(0), PREDICTED, {"gender": "Women"}, ["denim", "check"], True, "me/fashion-tagger", "r",
        submitter="alice",
    ) == rid  # fmt: skip
    assert add(store, corrected_tags=["denim"], submitter="alice") != rid  # different corrections: a new record
    assert store.delete(rid) and add(store, corrected_tags=["denim", "check"], submitter="alice") != rid
    assert len(store) == 2 and len(all_lines(folder)) == 2


@pytest.mark.parametrize("attributes, tags", [({}, []), ('{"gender": ""}', " , "), (None, None)])
def test_an_empty_correction_is_refused_and_nothing_is_stored(store, attributes, tags):
    with pytest.raises(FeedbackValidationError, match="correction is empty"):
        add(store, corrected_attributes=attributes, corrected_tags=tags)
    assert len(store) == 0 and images(store.folder) == []


def test_attribute_status_round_trips_through_the_store_and_the_dataset(store, tmp_path):
    import datasets

    status = {"gender": "changed", "baseColour": "untouched"}
    rid = add(store, corrected_attributes={"gender": "Women", "baseColour": "Blue"}, attribute_status=status)
    assert json.loads(store.get(rid)["attribute_status"]) == status
    assert json.loads(all_lines(store.folder)[0]["attribute_status"]) == status
    assert FeedbackStore(store.folder).get(rid)["attribute_status"] == store.get(rid)["attribute_status"]
    as_text = add(store, seed=2, corrected_attributes='{"gender": "Men"}', attribute_status='{"gender": "confirmed"}')
    ds = datasets.load_dataset(str(store.folder), split="train", cache_dir=str(tmp_path / "cache"))
    by_id = dict(zip(ds["id"], map(json.loads, ds["attribute_status"])))
    assert by_id == {rid: status, as_text: {"gender": "confirmed"}}


def test_attributes_given_without_a_status_count_as_confirmed(store):
    rid = add(store, corrected_attributes={"gender": "Women", "baseColour": "Red"})
    assert json.loads(store.get(rid)["attribute_status"]) == {"gender": "confirmed", "baseColour": "confirmed"}
    assert json.loads(store.get(add(store, seed=2, corrected_attributes={}))["attribute_status"]) == {}


def test_a_record_stored_before_attribute_status_reads_as_all_confirmed(store):
    rid = add(store, corrected_attributes={"gender": "Women", "baseColour": "Red"})
    meta = metadata_files(store.folder)[0]
    legacy = json.loads(meta.read_text())
    del legacy["attribute_status"]
    meta.write_text(json.dumps(legacy) + "\n")
    assert json.loads(FeedbackStore(store.folder).get(rid)["attribute_status"]) == {
        "gender": "confirmed", "baseColour": "confirmed",
    }  # fmt: skip


def test_an_older_store_card_is_updated_so_the_dataset_keeps_attribute_status(tmp_path):
    import datasets

    folder = tmp_path / "feedback"
    FeedbackStore(folder)
    readme = folder / "README.md"
    readme.write_text(readme.read_text().replace("  - name: attribute_status\n    dtype: string\n", ""))
    store = FeedbackStore(folder)  # an app of this version opens a store made by an older one
    assert "name: attribute_status" in readme.read_text()
    add(store, attribute_status={"gender": "untouched"})
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert json.loads(ds[0]["attribute_status"]) == {"gender": "untouched"}


def test_a_different_status_is_a_different_submission(store):
    first = add(store, submitter="alice", attribute_status={"gender": "untouched"})
    assert add(store, submitter="alice", attribute_status={"gender": "untouched"}) == first  # a retry
    changed = add(store, submitter="alice", attribute_status={"gender": "changed"})
    assert changed != first and json.loads(store.get(changed)["attribute_status"]) == {"gender": "changed"}


@pytest.mark.parametrize(
    "status, message",
    [
        ({"gender": "fixed"}, r"attribute_status\['gender'\] = 'fixed' is not a status; valid statuses"),
        ({"gender": None}, r"attribute_status\['gender'\] = NoneType is not a status"),
        ({"gender": "changed", "baseColour": "changed"}, "names 'baseColour', which corrected_attributes does not"),
        ({}, r"gives no status for \['gender'\]"),
        ('{"gender": "changed", "gender": "confirmed"}', "attribute_status names the attribute 'gender' twice"),
        ('{"gender": ', "attribute_status must be a JSON object"),
        (["changed"], "attribute_status must be a dict of attribute -> status"),
    ],
)
def test_an_invalid_attribute_status_is_rejected_and_nothing_is_stored(store, status, message):
    with pytest.raises(FeedbackValidationError, match=message):
        add(store, attribute_status=status)
    assert len(store) == 0 and images(store.folder) == [] and metadata_files(store.folder) == []


def test_only_untouched_attributes_and_no_tag_is_an_empty_correction(store):
    untouched = {"gender": "untouched", "baseColour": "untouched"}
    attributes = {"gender": "Women", "baseColour": "Red"}
    with pytest.raises(FeedbackValidationError, match="correction is empty .every attribute given is untouched"):
        add(store, corrected_attributes=attributes, corrected_tags=[], attribute_status=untouched)
    assert len(store) == 0 and images(store.folder) == []
    assert add(store, corrected_attributes=attributes, attribute_status=untouched)  # a tag is something to learn


@pytest.mark.parametrize("consent", [False, None, "yes", 1])
def test_consent_is_required_and_nothing_is_stored(store, consent):
    with pytest.raises(FeedbackValidationError, match="consent is required"):
        add(store, consent=consent)
    assert len(store) == 0 and images(store.folder) == [] and metadata_files(store.folder) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"corrected_attributes": ["gender", "Men"]}, "must be a dict of attribute -> label"),
        ({"corrected_attributes": "{not json"}, "must be a JSON object"),
        ({"corrected_attributes": '{"gender": "Men", "gender": "Women"}'}, "names the attribute 'gender' twice"),
        ({"corrected_attributes": {"gender": 3}}, r"corrected_attributes\['gender'\] must be a string"),
        ({"corrected_attributes": {"gender": "x" * 201}}, "201 characters long; at most 200"),
        ({"corrected_tags": 42}, "list of strings or a comma-separated string"),
        ({"corrected_tags": ["ok", 7]}, r"corrected_tags\[1\] must be a string"),
        ({"corrected_tags": [f"tag{i}" for i in range(51)]}, "51 tags; at most 50"),
        ({"corrected_tags": ["line\nbreak"]}, "control character"),
        ({"predicted": [1, 2]}, "predicted must be a dict"),
        ({"model_id": ""}, "model_id must not be empty"),
    ],
)
def test_invalid_input_is_rejected_with_a_clear_error(store, overrides, message):
    with pytest.raises(FeedbackValidationError, match=message):
        add(store, **overrides)
    assert len(store) == 0 and images(store.folder) == []


def test_allowed_attributes_reject_unknown_names_and_labels(tmp_path):
    store = FeedbackStore(tmp_path / "fb", allowed_attributes=ATTRIBUTES)
    with pytest.raises(FeedbackValidationError, match=r"unknown attribute\(s\) \['colour'\].*gender"):
        add(store, corrected_attributes={"colour": "Blue"})
    with pytest.raises(FeedbackValidationError, match=r"'Purple' is not a known baseColour label.*'Blue'"):
        add(store, corrected_attributes={"baseColour": "Purple"})
    rid = add(store, corrected_attributes={"baseColour": "Blue", "gender": None}, corrected_tags=["my own tag"])
    assert json.loads(store.get(rid)["corrected_attributes"]) == {"baseColour": "Blue"}  # None: no correction
    assert store.get(rid)["corrected_tags"] == ["my own tag"]  # free tags are always allowed


def test_text_is_stored_as_data_not_interpreted(store):
    payload = "<script>alert(1)</script>"
    code = "__import__('os').system('rm -rf /')"
    rid = add(store, corrected_attributes=json.dumps({"gender": payload}), corrected_tags=[code, "\"quoted\""])
    record = store.get(rid)
    assert json.loads(record["corrected_attributes"]) == {"gender": payload}
    assert record["corrected_tags"] == [code, '"quoted"']


def test_the_tag_check_refuses_markup_where_only_phrases_are_asked_for():
    # The store keeps any text as data (above); the app asks people for short phrases, through the same check.
    assert parse_tags("slim fit, Rock & Roll, 3/4 sleeve, slim fit", max_len=50, max_tags=20, phrases_only=True) == [
        "slim fit", "Rock & Roll", "3/4 sleeve",
    ]  # fmt: skip
    with pytest.raises(FeedbackValidationError, match=r"corrected_tags\[0\] = '<b>' may only hold .* \(no markup\)"):
        parse_tags(["<b>"], max_len=50, max_tags=20, phrases_only=True)


# -- concurrency and durability ----------------------------------------------------------------------------------------


def test_eight_threads_store_every_record(store):
    ids, errors = [], []

    def writer(worker: int) -> None:
        try:
            for i in range(25):
                ids.append(add(store, seed=worker * 100 + i))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    lines = all_lines(store.folder)
    assert len(ids) == len(set(ids)) == 200
    assert len(lines) == 200 and {line["id"] for line in lines} == set(ids)
    assert len(store) == 200 and len(images(store.folder)) == 200


def test_concurrent_retries_of_one_submission_store_one_record(store):
    ids = []
    threads = [threading.Thread(target=lambda: ids.append(add(store, seed=3, submitter="s"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(all_lines(store.folder)) == 1 and len(images(store.folder)) == 1


_PROCESS_WRITER = CHILD_PRELUDE + """
store = feedback.FeedbackStore(folder)
ids = [store.add(png(1000 + 100 * worker + i), {}, {"gender": "Men"}, ["denim"], True, "m", "r") for i in range(25)]
queue.put(ids)
"""


@pytest.mark.slow
def test_four_processes_store_every_record(store):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=exec, args=(_PROCESS_WRITER, {"folder": str(store.folder), "worker": w, "queue": queue}))
        for w in range(4)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    ids = [rid for result in results for rid in result]
    lines = all_lines(store.folder)
    assert len(ids) == len(set(ids)) == 100
    assert len(lines) == 100 and {line["id"] for line in lines} == set(ids)
    assert len(store) == 100 and len(images(store.folder)) == 100
    assert len(metadata_files(store.folder)) == 4  # one shard per process


def test_torn_last_line_is_skipped_then_repaired(tmp_path):
    import datasets

    folder = tmp_path / "feedback"
    store = FeedbackStore(folder)
    rid = add(store)
    meta = metadata_files(folder)[0]
    with open(meta, "ab") as handle:  # a writer that died in the middle of an append
        handle.write(b'{"file_name":"0123.jpg","id":"0123')

    assert len(store) == 1 and [r["id"] for r in store.records()] == [rid]  # readers skip it
    reopened = FeedbackStore(folder)  # opening (like any write) repairs it
    assert len(reopened) == 1 and meta.read_bytes().endswith(b"\n")
    assert [line["id"] for line in all_lines(folder)] == [rid]
    assert b'"id":"0123' in next((folder / ".feedback" / "quarantine").iterdir()).read_bytes()
    second = add(reopened, seed=1)
    assert {line["id"] for line in all_lines(folder)} == {rid, second}
    assert datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache")).num_rows == 2


_KILLED_WRITER = CHILD_PRELUDE + """
store = feedback.FeedbackStore(sys.argv[1])
for i in range(10_000):
    print(store.add(png(i), {}, {"gender": "Men"}, [], True, "m", "r"), flush=True)
"""


@pytest.mark.slow
def test_a_killed_writer_loses_no_acknowledged_record(tmp_path):
    folder = tmp_path / "feedback"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(folder)], stdout=subprocess.PIPE, text=True)
    acknowledged = [proc.stdout.readline().strip() for _ in range(15)]
    proc.kill()
    proc.wait()
    store = FeedbackStore(folder)
    ids = {line["id"] for line in all_lines(folder)}
    assert set(acknowledged) <= ids and len(store) == len(ids)
    referenced = {str(Path(r["image_path"])) for r in store.records()}
    assert {str(p) for p in images(folder)} == referenced  # no half-added record left an orphan image


def test_disk_full_during_append_leaves_nothing_half_written(store, monkeypatch):
    add(store, seed=1)
    before = folder_snapshot(store.folder / "data")
    real_write = os.write

    def full_disk_write(fd, data):  # the disk fills up halfway through the record line
        data = bytes(data)
        if data.startswith(b'{"file_name"'):
            return real_write(fd, data[: len(data) // 2])
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk_write)
    with pytest.raises(FeedbackStoreError, match="disk is full"):
        add(store, seed=2)
    monkeypatch.undo()
    assert folder_snapshot(store.folder / "data") == before
    assert len(store) == 1 and len(all_lines(store.folder)) == 1
    assert list((store.folder / ".feedback" / "tmp").iterdir()) == []


def test_read_only_folder_gives_a_clear_error_and_writes_nothing(store, monkeypatch):
    add(store, seed=1)
    before = folder_snapshot(store.folder)
    real_open, root = os.open, str(store.folder)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def read_only_open(path, flags, *args, **kwargs):  # what a read-only mount does to writes
        if str(path).startswith(root) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    for name in ("replace", "unlink", "ftruncate", "mkdir"):
        monkeypatch.setattr(os, name, read_only)
    with pytest.raises(FeedbackStoreError, match="read-only or not writable"):
        add(store, seed=2)
    monkeypatch.undo()
    assert folder_snapshot(store.folder) == before and len(store) == 1


_READ_ONLY_WRITER = CHILD_PRELUDE + """
import json
from pathlib import Path
folder = Path(sys.argv[1])
store = feedback.FeedbackStore(folder)
store.add(png(1), {}, {"gender": "Men"}, [], True, "m", "r")
before = {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
paths = [folder, *folder.rglob("*")]
for path in paths:
    path.chmod(0o555 if path.is_dir() else 0o444)
try:
    store.add(png(2), {}, {"gender": "Men"}, [], True, "m", "r")
    error = None
except feedback.FeedbackStoreError as exc:
    error = str(exc)
after = {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
count = len(feedback.FeedbackStore(folder))
for path in paths:
    path.chmod(0o755 if path.is_dir() else 0o644)
print(json.dumps({"error": error, "unchanged": before == after, "count": count}))
"""


@pytest.mark.slow
def test_read_only_permissions_give_a_clear_error(tmp_path):
    command = [sys.executable, "-c", _READ_ONLY_WRITER, str(tmp_path / "feedback")]
    if os.geteuid() == 0:  # root ignores permissions unless it gives up CAP_DAC_OVERRIDE
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.skip("running as root without capsh: file permissions cannot be enforced")
        command = [capsh, "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c", shlex.join(command)]
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert "read-only or not writable" in result["error"] and "Nothing was half-written" in result["error"]
    assert result["unchanged"] and result["count"] == 1


def test_delete_removes_the_record_and_the_image(tmp_path):
    import datasets

    folder = tmp_path / "feedback"
    store = FeedbackStore(folder)
    keep, withdraw = add(store, seed=1), add(store, seed=2)
    image_path = Path(store.get(withdraw)["image_path"])
    assert store.delete(withdraw) is True
    assert store.get(withdraw) is None and not image_path.exists() and len(store) == 1
    assert [line["id"] for line in all_lines(folder)] == [keep]
    assert FeedbackStore(folder).get(withdraw) is None  # durable
    assert store.delete(withdraw) is False
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds["id"] == [keep]
    assert add(store, seed=2) != withdraw  # a resubmission after a withdrawal is a new record
    with pytest.raises(FeedbackValidationError, match="32 lowercase hex"):
        store.delete("../../etc/passwd")


def test_delete_while_other_threads_write(store):
    ids = [add(store, seed=i) for i in range(10)]
    new_ids = []
    writer = threading.Thread(target=lambda: new_ids.extend(add(store, seed=100 + i) for i in range(20)))
    writer.start()
    for rid in ids[:5]:
        assert store.delete(rid)
    writer.join()
    assert {line["id"] for line in all_lines(store.folder)} == set(ids[5:]) | set(new_ids)
    assert len(images(store.folder)) == 25


# -- Hub sync ----------------------------------------------------------------------------------------------------------


def test_hub_repo_is_created_lazily_and_pushes_the_files(tmp_path, hub_store):
    api = mock_api()
    store = hub_store(tmp_path / "feedback", api)
    api.create_repo.assert_not_called()  # no network in __init__
    rid = add(store)
    assert store.push_now() is True
    api.create_repo.assert_called_once_with(repo_id="me/feedback", private=True, repo_type="dataset", exist_ok=True)
    wait_until(lambda: store.hub_status()["pending_records"] == 0)
    for call in api.create_commit.call_args_list:
        assert call.kwargs["repo_id"] == "me/feedback" and call.kwargs["repo_type"] == "dataset"
        assert call.kwargs["commit_message"].startswith("Feedback sync:")
    operations = committed_operations(api)
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    record = store.get(rid)
    shard = Path(record["image_path"]).parent.name
    by_path = {op.path_in_repo: op for op in operations}
    assert {"README.md", f"data/{shard}/metadata.jsonl", f"data/{shard}/{rid}.jpg"} <= set(by_path)
    assert rid.encode() in by_path[f"data/{shard}/metadata.jsonl"].path_or_fileobj
    assert "everything pushed" in store.status() and "last push: 20" in store.status()
    commits = api.create_commit.call_count
    store.close()
    assert api.create_commit.call_count == commits  # nothing changed: no empty commit

    again = hub_store(tmp_path / "feedback", api)  # a restart does not upload everything again
    assert again.push_now() is True
    wait_until(lambda: again.scheduler.last_future is not None and again.scheduler.last_future.done())
    assert api.create_commit.call_count == commits


def test_failed_pushes_are_retried_with_backoff_and_the_next_success_carries_everything(tmp_path, hub_store):
    api = mock_api()
    adds_done, attempts, seen_status = threading.Event(), [], []
    store = hub_store(tmp_path / "feedback", api, retry_initial_delay=0.05, retry_max_delay=5)

    def create_commit(**kwargs):
        attempts.append(kwargs)
        adds_done.wait(10)
        if len(attempts) == 1:
            raise RuntimeError("connection reset by peer")
        if len(attempts) == 2:
            raise http_error(429, retry_after="0")
        if len(attempts) == 3:
            seen_status.append(store.status())
            raise http_error(500)
        return MagicMock(oid="abc")

    api.create_commit.side_effect = create_commit
    ids = [add(store, seed=i) for i in range(3)]
    adds_done.set()
    wait_until(lambda: len(attempts) >= 4 and store.hub_status()["consecutive_failures"] == 0)

    assert store.scheduler.retry_delays[:3] == [0.05, 0.1, 0.2]  # exponential back-off
    assert "429" in seen_status[0] and "waiting to be pushed" in seen_status[0] and "retrying in" in seen_status[0]
    success = {op.path_in_repo: op for op in attempts[3]["operations"]}
    metadata = b"".join(op.path_or_fileobj for path, op in success.items() if path.endswith("metadata.jsonl"))
    assert all(rid.encode() in metadata for rid in ids)  # everything that failed before is in the success
    assert all(any(path.endswith(f"{rid}.jpg") for path in success) for rid in ids)
    status = store.hub_status()
    assert status["pending_records"] == 0 and status["last_push_time"] and "500" in status["last_error"]


def test_push_errors_are_reported_without_the_token(tmp_path, caplog, hub_store):
    api = mock_api()
    api.create_commit.side_effect = http_error(401)
    api.create_commit.side_effect.append_to_message(f" (headers: Authorization: Bearer {TOKEN})")
    store = hub_store(tmp_path / "feedback", api)
    with caplog.at_level(logging.WARNING, logger="fashion_hf.feedback"):
        add(store)
        assert store.push_now() is False
        api.create_commit.side_effect = RuntimeError(f"bad credentials {TOKEN}")
        assert store.push_now() is False
    status = store.status()
    assert "last error" in status and "RuntimeError: bad credentials" in status
    assert "1 record(s) waiting to be pushed" in status
    assert store.hub_status()["consecutive_failures"] >= 2
    assert "401" in caplog.text and "bad credentials" in caplog.text
    for text in (status, caplog.text, repr(store), json.dumps(store.hub_status())):
        assert TOKEN not in text and TOKEN[3:] not in text


def test_repo_creation_failure_is_reported_and_records_stay_local(tmp_path, hub_store):
    api = mock_api()
    api.create_repo.side_effect = [RuntimeError("Hub unreachable"), MagicMock(repo_id="me/feedback")]
    store = hub_store(tmp_path / "feedback", api, retry_initial_delay=30)
    rid = add(store)  # stored locally even though the Hub is down
    wait_until(lambda: "Hub unreachable" in store.status())
    assert store.get(rid) is not None and store.scheduler is None
    assert store.push_now() is True and api.create_repo.call_count == 2
    assert any(op.path_in_repo.endswith(f"{rid}.jpg") for op in committed_operations(api))


def test_withdrawn_records_are_removed_from_the_hub(tmp_path, hub_store):
    api = mock_api()
    store = hub_store(tmp_path / "feedback", api)
    keep, withdraw = add(store, seed=1), add(store, seed=2)
    assert store.push_now()
    shard = Path(store.get(withdraw)["image_path"]).parent.name
    api.list_repo_files.return_value = [op.path_in_repo for op in committed_operations(api)]
    api.create_commit.reset_mock()

    assert store.delete(withdraw)  # also triggers a push in the background
    assert store.push_now()
    operations = committed_operations(api)
    deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
    assert deleted == [f"data/{shard}/{withdraw}.jpg"]
    metadata = next(op for op in operations if op.path_in_repo == f"data/{shard}/metadata.jsonl")
    assert keep.encode() in metadata.path_or_fileobj and withdraw.encode() not in metadata.path_or_fileobj
    assert store.hub_status()["pending_deletions"] == 0


# -- hostile images: the store reads through the one safe decoder (fashion_hf/image_decoding.py) -----------------------


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_images_are_refused_naming_the_file_and_nothing_is_stored(tmp_path, case):
    store = FeedbackStore(tmp_path / "fb")
    path = write_hostile(tmp_path / "files")[case]
    name, _, message = HOSTILE[case]
    with address_space_cap(), pytest.raises(FeedbackValidationError, match=message) as error:
        add(store, image=str(path))
    assert name in str(error.value) and str(tmp_path) not in str(error.value)  # the file's name, not its folders
    assert len(store) == 0 and images(store.folder) == []


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_is_stored(tmp_path, image_format):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(buffer, format=image_format)
    store = FeedbackStore(tmp_path / "fb")
    with Image.open(store.get(add(store, image=buffer.getvalue()))["image_path"]) as stored:
        assert stored.format == "JPEG" and stored.size == (16, 16)


def test_arrays_of_absurd_aspect_ratio_are_refused_before_conversion(tmp_path):
    with pytest.raises(FeedbackValidationError, match="aspect ratio 1:1000 is over the limit of 1:20"):
        add(FeedbackStore(tmp_path / "fb"), image=np.zeros((100_000, 100), np.uint8))


# -- the package: each module imports on its own, none imports back one that imports it --------------------------------

FEEDBACK_MODULES = sorted(module.name for module in pkgutil.iter_modules([str(REPO_ROOT / "fashion_hf" / "feedback")]))
# One module imported alone: fashion_hf and fashion_hf.feedback are made bare packages of their folders (their
# __init__.py, which imports every module, does not run), so only what the module imports itself loads. Prints the
# modules of fashion_hf.feedback that were loaded.
IMPORT_ALONE = """
import importlib, sys, types
for package, folder in (("fashion_hf", {package!r}), ("fashion_hf.feedback", {package!r} + "/feedback")):
    sys.modules[package] = types.ModuleType(package)
    sys.modules[package].__path__ = [folder]
importlib.import_module("fashion_hf.feedback." + {module!r})
print(*sorted(name.rpartition(".")[2] for name in sys.modules if name.startswith("fashion_hf.feedback.")))
"""


@functools.cache
def feedback_modules_loaded_by(module: str) -> frozenset[str]:
    code = IMPORT_ALONE.format(package=str(REPO_ROOT / "fashion_hf"), module=module)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return frozenset(result.stdout.split())


@pytest.mark.slow
@pytest.mark.parametrize("module", FEEDBACK_MODULES)
def test_each_feedback_module_imports_on_its_own(module):
    assert module in feedback_modules_loaded_by(module)


@pytest.mark.slow
def test_no_feedback_module_imports_one_that_imports_it_and_the_store_knows_nothing_of_the_hub():
    loaded = {module: feedback_modules_loaded_by(module) for module in FEEDBACK_MODULES}
    circles = sorted({tuple(sorted((a, b))) for a in loaded for b in loaded[a] if b != a and a in loaded[b]})
    assert circles == []
    assert "hub" not in loaded["store"]
    assert {"schema", "validation", "files", "index", "store", "hub", "dataset"} <= set(loaded)
