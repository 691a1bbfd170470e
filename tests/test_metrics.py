import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from feedbackcam.metrics import (
    ClassificationMetrics,
    classification_metrics,
    isic_jaccard,
    jaccard_per_image,
    per_class_table,
)

NAMES = ["A", "B", "C"]

# Hand example. Confusion matrix (rows true, cols predicted):
#   A: 3 1 0      A: TP 3 FN 1 FP 1 TN 5
#   B: 0 1 2      B: TP 1 FN 2 FP 1 TN 6
#   C: 1 0 2      C: TP 2 FN 1 FP 2 TN 5
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])


def one_hotish(pred, n_classes=3):
    prob = np.full((len(pred), n_classes), 0.2)
    prob[np.arange(len(pred)), pred] = 0.6
    return prob


def random_probs(n, c, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(c), size=n)


def test_hand_computed_three_class_example():
    m = classification_metrics(Y_TRUE, one_hotish(Y_PRED), NAMES)
    assert m.n == 10
    assert m.accuracy == pytest.approx(6 / 10)
    a, b, c = m.per_class["A"], m.per_class["B"], m.per_class["C"]
    assert (a.support, b.support, c.support) == (4, 3, 3)
    assert a.sensitivity == pytest.approx(3 / 4)
    assert b.sensitivity == pytest.approx(1 / 3)
    assert c.sensitivity == pytest.approx(2 / 3)
    assert a.specificity == pytest.approx(5 / 6)
    assert b.specificity == pytest.approx(6 / 7)
    assert c.specificity == pytest.approx(5 / 7)
    assert a.accuracy == pytest.approx(8 / 10)
    assert b.accuracy == pytest.approx(7 / 10)
    assert c.accuracy == pytest.approx(7 / 10)
    # F1 = 2TP / (2TP + FP + FN)
    assert a.f1 == pytest.approx(6 / 8)
    assert b.f1 == pytest.approx(2 / 5)
    assert c.f1 == pytest.approx(4 / 7)
    assert m.avg_sensitivity == pytest.approx((3 / 4 + 1 / 3 + 2 / 3) / 3)
    assert m.sensitivity() == {"A": a.sensitivity, "B": b.sensitivity, "C": c.sensitivity}


def test_auc_matches_sklearn_one_vs_rest():
    y = np.array([0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 0, 2, 2, 0, 1, 2])
    prob = random_probs(len(y), 3, seed=1)
    m = classification_metrics(y, prob, NAMES)
    per_class_ref = roc_auc_score(y, prob, multi_class="ovr", average=None)
    for k, name in enumerate(NAMES):
        assert m.per_class[name].auc == pytest.approx(per_class_ref[k])
        assert m.per_class[name].auc == pytest.approx(roc_auc_score(y == k, prob[:, k]))


@pytest.mark.parametrize("seed", range(6))
def test_numpy_scores_equal_sklearns_with_ties_and_absent_classes(seed):
    """The metrics are computed in numpy (no scikit-learn import on the command line's path);
    they must equal scikit-learn's, ties in the scores and never-predicted classes included."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(5, 60)), 4
    y = rng.integers(0, c - (seed % 2), n)  # odd seeds: the last class never present
    prob = np.round(random_probs(n, c, seed=seed), 1)  # rounding makes ties
    m = classification_metrics(y, prob, ["A", "B", "C", "D"])
    pred = prob.argmax(1)
    f1 = f1_score(y, pred, labels=range(c), average=None, zero_division=np.nan)
    assert m.accuracy == pytest.approx(accuracy_score(y, pred))
    for k, name in enumerate("ABCD"):
        cls = m.per_class[name]
        assert np.isnan(cls.f1) if np.isnan(f1[k]) else cls.f1 == pytest.approx(f1[k])
        if 0 < (y == k).sum() < n:
            assert cls.auc == pytest.approx(roc_auc_score(y == k, prob[:, k]))


def test_absent_class_is_nan_and_excluded_from_avg_sensitivity():
    y = np.array([0, 0, 0, 2, 2])
    pred = np.array([0, 1, 0, 2, 0])  # B is predicted once but never true
    m = classification_metrics(y, one_hotish(pred), NAMES)
    b = m.per_class["B"]
    assert b.support == 0
    assert math.isnan(b.sensitivity) and math.isnan(b.auc)
    assert b.f1 == 0.0  # predicted but absent: precision 0
    assert b.specificity == pytest.approx(4 / 5)
    assert m.avg_sensitivity == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_single_present_class_has_nan_auc_and_specificity():
    m = classification_metrics([1, 1, 1], one_hotish([1, 0, 1]), NAMES)
    assert math.isnan(m.per_class["B"].auc)
    assert math.isnan(m.per_class["B"].specificity)
    assert m.avg_sensitivity == pytest.approx(2 / 3)


def test_torch_inputs_on_grad_match_numpy():
    prob = random_probs(12, 3, seed=2)
    y = np.array([0, 1, 2] * 4)
    ref = classification_metrics(y, prob, NAMES).to_dict()
    got = classification_metrics(
        torch.tensor(y), torch.tensor(prob, requires_grad=True), NAMES
    ).to_dict()
    assert got == ref


def test_to_dict_is_json_safe():
    m = classification_metrics([0, 0, 2], one_hotish([0, 1, 2]), NAMES)
    d = m.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["per_class"]["B"]["sensitivity"] is None
    assert d["per_class"]["A"]["support"] == 2


def test_per_class_table_matches_thesis_layout():
    m = classification_metrics(Y_TRUE, one_hotish(Y_PRED), NAMES)
    lines = per_class_table(m).splitlines()
    assert lines[0] == "| Class | Accuracy | Specificity | Sensitivity | F1 | AUC |"
    assert len(lines) == 2 + len(NAMES)
    auc_b = f"{m.per_class['B'].auc:.2f}"
    assert lines[3] == f"| B | 0.70 | 0.86 | 0.33 | 0.40 | {auc_b} |"


def test_per_class_table_writes_nan_as_na():
    m = classification_metrics([0, 0, 2], one_hotish([0, 1, 2]), NAMES)
    assert "| B | 0.67 | 0.67 | n/a | 0.00 | n/a |" in per_class_table(m).splitlines()


@pytest.mark.parametrize(
    ("y_true", "y_prob", "names", "match"),
    [
        ([0, 1], np.ones((3, 3)) / 3, NAMES, "N=2"),
        ([0, 1, 2], np.ones((3, 2)) / 2, NAMES, "C=2"),
        ([0, 1, 3], np.ones((3, 3)) / 3, NAMES, r"\[0, 3\)"),
        ([0, -1, 2], np.ones((3, 3)) / 3, NAMES, "labels must be in"),
        ([0, 1, 2], np.ones(3), NAMES, "2-D"),
        ([[0, 1, 2]], np.ones((3, 3)) / 3, NAMES, "1-D"),
        ([], np.ones((0, 3)), NAMES, "empty"),
        ([0, 1, 2], np.full((3, 3), np.nan), NAMES, "nan"),
        ([0, 1, 2], np.ones((3, 3)) / 3, ["A", "A", "C"], "unique"),
    ],
)
def test_classification_bad_inputs_raise_value_error(y_true, y_prob, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_prob, names)


def test_classification_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="integer"):
        classification_metrics([0.5, 1.0, 2.0], np.ones((3, 3)) / 3, NAMES)
    with pytest.raises(TypeError, match="class_names"):
        classification_metrics([0, 1, 2], np.ones((3, 3)) / 3, "ABC")
    assert isinstance(
        classification_metrics([0.0, 1.0], np.eye(2), ["x", "y"]), ClassificationMetrics
    )


# ---------------------------------------------------------------------------------------------
# Jaccard
# ---------------------------------------------------------------------------------------------


def square_maps():
    """Three 4x4 images: identical (J=1), disjoint (J=0), pred = half of the mask (J=0.5)."""
    pred = np.zeros((3, 4, 4), dtype=bool)
    mask = np.zeros((3, 4, 4), dtype=np.uint8)
    pred[0, 1:3, 1:3] = True
    mask[0, 1:3, 1:3] = 1
    pred[1, 0, :] = True
    mask[1, 3, :] = 1
    pred[2, :, :2] = True
    mask[2] = 1
    return pred, mask


def test_jaccard_hand_examples():
    pred, mask = square_maps()
    s = jaccard_per_image(pred, mask)
    np.testing.assert_allclose(s.values, [1.0, 0.0, 0.5])
    assert (s.n, s.n_excluded) == (3, 0)
    assert s.mean == pytest.approx(0.5)
    # Population SD (ddof=0): sqrt((0.25 + 0.25 + 0) / 3); the sample SD would be 0.5.
    assert s.sd == pytest.approx(math.sqrt(1 / 6))


def test_jaccard_exclusions_are_counted():
    pred, mask = square_maps()
    mask[1] = 0  # empty mask -> excluded
    has_mask = np.array([True, True, False])  # image 2 has no mask at all
    s = jaccard_per_image(pred, mask, has_mask)
    np.testing.assert_allclose(s.values, [1.0])
    assert (s.n, s.n_excluded) == (1, 2)


def test_jaccard_empty_pred_against_mask_is_zero():
    pred = np.zeros((1, 5, 5), dtype=np.uint8)
    mask = np.ones((1, 5, 5))
    s = jaccard_per_image(pred, mask)
    assert s.values.tolist() == [0.0] and s.n_excluded == 0


def test_jaccard_all_excluded_gives_nan():
    pred, mask = square_maps()
    s = jaccard_per_image(pred, mask, has_mask=[False, False, False])
    assert math.isnan(s.mean) and math.isnan(s.sd)
    assert (s.n, s.n_excluded) == (0, 3)
    json.dumps(s.to_dict(), allow_nan=False)


def test_jaccard_accepts_0_255_masks_and_torch():
    pred, mask = square_maps()
    ref = jaccard_per_image(pred, mask)
    s255 = jaccard_per_image(pred.astype(np.uint8), mask * 255)
    np.testing.assert_allclose(s255.values, ref.values)
    pred_t = torch.tensor(pred, dtype=torch.float32, requires_grad=True)
    st = jaccard_per_image(pred_t, torch.tensor(mask) * 255)
    np.testing.assert_allclose(st.values, ref.values)


def test_jaccard_values_are_read_only():
    s = jaccard_per_image(*square_maps())
    with pytest.raises(ValueError):
        s.values[0] = 0.0


@pytest.mark.parametrize(
    ("pred", "mask", "has_mask", "match"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), None, "pred shape"),
        (np.zeros((2, 4, 4)), np.zeros((3, 4, 4)), None, "2 images but mask has 3"),
        (np.zeros((4, 4)), np.zeros((4, 4)), None, r"\(N, H, W\)"),
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), [True], "has_mask has 1"),
        (np.full((1, 4, 4), 0.7), np.ones((1, 4, 4)), None, "binary"),
    ],
)
def test_jaccard_bad_inputs_raise_value_error(pred, mask, has_mask, match):
    with pytest.raises(ValueError, match=match):
        jaccard_per_image(pred, mask, has_mask)


def test_isic_jaccard_pools_normalised_counts_not_ratios():
    pred = np.zeros((2, 4, 4), dtype=bool)
    mask = np.zeros((2, 4, 4), dtype=bool)
    pred[0, :2] = mask[0, :2] = True  # 8 px, identical: TP 8/16
    pred[1, 0, 0] = True  # 1 px FP and 1 px FN, disjoint
    mask[1, 3, 3] = True
    # Normalised sums: TP = 0.5, FP = 1/16, FN = 1/16 -> 0.5 / 0.625 = 0.8.
    assert isic_jaccard(pred, mask) == pytest.approx(0.8)
    assert jaccard_per_image(pred, mask).mean == pytest.approx(0.5)


def test_isic_jaccard_weighs_images_equally_whatever_their_size():
    small_p = np.zeros((2, 2), bool)
    small_m = np.zeros((2, 2), bool)
    small_p[0, 0] = small_m[1, 1] = True  # FP = FN = 1/4
    big = np.zeros((20, 20), bool)
    big[:10, :10] = True  # TP = 100/400 = 1/4
    score = isic_jaccard([small_p, big], [small_m, big])
    assert score == pytest.approx(0.25 / (0.25 + 0.25 + 0.25))
    # Pooling raw pixel counts would give 100 / 102; a bigger image with the same fractions
    # leaves the score unchanged.
    bigger = np.kron(big, np.ones((3, 3), bool))
    assert isic_jaccard([small_p, bigger], [small_m, bigger]) == pytest.approx(score)


def test_isic_jaccard_accepts_torch_and_255_and_nan_when_empty():
    pred, mask = square_maps()
    ref = isic_jaccard(pred, mask)
    assert isic_jaccard(torch.tensor(pred), torch.tensor(mask) * 255) == pytest.approx(ref)
    assert math.isnan(isic_jaccard(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))))


def test_isic_jaccard_bad_shapes_raise():
    with pytest.raises(ValueError, match="image 1: pred shape"):
        isic_jaccard([np.zeros((2, 2)), np.zeros((3, 3))], [np.zeros((2, 2)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="1 images but mask has 2"):
        isic_jaccard([np.zeros((2, 2))], [np.zeros((2, 2))] * 2)
