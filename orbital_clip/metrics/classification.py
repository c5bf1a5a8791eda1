"""Point metrics of a confusion matrix (pure: counts in, numbers out): proportions with Wilson
intervals, likelihood ratios, per-class one-vs-rest statistics, the summary metrics of many
matrices at once, and the checkpoint-selection metrics training uses.
"""

import math

import numpy as np
from scipy.special import softmax as scipy_softmax
from scipy.stats import binomtest, norm

DEFAULT_BOOTSTRAP = 2000  # percentile-bootstrap resamples; ~2000 keeps 95% interval ends stable
DEFAULT_SEED = 2024
CONFIDENCE_LEVEL = 0.95
OVERALL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "mcc",
                   "macro_auroc", "macro_auprc", "brier", "log_loss", "ece")
PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")
# Averages over the declared classes: undefined (n/a) when the scored images, or a resample of
# them, lack a class, rather than an average over fewer classes (balanced accuracy) or one that
# scores the absent class 0 (macro F1). `bootstrap.mark_unusable` applies the rule.
CLASS_AVERAGED = ("balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc")


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
    its lower end. An estimate is None where it is undefined or infinite (a zero denominator:
    LR+ with no false positive, LR- with no true negative), and so is its interval: an estimate
    and its interval are reported both or neither (the interval of the Haldane-corrected cells
    would belong to no reported estimate).

    Returns
    -------
    dict with lr_pos, lr_pos_ci, lr_neg, lr_neg_ci.
    """
    out = {"lr_pos": None, "lr_pos_ci": None, "lr_neg": None, "lr_neg_ci": None}
    if tp + fn == 0 or fp + tn == 0:
        return out
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
        if value is None:
            continue
        half = z * math.sqrt(max(se2, 0.0))
        low, high = math.exp(log_lr - half), math.exp(log_lr + half)
        out[key] = value
        out[f"{key}_ci"] = [0.0 if value == 0 else low, high]
    return out


def per_class_metrics(cm, k, confidence=CONFIDENCE_LEVEL):
    """One-vs-rest statistics of class k from a confusion matrix: support, prevalence, counts,
    sensitivity, specificity, PPV, NPV (each with its Wilson interval), LR+ and LR- (log-method
    intervals) and F1 (None where a class is never true nor predicted).

    A class with no true image (support 0) gets counts only: every rate, interval and LR is None
    (n/a), not a specificity of 1.000 that no image of the class earned."""
    tp, fp, fn, tn = one_vs_rest_counts(cm, k)
    total = tp + fp + fn + tn
    stats = {"support": tp + fn, "prevalence": proportion(tp + fn, total),
             "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    if tp + fn == 0:
        for name in ("sensitivity", "specificity", "ppv", "npv", "lr_pos", "lr_neg"):
            stats[name], stats[f"{name}_ci"] = None, None
        stats["f1"] = None
        return stats
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
    dict name -> (B,) float array (NaN where undefined, an empty matrix), "f1" -> (B, C), NaN
    for a class never true nor predicted, and "support" -> (B, C), the true count of each class.
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
            "mcc": np.where(total > 0, mcc, np.nan), "f1": f1, "support": support}


# ----------------------------------------------------------------------------------------------
# Probabilistic metrics per image (pure)


def softmax(logits, temperature=1.0):
    """Row-wise softmax of logits / temperature in float64 (NaN rows stay NaN)."""
    return scipy_softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=1)


PROBABILITY_METRICS = ("macro_auroc", "macro_auprc", "brier", "log_loss", "ece")


def label_probs(y_pred, n_classes):
    """One-hot rows of predicted labels (NaN rows where y_pred is -1): the 'probabilities' of a
    reader who gives labels only, so `compute_metrics` counts the same confusion matrix."""
    y_pred = np.asarray(y_pred, dtype=np.int64)
    probs = np.eye(n_classes)[np.clip(y_pred, 0, None)]
    probs[y_pred < 0] = np.nan
    return probs


def without_probability_metrics(metrics):
    """metrics.json of `label_probs`: AUROC, AUPRC and calibration set to None (a one-hot column
    ranks nothing; its 'AUROC' would be (sensitivity + specificity) / 2, not a curve)."""
    metrics = dict(metrics)
    for name in PROBABILITY_METRICS:
        metrics[name], metrics[f"{name}_ci"] = None, None
    metrics["per_class"] = {name: dict(stats, auroc=None, auroc_ci=None, auprc=None, auprc_ci=None,
                                       auprc_baseline=None)
                            for name, stats in metrics["per_class"].items()}
    return metrics
