"""Evaluation metrics of the fashion tagger: per-attribute classification scores and tag-set precision/recall/F1.

Pure functions on plain Python and numpy values, built on scikit-learn. Missing labels (`None` or `-100`) are left
out of every score, never counted as a class.

    attribute_metrics([0, 1, None], np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]), ["Men", "Women"])
    # -> {"top1": 1.0, "top5": 1.0, "macro_f1": 1.0, "support": 2}
    tag_set_metrics([{"gender:Men", "detail:denim"}], [{"gender:Men"}])["overall"]
    # -> {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 1, "predicted": 2}
"""

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

from .configuration_fashion_tagger import IGNORE_INDEX  # the model's marker of a missing label

TOP_K = 5
CALIBRATION_BINS = 15


def label_indices(y_true) -> np.ndarray:
    """`y_true` as an int array with `IGNORE_INDEX` where the label is missing (`None` or `-100`)."""
    values = [IGNORE_INDEX if value is None else int(value) for value in y_true]
    return np.asarray(values, dtype=np.int64).reshape(-1)


def attribute_metrics(y_true, probs: np.ndarray, labels: Sequence[str]) -> dict:
    """Top-1 and top-5 accuracy, macro-F1 and support of one attribute head, over the items that have a label.

    `y_true`: one label index per item, `None` or `-100` where missing. `probs`: `(n, C)` scores (probabilities or
    logits: only their order matters), `C == len(labels)`. Top-5 is top-`min(5, C)`, so it is 1.0 for heads with at
    most five labels. Macro-F1 averages over the classes that occur in the labels or the predictions (scikit-learn's
    default): a class the items never show and the model never predicts has no F1 to average. With no labelled item
    every score is `None` (no JSON NaN).
    """
    y_true = label_indices(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(labels)
    if probs.ndim != 2 or probs.shape != (len(y_true), num_classes):
        expected = f"({len(y_true)}, {num_classes})"
        raise ValueError(f"probs must have shape (n_items, n_labels) = {expected}, got {probs.shape}")
    present = y_true != IGNORE_INDEX
    bad = y_true[present & ((y_true < 0) | (y_true >= num_classes))]
    if bad.size:
        raise ValueError(
            f"label index {bad[0]} is outside 0..{num_classes - 1}; use None or {IGNORE_INDEX} for a missing label"
        )
    support = int(present.sum())
    if support == 0:
        return {"top1": None, "top5": None, "macro_f1": None, "support": 0}
    y_true, probs = y_true[present], probs[present]
    y_pred = probs.argmax(axis=1)
    k = min(TOP_K, num_classes)
    if k >= num_classes:
        top_k = 1.0  # every label is within the top C
    else:
        top_k = top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(num_classes))
    return {
        "top1": float(accuracy_score(y_true, y_pred)),
        "top5": float(top_k),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "support": support,
    }


def calibration_error(y_true, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> float | None:
    """Expected calibration error of the top label (Guo et al., 2017): the items are binned by their top
    probability into `bins` equal-width bins on [0, 1], and each bin's gap between mean confidence and accuracy is
    weighted by its share of the items. 0 means a 90% answer is right 90% of the time. `probs` must be
    probabilities (rows summing to 1); items without a label are left out; None when no item has one."""
    y_true = label_indices(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(y_true):
        raise ValueError(f"probs must have shape (n_items, n_labels) with n_items = {len(y_true)}, got {probs.shape}")
    if len(probs) and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("calibration error needs probabilities (rows summing to 1), not logits or scores")
    present = y_true != IGNORE_INDEX
    if not present.any():
        return None
    confidence = probs[present].max(axis=1)
    return expected_calibration_error(confidence, probs[present].argmax(axis=1) == y_true[present], bins)


def reliability_bins(confidence, correct, bins: int = CALIBRATION_BINS) -> dict:
    """The reliability diagram's points: per equal-width confidence bin on [0, 1], its items' mean confidence,
    accuracy and count; empty bins are left out. `correct`: whether each item's answer was right."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin.
    bin_of = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = [(confidence[bin_of == b].mean(), correct[bin_of == b].mean(), int((bin_of == b).sum())) for b in np.unique(bin_of)]
    return {"confidence": [float(r[0]) for r in rows], "accuracy": [float(r[1]) for r in rows], "count": [r[2] for r in rows]}


def expected_calibration_error(confidence, correct, bins: int = CALIBRATION_BINS) -> float | None:
    """ECE of answers given with these confidences: each `reliability_bins` bin's gap between mean confidence and
    accuracy, weighted by its share of the answers. For any score that claims "this is right" with that probability
    (a head's top label, a generated tag); None without answers."""
    if not len(confidence):
        return None
    points = reliability_bins(confidence, correct, bins)
    gaps = np.abs(np.asarray(points["confidence"]) - np.asarray(points["accuracy"]))
    return float((gaps * np.asarray(points["count"])).sum() / len(confidence))


def tag_group(key: str) -> str:
    """The group of a `"group:text"` tag key (the part before the first colon)."""
    group, separator, _ = key.partition(":")
    if not separator:
        raise ValueError(f"tag key {key!r} is not of the form 'group:text'")
    return group


def _micro_scores(predicted: Sequence[set[str]], reference: Sequence[set[str]]) -> dict:
    true_positives = sum(len(p & r) for p, r in zip(predicted, reference))
    num_predicted = sum(len(p) for p in predicted)
    num_reference = sum(len(r) for r in reference)
    precision = true_positives / num_predicted if num_predicted else 0.0
    recall = true_positives / num_reference if num_reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if num_predicted == num_reference == 0:  # nothing to find and nothing claimed: nothing went wrong
        precision = recall = f1 = 1.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": num_reference, "predicted": num_predicted}


def tag_set_metrics(predicted: Sequence[Iterable[str]], reference: Sequence[Iterable[str]]) -> dict:
    """Micro-averaged precision, recall and F1 of predicted tag sets against reference tag sets, overall and per group.

    Tags are `"group:text"` keys. Counts are pooled over all items (micro average): precision = correct / predicted,
    recall = correct / reference. `support` is the number of reference tags, `predicted` the number of predicted
    tags. Returns `{"overall": {...}, "per_group": {group: {...}}}`, groups sorted by name; a group appears when any
    item predicts or holds one of its tags. A score whose denominator is 0 is 0.0, unless both counts are 0.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"predicted has {len(predicted)} items but reference has {len(reference)}")
    predicted = [set(tags) for tags in predicted]
    reference = [set(tags) for tags in reference]
    groups = sorted({tag_group(key) for tags in (*predicted, *reference) for key in tags})
    per_group = {}
    for group in groups:
        prefix = f"{group}:"
        keep = lambda tags: {key for key in tags if key.startswith(prefix)}  # noqa: E731
        per_group[group] = _micro_scores([keep(p) for p in predicted], [keep(r) for r in reference])
    return {"overall": _micro_scores(predicted, reference), "per_group": per_group}


def restrict_to_groups(tag_sets: Iterable[Iterable[str]], groups: Iterable[str]) -> list[set[str]]:
    """Each tag set with only the tags of `groups` (e.g. the attribute groups, to compare with per-head predictions)."""
    groups = set(groups)
    return [{key for key in tags if tag_group(key) in groups} for tags in tag_sets]


def head_tag_sets(
    probs: Mapping[str, np.ndarray], attributes: Mapping[str, Sequence[str]], min_score: float = 0.0
) -> list[set[str]]:
    """The tag set each item gets from the attribute heads alone: `"attribute:label"` of every head's argmax.

    `probs`: attribute -> `(n, C)` probabilities (the heads to use; a head may be left out). `attributes`: the
    model's `config.attributes`, for the label names. A head whose top probability is below `min_score` contributes
    no tag. Compare `tag_set_metrics(head_tag_sets(...), restrict_to_groups(reference, probs))` with the same score of
    the decoder's generated tags restricted to those groups.
    """
    sets = None
    for name, head_probs in probs.items():
        if name not in attributes:
            raise ValueError(f"no attribute {name!r} in the vocabulary; attributes: {list(attributes)}")
        head_probs = np.asarray(head_probs)
        if head_probs.ndim != 2 or head_probs.shape[1] != len(attributes[name]):
            raise ValueError(f"probs[{name!r}] must be (n_items, {len(attributes[name])}), got {head_probs.shape}")
        if sets is None:
            sets = [set() for _ in range(len(head_probs))]
        elif len(head_probs) != len(sets):
            raise ValueError(f"probs[{name!r}] has {len(head_probs)} items, the other heads {len(sets)}")
        best = head_probs.argmax(axis=1)
        for item, (index, score) in enumerate(zip(best, head_probs[np.arange(len(best)), best])):
            if score >= min_score:
                sets[item].add(f"{name}:{attributes[name][index]}")
    return sets or []


__all__ = [
    "IGNORE_INDEX",
    "attribute_metrics",
    "calibration_error",
    "expected_calibration_error",
    "head_tag_sets",
    "label_indices",
    "reliability_bins",
    "restrict_to_groups",
    "tag_group",
    "tag_set_metrics",
]
