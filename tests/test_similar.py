"""Similar items: `fashion-hf index` builds a faiss index of a catalogue's embeddings; it is saved, loaded, changed and
searched with attribute filters, and a photo finds its catalogue neighbours."""

import io
import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fashion_hf import FashionTaggerImageProcessor, cli, similar as similar_module
from fashion_hf.similar import PER_KIND, SimilarItems, SimilarityIndex, build_index
from fashion_hf.tag import main as tag_main
from helpers import COLOURS, product_photo, tagging_model, write_product_parquet

WIDTH = 24


def clustered_vectors(rng, count, clusters=20, width=WIDTH) -> np.ndarray:
    """Vectors in clusters, as embeddings of a catalogue are: neighbours are close, and a wrong one is far."""
    centres = rng.normal(size=(clusters, width))
    return (centres[rng.integers(clusters, size=count)] + 0.3 * rng.normal(size=(count, width))).astype("float32")


def catalogue_rows(count) -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"item-{index}" for index in range(count)],
        "path": [f"{index}.jpg" for index in range(count)],
        "gender": ["Men" if index % 2 else "Women" for index in range(count)],
        "articleType": [["Tshirts", "Shirts", "Jeans"][index % 3] for index in range(count)],
    })  # fmt: skip


def found_ids(results) -> list[list]:
    return [[item["id"] for item in items] for items in results]


def exact_top_k(vectors, queries, k, allowed=None) -> list[list[int]]:
    """The reference: cosine similarity computed with numpy over the (allowed) rows."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    if allowed is not None:
        scores[:, ~allowed] = -np.inf
    return [list(order[:k]) for order in np.argsort(-scores, axis=1, kind="stable")]


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_a_saved_index_loads_back_with_the_same_answers(tmp_path, rng, kind):
    vectors, items = clustered_vectors(rng, 300), catalogue_rows(300)
    index = SimilarityIndex.build(vectors, items, kind=kind)
    index.save(tmp_path / "index")

    loaded = SimilarityIndex.load(tmp_path / "index")
    assert loaded.kind == kind and len(loaded) == 300
    assert loaded.search(vectors[:20], k=5) == index.search(vectors[:20], k=5)
    assert loaded.items.drop(columns="key").equals(items)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_an_item_is_its_own_nearest_neighbour_with_its_columns(rng, kind):
    vectors, items = clustered_vectors(rng, 200), catalogue_rows(200)
    results = SimilarityIndex.build(vectors, items, kind=kind).search(vectors[7:8] * 3.0, k=3)[0]  # length ignored
    assert results[0] == {"id": "item-7", "path": "7.jpg", "gender": "Men", "articleType": "Shirts",
                          "score": pytest.approx(1.0, abs=1e-5)}  # fmt: skip
    assert [item["score"] for item in results] == sorted((item["score"] for item in results), reverse=True)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_added_items_are_found_and_removed_ones_are_not_after_a_round_trip(tmp_path, rng, kind):
    vectors, items = clustered_vectors(rng, 250), catalogue_rows(250)
    index = SimilarityIndex.build(vectors[:200], items[:200], kind=kind)
    index.add(vectors[200:], items[200:])
    assert index.remove(["item-3", "item-210", "not-there"]) == 2
    index.save(tmp_path / "index")

    loaded = SimilarityIndex.load(tmp_path / "index")
    assert len(loaded) == loaded.index.ntotal == 248
    assert found_ids(loaded.search(vectors[[205, 240]], k=1)) == [["item-205"], ["item-240"]]
    for removed in (3, 210):
        assert f"item-{removed}" not in found_ids(loaded.search(vectors[removed : removed + 1], k=50))[0]
    loaded.add(vectors[3:4], items[3:4])  # a removed id can come back
    assert found_ids(loaded.search(vectors[3:4], k=1)) == [["item-3"]]


def test_hnsw_finds_what_exact_search_finds(rng):
    vectors, items = clustered_vectors(rng, 3000, clusters=60), catalogue_rows(3000)
    queries = clustered_vectors(np.random.default_rng(1), 100, clusters=60)
    exact = found_ids(SimilarityIndex.build(vectors, items, kind="exact").search(queries, k=10))
    approximate = found_ids(SimilarityIndex.build(vectors, items, kind="hnsw").search(queries, k=10))
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.95
    assert exact == [[f"item-{row}" for row in top] for top in exact_top_k(vectors, queries, 10)]


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
@pytest.mark.parametrize("filtered_exact_below", [0, 10_000], ids=["graph-with-selector", "exact-among-filtered"])
def test_filters_return_the_best_items_with_those_labels(monkeypatch, rng, kind, filtered_exact_below):
    monkeypatch.setattr(similar_module, "FILTERED_EXACT_BELOW", filtered_exact_below)
    vectors, items = clustered_vectors(rng, 600), catalogue_rows(600)
    index = SimilarityIndex.build(vectors, items, kind=kind)
    filters = {"gender": "Women", "articleType": ["Tshirts", "Jeans"]}
    results = index.search(vectors[:10], k=5, filters=filters)

    allowed = (items["gender"] == "Women") & items["articleType"].isin(["Tshirts", "Jeans"])
    expected = [[f"item-{row}" for row in top] for top in exact_top_k(vectors, vectors[:10], 5, allowed.to_numpy())]
    found = found_ids(results)
    assert np.mean([len(set(f) & set(e)) / 5 for f, e in zip(found, expected)]) >= 0.9
    for item in (item for items_found in results for item in items_found):
        assert item["gender"] == "Women" and item["articleType"] in ("Tshirts", "Jeans")


def test_a_filter_that_nothing_passes_finds_nothing_and_k_is_capped_by_what_passes(rng):
    vectors, items = clustered_vectors(rng, 30), catalogue_rows(30)
    items.loc[4, "articleType"] = "Dresses"
    index = SimilarityIndex.build(vectors, items)
    assert index.search(vectors[:2], k=5, filters={"articleType": "Sarees"}) == [[], []]
    assert found_ids(index.search(vectors[:1], k=5, filters={"articleType": "Dresses"})) == [["item-4"]]


def test_bad_input_is_refused_with_what_would_be_valid(rng):
    vectors, items = clustered_vectors(rng, 20), catalogue_rows(20)
    index = SimilarityIndex.build(vectors, items)
    with pytest.raises(ValueError, match=r"no attribute 'colour'.*\['gender', 'articleType'\]"):
        index.search(vectors[:1], filters={"colour": "Red"})
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        index.search(vectors[:1], k=0)
    with pytest.raises(ValueError, match="width 5 for an index of width 24"):
        index.search(np.ones((1, 5), "float32"))
    with pytest.raises(ValueError, match=r"unique.*item-1"):
        index.add(vectors[1:2], items[1:2])
    with pytest.raises(ValueError, match="3 embeddings for 2 items"):
        index.add(vectors[:3], catalogue_rows(2).assign(id=["new-1", "new-2"]))


def test_reranking_shows_first_the_kind_the_photo_is_given_and_then_other_kinds(rng):
    vectors, items = clustered_vectors(rng, 300), catalogue_rows(300)  # 6 kinds: 2 genders x 3 articleTypes
    index = SimilarityIndex.build(vectors, items, kind="exact")
    query = vectors[:1]  # item-0, a women's T-shirt
    unlikely = math.log(1e-6)
    mens_jeans = {"gender": {"Men": 0.0, "Women": unlikely},
                  "articleType": {"Jeans": 0.0, "Tshirts": unlikely, "Shirts": unlikely}}  # fmt: skip
    reranked = index.search(query, k=10, label_log_probs=[mens_jeans])[0]
    nearest = index.search(query, k=300)[0]
    kind = lambda item: (item["gender"], item["articleType"])  # noqa: E731
    assert reranked[:PER_KIND] == [item for item in nearest if kind(item) == ("Men", "Jeans")][:PER_KIND]
    assert max(Counter(map(kind, reranked)).values()) == PER_KIND and len(reranked) == 10
    # the model unsure of everything: the nearest first, as without re-ranking, and still no kind more than twice
    unsure = {"gender": {"Men": 0.0, "Women": 0.0}, "articleType": {"Jeans": 0.0, "Tshirts": 0.0, "Shirts": 0.0}}
    plain = index.search(query, k=10, label_log_probs=[unsure])[0]
    assert plain[0] == nearest[0] and max(Counter(map(kind, plain)).values()) == PER_KIND
    # a filter that leaves one kind: k of it, all the same
    only = index.search(query, k=5, filters={"gender": "Men", "articleType": "Jeans"}, label_log_probs=[unsure])[0]
    assert [item["id"] for item in only] == [item["id"] for item in nearest if kind(item) == ("Men", "Jeans")][:5]
    # per_kind=None: the most alike of the kind the photo is given, however many
    uncapped = index.search(query, k=10, label_log_probs=[mens_jeans], per_kind=None)[0]
    assert uncapped == [item for item in nearest if kind(item) == ("Men", "Jeans")][:10]
    with pytest.raises(ValueError, match="one per query"):
        index.search(vectors[:2], k=5, label_log_probs=[unsure])


def test_loading_a_folder_that_is_no_index_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="fashion-hf index CATALOGUE --output"):
        SimilarityIndex.load(tmp_path)


# --- end to end, on a tiny model ---------------------------------------------------------------------------------


def write_photos(folder, count=6):
    folder.mkdir(parents=True, exist_ok=True)
    colours = [*COLOURS.values(), (240, 200, 20), (90, 90, 90), (250, 120, 200)]
    for index in range(count):
        product_photo(colours[index % len(colours)], size=(50 + 9 * index, 80)).save(folder / f"{index:02d}.png")
    return folder


def test_a_photo_of_the_catalogue_finds_itself_first(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos")
    cli.main(["index", str(photos), "--output", str(tmp_path / "index"), "--model", str(tiny_model_dir),
              "--num-workers", "0", "--no-progress"])  # fmt: skip

    finder = SimilarItems.load(tmp_path / "index")  # the model the index names
    assert finder.index.kind == "exact" and len(finder.index) == 6
    for index in (0, 4):
        found = finder(str(photos / f"{index:02d}.png"), k=3)
        assert found[0]["path"] == f"{index:02d}.png" and found[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert Image.open(finder.image_input(found[0])).size == (50 + 9 * index, 80)
    predicted = finder.index.items["articleType"].iloc[0]  # an image folder has no labels: the model's are used
    assert all(item["articleType"] == predicted for item in finder(photos / "00.png", 6, {"articleType": predicted}))


def test_a_tag_output_with_embeddings_indexes_like_the_catalogue_itself(tmp_path, tiny_model_dir):
    write_product_parquet(tmp_path / "products", "train", 9)
    catalogue = str(tmp_path / "products")
    tag_main([catalogue, "--output", str(tmp_path / "tags"), "--model", str(tiny_model_dir), "--embeddings",
              "--num-workers", "0", "--no-progress", "--runtime", "torch"])  # fmt: skip  (as build_index runs)
    from_tags = build_index(str(tmp_path / "tags"), tmp_path / "from-tags", progress=False)
    direct = build_index(catalogue, tmp_path / "direct", str(tiny_model_dir), progress=False)

    assert from_tags.items.equals(direct.items)
    assert from_tags.items["id"].tolist() == list(range(9))
    # The catalogue's own labels, not the untrained model's guesses, are what filters read.
    assert from_tags.items["articleType"].tolist() == [["Tshirts", "Shirts"][row % 2] for row in range(9)]
    assert from_tags.items["baseColour"].tolist() == [list(COLOURS)[row % 3] for row in range(9)]
    queries = np.asarray(pd.read_parquet(tmp_path / "tags")["embedding"].tolist())
    assert from_tags.search(queries, k=4) == direct.search(queries, k=4)


def test_an_index_refuses_a_query_model_other_than_its_own(tmp_path, tiny_model_dir):
    photos = write_photos(tmp_path / "photos", count=3)
    build_index(str(photos), tmp_path / "index", str(tiny_model_dir), progress=False)
    other = tagging_model(max_tag_length=6)
    processor = FashionTaggerImageProcessor.from_model_config(other.config)
    with pytest.raises(ValueError, match="built with another model"):
        SimilarItems.load(tmp_path / "index", model=other, processor=processor)


def test_similar_loads_the_index_in_the_environment_once(tmp_path, tiny_model_dir, monkeypatch):
    photos = write_photos(tmp_path / "photos", count=3)
    build_index(str(photos), tmp_path / "index", str(tiny_model_dir), progress=False)
    monkeypatch.setenv(similar_module.INDEX_ENV, str(tmp_path / "index"))
    similar_module.load_similar_items.cache_clear()

    photo = io.BytesIO()
    Image.open(photos / "01.png").save(photo, format="PNG")
    assert similar_module.similar(photo.getvalue(), k=1)[0]["path"] == "01.png"
    similar_module.similar(photos / "02.png", k=1)
    assert similar_module.load_similar_items.cache_info().misses == 1
    monkeypatch.delenv(similar_module.INDEX_ENV)
    with pytest.raises(ValueError, match=similar_module.INDEX_ENV):
        similar_module.similar(photo.getvalue(), index=None)


# --- benchmarks/bench_similar.py ---------------------------------------------------------------------------------


def test_retrieval_scores_follow_their_definitions():
    import bench_similar

    relevant = np.zeros((3, 10), dtype=bool)
    relevant[0, 0] = True  # found first, its only relevant item: AP 1
    relevant[1, [1, 3]] = True  # ranks 2 and 4 of its 2 relevant items: AP (1/2 + 2/4) / 2 = 0.5
    # the third finds none of its 5: AP 0
    scores = bench_similar.retrieval_scores(relevant, np.asarray([1, 2, 5]))
    assert scores == {"queries": 3, "recall@1": pytest.approx(1 / 3), "recall@10": pytest.approx(2 / 3),
                      "map@10": pytest.approx(0.5)}  # fmt: skip


def write_cache(folder, rng):
    """A cache as `bench_similar.py embed` leaves it: each query's nearest catalogue item shares its labels."""
    keys = [("Tshirts", "Red", "Men"), ("Jeans", "Blue", "Women"), ("Shirts", "White", "Men")]
    centres = rng.normal(size=(len(keys), 8)) * 5
    sets = {"product-train": 300, "product-validation": 30, "phone-validation": 12}
    for name, count in sets.items():
        which = np.arange(count) % len(keys)
        labels = pd.DataFrame({
            "articleType": [keys[key][0] for key in which], "baseColour": [keys[key][1] for key in which],
            "gender": [keys[key][2] for key in which], "subCategory": "Topwear",
            "label": "T-Shirt", "image_sha256": [f"{name}-{row}" for row in range(count)],
        })  # fmt: skip
        labels.to_parquet(folder / f"{name}-labels.parquet")
        np.save(folder / f"{name}-chunk-0000.npy", (centres[which] + rng.normal(size=(count, 8))).astype("float32"))
        if name != "product-train":  # the model's answers on each query photo: sure of the first key's labels
            log_probs = {attribute: np.log(np.where(np.arange(3) == 0, 0.999, 0.0005))[None].repeat(count, 0)
                         for attribute in ("articleType", "baseColour", "gender")}  # fmt: skip
            labels_of = {f"labels:{attribute}": np.asarray([key[position] for key in keys])
                         for position, attribute in enumerate(("articleType", "baseColour", "gender"))}  # fmt: skip
            np.savez(folder / f"{name}-labelprobs-0000.npz", **log_probs, **labels_of)


def test_the_benchmark_scores_a_cache_and_times_both_indexes(tmp_path, rng, capsys):
    import bench_similar

    write_cache(tmp_path, rng)
    bench_similar.main(["evaluate", "--cache", str(tmp_path), "--rounds", "1", "--ef-search", "16", "--projection",
                        "--projection-epochs", "1", "--projection-width", "4", "--json", str(tmp_path / "r.json")])  # fmt: skip
    output = capsys.readouterr().out
    assert "catalogue: 300 of 300 train items" in output
    assert "| pooled features (`tag.image_embeddings`) | all validation queries (30) | 1.000 | 1.000 |" in output
    # re-ranked with a model sure that every photo is a red men's T-shirt: right first for the third of them that
    # are, and the other kinds still found in the top 10
    capped = "| re-ranked with the photo's labels, at most 2 of a kind (shipped: `SimilarItems`) | all validation queries (30) |"
    assert f"{capped} 0.333 | 1.000 |" in output
    uncapped = "| re-ranked with the photo's labels, any number of a kind (`per_kind=None`) | all validation queries (30) |"
    assert f"{uncapped} 0.333 | 0.333 |" in output  # ten red men's T-shirts
    # the ceiling of such re-ranking: only the red men's T-shirts are their model's first kind; each other kind
    # ranks second (tied), so within the top 5 and 10 kinds
    assert "| 0.333 | 1.000 | 1.000 |" in output
    ceiling = json.loads((tmp_path / "r.json").read_text())["label_ceiling"]
    assert ceiling == pytest.approx({"own kind in the top 1": 1 / 3, "own kind in the top 5": 1.0, "own kind in the top 10": 1.0})
    # --json: what the model card's "Similar items" section reads
    from fashion_hf.training.model_card import _retrieval_section

    section = _retrieval_section(json.loads((tmp_path / "r.json").read_text()))
    assert section["catalogue"] == "300" and section["queries"] == "30" and section["phone_queries"] == "12"
    assert [row["recall_10"] for row in section["rows"]][:3] == ["1.000", "1.000", "0.333"]
    assert "| 300 | 16 |" in output and "selector in the graph" in output and "projection head" in output
