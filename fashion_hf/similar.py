"""`fashion-hf index`: a vector index of a catalogue's image embeddings, and the similar items of a photo in it.

    fashion-hf index examples/ --output indexes/examples                  # an image folder
    fashion-hf index ../shared/data/fashion-product-images --split train --output indexes/products
    fashion-hf index tags/ --output indexes/shop      # a `fashion-hf tag --embeddings` output: nothing embedded again

    from fashion_hf.similar import similar
    similar("photo.jpg", k=10, filters={"gender": "Women"}, index="indexes/products")
    # [{"id": 15970, "path": "15970.jpg", "score": 0.93, "gender": "Women", "articleType": "Tops", ...}, ...]

Input: anything `fashion-hf tag` reads (an image folder, a table of image paths or bytes, a Hub-style dataset folder,
a Hub dataset id), tagged with `--embeddings` into `INDEX/tags/` (resumable like `fashion-hf tag`: run the same
command again after a kill), or the output folder of a finished `fashion-hf tag --embeddings` run (parquet).

Output (`--output INDEX`), read back by `SimilarityIndex.load`:
- `index.faiss`: the embeddings (the model's `tag.image_embeddings`, L2-normalised, so inner product is cosine) in a
  faiss `IndexIDMap2`: exact search (`IndexFlatIP`) below `EXACT_BELOW` items, HNSW (Malkov and Yashunin, 2016)
  from there on, where exact search costs more per query than the approximate one (BENCHMARKS.md, "Similar items");
- `items.parquet`: one row per item: `key` (its faiss id), `id` and `path` (as `fashion-hf tag` writes them), `row`
  (its row in the input) and one column per attribute: the catalogue's own label where the input has that column,
  else the model's prediction. Filters read these;
- `index.json`: the index kind and settings, the model's name and fingerprint (a query must be embedded by the same
  model), and the input (to show an item's image).

Items can be added and removed by id (`SimilarityIndex.add`, `.remove`) and the index saved again.
"""

import argparse
import contextlib
import copy
import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch
from transformers import AutoImageProcessor, AutoModel, PreTrainedModel

from .evaluation import encode_upright
from .modeling_fashion_tagger import FoldedTagger
from .tag import (
    DEFAULT_MODEL,
    MANIFEST,
    ImageRows,
    TagSettings,
    default_num_workers,
    image_embeddings,
    load_image_rows,
    load_input_dataset,
    model_fingerprint,
    tag,
    tag_locally,
)

INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.parquet"
META_FILE = "index.json"
TAGS_FOLDER = "tags"
INDEX_ENV = "FASHION_SIMILAR_INDEX"  # the index `similar()` and the app search when none is named
KINDS = ("exact", "hnsw")
# Exact search costs about 1 ms per query up to this many items and grows with them; HNSW from here on keeps a query
# well under 1 ms with the same top 10 but for about 1 in 500 (benchmarks/bench_similar.py; BENCHMARKS.md, "Similar
# items").
EXACT_BELOW = 5_000
HNSW_NEIGHBOURS = 32  # M: links per node
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
# A filter that leaves fewer items than this is searched exactly over those items: the HNSW graph would walk mostly
# through items the filter drops and find too few of the ones it keeps.
FILTERED_EXACT_BELOW = 1_000
# The graph walk of a filtered search meets items the filter drops, so it keeps a wider beam: twice the default took
# top-10 recall against exact filtered search from 0.984 to 0.998 (gender) and 0.967 to 0.982 (articleType) on the
# 33k product photos, at under 2 ms a query.
FILTERED_EF_FACTOR = 2
ITEM_COLUMNS = ("key", "id", "path", "row")
# Re-ranking a photo's nearest items with what the model says about the photo (`SimilarItems`): the embedding alone
# found an item of the same articleType, colour and gender first for 53% of product photos (BENCHMARKS.md, "Similar
# items"). The `RERANK_CANDIDATES` nearest are scored again by cosine similarity + `LABEL_WEIGHT` x the photo's
# log-probability of each item's labels (floored at `LABEL_LOG_PROB_FLOOR`, also the value of a label the model does
# not know), and the first k hold at most `PER_KIND` items of one (articleType, baseColour, gender): when the model's
# colour is wrong, the next kinds are still there.
RERANK_ATTRIBUTES = ("articleType", "baseColour", "gender")
RERANK_CANDIDATES = 300
LABEL_WEIGHT = 0.1
LABEL_LOG_PROB_FLOOR = math.log(1e-6)
PER_KIND = 2


# ---------------------------------------------------------------------------------------------------------------------
# The index: vectors in faiss, the items they stand for in a DataFrame.
# ---------------------------------------------------------------------------------------------------------------------


def normalised(vectors) -> np.ndarray:
    """`(n, width)` float32 rows of unit length: inner product is then cosine similarity."""
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be a (items, width) array, got shape {vectors.shape}")
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@contextlib.contextmanager
def threads_for(queries: int):
    """One OpenMP thread for a single query: faiss parallelises over queries, so a second thread has nothing to do
    but wake up, and on a busy machine waiting for it cost many times the search (BENCHMARKS.md, "Similar items").
    The setting is the calling thread's own, so concurrent requests each keep theirs."""
    if queries > 1:
        yield
        return
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def new_faiss_index(kind: str, width: int, settings: dict) -> faiss.Index:
    if kind == "exact":
        inner = faiss.IndexFlatIP(width)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(width, settings["neighbours"], faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = settings["ef_construction"]
        inner.hnsw.efSearch = settings["ef_search"]
    else:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    return faiss.IndexIDMap2(inner)


def hnsw_settings(neighbours=HNSW_NEIGHBOURS, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH) -> dict:
    return {"neighbours": neighbours, "ef_construction": ef_construction, "ef_search": ef_search}


@dataclass
class ItemLookup:
    """The items as plain Python and numpy: each one's result record (None for a missing label), its position by
    key, and per attribute each item's label as an integer code with the code of each label."""

    records: list[dict]
    keys: np.ndarray
    position: dict[int, int]
    codes: dict[str, tuple[np.ndarray, dict[str, int]]]
    stored_at: np.ndarray  # by key: where the index stores its vector

    @classmethod
    def of(cls, items: pd.DataFrame, attributes: list[str], stored_keys: np.ndarray) -> "ItemLookup":
        shown = items.drop(columns=["key", "row"], errors="ignore")
        records = shown.astype(object).where(shown.notna(), None).to_dict("records")
        keys = items["key"].to_numpy(np.int64)
        codes = {}
        for attribute in attributes:
            item_codes, labels = pd.factorize(items[attribute])  # a missing label: -1, never asked for
            codes[attribute] = (item_codes, {str(label): code for code, label in enumerate(labels)})
        stored_at = np.full(int(stored_keys.max()) + 1 if len(stored_keys) else 0, -1, dtype=np.int64)
        stored_at[stored_keys] = np.arange(len(stored_keys))
        return cls(records, keys, {key: position for position, key in enumerate(keys.tolist())}, codes, stored_at)


class SimilarityIndex:
    """Catalogue items and their embeddings, searched by cosine similarity with optional attribute filters.

    ```python
    index = SimilarityIndex.build(embeddings, items)      # items: a DataFrame with `id`, `path`, attribute columns
    index.search(query_embeddings, k=10, filters={"gender": "Women", "articleType": ["Tops", "Tshirts"]})
    index.add(more_embeddings, more_items); index.remove([id_1, id_2]); index.save("indexes/shop")
    SimilarityIndex.load("indexes/shop")
    ```
    """

    def __init__(self, index: faiss.Index, items: pd.DataFrame, meta: dict):
        self.index, self.items, self.meta = index, items.reset_index(drop=True), meta
        self._lookup = None  # `ItemLookup` of the items, built when first searched

    @classmethod
    def build(cls, embeddings, items: pd.DataFrame, kind: str | None = None, meta: dict | None = None,
              **hnsw) -> "SimilarityIndex":  # fmt: skip
        """An index of `embeddings` (one row per item of `items`, which needs an `id` column of unique values).

        `kind`: "exact", "hnsw", or None for exact below `EXACT_BELOW` items. `hnsw`: `hnsw_settings`' arguments.
        `meta`: what else to keep in `index.json` (the model, the input)."""
        vectors = normalised(embeddings)
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} embeddings for {len(items)} items: give one embedding per item")
        kind = kind or ("exact" if len(vectors) < EXACT_BELOW else "hnsw")
        settings = hnsw_settings(**hnsw) if kind == "hnsw" else {}
        index = new_faiss_index(kind, vectors.shape[1], settings)
        meta = {**(meta or {}), "kind": kind, "width": vectors.shape[1], "settings": settings}
        built = cls(index, pd.DataFrame({"key": pd.Series([], dtype="int64")}), meta)
        built.add(vectors, items)
        return built

    def __len__(self) -> int:
        return len(self.items)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def attributes(self) -> list[str]:
        """The columns filters can name."""
        return [column for column in self.items.columns if column not in ITEM_COLUMNS]

    # -- changes -------------------------------------------------------------------------------------------------------

    def add(self, embeddings, items: pd.DataFrame) -> None:
        """Add items (a DataFrame with an `id` column; `path` and attributes optional) and their embeddings."""
        vectors = normalised(embeddings)
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} embeddings for {len(items)} items: give one embedding per item")
        if vectors.shape[1] != self.meta["width"]:
            raise ValueError(f"embeddings of width {vectors.shape[1]} for an index of width {self.meta['width']}")
        if "id" not in items.columns:
            raise ValueError(f"items need an `id` column; they have {list(items.columns)}")
        new_ids = items["id"].tolist()
        repeated = set(self.items["id"]).intersection(new_ids) if "id" in self.items else set()
        if repeated or len(set(new_ids)) != len(new_ids):
            repeated = repeated or {item for item in new_ids if new_ids.count(item) > 1}
            raise ValueError(f"item ids must be unique; already there or given twice: {sorted(repeated, key=str)[:5]}")
        first_key = int(self.items["key"].max()) + 1 if len(self.items) else 0
        keys = np.arange(first_key, first_key + len(vectors), dtype=np.int64)
        self.index.add_with_ids(vectors, keys)
        added = items.drop(columns=["key"], errors="ignore").reset_index(drop=True)
        added.insert(0, "key", keys)
        self.items = pd.concat([self.items, added], ignore_index=True) if len(self.items) else added
        self._lookup = None

    def remove(self, ids) -> int:
        """Remove the items with these ids; returns how many were there. An HNSW graph cannot drop a node, so it is
        rebuilt from the vectors it keeps."""
        removed = self.items["id"].isin(list(ids))
        keys = self.items.loc[removed, "key"].to_numpy(np.int64)
        if not len(keys):
            return 0
        if self.kind == "exact":
            self.index.remove_ids(faiss.IDSelectorBatch(keys))
        else:
            kept = self.items.loc[~removed, "key"].to_numpy(np.int64)
            vectors = self.index.reconstruct_batch(kept) if len(kept) else np.zeros((0, self.meta["width"]), "float32")
            self.index = new_faiss_index("hnsw", self.meta["width"], self.meta["settings"])
            self.index.add_with_ids(vectors, kept)
        self.items = self.items.loc[~removed].reset_index(drop=True)
        self._lookup = None
        return len(keys)

    # -- search --------------------------------------------------------------------------------------------------------

    def search(self, queries, k: int = 10, filters: dict | None = None,
               label_log_probs: list[dict[str, dict[str, float]]] | None = None,
               per_kind: int | None = PER_KIND) -> list[list[dict]]:  # fmt: skip
        """Per query embedding, the `k` most similar items that pass `filters`, best first: their `items.parquet`
        columns (but `key` and `row`) and `score`, the cosine similarity.

        `filters`: attribute -> a label or a list of labels (an item passes if it has one of them), all must hold.
        `label_log_probs`: per query, attribute -> label -> the log-probability the model gives the query photo that
        label; the nearest items are then re-ranked with them (`RERANK_ATTRIBUTES`, see `reranked`), with at most
        `per_kind` items of one kind before every kind has had its turn (None: no limit)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = normalised(queries)
        if queries.shape[1] != self.meta["width"]:
            raise ValueError(f"query embeddings of width {queries.shape[1]} for an index of width {self.meta['width']}")
        allowed = self.allowed_keys(filters)
        if allowed is not None and not len(allowed):
            return [[] for _ in queries]
        available = len(self.items) if allowed is None else len(allowed)
        k = min(k, available)
        if k == 0:
            return [[] for _ in queries]
        if label_log_probs is not None and len(label_log_probs) != len(queries):
            raise ValueError(f"{len(label_log_probs)} label_log_probs for {len(queries)} queries: give one per query")
        nearest = k if label_log_probs is None else min(max(k, RERANK_CANDIDATES), available)
        with threads_for(len(queries)):
            if allowed is None:
                scores, keys = self.index.search(queries, nearest)
            elif self.kind == "hnsw" and len(allowed) < FILTERED_EXACT_BELOW:
                scores, keys = self.exact_search_among(queries, nearest, allowed)
            else:
                scores, keys = self.index.search(queries, nearest, params=self.search_parameters(allowed, nearest))
        if label_log_probs is None:
            return [self.results(row_scores, row_keys) for row_scores, row_keys in zip(scores, keys)]
        return [self.results(*self.reranked(*row, k, per_kind)) for row in zip(scores, keys, label_log_probs)]

    def reranked(self, scores: np.ndarray, keys: np.ndarray, log_probs: dict[str, dict[str, float]], k: int,
                 per_kind: int | None = PER_KIND):  # fmt: skip
        """The `k` of these nearest items (`scores`, `keys`) to show, best first, by cosine similarity +
        `LABEL_WEIGHT` x the query's summed log-probability of each item's `RERANK_ATTRIBUTES` labels, with at most
        `per_kind` items of one combination of those labels until every kind has had its turn."""
        found = keys >= 0
        scores, keys = scores[found], keys[found]
        lookup = self.lookup()
        positions = np.fromiter((lookup.position[key] for key in keys.tolist()), dtype=np.int64, count=len(keys))
        ranked, kinds = scores.astype(np.float64), []
        for attribute in RERANK_ATTRIBUTES:
            if attribute not in lookup.codes or attribute not in log_probs:
                continue
            codes, code_of = lookup.codes[attribute]
            by_code = np.full(len(code_of) + 1, LABEL_LOG_PROB_FLOOR)  # the last entry: an item without this label
            for label, code in code_of.items():
                by_code[code] = max(log_probs[attribute].get(label, LABEL_LOG_PROB_FLOOR), LABEL_LOG_PROB_FLOOR)
            item_codes = codes[positions]
            ranked += LABEL_WEIGHT * by_code[item_codes]
            kinds.append(item_codes)
        order = np.argsort(-ranked, kind="stable").tolist()
        shown, shown_of_kind = [], Counter()
        for index in order:
            kind = tuple(int(codes[index]) for codes in kinds)
            if per_kind is None or shown_of_kind[kind] < per_kind:
                shown.append(index)
                shown_of_kind[kind] += 1
        chosen = set(shown)
        shown += [index for index in order if index not in chosen]  # only when fewer kinds than k / per_kind
        return scores[shown[:k]], keys[shown[:k]]

    def allowed_keys(self, filters: dict | None) -> np.ndarray | None:
        """The keys of the items that pass `filters`, or None without filters."""
        if not filters:
            return None
        if not isinstance(filters, dict):
            raise ValueError(f"filters must be a dict of attribute -> label(s), got {type(filters).__name__}")
        lookup = self.lookup()
        passes = np.ones(len(self.items), dtype=bool)
        for attribute, labels in filters.items():
            if attribute not in lookup.codes:
                raise ValueError(f"no attribute {attribute!r} to filter on; this index has {self.attributes}")
            labels = [labels] if isinstance(labels, str) else labels
            if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
                raise ValueError(f"filter {attribute!r}: give a label or a list of labels, got {labels!r}")
            codes, code_of = lookup.codes[attribute]
            passes &= np.isin(codes, [code_of[label] for label in labels if label in code_of])
        return lookup.keys[passes]

    def search_parameters(self, allowed: np.ndarray, k: int) -> faiss.SearchParameters:
        selector = faiss.IDSelectorBatch(allowed)
        if self.kind == "hnsw":
            ef_search = max(FILTERED_EF_FACTOR * self.meta["settings"]["ef_search"], k)
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search)
        return faiss.SearchParameters(sel=selector)

    def exact_search_among(self, queries: np.ndarray, k: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top `k` among the items `keys` only, read in place from the index's stored vectors."""
        scores = queries @ self.stored_vectors()[self.lookup().stored_at[keys]].T
        best = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(keys) else np.argsort(-scores, axis=1)
        best = np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1), axis=1)
        return np.take_along_axis(scores, best, axis=1), keys[best]

    def stored_vectors(self) -> np.ndarray:
        """`(items, width)`: the index's own vectors in its internal order, without a copy (valid until a change)."""
        inner = faiss.downcast_index(self.index.index)
        flat = inner if isinstance(inner, faiss.IndexFlat) else faiss.downcast_index(inner.storage)
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)

    def results(self, scores: np.ndarray, keys: np.ndarray) -> list[dict]:
        lookup = self.lookup()
        found = [(score, key) for score, key in zip(scores.tolist(), keys.tolist()) if key >= 0]  # faiss pads with -1
        return [{**lookup.records[lookup.position[key]], "score": float(score)} for score, key in found]

    def lookup(self) -> "ItemLookup":
        """The items as a search reads them (a pandas lookup per query cost more than the search itself)."""
        if self._lookup is None:
            self._lookup = ItemLookup.of(self.items, self.attributes, faiss.vector_to_array(self.index.id_map))
        return self._lookup

    # -- files ---------------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write `index.faiss`, `items.parquet` and `index.json` to `folder` (each replaced whole)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in (
            (INDEX_FILE, lambda path: faiss.write_index(self.index, str(path))),
            (ITEMS_FILE, lambda path: self.items.to_parquet(path, index=False)),
            (META_FILE, lambda path: path.write_text(json.dumps(self.meta, indent=2, default=str) + "\n")),
        ):
            temporary = folder / f".{name}.tmp"
            write(temporary)
            os.replace(temporary, folder / name)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SimilarityIndex":
        folder = Path(folder)
        missing = [name for name in (INDEX_FILE, ITEMS_FILE, META_FILE) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a similarity index: it lacks {missing} (build one with "
                                    "`fashion-hf index CATALOGUE --output FOLDER`)")  # fmt: skip
        meta = json.loads((folder / META_FILE).read_text())
        index = faiss.read_index(str(folder / INDEX_FILE))
        items = pd.read_parquet(folder / ITEMS_FILE)
        if index.ntotal != len(items):
            raise ValueError(f"{folder}: {INDEX_FILE} holds {index.ntotal} vectors, {ITEMS_FILE} {len(items)} items")
        if meta["kind"] == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = meta["settings"]["ef_search"]
        return cls(index, items, meta)


# ---------------------------------------------------------------------------------------------------------------------
# Building from a catalogue: `fashion-hf tag --embeddings`, then its rows.
# ---------------------------------------------------------------------------------------------------------------------


def embedding_fingerprint(model, processor) -> str:
    """`tag.model_fingerprint` but for the processor's decoding limits, which refuse inputs and leave the embeddings
    of the others as they are (the app sets its own)."""
    unlimited = copy.copy(processor)
    unlimited.max_image_pixels = unlimited.max_file_bytes = None
    return model_fingerprint(model, unlimited)


def is_tag_output(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_tag_output(folder: str | Path) -> tuple[pd.DataFrame, dict]:
    """The rows and manifest of a finished `fashion-hf tag --embeddings` run in parquet."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    output = manifest["output"]
    if not output.get("embeddings") or output.get("format") != "parquet":
        raise ValueError(f"{folder} is a `fashion-hf tag` output without embeddings in parquet: tag the catalogue "
                         "again with `--embeddings --format parquet`, or index the catalogue itself")  # fmt: skip
    if not manifest.get("complete"):
        raise ValueError(f"{folder} holds {manifest.get('rows')} of {manifest['input']['rows']} rows: finish that "
                         "`fashion-hf tag` run first (run it again: it continues)")  # fmt: skip
    return pd.read_parquet(folder), manifest


def catalogue_labels(description: dict, attributes: list[str]) -> pd.DataFrame | None:
    """The input's own attribute columns (those it has), in row order, or None where it has none or is gone."""
    source = description["source"]
    if not Path(source).exists():
        return None
    dataset, _ = load_input_dataset(source, description["split"])
    present = [name for name in attributes if name in dataset.column_names]
    if not present or len(dataset) != description["rows"]:
        return None
    return dataset.select_columns(present).to_pandas()


def catalogue_items(rows: pd.DataFrame, manifest: dict) -> tuple[np.ndarray, pd.DataFrame]:
    """The embeddings and item columns of a tag output's readable rows: `id`, `path`, `row`, and per attribute the
    catalogue's label where it has one, else the prediction."""
    attributes = [column[: -len("_score")] for column in rows.columns if column.endswith("_score")
                  and column[: -len("_score")] in rows.columns and column != "out_of_distribution_score"]  # fmt: skip
    items = rows[["id", "path"]].assign(row=np.arange(len(rows)))
    items = pd.concat([items, rows[attributes]], axis=1)
    labels = catalogue_labels(manifest["input"], attributes)
    if labels is not None:
        for name in labels.columns:
            items[name] = labels[name].where(labels[name].notna(), items[name])
    readable = rows["error"].isna().to_numpy()
    embeddings = np.stack(rows.loc[readable, "embedding"].to_numpy()) if readable.any() else None
    return embeddings, items.loc[readable].reset_index(drop=True)


def build_index(
    catalogue: str,
    output: str | Path,
    model_name: str = DEFAULT_MODEL,
    split: str = "train",
    image_column: str = "image",
    id_column: str | None = None,
    kind: str | None = None,
    settings: TagSettings = TagSettings(),
    progress: bool = True,
) -> SimilarityIndex:
    """Index `catalogue` (any `fashion-hf tag` input, or a finished `fashion-hf tag --embeddings` output) into
    `output`; see the module's docstring."""
    output = Path(output)
    if is_tag_output(catalogue):
        rows, manifest = read_tag_output(catalogue)
        model_name = manifest["model"]["name"] or model_name
        model, processor = AutoModel.from_pretrained(model_name).eval(), AutoImageProcessor.from_pretrained(model_name)
        if model_fingerprint(model, processor) != manifest["model"]["sha256"]:
            raise ValueError(f"{catalogue} was tagged by another model than the one at {model_name} now: tag the "
                             "catalogue again, or index it directly")  # fmt: skip
    else:
        model, processor = AutoModel.from_pretrained(model_name).eval(), AutoImageProcessor.from_pretrained(model_name)
        images = load_image_rows(catalogue, split, image_column, id_column)
        settings = TagSettings(**{**settings.__dict__, "embeddings": True, "top_k": 1})
        tag(images, FoldedTagger(model), processor, output / TAGS_FOLDER, settings, model_name=model_name, progress=progress)
        rows, manifest = read_tag_output(output / TAGS_FOLDER)
    embeddings, items = catalogue_items(rows, manifest)
    if embeddings is None:
        raise ValueError(f"{catalogue}: no image could be read, so there is nothing to index")
    model_meta = {"name": model_name, "sha256": embedding_fingerprint(model, processor)}
    meta = {"model": model_meta, "input": manifest["input"], "unreadable": int(len(rows) - len(items))}
    index = SimilarityIndex.build(embeddings, items, kind=kind, meta=meta)
    index.save(output)
    return index


def index_in_memory(images: ImageRows, model, processor, model_name: str | None = None,
                    batch_size: int = 16) -> SimilarityIndex:  # fmt: skip
    """A small catalogue indexed in this process with nothing written (the app's example catalogue): the rows
    `fashion-hf tag --embeddings` would write, then the same index `build_index` would make of them."""
    settings = TagSettings(top_k=1, embeddings=True, batch_size=batch_size, num_workers=0)
    rows = [{"id": images.ids[row], "path": images.paths[row], **columns}
            for batch in tag_locally(model.eval(), processor, images, range(len(images)), settings)
            for row, columns in batch]  # fmt: skip
    embeddings, items = catalogue_items(pd.DataFrame(rows), {"input": images.description})
    if embeddings is None:
        raise ValueError(f"{images.description['source']}: no image could be read, so there is nothing to index")
    model_meta = {"name": model_name, "sha256": embedding_fingerprint(model, processor)}
    meta = {"model": model_meta, "input": images.description, "unreadable": len(rows) - len(items)}
    return SimilarityIndex.build(embeddings, items, meta=meta)


# ---------------------------------------------------------------------------------------------------------------------
# Search by photo: the model embeds the query as it embedded the catalogue.
# ---------------------------------------------------------------------------------------------------------------------


class SimilarItems:
    """An index and the model that embeds queries for it.

    ```python
    finder = SimilarItems.load("indexes/products")        # the model named in the index, checked by fingerprint
    finder("photo.jpg", k=10, filters={"gender": "Men"})  # a path, bytes, a PIL image or a numpy array
    ```
    """

    def __init__(self, index: SimilarityIndex, model, processor):
        # Queries encoded as the catalogue was (`fashion-hf tag`'s runtimes): a bare model gets its batch norms folded.
        self.index, self.processor = index, processor
        self.model = FoldedTagger(model) if isinstance(model, PreTrainedModel) else model
        self._images = None  # the catalogue's images, opened when an item's image is first asked for

    @classmethod
    def load(cls, index_folder: str | Path, model=None, processor=None) -> "SimilarItems":
        """`model`: a loaded model (its processor with it) or a folder / Hub id; None: the one the index names."""
        index = SimilarityIndex.load(index_folder)
        if model is None or isinstance(model, (str, Path)):
            name = str(model or index.meta["model"]["name"] or DEFAULT_MODEL)
            model, processor = AutoModel.from_pretrained(name).eval(), AutoImageProcessor.from_pretrained(name)
        expected = index.meta.get("model", {}).get("sha256")
        if expected and embedding_fingerprint(model, processor) != expected:
            raise ValueError(f"{index_folder} was built with another model ({index.meta['model']['name']}, sha256 "
                             f"{expected[:12]}...): its embeddings and this model's are not comparable; rebuild it "
                             "with `fashion-hf index ... --model` of this model")  # fmt: skip
        return cls(index, model, processor)

    @classmethod
    def of_catalogue(cls, catalogue: str | Path, model, processor, model_name: str | None = None) -> "SimilarItems":
        """A small catalogue (an image folder or table) indexed in memory, searched with this model."""
        return cls(index_in_memory(load_image_rows(str(catalogue)), model, processor, model_name), model, processor)

    @torch.inference_mode()
    def embed(self, images: list) -> tuple[np.ndarray, list[dict[str, dict[str, float]]]]:
        """`(len(images), width)` embeddings of any inputs the image processor reads, encoded the right way up where
        a photo looks turned (as the pipeline tags it), and per image what the model says of it: attribute -> label
        -> log-probability (for `SimilarityIndex.search` to re-rank with)."""
        images = [self.processor.load_image(image) for image in images]
        pixel_values = self.processor(images, return_tensors="pt")["pixel_values"].to(self.model.device, self.model.dtype)
        image_embeds, _, _ = encode_upright(self.model, self.processor, images, pixel_values)
        log_probs = {
            name: logits.float().log_softmax(-1).cpu().numpy()
            for name, logits in self.model(image_embeds=image_embeds).attribute_logits.items()
            if name in RERANK_ATTRIBUTES
        }
        labels = self.model.config.attributes
        per_image = [
            {name: dict(zip(labels[name], values[row].tolist())) for name, values in log_probs.items()}
            for row in range(len(images))
        ]
        return image_embeddings(self.model, image_embeds).float().cpu().numpy(), per_image

    def __call__(self, image, k: int = 10, filters: dict | None = None, per_kind: int | None = PER_KIND) -> list[dict]:
        embeddings, label_log_probs = self.embed([image])
        return self.index.search(embeddings, k, filters, label_log_probs, per_kind)[0]

    def image_input(self, item: dict) -> str | bytes:
        """An item's image as `load_rgb_image` reads it (a path or the encoded bytes), from the indexed input."""
        if self._images is None:
            description = self.index.meta["input"]
            self._images = load_image_rows(description["source"], description["split"],
                                           description["image_column"], description["id_column"])  # fmt: skip
        row = self.index.items.loc[self.index.items["id"] == item["id"], "row"]
        if row.empty:
            raise KeyError(f"no item with id {item['id']!r} in this index")
        return self._images.cells.image_input(int(row.iloc[0]))


@functools.lru_cache(maxsize=2)
def load_similar_items(index_folder: str, model: str | None = None) -> SimilarItems:
    """`SimilarItems.load`, once per index and model in this process."""
    return SimilarItems.load(index_folder, model)


def similar(image, k: int = 10, filters: dict | None = None, index: str | None = None, model: str | None = None,
            per_kind: int | None = PER_KIND):  # fmt: skip
    """The `k` catalogue items most like `image` that pass `filters` (see `SimilarityIndex.search`: at most
    `per_kind` of one articleType, colour and gender before the next kinds; None: the most alike, whatever their
    kind), from `index` (default: the folder in $FASHION_SIMILAR_INDEX); the model and index are loaded once per
    process."""
    index = index or os.environ.get(INDEX_ENV)
    if not index:
        raise ValueError(f"name an index folder: similar(..., index=FOLDER), or set {INDEX_ENV}")
    return load_similar_items(str(index), model)(image, k, filters, per_kind)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fashion-hf index",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("catalogue", help="any `fashion-hf tag` input, or a `fashion-hf tag --embeddings` output")
    parser.add_argument("--output", required=True, help="the index folder")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a model folder or Hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--split", default="train", help="the split of a dataset folder or Hub dataset (default train)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--id-column", default=None, help="default: `id` where the input has one, else the row number")
    parser.add_argument("--kind", choices=KINDS, default=None,
                        help=f"default: exact below {EXACT_BELOW:,} items, else hnsw")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="decoding processes (as `fashion-hf tag`)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> SimilarityIndex:
    args = parse_args(argv)
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    settings = TagSettings(batch_size=args.batch_size, num_workers=workers)
    index = build_index(args.catalogue, args.output, args.model, args.split, args.image_column, args.id_column,
                        args.kind, settings, progress=not args.no_progress)  # fmt: skip
    print(f"{len(index)} items in {args.output} ({index.kind} index, {index.meta['unreadable']} unreadable)")
    return index


if __name__ == "__main__":
    main()
