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

from orbital_clip import metrics

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
    # no image of the class: its row is counts only, not a specificity and NPV of 1.000 (issue 25)
    assert stats["specificity"] is None and stats["npv"] is None and stats["f1"] is None
    assert (stats["tn"], stats["fp"]) == (4, 0)


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
    # counts kept (1 false positive of 7), rates n/a: no rare image was scored (issue 25)
    assert rare["auroc_ci"] is None and rare["specificity"] is None and rare["fp"] == 1
    assert result["balanced_accuracy"] is None and result["macro_f1"] is None
    assert result["unscored_classes"] == ["orbital disease"]
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
    # LR+ is infinite: estimate and interval both left out (both or neither), LR- still reported
    assert no_false_positive["lr_pos"] is None and no_false_positive["lr_pos_ci"] is None
    assert no_false_positive["lr_neg"] == pytest.approx(0.25) and no_false_positive["lr_neg_ci"]
    no_true_negative = metrics.likelihood_ratios(tp=3, fp=4, fn=1, tn=0)
    assert no_true_negative["lr_neg"] is None and no_true_negative["lr_neg_ci"] is None
    assert metrics.likelihood_ratios(0, 3, 0, 4)["lr_pos"] is None  # no positive image at all
    assert metrics.likelihood_ratios(0, 3, 0, 4)["lr_pos_ci"] is None
    for tp, fp, fn, tn in ((3, 0, 1, 10), (0, 0, 2, 5), (4, 2, 0, 0), (1, 1, 1, 1)):
        stats = metrics.likelihood_ratios(tp, fp, fn, tn)
        for key in ("lr_pos", "lr_neg"):
            assert (stats[key] is None) == (stats[f"{key}_ci"] is None)


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


def reference_ece(y_true, probs, n_bins):
    """ECE as Guo et al. 2017 define it, written out loop by loop: the reference the vectorised
    bootstrap's ECE is checked against."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    total = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        inside = (confidence > low) & (confidence <= high) if b else confidence <= high
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return total / len(probs)


def test_brier_log_loss_and_ece_by_hand():
    y_true = np.array([0, 1])
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert metrics.brier_per_image(y_true, probs).tolist() == [0.0, 0.5]  # mean 0.25
    assert metrics.log_loss_per_image(y_true, probs).mean() == pytest.approx(math.log(2) / 2)
    # ECE, 10 bins: (0.9, 1] holds confidences .95 (right) and .95 (wrong): |1.9 - 1| = 0.9;
    # (0.5, 0.6] holds .55 (right) and .55 (right): |1.1 - 2| = 0.9; ECE = 1.8 / 4.
    y_true = np.array([0, 1, 0, 1])
    probs = np.array([[.95, .05, 0], [.95, 0, .05], [.55, .45, 0], [.45, .55, 0]])
    assert metrics.compute_metrics(y_true, probs, FOLDERS, n_bootstrap=0)["ece"] == pytest.approx(0.45)
    assert reference_ece(y_true, probs, 10) == pytest.approx(0.45)
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
    assert result["ece"] == pytest.approx(reference_ece(y_true, probs, 10))
    assert result["ece_bins"] == 10 and result["accuracy_ci"] is None
    rare = result["per_class"]["orbital disease"]
    assert rare["auprc_baseline"] == pytest.approx(
        metrics.expected_random_average_precision(np.sum(y_true == 0), 80))
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


def test_group_bootstrap_of_identical_images_is_wider_than_image_bootstrap():
    # Four patients of 20 identical images each, two per class: in each class one patient always
    # right, one always wrong. Images are not independent, so the honest interval of the accuracy
    # spans 0..1 (the class-stratified draw keeps two patients per class in every resample).
    y_true = np.array([0] * 40 + [1] * 40)
    probs = np.tile([[0.8, 0.1, 0.1]], (80, 1))
    probs[20:40] = [0.1, 0.8, 0.1]  # patient B (class 0) wrong
    probs[40:60] = [0.1, 0.8, 0.1]  # patient C (class 1) right, patient D wrong
    groups = np.repeat(["patient A", "patient B", "patient C", "patient D"], 20)
    by_image = metrics.compute_metrics(y_true, probs, FOLDERS, 500, seed=0)
    by_group = metrics.compute_metrics(y_true, probs, FOLDERS, 500, seed=0, groups=groups)
    assert by_image["accuracy"] == by_group["accuracy"] == 0.5
    assert by_group["accuracy_ci"] == [0.0, 1.0]
    image_width = by_image["accuracy_ci"][1] - by_image["accuracy_ci"][0]
    assert image_width < 0.5 < by_group["accuracy_ci"][1] - by_group["accuracy_ci"][0]
    assert (by_group["bootstrap_unit"], by_group["n_groups"]) == ("group", 4)
    assert (by_image["bootstrap_unit"], by_image["n_groups"]) == ("image", 80)
    assert by_group["bootstrap_design"]["units_per_stratum"] == {
        "orbital disease": 2, "healthy eyes": 2, "non-orbital disease": 0}


def perfect_cohort(n_patients=30, n_rare=2, seed=0):
    """A perfect classifier on n_patients, n_rare of them of the rare class 0, 1-3 images each."""
    rng = np.random.default_rng(seed)
    patient_class = np.r_[np.zeros(n_rare, int), rng.integers(1, 3, n_patients - n_rare)]
    sizes = rng.integers(1, 4, n_patients)
    y_true = np.repeat(patient_class, sizes)
    groups = np.repeat([f"P{i:02d}" for i in range(n_patients)], sizes)
    probs = np.full((len(y_true), 3), 0.1)
    probs[np.arange(len(y_true)), y_true] = 0.8
    return y_true, probs, groups


def test_stratified_patient_bootstrap_of_a_perfect_classifier_is_one_in_every_resample():
    # The known answer: 30 patients, 2 of them rare, patient bootstrap. Unstratified,
    # ~13% of the resamples hold no rare patient and macro-F1 scored the absent class 0 (CI
    # [0.667, 1]); stratified by class every resample holds both rare patients.
    y_true, probs, groups = perfect_cohort()
    result = metrics.compute_metrics(y_true, probs, FOLDERS, 2000, seed=1, groups=groups)
    for name in ("macro_f1", "balanced_accuracy", "accuracy", "macro_auroc", "macro_auprc"):
        assert result[name] == 1.0 and result[f"{name}_ci"] == [1.0, 1.0], name
        assert result[f"{name}_ci_n_resamples"] == 2000, name
    rare = result["per_class"]["orbital disease"]
    assert rare["f1_ci"] == [1.0, 1.0] and rare["auroc_ci_n_resamples"] == 2000
    design = result["bootstrap_design"]
    assert (design["resamples"], design["unit"]) == (2000, "patient")
    assert design["units_per_stratum"]["orbital disease"] == 2
    json.dumps(result, allow_nan=False)


def test_unstratified_resamples_without_the_rare_class_are_counted_unusable():
    y_true, probs, groups = perfect_cohort()
    group_index = metrics.group_indices(groups, len(y_true))
    prepared = metrics.prepare_scores(y_true, probs)
    boot = metrics.bootstrap_replicates([prepared], group_index, 2000, 1, stratify=False)[0]
    weights = np.concatenate(list(metrics.resample_weights(group_index, 2000, 1)))
    # hand count of the resamples missing a class (nearly all of them miss the rare one)
    missing = np.stack([weights[:, y_true == k].sum(axis=1) == 0 for k in range(3)], axis=1)
    assert 0.08 < missing[:, 0].mean() < 0.18  # (28/30)^30 = 0.126
    for name in ("macro_f1", "balanced_accuracy", "macro_auroc"):
        assert np.array_equal(np.isnan(boot[name]), missing.any(axis=1)), name  # not scored 0
    assert np.array_equal(np.isnan(boot["f1"]), missing)
    assert (boot["macro_f1"][~missing.any(axis=1)] == 1.0).all() and (boot["accuracy"] == 1.0).all()


def test_bootstrap_strata_by_class_and_by_the_rarest_class_of_a_mixed_patient():
    # Groups holding each class: class 0 {P1, P5} = 2, class 1 {P2, P3, P5} = 3, class 2
    # {P3, P4} = 2: rarest first 0, 2 (tie: lower index first), 1.
    y_true = np.array([0, 1, 1, 2, 2, 0, 1])
    group_index = np.array([0, 1, 2, 2, 3, 4, 4])  # P1..P5 = 0..4
    assert metrics.bootstrap_strata(y_true, group_index).tolist() == [0, 1, 2, 2, 0]
    assert metrics.bootstrap_strata(y_true, np.arange(7)).tolist() == y_true.tolist()  # images


def test_stratified_resamples_keep_the_units_of_each_stratum():
    strata = np.array([0, 0, 1, 1, 1, 2])  # stratum of groups 0..5
    group_index = np.array([0, 0, 1, 2, 3, 4, 5, 5])
    first = np.concatenate(list(metrics.resample_weights(group_index, 3000, 4, 128, strata)))
    again = np.concatenate(list(metrics.resample_weights(group_index, 3000, 4, 1000, strata)))
    assert np.array_equal(first, again)  # chunking changes nothing
    per_group = first[:, [0, 2, 3, 4, 5, 6]]  # one image column per group
    assert (per_group[:, :2].sum(axis=1) == 2).all() and (per_group[:, 2:5].sum(axis=1) == 3).all()
    assert (per_group[:, 5] == 1).all()  # a stratum of one group: always drawn once
    assert (first[:, 0] == first[:, 1]).all()  # a group's images stay together
    assert per_group.mean(axis=0) == pytest.approx(np.ones(6), abs=0.06)  # each drawn 1x on average


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


@pytest.mark.slow
def test_metrics_and_report_import_without_torch():
    """The statistics and the report stay readable and testable without the model stack."""
    code = ("import sys; from orbital_clip import metrics, report; "
            "assert not {'torch', 'open_clip', 'orbital_clip.common'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, check=True)


# -- chance level of AUPRC, p-value text, patient-level operating point (issue 14) ------------------

def test_expected_random_average_precision_exact_by_enumeration():
    import itertools
    for n, m in ((5, 1), (6, 2), (7, 3)):
        values = []
        for positions in itertools.combinations(range(n), m):  # every ranking, equally likely
            labels = np.zeros(n, bool)
            labels[list(positions)] = True
            values.append(average_precision_score(labels, -np.arange(n)))  # rank 1 scores highest
        assert metrics.expected_random_average_precision(m, n) == pytest.approx(np.mean(values))
    assert metrics.expected_random_average_precision(1, 5) == pytest.approx(sum(1 / r for r in range(1, 6)) / 5)
    assert metrics.expected_random_average_precision(0, 5) is None
    assert metrics.expected_random_average_precision(5, 5) is None


def test_expected_random_average_precision_against_a_permutation_estimate():
    # The example: 4 positives among 80 give 0.098, not the prevalence 0.05.
    n, m = 80, 4
    expected = metrics.expected_random_average_precision(m, n)
    assert round(expected, 3) == 0.098
    rng = np.random.default_rng(0)
    ranks = np.sort(rng.random((20000, n)).argsort(axis=1)[:, :m] + 1, axis=1)  # positives' ranks
    ap = (np.arange(1, m + 1) / ranks).mean(axis=1)  # precision at each positive, averaged
    labels = np.zeros(n, bool)
    labels[ranks[0] - 1] = True
    assert ap[0] == pytest.approx(average_precision_score(labels, -np.arange(n)))
    assert abs(ap.mean() - expected) < 4 * ap.std() / math.sqrt(len(ap))
    assert abs(ap.mean() - m / n) > 10 * ap.std() / math.sqrt(len(ap))  # not the prevalence


def test_format_p_of_a_bootstrap_p_of_zero_says_less_than_two_over_b():
    assert metrics.format_p(0.0, 2000) == "< 0.001"
    assert metrics.format_p(0.0, 200) == "< 0.01"
    assert metrics.format_p(0.0) == "<0.001"  # no resample count: as before
    assert metrics.format_p(0.0004, 2000) == "<0.001" and metrics.format_p(0.0123, 500) == "0.012"
    assert metrics.format_p(None, 2000) == "n/a"


def test_operating_point_patient_intervals_follow_patients_not_image_copies():
    rng = np.random.default_rng(3)
    n_patients = 40
    y_patient = rng.integers(0, 3, n_patients)
    probs_patient = metrics.softmax(rng.normal(size=(n_patients, 3)) + 1.5 * np.eye(3)[y_patient])
    names = np.array([f"P{i:02d}" for i in range(n_patients)])
    one = metrics.operating_point_metrics(y_patient, probs_patient, 0, 0.4, groups=names,
                                          n_bootstrap=500, seed=2)
    copies = 10  # every patient photographed ten times, identically
    ten = metrics.operating_point_metrics(np.repeat(y_patient, copies), np.repeat(probs_patient, copies, 0),
                                          0, 0.4, groups=np.repeat(names, copies), n_bootstrap=500, seed=2)
    for rule in ("rule", "argmax"):
        for name in ("sensitivity", "specificity"):
            assert ten[rule][name] == pytest.approx(one[rule][name])
            # the patient-level interval does not shrink with copies; Wilson's (images) does
            assert ten[rule][f"{name}_ci_patient"] == pytest.approx(one[rule][f"{name}_ci_patient"])
            wilson_one, wilson_ten = one[rule][f"{name}_ci"], ten[rule][f"{name}_ci"]
            assert wilson_ten[1] - wilson_ten[0] < 0.6 * (wilson_one[1] - wilson_one[0])
            assert ten[rule][f"{name}_ci_patient_n_resamples"] == 500
            low, high = ten[rule][f"{name}_ci_patient"]
            assert low <= ten[rule][name] <= high
    assert ten["interval_levels"]["sensitivity_ci"] == "image (Wilson)"
    assert ten["interval_levels"]["sensitivity_ci_patient"].startswith("patient")
    no_groups = metrics.operating_point_metrics(y_patient, probs_patient, 0, 0.4, n_bootstrap=500)
    assert "sensitivity_ci_patient" not in no_groups["rule"]
    assert set(no_groups["interval_levels"]) == {f"{p}_ci" for p in metrics.PROPORTIONS}


def test_operating_point_patient_interval_by_hand():
    # Two rare patients: A (two images, both found) and B (one image, missed). The stratified
    # patient bootstrap draws 2 rare patients: BB, AB, AA give 0, 2/3, 1 with probabilities
    # 1/4, 1/2, 1/4, so the 95% percentile interval is [0, 1].
    y_true = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[.9, .05, .05], [.9, .05, .05], [.1, .8, .1], [.1, .8, .1], [.1, .8, .1],
                      [.1, .1, .8]])
    groups = np.array(["A", "A", "B", "C", "D", "E"])
    op = metrics.operating_point_metrics(y_true, probs, 0, 0.5, groups=groups, n_bootstrap=4000, seed=0)
    assert op["rule"]["sensitivity"] == pytest.approx(2 / 3)  # 2 of 3 images: image-level
    assert op["rule"]["sensitivity_ci_patient"] == [0.0, 1.0]
    assert op["rule"]["specificity_ci_patient"] == [1.0, 1.0]


def test_intention_to_diagnose_of_the_rule_has_its_own_keys():
    itd = metrics.intention_to_diagnose(np.array([0, 0, 1, 2]), np.array([0, 0, -1, 2]), 0,
                                        prefix="itd_rule")
    assert (itd["itd_rule_n"], itd["itd_rule_accuracy"], itd["itd_rule_rare_sensitivity"]) == (4, 0.75, 1.0)
    assert itd["itd_rule_accuracy_ci"] == pytest.approx(metrics.wilson_interval(3, 4))


# -- sequential readings (the paper's second step), by hand and against statsmodels ------------------

# 9 images of 3 subtypes read at 3 steps; -1 is a failed reading (an unmapped answer at step 2,
# a missing image at step 3). Hand counts are in each test.
SEQ_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
SEQ_PREDS = np.array([[0, 1, 2, 1, 0, 1, 2, 0, 0],
                      [0, 0, -1, 1, 1, 1, 2, 2, 0],
                      [0, 0, 0, 1, -1, 0, 2, 2, 2]])
SEQ_STEPS = ["image", "image+demographics", "image+demographics+symptoms"]
SUBTYPES = ["thyroid eye disease", "orbital inflammation", "orbital tumour"]


def seq_row(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, match
    return found[0]


def test_cochrans_q_agrees_with_statsmodels_and_equals_mcnemar_chi2_for_two_steps():
    from statsmodels.stats.contingency_tables import cochrans_q, mcnemar
    rng = np.random.default_rng(3)
    x = rng.random((60, 4)) < [0.3, 0.5, 0.6, 0.8]
    ours, ref = metrics.cochrans_q(x), cochrans_q(x.astype(int))
    assert ours["q"] == pytest.approx(ref.statistic) and ours["p_value"] == pytest.approx(ref.pvalue)
    assert ours["df"] == ref.df == 3 and ours["n"] == 60
    two = x[:, :2]
    table = [[np.sum(two[:, 0] & two[:, 1]), np.sum(two[:, 0] & ~two[:, 1])],
             [np.sum(~two[:, 0] & two[:, 1]), np.sum(~two[:, 0] & ~two[:, 1])]]
    chi = mcnemar(table, exact=False, correction=False)
    assert metrics.cochrans_q(two)["q"] == pytest.approx(chi.statistic)
    assert metrics.cochrans_q(two)["p_value"] == pytest.approx(chi.pvalue)


def test_cochrans_q_is_undefined_without_a_discordant_subject():
    same = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1]])
    assert metrics.cochrans_q(same) == {"q": None, "df": 2, "p_value": None, "n": 3}
    assert metrics.cochrans_q(np.zeros((0, 3)))["p_value"] is None


def test_sequential_per_step_sensitivity_and_specificity_by_hand():
    out = metrics.sequential_analysis(SEQ_TRUE, SEQ_PREDS, SUBTYPES, SEQ_STEPS, n_bootstrap=0)
    rows = out["per_step"]
    expected_sens = {  # (hits, n): failed readings leave the step's denominator
        "thyroid eye disease": [(1, 3), (2, 2), (3, 3)],
        "orbital inflammation": [(2, 3), (3, 3), (1, 2)],
        "orbital tumour": [(1, 3), (2, 3), (3, 3)]}
    for name, counts in expected_sens.items():
        for step, (hits, n) in zip(SEQ_STEPS, counts):
            row = seq_row(rows, **{"class": name, "measure": "sensitivity", "step": step})
            assert (row["hits"], row["n"]) == (hits, n)
            assert row["value"] == pytest.approx(hits / n)
            assert row["ci"] == pytest.approx(metrics.wilson_interval(hits, n))
    # TED specificity: not predicted TED among the 6 others: 3/6, 5/6, 4/5 (image 4 failed at step 3)
    spec = [seq_row(rows, **{"class": "thyroid eye disease", "measure": "specificity", "step": s})
            for s in SEQ_STEPS]
    assert [(r["hits"], r["n"]) for r in spec] == [(3, 6), (5, 6), (4, 5)]
    assert out["n_received"] == 9 and out["n_complete"] == 7 and len(rows) == 3 * 2 * 3


def test_sequential_paired_changes_and_mcnemar_by_hand_and_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar
    out = metrics.sequential_analysis(SEQ_TRUE, SEQ_PREDS, SUBTYPES, SEQ_STEPS, n_bootstrap=0)
    # step 1 -> 2 on the 8 images both read (image 2 unmapped at step 2): TED sensitivity on
    # images 0, 1: 1/2 -> 2/2, one gained (image 1), none lost
    ted = seq_row(out["changes"], **{"class": "thyroid eye disease", "measure": "sensitivity",
                                     "to_step": SEQ_STEPS[1]})
    assert (ted["n"], ted["from_value"], ted["to_value"], ted["difference"]) == (2, 0.5, 1.0, 0.5)
    assert (ted["gained"], ted["lost"]) == (1, 0)
    assert ted["p_exact"] == pytest.approx(1.0) and ted["p_mid"] == pytest.approx(0.5)
    assert ted["difference_ci"] is None  # no bootstrap asked
    # step 2 -> 3 on the 7 images both read: inflammation sensitivity on images 3, 5: 2/2 -> 1/2
    infl = seq_row(out["changes"], **{"class": "orbital inflammation", "measure": "sensitivity",
                                      "from_step": SEQ_STEPS[1]})
    assert (infl["n"], infl["difference"], infl["gained"], infl["lost"]) == (2, -0.5, 0, 1)
    # tumour sensitivity, step 1 -> 2, images 6-8: [1,0,0] -> [1,1,0]; and specificity rows too
    tum = seq_row(out["changes"], **{"class": "orbital tumour", "measure": "sensitivity",
                                     "to_step": SEQ_STEPS[1]})
    table = [[1, 0], [1, 1]]  # rows step 1 right/wrong, columns step 2 right/wrong
    assert tum["p_exact"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert len(out["changes"]) == 2 * 3 * 2


def test_sequential_cochrans_q_by_hand_on_complete_cases():
    from statsmodels.stats.contingency_tables import cochrans_q
    out = metrics.sequential_analysis(SEQ_TRUE, SEQ_PREDS, SUBTYPES, SEQ_STEPS, n_bootstrap=0)
    # TED sensitivity, images 0 and 1 (image 2 is not complete): rows [1,1,1], [0,1,1]
    # Q = (3-1)(3*(1+4+4) - 5^2) / (3*5 - (9+4)) = 2, p = exp(-1)
    ted = seq_row(out["omnibus"], **{"class": "thyroid eye disease", "measure": "sensitivity"})
    assert (ted["q"], ted["df"], ted["n"]) == (pytest.approx(2.0), 2, 2)
    assert ted["p_value"] == pytest.approx(math.exp(-1))
    # tumour sensitivity, images 6-8: rows [1,1,1], [0,1,1], [0,0,1]: Q = 2*6/4 = 3, p = exp(-1.5)
    tum = seq_row(out["omnibus"], **{"class": "orbital tumour", "measure": "sensitivity"})
    assert tum["q"] == pytest.approx(3.0) and tum["p_value"] == pytest.approx(math.exp(-1.5))
    ref = cochrans_q(np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]]))
    assert tum["q"] == pytest.approx(ref.statistic) and tum["p_value"] == pytest.approx(ref.pvalue)


def test_sequential_bootstrap_ci_uses_the_shared_resamples_and_keeps_patients_together():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 80)
    preds = np.stack([np.where(rng.random(80) < r, y, rng.integers(0, 3, 80)) for r in (0.5, 0.8)])
    out = metrics.sequential_analysis(y, preds, SUBTYPES, SEQ_STEPS[:2], n_bootstrap=300, seed=7)
    row = seq_row(out["changes"], **{"class": "orbital tumour", "measure": "sensitivity"})
    # reference: the same replicate weights, the ratio of weighted hits computed plainly
    rel = y == 2
    diffs = [(w @ (rel & (preds[1] == 2)) - w @ (rel & (preds[0] == 2))) / (w @ rel)
             for chunk in metrics.resample_weights(np.arange(80), 300, 7,  # class-stratified
                                                   strata=metrics.bootstrap_strata(y, np.arange(80)))
             for w in chunk]
    assert row["difference_ci"] == pytest.approx(metrics.percentile_interval(diffs))
    assert row["difference_ci"][0] < row["difference"] < row["difference_ci"][1]
    # one patient holding every image: each replicate is that patient k times, so the interval
    # collapses on the estimate (groups reach the resampling)
    one = metrics.sequential_analysis(y, preds, SUBTYPES, SEQ_STEPS[:2], groups=["P1"] * 80,
                                      n_bootstrap=50, seed=7)
    row = seq_row(one["changes"], **{"class": "orbital tumour", "measure": "sensitivity"})
    assert row["difference_ci"] == pytest.approx([row["difference"]] * 2)
    assert one["bootstrap_unit"] == "group"
