"""metrics.py, imported without torch: known answers on hand-made inputs, agreement with
scikit-learn/scipy of the vectorised (weighted) metrics behind the bootstrap, the cluster
bootstrap, and clip_train.py's validation statistics."""

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score,
                             brier_score_loss, f1_score, log_loss, matthews_corrcoef, roc_auc_score)

import metrics

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]
Z95 = 1.959963984540054
# Rows true, columns predicted; 27 images. Class 0: tp 3, fp 2, fn 2, tn 20.
HAND_CM = np.array([[3, 1, 1],
                    [2, 10, 0],
                    [0, 4, 6]])


def random_probs(rng, n, n_classes=3, signal=2.0):
    y_true = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[y_true]
    return y_true, metrics.softmax(logits)


# -- one confusion matrix, by hand -------------------------------------------------------------------


def scipy_wilson(k, n):
    """scipy's Wilson interval: the independent reference for the intervals of metrics.py."""
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [ci.low, ci.high]

def test_one_vs_rest_counts_on_a_hand_made_matrix():
    assert metrics.one_vs_rest_counts(HAND_CM, 0) == (3, 2, 2, 20)
    assert metrics.one_vs_rest_counts(HAND_CM, 1) == (10, 5, 2, 10)
    assert metrics.one_vs_rest_counts(HAND_CM, 2) == (6, 1, 4, 16)


def test_per_class_proportions_by_hand():
    rare = metrics.per_class_metrics(HAND_CM, 0)
    assert rare["support"] == 5
    assert rare["sensitivity"] == pytest.approx(3 / 5)
    assert rare["specificity"] == pytest.approx(20 / 22)
    assert rare["ppv"] == pytest.approx(3 / 5)
    assert rare["npv"] == pytest.approx(20 / 22)
    healthy = metrics.per_class_metrics(HAND_CM, 1)
    assert (healthy["sensitivity"], healthy["specificity"]) == pytest.approx((10 / 12, 10 / 15))
    assert (healthy["ppv"], healthy["npv"]) == pytest.approx((10 / 15, 10 / 12))
    assert rare["sensitivity_ci"] == pytest.approx(scipy_wilson(3, 5))
    assert rare["npv_ci"] == pytest.approx(scipy_wilson(20, 22))


def test_wilson_interval_known_answer_and_scipy():
    z = 1.959963984540054  # two-sided 95% normal quantile
    k, n = 3, 5
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    assert metrics.wilson_interval(k, n) == pytest.approx([centre - half, centre + half])
    assert metrics.wilson_interval(3, 5) == pytest.approx([0.2307, 0.8824], abs=1e-4)
    for k, n in ((0, 7), (7, 7), (20, 22), (1, 1)):
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert metrics.wilson_interval(k, n) == pytest.approx([ci.low, ci.high])
    assert metrics.wilson_interval(0, 0) is None
    assert metrics.proportion(0, 0) is None


def test_undefined_proportions_are_none_not_zero():
    cm = np.array([[0, 0], [0, 4]])  # class 0 never true and never predicted
    stats = metrics.per_class_metrics(cm, 0)
    assert stats["support"] == 0
    assert stats["sensitivity"] is None and stats["sensitivity_ci"] is None
    assert stats["ppv"] is None and stats["ppv_ci"] is None
    assert stats["specificity"] == 1.0 and stats["npv"] == 1.0


@pytest.mark.parametrize("seed, absent", [(0, None), (1, 2), (2, 0)])
def test_vectorised_metrics_equal_sklearn(seed, absent):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, 40)
    y_pred = rng.integers(0, 3, 40)
    if absent is not None:  # a class missing from y_true (still predicted) must not break anything
        y_true[y_true == absent] = (absent + 1) % 3
    cm = metrics.confusion_matrices(y_true, y_pred, 3)
    values = metrics.metrics_from_confusion(cm[None])
    assert values["accuracy"][0] == pytest.approx(accuracy_score(y_true, y_pred))
    with pytest.warns(UserWarning) if absent is not None else contextlib.nullcontext():
        expected_balanced = balanced_accuracy_score(y_true, y_pred)
    assert values["balanced_accuracy"][0] == pytest.approx(expected_balanced)
    assert values["macro_f1"][0] == pytest.approx(
        f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0))


def test_resampled_confusion_matrices_match_one_at_a_time():
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 3, 25), rng.integers(0, 3, 25)
    resamples = rng.integers(0, 25, size=(4, 25))
    stacked = metrics.confusion_matrices(y_true, y_pred, 3, resamples)
    for b in range(4):
        single = metrics.confusion_matrices(y_true[resamples[b]], y_pred[resamples[b]], 3)
        assert np.array_equal(stacked[b], single)


def test_compute_metrics_with_an_absent_class_gives_none_not_a_crash():
    y_true = np.array([1, 1, 1, 2, 2, 2, 2])  # no rare-class image at all
    probs = np.array([[.1, .8, .1], [.2, .5, .3], [.6, .3, .1], [.1, .2, .7],
                      [.3, .3, .4], [.1, .6, .3], [.2, .1, .7]])
    result = metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=100, seed=0)
    rare = result["per_class"]["orbital disease"]
    assert rare["support"] == 0 and rare["sensitivity"] is None and rare["auroc"] is None
    assert rare["auroc_ci"] is None and rare["specificity"] == pytest.approx(6 / 7)
    assert result["macro_auroc"] is None and result["macro_auroc_ci"] is None
    assert result["per_class"]["healthy eyes"]["auroc"] == pytest.approx(
        roc_auc_score(y_true == 1, probs[:, 1]))
    assert result["accuracy"] == pytest.approx(5 / 7)  # argmax 1,1,0,2,2,1,2
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN anywhere


def test_compute_metrics_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    first = metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=300, seed=7)
    assert first == metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=300, seed=7)
    assert first != metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=300, seed=8)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
        low, high = first[f"{name}_ci"]
        assert low <= first[name] <= high
    none = metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=0, seed=7)
    assert none["accuracy_ci"] is None and none["per_class"]["healthy eyes"]["auroc_ci"] is None
    assert none["per_class"]["healthy eyes"]["sensitivity_ci"] is not None  # Wilson needs no bootstrap
    assert none["accuracy"] == first["accuracy"]


def test_percentile_interval_ignores_undefined_replicates():
    assert metrics.percentile_interval([np.nan, np.nan]) is None
    low, high = metrics.percentile_interval(np.r_[np.arange(101.0), [np.nan] * 5])
    assert (low, high) == pytest.approx((2.5, 97.5))


def test_likelihood_ratios_by_hand_with_log_method_intervals():
    stats = metrics.per_class_metrics(HAND_CM, 0)
    assert (stats["tp"], stats["fp"], stats["fn"], stats["tn"]) == (3, 2, 2, 20)
    assert stats["prevalence"] == pytest.approx(5 / 27)
    assert stats["lr_pos"] == pytest.approx((3 / 5) / (2 / 22))  # 6.6
    assert stats["lr_neg"] == pytest.approx((2 / 5) / (20 / 22))  # 0.44
    se_pos = math.sqrt(1 / 3 - 1 / 5 + 1 / 2 - 1 / 22)
    se_neg = math.sqrt(1 / 2 - 1 / 5 + 1 / 20 - 1 / 22)
    assert stats["lr_pos_ci"] == pytest.approx([6.6 * math.exp(-Z95 * se_pos), 6.6 * math.exp(Z95 * se_pos)])
    assert stats["lr_neg_ci"] == pytest.approx([0.44 * math.exp(-Z95 * se_neg),
                                               0.44 * math.exp(Z95 * se_neg)])
    assert stats["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))


def test_likelihood_ratios_with_a_zero_cell():
    perfect_sensitivity = metrics.likelihood_ratios(tp=5, fp=1, fn=0, tn=9)
    assert perfect_sensitivity["lr_neg"] == 0.0 and perfect_sensitivity["lr_neg_ci"][0] == 0.0
    assert perfect_sensitivity["lr_pos"] == pytest.approx(1.0 / 0.1)
    a, b, c, d = 5.5, 1.5, 0.5, 9.5  # Haldane: 0.5 added to every cell for the interval
    se = math.sqrt(1 / a - 1 / (a + c) + 1 / b - 1 / (b + d))
    centre = math.log((a / (a + c)) / (b / (b + d)))
    assert perfect_sensitivity["lr_pos_ci"] == pytest.approx([math.exp(centre - Z95 * se),
                                                             math.exp(centre + Z95 * se)])
    no_false_positive = metrics.likelihood_ratios(tp=3, fp=0, fn=1, tn=10)
    assert no_false_positive["lr_pos"] is None  # infinite
    assert all(math.isfinite(x) for x in no_false_positive["lr_pos_ci"])
    assert metrics.likelihood_ratios(0, 3, 0, 4)["lr_pos"] is None  # no positive image at all


def test_multiclass_mcc_by_hand_and_sklearn():
    # Gorodkin: (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)); t = (5, 12, 10),
    # p = (5, 15, 7), c = 19, s = 27.
    expected = (19 * 27 - (5 * 5 + 15 * 12 + 7 * 10)) / math.sqrt((27**2 - 299) * (27**2 - 269))
    values = metrics.metrics_from_confusion(HAND_CM[None])
    assert values["mcc"][0] == pytest.approx(expected)
    y_true = np.repeat(np.arange(3), HAND_CM.sum(axis=1))
    y_pred = np.concatenate([np.repeat(np.arange(3), row) for row in HAND_CM])
    assert values["mcc"][0] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    assert values["weighted_f1"][0] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    constant = np.array([[[4, 0], [3, 0]]])  # one predicted class: MCC 0, as sklearn
    assert metrics.metrics_from_confusion(constant)["mcc"][0] == 0.0


def test_brier_log_loss_and_ece_by_hand():
    y_true = np.array([0, 1])
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert metrics.brier_per_image(y_true, probs).tolist() == [0.0, 0.5]  # mean 0.25
    assert metrics.log_loss_per_image(y_true, probs).mean() == pytest.approx(math.log(2) / 2)
    # ECE, 10 bins: (0.9, 1] holds confidences .95 (right) and .95 (wrong): |1.9 - 1| = 0.9;
    # (0.5, 0.6] holds .55 (right) and .55 (right): |1.1 - 2| = 0.9; ECE = 1.8 / 4.
    y_true = np.array([0, 1, 0, 1])
    probs = np.array([[.95, .05, 0], [.95, 0, .05], [.55, .45, 0], [.45, .55, 0]])
    assert metrics.expected_calibration_error(y_true, probs, 10) == pytest.approx(0.45)
    assert metrics.calibration_bins([0.0, 0.1, 0.10001, 0.55, 1.0], 10).tolist() == [0, 0, 1, 5, 9]


def test_rule_and_operating_point_by_hand():
    probs = np.array([[.30, .60, .10], [.10, .80, .10], [.25, .70, .05], [.05, .15, .80],
                      [.50, .30, .20]])
    y_true = np.array([0, 0, 1, 2, 1])
    assert metrics.rule_predictions(probs, 0, 0.2).tolist() == [0, 1, 0, 2, 0]
    assert metrics.rule_predictions(probs, 0, 0.6).tolist() == [1, 1, 1, 2, 1]  # .5 < .6: not rare
    op = metrics.operating_point_metrics(y_true, probs, 0, 0.2)
    rule, argmax = op["rule"], op["argmax"]
    assert (rule["tp"], rule["fp"], rule["fn"], rule["tn"]) == (1, 2, 1, 1)
    assert (argmax["tp"], argmax["fp"], argmax["fn"], argmax["tn"]) == (0, 1, 2, 2)
    assert rule["sensitivity"] == 0.5 and rule["sensitivity_ci"] == pytest.approx(
        scipy_wilson(1, 2))
    assert np.array(op["confusion_matrix"]).sum() == 5


def test_intention_to_diagnose_counts_failures_as_errors():
    itd = metrics.intention_to_diagnose(np.array([0, 0, 1, 2]), np.array([0, -1, 1, 0]), 0)
    assert (itd["itd_n"], itd["itd_accuracy"], itd["itd_rare_sensitivity"]) == (4, 0.5, 0.5)
    assert itd["itd_accuracy_ci"] == pytest.approx(scipy_wilson(2, 4))


def test_mcnemar_exact_and_mid_p_by_hand():
    correct_a = np.array([True] * 10 + [False] * 2 + [True] * 5)
    correct_b = np.array([False] * 10 + [True] * 2 + [True] * 5)
    result = metrics.mcnemar_test(correct_a, correct_b)
    assert (result["a_only"], result["b_only"]) == (10, 2)
    assert result["p_exact"] == pytest.approx(binomtest(10, 12, 0.5).pvalue)
    # mid-p = 2 [P(X <= 2) - P(X = 2) / 2], X ~ Bin(12, 1/2): 2 (79 - 33) / 4096
    assert result["p_mid"] == pytest.approx(2 * 46 / 4096)
    assert metrics.mcnemar_test(correct_a, correct_a)["p_exact"] is None


# -- the vectorised metrics equal scikit-learn -----------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_metrics_equal_sklearn_with_sample_weights(seed):
    rng = np.random.default_rng(seed)
    y_true, probs = random_probs(rng, 60)
    probs = np.round(probs, 2)  # ties
    probs = probs / probs.sum(axis=1, keepdims=True)
    weights = rng.integers(0, 4, 60).astype(float) if seed else np.ones(60)
    values = metrics.weighted_metrics(weights[None], metrics.prepare_scores(y_true, probs))
    y_pred = probs.argmax(axis=1)
    sw = {"sample_weight": weights}
    assert values["accuracy"][0] == pytest.approx(accuracy_score(y_true, y_pred, **sw))
    assert values["balanced_accuracy"][0] == pytest.approx(balanced_accuracy_score(y_true, y_pred, **sw))
    for average in ("macro", "weighted"):
        assert values[f"{average}_f1"][0] == pytest.approx(
            f1_score(y_true, y_pred, average=average, labels=[0, 1, 2], zero_division=0, **sw))
    assert values["mcc"][0] == pytest.approx(matthews_corrcoef(y_true, y_pred, **sw))
    assert values["brier"][0] == pytest.approx(brier_score_loss(y_true, probs, labels=[0, 1, 2], **sw))
    assert values["log_loss"][0] == pytest.approx(log_loss(y_true, probs, labels=[0, 1, 2], **sw))
    for k in range(3):
        assert values["auroc"][0, k] == pytest.approx(roc_auc_score(y_true == k, probs[:, k], **sw))
        assert values["auprc"][0, k] == pytest.approx(
            average_precision_score(y_true == k, probs[:, k], **sw))
    assert values["macro_auroc"][0] == pytest.approx(values["auroc"][0].mean())


def test_compute_metrics_point_estimates_equal_sklearn():
    rng = np.random.default_rng(7)
    y_true, probs = random_probs(rng, 80)
    result = metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=0)
    y_pred = probs.argmax(axis=1)
    assert result["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    assert result["macro_auprc"] == pytest.approx(np.mean(
        [average_precision_score(y_true == k, probs[:, k]) for k in range(3)]))
    assert result["ece"] == pytest.approx(metrics.expected_calibration_error(y_true, probs, 10))
    assert result["ece_bins"] == 10 and result["accuracy_ci"] is None
    rare = result["per_class"]["orbital disease"]
    assert rare["auprc_baseline"] == pytest.approx(np.mean(y_true == 0))
    assert rare["f1"] == pytest.approx(f1_score(y_true == 0, y_pred == 0))
    assert set(rare) >= {"support", "prevalence", "tp", "fp", "fn", "tn", "sensitivity", "specificity",
                         "ppv", "npv", "lr_pos", "lr_neg", "f1", "auroc", "auprc", "auprc_baseline"}


def test_temperature_scaled_metrics_are_reported_beside_the_raw_ones():
    rng = np.random.default_rng(8)
    y_true = rng.integers(0, 3, 100)
    logits = 4 * (rng.normal(size=(100, 3)) + 1.5 * np.eye(3)[y_true])  # over-confident
    result = metrics.compute_metrics(y_true, metrics.softmax(logits), FOLDERS, 100, 0,
                                        probs_cal=metrics.softmax(logits, 4.0))
    scaled = result["temperature_scaled"]
    assert scaled["log_loss"] == pytest.approx(log_loss(y_true, metrics.softmax(logits / 4.0)))
    assert scaled["log_loss"] < result["log_loss"]  # T = 4 undoes the over-confidence
    assert len(scaled["ece_ci"]) == 2
    raw_only = metrics.compute_metrics(y_true, metrics.softmax(logits), FOLDERS, 0)
    assert raw_only["temperature_scaled"] is None


# -- the bootstrap -----------------------------------------------------------------------------------

def test_resample_weights_keep_groups_together_and_are_seeded():
    group_index = np.array([0, 0, 1, 1, 1, 2])
    first = np.concatenate(list(metrics.resample_weights(group_index, 300, seed=3, chunk=128)))
    assert first.shape == (300, 6)
    assert (first[:, 0] == first[:, 1]).all() and (first[:, 2] == first[:, 4]).all()
    assert (first[:, [0, 2, 5]].sum(axis=1) == 3).all()  # three groups drawn per replicate
    again = np.concatenate(list(metrics.resample_weights(group_index, 300, seed=3, chunk=64)))
    assert np.array_equal(first, again)  # chunk size does not change the replicates


def test_group_bootstrap_of_two_identical_groups_is_wider_than_image_bootstrap():
    # Two patients of 20 identical images each: one always right, one always wrong. Images are
    # not independent, so the honest interval of the accuracy spans 0..1.
    y_true = np.array([0] * 20 + [1] * 20)
    probs = np.tile([[0.8, 0.1, 0.1]], (40, 1))
    groups = np.array(["patient A"] * 20 + ["patient B"] * 20)
    by_image = metrics.compute_metrics(y_true, probs, FOLDERS, 500, seed=0)
    by_group = metrics.compute_metrics(y_true, probs, FOLDERS, 500, seed=0, groups=groups)
    assert by_image["accuracy"] == by_group["accuracy"] == 0.5
    assert by_group["accuracy_ci"] == [0.0, 1.0]
    image_width = by_image["accuracy_ci"][1] - by_image["accuracy_ci"][0]
    assert image_width < 0.5 < by_group["accuracy_ci"][1] - by_group["accuracy_ci"][0]
    assert (by_group["bootstrap_unit"], by_group["n_groups"]) == ("group", 2)
    assert (by_image["bootstrap_unit"], by_image["n_groups"]) == ("image", 40)


def test_paired_comparison_of_a_model_with_itself_is_zero():
    rng = np.random.default_rng(9)
    y_true, probs = random_probs(rng, 50)
    same = metrics.compare_models(y_true, probs, probs, None, 200, 0)
    for row in same["rows"][:-1]:
        assert row["difference"] == 0 and row["difference_ci"] == [0.0, 0.0]
    assert same["mcnemar"]["p_exact"] is None
    worse = metrics.compare_models(y_true, probs, np.full_like(probs, 1 / 3), None, 200, 0)
    auroc = next(r for r in worse["rows"] if r["metric"] == "macro_auroc")
    assert auroc["baseline"] == pytest.approx(0.5) and auroc["difference_ci"][0] > 0
    own = metrics.compute_metrics(y_true, probs, FOLDERS, 200, 0)
    assert auroc["model_ci"] == pytest.approx(own["macro_auroc_ci"])  # the same resamples


# -- clip_train.py's validation: selection metrics, loss, operating point, temperature -----------------

def test_operating_point_known_answer():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p_rare = np.array([0.9, 0.6, 0.4, 0.2, 0.5, 0.1, 0.3, 0.05])
    # 3 of 4 positives needed: include 0.4; the next lower score is 0.3 -> midway, 0.35.
    point = metrics.operating_point(y_true, p_rare, 0.75)
    assert point["operating_threshold"] == pytest.approx(0.35)
    assert point["operating_val_sensitivity"] == pytest.approx(0.75)
    assert point["operating_val_specificity"] == pytest.approx(3 / 4)  # 0.5 is a false positive
    assert metrics.operating_point(y_true, p_rare, 1.0)["operating_threshold"] == pytest.approx(0.15)
    # The lowest score of all: midway to 0.
    assert metrics.operating_point(np.array([0, 1]), np.array([0.2, 0.6]), 1.0)["operating_threshold"] == pytest.approx(0.1)
    assert math.isnan(metrics.operating_point(np.array([1, 2]), np.array([.2, .3]), .9)["operating_threshold"])


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 3)) * 2
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y_true = np.array([rng.choice(3, p=p) for p in probs])
    assert metrics.fit_temperature(true_logits * 3.0, y_true) == pytest.approx(3.0, rel=0.1)


def test_selection_metrics_known_answer():
    y_true = np.array([0, 0, 1, 1, 1, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .7, .2], [.6, .3, .1], [.1, .1, .8]])
    result = metrics.selection_metrics(y_true, probs)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["rare_sensitivity"] == pytest.approx(0.5)
    missing = metrics.selection_metrics(np.array([1, 2]), probs[:2])
    assert math.isnan(missing["macro_auroc"]) and math.isnan(missing["rare_sensitivity"])


@pytest.mark.parametrize("seed, absent", [(0, None), (1, None), (2, 2), (3, 0)])
def test_selection_metrics_equal_sklearn(seed, absent):
    """The numbers clip_train.py selects checkpoints by are scikit-learn's (its former code)."""
    rng = np.random.default_rng(seed)
    y_true, probs = random_probs(rng, 60, signal=1.0)
    if absent is not None:
        y_true[y_true == absent] = (absent + 1) % 3
    y_pred = probs.argmax(axis=1)
    result = metrics.selection_metrics(y_true, probs)
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    with pytest.warns(UserWarning) if absent is not None else contextlib.nullcontext():
        assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert result["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro",
                                                        zero_division=0))
    if absent is None:
        assert result["macro_auroc"] == pytest.approx(roc_auc_score(y_true, probs, multi_class="ovr"))
        assert result["rare_sensitivity"] == pytest.approx(np.mean(y_pred[y_true == 0] == 0))
    else:
        assert math.isnan(result["macro_auroc"])
        assert math.isnan(result["rare_sensitivity"]) == (absent == 0)


def test_mean_nll_is_the_log_loss_of_the_tempered_softmax():
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 3, 50)
    logits = 3 * rng.normal(size=(50, 3))
    for temperature in (1.0, 0.5, 2.5):
        expected = log_loss(y_true, metrics.softmax(logits, temperature), labels=[0, 1, 2])
        assert metrics.mean_nll(logits, y_true, temperature) == pytest.approx(expected, rel=1e-9)
    assert metrics.mean_nll([[0.0, 0.0]], [1]) == pytest.approx(math.log(2))


def test_metrics_and_report_import_without_torch():
    """The statistics and the report stay readable and testable without the model stack."""
    code = ("import sys, metrics, report; "
            "assert not {'torch', 'open_clip', 'common'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)
