"""Scores that mean what they say: the fitting behind `fashion-hf calibrate`, as small functions on arrays.

    temperature = fit_temperature(log_probs, labels)              # a head's softmax(logits / T), Guo et al. 2017
    a, b = fit_tag_score_scaling(tag_scores, tag_correct)          # Platt scaling of the decoder's tag scores
    threshold = precision_threshold(confidence, correct, 0.95)    # "not sure" below it
    detector = fit_feature_density([catalogue_features, phone_features])   # out-of-distribution score

Each is fitted on held-out photos and stored in the model's config (and, for the detector, its weights); the model
applies them (`FashionTaggerConfig.attribute_temperatures`, ...). Everything here is computation on numpy arrays.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .metrics import IGNORE_INDEX, label_indices

NOT_SURE_PRECISION = 0.95  # answers at or above a head's threshold were right at least this often
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _labelled(log_probs: np.ndarray, labels) -> tuple[torch.Tensor, torch.Tensor]:
    labels = label_indices(labels)
    present = labels != IGNORE_INDEX
    return torch.as_tensor(np.asarray(log_probs)[present], dtype=torch.float64), torch.as_tensor(labels[present])


def fit_temperature(log_probs: np.ndarray, labels) -> float:
    """The T > 0 that minimises the negative log-likelihood of `softmax(log_probs / T)` on the labelled rows.

    `log_probs`: `(n, C)` logits or log-probabilities (the same thing up to a per-row constant); `labels`: `(n,)`
    label indices, `None`/-100 where missing. One parameter, so a few hundred labelled photos fit it; 1.0 when no
    row is labelled. Optimised over log T with L-BFGS, which converges in a few steps on this convex problem.
    """
    logits, labels = _labelled(log_probs, labels)
    if not len(labels):
        return 1.0
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def negative_log_likelihood():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(negative_log_likelihood)
    return float(np.clip(log_temperature.exp().item(), *TEMPERATURE_BOUNDS))


def apply_temperature(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """`softmax(log_probs / T)` as probabilities, row by row."""
    scaled = torch.as_tensor(np.asarray(log_probs), dtype=torch.float64) / temperature
    return scaled.softmax(-1).numpy()


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def fit_tag_score_scaling(scores, correct) -> list[float]:
    """`[a, b]` of Platt scaling, `sigmoid(a * logit(score) + b)`, fitted by logistic regression of whether each
    generated tag was right on its score. `[1, 0]` (no change) when every tag was right or every one wrong."""
    from sklearn.linear_model import LogisticRegression

    correct = np.asarray(correct, dtype=bool)
    if correct.all() or not correct.any():
        return [1.0, 0.0]
    regression = LogisticRegression(C=1e4).fit(_logit(scores)[:, None], correct)
    return [float(regression.coef_[0, 0]), float(regression.intercept_[0])]


def scale_tag_scores(scores, scaling: list[float] | None) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scaling is None:
        return scores
    a, b = scaling
    return 1.0 / (1.0 + np.exp(-(a * _logit(scores) + b)))


def precision_threshold(confidence, correct, precision: float = NOT_SURE_PRECISION, min_answers: int = 20) -> float:
    """The lowest top-label score whose answers at or above it were right at least `precision` of the time.

    Rows are sorted by confidence, most confident first; the answered set grows while its accuracy stays at or above
    `precision` (the set's accuracy is checked from `min_answers` answers on, so that a lucky first few do not
    decide). Returns that set's lowest confidence, so that everything at or above it is answered; 1.0 (every answer
    "not sure" but a certain one) when even the most confident answers miss too often.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    order = np.argsort(-confidence, kind="stable")
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    meets = np.flatnonzero((accuracy >= precision) & (np.arange(1, len(order) + 1) >= min(min_answers, len(order))))
    if not meets.size:
        return 1.0
    return float(confidence[order[meets[-1]]])


def coverage_curve(confidence, correct, thresholds=None) -> dict:
    """Per threshold, the share of answers at or above it (coverage) and their accuracy: the trade a "not sure"
    threshold makes. `{"threshold": [...], "coverage": [...], "accuracy": [...]}` (accuracy None where nothing is
    answered)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    thresholds = np.linspace(0.0, 1.0, 21) if thresholds is None else np.asarray(thresholds)
    coverage, accuracy = [], []
    for threshold in thresholds:
        answered = confidence >= threshold
        coverage.append(float(answered.mean()) if len(answered) else 0.0)
        accuracy.append(float(correct[answered].mean()) if answered.any() else None)
    return {"threshold": [float(t) for t in thresholds], "coverage": coverage, "accuracy": accuracy}


@dataclass
class FeatureDensity:
    """A Gaussian per domain of photos with one shared covariance, on the model's image embeddings: a photo's
    out-of-distribution score is its smallest Mahalanobis distance to a domain's mean (Lee et al., 2018)."""

    means: np.ndarray  # (domains, width)
    precision: np.ndarray  # (width, width): inverse of the pooled, shrunk covariance

    def scores(self, features: np.ndarray) -> np.ndarray:
        return mahalanobis_scores(torch.as_tensor(features), torch.as_tensor(self.means), torch.as_tensor(self.precision)).numpy()


def fit_feature_density(features_by_domain: list[np.ndarray], shrinkage: float = 0.1) -> FeatureDensity:
    """The means of each domain's embeddings and the inverse of their pooled covariance, shrunk towards a scaled
    identity by `shrinkage` (Ledoit and Wolf's target) so that a few thousand photos invert stably in 1,280 dims."""
    means = np.stack([features.mean(0) for features in features_by_domain])
    centred = np.concatenate([features - mean for features, mean in zip(features_by_domain, means)]).astype(np.float64)
    covariance = centred.T @ centred / len(centred)
    target = np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    precision = np.linalg.inv((1 - shrinkage) * covariance + shrinkage * target)
    return FeatureDensity(means=means.astype(np.float32), precision=precision.astype(np.float32))


def fit_turned_probe(upright: np.ndarray, turned: np.ndarray) -> np.ndarray:
    """`(width + 1,)`: weights then bias of a logistic regression telling turned photos' embeddings (90, 180 or 270
    degrees) from upright ones', classes weighted equally. A CNN's pooled embedding keeps enough of the layout for
    a linear probe: measured on held-out photos, it flags most turned photos for about 2% of upright ones."""
    from sklearn.linear_model import LogisticRegression

    features = np.concatenate([upright, turned])
    labels = np.r_[np.zeros(len(upright)), np.ones(len(turned))]
    probe = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(features, labels)
    return np.r_[probe.coef_[0], probe.intercept_].astype(np.float32)


def fit_orientation_probe(upright: np.ndarray, turned: list[np.ndarray]) -> np.ndarray:
    """`(1 + turns, width + 1)`: a multinomial logistic regression telling upright embeddings from those of the same
    photos turned by each quarter turn (`turned`, in `QUARTER_TURNS` order); per row its weights, then its bias.

    On its own it names a photo's orientation only about 8 times in 10 (phone photos 6 in 10), but comparing the
    upright probability of a photo's four turns finds the upright one for about 19 in 20 (`turn_upright`).
    """
    from sklearn.linear_model import LogisticRegression

    features = np.concatenate([upright, *turned])
    labels = np.concatenate([np.full(len(part), kind) for kind, part in enumerate([upright, *turned])])
    probe = LogisticRegression(C=10.0, max_iter=5000).fit(features, labels)
    return np.c_[probe.coef_, probe.intercept_].astype(np.float32)


def turned_probability(features: np.ndarray, probe: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.asarray(features, dtype=np.float64) @ probe[:-1] + probe[-1])))


def joint_limits(signals_by_source: list[dict[str, np.ndarray]], budget: float) -> dict[str, float]:
    """One limit per signal, all the same quantile q of their values (the larger over sources), with the lowest q at
    which no source has more than `budget` of its photos over any limit: the signals share the false-flag budget
    instead of each spending it."""
    names = list(signals_by_source[0])
    for q in np.arange(0.95, 0.9995, 0.0005):
        limits = {name: max(float(np.quantile(signals[name], q)) for signals in signals_by_source) for name in names}
        flagged = [np.any([signals[name] > limits[name] for name in names], axis=0).mean() for signals in signals_by_source]
        if max(flagged) <= budget:
            return limits
    return {name: max(float(signals[name].max()) for signals in signals_by_source) for name in names}


def mahalanobis_scores(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """`(batch,)`: each row's smallest Mahalanobis distance to one of `means` (`(domains, width)`) under `precision`."""
    centred = features.float()[:, None, :] - means.float()[None]  # (batch, domains, width)
    squared = torch.einsum("bdw,wv,bdv->bd", centred, precision.float(), centred)
    return squared.clamp_min(0).sqrt().min(1).values


def binary_auroc(in_distribution_scores, out_of_distribution_scores) -> float:
    """Area under the ROC curve of telling the two sets apart by score (higher = more out of distribution)."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([in_distribution_scores, out_of_distribution_scores])
    truth = np.concatenate([np.zeros(len(in_distribution_scores)), np.ones(len(out_of_distribution_scores))])
    return float(roc_auc_score(truth, scores))


@dataclass
class HeldOutScores:
    """What calibration is fitted on, for one set of photos: the model's answers before any calibration."""

    domain_log_probs: dict[str, np.ndarray]  # attribute -> (domains, n, C): each domain's log-probabilities
    domain_weights: np.ndarray  # (n, domains): the gate's weights (ones for a single model)
    labels: dict[str, np.ndarray]  # labelled attribute -> (n,) label index, -100 where missing
    ood_features: np.ndarray  # (n, width): the embedding the out-of-distribution score measures
    tag_rows: np.ndarray  # per generated tag: its photo's row ...
    tag_groups: np.ndarray  # ... its group ...
    tag_scores: np.ndarray  # ... its decoder step probability ...
    tag_correct: np.ndarray  # ... and whether the photo's reference tags hold it (empty: tags not known)

    def probabilities(self, name: str, temperatures: list[float] | None = None) -> np.ndarray:
        """`(n, C)` probabilities of head `name` as the model gives them with these per-domain temperatures."""
        temperatures = temperatures or [1.0] * len(self.domain_weights[0])
        per_domain = [apply_temperature(log_probs, t) for log_probs, t in zip(self.domain_log_probs[name], temperatures)]
        return np.einsum("dnc,nd->nc", np.stack(per_domain), self.domain_weights)

    def rows(self, rows) -> "HeldOutScores":
        rows = np.asarray(rows, dtype=np.int64)
        kept_tags = np.isin(self.tag_rows, rows)
        new_row = {old: new for new, old in enumerate(rows.tolist())}
        return HeldOutScores(
            domain_log_probs={name: values[:, rows] for name, values in self.domain_log_probs.items()},
            domain_weights=self.domain_weights[rows],
            labels={name: values[rows] for name, values in self.labels.items()},
            ood_features=self.ood_features[rows],
            tag_rows=np.asarray([new_row[row] for row in self.tag_rows[kept_tags].tolist()], dtype=np.int64),
            tag_groups=self.tag_groups[kept_tags],
            tag_scores=self.tag_scores[kept_tags],
            tag_correct=self.tag_correct[kept_tags],
        )


def collect(model, processor, dataset, batch_size: int = 64, with_tags: bool = True, progress: bool = True) -> HeldOutScores:
    """Run `model` (uncalibrated: `config.without_calibration()` first) over `dataset` and keep what fitting needs.

    Tags are scored against the dataset's reference tags (`evaluation`'s reading of them) when `with_tags` and the
    dataset knows every photo's tags; the phone photos, labelled with two attributes only, do not.
    """
    from tqdm.auto import tqdm

    from .configuration_fashion_tagger import tag_key
    from .evaluation import _read_labels, _reference_tags, _tags_known, model_device_and_dtype

    config = model.config
    if not len(dataset):
        raise ValueError("no photos to calibrate on: the data set is empty")
    dataset = dataset.with_format(None)
    labels, _, attribute_keys = _read_labels(dataset, config.attributes)
    with_tags = with_tags and _tags_known(dataset)
    reference = _reference_tags(dataset, attribute_keys, set(config.tag_to_id()))[0] if with_tags else None
    device, dtype = model_device_and_dtype(model)
    log_probs, weights, features, tags = {name: [] for name in config.attributes}, [], [], []
    model.eval()
    with torch.inference_mode(), tqdm(total=len(dataset), unit="img", desc="calibration", disable=not progress) as bar:
        for start, batch in enumerate(dataset.select_columns(["image"]).iter(batch_size=batch_size)):
            pixel_values = processor(batch["image"], return_tensors="pt")["pixel_values"].to(device, dtype)
            image_embeds = model.encode_images(pixel_values)
            for name, values in model.domain_attribute_log_probs(image_embeds).items():
                log_probs[name].append(values.float().cpu().numpy())
            weights.append(model.domain_weights(image_embeds).cpu().numpy())
            features.append(model.ood_features(image_embeds).float().cpu().numpy())
            if with_tags:
                for offset, hypotheses in enumerate(model.generate_tags(image_embeds=image_embeds)):
                    row = start * batch_size + offset
                    for tag in hypotheses[0]["tags"]:
                        correct = tag_key(tag["group"], tag["tag"]) in reference[row]
                        tags.append((row, tag["group"], tag["score"], correct))
            bar.update(len(pixel_values))
    return HeldOutScores(
        domain_log_probs={name: np.concatenate(chunks, axis=1) for name, chunks in log_probs.items()},
        domain_weights=np.concatenate(weights),
        labels=labels,
        ood_features=np.concatenate(features),
        tag_rows=np.asarray([tag[0] for tag in tags], dtype=np.int64),
        tag_groups=np.asarray([tag[1] for tag in tags], dtype=object),
        tag_scores=np.asarray([tag[2] for tag in tags], dtype=np.float64),
        tag_correct=np.asarray([tag[3] for tag in tags], dtype=bool),
    )
