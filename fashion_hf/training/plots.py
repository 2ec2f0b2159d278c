"""The evaluation's plots, written as PNG files: a confusion matrix, top-1 and top-5 per attribute, training curves.

`fashion_hf.training.evaluate.write_evaluation` draws them next to metrics.json, where the model card embeds them.
"""

from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import confusion_matrix

from ..evaluation import Predictions
from ..metrics import IGNORE_INDEX

matplotlib.use("Agg")  # plots are files: no display needed, and none on a training server
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

CONFUSION_MAX_CLASSES = 30


def most_frequent_classes(y_true: np.ndarray, num_classes: int, limit: int) -> list[int]:
    """The `limit` classes with the most items, most frequent first (ties: vocabulary order); absent ones left out."""
    counts = np.bincount(y_true, minlength=num_classes)
    return [int(index) for index in np.argsort(-counts, kind="stable") if counts[index] > 0][:limit]


def plot_confusion_matrix(
    predictions: Predictions,
    attributes: dict[str, list[str]],
    path: Path,
    name: str | None = None,
    predicted_columns: int = 0,
) -> str | None:
    """Row-normalised confusion matrix of head `name` (default: the labelled head with the most labels); its 30 most
    frequent classes at most. `predicted_columns`: that many classes the data never shows but the model predicts most
    often for them get columns of their own (on out-of-studio photos, what the model mistakes them for).

    Returns the head's name, or None when no head (or not `name`) has a label to plot.
    """
    labelled = [head for head, ids in predictions.labels.items() if (ids != IGNORE_INDEX).any()]
    if name is None and labelled:
        name = max(labelled, key=lambda head: len(attributes[head]))
    if name not in labelled:
        return None
    names = attributes[name]
    present = predictions.labels[name] != IGNORE_INDEX
    y_true = predictions.labels[name][present]
    y_pred = predictions.probs[name][present].argmax(axis=1)
    counts = np.bincount(y_true, minlength=len(names))
    shown = most_frequent_classes(y_true, len(names), CONFUSION_MAX_CLASSES)
    # Predictions outside the shown classes (and the extra predicted ones) go to one last column, so every row still
    # sums to its support.
    other = len(names)
    keep = np.isin(y_true, shown)
    outside = y_pred[keep][~np.isin(y_pred[keep], shown)]
    listed = [*shown, *most_frequent_classes(outside, len(names), predicted_columns)]
    y_pred_shown = np.where(np.isin(y_pred, listed), y_pred, other)
    columns = [*listed, other] if (y_pred_shown[keep] == other).any() else listed
    matrix = confusion_matrix(y_true[keep], y_pred_shown[keep], labels=columns)[: len(shown)]
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)

    size = 0.32 * max(len(columns), 6) + 3
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    column_names = [names[index] if index != other else "(other)" for index in columns]
    axes.set_xticks(range(len(columns)), column_names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(shown)), [f"{names[index]} ({counts[index]})" for index in shown], fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true (items)")
    if len(columns) <= 12:
        for row, column in np.ndindex(normalised.shape):
            colour = "white" if normalised[row, column] > 0.5 else "black"
            axes.text(column, row, f"{normalised[row, column]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    present_classes = int((counts > 0).sum())
    scope = f", {len(shown)} most frequent of {present_classes} classes" if len(shown) < present_classes else ""
    axes.set_title(f"{name}: confusion matrix (rows sum to 1{scope})", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return name


def plot_attribute_accuracy(metrics: dict, path: Path) -> bool:
    """Grouped bars of top-1 and top-5 accuracy per attribute; False when no attribute has a label."""
    scored = {name: values for name, values in metrics["attributes"].items() if values["support"]}
    if not scored:
        return False
    positions = np.arange(len(scored))
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(scored) + 2), 4.5))
    for offset, key, label in ((-0.2, "top1", "top-1"), (0.2, "top5", "top-5")):
        values = [scored[name][key] for name in scored]
        bars = axes.bar(positions + offset, values, width=0.4, label=label)
        axes.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=7, padding=2)
    names = [f"{name}\n({values['num_labels']} labels)" for name, values in scored.items()]
    axes.set_xticks(positions, names, fontsize=8)
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("accuracy")
    axes.set_title(f"Attribute accuracy on {metrics.get('dataset', 'the dataset')} ({metrics['n_images']} images)")
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def read_scalars(log_dir: str | Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every scalar of every TensorBoard run under `log_dir`: `{run: {tag: [(step, value), ...]}}`."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    log_dir = Path(log_dir)
    runs = sorted({path.parent for path in log_dir.rglob("events.out.tfevents.*")})
    result = {}
    for run in runs:
        accumulator = EventAccumulator(str(run), size_guidance={SCALARS: 0})  # 0: keep every point
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        if tags:
            name = str(run.relative_to(log_dir)) if run != log_dir else run.name
            result[name] = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags}
    return result


def plot_training_curves(log_dir: str | Path, path: Path) -> bool:
    """One panel per scalar tag (train/loss, val/<attr>_top1, ...), one line per run; False when there is none."""
    runs = read_scalars(log_dir)
    tags = sorted({tag for run in runs.values() for tag in run})
    if not tags:
        return False
    columns = min(3, len(tags))
    rows = -(-len(tags) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for axes, tag in zip(grid.flat, tags):
        for run, run_tags in runs.items():
            if tag in run_tags:
                steps, values = zip(*run_tags[tag])
                axes.plot(steps, values, label=run, linewidth=1.2, marker="." if len(steps) < 30 else None)
        axes.set_title(tag, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if len(runs) > 1:
            axes.legend(fontsize=6)
    for axes in list(grid.flat)[len(tags) :]:
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_reliability(heads: dict, path: Path, title: str = "") -> None:
    """Reliability diagrams, one panel per head: accuracy against mean confidence per bin, before and after
    calibration (`{head: {"before": {"ece", "reliability"}, "after": ...}}`, as `fashion-hf calibrate` and
    `evaluate` report them; either may be missing); the diagonal is perfect."""
    columns = min(4, len(heads))
    rows = -(-len(heads) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for axis in axes.flat[len(heads):]:
        axis.set_visible(False)
    for axis, (name, entry) in zip(axes.flat, heads.items()):
        axis.plot([0, 1], [0, 1], color="0.7", linewidth=1)
        for when, style in (("before", "o--"), ("after", "s-")):
            if when not in entry:
                continue
            bins = entry[when]["reliability"]
            axis.plot(bins["confidence"], bins["accuracy"], style, markersize=3, label=f"{when} (ECE {entry[when]['ece']:.3f})")
        axis.set(title=name, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        axis.legend(fontsize=7, loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_coverage(heads: dict, path: Path, title: str = "") -> None:
    """Coverage against accuracy per head: answering only above a threshold trades answers for precision; the dot
    is the "not sure" threshold the model uses."""
    figure, axis = plt.subplots(figsize=(5, 4))
    for name, entry in heads.items():
        curve = entry["coverage_curve"]
        points = [(c, a) for c, a in zip(curve["coverage"], curve["accuracy"]) if a is not None]
        line, = axis.plot(*zip(*points), label=name)
        if "threshold" in entry and entry["threshold"]["accuracy_answered"] is not None:
            axis.plot(entry["threshold"]["coverage"], entry["threshold"]["accuracy_answered"], "o", color=line.get_color())
    axis.axhline(0.95, color="0.7", linewidth=1, linestyle="--")
    axis.set(xlabel="share of photos answered", ylabel="accuracy of the answers", title=title, xlim=(0, 1.02))
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_ood_scores(scores: dict[str, np.ndarray], path: Path) -> None:
    """Histogram of the out-of-distribution score per set of photos; the line at 1 is the flagging limit."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    edges = np.linspace(0, max(2.5, max(float(np.percentile(v, 99)) for v in scores.values())), 50)
    for name, values in scores.items():
        axis.hist(np.clip(values, 0, edges[-1]), bins=edges, density=True, histtype="step", label=f"{name} ({len(values)})")
    axis.axvline(1.0, color="black", linewidth=1)
    axis.set(xlabel="out-of-distribution score (1 = limit)", ylabel="density")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
