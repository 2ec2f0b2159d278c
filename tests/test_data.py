"""fashion_hf.data: every loader returns image + attributes (None when missing) + tags; tag mining; the vocabulary."""

import gzip
import hashlib
import json
import re
import struct
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value, load_dataset
from helpers import PRODUCT_IMAGES, REPO, SHARED_DATA, encode, product_photo

from fashion_hf import FashionTaggerConfig, data, tag_mining
from fashion_hf.data import (
    BRAND,
    PRODUCT_ATTRIBUTES,
    add_brand_column,
    add_tag_sequences,
    apply_vocabulary,
    build_vocabulary,
    load_catalogue,
    load_fashion_mnist,
    load_fashion_product_images,
    read_idx,
)
from fashion_hf.feedback import FeedbackStore
from fashion_hf.feedback import dataset as feedback_dataset
from fashion_hf.feedback.dataset import load_feedback
from fashion_hf.tag_mining import (
    DETAIL_LEXICON,
    canonical_detail_tag,
    detail_tag_order,
    extract_brand,
    mine_detail_tags,
)

# ---------------------------------------------------------------------------------------------------------------------
# Tiny fixtures, written in the layouts the loaders read.
# ---------------------------------------------------------------------------------------------------------------------

PRODUCTS = [  # id, gender, articleType, baseColour, usage, name
    (1163, "Men", "Shirts", "Navy Blue", "Casual", "Turtle Check Men Navy Blue Shirt"),
    (1164, "Men", "Sports Shoes", "Black", "Sports", "Puma Men Slim Fit Running Shoes"),
    (1165, "Women", "Tops", None, None, "Catwalk Women Printed Top"),
    (1166, "Women", "Tops", "Pink", "Casual", "Catwalk Women Striped Pink Top"),
]


def product_rows(products, na=None):
    """Rows in the Hub column layout; `na` is how a missing label is spelled (None, or "NA" in CSV exports)."""
    return [
        {
            "id": product_id,
            "image": {"bytes": encode(product_photo(colour=(product_id % 255, 40, 40))), "path": f"{product_id}.jpg"},
            "gender": gender,
            "masterCategory": "Apparel",
            "subCategory": "Topwear",
            "articleType": article_type,
            "baseColour": na if colour is None else colour,
            "season": "Summer",
            "usage": na if usage is None else usage,
            "productDisplayName": name,
            "year": 2012,
        }
        for product_id, gender, article_type, colour, usage, name in products
    ]


PRODUCT_FEATURES = Features(
    {
        "id": Value("int64"),
        "image": Image(),
        **{attribute: Value("string") for attribute in PRODUCT_ATTRIBUTES},
        "productDisplayName": Value("string"),
        "year": Value("int32"),
    }
)


def as_dataset(rows, features=PRODUCT_FEATURES) -> Dataset:
    return Dataset.from_list(rows, features=features)


@pytest.fixture
def product_folder(tmp_path):
    """The shared data's layout: data/train-*.parquet and data/validation-*.parquet."""
    folder = tmp_path / "fashion-product-images"
    (folder / "data").mkdir(parents=True)
    as_dataset(product_rows(PRODUCTS[:3])).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    as_dataset(product_rows(PRODUCTS[3:])).to_parquet(folder / "data" / "validation-00000-of-00001.parquet")
    return folder


def write_idx(path, array: np.ndarray, magic: bytes | None = None):
    magic = magic or bytes([0, 0, 0x08, array.ndim])
    header = magic + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_folder(tmp_path, rng):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, labels in (("train", [9, 0, 3]), ("t10k", [8])):
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.array(labels))
    return folder


def save_photo(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    product_photo(colour=colour).save(path)


@pytest.fixture
def csv_catalogue(tmp_path):
    save_photo(tmp_path / "photos" / "a.jpg")
    save_photo(tmp_path / "photos" / "b.png", colour=(20, 20, 200))
    table = tmp_path / "catalogue.csv"
    table.write_text(
        "photo,category,colour,title\n"
        "photos/a.jpg,Shirts,Red,Acme Men Checked Slim Fit Shirt\n"
        "photos/b.png,Jeans,,Acme Women Skinny Denim Jeans\n"
    )
    return table


# ---------------------------------------------------------------------------------------------------------------------
# Brand and detail-tag mining.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, brand",
    [
        ("Turtle Check Men Navy Blue Shirt", "Turtle Check"),
        ("Puma Men Slim Fit Running Shoes", "Puma"),
        ("Gini and Jony Girl's Printed Pink Top", "Gini and Jony"),
        ("Mr.Men Men's Must Sleep Blue T-shirt", "Mr.Men"),
        ("Disney Kids Boy's Green Kidswear", "Disney"),
        ("Nike Sahara Team India Fanwear Round Neck Jersey", None),  # no gender word: no guess
        ("Men Black Shirt", None),
    ],
)
def test_brand_is_the_words_before_the_gender_word(name, brand):
    assert extract_brand(name, "Men") == brand


def test_the_items_gender_label_counts_as_a_gender_word():
    assert extract_brand("Acme Gents Blue Shirt") is None
    assert extract_brand("Acme Gents Blue Shirt", gender="Gents") == "Acme"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Turtle Check Men Navy Blue Shirt", ["check"]),
        ("Puma Men Slim Fit Running Shoes", ["slim fit", "running"]),
        ("Arrow Men Checks Blue Shirt", ["check"]),
        ("Basics Men Grey Slim Fit Checked Shirt", ["check", "slim fit"]),
        ("Scullers Men Stripes Navy Shirt", ["striped"]),
        ("Nike Women PRINTED V-Neck Top", ["printed", "v-neck"]),
        ("W Women V Neck Short Sleeve Pink Kurta", ["v-neck", "short sleeve"]),
        ("CASIO Men Black Chronograph Analogue Watch", ["analog", "chronograph"]),
        ("Catwalk Women Black Heels", []),
    ],
)
def test_detail_tags_are_canonical_and_in_lexicon_order(name, expected):
    assert mine_detail_tags(name) == expected


def test_detail_tags_match_whole_words_only():
    assert mine_detail_tags("Baggit Women Leatherette Black Backpack") == ["faux leather"]  # not leather, not pack
    assert mine_detail_tags("Acme Men Checkmate Solidarity Tee") == []


def test_the_longest_phrase_wins():
    assert mine_detail_tags("Amante Women Non-Padded Bra") == ["non-padded"]
    assert mine_detail_tags("Amante Women Padded Bra") == ["padded"]


def test_brands_that_name_a_tag_are_not_mined():
    assert mine_detail_tags("U.S. Polo Assn. Men Brown Leather Belt") == ["leather"]
    assert mine_detail_tags("U.S.Polo Assn. Men Solid Green Polo Tshirt") == ["solid", "polo"]
    assert mine_detail_tags("Urban Yoga Women Black Track Pants") == []


def test_every_spelling_belongs_to_one_tag():
    spellings = [tag_mining._phrase_key(spelling) for tag, more in DETAIL_LEXICON.items() for spelling in (tag, *more)]
    assert len(spellings) == len(set(spellings))
    assert sorted(DETAIL_LEXICON, key=detail_tag_order) == list(DETAIL_LEXICON)


def test_typed_tags_are_canonicalised():
    assert canonical_detail_tag(" Checked ") == "check"
    assert canonical_detail_tag("V Neck") == "v-neck"
    assert canonical_detail_tag("Boho  Chic") == "boho chic"


# ---------------------------------------------------------------------------------------------------------------------
# Tag sequences and vocabulary.
# ---------------------------------------------------------------------------------------------------------------------


def labels_only(products=PRODUCTS, **extra) -> Dataset:
    """The label columns of product rows, no images: sequences and vocabularies never look at pixels."""
    rows = [{k: v for k, v in row.items() if k != "image"} for row in product_rows(products)]
    return Dataset.from_list([{**row, **extra} for row in rows])


def test_tag_sequence_is_attributes_in_head_order_then_details():
    dataset = add_tag_sequences(labels_only(), ["articleType", "gender", "baseColour"])
    assert dataset[1]["tags"] == [
        "articleType:Sports Shoes",
        "gender:Men",
        "baseColour:Black",
        "detail:slim fit",
        "detail:running",
    ]


def test_missing_labels_stay_none_and_have_no_tag():
    dataset = add_tag_sequences(labels_only(), list(PRODUCT_ATTRIBUTES))
    assert dataset[2]["baseColour"] is None and dataset[2]["usage"] is None
    assert not any(key.startswith(("baseColour:", "usage:")) for key in dataset[2]["tags"])
    assert dataset[2]["tags"][-1] == "detail:printed"


def test_existing_detail_tags_are_kept_and_ordered():
    dataset = labels_only(PRODUCTS[:1], tags=["detail:boho", "detail:slim fit"])
    assert add_tag_sequences(dataset, ["gender"])[0]["tags"] == [
        "gender:Men",
        "detail:check",
        "detail:slim fit",
        "detail:boho",
    ]


def test_vocabulary_lists_labels_then_frequent_details():
    dataset = add_tag_sequences(labels_only(), ["gender", "baseColour"])
    attributes, tags = build_vocabulary(dataset, ["gender", "baseColour"], min_tag_count=1)
    assert attributes == {"gender": ["Men", "Women"], "baseColour": ["Black", "Navy Blue", "Pink"]}
    assert tags == [
        ["Men", "gender"],
        ["Women", "gender"],
        ["Black", "baseColour"],
        ["Navy Blue", "baseColour"],
        ["Pink", "baseColour"],
        *[[tag, "detail"] for tag in ["printed", "check", "striped", "slim fit", "running"]],
    ]
    FashionTaggerConfig(attributes=attributes, tags=tags)  # the shape the config takes


def test_vocabulary_does_not_depend_on_row_order():
    dataset = add_tag_sequences(labels_only(PRODUCTS * 3), list(PRODUCT_ATTRIBUTES))
    shuffled = dataset.shuffle(seed=1)
    assert build_vocabulary(dataset, PRODUCT_ATTRIBUTES, min_tag_count=2) == build_vocabulary(
        shuffled, PRODUCT_ATTRIBUTES, min_tag_count=2
    )


def test_rare_details_stay_out_of_the_vocabulary():
    dataset = add_tag_sequences(labels_only(PRODUCTS + PRODUCTS[:1]), ["gender"])
    _, tags = build_vocabulary(dataset, ["gender"], min_tag_count=2)
    assert [text for text, group in tags if group == "detail"] == ["check"]


def test_detail_tags_it_is_told_to_keep_join_however_rare():
    dataset = add_tag_sequences(labels_only(PRODUCTS, tags=["detail:tank"]), ["gender"])  # "tank" on every row
    rare = add_tag_sequences(labels_only(PRODUCTS[:1], tags=["detail:tank"]), ["gender"])  # ... or on one
    _, tags = build_vocabulary(rare, ["gender"], min_tag_count=20, keep_detail_tags=["tank", "never seen"])
    assert [text for text, group in tags if group == "detail"] == ["tank"]  # kept only where it occurs
    _, tags = build_vocabulary(dataset, ["gender"], min_tag_count=20)
    assert [text for text, group in tags if group == "detail"] == []


def test_brand_spellings_merge_and_rare_brands_become_missing():
    brands = ["ADIDAS", "ADIDAS", "Adidas", "Rarebrand", "Puma", "Puma"]
    products = [(i, "Men", "Shirts", "Red", "Casual", f"{brand} Men Red Shirt") for i, brand in enumerate(brands)]
    dataset = add_tag_sequences(add_brand_column(labels_only(products)), ["gender", BRAND])
    assert dataset[BRAND] == ["ADIDAS", "ADIDAS", "ADIDAS", "Rarebrand", "Puma", "Puma"]
    attributes, tags = build_vocabulary(dataset, ["gender", BRAND], min_brand_count=2)
    assert attributes[BRAND] == ["ADIDAS", "Puma"]
    fitted = apply_vocabulary(dataset, attributes, tags)
    assert fitted[3][BRAND] is None and fitted[3]["tags"] == ["gender:Men"]
    assert fitted[4]["tags"] == ["gender:Men", "brand:Puma"]


def test_brands_of_another_split_match_whatever_their_spelling():
    products = [(1, "Men", "Shirts", "Red", "Casual", "Adidas Men Red Shirt")]
    validation = add_tag_sequences(add_brand_column(labels_only(products)), [BRAND])
    fitted = apply_vocabulary(validation, {BRAND: ["ADIDAS"]}, [["ADIDAS", BRAND]])
    assert fitted[0][BRAND] == "ADIDAS" and fitted[0]["tags"] == ["brand:ADIDAS"]


def test_apply_vocabulary_drops_unknown_labels_and_tags():
    dataset = add_tag_sequences(labels_only(), ["articleType"])
    vocabulary = {"articleType": ["Shirts", "Tops"]}, [["Shirts", "articleType"], ["check", "detail"]]
    fitted = apply_vocabulary(dataset, *vocabulary)
    assert fitted["articleType"] == ["Shirts", None, "Tops", "Tops"]
    assert fitted["tags"] == [["articleType:Shirts", "detail:check"], [], ["articleType:Tops"], ["articleType:Tops"]]


def test_vocabulary_needs_a_label_per_attribute():
    dataset = add_tag_sequences(labels_only(), ["gender"])
    with pytest.raises(ValueError, match="gender"):
        build_vocabulary(dataset, ["gender"], min_label_count=100)


# ---------------------------------------------------------------------------------------------------------------------
# Fashion Product Images.
# ---------------------------------------------------------------------------------------------------------------------


def test_product_images_from_a_local_folder(product_folder):
    train = load_fashion_product_images(product_folder, split="train")
    assert len(train) == 3
    assert isinstance(train.features["image"], Image)
    assert all(train.features[attribute] == Value("string") for attribute in PRODUCT_ATTRIBUTES)
    first = train[0]
    assert first["image"].size == (60, 80)
    assert first["productDisplayName"] == "Turtle Check Men Navy Blue Shirt"
    assert first["tags"][:4] == ["gender:Men", "masterCategory:Apparel", "subCategory:Topwear", "articleType:Shirts"]
    assert first["tags"][-1] == "detail:check"
    assert train[2]["baseColour"] is None and train[2]["usage"] is None
    assert len(load_fashion_product_images(product_folder, split="validation")) == 1


def test_product_images_with_brand(product_folder):
    train = load_fashion_product_images(product_folder, with_brand=True)
    assert train[BRAND] == ["Turtle Check", "Puma", "Catwalk"]
    assert "brand:Puma" in train[1]["tags"]


def test_product_images_folder_from_the_environment(product_folder, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(product_folder.parent))  # the data folder that holds it
    assert len(load_fashion_product_images(split="validation")) == 1


def test_the_data_folder_is_FASHION_DATA_DIR_else_shared_data_beside_the_repository(mnist_folder, monkeypatch,
                                                                                    tmp_path):  # fmt: skip
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.data_dir() == REPO.parent / "shared" / "data"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert load_fashion_mnist(split="test")["articleType"] == ["Bag"]  # read from tmp_path / "fashion-mnist"
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(elsewhere))
    with pytest.raises(FileNotFoundError, match=f"No local copy in {re.escape(str(elsewhere))}: set FASHION_DATA_DIR"):
        load_fashion_product_images()  # offline, so the Hub copy cannot stand in


def test_hub_copy_is_split_by_product_id_and_na_is_missing(monkeypatch):
    products = [(product_id, "Men", "Shirts", None, None, "Acme Men Shirt") for product_id in range(1000, 1060)]
    hub_train = as_dataset(product_rows(products, na="NA"))
    monkeypatch.setattr(data, "load_dataset", lambda repo_id, split: hub_train)
    splits = {split: load_fashion_product_images(data.PRODUCT_IMAGES_HUB_ID, split) for split in data._SPLIT_BUCKETS}
    ids = {split: set(dataset["id"]) for split, dataset in splits.items()}
    assert sum(map(len, ids.values())) == len(products) and set.union(*ids.values()) == set(range(1000, 1060))
    assert all(ids.values())
    assert all(data.split_of(product_id) == split for split, members in ids.items() for product_id in members)
    assert splits["train"]["baseColour"] == [None] * len(splits["train"])


def test_offline_without_local_data_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "no-shared-data"))
    with pytest.raises(FileNotFoundError, match=data.DATA_DIR_ENV):
        load_fashion_product_images()


def test_missing_local_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        load_fashion_product_images(tmp_path / "no-such-folder")


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST.
# ---------------------------------------------------------------------------------------------------------------------


def test_fashion_mnist_from_idx_files(mnist_folder):
    train = load_fashion_mnist(mnist_folder, split="train+validation")
    assert train["articleType"] == ["Ankle boot", "T-shirt/top", "Dress"]
    assert train["tags"][0] == ["articleType:Ankle boot"]
    image = train[0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    raw = read_idx(mnist_folder / "train-images-idx3-ubyte.gz")
    assert np.array_equal(np.asarray(image), raw[0])
    assert load_fashion_mnist(mnist_folder, split="test")["articleType"] == ["Bag"]


def test_fashion_mnist_unknown_split(mnist_folder):
    with pytest.raises(ValueError, match="'train', 'validation', 'train\\+validation', 'test'"):
        load_fashion_mnist(mnist_folder, split="dev")


def test_fashion_mnist_validation_is_a_fixed_tenth_of_the_training_images_by_pixels(tmp_path, rng):
    # Model selection needs images neither trained on nor the test split: a part of the training images, the same on
    # every run (the SHA-256 of the pixels), and identical images always on one side.
    images = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    images[1] = images[0]
    labels = np.arange(300) % 10
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)

    def pixels(split):
        return [np.asarray(image).tobytes() for image in load_fashion_mnist(tmp_path, split=split)["image"]]

    train, validation, everything = pixels("train"), pixels("validation"), pixels("train+validation")
    assert 15 <= len(validation) <= 50 and len(train) + len(validation) == 300
    assert not set(train) & set(validation) and sorted(train + validation) == sorted(everything)
    assert pixels("validation") == validation  # the same on a second load
    expected = {i for i in range(300) if int(hashlib.sha256(images[i].tobytes()).hexdigest(), 16) % 100 < 10}
    assert set(validation) == {images[i].tobytes() for i in expected}
    assert len(pixels("test")) == 300  # the test images are never split


def test_fashion_mnist_missing_file_is_named(mnist_folder):
    (mnist_folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(mnist_folder, split="test")


@pytest.mark.parametrize(
    "corruption, message",
    [
        ("bad magic", "not an IDX file"),
        ("truncated", "truncated"),
        ("not gzip", "not a complete gzip file"),
    ],
)
def test_corrupt_idx_files_are_rejected(tmp_path, corruption, message):
    path = tmp_path / "labels-idx1-ubyte.gz"
    if corruption == "bad magic":
        write_idx(path, np.arange(4), magic=b"\x00\x00\x0d\x01")
    elif corruption == "truncated":
        write_idx(path, np.arange(4))
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    else:
        path.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match=message):
        read_idx(path)


def test_fashion_mnist_hub_names_are_ours(monkeypatch, rng):
    hub_names = ["T - shirt / top", *data.FASHION_MNIST_CLASSES[1:]]  # the Hub spells class 0 with spaces
    hub = Dataset.from_dict(
        {"image": list(rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)), "label": [0, 9]},
        features=Features(image=Image(), label=ClassLabel(names=hub_names)),
    )
    monkeypatch.setattr(data, "load_dataset", lambda repo_id, split: hub)
    dataset = load_fashion_mnist(data.FASHION_MNIST_HUB_ID)
    assert dataset["articleType"] == ["T-shirt/top", "Ankle boot"]
    assert "label" not in dataset.column_names


# ---------------------------------------------------------------------------------------------------------------------
# A user's own catalogue.
# ---------------------------------------------------------------------------------------------------------------------


def test_catalogue_table_with_relative_image_paths(csv_catalogue):
    catalogue = load_catalogue(csv_catalogue, ["category", "colour"], image_column="photo", name_column="title")
    assert catalogue.column_names == ["image", "category", "colour", "productDisplayName", "tags"]
    assert catalogue[0]["image"].size == (60, 80)
    assert catalogue["colour"] == ["Red", None]
    assert catalogue[0]["tags"] == ["category:Shirts", "colour:Red", "detail:check", "detail:slim fit"]
    assert catalogue[1]["tags"] == ["category:Jeans", "detail:denim", "detail:skinny"]


def test_catalogue_parquet_with_every_other_column_as_attribute(tmp_path):
    save_photo(tmp_path / "a.jpg")
    pd.DataFrame({"image": ["a.jpg"], "articleType": ["Shirts"], "size": [42]}).to_parquet(tmp_path / "c.parquet")
    catalogue = load_catalogue(tmp_path / "c.parquet")
    assert catalogue[0]["tags"] == ["articleType:Shirts", "size:42"]


def test_catalogue_folder_of_class_folders(tmp_path):
    save_photo(tmp_path / "shop" / "Shirts" / "1.jpg")
    save_photo(tmp_path / "shop" / "Jeans" / "2.jpg")
    catalogue = load_catalogue(tmp_path / "shop")
    assert sorted(catalogue["articleType"]) == ["Jeans", "Shirts"]
    assert sorted(catalogue["tags"]) == [["articleType:Jeans"], ["articleType:Shirts"]]
    renamed = load_catalogue(tmp_path / "shop", attributes=["subCategory"])
    assert renamed.column_names == ["image", "subCategory", "tags"]


def test_catalogue_image_folder_with_metadata(tmp_path):
    save_photo(tmp_path / "shop" / "1.jpg")
    save_photo(tmp_path / "shop" / "2.jpg")
    (tmp_path / "shop" / "metadata.csv").write_text(
        "file_name,articleType,baseColour,name\n1.jpg,Shirts,Red,Acme Men Striped Shirt\n2.jpg,Tops,,Acme Women Top\n"
    )
    catalogue = load_catalogue(tmp_path / "shop", name_column="name")
    rows = sorted(zip(catalogue["articleType"], catalogue["baseColour"], catalogue["tags"]))
    assert rows == [
        ("Shirts", "Red", ["articleType:Shirts", "baseColour:Red", "detail:striped"]),
        ("Tops", None, ["articleType:Tops"]),
    ]


def test_catalogue_errors_name_what_is_missing(csv_catalogue, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        load_catalogue(tmp_path / "nothing.csv")
    with pytest.raises(ValueError, match="'image'.*photo"):
        load_catalogue(csv_catalogue)
    with pytest.raises(ValueError, match="'season'"):
        load_catalogue(csv_catalogue, attributes=["season"], image_column="photo")
    with pytest.raises(ValueError, match="'name'"):
        load_catalogue(csv_catalogue, image_column="photo", name_column="name")
    (tmp_path / "photos" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        load_catalogue(csv_catalogue, image_column="photo")


def write_catalogue(folder, count, extra_columns=None):
    """A CSV catalogue of `count` distinct photos (and a copy of the first: a catalogue often lists one photo twice)."""
    lines = ["image,articleType" + "".join(f",{name}" for name in extra_columns or {})]
    for index in range(count):
        save_photo(folder / "photos" / f"{index}.png", colour=(index % 256, (7 * index) % 256, 90))
        extra = "".join(f",{values[index]}" for values in (extra_columns or {}).values())
        lines.append(f"photos/{index}.png,{ARTICLE_TYPES[index % 2]}{extra}")
    (folder / "photos" / "copy.png").write_bytes((folder / "photos" / "0.png").read_bytes())
    lines.append("photos/copy.png,Shirts" + "".join(f",{values[0]}" for values in (extra_columns or {}).values()))
    (folder / "catalogue.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalogue.csv"


ARTICLE_TYPES = ("Shirts", "Jeans")


def test_catalogue_validation_is_a_fixed_part_chosen_by_image_bytes(tmp_path):
    table = write_catalogue(tmp_path, 60)
    train, validation = load_catalogue(table, split="train"), load_catalogue(table, split="validation")
    assert len(train) + len(validation) == 61 and 1 <= len(validation) <= 20
    digests = {split: data.image_sha256s(part) for split, part in (("train", train), ("validation", validation))}
    assert not set(digests["train"]) & set(digests["validation"])  # a photo and its byte-identical copy: one side
    assert all(int(digest, 16) % 100 < 10 for digest in digests["validation"])
    # The same rows on every load, whatever the row order of the table.
    lines = table.read_text().splitlines()
    table.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    assert sorted(data.image_sha256s(load_catalogue(table, split="validation"))) == sorted(digests["validation"])
    assert len(load_catalogue(table, split="all")) == len(load_catalogue(table)) == 61
    with pytest.raises(ValueError, match="splits are \['validation', 'train'\].*not 'test'"):
        load_catalogue(table, split="test")


def test_a_catalogues_own_split_column_sets_its_splits_and_is_no_attribute(tmp_path):
    splits = ["validation" if index % 4 == 0 else "train" for index in range(8)]
    table = write_catalogue(tmp_path, 8, {"split": splits})
    validation = load_catalogue(table, split="validation")
    assert validation.column_names == ["image", "articleType", "split", "tags"]  # no `split` head, no split: tag
    assert len(validation) == 3 and validation["tags"][0] == ["articleType:Shirts"]  # photos 0, 4 and the copy of 0
    assert len(load_catalogue(table, split="train")) == 6
    with pytest.raises(ValueError, match="no row of split 'test'.*'train', 'validation'"):
        load_catalogue(table, split="test")
    assert data.describe_split(str(table), "validation", validation).endswith("whose 'split' column is 'validation'")


# ---------------------------------------------------------------------------------------------------------------------
# Feedback.
# ---------------------------------------------------------------------------------------------------------------------

FEEDBACK = [  # corrected attributes, corrected tags
    ({"articleType": "Shirts", "baseColour": "Navy Blue"}, ["Checked", "boho chic"]),
    ({"gender": "Women"}, []),
]


def write_refused_records(folder):
    """Records the store refuses, written by hand (a store written by an older version may hold them): one without
    consent, one that corrects nothing. Both must be skipped."""
    shard = folder / "data" / "handwritten-shard"
    shard.mkdir(parents=True)
    base = {
        "timestamp": "2025-01-01T00:00:00.000+00:00",
        "model_id": "tiny",
        "model_revision": "0",
        "predicted": "{}",
        "annotator": "anonymous",
    }
    records = [
        {"id": "0" * 32, "image_sha256": "0" * 64, "corrected_attributes": json.dumps({"articleType": "Jeans"}),
         "corrected_tags": ["denim"], "consent": False},
        {"id": "1" * 32, "image_sha256": "1" * 64, "corrected_attributes": "{}", "corrected_tags": [],
         "consent": True},
    ]  # fmt: skip
    lines = []
    for record in records:
        (shard / f"{record['id']}.jpg").write_bytes(encode(product_photo()))
        lines.append(json.dumps({"file_name": f"{record['id']}.jpg", **base, **record}))
    (shard / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def feedback_folder(tmp_path):
    """A feedback store written by the real FeedbackStore, plus one record without consent."""
    folder = tmp_path / "feedback"
    with FeedbackStore(folder) as store:
        for index, (attributes, tags) in enumerate(FEEDBACK):
            store.add(
                product_photo(colour=(index * 60, 0, 0)),
                predicted={"attributes": {}, "tags": []},
                corrected_attributes=attributes,
                corrected_tags=tags,
                consent=True,
                model_id="tiny",
                model_revision="0",
            )
    write_refused_records(folder)
    return folder


SHOPPER_TAG = "detail:boho chic"  # typed by a user, not in the lexicon: kept as typed, lower case


def test_feedback_becomes_training_examples(feedback_folder):
    assert len(load_dataset(str(feedback_folder), split="train")) == 4  # the store holds 4 records: 2 are skipped
    examples = load_feedback(feedback_folder)
    assert len(examples) == 2
    assert isinstance(examples.features["image"], Image)
    assert examples.column_names[-5:] == ["gender", "articleType", "baseColour", "tags", "tags_known"]
    rows = sorted(zip(examples["gender"], examples["articleType"], examples["baseColour"], examples["tags"]), key=str)
    assert rows == [
        ("Women", None, None, ["gender:Women"]),
        (None, "Shirts", "Navy Blue", ["articleType:Shirts", "baseColour:Navy Blue", "detail:check", SHOPPER_TAG]),
    ]
    assert examples[0]["image"].size == (60, 80)


def test_each_feedback_load_builds_in_a_cache_of_its_own(feedback_folder, tmp_path, monkeypatch):
    """Two trainings of a sweep loaded one store at once, and one crashed: each forced a rebuild of the same shared
    cache folder and deleted the other's files mid-build. Each load now builds apart from the shared cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "shared-cache")
    first, second = load_feedback(feedback_folder), load_feedback(feedback_folder)
    folders = [{Path(cache["filename"]).parent for cache in loaded.cache_files} for loaded in (first, second)]
    assert folders[0] and folders[1] and not folders[0] & folders[1]
    assert not any((tmp_path / "shared-cache").rglob("*.arrow"))
    assert len(first) == len(second) == 2


def test_exact_duplicate_feedback_is_learned_once(feedback_folder):
    # The store keeps each submitter's identical correction as its own record (each withdraws their own).
    photo = product_photo(colour=(0, 0, 200))
    correction = dict(predicted={}, corrected_attributes={"gender": "Men"}, corrected_tags=["denim", "check"],
                      consent=True, model_id="tiny", model_revision="0")  # fmt: skip
    with FeedbackStore(feedback_folder) as store:
        store.add(photo, **correction, annotator="alice")
        store.add(photo, **{**correction, "corrected_tags": ["check", "denim"]}, annotator="bob")
        store.add(photo, **{**correction, "corrected_tags": ["denim"]}, annotator="carol")  # a different correction
        assert len(store) == 7
    examples = load_feedback(feedback_folder)
    men = sorted(sorted(tags) for tags in examples["tags"] if "gender:Men" in tags)
    assert len(examples) == 4
    assert men == [["detail:check", "detail:denim", "gender:Men"], ["detail:denim", "gender:Men"]]


def test_feedback_read_again_sees_new_and_withdrawn_records(feedback_folder):
    assert len(load_feedback(feedback_folder)) == 2
    with FeedbackStore(feedback_folder) as store:
        new_id = store.add(
            product_photo(colour=(0, 200, 0)), predicted={"attributes": {}, "tags": []},
            corrected_attributes={"baseColour": "Green"}, corrected_tags=[], consent=True, model_id="tiny",
            model_revision="0",
        )  # fmt: skip
    assert len(load_feedback(feedback_folder)) == 3
    with FeedbackStore(feedback_folder) as store:
        assert store.delete(new_id)
    assert len(load_feedback(feedback_folder)) == 2


def test_feedback_with_fixed_attribute_columns(feedback_folder):
    examples = load_feedback(feedback_folder, attributes=list(PRODUCT_ATTRIBUTES))
    assert [column for column in examples.column_names if column in PRODUCT_ATTRIBUTES] == list(PRODUCT_ATTRIBUTES)


def test_feedback_learns_only_changed_and_confirmed_attributes(tmp_path):
    folder = tmp_path / "feedback"
    form = {"gender": "Men", "articleType": "Shirts", "baseColour": "Blue"}  # every attribute of the form
    submissions = [  # attribute statuses, typed tags
        ({"gender": "changed", "articleType": "confirmed", "baseColour": "untouched"}, []),
        ({"gender": "confirmed", "articleType": "changed", "baseColour": "confirmed"}, []),
        ({"gender": "untouched", "articleType": "untouched", "baseColour": "untouched"}, ["denim"]),
    ]
    with FeedbackStore(folder) as store:
        for index, (status, tags) in enumerate(submissions):
            store.add(product_photo(colour=(index * 70, 20, 20)), predicted={}, corrected_attributes=form,
                      corrected_tags=tags, consent=True, model_id="tiny", model_revision="0",
                      attribute_status=status)  # fmt: skip
    write_refused_records(folder)  # records of an older store: no attribute_status
    shard = folder / "data" / "handwritten-shard"
    record = {**json.loads((shard / "metadata.jsonl").read_text().splitlines()[0]), "consent": True}
    record.update(id="2" * 32, file_name="2.jpg", image_sha256="2" * 64)  # consented: articleType Jeans, tag denim
    (shard / "2.jpg").write_bytes(encode(product_photo()))
    (shard / "metadata.jsonl").write_text((shard / "metadata.jsonl").read_text() + json.dumps(record) + "\n")
    examples = load_feedback(folder)
    rows = sorted(zip(examples["gender"], examples["articleType"], examples["baseColour"], examples["tags_known"],
                      examples["tags"]), key=str)  # fmt: skip
    assert examples.features["tags_known"] == Value("bool")
    assert rows == [
        ("Men", "Shirts", "Blue", True, ["gender:Men", "articleType:Shirts", "baseColour:Blue"]),
        ("Men", "Shirts", None, False, ["gender:Men", "articleType:Shirts"]),  # the untouched colour is masked
        (None, "Jeans", None, False, ["articleType:Jeans", "detail:denim"]),  # legacy: its attributes confirmed
        (None, None, None, False, ["detail:denim"]),  # every attribute untouched: learned for its tag only
    ]
    assert load_feedback(folder, attributes=["articleType"])["tags_known"].count(True) == 3  # all but the tag-only

    summary = feedback_dataset.feedback_summary(folder)
    assert summary["records"] == 4
    assert summary["attributes"] == {
        "gender": {"changed": 1, "confirmed": 1, "untouched": 1},
        "articleType": {"changed": 1, "confirmed": 2, "untouched": 1},
        "baseColour": {"changed": 0, "confirmed": 1, "untouched": 2},
    }
    assert re.fullmatch(r"[0-9a-f]{12}", summary["revision"])
    same_state = feedback_dataset.feedback_summary(folder)
    assert same_state["revision"] == summary["revision"]  # the same store state, the same name
    with FeedbackStore(folder) as store:
        store.add(product_photo(colour=(0, 90, 0)), predicted={}, corrected_attributes={"gender": "Women"},
                  corrected_tags=[], consent=True, model_id="tiny", model_revision="0")  # fmt: skip
    assert feedback_dataset.feedback_summary(folder)["revision"] != summary["revision"]


def test_a_hub_feedback_dataset_reports_the_commit_it_was_cached_at(tmp_path):
    def cached_in(folder):
        folder.mkdir(parents=True)
        return Dataset.from_dict({"id": ["a"]}).map(lambda row: row, cache_file_name=str(folder / "train.arrow"))

    commit = "0123456789abcdef0123456789abcdef01234567"  # datasets caches a Hub dataset in <...>/<version>/<commit>/
    hub_cache = tmp_path / "me___feedback" / "default" / "0.0.0" / commit
    assert feedback_dataset._hub_commit(cached_in(hub_cache)) == commit
    assert feedback_dataset._hub_commit(cached_in(tmp_path / "elsewhere")) is None
    assert feedback_dataset._hub_commit(Dataset.from_dict({"id": ["a"]})) is None  # in memory: unknown


def test_a_typed_tag_counts_the_people_who_typed_it(tmp_path):
    folder = tmp_path / "feedback"
    photos = [product_photo(colour=(30 * index, 100, 50)) for index in range(4)]

    def add(store, photo, tags, annotator, consent=True):
        store.add(photo, predicted={}, corrected_attributes={}, corrected_tags=tags, consent=consent,
                  model_id="tiny", model_revision="0", annotator=annotator)  # fmt: skip

    with FeedbackStore(folder) as store:
        for person in ("ana", "ben", "cy"):  # three signed-in people type "tank" (one spells it "Tank")
            add(store, photos[0], ["Tank" if person == "cy" else "tank"], person)
        for photo in photos[:3]:  # one person types "lace-up" on three photos: still one person
            add(store, photo, ["lace up"], "ana")
        add(store, photos[3], ["boho"], "anonymous")  # anonymous: counted by photo, the same photo once
        add(store, photos[3], ["boho", "lace-up"], "anonymous")
        add(store, photos[2], ["boho"], "anonymous")
    shard = folder / "data" / "handwritten"  # a record without consent (the store refuses one) counts for no one
    shard.mkdir(parents=True)
    (shard / "x.jpg").write_bytes(encode(photos[0]))
    record = {"file_name": "x.jpg", "id": "f" * 32, "timestamp": "2025-01-01T00:00:00.000+00:00", "image_sha256": "f" * 64,
              "model_id": "tiny", "model_revision": "0", "predicted": "{}", "corrected_attributes": "{}",
              "corrected_tags": ["denim"], "annotator": "dee", "consent": False}  # fmt: skip
    (shard / "metadata.jsonl").write_text(json.dumps(record) + "\n")
    assert feedback_dataset.feedback_tag_contributors(folder) == {"tank": 3, "lace-up": 2, "boho": 2}


def test_missing_feedback_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-feedback"):
        load_feedback(tmp_path / "no-feedback")


# ---------------------------------------------------------------------------------------------------------------------
# The real shared data (skipped where it is absent).
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (PRODUCT_IMAGES / "data").is_dir(), reason="shared product images not present")
def test_real_product_images_splits_and_vocabulary():
    train = load_fashion_product_images(PRODUCT_IMAGES, split="train")
    validation = load_fashion_product_images(PRODUCT_IMAGES, split="validation")
    assert (len(train), len(validation)) == (33315, 4503)
    attributes, tags = build_vocabulary(train, PRODUCT_ATTRIBUTES)
    assert list(attributes) == list(PRODUCT_ATTRIBUTES)
    assert len(attributes["articleType"]) == 140 and len(attributes["gender"]) == 5
    details = [text for text, group in tags if group == "detail"]
    assert {"check", "striped", "slim fit", "running"} <= set(details)
    assert details == sorted(details, key=detail_tag_order)


@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist").is_dir(), reason="shared Fashion-MNIST not present")
def test_real_fashion_mnist_test_split():
    test = load_fashion_mnist(SHARED_DATA / "fashion-mnist", split="test")
    assert len(test) == 10000
    assert sorted(set(test["articleType"])) == sorted(data.FASHION_MNIST_CLASSES)
