"""The operating rule (call the rare class when its probability reaches a threshold): its
predictions, its statistics with image- and patient-level intervals, and intention-to-diagnose
counts; and what training selects checkpoints and thresholds by on validation.
"""

import math

import numpy as np

from orbital_clip.metrics.bootstrap import (bootstrap_strata, group_indices, percentile_interval,
                                            prepare_scores, resample_weights, weighted_metrics)
from orbital_clip.metrics.classification import (CONFIDENCE_LEVEL, DEFAULT_SEED, PROPORTIONS,
                                                 confusion_matrices, one_vs_rest_counts,
                                                 per_class_metrics, proportion, wilson_interval)


def rule_predictions(probs, rare_index, threshold):
    """Predictions of the operating rule: the rare class if p(rare) >= threshold, otherwise the
    most probable of the other classes."""
    probs = np.asarray(probs, dtype=np.float64)
    others = probs.copy()
    others[:, rare_index] = -np.inf
    predicted = others.argmax(axis=1)
    predicted[probs[:, rare_index] >= threshold] = rare_index
    return predicted


def binary_summary(positive, predicted, confidence=CONFIDENCE_LEVEL):
    """Counts, sensitivity, specificity, PPV, NPV (Wilson) and LR+/LR- of a binary rule."""
    positive, predicted = np.asarray(positive, bool), np.asarray(predicted, bool)
    cm = np.array([[np.sum(positive & predicted), np.sum(positive & ~predicted)],
                   [np.sum(~positive & predicted), np.sum(~positive & ~predicted)]])
    stats = per_class_metrics(cm, 0, confidence)
    stats.pop("f1"), stats.pop("prevalence")
    return stats


def operating_point_metrics(y_true, probs, rare_index, threshold, confidence=CONFIDENCE_LEVEL, *,
                            groups=None, n_bootstrap=0, seed=DEFAULT_SEED):
    """The rare class under 'p(rare) >= threshold' beside the same statistics under argmax.

    The `<name>_ci` of each rule are Wilson intervals, which treat images as independent. With
    `groups` (patients) and `n_bootstrap`, the sensitivity and specificity of each rule also get
    a patient-level interval, `<name>_ci_patient`: the percentile interval of a cluster bootstrap
    of patients stratified by class (the resamples of `compute_metrics` with the same seed), with
    `<name>_ci_patient_n_resamples` the resamples that had a positive (negative) image.

    Returns
    -------
    dict: rule -> binary_summary of the threshold rule, argmax -> binary_summary of argmax,
    confusion_matrix -> (C, C) of the rule's multi-class predictions (see `rule_predictions`),
    interval_levels -> {interval key: 'image (...)' or 'patient (...)'}.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    positive = y_true == rare_index
    rule = rule_predictions(probs, rare_index, threshold)
    out = {"rule": binary_summary(positive, rule == rare_index, confidence),
           "argmax": binary_summary(positive, probs.argmax(axis=1) == rare_index, confidence),
           "confusion_matrix": confusion_matrices(y_true, rule, probs.shape[1]).tolist(),
           "interval_levels": {f"{name}_ci": "image (Wilson)" for name in PROPORTIONS}}
    if groups is None or not n_bootstrap or len(y_true) == 0:
        return out
    group_index = group_indices(groups, len(y_true))
    patient = {key: patient_level_intervals(positive, predicted, y_true, group_index, n_bootstrap,
                                            seed, confidence)
               for key, predicted in (("rule", rule == rare_index),
                                      ("argmax", probs.argmax(axis=1) == rare_index))}
    for key, intervals in patient.items():
        out[key].update(intervals)
    for name in ("sensitivity", "specificity"):
        out["interval_levels"][f"{name}_ci_patient"] = (
            f"patient (cluster bootstrap of patients stratified by class, {n_bootstrap} resamples)")
    return out


def patient_level_intervals(positive, predicted, y_true, group_index, n_bootstrap, seed,
                            confidence=CONFIDENCE_LEVEL):
    """Cluster-bootstrap percentile intervals of the sensitivity and specificity of a binary rule
    (`predicted`) for the class `positive`; see `operating_point_metrics`."""
    hit = np.stack([positive & predicted, positive, ~positive & ~predicted, ~positive],
                   axis=1).astype(np.float64)  # (N, 4): TP, P, TN, N indicators
    strata = bootstrap_strata(y_true, group_index)
    sums = np.concatenate([w @ hit for w in resample_weights(group_index, n_bootstrap, seed,
                                                             strata=strata)])  # (B, 4)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, ratio in (("sensitivity", sums[:, 0] / sums[:, 1]),
                            ("specificity", sums[:, 2] / sums[:, 3])):
            usable = int(np.isfinite(ratio).sum())
            out[f"{name}_ci_patient"] = percentile_interval(ratio, confidence) if usable else None
            out[f"{name}_ci_patient_n_resamples"] = usable
    return out


CLASS_PATIENT_LEVELS = "per_class sensitivity_ci_patient, specificity_ci_patient"


def with_class_patient_intervals(metrics, y_true, y_pred, class_names, groups, n_bootstrap,
                                 seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """`metrics` (of `compute_metrics`, with `interval_levels`) with a patient-level interval
    beside each class's Wilson sensitivity and specificity: `patient_level_intervals` of the
    rule 'predicted k' for class k, the function behind the operating point's patient intervals.
    One home for every evaluation path (a checkpoint, an answer file), so the same predictions
    get the same intervals whichever path scored them. Without groups or resamples: unchanged
    (a Wilson interval already counts images)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if groups is None or not n_bootstrap or len(y_true) == 0:
        return metrics
    group_index = group_indices(groups, len(y_true))
    per_class = {name: {**metrics["per_class"][name],
                        **patient_level_intervals(y_true == k, y_pred == k, y_true, group_index,
                                                  n_bootstrap, seed, confidence)}
                 for k, name in enumerate(class_names)}
    levels = {**(metrics.get("interval_levels") or {}), CLASS_PATIENT_LEVELS: (
        f"patient (cluster bootstrap of patients stratified by class, {n_bootstrap} resamples)")}
    return {**metrics, "per_class": per_class, "interval_levels": levels}


def intention_to_diagnose(y_true, y_pred, rare_index, confidence=CONFIDENCE_LEVEL, prefix="itd"):
    """Accuracy and rare-class sensitivity over every image received, an unreadable image
    (y_pred -1) counting as an error (STARD's intention-to-diagnose analysis). Keys start with
    `prefix` (itd for argmax, itd_rule for the operating rule); intervals are Wilson (images)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    correct = int(np.sum(y_true == y_pred))
    rare = y_true == rare_index
    hits = int(np.sum(rare & (y_pred == rare_index)))
    return {f"{prefix}_n": int(len(y_true)),
            f"{prefix}_accuracy": proportion(correct, len(y_true)),
            f"{prefix}_accuracy_ci": wilson_interval(correct, len(y_true), confidence),
            f"{prefix}_rare_sensitivity": proportion(hits, int(rare.sum())),
            f"{prefix}_rare_sensitivity_ci": wilson_interval(hits, int(rare.sum()), confidence)}


# ----------------------------------------------------------------------------------------------
# Validation during training (clip_train.py): checkpoint selection, operating threshold, temperature


def is_improvement(value, best, lower_is_better=False):
    """Whether `value` beats `best` strictly (the published rule: a tie keeps the earlier
    checkpoint); NaN or None never wins, and anything beats no best yet."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if lower_is_better else value > best


def selection_metrics(y_true, probs, rare_index=0):
    """The checkpoint-selection metrics of one validation pass, computed by the code behind the
    point estimates of metrics.json (so a checkpoint is chosen by the numbers inference reports).
    `y_true` (N,) and `probs` (N, C) as in `compute_metrics`; `rare_index` is the class whose
    sensitivity is reported.

    Returns
    -------
    dict: accuracy, balanced_accuracy, macro_f1, macro_auroc (NaN unless every class has a
    positive and a negative image), rare_sensitivity (NaN without a rare image), as floats.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    point = weighted_metrics(np.ones((1, len(y_true))), prepare_scores(y_true, probs))
    tp, _fp, fn, _tn = one_vs_rest_counts(confusion_matrices(y_true, probs.argmax(axis=1),
                                                             probs.shape[1]), rare_index)
    rare_sensitivity = proportion(tp, tp + fn)
    return {"accuracy": float(point["accuracy"][0]),
            "balanced_accuracy": float(point["balanced_accuracy"][0]),
            "macro_f1": float(point["macro_f1"][0]),
            "macro_auroc": float(point["macro_auroc"][0]),
            "rare_sensitivity": float("nan") if rare_sensitivity is None else rare_sensitivity}


def operating_point(y_true, p_rare, target_sensitivity, rare_index=0):
    """The rare-class rule 'positive if p >= threshold' tuned on validation data: the most specific
    rule whose sensitivity still reaches the target. The threshold sits midway between the lowest
    rare-class score the rule must include and the next lower validation score, not on that score
    itself: the same validation sensitivity and specificity, but a rare image scoring a little
    lower than its validation counterparts is not missed for want of a margin.

    Returns a dict with operating_threshold and the validation sensitivity/specificity it gives
    (NaN threshold when the validation set has no rare-class image).
    """
    positive = np.asarray(y_true) == rare_index
    if not positive.any():
        return {"operating_threshold": float("nan"), "operating_val_sensitivity": float("nan"),
                "operating_val_specificity": float("nan")}
    scores = np.sort(np.asarray(p_rare, dtype=np.float64)[positive])[::-1]
    needed = max(1, math.ceil(target_sensitivity * len(scores) - 1e-9))
    included = scores[needed - 1]
    all_scores = np.asarray(p_rare, dtype=np.float64)
    below = all_scores[all_scores < included]
    threshold = float((included + (below.max() if below.size else 0.0)) / 2)
    predicted = all_scores >= threshold
    specificity = float((~predicted[~positive]).mean()) if (~positive).any() else float("nan")
    return {"operating_threshold": threshold,
            "operating_val_sensitivity": float(predicted[positive].mean()),
            "operating_val_specificity": specificity}
