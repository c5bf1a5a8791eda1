"""Every evaluation statistic of Orbital-CLIP, in numpy and scipy only (never torch): point
metrics of a confusion matrix, Wilson intervals, likelihood ratios, the vectorised (image or
group) percentile bootstrap, calibration (Brier, log-loss, ECE, reliability bins), the
operating-rule statistics and the paired model comparison with McNemar's test.

inference.py turns these into metrics.json and report.md; a reviewer checking how an interval is
computed needs to read this file only.
"""

import dataclasses
import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as scipy_softmax
from scipy.stats import binom, binomtest, norm
from scipy.stats import chi2 as chi2_dist
from scipy.stats import chi2_contingency

DEFAULT_BOOTSTRAP = 2000  # percentile-bootstrap resamples; ~2000 keeps 95% interval ends stable
DEFAULT_SEED = 2024
DEFAULT_ECE_BINS = 10  # equal-width bins of the max probability (Guo et al. 2017 use 15; 10 is common)
CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_CHUNK = 256  # replicates evaluated together: memory ~ CHUNK x N numbers per array
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)  # probabilities clipped here, as scikit-learn does
OVERALL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "mcc",
                   "macro_auroc", "macro_auprc", "brier", "log_loss", "ece")
CALIBRATION_METRICS = ("brier", "log_loss", "ece")
COMPARED_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "macro_auprc")
PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")
CLASS_AVERAGED = ("balanced_accuracy", "macro_f1")  # undefined when a resample lacks a class


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


def bootstrap_strata(y_true, group_index):
    """Stratum (a class index) of each group for the class-stratified bootstrap.

    A group (a patient, or one image) whose images are all of one class is stratified by that
    class. A patient with images in several classes is stratified by the rarest of them (the
    class held by the fewest groups of the cohort; ties go to the lower class index, the
    clinically critical class first). Every class that is some group's rarest class is then in
    every resample; a class whose every patient also has a rarer class may still be missing from
    some (those resamples are counted as unusable for the class-averaged metrics).

    Parameters
    ----------
    y_true : (N,) int array
        True class of each image.
    group_index : (N,) int array
        Group of each image, 0..G-1 (see `group_indices`).

    Returns
    -------
    (G,) int array: the stratum (class index) of each group.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    group_index = np.asarray(group_index, dtype=np.int64)
    if len(y_true) == 0:
        return np.zeros(0, dtype=np.int64)
    n_groups, n_classes = int(group_index.max()) + 1, int(y_true.max()) + 1
    holds = np.zeros((n_groups, n_classes), dtype=bool)
    holds[group_index, y_true] = True  # (G, C): the group has an image of the class
    rarity = np.lexsort((np.arange(n_classes), holds.sum(axis=0)))  # rarest class first
    rank = np.empty(n_classes, dtype=np.int64)
    rank[rarity] = np.arange(n_classes)
    return np.where(holds, rank, n_classes).argmin(axis=1)  # column of the rarest class held


def resample_weights(group_index, n_bootstrap, seed, chunk=BOOTSTRAP_CHUNK, strata=None):
    """Yield (b, N) float arrays of bootstrap weights, `chunk` replicates at a time.

    Each replicate draws groups with replacement (a cluster bootstrap: the images of a patient
    stay together); an image's weight is how often its group was drawn. One group per image is
    the ordinary bootstrap of images. With `strata` ((G,) stratum of each group) each stratum is
    resampled on its own, as many groups as it holds, so every resample keeps the cohort's
    number of groups per stratum (a stratified bootstrap); without, all G groups are one stratum.
    The same seed, groups and strata give the same replicates, whatever the chunk size.
    """
    rng = np.random.default_rng(seed)
    group_index = np.asarray(group_index, dtype=np.int64)
    n_groups = int(group_index.max()) + 1 if len(group_index) else 0
    strata = np.zeros(n_groups, np.int64) if strata is None else np.asarray(strata, np.int64)
    order = np.argsort(strata, kind="stable")  # groups sorted by stratum: one slot per group
    _, first, size = np.unique(strata[order], return_index=True, return_counts=True)
    slot_first = np.repeat(first, size)  # (G,) where the slot's stratum starts in `order`
    slot_size = np.repeat(size, size)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        # One uniform per slot and replicate, drawn row by row, so chunking changes nothing;
        # the slot then picks a group of its own stratum.
        pick = np.minimum((rng.random((b, n_groups)) * slot_size).astype(np.int64), slot_size - 1)
        draws = order[slot_first + pick] + np.arange(b)[:, None] * n_groups
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        yield counts[:, group_index].astype(np.float64)


def mark_unusable(replicates, present):
    """Replicates in place: a resample without an image of a class the cohort has gives no
    balanced accuracy, macro F1 or F1 of that class (NaN: unusable, left out of the interval and
    counted), instead of averaging over fewer classes or scoring the absent class 0. AUROC and
    AUPRC of such a class are NaN already (no positive image)."""
    absent = (replicates["support"] == 0) & present[None, :]  # (B, C)
    unusable = absent.any(axis=1)
    for name in CLASS_AVERAGED:
        replicates[name] = np.where(unusable, np.nan, replicates[name])
    if "f1" in replicates:  # the comparison's replicates carry no per-class F1
        replicates["f1"] = np.where(absent, np.nan, replicates["f1"])
    return replicates


def bootstrap_replicates(prepared_list, group_index, n_bootstrap, seed, stratify=True):
    """`weighted_metrics` of each prepared model on the same resamples (paired when several),
    stratified by class (see `bootstrap_strata`) unless `stratify` is False.

    Returns
    -------
    list (one per prepared model) of dict name -> (B,) or (B, C) arrays.
    """
    positive = prepared_list[0]["positive"]  # (N, C): the true class of each image
    strata = bootstrap_strata(positive.argmax(axis=1), group_index) if stratify else None
    parts = [dict() for _ in prepared_list]
    for weights in resample_weights(group_index, n_bootstrap, seed, strata=strata):
        for store, prepared in zip(parts, prepared_list):
            for name, values in weighted_metrics(weights, prepared).items():
                store.setdefault(name, []).append(values)
    return [mark_unusable({name: np.concatenate(values) for name, values in store.items()},
                          positive.any(axis=0)) for store in parts]


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
        metrics[name], metrics[f"{name}_ci"], metrics[f"{name}_ci_n_resamples"] = None, None, None
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
        Either way the resamples are stratified by class (see `bootstrap_strata`).
    probs_cal : (N, C) float array, optional
        Temperature-scaled probabilities: adds `temperature_scaled` (Brier, log-loss, ECE).
    ece_bins : int
        Equal-width bins of the max probability for the ECE.

    Returns
    -------
    dict with n, each of OVERALL_METRICS beside its `<name>_ci` and `<name>_ci_n_resamples`
    (the usable resamples behind the interval), ece_bins, bootstrap_unit, n_groups,
    bootstrap_design, temperature_scaled, confusion_matrix (rows true) and per_class[name] (see
    `per_class_metrics`, plus f1, auroc, auprc with `_ci` and `_ci_n_resamples`, and
    auprc_baseline, the expected AUPRC of a random ranking). Undefined: None.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y_true), len(class_names))
    n = len(y_true)
    metrics = empty_metrics(class_names) if n == 0 else {"n": n}
    group_index = group_indices(groups, n)
    metrics.update(ece_bins=ece_bins, bootstrap_unit="image" if groups is None else "group",
                   n_groups=int(group_index.max()) + 1 if n else 0, temperature_scaled=None,
                   bootstrap_design=bootstrap_design(y_true, group_index, class_names, n_bootstrap,
                                                     groups is not None))
    if n == 0:
        return metrics
    prepared = prepare_scores(y_true, probs, ece_bins, probs_cal)
    point = weighted_metrics(np.ones((1, n)), prepared)
    boot = bootstrap_replicates([prepared], group_index, n_bootstrap, seed)[0] if n_bootstrap else None

    def estimate(store, key, name, column=None):
        """store[key], store[key_ci] and store[key_ci_n_resamples] (the finite replicates the
        interval rests on; below n_bootstrap when some resamples left it undefined)."""
        value = point[name][0] if column is None else point[name][0, column]
        value = finite_or_none(value)
        replicates = None if boot is None else (boot[name] if column is None else boot[name][:, column])
        usable = None if replicates is None or value is None else int(np.isfinite(replicates).sum())
        store[key] = value
        store[f"{key}_ci"] = percentile_interval(replicates, confidence) if usable else None
        store[f"{key}_ci_n_resamples"] = usable

    for name in OVERALL_METRICS:
        estimate(metrics, name, name)
    if probs_cal is not None:
        metrics["temperature_scaled"] = {}
        for name in CALIBRATION_METRICS:
            estimate(metrics["temperature_scaled"], name, name + "_cal")
    cm = confusion_matrices(y_true, probs.argmax(axis=1), len(class_names))
    metrics["per_class"] = {}
    for k, name in enumerate(class_names):
        stats = per_class_metrics(cm, k, confidence)
        for metric in ("f1", "auroc", "auprc"):
            estimate(stats, metric, metric, k)
        # AUPRC of a random ranking for these counts (not the prevalence, its large-n limit)
        stats["auprc_baseline"] = expected_random_average_precision(stats["support"], n)
        metrics["per_class"][name] = stats
    metrics["confusion_matrix"] = cm.tolist()
    return metrics


def bootstrap_design(y_true, group_index, class_names, n_bootstrap, grouped):
    """How the bootstrap resamples (metrics.json's `bootstrap_design`): resamples, unit, the
    stratification rule and the units per stratum (class)."""
    unit = "patient" if grouped else "image"
    design = {"resamples": int(n_bootstrap), "unit": unit,
              "stratified_by": "true class" if not grouped else
              "the patient's class; a patient with images in several classes by the rarest of them",
              "units_per_stratum": None}
    if len(y_true):
        strata = bootstrap_strata(y_true, group_index)
        counts = np.bincount(strata, minlength=len(class_names))
        design["units_per_stratum"] = {name: int(c) for name, c in zip(class_names, counts)}
    return design


def expected_random_average_precision(n_positive, n_total):
    """Expected average precision (AUPRC as scikit-learn computes it) of a random ranking of
    n_total images of which n_positive are positive: the chance level of AUPRC for this cohort.

    Each position r (1..n) holds a positive with probability m/n, and given that, the other r-1
    images above it hold (r-1)(m-1)/(n-1) positives on average, so
    E[AP] = (1/n) sum_r (1 + (r-1)(m-1)/(n-1)) / r = (H_n + (m-1)/(n-1) (n - H_n)) / n,
    H_n the n-th harmonic number (Bestgen 2015). It tends to the prevalence m/n for large n;
    with 4 positives among 80 it is 0.098, not 0.05. None without a positive or a negative.
    """
    m, n = int(n_positive), int(n_total)
    if m == 0 or m == n:
        return None
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    return (harmonic + (m - 1) / (n - 1) * (n - harmonic)) / n


def interval_levels(grouped, n_bootstrap):
    """metrics.json's `interval_levels`: for each family of intervals, whether it is image- or
    patient-level and by which method (Wilson and the log method count images as independent;
    the bootstrap resamples patients when groups are known)."""
    unit = "patient" if grouped else "image"
    boot = (f"{unit} (percentile bootstrap of {unit}s stratified by class, {n_bootstrap} resamples)"
            if n_bootstrap else "none (--bootstrap 0)")
    levels = {"overall <metric>_ci": boot,
              "per_class f1_ci, auroc_ci, auprc_ci": boot,
              "per_class sensitivity_ci, specificity_ci, ppv_ci, npv_ci": "image (Wilson)",
              "per_class lr_pos_ci, lr_neg_ci": "image (log method)",
              "operating_point <rule>.<metric>_ci": "image (Wilson)",
              "itd_*_ci, itd_rule_*_ci": "image (Wilson)"}
    if grouped and n_bootstrap:
        levels["operating_point <rule>.sensitivity_ci_patient, specificity_ci_patient"] = boot
    return levels


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


def mcnemar_test(correct_a, correct_b):
    """Exact and mid-p McNemar tests on the discordant pairs (binomial, p = 1/2, two-sided).

    Returns
    -------
    dict with a_only (A right, B wrong), b_only, p_exact, p_mid (None without discordant pairs).
    """
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


def format_p(p, n_resamples=None):
    """A p-value for text: 'n/a', '<0.001' or three decimals. A two-sided bootstrap p of 0 from
    `n_resamples` resamples only says p < 2/B (twice the smaller tail share, whose smallest
    non-zero value is 1/B): '< 0.001' for 2,000, '< 0.01' for 200."""
    if p is None:
        return "n/a"
    if p == 0 and n_resamples:
        return f"< {2.0 / n_resamples:.2g}"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


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


def mean_nll(logits, y_true, temperature=1.0):
    """Mean negative log-likelihood (cross-entropy) of softmax(logits / temperature) at the true
    classes, in float64: the validation loss, and what `fit_temperature` minimises."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true, dtype=np.int64)
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y_true)), y_true].mean())


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


def fit_temperature(logits, y_true):
    """Temperature T > 0 minimising the validation NLL of softmax(logits / T) (Guo et al. 2017)."""
    logits, y_true = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    if len(y_true) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: mean_nll(logits, y_true, math.exp(log_t)),
                             bounds=(-4.0, 4.0), method="bounded")
    return float(math.exp(result.x))


# ----------------------------------------------------------------------------------------------
# Comparing other models' (or readers') predictions with ours on the same images (--compare,
# --baseline), and the subgroup analysis (--subgroups). Pure: arrays in, plain dicts out.

COMPARISON_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "rare_sensitivity",
                      "rare_specificity", "macro_auroc", "rare_auroc")


def delong_placements(positive, scores):
    """DeLong's structural components of one AUROC: (auc, V10 per positive, V01 per negative).

    V10 of a positive is the share of negatives it outranks (ties one half), V01 of a negative
    the share of positives that outrank it; AUROC is the mean of either. Computed by binary search
    in the sorted scores (O(n log n)) rather than DeLong's n_pos x n_neg comparisons.
    """
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = np.sort(scores[positive]), np.sort(scores[~positive])
    below = lambda sorted_, x: (np.searchsorted(sorted_, x, "left")  # noqa: E731
                                + np.searchsorted(sorted_, x, "right")) / 2.0  # ties count one half
    v10 = below(neg, scores[positive]) / len(neg)
    v01 = (len(pos) - below(pos, scores[~positive])) / len(pos)
    return float(v10.mean()), v10, v01


def delong_test(positive, scores_a, scores_b):
    """DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUROCs on the same images.

    Var(A - B) = (S10_aa + S10_bb - 2 S10_ab) / m + (S01_aa + S01_bb - 2 S01_ab) / n, with S10
    (S01) the covariance matrix (divisor m - 1, n - 1) of the positives' (negatives') structural
    components and m, n the positive and negative counts. The images are independent units.

    Returns
    -------
    dict with auroc_a, auroc_b, difference, se, z, p (two-sided normal); p is None when the
    variance is 0 (identical rankings) or a class has fewer than 2 images.
    """
    positive = np.asarray(positive, bool)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        return {"auroc_a": None, "auroc_b": None, "difference": None, "se": None, "z": None, "p": None}
    auc_a, v10_a, v01_a = delong_placements(positive, scores_a)
    auc_b, v10_b, v01_b = delong_placements(positive, scores_b)
    s10, s01 = np.cov(np.vstack([v10_a, v10_b])), np.cov(np.vstack([v01_a, v01_b]))
    variance = ((s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n)
    out = {"auroc_a": auc_a, "auroc_b": auc_b, "difference": auc_a - auc_b, "se": None, "z": None,
           "p": None}
    if variance > 1e-15:
        out["se"] = math.sqrt(variance)
        out["z"] = out["difference"] / out["se"]
        out["p"] = float(2.0 * norm.sf(abs(out["z"])))
    return out


def obuchowski_test(correct_a, correct_b, groups):
    """Obuchowski (1998) test of two correlated proportions with clustered data: McNemar's
    question (is accuracy A = accuracy B?) when images come in patients.

    With d_i = correct_a_i - correct_b_i, D_k its sum over the images of cluster k and K
    clusters, the variance of sum(d) is estimated under the null hypothesis (no difference, so
    the clusters' D_k are centred at 0) as K / (K - 1) * sum_k D_k^2, which gives
    X^2 = (K - 1) / K * (sum_k D_k)^2 / sum_k D_k^2 on 1 df (Yang, Sun & Hardin 2010's form of
    Obuchowski's statistic, as in R's clust.bin.pair). With one image per cluster it is McNemar's
    (B - C)^2 / (B + C) times (K - 1) / K. Centring at the observed difference instead (a Wald
    test) collapses when every patient favours the same model and gives absurdly small p.

    Returns
    -------
    dict with difference, chi2, p (None when no cluster is discordant), n_clusters.
    """
    d = np.asarray(correct_a, np.float64) - np.asarray(correct_b, np.float64)
    index = group_indices(groups, len(d))
    k = int(index.max()) + 1 if len(d) else 0
    out = {"difference": float(d.mean()) if len(d) else None, "chi2": None, "p": None, "n_clusters": k}
    if k < 2:
        return out
    sums = np.bincount(index, d, minlength=k)  # D_k
    denominator = np.sum(sums ** 2)
    if denominator > 0:
        out["chi2"] = float((k - 1) / k * sums.sum() ** 2 / denominator)
        out["p"] = float(chi2_dist.sf(out["chi2"], 1))
    return out


def prediction_columns(y_true, y_pred, n_classes):
    """(N, C*C) one-hot confusion cells of each image: weighted sums give the confusion matrix."""
    return np.eye(n_classes * n_classes)[np.asarray(y_true, np.int64) * n_classes + np.asarray(y_pred, np.int64)]


def prediction_metrics(weights, cells, n_classes, rare_index, rankings=None, positive=None):
    """COMPARISON_METRICS of one model's predictions under each row of weights.

    Parameters
    ----------
    weights : (B, N) float array
    cells : (N, C*C) from `prediction_columns`
    rankings : per class `tie_blocks` of its probability, or None (no probabilities: no AUROC)
    positive : (N, C) bool, the images of each class

    Returns
    -------
    dict name -> (B,) float array, NaN where undefined.
    """
    cms = (np.atleast_2d(weights) @ cells).reshape(-1, n_classes, n_classes)
    out = {key: value for key, value in metrics_from_confusion(cms).items() if key != "f1"}
    row, col = cms.sum(axis=2)[:, rare_index], cms.sum(axis=1)[:, rare_index]
    total, hit = cms.sum(axis=(1, 2)), cms[:, rare_index, rare_index]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["rare_sensitivity"] = hit / row
        out["rare_specificity"] = (total - row - col + hit) / (total - row)
    nan = np.full(len(cms), np.nan)
    out["macro_auroc"], out["rare_auroc"] = nan, nan.copy()
    if rankings is not None:
        aurocs = np.stack([weighted_auroc_auprc(np.atleast_2d(weights), order, starts, positive[:, k])[0]
                           for k, (order, starts) in enumerate(rankings)], axis=1)
        out["macro_auroc"], out["rare_auroc"] = aurocs.mean(axis=1), aurocs[:, rare_index]
    return out


def bootstrap_p(differences):
    """Two-sided paired-bootstrap p: twice the smaller share of replicate differences on either
    side of 0 (a rough guide; the interval is the result to report). None without replicates."""
    finite = np.asarray(differences, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    return float(min(1.0, 2.0 * min(np.mean(finite <= 0), np.mean(finite >= 0))))


@dataclasses.dataclass
class ComparedModel:
    """One model's answers on the scored images, for `compare_predictions`."""
    name: str
    pred: np.ndarray  # (N,) int class index, -1 where the model gave no answer
    probs: np.ndarray | None  # (N, C) or None (labels only: no AUROC)


def comparison_rows(name, point, boot, mask, confidence):
    """The COMPARISON_METRICS rows of one model against the reference (see `compare_predictions`)."""
    rows = []
    for metric in COMPARISON_METRICS:
        value, ref = finite_or_none(point[1][metric][0]), finite_or_none(point[0][metric][0])
        row = {"model": name, "metric": metric, "n": int(mask.sum()),
               "n_no_answer": int(len(mask) - mask.sum()), "n_resamples": None,
               "value": value, "value_ci": None,
               "reference_value": ref, "reference_ci": None,
               "difference": None if value is None or ref is None else ref - value,  # ours - model
               "difference_ci": None, "p_bootstrap": None, "p_mcnemar_exact": None,
               "p_mcnemar_mid": None, "p_mcnemar_clustered": None, "p_delong": None,
               "model_only_correct": None, "reference_only_correct": None}
        if boot is not None and row["difference"] is not None:
            diff = boot[0][metric] - boot[1][metric]
            row.update(n_resamples=int(np.isfinite(diff).sum()),  # usable ones: see compare_predictions
                       value_ci=percentile_interval(boot[1][metric], confidence),
                       reference_ci=percentile_interval(boot[0][metric], confidence),
                       difference_ci=percentile_interval(diff, confidence), p_bootstrap=bootstrap_p(diff))
        rows.append(row)
    return rows


def compare_predictions(y_true, reference, others, rare_index=0, groups=None,
                        n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """Each model in `others` against `reference` (our model) on the same images.

    Each comparison uses the images both models answered (a model's -1 rows drop out of its own
    comparison only). Every model is scored on the SAME bootstrap resamples (drawn once over all
    images, by patient when `groups` is given, as `compute_metrics` draws them): an image a model
    did not answer has weight 0 in its replicates. Per model and metric: its value and the
    reference's on those images with percentile CIs, the paired difference (reference - model,
    positive when our model is better) with its CI and a two-sided bootstrap p, and how many
    resamples gave the metric (`n_resamples`: a resample without an answered image of a class
    gives no class-averaged metric, as in `compute_metrics`; one without an answered rare image no
    rare-class sensitivity or AUROC; a class it never answered, none at all: `unanswered_classes`); for accuracy McNemar's exact and mid-p tests and,
    with groups, Obuchowski's clustered test; for the rare class's AUROC DeLong's test (images
    independent) when both models have probabilities.

    Parameters
    ----------
    y_true : (N,) int array
    reference : ComparedModel (every pred >= 0)
    others : list of ComparedModel
    rare_index : int
        The class whose sensitivity, specificity and AUROC are compared.
    groups : (N,) array of str, optional

    Returns
    -------
    dict: n, n_groups, bootstrap_unit, rows (list of dicts, see `comparison_rows`).
    """
    y_true = np.asarray(y_true, np.int64)
    n, n_classes = len(y_true), (reference.probs.shape[1] if reference.probs is not None
                                 else int(max(y_true.max(), reference.pred.max())) + 1)
    group_index = group_indices(groups, n)
    positive = y_true[:, None] == np.arange(n_classes)
    ranking = lambda probs: None if probs is None else [tie_blocks(probs[:, k]) for k in range(n_classes)]  # noqa: E731
    rows = []
    for other in others:
        mask = np.asarray(other.pred) >= 0
        has_probs = other.probs is not None and reference.probs is not None
        models = [(prediction_columns(y_true, reference.pred, n_classes),
                   ranking(reference.probs) if has_probs else None),
                  (prediction_columns(y_true, np.where(mask, other.pred, 0), n_classes),
                   ranking(np.nan_to_num(other.probs)) if has_probs else None)]
        evaluate = lambda weights: [prediction_metrics(weights * mask, cells, n_classes, rare_index,  # noqa: E731
                                                       ranks, positive) for cells, ranks in models]
        # metrics.json's rule on the images the model answered: without an answered image of a class
        # the cohort holds (in the resample, or at all) there is no balanced accuracy or macro F1
        # (NaN: left out of the interval and counted in n_resamples; None when never answered),
        # rather than an average over fewer classes
        present = positive.any(axis=0)
        point = [mark_unusable(metric, present) for metric in evaluate(np.ones((1, n)))]
        boot = None
        if n_bootstrap:
            # the resamples of metrics.json: same seed, groups and class strata
            strata = bootstrap_strata(y_true, group_index)
            parts = [evaluate(w) for w in resample_weights(group_index, n_bootstrap, seed, strata=strata)]
            boot = [mark_unusable({key: np.concatenate([part[i][key] for part in parts])
                                   for key in parts[0][i]}, present) for i in range(2)]
        model_rows = comparison_rows(other.name, point, boot, mask, confidence)
        unanswered = np.flatnonzero(present & ~(positive & mask[:, None]).any(axis=0)).tolist()
        for row in model_rows:
            row["unanswered_classes"] = unanswered  # classes of the cohort it answered no image of
        add_paired_tests(model_rows, y_true[mask], reference, other, mask, rare_index,
                         None if groups is None else np.asarray(groups)[mask], has_probs)
        rows += model_rows
    return {"n": n, "n_groups": int(group_index.max()) + 1 if n else 0,
            "bootstrap_unit": "image" if groups is None else "group", "n_bootstrap": int(n_bootstrap),
            "rows": rows}


def add_paired_tests(rows, y_true, reference, other, mask, rare_index, groups, has_probs):
    """McNemar (exact, mid-p, clustered) on the accuracy row, DeLong on the rare AUROC row."""
    correct_ref = reference.pred[mask] == y_true
    correct_other = other.pred[mask] == y_true
    by_metric = {row["metric"]: row for row in rows}
    mcnemar = mcnemar_test(correct_ref, correct_other)
    by_metric["accuracy"].update(p_mcnemar_exact=mcnemar["p_exact"], p_mcnemar_mid=mcnemar["p_mid"],
                                 reference_only_correct=mcnemar["a_only"],
                                 model_only_correct=mcnemar["b_only"])
    if groups is not None:
        by_metric["accuracy"]["p_mcnemar_clustered"] = obuchowski_test(correct_ref, correct_other, groups)["p"]
    if has_probs:
        delong = delong_test(y_true == rare_index, reference.probs[mask, rare_index],
                             other.probs[mask, rare_index])
        by_metric["rare_auroc"]["p_delong"] = delong["p"]


# ----------------------------------------------------------------------------------------------
# Sequential readings: the same images diagnosed at several steps as information is added (the
# paper's second step: image, + demographics, + symptoms). Pure: labels and predictions in.

SEQUENTIAL_MEASURES = ("sensitivity", "specificity")


def cochrans_q(successes):
    """Cochran's Q test that K paired binary outcomes share one success rate.

    Written out because metrics.py is numpy/scipy only; the tests check it against
    statsmodels.stats.contingency_tables.cochrans_q. With K = 2 it is McNemar's chi-square
    without continuity correction.

    Parameters
    ----------
    successes : (N, K) bool or 0/1 array
        One row per subject read at every step (complete cases), one column per step.

    Returns
    -------
    dict: q, df (K - 1), p_value (chi-square with K - 1 df), n. q and p_value are None when no
    row differs between steps (every row all-success or all-failure: the test is undefined).
    """
    x = np.asarray(successes, dtype=np.float64)
    n, k = x.shape
    per_step, per_subject = x.sum(axis=0), x.sum(axis=1)
    total = per_subject.sum()
    denominator = k * total - float((per_subject ** 2).sum())  # 0 when no row is discordant
    if k < 2 or denominator <= 0:
        return {"q": None, "df": k - 1, "p_value": None, "n": int(n)}
    q = (k - 1) * (k * float((per_step ** 2).sum()) - total ** 2) / denominator
    return {"q": float(q), "df": k - 1, "p_value": float(chi2_dist.sf(q, k - 1)), "n": int(n)}


def reading_successes(y_true, y_pred, k, measure):
    """(relevant, success) of class k's sensitivity (relevant: images of class k; success:
    predicted k) or specificity (relevant: images of other classes; success: not predicted k).
    A failed reading (y_pred -1) is a miss here; callers leave failed readings out first."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if measure == "sensitivity":
        return y_true == k, y_pred == k
    if measure == "specificity":
        return y_true != k, (y_pred != k) & (y_pred >= 0)
    raise ValueError(f"unknown measure {measure!r} (expected one of {SEQUENTIAL_MEASURES})")


def sequential_steps(y_true, preds, class_names, step_names, confidence=CONFIDENCE_LEVEL):
    """Per class sensitivity and specificity at each step (Wilson), on the images that step
    scored (failed readings, y_pred -1, left out as in that step's metrics.json).

    Returns
    -------
    list of dicts: class, measure, step, n (relevant images scored), hits, value, ci.
    """
    rows = []
    for k, name in enumerate(class_names):
        for measure in SEQUENTIAL_MEASURES:
            for step, y_pred in zip(step_names, preds):
                relevant, success = reading_successes(y_true, y_pred, k, measure)
                relevant &= np.asarray(y_pred) >= 0
                n, hits = int(relevant.sum()), int((relevant & success).sum())
                rows.append({"class": name, "measure": measure, "step": step, "n": n, "hits": hits,
                             "value": proportion(hits, n), "ci": wilson_interval(hits, n, confidence)})
    return rows


def paired_step_change(y_true, pred_from, pred_to, n_classes, group_index, n_bootstrap, seed,
                       confidence=CONFIDENCE_LEVEL, clustered=False):
    """Change of every class's sensitivity and specificity from one step to the next, on the
    images both steps scored: the difference with a percentile-bootstrap CI (the resamples of
    `resample_weights`, so patients stay together with groups) and McNemar's test on the
    discordant images (and with `clustered`, Obuchowski's test, McNemar's question when images
    come in patients, on the groups of `group_index`).

    Parameters
    ----------
    y_true, pred_from, pred_to : (N,) int arrays of the images both steps scored.
    group_index : (N,) int array from `group_indices`.

    Returns
    -------
    list of dicts (class index order, sensitivity then specificity): k, measure, n, from_value,
    to_value, difference, difference_ci, gained (right only at the later step), lost, p_exact,
    p_mid, p_clustered (None unless `clustered`).
    """
    pairs = [reading_successes(y_true, pred, k, measure)
             for k in range(n_classes) for measure in SEQUENTIAL_MEASURES for pred in (pred_from, pred_to)]
    relevant = np.stack([pairs[i][0] for i in range(0, len(pairs), 2)], axis=1).astype(np.float64)
    before = np.stack([pairs[i][1] for i in range(0, len(pairs), 2)], axis=1) & (relevant > 0)
    after = np.stack([pairs[i][1] for i in range(1, len(pairs), 2)], axis=1) & (relevant > 0)
    diffs = []
    for weights in (resample_weights(group_index, n_bootstrap, seed) if n_bootstrap else ()):
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample without the class: NaN
            diffs.append((weights @ (after.astype(float) - before)) / (weights @ relevant))  # (b, M)
    diffs = np.concatenate(diffs) if diffs else None
    rows = []
    for m in range(relevant.shape[1]):
        rel = relevant[:, m] > 0
        n = int(rel.sum())
        a, b = proportion(int(before[:, m].sum()), n), proportion(int(after[:, m].sum()), n)
        test = mcnemar_test(after[rel, m], before[rel, m])  # a_only: right only at the later step
        rows.append({"k": m // len(SEQUENTIAL_MEASURES),
                     "measure": SEQUENTIAL_MEASURES[m % len(SEQUENTIAL_MEASURES)], "n": n,
                     "from_value": a, "to_value": b, "difference": None if n == 0 else b - a,
                     "difference_ci": (percentile_interval(diffs[:, m], confidence)
                                       if diffs is not None and n else None),
                     "gained": test["a_only"], "lost": test["b_only"],
                     "p_exact": test["p_exact"], "p_mid": test["p_mid"],
                     "p_clustered": (obuchowski_test(after[rel, m], before[rel, m], group_index[rel])["p"]
                                     if clustered and n else None)})
    return rows


def sequential_analysis(y_true, preds, class_names, step_names, groups=None,
                        n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """The sequential table: per class sensitivity and specificity at each step (Wilson), the
    paired change between consecutive steps (bootstrap CI, McNemar; with groups also Obuchowski's
    clustered test) and Cochran's Q across all steps on the images every step scored.

    Parameters
    ----------
    y_true : (N,) int array
        True class of every image received.
    preds : (S, N) int array
        Predicted class of each image at each of S steps; -1 where the reading failed (an
        unmapped answer, an unreadable image): left out of that step and of its pairs.
    class_names, step_names : lists of str (C and S names).
    groups : (N,) array of str, optional
        Patient of each image: the bootstrap resamples patients.

    Returns
    -------
    dict: steps, n_received, n_complete (scored at every step), bootstrap_unit, per_step (see
    `sequential_steps`), changes (rows of `paired_step_change` with class, from_step, to_step),
    omnibus (class, measure, and `cochrans_q`'s q, df, p_value, n; None without two steps).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64).reshape(len(step_names), len(y_true))
    scored = preds >= 0  # (S, N)
    changes = []
    for s in range(1, len(step_names)):
        both = scored[s - 1] & scored[s]
        index = group_indices(None if groups is None else np.asarray(groups, dtype=str)[both],
                              int(both.sum()))
        boot = n_bootstrap if both.any() else 0  # no image read at both steps: nothing to resample
        for row in paired_step_change(y_true[both], preds[s - 1][both], preds[s][both],
                                      len(class_names), index, boot, seed, confidence,
                                      clustered=groups is not None):
            changes.append({"class": class_names[row.pop("k")], "from_step": step_names[s - 1],
                            "to_step": step_names[s], **row})
    complete = scored.all(axis=0)
    omnibus = []
    for k, name in enumerate(class_names):
        for measure in SEQUENTIAL_MEASURES:
            outcome = [reading_successes(y_true[complete], p[complete], k, measure) for p in preds]
            relevant = outcome[0][0]
            successes = np.stack([success[relevant] for _rel, success in outcome], axis=1)
            test = cochrans_q(successes) if len(step_names) > 1 else None
            omnibus.append({"class": name, "measure": measure, **(test or {})})
    return {"steps": list(step_names), "n_received": int(len(y_true)),
            "n_complete": int(complete.sum()),
            "bootstrap_unit": "image" if groups is None else "group",
            "per_step": sequential_steps(y_true, preds, class_names, step_names, confidence),
            "changes": changes, "omnibus": omnibus}


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


SMALL_SUBGROUP_N = 30  # fewer images in a level: its intervals are wide, flag it in the report
SMALL_SUBGROUP_RARE_N = 10  # fewer rare-class images: its sensitivity is barely estimable


def homogeneity_test(outcome, levels):
    """Chi-square test that a binary outcome has the same rate in every level (a 2 x L table;
    images independent). Returns dict chi2, df, p, min_expected (None with fewer than 2 levels
    holding images or an outcome that never varies)."""
    outcome, levels = np.asarray(outcome, bool), np.asarray(levels, dtype=str)
    names = sorted(set(levels.tolist()))
    table = np.array([[np.sum(outcome & (levels == name)), np.sum(~outcome & (levels == name))]
                      for name in names], dtype=np.float64)
    table = table[table.sum(axis=1) > 0]
    out = {"chi2": None, "df": None, "p": None, "min_expected": None}
    if len(table) < 2 or (table.sum(axis=0) == 0).any():
        return out
    result = chi2_contingency(table, correction=False)
    out.update(chi2=float(result.statistic), df=int(result.dof), p=float(result.pvalue),
               min_expected=float(result.expected_freq.min()))
    return out


def subgroup_rows(y_true, probs, levels, rare_index=0, groups=None, n_bootstrap=DEFAULT_BOOTSTRAP,
                  seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """Per level of one attribute: n, patients, rare-class prevalence, accuracy and balanced
    accuracy (bootstrap CIs, by patient with `groups`, resampled within the level), rare-class
    sensitivity and specificity (Wilson, images independent) and rare-class and macro AUROC
    (bootstrap), with a `small_n` flag.

    Parameters
    ----------
    y_true : (N,) int; probs : (N, C) float; levels : (N,) str, the attribute's level per image.

    Returns
    -------
    list of dicts, one per level in sorted order.
    """
    y_true, probs = np.asarray(y_true, np.int64), np.asarray(probs, np.float64)
    levels = np.asarray(levels, dtype=str)
    pred, n_classes = probs.argmax(axis=1), probs.shape[1]
    rows = []
    for level in sorted(set(levels.tolist())):
        mine = levels == level
        y, p, hat = y_true[mine], probs[mine], pred[mine]
        sub_groups = None if groups is None else np.asarray(groups, dtype=str)[mine]
        index = group_indices(sub_groups, len(y))
        cells = prediction_columns(y, hat, n_classes)
        ranks = [tie_blocks(p[:, k]) for k in range(n_classes)]
        positive = y[:, None] == np.arange(n_classes)
        evaluate = lambda w: prediction_metrics(w, cells, n_classes, rare_index, ranks, positive)  # noqa: E731
        point = evaluate(np.ones((1, len(y))))
        parts = ([evaluate(w) for w in resample_weights(index, n_bootstrap, seed,
                                                        strata=bootstrap_strata(y, index))]
                 if n_bootstrap else [])
        rare = y == rare_index
        tp, fn = int(np.sum(rare & (hat == rare_index))), int(np.sum(rare & (hat != rare_index)))
        tn, fp = int(np.sum(~rare & (hat != rare_index))), int(np.sum(~rare & (hat == rare_index)))
        row = {"level": level, "n": int(len(y)), "n_patients": int(index.max()) + 1,
               "n_rare": int(rare.sum()), "prevalence": proportion(int(rare.sum()), len(y)),
               "rare_sensitivity": proportion(tp, tp + fn), "rare_sensitivity_ci": wilson_interval(tp, tp + fn, confidence),
               "rare_specificity": proportion(tn, tn + fp), "rare_specificity_ci": wilson_interval(tn, tn + fp, confidence)}
        for name in ("accuracy", "balanced_accuracy", "rare_auroc", "macro_auroc"):
            row[name] = finite_or_none(point[name][0])
            replicates = np.concatenate([part[name] for part in parts]) if parts else None
            row[f"{name}_ci"] = (percentile_interval(replicates, confidence)
                                 if parts and row[name] is not None else None)
        row["small_n"] = row["n"] < SMALL_SUBGROUP_N or row["n_rare"] < SMALL_SUBGROUP_RARE_N
        rows.append(row)
    return rows


def subgroup_analysis(y_true, probs, attributes, rare_index=0, groups=None,
                      n_bootstrap=DEFAULT_BOOTSTRAP, seed=DEFAULT_SEED, confidence=CONFIDENCE_LEVEL):
    """`subgroup_rows` of each attribute plus its heterogeneity tests: chi-square homogeneity of
    accuracy across levels and of rare-class sensitivity across levels (among rare images).

    Parameters
    ----------
    attributes : dict attribute name -> (N,) str levels

    Returns
    -------
    list of dicts: attribute, rows, accuracy_test, rare_sensitivity_test (`homogeneity_test`).
    """
    y_true, probs = np.asarray(y_true, np.int64), np.asarray(probs, np.float64)
    correct = probs.argmax(axis=1) == y_true
    rare = y_true == rare_index
    out = []
    for name, levels in attributes.items():
        levels = np.asarray(levels, dtype=str)
        out.append({"attribute": name,
                    "rows": subgroup_rows(y_true, probs, levels, rare_index, groups, n_bootstrap,
                                          seed, confidence),
                    "accuracy_test": homogeneity_test(correct, levels),
                    "rare_sensitivity_test": homogeneity_test(correct[rare], levels[rare])})
    return out
