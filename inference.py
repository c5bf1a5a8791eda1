"""Evaluate an OpenCLIP model on an external cohort, with the statistics a journal asks for
(STARD 2015, TRIPOD+AI 2024, CLAIM 2024).

Each class is one embedding: the mean of the normalised text embeddings of its evaluation prompts
(a prompt ensemble). An image's class probabilities are the softmax of its scaled cosine
similarities to those embeddings. Labels are the class folder names, matched by name (never by
sort order); a test folder without class folders is predicted but not scored. An unreadable image
keeps its row in predictions.csv with a `failed: <reason>` status, is left out of the metrics and
counted in the flow table and in the intention-to-diagnose line of the report.

--checkpoint takes a checkpoint written by clip_train.py (architecture, classes, prompts, the
validation operating threshold and temperature come from it), a plain open_clip state_dict as the
published code saved it (--model-name required), or an open_clip pretrained tag for the zero-shot
baseline (--model-name required). --test-dir takes class folders, images without class folders,
or a manifest.csv of data_preprocess.py (rows of --split, default test; its `group` column makes
the bootstrap resample patients, not images):

    $ python inference.py --test-dir external_cohort \\
          --checkpoint clip_model_checkpoints/clip_model_epoch_best.pt
    $ python inference.py --test-dir splits/manifest.csv --checkpoint best.pt \\
          --baseline datacomp_s34b_b86k --output-dir results_vs_zero_shot --cache-dir emb_cache
    $ python inference.py --test-dir external_cohort --checkpoint best.pt \\
          --wise-ft-alpha 0 0.25 0.5 0.75 1 --output-dir wise_ft --anonymize-paths

Writes into --output-dir: predictions.csv, metrics.json, per_class_metrics.csv,
classification_report.txt, confusion_matrix.csv, roc_curves, pr_curves, calibration,
prob_histograms and confusion_matrix figures (.png and .pdf), report.md (one page that maps each
output to the checklist item it serves), args.json; with --baseline also comparison.csv and
baseline_predictions.csv; with --wise-ft-alpha one wise_ft_alpha_<a>/ folder of all of these per
alpha and wise_ft_summary.csv.
"""

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import math
import platform
import re
import secrets
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import torch

import common
import prompts as prompt_sets

LOG = logging.getLogger("inference")
DEFAULT_OUTPUT_DIR = "inference_results"
DEFAULT_BATCH_SIZE = 64
DEFAULT_BOOTSTRAP = 2000  # percentile-bootstrap resamples; ~2000 keeps 95% interval ends stable
DEFAULT_SEED = 2024
DEFAULT_SPLIT = "test"  # manifest rows evaluated when --test-dir is a manifest.csv
DEFAULT_ECE_BINS = 10  # equal-width bins of the max probability (Guo et al. 2017 use 15; 10 is common)
CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_CHUNK = 256  # replicates evaluated together: memory ~ CHUNK x N numbers per array
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)  # probabilities clipped here, as scikit-learn does
CACHE_VERSION = 1  # bump when what a cached embedding means changes
WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}
OVERALL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "mcc",
                   "macro_auroc", "macro_auprc", "brier", "log_loss", "ece")
CALIBRATION_METRICS = ("brier", "log_loss", "ece")
COMPARED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc")
PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")
METRIC_LABELS = {
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
    "weighted_f1": "weighted F1", "mcc": "Matthews correlation (multi-class)",
    "macro_auroc": "macro AUROC (one-vs-rest)", "macro_auprc": "macro AUPRC (one-vs-rest)",
    "brier": "Brier score (multi-class, 0-2)", "log_loss": "log-loss",
    "ece": "expected calibration error"}
FIGURE_NAMES = ("confusion_matrix", "roc_curves", "pr_curves", "calibration", "prob_histograms")
OUTPUT_NAMES = ("predictions.csv", "baseline_predictions.csv", "metrics.json",
                "per_class_metrics.csv", "comparison.csv", "classification_report.txt",
                "confusion_matrix.csv", "report.md", "args.json", "wise_ft_summary.csv",
                *(f"{name}.{ext}" for name in FIGURE_NAMES for ext in ("png", "pdf")))
PANEL_WIDTH_IN = 3.5  # one journal column
PANEL_HEIGHT_IN = 3.2
FONT_PT = 8  # the smallest size journals accept in print
FIGURE_DPI = 300


# ----------------------------------------------------------------------------------------------
# Metrics of one confusion matrix (pure: counts in, numbers out)


def proportion(k, n):
    """k / n as a float, or None when n is 0 (undefined, not zero)."""
    return float(k) / n if n else None


def wilson_interval(k, n, confidence=CONFIDENCE_LEVEL):
    """Wilson score interval for a binomial proportion.

    Parameters
    ----------
    k : int
        Successes (for example true positives).
    n : int
        Trials (for example all condition-positive images).
    confidence : float
        Confidence level of the interval.

    Returns
    -------
    [low, high] as floats, or None when n is 0.
    """
    if n == 0:
        return None
    from scipy.stats import binomtest
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def one_vs_rest_counts(cm, k):
    """Class k against the rest in a confusion matrix (rows true, columns predicted).

    Returns
    -------
    (tp, fp, fn, tn) as ints.
    """
    cm = np.asarray(cm)
    tp = int(cm[k, k])
    fn = int(cm[k, :].sum()) - tp
    fp = int(cm[:, k].sum()) - tp
    tn = int(cm.sum()) - tp - fn - fp
    return tp, fp, fn, tn


def likelihood_ratios(tp, fp, fn, tn, confidence=CONFIDENCE_LEVEL):
    """LR+ = sensitivity / (1 - specificity) and LR- = (1 - sensitivity) / specificity, with
    95% CIs by the log method (Simel, Samsa & Matchar 1991).

    The interval is exp(ln LR +- z SE) with SE(ln LR+) = sqrt(1/tp - 1/(tp+fn) + 1/fp - 1/(fp+tn))
    and SE(ln LR-) = sqrt(1/fn - 1/(tp+fn) + 1/tn - 1/(fp+tn)). When one of the four counts is 0,
    the interval is computed with 0.5 added to each (Haldane); an estimate of exactly 0 keeps 0 as
    its lower end. An estimate is None where it is undefined or infinite (a zero denominator).

    Returns
    -------
    dict with lr_pos, lr_pos_ci, lr_neg, lr_neg_ci.
    """
    out = {"lr_pos": None, "lr_pos_ci": None, "lr_neg": None, "lr_neg_ci": None}
    if tp + fn == 0 or fp + tn == 0:
        return out
    from scipy.stats import norm
    z = float(norm.ppf(0.5 + confidence / 2.0))
    a, b, c, d = (float(x) for x in (tp, fp, fn, tn))
    if min(a, b, c, d) == 0:
        a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    for key, value, log_lr, se2 in (
            ("lr_pos", sens / (1 - spec) if spec < 1 else None,
             math.log((a / (a + c)) / (b / (b + d))), 1 / a - 1 / (a + c) + 1 / b - 1 / (b + d)),
            ("lr_neg", (1 - sens) / spec if spec > 0 else None,
             math.log((c / (a + c)) / (d / (b + d))), 1 / c - 1 / (a + c) + 1 / d - 1 / (b + d))):
        half = z * math.sqrt(max(se2, 0.0))
        low, high = math.exp(log_lr - half), math.exp(log_lr + half)
        out[key] = value
        out[f"{key}_ci"] = [0.0 if value == 0 else low, high]
    return out


def per_class_metrics(cm, k, confidence=CONFIDENCE_LEVEL):
    """One-vs-rest statistics of class k from a confusion matrix: support, prevalence, counts,
    sensitivity, specificity, PPV, NPV (each with its Wilson interval), LR+ and LR- (log-method
    intervals) and F1 (None where a class is never true nor predicted)."""
    tp, fp, fn, tn = one_vs_rest_counts(cm, k)
    total = tp + fp + fn + tn
    stats = {"support": tp + fn, "prevalence": proportion(tp + fn, total),
             "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    for name, hits, n in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                          ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        stats[name] = proportion(hits, n)
        stats[f"{name}_ci"] = wilson_interval(hits, n, confidence)
    stats.update(likelihood_ratios(tp, fp, fn, tn, confidence))
    stats["f1"] = proportion(2 * tp, 2 * tp + fp + fn)
    return stats


def confusion_matrices(y_true, y_pred, n_classes, resamples=None):
    """Confusion counts (rows true, columns predicted) of one labelling or of many resamples.

    Parameters
    ----------
    y_true, y_pred : (N,) int arrays
        Class indices.
    n_classes : int
        C.
    resamples : (B, N) int array, optional
        Row indices of B bootstrap resamples.

    Returns
    -------
    (C, C) int array, or (B, C, C) with `resamples`.
    """
    codes = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    cells = n_classes * n_classes
    if resamples is None:
        return np.bincount(codes, minlength=cells).reshape(n_classes, n_classes)
    offsets = np.arange(len(resamples))[:, None] * cells  # one block of cells per resample
    counts = np.bincount((codes[resamples] + offsets).ravel(), minlength=len(resamples) * cells)
    return counts.reshape(len(resamples), n_classes, n_classes)


def metrics_from_confusion(cms):
    """Accuracy, balanced accuracy, macro and weighted F1, multi-class MCC and per-class F1 of a
    stack of confusion matrices (counts may be bootstrap weights).

    The definitions are scikit-learn's: balanced accuracy averages recall over the classes present
    in y_true; macro F1 scores a class with no true and no predicted image as 0; MCC is Gorodkin's
    multi-class R_K, 0 where its denominator is 0. Written out because the bootstrap needs
    thousands of them and this is one vectorised pass.

    Parameters
    ----------
    cms : (B, C, C) array
        Counts; rows true, columns predicted.

    Returns
    -------
    dict name -> (B,) float array (NaN where undefined, an empty matrix), and "f1" -> (B, C),
    NaN for a class never true nor predicted.
    """
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)  # (B, C)
    support, predicted = cms.sum(axis=2), cms.sum(axis=1)  # (B, C) each
    total = cms.sum(axis=(1, 2))
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = tp.sum(axis=1) / total
        recall = np.where(present, tp / support, 0.0)
        balanced = recall.sum(axis=1) / present.sum(axis=1)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)
        weighted_f1 = np.nansum(f1 * support, axis=1) / total
        covariance = tp.sum(axis=1) * total - (predicted * support).sum(axis=1)
        spread = (total ** 2 - (predicted ** 2).sum(axis=1)) * (total ** 2 - (support ** 2).sum(axis=1))
        mcc = np.where(spread > 0, covariance / np.sqrt(np.where(spread > 0, spread, 1.0)), 0.0)
    return {"accuracy": accuracy, "balanced_accuracy": balanced,
            "macro_f1": np.nan_to_num(f1, nan=0.0).mean(axis=1), "weighted_f1": weighted_f1,
            "mcc": np.where(total > 0, mcc, np.nan), "f1": f1}


# ----------------------------------------------------------------------------------------------
# Probabilistic metrics per image (pure)


def softmax(logits, temperature=1.0):
    """Row-wise softmax of logits / temperature in float64 (NaN rows stay NaN)."""
    from scipy.special import softmax as scipy_softmax
    return scipy_softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=1)


def brier_per_image(y_true, probs):
    """Multi-class Brier score of each image: sum over classes of (p - onehot)^2, in [0, 2]."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(probs.shape[1])[np.asarray(y_true, dtype=np.int64)]
    return ((probs - onehot) ** 2).sum(axis=1)


def log_loss_per_image(y_true, probs):
    """-ln p(true class) of each image, p clipped below at float64 eps (as scikit-learn)."""
    probs = np.asarray(probs, dtype=np.float64)
    picked = probs[np.arange(len(probs)), np.asarray(y_true, dtype=np.int64)]
    return -np.log(np.clip(picked, LOG_LOSS_EPS, 1.0))


def calibration_bins(values, n_bins=DEFAULT_ECE_BINS):
    """Bin index of each value in `n_bins` equal-width bins of [0, 1], right-closed:
    (0, 1/n], (1/n, 2/n], ... with 0 itself in the first bin."""
    index = np.ceil(np.asarray(values, dtype=np.float64) * n_bins).astype(np.int64) - 1
    return np.clip(index, 0, n_bins - 1)


def expected_calibration_error(y_true, probs, n_bins=DEFAULT_ECE_BINS):
    """ECE: sum over equal-width bins of the max probability of (images in bin / N) x
    |accuracy in bin - mean max probability in bin| (Guo et al. 2017); None for no image."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return None
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    bins = calibration_bins(confidence, n_bins)
    gap = np.bincount(bins, confidence - correct, minlength=n_bins)  # sum(conf) - sum(correct)
    return float(np.abs(gap).sum() / len(probs))


def reliability_table(scores, hits, n_bins=DEFAULT_ECE_BINS):
    """Per equal-width bin of `scores`: (count, mean score, observed frequency of `hits`),
    NaN means for empty bins. The data of one reliability diagram."""
    scores = np.asarray(scores, dtype=np.float64)
    bins = calibration_bins(scores, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(bins, scores, minlength=n_bins) / count
        observed = np.bincount(bins, np.asarray(hits, dtype=np.float64), minlength=n_bins) / count
    return count, mean_score, observed


def rule_predictions(probs, rare_index, threshold):
    """Predictions of the operating rule: the rare class if p(rare) >= threshold, otherwise the
    most probable of the other classes."""
    probs = np.asarray(probs, dtype=np.float64)
    others = probs.copy()
    others[:, rare_index] = -np.inf
    predicted = others.argmax(axis=1)
    predicted[probs[:, rare_index] >= threshold] = rare_index
    return predicted


# ----------------------------------------------------------------------------------------------
# Every metric as a weighted sum (pure). The bootstrap draws each resample as a vector of weights
# (how often each image is drawn), so a replicate is a matrix product and a cumulative sum over a
# ranking sorted once: thousands of replicates of 5,000 images take about a second. The point
# estimates use the same code with unit weights, so an interval always belongs to its estimate;
# the tests check every one against scikit-learn.


def tie_blocks(scores):
    """(order, starts): the ascending sort of `scores` and where each run of equal scores begins
    in it (ties are one threshold, as in scikit-learn's curves)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ranked)) + 1]) if len(ranked) else np.zeros(0, int)
    return order, starts


def weighted_auroc_auprc(weights, order, starts, positive):
    """One-vs-rest AUROC (Mann-Whitney, ties count one half) and average precision (AUPRC, the
    step-wise sum over thresholds of recall gain x precision, as scikit-learn's
    average_precision_score) of each row of weights.

    Parameters
    ----------
    weights : (B, N) float array
        How often each image counts in each replicate (ones for the point estimate).
    order, starts : arrays from `tie_blocks(scores)`.
    positive : (N,) bool array
        Images of the class.

    Returns
    -------
    (auroc, auprc), each (B,), NaN where a replicate has no positive or no negative image.
    """
    ranked = weights[:, order]  # (B, N), ascending score
    hit = positive[order].astype(np.float64)
    pos = np.add.reduceat(ranked * hit, starts, axis=1)  # (B, J) positive weight per tie block
    neg = np.add.reduceat(ranked * (1.0 - hit), starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        tp_at = n_pos[:, None] - (np.cumsum(pos, axis=1) - pos)  # positives scored >= the block
        fp_at = n_neg[:, None] - neg_below
        precision = np.where(pos > 0, tp_at / np.maximum(tp_at + fp_at, 1e-300), 0.0)
        auprc = (pos * precision).sum(axis=1) / n_pos
    defined = (n_pos > 0) & (n_neg > 0)
    return np.where(defined, auroc, np.nan), np.where(defined, auprc, np.nan)


def prepare_scores(y_true, probs, n_bins=DEFAULT_ECE_BINS, probs_cal=None):
    """The per-image quantities whose weighted sums give every metric of one model.

    Returns
    -------
    dict: columns (N, K) float array (confusion cell one-hots, Brier and log-loss terms, ECE bin
    sums, each also for `probs_cal`), slices name -> columns slice, ranking (per class the
    `tie_blocks` of its probability), positive (N, C) bool, n_classes.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    blocks = {"cm": np.eye(n_classes * n_classes)[y_true * n_classes + probs.argmax(axis=1)]}
    for suffix, p in (("", probs), ("_cal", probs_cal)):
        if p is None:
            continue
        confidence = p.max(axis=1)
        in_bin = np.eye(n_bins)[calibration_bins(confidence, n_bins)]  # (N, bins)
        blocks["brier" + suffix] = brier_per_image(y_true, p)[:, None]
        blocks["log_loss" + suffix] = log_loss_per_image(y_true, p)[:, None]
        blocks["ece_gap" + suffix] = in_bin * (confidence - (p.argmax(axis=1) == y_true))[:, None]
    slices, start = {}, 0
    for name, block in blocks.items():
        slices[name] = slice(start, start + block.shape[1])
        start += block.shape[1]
    return {"columns": np.hstack(list(blocks.values())), "slices": slices,
            "ranking": [tie_blocks(probs[:, k]) for k in range(n_classes)],
            "positive": y_true[:, None] == np.arange(n_classes), "n_classes": n_classes}


def weighted_metrics(weights, prepared):
    """Every metric of one model under each row of weights (see `prepare_scores`).

    Returns
    -------
    dict: each name of OVERALL_METRICS (and brier_cal, log_loss_cal, ece_cal when prepared with
    calibrated probabilities) -> (B,); f1, auroc, auprc -> (B, C). NaN where undefined.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    sums = weights @ prepared["columns"]  # (B, K)
    total = weights.sum(axis=1)
    n_classes, slices = prepared["n_classes"], prepared["slices"]
    out = metrics_from_confusion(sums[:, slices["cm"]].reshape(-1, n_classes, n_classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        for suffix in ("", "_cal"):
            if "brier" + suffix in slices:
                out["brier" + suffix] = sums[:, slices["brier" + suffix]][:, 0] / total
                out["log_loss" + suffix] = sums[:, slices["log_loss" + suffix]][:, 0] / total
                out["ece" + suffix] = np.abs(sums[:, slices["ece_gap" + suffix]]).sum(axis=1) / total
    curves = [weighted_auroc_auprc(weights, order, starts, prepared["positive"][:, k])
              for k, (order, starts) in enumerate(prepared["ranking"])]
    out["auroc"] = np.stack([auroc for auroc, _ in curves], axis=1)  # (B, C)
    out["auprc"] = np.stack([auprc for _, auprc in curves], axis=1)
    out["macro_auroc"] = out["auroc"].mean(axis=1)  # NaN when a class is missing
    out["macro_auprc"] = out["auprc"].mean(axis=1)
    return out


def group_indices(groups, n):
    """(N,) int index of each image's group (0..G-1), or each image its own group when None."""
    if groups is None:
        return np.arange(n)
    _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return index.reshape(-1)


def resample_weights(group_index, n_bootstrap, seed, chunk=BOOTSTRAP_CHUNK):
    """Yield (b, N) float arrays of bootstrap weights, `chunk` replicates at a time.

    Each replicate draws G groups with replacement (a cluster bootstrap: the images of a patient
    stay together); an image's weight is how often its group was drawn. One group per image is
    the ordinary bootstrap of images. The same seed and groups give the same replicates.
    """
    rng = np.random.default_rng(seed)
    group_index = np.asarray(group_index, dtype=np.int64)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + np.arange(b)[:, None] * n_groups
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, group_index].astype(np.float64)


def bootstrap_replicates(prepared_list, group_index, n_bootstrap, seed):
    """`weighted_metrics` of each prepared model on the same resamples (paired when several).

    Returns
    -------
    list (one per prepared model) of dict name -> (B,) or (B, C) arrays.
    """
    parts = [dict() for _ in prepared_list]
    for weights in resample_weights(group_index, n_bootstrap, seed):
        for store, prepared in zip(parts, prepared_list):
            for name, values in weighted_metrics(weights, prepared).items():
                store.setdefault(name, []).append(values)
    return [{name: np.concatenate(values) for name, values in store.items()} for store in parts]


def percentile_interval(values, confidence=CONFIDENCE_LEVEL):
    """[low, high] percentile interval of the finite bootstrap values, or None if none are."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def finite_or_none(value):
    """A float, or None for NaN/inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Assembling metrics.json (pure: arrays in, plain dicts out)


def empty_metrics(class_names):
    """metrics.json skeleton when no image could be scored: every value None."""
    metrics = {"n": 0}
    for name in OVERALL_METRICS:
        metrics[name], metrics[f"{name}_ci"] = None, None
    metrics["per_class"] = {name: {} for name in class_names}
    metrics["confusion_matrix"] = np.zeros((len(class_names),) * 2, dtype=int).tolist()
    return metrics


def compute_metrics(y_true, probs, class_names, n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED,
                    confidence=CONFIDENCE_LEVEL, *, groups=None, probs_cal=None,
                    ece_bins=DEFAULT_ECE_BINS):
    """Every metric of metrics.json from the labels and class probabilities of scored images.

    Parameters
    ----------
    y_true : (N,) int array
        True class indices.
    probs : (N, C) float array
        Class probabilities; the prediction is the argmax of each row.
    class_names : list of str
        The C folder names, keys of `per_class`.
    n_bootstrap : int
        Percentile-bootstrap resamples for the CIs of the overall metrics and of the per-class
        F1, AUROC and AUPRC; 0 leaves those CIs None. Proportions use Wilson intervals, LR+/LR-
        the log method.
    seed : int
        Seed of the bootstrap.
    confidence : float
        Level of every interval.
    groups : (N,) array of str, optional
        Patient (or other cluster) of each image: the bootstrap resamples groups, not images.
    probs_cal : (N, C) float array, optional
        Temperature-scaled probabilities: adds `temperature_scaled` (Brier, log-loss, ECE).
    ece_bins : int
        Equal-width bins of the max probability for the ECE.

    Returns
    -------
    dict with n, each of OVERALL_METRICS beside its `<name>_ci`, ece_bins, bootstrap_unit,
    n_groups, temperature_scaled, confusion_matrix (rows true) and per_class[name] (see
    `per_class_metrics`, plus f1, auroc, auprc with `_ci` and auprc_baseline). Undefined: None.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(class_names))
    n = len(y_true)
    metrics = empty_metrics(class_names) if n == 0 else {"n": n}
    group_index = group_indices(groups, n)
    metrics.update(ece_bins=ece_bins, bootstrap_unit="image" if groups is None else "group",
                   n_groups=int(group_index.max()) + 1 if n else 0, temperature_scaled=None)
    if n == 0:
        return metrics
    prepared = prepare_scores(y_true, probs, ece_bins, probs_cal)
    point = weighted_metrics(np.ones((1, n)), prepared)
    boot = bootstrap_replicates([prepared], group_index, n_bootstrap, seed)[0] if n_bootstrap else None

    def estimate(name, column=None):
        value = point[name][0] if column is None else point[name][0, column]
        value = finite_or_none(value)
        replicates = None if boot is None else (boot[name] if column is None else boot[name][:, column])
        ci = percentile_interval(replicates, confidence) if value is not None and boot else None
        return value, ci

    for name in OVERALL_METRICS:
        metrics[name], metrics[f"{name}_ci"] = estimate(name)
    if probs_cal is not None:
        metrics["temperature_scaled"] = {}
        for name in CALIBRATION_METRICS:
            value, ci = estimate(name + "_cal")
            metrics["temperature_scaled"].update({name: value, f"{name}_ci": ci})
    cm = confusion_matrices(y_true, probs.argmax(axis=1), len(class_names))
    metrics["per_class"] = {}
    for k, name in enumerate(class_names):
        stats = per_class_metrics(cm, k, confidence)
        for metric in ("f1", "auroc", "auprc"):
            stats[metric], stats[f"{metric}_ci"] = estimate(metric, k)
        stats["auprc_baseline"] = stats["prevalence"]  # AUPRC of a random ranking
        metrics["per_class"][name] = stats
    metrics["confusion_matrix"] = cm.tolist()
    return metrics


def binary_summary(positive, predicted, confidence=CONFIDENCE_LEVEL):
    """Counts, sensitivity, specificity, PPV, NPV (Wilson) and LR+/LR- of a binary rule."""
    positive, predicted = np.asarray(positive, bool), np.asarray(predicted, bool)
    cm = np.array([[np.sum(positive & predicted), np.sum(positive & ~predicted)],
                   [np.sum(~positive & predicted), np.sum(~positive & ~predicted)]])
    stats = per_class_metrics(cm, 0, confidence)
    stats.pop("f1"), stats.pop("prevalence")
    return stats


def operating_point_metrics(y_true, probs, rare_index, threshold, confidence=CONFIDENCE_LEVEL):
    """The rare class under 'p(rare) >= threshold' beside the same statistics under argmax.

    Returns
    -------
    dict: rule -> binary_summary of the threshold rule, argmax -> binary_summary of argmax,
    confusion_matrix -> (C, C) of the rule's multi-class predictions (see `rule_predictions`).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    positive = y_true == rare_index
    rule = rule_predictions(probs, rare_index, threshold)
    return {"rule": binary_summary(positive, rule == rare_index, confidence),
            "argmax": binary_summary(positive, probs.argmax(axis=1) == rare_index, confidence),
            "confusion_matrix": confusion_matrices(y_true, rule, probs.shape[1]).tolist()}


def intention_to_diagnose(y_true, y_pred, rare_index, confidence=CONFIDENCE_LEVEL):
    """Accuracy and rare-class sensitivity over every image received, an unreadable image
    (y_pred -1) counting as an error (STARD's intention-to-diagnose analysis)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    correct = int(np.sum(y_true == y_pred))
    rare = y_true == rare_index
    hits = int(np.sum(rare & (y_pred == rare_index)))
    return {"itd_n": int(len(y_true)),
            "itd_accuracy": proportion(correct, len(y_true)),
            "itd_accuracy_ci": wilson_interval(correct, len(y_true), confidence),
            "itd_rare_sensitivity": proportion(hits, int(rare.sum())),
            "itd_rare_sensitivity_ci": wilson_interval(hits, int(rare.sum()), confidence)}


def mcnemar_test(correct_a, correct_b):
    """Exact and mid-p McNemar tests on the discordant pairs (binomial, p = 1/2, two-sided).

    Returns
    -------
    dict with a_only (A right, B wrong), b_only, p_exact, p_mid (None without discordant pairs).
    """
    from scipy.stats import binom, binomtest
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    a_only, b_only = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_exact": None, "p_mid": None}
    small = min(a_only, b_only)
    p_exact = float(binomtest(a_only, n, 0.5).pvalue)
    # mid-p: twice the lower tail with half the probability of the observed count
    p_mid = min(1.0, 2.0 * (float(binom.cdf(small, n, 0.5)) - 0.5 * float(binom.pmf(small, n, 0.5))))
    return {"a_only": a_only, "b_only": b_only, "p_exact": p_exact, "p_mid": p_mid}


def compare_models(y_true, probs_model, probs_baseline, groups=None, n_bootstrap=DEFAULT_BOOTSTRAP,
                   seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """Paired comparison of two models on the same images: model - baseline for each of
    COMPARED_METRICS with a paired (cluster) bootstrap CI, and McNemar's test for accuracy.

    The resamples are those of `compute_metrics` with the same seed and groups, so the model's
    own intervals here equal those in metrics.json. The bootstrap p is twice the smaller share of
    replicate differences on either side of 0 (a rough guide; the CI is the result to report).

    Returns
    -------
    dict: rows -> list of dicts (metric, model, model_ci, baseline, baseline_ci, difference,
    difference_ci, p_value, test), mcnemar -> `mcnemar_test` result, n.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    group_index = group_indices(groups, len(y_true))
    prepared = [prepare_scores(y_true, probs_model), prepare_scores(y_true, probs_baseline)]
    point = [weighted_metrics(np.ones((1, len(y_true))), p) for p in prepared]
    boot = bootstrap_replicates(prepared, group_index, n_bootstrap, seed) if n_bootstrap else None
    rows = []
    for name in COMPARED_METRICS:
        a, b = finite_or_none(point[0][name][0]), finite_or_none(point[1][name][0])
        row = {"metric": name, "model": a, "baseline": b,
               "difference": None if a is None or b is None else a - b,
               "model_ci": None, "baseline_ci": None, "difference_ci": None, "p_value": None,
               "test": "paired bootstrap" + (" of groups" if groups is not None else "")}
        if boot is not None and row["difference"] is not None:
            diff = boot[0][name] - boot[1][name]
            row["model_ci"] = percentile_interval(boot[0][name], confidence)
            row["baseline_ci"] = percentile_interval(boot[1][name], confidence)
            row["difference_ci"] = percentile_interval(diff, confidence)
            finite = diff[np.isfinite(diff)]
            if finite.size:
                row["p_value"] = float(min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))))
        rows.append(row)
    correct_a = probs_model.argmax(axis=1) == y_true
    correct_b = probs_baseline.argmax(axis=1) == y_true
    mcnemar = mcnemar_test(correct_a, correct_b)
    rows.append({"metric": "accuracy", "model": rows[0]["model"], "baseline": rows[0]["baseline"],
                 "difference": rows[0]["difference"], "model_ci": None, "baseline_ci": None,
                 "difference_ci": None, "p_value": mcnemar["p_mid"],
                 "test": f"McNemar mid-p (exact p {format_p(mcnemar['p_exact'])}; discordant "
                         f"{mcnemar['a_only']} model-only correct, {mcnemar['b_only']} "
                         "baseline-only correct)"})
    return {"n": int(len(y_true)), "rows": rows, "mcnemar": mcnemar}


def format_p(p):
    """A p-value for text: 'n/a', '<0.001' or three decimals."""
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# ----------------------------------------------------------------------------------------------
# Tables and the report (pure: values in, frames or text out)


def relative_path(path, root):
    """path relative to root, with forward slashes (the same on every OS)."""
    path = Path(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def make_anonymizer(salt):
    """text -> hex SHA-256 of salt + text: the same file gets the same pseudonym within a run (or
    across runs sharing --anonymize-salt), and the salt is never written anywhere."""
    prefix = salt.encode("utf-8") + b"\x00"
    return lambda text: hashlib.sha256(prefix + str(text).encode("utf-8")).hexdigest()


def predictions_frame(cohort, folders, probs, statuses, probs_cal=None, rule_pred=None,
                      anonymize=None):
    """predictions.csv as a DataFrame: one row per image in input order, failed rows included.

    Columns: path (a salted hash with `anonymize`), [group], true_label, pred_label,
    prob_<folder> (uncalibrated), [prob_cal_<folder>], [pred_label_threshold], status.
    """
    import pandas as pd
    items, labelled = cohort["items"], cohort["labelled"]
    finite = np.isfinite(probs).all(axis=1)
    paths = [relative_path(path, cohort["root"]) for path, _label in items]
    columns = {"path": [anonymize(p) for p in paths] if anonymize else paths}
    if cohort["groups"] is not None:
        columns["group"] = [anonymize(g) if anonymize else g for g in cohort["groups"]]
    columns["true_label"] = [folders[label] if labelled else "" for _path, label in items]
    columns["pred_label"] = [folders[int(np.argmax(row))] if ok else "" for row, ok in zip(probs, finite)]
    for k, folder in enumerate(folders):
        columns[f"prob_{folder}"] = probs[:, k]  # NaN (an empty cell) on failed rows
    if probs_cal is not None:
        for k, folder in enumerate(folders):
            columns[f"prob_cal_{folder}"] = probs_cal[:, k]
    if rule_pred is not None:
        columns["pred_label_threshold"] = [folders[p] if ok else "" for p, ok in zip(rule_pred, finite)]
    if anonymize:  # a reason could quote the file name; never let it through
        names = [(str(path), Path(path).name, rel) for (path, _), rel in zip(items, paths)]
        statuses = [scrub(status, names[i]) for i, status in enumerate(statuses)]
    columns["status"] = list(statuses)
    return pd.DataFrame(columns)


def scrub(text, names):
    """text with each of `names` (longest first) replaced by '<file>'."""
    for name in sorted(names, key=len, reverse=True):
        if name:
            text = text.replace(name, "<file>")
    return text


def confusion_frame(cm, folders):
    """The confusion matrix as a DataFrame: rows true, columns predicted, folder names as headers."""
    import pandas as pd
    frame = pd.DataFrame(np.asarray(cm, dtype=np.int64), columns=list(folders))
    frame.insert(0, "true_label", list(folders))
    return frame


def per_class_frame(metrics, folders):
    """per_class_metrics.csv: one row per class, each interval as <name>_ci_low/_ci_high."""
    import pandas as pd
    rows = []
    for folder in folders:
        row = {"class": folder}
        for key, value in metrics["per_class"][folder].items():
            if key.endswith("_ci"):
                row[f"{key}_low"], row[f"{key}_high"] = value if value else (None, None)
            else:
                row[key] = value
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_frame(comparison):
    """comparison.csv: one row per compared metric (and the McNemar row)."""
    import pandas as pd
    rows = []
    for row in comparison["rows"]:
        flat = {"metric": row["metric"], "n": comparison["n"]}
        for key in ("model", "baseline", "difference"):
            ci = row[f"{key}_ci"]
            flat.update({key: row[key], f"{key}_ci_low": ci[0] if ci else None,
                         f"{key}_ci_high": ci[1] if ci else None})
        flat.update(p_value=row["p_value"], test=row["test"])
        rows.append(flat)
    return pd.DataFrame(rows)


def failure_category(status):
    """'truncated image' from 'failed: truncated image (detail...)'."""
    return status.removeprefix("failed: ").split(" (")[0].strip() or "unreadable"


def flow_counts(labels, statuses, folders, labelled):
    """STARD flow of images: received -> unreadable (by reason) -> scored, per class.

    Returns
    -------
    dict: rows -> {class: {received, unreadable, scored}} ('all images' when unlabelled) and
    'total'; reasons -> {reason: {class: count}}.
    """
    keys = [folders[label] if labelled else "all images" for label in labels]
    order = list(folders) if labelled else ["all images"]
    rows = {key: {"received": 0, "unreadable": 0, "scored": 0} for key in order}
    reasons = {}
    for key, status in zip(keys, statuses):
        rows[key]["received"] += 1
        if status == "ok":
            rows[key]["scored"] += 1
        else:
            rows[key]["unreadable"] += 1
            by_class = reasons.setdefault(failure_category(status), dict.fromkeys(order, 0))
            by_class[key] += 1
    rows["total"] = {name: sum(r[name] for r in rows.values())
                     for name in ("received", "unreadable", "scored")}
    return {"rows": rows, "reasons": reasons}


def format_value(value, ci=None, digits=3):
    """`0.833 (0.552–0.953)`, or `n/a` for an undefined value."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"{text} ({ci[0]:.{digits}f}–{ci[1]:.{digits}f})" if ci else text


def flow_markdown(flow):
    """The flow table (and the reasons) of report.md."""
    lines = ["| class | received | unreadable (excluded) | scored |", "| --- | ---: | ---: | ---: |"]
    for key, row in flow["rows"].items():
        name = f"**{key}**" if key == "total" else key
        lines.append(f"| {name} | {row['received']} | {row['unreadable']} | {row['scored']} |")
    if flow["reasons"]:
        lines += ["", "Reasons for exclusion: " + "; ".join(
            f"{reason}: {sum(by_class.values())} ("
            + ", ".join(f"{k} {v}" for k, v in by_class.items() if v) + ")"
            for reason, by_class in flow["reasons"].items()) + "."]
    return lines


def metrics_markdown(metrics, folders):
    """The overall and per-class metric tables of report.md."""
    scaled = metrics.get("temperature_scaled")
    lines = ["| metric | value (95% CI) |" + (" temperature-scaled |" if scaled else ""),
             "| --- | --- |" + (" --- |" if scaled else "")]
    for name in OVERALL_METRICS:
        cell = format_value(metrics[name], metrics[name + "_ci"])
        extra = ""
        if scaled:
            extra = (f" {format_value(scaled[name], scaled[name + '_ci'])} |"
                     if name in CALIBRATION_METRICS else " — |")
        lines.append(f"| {METRIC_LABELS[name]} | {cell} |{extra}")
    if scaled:
        lines += ["", f"Temperature scaling (T = {scaled['temperature']:.3f}, {scaled['source']}) "
                  "keeps every argmax; only calibration is re-scored."]
    lines += ["", "| class | n (prevalence) | sensitivity | specificity | PPV | NPV | LR+ | LR− | F1 "
              "| AUROC | AUPRC (chance) |", "| --- " * 11 + "|"]
    for folder in folders:
        s = metrics["per_class"][folder]
        cells = [format_value(s[name], s[name + "_ci"], 2 if name.startswith("lr") else 3)
                 for name in (*PROPORTIONS, "lr_pos", "lr_neg", "f1", "auroc", "auprc")]
        cells[-1] += f" ({format_value(s['auprc_baseline'])})"
        lines.append(f"| {folder} | {s['support']} ({format_value(s['prevalence'])}) | "
                     + " | ".join(cells) + " |")
    return lines


def operating_markdown(op):
    """Argmax and the validation threshold rule side by side for the rare class."""
    origin = [f"source: {op['source']}"]
    if op.get("target_sensitivity") is not None:
        origin.append(f"target sensitivity {op['target_sensitivity']}")
    if op.get("val_sensitivity") is not None:
        origin.append(f"validation sensitivity {format_value(op['val_sensitivity'])}, specificity "
                      f"{format_value(op.get('val_specificity'))}")
    lines = [f"Rare class **{op['class']}**: positive if p ≥ {op['threshold']:.4f} "
             f"({'; '.join(origin)}), applied to the uncalibrated probability, never tuned on "
             "this cohort; otherwise the most probable other class.", "",
             "| rule | TP | FP | FN | TN | sensitivity | specificity | PPV | NPV |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for label, key in (("argmax", "argmax"), (f"p ≥ {op['threshold']:.4f}", "rule")):
        s = op[key]
        lines.append(f"| {label} | {s['tp']} | {s['fp']} | {s['fn']} | {s['tn']} | "
                     + " | ".join(format_value(s[n], s[n + "_ci"]) for n in PROPORTIONS) + " |")
    return lines


def comparison_markdown(comparison, baseline_label):
    lines = [f"Model minus baseline (`{baseline_label}`) on the same {comparison['n']} images:", "",
             "| metric | model | baseline | difference (95% CI) | p | test |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in comparison["rows"]:
        lines.append(f"| {METRIC_LABELS[row['metric']]} | {format_value(row['model'])} | "
                     f"{format_value(row['baseline'])} | "
                     f"{format_value(row['difference'], row['difference_ci'])} | "
                     f"{format_p(row['p_value'])} | {row['test']} |")
    return lines


CHECKLIST_ROWS = (
    ("Flow table (above), `flow` in metrics.json",
     "images received, unreadable with reasons, scored, by class",
     "19 flow diagram; 16 missing/indeterminate index test results",
     "flow of participants; missing data", "flow of participants/cases; data exclusions"),
    ("[confusion_matrix.png](confusion_matrix.png), confusion_matrix.csv, classification_report.txt",
     "predicted by true class (counts, row %)", "23 cross tabulation by the reference standard",
     "model performance (classification)", "estimates of diagnostic accuracy"),
    ("Metric tables (above), metrics.json, per_class_metrics.csv",
     "accuracy, balanced accuracy, F1, MCC; per class sensitivity, specificity, PPV, NPV, LR±, "
     "AUROC, AUPRC with 95% CIs",
     "24 estimates of diagnostic accuracy and their precision",
     "model performance with CIs (discrimination)",
     "metrics of model performance; measures of uncertainty"),
    ("[roc_curves.png](roc_curves.png), [pr_curves.png](pr_curves.png)",
     "one-vs-rest discrimination; operating point marked", "24 estimates of diagnostic accuracy",
     "performance measures and plots (discrimination)", "metrics of model performance"),
    ("[calibration.png](calibration.png), Brier / log-loss / ECE",
     "reliability per class with counts per bin; before and after temperature scaling", "—",
     "calibration; model updating (recalibration)", "metrics of model performance"),
    ("[prob_histograms.png](prob_histograms.png), operating point table",
     "model output by true class; pre-specified threshold from validation",
     "12a/12b positivity cut-offs, pre-specified", "model output and classification thresholds",
     "model output; decision thresholds"),
    ("Intention-to-diagnose line", "unreadable images counted as errors",
     "15/16 handling of indeterminate and missing results", "missing data", "failure handling"),
    ("comparison.csv (when a baseline is given)", "paired differences with CIs, McNemar",
     "—", "comparison of models", "statistical measures of significance; benchmarking"),
    ("predictions.csv", "per-image probabilities and status", "—", "model output",
     "failure analysis of misclassified cases"),
    ("Header of this report, args.json", "checkpoint SHA-256, model, prompts, thresholds, versions",
     "10a index test in sufficient detail", "model specification; software and code availability",
     "model description; software and versions"),
)


def report_header(run):
    """What was evaluated: checkpoint, classes, prompts, thresholds, statistics, software."""
    versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items())
    mapping = ", ".join(f"{i} = {folder}" for i, folder in enumerate(run["class_folders"]))
    threshold = run.get("operating_threshold")
    lines = [f"- checkpoint: `{run['checkpoint']}` ({run['checkpoint_kind']}); SHA-256 "
             f"`{run['checkpoint_sha256'] or 'n/a (pretrained tag)'}`",
             f"- model `{run['model_name']}`, logit scale `{run['logit_scale_mode']}`"
             + (f"; WiSE-FT α = {run['wise_ft_alpha']:g} with base {run['wise_ft_base']}"
                if run.get("wise_ft_alpha") is not None else ""),
             f"- classes (index = folder name, matched by name): {mapping}; rare class: "
             f"**{run['rare_class']}**",
             f"- prompts ({run['prompt_source']}): " + "; ".join(
                 f"{c['folder']}: " + ", ".join(f'"{p}"' for p in c["eval"])
                 for c in run["prompts"]["classes"]),
             "- operating threshold: " + (f"{threshold:.4f} ({run['operating_threshold_source']})"
                                          if threshold is not None else
                                          f"none ({run['operating_threshold_source']}); argmax only"),
             "- temperature: " + (f"{run['temperature']:.4f} (fitted on validation at training; "
                                  "logits / T before the softmax)" if run.get("temperature")
                                  else f"none ({run['temperature_source']})"),
             f"- test cohort: `{run['test_dir']}`" + (f", split {run['split']}" if run.get("split") else "")
             + ("; paths pseudonymised (salted SHA-256)" if run.get("anonymized") else ""),
             f"- statistics: {run['confidence_level']:.0%} CIs; percentile bootstrap of "
             f"{run['bootstrap_unit']}s ({run['bootstrap']} resamples, seed {run['seed']}) for the "
             "overall metrics, F1, AUROC and AUPRC; Wilson intervals for proportions; log method "
             f"for LR±; ECE over {run['ece_bins']} equal-width bins of the max probability",
             f"- software: {versions}; device {run['device']}, precision {run['precision']}"]
    return lines


def render_report(run, flow, metrics, folders, operating=None, itd=None, comparison=None):
    """report.md: one page mapping every output to the reporting checklist item it serves."""
    lines = ["# Orbital-CLIP evaluation", ""] + report_header(run) + [""]
    if metrics is None:
        lines += ["No class folders in the test folder: the images were **predicted, not scored**.", ""]
        lines += flow_markdown(flow)
        return "\n".join(lines) + "\n"
    lines += ["## Flow of images (STARD 19)", ""] + flow_markdown(flow) + [""]
    if itd is not None:
        lines += [f"Intention-to-diagnose (unreadable images counted as errors, n = {itd['itd_n']}): "
                  f"accuracy {format_value(itd['itd_accuracy'], itd['itd_accuracy_ci'])}, "
                  f"{run['rare_class']} sensitivity "
                  f"{format_value(itd['itd_rare_sensitivity'], itd['itd_rare_sensitivity_ci'])}.", ""]
    if not metrics["n"]:
        return "\n".join(lines + ["No image could be read: there is nothing to score."]) + "\n"
    lines += [f"## Metrics on the {metrics['n']} scored images", ""]
    if metrics["bootstrap_unit"] == "group":
        lines += [f"Bootstrap resamples {metrics['n_groups']} patient groups (cluster bootstrap); "
                  "Wilson intervals treat images as independent.", ""]
    lines += metrics_markdown(metrics, folders) + ["", "## Operating point", ""]
    lines += operating_markdown(operating) if operating else [
        "The checkpoint stores no validation operating threshold (and none was given with "
        "--threshold): results are for argmax only."]
    if comparison is not None:
        lines += ["", "## Comparison with the baseline", ""]
        lines += comparison_markdown(comparison, run["baseline"]["checkpoint"])
    lines += ["", "## Outputs and the checklist items they serve", "",
              "| output | content | STARD 2015 | TRIPOD+AI 2024 | CLAIM 2024 |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in CHECKLIST_ROWS]
    if not run.get("figures", True):
        lines += ["", "Figures were not drawn (--no-figures)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Figures: one 3.5-inch panel per class (a journal column), 8-pt type, PNG and vector PDF


@contextlib.contextmanager
def figure_style():
    """matplotlib (Agg) with 8-pt type throughout and editable text in the PDF."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with plt.rc_context({"font.size": FONT_PT, "axes.titlesize": FONT_PT, "axes.labelsize": FONT_PT,
                         "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT,
                         "legend.fontsize": FONT_PT, "figure.titlesize": FONT_PT,
                         "pdf.fonttype": 42, "ps.fonttype": 42, "axes.linewidth": 0.8,
                         "lines.linewidth": 1.4}):
        yield plt


def panel_grid(plt, n_panels, ncols=2, height_in=PANEL_HEIGHT_IN):
    """A figure of n panels, `ncols` per row, each one column wide; unused cells hidden."""
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_WIDTH_IN * ncols, height_in * nrows),
                             squeeze=False)
    axes = axes.ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def save_figure(plt, fig, output_dir, stem):
    """stem.png (300 dpi) and stem.pdf (vector) in output_dir."""
    fig.tight_layout()
    for ext, kwargs in (("png", {"dpi": FIGURE_DPI}), ("pdf", {})):
        common.atomic_save_figure(fig, Path(output_dir) / f"{stem}.{ext}", **kwargs)
    plt.close(fig)


def wrap(name, width=16):
    """A class name broken over lines between words (never abbreviated)."""
    return textwrap.fill(name, width, break_long_words=False, break_on_hyphens=False)


def plot_confusion_matrices(matrices, folders, output_dir):
    """One heatmap per (title, matrix): colour by row %, each cell its count and row %."""
    import seaborn as sns
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(matrices), height_in=PANEL_WIDTH_IN)
        for ax, (title, cm) in zip(axes, matrices):
            cm = np.asarray(cm, dtype=np.int64)
            support = cm.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                row_pct = np.where(support > 0, 100.0 * cm / support, np.nan)
            annot = np.array([[f"{cm[i, j]}\n{row_pct[i, j]:.1f}%" if support[i, 0] else f"{cm[i, j]}\n–"
                               for j in range(len(folders))] for i in range(len(folders))])
            labels = [wrap(f, 9) for f in folders]
            sns.heatmap(np.nan_to_num(row_pct), annot=annot, fmt="", cmap="Blues", vmin=0, vmax=100,
                        xticklabels=labels, yticklabels=labels, linewidths=0.5, square=True,
                        cbar_kws={"label": "% of the true class", "shrink": 0.7},
                        annot_kws={"fontsize": FONT_PT}, ax=ax)
            ax.set(xlabel="predicted class", ylabel="true class", title=title)
            plt.setp(ax.get_xticklabels(), rotation=0)
            plt.setp(ax.get_yticklabels(), rotation=0, va="center")
        save_figure(plt, fig, output_dir, "confusion_matrix")


def mark_operating_points(ax, points, kind):
    """Argmax and threshold-rule points of the rare class on its ROC (kind 'roc') or PR panel."""
    for label, stats, marker in points:
        if stats["sensitivity"] is None:
            continue
        if kind == "roc" and stats["specificity"] is not None:
            ax.plot(1 - stats["specificity"], stats["sensitivity"], marker, ms=6, mec="black", label=label)
        elif kind == "pr" and stats["ppv"] is not None:
            ax.plot(stats["sensitivity"], stats["ppv"], marker, ms=6, mec="black", label=label)


def operating_markers(operating):
    if not operating:
        return []
    return [("argmax", operating["argmax"], "o"),
            (f"p ≥ {operating['threshold']:.3f} ({operating['source']})", operating["rule"], "D")]


def plot_roc_curves(y_true, probs, folders, metrics, operating, rare_index, output_dir):
    """One-vs-rest ROC panel per class (AUROC with CI; the operating point on the rare class)."""
    from sklearn.metrics import roc_curve
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auroc"] is not None:
                fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
                ax.plot(fpr, tpr, color=f"C{k}",
                        label=f"AUROC {format_value(stats['auroc'], stats['auroc_ci'])}")
                overlay.plot(fpr, tpr, color=f"C{k}", label=wrap(folder, 30))
            else:
                ax.text(0.5, 0.5, "AUROC n/a\n(class absent or alone)", ha="center", va="center")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="chance")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "roc")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                   ylabel="sensitivity", title=f"{folder} vs rest (n = {stats['support']})")
            ax.set_aspect("equal")
            ax.legend(loc="lower right", frameon=False)
        overlay.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":")
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                    ylabel="sensitivity", title="All classes, macro AUROC "
                    + format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]))
        overlay.set_aspect("equal")
        overlay.legend(loc="lower right", frameon=False)
        save_figure(plt, fig, output_dir, "roc_curves")


def plot_pr_curves(y_true, probs, folders, metrics, operating, rare_index, output_dir):
    """One-vs-rest precision-recall panel per class, with the prevalence (chance) line."""
    from sklearn.metrics import precision_recall_curve
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auprc"] is not None:
                precision, recall, _ = precision_recall_curve(y_true == k, probs[:, k])
                ax.step(recall, precision, where="post", color=f"C{k}",
                        label=f"AUPRC {format_value(stats['auprc'], stats['auprc_ci'])}")
                overlay.step(recall, precision, where="post", color=f"C{k}", label=wrap(folder, 30))
                ax.axhline(stats["prevalence"], color="grey", lw=0.8, linestyle=":",
                           label=f"chance (prevalence {stats['prevalence']:.3f})")
            else:
                ax.text(0.5, 0.5, "AUPRC n/a\n(class absent or alone)", ha="center", va="center")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "pr")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                   ylabel="precision (PPV)", title=f"{folder} vs rest (n = {stats['support']})")
            ax.legend(loc="best", frameon=False)
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                    ylabel="precision (PPV)", title="All classes, macro AUPRC "
                    + format_value(metrics["macro_auprc"], metrics["macro_auprc_ci"]))
        overlay.legend(loc="lower left", frameon=False)
        save_figure(plt, fig, output_dir, "pr_curves")


def plot_calibration(y_true, probs, probs_cal, folders, n_bins, output_dir):
    """Reliability diagram per class (observed frequency against mean predicted probability in
    equal-width bins) over a bar chart of the images per bin, uncalibrated and, when a validation
    temperature exists, temperature-scaled; a last panel for the max probability (the ECE)."""
    from matplotlib.gridspec import GridSpecFromSubplotSpec
    panels = [(f"p({folder})", k) for k, folder in enumerate(folders)] + [("max probability", None)]
    sets = [("uncalibrated", probs, "C0")] + ([("temperature-scaled", probs_cal, "C3")]
                                               if probs_cal is not None else [])
    edges = np.linspace(0, 1, n_bins + 1)
    with figure_style() as plt:
        fig, cells = panel_grid(plt, len(panels), height_in=PANEL_HEIGHT_IN + 0.6)
        for cell, (title, k) in zip(cells, panels):
            spec = cell.get_subplotspec()
            cell.remove()
            inner = GridSpecFromSubplotSpec(2, 1, subplot_spec=spec, height_ratios=(3, 1), hspace=0.08)
            ax, ax_count = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="perfect")
            for offset, (label, p, colour) in enumerate(sets):
                scores = p.max(axis=1) if k is None else p[:, k]
                hits = p.argmax(axis=1) == y_true if k is None else y_true == k
                count, mean_score, observed = reliability_table(scores, hits, n_bins)
                ax.plot(mean_score, observed, "o-", color=colour, ms=3, label=label)
                width = 0.9 / n_bins / len(sets)
                bars = ax_count.bar(edges[:-1] + (offset + 0.5) * width + 0.05 / n_bins, count,
                                    width=width, color=colour, alpha=0.6)
                if offset == 0:
                    ax_count.bar_label(bars, labels=[str(c) if c else "" for c in count],
                                       fontsize=FONT_PT - 1 if n_bins > 10 else FONT_PT, padding=1)
            ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency",
                   title=title if k is not None else "max probability vs accuracy (ECE)")
            ax.tick_params(labelbottom=False)
            ax.legend(loc="upper left", frameon=False)
            ax_count.set(xlim=(0, 1), xlabel="predicted probability", ylabel="images")
            ax_count.set_ylim(0, max(1, ax_count.get_ylim()[1]) * 1.45)  # room for the labels
        save_figure(plt, fig, output_dir, "calibration")


def plot_prob_histograms(y_true, probs, folders, operating, rare_index, output_dir):
    """Per class, the distribution of its probability in each true class (share of that true
    class, so the rare class stays visible); the operating threshold on the rare class."""
    bins = np.linspace(0, 1, 21)
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            for j, true_folder in enumerate(folders):
                mine = y_true == j
                if mine.any():
                    ax.hist(probs[mine, k], bins=bins, weights=np.full(mine.sum(), 1.0 / mine.sum()),
                            histtype="step", lw=1.4, color=f"C{j}",
                            label=f"{wrap(true_folder, 30)} (n = {int(mine.sum())})")
            if k == rare_index and operating:
                ax.axvline(operating["threshold"], color="black", lw=1, linestyle="--",
                           label=f"threshold {operating['threshold']:.3f}")
            ax.set(xlim=(0, 1), xlabel=f"p({folder})", ylabel="share of the true class",
                   title=f"Probability of {folder}")
        handles, labels = [], []
        for ax in axes[:-1]:  # one legend for all panels, in the last cell
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle), labels.append(label)
        axes[-1].axis("off")
        axes[-1].legend(handles, labels, loc="center", frameon=False, title="true class")
        save_figure(plt, fig, output_dir, "prob_histograms")


def write_figures(output_dir, y_true, probs, probs_cal, folders, metrics, operating, rare_index):
    """Every figure, PNG and PDF."""
    matrices = [("argmax", metrics["confusion_matrix"])]
    if operating:
        matrices.append((f"{folders[rare_index]} if p ≥ {operating['threshold']:.3f}",
                         operating["confusion_matrix"]))
    plot_confusion_matrices(matrices, folders, output_dir)
    plot_roc_curves(y_true, probs, folders, metrics, operating, rare_index, output_dir)
    plot_pr_curves(y_true, probs, folders, metrics, operating, rare_index, output_dir)
    plot_calibration(y_true, probs, probs_cal, folders, metrics["ece_bins"], output_dir)
    plot_prob_histograms(y_true, probs, folders, operating, rare_index, output_dir)


# ----------------------------------------------------------------------------------------------
# Loading: checkpoint, model, prompts, images


def checkpoint_kind(data):
    """'ours' (state_dict + metadata), 'state_dict' (plain weights), or None."""
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        ours = str(data.get("format", "")).startswith("orbital-clip/") or "model_name" in data
        return "ours" if ours else "state_dict"
    if isinstance(data, dict) and data and all(torch.is_tensor(v) for v in data.values()):
        return "state_dict"
    return None


def resolve_checkpoint(spec, flag="--checkpoint"):
    """{'kind', 'spec', 'data', 'sha256'} for a checkpoint file or an open_clip pretrained tag."""
    path = Path(spec)
    if path.is_file():
        try:
            data = common.load_checkpoint_file(path)
        except common.CheckpointError as err:  # e.g. refused: it would unpickle arbitrary objects
            raise common.CheckpointError(f"{flag} {err}") from None
        kind = checkpoint_kind(data)
        if kind is None:
            raise common.CheckpointError(f"{flag} {path}: holds no model state_dict (expected a "
                                         "checkpoint of clip_train.py or a plain open_clip state_dict)")
        return {"kind": kind, "spec": str(path), "data": data, "sha256": common.file_sha256(path)}
    if path.exists():
        raise common.CheckpointError(f"{flag} {path}: is a folder, not a checkpoint file")
    if looks_like_file(spec):
        raise common.CheckpointError(f"{flag} {path}: no such checkpoint file")
    return {"kind": "tag", "spec": str(spec), "data": None, "sha256": None}


def looks_like_file(spec):
    """A weights spec meant as a file (a weights suffix or a folder part), not a pretrained tag."""
    path = Path(spec)
    return path.suffix.lower() in WEIGHT_SUFFIXES or len(path.parts) > 1


def requested_model_name(args):
    """--model-name, or the --model-config stem (registered with open_clip on the way)."""
    config_name = None
    if args.model_config:
        config_name, _config = common.register_model_config(args.model_config)
        if args.model_name and args.model_name != config_name:
            raise ValueError(f"--model-name {args.model_name} differs from the --model-config "
                             f"architecture {config_name}")
    return args.model_name or config_name


def resolve_model_name(requested, checkpoint, flag="--model-name", role="--checkpoint"):
    """The architecture: the checkpoint's own, else `requested` (the value of `flag`)."""
    if checkpoint["kind"] != "ours":
        if not requested:
            what = "a pretrained tag" if checkpoint["kind"] == "tag" else "a plain state_dict"
            raise ValueError(f"{flag} is required: {role} {checkpoint['spec']} is {what} "
                             "without architecture metadata (e.g. --model-name ViT-B-32-256)")
        return requested
    data = checkpoint["data"]
    name = data.get("model_name")
    if not isinstance(name, str) or not name:
        raise common.CheckpointError(f"{checkpoint['spec']}: metadata lacks the model_name")
    if requested and requested != name:
        raise ValueError(f"{flag} {requested} differs from the architecture {name} stored in "
                         f"{checkpoint['spec']}; leave {flag} out to use the checkpoint's")
    if isinstance(data.get("model_config"), dict):
        common.register_model_config_dict(name, data["model_config"])
    return name


def load_weights(model, model_name, checkpoint):
    """Load a file checkpoint's state_dict into the model, with a clear error when it does not fit."""
    data = checkpoint["data"]
    common.load_weights_into(model, data["state_dict"] if "state_dict" in data else data,
                             checkpoint["spec"], model_name)


def eval_transform(model, model_name, pretrained, default):
    """The evaluation transform the weights were trained with: the pretrained tag's mean, std and
    resizing when the checkpoint names a tag (as clip_train.py used), else `default`."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if isinstance(pretrained, str) else {}
    base = getattr(model.visual, "preprocess_cfg", None)
    if not tag_cfg or base is None:
        return default
    return image_transform_v2(PreprocessCfg(**merge_preprocess_dict(base, tag_cfg)), is_train=False)


def build_model(model_name, checkpoint, device, flag="--checkpoint"):
    """(model in eval mode, evaluation transform, tokenizer) for a checkpoint file or a tag."""
    spec = checkpoint["spec"]
    if checkpoint["kind"] == "tag":
        if model_name in open_clip.list_models():
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if spec not in tags:
                raise common.CheckpointError(f"{flag} {spec}: not a file, nor a pretrained tag of "
                                             f"{model_name} (its tags: {', '.join(tags) or 'none'})")
        try:
            model, _train_tf, preprocess, tokenizer = common.create_model(model_name, spec, device)
        except (RuntimeError, OSError) as err:
            raise common.CheckpointError(f"{flag} {spec}: could not load the pretrained weights "
                                         f"of {model_name} ({str(err).strip().splitlines()[0][:300]}); "
                                         "offline, pass a local weights file") from None
        return model.eval(), preprocess, tokenizer
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; weights follow
    try:
        model, _train_tf, preprocess, tokenizer = common.create_model(model_name, None, device)
    finally:
        logging.disable(logging.NOTSET)
    load_weights(model, model_name, checkpoint)
    pretrained = checkpoint["data"].get("pretrained") if checkpoint["kind"] == "ours" else None
    return model.eval(), eval_transform(model, model_name, pretrained, preprocess), tokenizer


def load_classes(prompts_path, checkpoint):
    """(classes, source): --prompts, else the checkpoint's stored prompt set, else the published one."""
    data = checkpoint["data"] if checkpoint["kind"] == "ours" else {}
    stored = data.get("class_folders")
    if prompts_path:
        try:
            classes = prompt_sets.load_prompt_set(prompts_path)
        except prompt_sets.PromptSetError as err:
            raise prompt_sets.PromptSetError(f"--prompts {err}") from None
        source = f"--prompts {prompts_path}"
        if stored and list(stored) != prompt_sets.class_folders(classes):
            LOG.warning("--prompts classes %s differ from the checkpoint's %s",
                        prompt_sets.class_folders(classes), list(stored))
        return classes, source
    if data.get("prompts"):
        where = f"{checkpoint['spec']} (stored prompts)"
        return prompt_sets.parse_prompt_set(data["prompts"], where), f"stored in {checkpoint['spec']}"
    classes = prompt_sets.load_prompt_set(None)
    if stored and list(stored) != prompt_sets.class_folders(classes):
        raise common.CheckpointError(f"{checkpoint['spec']}: trained on classes {list(stored)} but "
                                     "stores no prompts; pass them with --prompts")
    return classes, "published prompt set"


def collect_items(test_dir, folders, output_dir):
    """(items, labelled): class-folder images with their class index, or, when no class folder
    exists, every image under test_dir with label -1 (predicted, not scored)."""
    test_dir, output_dir = Path(test_dir), Path(output_dir).resolve()
    items, unknown = common.list_class_folder_images(test_dir, folders)
    unknown = [name for name in unknown if (test_dir / name).resolve() != output_dir]
    known = [folder for folder in folders if (test_dir / folder).is_dir()]
    if known:
        if unknown:
            raise common.CohortError(
                f"--test-dir {test_dir}: folder(s) {', '.join(repr(u) for u in unknown)} are not classes of "
                f"this model {folders}; move them out, or pass --prompts defining them")
        if not items:
            raise common.CohortError(f"--test-dir {test_dir}: no images in the class folders {known}")
        return items, True
    items = [(path, -1) for path in sorted(test_dir.rglob("*"))
             if path.is_file() and common.is_candidate_image(path)
             and output_dir not in path.resolve().parents
             and not any(part.startswith(".") for part in path.relative_to(test_dir).parts)]
    if not items:
        raise common.CohortError(f"--test-dir {test_dir}: no images found (and no class folders {folders})")
    if unknown:
        LOG.warning("--test-dir %s: none of the class folders %s, only %s: every image is predicted, "
                    "not scored (rename the folders to score them, or pass --prompts defining them)",
                    test_dir, folders, unknown)
    return items, False




def stored_calibration(checkpoint, folders, threshold=None):
    """(operating point dict or None, temperature or None, notes) for one evaluated model.

    The threshold and the temperature were fitted on the VALIDATION split by clip_train.py and
    are never re-fitted here; `threshold` (--threshold) overrides the stored one (source 'user').
    """
    data = checkpoint["data"] if checkpoint["kind"] == "ours" else {}
    stored = data.get("operating_point") if isinstance(data.get("operating_point"), dict) else {}
    rare = stored.get("class") if stored.get("class") in folders else folders[0]
    notes = {"temperature_source": "validation (clip_train.py)"}
    operating = {"class": rare, "rare_index": folders.index(rare)}
    value = stored.get("threshold")
    if stored.get("class") not in (None, rare):  # a threshold of a class not evaluated here
        value = None
    if threshold is not None:
        operating.update(threshold=float(threshold), source="user (--threshold)")
    elif isinstance(value, (int, float)) and math.isfinite(value):
        operating.update(threshold=float(value), source="validation",
                         target_sensitivity=stored.get("target_sensitivity"),
                         val_sensitivity=finite_or_none(stored.get("val_sensitivity", float("nan"))),
                         val_specificity=finite_or_none(stored.get("val_specificity", float("nan"))))
    else:
        operating.update(threshold=None, source="the checkpoint stores no validation threshold")
    temperature = data.get("temperature")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        temperature = None
        notes["temperature_source"] = "the checkpoint stores no validation temperature"
    return operating, (float(temperature) if temperature else None), notes


def read_manifest_groups(manifest):
    """({resolved path: group}, sorted splits) of a manifest.csv (group '' where absent)."""
    manifest = Path(manifest)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    groups = {str((manifest.parent / row.get("path", "")).resolve()): (row.get("group") or "").strip()
              for row in rows}
    return groups, sorted({row.get("split", "") for row in rows})


def regex_groups(items, root, pattern):
    """Group of each image: the first capture group of `pattern` searched in its file name
    (as data_preprocess.py --group-regex); a file that does not match is its own group."""
    compiled = re.compile(pattern)
    groups = []
    for path, _label in items:
        match = compiled.search(Path(path).name)
        groups.append(match.group(1) if match and match.group(1) else f"image:{relative_path(path, root)}")
    return groups


def collect_cohort(args, folders):
    """The evaluated images: dict with items [(path, label)], labelled, root (paths in
    predictions.csv are relative to it), groups (list or None), group_source, split."""
    spec = Path(args.test_dir)
    if spec.is_file():
        split = args.split or DEFAULT_SPLIT
        manifest_groups, splits = read_manifest_groups(spec)
        if split not in splits:
            # No silent fallback to another split: evaluating val or train rows must be asked for.
            raise common.CohortError(f"--test-dir {spec}: no rows of split {split!r} (its splits: "
                                     f"{', '.join(splits) or 'none'}); pass --split to choose one")
        items = common.load_labelled_items(spec, folders, split)
        cohort = {"items": items, "labelled": True, "root": spec.parent, "split": split}
        groups = [manifest_groups.get(str(Path(p).resolve()), "") for p, _ in items]
        named = any(groups)
        cohort["groups"] = [g or f"image:{relative_path(p, spec.parent)}"
                            for g, (p, _) in zip(groups, items)] if named else None
        cohort["group_source"] = "manifest group column" if named else None
    else:
        items, labelled = collect_items(spec, folders, args.output_dir)
        cohort = {"items": items, "labelled": labelled, "root": spec, "split": None,
                  "groups": None, "group_source": None}
    if args.group_regex:
        cohort["groups"] = regex_groups(cohort["items"], cohort["root"], args.group_regex)
        cohort["group_source"] = f"--group-regex {args.group_regex}"
    return cohort


# ----------------------------------------------------------------------------------------------
# Embedding cache: re-analysis (other prompts, thresholds, bootstrap sizes) without re-encoding


def cache_model_key(weights_id, model_name, preprocess, precision, extra=None):
    """Hex key of what an image embedding depends on besides the image: the weights (checkpoint
    SHA-256, pretrained tag, WiSE-FT mix), architecture, preprocessing and precision."""
    description = json.dumps({"version": CACHE_VERSION, "weights": weights_id, "model": model_name,
                              "preprocess": repr(preprocess), "precision": precision,
                              "extra": extra}, sort_keys=True)
    return hashlib.sha256(description.encode("utf-8")).hexdigest()


def image_cache_key(path):
    """Hex key of one image file: its resolved path, size and modification time (a changed or
    replaced file gets a new key; no file name is stored in the cache)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    text = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_cache(path):
    """{image key: (embedding (D,) float32, reason or '')} from a cache file ({} if none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, features, reasons = data["keys"], data["features"], data["reasons"]
    except (OSError, ValueError, KeyError) as err:
        LOG.warning("embedding cache %s unreadable (%s); re-encoding", path, err)
        return {}
    return {str(k): (features[i], str(reasons[i])) for i, k in enumerate(keys)}


def write_cache(path, entries):
    """Write {key: (embedding, reason)} atomically as .npz (no pickled objects)."""
    keys = sorted(entries)
    features = np.stack([entries[k][0] for k in keys]).astype(np.float32)
    reasons = np.array([entries[k][1] for k in keys], dtype=str)
    common.atomic_write(path, lambda handle: np.savez(handle, keys=np.array(keys, dtype=str),
                                                      features=features, reasons=reasons))


# ----------------------------------------------------------------------------------------------
# Prediction


def encode_items(model, preprocess, items, args):
    """(features (N, D) float32 normalised, ok (N,) bool, {index: reason}) by encoding images."""
    from tqdm import tqdm
    image_size_px = common.model_image_size(model)
    dataset = common.ImageListDataset(items, preprocess, min_side_px=image_size_px,
                                      image_shape=(3, image_size_px, image_size_px))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        pin_memory=args.device.type == "cuda", worker_init_fn=common.seed_worker)
    progress = lambda batches: tqdm(batches, desc="encoding images", unit="batch",  # noqa: E731
                                    disable=args.no_progress)
    with torch.inference_mode():
        features, ok = common.encode_image_batches(model, loader, args.device, args.precision, progress)
    ok = ok.numpy()
    return features.numpy(), ok, common.read_failures(items, np.flatnonzero(~ok).tolist())


def image_features(model, preprocess, items, args, cache_key):
    """Like `encode_items`, but with --cache-dir only the images missing from the cache (new,
    changed, or never seen with these weights and preprocessing) are read and encoded."""
    if not args.cache_dir:
        return encode_items(model, preprocess, items, args)
    path = Path(args.cache_dir) / f"embeddings_{cache_key[:32]}.npz"
    cached = read_cache(path)
    keys = [image_cache_key(item_path) for item_path, _label in items]
    todo = [i for i, key in enumerate(keys) if key is None or key not in cached]
    LOG.info("embedding cache %s: %d of %d images cached", path, len(items) - len(todo), len(items))
    fresh = {}
    if todo:
        features, ok, reasons = encode_items(model, preprocess, [items[i] for i in todo], args)
        for j, i in enumerate(todo):
            fresh[i] = (features[j], "" if ok[j] else reasons[j])
            if keys[i] is not None:
                cached[keys[i]] = fresh[i]
        Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
        write_cache(path, cached)
    rows = [fresh[i] if i in fresh else cached[keys[i]] for i in range(len(items))]
    features = np.stack([row[0] for row in rows]).astype(np.float32)
    ok = np.array([row[1] == "" for row in rows])
    return features, ok, {i: row[1] for i, row in enumerate(rows) if row[1]}


def score_model(bundle, cohort, args):
    """{'logits': (N, C) float64 with NaN rows where unreadable, 'statuses': per row}."""
    model, items = bundle["model"], cohort["items"]
    features, ok, reasons = image_features(model, bundle["preprocess"], items, args, bundle["cache_key"])
    with torch.inference_mode():
        # The classifier in fp32 whatever --precision: a few prompts, so exactness costs nothing.
        classifier = common.build_zero_shot_classifier(
            model, bundle["tokenizer"], [list(c.eval) for c in bundle["classes"]], args.device)
        # The published code scaled by the raw log temperature; reproduce it only when asked.
        published = bundle["logit_scale_mode"] == "published-log"
        scale = model.logit_scale if published else model.logit_scale.exp()
        logits = common.zero_shot_logits(torch.from_numpy(features), classifier.float().cpu(),
                                         scale.float().cpu())
    logits = logits.double().numpy()  # (N, C)
    logits[~ok] = np.nan
    statuses = ["ok" if good else f"failed: {reasons[i]}" for i, good in enumerate(ok)]
    return {"logits": logits, "statuses": statuses}


def build_bundle(checkpoint, model_name, classes, prompt_source, args, threshold=None,
                 flag="--checkpoint"):
    """Everything needed to score one model: weights loaded, transform, tokenizer, classes,
    logit scale mode, stored operating point and temperature, and its cache key."""
    model, preprocess, tokenizer = build_model(model_name, checkpoint, args.device, flag)
    folders = prompt_sets.class_folders(classes)
    stored_mode = (checkpoint["data"] or {}).get("logit_scale_mode") if checkpoint["kind"] == "ours" else None
    operating, temperature, notes = stored_calibration(checkpoint, folders, threshold)
    weights_id = checkpoint["sha256"] or f"tag:{checkpoint['spec']}"
    return {"checkpoint": checkpoint, "model_name": model_name, "model": model,
            "preprocess": preprocess, "tokenizer": tokenizer, "classes": classes,
            "folders": folders, "prompt_source": prompt_source,
            "logit_scale_mode": args.logit_scale_mode or stored_mode or "exp",
            "operating": operating, "temperature": temperature, "notes": notes,
            "weights_id": weights_id, "wise_ft_alpha": None, "wise_ft_base": None,
            "cache_key": cache_model_key(weights_id, model_name, preprocess, args.precision)}


def prepare_baseline(args, model_name, folders):
    """The --baseline model, scored on the same images; its classes must be the same folders."""
    checkpoint = resolve_checkpoint(args.baseline, flag="--baseline")
    requested = args.baseline_model_name or (None if checkpoint["kind"] == "ours" else model_name)
    name = resolve_model_name(requested, checkpoint, "--baseline-model-name", "--baseline")
    classes, source = load_classes(args.prompts, checkpoint)
    if set(prompt_sets.class_folders(classes)) != set(folders):
        raise ValueError(f"--baseline {args.baseline}: classes {prompt_sets.class_folders(classes)} "
                         f"differ from the model's {folders}; pass a --prompts file for both")
    return build_bundle(checkpoint, name, classes, source, args, flag="--baseline")


def wise_ft_base_weights(args, bundle):
    """(state_dict, label, identity) of the WiSE-FT base: --wise-ft-base, else the checkpoint's
    recorded `pretrained` (a local weights file or an open_clip tag)."""
    checkpoint = bundle["checkpoint"]
    if checkpoint["kind"] == "tag":
        raise ValueError(f"--wise-ft-alpha: --checkpoint {checkpoint['spec']} is a pretrained tag; "
                         "WiSE-FT needs fine-tuned weights (a checkpoint file)")
    if args.wise_ft_base:
        path = Path(args.wise_ft_base)
        try:
            weights = common.load_state_dict_file(path)
        except common.CheckpointError as err:
            raise common.CheckpointError(f"--wise-ft-base {err}") from None
        return weights, f"`{path}`", common.file_sha256(path)
    pretrained = checkpoint["data"].get("pretrained") if checkpoint["kind"] == "ours" else None
    if not pretrained:
        raise ValueError(f"--wise-ft-alpha: {checkpoint['spec']} records no pretrained weights "
                         "(trained from scratch, or a plain state_dict); pass --wise-ft-base PATH")
    if Path(pretrained).is_file():
        return common.load_state_dict_file(pretrained), f"`{pretrained}`", common.file_sha256(pretrained)
    if Path(pretrained).suffix.lower() in WEIGHT_SUFFIXES or len(Path(pretrained).parts) > 1:
        raise ValueError(f"--wise-ft-alpha: the recorded pretrained weights {pretrained} are not "
                         "on this machine; pass --wise-ft-base PATH")
    try:
        base_model, *_ = common.create_model(bundle["model_name"], pretrained)
    except (RuntimeError, OSError, ValueError) as err:
        raise common.CheckpointError(f"--wise-ft-alpha: could not load the pretrained weights "
                                     f"{pretrained} ({str(err).strip().splitlines()[0][:200]}); "
                                     "offline, pass --wise-ft-base PATH") from None
    weights = common.clean_state_dict(base_model.state_dict())
    return weights, f"pretrained tag {pretrained}", f"tag:{pretrained}"


def prepare_wise_ft(args, bundle):
    """{'base', 'tuned', 'label', 'identity'}: both weight sets, checked to fit each other."""
    base, label, identity = wise_ft_base_weights(args, bundle)
    tuned = {k: v.detach().clone() for k, v in bundle["model"].state_dict().items()}
    base = {k: v for k, v in base.items() if k in tuned} if set(tuned) <= set(base) else base
    if base.keys() != tuned.keys():
        example = sorted(set(base) ^ set(tuned))[0]
        raise common.CheckpointError(f"--wise-ft-base {label}: weights do not fit architecture "
                                     f"{bundle['model_name']} (e.g. key {example!r})")
    for key, value in tuned.items():
        if base[key].shape != value.shape:
            raise common.CheckpointError(f"--wise-ft-base {label}: {key} has shape "
                                         f"{tuple(base[key].shape)}, the model {tuple(value.shape)}")
    return {"base": base, "tuned": tuned, "label": label, "identity": identity}


def wise_ft_bundle(bundle, wise, alpha, args):
    """The bundle with its model set to (1 - alpha) * base + alpha * fine-tuned weights. The
    validation threshold and temperature belong to the fine-tuned weights: kept at alpha 1 only."""
    bundle["model"].load_state_dict(common.interpolate_state_dicts(wise["base"], wise["tuned"], alpha))
    variant = dict(bundle, wise_ft_alpha=alpha, wise_ft_base=wise["label"],
                   cache_key=cache_model_key(bundle["weights_id"], bundle["model_name"],
                                             bundle["preprocess"], args.precision,
                                             {"wise_ft_alpha": alpha, "base": wise["identity"]}))
    if alpha != 1.0:
        note = "fitted on validation for the fine-tuned weights (alpha 1) only"
        variant["temperature"] = None
        variant["notes"] = dict(bundle["notes"], temperature_source=note)
        if args.threshold is None:
            variant["operating"] = dict(bundle["operating"], threshold=None, source=note)
    return variant


# ----------------------------------------------------------------------------------------------
# Outputs


def check_output_dir(output_dir, overwrite):
    """Refuse a non-empty --output-dir unless --overwrite (checked before any work is done)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"--output-dir {output_dir}: exists and is not empty; pass --overwrite to "
                         "replace its evaluation files, or choose another folder")


def clear_previous_outputs(output_dir):
    """Remove our own files of an earlier run (so no stale metrics.json outlives an unlabelled run)."""
    for name in OUTPUT_NAMES:
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()


def package_versions():
    import scipy
    import sklearn
    return {"python": platform.python_version(), "torch": torch.__version__,
            "open_clip": open_clip.__version__, "sklearn": sklearn.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__}


def run_info(args, setup, bundle):
    """What was evaluated, recorded in metrics.json, args.json and report.md."""
    checkpoint, cohort, operating = bundle["checkpoint"], setup["cohort"], bundle["operating"]
    run = {
        "checkpoint": checkpoint["spec"],
        "checkpoint_kind": {"ours": "Orbital-CLIP checkpoint", "state_dict": "plain state_dict",
                            "tag": "open_clip pretrained tag"}[checkpoint["kind"]],
        "checkpoint_sha256": checkpoint["sha256"],
        "model_name": bundle["model_name"],
        "wise_ft_alpha": bundle["wise_ft_alpha"],
        "wise_ft_base": bundle["wise_ft_base"],
        "class_folders": bundle["folders"],
        "rare_class": operating["class"],
        "prompts": prompt_sets.prompt_set_to_dict(bundle["classes"]),
        "prompt_source": bundle["prompt_source"],
        "logit_scale_mode": bundle["logit_scale_mode"],
        "operating_threshold": operating["threshold"],
        "operating_threshold_source": operating["source"],
        "temperature": bundle["temperature"],
        "temperature_source": bundle["notes"]["temperature_source"],
        "test_dir": "<anonymized>" if setup["anonymize"] else str(args.test_dir),
        "split": cohort["split"],
        "group_source": cohort["group_source"],
        "anonymized": bool(setup["anonymize"]),
        "bootstrap": args.bootstrap,
        "bootstrap_unit": "group" if cohort["groups"] is not None else "image",
        "seed": args.seed,
        "confidence_level": CONFIDENCE_LEVEL,
        "ece_bins": args.ece_bins,
        "ece_binning": f"{args.ece_bins} equal-width bins of the max probability, right-closed",
        "lr_ci_method": "log method (Simel 1991); 0.5 added to each cell when one is 0",
        "figures": args.figures,
        "device": str(args.device),
        "precision": args.precision,
        "versions": package_versions(),
    }
    if setup["baseline"] is not None:
        base = setup["baseline"]
        run["baseline"] = {"checkpoint": base["checkpoint"]["spec"], "model_name": base["model_name"],
                           "checkpoint_sha256": base["checkpoint"]["sha256"]}
    return run


def args_record(args, anonymize):
    """args as JSON-ready primitives; never the salt, and no test path when anonymising."""
    record = {key: str(value) if isinstance(value, (Path, torch.device)) else value
              for key, value in vars(args).items() if key != "anonymize_salt"}
    if anonymize:
        record["test_dir"] = "<anonymized>"
    return record


def score_labelled(bundle, scores, cohort, args, baseline_scores=None):
    """(metrics, operating point, intention-to-diagnose, comparison) of a labelled cohort."""
    folders, operating = bundle["folders"], bundle["operating"]
    probs = softmax(scores["logits"])
    scored = np.isfinite(probs).all(axis=1)
    labels = np.array([label for _path, label in cohort["items"]], dtype=np.int64)
    y_true = labels[scored]
    groups = None if cohort["groups"] is None else np.asarray(cohort["groups"], dtype=str)[scored]
    probs_cal = softmax(scores["logits"][scored], bundle["temperature"]) if bundle["temperature"] else None
    metrics = compute_metrics(y_true, probs[scored], folders, args.bootstrap, args.seed,
                              groups=groups, probs_cal=probs_cal, ece_bins=args.ece_bins)
    if metrics["temperature_scaled"] is not None:
        metrics["temperature_scaled"] = {"temperature": bundle["temperature"],
                                         "source": bundle["notes"]["temperature_source"],
                                         **metrics["temperature_scaled"]}
    rare = operating["rare_index"]
    op = None
    if operating["threshold"] is not None and scored.any():
        op = {key: value for key, value in operating.items() if key != "rare_index"}
        op.update(operating_point_metrics(y_true, probs[scored], rare, operating["threshold"]))
    predicted = np.where(scored, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1)
    itd = intention_to_diagnose(labels, predicted, rare)
    comparison = None
    if baseline_scores is not None:
        base_probs = softmax(baseline_scores["logits"])
        both = scored & np.isfinite(base_probs).all(axis=1)
        both_groups = None if cohort["groups"] is None else np.asarray(cohort["groups"], dtype=str)[both]
        comparison = compare_models(labels[both], probs[both], base_probs[both], both_groups,
                                    args.bootstrap, args.seed)
    return metrics, op, itd, comparison


def write_scored_tables(output_dir, y_true, probs, folders, metrics, comparison):
    """per_class_metrics.csv, classification_report.txt, confusion_matrix.csv, comparison.csv."""
    from sklearn.metrics import classification_report
    common.atomic_write_csv(output_dir / "per_class_metrics.csv", per_class_frame(metrics, folders))
    report = classification_report(y_true, probs.argmax(axis=1), labels=list(range(len(folders))),
                                   target_names=folders, digits=3, zero_division=0)
    common.atomic_write_text(output_dir / "classification_report.txt", report)
    common.atomic_write_csv(output_dir / "confusion_matrix.csv",
                            confusion_frame(metrics["confusion_matrix"], folders))
    if comparison is not None:
        common.atomic_write_csv(output_dir / "comparison.csv", comparison_frame(comparison))


def write_evaluation(output_dir, args, setup, bundle, scores, baseline_scores=None):
    """Every output file of one model into output_dir; returns metrics (None when unlabelled)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_outputs(output_dir)
    cohort, folders, anonymize = setup["cohort"], bundle["folders"], setup["anonymize"]
    probs = softmax(scores["logits"])
    probs_cal = softmax(scores["logits"], bundle["temperature"]) if bundle["temperature"] else None
    threshold, rare = bundle["operating"]["threshold"], bundle["operating"]["rare_index"]
    rule = rule_predictions(np.nan_to_num(probs), rare, threshold) if threshold is not None else None
    common.atomic_write_csv(output_dir / "predictions.csv", predictions_frame(
        cohort, folders, probs, scores["statuses"], probs_cal, rule, anonymize))
    run = run_info(args, setup, bundle)
    common.atomic_write_json(output_dir / "args.json", {"args": args_record(args, anonymize), "run": run})
    labels = [label for _path, label in cohort["items"]]
    flow = flow_counts(labels, scores["statuses"], folders, cohort["labelled"])
    metrics = op = itd = comparison = None
    if cohort["labelled"]:
        metrics, op, itd, comparison = score_labelled(bundle, scores, cohort, args, baseline_scores)
        n_failed = flow["rows"]["total"]["unreadable"]
        metrics = {"n": metrics.pop("n"), "n_received": len(labels), "n_failed": n_failed, **metrics,
                   "operating_point": op, **itd, "flow": flow, "comparison": comparison, **run}
        common.atomic_write_json(output_dir / "metrics.json", metrics)
        if baseline_scores is not None:
            base = setup["baseline"]
            order = [base["folders"].index(f) for f in folders]
            common.atomic_write_csv(output_dir / "baseline_predictions.csv", predictions_frame(
                cohort, folders, softmax(baseline_scores["logits"])[:, order],
                baseline_scores["statuses"], anonymize=anonymize))
        if metrics["n"]:  # nothing to tabulate or draw when no image could be read
            scored = np.isfinite(probs).all(axis=1)
            y_true = np.asarray(labels)[scored]
            write_scored_tables(output_dir, y_true, probs[scored], folders, metrics, comparison)
            if args.figures:
                write_figures(output_dir, y_true, probs[scored],
                              None if probs_cal is None else probs_cal[scored], folders, metrics, op, rare)
    report = render_report(run, flow, metrics, folders, op, itd, comparison)
    common.atomic_write_text(output_dir / "report.md", report)
    return metrics


def summary_row(alpha, folder, metrics, rare_class):
    """One row of wise_ft_summary.csv."""
    row = {"alpha": alpha, "output_dir": folder, "n": None if metrics is None else metrics["n"]}
    names = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc", "log_loss", "ece")
    for name in names:
        value = None if metrics is None else metrics[name]
        ci = None if metrics is None else metrics[f"{name}_ci"]
        row.update({name: value, f"{name}_ci_low": ci[0] if ci else None,
                    f"{name}_ci_high": ci[1] if ci else None})
    for name in ("sensitivity", "specificity"):
        stats = {} if metrics is None else metrics["per_class"].get(rare_class, {})
        ci = stats.get(f"{name}_ci")
        row.update({f"rare_{name}": stats.get(name), f"rare_{name}_ci_low": ci[0] if ci else None,
                    f"rare_{name}_ci_high": ci[1] if ci else None})
    return row


def run_wise_ft(args, setup, baseline_scores):
    """One full evaluation per alpha in wise_ft_alpha_<a>/ and wise_ft_summary.csv; returns
    (statuses of the last run, list of metrics)."""
    import pandas as pd
    bundle, output_dir = setup["model"], Path(args.output_dir)
    rows, results, scores = [], [], None
    for alpha in args.wise_ft_alpha:
        LOG.info("== WiSE-FT alpha %g ==", alpha)
        variant = wise_ft_bundle(bundle, setup["wise"], alpha, args)
        scores = score_model(variant, setup["cohort"], args)
        folder = f"wise_ft_alpha_{alpha:g}"
        metrics = write_evaluation(output_dir / folder, args, setup, variant, scores, baseline_scores)
        rows.append(summary_row(alpha, folder, metrics, variant["operating"]["class"]))
        results.append(metrics)
    common.atomic_write_csv(output_dir / "wise_ft_summary.csv", pd.DataFrame(rows))
    common.atomic_write_json(output_dir / "args.json", {"args": args_record(args, setup["anonymize"]),
                                                        "versions": package_versions()})
    return scores["statuses"], results


# ----------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and model")
    data.add_argument("--test-dir", required=True,
                      help="test cohort: one sub-folder per class (scored), images without class "
                           "folders (predicted only), or a manifest.csv of data_preprocess.py")
    data.add_argument("--split", default=None,
                      help=f"with a manifest.csv --test-dir: the rows evaluated (default "
                           f"{DEFAULT_SPLIT}; no fallback to another split)")
    data.add_argument("--checkpoint", required=True,
                      help="checkpoint of clip_train.py, a plain open_clip state_dict (needs "
                           "--model-name), or an open_clip pretrained tag for the zero-shot baseline")
    data.add_argument("--model-name", default=None,
                      help="open_clip architecture; optional with our checkpoints (stored in them), "
                           "required otherwise (published: ViT-B-32-256)")
    data.add_argument("--model-config", default=None,
                      help="JSON of a custom open_clip architecture, registered under the file's "
                           "stem (which --model-name then defaults to)")
    data.add_argument("--prompts", default=None,
                      help="JSON prompt set replacing the checkpoint's stored one (schema in prompts.py); "
                           "classes are matched to test folders by name")
    data.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                      help=f"where the outputs go (default {DEFAULT_OUTPUT_DIR}); must be new or empty "
                           "unless --overwrite")
    compare = parser.add_argument_group("comparison and weight interpolation")
    compare.add_argument("--baseline", default=None, metavar="TAG|PATH",
                         help="a second model scored on the same images (a pretrained tag for the "
                              "zero-shot baseline, or another checkpoint): paired differences with "
                              "CIs and McNemar's test in comparison.csv")
    compare.add_argument("--baseline-model-name", default=None,
                         help="architecture of a tag or plain state_dict --baseline (default: the "
                              "model's own)")
    compare.add_argument("--wise-ft-alpha", type=float, nargs="+", default=None, metavar="A",
                         help="WiSE-FT: evaluate (1 - A) * base + A * fine-tuned weights for each A "
                              "in [0, 1], one wise_ft_alpha_<A>/ folder each (0.5 often keeps the "
                              "zero-shot robustness and most of the fine-tuning gain)")
    compare.add_argument("--wise-ft-base", default=None, metavar="PATH",
                         help="WiSE-FT base weights file (default: the checkpoint's recorded "
                              "pretrained weights)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     help="images per forward pass (default 64; 256+ is fine on a GPU)")
    run.add_argument("--workers", type=int, default=None,
                     help="image-decoding worker processes (default: cores - 1, at most 8, on a GPU; "
                          "0 = in process, the default on the CPU)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="image tower precision; features and classifier stay fp32 (auto: bf16 where "
                          "the hardware multiplies bf16 natively: CUDA with bf16, a CPU with AMX or "
                          "AVX512-BF16; else fp32. fp32 for exact numbers; fp16 needs CUDA)")
    run.add_argument("--logit-scale-mode", choices=("exp", "published-log"), default=None,
                     help="softmax temperature: exp(logit_scale) (correct CLIP), or the raw log value "
                          "as the published code did (default: the checkpoint's mode, else exp)")
    run.add_argument("--cache-dir", default=None,
                     help="cache image embeddings here, keyed by weights, architecture, "
                          "preprocessing and each file's path, size and mtime: a re-run with other "
                          "prompts, thresholds or bootstrap sizes encodes no image")
    run.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                     help="draw the figures (PNG + PDF; default on; --no-figures saves a few seconds)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the evaluation files of an earlier run in --output-dir")
    privacy = parser.add_argument_group("privacy")
    privacy.add_argument("--anonymize-paths", action="store_true",
                         help="write salted SHA-256 hashes instead of image paths (and group ids) in "
                              "every output; the test folder is written as <anonymized>")
    privacy.add_argument("--anonymize-salt", default=None,
                         help="salt of --anonymize-paths (default: random per run, so hashes cannot "
                              "be linked across runs); never written to any output")
    stats = parser.add_argument_group("statistics")
    stats.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP,
                       help="percentile-bootstrap resamples for the 95%% CIs (default 2000; under "
                            "~500 the interval ends move with the seed; 0 = no bootstrap CIs)")
    stats.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed (default 2024)")
    stats.add_argument("--group-regex", default=None, metavar="RE",
                       help=r"resample patients, not images: the first capture group of RE in each "
                            r"file name is its group, e.g. '^(P\d+)_' (overrides a manifest's group "
                            "column; a file that does not match is its own group)")
    stats.add_argument("--threshold", type=float, default=None,
                       help="rare-class operating threshold in [0, 1] replacing the checkpoint's "
                            "validation one (source 'user'); never tune it on the test cohort")
    stats.add_argument("--ece-bins", type=int, default=DEFAULT_ECE_BINS,
                       help="equal-width bins of the expected calibration error (default 10; 10-15 "
                            "is usual, more bins need more images)")
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = common.default_workers(args.device)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Every rejected value or combination, named by its flag (exit 2, nothing written)."""
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--bootstrap", args.bootstrap, 0), ("--ece-bins", args.ece_bins, 2)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    test_dir = Path(args.test_dir)
    if test_dir.is_file() and test_dir.suffix.lower() != ".csv":
        parser.error(f"--test-dir {test_dir}: a file must be a manifest.csv")
    if not test_dir.exists():
        parser.error(f"--test-dir {test_dir}: no such folder or manifest")
    if args.split is not None and not test_dir.is_file():
        parser.error("--split applies to a manifest.csv --test-dir only")
    for flag, value in (("--model-config", args.model_config), ("--prompts", args.prompts),
                        ("--wise-ft-base", args.wise_ft_base)):
        if value and not Path(value).is_file():
            parser.error(f"{flag} {value}: no such file")
    if args.baseline and looks_like_file(args.baseline) and not Path(args.baseline).is_file():
        parser.error(f"--baseline {args.baseline}: no such file")
    if args.baseline_model_name and not args.baseline:
        parser.error("--baseline-model-name needs --baseline")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.wise_ft_alpha is not None:
        bad = [a for a in args.wise_ft_alpha if not 0.0 <= a <= 1.0]
        if bad:
            parser.error(f"--wise-ft-alpha values must be in [0, 1], got {bad[0]}")
        if len({f"{a:g}" for a in args.wise_ft_alpha}) != len(args.wise_ft_alpha):
            parser.error("--wise-ft-alpha: each alpha once")
    elif args.wise_ft_base:
        parser.error("--wise-ft-base needs --wise-ft-alpha")
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        parser.error(f"--cache-dir {args.cache_dir}: exists and is not a folder")
    if args.anonymize_salt is not None and not args.anonymize_paths:
        parser.error("--anonymize-salt needs --anonymize-paths")
    if args.group_regex is not None:
        try:
            groups = re.compile(args.group_regex).groups
        except re.error as err:
            parser.error(f"--group-regex {args.group_regex!r}: not a regular expression ({err})")
        if groups < 1:
            parser.error(f"--group-regex {args.group_regex!r}: needs a capture group, e.g. '^(P\\d+)_'")


def prepare(args):
    """Everything checked and loaded before any output is written (errors: ValueError/OSError)."""
    args.device = common.resolve_device(args.device)
    args.precision, why = common.resolve_precision(args.precision, args.device)
    LOG.info("precision %s (%s)", args.precision, why)
    common.autocast_context(args.device, args.precision)
    check_output_dir(args.output_dir, args.overwrite)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model_name = resolve_model_name(requested_model_name(args), checkpoint)
    classes, prompt_source = load_classes(args.prompts, checkpoint)
    cohort = collect_cohort(args, prompt_sets.class_folders(classes))
    if args.baseline and not cohort["labelled"]:
        raise ValueError(f"--baseline: {args.test_dir} has no class folders, so there is nothing "
                         "to compare on; give a labelled cohort")
    bundle = build_bundle(checkpoint, model_name, classes, prompt_source, args, args.threshold)
    salt = args.anonymize_salt if args.anonymize_salt is not None else secrets.token_hex(16)
    return {"cohort": cohort, "model": bundle,
            "baseline": prepare_baseline(args, model_name, bundle["folders"]) if args.baseline else None,
            "wise": prepare_wise_ft(args, bundle) if args.wise_ft_alpha else None,
            "anonymize": make_anonymizer(salt) if args.anonymize_paths else None}


def main(argv=None):
    args = parse_args(argv)
    common.configure_logging()
    LOG.info("== setup ==")
    for key, value in vars(args).items():
        LOG.info("  %s = %s", key, "<hidden>" if key == "anonymize_salt" and value else value)
    try:
        setup = prepare(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cohort, bundle = setup["cohort"], setup["model"]
    if 0 < args.bootstrap < 500:
        LOG.warning("--bootstrap %d: so few resamples give unstable interval ends", args.bootstrap)
    LOG.info("== predicting %d images: %s, classes %s, %s, logit scale %s, %s %s ==",
             len(cohort["items"]), bundle["model_name"], bundle["folders"],
             "labelled (scored)" if cohort["labelled"] else "no class folders (predicted, not scored)",
             bundle["logit_scale_mode"], args.device, args.precision)
    baseline_scores = score_model(setup["baseline"], cohort, args) if setup["baseline"] else None
    if setup["wise"] is not None:
        statuses, results = run_wise_ft(args, setup, baseline_scores)
        metrics = results[-1]
    else:
        scores = score_model(bundle, cohort, args)
        statuses = scores["statuses"]
        metrics = write_evaluation(args.output_dir, args, setup, bundle, scores, baseline_scores)
    n_failed = sum(status != "ok" for status in statuses)
    if n_failed == len(statuses):
        print(f"error: none of the {len(statuses)} images could be read; the reasons are in the "
              "status column of predictions.csv", file=sys.stderr)
        return 1
    if n_failed:
        LOG.warning("%d of %d images could not be read; see status in predictions.csv",
                    n_failed, len(statuses))
    if metrics is None:
        LOG.info("== done: %d images predicted, not scored (no class folders); outputs in %s ==",
                 len(statuses) - n_failed, args.output_dir)
    else:
        LOG.info("== done: n %d  accuracy %s  balanced accuracy %s  macro AUROC %s; outputs in %s ==",
                 metrics["n"], format_value(metrics["accuracy"], metrics["accuracy_ci"]),
                 format_value(metrics["balanced_accuracy"], metrics["balanced_accuracy_ci"]),
                 format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
