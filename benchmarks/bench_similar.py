"""Similar items, measured: retrieval quality of the model's embeddings and the speed and recall of the index.

    python benchmarks/bench_similar.py embed                 # embed the photos once, into --cache (resumable)
    python benchmarks/bench_similar.py evaluate              # the figures, from the cache
    python benchmarks/bench_similar.py evaluate --projection # also train and score a retrieval projection head

Queries and catalogue: the validation split of Fashion Product Images against its train split; an item is relevant
to a query when it has the same articleType, baseColour and gender. Phone photos (clothing-user-photos validation)
against the same catalogue: relevant is the same subCategory, and the same articleType too where the photo's mapped
label is specific (every label but "Shoes", which the data's README says to judge at subCategory).

- Recall@k: the share of queries with at least one relevant item in their top k (as in the In-shop retrieval
  benchmark); mAP@10: the mean over queries of average precision in the top 10, normalised by min(10, relevant).
- Product queries are scored twice: all of them, and those whose image bytes appear nowhere in train (the validation
  split holds byte copies of training photos, each of which finds itself). The second is the honest figure.
- The index: exact search (faiss IndexFlatIP) against HNSW over the full catalogue: recall of HNSW's top 10 against
  the exact top 10, and milliseconds per query one query at a time, on `--threads` threads, interleaved rounds.

`embed` writes per set `<name>-labels.parquet` (its rows in the order embedded) and `<name>-chunk-NNNN.npy` (512
embeddings each) under `--cache` (default /tmp/similar-cache); a killed run continues from the last chunk. Train is
embedded in a seeded random order, so `evaluate` run before it finishes scores a random sample of the catalogue (its
output says how many items).
"""

import argparse
import functools
import json
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_utils import PRODUCT_IMAGES  # noqa: E402  (sets HF_HUB_OFFLINE first; benchmarks/ is the script's folder)

import datasets  # noqa: E402
import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor, AutoModel  # noqa: E402

from fashion_hf.data import data_dir, image_sha256s  # noqa: E402
from fashion_hf import similar  # noqa: E402
from fashion_hf.runtime import keep_freed_memory  # noqa: E402
from fashion_hf.similar import FILTERED_EXACT_BELOW, RERANK_ATTRIBUTES, SimilarityIndex, normalised  # noqa: E402
from fashion_hf.tag import DecodedImages, collate_decoded, image_embeddings, load_image_rows  # noqa: E402

PHONE_PHOTOS = data_dir() / "clothing-user-photos"
PRODUCT_KEY = ("articleType", "baseColour", "gender")
SETS = {  # name: (dataset folder, split, label columns)
    "product-validation": (PRODUCT_IMAGES, "validation", ["id", *PRODUCT_KEY, "subCategory"]),
    "phone-validation": (PHONE_PHOTOS, "validation", ["label", "articleType", "subCategory"]),
    "product-train": (PRODUCT_IMAGES, "train", ["id", *PRODUCT_KEY, "subCategory"]),
}
CHUNK = 512


# ---------------------------------------------------------------------------------------------------------------------
# embed: the model's embeddings (`SimilarItems.embed`, `fashion-hf index`) of each set, cached
# ---------------------------------------------------------------------------------------------------------------------


def set_labels(name: str) -> pd.DataFrame:
    """The rows of a set in the order they are embedded, with their labels and image digests: the validation sets in
    order, train in a seeded random order, so that its first N embedded rows are a random sample of it."""
    folder, split, label_columns = SETS[name]
    table = datasets.load_dataset(str(folder), split=split)
    labels = table.select_columns(label_columns).to_pandas()
    labels["row"] = np.arange(len(labels))
    labels["image_sha256"] = image_sha256s(table)
    if name.endswith("train"):
        labels = labels.iloc[np.random.default_rng(0).permutation(len(labels))].reset_index(drop=True)
    return labels


@torch.inference_mode()
def embed_set(name: str, model, processor, cache: Path, batch_size: int) -> None:
    """Embed a set chunk by chunk into `<name>-chunk-NNNN.npy`, continuing after the chunks already there."""
    folder, split, _ = SETS[name]
    labels_path = cache / f"{name}-labels.parquet"
    if not labels_path.is_file():
        set_labels(name).to_parquet(labels_path, index=False)
    rows = pd.read_parquet(labels_path)["row"].to_numpy()
    images = load_image_rows(str(folder), split)
    chunk = len(list(cache.glob(f"{name}-chunk-*.npy")))
    started, count = time.perf_counter(), 0
    for chunk_start in range(chunk * CHUNK, len(rows), CHUNK):
        chunk_rows = rows[chunk_start : chunk_start + CHUNK].tolist()
        loader = torch.utils.data.DataLoader(DecodedImages(images.cells, chunk_rows, processor), batch_size=batch_size,
                                             num_workers=1, collate_fn=collate_decoded)  # fmt: skip
        vectors, label_log_probs = [], {name: [] for name in RERANK_ATTRIBUTES}
        for _, pixels, errors in loader:
            if errors:
                raise RuntimeError(f"{name}: unreadable images {errors}")
            image_embeds = model.encode_images(processor.normalize_pixels(pixels))
            vectors.append(image_embeddings(model, image_embeds).float().numpy())
            if is_query_set(name):  # what the model says of the photo, for `SimilarityIndex.search` to re-rank with
                for attribute, logits in model(image_embeds=image_embeds).attribute_logits.items():
                    if attribute in label_log_probs:
                        label_log_probs[attribute].append(logits.float().log_softmax(-1).numpy())
        if is_query_set(name):
            labels = {f"labels:{attribute}": np.asarray(model.config.attributes[attribute]) for attribute in label_log_probs}
            np.savez(cache / f"{name}-labelprobs-{chunk:04d}.npz",
                     **{attribute: np.concatenate(values) for attribute, values in label_log_probs.items()}, **labels)
        np.save(cache / f"{name}-chunk-{chunk:04d}.npy", np.concatenate(vectors))
        chunk += 1
        count += len(chunk_rows)
        print(f"{name}: {chunk_start + len(chunk_rows)}/{len(rows)} "
              f"({count / (time.perf_counter() - started):.1f} img/s)", flush=True)  # fmt: skip


def is_query_set(name: str) -> bool:
    return not name.endswith("train")


def cached_label_log_probs(name: str, cache: Path) -> list[dict[str, dict[str, float]]]:
    """Per query photo of a set, attribute -> label -> log-probability, as `SimilarItems.embed` gives them."""
    chunks = sorted(cache.glob(f"{name}-labelprobs-*.npz"))
    if not chunks:
        raise SystemExit(f"no label probabilities of {name} in {cache}: delete its chunks and run `embed` again")
    arrays = [np.load(chunk) for chunk in chunks]
    attributes = [key for key in arrays[0].files if not key.startswith("labels:")]
    labels = {attribute: arrays[0][f"labels:{attribute}"].tolist() for attribute in attributes}
    values = {attribute: np.concatenate([array[attribute] for array in arrays]) for attribute in attributes}
    return [{attribute: dict(zip(labels[attribute], values[attribute][row].tolist())) for attribute in attributes}
            for row in range(len(values[attributes[0]]))]  # fmt: skip


def cached_set(name: str, cache: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """A set's embeddings so far and the labels of those rows."""
    chunks = sorted(cache.glob(f"{name}-chunk-*.npy"))
    if not chunks:
        raise SystemExit(f"no embeddings of {name} in {cache}: run `python benchmarks/bench_similar.py embed` first")
    embeddings = np.concatenate([np.load(chunk) for chunk in chunks])
    labels = pd.read_parquet(cache / f"{name}-labels.parquet").iloc[: len(embeddings)].reset_index(drop=True)
    return embeddings, labels


def embed(args) -> None:
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    for name in SETS:
        embed_set(name, model, processor, args.cache, args.batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# evaluate: retrieval quality, then the index's recall and speed
# ---------------------------------------------------------------------------------------------------------------------


def exact_top(catalogue: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(catalogue.shape[1])
    index.add(normalised(catalogue))
    return index.search(normalised(queries), k)[1]


def joint_keys(labels: pd.DataFrame, columns) -> np.ndarray:
    """One string per row of its labels in `columns` (a missing label is a value of its own, "?")."""
    parts = [labels[column].fillna("?").astype(str) for column in columns]
    return functools.reduce(lambda joined, part: joined + "|" + part, parts).to_numpy()


def retrieval_scores(relevant: np.ndarray, relevant_counts: np.ndarray) -> dict:
    """`relevant`: `(queries, 10)` booleans, is the item at each rank relevant; `relevant_counts`: how many relevant
    items each query has in the whole catalogue."""
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at = np.cumsum(relevant, axis=1) / ranks
    average_precision = (precision_at * relevant).sum(1) / np.maximum(np.minimum(relevant_counts, 10), 1)
    return {"queries": len(relevant), "recall@1": relevant[:, 0].mean(), "recall@10": relevant.any(1).mean(),
            "map@10": average_precision.mean()}  # fmt: skip


def reranked_top(catalogue, catalogue_labels, queries, label_log_probs, per_kind) -> np.ndarray:
    """`(queries, 10)` catalogue rows as `SimilarItems` shows them: the nearest re-ranked with what the model says of
    each query photo (`SimilarityIndex.search` with `label_log_probs`), on an exact index."""
    items = catalogue_labels[list(RERANK_ATTRIBUTES)].assign(id=np.arange(len(catalogue_labels)))
    index = SimilarityIndex.build(catalogue, items, kind="exact")
    found = [index.search(queries[row : row + 1], 10, None, [label_log_probs[row]], per_kind)[0]
             for row in range(len(queries))]  # fmt: skip
    return np.asarray([[item["id"] for item in items] for items in found])


def product_retrieval(catalogue_labels, top, query_labels, train_digests: set) -> dict[str, dict]:
    """Recall@1, Recall@10 and mAP@10 of product queries (same articleType, baseColour and gender is relevant) from
    their top 10 catalogue rows, all and those without a byte copy in the catalogue's split."""
    catalogue_keys, query_keys = joint_keys(catalogue_labels, PRODUCT_KEY), joint_keys(query_labels, PRODUCT_KEY)
    relevant = catalogue_keys[top] == query_keys[:, None]
    counts = pd.Series(catalogue_keys).value_counts()
    relevant_counts = np.asarray([counts.get(key, 0) for key in query_keys])
    copies = query_labels["image_sha256"].isin(train_digests).to_numpy()
    return {
        "all validation queries": retrieval_scores(relevant, relevant_counts),
        "without a byte copy in train": retrieval_scores(relevant[~copies], relevant_counts[~copies]),
    }


def phone_retrieval(catalogue_labels, top, query_labels) -> dict[str, float]:
    """Recall@10 of phone photos from their top 10 catalogue rows: the same subCategory; and the same articleType too
    where the label is specific."""
    same_sub = catalogue_labels["subCategory"].to_numpy()[top] == query_labels["subCategory"].to_numpy()[:, None]
    same_article = catalogue_labels["articleType"].to_numpy()[top] == query_labels["articleType"].to_numpy()[:, None]
    specific = (query_labels["label"] != "Shoes").to_numpy()[:, None]
    article_level = same_sub & (same_article | ~specific)
    return {"queries": len(top), "recall@10 subCategory": same_sub.any(1).mean(),
            "recall@1 subCategory": same_sub[:, 0].mean(), "recall@10 articleType (specific labels)":
            article_level.any(1).mean()}  # fmt: skip


def kind_ceiling(catalogue_labels, query_labels, label_log_probs, ks=(1, 5, 10)) -> dict[str, float]:
    """What re-ranking by the photo's labels can reach: the share of queries whose own kind (articleType, baseColour,
    gender) is among the `k` catalogue kinds the model finds most probable (summed log-probabilities, as
    `SimilarityIndex.search` scores them). With one item per kind first, Recall@1 is at most the k=1 share, and
    Recall@10 at most the share at k = 10 / per_kind."""
    kinds = catalogue_labels[list(PRODUCT_KEY)].drop_duplicates()
    known = {attribute: list(label_log_probs[0][attribute]) for attribute in PRODUCT_KEY}
    kinds = kinds[np.logical_and.reduce([kinds[a].isin(known[a]).to_numpy() for a in PRODUCT_KEY])]
    scores = np.zeros((len(label_log_probs), len(kinds)))
    for attribute, names in known.items():
        values = np.asarray([[photo[attribute][name] for name in names] for photo in label_log_probs])
        scores += values[:, kinds[attribute].map({name: column for column, name in enumerate(names)}).to_numpy()]
    column_of_kind = {key: column for column, key in enumerate(joint_keys(kinds, PRODUCT_KEY))}
    own = [column_of_kind.get(key) for key in joint_keys(query_labels, PRODUCT_KEY)]
    own_scores = np.asarray([-np.inf if column is None else scores[row, column] for row, column in enumerate(own)])
    rank = (scores > own_scores[:, None]).sum(1)  # kinds the model ranks above the photo's own
    return {f"own kind in the top {k}": float((rank < k).mean()) for k in ks}


def per_query_ms(index, queries: np.ndarray, k: int = 10) -> float:
    """Median milliseconds of one search of one query, as a user's request makes it."""
    times = []
    for query in queries:
        started = time.perf_counter()
        with similar.threads_for(1):  # as `SimilarityIndex.search` runs one query
            index.search(query[None], k)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def index_speed(catalogue: np.ndarray, queries: np.ndarray, sizes, ef_searches, rounds: int) -> list[dict]:
    """Per catalogue size: exact search against HNSW at each efSearch, in interleaved rounds of one-query searches;
    HNSW's top 10 against the exact top 10 (recall@10 against exact)."""
    rows = []
    for size in sizes:
        vectors = normalised(catalogue[:size])
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors)
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(vectors.shape[1], similar.HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = similar.HNSW_EF_CONSTRUCTION
        hnsw.add(vectors)
        build_seconds = time.perf_counter() - started
        unit_queries = normalised(queries)
        truth = exact.search(unit_queries, 10)[1]
        timings = {"exact": [], **{ef: [] for ef in ef_searches}}
        for round_index in range(rounds + 1):  # round 0 warms up
            order = list(timings) if round_index % 2 else list(timings)[::-1]
            for variant in order:
                if variant != "exact":
                    hnsw.hnsw.efSearch = variant
                ms = per_query_ms(exact if variant == "exact" else hnsw, unit_queries[:200])
                if round_index:
                    timings[variant].append(ms)
        for ef in ef_searches:
            hnsw.hnsw.efSearch = ef
            found = hnsw.search(unit_queries, 10)[1]
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            rows.append({"items": size, "efSearch": ef, "recall@10 vs exact": recall,
                         "hnsw ms/query": np.median(timings[ef]), "exact ms/query": np.median(timings["exact"]),
                         "build s": build_seconds})  # fmt: skip
    return rows


def filtered_search(catalogue: np.ndarray, labels: pd.DataFrame, queries, query_labels, rounds: int) -> list[dict]:
    """Filters on the full catalogue as `SimilarityIndex` runs them on HNSW: through faiss's IDSelector inside the
    graph search, or exact among the items that pass; each against the exact filtered top 10."""
    items = labels.assign(id=np.arange(len(labels)), path=None)[["id", "path", "gender", "articleType"]]
    index = SimilarityIndex.build(catalogue, items, kind="hnsw")
    reference = SimilarityIndex.build(catalogue, items, kind="exact")
    rows = []
    for attribute in ("gender", "articleType"):
        filters = [{attribute: value} for value in query_labels[attribute].iloc[:100]]
        truth = [[item["id"] for item in reference.search(query[None], 10, f)[0]] for query, f in zip(queries, filters)]
        passing = np.mean([labels[attribute].isin([f[attribute]]).mean() for f in filters])
        for strategy, threshold in (("selector in the graph", 0), ("exact among passing", len(labels) + 1)):
            similar.FILTERED_EXACT_BELOW = threshold
            times, recalls = [], []
            for _ in range(rounds):
                for query, f, expected in zip(queries, filters, truth):
                    started = time.perf_counter()
                    found = [item["id"] for item in index.search(query[None], 10, f)[0]]
                    times.append(time.perf_counter() - started)
                    recalls.append(len(set(found) & set(expected)) / max(len(expected), 1))
            rows.append({"filter": attribute, "items passing (mean share)": passing, "strategy": strategy,
                         "recall@10 vs exact": np.mean(recalls), "ms/query": 1000 * np.median(times)})  # fmt: skip
    similar.FILTERED_EXACT_BELOW = FILTERED_EXACT_BELOW
    return rows


def train_projection(embeddings: np.ndarray, labels: pd.DataFrame, width: int, epochs: int, seed: int = 0):
    """A linear projection trained for retrieval on the catalogue's cached embeddings: normalised-softmax
    classifiers (cosine logits at temperature 0.05, one learned proxy per class) over the joint (articleType,
    baseColour, gender) label and over each of the three, their losses summed (the joint label alone has many
    classes with few items). Returns the projection as a function of embeddings."""
    torch.manual_seed(seed)
    inputs = torch.from_numpy(normalised(embeddings))
    label_sets = [PRODUCT_KEY, *((column,) for column in PRODUCT_KEY)]
    targets, proxies = [], []
    for columns in label_sets:
        classes, classes_of_items = np.unique(joint_keys(labels, columns), return_inverse=True)
        targets.append(torch.from_numpy(classes_of_items))
        proxies.append(torch.nn.Parameter(torch.randn(len(classes), width) * 0.01))
    projection = torch.nn.Linear(inputs.shape[1], width)
    optimizer = torch.optim.AdamW([*projection.parameters(), *proxies], lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs)).split(512):
            projected = torch.nn.functional.normalize(projection(inputs[batch]), dim=-1)
            loss = sum(
                torch.nn.functional.cross_entropy(projected @ torch.nn.functional.normalize(proxy, dim=-1).T / 0.05,
                                                  target[batch])  # fmt: skip
                for proxy, target in zip(proxies, targets)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def project(vectors: np.ndarray) -> np.ndarray:
        return projection(torch.from_numpy(normalised(vectors))).numpy()

    return project


def markdown_table(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[name]) for name in header) + " |" for row in rows])


def quality_rows(embedding: str, catalogue_labels, top, query_labels, train_digests) -> list[dict]:
    rows = []
    for queries_name, scores in product_retrieval(catalogue_labels, top, query_labels, train_digests).items():
        recall_1, recall_10 = scores["recall@1"], scores["recall@10"]
        rows.append({"embedding": embedding, "queries": f"{queries_name} ({scores['queries']:,})",
                     "Recall@1": recall_1, "Recall@10": recall_10, "mAP@10": scores["map@10"],
                     "target R@1 >= 0.80, R@10 >= 0.95": "PASS" if recall_1 >= 0.8 and recall_10 >= 0.95 else "MISS"})
    return rows  # fmt: skip


def evaluate(args) -> None:
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(1)  # the projection's small matrices: a second thread only waits on a busy machine
    catalogue, catalogue_labels = cached_set("product-train", args.cache)
    all_train = pd.read_parquet(args.cache / "product-train-labels.parquet")
    train_digests = set(all_train["image_sha256"])  # the whole split's, sampled catalogue or not
    sets = {name: cached_set(name, args.cache) for name in ("product-validation", "phone-validation")}
    print(f"catalogue: {len(catalogue):,} of {len(all_train):,} train items (a seeded random sample where fewer), "
          f"embedding width {catalogue.shape[1]}, {args.threads} threads\n")  # fmt: skip

    nearest = {name: exact_top(catalogue, vectors, 10) for name, (vectors, _) in sets.items()}
    rows = quality_rows("pooled features (`tag.image_embeddings`)", catalogue_labels, nearest["product-validation"],
                        sets["product-validation"][1], train_digests)  # fmt: skip
    phone = [{"embedding": "pooled features (`tag.image_embeddings`)",
              **phone_retrieval(catalogue_labels, nearest["phone-validation"], sets["phone-validation"][1])}]  # fmt: skip
    label_log_probs = {name: cached_label_log_probs(name, args.cache) for name in sets}
    for per_kind, name in ((similar.PER_KIND, f"re-ranked with the photo's labels, at most {similar.PER_KIND} of a kind "
                                              "(shipped: `SimilarItems`)"),
                           (None, "re-ranked with the photo's labels, any number of a kind (`per_kind=None`)")):  # fmt: skip
        started = time.perf_counter()
        reranked = {key: reranked_top(catalogue, catalogue_labels, vectors, label_log_probs[key], per_kind)
                    for key, (vectors, _) in sets.items()}  # fmt: skip
        print(f"{name}: {sum(map(len, reranked.values())):,} queries in {time.perf_counter() - started:.0f} s")
        rows += quality_rows(name, catalogue_labels, reranked["product-validation"], sets["product-validation"][1],
                             train_digests)  # fmt: skip
        phone.append({"embedding": name, **phone_retrieval(catalogue_labels, reranked["phone-validation"],
                                                             sets["phone-validation"][1])})  # fmt: skip
    honest = ~sets["product-validation"][1]["image_sha256"].isin(train_digests).to_numpy()
    ceiling = kind_ceiling(catalogue_labels, sets["product-validation"][1][honest],
                           [probs for probs, keep in zip(label_log_probs["product-validation"], honest) if keep])  # fmt: skip
    if args.projection:
        started = time.perf_counter()
        project = train_projection(catalogue, catalogue_labels, args.projection_width, args.projection_epochs)
        name = f"projection head ({args.projection_width}, {args.projection_epochs} epochs, trained on the catalogue)"
        print(f"projection head trained in {time.perf_counter() - started:.0f} s")
        projected = {key: (project(vectors), labels) for key, (vectors, labels) in sets.items()}
        projected_top = {key: exact_top(project(catalogue), vectors, 10) for key, (vectors, _) in projected.items()}
        rows += quality_rows(name, catalogue_labels, projected_top["product-validation"],
                             sets["product-validation"][1], train_digests)  # fmt: skip
        phone.append({"embedding": name, **phone_retrieval(catalogue_labels, projected_top["phone-validation"],
                                                             sets["phone-validation"][1])})  # fmt: skip
    if args.json:  # the model card's "Similar items" section (`fashion-hf model-card` reads MODEL/retrieval.json)
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": str(args.model),
            "catalogue_items": len(catalogue), "product_queries": int(len(sets["product-validation"][1]) -
            sets["product-validation"][1]["image_sha256"].isin(train_digests).sum()),
            "phone_queries": len(sets["phone-validation"][1]), "product": rows, "phone": phone,
            "label_ceiling": ceiling,
        }, indent=2, default=float) + "\n")  # fmt: skip
    print("Product photo -> catalogue (relevant: same articleType, baseColour and gender)\n")
    print(markdown_table(rows) + "\n")
    print("What re-ranking by the photo's labels can reach (product queries without a byte copy in train)\n")
    print(markdown_table([ceiling]) + "\n")
    print("Phone photo -> catalogue (target Recall@10 subCategory >= 0.90)\n")
    print(markdown_table(phone) + "\n")

    queries = sets["product-validation"][0]
    sizes = sorted({size for size in (2_500, 5_000, 10_000, 20_000) if size < len(catalogue)} | {len(catalogue)})
    print("Index: HNSW against exact search, one query at a time (target at the full catalogue: recall@10 vs exact "
          ">= 0.99 under 2 ms)\n")  # fmt: skip
    print(markdown_table(index_speed(catalogue, queries, sizes, args.ef_search, args.rounds)) + "\n")
    print("Filters on the HNSW index of the full catalogue (100 queries, each filtered on its own label)\n")
    print(markdown_table(filtered_search(catalogue, catalogue_labels, queries, sets["product-validation"][1],
                                         args.rounds)))  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["embed", "evaluate"])
    parser.add_argument("--model", default="models/fashion-tagger")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/similar-cache"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--projection", action="store_true", help="also train and score a projection head")
    parser.add_argument("--projection-width", type=int, default=256)
    parser.add_argument("--projection-epochs", type=int, default=10)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128], help="HNSW efSearch values")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--json", type=Path, default=None, help="also write the retrieval figures here (retrieval.json)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.stage == "embed":
        embed(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
