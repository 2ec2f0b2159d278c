"""Attribute and tag-set metrics: perfect predictions score 1.0, small cases match hand-computed values, and missing
labels are left out."""

import numpy as np
import pytest

from fashion_hf.metrics import (
    calibration_error,
    IGNORE_INDEX,
    attribute_metrics,
    head_tag_sets,
    restrict_to_groups,
    tag_group,
    tag_set_metrics,
)

LABELS_7 = ["a", "b", "c", "d", "e", "f", "g"]


def one_hot(indices, num_classes):
    probs = np.full((len(indices), num_classes), 0.01)
    probs[np.arange(len(indices)), indices] = 0.9
    return probs


def ranked(true_rank_per_item, true_labels, num_classes):
    """Scores where item i's true label is at rank `true_rank_per_item[i]` (0 = top)."""
    probs = np.zeros((len(true_labels), num_classes))
    for item, (rank, label) in enumerate(zip(true_rank_per_item, true_labels)):
        others = [c for c in range(num_classes) if c != label]
        order = others[:rank] + [label] + others[rank:]
        probs[item, order] = np.linspace(1.0, 0.1, num_classes)
    return probs


# --- attribute_metrics ------------------------------------------------------------------------------------------


def test_perfect_predictor_scores_one_on_every_attribute_metric():
    y_true = [0, 3, 6, 2, 2, 5]
    result = attribute_metrics(y_true, one_hot(y_true, 7), LABELS_7)
    assert result == {"top1": 1.0, "top5": 1.0, "macro_f1": 1.0, "support": 6}


def test_top1_and_macro_f1_match_hand_computed_values():
    # predictions 0, 2, 2, 1 for labels 0, 1, 2, 2: top-1 2/4; F1 per class: 1 (class 0), 0 (class 1), 0.5 (class 2)
    result = attribute_metrics([0, 1, 2, 2], one_hot([0, 2, 2, 1], 3), ["a", "b", "c"])
    assert result["top1"] == pytest.approx(0.5)
    assert result["macro_f1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert result["support"] == 4


def test_top5_counts_the_true_label_within_the_five_best():
    y_true = [0, 1, 2, 3]
    probs = ranked([0, 4, 5, 6], y_true, 7)  # ranks 1 and 5 are in the top 5; ranks 6 and 7 are not
    result = attribute_metrics(y_true, probs, LABELS_7)
    assert result["top5"] == pytest.approx(0.5)
    assert result["top1"] == pytest.approx(0.25)


def test_top5_is_top_c_for_heads_with_fewer_than_five_labels():
    result = attribute_metrics([0, 1, 2], one_hot([1, 2, 0], 3), ["a", "b", "c"])
    assert result["top1"] == 0.0
    assert result["top5"] == 1.0


def test_missing_labels_are_excluded_whether_none_or_minus_100():
    probs = one_hot([0, 4, 4, 1], 7)  # the two missing items would be wrong if they counted
    result = attribute_metrics([0, None, IGNORE_INDEX, 1], probs, LABELS_7)
    assert result == {"top1": 1.0, "top5": 1.0, "macro_f1": 1.0, "support": 2}
    assert attribute_metrics(np.array([0, -100, -100, 1]), probs, LABELS_7) == result


def test_no_labelled_item_gives_none_scores_not_nan():
    result = attribute_metrics([None, None], one_hot([0, 1], 3), ["a", "b", "c"])
    assert result == {"top1": None, "top5": None, "macro_f1": None, "support": 0}


def test_scores_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"\(n_items, n_labels\) = \(2, 3\)"):
        attribute_metrics([0, 1], one_hot([0, 1], 4), ["a", "b", "c"])


def test_label_index_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside 0..2"):
        attribute_metrics([0, 3], one_hot([0, 1], 3), ["a", "b", "c"])


# --- tag_set_metrics --------------------------------------------------------------------------------------------


def test_perfect_tag_sets_score_one_overall_and_per_group():
    tags = [{"gender:Men", "articleType:Shirts", "detail:check"}, {"gender:Women"}, set()]
    result = tag_set_metrics(tags, tags)
    assert result["overall"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 4, "predicted": 4}
    assert set(result["per_group"]) == {"gender", "articleType", "detail"}
    assert all(scores["f1"] == 1.0 for scores in result["per_group"].values())


def test_tag_scores_match_hand_computed_values():
    predicted = [{"a:x", "a:y"}, {"b:z"}]
    reference = [{"a:x"}, {"b:z", "b:w"}]
    result = tag_set_metrics(predicted, reference)
    # 2 correct of 3 predicted and of 3 reference tags
    assert result["overall"]["precision"] == pytest.approx(2 / 3)
    assert result["overall"]["recall"] == pytest.approx(2 / 3)
    assert result["overall"]["f1"] == pytest.approx(2 / 3)
    group_a = {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1, "predicted": 2}
    group_b = {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "predicted": 1}
    assert result["per_group"]["a"] == pytest.approx(group_a)
    assert result["per_group"]["b"] == pytest.approx(group_b)


def test_tag_scores_are_micro_averaged_over_items():
    # Per-item precisions 1 and 0 would average to 0.5; pooled counts give 1 correct of 4 predicted.
    result = tag_set_metrics([{"a:x"}, {"a:y", "a:z", "a:w"}], [{"a:x"}, {"a:v"}])
    assert result["overall"]["precision"] == pytest.approx(0.25)
    assert result["overall"]["recall"] == pytest.approx(0.5)


def test_a_tag_predicted_twice_counts_once():
    result = tag_set_metrics([["a:x", "a:x"]], [["a:x"]])
    assert result["overall"]["precision"] == 1.0


def test_group_is_the_part_before_the_first_colon():
    assert tag_group("detail:3:4 sleeve") == "detail"
    with pytest.raises(ValueError, match="'group:text'"):
        tag_group("no group")


def test_a_group_nobody_labels_scores_zero_not_an_error():
    result = tag_set_metrics([{"brand:Puma"}], [set()])
    assert result["per_group"]["brand"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 1}


def test_different_numbers_of_items_are_refused():
    with pytest.raises(ValueError, match="2 items but reference has 1"):
        tag_set_metrics([set(), set()], [set()])


# --- head_tag_sets ----------------------------------------------------------------------------------------------


def test_head_tag_sets_hold_each_heads_argmax_label():
    attributes = {"gender": ["Men", "Women"], "usage": ["Casual", "Formal", "Sports"]}
    probs = {"gender": np.array([[0.8, 0.2], [0.3, 0.7]]), "usage": np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])}
    assert head_tag_sets(probs, attributes) == [{"gender:Men", "usage:Sports"}, {"gender:Women", "usage:Casual"}]


def test_head_tag_sets_drop_labels_below_min_score():
    attributes = {"usage": ["Casual", "Formal", "Sports"]}
    probs = {"usage": np.array([[0.4, 0.3, 0.3], [0.9, 0.05, 0.05]])}
    assert head_tag_sets(probs, attributes, min_score=0.5) == [set(), {"usage:Casual"}]


def test_head_tags_and_generated_tags_compare_on_the_same_groups():
    attributes = {"gender": ["Men", "Women"]}
    reference = [{"gender:Men", "detail:check"}, {"gender:Women"}]
    generated = [{"gender:Men", "detail:check"}, {"gender:Men"}]
    heads = head_tag_sets({"gender": np.array([[0.9, 0.1], [0.2, 0.8]])}, attributes)
    attribute_reference = restrict_to_groups(reference, ["gender"])
    assert tag_set_metrics(heads, attribute_reference)["overall"]["f1"] == 1.0
    assert tag_set_metrics(restrict_to_groups(generated, ["gender"]), attribute_reference)["overall"]["f1"] == 0.5


def test_head_tag_sets_refuse_an_unknown_head():
    with pytest.raises(ValueError, match="no attribute 'brand'"):
        head_tag_sets({"brand": np.ones((1, 2))}, {"gender": ["Men", "Women"]})


# --- calibration_error ----------------------------------------------------------------------------------------------


def test_calibration_error_is_the_item_weighted_gap_between_confidence_and_accuracy_per_bin():
    # Two items at confidence 0.9 (one right: accuracy 0.5, gap 0.4) and two at 0.6 (both right: gap 0.4); by hand
    # (2 x 0.4 + 2 x 0.4) / 4 = 0.4. A missing label is left out.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6], [0.5, 0.5]])
    assert calibration_error([0, 1, 1, 1, None], probs) == pytest.approx(0.4)


def test_a_model_right_as_often_as_it_says_has_no_calibration_error_and_an_overconfident_one_has():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20000)
    right = rng.uniform(size=confidence.size) < confidence  # right with exactly the stated probability
    probs = np.stack([confidence, 1 - confidence], axis=1)
    y_true = np.where(right, 0, 1)
    assert calibration_error(y_true, probs) < 0.02
    sharpened = np.stack([np.full_like(confidence, 0.99), np.full_like(confidence, 0.01)], axis=1)
    assert calibration_error(y_true, sharpened) == pytest.approx(0.99 - right.mean(), abs=1e-9)


def test_calibration_error_refuses_scores_that_are_not_probabilities_and_has_none_without_labels():
    with pytest.raises(ValueError, match="probabilities"):
        calibration_error([0, 1], np.array([[2.0, -1.0], [0.5, 3.0]]))
    assert calibration_error([None, -100], np.array([[0.5, 0.5], [0.2, 0.8]])) is None
